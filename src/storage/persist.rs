//! Persistence (the [`Engine`]'s): moving buffered rows into segments (compaction and
//! retention are in `compact.rs`).
//!
//! Persist (numbered as in docs/architecture.md):
//! 1. under the write lock: take sequence `S` (every write up to it is applied), close the WAL
//!    segment, move every table's live chunks to its frozen list;
//! 2. per table and partition: deduplicate and sort the frozen rows (merging in the segments
//!    they may overwrite), write a segment file (fsync file and directory);
//! 3. one atomic manifest commit registers the segments (and unregisters merged ones) with
//!    `persisted_seq = S`, flushed with the catalog;
//! 4. per table, under its buffer lock: the segments replace the frozen chunks;
//! 5. WAL segments holding only writes up to `S` are deleted.
//!
//! A crash before 3 leaves unregistered files (removed on open) and the WAL intact; after 3,
//! replay skips the writes up to `S`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{RecordBatch, UInt32Array};
use arrow::compute::{concat_batches, take_record_batch};

use super::engine::{Engine, StorageError};
use crate::storage::buffer::{Chunk, merge_batches, merge_chunks, time_values, to_table_schema};
use crate::storage::catalog::{ColumnKind, TableSchema};
use crate::storage::last::LastSnapshot;
use crate::storage::layout;
use crate::storage::segment::{
    SEGMENT_FORMAT_VERSION, Segment, SegmentMeta, SegmentWriter, distinct_count, partition_of,
    read_segment, sort_batch,
};
use crate::storage::table::Table;
use crate::storage::wal;

/// What a call to [`Db::persist`](crate::Db::persist) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PersistReport {
    /// Every write up to this sequence is in segments.
    pub persisted_seq: u64,
    /// Rows written to new segments.
    pub rows: u64,
    /// Segment files written.
    pub segments: usize,
    /// WAL segment files deleted.
    pub wal_files_removed: usize,
}

/// What step 1 froze: the persisted sequence, each table's frozen chunks and last-point state.
struct Frozen {
    seq: u64,
    tables: Vec<(Arc<Table>, Vec<Arc<Chunk>>)>,
    last_points: Vec<(Arc<Table>, LastSnapshot)>,
}

/// A table's last-point state encoded for the manifest, to rebase once registered.
type Rebase<'a> = (Arc<Table>, &'a LastSnapshot, RecordBatch, Vec<u32>);

/// The last-point states, stored with the segments (one compact batch per table): the
/// manifest records, and what to rebase the states on once they are registered.
#[allow(clippy::type_complexity)]
fn last_point_records(
    last_points: &[(Arc<Table>, LastSnapshot)],
) -> Result<(Vec<(String, Vec<u8>)>, Vec<Rebase<'_>>), StorageError> {
    let mut extra = Vec::new();
    let mut rebases = Vec::new();
    for (table, snapshot) in last_points {
        if snapshot.is_empty() {
            continue;
        }
        let schema = table.schema();
        let (batch, sids) = snapshot.to_batch(&schema)?;
        extra.push((format!("last/{:016x}", table.id), encode_ipc(&batch)?));
        rebases.push((table.clone(), snapshot, batch, sids));
    }
    Ok((extra, rebases))
}

/// Step 4: each table's frozen chunks give way to its new segments (merged ones are dropped
/// once nobody reads them).
fn install(data_dir: &Path, outputs: Vec<TableOutput>, seq: u64) {
    for out in outputs {
        let segments: Vec<Arc<Segment>> = out
            .added
            .into_iter()
            .map(|m| Arc::new(Segment::new(m, data_dir)))
            .collect();
        let removed_ids: Vec<u64> = out.removed.iter().map(|m| m.id).collect();
        let mut buffer = out.table.buffer.write();
        for s in buffer.segments().iter() {
            if removed_ids.contains(&s.meta.id) {
                s.mark_obsolete();
            }
        }
        buffer.replace_segments(&removed_ids, segments, Some(seq));
    }
}

