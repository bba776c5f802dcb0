//! [`Db`]: the embedded database handle — open, write, query, close.
//!
//! Write path (details in docs/architecture.md):
//! 1. parse (no lock);
//! 2. under the write lock: validate against the catalog and build per-table chunks, take the
//!    next sequence, append the WAL record, publish new schema, enqueue the chunks;
//! 3. outside the lock: group commit fsyncs and applies the chunks in sequence order;
//! 4. return the sequence.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::thread::JoinHandle;

use arrow::array::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;
use parking_lot::Mutex;

use crate::config::{Config, Durability};
use crate::error::Error;
use crate::ingest::WriteError;
use crate::ingest::line_protocol::{self, LineError, ParseOptions, Precision};
use crate::ingest::prepare::{
    ImportCheck, PreparedWrite, check_lines, prepare_batch, prepare_lines,
};
use crate::query::QueryEngine;
use crate::storage::catalog::{Catalog, check_database_name};
use crate::storage::commit::{CommitQueue, PendingApply};
use crate::storage::manifest::Manifest;
use crate::storage::segment::Segment;
use crate::storage::wal::{self, ReplayReport, WalError, WalWriter};

mod persist;
mod views;
pub use persist::{CompactReport, PersistReport};
pub use views::ViewError;

/// How a line protocol write is interpreted.
#[derive(Debug, Clone, Copy)]
pub struct WriteOptions {
    /// Unit of the timestamps. Default: nanoseconds.
    pub precision: Precision,
    /// Apply the good lines and report the bad ones, instead of rejecting the whole write.
    /// Default: false (a write is atomic).
    pub accept_partial: bool,
    /// Line number of the first line, for error messages about chunks of a larger file.
    /// Default: 1.
    pub first_line: usize,
}

impl Default for WriteOptions {
    fn default() -> Self {
        WriteOptions {
            precision: Precision::Nanosecond,
            accept_partial: false,
            first_line: 1,
        }
    }
}

impl WriteOptions {
    /// Defaults with the given precision.
    pub fn precision(precision: Precision) -> WriteOptions {
        WriteOptions {
            precision,
            ..WriteOptions::default()
        }
    }
}

/// What a successful write did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WriteReceipt {
    /// The write's sequence number (for a write that stored nothing, the latest sequence).
    pub seq: u64,
    /// Rows stored.
    pub rows: usize,
    /// Lines rejected in accept-partial mode (at most 1000 are listed).
    pub rejected: Vec<LineError>,
    /// How many lines were rejected in all.
    pub rejected_total: usize,
}

/// Tells the interval-sync thread to stop.
type StopSignal = (parking_lot::Mutex<bool>, parking_lot::Condvar);

/// Counters describing a database, for monitoring.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct DbStats {
    /// Sequence of the latest visible write.
    pub last_seq: u64,
    /// Databases.
    pub databases: usize,
    /// Tables across all databases.
    pub tables: usize,
    /// Rows held in the mutable buffers.
    pub buffer_rows: usize,
    /// Memory held by the mutable buffers, in bytes.
    pub buffer_bytes: usize,
    /// WAL fsyncs issued since open.
    pub wal_fsyncs: u64,
    /// Total time spent in WAL fsyncs since open, in seconds.
    pub wal_fsync_seconds: f64,
    /// Every write up to this sequence is in segments.
    pub persisted_seq: u64,
    /// Segment files across all tables.
    pub segments: usize,
    /// Rows in segments.
    pub segment_rows: u64,
    /// Bytes of segment files.
    pub segment_bytes: u64,
    /// Segment files queries have opened since open (a partition or segment outside a query's
    /// time range is never opened, so this shows pruning).
    pub segments_scanned: u64,
    /// Live subscriptions.
    pub subscribers: usize,
}

struct Writer {
    wal: Option<WalWriter>,
    next_seq: u64,
}

pub(crate) struct DbInner {
    pub(crate) config: Config,
    pub(crate) catalog: Catalog,
    writer: Mutex<Writer>,
    commit: CommitQueue,
    pub(crate) query: QueryEngine,
    closed: AtomicBool,
    /// Set once close has let the views catch up: from then on nothing is written, not even
    /// view maintenance.
    sealed: AtomicBool,
    syncer: Mutex<Option<(JoinHandle<()>, Arc<StopSignal>)>>,
    replay: ReplayReport,
    /// Segment manifest and absolute data directory (None in memory).
    pub(crate) manifest: Option<Manifest>,
    pub(crate) data_dir: Option<std::path::PathBuf>,
    wal_dir: Option<std::path::PathBuf>,
    /// One persist at a time.
    persist_lock: Mutex<()>,
    /// Held while the segment set of a partition is being replaced (compaction, retention, a
    /// persist that merges with existing segments).
    compact_lock: Mutex<()>,
    persisted_seq: std::sync::atomic::AtomicU64,
    last_persist: Mutex<std::time::Instant>,
    persister: Mutex<Option<(JoinHandle<()>, Arc<StopSignal>)>>,
    /// Segment files included in query scans.
    pub(crate) segments_scanned: std::sync::atomic::AtomicU64,
    /// Materialized views: registry, maintenance queue and worker.
    pub(crate) views: Arc<crate::views::ViewsShared>,
    /// Change logs of subscribed views and tables.
    pub(crate) subs: Arc<crate::subscribe::Hub>,
    /// Held by the view worker during a round (dropping a view waits for it).
    pub(crate) view_round: Mutex<()>,
    view_worker: Mutex<Option<JoinHandle<()>>>,
    /// Holds the data directory's lock for the life of the handle.
    _dir_lock: Option<File>,
}

