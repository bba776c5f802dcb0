//! The [`TableProvider`] of a Rivulet table: the buffer's chunks, deduplicated, projected onto
//! the table schema, with chunks outside the query's time range skipped.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::sink::DataSinkExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Between, BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;

use super::Reader;
use super::insert::TableSink;
use super::{QuerySnapshot, TableOverride};
use crate::storage::buffer::{
    Chunk, merge_batches, merge_chunks, project_batch, projected_schema, to_table_schema,
};
use crate::storage::catalog::{ColumnKind, TIME_COLUMN, TableSchema};
use crate::storage::segment::Segment;
use crate::storage::segment_scan;
use crate::storage::table::Table;
use datafusion::arrow::array::RecordBatch;
use datafusion::common::DFSchema;
use datafusion::logical_expr::col;
use datafusion::logical_expr::utils::conjunction;
use datafusion::physical_expr::expressions::col as physical_col;
use datafusion::physical_plan::collect;
use datafusion::physical_plan::filter::FilterExec;
use datafusion::physical_plan::projection::ProjectionExec;
use datafusion::physical_plan::union::UnionExec;

/// Reads one table.
#[derive(Debug)]
pub(crate) struct BufferTableProvider {
    reader: Arc<Reader>,
    table: Arc<Table>,
    /// The schema as of planning: scans project onto it even if columns are added meanwhile.
    schema: Arc<TableSchema>,
    time_default: Expr,
}

impl BufferTableProvider {
    /// The table it reads.
    pub(crate) fn table(&self) -> &Arc<Table> {
        &self.table
    }

    pub(crate) fn new(reader: Arc<Reader>, table: Arc<Table>) -> BufferTableProvider {
        let schema = table.schema();
        BufferTableProvider {
            reader,
            table,
            schema,
            time_default: datafusion::functions::expr_fn::now(),
        }
    }

    /// The table's name.
    pub(crate) fn name(&self) -> &str {
        &self.table.name
    }

    /// The kind of column `name` in the planning-time schema.
    pub(crate) fn column_kind(&self, name: &str) -> Option<ColumnKind> {
        self.schema.column(name).map(|c| c.kind)
    }

    /// The latest point of every series (projected), as a scan, and the number of rows; None
    /// when the last-point state cannot stand for this query's snapshot: it holds a write newer
    /// than the query's sequence (a commit being applied), or the query is view maintenance.
    pub(crate) fn last_points(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
    ) -> Result<Option<(Arc<dyn ExecutionPlan>, usize)>> {
        let snapshot = state.config().get_extension::<QuerySnapshot>();
        if snapshot.as_ref().is_some_and(|s| !s.overrides.is_empty()) {
            return Ok(None);
        }
        let visible = snapshot
            .map(|s| s.seq())
            .unwrap_or_else(|| self.reader.engine.visible_seq());
        let last = self.table.last.lock().snapshot();
        if last.max_seq() > visible {
            return Ok(None);
        }
        let schema = self.table.schema();
        let (mut batch, _) = last.to_batch(&schema)?;
        if self.table.settings.read().retention.is_some() {
            // Retention drops whole partitions, oldest first: a series' latest point older
            // than every row left is no longer in the table.
            let buffer = self.table.buffer.read().snapshot();
            let earliest = buffer
                .segments
                .iter()
                .map(|s| s.meta.min_time)
                .chain(
                    buffer
                        .frozen
                        .iter()
                        .chain(&buffer.chunks)
                        .map(|c| c.min_time),
                )
                .min()
                .unwrap_or(i64::MAX);
            let times = crate::storage::buffer::time_values(&batch)?;
            let keep =
                arrow::array::BooleanArray::from_iter(times.iter().map(|&t| Some(t >= earliest)));
            batch = arrow::compute::filter_record_batch(&batch, &keep)?;
        }
        let (columns, out_schema) = self.projected(projection);
        let projected = project_batch(&batch, &self.schema, &columns, &out_schema)?;
        let rows = projected.num_rows();
        let exec = MemorySourceConfig::try_new_exec(&[vec![projected]], out_schema, None)?;
        Ok(Some((exec, rows)))
    }

