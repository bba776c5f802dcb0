//! One view's part of a maintenance round: from the changes to its sources to the rows it
//! writes (see the strategies in [`super::plan`]).

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, RecordBatch, RecordBatchOptions, StringArray,
    TimestampNanosecondArray, UInt64Array, new_null_array,
};
use arrow::compute::{cast, concat_batches, filter_record_batch};
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use datafusion::common::ScalarValue;
use datafusion::execution::context::{SQLOptions, SessionContext};
use datafusion::logical_expr::{col, lit};

use super::dirty;
use super::plan::{OutColumn, Strategy, TimeMap, ViewPlan, quote};
use super::provider::DELETED;
use super::{Change, PROGRESS_TABLE, View, Views};
use crate::error::Error;
use crate::query::{QuerySnapshot, TableOverride};
use crate::storage::buffer::{Chunk, time_values};
use crate::storage::catalog::TIME_COLUMN;

/// What a view changed in a round, for the views defined on it, and the rows to write to its
/// storage table (written by the worker together with the other views of its depth).
pub(crate) struct Out {
    pub ranges: Vec<(i64, i64)>,
    pub all: bool,
    pub rows: Option<RecordBatch>,
}

/// Rows a round writes to the view's storage table.
#[derive(Default)]
pub(super) struct Writes {
    pub(super) batches: Vec<RecordBatch>,
}

/// A failure of the maintenance machinery itself (not of the view's SQL).
fn internal(m: String) -> Error {
    Error::View(super::ViewError::Internal(m))
}

/// Records `changes` as work still to do for `view`: time ranges of its primary source to
/// recompute, or the whole view when another source changed.
pub(super) fn pend(st: &mut super::Status, view: &View, changes: &HashMap<u64, Change>) {
    for id in &view.source_ids {
        if let Some(c) = changes.get(id) {
            if Some(*id) == view.primary_id && !c.all {
                st.pending
                    .extend(c.chunks.iter().map(|c| (c.min_time, c.max_time)));
                st.pending.extend(c.ranges.iter().copied());
            } else {
                st.full = true;
            }
        }
    }
}

/// Applies the round's `changes` to `view`; `upto` is the round's last sequence.
pub(crate) async fn round(
    db: &Views,
    view: &Arc<View>,
    changes: &HashMap<u64, Change>,
    upto: u64,
) -> Result<Option<Out>, Error> {
    let plan = &view.plan;
    let (backfill, mut ranges, mut full, fences, max_before) = {
        let st = view.status.lock();
        (
            st.backfill_pending,
            st.pending.clone(),
            st.full,
            st.fences.clone(),
            st.max_source_time,
        )
    };
    if backfill {
        return super::backfill::round(db, view, changes, upto).await;
    }
    let mut chunks: Vec<Arc<Chunk>> = Vec::new();
    for id in &view.source_ids {
        let Some(c) = changes.get(id) else { continue };
        if Some(*id) == view.primary_id && !c.all {
            chunks.extend(c.chunks.iter().cloned());
            ranges.extend(c.ranges.iter().copied());
        } else {
            full = true;
        }
    }
    if plan.time == TimeMap::None
        && (!ranges.is_empty() || (plan.strategy == Strategy::Recompute && !chunks.is_empty()))
    {
        full = true;
    }
    if !full && ranges.is_empty() && chunks.is_empty() {
        return Ok(None);
    }
    let max_seen = chunks.iter().map(|c| c.max_time).max();
    let result = if full {
        recompute_all(db, view, upto).await
    } else {
        incremental(db, view, chunks, ranges, &fences, max_before, upto).await
    };
    let out = result?;
    let mut st = view.status.lock();
    st.pending.clear();
    st.full = false;
    st.fences.retain(|f| f.2 > upto);
    if let Some(m) = max_seen {
        st.max_source_time = Some(st.max_source_time.map_or(m, |x| x.max(m)));
    }
    Ok(Some(out))
}

