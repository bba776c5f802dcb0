//! The maintenance worker: one thread that takes every queued write as a round and brings each
//! view up to date, in dependency order, one depth level at a time.
//!
//! A round ([`Views::run_round`]):
//! 1. the queued chunks become per-table [`Change`]s;
//! 2. per depth level: each view computes its new storage rows ([`super::maintain::round`]);
//! 3. the level's rows are written as one write per database (one WAL record, one fsync),
//!    with the views' applied sequence, and the observer (subscriptions) is told each view's
//!    change ([`Views::write_level`]);
//! 4. the level's own changes feed the next level's views;
//! 5. a view whose round failed keeps its changes as pending recomputes, retried next round.

use std::collections::HashMap;
use std::sync::{Arc, Weak};

use arrow::array::RecordBatch;

use super::maintain::{self, Out};
use super::queue::Item;
use super::{Change, PROGRESS_TABLE, View, Views};

/// One database's writes of a depth level: (table, rows) and the views they advance (with
/// their rows).
type LevelWrite = (Vec<(String, RecordBatch)>, Vec<(Arc<View>, RecordBatch)>);

/// A view's result in a round, and when its maintenance started (database clock, ns).
type Done = (Arc<View>, Out, i64);

/// Runs the maintenance worker until the views are stopped or the database is gone.
pub(super) fn run(views: Weak<Views>) {
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "could not start the view maintenance runtime");
            return;
        }
    };
    let Some(shared) = views.upgrade().map(|v| v.shared.clone()) else {
        return;
    };
    if let Some(v) = views.upgrade() {
        if let Err(e) = runtime.block_on(v.load()) {
            tracing::error!(error = %e, "could not load the materialized views");
        }
        // Subscription views belong to the subscriptions of the run that made them.
        v.drop_subscription_views();
        // Subscribers resume from the stored change logs.
        if let Some(observer) = v.observer() {
            for view in v.all() {
                observer.loaded(&view);
            }
        }
    }
    shared.set_loaded();
    while let Some((items, upto)) = shared.next_round() {
        let Some(v) = views.upgrade() else { return };
        let failed = v.run_round(&runtime, items, upto);
        drop(v);
        if failed {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}

impl Views {
    /// One round over the queued `items` (up to sequence `upto`); true when a view failed.
    fn run_round(&self, runtime: &tokio::runtime::Runtime, items: Vec<Item>, upto: u64) -> bool {
        let round_lock = self.round.lock();
        let bytes: usize = items
            .iter()
            .flat_map(|i| i.1.iter())
            .map(|(_, c)| c.batch.get_array_memory_size())
            .sum();
        let oldest = items.first().map(|i| i.2);
        let mut changes: HashMap<u64, Change> = HashMap::new();
        for (_, chunks, _) in items {
            for (id, chunk) in chunks {
                changes.entry(id).or_default().chunks.push(chunk);
            }
        }
        let views = self.all();
        let mut failed = false;
        // Views of one depth read only shallower ones: run a depth, write its rows as one write
        // per database (one WAL record, one fsync), then the next depth reads them.
        let mut start = 0;
        while start < views.len() {
            let depth = views[start].depth;
            let end = views[start..]
                .iter()
                .position(|v| v.depth != depth)
                .map_or(views.len(), |n| start + n);
            let level = &views[start..end];
            start = end;
            let (mut done, level_failed) = self.maintain_level(runtime, level, &changes, upto);
            failed |= level_failed;
            let write_error = self.write_level(runtime, &mut done, upto);
            failed |= self.finish_level(done, write_error, &mut changes, upto, oldest);
        }
        self.shared.finish_round(upto, bytes);
        drop(round_lock);
        failed
    }

    /// Step 2: each view of a level computes its rows. Views without changes just advance.
    fn maintain_level(
        &self,
        runtime: &tokio::runtime::Runtime,
        level: &[Arc<View>],
        changes: &HashMap<u64, Change>,
        upto: u64,
    ) -> (Vec<Done>, bool) {
        let mut done = Vec::new();
        let mut failed = false;
        for view in level {
            let started = self.shared.clock.now_ns();
            match runtime.block_on(maintain::round(self, view, changes, upto)) {
                Ok(Some(out)) => done.push((view.clone(), out, started)),
                Ok(None) => {
                    let mut st = view.status.lock();
                    st.applied = st.applied.max(upto);
                    st.last_error = None;
                }
                Err(e) => {
                    failed = true;
                    retry_later(view, changes, &e.to_string());
                }
            }
        }
        (done, failed)
    }

    /// Step 3: writes the level's rows, one write per database with the views' progress, and
    /// tells the observer. Returns the write error, if any.
    fn write_level(
        &self,
        runtime: &tokio::runtime::Runtime,
        done: &mut [Done],
        upto: u64,
    ) -> Option<String> {
        let mut by_db: HashMap<Arc<str>, LevelWrite> = HashMap::new();
        for (view, out, _) in done.iter_mut() {
            if let Some(rows) = out.rows.take() {
                let entry = by_db.entry(view.db.clone()).or_default();
                view.status.lock().rows_written += rows.num_rows() as u64;
                entry.0.push((view.table.name.to_string(), rows.clone()));
                entry.1.push((view.clone(), rows));
            }
        }
        let observer = self.observer();
        let mut write_error = None;
        for (db_name, (mut tables, written)) in by_db {
            let views: Vec<Arc<View>> = written.iter().map(|(v, _)| v.clone()).collect();
            let names: Vec<String> = views.iter().map(|v| v.name()).collect();
            if let Some(o) = &observer {
                o.begin_write(&views);
            }
            let result = maintain::progress_batch(&names, upto).and_then(|p| {
                tables.push((PROGRESS_TABLE.to_string(), p));
                runtime.block_on(maintain::write_tables(self, &db_name, tables))
            });
            match result {
                Ok(seq) => {
                    for (view, rows) in written {
                        self.log_change(runtime, observer.as_deref(), &view, &rows, seq, upto);
                    }
                }
                Err(e) => {
                    if let Some(o) = &observer {
                        for view in &views {
                            o.written(view, None, upto, None, None);
                        }
                    }
                    write_error = Some(e.to_string());
                }
            }
        }
        write_error
    }

    /// Tells the observer what view write `seq` changed, as subscribers see it.
    fn log_change(
        &self,
        runtime: &tokio::runtime::Runtime,
        observer: Option<&dyn super::ViewObserver>,
        view: &Arc<View>,
        rows: &RecordBatch,
        seq: u64,
        upto: u64,
    ) {
        let Some(o) = observer else { return };
        match runtime.block_on(super::emit::view_entry(self, view, rows, seq)) {
            Ok((entry, wm)) => o.written(view, Some(seq), upto, entry, wm),
            Err(e) => {
                tracing::error!(view = %view.name(), error = %e, "view change not logged for subscribers");
                o.written(view, Some(seq), upto, None, None);
                o.reset(view, upto);
            }
        }
    }

    /// Step 4 (and 5): records each view's progress and feeds its changes to the next level;
    /// true when the level's write failed.
    fn finish_level(
        &self,
        done: Vec<Done>,
        write_error: Option<String>,
        changes: &mut HashMap<u64, Change>,
        upto: u64,
        oldest: Option<i64>,
    ) -> bool {
        let mut failed = false;
        for (view, out, started) in done {
            if let Some(e) = &write_error {
                failed = true;
                retry_later(&view, changes, e);
                continue;
            }
            {
                let mut st = view.status.lock();
                st.applied = st.applied.max(upto);
                st.last_error = None;
                let now = self.shared.clock.now_ns();
                st.last_round_ms = now.saturating_sub(started) as f64 / 1e6;
                if let Some(t) = oldest {
                    st.lag_ms = now.saturating_sub(t) as f64 / 1e6;
                }
            }
            let c = changes.entry(view.table.id).or_default();
            c.ranges.extend(out.ranges);
            c.all |= out.all;
        }
        failed
    }
}

/// Records a failed round: its changes become pending recomputes, retried next round.
fn retry_later(view: &View, changes: &HashMap<u64, Change>, error: &str) {
    tracing::warn!(view = %view.name(), error, "view maintenance failed; will retry");
    let mut st = view.status.lock();
    st.last_error = Some(error.to_string());
    maintain::pend(&mut st, view, changes);
}
