//! What a subscription's query is, and turning a source's change-log entries into its changes.
//!
//! A subscribable query is `SELECT <columns or expressions> FROM <one view or table>
//! [WHERE <predicate>]`. Its filter and projection are compiled once (DataFusion physical
//! expressions over the source's columns) and shared by every subscriber with the same query,
//! as are the changes computed from each log entry.

use std::collections::{HashSet, VecDeque};
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, AsArray, BooleanArray, RecordBatch, UInt32Array};
use arrow::compute::{cast, concat_batches, take_record_batch};
use arrow::datatypes::{Field, Schema, SchemaRef};
use arrow::row::{RowConverter, SortField};
use datafusion::common::DFSchemaRef;
use datafusion::execution::SessionState;
use datafusion::logical_expr::{Expr, LogicalPlan};
use datafusion::physical_expr::PhysicalExpr;

use super::log::{Entry, EntryData, Source, SourceKind};
use super::{Op, SubscribeError};
use crate::error::Error;
use crate::storage::catalog::TIME_COLUMN;
use crate::storage::table::Table;
use crate::views::View;
use crate::views::ddl::Emit;
use crate::views::emit::conform;
use crate::views::plan::{OutColumn, TimeMap};

fn unsupported(m: impl Into<String>) -> Error {
    Error::Subscribe(SubscribeError::Unsupported(m.into()))
}

fn internal(e: impl std::fmt::Display) -> Error {
    Error::Subscribe(SubscribeError::Internal(e.to_string()))
}

/// The source a query reads.
pub(crate) enum Target {
    View(Arc<View>),
    Table(Arc<Table>),
}

/// A query found subscribable: its source, filter and projection.
pub(crate) struct Analysed {
    pub source: Target,
    filter: Option<(Expr, DFSchemaRef)>,
    projection: Option<(Vec<Expr>, DFSchemaRef)>,
    scan: SchemaRef,
    output: SchemaRef,
}

/// Why a plan node cannot be kept current, and what to do instead.
fn refusal(plan: &LogicalPlan) -> String {
    match plan {
        LogicalPlan::Aggregate(_) => "an aggregate query is kept current by a materialized \
             view"
            .to_string(),
        LogicalPlan::Sort(_) => {
            "ORDER BY: a change stream has no order (sort on the client)".to_string()
        }
        LogicalPlan::Limit(_) => {
            "LIMIT/OFFSET: which rows are in a limited result changes with every write".to_string()
        }
        LogicalPlan::Join(_) => "joins are kept current by a materialized view: CREATE \
             MATERIALIZED VIEW … AS <this query>, then subscribe to it"
            .to_string(),
        LogicalPlan::Window(_) => "window functions are kept current by a materialized view: \
             CREATE MATERIALIZED VIEW … AS <this query>, then subscribe to it"
            .to_string(),
        LogicalPlan::Distinct(_) => "DISTINCT is kept current by a materialized view (GROUP BY \
             the columns), then subscribe to it"
            .to_string(),
        other => format!(
            "only SELECT … FROM <one table or materialized view> [WHERE …] can be subscribed \
             (this query has a {} step)",
            other.display()
        ),
    }
}

/// Whether `plan` is a query a materialized view keeps current (an aggregate, join, window or
/// DISTINCT, not under an ORDER BY or LIMIT): subscriptions to it go through a shared view.
pub(crate) fn needs_view(plan: &LogicalPlan) -> bool {
    let mut node = plan;
    loop {
        match node {
            LogicalPlan::Projection(p) => node = &p.input,
            LogicalPlan::Filter(f) => node = &f.input,
            LogicalPlan::SubqueryAlias(a) => node = &a.input,
            LogicalPlan::Aggregate(_)
            | LogicalPlan::Join(_)
            | LogicalPlan::Window(_)
            | LogicalPlan::Distinct(_) => return true,
            _ => return false,
        }
    }
}

