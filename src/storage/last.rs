//! The last-point state of a table: for each series, the rows holding its latest point, kept
//! current on every write so `last_cache('table')` answers "latest row per series" without a
//! scan (InfluxDB 3's last value cache, here always on).
//!
//! Each series points at the row(s) of its latest time: one row normally, several when later
//! writes overwrote fields of that same point (merged last-write-wins per field when read).
//! Rows are referenced in their buffer chunks; each persist copies the state into one compact
//! batch (so persisted chunks are freed) and stores it in the manifest with `persisted_seq`, so
//! a reopen loads it and replays only later writes.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch, UInt32Array};
use arrow::compute::{concat_batches, take_record_batch};
use arrow::error::ArrowError;

use super::buffer::{Chunk, merge_batches, time_values, to_table_schema};
use super::catalog::{ColumnKind, TableSchema};
use super::table::{SeriesIndex, canonical_key};

/// The latest point of one series.
#[derive(Debug, Clone)]
struct Entry {
    time: i64,
    /// Rows at `time`, oldest write first.
    rows: Vec<(Arc<Chunk>, u32)>,
}

/// Latest point per series id.
#[derive(Debug, Default)]
pub(crate) struct LastPoints {
    by_series: Vec<Option<Entry>>,
}

/// A copy of the state at one moment (cheap: reference counts).
#[derive(Debug, Clone, Default)]
pub(crate) struct LastSnapshot {
    by_series: Vec<Option<Entry>>,
}

impl LastPoints {
    /// Records the rows of a committed chunk.
    pub(crate) fn observe(&mut self, chunk: &Arc<Chunk>) -> Result<(), ArrowError> {
        self.observe_rows(chunk, false)
    }

    /// As [`Self::observe`]; with `whole_rows` (view tables) a row replaces its point whole,
    /// so an overwrite keeps only the newest row (nothing to fold).
    pub(crate) fn observe_rows(
        &mut self,
        chunk: &Arc<Chunk>,
        whole_rows: bool,
    ) -> Result<(), ArrowError> {
        let times = time_values(&chunk.batch)?;
        for (row, (&sid, &time)) in chunk.series.iter().zip(times).enumerate() {
            let slot = sid as usize;
            if slot >= self.by_series.len() {
                self.by_series.resize(slot + 1, None);
            }
            match &mut self.by_series[slot] {
                Some(e) if e.time > time => {}
                Some(e) if e.time == time && whole_rows => {
                    e.rows = vec![(chunk.clone(), row as u32)];
                }
                Some(e) if e.time == time => {
                    if e.rows.len() >= 8 {
                        // Many overwrites of one point: fold them into one row.
                        let merged = fold(&e.rows, chunk, row as u32)?;
                        e.rows = vec![merged];
                    } else {
                        e.rows.push((chunk.clone(), row as u32));
                    }
                }
                slot => {
                    *slot = Some(Entry {
                        time,
                        rows: vec![(chunk.clone(), row as u32)],
                    })
                }
            }
        }
        Ok(())
    }

    pub(crate) fn snapshot(&self) -> LastSnapshot {
        LastSnapshot {
            by_series: self.by_series.clone(),
        }
    }

    /// After `snapshot` was written out as `compact` (one row per series, in series order of
    /// the snapshot): entries unchanged since point at `compact` instead of their chunks.
    pub(crate) fn rebase(&mut self, snapshot: &LastSnapshot, compact: &Arc<Chunk>, sids: &[u32]) {
        for (row, &sid) in sids.iter().enumerate() {
            let (Some(Some(now)), Some(Some(then))) = (
                self.by_series.get_mut(sid as usize),
                snapshot.by_series.get(sid as usize),
            ) else {
                continue;
            };
            let same = now.time == then.time
                && now.rows.len() == then.rows.len()
                && now
                    .rows
                    .iter()
                    .zip(&then.rows)
                    .all(|(a, b)| Arc::ptr_eq(&a.0, &b.0) && a.1 == b.1);
            if same {
                now.rows = vec![(compact.clone(), row as u32)];
            }
        }
    }

    /// Loads a batch written by [`LastSnapshot::to_batch`] (rows in `schema`, one per series).
    pub(crate) fn load(
        &mut self,
        schema: &TableSchema,
        batch: RecordBatch,
        series: &mut SeriesIndex,
    ) -> Result<(), ArrowError> {
        let sids = series_ids_of(schema, &batch, series)?;
        let (lo, hi) = super::buffer::min_max(time_values(&batch)?);
        let chunk = Arc::new(Chunk {
            seq: 0,
            batch,
            series: sids.into(),
            min_time: lo,
            max_time: hi,
            overlaps: false,
            over_persisted: false,
            merged: true,
        });
        self.observe(&chunk)
    }
}

/// One row merging `rows` and then (`chunk`, `row`), last write wins per field.
fn fold(
    rows: &[(Arc<Chunk>, u32)],
    chunk: &Arc<Chunk>,
    row: u32,
) -> Result<(Arc<Chunk>, u32), ArrowError> {
    let schema = full_schema_of(rows.iter().map(|r| &r.0).chain([chunk]));
    let mut batches = Vec::new();
    for (c, r) in rows.iter().chain([&(chunk.clone(), row)]) {
        batches.push(project_row(&schema, c, *r)?);
    }
    let merged = merge_batches(&schema, &batches)?;
    let (lo, hi) = super::buffer::min_max(time_values(&merged)?);
    Ok((
        Arc::new(Chunk {
            seq: chunk.seq,
            batch: merged,
            series: vec![chunk.series[row as usize]].into(),
            min_time: lo,
            max_time: hi,
            overlaps: false,
            over_persisted: false,
            merged: true,
        }),
        0,
    ))
}