/// Last-point entries unchanged since the snapshot now point at the compact batch, not at
/// chunks.
fn rebase_last_points(rebases: Vec<Rebase<'_>>, seq: u64) -> Result<(), StorageError> {
    for (table, snapshot, batch, sids) in rebases {
        let (lo, hi) = crate::storage::buffer::min_max(time_values(&batch)?);
        let compact = Arc::new(Chunk {
            seq,
            batch,
            series: sids.clone().into(),
            min_time: lo,
            max_time: hi,
            overlaps: false,
            over_persisted: false,
            merged: true,
        });
        table.last.lock().rebase(snapshot, &compact, &sids);
    }
    Ok(())
}

/// A table's frozen rows after step 2.
struct TableOutput {
    table: Arc<Table>,
    added: Vec<SegmentMeta>,
    removed: Vec<SegmentMeta>,
    /// The rows of each added segment, by id, for the hot-segment cache.
    decoded: Vec<(u64, RecordBatch)>,
}

impl Engine {
    /// Persists every buffered write (see the module docs). Serialized with other persists.
    pub(crate) fn persist(&self) -> Result<PersistReport, StorageError> {
        let _persisting = self.persist_lock.lock();
        self.persist_locked()
    }

    /// The persist itself (see [`Engine::persist_locked`]).
    pub(super) fn persist_unrecorded(&self) -> Result<PersistReport, StorageError> {
        let (Some(manifest), Some(data_dir)) = (&self.manifest, &self.data_dir) else {
            return Ok(PersistReport::default());
        };
        // 1. Freeze.
        let frozen = self.freeze()?;
        let seq = frozen.seq;

        // 2. Write segments; on failure remove what was written (the frozen rows stay frozen
        // and are retried by the next persist).
        let mut written: Vec<PathBuf> = Vec::new();
        let mut report = PersistReport {
            persisted_seq: seq,
            ..PersistReport::default()
        };
        let merges = frozen
            .tables
            .iter()
            .any(|(_, chunks)| chunks.iter().any(|c| c.over_persisted));
        // Merging with existing segments: compaction must not replace them meanwhile.
        let merge_guard = merges.then(|| self.compact_lock.lock());
        let written_out = self
            .write_frozen(data_dir, manifest, &frozen, &mut written)
            .and_then(|outputs| Ok((outputs, last_point_records(&frozen.last_points)?)));
        let (outputs, (extra, rebases)) = match written_out {
            Ok(v) => v,
            Err(e) => {
                remove_files(&written);
                return Err(e);
            }
        };
        for out in &outputs {
            report.rows += out.added.iter().map(|m| m.rows).sum::<u64>();
            report.segments += out.added.len();
        }

        // 3. Register.
        let added: Vec<SegmentMeta> = outputs.iter().flat_map(|o| o.added.clone()).collect();
        let removed: Vec<SegmentMeta> = outputs.iter().flat_map(|o| o.removed.clone()).collect();
        if let Err(e) = manifest.commit(&added, &removed, Some(seq), &extra) {
            // The batch may be applied in sled without being flushed: the files stay (unlisted
            // ones are removed on the next open) and the database stops taking writes, so no
            // second persist can register the same rows again. Reopening sorts it out.
            self.commit
                .poison(format!("the segment manifest could not be updated: {e}"));
            return Err(e.into());
        }

        // 4. Swap frozen chunks for segments (decoded into the hot cache first, so no query
        // finds a new segment missing there).
        for out in &outputs {
            for m in &out.removed {
                self.hot.remove(m.id);
            }
            self.cache_decoded(&out.decoded);
        }
        install(data_dir, outputs, seq);
        drop(merge_guard);
        rebase_last_points(rebases, seq)?;
        self.persisted_seq
            .store(seq, std::sync::atomic::Ordering::Release);

        // 5. Trim the WAL.
        if let Some(wal_dir) = &self.wal_dir {
            report.wal_files_removed =
                wal::remove_segments_through(wal_dir, seq, true).map_err(StorageError::Wal)?;
        }
        self.recount_buffer();
        *self.last_persist.lock() = std::time::Instant::now();
        Ok(report)
    }

