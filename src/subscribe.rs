//! Live subscriptions: a snapshot of a query's result, then every change to it, pushed.
//!
//! Subscription path (docs/architecture.md §11):
//! 1. a subscription names one source, a materialized view or a table, with a filter and a
//!    projection on it ([`feed`]); anything else is refused with the reason;
//! 2. every source has one change log ([`Source`]) shared by all its subscribers: a table's
//!    log is fed by the group-commit step (the write's chunks, never blocking), a view's by the
//!    view worker after each round that changed it (the rows it wrote, as the view's columns);
//! 3. a subscriber first reads a snapshot at a sequence `V` (the storage reads it as of `V`),
//!    then every log entry after `V`, filtered and projected once per distinct query (the
//!    result is shared by its subscribers, JSON encoding included);
//! 4. the log keeps recent entries (by size and age), so a client that reconnects with the
//!    last sequence it saw resumes exactly; older than the log gets a `reset` and a snapshot.
//!    View logs are also written to disk, so they survive a restart ([`store`]);
//! 5. a subscriber only reads when its transport can take more: ingest never waits for it.
//!    One that falls more than its queue behind is conflated (keyed results: latest row per
//!    key) or told `lagged` and closed (append results).

pub(crate) mod encode;
pub(crate) mod feed;
pub(crate) mod store;

use std::collections::{HashMap, VecDeque};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use arrow::array::{Array, BooleanArray, RecordBatch};
use arrow::datatypes::SchemaRef;
use datafusion::physical_plan::SendableRecordBatchStream;
use futures::{Stream, StreamExt};
use parking_lot::{Mutex, RwLock};

use crate::db::DbInner;
use crate::error::Error;
use crate::storage::buffer::Chunk;
use crate::storage::commit::ApplyObserver;
use crate::storage::table::Table;
use crate::views::View;
use feed::{Feed, Processed};

/// Why a subscription could not start or had to end.
#[derive(Debug, thiserror::Error)]
pub enum SubscribeError {
    /// The query cannot be maintained incrementally (the reason says why and what to do).
    #[error("cannot subscribe: {0}")]
    Unsupported(String),
    /// The source went away (the view or table was dropped) or the database is closing.
    #[error("subscription ended: {0}")]
    Ended(String),
}

/// What a [`ChangeBatch`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Part of the snapshot of the current result (`first`/`last` mark its start and end).
    Snapshot {
        /// The first part of this snapshot.
        first: bool,
        /// The last part: changes follow.
        last: bool,
    },
    /// Rows changed by the write(s) up to `seq`.
    Change,
    /// Nothing changed up to `seq`.
    Progress,
    /// The requested resume point is no longer retained: a fresh snapshot follows.
    Reset,
    /// The subscriber fell too far behind an append result and is closed; resume from `seq`.
    Lagged,
}

impl ChangeKind {
    /// The SSE event name.
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Snapshot { .. } => "snapshot",
            ChangeKind::Change => "change",
            ChangeKind::Progress => "progress",
            ChangeKind::Reset => "reset",
            ChangeKind::Lagged => "lagged",
        }
    }
}

/// What happened to one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A new row of an append result (a table stream).
    Insert,
    /// The row with this key now has these values (keyed results: views).
    Upsert,
    /// The row with this key is gone.
    Delete,
}

impl Op {
    /// `insert`, `upsert` or `delete`.
    pub fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Upsert => "upsert",
            Op::Delete => "delete",
        }
    }
}

/// One message of a subscription.
#[derive(Debug, Clone)]
pub struct ChangeBatch {
    /// What this message is.
    pub kind: ChangeKind,
    /// Position in the stream: the write sequence this message brings the client to. Resume
    /// with the `seq` of the last change, progress or final snapshot part received.
    pub seq: u64,
    /// For a view, the last source write it reflects; for a table, `seq`.
    pub applied: u64,
    /// The rows (the query's columns); empty for progress, reset and lagged.
    pub rows: RecordBatch,
    /// One op per row.
    pub ops: Arc<[Op]>,
    /// Per row, whether its window is final (views with `emit = 'on_change'` and a time
    /// bucket); None otherwise.
    pub finals: Option<Arc<[bool]>>,
    /// A reason, for reset and lagged.
    pub reason: Option<String>,
    /// The rows as JSON, encoded once for every subscriber that shares them.
    pub(crate) json: Arc<OnceLock<String>>,
}

