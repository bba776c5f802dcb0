//! Arrow batches into chunks: a batch written to one table (embedded `write_batch`, SQL
//! `INSERT`, view maintenance, WAL replay), its columns mapped to the table's tags and fields.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, Field, Schema, TimeUnit};

use super::prepare::{Columns, PreparedTable, PreparedWrite, resolve_table};
use super::{Refusal, WriteError};
use crate::storage::buffer::Chunk;
use crate::storage::catalog::{Catalog, ColumnKind, FieldType, TIME_COLUMN, tag_type, time_type};
use crate::storage::table::{OVER_PERSISTED, OVERLAPS, Table, canonical_key};

/// Validates an Arrow batch for `table` and turns it into a chunk.
///
/// Column mapping: `time` must be a timestamp (any unit; stored as ns UTC) or Int64 nanoseconds,
/// without nulls. Dictionary-encoded string columns are tags, and so are string columns the
/// table already has as tags; other columns are fields: Float64/32, Int64/32/16/8,
/// UInt64/32/16/8, Utf8 (also LargeUtf8, Utf8View), Boolean. Every row needs a field value.
pub(crate) fn prepare_batch(
    catalog: &Catalog,
    db_name: &str,
    table_name: &str,
    batch: &RecordBatch,
) -> Result<PreparedWrite, WriteError> {
    prepare_batch_as(catalog, db_name, table_name, batch, false)
}

/// [`prepare_batch`] for Rivulet's own writes (view maintenance, WAL replay), which may write
/// view tables and reserved names.
pub(crate) fn prepare_system_batch(
    catalog: &Catalog,
    db_name: &str,
    table_name: &str,
    batch: &RecordBatch,
) -> Result<PreparedWrite, WriteError> {
    prepare_batch_as(catalog, db_name, table_name, batch, true)
}

fn prepare_batch_as(
    catalog: &Catalog,
    db_name: &str,
    table_name: &str,
    batch: &RecordBatch,
    system: bool,
) -> Result<PreparedWrite, WriteError> {
    let invalid = |reason: Refusal| WriteError::InvalidBatch {
        db: db_name.to_string(),
        table: table_name.to_string(),
        reason: reason.0,
    };
    let db_name_arc: Arc<str> = db_name.into();
    let db = catalog.database(db_name);
    let (table, is_new) = resolve_table(catalog, db.as_ref(), &db_name_arc, table_name, system, 0)
        .map_err(invalid)?;
    let schema = table.schema();
    let mut columns = Columns {
        schema: &schema,
        added: Vec::new(),
        added_by_name: HashMap::new(),
        db: db_name,
        table: table_name,
        max_columns: catalog.limits().columns_per_table,
        system,
    };
    let rows = batch.num_rows();
    let parts = split_columns(batch, &mut columns).map_err(invalid)?;
    let times = parts
        .time
        .as_primitive::<arrow::datatypes::TimestampNanosecondType>();
    // Rivulet's own writes (view rows, replay) are never refused for their series.
    let max_series = if system {
        usize::MAX
    } else {
        catalog.limits().series_per_table
    };
    let (series_ids, overlaps, series_undo) =
        series_of(&table, &parts.tags, times, rows, max_series).ok_or_else(|| {
            invalid(Refusal(super::prepare::series_limit(
                table_name, max_series,
            )))
        })?;
    let out = match parts.chunk_batch(rows) {
        Ok(out) => out,
        Err(e) => {
            if let Some(undo) = series_undo {
                table.series.lock().rollback(undo);
            }
            return Err(e);
        }
    };
    let new_columns = columns
        .added
        .into_iter()
        .filter(|c| out.schema().column_with_name(&c.name).is_some())
        .collect();
    let mut tables = Vec::new();
    if rows > 0 {
        let (min_time, max_time) = crate::storage::buffer::min_max(times.values());
        tables.push(PreparedTable {
            table,
            is_new,
            new_columns,
            chunk: Chunk {
                seq: 0,
                batch: out,
                series: series_ids.into(),
                min_time,
                max_time,
                overlaps: overlaps & OVERLAPS != 0,
                over_persisted: overlaps & OVER_PERSISTED != 0,
                merged: false,
            },
            series_undo,
        });
    }
    Ok(PreparedWrite {
        db_name: db_name_arc,
        db,
        tables,
        rejected: Vec::new(),
        rejected_total: 0,
        rows,
    })
}