/// An open Rivulet database: a directory (or memory) holding any number of named databases.
///
/// `Db` is a cheap handle: clones share the same database. Writes are synchronous (they block
/// until durable, per [`Durability`]); queries are async (DataFusion).
///
/// ```
/// # tokio_test_block_on(async {
/// use rivulet::{Db, Precision};
///
/// let db = Db::open_in_memory()?;
/// db.write_lines("main", "cpu,host=a usage=0.5 1700000000", Precision::Second)?;
/// let batches = db.sql("SELECT host, usage FROM cpu").await?;
/// assert_eq!(batches[0].num_rows(), 1);
/// # Ok::<(), rivulet::Error>(())
/// # }).unwrap();
/// # fn tokio_test_block_on<F: std::future::Future>(f: F) -> F::Output {
/// #     tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(f)
/// # }
/// ```
#[derive(Clone)]
pub struct Db {
    inner: Arc<DbInner>,
}

impl std::fmt::Debug for Db {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Db")
            .field("data_dir", &self.inner.config.data_dir)
            .finish()
    }
}

impl Db {
    /// Opens (or creates) the database in directory `path` with default settings.
    pub fn open(path: impl AsRef<Path>) -> Result<Db, Error> {
        Db::open_with(Config::with_dir(path.as_ref()))
    }

    /// An in-memory database: no data directory, no WAL, nothing survives `close`.
    pub fn open_in_memory() -> Result<Db, Error> {
        Db::open_with(Config::default())
    }

    /// Opens a database with explicit settings: takes the directory lock, loads the catalog,
    /// replays the WAL (cutting off a torn tail) and starts a new WAL segment.
    pub fn open_with(config: Config) -> Result<Db, Error> {
        check_database_name(&config.default_database).map_err(Error::Config)?;
        if config.durability == Durability::Interval(std::time::Duration::ZERO) {
            return Err(Error::Config(
                "the interval of interval durability must be above zero".to_string(),
            ));
        }
        let mut config = config;
        if let Some(dir) = &config.data_dir {
            std::fs::create_dir_all(dir).map_err(|e| Error::io("creating", dir, e))?;
            // Segment paths handed to the query engine must be absolute.
            config.data_dir =
                Some(std::fs::canonicalize(dir).map_err(|e| Error::io("resolving", dir, e))?);
        }
        let (sled, dir_lock, wal_dir) = match &config.data_dir {
            Some(dir) => {
                let lock_path = dir.join("LOCK");
                let lock = File::options()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&lock_path)
                    .map_err(|e| Error::io("opening", &lock_path, e))?;
                match lock.try_lock() {
                    Ok(()) => {}
                    Err(std::fs::TryLockError::WouldBlock) => {
                        return Err(Error::Locked(dir.clone()));
                    }
                    Err(std::fs::TryLockError::Error(e)) => {
                        return Err(Error::io("locking", &lock_path, e));
                    }
                }
                let wal_dir = dir.join("wal");
                std::fs::create_dir_all(&wal_dir)
                    .map_err(|e| Error::io("creating", &wal_dir, e))?;
                let sled = open_sled(&dir.join("catalog"))?;
                (sled, Some(lock), Some(wal_dir))
            }
            None => {
                let sled = sled::Config::new()
                    .temporary(true)
                    .open()
                    .map_err(crate::storage::catalog::CatalogError::from)?;
                (sled, None, None)
            }
        };
        let catalog = Catalog::load(sled)?;

        // Load the segments, remove files the manifest does not list.
        let mut persisted_seq = 0;
        let manifest = match &config.data_dir {
            Some(dir) => {
                let manifest = Manifest::open(catalog.sled())?;
                let partition_len = (config.partition.as_nanos() as i64).max(1);
                manifest.check_partition(partition_len)?;
                crate::storage::layout::migrate(dir, &catalog, &manifest, partition_len)?;
                persisted_seq = load_segments(&catalog, &manifest, dir)?;
                Some(manifest)
            }
            None => None,
        };