/// A table schema covering the columns of `chunks`.
fn full_schema_of<'a>(chunks: impl Iterator<Item = &'a Arc<Chunk>>) -> TableSchema {
    let mut columns: HashMap<String, super::catalog::ColumnDef> = HashMap::new();
    for c in chunks {
        for f in c.batch.schema().fields() {
            if let Some(kind) = kind_of(f) {
                columns
                    .entry(f.name().clone())
                    .or_insert(super::catalog::ColumnDef {
                        name: f.name().as_str().into(),
                        kind,
                    });
            }
        }
    }
    TableSchema::new(columns.into_values().collect())
}

fn kind_of(f: &arrow::datatypes::Field) -> Option<ColumnKind> {
    if f.name() == super::catalog::TIME_COLUMN {
        return Some(ColumnKind::Time);
    }
    if f.data_type() == &super::catalog::tag_type() {
        return Some(ColumnKind::Tag);
    }
    super::catalog::FieldType::from_data_type(f.data_type()).map(ColumnKind::Field)
}

fn project_row(schema: &TableSchema, chunk: &Chunk, row: u32) -> Result<RecordBatch, ArrowError> {
    let one = take_record_batch(&chunk.batch, &UInt32Array::from(vec![row]))?;
    to_table_schema(&one, schema)
}

impl LastSnapshot {
    /// The newest write sequence among the rows the snapshot refers to (0 when empty).
    pub(crate) fn max_seq(&self) -> u64 {
        self.by_series
            .iter()
            .flatten()
            .flat_map(|e| e.rows.iter().map(|(c, _)| c.seq))
            .max()
            .unwrap_or(0)
    }

    /// True when no series has a point.
    pub(crate) fn is_empty(&self) -> bool {
        self.by_series.iter().all(Option::is_none)
    }

    /// One row per series (its latest point, fields merged last-write-wins) in `schema`, and
    /// the series id of each row.
    pub(crate) fn to_batch(
        &self,
        schema: &TableSchema,
    ) -> Result<(RecordBatch, Vec<u32>), ArrowError> {
        // Single-row entries: one `take` per chunk.
        let mut by_chunk: HashMap<*const Chunk, RowsOfChunk> = HashMap::new();
        let mut multi: Vec<(u32, &Entry)> = Vec::new();
        for (sid, entry) in self.by_series.iter().enumerate() {
            let Some(e) = entry else { continue };
            if let [(chunk, row)] = e.rows.as_slice() {
                let slot = by_chunk
                    .entry(Arc::as_ptr(chunk))
                    .or_insert_with(|| (chunk.clone(), Vec::new(), Vec::new()));
                slot.1.push(*row);
                slot.2.push(sid as u32);
            } else {
                multi.push((sid as u32, e));
            }
        }
        let mut batches = Vec::new();
        let mut sids = Vec::new();
        for (chunk, rows, ids) in by_chunk.into_values() {
            let taken = take_record_batch(&chunk.batch, &UInt32Array::from(rows))?;
            batches.push(to_table_schema(&taken, schema)?);
            sids.extend(ids);
        }
        for (sid, e) in multi {
            let rows = e
                .rows
                .iter()
                .map(|(c, r)| project_row(schema, c, *r))
                .collect::<Result<Vec<_>, _>>()?;
            batches.push(merge_batches(schema, &rows)?);
            sids.push(sid);
        }
        Ok((concat_batches(schema.arrow(), &batches)?, sids))
    }
}

/// A chunk, rows to take from it, and their series ids.
type RowsOfChunk = (Arc<Chunk>, Vec<u32>, Vec<u32>);

/// Series ids of `batch`'s rows (tag columns of `schema`), registering new series.
fn series_ids_of(
    schema: &TableSchema,
    batch: &RecordBatch,
    series: &mut SeriesIndex,
) -> Result<Vec<u32>, ArrowError> {
    let tags: Vec<(
        &str,
        &arrow::array::DictionaryArray<arrow::datatypes::Int32Type>,
    )> = schema
        .columns()
        .iter()
        .filter(|c| c.kind == ColumnKind::Tag)
        .filter_map(|c| {
            batch.column_by_name(&c.name).map(|a| {
                (
                    c.name.as_ref(),
                    a.as_dictionary::<arrow::datatypes::Int32Type>(),
                )
            })
        })
        .collect();
    let values: Vec<_> = tags
        .iter()
        .map(|(_, d)| d.values().as_string::<i32>().clone())
        .collect();
    let mut out = Vec::with_capacity(batch.num_rows());
    let mut key = Vec::new();
    let mut pairs: Vec<(&str, &str)> = Vec::new();
    for row in 0..batch.num_rows() {
        key.clear();
        pairs.clear();
        for ((name, dict), vals) in tags.iter().zip(&values) {
            if dict.is_valid(row) {
                pairs.push((name, vals.value(dict.keys().value(row) as usize)));
            }
        }
        canonical_key(&mut pairs, &mut key);
        // Stored rows are never refused: no cap.
        let id = series
            .id_for_canonical(&key, usize::MAX)
            .ok_or_else(|| ArrowError::ComputeError("the series index is full".to_string()))?;
        out.push(id);
    }
    Ok(out)
}
