//! The mutable buffer: each table's recent rows as immutable Arrow chunks, one per write.
//!
//! A chunk holds only the columns its write carried; readers project it onto the table schema,
//! filling absent columns with nulls. Chunks are kept in sequence order, so "later write wins"
//! is "later row wins". When a chunk may overwrite earlier points (its series saw that time
//! before), the next reader merges the chunks into one deduplicated chunk and installs it in
//! place of the ones it merged, so the work is done once, not per query.

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, RecordBatch, RecordBatchOptions, UInt32Array, new_null_array};
use arrow::compute::{concat_batches, take};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::error::ArrowError;

use super::catalog::{ColumnKind, TIME_COLUMN, TableSchema};
use super::segment::Segment;

/// The rows of one write to one table.
#[derive(Debug)]
pub(crate) struct Chunk {
    /// Sequence of the write (for a merged chunk, the newest write it holds).
    pub seq: u64,
    /// `time` plus the columns the write carried.
    pub batch: RecordBatch,
    /// Series id of each row.
    pub series: Arc<[u32]>,
    /// Smallest time in the chunk.
    pub min_time: i64,
    /// Largest time in the chunk.
    pub max_time: i64,
    /// Some row may overwrite an earlier point (same series and time), in the buffer or in
    /// segments.
    pub overlaps: bool,
    /// Some row may overwrite a point that is in segments or being persisted (so reads and the
    /// next persist must merge with segments).
    pub over_persisted: bool,
    /// Already deduplicated against the buffer chunks it was merged from.
    pub merged: bool,
}

impl Chunk {
    /// Number of rows.
    pub(crate) fn rows(&self) -> usize {
        self.batch.num_rows()
    }

    /// Projects the chunk onto `columns` of `schema` (by name), with nulls for absent columns.
    pub(crate) fn project(
        &self,
        schema: &TableSchema,
        columns: &[usize],
        out_schema: &SchemaRef,
    ) -> Result<RecordBatch, ArrowError> {
        project_batch(&self.batch, schema, columns, out_schema)
    }
}

/// Projects `batch` onto `columns` of `schema` (by name), with nulls for absent columns.
pub(crate) fn project_batch(
    batch: &RecordBatch,
    schema: &TableSchema,
    columns: &[usize],
    out_schema: &SchemaRef,
) -> Result<RecordBatch, ArrowError> {
    let rows = batch.num_rows();
    let arrays: Vec<ArrayRef> = columns
        .iter()
        .map(|&i| {
            let def = &schema.columns()[i];
            match batch.column_by_name(&def.name) {
                Some(a) => a.clone(),
                None => new_null_array(&def.kind.data_type(), rows),
            }
        })
        .collect();
    RecordBatch::try_new_with_options(
        out_schema.clone(),
        arrays,
        &RecordBatchOptions::new().with_row_count(Some(rows)),
    )
}

/// `batch` in the whole table schema (columns it lacks are null).
pub(crate) fn to_table_schema(
    batch: &RecordBatch,
    schema: &TableSchema,
) -> Result<RecordBatch, ArrowError> {
    let all: Vec<usize> = (0..schema.columns().len()).collect();
    project_batch(batch, schema, &all, schema.arrow())
}

/// The raw nanosecond values of a batch's `time` column.
pub(crate) fn time_values(batch: &RecordBatch) -> Result<&[i64], ArrowError> {
    let col = batch
        .column_by_name(TIME_COLUMN)
        .ok_or_else(|| ArrowError::SchemaError("chunk has no time column".to_string()))?;
    col.as_any()
        .downcast_ref::<arrow::array::TimestampNanosecondArray>()
        .map(|a| a.values().as_ref())
        .ok_or_else(|| ArrowError::SchemaError("time column is not Timestamp(ns)".to_string()))
}

/// A table's rows: segments, then chunks being persisted (frozen), then live chunks. Changed
/// under one lock, so a reader's snapshot never misses or doubles rows moving to segments.
#[derive(Debug, Default)]
pub(crate) struct TableBuffer {
    chunks: Vec<Arc<Chunk>>,
    frozen: Vec<Arc<Chunk>>,
    /// Persisted segments, sorted by (partition, min time).
    segments: Arc<[Arc<Segment>]>,
    /// The table as it was before the last persist swapped its frozen chunks for segments.
    before: Option<Before>,
}

