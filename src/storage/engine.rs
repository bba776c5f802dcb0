//! The storage engine: one data directory (or memory) with its catalog, WAL, buffers, segments
//! and manifest, behind a narrow API the layers above use.
//!
//! - **write** ([`Engine::write`]): validate (the caller's `prepare`, under the write lock),
//!   log, publish, group commit; returns the write's sequence;
//! - **read**: [`Engine::visible_seq`] fixes what a query sees; tables hand out snapshots of
//!   their buffers and segments ([`super::table::Table`]);
//! - **observe**: [`ApplyObserver`]s are told of every applied write (view maintenance, table
//!   change logs) and may hold writers back while they catch up ([`ApplyObserver::admit`]);
//! - **persist, compact, expire** (storage/persist.rs), in the background or when told.
//!
//! Open order ([`Engine::open`], docs/architecture.md §7): lock the directory, load the
//! catalog, bring the layout up to date, load the segments (removing unlisted files), replay
//! the WAL, trim it, and start a new WAL segment.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use arrow::array::RecordBatch;
use parking_lot::Mutex;

use super::buffer::Chunk;
use super::catalog::{Catalog, CatalogError, ColumnDef, Database, check_database_name};
use super::commit::{ApplyObserver, CommitQueue, PendingApply};
use super::io::Io;
use super::manifest::Manifest;
use super::segment::SegmentError;
use super::table::Table;
use super::wal::{self, ReplayReport, WalError, WalWriter};
use crate::config::{Config, Durability};

/// Errors of the storage engine.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StorageError {
    /// Writing, syncing or rotating the WAL failed, or an earlier failure poisoned it.
    #[error(transparent)]
    Wal(WalError),
    /// The WAL could not be replayed on open.
    #[error(transparent)]
    Replay(WalError),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A segment file, the manifest or the directory layout failed.
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// A file-system operation failed.
    #[error("{op} {path} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process has the data directory open.
    #[error("data directory {0} is in use by another process")]
    Locked(PathBuf),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Compaction's merge of segment files failed.
    #[error("merging segments failed: {0}")]
    Merge(#[from] datafusion::error::DataFusionError),
    /// The engine is closed (or closing) to this kind of write.
    #[error("the database is closed")]
    Closed,
    /// The write buffer is full and the last persist failed: writes are refused (without
    /// retrying the persist on each) until a persist succeeds.
    #[error("{0}")]
    Full(String),
    /// A database the operation names does not exist.
    #[error("database '{0}' not found")]
    DatabaseNotFound(String),
    /// A table the operation names does not exist.
    #[error("table '{table}' not found in database '{db}'")]
    TableNotFound {
        /// The database.
        db: String,
        /// The table.
        table: String,
    },
}

/// After a failed persist, writes that need the buffer persisted are refused this long before
/// one of them tries again.
const PERSIST_RETRY: std::time::Duration = std::time::Duration::from_secs(1);

impl From<arrow::error::ArrowError> for StorageError {
    fn from(e: arrow::error::ArrowError) -> StorageError {
        StorageError::Segment(SegmentError::Arrow(e))
    }
}

impl StorageError {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> StorageError {
        StorageError::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}

/// One table's part of a prepared write: the chunk to append and the catalog changes it needs.
pub(crate) struct PreparedTable {
    pub(crate) table: Arc<Table>,
    /// The table is not in the catalog yet.
    pub(crate) is_new: bool,
    /// Columns this write adds to the table.
    pub(crate) new_columns: Vec<ColumnDef>,
    pub(crate) chunk: Chunk,
    /// What the write did to the table's series index, undone if the write is not logged.
    pub(crate) series_undo: Option<super::table::SeriesUndo>,
}

impl WriteSet {
    /// Undoes what the write did to its tables' series indexes (it was not logged).
    pub(crate) fn rollback_series(mut self) {
        for t in &mut self.tables {
            if let Some(undo) = t.series_undo.take() {
                t.table.series.lock().rollback(undo);
            }
        }
    }
}

/// The storage part of a validated write: what [`Engine::write`] logs and applies.
pub(crate) struct WriteSet {
    pub(crate) db_name: Arc<str>,
    /// None when the database does not exist yet.
    pub(crate) db: Option<Arc<Database>>,
    pub(crate) tables: Vec<PreparedTable>,
}

/// Who writes: users stop at close; the system (view maintenance) goes on until close has let
/// the views catch up, and is never held back by [`ApplyObserver::admit`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Origin {
    User,
    System,
}