    /// Puts just-written segments' rows into the hot-segment cache.
    fn cache_decoded(&self, decoded: &[(u64, RecordBatch)]) {
        if self.config.hot_cache_bytes == 0 {
            return;
        }
        for (id, batch) in decoded {
            self.hot
                .insert(*id, super::hot::HotSegment::new(vec![batch.clone()]));
        }
    }

    /// Step 1, under the write lock: takes sequence `S` (every write up to it is applied),
    /// closes the WAL segment, moves every table's live chunks to its frozen list and takes its
    /// last-point state as of `S`.
    fn freeze(&self) -> Result<Frozen, StorageError> {
        let mut w = self.writer.lock();
        self.commit.check().map_err(StorageError::Wal)?;
        let seq = w.next_seq - 1;
        self.commit.wait(seq).map_err(StorageError::Wal)?;
        if let Some(wal) = &mut w.wal
            && let Err(e) = wal.rotate()
        {
            // A failed fsync: nothing may be reported durable again.
            self.commit.poison(e.to_string());
            return Err(StorageError::Wal(e));
        }
        let mut frozen = Frozen {
            seq,
            tables: Vec::new(),
            last_points: Vec::new(),
        };
        for db in self.catalog().databases() {
            for table in db.tables() {
                // From now on a point at or before a series' latest time may overwrite
                // persisted data (the frozen rows).
                table.series.lock().mark_persisted();
                let chunks = table.buffer.write().freeze();
                if !chunks.is_empty() {
                    // The last-point state exactly as of `seq` (every write up to it is
                    // applied, none after it yet).
                    frozen
                        .last_points
                        .push((table.clone(), table.last.lock().snapshot()));
                    frozen.tables.push((table, chunks));
                }
            }
        }
        Ok(frozen)
    }

    /// Step 2: one table at a time; every file written is listed in `written`.
    fn write_frozen(
        &self,
        data_dir: &Path,
        manifest: &crate::storage::manifest::Manifest,
        frozen: &Frozen,
        written: &mut Vec<PathBuf>,
    ) -> Result<Vec<TableOutput>, StorageError> {
        frozen
            .tables
            .iter()
            .map(|(table, chunks)| {
                self.persist_table(data_dir, manifest, table, chunks, frozen.seq, written)
            })
            .collect()
    }