/// How long the pre-persist state is kept: longer than a query takes to plan.
const BEFORE_KEEP: std::time::Duration = std::time::Duration::from_secs(30);

/// What a query that reads up to a sequence older than the last persist sees instead of its
/// segments (which hold writes the query must not see). Kept until the next persist.
#[derive(Debug, Clone)]
pub(crate) struct Before {
    /// The persist's sequence.
    seq: u64,
    /// When it was set aside: dropped after [`BEFORE_KEEP`], since only queries planned before
    /// the persist (and still being planned) read it.
    at: std::time::Instant,
    frozen: Vec<Arc<Chunk>>,
    segments: Arc<[Arc<Segment>]>,
}

/// What a reader took from a table.
#[derive(Debug, Clone)]
pub(crate) struct BufferSnapshot {
    /// Live chunks in sequence order.
    pub chunks: Vec<Arc<Chunk>>,
    /// Chunks being persisted, in sequence order (older than every live chunk).
    pub frozen: Vec<Arc<Chunk>>,
    /// Segments (older than every chunk).
    pub segments: Arc<[Arc<Segment>]>,
    before: Option<Before>,
}

impl BufferSnapshot {
    /// Keeps only chunks of writes up to `seq` (chunks are in sequence order). With one `seq`
    /// per query, a query never sees part of a write that touches several tables.
    pub(crate) fn up_to(mut self, seq: u64) -> BufferSnapshot {
        if let Some(before) = self.before.take()
            && seq < before.seq
        {
            // A persist finished after this query's sequence was taken: its segments hold later
            // writes, so read the table as it was before it (each table alike, so a write to
            // several tables is still seen whole or not at all).
            self.segments = before.segments;
            self.frozen = before.frozen;
        }
        // A merged chunk carries the newest write it holds and may also hold writes up to `seq`:
        // it is kept (showing, in that rare race, writes newer than `seq`) rather than losing
        // the older rows it holds.
        let keep = |c: &Arc<Chunk>| c.seq <= seq || c.merged;
        let n = self.chunks.iter().take_while(|c| keep(c)).count();
        self.chunks.truncate(n);
        let n = self.frozen.iter().take_while(|c| keep(c)).count();
        self.frozen.truncate(n);
        self
    }

    /// True when live chunks may hold points that overwrite each other.
    pub(crate) fn needs_dedup(&self) -> bool {
        self.chunks.iter().any(|c| c.overlaps && !c.merged)
    }
}

impl TableBuffer {
    /// Moves every live chunk to the frozen list (the persister then writes the frozen list to
    /// segments); returns the frozen chunks.
    pub(crate) fn freeze(&mut self) -> Vec<Arc<Chunk>> {
        self.frozen.append(&mut self.chunks);
        self.frozen.clone()
    }

    /// Drops the pre-persist state once no query can still need it, freeing its chunks (and
    /// letting replaced segment files go).
    pub(crate) fn expire_before(&mut self) {
        if self
            .before
            .as_ref()
            .is_some_and(|b| b.at.elapsed() >= BEFORE_KEEP)
        {
            self.before = None;
        }
    }

    /// The sequence of the newest write the table holds (0: none).
    pub(crate) fn latest_seq(&self) -> u64 {
        let chunks = self.chunks.iter().chain(&self.frozen).map(|c| c.seq);
        let segments = self.segments.iter().map(|s| s.meta.max_seq);
        chunks.chain(segments).max().unwrap_or(0)
    }

    /// An upper bound of the latest time before `before` (exclusive) the table holds: the
    /// largest such time any chunk or segment whose range starts before it may hold.
    pub(crate) fn latest_time_before(&self, before: i64) -> Option<i64> {
        let chunks = self
            .chunks
            .iter()
            .chain(&self.frozen)
            .map(|c| (c.min_time, c.max_time));
        let segments = self
            .segments
            .iter()
            .map(|s| (s.meta.min_time, s.meta.max_time));
        chunks
            .chain(segments)
            .filter(|(lo, _)| *lo < before)
            .map(|(_, hi)| hi.min(before.saturating_sub(1)))
            .max()
    }