impl ChangeBatch {
    /// A copy that encodes its rows again (for benchmarks).
    #[doc(hidden)]
    pub fn uncached(&self) -> ChangeBatch {
        ChangeBatch {
            json: Arc::new(OnceLock::new()),
            ..self.clone()
        }
    }

    fn control(kind: ChangeKind, seq: u64, applied: u64, schema: &SchemaRef) -> ChangeBatch {
        ChangeBatch {
            kind,
            seq,
            applied,
            rows: RecordBatch::new_empty(schema.clone()),
            ops: Arc::from(Vec::new()),
            finals: None,
            reason: None,
            json: Arc::new(OnceLock::new()),
        }
    }

    fn from_processed(p: &Processed) -> ChangeBatch {
        ChangeBatch {
            kind: ChangeKind::Change,
            seq: p.seq,
            applied: p.applied,
            rows: p.rows.clone(),
            ops: p.ops.clone(),
            finals: p.finals.clone(),
            reason: None,
            json: p.json.clone(),
        }
    }
}

/// How to subscribe.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// Database the query's unqualified names refer to. Default: `main`.
    pub db: String,
    /// Resume after this sequence (no snapshot) when the log still holds it; else a `reset`
    /// and a snapshot. Default: none (start with a snapshot).
    pub since: Option<u64>,
    /// Start with a snapshot of the current result. Default: true. With false and no `since`,
    /// only changes from now on are sent.
    pub snapshot: bool,
    /// A progress message is sent after this long without any other. Default: 2 s.
    pub progress_interval: Duration,
    /// Change messages a subscriber may fall behind before it is conflated (keyed results)
    /// or told `lagged` and closed (append results). Default: 1024.
    pub queue_len: usize,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            db: "main".to_string(),
            since: None,
            snapshot: true,
            progress_interval: Duration::from_secs(2),
            queue_len: 1024,
        }
    }
}

/// A change-log entry: one write's rows for a source.
pub(crate) struct Entry {
    pub seq: u64,
    pub applied: u64,
    pub data: EntryData,
    pub at: Instant,
    pub bytes: usize,
    /// The view's watermark after this change (views with a time bucket).
    pub watermark: Option<i64>,
}

pub(crate) enum EntryData {
    /// Rows written to a table, as the write carried them.
    Chunk(Arc<Chunk>),
    /// A view's changed rows as its columns, and which of them are deletions.
    View {
        rows: RecordBatch,
        deleted: BooleanArray,
    },
}

/// What a source is.
pub(crate) enum SourceKind {
    Table(Arc<Table>),
    View(Arc<View>),
}

/// The change log of one source.
#[derive(Default)]
pub(crate) struct Log {
    pub entries: VecDeque<Arc<Entry>>,
    pub bytes: usize,
    /// Every change after this sequence is in `entries`.
    pub start: u64,
    /// A view write is under way: changes up to `complete` are logged.
    pub writing: bool,
    pub complete: u64,
    pub watermark: Option<i64>,
    /// Set when the source is gone.
    pub closed: Option<String>,
}

/// One source with its log and subscribers.
pub(crate) struct Source {
    pub kind: SourceKind,
    pub log: Mutex<Log>,
    tx: tokio::sync::watch::Sender<u64>,
    subscribers: AtomicUsize,
    /// Appended to since the last notification.
    dirty: AtomicBool,
    /// When the last subscriber left (table streams are dropped after the log age).
    idle_since: Mutex<Option<Instant>>,
    /// Compiled queries by (database, query text).
    feeds: Mutex<HashMap<(String, String), Weak<Feed>>>,
}

/// What a subscriber finds in the log after its position.
enum Read {
    /// Entries after the position, the frontier, and what a view reflects at the frontier.
    Entries(Vec<Arc<Entry>>, u64, u64),
    /// Its position is older than the log.
    Behind(u64),
    Closed(String),
}

impl Source {
    fn new(kind: SourceKind, start: u64) -> Source {
        Source {
            kind,
            log: Mutex::new(Log {
                start,
                complete: start,
                ..Log::default()
            }),
            tx: tokio::sync::watch::channel(start).0,
            subscribers: AtomicUsize::new(0),
            dirty: AtomicBool::new(false),
            idle_since: Mutex::new(Some(Instant::now())),
            feeds: Mutex::new(HashMap::new()),
        }
    }