/// Turns one replayed WAL table entry into a prepared table (validated against the catalog).
pub(crate) type ReplayPrepare<'a> =
    &'a dyn Fn(
        &Catalog,
        &str,
        &str,
        &RecordBatch,
    ) -> Result<WriteSet, Box<dyn std::error::Error + Send + Sync>>;

/// The single writer's state, behind the write lock.
pub(super) struct Writer {
    pub(super) wal: Option<WalWriter>,
    pub(super) next_seq: u64,
}

/// The storage engine of one data directory (or of memory).
pub(crate) struct Engine {
    pub(crate) config: Config,
    catalog: Catalog,
    pub(super) writer: Mutex<Writer>,
    pub(crate) commit: CommitQueue,
    /// Segment manifest and absolute data directory (None in memory).
    pub(crate) manifest: Option<Manifest>,
    pub(crate) data_dir: Option<PathBuf>,
    pub(crate) wal_dir: Option<PathBuf>,
    /// One persist at a time.
    pub(crate) persist_lock: Mutex<()>,
    /// When the last persist failed, and why (cleared by one that succeeds).
    pub(crate) persist_failed: Mutex<Option<(std::time::Instant, String)>>,
    /// Held while the segment set of a partition is being replaced (compaction, retention, a
    /// persist that merges with existing segments, dropping a table).
    pub(crate) compact_lock: Mutex<()>,
    pub(crate) persisted_seq: AtomicU64,
    pub(crate) last_persist: Mutex<std::time::Instant>,
    /// DataFusion's runtime for compaction's merge (it reads segments through the store
    /// rooted at the data directory).
    pub(crate) runtime: Arc<datafusion::execution::runtime_env::RuntimeEnv>,
    /// The storage I/O seam (fault hook).
    pub(crate) io: Io,
    /// Recently persisted segments, decoded.
    pub(crate) hot: Arc<super::hot::HotSegments>,
    replay: ReplayReport,
    /// User writes are refused (close has begun).
    closed: AtomicBool,
    /// Every write is refused (close has let the views catch up).
    sealed: AtomicBool,
    /// Holds the data directory's lock for the life of the engine.
    _dir_lock: Option<File>,
}

impl std::fmt::Debug for Engine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Engine")
            .field("data_dir", &self.data_dir)
            .finish_non_exhaustive()
    }
}

impl Engine {
    /// Opens the data directory of `config` (or memory): see the module docs for the order.
    /// `prepare` validates each replayed WAL entry against the catalog (the ingest layer's
    /// rules), so the storage layer replays exactly what a write would have applied.
    pub(crate) fn open(config: Config, prepare: ReplayPrepare<'_>) -> Result<Engine, StorageError> {
        check_database_name(&config.default_database)
            .map_err(|e| StorageError::Config(e.to_string()))?;
        if config.durability == Durability::Interval(std::time::Duration::ZERO) {
            return Err(StorageError::Config(
                "the interval of interval durability must be above zero".to_string(),
            ));
        }
        let mut config = config;
        if let Some(dir) = &config.data_dir {
            std::fs::create_dir_all(dir).map_err(|e| StorageError::io("creating", dir, e))?;
            // The object store DataFusion reads segments through is rooted at the absolute path.
            config.data_dir = Some(
                std::fs::canonicalize(dir).map_err(|e| StorageError::io("resolving", dir, e))?,
            );
        }
        let (sled, dir_lock, wal_dir) = match &config.data_dir {
            Some(dir) => {
                let lock = super::open::lock_directory(dir)?;
                let wal_dir = dir.join("wal");
                std::fs::create_dir_all(&wal_dir)
                    .map_err(|e| StorageError::io("creating", &wal_dir, e))?;
                let sled = super::open::open_sled(&dir.join("catalog"))?;
                (sled, Some(lock), Some(wal_dir))
            }
            None => {
                let sled = sled::Config::new()
                    .temporary(true)
                    .open()
                    .map_err(CatalogError::from)?;
                (sled, None, None)
            }
        };
        let io = Io::new(config.io_faults.clone());
        let catalog = Catalog::load(sled, io.clone())?.with_limits(super::catalog::Limits {
            databases: config.max_databases,
            tables_per_database: config.max_tables_per_database,
            columns_per_table: config.max_columns_per_table,
            series_per_table: config.max_series_per_table,
        });
        let partition_len = (config.partition.as_nanos() as i64).max(1);

        // Load the segments, remove files the manifest does not list.
        let mut persisted_seq = 0;
        let manifest = match &config.data_dir {
            Some(dir) => {
                let manifest = Manifest::open(catalog.sled(), io.clone())?;
                manifest.check_partition(partition_len)?;
                super::layout::migrate(&io, dir, &catalog, &manifest, partition_len)?;
                persisted_seq = super::open::load_segments(&catalog, &manifest, dir)?;
                Some(manifest)
            }
            None => None,
        };

        // Replay the WAL into the buffers (writes already in segments are skipped).
        let mut replay = ReplayReport::default();
        if let Some(wal_dir) = &wal_dir {
            replay = wal::replay(wal_dir, config.wal_recovery, &io, |payload| {
                super::open::replay_record(&catalog, payload, persisted_seq, prepare)
            })
            .map_err(StorageError::Replay)?;
            if let Some((path, offset, reason)) = &replay.truncated_tail {
                tracing::warn!(
                    path = %path.display(), offset, reason,
                    "WAL ended in a torn or corrupt record (a crash mid-write); it was cut off"
                );
            }
            // WAL files wholly persisted before a crash cut the previous trim short.
            let all_persisted = replay.last_seq.is_none_or(|last| last <= persisted_seq);
            wal::remove_segments_through(wal_dir, persisted_seq, all_persisted)
                .map_err(StorageError::Replay)?;
        }
        let next_seq = replay
            .last_seq
            .map_or(1, |s| s + 1)
            .max(catalog.stored_next_seq()?)
            .max(persisted_seq + 1);
        let wal = wal_dir
            .as_ref()
            .map(|dir| WalWriter::new(dir, config.wal_segment_bytes, io.clone()));
        let commit = CommitQueue::new(next_seq - 1, config.durability, io.clone());
        let runtime = super::open::compaction_runtime(config.data_dir.as_deref())?;
        Ok(Engine {
            catalog,
            writer: Mutex::new(Writer { wal, next_seq }),
            commit,
            manifest,
            data_dir: config.data_dir.clone(),
            wal_dir,
            persist_lock: Mutex::new(()),
            persist_failed: Mutex::new(None),
            compact_lock: Mutex::new(()),
            persisted_seq: AtomicU64::new(persisted_seq),
            last_persist: Mutex::new(std::time::Instant::now()),
            runtime,
            io,
            hot: Arc::new(super::hot::HotSegments::new(config.hot_cache_bytes)),
            replay,
            closed: AtomicBool::new(false),
            sealed: AtomicBool::new(false),
            _dir_lock: dir_lock,
            config,
        })
    }