    /// The segments.
    pub(crate) fn segments(&self) -> Arc<[Arc<Segment>]> {
        self.segments.clone()
    }

    /// Swaps segments: drops those with an id in `removed`, adds `added`; with `persisted` (the
    /// persist's sequence), the frozen chunks are now in segments and leave the buffer in the
    /// same step (kept aside for queries reading up to an older sequence, see [`Before`]).
    pub(crate) fn replace_segments(
        &mut self,
        removed: &[u64],
        added: Vec<Arc<Segment>>,
        persisted: Option<u64>,
    ) {
        if let Some(seq) = persisted {
            self.before = Some(Before {
                seq,
                at: std::time::Instant::now(),
                frozen: std::mem::take(&mut self.frozen),
                segments: self.segments.clone(),
            });
        }
        let mut segments: Vec<Arc<Segment>> = self
            .segments
            .iter()
            .filter(|s| !removed.contains(&s.meta.id))
            .cloned()
            .chain(added)
            .collect();
        segments.sort_by_key(|s| (s.meta.partition, s.meta.min_time, s.meta.id));
        self.segments = segments.into();
    }

    /// Appends the chunk of a committed write. Commits arrive in sequence order.
    pub(crate) fn push(&mut self, chunk: Arc<Chunk>) {
        debug_assert!(self.chunks.last().is_none_or(|c| c.seq <= chunk.seq));
        self.chunks.push(chunk);
    }

    /// (rows, bytes of Arrow memory) held in memory (live and frozen chunks).
    pub(crate) fn size(&self) -> (usize, usize) {
        self.chunks
            .iter()
            .chain(&self.frozen)
            .fold((0, 0), |(r, b), c| {
                (r + c.rows(), b + c.batch.get_array_memory_size())
            })
    }

    /// The chunks as they are now.
    pub(crate) fn snapshot(&self) -> BufferSnapshot {
        BufferSnapshot {
            chunks: self.chunks.clone(),
            frozen: self.frozen.clone(),
            segments: self.segments.clone(),
            before: self.before.clone(),
        }
    }

    /// Replaces the first `merged_from.len()` chunks by `merged` if they are still the ones the
    /// merge read (a concurrent merge may have replaced them first). Chunks appended since stay.
    pub(crate) fn install_merged(
        &mut self,
        merged_from: &[Arc<Chunk>],
        merged: Arc<Chunk>,
    ) -> bool {
        let n = merged_from.len();
        if self.chunks.len() < n
            || !self.chunks[..n]
                .iter()
                .zip(merged_from)
                .all(|(a, b)| Arc::ptr_eq(a, b))
        {
            return false;
        }
        self.chunks.splice(..n, [merged]);
        true
    }
}

/// Merges `chunks` (in sequence order) into one chunk without duplicate points: per series and
/// time, each field takes its value from the newest row that has one ("last write wins, per
/// field"), as InfluxDB does. The result is sorted by (series id, time).
pub(crate) fn merge_chunks(
    schema: &TableSchema,
    chunks: &[Arc<Chunk>],
) -> Result<Chunk, ArrowError> {
    let all: Vec<usize> = (0..schema.columns().len()).collect();
    let full: SchemaRef = schema.arrow().clone();
    let mut batches = Vec::with_capacity(chunks.len());
    let mut series: Vec<u32> = Vec::with_capacity(chunks.iter().map(|c| c.rows()).sum());
    for chunk in chunks {
        batches.push(chunk.project(schema, &all, &full)?);
        series.extend_from_slice(&chunk.series);
    }
    let batch = concat_batches(&full, &batches)?;
    drop(batches);
    let mut merged = merge_rows(schema, &batch, &series)?;
    merged.seq = chunks.last().map_or(0, |c| c.seq);
    merged.overlaps = chunks.iter().any(|c| c.overlaps);
    merged.over_persisted = chunks.iter().any(|c| c.over_persisted);
    Ok(merged)
}