/// Merges overlapping or touching ranges.
fn coalesce(mut ranges: Vec<(i64, i64)>) -> Vec<(i64, i64)> {
    ranges.sort_unstable();
    let mut out: Vec<(i64, i64)> = Vec::with_capacity(ranges.len());
    for (lo, hi) in ranges {
        match out.last_mut() {
            Some(last) if lo <= last.1.saturating_add(1) => last.1 = last.1.max(hi),
            _ => out.push((lo, hi)),
        }
    }
    out
}

/// The incremental path: appended rows are transformed (and, for aggregates, their states
/// merged into the stored ones); chunks that may overwrite, late ones and fenced ones mark
/// their time buckets dirty, which are recomputed whole from stored data.
async fn incremental(
    db: &Views,
    view: &Arc<View>,
    chunks: Vec<Arc<Chunk>>,
    ranges: Vec<(i64, i64)>,
    fences: &[(i64, i64, u64)],
    max_before: Option<i64>,
    upto: u64,
) -> Result<Out, Error> {
    let plan = &view.plan;
    let options = view.def.lock().options.clone();
    // Points whose window was already final when they arrived, for `late = 'drop'`.
    let watermark = match options.late {
        super::ddl::Late::Drop => max_before.map(|m| m.saturating_sub(options.lateness_ns)),
        super::ddl::Late::Correct => None,
    };
    let mut dropped = 0u64;
    if let Some(w) = watermark {
        for c in &chunks {
            dropped += time_values(&c.batch)?
                .iter()
                .filter(|&&t| plan.time.bucket_end(t) <= w)
                .count() as u64;
        }
    }
    let (appends, ranges, keys) = dirty::classify(view, chunks, ranges, fences)?;
    if plan.time == TimeMap::None && !ranges.is_empty() {
        // Overwrites in a view without time buckets: everything is one window.
        return recompute_all(db, view, upto).await;
    }
    let dirty_out = dirty_windows(db, view, &ranges, watermark);
    let mut out_ranges = dirty_out.clone();
    let dirty_src: Vec<(i64, i64)> = dirty_out
        .iter()
        .filter_map(|&(lo, hi)| plan.time.source_range(lo, hi))
        .collect();
    // Appended rows inside a dirty window are left to its recompute: a recompute limited to
    // the dirty chunks' keys must cover their keys too.
    let keys = dirty::with_appended_keys(view, keys, &appends, &dirty_src)?.map(|k| {
        k.into_iter()
            .map(|s| s.into_iter().collect())
            .collect::<Vec<Vec<String>>>()
    });

    let mut writes = Writes::default();
    if let Some((new, range)) =
        appended_rows(db, view, &appends, watermark, &dirty_src, upto).await?
    {
        out_ranges.push(range);
        writes.batches.push(new);
    }
    let mut fences_added = Vec::new();
    for &(lo, hi) in &dirty_out {
        let Some((slo, shi)) = plan.time.source_range(lo, hi) else {
            continue;
        };
        let (new, deleted) =
            recompute(db, view, Some((slo, shi)), (lo, hi), upto, keys.as_deref()).await?;
        fences_added.push((slo, shi, read_seq(db, upto)));
        writes.batches.extend(deleted);
        writes.batches.push(new);
    }
    let rows = rows_of(view, writes)?;
    let mut st = view.status.lock();
    st.late_dropped += dropped;
    if plan.strategy == Strategy::Aggregate {
        st.fences.extend(fences_added);
    }
    Ok(Out {
        ranges: coalesce(out_ranges),
        all: false,
        rows,
    })
}