    /// The catalog (databases, tables, their schemas and settings).
    pub(crate) fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// What WAL replay found at open.
    pub(crate) fn replay_report(&self) -> &ReplayReport {
        &self.replay
    }

    /// Adds an observer told of every applied write (held weakly: the caller keeps it alive).
    pub(crate) fn add_observer(&self, observer: &Arc<dyn ApplyObserver>) {
        self.commit.add_observer(Arc::downgrade(observer));
    }

    /// Every write up to this sequence is applied to all its tables (what a query reading now
    /// sees).
    pub(crate) fn visible_seq(&self) -> u64 {
        self.commit.applied_seq()
    }

    /// Length of a time partition, in nanoseconds.
    pub(crate) fn partition_len(&self) -> i64 {
        (self.config.partition.as_nanos() as i64).max(1)
    }

    /// The table with id `id`, in any database.
    pub(crate) fn table_by_id(&self, id: u64) -> Option<Arc<Table>> {
        self.catalog
            .databases()
            .iter()
            .flat_map(|d| d.tables())
            .find(|t| t.id == id)
    }

    /// From now on user writes are refused ([`Origin::User`]); system writes go on.
    pub(crate) fn begin_close(&self) -> bool {
        !self.closed.swap(true, Ordering::AcqRel)
    }

    /// Whether [`Engine::begin_close`] was called.
    pub(crate) fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// From now on every write is refused.
    pub(crate) fn seal(&self) {
        self.sealed.store(true, Ordering::Release);
    }

    fn check_origin(&self, origin: Origin) -> Result<(), StorageError> {
        let flag = match origin {
            Origin::User => &self.closed,
            Origin::System => &self.sealed,
        };
        if flag.load(Ordering::Acquire) {
            return Err(StorageError::Closed);
        }
        Ok(())
    }

