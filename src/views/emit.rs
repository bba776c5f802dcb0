//! What a view write means to its subscribers: the changed storage rows as the view's
//! columns, which of them are deletions, and, for `emit = 'on_window_close'`, only the
//! windows that are final (the watermark: the primary source's largest time minus the
//! lateness).

use std::sync::{Arc, OnceLock};

use arrow::array::{
    Array, ArrayRef, BooleanArray, RecordBatch, TimestampNanosecondArray, new_null_array,
};
use arrow::compute::cast;
use arrow::datatypes::{Field, Schema, SchemaRef};

use super::ddl::Emit;
use super::plan::TimeMap;
use super::{View, Views};
use crate::error::Error;

/// The view's watermark: its primary source's largest time minus the lateness (None
/// without a time bucket or before any data).
pub(crate) fn watermark(view: &View) -> Option<i64> {
    if !view.plan.has_time || view.plan.time == TimeMap::None {
        return None;
    }
    let lateness = view.def.lock().options.lateness_ns;
    view.status
        .lock()
        .max_source_time
        .map(|m| m.saturating_sub(lateness))
}

/// Storage rows of `view` as its columns, and which are deletions.
fn final_rows(view: &View, rows: &RecordBatch) -> Result<(RecordBatch, BooleanArray), Error> {
    let storage = rows.schema();
    let exprs = super::provider::final_columns(&view.plan, &storage);
    let df_schema = datafusion::common::DFSchema::try_from(storage.as_ref().clone())?;
    // Built once: a session's function registry is costly to build every round.
    static CONTEXT: OnceLock<datafusion::prelude::SessionContext> = OnceLock::new();
    let ctx = CONTEXT.get_or_init(datafusion::prelude::SessionContext::new);
    let n = rows.num_rows();
    let schema = &view.provider.schema;
    let df_schema = Arc::new(df_schema);
    // Physical expressions need what the optimizer would do first (coalesce becomes CASE).
    let simplifier = datafusion::optimizer::simplify_expressions::ExprSimplifier::new(
        datafusion::logical_expr::simplify::SimplifyContext::builder()
            .with_schema(df_schema.clone())
            .build(),
    );
    let mut columns = Vec::with_capacity(exprs.len());
    for ((_, e), f) in exprs.into_iter().zip(schema.fields()) {
        let a = ctx
            .create_physical_expr(simplifier.simplify(e)?, &df_schema)?
            .evaluate(rows)?
            .into_array(n)?;
        columns.push(if a.data_type() == f.data_type() {
            a
        } else {
            arrow::compute::cast(&a, f.data_type())?
        });
    }
    let nullable = Arc::new(arrow::datatypes::Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<_>>(),
    ));
    let out = RecordBatch::try_new_with_options(
        nullable,
        columns,
        &arrow::array::RecordBatchOptions::new().with_row_count(Some(n)),
    )?;
    let deleted = match rows
        .column_by_name(super::provider::DELETED)
        .and_then(|a| arrow::array::AsArray::as_boolean_opt(a.as_ref()).cloned())
    {
        Some(d) => d,
        None => BooleanArray::from(vec![false; n]),
    };
    Ok((out, deleted))
}

/// What a view write means to subscribers: the changed rows as the view's columns. For
/// `emit = 'on_window_close'`, only rows of final windows: late corrections to windows
/// already closed, plus every row of the windows this write closed (read from the view).
pub(crate) async fn view_entry(
    views: &Views,
    view: &Arc<View>,
    rows: &RecordBatch,
    seq: u64,
) -> Result<(Option<(RecordBatch, BooleanArray)>, Option<i64>), Error> {
    let (rows, deleted) = final_rows(view, rows)?;
    let new_wm = watermark(view);
    let emit = view.def.lock().options.emit;
    let map = view.plan.time;
    if emit == Emit::OnChange || new_wm.is_none() {
        return Ok((Some((rows, deleted)), new_wm));
    }
    let old_wm = views.observer().and_then(|o| o.emitted_watermark(view));
    let time = rows
        .column_by_name(crate::storage::catalog::TIME_COLUMN)
        .and_then(|a| {
            arrow::array::AsArray::as_primitive_opt::<arrow::datatypes::TimestampNanosecondType>(
                a.as_ref(),
            )
            .cloned()
        });
    let Some(time) = time else {
        return Ok((Some((rows, deleted)), new_wm));
    };
    // Corrections to windows that were already closed.
    let closed = final_mask(&time, map, old_wm);
    let mut parts = vec![arrow::compute::filter_record_batch(&rows, &closed)?];
    let mut dels = vec![arrow::compute::filter(&deleted, &closed)?];
    if let (Some(new), old) = (new_wm, old_wm)
        && old.is_none_or(|o| new > o)
    {
        // Windows whose end is in (old, new]: start in (old - stride, new - stride].
        let stride = match map {
            TimeMap::Bin { stride, .. } => stride,
            _ => 1,
        };
        let hi = new.saturating_sub(stride);
        let lo = old.map_or(i64::MIN, |o| o.saturating_sub(stride).saturating_add(1));
        if lo <= hi {
            let sql = format!(
                "SELECT * FROM {} WHERE time >= to_timestamp_nanos({lo}) AND time <= to_timestamp_nanos({hi})",
                super::plan::quote(&view.name())
            );
            let ctx = views
                .query
                .context(&view.db, crate::query::QuerySnapshot::new(seq));
            let batches = ctx.sql(&sql).await?.collect().await?;
            for b in batches {
                let b = conform(&b, &rows.schema())?;
                let n = b.num_rows();
                parts.push(b);
                dels.push(Arc::new(BooleanArray::from(vec![false; n])));
            }
        }
    }
    let out = arrow::compute::concat_batches(&rows.schema(), &parts)?;
    let refs: Vec<&dyn Array> = dels.iter().map(|a| a.as_ref()).collect();
    let deleted = arrow::compute::concat(&refs)?;
    let deleted = arrow::array::AsArray::as_boolean(deleted.as_ref()).clone();
    Ok((Some((out, deleted)), new_wm))
}

/// `batch` with exactly `schema`'s columns, by name: missing columns are null, others cast.
pub(crate) fn conform(batch: &RecordBatch, schema: &SchemaRef) -> Result<RecordBatch, Error> {
    if batch.schema().fields() == schema.fields() {
        return Ok(batch.clone());
    }
    let n = batch.num_rows();
    let columns = schema
        .fields()
        .iter()
        .map(|f| match batch.column_by_name(f.name()) {
            Some(a) if a.data_type() == f.data_type() => Ok(a.clone()),
            Some(a) => Ok(cast(a, f.data_type())?),
            None => Ok(new_null_array(f.data_type(), n)),
        })
        .collect::<Result<Vec<ArrayRef>, Error>>()?;
    let nullable = Arc::new(Schema::new(
        schema
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<Field>>(),
    ));
    Ok(RecordBatch::try_new_with_options(
        nullable,
        columns,
        &arrow::array::RecordBatchOptions::new().with_row_count(Some(n)),
    )?)
}

/// Keeps only rows whose window closed at `watermark` (for the worker's on-window-close logs):
/// `time` is the view's time column (nanoseconds).
pub(crate) fn final_mask(
    time: &TimestampNanosecondArray,
    map: TimeMap,
    watermark: Option<i64>,
) -> BooleanArray {
    (0..time.len())
        .map(|r| {
            Some(time.is_valid(r) && watermark.is_some_and(|w| map.bucket_end(time.value(r)) <= w))
        })
        .collect()
}