    /// The columns a scan reads (all without a projection) and their schema.
    fn projected(&self, projection: Option<&Vec<usize>>) -> (Vec<usize>, SchemaRef) {
        let columns: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.columns().len()).collect(),
        };
        let out_schema = projected_schema(&self.schema, &columns);
        (columns, out_schema)
    }

    /// Whether segment scans apply filters while decoding (`Config::parquet_filter_pushdown`).
    fn pushdown(&self) -> bool {
        self.reader.engine.config.parquet_filter_pushdown
    }

    /// What the query reads in `[lo, hi]`.
    ///
    /// Live chunks that may overwrite each other are merged first (and the merge installed, so
    /// later queries reuse it). When no chunk may overwrite older points, no two sources share
    /// a point and they are read as they are. Otherwise the overwritten points can only lie in
    /// the time ranges of the chunks that may overwrite: the segments' rows in those ranges
    /// are merged with the buffered rows, the rest of those segments is read as it is.
    fn sources(
        &self,
        snapshot_seq: Option<u64>,
        columns: &[usize],
        out_schema: &SchemaRef,
        (lo, hi): (i64, i64),
    ) -> Result<Sources> {
        // The query's sequence, read before the buffer: every chunk up to it is in the buffer.
        let visible = snapshot_seq.unwrap_or_else(|| self.reader.engine.visible_seq());
        let mut snap = self.table.buffer.read().snapshot().up_to(visible);
        if snap.needs_dedup() {
            // The schema read after the snapshot covers every column of its chunks: writers
            // publish columns before their chunks become visible.
            let schema = self.table.schema();
            let total: usize = snap.chunks.iter().map(|c| c.rows()).sum();
            let parts = if lo > i64::MIN || hi < i64::MAX {
                // All rows of a point share its time, so merging only the rows in the range is
                // exact for this query. Worth it (nothing installed) when they are few, as for
                // view maintenance reading the buckets a write touched.
                let parts = snap
                    .chunks
                    .iter()
                    .filter(|c| c.max_time >= lo && c.min_time <= hi)
                    .map(|c| restrict(c, lo, hi))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                let rows: usize = parts.iter().map(|c| c.rows()).sum();
                (rows * 4 < total).then_some(parts)
            } else {
                None
            };
            match parts {
                Some(parts) if parts.is_empty() => snap.chunks.clear(),
                Some(parts) => snap.chunks = vec![Arc::new(merge_chunks(&schema, &parts)?)],
                None => {
                    let merged = Arc::new(merge_chunks(&schema, &snap.chunks)?);
                    self.table
                        .buffer
                        .write()
                        .install_merged(&snap.chunks, merged.clone());
                    snap.chunks = vec![merged];
                }
            }
        }
        let in_range = |c: &&Arc<Chunk>| c.max_time >= lo && c.min_time <= hi;
        let ranges: Vec<(i64, i64)> = snap
            .frozen
            .iter()
            .chain(&snap.chunks)
            .filter(in_range)
            // Frozen chunks were not necessarily merged with each other.
            .filter(|c| c.over_persisted || (c.overlaps && !c.merged))
            .map(|c| (c.min_time.max(lo), c.max_time.min(hi)))
            .collect();
        let segments: Vec<Arc<Segment>> = snap
            .segments
            .iter()
            .filter(|s| s.overlaps(lo, hi))
            .cloned()
            .collect();
        let chunks: Vec<&Arc<Chunk>> = snap
            .frozen
            .iter()
            .chain(&snap.chunks)
            .filter(in_range)
            .collect();
        let (involved, files): (Vec<_>, Vec<_>) = segments
            .into_iter()
            .partition(|s| ranges.iter().any(|&(a, b)| s.overlaps(a, b)));
        if involved.is_empty() && ranges.is_empty() {
            let batches = chunks
                .iter()
                .map(|c| c.project(&self.schema, columns, out_schema))
                .collect::<std::result::Result<Vec<_>, _>>()?;
            return Ok(Sources {
                batches,
                files,
                overwrite: None,
            });
        }
        let schema = self.table.schema();
        let all: Vec<usize> = (0..schema.columns().len()).collect();
        let buffered = chunks
            .iter()
            .map(|c| c.project(&schema, &all, schema.arrow()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Sources {
            batches: Vec::new(),
            files,
            overwrite: Some(Overwrite {
                schema,
                buffered,
                involved,
                ranges,
            }),
        })
    }

    /// Plans the overwrite case of [`Self::sources`]: returns the merged rows (projected) and
    /// a plan for the involved segments' rows outside the overwritten ranges.
    async fn plan_overwrite(
        &self,
        state: &dyn Session,
        ow: Overwrite,
        columns: &[usize],
        out_schema: &SchemaRef,
        filters: &[Expr],
    ) -> Result<(RecordBatch, Option<Arc<dyn ExecutionPlan>>)> {
        let partitions = state.config().target_partitions().max(1);
        let table_df = DFSchema::try_from(self.schema.arrow().as_ref().clone())?;
        let time_lit = |v: i64| {
            Expr::Literal(
                ScalarValue::TimestampNanosecond(Some(v), Some("UTC".into())),
                None,
            )
        };
        let in_ranges = ow
            .ranges
            .iter()
            .map(|&(a, b)| col(TIME_COLUMN).between(time_lit(a), time_lit(b)))
            .reduce(Expr::or);
        let mut inputs = Vec::new();
        let mut rest = None;
        if let (Some(in_ranges), false) = (in_ranges, ow.involved.is_empty()) {
            // a. The involved segments' rows in the ranges (pruned by page index, filtered).
            // Filters on tags and time also prune: every version of a point has the same tags
            // and time, so none that the query keeps is skipped (a field filter could skip an
            // old version that a newer one overwrites, so those do not prune here).
            let all: Vec<usize> = (0..self.schema.columns().len()).collect();
            let predicate = state.create_physical_expr(in_ranges.clone(), &table_df)?;
            let identity_only = |e: &&Expr| {
                e.column_refs().iter().all(|c| {
                    self.schema
                        .column(&c.name)
                        .is_some_and(|d| matches!(d.kind, ColumnKind::Tag | ColumnKind::Time))
                })
            };
            let prune = conjunction(
                filters
                    .iter()
                    .filter(identity_only)
                    .cloned()
                    .chain([in_ranges.clone()]),
            )
            .and_then(|e| state.create_physical_expr(e, &table_df).ok())
            .unwrap_or_else(|| predicate.clone());
            let scan = segment_scan::scan(
                state.runtime_env(),
                &self.schema,
                &ow.involved,
                &all,
                Some(prune),
                partitions,
                self.pushdown(),
                &self.table.settings.read().sort_key.clone(),
            )?;
            let filtered: Arc<dyn ExecutionPlan> = Arc::new(FilterExec::try_new(predicate, scan)?);
            for batch in collect(filtered, state.task_ctx()).await? {
                inputs.push(to_table_schema(&batch, &ow.schema)?);
            }
            // b. Their rows outside the ranges, as they are.
            let outside = Expr::Not(Box::new(in_ranges));
            let mut cols = columns.to_vec();
            if let Some(t) = self
                .schema
                .columns()
                .iter()
                .position(|c| c.name.as_ref() == TIME_COLUMN)
                && !cols.contains(&t)
            {
                cols.push(t);
            }
            let pruning = conjunction(filters.iter().cloned().chain([outside.clone()]))
                .and_then(|e| state.create_physical_expr(e, &table_df).ok());
            let scan = segment_scan::scan(
                state.runtime_env(),
                &self.schema,
                &ow.involved,
                &cols,
                pruning,
                partitions,
                self.pushdown(),
                &self.table.settings.read().sort_key.clone(),
            )?;
            let scan_df = DFSchema::try_from(scan.schema().as_ref().clone())?;
            let keep = state.create_physical_expr(outside, &scan_df)?;
            let filtered: Arc<dyn ExecutionPlan> = Arc::new(FilterExec::try_new(keep, scan)?);
            let exprs = out_schema
                .fields()
                .iter()
                .map(|f| {
                    Ok((
                        physical_col(f.name(), &filtered.schema())?,
                        f.name().clone(),
                    ))
                })
                .collect::<Result<Vec<_>>>()?;
            rest =
                Some(Arc::new(ProjectionExec::try_new(exprs, filtered)?) as Arc<dyn ExecutionPlan>);
        }
        inputs.extend(ow.buffered);
        let merged = merge_batches(&ow.schema, &inputs)?;
        let batch = project_batch(&merged, &self.schema, columns, out_schema)?;
        Ok((batch, rest))
    }
}