/// Like [`merge_chunks`] for batches that carry no series ids (segment rows, or rows of
/// several sources): `batches` are in the table schema, oldest first; a series is identified
/// by its tag values.
pub(crate) fn merge_batches(
    schema: &TableSchema,
    batches: &[RecordBatch],
) -> Result<RecordBatch, ArrowError> {
    let full: SchemaRef = schema.arrow().clone();
    let batch = concat_batches(&full, batches)?;
    let series = series_ids(schema, &batch)?;
    Ok(merge_rows(schema, &batch, &series)?.batch)
}

/// Dense series ids for the rows of `batch` (in the table schema), from their tag values.
pub(crate) fn series_ids(
    schema: &TableSchema,
    batch: &RecordBatch,
) -> Result<Vec<u32>, ArrowError> {
    use arrow::row::{RowConverter, SortField};
    let tags: Vec<usize> = schema
        .columns()
        .iter()
        .enumerate()
        .filter(|(_, c)| c.kind == ColumnKind::Tag)
        .map(|(i, _)| i)
        .collect();
    if tags.is_empty() {
        return Ok(vec![0; batch.num_rows()]);
    }
    let converter = RowConverter::new(
        tags.iter()
            .map(|&i| SortField::new(batch.schema().field(i).data_type().clone()))
            .collect(),
    )?;
    let columns: Vec<ArrayRef> = tags.iter().map(|&i| batch.column(i).clone()).collect();
    let rows = converter.convert_columns(&columns)?;
    let mut ids: std::collections::HashMap<&[u8], u32, ahash::RandomState> =
        std::collections::HashMap::default();
    Ok(rows
        .iter()
        .map(|row| {
            let next = ids.len() as u32;
            *ids.entry(row.data()).or_insert(next)
        })
        .collect())
}

/// Deduplicates `batch` (full table schema, rows in write order) given each row's series id.
fn merge_rows(
    schema: &TableSchema,
    batch: &RecordBatch,
    series: &[u32],
) -> Result<Chunk, ArrowError> {
    let full: SchemaRef = schema.arrow().clone();
    let times = time_values(batch)?.to_vec();

    // Sort positions by (series, time, position): position order is write order.
    let mut order: Vec<u32> = (0..batch.num_rows() as u32).collect();
    order.sort_unstable_by_key(|&i| (series[i as usize], times[i as usize], i));

    // Group boundaries: runs of equal (series, time).
    let mut groups: Vec<(u32, u32)> = Vec::with_capacity(order.len()); // (start, end) in `order`
    let mut start = 0usize;
    for i in 1..=order.len() {
        let end_of_group = i == order.len() || {
            let (a, b) = (order[i - 1] as usize, order[i] as usize);
            series[a] != series[b] || times[a] != times[b]
        };
        if end_of_group {
            groups.push((start as u32, i as u32));
            start = i;
        }
    }

    // Rows to take for identity columns (time, tags): the last row of each group.
    let last_rows =
        UInt32Array::from_iter_values(groups.iter().map(|&(_, e)| order[e as usize - 1]));
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(full.fields().len());
    for (col_idx, def) in schema.columns().iter().enumerate() {
        let array = batch.column(col_idx);
        let indices = match def.kind {
            ColumnKind::Field(_) if array.null_count() > 0 && !schema.is_whole_rows() => {
                UInt32Array::from_iter_values(groups.iter().map(|&(s, e)| {
                    let rows = &order[s as usize..e as usize];
                    rows.iter()
                        .rev()
                        .copied()
                        .find(|&r| array.is_valid(r as usize))
                        .unwrap_or(rows[rows.len() - 1])
                }))
            }
            _ => last_rows.clone(),
        };
        columns.push(take(array.as_ref(), &indices, None)?);
    }
    let merged_series: Arc<[u32]> = last_rows
        .values()
        .iter()
        .map(|&r| series[r as usize])
        .collect();
    let merged = RecordBatch::try_new(full, columns)?;
    let (min_time, max_time) = min_max(time_values(&merged)?);
    Ok(Chunk {
        seq: 0,
        batch: merged,
        series: merged_series,
        min_time,
        max_time,
        overlaps: false,
        over_persisted: false,
        merged: true,
    })
}