        // Replay the WAL into the buffers (writes already in segments are skipped).
        let mut replay = ReplayReport::default();
        if let Some(wal_dir) = &wal_dir {
            replay = wal::replay(wal_dir, |payload| {
                replay_record(&catalog, payload, persisted_seq)
            })?;
            if let Some((path, offset, reason)) = &replay.truncated_tail {
                tracing::warn!(
                    path = %path.display(), offset, reason,
                    "WAL ended in a torn or corrupt record (a crash mid-write); it was cut off"
                );
            }
        }
        if let Some(wal_dir) = &wal_dir {
            // WAL files wholly persisted before a crash cut the previous trim short.
            let all_persisted = replay.last_seq.is_none_or(|last| last <= persisted_seq);
            wal::remove_segments_through(wal_dir, persisted_seq, all_persisted)?;
        }
        let next_seq = replay
            .last_seq
            .map_or(1, |s| s + 1)
            .max(catalog.stored_next_seq()?)
            .max(persisted_seq + 1);
        let wal = wal_dir
            .as_ref()
            .map(|dir| WalWriter::new(dir, config.wal_segment_bytes, config.io_faults.clone()));
        let commit = CommitQueue::new(next_seq - 1, config.durability, config.io_faults.clone());
        let views = Arc::new(crate::views::ViewsShared::new(
            config.view_queue_bytes,
            next_seq - 1,
        ));
        commit.add_observer(views.clone());
        let subs = Arc::new(crate::subscribe::Hub::new(
            crate::subscribe::LogLimits {
                bytes: config.subscribe_log_bytes,
                age: config.subscribe_log_age,
            },
            config.data_dir.clone(),
        ));
        commit.add_observer(subs.clone());
        let mut query_error = None;
        let config_dir = config.data_dir.clone();
        let inner = Arc::new_cyclic(|weak: &Weak<DbInner>| DbInner {
            query: QueryEngine::new(
                weak.clone(),
                &config.default_database,
                config.query_memory_limit,
                config.data_dir.as_deref(),
            )
            .unwrap_or_else(|e| {
                query_error = Some(e);
                QueryEngine::fallback()
            }),
            config,
            catalog,
            writer: Mutex::new(Writer { wal, next_seq }),
            commit,
            closed: AtomicBool::new(false),
            sealed: AtomicBool::new(false),
            syncer: Mutex::new(None),
            replay,
            manifest,
            data_dir: config_dir,
            wal_dir,
            persist_lock: Mutex::new(()),
            compact_lock: Mutex::new(()),
            persisted_seq: std::sync::atomic::AtomicU64::new(persisted_seq),
            last_persist: Mutex::new(std::time::Instant::now()),
            persister: Mutex::new(None),
            segments_scanned: std::sync::atomic::AtomicU64::new(0),
            views,
            subs,
            view_round: Mutex::new(()),
            view_worker: Mutex::new(None),
            _dir_lock: dir_lock,
        });
        if let Some(e) = query_error {
            return Err(Error::Config(format!("query engine: {e}")));
        }
        inner.subs.attach(Arc::downgrade(&inner));
        inner.recount_buffer();
        if let Durability::Interval(every) = inner.config.durability {
            start_syncer(&inner, every);
        }
        if inner.config.background && inner.manifest.is_some() {
            start_persister(&inner);
        }
        start_view_worker(&inner)?;
        Ok(Db { inner })
    }

    /// What WAL replay found when this database was opened.
    pub fn replay_report(&self) -> &ReplayReport {
        &self.inner.replay
    }

    /// Writes InfluxDB line protocol into database `db` (created on first write). Atomic: if any
    /// line is bad, nothing is written and every bad line is reported.
    pub fn write_lines(
        &self,
        db: &str,
        lines: &str,
        precision: Precision,
    ) -> Result<WriteReceipt, Error> {
        self.write_lines_with(db, lines, &WriteOptions::precision(precision))
    }

    /// Writes line protocol with explicit options (e.g. accept-partial mode).
    pub fn write_lines_with(
        &self,
        db: &str,
        lines: &str,
        options: &WriteOptions,
    ) -> Result<WriteReceipt, Error> {
        check_database_name(db).map_err(WriteError::InvalidDatabase)?;
        let parsed = line_protocol::parse(
            lines,
            ParseOptions {
                precision: options.precision,
                first_line: options.first_line,
            },
        );
        if !options.accept_partial && !parsed.errors.is_empty() {
            return Err(WriteError::Rejected {
                db: db.to_string(),
                total: parsed.error_count,
                errors: parsed.errors,
            }
            .into());
        }
        let now = self.inner.config.clock.now_ns();
        let accept_partial = options.accept_partial;
        self.inner.views.wait_for_room();
        self.inner.write(false, |catalog| {
            prepare_lines(catalog, db, &parsed, now, accept_partial)
        })
    }

    /// Checks line protocol without writing it: syntax, and types against the catalog plus the
    /// columns that earlier calls with the same `state` introduced. `rivulet write` runs this
    /// over a whole file before writing any of it, so a bad line anywhere leaves the data as it
    /// was.
    pub fn check_lines(
        &self,
        db: &str,
        lines: &str,
        options: &WriteOptions,
        state: &mut ImportCheck,
    ) -> Result<Vec<LineError>, Error> {
        self.inner.check_open()?;
        check_database_name(db).map_err(WriteError::InvalidDatabase)?;
        let parsed = line_protocol::parse(
            lines,
            ParseOptions {
                precision: options.precision,
                first_line: options.first_line,
            },
        );
        Ok(check_lines(&self.inner.catalog, db, &parsed, state))
    }

    /// Writes an Arrow batch into `table` of database `db`. See the column mapping in
    /// the crate docs: `time` (timestamp), dictionary-encoded strings = tags, the rest fields.
    pub fn write_batch(
        &self,
        db: &str,
        table: &str,
        batch: &RecordBatch,
    ) -> Result<WriteReceipt, Error> {
        self.inner.write_batch(db, table, batch)
    }

    /// Runs a SQL query against the default database and collects the result.
    ///
    /// Tables of other databases are reachable as `db.table`. `INSERT INTO` writes through the
    /// normal write path; DDL is refused.
    pub async fn sql(&self, query: &str) -> Result<Vec<RecordBatch>, Error> {
        let db = self.inner.config.default_database.clone();
        self.sql_in(&db, query).await
    }

    /// Runs a SQL query with `db` as the default database.
    pub async fn sql_in(&self, db: &str, query: &str) -> Result<Vec<RecordBatch>, Error> {
        collect(self.plan(db, query, true).await?).await
    }

    /// Runs a read-only query (no `INSERT`, no DDL, no `COPY`) with `db` as the default
    /// database: what an untrusted caller, such as the HTTP query endpoint, may run.
    pub async fn query(&self, db: &str, query: &str) -> Result<Vec<RecordBatch>, Error> {
        collect(self.plan(db, query, false).await?).await
    }

    /// [`Db::query`] as a stream of batches, produced as they are computed. Dropping the
    /// stream cancels the query.
    pub async fn query_stream(
        &self,
        db: &str,
        query: &str,
    ) -> Result<SendableRecordBatchStream, Error> {
        Ok(self.plan(db, query, false).await?.execute_stream().await?)
    }

    /// Runs a SQL query and returns its result as a stream of batches, produced as they are
    /// computed. Dropping the stream cancels the query.
    pub async fn sql_stream(
        &self,
        db: &str,
        query: &str,
    ) -> Result<SendableRecordBatchStream, Error> {
        Ok(self.plan(db, query, true).await?.execute_stream().await?)
    }

    /// Plans a query reading up to the sequence visible now.
    async fn plan(
        &self,
        db: &str,
        query: &str,
        allow_dml: bool,
    ) -> Result<datafusion::dataframe::DataFrame, Error> {
        self.plan_within(db, query, allow_dml, None).await
    }

    /// Plans a query that may only touch `databases` (None: any), e.g. for a token limited to
    /// some databases. Unqualified tables are in `db`, which the caller has checked.
    pub(crate) async fn plan_within(
        &self,
        db: &str,
        query: &str,
        allow_dml: bool,
        databases: Option<&[String]>,
    ) -> Result<datafusion::dataframe::DataFrame, Error> {
        self.inner.check_open()?;
        self.inner.views.wait_loaded();
        if let Some(statement) = crate::views::ddl::parse(query) {
            let statement = statement.map_err(|e| Error::View(ViewError::Invalid(e)))?;
            if !allow_dml && !matches!(statement, crate::views::ddl::ViewStatement::Show) {
                return Err(Error::Denied(
                    "materialized view statements need write access (use the statement endpoint)"
                        .to_string(),
                ));
            }
            return self
                .inner
                .run_view_statement(db, statement, databases)
                .await;
        }
        if allow_dml && let Some(statement) = crate::query::admin::parse(query) {
            let statement =
                statement.map_err(|e| Error::Query(datafusion::error::DataFusionError::Plan(e)))?;
            return self.inner.run_admin(db, statement, databases);
        }
        let seq = self.inner.visible_seq();
        let df = self.inner.query.plan(db, query, allow_dml, seq).await?;
        if let Some(allowed) = databases
            && let Some(other) = crate::query::databases_outside(df.logical_plan(), allowed)?
        {
            return Err(Error::Denied(format!(
                "this token may not use database '{other}'"
            )));
        }
        self.inner.await_views(df, db).await
    }

    /// Subscribes to `sql`: a snapshot of its result, then every change to it (see
    /// [`Subscription`](crate::Subscription) and the protocol in docs/subscriptions.md).
    ///
    /// `sql` is `SELECT … FROM <a materialized view or a table> [WHERE …]`. A view gives a
    /// keyed result (upserts and deletes by the view's key columns, which the query must
    /// select); a table gives an append result (inserts of the rows written).
    ///
    /// ```
    /// # fn main() -> Result<(), rivulet::Error> {
    /// use futures::StreamExt;
    /// use rivulet::{ChangeKind, Db, Precision, SubscribeOptions};
    ///
    /// let db = Db::open_in_memory()?;
    /// db.write_lines("main", "cpu,host=a usage=95 1", Precision::Second)?;
    /// let rt = tokio::runtime::Runtime::new().expect("runtime");
    /// rt.block_on(async {
    ///     let mut sub = db
    ///         .subscribe("SELECT host, usage FROM cpu WHERE usage > 90", SubscribeOptions::default())
    ///         .await?;
    ///     let snapshot = sub.next().await.expect("a message")?;
    ///     assert_eq!(snapshot.kind, ChangeKind::Snapshot { first: true, last: true });
    ///     assert_eq!(snapshot.rows.num_rows(), 1);
    ///     db.write_lines("main", "cpu,host=b usage=99 2", Precision::Second)?;
    ///     let change = sub.next().await.expect("a message")?;
    ///     assert_eq!(change.kind, ChangeKind::Change);
    ///     assert_eq!(change.ops[0], rivulet::Op::Insert);
    ///     Ok::<_, rivulet::Error>(())
    /// })?;
    /// # db.close()
    /// # }
    /// ```
    pub async fn subscribe(
        &self,
        sql: &str,
        options: crate::SubscribeOptions,
    ) -> Result<crate::Subscription, Error> {
        crate::subscribe::subscribe(&self.inner, sql, options, None).await
    }

    /// [`Db::subscribe`] limited to `databases` (a token's).
    pub(crate) async fn subscribe_within(
        &self,
        sql: &str,
        options: crate::SubscribeOptions,
        databases: Option<Vec<String>>,
    ) -> Result<crate::Subscription, Error> {
        crate::subscribe::subscribe(&self.inner, sql, options, databases).await
    }

    /// Waits until every materialized view reflects every write acknowledged so far (queries
    /// do this on their own for the views they read), or fails after `Config::view_wait`.
    pub fn sync_views(&self) -> Result<(), Error> {
        self.inner.check_open()?;
        self.inner.views.wait_loaded();
        let views = self.inner.views.views.read().clone();
        self.inner
            .views
            .wait(
                &views,
                self.inner.visible_seq(),
                self.inner.config.view_wait,
            )
            .map_err(|e| Error::View(ViewError::Behind(e)))
    }

    /// Names of the databases.
    pub fn databases(&self) -> Vec<String> {
        self.inner
            .catalog
            .databases()
            .iter()
            .map(|d| d.name.to_string())
            .collect()
    }

    /// Counters for monitoring (buffer sizes are summed over the tables on each call).
    pub fn stats(&self) -> DbStats {
        let (wal_fsyncs, wal_fsync_seconds) = self.inner.commit.fsync_stats();
        let databases = self.inner.catalog.databases();
        let mut stats = DbStats {
            last_seq: self.inner.commit.applied_seq(),
            databases: databases.len(),
            wal_fsyncs,
            wal_fsync_seconds,
            persisted_seq: self.inner.persisted_seq.load(Ordering::Acquire),
            segments_scanned: self.inner.segments_scanned.load(Ordering::Relaxed),
            subscribers: self.inner.subs.subscribers(),
            ..DbStats::default()
        };
        for db in databases {
            for table in db.tables() {
                stats.tables += 1;
                let buffer = table.buffer.read();
                let (rows, bytes) = buffer.size();
                stats.buffer_rows += rows;
                stats.buffer_bytes += bytes;
                for s in buffer.segments().iter() {
                    stats.segments += 1;
                    stats.segment_rows += s.meta.rows;
                    stats.segment_bytes += s.meta.bytes;
                }
            }
        }
        stats
    }

    /// Sequence of the latest write visible to queries.
    pub fn last_seq(&self) -> u64 {
        self.inner.commit.applied_seq()
    }

    /// Makes every acknowledged write durable (an fsync in `interval`/`none` modes) and flushes
    /// the catalog.
    pub fn flush(&self) -> Result<(), Error> {
        self.inner.flush()
    }

    /// Writes every buffered row to segments now (normally done in the background, by size and
    /// age, and on close), then trims the WAL. Blocks; call it outside async code or through
    /// `spawn_blocking`.
    pub fn persist(&self) -> Result<PersistReport, Error> {
        self.inner.check_open()?;
        self.inner.persist()
    }

    /// Compacts every time partition with two or more segments into one (normally done in the
    /// background once a partition has `compaction_segments`). Blocks, like [`Db::persist`].
    pub fn compact(&self) -> Result<CompactReport, Error> {
        self.inner.check_open()?;
        self.inner.compact(2, true)
    }

    /// Drops the time partitions that are past their table's retention now (normally done in
    /// the background); returns how many segments it removed.
    pub fn apply_retention(&self) -> Result<usize, Error> {
        self.inner.check_open()?;
        self.inner.apply_retention()
    }

    /// Flushes everything and closes the database. Later writes and queries on any clone fail
    /// with [`Error::Closed`].
    pub fn close(self) -> Result<(), Error> {
        self.inner.shutdown()
    }
}