    /// Step 2 for one table.
    fn persist_table(
        &self,
        data_dir: &Path,
        manifest: &crate::storage::manifest::Manifest,
        table: &Arc<Table>,
        chunks: &[Arc<Chunk>],
        seq: u64,
        written: &mut Vec<PathBuf>,
    ) -> Result<TableOutput, StorageError> {
        let schema = table.schema();
        // Rows that may overwrite each other are deduplicated; rows that may overwrite
        // persisted points are merged with the segments holding them below.
        let may_overwrite = chunks.iter().any(|c| c.over_persisted);
        let rows = if chunks.iter().any(|c| c.overlaps) {
            merge_chunks(&schema, chunks)?.batch
        } else {
            let all: Vec<usize> = (0..schema.columns().len()).collect();
            let batches = chunks
                .iter()
                .map(|c| c.project(&schema, &all, schema.arrow()))
                .collect::<Result<Vec<_>, _>>()?;
            concat_batches(schema.arrow(), &batches)?
        };
        let sort_key = self.ensure_sort_key(table, &schema, &rows)?;
        // What other engines need to read the directory: the columns and sort key its
        // segments are written with.
        layout::write_table_meta(&self.io, data_dir, self.database_id(table)?, table)?;
        let segments = table.buffer.read().segments();
        let len = self.partition_len();
        let mut out = TableOutput {
            table: table.clone(),
            added: Vec::new(),
            removed: Vec::new(),
            decoded: Vec::new(),
        };
        for (partition, mut batch) in split_partitions(&rows, len)? {
            let (lo, hi) = crate::storage::buffer::min_max(time_values(&batch)?);
            if may_overwrite {
                // Points of this write may already be in segments of the partition: merge them in
                // (older first) and replace those segments.
                let old: Vec<&Arc<Segment>> = segments
                    .iter()
                    .filter(|s| s.meta.partition == partition && s.overlaps(lo, hi))
                    .collect();
                if !old.is_empty() {
                    let mut inputs = Vec::new();
                    for s in &old {
                        inputs.extend(read_projected(&s.path, &schema)?);
                        out.removed.push(s.meta.clone());
                    }
                    inputs.push(batch);
                    batch = merge_batches(&schema, &inputs)?;
                }
            }
            let sorted = sort_batch(&batch, &sort_key)?;
            let meta = self.write_segment(
                data_dir,
                manifest,
                table,
                partition,
                seq,
                std::slice::from_ref(&sorted),
                &sort_key,
                written,
            )?;
            out.decoded.push((meta.id, sorted));
            out.added.push(meta);
        }
        Ok(out)
    }

    /// Writes sorted batches as one segment of `partition`.
    #[allow(clippy::too_many_arguments)]
    fn write_segment(
        &self,
        data_dir: &Path,
        manifest: &crate::storage::manifest::Manifest,
        table: &Table,
        partition: i64,
        max_seq: u64,
        batches: &[RecordBatch],
        sort_key: &[Arc<str>],
        written: &mut Vec<PathBuf>,
    ) -> Result<SegmentMeta, StorageError> {
        let (id, rel, path) = self.new_segment_path(data_dir, manifest, table, partition)?;
        // The rows' own schema: a column added since they were read is not in them.
        let schema = batches
            .first()
            .map(|b| b.schema())
            .unwrap_or_else(|| table.schema().arrow().clone());
        let mut writer = SegmentWriter::create(&self.io, &path, &schema, sort_key)?;
        for b in batches {
            writer.write(b)?;
        }
        let finished = writer.finish()?;
        written.push(path);
        Ok(segment_meta(
            id, table.id, partition, max_seq, &rel, finished,
        ))
    }

    /// A fresh segment id and its file: relative to the data directory, and absolute.
    pub(super) fn new_segment_path(
        &self,
        data_dir: &Path,
        manifest: &crate::storage::manifest::Manifest,
        table: &Table,
        partition: i64,
    ) -> Result<(u64, PathBuf, PathBuf), StorageError> {
        let id = manifest.next_id()?;
        let rel = layout::segment_path(
            self.database_id(table)?,
            table.id,
            partition,
            self.partition_len(),
            id,
        );
        let path = data_dir.join(&rel);
        Ok((id, rel, path))
    }

    /// The id of the database `table` belongs to.
    fn database_id(&self, table: &Table) -> Result<u64, StorageError> {
        self.catalog()
            .database(&table.db)
            .map(|db| db.id)
            .ok_or_else(|| {
                crate::storage::segment::SegmentError::Manifest(format!(
                    "table '{}' belongs to database '{}', which the catalog does not have",
                    table.name, table.db
                ))
                .into()
            })
    }