/// Finds what `plan` (unoptimized, as planned from SQL) reads and computes.
pub(crate) fn analyse(
    views: &crate::views::Views,
    default_db: &str,
    plan: &LogicalPlan,
) -> Result<Analysed, Error> {
    let mut node = plan;
    let mut projection = None;
    let mut filter = None;
    if let LogicalPlan::Projection(p) = node {
        projection = Some((p.expr.clone(), p.input.schema().clone()));
        node = &p.input;
    }
    if let LogicalPlan::Filter(f) = node {
        filter = Some((f.predicate.clone(), f.input.schema().clone()));
        node = &f.input;
    }
    while let LogicalPlan::SubqueryAlias(a) = node {
        node = &a.input;
    }
    let LogicalPlan::TableScan(scan) = node else {
        return Err(unsupported(refusal(node)));
    };
    let name = &scan.table_name;
    let database = name.schema().unwrap_or(default_db);
    if database == "system" || name.catalog().is_some_and(|c| c != "rivulet") {
        return Err(unsupported(format!(
            "'{name}' is not a table or materialized view of a database"
        )));
    }
    let table = name.table();
    let source = match views.get(database, table) {
        Some(v) => Target::View(v),
        None => match views.engine.catalog().table(database, table) {
            Some(t) => Target::Table(t),
            None => return Err(unsupported(format!("no table or view '{name}'"))),
        },
    };
    let output = Arc::new(Schema::new(
        plan.schema()
            .fields()
            .iter()
            .map(|f| f.as_ref().clone().with_nullable(true))
            .collect::<Vec<Field>>(),
    ));
    Ok(Analysed {
        source,
        filter,
        projection,
        scan: Arc::new(scan.projected_schema.as_arrow().clone()),
        output,
    })
}

/// A snapshot part's rows, ops and final flags.
pub(crate) type SnapshotPart = (RecordBatch, Arc<[Op]>, Option<Arc<[bool]>>);

/// One entry's changes for one query.
pub(crate) struct Processed {
    pub seq: u64,
    pub applied: u64,
    pub rows: RecordBatch,
    pub ops: Arc<[Op]>,
    pub finals: Option<Arc<[bool]>>,
    pub json: Arc<OnceLock<String>>,
}

/// A compiled subscription query, shared by its subscribers.
pub(crate) struct Feed {
    pub schema: SchemaRef,
    /// The source columns the expressions read (entries are conformed to them).
    input: SchemaRef,
    filter: Option<Arc<dyn PhysicalExpr>>,
    /// The filter reads key columns only (rows that do not match never were in the result).
    filter_on_keys: bool,
    projection: Vec<Arc<dyn PhysicalExpr>>,
    /// Output indexes of the key columns (keyed results).
    keys: Option<Vec<usize>>,
    /// Output index of `time` and how the view buckets it (views with a time bucket).
    window: Option<(usize, TimeMap)>,
    emit: Emit,
    table: Option<Arc<Table>>,
    cache: parking_lot::Mutex<VecDeque<(u64, Option<Arc<Processed>>)>>,
}

const CACHE_ENTRIES: usize = 4096;

impl Feed {
    pub(crate) fn new(state: &SessionState, source: &Source, a: Analysed) -> Result<Feed, Error> {
        let filter = match &a.filter {
            Some((e, schema)) => Some(state.create_physical_expr(e.clone(), schema)?),
            None => None,
        };
        let projection = match &a.projection {
            Some((exprs, schema)) => exprs
                .iter()
                .map(|e| state.create_physical_expr(e.clone(), schema))
                .collect::<Result<Vec<_>, _>>()?,
            None => {
                let schema = datafusion::common::DFSchema::try_from(a.scan.as_ref().clone())?;
                a.scan
                    .fields()
                    .iter()
                    .map(|f| {
                        state.create_physical_expr(
                            Expr::Column(datafusion::common::Column::new_unqualified(f.name())),
                            &schema,
                        )
                    })
                    .collect::<Result<Vec<_>, _>>()?
            }
        };
        let (keys, window, emit, filter_on_keys, table) = match &source.kind {
            SourceKind::View(view) => {
                let mut key_names: Vec<String> = Vec::new();
                if view.plan.has_time {
                    key_names.push(TIME_COLUMN.to_string());
                }
                key_names.extend(
                    view.plan
                        .columns
                        .iter()
                        .filter(|(_, c)| matches!(c, OutColumn::Key))
                        .map(|(n, _)| n.clone()),
                );
                let exprs: Vec<Option<String>> = match &a.projection {
                    Some((exprs, _)) => exprs
                        .iter()
                        .map(|e| match e {
                            Expr::Column(c) => Some(c.name.clone()),
                            _ => None,
                        })
                        .collect(),
                    None => a
                        .scan
                        .fields()
                        .iter()
                        .map(|f| Some(f.name().clone()))
                        .collect(),
                };
                let mut keys = Vec::new();
                for k in &key_names {
                    let found = exprs.iter().enumerate().position(|(i, e)| {
                        e.as_deref() == Some(k.as_str()) && a.output.field(i).name() == k
                    });
                    match found {
                        Some(i) => keys.push(i),
                        None => {
                            return Err(unsupported(format!(
                                "a subscription to materialized view '{}' must select its key \
                                 columns ({}) unchanged: changes are applied by key",
                                view.name(),
                                key_names.join(", ")
                            )));
                        }
                    }
                }
                let window = (view.plan.has_time && view.plan.time != TimeMap::None)
                    .then(|| (keys[0], view.plan.time));
                let filter_on_keys = a.filter.as_ref().is_none_or(|(e, _)| {
                    e.column_refs().iter().all(|c| key_names.contains(&c.name))
                });
                let emit = view.def.lock().options.emit;
                (Some(keys), window, emit, filter_on_keys, None)
            }
            SourceKind::Table(t) => (None, None, Emit::OnChange, true, Some(t.clone())),
        };
        Ok(Feed {
            schema: a.output,
            input: a.scan,
            filter,
            filter_on_keys,
            projection,
            keys,
            window,
            emit,
            table,
            cache: parking_lot::Mutex::new(VecDeque::new()),
        })
    }