/// Opens the catalog's sled database. Our own `LOCK` file already excludes other processes, so
/// a busy sled lock can only be a previous handle of this process whose background threads are
/// still letting go of it (sled releases its lock asynchronously): retry for a moment.
fn open_sled(path: &Path) -> Result<sled::Db, Error> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
    loop {
        // No periodic flusher: the WAL makes catalog changes durable, and close flushes.
        match sled::Config::new().path(path).flush_every_ms(None).open() {
            Ok(db) => return Ok(db),
            Err(sled::Error::Io(e))
                if e.to_string().contains("could not acquire lock")
                    && std::time::Instant::now() < deadline =>
            {
                std::thread::sleep(std::time::Duration::from_millis(10));
            }
            Err(e) => return Err(crate::storage::catalog::CatalogError::from(e).into()),
        }
    }
}

/// Plans a subscription's query (also its snapshot): a plain query, waiting for the views it
/// reads like any query.
pub(crate) async fn plan_subscription(
    inner: &Arc<DbInner>,
    db: &str,
    sql: &str,
    databases: Option<&[String]>,
) -> Result<datafusion::dataframe::DataFrame, Error> {
    inner.check_open()?;
    inner.views.wait_loaded();
    if crate::views::ddl::parse(sql).is_some() || crate::query::admin::parse(sql).is_some() {
        return Err(crate::SubscribeError::Unsupported(
            "statements cannot be subscribed to; subscribe to a SELECT".to_string(),
        )
        .into());
    }
    let df = inner
        .query
        .plan(db, sql, false, inner.visible_seq())
        .await?;
    if let Some(allowed) = databases
        && let Some(other) = crate::query::databases_outside(df.logical_plan(), allowed)?
    {
        return Err(Error::Denied(format!(
            "this token may not use database '{other}'"
        )));
    }
    inner.await_views(df, db).await
}