    /// The sequence up to which the log is complete (under the log lock).
    fn frontier(&self, log: &Log, visible: u64) -> u64 {
        if log.writing {
            log.complete
        } else {
            visible.max(log.complete)
        }
    }

    fn read_after(&self, cursor: u64, visible: &dyn Fn() -> u64) -> Read {
        let log = self.log.lock();
        if let Some(reason) = &log.closed {
            return Read::Closed(reason.clone());
        }
        let frontier = self.frontier(&log, visible());
        if cursor < log.start {
            return Read::Behind(log.start);
        }
        let from = log.entries.partition_point(|e| e.seq <= cursor);
        let entries = log
            .entries
            .range(from..)
            .take_while(|e| e.seq <= frontier)
            .cloned()
            .collect();
        let frontier = frontier.max(cursor);
        Read::Entries(entries, frontier, self.applied_at(frontier))
    }

    /// What the source reflects once every logged change is applied (read under the log
    /// lock: a view's applied sequence moves only after its round's change is logged).
    fn applied_at(&self, frontier: u64) -> u64 {
        match &self.kind {
            SourceKind::View(v) => v.status.lock().applied,
            SourceKind::Table(_) => frontier,
        }
    }

    /// Appends an entry (in sequence order) and trims the log to its bounds.
    fn push(&self, log: &mut Log, entry: Entry, max_bytes: usize, max_age: Duration) {
        log.bytes += entry.bytes;
        log.entries.push_back(Arc::new(entry));
        while log.entries.len() > 1
            && (log.bytes > max_bytes
                || log
                    .entries
                    .front()
                    .is_some_and(|e| e.at.elapsed() > max_age))
        {
            if let Some(e) = log.entries.pop_front() {
                log.bytes -= e.bytes;
                log.start = log.start.max(e.seq);
            }
        }
        self.dirty.store(true, Ordering::Release);
    }

    fn notify(&self, seq: u64) {
        self.tx.send_replace(seq);
    }

    fn close(&self, reason: &str) {
        self.log.lock().closed = Some(reason.to_string());
        let seq = *self.tx.borrow();
        self.tx.send_replace(seq.saturating_add(1));
    }
}

/// Limits of the change logs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogLimits {
    pub bytes: usize,
    pub age: Duration,
}

