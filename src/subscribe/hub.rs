//! The hub: every source's change log, fed by the group-commit step (tables, through
//! [`ApplyObserver`]) and by the view worker (views, through [`ViewObserver`]).

use std::any::Any;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use arrow::array::{Array, BooleanArray, RecordBatch};
use parking_lot::RwLock;

use super::log::{Entry, EntryData, LogLimits, Source, SourceKind};
use super::store;
use crate::storage::buffer::Chunk;
use crate::storage::commit::ApplyObserver;
use crate::storage::engine::Engine;
use crate::storage::table::Table;
use crate::views::{View, ViewObserver, Views};

/// Every source with a change log.
pub(crate) struct Hub {
    pub(super) engine: Arc<Engine>,
    pub(super) views: Arc<Views>,
    /// What a subscription holds to keep the database open while it lives (the facade).
    keep_alive: OnceLock<Weak<dyn Any + Send + Sync>>,
    pub(super) tables: RwLock<HashMap<u64, Arc<Source>>>,
    /// Per view, its log once made (the cell is filled outside the map's lock: reading a stored
    /// log is file I/O).
    pub(super) view_logs: RwLock<HashMap<u64, Arc<OnceLock<Arc<Source>>>>>,
    pub(super) limits: LogLimits,
    /// The subscription views made so far, and their bounds.
    pub(super) shared: parking_lot::Mutex<super::shared::Registry>,
    pub(super) shared_limits: super::SharedLimits,
    store: Option<store::Store>,
    /// The last write the commit step has shown to [`ApplyObserver::applied`].
    observed: AtomicU64,
    /// The open subscriptions (`system.subscriptions`).
    pub(super) listing: super::listing::Listing,
}

impl std::fmt::Debug for Hub {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Hub").finish_non_exhaustive()
    }
}

impl ApplyObserver for Hub {
    fn applied(&self, seq: u64, chunks: &[(Arc<Table>, Arc<Chunk>)]) {
        let tables = self.tables.read();
        // Under the read lock: a table log created later starts after this write.
        self.observed.fetch_max(seq, Ordering::AcqRel);
        if tables.is_empty() {
            return;
        }
        let now = self.now();
        for (table, chunk) in chunks {
            if let Some(source) = tables.get(&table.id) {
                let entry = Entry {
                    seq,
                    applied: seq,
                    bytes: chunk.batch.get_array_memory_size(),
                    data: EntryData::Chunk(chunk.clone()),
                    at: now,
                    watermark: None,
                };
                let mut log = source.log.lock();
                source.push(&mut log, entry, self.limits.bytes, self.limits.age, now);
            }
        }
    }

    fn published(&self, seq: u64) {
        let tables = self.tables.read();
        for source in tables.values() {
            if source.dirty.swap(false, Ordering::AcqRel) {
                source.notify(seq);
            }
        }
    }
}

impl Hub {
    pub(crate) fn new(
        engine: Arc<Engine>,
        views: Arc<Views>,
        limits: LogLimits,
        shared_limits: super::SharedLimits,
    ) -> Hub {
        let dir = engine.data_dir.clone();
        let io = engine.io.clone();
        Hub {
            engine,
            views,
            keep_alive: OnceLock::new(),
            tables: RwLock::new(HashMap::new()),
            view_logs: RwLock::new(HashMap::new()),
            limits,
            shared: parking_lot::Mutex::new(HashMap::new()),
            shared_limits,
            store: dir.map(|d| store::Store::new(&d, io)),
            observed: AtomicU64::new(0),
            listing: Default::default(),
        }
    }

    /// Sets what every subscription keeps alive while it lives (the database handle, so a
    /// subscription outliving the `Db` it came from keeps working).
    pub(crate) fn keep_alive(&self, handle: Weak<dyn Any + Send + Sync>) {
        let _ = self.keep_alive.set(handle);
    }

    /// A strong handle on what [`Hub::keep_alive`] named.
    pub(super) fn hold(&self) -> Option<Arc<dyn Any + Send + Sync>> {
        self.keep_alive.get().and_then(Weak::upgrade)
    }

