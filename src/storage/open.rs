//! Opening a data directory: its lock, the catalog's sled database, the segments the
//! manifest lists (files it does not list are removed) and WAL replay into the buffers.
//! [`super::engine::Engine::open`] runs these in order (docs/architecture.md §7).

use std::fs::File;
use std::path::Path;
use std::sync::Arc;

use super::catalog::{Catalog, CatalogError};
use super::engine::{ReplayPrepare, StorageError, publish};
use super::manifest::Manifest;
use super::segment::{Segment, SegmentError};
use super::wal::{self, WalError};

/// Takes the data directory's exclusive lock (`LOCK`, an OS advisory lock).
pub(super) fn lock_directory(dir: &Path) -> Result<File, StorageError> {
    let lock_path = dir.join("LOCK");
    let lock = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|e| StorageError::io("opening", &lock_path, e))?;
    match lock.try_lock() {
        Ok(()) => Ok(lock),
        Err(std::fs::TryLockError::WouldBlock) => Err(StorageError::Locked(dir.to_path_buf())),
        Err(std::fs::TryLockError::Error(e)) => Err(StorageError::io("locking", &lock_path, e)),
    }
}

/// Opens the catalog's sled database. Our own `LOCK` file already excludes other processes, so
/// a busy sled lock can only be a previous handle of this process whose background threads are
/// still letting go of it (sled releases its lock asynchronously): retry for a moment.
pub(super) fn open_sled(path: &Path) -> Result<sled::Db, StorageError> {
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
            Err(e) => return Err(CatalogError::from(e).into()),
        }
    }
}

/// The DataFusion runtime compaction runs its merge in.
pub(super) fn compaction_runtime(
    data_dir: Option<&Path>,
) -> Result<Arc<datafusion::execution::runtime_env::RuntimeEnv>, StorageError> {
    let runtime = datafusion::execution::runtime_env::RuntimeEnvBuilder::new()
        .build_arc()
        .map_err(|e| SegmentError::Layout(format!("compaction runtime: {e}")))?;
    if let Some(dir) = data_dir {
        super::layout::register_store(&runtime, dir)?;
    }
    Ok(runtime)
}

/// Loads the manifest into the tables' segment lists, raises each table's series floor to its
/// latest persisted time, and removes unlisted files. Returns the persisted sequence.
pub(super) fn load_segments(
    catalog: &Catalog,
    manifest: &Manifest,
    dir: &Path,
) -> Result<u64, StorageError> {
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
            return Err(SegmentError::Manifest(format!(
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
            return Err(SegmentError::Manifest(format!(
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
        for batch in super::persist::decode_ipc(&bytes)? {
            let projected = super::buffer::to_table_schema(&batch, &schema)?;
            last.load(&schema, projected, &mut series)?;
        }
    }
    let table_dirs = catalog
        .databases()
        .iter()
        .flat_map(|db| {
            db.tables()
                .into_iter()
                .map(|t| super::layout::table_dir(db.id, t.id))
                .collect::<Vec<_>>()
        })
        .collect();
    super::layout::remove_unlisted(dir, &known, &table_dirs)?;
    Ok(persisted_seq)
}

/// Applies one replayed WAL record: re-creates missing catalog entries and fills the buffers.
pub(super) fn replay_record(
    catalog: &Catalog,
    payload: &[u8],
    persisted_seq: u64,
    prepare: ReplayPrepare<'_>,
) -> Result<u64, WalError> {
    let seq = u64::from_le_bytes(payload[..8].try_into().unwrap_or([0; 8]));
    if seq <= persisted_seq {
        // Already in segments.
        return Ok(seq);
    }
    let record = wal::decode_write(payload)?;
    let seq = record.seq;
    let fail = |source: Box<dyn std::error::Error + Send + Sync>| WalError::Replay { seq, source };
    for (table, batch) in &record.tables {
        let prepared = prepare(catalog, &record.db, table, batch).map_err(fail)?;
        let chunks = publish(catalog, prepared, seq).map_err(|e| fail(Box::new(e)))?;
        for (table, chunk) in chunks {
            table.apply(chunk);
        }
    }
    Ok(seq)
}
