//! [`Db`]: the embedded database handle — open, write, query, close.
//!
//! Write path (details in docs/architecture.md):
//! 1. parse (no lock);
//! 2. under the write lock: validate against the catalog and build per-table chunks, take the
//!    next sequence, append the WAL record, publish new schema, enqueue the chunks;
//! 3. outside the lock: group commit fsyncs and applies the chunks in sequence order;
//! 4. return the sequence.

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;

use arrow::array::RecordBatch;
use datafusion::execution::SendableRecordBatchStream;

use crate::config::Config;
use crate::error::Error;
use crate::ingest::WriteError;
use crate::ingest::batch::prepare_batch;
use crate::ingest::check::{ImportCheck, check_lines};
use crate::ingest::line_protocol::{self, LineError, ParseOptions, Precision};
use crate::ingest::prepare::{PreparedWrite, WriteSummary, prepare_lines};
use crate::query::QueryEngine;
use crate::storage::catalog::{Catalog, check_database_name};
use crate::storage::engine::{Engine, Origin, WriteSet};
use crate::storage::wal::ReplayReport;

mod admin;
mod background;
mod open;

pub use crate::storage::compact::CompactReport;
pub use crate::storage::persist::PersistReport;
pub use crate::views::ViewError;

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
    /// The hot-segment cache (segments kept decoded).
    pub hot_cache: crate::HotCacheStats,
}

