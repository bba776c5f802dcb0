//! Materialized views kept current incrementally: this layer owns everything about views —
//! their statements, registry, loading and recovery, the maintenance worker, `system.views`,
//! `CHECK`, and what a view change means to subscribers (finality, emit policy).
//!
//! A view is a table: its rows (or, for aggregates, merge-able partial states) are stored by
//! the storage engine like any table's, in a table of the view's name marked as a view (rows
//! replace whole, a `__deleted` field marks removed rows), and read through [`ViewProvider`].
//!
//! Maintenance path (docs/architecture.md §10):
//! 1. the group-commit step hands every applied write that touches a view's source to
//!    the queue ([`queue::ViewsShared`], never blocking; writers wait before their write when
//!    the queue is over its bound);
//! 2. one worker thread ([`worker`]) takes everything queued, and for each view in dependency
//!    order turns the round's changes into new storage rows (per the view's strategy, see
//!    [`plan`] and [`maintain`]);
//! 3. it writes them, with the view's applied sequence, as one ordinary write (WAL, buffer,
//!    segments), so a view's rows and its progress are durable together, and tells the
//!    [`ViewObserver`] (the subscription layer) what changed;
//! 4. a view's output changes feed the views defined on it, in the same round;
//! 5. queries reading a view wait until it has applied every write visible when they started
//!    ([`Views::plan_read`]).

mod answer;
mod backfill;
mod check;
pub(crate) mod ddl;
mod dirty;
pub(crate) mod emit;
mod error;
mod load;
mod maintain;
pub(crate) mod plan;
pub(crate) mod provider;
pub(crate) mod queue;
mod read;
mod statements;
mod system;
mod worker;

use std::sync::{Arc, OnceLock, Weak};
use std::thread::JoinHandle;

use arrow::array::{BooleanArray, RecordBatch};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

pub use error::ViewError;
pub(crate) use error::invalid;
pub(crate) use provider::ViewProvider;
pub(crate) use queue::ViewsShared;

use crate::error::Error;
use crate::ingest::WriteError;
use crate::ingest::batch::prepare_system_batch;
use crate::query::QueryEngine;
use crate::storage::buffer::Chunk;
use crate::storage::commit::ApplyObserver;
use crate::storage::engine::{Engine, Origin};
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
    /// A backfill under way: the pieces it has left (it runs a slice per round).
    pub backfill_slices: Option<backfill::Slices>,
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

    /// One of the internal views the subscription layer makes for aggregate queries: not a
    /// user view (no statement names it, listings leave it out, it does not outlive a restart).
    pub(crate) fn is_subscription_view(&self) -> bool {
        self.table
            .name
            .starts_with(crate::ingest::prepare::SUBSCRIPTION_VIEW_PREFIX)
    }
}

/// Told what each maintenance round did to a view, so its subscribers can follow (the
/// subscription layer's change logs). Must not block for long: it runs on the worker.
pub(crate) trait ViewObserver: Send + Sync {
    /// A view was loaded at open (its log resumes from what it stored).
    fn loaded(&self, view: &Arc<View>);
    /// The worker is about to write rows of `views`.
    fn begin_write(&self, views: &[Arc<View>]);
    /// The worker wrote `rows` (the view's columns, and which are deletions) of `view` as
    /// write `seq` (None: the write failed), reflecting source writes up to `applied`.
    fn written(
        &self,
        view: &Arc<View>,
        seq: Option<u64>,
        applied: u64,
        rows: Option<(RecordBatch, BooleanArray)>,
        watermark: Option<i64>,
    );
    /// The view was recomputed from scratch (having applied writes up to `applied`): earlier
    /// positions cannot resume.
    fn reset(&self, view: &Arc<View>, applied: u64);
    /// The view stored in table `id` was dropped.
    fn dropped(&self, id: u64, name: &str);
    /// The watermark as of the last change subscribers were sent (windows it closed are
    /// final already).
    fn emitted_watermark(&self, view: &Arc<View>) -> Option<i64>;
}

/// The changes of one round to one table: chunks written to it, and ranges of it recomputed.
#[derive(Default)]
pub(crate) struct Change {
    pub chunks: Vec<Arc<Chunk>>,
    pub ranges: Vec<(i64, i64)>,
    /// Changed everywhere.
    pub all: bool,
}

/// The views of one database handle: registry and queue, the worker, and the engines it
/// maintains them with.
pub(crate) struct Views {
    pub(crate) engine: Arc<Engine>,
    pub(crate) query: Arc<QueryEngine>,
    pub(crate) shared: Arc<ViewsShared>,
    /// Held by the worker during a round (dropping a view waits for it).
    pub(crate) round: Mutex<()>,
    worker: Mutex<Option<JoinHandle<()>>>,
    observer: OnceLock<Weak<dyn ViewObserver>>,
}

impl std::fmt::Debug for Views {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Views").finish_non_exhaustive()
    }
}