    /// Keyed results (views) take upserts and deletes; the others are appends.
    pub(crate) fn keyed(&self) -> bool {
        self.keys.is_some()
    }

    /// The changes entry `e` makes to this query's result (None: none), computed once.
    pub(crate) fn process(&self, e: &Arc<Entry>) -> Result<Option<Arc<Processed>>, Error> {
        {
            let cache = self.cache.lock();
            if let Ok(i) = cache.binary_search_by_key(&e.seq, |c| c.0) {
                return Ok(cache[i].1.clone());
            }
        }
        let p = self.compute(e)?.map(Arc::new);
        let mut cache = self.cache.lock();
        match cache.binary_search_by_key(&e.seq, |c| c.0) {
            Ok(i) => return Ok(cache[i].1.clone()),
            Err(i) => cache.insert(i, (e.seq, p.clone())),
        }
        while cache.len() > CACHE_ENTRIES {
            cache.pop_front();
        }
        Ok(p)
    }

    fn mask(&self, batch: &RecordBatch) -> Result<Vec<bool>, Error> {
        let n = batch.num_rows();
        let Some(f) = &self.filter else {
            return Ok(vec![true; n]);
        };
        let v = f.evaluate(batch)?.into_array(n)?;
        let b = v
            .as_boolean_opt()
            .ok_or_else(|| internal("the filter is not a boolean"))?;
        Ok((0..n).map(|i| b.is_valid(i) && b.value(i)).collect())
    }