pub(crate) struct DbInner {
    pub(crate) config: Config,
    /// The storage engine: catalog, WAL, buffers, segments.
    pub(crate) engine: Arc<Engine>,
    pub(crate) query: Arc<QueryEngine>,
    /// The periodic background threads.
    threads: background::Threads,
    /// Materialized views: registry, maintenance queue and worker.
    pub(crate) views: Arc<crate::views::Views>,
    /// Change logs of subscribed views and tables.
    pub(crate) subs: Arc<crate::subscribe::Hub>,
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
        Ok(Db {
            inner: DbInner::open(config)?,
        })
    }

    /// What WAL replay found when this database was opened.
    pub fn replay_report(&self) -> &ReplayReport {
        self.inner.engine.replay_report()
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
        check_database_name(db).map_err(|e| WriteError::InvalidDatabase(e.to_string()))?;
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
        self.inner.write(Origin::User, |catalog| {
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
        check_database_name(db).map_err(|e| WriteError::InvalidDatabase(e.to_string()))?;
        let parsed = line_protocol::parse(
            lines,
            ParseOptions {
                precision: options.precision,
                first_line: options.first_line,
            },
        );
        Ok(check_lines(self.inner.engine.catalog(), db, &parsed, state))
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
        self.plan_with(db, query, allow_dml, databases, Default::default())
            .await
    }

    /// [`plan_within`](Self::plan_within), reading the SQL as a Postgres client's and with
    /// values for its placeholders as `options` say.
    pub(crate) async fn plan_with(
        &self,
        db: &str,
        query: &str,
        allow_dml: bool,
        databases: Option<&[String]>,
        options: crate::query::PlanOptions<'_>,
    ) -> Result<datafusion::dataframe::DataFrame, Error> {
        self.inner.check_open()?;
        self.inner.views.shared.wait_loaded();
        if let Some(statement) = crate::views::ddl::parse(query) {
            let statement = statement.map_err(Error::View)?;
            if !allow_dml && !matches!(statement, crate::views::ddl::ViewStatement::Show) {
                return Err(Error::Denied(
                    "materialized view statements need write access (use the statement endpoint)"
                        .to_string(),
                ));
            }
            return self
                .inner
                .views
                .run_statement(db, statement, databases)
                .await;
        }
        if allow_dml && let Some(statement) = crate::query::admin::parse(query) {
            let statement = statement?;
            return self.inner.run_admin(db, statement, databases);
        }
        self.inner
            .views
            .plan_read(db, query, allow_dml, databases, options)
            .await
    }

    /// A Postgres connection's `pg_catalog` over the databases it may use (None: any): kept for
    /// the connection's life, so its object ids stay the same from query to query.
    pub(crate) fn postgres_session(
        &self,
        databases: Option<&[String]>,
    ) -> Result<crate::query::PgSession, Error> {
        Ok(self.inner.query.postgres_session(databases)?)
    }

    /// The statements of a Postgres simple-query string.
    pub(crate) fn postgres_statements(
        &self,
        sql: &str,
    ) -> Result<Vec<crate::query::PgStatement>, Error> {
        Ok(self.inner.query.postgres_statements(sql)?)
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
        crate::subscribe::subscribe(&self.inner.subs, sql, options, None, None).await
    }

    /// [`Db::subscribe`] limited to `databases` (a token's), counted against `owner`'s quotas.
    pub(crate) async fn subscribe_within(
        &self,
        sql: &str,
        options: crate::SubscribeOptions,
        databases: Option<Vec<String>>,
        owner: Option<Arc<str>>,
    ) -> Result<crate::Subscription, Error> {
        crate::subscribe::subscribe(&self.inner.subs, sql, options, databases, owner).await
    }

    /// How many internal views serve subscriptions to aggregate (join, window…) queries now,
    /// those in their grace period included (bounded by `Config::max_shared_views`). They are
    /// not user views: `SHOW MATERIALIZED VIEWS` and `system.views` leave them out.
    pub fn subscription_views(&self) -> usize {
        self.inner.subs.shared_view_count()
    }

    /// Waits until every materialized view reflects every write acknowledged so far (queries
    /// do this on their own for the views they read), or fails after `Config::view_wait`.
    pub fn sync_views(&self) -> Result<(), Error> {
        self.inner.check_open()?;
        self.inner.views.sync()
    }

    /// Names of the databases.
    pub fn databases(&self) -> Vec<String> {
        self.inner.engine.catalog().database_names()
    }

    /// Counters for monitoring (buffer sizes are summed over the tables on each call).
    pub fn stats(&self) -> DbStats {
        let engine = &self.inner.engine;
        let (wal_fsyncs, wal_fsync_seconds) = engine.commit.fsync_stats();
        let databases = engine.catalog().databases();
        let mut stats = DbStats {
            last_seq: engine.visible_seq(),
            databases: databases.len(),
            wal_fsyncs,
            wal_fsync_seconds,
            persisted_seq: engine.persisted_seq.load(Ordering::Acquire),
            segments_scanned: self.inner.query.segments_scanned(),
            subscribers: self.inner.subs.subscribers(),
            hot_cache: engine.hot.stats(),
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
        self.inner.engine.visible_seq()
    }

    /// Makes every acknowledged write durable (an fsync in `interval`/`none` modes) and flushes
    /// the catalog.
    pub fn flush(&self) -> Result<(), Error> {
        Ok(self.inner.engine.flush()?)
    }

    /// Writes every buffered row to segments now (normally done in the background, by size and
    /// age, and on close), then trims the WAL. Blocks; call it outside async code or through
    /// `spawn_blocking`.
    pub fn persist(&self) -> Result<PersistReport, Error> {
        self.inner.check_open()?;
        Ok(self.inner.engine.persist()?)
    }

    /// Compacts every time partition with two or more segments into one (normally done in the
    /// background once a partition has `compaction_segments`). Blocks, like [`Db::persist`].
    pub fn compact(&self) -> Result<CompactReport, Error> {
        self.inner.check_open()?;
        Ok(self.inner.engine.compact(2, true)?)
    }

    /// Drops the time partitions that are past their table's retention now (normally done in
    /// the background); returns how many segments it removed.
    pub fn apply_retention(&self) -> Result<usize, Error> {
        self.inner.check_open()?;
        Ok(self.inner.engine.apply_retention()?)
    }

    /// Flushes everything and closes the database. Later writes and queries on any clone fail
    /// with [`Error::Closed`].
    pub fn close(self) -> Result<(), Error> {
        self.inner.shutdown()
    }
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

impl DbInner {
    /// Ends every subscription, lets the views catch up (bounded), then stops their worker.
    fn stop_views(&self) {
        self.subs.close_all();
        self.views.stop();
    }

    pub(crate) fn write_batch(
        &self,
        db: &str,
        table: &str,
        batch: &RecordBatch,
    ) -> Result<WriteReceipt, Error> {
        check_database_name(db).map_err(|e| WriteError::InvalidDatabase(e.to_string()))?;
        self.write(Origin::User, |catalog| {
            prepare_batch(catalog, db, table, batch)
        })
    }

    /// A write through the engine's write path, with `prepare` (ingest) validating it.
    pub(crate) fn write(
        &self,
        origin: Origin,
        prepare: impl FnOnce(&Catalog) -> Result<PreparedWrite, WriteError>,
    ) -> Result<WriteReceipt, Error> {
        let (seq, summary): (u64, WriteSummary) = self.engine.write(origin, |catalog| {
            let (set, summary) = prepare(catalog)?.split();
            Ok::<(WriteSet, WriteSummary), Error>((set, summary))
        })?;
        Ok(WriteReceipt {
            seq,
            rows: summary.rows,
            rejected: summary.rejected,
            rejected_total: summary.rejected_total,
        })
    }

    pub(super) fn check_open(&self) -> Result<(), Error> {
        if self.engine.is_closed() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    fn shutdown(&self) -> Result<(), Error> {
        if !self.engine.begin_close() {
            return Ok(());
        }
        self.threads.stop_maintenance();
        self.stop_views();
        self.engine.seal();
        let closed = self.engine.finish_close();
        self.threads.stop_syncer();
        Ok(closed?)
    }
}

impl Drop for DbInner {
    fn drop(&mut self) {
        if let Err(e) = self.shutdown() {
            tracing::error!(error = %e, "closing the database on drop failed");
        }
    }
}
