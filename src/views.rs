//! Materialized views kept current incrementally.
//!
//! A view is a table: its rows (or, for aggregates, merge-able partial states) are stored by
//! the storage engine like any table's, in a table of the view's name marked as a view (rows
//! replace whole, a `__deleted` field marks removed rows), and read through [`ViewProvider`].
//!
//! Maintenance path (docs/architecture.md §10):
//! 1. the group-commit step hands every applied write that touches a view's source to
//!    [`ViewsShared`] (never blocking; writers wait before their write when the queue is over
//!    its bound);
//! 2. one worker thread takes everything queued, and for each view in dependency order turns
//!    the round's changes into new storage rows (per the view's strategy, see [`plan`]);
//! 3. it writes them, with the view's applied sequence, as one ordinary write (WAL, buffer,
//!    segments), so a view's rows and its progress are durable together;
//! 4. a view's output changes feed the views defined on it, in the same round;
//! 5. queries reading a view wait until it has applied every write visible when they started.

pub(crate) mod ddl;
mod maintain;
pub(crate) mod plan;
pub(crate) mod provider;

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, RwLock};
use serde::{Deserialize, Serialize};

pub(crate) use provider::ViewProvider;

use crate::storage::buffer::Chunk;
use crate::storage::commit::ApplyObserver;
use crate::storage::table::Table;
use ddl::ViewOptions;
use plan::ViewPlan;

/// Table holding each view's applied sequence (one row per view, at time 0).
pub(crate) const PROGRESS_TABLE: &str = "__rivulet_views";

/// A view's stored definition.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ViewDef {
    pub name: String,
    pub sql: String,
    pub options: ViewOptions,
    /// The backfill finished (else it restarts at open).
    pub backfilled: bool,
}

/// A view's maintenance state.
#[derive(Debug, Default)]
pub(crate) struct Status {
    /// Every write up to this sequence is reflected in the view.
    pub applied: u64,
    pub last_error: Option<String>,
    /// Backfill progress: (pieces done, pieces in all); None when not backfilling.
    pub backfill: Option<(u64, u64)>,
    /// Backfill still to do.
    pub backfill_pending: bool,
    /// Source-time ranges of the primary source still to recompute.
    pub pending: Vec<(i64, i64)>,
    /// The whole view must be recomputed.
    pub full: bool,
    /// (source range, sequence): the view was recomputed there reading up to at most that
    /// sequence, so earlier deltas in that range must not be merged again.
    pub fences: Vec<(i64, i64, u64)>,
    pub rows_written: u64,
    pub late_dropped: u64,
    /// Largest source time seen (for the watermark).
    pub max_source_time: Option<i64>,
    /// When the last round applied, and how long it took (ms).
    pub last_round_ms: f64,
    pub lag_ms: f64,
}

impl Status {
    pub(crate) fn has_work(&self) -> bool {
        self.backfill_pending || self.full || !self.pending.is_empty()
    }
}

/// One materialized view.
#[derive(Debug)]
pub(crate) struct View {
    pub db: Arc<str>,
    pub def: Mutex<ViewDef>,
    pub plan: ViewPlan,
    /// Its storage table.
    pub table: Arc<Table>,
    /// Table ids of its sources (base tables, or storage tables of source views).
    pub source_ids: Vec<u64>,
    /// The id of the source whose time the view's time buckets.
    pub primary_id: Option<u64>,
    /// Views before it in dependency order have a smaller depth.
    pub depth: usize,
    pub provider: Arc<ViewProvider>,
    pub status: Mutex<Status>,
}

impl View {
    pub(crate) fn name(&self) -> String {
        self.def.lock().name.clone()
    }
}

/// One database's writes of a depth level: (table, rows) and the views they advance (with
/// their rows).
type LevelWrite = (
    Vec<(String, arrow::array::RecordBatch)>,
    Vec<(Arc<View>, arrow::array::RecordBatch)>,
);