/// Collects a result; an empty one is a single empty batch, so the schema is never lost.
pub(crate) async fn collect(
    df: datafusion::dataframe::DataFrame,
) -> Result<Vec<RecordBatch>, Error> {
    let schema = Arc::new(df.schema().as_arrow().clone());
    let mut batches = df.collect().await?;
    if batches.is_empty() {
        batches.push(RecordBatch::new_empty(schema));
    }
    Ok(batches)
}

fn start_syncer(inner: &Arc<DbInner>, every: std::time::Duration) {
    *inner.syncer.lock() = spawn_periodic(inner, "rivulet-wal-sync", every, |inner| {
        match inner.commit.sync_now() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "interval WAL fsync failed");
                false
            }
        }
    });
}

/// A thread named `name` that calls `step` every `every` until the handle is closed or dropped,
/// or `step` returns false. Stop it with [`stop_periodic`].
fn spawn_periodic(
    inner: &Arc<DbInner>,
    name: &str,
    every: std::time::Duration,
    step: impl Fn(&DbInner) -> bool + Send + 'static,
) -> Option<(JoinHandle<()>, Arc<StopSignal>)> {
    let stop: Arc<StopSignal> =
        Arc::new((parking_lot::Mutex::new(false), parking_lot::Condvar::new()));
    let weak = Arc::downgrade(inner);
    let stop2 = stop.clone();
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            loop {
                {
                    let mut stopped = stop2.0.lock();
                    if !*stopped {
                        stop2.1.wait_for(&mut stopped, every);
                    }
                    if *stopped {
                        return;
                    }
                }
                let Some(inner) = weak.upgrade() else { return };
                if !step(&inner) {
                    return;
                }
            }
        });
    match handle {
        Ok(h) => Some((h, stop)),
        Err(e) => {
            tracing::error!(error = %e, thread = name, "could not start a background thread");
            None
        }
    }
}