/// The dirty windows, as whole output buckets, from a floor on: with `late = 'drop'` final
/// windows are not recomputed (late points stay out), and windows whose source rows retention
/// may have dropped are kept as they are (a recompute would lose what the view still holds).
fn dirty_windows(
    db: &Views,
    view: &View,
    ranges: &[(i64, i64)],
    watermark: Option<i64>,
) -> Vec<(i64, i64)> {
    let plan = &view.plan;
    let mut floor = i64::MIN;
    if let Some(w) = watermark {
        floor = floor.max(plan.time.bucket(w));
    }
    if let Some(h) = retention_horizon(db, view) {
        let first_whole = plan.time.bucket(h);
        floor = floor.max(if first_whole < h {
            plan.time.bucket_end(h)
        } else {
            first_whole
        });
    }
    coalesce(
        ranges
            .iter()
            .filter_map(|&(lo, hi)| {
                let lo = lo.max(floor);
                if lo > hi {
                    return None;
                }
                plan.time.out_range(lo, hi)
            })
            .collect(),
    )
}

/// The view rows of the appended rows outside the dirty windows (those are recomputed whole)
/// and not late, merged into the stored states for aggregates, with their time range.
async fn appended_rows(
    db: &Views,
    view: &Arc<View>,
    appends: &[Arc<Chunk>],
    watermark: Option<i64>,
    dirty_src: &[(i64, i64)],
    upto: u64,
) -> Result<Option<(RecordBatch, (i64, i64))>, Error> {
    let plan = &view.plan;
    let mut rows: Vec<RecordBatch> = Vec::new();
    for c in appends {
        let times = time_values(&c.batch)?;
        let keep: BooleanArray = times
            .iter()
            .map(|&t| {
                let late = watermark.is_some_and(|w| plan.time.bucket_end(t) <= w);
                Some(!late && !dirty_src.iter().any(|&(lo, hi)| t >= lo && t <= hi))
            })
            .collect();
        let kept = filter_record_batch(&c.batch, &keep)?;
        if kept.num_rows() > 0 {
            rows.push(kept);
        }
    }
    if rows.is_empty() {
        return Ok(None);
    }
    let produced = run(db, view, Some(TableOverride::Rows(rows)), upto, None).await?;
    let mut new = conform(view, &produced, false)?;
    if new.num_rows() == 0 {
        return Ok(None);
    }
    let (lo, hi) = crate::storage::buffer::min_max(time_values(&new)?);
    if plan.strategy == Strategy::Aggregate {
        let stored = read_stored(db, view, lo, hi, upto, None).await?;
        new = merge_states(view, new, stored).await?;
    }
    Ok(Some((new, (lo, hi))))
}

/// Recomputes the whole view.
pub(super) async fn recompute_all(db: &Views, view: &Arc<View>, upto: u64) -> Result<Out, Error> {
    let (new, deleted) = recompute(db, view, None, (i64::MIN, i64::MAX), upto, None).await?;
    if view.plan.strategy == Strategy::Aggregate {
        // The read may have seen writes after `upto`: they must not be merged again.
        let fence = (i64::MIN, i64::MAX, read_seq(db, upto));
        view.status.lock().fences.push(fence);
    }
    let mut writes = Writes::default();
    writes.batches.extend(deleted);
    writes.batches.push(new);
    Ok(Out {
        ranges: Vec::new(),
        all: true,
        rows: rows_of(view, writes)?,
    })
}

/// Computes the view's rows in view-time range `out` (reading the primary source only in
/// `source`, or everything) and the deletions of stored rows that are no longer produced.
///
/// With `keys` (one value list per key tag of a keyed aggregate view), only those keys'
/// groups are recomputed and compared.
pub(super) async fn recompute(
    db: &Views,
    view: &Arc<View>,
    source: Option<(i64, i64)>,
    (lo, hi): (i64, i64),
    upto: u64,
    keys: Option<&[Vec<String>]>,
) -> Result<(RecordBatch, Option<RecordBatch>), Error> {
    let keyed = view.plan.keyed.as_ref().zip(keys);
    let sql = keyed.map(|(k, values)| k.sql(values));
    let over = source.map(|(a, b)| TableOverride::Range(a, b));
    let produced = run(db, view, over, upto, sql.as_deref()).await?;
    let new = conform(view, &produced, false)?;
    let key_filter = keyed.and_then(|(k, values)| {
        k.tags
            .iter()
            .zip(values)
            .map(|((out, _), vals)| {
                col(format!("\"{}\"", out.replace('"', "\"\"")))
                    .in_list(vals.iter().map(|v| lit(v.as_str())).collect(), false)
            })
            .reduce(|a, b| a.and(b))
    });
    let stored = read_stored(db, view, lo, hi, upto, key_filter).await?;
    let deleted = deletions(view, &stored, &new)?;
    Ok((new, deleted))
}