    /// Plans a subscription's query (also its snapshot): a plain query, waiting for the views
    /// it reads like any query. Statements are refused.
    /// `subscription_view`: `sql` reads the subscription view the hub made (which no other
    /// plan can name).
    pub(super) async fn plan(
        &self,
        db: &str,
        sql: &str,
        databases: Option<&[String]>,
        subscription_view: bool,
    ) -> Result<datafusion::dataframe::DataFrame, crate::error::Error> {
        if self.engine.is_closed() {
            return Err(crate::error::Error::Closed);
        }
        if crate::views::ddl::parse(sql).is_some() || crate::query::admin::parse(sql).is_some() {
            return Err(super::SubscribeError::Unsupported(
                "statements cannot be subscribed to; subscribe to a SELECT".to_string(),
            )
            .into());
        }
        self.views
            .plan_read_reaching(
                db,
                sql,
                false,
                databases,
                subscription_view,
                Default::default(),
            )
            .await
    }

    pub(super) fn visible(&self) -> u64 {
        self.engine.visible_seq()
    }

    /// The database clock's now (ns): log ages and idle times are measured with it.
    pub(super) fn now(&self) -> i64 {
        self.engine.config.clock.now_ns()
    }

    /// The log of `view`, created (from its stored log, if any) on first use.
    pub(crate) fn view_source(&self, view: &Arc<View>) -> Arc<Source> {
        let id = view.table.id;
        // The read guard must be gone before the write lock is taken.
        let found = self.view_logs.read().get(&id).cloned();
        let cell = match found {
            Some(c) => c,
            None => self.view_logs.write().entry(id).or_default().clone(),
        };
        // Other callers for this view wait for the first to finish; the hub's lock is free.
        cell.get_or_init(|| Arc::new(self.new_view_source(view)))
            .clone()
    }

    /// A view's log, resumed from its stored file when that holds every change the view
    /// made (else it starts now), and the file rewritten to match.
    fn new_view_source(&self, view: &Arc<View>) -> Source {
        let source = Source::new(SourceKind::View(view.clone()), self.visible(), self.now());
        let Some(store) = &self.store else {
            source.log.lock().watermark = crate::views::emit::watermark(view);
            return source;
        };
        let id = view.table.id;
        let stored = store.read(id).unwrap_or_else(|e| {
            tracing::error!(error = %e, "view change log could not be read: it was moved aside, the log restarts and subscribers behind it get a reset");
            store::Stored::default()
        });
        let applied = view.status.lock().applied;
        let backfilled = view.def.lock().backfilled;
        let (start, entries) = {
            let mut log = source.log.lock();
            if stored.complete(applied) && backfilled {
                log.start = stored.start.unwrap_or(log.start);
                let now = self.now();
                for e in stored.entries {
                    source.push(&mut log, e, self.limits.bytes, self.limits.age, now);
                }
                if let Some(e) = log.entries.back() {
                    log.watermark = e.watermark;
                }
            }
            if log.watermark.is_none() {
                log.watermark = crate::views::emit::watermark(view);
            }
            (log.start, log.entries.iter().cloned().collect::<Vec<_>>())
        };
        if let Err(e) = store.rewrite(id, (start, applied), entries.iter()) {
            tracing::warn!(error = %e, "view change log not written; subscribers may get a reset after a restart");
        }
        source
    }

    /// The log of base table `table`, created on first use (starting now).
    pub(super) fn table_source(&self, table: &Arc<Table>) -> Arc<Source> {
        let mut tables = self.tables.write();
        // Table logs nobody subscribed to for a log age are dropped.
        let age = i64::try_from(self.limits.age.as_nanos()).unwrap_or(i64::MAX);
        let now = self.now();
        tables.retain(|_, s| {
            s.subscribers.load(Ordering::Acquire) > 0
                || s.idle_since
                    .lock()
                    .is_none_or(|t| now.saturating_sub(t) < age)
        });
        // Every write after `start` reaches the log: writes the commit step has shown to the
        // observer so far (they skipped this log) are at most `observed`.
        let start = self.visible().max(self.observed.load(Ordering::Acquire));
        tables
            .entry(table.id)
            .or_insert_with(|| Arc::new(Source::new(SourceKind::Table(table.clone()), start, now)))
            .clone()
    }

    /// The view worker is about to write rows of `views`.
    pub(crate) fn begin_write(&self, views: &[Arc<View>]) {
        for v in views {
            let source = self.view_source(v);
            let mut log = source.log.lock();
            let visible = self.visible();
            log.complete = source.frontier(&log, visible);
            log.writing = true;
        }
    }