/// What a scan reads (see [`BufferTableProvider::sources`]).
struct Sources {
    /// Buffered rows, projected.
    batches: Vec<RecordBatch>,
    /// Segments read as they are.
    files: Vec<Arc<Segment>>,
    /// Set when buffered rows may overwrite segment rows.
    overwrite: Option<Overwrite>,
}

struct Overwrite {
    /// The table schema now (covering every buffered column).
    schema: Arc<TableSchema>,
    /// Buffered rows in the query range, in that schema, oldest first.
    buffered: Vec<RecordBatch>,
    /// Segments whose rows may be overwritten.
    involved: Vec<Arc<Segment>>,
    /// Time ranges of the chunks that may overwrite.
    ranges: Vec<(i64, i64)>,
}

/// Nanoseconds of a timestamp literal.
fn literal_ns(expr: &Expr) -> Option<i64> {
    match expr {
        Expr::Literal(value, _) => super::bounds::scalar_ns(value),
        _ => None,
    }
}

fn is_time(expr: &Expr) -> bool {
    matches!(expr, Expr::Column(c) if c.name == TIME_COLUMN)
}

/// The inclusive time range `[lo, hi]` a filter restricts `time` to, if it is a time filter.
pub(crate) fn time_bounds(expr: &Expr) -> Option<(i64, i64)> {
    match expr {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (op, v) = if is_time(left) {
                (*op, literal_ns(right)?)
            } else if is_time(right) {
                (op.swap()?, literal_ns(left)?)
            } else if *op == Operator::And {
                let (a, b) = (time_bounds(left), time_bounds(right));
                return match (a, b) {
                    (Some(a), Some(b)) => Some((a.0.max(b.0), a.1.min(b.1))),
                    (a, b) => a.or(b),
                };
            } else {
                return None;
            };
            match op {
                Operator::Eq => Some((v, v)),
                Operator::Gt => Some((v.saturating_add(1), i64::MAX)),
                Operator::GtEq => Some((v, i64::MAX)),
                Operator::Lt => Some((i64::MIN, v.saturating_sub(1))),
                Operator::LtEq => Some((i64::MIN, v)),
                _ => None,
            }
        }
        Expr::Between(Between {
            expr,
            negated: false,
            low,
            high,
        }) if is_time(expr) => Some((literal_ns(low)?, literal_ns(high)?)),
        _ => None,
    }
}