/// Smallest and largest value (i64::MAX, i64::MIN for an empty slice).
pub(crate) fn min_max(values: &[i64]) -> (i64, i64) {
    values
        .iter()
        .fold((i64::MAX, i64::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)))
}

/// The Arrow schema for `columns` of `schema`.
pub(crate) fn projected_schema(schema: &TableSchema, columns: &[usize]) -> SchemaRef {
    let fields: Vec<Field> = columns
        .iter()
        .map(|&i| schema.arrow().field(i).clone())
        .collect();
    Arc::new(Schema::new(fields))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::segment::SegmentMeta;

    fn chunk(seq: u64, time: i64) -> Arc<Chunk> {
        let times = arrow::array::TimestampNanosecondArray::from(vec![time]).with_timezone("UTC");
        let batch = RecordBatch::try_from_iter([(TIME_COLUMN, Arc::new(times) as ArrayRef)])
            .expect("batch");
        Arc::new(Chunk {
            seq,
            batch,
            series: vec![0].into(),
            min_time: time,
            max_time: time,
            overlaps: false,
            over_persisted: false,
            merged: false,
        })
    }

    fn segment(id: u64, max_seq: u64) -> Arc<Segment> {
        let meta = SegmentMeta {
            id,
            table_id: 1,
            partition: 0,
            min_time: 0,
            max_time: 10,
            rows: 1,
            bytes: 1,
            max_seq,
            path: format!("{id}.parquet"),
            format: 1,
        };
        Arc::new(Segment::new(meta, std::path::Path::new("/nonexistent")))
    }

    #[test]
    fn a_merged_chunk_newer_than_the_query_is_kept_not_lost() {
        let mut buffer = TableBuffer::default();
        for seq in 5..=12 {
            buffer.push(chunk(seq, seq as i64));
        }
        // A query at sequence 12 merged everything and installed it; a query planned at 10
        // scans afterwards: it must still see writes 5..=10 (and sees 11, 12 with them).
        let all = buffer.snapshot().chunks;
        let mut merged = Chunk {
            seq: 12,
            batch: all[0].batch.clone(),
            series: vec![0].into(),
            min_time: 5,
            max_time: 12,
            overlaps: true,
            over_persisted: false,
            merged: true,
        };
        merged.min_time = 5;
        assert!(buffer.install_merged(&all, Arc::new(merged)));
        buffer.push(chunk(13, 13));
        let seqs: Vec<u64> = buffer
            .snapshot()
            .up_to(10)
            .chunks
            .iter()
            .map(|c| c.seq)
            .collect();
        assert_eq!(seqs, [12]);
    }

    #[test]
    fn a_query_older_than_a_persist_reads_the_table_as_before_it() {
        let mut buffer = TableBuffer::default();
        buffer.replace_segments(&[], vec![segment(1, 1)], Some(1));
        for seq in 2..=4 {
            buffer.push(chunk(seq, seq as i64));
        }
        // Persist everything up to 4 into segment 2, while writes 5 and 6 arrive.
        buffer.freeze();
        buffer.push(chunk(5, 5));
        buffer.replace_segments(&[], vec![segment(2, 4)], Some(4));
        buffer.push(chunk(6, 6));

        let ids = |s: &BufferSnapshot| s.segments.iter().map(|s| s.meta.id).collect::<Vec<_>>();
        let seqs = |c: &[Arc<Chunk>]| c.iter().map(|c| c.seq).collect::<Vec<_>>();
        // Planned at sequence 3: the old segment list and the frozen chunks up to 3.
        let old = buffer.snapshot().up_to(3);
        assert_eq!(ids(&old), [1]);
        assert_eq!(seqs(&old.frozen), [2, 3]);
        assert!(old.chunks.is_empty());
        // Planned at 5: the new segment (writes up to 4) and live write 5.
        let new = buffer.snapshot().up_to(5);
        assert_eq!(ids(&new), [1, 2]);
        assert!(new.frozen.is_empty());
        assert_eq!(seqs(&new.chunks), [5]);
    }
}
