//! The storage side of the `system` schema, computed when a query names it:
//!
//! - `system.tables`: one row per table (and per view's storage), what it holds in memory and
//!   in segments, its series, time range, retention and sort key;
//! - `system.segments`: one row per segment file.
//!
//! Tables whose name is reserved (`__rivulet…`: the subscription layer's internal views) are
//! left out, as everywhere users look.

use std::sync::Arc;

use arrow::array::{
    ArrayRef, Int64Array, RecordBatch, StringArray, TimestampNanosecondArray, UInt64Array,
};
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use datafusion::error::Result;

use crate::ingest::prepare::RESERVED_PREFIX;
use crate::storage::catalog::ColumnKind;
use crate::storage::engine::Engine;
use crate::storage::table::Table;

/// The names of the storage tables of the `system` schema.
pub(crate) const STORAGE_TABLES: [&str; 2] = ["tables", "segments"];

/// `system.<name>` over the tables of `databases` (None: all), if it is a storage table.
pub(crate) fn storage_table(
    engine: &Engine,
    name: &str,
    databases: Option<&[String]>,
) -> Result<Option<Arc<dyn TableProvider>>> {
    let tables: Vec<Arc<Table>> = engine
        .catalog()
        .databases()
        .into_iter()
        .filter(|d| databases.is_none_or(|allowed| allowed.iter().any(|a| **a == *d.name)))
        .flat_map(|d| d.tables())
        .filter(|t| !t.name.starts_with(RESERVED_PREFIX))
        .collect();
    let batch = match name {
        "tables" => tables_batch(&tables)?,
        "segments" => segments_batch(&tables)?,
        _ => return Ok(None),
    };
    Ok(Some(Arc::new(MemTable::try_new(
        batch.schema(),
        vec![vec![batch]],
    )?)))
}

fn utc(values: Vec<Option<i64>>) -> ArrayRef {
    Arc::new(TimestampNanosecondArray::from(values).with_timezone("UTC"))
}

fn tables_batch(tables: &[Arc<Table>]) -> Result<RecordBatch> {
    let mut database = Vec::new();
    let mut name = Vec::new();
    let mut kind = Vec::new();
    let mut tags = Vec::new();
    let mut fields = Vec::new();
    let mut series = Vec::new();
    let mut buffered_rows = Vec::new();
    let mut buffered_bytes = Vec::new();
    let mut segments = Vec::new();
    let mut segment_rows = Vec::new();
    let mut segment_bytes = Vec::new();
    let mut min_time = Vec::new();
    let mut max_time = Vec::new();
    let mut retention = Vec::new();
    let mut sort_key = Vec::new();
    for t in tables {
        let schema = t.schema();
        let settings = t.settings.read().clone();
        let (rows, bytes, segs, lo, hi) = {
            let buffer = t.buffer.read();
            let (rows, bytes) = buffer.size();
            let snap = buffer.snapshot();
            let times = snap
                .chunks
                .iter()
                .chain(&snap.frozen)
                .map(|c| (c.min_time, c.max_time))
                .chain(
                    snap.segments
                        .iter()
                        .map(|s| (s.meta.min_time, s.meta.max_time)),
                );
            let (lo, hi) = times.fold(
                (None, None),
                |(lo, hi): (Option<i64>, Option<i64>), (a, b)| {
                    (
                        Some(lo.map_or(a, |l| l.min(a))),
                        Some(hi.map_or(b, |h| h.max(b))),
                    )
                },
            );
            (rows, bytes, snap.segments, lo, hi)
        };
        database.push(t.db.to_string());
        name.push(t.name.to_string());
        kind.push(if settings.view { "view" } else { "table" });
        let count = |want: fn(&ColumnKind) -> bool| {
            schema.columns().iter().filter(|c| want(&c.kind)).count() as u64
        };
        tags.push(count(|k| *k == ColumnKind::Tag));
        fields.push(count(|k| matches!(k, ColumnKind::Field(_))));
        series.push(t.series.lock().series_count() as u64);
        buffered_rows.push(rows as u64);
        buffered_bytes.push(bytes as u64);
        segments.push(segs.len() as u64);
        segment_rows.push(segs.iter().map(|s| s.meta.rows).sum::<u64>());
        segment_bytes.push(segs.iter().map(|s| s.meta.bytes).sum::<u64>());
        min_time.push(lo);
        max_time.push(hi);
        retention.push(settings.retention);
        sort_key.push(settings.sort_key.join(","));
    }
    Ok(RecordBatch::try_from_iter([
        (
            "database",
            Arc::new(StringArray::from(database)) as ArrayRef,
        ),
        ("table_name", Arc::new(StringArray::from(name))),
        ("kind", Arc::new(StringArray::from(kind))),
        ("tags", Arc::new(UInt64Array::from(tags))),
        ("fields", Arc::new(UInt64Array::from(fields))),
        ("series", Arc::new(UInt64Array::from(series))),
        ("buffered_rows", Arc::new(UInt64Array::from(buffered_rows))),
        (
            "buffered_bytes",
            Arc::new(UInt64Array::from(buffered_bytes)),
        ),
        ("segments", Arc::new(UInt64Array::from(segments))),
        ("segment_rows", Arc::new(UInt64Array::from(segment_rows))),
        ("segment_bytes", Arc::new(UInt64Array::from(segment_bytes))),
        ("min_time", utc(min_time)),
        ("max_time", utc(max_time)),
        ("retention_ns", Arc::new(Int64Array::from(retention))),
        ("sort_key", Arc::new(StringArray::from(sort_key))),
    ])?)
}

fn segments_batch(tables: &[Arc<Table>]) -> Result<RecordBatch> {
    let mut database = Vec::new();
    let mut name = Vec::new();
    let mut id = Vec::new();
    let mut partition = Vec::new();
    let mut min_time = Vec::new();
    let mut max_time = Vec::new();
    let mut rows = Vec::new();
    let mut bytes = Vec::new();
    let mut max_seq = Vec::new();
    for t in tables {
        let segments = t.buffer.read().segments();
        let mut metas: Vec<_> = segments.iter().map(|s| &s.meta).collect();
        metas.sort_by_key(|m| (m.partition, m.id));
        for m in metas {
            database.push(t.db.to_string());
            name.push(t.name.to_string());
            id.push(m.id);
            partition.push(Some(m.partition));
            min_time.push(Some(m.min_time));
            max_time.push(Some(m.max_time));
            rows.push(m.rows);
            bytes.push(m.bytes);
            max_seq.push(m.max_seq);
        }
    }
    Ok(RecordBatch::try_from_iter([
        (
            "database",
            Arc::new(StringArray::from(database)) as ArrayRef,
        ),
        ("table_name", Arc::new(StringArray::from(name))),
        ("segment_id", Arc::new(UInt64Array::from(id))),
        ("partition_start", utc(partition)),
        ("min_time", utc(min_time)),
        ("max_time", utc(max_time)),
        ("rows", Arc::new(UInt64Array::from(rows))),
        ("bytes", Arc::new(UInt64Array::from(bytes))),
        ("max_seq", Arc::new(UInt64Array::from(max_seq))),
    ])?)
}