#[async_trait]
impl TableProvider for BufferTableProvider {
    fn schema(&self) -> SchemaRef {
        self.schema.arrow().clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn get_column_default(&self, column: &str) -> Option<&Expr> {
        (column == TIME_COLUMN).then_some(&self.time_default)
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Time filters prune chunks and segments, every filter prunes row groups and pages;
        // DataFusion still applies them all to the rows.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let (mut lo, mut hi) = filters
            .iter()
            .filter_map(time_bounds)
            .fold((i64::MIN, i64::MAX), |(lo, hi), (a, b)| {
                (lo.max(a), hi.min(b))
            });
        let (columns, out_schema) = self.projected(projection);
        let partitions = state.config().target_partitions().max(1);
        let snapshot = state.config().get_extension::<QuerySnapshot>();
        let mut range_filter = None;
        match snapshot
            .as_ref()
            .and_then(|s| s.overrides.get(&self.table.id))
        {
            Some(TableOverride::Rows(rows)) => {
                // View maintenance over a write's delta: exactly these rows.
                let batches = rows
                    .iter()
                    .map(|b| project_batch(b, &self.schema, &columns, &out_schema))
                    .collect::<std::result::Result<Vec<_>, _>>()?;
                return MemorySourceConfig::try_new_exec(&[batches], out_schema, None)
                    .map(|e| e as Arc<dyn ExecutionPlan>);
            }
            Some(TableOverride::Range(a, b)) => {
                lo = lo.max(*a);
                hi = hi.min(*b);
                range_filter = Some((*a, *b));
            }
            None => {}
        }
        let sources = if lo <= hi {
            self.sources(snapshot.map(|s| s.seq()), &columns, &out_schema, (lo, hi))?
        } else {
            Sources {
                batches: Vec::new(),
                files: Vec::new(),
                overwrite: None,
            }
        };
        let Sources {
            mut batches,
            files: segments,
            overwrite,
        } = sources;
        let mut inputs: Vec<Arc<dyn ExecutionPlan>> = Vec::new();
        let opened = segments.len() + overwrite.as_ref().map_or(0, |o| o.involved.len());
        if opened > 0 {
            self.reader
                .segments_scanned
                .fetch_add(opened as u64, std::sync::atomic::Ordering::Relaxed);
        }
        if let Some(ow) = overwrite {
            let (merged, rest) = self
                .plan_overwrite(state, ow, &columns, &out_schema, filters)
                .await?;
            batches.push(merged);
            inputs.extend(rest);
        }
        if !segments.is_empty() {
            let df_schema = DFSchema::try_from(self.schema.arrow().as_ref().clone())?;
            let predicate = conjunction(filters.iter().cloned())
                .and_then(|e| state.create_physical_expr(e, &df_schema).ok());
            let sort_key = self.table.settings.read().sort_key.clone();
            // Segments the hot cache holds decoded are read from memory; the others from their
            // files (and decoded into the cache on the side while it has room).
            let hot = &self.reader.engine.hot;
            let mut decoded = Vec::new();
            let mut files = Vec::new();
            for s in segments {
                match hot.get(s.meta.id) {
                    Some(h) => decoded.push(h),
                    None => {
                        hot.fill_later(&s);
                        files.push(s);
                    }
                }
            }
            if !decoded.is_empty() {
                inputs.push(segment_scan::hot_scan(
                    &self.schema,
                    &decoded,
                    &columns,
                    predicate.clone(),
                    partitions,
                    &sort_key,
                )?);
            }
            if !files.is_empty() {
                inputs.push(segment_scan::scan(
                    state.runtime_env(),
                    &self.schema,
                    &files,
                    &columns,
                    predicate,
                    partitions,
                    self.pushdown(),
                    &sort_key,
                )?);
            }
        }
        if !batches.is_empty() || inputs.is_empty() {
            let mut parts: Vec<Vec<RecordBatch>> = vec![Vec::new(); partitions];
            for (i, batch) in batches.into_iter().enumerate() {
                parts[i % partitions].push(batch);
            }
            parts.retain(|p| !p.is_empty());
            if parts.is_empty() {
                parts.push(Vec::new());
            }
            inputs.push(MemorySourceConfig::try_new_exec(
                &parts,
                out_schema.clone(),
                None,
            )?);
        }
        let union = UnionExec::try_new(inputs)?;
        match range_filter {
            // Pruning is inexact; a range override must be exact (and the time column may not
            // be projected, so filter before projecting it away).
            Some((a, b)) => range_exec(union, &out_schema, a, b),
            None => Ok(union),
        }
    }

    async fn insert_into(
        &self,
        _state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if insert_op != InsertOp::Append {
            return Err(DataFusionError::NotImplemented(format!(
                "{insert_op} is not supported: time-series tables only append (a point with the same series and time overwrites)"
            )));
        }
        let sink = TableSink::new(
            self.reader.engine.clone(),
            self.table.db.to_string(),
            self.table.name.to_string(),
            self.schema.arrow().clone(),
        );
        Ok(Arc::new(DataSinkExec::new(input, Arc::new(sink), None)))
    }
}

/// Keeps the rows of `input` with `lo <= time <= hi`. A scan that does not read `time` keeps
/// everything: view maintenance only restricts queries whose time buckets read `time`.
fn range_exec(
    input: Arc<dyn ExecutionPlan>,
    out_schema: &SchemaRef,
    lo: i64,
    hi: i64,
) -> Result<Arc<dyn ExecutionPlan>> {
    use datafusion::physical_expr::expressions::{BinaryExpr, Column, Literal};
    let Ok(idx) = out_schema.index_of(TIME_COLUMN) else {
        return Ok(input);
    };
    let time = Arc::new(Column::new(TIME_COLUMN, idx));
    let lit = |v: i64| {
        Arc::new(Literal::new(ScalarValue::TimestampNanosecond(
            Some(v),
            Some("UTC".into()),
        )))
    };
    let ge = Arc::new(BinaryExpr::new(time.clone(), Operator::GtEq, lit(lo)));
    let le = Arc::new(BinaryExpr::new(time, Operator::LtEq, lit(hi)));
    let both = Arc::new(BinaryExpr::new(ge, Operator::And, le));
    Ok(Arc::new(FilterExec::try_new(both, input)?))
}

/// The rows of `chunk` with `lo <= time <= hi` (the chunk itself when all are).
fn restrict(chunk: &Arc<Chunk>, lo: i64, hi: i64) -> Result<Arc<Chunk>> {
    if chunk.min_time >= lo && chunk.max_time <= hi {
        return Ok(chunk.clone());
    }
    let times = crate::storage::buffer::time_values(&chunk.batch)?;
    let keep: Vec<usize> = times
        .iter()
        .enumerate()
        .filter(|&(_, &t)| t >= lo && t <= hi)
        .map(|(i, _)| i)
        .collect();
    let indices = arrow::array::UInt32Array::from_iter_values(keep.iter().map(|&i| i as u32));
    let batch = arrow::compute::take_record_batch(&chunk.batch, &indices)?;
    let series: Arc<[u32]> = keep.iter().map(|&i| chunk.series[i]).collect();
    let (min_time, max_time) =
        crate::storage::buffer::min_max(crate::storage::buffer::time_values(&batch)?);
    Ok(Arc::new(Chunk {
        seq: chunk.seq,
        batch,
        series,
        min_time,
        max_time,
        overlaps: chunk.overlaps,
        over_persisted: chunk.over_persisted,
        merged: chunk.merged,
    }))
}