/// A write handed to the worker: its sequence and the chunks of watched tables.
type Item = (u64, Vec<(u64, Arc<Chunk>)>, std::time::Instant);

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    bytes: usize,
    /// Largest sequence queued.
    pushed: u64,
    /// Largest sequence processed.
    done: u64,
    stop: bool,
    /// Views have work without queued writes (creation, recovery, retry).
    kick: bool,
}

/// State shared by writers (through [`ApplyObserver`]), the worker and waiting queries.
pub(crate) struct ViewsShared {
    queue: Mutex<Queue>,
    wake: Condvar,
    progress: Condvar,
    /// Base tables some view reads.
    watched: RwLock<HashSet<u64>>,
    pub(crate) views: RwLock<Vec<Arc<View>>>,
    max_bytes: usize,
    /// The stored views are loaded (queries and writes wait for it after open).
    loaded: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ViewsShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewsShared").finish_non_exhaustive()
    }
}

impl ApplyObserver for ViewsShared {
    fn admit(&self) {
        self.wait_for_room();
    }

    fn applied(&self, seq: u64, chunks: &[(Arc<Table>, Arc<Chunk>)]) {
        let relevant: Vec<(u64, Arc<Chunk>)> = {
            let watched = self.watched.read();
            if watched.is_empty() {
                return;
            }
            chunks
                .iter()
                .filter(|(t, _)| watched.contains(&t.id))
                .map(|(t, c)| (t.id, c.clone()))
                .collect()
        };
        if relevant.is_empty() {
            return;
        }
        let bytes: usize = relevant
            .iter()
            .map(|(_, c)| c.batch.get_array_memory_size())
            .sum();
        let mut q = self.queue.lock();
        q.bytes += bytes;
        q.pushed = q.pushed.max(seq);
        q.items
            .push_back((seq, relevant, std::time::Instant::now()));
        self.wake.notify_one();
    }
}