    /// The table's sort key covering every tag column, choosing or extending it (and saving it
    /// in the catalog) when needed.
    fn ensure_sort_key(
        &self,
        table: &Arc<Table>,
        schema: &TableSchema,
        rows: &RecordBatch,
    ) -> Result<Vec<Arc<str>>, StorageError> {
        let current = table.settings.read().sort_key.clone();
        let missing: Vec<&Arc<str>> = schema
            .columns()
            .iter()
            .filter(|c| c.kind == ColumnKind::Tag && !current.contains(&c.name))
            .map(|c| &c.name)
            .collect();
        if missing.is_empty() {
            return Ok(current);
        }
        let mut added: Vec<(usize, &Arc<str>)> = missing
            .into_iter()
            .map(|name| {
                let n = if current.is_empty() {
                    rows.column_by_name(name).map_or(0, distinct_count)
                } else {
                    0 // appended later: by name
                };
                (n, name)
            })
            .collect();
        added.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(b.1)));
        let mut key = current;
        key.extend(added.into_iter().map(|(_, n)| n.clone()));
        // Under the write lock, like every other save of the table record.
        let _w = self.writer.lock();
        table.settings.write().sort_key = key.clone();
        if let Some(db) = self.catalog().database(&table.db) {
            self.catalog().save_table(&db, table)?;
        }
        Ok(key)
    }

    /// Recomputes the buffered bytes after rows left the buffer.
    pub(crate) fn recount_buffer(&self) {
        let mut total = 0;
        for db in self.catalog().databases() {
            for table in db.tables() {
                total += table.buffer.read().size().1;
            }
        }
        self.commit
            .buffer_bytes
            .store(total, std::sync::atomic::Ordering::Relaxed);
    }
}

/// The manifest record of a finished segment file (`finished` as `SegmentWriter::finish`
/// returns it: rows, min time, max time, bytes).
pub(super) fn segment_meta(
    id: u64,
    table_id: u64,
    partition: i64,
    max_seq: u64,
    rel: &Path,
    (rows, min_time, max_time, bytes): (u64, i64, i64, u64),
) -> SegmentMeta {
    SegmentMeta {
        id,
        table_id,
        partition,
        min_time,
        max_time,
        rows,
        bytes,
        max_seq,
        path: rel.to_string_lossy().into_owned(),
        format: SEGMENT_FORMAT_VERSION,
    }
}

/// Reads a segment projected onto the table schema (columns it lacks are null).
fn read_projected(path: &Path, schema: &TableSchema) -> Result<Vec<RecordBatch>, StorageError> {
    read_segment(path)?
        .iter()
        .map(|batch| Ok(to_table_schema(batch, schema)?))
        .collect()
}

/// Splits rows by time partition.
fn split_partitions(rows: &RecordBatch, len: i64) -> Result<Vec<(i64, RecordBatch)>, StorageError> {
    let times = time_values(rows)?;
    let (lo, hi) = crate::storage::buffer::min_max(times);
    if rows.num_rows() == 0 {
        return Ok(Vec::new());
    }
    if partition_of(lo, len) == partition_of(hi, len) {
        return Ok(vec![(partition_of(lo, len), rows.clone())]);
    }
    let mut groups: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for (i, &t) in times.iter().enumerate() {
        groups
            .entry(partition_of(t, len))
            .or_default()
            .push(i as u32);
    }
    groups
        .into_iter()
        .map(|(p, idx)| Ok((p, take_record_batch(rows, &UInt32Array::from(idx))?)))
        .collect()
}

/// One batch as an Arrow IPC stream.
pub(crate) fn encode_ipc(batch: &RecordBatch) -> Result<Vec<u8>, StorageError> {
    let mut out = Vec::new();
    {
        let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, &batch.schema())?;
        w.write(batch)?;
        w.finish()?;
    }
    Ok(out)
}

/// The batches of an Arrow IPC stream.
pub(crate) fn decode_ipc(bytes: &[u8]) -> Result<Vec<RecordBatch>, StorageError> {
    let reader = arrow::ipc::reader::StreamReader::try_new(bytes, None)?;
    Ok(reader.collect::<Result<Vec<_>, _>>()?)
}

fn remove_files(paths: &[PathBuf]) {
    for p in paths {
        let _ = std::fs::remove_file(p);
    }
}