impl Views {
    /// The views layer over `engine` and `query`: its queue observes the engine's writes and
    /// it reads views for the query engine. Nothing is loaded until [`Views::start`].
    pub(crate) fn new(engine: Arc<Engine>, query: Arc<QueryEngine>) -> Arc<Views> {
        let shared = Arc::new(ViewsShared::new(
            engine.config.view_queue_bytes,
            engine.visible_seq(),
            engine.config.clock.clone(),
        ));
        engine.add_observer(&(shared.clone() as Arc<dyn ApplyObserver>));
        let views = Arc::new(Views {
            engine,
            query,
            shared,
            round: Mutex::new(()),
            worker: Mutex::new(None),
            observer: OnceLock::new(),
        });
        let extension: Weak<dyn crate::query::QueryExtension> = Arc::downgrade(&views) as _;
        views.query.set_extension(extension);
        views
    }

    /// Installs the observer told of every view change (once, before [`Views::start`]).
    pub(crate) fn set_observer(&self, observer: Weak<dyn ViewObserver>) {
        let _ = self.observer.set(observer);
    }

    /// The observer, while it lives.
    pub(crate) fn observer(&self) -> Option<Arc<dyn ViewObserver>> {
        self.observer.get().and_then(Weak::upgrade)
    }

    /// Starts the maintenance thread (it first loads the stored views).
    pub(crate) fn start(self: &Arc<Self>) -> Result<(), Error> {
        let weak = Arc::downgrade(self);
        let handle = std::thread::Builder::new()
            .name("rivulet-views".to_string())
            .spawn(move || worker::run(weak))
            .map_err(|e| Error::Config(format!("could not start the view thread: {e}")))?;
        *self.worker.lock() = Some(handle);
        Ok(())
    }

    /// Lets the views catch up with every acknowledged write (bounded by
    /// `Config::view_wait`), then stops the worker.
    pub(crate) fn stop(&self) {
        let seq = self.engine.visible_seq();
        let views = self.all();
        if !views.is_empty()
            && let Err(e) = self.shared.wait(&views, seq, self.engine.config.view_wait)
        {
            tracing::warn!(error = %e, "closing before the views caught up; they recover at open");
        }
        self.shared.stop();
        if let Some(handle) = self.worker.lock().take()
            && handle.thread().id() != std::thread::current().id()
        {
            let _ = handle.join();
        }
    }

    /// Every view, in dependency order.
    pub(crate) fn all(&self) -> Vec<Arc<View>> {
        self.shared.views.read().clone()
    }

    /// The view `name` of database `db`.
    pub(crate) fn get(&self, db: &str, name: &str) -> Option<Arc<View>> {
        self.shared.get(db, name)
    }

    /// The view stored in table `id`.
    pub(crate) fn by_table(&self, id: u64) -> Option<Arc<View>> {
        self.shared.by_table(id)
    }

    /// Waits until every view reflects every write acknowledged so far, or fails after
    /// `Config::view_wait`.
    pub(crate) fn sync(&self) -> Result<(), Error> {
        self.shared.wait_loaded();
        self.shared
            .wait(
                &self.all(),
                self.engine.visible_seq(),
                self.engine.config.view_wait,
            )
            .map_err(Error::View)
    }

    /// Marks a view's backfill done in its stored definition.
    pub(crate) fn finish_backfill(&self, view: &View) -> Result<(), Error> {
        let mut def = view.def.lock().clone();
        def.backfilled = true;
        self.save_view_def(&view.db, &def)?;
        *view.def.lock() = def;
        Ok(())
    }

    pub(crate) fn save_view_def(&self, db: &str, def: &ViewDef) -> Result<(), Error> {
        let database = self
            .engine
            .catalog()
            .database(db)
            .ok_or_else(|| invalid(format!("database '{db}' not found")))?;
        let json = serde_json::to_vec(def).map_err(|e| invalid(e.to_string()))?;
        self.engine
            .catalog()
            .save_view(&database, &def.name, &json)?;
        self.engine.catalog().flush()?;
        Ok(())
    }
}

/// Rivulet's own write of several tables of database `db`, as one WAL record.
pub(crate) fn write_system(
    engine: &Engine,
    db: &str,
    tables: Vec<(String, RecordBatch)>,
) -> Result<u64, Error> {
    let (seq, ()) = engine.write(Origin::System, |catalog| {
        let mut all: Option<crate::ingest::prepare::PreparedWrite> = None;
        for (table, batch) in &tables {
            let p = prepare_system_batch(catalog, db, table, batch)?;
            match &mut all {
                None => all = Some(p),
                Some(a) => {
                    a.rows += p.rows;
                    a.tables.extend(p.tables);
                }
            }
        }
        let all = all.ok_or_else(|| WriteError::InvalidBatch {
            db: db.to_string(),
            table: String::new(),
            reason: "nothing to write".to_string(),
        })?;
        Ok::<_, Error>((all.split().0, ()))
    })?;
    Ok(seq)
}