/// A batch's columns as the table stores them: `time` (ns, UTC), tags, fields.
struct Parts {
    time: ArrayRef,
    tags: Vec<(Arc<str>, ArrayRef)>,
    fields: Vec<(Arc<str>, ColumnKind, ArrayRef)>,
}

/// Maps every column of `batch` to the table's columns (adding new ones to `columns`) and
/// converts it; checks that there is a time and that every row has a field value.
fn split_columns(batch: &RecordBatch, columns: &mut Columns<'_>) -> Result<Parts, Refusal> {
    let rows = batch.num_rows();
    let mut time: Option<ArrayRef> = None;
    let mut tags = Vec::new();
    let mut fields = Vec::new();
    for (field, array) in batch.schema().fields().iter().zip(batch.columns()) {
        let name = field.name().as_str();
        if name == TIME_COLUMN {
            time = Some(time_column(array)?);
            continue;
        }
        let existing_tag = columns
            .schema
            .column(name)
            .is_some_and(|c| c.kind == ColumnKind::Tag);
        let Some(want) = column_kind(name, array.data_type(), existing_tag)? else {
            continue;
        };
        let kind = columns.resolve(name, want)?;
        let converted =
            cast(array, &kind.data_type()).map_err(|e| format!("column '{name}': {e}"))?;
        let name: Arc<str> = name.into();
        match kind {
            ColumnKind::Tag => tags.push((name, converted)),
            _ => fields.push((name, kind, converted)),
        }
    }
    let Some(time) = time else {
        return Err(Refusal("the batch has no 'time' column".to_string()));
    };
    if fields.is_empty() && rows > 0 {
        return Err(Refusal("the batch has no field columns".to_string()));
    }
    // Every row needs at least one field value (a point without fields does not exist).
    for row in 0..rows {
        if fields
            .iter()
            .all(|(_, _, a): &(_, _, ArrayRef)| a.is_null(row))
        {
            return Err(Refusal(format!("row {row} has no field values")));
        }
    }
    Ok(Parts { time, tags, fields })
}

/// The `time` column in nanoseconds, UTC: a timestamp of any unit or Int64 nanoseconds,
/// without nulls.
fn time_column(array: &ArrayRef) -> Result<ArrayRef, Refusal> {
    let ns = match array.data_type() {
        DataType::Timestamp(_, _) | DataType::Int64 => {
            // Not "safe": a time out of the nanosecond range is an error, not a null.
            let strict = arrow::compute::CastOptions {
                safe: false,
                ..Default::default()
            };
            let as_ns = arrow::compute::cast_with_options(
                array,
                &DataType::Timestamp(TimeUnit::Nanosecond, None),
                &strict,
            )
            .map_err(|e| format!("column 'time': {e}"))?;
            cast(&as_ns, &time_type()).map_err(|e| format!("column 'time': {e}"))?
        }
        other => {
            return Err(Refusal(format!(
                "column 'time' has type {other}; expected a timestamp or Int64 nanoseconds"
            )));
        }
    };
    if ns.null_count() > 0 {
        return Err(Refusal(format!(
            "column 'time' has {} null values; every row needs a time",
            ns.null_count()
        )));
    }
    Ok(ns)
}