    fn project(&self, batch: &RecordBatch) -> Result<RecordBatch, Error> {
        let n = batch.num_rows();
        let columns = self
            .projection
            .iter()
            .zip(self.schema.fields())
            .map(|(e, f)| {
                let a = e.evaluate(batch)?.into_array(n)?;
                if a.data_type() == f.data_type() {
                    Ok(a)
                } else {
                    Ok(cast(&a, f.data_type())?)
                }
            })
            .collect::<Result<Vec<ArrayRef>, Error>>()?;
        Ok(RecordBatch::try_new_with_options(
            self.schema.clone(),
            columns,
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(n)),
        )?)
    }

    /// Whether each row's window is final at `watermark`.
    fn finals(&self, rows: &RecordBatch, watermark: Option<i64>) -> Option<Vec<bool>> {
        let (i, time) = self.window?;
        let t = rows
            .column(i)
            .as_primitive_opt::<arrow::datatypes::TimestampNanosecondType>()?;
        Some(
            (0..rows.num_rows())
                .map(|r| {
                    t.is_valid(r) && watermark.is_some_and(|w| time.bucket_end(t.value(r)) <= w)
                })
                .collect(),
        )
    }

    fn compute(&self, e: &Entry) -> Result<Option<Processed>, Error> {
        let (rows, ops) = match &e.data {
            EntryData::View { rows, deleted } => {
                let rows = conform(rows, &self.input)?;
                let mask = self.mask(&rows)?;
                let mut idx = Vec::new();
                let mut ops = Vec::new();
                for (i, &m) in mask.iter().enumerate() {
                    let del = deleted.is_valid(i) && deleted.value(i);
                    let op = if del {
                        (m || !self.filter_on_keys).then_some(Op::Delete)
                    } else if m {
                        Some(Op::Upsert)
                    } else {
                        (!self.filter_on_keys).then_some(Op::Delete)
                    };
                    if let Some(op) = op {
                        idx.push(i as u32);
                        ops.push(op);
                    }
                }
                if idx.is_empty() {
                    return Ok(None);
                }
                let taken = take_record_batch(&rows, &UInt32Array::from(idx))?;
                (self.project(&taken)?, ops)
            }
            EntryData::Chunk(chunk) => {
                let Some(table) = &self.table else {
                    return Ok(None);
                };
                let schema = table.schema();
                let all: Vec<usize> = (0..schema.columns().len()).collect();
                let full = chunk.project(&schema, &all, schema.arrow())?;
                let rows = conform(&full, &self.input)?;
                let mask = self.mask(&rows)?;
                if !mask.iter().any(|m| *m) {
                    return Ok(None);
                }
                let rows = arrow::compute::filter_record_batch(&rows, &BooleanArray::from(mask))?;
                let n = rows.num_rows();
                (self.project(&rows)?, vec![Op::Insert; n])
            }
        };
        let finals = match self.emit {
            Emit::OnChange => self.finals(&rows, e.watermark).map(Arc::from),
            Emit::OnWindowClose => None,
        };
        Ok(Some(Processed {
            seq: e.seq,
            applied: e.applied,
            rows,
            ops: Arc::from(ops),
            finals,
            json: Arc::new(OnceLock::new()),
        }))
    }

    /// A snapshot part: its ops and final flags (windows not yet final are left out for
    /// `emit = 'on_window_close'`).
    pub(crate) fn snapshot_rows(
        &self,
        rows: RecordBatch,
        watermark: Option<i64>,
    ) -> Result<SnapshotPart, Error> {
        let rows = conform(&rows, &self.schema)?;
        let op = if self.keyed() { Op::Upsert } else { Op::Insert };
        let finals = self.finals(&rows, watermark);
        match (self.emit, finals) {
            (Emit::OnWindowClose, Some(f)) if self.window.is_some() => {
                let rows = arrow::compute::filter_record_batch(&rows, &BooleanArray::from(f))?;
                let n = rows.num_rows();
                Ok((rows, Arc::from(vec![op; n]), None))
            }
            (Emit::OnWindowClose, _) => {
                let n = rows.num_rows();
                Ok((rows, Arc::from(vec![op; n]), None))
            }
            (Emit::OnChange, finals) => {
                let n = rows.num_rows();
                Ok((rows, Arc::from(vec![op; n]), finals.map(Arc::from)))
            }
        }
    }

    /// Several changes as one: the latest row per key (keyed results only).
    pub(crate) fn conflate(&self, parts: &[Arc<Processed>]) -> Result<Processed, Error> {
        let keys = self.keys.clone().unwrap_or_default();
        let last = parts
            .last()
            .ok_or_else(|| internal("nothing to conflate"))?;
        let batches: Vec<RecordBatch> = parts.iter().map(|p| p.rows.clone()).collect();
        let rows = concat_batches(&self.schema, &batches)?;
        let ops: Vec<Op> = parts.iter().flat_map(|p| p.ops.iter().copied()).collect();
        let finals: Option<Vec<bool>> = parts
            .iter()
            .map(|p| p.finals.as_ref().map(|f| f.to_vec()))
            .collect::<Option<Vec<_>>>()
            .map(|v| v.concat());
        let converter = RowConverter::new(
            keys.iter()
                .map(|&i| SortField::new(self.schema.field(i).data_type().clone()))
                .collect(),
        )?;
        let columns: Vec<ArrayRef> = keys.iter().map(|&i| rows.column(i).clone()).collect();
        let converted = converter.convert_columns(&columns)?;
        let mut seen = HashSet::new();
        let mut keep: Vec<u32> = Vec::new();
        for i in (0..rows.num_rows()).rev() {
            if seen.insert(converted.row(i)) {
                keep.push(i as u32);
            }
        }
        keep.reverse();
        let out = take_record_batch(&rows, &UInt32Array::from(keep.clone()))?;
        Ok(Processed {
            seq: last.seq,
            applied: last.applied,
            rows: out,
            ops: keep.iter().map(|&i| ops[i as usize]).collect(),
            finals: finals.map(|f| keep.iter().map(|&i| f[i as usize]).collect()),
            json: Arc::new(OnceLock::new()),
        })
    }
}