/// Stops a thread started by [`spawn_periodic`] and waits for it (unless it is the caller: the
/// thread may itself drop the last handle).
fn stop_periodic(slot: &Mutex<Option<(JoinHandle<()>, Arc<StopSignal>)>>) {
    if let Some((handle, stop)) = slot.lock().take() {
        *stop.0.lock() = true;
        stop.1.notify_all();
        if handle.thread().id() != std::thread::current().id() {
            let _ = handle.join();
        }
    }
}

/// Loads the manifest into the tables' segment lists, raises each table's series floor to its
/// latest persisted time, and removes unlisted files. Returns the persisted sequence.
fn load_segments(catalog: &Catalog, manifest: &Manifest, dir: &Path) -> Result<u64, Error> {
    let (metas, persisted_seq) = manifest.load()?;
    let mut tables = std::collections::HashMap::new();
    for db in catalog.databases() {
        for table in db.tables() {
            tables.insert(table.id, table);
        }
    }
    let mut known = std::collections::HashSet::new();
    let mut by_table: std::collections::HashMap<u64, Vec<Arc<Segment>>> =
        std::collections::HashMap::new();
    for meta in metas {
        let segment = Segment::new(meta, dir);
        if !segment.path.exists() {
            return Err(crate::storage::segment::SegmentError::Manifest(format!(
                "segment {} is registered but missing",
                segment.path.display()
            ))
            .into());
        }
        known.insert(segment.path.clone());
        by_table
            .entry(segment.meta.table_id)
            .or_default()
            .push(Arc::new(segment));
    }
    for (id, segments) in by_table {
        let Some(table) = tables.get(&id) else {
            return Err(crate::storage::segment::SegmentError::Manifest(format!(
                "segments are registered for table id {id}, which the catalog does not have"
            ))
            .into());
        };
        let latest = segments
            .iter()
            .map(|s| s.meta.max_time)
            .max()
            .unwrap_or(i64::MIN);
        table.series.lock().raise_floor(latest);
        table.buffer.write().replace_segments(&[], segments, None);
    }
    // Each table's last-point state as of the persisted sequence (replay adds later writes).
    for (id, table) in &tables {
        let Some(bytes) = manifest.get(&format!("last/{id:016x}"))? else {
            continue;
        };
        let schema = table.schema();
        let mut series = table.series.lock();
        let mut last = table.last.lock();
        for batch in persist::decode_ipc(&bytes)? {
            let projected = crate::storage::buffer::to_table_schema(&batch, &schema)?;
            last.load(&schema, projected, &mut series)?;
        }
    }
    let table_dirs = catalog
        .databases()
        .iter()
        .flat_map(|db| {
            db.tables()
                .into_iter()
                .map(|t| crate::storage::layout::table_dir(db.id, t.id))
                .collect::<Vec<_>>()
        })
        .collect();
    crate::storage::layout::remove_unlisted(dir, &known, &table_dirs)?;
    Ok(persisted_seq)
}

/// Starts the materialized-view maintenance thread (it first loads the stored views).
fn start_view_worker(inner: &Arc<DbInner>) -> Result<(), Error> {
    let weak = Arc::downgrade(inner);
    let shared = inner.views.clone();
    let handle = std::thread::Builder::new()
        .name("rivulet-views".to_string())
        .spawn(move || crate::views::run_worker(weak, shared))
        .map_err(|e| Error::Config(format!("could not start the view thread: {e}")))?;
    *inner.view_worker.lock() = Some(handle);
    Ok(())
}