/// What a column of type `dt` is in the table (None: a null column, skipped).
fn column_kind(
    name: &str,
    dt: &DataType,
    existing_tag: bool,
) -> Result<Option<ColumnKind>, Refusal> {
    let is_string = matches!(
        dt,
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
    );
    Ok(Some(match dt {
        DataType::Dictionary(_, v)
            if matches!(
                **v,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ) =>
        {
            ColumnKind::Tag
        }
        _ if is_string && existing_tag => ColumnKind::Tag,
        DataType::Float64 | DataType::Float32 | DataType::Float16 => {
            ColumnKind::Field(FieldType::Float)
        }
        DataType::Int64 | DataType::Int32 | DataType::Int16 | DataType::Int8 => {
            ColumnKind::Field(FieldType::Integer)
        }
        DataType::UInt64 | DataType::UInt32 | DataType::UInt16 | DataType::UInt8 => {
            ColumnKind::Field(FieldType::UInteger)
        }
        _ if is_string => ColumnKind::Field(FieldType::String),
        DataType::Boolean => ColumnKind::Field(FieldType::Boolean),
        DataType::Null => return Ok(None),
        other => {
            return Err(Refusal(format!(
                "column '{name}' has unsupported type {other}"
            )));
        }
    }))
}

/// Series ids of the rows (from the tag values, sorted by tag name), the overlap flags of
/// their times and what they did to the series index; None (and the index as it was) when
/// the rows hold more than `max` series.
fn series_of(
    table: &Table,
    tags: &[(Arc<str>, ArrayRef)],
    times: &arrow::array::TimestampNanosecondArray,
    rows: usize,
    max: usize,
) -> Option<(Vec<u32>, u8, Option<crate::storage::table::SeriesUndo>)> {
    let mut sorted_tags: Vec<(&str, &dyn Array)> =
        tags.iter().map(|(n, a)| (n.as_ref(), a.as_ref())).collect();
    sorted_tags.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let dicts: Vec<_> = sorted_tags
        .iter()
        .map(|(n, a)| (*n, a.as_dictionary::<arrow::datatypes::Int32Type>()))
        .collect();
    let dict_values: Vec<_> = dicts
        .iter()
        .map(|(_, d)| d.values().as_string::<i32>().clone())
        .collect();
    let mut series_ids = Vec::with_capacity(rows);
    let mut overlaps = 0u8;
    let mut key = Vec::new();
    let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(dicts.len());
    let mut series = table.series.lock();
    series.begin();
    for row in 0..rows {
        key.clear();
        pairs.clear();
        for ((name, dict), values) in dicts.iter().zip(&dict_values) {
            if dict.is_valid(row) {
                let k = dict.keys().value(row) as usize;
                pairs.push((name, values.value(k)));
            }
        }
        canonical_key(&mut pairs, &mut key);
        let Some(sid) = series.id_for_canonical(&key, max) else {
            if let Some(undo) = series.end() {
                series.rollback(undo);
            }
            return None;
        };
        overlaps |= series.observe(sid, times.value(row));
        series_ids.push(sid);
    }
    let undo = series.end();
    Some((series_ids, overlaps, undo))
}

impl Parts {
    /// The chunk's batch: `time`, then the tags and fields that are not null in every row.
    fn chunk_batch(&self, rows: usize) -> Result<RecordBatch, WriteError> {
        let mut out_fields = vec![Field::new(TIME_COLUMN, time_type(), false)];
        let mut out_arrays = vec![self.time.clone()];
        for (name, array) in &self.tags {
            if array.null_count() < rows {
                out_fields.push(Field::new(name.as_ref(), tag_type(), true));
                out_arrays.push(array.clone());
            }
        }
        for (name, kind, array) in &self.fields {
            if array.null_count() < rows {
                out_fields.push(Field::new(name.as_ref(), kind.data_type(), true));
                out_arrays.push(array.clone());
            }
        }
        Ok(RecordBatch::try_new(
            Arc::new(Schema::new(out_fields)),
            out_arrays,
        )?)
    }
}