/// Source times below this may have been dropped by the primary source's retention (the
/// start of the oldest partition retention keeps now).
fn retention_horizon(db: &Views, view: &View) -> Option<i64> {
    let table = db.engine.table_by_id(view.primary_id?)?;
    let retention = table.settings.read().retention?;
    let cutoff = db.engine.config.clock.now_ns().saturating_sub(retention);
    Some(crate::storage::segment::partition_of(
        cutoff,
        db.engine.partition_len(),
    ))
}

/// The sequence maintenance reads at: at least the round's last write. The worker may run
/// before the commit step that handed it the write has published the visible sequence, but
/// every write up to `upto` is already applied to the buffers.
pub(super) fn read_seq(db: &Views, upto: u64) -> u64 {
    db.engine.visible_seq().max(upto)
}

/// Runs the view's storage SQL, with the primary source replaced by `over`.
async fn run(
    db: &Views,
    view: &View,
    over: Option<TableOverride>,
    upto: u64,
    sql: Option<&str>,
) -> Result<Vec<RecordBatch>, Error> {
    let mut snapshot = QuerySnapshot::new(read_seq(db, upto));
    if let (Some(o), Some(id)) = (over, view.primary_id) {
        snapshot.overrides.insert(id, o);
    }
    let ctx = db.query.context(&view.db, snapshot);
    let options = SQLOptions::new()
        .with_allow_ddl(false)
        .with_allow_dml(false)
        .with_allow_statements(false);
    let df = ctx
        .sql_with_options(sql.unwrap_or(&view.plan.storage_sql), options)
        .await?;
    Ok(df.collect().await?)
}

fn ts(v: i64) -> datafusion::logical_expr::Expr {
    lit(ScalarValue::TimestampNanosecond(
        Some(v),
        Some("UTC".into()),
    ))
}

/// The view's stored (not deleted) rows with time in `[lo, hi]`, in the storage schema.
async fn read_stored(
    db: &Views,
    view: &View,
    lo: i64,
    hi: i64,
    upto: u64,
    keys: Option<datafusion::logical_expr::Expr>,
) -> Result<RecordBatch, Error> {
    let ctx = db
        .query
        .context(&view.db, QuerySnapshot::new(read_seq(db, upto)));
    let provider = Arc::new(crate::query::BufferTableProvider::new(
        db.query.reader().clone(),
        view.table.clone(),
    ));
    let schema = provider_schema(view);
    let mut filter = col(DELETED).is_not_true();
    if lo > i64::MIN || hi < i64::MAX {
        filter = filter.and(col(TIME_COLUMN).between(ts(lo), ts(hi)));
    }
    if let Some(k) = keys {
        filter = filter.and(k);
    }
    let batches = ctx.read_table(provider)?.filter(filter)?.collect().await?;
    Ok(concat_batches(&schema, &batches)?)
}

fn provider_schema(view: &View) -> SchemaRef {
    view.table.schema().arrow().clone()
}