/// Every source with a change log.
pub(crate) struct Hub {
    db: OnceLock<Weak<DbInner>>,
    tables: RwLock<HashMap<u64, Arc<Source>>>,
    views: RwLock<HashMap<u64, Arc<Source>>>,
    limits: LogLimits,
    store: Option<store::Store>,
    /// The last write the commit step has shown to [`ApplyObserver::applied`].
    observed: AtomicU64,
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
        for (table, chunk) in chunks {
            if let Some(source) = tables.get(&table.id) {
                let entry = Entry {
                    seq,
                    applied: seq,
                    bytes: chunk.batch.get_array_memory_size(),
                    data: EntryData::Chunk(chunk.clone()),
                    at: Instant::now(),
                    watermark: None,
                };
                let mut log = source.log.lock();
                source.push(&mut log, entry, self.limits.bytes, self.limits.age);
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
    pub(crate) fn new(limits: LogLimits, dir: Option<std::path::PathBuf>) -> Hub {
        Hub {
            db: OnceLock::new(),
            tables: RwLock::new(HashMap::new()),
            views: RwLock::new(HashMap::new()),
            limits,
            store: dir.map(store::Store::new),
            observed: AtomicU64::new(0),
        }
    }

    pub(crate) fn attach(&self, db: Weak<DbInner>) {
        let _ = self.db.set(db);
    }

    fn visible(&self) -> u64 {
        self.db
            .get()
            .and_then(Weak::upgrade)
            .map_or(0, |db| db.visible_seq())
    }

    /// The log of `view`, created (from its stored log, if any) on first use.
    pub(crate) fn view_source(&self, view: &Arc<View>) -> Arc<Source> {
        if let Some(s) = self.views.read().get(&view.table.id) {
            return s.clone();
        }
        let mut views = self.views.write();
        views
            .entry(view.table.id)
            .or_insert_with(|| {
                let source = Source::new(SourceKind::View(view.clone()), self.visible());
                if let Some(store) = &self.store {
                    store.load(view, &source, self.limits);
                }
                {
                    let mut log = source.log.lock();
                    if log.watermark.is_none() {
                        log.watermark = crate::views::emit::watermark(view);
                    }
                }
                Arc::new(source)
            })
            .clone()
    }

    /// The log of base table `table`, created on first use (starting now).
    fn table_source(&self, table: &Arc<Table>) -> Arc<Source> {
        let mut tables = self.tables.write();
        // Table logs nobody subscribed to for a log age are dropped.
        let age = self.limits.age;
        tables.retain(|_, s| {
            s.subscribers.load(Ordering::Acquire) > 0
                || s.idle_since.lock().is_none_or(|t| t.elapsed() < age)
        });
        // Every write after `start` reaches the log: writes the commit step has shown to the
        // observer so far (they skipped this log) are at most `observed`.
        let start = self.visible().max(self.observed.load(Ordering::Acquire));
        tables
            .entry(table.id)
            .or_insert_with(|| Arc::new(Source::new(SourceKind::Table(table.clone()), start)))
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

    /// The view worker wrote `rows` (storage rows) of `view` as write `seq`, reflecting source
    /// writes up to `applied`; `extra` are rows of windows that became final (on window close).
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
        if let (Some(seq), Some((rows, deleted))) = (seq, rows)
            && rows.num_rows() > 0
        {
            log.complete = log.complete.max(seq);
            let entry = Entry {
                seq,
                applied,
                bytes: rows.get_array_memory_size() + deleted.get_array_memory_size(),
                data: EntryData::View { rows, deleted },
                at: Instant::now(),
                watermark,
            };
            source.push(&mut log, entry, self.limits.bytes, self.limits.age);
            if let (Some(store), Some(entry)) = (&self.store, log.entries.back()) {
                store.append(view, entry, &log, self.limits);
            }
        }
        log.watermark = watermark.or(log.watermark);
        drop(log);
        source.dirty.store(false, Ordering::Release);
        if let Some(seq) = seq {
            source.notify(seq);
        }
    }

    /// A view was (re)computed from scratch (backfill, having applied writes up to `applied`):
    /// earlier positions cannot resume.
    pub(crate) fn view_reset(&self, view: &Arc<View>, applied: u64) {
        let source = self.view_source(view);
        let visible = self.visible();
        let mut log = source.log.lock();
        log.entries.clear();
        log.bytes = 0;
        log.start = log.start.max(visible);
        log.complete = log.complete.max(visible);
        if let Some(store) = &self.store {
            store.reset(view, log.start, applied);
        }
    }

    /// The view stored in table `id` was dropped.
    pub(crate) fn view_dropped(&self, id: u64, name: &str) {
        if let Some(source) = self.views.write().remove(&id) {
            source.close(&format!("materialized view '{name}' was dropped"));
        }
        if let Some(store) = &self.store {
            store.remove(id);
        }
    }

    /// Every subscription ends (the database is closing).
    pub(crate) fn close_all(&self) {
        for s in self
            .views
            .read()
            .values()
            .chain(self.tables.read().values())
        {
            s.close("the database is closing");
        }
    }

    /// Subscribers connected now (for metrics).
    pub(crate) fn subscribers(&self) -> usize {
        self.views
            .read()
            .values()
            .chain(self.tables.read().values())
            .map(|s| s.subscribers.load(Ordering::Acquire))
            .sum()
    }
}

impl crate::views::ViewObserver for Hub {
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

/// A live subscription: a stream of [`ChangeBatch`]es that never ends on its own (only when
/// its source is dropped, the database closes, or it lags an append result).
///
/// Cancel-safe: a `next()` future dropped before it completes loses nothing (the next call
/// continues where it was). Dropping the subscription unsubscribes.
pub struct Subscription {
    schema: SchemaRef,
    position: Arc<AtomicU64>,
    inner: Pin<Box<dyn Stream<Item = Result<ChangeBatch, Error>> + Send>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("position", &self.position())
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The schema of the rows (the query's columns).
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The sequence the client is at after the messages taken so far.
    pub fn position(&self) -> u64 {
        self.position.load(Ordering::Acquire)
    }
}

impl Stream for Subscription {
    type Item = Result<ChangeBatch, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

/// Counts a subscriber while it lives.
struct Attached(Arc<Source>);

impl Drop for Attached {
    fn drop(&mut self) {
        if self.0.subscribers.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock() = Some(Instant::now());
        }
    }
}

enum Phase {
    /// Take a snapshot (after a reset with this reason, if any).
    Snapshot(Option<String>),
    /// Sending the snapshot's parts.
    Snapshotting {
        stream: SendableRecordBatchStream,
        next: Option<RecordBatch>,
        first: bool,
        seq: u64,
        watermark: Option<i64>,
    },
    Live,
}

struct State {
    db: Arc<DbInner>,
    source: Arc<Source>,
    _attached: Attached,
    feed: Arc<Feed>,
    sql: String,
    options: SubscribeOptions,
    databases: Option<Vec<String>>,
    phase: Phase,
    cursor: u64,
    /// What the source reflects at `cursor`.
    applied: u64,
    position: Arc<AtomicU64>,
    out: VecDeque<ChangeBatch>,
    rx: tokio::sync::watch::Receiver<u64>,
    quiet_since: tokio::time::Instant,
    done: bool,
}

impl State {
    fn applied(&self) -> u64 {
        self.applied
    }

    fn emit(&mut self, m: ChangeBatch) {
        self.out.push_back(m);
    }

    /// Plans the snapshot at the source's current frontier.
    async fn start_snapshot(&mut self, reset: Option<String>) -> Result<(), Error> {
        let df = crate::db::plan_subscription(
            &self.db,
            &self.options.db,
            &self.sql,
            self.databases.as_deref(),
        )
        .await?;
        let (seq, watermark) = {
            let log = self.source.log.lock();
            let seq = self.source.frontier(&log, self.db.visible_seq());
            self.applied = self.source.applied_at(seq);
            (seq, log.watermark)
        };
        let (state, plan) = df.into_parts();
        if let Some(s) = state
            .config()
            .get_extension::<crate::query::QuerySnapshot>()
        {
            s.seq.store(seq, Ordering::Release);
        }
        let stream = datafusion::dataframe::DataFrame::new(state, plan)
            .execute_stream()
            .await?;
        if let Some(reason) = reset {
            let mut m =
                ChangeBatch::control(ChangeKind::Reset, seq, self.applied(), &self.feed.schema);
            m.reason = Some(reason);
            self.emit(m);
        }
        self.phase = Phase::Snapshotting {
            stream,
            next: None,
            first: true,
            seq,
            watermark,
        };
        Ok(())
    }

    async fn step(&mut self) -> Result<(), Error> {
        match std::mem::replace(&mut self.phase, Phase::Live) {
            Phase::Snapshot(reset) => return self.start_snapshot(reset).await,
            Phase::Snapshotting {
                mut stream,
                next,
                first,
                seq,
                watermark,
            } => {
                let mut current = match next {
                    Some(b) => Some(b),
                    None => stream.next().await.transpose()?,
                };
                // Look one batch ahead to mark the last part; skip empty batches.
                let mut following = None;
                while current.is_some() {
                    match stream.next().await.transpose()? {
                        Some(b) if b.num_rows() == 0 => continue,
                        other => {
                            following = other;
                            break;
                        }
                    }
                }
                let last = following.is_none();
                let rows = match current.take() {
                    Some(b) => b,
                    None => RecordBatch::new_empty(self.feed.schema.clone()),
                };
                let (rows, ops, finals) = self.feed.snapshot_rows(rows, watermark)?;
                let applied = self.applied();
                self.emit(ChangeBatch {
                    kind: ChangeKind::Snapshot { first, last },
                    seq,
                    applied,
                    rows,
                    ops,
                    finals,
                    reason: None,
                    json: Arc::new(OnceLock::new()),
                });
                if last {
                    self.cursor = seq;
                    self.quiet_since = tokio::time::Instant::now();
                } else {
                    self.phase = Phase::Snapshotting {
                        stream,
                        next: following,
                        first: false,
                        seq,
                        watermark,
                    };
                }
                return Ok(());
            }
            Phase::Live => {}
        }
        self.rx.borrow_and_update();
        let db = self.db.clone();
        let read = self.source.read_after(self.cursor, &|| db.visible_seq());
        match read {
            Read::Closed(reason) => return Err(SubscribeError::Ended(reason).into()),
            Read::Behind(start) => {
                let reason = format!(
                    "the change log starts after sequence {start}; this subscriber was at {}",
                    self.cursor
                );
                if self.feed.keyed() {
                    self.phase = Phase::Snapshot(Some(reason));
                } else {
                    self.lagged(reason);
                }
                return Ok(());
            }
            Read::Entries(entries, frontier, applied) => {
                if entries.len() > self.options.queue_len && !self.feed.keyed() {
                    self.lagged(format!(
                        "{} changes behind (queue {})",
                        entries.len(),
                        self.options.queue_len
                    ));
                    return Ok(());
                }
                let mut processed = Vec::new();
                for e in &entries {
                    if let Some(p) = self.feed.process(e)? {
                        processed.push(p);
                    }
                }
                if processed.len() > self.options.queue_len {
                    // Keyed: the latest row per key says everything a slow client needs.
                    let merged = self.feed.conflate(&processed)?;
                    processed = vec![Arc::new(merged)];
                }
                let sent = !processed.is_empty();
                for p in processed {
                    self.emit(ChangeBatch::from_processed(&p));
                }
                self.cursor = frontier;
                self.applied = self.applied.max(applied);
                if sent {
                    self.quiet_since = tokio::time::Instant::now();
                    return Ok(());
                }
            }
        }
        let deadline = self.quiet_since + self.options.progress_interval;
        tokio::select! {
            changed = self.rx.changed() => {
                if changed.is_err() {
                    return Err(SubscribeError::Ended("the database is closing".into()).into());
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let m = ChangeBatch::control(ChangeKind::Progress, self.cursor, self.applied(), &self.feed.schema);
                self.emit(m);
                self.quiet_since = tokio::time::Instant::now();
            }
        }
        Ok(())
    }

    fn lagged(&mut self, reason: String) {
        let mut m = ChangeBatch::control(
            ChangeKind::Lagged,
            self.cursor,
            self.applied(),
            &self.feed.schema,
        );
        m.reason = Some(reason);
        self.emit(m);
        self.done = true;
    }

    async fn next(&mut self) -> Option<Result<ChangeBatch, Error>> {
        loop {
            if let Some(m) = self.out.pop_front() {
                if !matches!(
                    m.kind,
                    ChangeKind::Snapshot { last: false, .. } | ChangeKind::Reset
                ) {
                    self.position.store(m.seq, Ordering::Release);
                }
                return Some(Ok(m));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.step().await {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}

/// Name prefix of the views made for subscriptions to aggregate queries.
pub(crate) const SHARED_VIEW_PREFIX: &str = "rivulet_sub_";

/// The shared view keeping `sql` current in database `db` (created when missing): one per
/// distinct query text, whoever subscribes to it.
async fn shared_view(
    db: &Arc<DbInner>,
    db_name: &str,
    sql: &str,
    databases: Option<&[String]>,
) -> Result<String, Error> {
    let text = sql.trim().trim_end_matches(';').trim();
    let mut reversed: Vec<u8> = text.bytes().collect();
    reversed.reverse();
    let hash =
        (u64::from(crc32fast::hash(text.as_bytes())) << 32) | u64::from(crc32fast::hash(&reversed));
    let name = format!("{SHARED_VIEW_PREFIX}{hash:016x}");
    if db.views.get(db_name, &name).is_none() {
        let statement = crate::views::ddl::ViewStatement::Create {
            db: None,
            name: name.clone(),
            if_not_exists: true,
            options: crate::views::ddl::ViewOptions::default(),
            query: text.to_string(),
        };
        db.views
            .run_statement(db_name, statement, databases)
            .await?;
        tracing::info!(view = %name, query = %text, "shared view created for subscriptions");
    }
    Ok(name)
}

/// Drops shared views nobody has subscribed to for the change-log age.
async fn drop_idle_shared_views(db: &Arc<DbInner>) {
    let age = db.subs.limits.age;
    let idle: Vec<(Arc<str>, String)> = db
        .subs
        .views
        .read()
        .values()
        .filter_map(|s| match &s.kind {
            SourceKind::View(v)
                if s.subscribers.load(Ordering::Acquire) == 0
                    && s.idle_since.lock().is_some_and(|t| t.elapsed() > age) =>
            {
                let name = v.name();
                name.starts_with(SHARED_VIEW_PREFIX)
                    .then(|| (v.db.clone(), name))
            }
            _ => None,
        })
        .collect();
    for (database, name) in idle {
        let statement = crate::views::ddl::ViewStatement::Drop {
            db: None,
            name: name.clone(),
            if_exists: true,
        };
        match db.views.run_statement(&database, statement, None).await {
            Ok(_) => tracing::info!(view = %name, "idle shared subscription view dropped"),
            Err(e) => tracing::warn!(view = %name, error = %e, "idle shared view not dropped"),
        }
    }
}

/// Starts a subscription (see [`crate::Db::subscribe`]).
pub(crate) async fn subscribe(
    db: &Arc<DbInner>,
    sql: &str,
    options: SubscribeOptions,
    databases: Option<Vec<String>>,
) -> Result<Subscription, Error> {
    let hub = db.subs.clone();
    drop_idle_shared_views(db).await;
    let df = crate::db::plan_subscription(db, &options.db, sql, databases.as_deref()).await?;
    let (session, plan) = df.into_parts();
    let target = match feed::analyse(db, &options.db, &plan) {
        Ok(t) => t,
        Err(refused) if feed::needs_view(&plan) => {
            // An aggregate (or join, window…) query: kept current by a shared view.
            let name = shared_view(db, &options.db, sql, databases.as_deref())
                .await
                .map_err(|e| match e {
                    Error::View(v) => Error::Subscribe(SubscribeError::Unsupported(format!(
                        "{refused}; a shared materialized view for it could not be created: {v}"
                    ))),
                    other => other,
                })?;
            let sql = format!("SELECT * FROM {}", crate::views::plan::quote(&name));
            return Box::pin(subscribe(db, &sql, options, databases)).await;
        }
        Err(e) => return Err(e),
    };
    let source = match &target.source {
        feed::Target::View(v) => hub.view_source(v),
        feed::Target::Table(t) => hub.table_source(t),
    };
    let feed = {
        let key = (options.db.clone(), sql.to_string());
        let mut feeds = source.feeds.lock();
        feeds.retain(|_, f| f.strong_count() > 0);
        match feeds.get(&key).and_then(Weak::upgrade) {
            Some(f) => f,
            None => {
                let f = Arc::new(Feed::new(&session, &source, target)?);
                feeds.insert(key, Arc::downgrade(&f));
                f
            }
        }
    };
    source.subscribers.fetch_add(1, Ordering::AcqRel);
    *source.idle_since.lock() = None;
    let attached = Attached(source.clone());
    let position = Arc::new(AtomicU64::new(0));
    let mut state = State {
        db: db.clone(),
        rx: source.tx.subscribe(),
        source,
        _attached: attached,
        feed: feed.clone(),
        sql: sql.to_string(),
        databases,
        phase: Phase::Live,
        cursor: 0,
        applied: 0,
        position: position.clone(),
        out: VecDeque::new(),
        quiet_since: tokio::time::Instant::now(),
        done: false,
        options,
    };
    let visible = db.visible_seq();
    let frontier = {
        let log = state.source.log.lock();
        (log.start, state.source.frontier(&log, visible))
    };
    match state.options.since {
        Some(since) if since >= frontier.0 && since <= frontier.1 => state.cursor = since,
        Some(since) => {
            state.phase = Phase::Snapshot(Some(if since > frontier.1 {
                format!(
                    "sequence {since} is ahead of this source (at {})",
                    frontier.1
                )
            } else {
                format!(
                    "sequence {since} is older than the retained change log (it starts after {})",
                    frontier.0
                )
            }))
        }
        None if state.options.snapshot => {
            // Planned now, so a bad query fails the subscribe call itself.
            state.start_snapshot(None).await?;
        }
        None => {
            state.cursor = frontier.1;
            state.applied = state.source.applied_at(frontier.1);
        }
    }
    position.store(state.cursor, Ordering::Release);
    let schema = feed.schema.clone();
    let inner = futures::stream::unfold(
        state,
        |mut st| async move { st.next().await.map(|m| (m, st)) },
    );
    Ok(Subscription {
        schema,
        position,
        inner: Box::pin(inner),
    })
}