impl ViewsShared {
    pub(crate) fn new(max_bytes: usize, done: u64) -> ViewsShared {
        ViewsShared {
            queue: Mutex::new(Queue {
                done,
                pushed: done,
                ..Queue::default()
            }),
            wake: Condvar::new(),
            progress: Condvar::new(),
            watched: RwLock::new(HashSet::new()),
            views: RwLock::new(Vec::new()),
            max_bytes,
            loaded: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Waits until the worker has loaded the stored views (right after open).
    pub(crate) fn wait_loaded(&self) {
        if self.loaded.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let mut q = self.queue.lock();
        while !self.loaded.load(std::sync::atomic::Ordering::Acquire) && !q.stop {
            self.progress
                .wait_for(&mut q, std::time::Duration::from_millis(50));
        }
    }

    fn set_loaded(&self) {
        let _q = self.queue.lock();
        self.loaded
            .store(true, std::sync::atomic::Ordering::Release);
        self.progress.notify_all();
    }

    /// The view `name` of database `db`.
    pub(crate) fn get(&self, db: &str, name: &str) -> Option<Arc<View>> {
        self.views
            .read()
            .iter()
            .find(|v| v.db.as_ref() == db && v.def.lock().name == name)
            .cloned()
    }

    /// The view stored in table `id`.
    pub(crate) fn by_table(&self, id: u64) -> Option<Arc<View>> {
        self.views.read().iter().find(|v| v.table.id == id).cloned()
    }

    /// Adds a view (sorted by depth) and watches its base sources.
    pub(crate) fn add(&self, view: Arc<View>) {
        let mut views = self.views.write();
        views.push(view);
        views.sort_by_key(|v| v.depth);
        self.rewatch(&views);
        drop(views);
        self.kick();
    }

    /// Removes the view stored in table `id`.
    pub(crate) fn remove(&self, id: u64) {
        let mut views = self.views.write();
        views.retain(|v| v.table.id != id);
        self.rewatch(&views);
    }

    fn rewatch(&self, views: &[Arc<View>]) {
        let storage: HashSet<u64> = views.iter().map(|v| v.table.id).collect();
        *self.watched.write() = views
            .iter()
            .flat_map(|v| v.source_ids.iter().copied())
            .filter(|id| !storage.contains(id))
            .collect();
    }

    /// Wakes the worker for views with work of their own.
    pub(crate) fn kick(&self) {
        self.queue.lock().kick = true;
        self.wake.notify_one();
    }

    /// Asks the worker to stop after the current round.
    pub(crate) fn stop(&self) {
        self.queue.lock().stop = true;
        self.wake.notify_all();
        self.progress.notify_all();
    }

    /// Blocks a writer while the queue is over its bound (the worker drains it).
    pub(crate) fn wait_for_room(&self) {
        let mut q = self.queue.lock();
        while q.bytes > self.max_bytes && !q.stop {
            self.progress
                .wait_for(&mut q, std::time::Duration::from_millis(100));
        }
    }

    /// Whether every view in `views` reflects every write up to `seq`.
    fn caught_up(&self, q: &Queue, views: &[Arc<View>], seq: u64) -> bool {
        q.done >= seq.min(q.pushed) && views.iter().all(|v| !v.status.lock().has_work())
    }

    /// Waits until `views` reflect every write up to `seq`, or `timeout` passes.
    pub(crate) fn wait(
        &self,
        views: &[Arc<View>],
        seq: u64,
        timeout: std::time::Duration,
    ) -> Result<(), String> {
        let deadline = std::time::Instant::now() + timeout;
        let mut q = self.queue.lock();
        loop {
            if self.caught_up(&q, views, seq) {
                return Ok(());
            }
            if q.stop {
                return Err("the database is closing".to_string());
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                let mut parts = Vec::new();
                for v in views {
                    let st = v.status.lock();
                    let mut s = format!("'{}' has applied writes up to {}", v.name(), st.applied);
                    if let Some((done, total)) = st.backfill {
                        s.push_str(&format!(", backfill {done}/{total}"));
                    }
                    if let Some(e) = &st.last_error {
                        s.push_str(&format!(", last error: {e}"));
                    }
                    parts.push(s);
                }
                return Err(format!(
                    "materialized views did not catch up with write {seq} within {:?}: {}",
                    timeout,
                    parts.join("; ")
                ));
            }
            self.progress.wait_for(&mut q, deadline - now);
        }
    }

    /// The worker's next round: every queued write (None when stopping).
    fn next_round(&self) -> Option<(Vec<Item>, u64)> {
        let mut q = self.queue.lock();
        loop {
            if !q.items.is_empty() || q.kick {
                q.kick = false;
                let items: Vec<Item> = q.items.drain(..).collect();
                let upto = items.last().map_or(q.done, |i| i.0);
                return Some((items, upto));
            }
            if q.stop {
                return None;
            }
            self.wake
                .wait_for(&mut q, std::time::Duration::from_millis(500));
            if !q.stop
                && q.items.is_empty()
                && self.views.read().iter().any(|v| v.status.lock().has_work())
            {
                // Retry views whose last round failed.
                q.kick = true;
            }
        }
    }

    /// Marks a round done.
    fn finish_round(&self, upto: u64, bytes: usize) {
        let mut q = self.queue.lock();
        q.done = q.done.max(upto);
        q.bytes = q.bytes.saturating_sub(bytes);
        self.progress.notify_all();
    }
}

/// The changes of one round to one table: chunks written to it, and ranges of it recomputed.
#[derive(Default)]
pub(crate) struct Change {
    pub chunks: Vec<Arc<Chunk>>,
    pub ranges: Vec<(i64, i64)>,
    /// Changed everywhere.
    pub all: bool,
}

/// Records a failed round: its changes become pending recomputes, retried next round.
fn retry_later(view: &View, changes: &HashMap<u64, Change>, error: &str) {
    tracing::warn!(view = %view.name(), error, "view maintenance failed; will retry");
    let mut st = view.status.lock();
    st.last_error = Some(error.to_string());
    for id in &view.source_ids {
        if let Some(c) = changes.get(id) {
            if Some(*id) == view.primary_id && !c.all {
                st.pending
                    .extend(c.chunks.iter().map(|c| (c.min_time, c.max_time)));
                st.pending.extend(c.ranges.iter().copied());
            } else {
                st.full = true;
            }
        }
    }
}

/// Runs the maintenance worker until the views are stopped or the database is gone.
pub(crate) fn run_worker(db: std::sync::Weak<crate::db::DbInner>, shared: Arc<ViewsShared>) {
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
    if let Some(inner) = db.upgrade()
        && let Err(e) = runtime.block_on(inner.load_views())
    {
        tracing::error!(error = %e, "could not load the materialized views");
    }
    if let Some(inner) = db.upgrade() {
        // Subscribers resume from the stored change logs.
        for view in shared.views.read().iter() {
            inner.subs.view_source(view);
        }
    }
    shared.set_loaded();
    while let Some((items, upto)) = shared.next_round() {
        let Some(inner) = db.upgrade() else { return };
        let round_lock = inner.view_round.lock();
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
        let views: Vec<Arc<View>> = shared.views.read().clone();
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
            let mut done: Vec<(Arc<View>, maintain::Out, std::time::Instant)> = Vec::new();
            for view in level {
                let started = std::time::Instant::now();
                match runtime.block_on(maintain::round(&inner, view, &changes, upto)) {
                    Ok(Some(out)) => done.push((view.clone(), out, started)),
                    Ok(None) => {
                        let mut st = view.status.lock();
                        st.applied = st.applied.max(upto);
                        st.last_error = None;
                    }
                    Err(e) => {
                        failed = true;
                        retry_later(view, &changes, &e.to_string());
                    }
                }
            }
            let mut by_db: HashMap<Arc<str>, LevelWrite> = HashMap::new();
            for (view, out, _) in &mut done {
                if let Some(rows) = out.rows.take() {
                    let entry = by_db.entry(view.db.clone()).or_default();
                    view.status.lock().rows_written += rows.num_rows() as u64;
                    entry.0.push((view.table.name.to_string(), rows.clone()));
                    entry.1.push((view.clone(), rows));
                }
            }
            let mut write_error = None;
            for (db_name, (mut tables, written)) in by_db {
                let views: Vec<Arc<View>> = written.iter().map(|(v, _)| v.clone()).collect();
                let names: Vec<String> = views.iter().map(|v| v.name()).collect();
                inner.subs.begin_write(&views);
                let result = maintain::progress_batch(&names, upto).and_then(|p| {
                    tables.push((PROGRESS_TABLE.to_string(), p));
                    runtime.block_on(maintain::write_tables(&inner, &db_name, tables))
                });
                match result {
                    Ok(seq) => {
                        for (view, rows) in written {
                            // Subscribers see the rows as the view's columns.
                            match runtime
                                .block_on(crate::subscribe::view_entry(&inner, &view, &rows, seq))
                            {
                                Ok((entry, wm)) => {
                                    inner.subs.view_written(&view, Some(seq), upto, entry, wm);
                                }
                                Err(e) => {
                                    tracing::error!(view = %view.name(), error = %e, "view change not logged for subscribers");
                                    inner.subs.view_written(&view, Some(seq), upto, None, None);
                                    inner.subs.view_reset(&view, upto);
                                }
                            }
                        }
                    }
                    Err(e) => {
                        for view in &views {
                            inner.subs.view_written(view, None, upto, None, None);
                        }
                        write_error = Some(e.to_string());
                    }
                }
            }
            for (view, out, started) in done {
                if let Some(e) = &write_error {
                    failed = true;
                    retry_later(&view, &changes, e);
                    continue;
                }
                {
                    let mut st = view.status.lock();
                    st.applied = st.applied.max(upto);
                    st.last_error = None;
                    st.last_round_ms = started.elapsed().as_secs_f64() * 1e3;
                    if let Some(t) = oldest {
                        st.lag_ms = t.elapsed().as_secs_f64() * 1e3;
                    }
                }
                let c = changes.entry(view.table.id).or_default();
                c.ranges.extend(out.ranges);
                c.all |= out.all;
            }
        }
        shared.finish_round(upto, bytes);
        drop(round_lock);
        drop(inner);
        if failed {
            std::thread::sleep(std::time::Duration::from_millis(200));
        }
    }
}