    /// The write path: admission (observers may hold a user write back while they catch up),
    /// then under the write lock `prepare` against the catalog, append the WAL record, publish
    /// the catalog changes and enqueue the chunks; then wait for group commit. Returns the
    /// write's sequence (for a write that stores nothing, the latest sequence) and what
    /// `prepare` returned beside the write set.
    pub(crate) fn write<T, E: From<StorageError>>(
        &self,
        origin: Origin,
        prepare: impl FnOnce(&Catalog) -> Result<(WriteSet, T), E>,
    ) -> Result<(u64, T), E> {
        self.check_origin(origin)?;
        if origin == Origin::User {
            self.commit.admit();
        }
        self.make_room()?;
        let mut w = self.writer.lock();
        // Checked under the lock: a failed append must stop every later writer, and nothing may
        // be appended after close has synced the log.
        self.check_origin(origin)?;
        self.commit.check().map_err(StorageError::Wal)?;
        let (set, extra) = prepare(&self.catalog)?;
        if set.tables.is_empty() {
            return Ok((w.next_seq - 1, extra));
        }
        let seq = w.next_seq;
        if let Some(wal) = &mut w.wal {
            let tables: Vec<(&str, &RecordBatch)> = set
                .tables
                .iter()
                .map(|t| (t.table.name.as_ref(), &t.chunk.batch))
                .collect();
            let db_name = set.db_name.clone();
            if let Err(e) = wal.append(seq, |buf| wal::encode_write(seq, &db_name, &tables, buf)) {
                if matches!(e, WalError::Io { .. }) {
                    self.commit.poison(e.to_string());
                }
                set.rollback_series();
                return Err(StorageError::Wal(e).into());
            }
        }
        w.next_seq += 1;
        let chunks = match publish(&self.catalog, set, seq) {
            Ok(c) => c,
            Err(e) => {
                // The record is in the WAL but the catalog could not take it: stop here, and
                // let a reopen replay it.
                self.commit.poison(e.to_string());
                return Err(StorageError::Catalog(e).into());
            }
        };
        self.commit
            .enqueue(PendingApply { seq, chunks }, w.wal.as_ref());
        drop(w);
        self.commit.wait(seq).map_err(StorageError::Wal)?;
        Ok((seq, extra))
    }

    /// Runs `f` under the write lock, so no write changes the catalog meanwhile (the writer
    /// saves table records too). `f` must not do file I/O beyond sled's in-memory inserts;
    /// flush afterwards with [`Catalog::flush`].
    pub(crate) fn with_write_lock<R>(&self, f: impl FnOnce(&Catalog) -> R) -> R {
        let _w = self.writer.lock();
        f(&self.catalog)
    }

    /// Sets the retention of `db.table` (None: keep forever) and makes it durable.
    pub(crate) fn set_retention(
        &self,
        db: &str,
        table: &str,
        retention: Option<i64>,
    ) -> Result<(), StorageError> {
        let database = self
            .catalog
            .database(db)
            .ok_or_else(|| StorageError::DatabaseNotFound(db.to_string()))?;
        let t = database
            .table(table)
            .ok_or_else(|| StorageError::TableNotFound {
                db: db.to_string(),
                table: table.to_string(),
            })?;
        self.with_write_lock(|catalog| {
            t.settings.write().retention = retention;
            catalog.save_table(&database, &t)
        })?;
        self.catalog.flush()?;
        Ok(())
    }

    /// Creates table `name` in `db` with `columns` (a materialized view's storage table, whose
    /// rows replace whole) and, in the same catalog flush, whatever `also` stores; fails if the
    /// name is taken.
    pub(crate) fn create_view_table(
        &self,
        database: &Arc<Database>,
        name: &str,
        columns: Vec<ColumnDef>,
        retention: Option<i64>,
        also: impl FnOnce(&Catalog) -> Result<(), CatalogError>,
    ) -> Result<Option<Arc<Table>>, StorageError> {
        let table = self.with_write_lock(|catalog| {
            if database.table(name).is_some() {
                return Ok(None);
            }
            let table = Arc::new(Table::new(
                catalog.allocate_id(),
                database.name.clone(),
                name.into(),
                super::catalog::TableSchema::new(columns).whole_rows(true),
            ));
            {
                let mut s = table.settings.write();
                s.view = true;
                s.retention = retention;
            }
            catalog.save_table(database, &table)?;
            also(catalog)?;
            Ok::<_, CatalogError>(Some(table))
        })?;
        self.catalog.flush()?;
        Ok(table)
    }