    /// The view worker wrote `rows` (the view's columns, and which are deletions) of `view` as
    /// write `seq`, reflecting source writes up to `applied`. The entry goes to the file after
    /// the log's lock is released.
    pub(crate) fn view_written(
        &self,
        view: &Arc<View>,
        seq: Option<u64>,
        applied: u64,
        rows: Option<(RecordBatch, BooleanArray)>,
        watermark: Option<i64>,
    ) {
        let source = self.view_source(view);
        let mut log = source.log.lock();
        log.writing = false;
        let mut logged = None;
        if let (Some(seq), Some((rows, deleted))) = (seq, rows)
            && rows.num_rows() > 0
        {
            log.complete = log.complete.max(seq);
            let now = self.now();
            let entry = Entry {
                seq,
                applied,
                bytes: rows.get_array_memory_size() + deleted.get_array_memory_size(),
                data: EntryData::View { rows, deleted },
                at: now,
                watermark,
            };
            source.push(&mut log, entry, self.limits.bytes, self.limits.age, now);
            logged = log.entries.back().cloned();
        }
        log.watermark = watermark.or(log.watermark);
        drop(log);
        source.dirty.store(false, Ordering::Release);
        if let Some(seq) = seq {
            source.notify(seq);
        }
        if let (Some(store), Some(entry)) = (&self.store, logged) {
            self.store_entry(store, &source, view.table.id, &entry);
        }
    }

    /// Appends a logged entry to the view's file, rewriting the file from the log when it has
    /// grown too big (the only writer of a view's file is the view worker).
    fn store_entry(&self, store: &store::Store, source: &Source, id: u64, entry: &Entry) {
        let result = store
            .append(id, entry, self.limits.bytes)
            .and_then(|rewrite| {
                if !rewrite {
                    return Ok(());
                }
                let (start, entries) = {
                    let log = source.log.lock();
                    (log.start, log.entries.iter().cloned().collect::<Vec<_>>())
                };
                store.rewrite(id, (start, 0), entries.iter())
            });
        if let Err(e) = result {
            tracing::warn!(error = %e, "view change log not written; subscribers may get a reset after a restart");
        }
    }

    /// A view was (re)computed from scratch (backfill, having applied writes up to `applied`):
    /// earlier positions cannot resume.
    pub(crate) fn view_reset(&self, view: &Arc<View>, applied: u64) {
        let source = self.view_source(view);
        let visible = self.visible();
        let start = {
            let mut log = source.log.lock();
            log.entries.clear();
            log.bytes = 0;
            log.start = log.start.max(visible);
            log.complete = log.complete.max(visible);
            log.start
        };
        if let Some(store) = &self.store
            && let Err(e) = store.rewrite(view.table.id, (start, applied), std::iter::empty())
        {
            tracing::warn!(error = %e, "view change log not reset; subscribers may get a reset after a restart");
        }
    }

    /// The view stored in table `id` was dropped.
    pub(crate) fn view_dropped(&self, id: u64, name: &str) {
        let cell = self.view_logs.write().remove(&id);
        if let Some(source) = cell.as_ref().and_then(|c| c.get()) {
            source.close(&format!("materialized view '{name}' was dropped"));
        }
        if let Some(store) = &self.store {
            store.remove(id);
        }
    }

    /// Every subscription ends (the database is closing).
    pub(crate) fn close_all(&self) {
        let views: Vec<Arc<Source>> = self
            .view_logs
            .read()
            .values()
            .filter_map(|c| c.get().cloned())
            .collect();
        for s in views.iter().chain(self.tables.read().values()) {
            s.close("the database is closing");
        }
    }

    /// Subscribers connected now (for metrics).
    pub(crate) fn subscribers(&self) -> usize {
        let views: usize = self
            .view_logs
            .read()
            .values()
            .filter_map(|c| c.get())
            .map(|s| s.subscribers.load(Ordering::Acquire))
            .sum();
        let tables: usize = self
            .tables
            .read()
            .values()
            .map(|s| s.subscribers.load(Ordering::Acquire))
            .sum();
        views + tables
    }
}

impl ViewObserver for Hub {
    fn loaded(&self, view: &Arc<View>) {
        self.view_source(view);
    }

    fn begin_write(&self, views: &[Arc<View>]) {
        Hub::begin_write(self, views);
    }

    fn written(
        &self,
        view: &Arc<View>,
        seq: Option<u64>,
        applied: u64,
        rows: Option<(RecordBatch, BooleanArray)>,
        watermark: Option<i64>,
    ) {
        self.view_written(view, seq, applied, rows, watermark);
    }

    fn reset(&self, view: &Arc<View>, applied: u64) {
        self.view_reset(view, applied);
    }

    fn dropped(&self, id: u64, name: &str) {
        self.view_dropped(id, name);
    }

    fn emitted_watermark(&self, view: &Arc<View>) -> Option<i64> {
        self.view_source(view).log.lock().watermark
    }
}