/// `batches` (as the storage SQL or a merge produced them) in the storage schema, with
/// `__deleted` set to `deleted`.
fn conform(view: &View, batches: &[RecordBatch], deleted: bool) -> Result<RecordBatch, Error> {
    let schema = provider_schema(view);
    let mut parts = Vec::with_capacity(batches.len());
    for b in batches {
        let rows = b.num_rows();
        let mut columns: Vec<ArrayRef> = Vec::with_capacity(schema.fields().len());
        for f in schema.fields() {
            let name = f.name().as_str();
            let array: ArrayRef = if name == DELETED {
                Arc::new(BooleanArray::from(vec![deleted; rows]))
            } else if name == TIME_COLUMN && !view.plan.has_time {
                Arc::new(TimestampNanosecondArray::from(vec![0i64; rows]).with_timezone("UTC"))
            } else {
                match b.column_by_name(name) {
                    None => new_null_array(f.data_type(), rows),
                    Some(a) => cast_to(a, f.data_type())?,
                }
            };
            columns.push(array);
        }
        parts.push(RecordBatch::try_new_with_options(
            schema.clone(),
            columns,
            &RecordBatchOptions::new().with_row_count(Some(rows)),
        )?);
    }
    Ok(concat_batches(&schema, &parts)?)
}

fn cast_to(a: &ArrayRef, to: &DataType) -> Result<ArrayRef, Error> {
    if a.data_type() == to {
        return Ok(a.clone());
    }
    Ok(match to {
        DataType::Dictionary(_, v) => cast(&cast(a, v)?, to)?,
        _ => cast(a, to)?,
    })
}

/// Stored rows whose key (time and tags) is not among `new`, as deletion rows.
fn deletions(
    view: &View,
    stored: &RecordBatch,
    new: &RecordBatch,
) -> Result<Option<RecordBatch>, Error> {
    if stored.num_rows() == 0 {
        return Ok(None);
    }
    let keys = key_columns(view);
    let keep: HashSet<Vec<u8>> = key_rows(&keys, new)?.into_iter().collect();
    let gone: BooleanArray = key_rows(&keys, stored)?
        .into_iter()
        .map(|k| Some(!keep.contains(&k)))
        .collect();
    let gone = filter_record_batch(stored, &gone)?;
    if gone.num_rows() == 0 {
        return Ok(None);
    }
    let only_keys: Vec<(String, ArrayRef)> = keys
        .iter()
        .filter_map(|k| gone.column_by_name(k).map(|a| (k.clone(), a.clone())))
        .collect();
    let batch = RecordBatch::try_from_iter(only_keys)?;
    // Keep the stored time (also when the view has none: it is 0 there).
    let mut out = conform(view, &[batch], true)?;
    if !view.plan.has_time {
        out = conform_time(out, &gone)?;
    }
    Ok(Some(out))
}

fn conform_time(out: RecordBatch, from: &RecordBatch) -> Result<RecordBatch, Error> {
    let Some(t) = from.column_by_name(TIME_COLUMN) else {
        return Ok(out);
    };
    let idx = out.schema().index_of(TIME_COLUMN)?;
    let mut cols = out.columns().to_vec();
    cols[idx] = t.clone();
    Ok(RecordBatch::try_new(out.schema(), cols)?)
}

/// Storage columns that identify a view row: `time` and the key tags.
fn key_columns(view: &View) -> Vec<String> {
    let mut keys = vec![TIME_COLUMN.to_string()];
    keys.extend(
        view.plan
            .columns
            .iter()
            .filter(|(_, c)| matches!(c, OutColumn::Key))
            .map(|(n, _)| n.clone()),
    );
    keys
}

fn key_rows(keys: &[String], batch: &RecordBatch) -> Result<Vec<Vec<u8>>, Error> {
    use arrow::row::{RowConverter, SortField};
    let columns: Vec<ArrayRef> = keys
        .iter()
        .filter_map(|k| batch.column_by_name(k).cloned())
        .collect();
    let converter = RowConverter::new(
        columns
            .iter()
            .map(|c| SortField::new(c.data_type().clone()))
            .collect(),
    )?;
    let rows = converter.convert_columns(&columns)?;
    Ok(rows.iter().map(|r| r.data().to_vec()).collect())
}