    /// Drops `table` of `db` and its data: everything the WAL holds goes to segments first (so
    /// a replay never re-creates it), then its segments leave the manifest, then the catalog
    /// forgets it (with whatever `also` removes, in the same flush).
    pub(crate) fn drop_table(
        &self,
        db: &str,
        table: &Arc<Table>,
        also: impl FnOnce(&Catalog) -> Result<(), CatalogError>,
    ) -> Result<(), StorageError> {
        if self.manifest.is_some() {
            self.persist()?;
        }
        let database = self
            .catalog
            .database(db)
            .ok_or_else(|| StorageError::DatabaseNotFound(db.to_string()))?;
        let segments = table.buffer.read().segments();
        if let Some(manifest) = &self.manifest {
            let _compacting = self.compact_lock.lock();
            let metas: Vec<_> = segments.iter().map(|s| s.meta.clone()).collect();
            if !metas.is_empty() {
                manifest.commit(&[], &metas, None, &[])?;
            }
            for s in segments.iter() {
                s.mark_obsolete();
                self.hot.remove(s.meta.id);
            }
        }
        self.with_write_lock(|catalog| {
            catalog.drop_table(&database, &table.name)?;
            also(catalog)
        })?;
        self.catalog.flush()?;
        if let Some(dir) = &self.data_dir {
            super::layout::remove_table_meta(dir, database.id, table.id);
        }
        Ok(())
    }

    /// Past the buffer cap, a writer persists (or waits for the persist under way) first.
    fn make_room(&self) -> Result<(), StorageError> {
        if self.manifest.is_none() || self.buffered_bytes() <= self.config.max_buffer_bytes {
            return Ok(());
        }
        let full = |why: &str| {
            StorageError::Full(format!(
                "the write buffer holds {} bytes, over its limit of {} (Config::max_buffer_bytes), \
                 and persisting it to segments failed: {why}. Writes are refused until a persist \
                 succeeds (retried at most every {} s); queries are still answered",
                self.buffered_bytes(),
                self.config.max_buffer_bytes,
                PERSIST_RETRY.as_secs()
            ))
        };
        // While the last persist failed recently (a full disk), refuse at once rather than
        // make every write retry a whole persist.
        if let Some((at, why)) = &*self.persist_failed.lock()
            && at.elapsed() < PERSIST_RETRY
        {
            return Err(full(why));
        }
        let _persisting = self.persist_lock.lock();
        if self.buffered_bytes() > self.config.max_buffer_bytes
            && let Err(e) = self.persist_locked()
        {
            return Err(full(&e.to_string()));
        }
        Ok(())
    }

    /// [`persist`](Self::persist) with the persist lock held; records its failure (what
    /// writes are refused with while the buffer is full) or clears it.
    pub(crate) fn persist_locked(&self) -> Result<super::persist::PersistReport, StorageError> {
        let result = self.persist_unrecorded();
        *self.persist_failed.lock() = match &result {
            Ok(_) => None,
            Err(e) => Some((std::time::Instant::now(), e.to_string())),
        };
        result
    }

    pub(crate) fn buffered_bytes(&self) -> usize {
        self.commit.buffer_bytes.load(Ordering::Relaxed)
    }

    /// Makes every acknowledged write durable (an fsync in `interval`/`none` modes), records
    /// the next sequence and flushes the catalog.
    pub(crate) fn flush(&self) -> Result<(), StorageError> {
        let w = self.writer.lock();
        // After a failed fsync nothing may be reported durable again (no retry-and-ack).
        self.commit.check().map_err(StorageError::Wal)?;
        if w.wal.is_some() {
            self.commit.sync_now().map_err(StorageError::Wal)?;
        }
        self.catalog.store_next_seq(w.next_seq)?;
        drop(w);
        self.catalog.flush()?;
        Ok(())
    }

    /// The last step of close (after [`Engine::seal`]): persist the buffer if configured, then
    /// flush. A failed persist leaves everything in the WAL and is reported after the flush.
    pub(crate) fn finish_close(&self) -> Result<(), StorageError> {
        let persisted = if self.config.persist_on_close
            && self.manifest.is_some()
            && self.commit.check().is_ok()
        {
            self.persist().map(|_| ())
        } else {
            Ok(())
        };
        if let Err(e) = &persisted {
            tracing::error!(error = %e, "persisting on close failed; the WAL keeps the data");
        }
        self.flush()?;
        persisted
    }

    /// One round of background work: persist if the buffer is big or old, compact, expire.
    pub(crate) fn background_step(&self) -> Result<(), StorageError> {
        if self.is_closed() || self.commit.check().is_err() {
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

pub(super) type SequencedChunks = Vec<(Arc<Table>, Arc<Chunk>)>;

/// Publishes a prepared write's catalog changes and stamps its chunks with `seq`.
pub(super) fn publish(
    catalog: &Catalog,
    set: WriteSet,
    seq: u64,
) -> Result<SequencedChunks, CatalogError> {
    let db = match set.db {
        Some(db) => db,
        None => catalog.ensure_database(&set.db_name)?,
    };
    let mut out = Vec::with_capacity(set.tables.len());
    for t in set.tables {
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