impl DbInner {
    /// Lets the views catch up with every acknowledged write (bounded), then stops their
    /// worker.
    fn stop_views(&self) {
        self.subs.close_all();
        let seq = self.visible_seq();
        let views = self.views.views.read().clone();
        if !views.is_empty()
            && let Err(e) = self.views.wait(&views, seq, self.config.view_wait)
        {
            tracing::warn!(error = %e, "closing before the views caught up; they recover at open");
        }
        self.views.stop();
        if let Some(handle) = self.view_worker.lock().take()
            && handle.thread().id() != std::thread::current().id()
        {
            let _ = handle.join();
        }
    }
}

/// Starts the thread that persists by size and age, compacts and applies retention.
fn start_persister(inner: &Arc<DbInner>) {
    let every = std::time::Duration::from_millis(250);
    *inner.persister.lock() = spawn_periodic(inner, "rivulet-persist", every, |inner| {
        if let Err(e) = inner.background_step() {
            tracing::error!(error = %e, "background persistence failed; retrying");
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        true
    });
}

impl DbInner {
    /// One round of background work: persist if the buffer is big or old, compact, expire.
    fn background_step(&self) -> Result<(), Error> {
        if self.closed.load(Ordering::Acquire) || self.commit.check().is_err() {
            return Ok(());
        }
        let bytes = self.buffered_bytes();
        let old = self.last_persist.lock().elapsed() >= self.config.persist_age;
        if bytes >= self.config.persist_bytes || (bytes > 0 && old) {
            self.persist()?;
        } else if bytes == 0 {
            *self.last_persist.lock() = std::time::Instant::now();
        }
        for db in self.catalog.databases() {
            for table in db.tables() {
                table.buffer.write().expire_before();
            }
        }
        self.compact(self.config.compaction_segments, false)?;
        self.apply_retention()?;
        Ok(())
    }
}

/// Applies one replayed WAL record: re-creates missing catalog entries and fills the buffers.
fn replay_record(catalog: &Catalog, payload: &[u8], persisted_seq: u64) -> Result<u64, WalError> {
    let seq = u64::from_le_bytes(payload[..8].try_into().unwrap_or([0; 8]));
    if seq <= persisted_seq {
        // Already in segments.
        return Ok(seq);
    }
    let record = wal::decode_write(payload)?;
    let seq = record.seq;
    let fail = |reason: String| WalError::Record {
        seq,
        op: "replayed",
        reason,
    };
    for (table, batch) in &record.tables {
        let prepared =
            crate::ingest::prepare::prepare_system_batch(catalog, &record.db, table, batch)
                .map_err(|e| fail(e.to_string()))?;
        let chunks = publish(catalog, prepared, seq).map_err(|e| fail(e.to_string()))?;
        for (table, chunk) in chunks {
            table.apply(chunk);
        }
    }
    Ok(seq)
}

type SequencedChunks = Vec<(
    Arc<crate::storage::table::Table>,
    Arc<crate::storage::buffer::Chunk>,
)>;

/// Publishes a prepared write's catalog changes and stamps its chunks with `seq`.
fn publish(
    catalog: &Catalog,
    prepared: PreparedWrite,
    seq: u64,
) -> Result<SequencedChunks, WriteError> {
    let db = match prepared.db {
        Some(db) => db,
        None => catalog.ensure_database(&prepared.db_name)?,
    };
    let mut out = Vec::with_capacity(prepared.tables.len());
    for t in prepared.tables {
        if t.is_new || !t.new_columns.is_empty() {
            t.table
                .set_schema(t.table.schema().with_columns(&t.new_columns));
            catalog.save_table(&db, &t.table)?;
        }
        let mut chunk = t.chunk;
        chunk.seq = seq;
        out.push((t.table, Arc::new(chunk)));
    }
    Ok(out)
}

impl DbInner {
    pub(crate) fn write_batch(
        &self,
        db: &str,
        table: &str,
        batch: &RecordBatch,
    ) -> Result<WriteReceipt, Error> {
        check_database_name(db).map_err(WriteError::InvalidDatabase)?;
        self.views.wait_for_room();
        self.write(false, |catalog| prepare_batch(catalog, db, table, batch))
    }

    /// The write path: prepare under the write lock, log, publish, then wait for group commit.
    /// `system` writes (view maintenance) go on while close lets the views catch up; every
    /// other write stops when close begins.
    pub(crate) fn write(
        &self,
        system: bool,
        prepare: impl FnOnce(&Catalog) -> Result<PreparedWrite, WriteError>,
    ) -> Result<WriteReceipt, Error> {
        let check = || {
            let flag = if system { &self.sealed } else { &self.closed };
            if flag.load(Ordering::Acquire) {
                return Err(Error::Closed);
            }
            Ok(())
        };
        check()?;
        self.make_room()?;
        let mut w = self.writer.lock();
        // Checked under the lock: a failed append must stop every later writer, and nothing may
        // be appended after close has synced the log.
        check()?;
        self.commit.check().map_err(WriteError::from)?;
        let prepared = prepare(&self.catalog)?;
        let rows = prepared.rows;
        let rejected = prepared.rejected.clone();
        let rejected_total = prepared.rejected_total;
        if prepared.tables.is_empty() {
            return Ok(WriteReceipt {
                seq: w.next_seq - 1,
                rows: 0,
                rejected,
                rejected_total,
            });
        }
        let seq = w.next_seq;
        if let Some(wal) = &mut w.wal {
            let tables: Vec<(&str, &RecordBatch)> = prepared
                .tables
                .iter()
                .map(|t| (t.table.name.as_ref(), &t.chunk.batch))
                .collect();
            let db_name = prepared.db_name.clone();
            if let Err(e) = wal.append(seq, |buf| wal::encode_write(seq, &db_name, &tables, buf)) {
                if matches!(e, WalError::Io { .. }) {
                    self.commit.poison(e.to_string());
                }
                return Err(WriteError::from(e).into());
            }
        }
        w.next_seq += 1;
        let chunks = match publish(&self.catalog, prepared, seq) {
            Ok(c) => c,
            Err(e) => {
                // The record is in the WAL but the catalog could not take it: stop here, and
                // let a reopen replay it.
                self.commit.poison(e.to_string());
                return Err(e.into());
            }
        };
        self.commit
            .enqueue(PendingApply { seq, chunks }, w.wal.as_ref());
        drop(w);
        self.commit.wait(seq).map_err(WriteError::from)?;
        Ok(WriteReceipt {
            seq,
            rows,
            rejected,
            rejected_total,
        })
    }

    /// Runs a storage statement; the result is one row describing what it set.
    fn run_admin(
        &self,
        default_db: &str,
        statement: crate::query::admin::AdminStatement,
        databases: Option<&[String]>,
    ) -> Result<datafusion::dataframe::DataFrame, Error> {
        use crate::query::admin::AdminStatement;
        let AdminStatement::SetRetention {
            db,
            table,
            retention,
        } = statement;
        let db = db.unwrap_or_else(|| default_db.to_string());
        if let Some(allowed) = databases
            && !allowed.contains(&db)
        {
            return Err(Error::Denied(format!(
                "this token may not use database '{db}'"
            )));
        }
        let plan_error = |m: String| Error::Query(datafusion::error::DataFusionError::Plan(m));
        let database = self
            .catalog
            .database(&db)
            .ok_or_else(|| plan_error(format!("database '{db}' not found")))?;
        let t = database
            .table(&table)
            .ok_or_else(|| plan_error(format!("table '{table}' not found in database '{db}'")))?;
        {
            // Under the write lock: the writer also saves table records.
            let _w = self.writer.lock();
            t.settings.write().retention = retention;
            self.catalog.save_table(&database, &t)?;
            self.catalog.flush()?;
        }
        let shown = retention.map_or_else(
            || "none".to_string(),
            |ns| format!("{}s", ns / 1_000_000_000),
        );
        let batch = RecordBatch::try_from_iter([
            (
                "table",
                Arc::new(arrow::array::StringArray::from(vec![format!(
                    "{db}.{table}"
                )])) as arrow::array::ArrayRef,
            ),
            (
                "retention",
                Arc::new(arrow::array::StringArray::from(vec![shown])) as arrow::array::ArrayRef,
            ),
        ])?;
        Ok(datafusion::prelude::SessionContext::new().read_batch(batch)?)
    }

    /// Past the buffer cap, a writer persists (or waits for the persist under way) first.
    fn make_room(&self) -> Result<(), Error> {
        if self.manifest.is_none() || self.buffered_bytes() <= self.config.max_buffer_bytes {
            return Ok(());
        }
        let _persisting = self.persist_lock.lock();
        if self.buffered_bytes() > self.config.max_buffer_bytes {
            self.persist_locked()?;
        }
        Ok(())
    }

    fn buffered_bytes(&self) -> usize {
        self.commit.buffer_bytes.load(Ordering::Relaxed)
    }

    fn check_open(&self) -> Result<(), Error> {
        if self.closed.load(Ordering::Acquire) {
            return Err(Error::Closed);
        }
        Ok(())
    }

    /// Every write up to this sequence is applied to all its tables.
    pub(crate) fn visible_seq(&self) -> u64 {
        self.commit.applied_seq()
    }

    fn flush(&self) -> Result<(), Error> {
        let w = self.writer.lock();
        // After a failed fsync nothing may be reported durable again (no retry-and-ack).
        self.commit.check().map_err(WriteError::from)?;
        if w.wal.is_some() {
            self.commit.sync_now().map_err(WriteError::from)?;
        }
        self.catalog.store_next_seq(w.next_seq)?;
        self.catalog.flush()?;
        Ok(())
    }

    fn shutdown(&self) -> Result<(), Error> {
        if self.closed.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        stop_periodic(&self.persister);
        self.stop_views();
        self.sealed.store(true, Ordering::Release);
        let persisted = if self.config.persist_on_close
            && self.manifest.is_some()
            && self.commit.check().is_ok()
        {
            self.persist().map(|_| ())
        } else {
            Ok(())
        };
        if let Err(e) = &persisted {
            // The WAL still holds everything: flush it, then report the failure.
            tracing::error!(error = %e, "persisting on close failed; the WAL keeps the data");
        }
        stop_periodic(&self.syncer);
        self.flush()?;
        persisted
    }
}

impl Drop for DbInner {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "closing the database on drop failed");
        }
    }
}