/// Merges delta states `d` with the stored states `s` of the same keys.
async fn merge_states(view: &View, d: RecordBatch, s: RecordBatch) -> Result<RecordBatch, Error> {
    let ctx = SessionContext::new();
    ctx.register_batch("d", d)?;
    ctx.register_batch("s", s)?;
    let keys = key_columns(view);
    let mut list: Vec<String> = keys
        .iter()
        .map(|k| format!("d.{q} AS {q}", q = quote(k)))
        .collect();
    for (i, (_, c)) in view.plan.columns.iter().enumerate() {
        if let OutColumn::State(agg) = c {
            let merges = agg.merges(&|suffix| quote(&ViewPlan::state_column(i, suffix)));
            for ((suffix, _), m) in agg.states().iter().zip(merges) {
                list.push(format!(
                    "{m} AS {}",
                    quote(&ViewPlan::state_column(i, suffix))
                ));
            }
        }
    }
    let on: Vec<String> = keys
        .iter()
        .map(|k| format!("(d.{q} IS NOT DISTINCT FROM s.{q})", q = quote(k)))
        .collect();
    let sql = format!(
        "SELECT {} FROM d LEFT JOIN s ON {}",
        list.join(", "),
        on.join(" AND ")
    );
    let batches = ctx.sql(&sql).await?.collect().await?;
    conform(view, &batches, false)
}

/// A round's rows for the view's storage table, as one batch (None when there are none).
fn rows_of(view: &View, writes: Writes) -> Result<Option<RecordBatch>, Error> {
    let schema = provider_schema(view);
    let batches: Vec<RecordBatch> = writes
        .batches
        .into_iter()
        .filter(|b| b.num_rows() > 0)
        .collect();
    let rows = concat_batches(&schema, &batches)?;
    Ok((rows.num_rows() > 0).then_some(rows))
}

/// Writes rows of one view now, with its applied sequence (backfill pieces).
pub(super) async fn write(db: &Views, view: &View, writes: Writes, upto: u64) -> Result<(), Error> {
    let rows = rows_of(view, writes)?;
    let n = rows.as_ref().map_or(0, |r| r.num_rows() as u64);
    let mut tables = vec![(
        PROGRESS_TABLE.to_string(),
        progress_batch(&[view.name()], upto)?,
    )];
    if let Some(rows) = rows {
        tables.insert(0, (view.table.name.to_string(), rows));
    }
    write_tables(db, &view.db, tables).await?;
    view.status.lock().rows_written += n;
    Ok(())
}

/// One system write of several tables of database `db` (off the async thread).
pub(crate) async fn write_tables(
    db: &Views,
    db_name: &str,
    tables: Vec<(String, RecordBatch)>,
) -> Result<u64, Error> {
    let engine = db.engine.clone();
    let db_name = db_name.to_string();
    tokio::task::spawn_blocking(move || super::write_system(&engine, &db_name, tables))
        .await
        .map_err(|e| internal(format!("view write task failed: {e}")))?
}

/// Progress rows saying `views` have applied every write up to `upto`.
pub(crate) fn progress_batch(views: &[String], upto: u64) -> Result<RecordBatch, Error> {
    let names: Vec<&str> = views.iter().map(String::as_str).collect();
    let n = names.len();
    let dict = cast(
        &(Arc::new(StringArray::from(names)) as ArrayRef),
        &DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
    )?;
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            TIME_COLUMN,
            DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, Some("UTC".into())),
            false,
        ),
        Field::new("view", dict.data_type().clone(), true),
        Field::new("applied", DataType::UInt64, true),
    ]));
    Ok(RecordBatch::try_new(
        schema,
        vec![
            Arc::new(TimestampNanosecondArray::from(vec![0i64; n]).with_timezone("UTC")),
            dict,
            Arc::new(UInt64Array::from(vec![upto; n])),
        ],
    )?)
}
