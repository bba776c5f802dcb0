//! The latest buckets first: `… GROUP BY date_bin(…) ORDER BY 1 DESC LIMIT k` reads only the
//! last few buckets of the table when they hold the answer.
//!
//! TSBS's groupby-orderby-limit and every "last N minutes" panel ask for the `k` newest buckets
//! of an aggregate. Planned as written, the whole time range is aggregated to keep `k` groups.
//! [`bound_latest_buckets`] plans the query twice: as written, and with a lower bound `L` on
//! `time` at a bucket boundary `k` buckets before the table's latest time in the range. The
//! bounded plan runs first; if it yields `k` rows they are the answer, else the plan as written
//! runs ([`LatestBucketsExec`]).
//!
//! Why it is exact: `L` is a bucket start, so every bucket at or after `L` has all its rows in
//! the bounded plan (its aggregates are the same), and every bucket before `L` sorts after all
//! of them. When the bounded plan has `k` rows, no row before `L` could be among the first `k`.
//! What may sit between the limit and the aggregate keeps that: a projection, a `HAVING`
//! filter (it keeps or drops whole groups), the sort whose first key is the bucket,
//! descending, or an expression that grows strictly with it (its epoch, casts). Other group
//! keys may come after the bucket; the aggregates are any.
//!
//! `EXPLAIN` shows `LatestBuckets`; [`Config::query_rewrites`](crate::Config::query_rewrites)
//! turns it off (and [`group_by_bucket`], which groups by the bucket itself rather than by an
//! expression of it).

use std::fmt;
use std::sync::Arc;

use arrow::array::RecordBatch;
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchemaRef, ScalarValue, plan_err};
use datafusion::datasource::source_as_provider;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::logical_plan::FetchType;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, Expr, Extension, Filter, LogicalPlan, UserDefinedLogicalNode,
    UserDefinedLogicalNodeCore, lit,
};
use datafusion::physical_expr::{EquivalenceProperties, Partitioning, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::metrics::{ExecutionPlanMetricsSet, MetricBuilder, MetricsSet};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, Distribution, ExecutionPlan,
    PlanProperties, ReplaceChildrenOptions,
};
use datafusion::physical_planner::{ExtensionPlanner, PhysicalPlanner};
use futures::{StreamExt, TryStreamExt};

use super::bounds::{bin, increases_with_bucket, time_bound, time_bucket};
use super::table::BufferTableProvider;
use crate::storage::catalog::TIME_COLUMN;

/// Rewrites every `Limit` over the newest buckets of an aggregate in `plan` (see the module
/// documentation).
pub(crate) fn bound_latest_buckets(plan: LogicalPlan) -> Result<LogicalPlan> {
    if !plan.exists(|p| Ok(matches!(p, LogicalPlan::Limit(_))))? {
        return Ok(plan);
    }
    Ok(plan
        .transform_up_with_subqueries(|p| match &p {
            LogicalPlan::Limit(_) => match bounded(&p) {
                Some(node) => Ok(Transformed::yes(LogicalPlan::Extension(Extension {
                    node: Arc::new(node),
                }))),
                None => Ok(Transformed::no(p)),
            },
            _ => Ok(Transformed::no(p)),
        })?
        .data)
}

/// The two plans for `limit`, if it is a limit over the newest buckets of an aggregate.
fn bounded(limit_plan: &LogicalPlan) -> Option<LatestBuckets> {
    let LogicalPlan::Limit(limit) = limit_plan else {
        return None;
    };
    let (FetchType::Literal(Some(fetch)), Ok(skip)) =
        (limit.get_fetch_type().ok()?, limit.get_skip_type())
    else {
        return None;
    };
    let datafusion::logical_expr::logical_plan::SkipType::Literal(skip) = skip else {
        return None;
    };
    let need = skip.checked_add(fetch)?;
    if need == 0 {
        return None;
    }
    let LogicalPlan::Sort(sort) = limit.input.as_ref() else {
        return None;
    };
    let first = sort.expr.first()?;
    if first.asc {
        return None;
    }
    // Follow the first sort key down to a group column of the aggregate.
    let Expr::Column(key) = &first.expr else {
        return None;
    };
    let mut key = key.clone();
    let mut node = sort.input.as_ref();
    let agg = loop {
        match node {
            LogicalPlan::Projection(p) => {
                let i = p.schema.index_of_column(&key).ok()?;
                key = match p.expr.get(i)? {
                    Expr::Column(c) => c.clone(),
                    Expr::Alias(a) => match a.expr.as_ref() {
                        Expr::Column(c) => c.clone(),
                        _ => return None,
                    },
                    _ => return None,
                };
                node = p.input.as_ref();
            }
            LogicalPlan::Filter(f) => node = f.input.as_ref(),
            LogicalPlan::Aggregate(a) => break a,
            _ => return None,
        }
    };
    let i = agg.schema.index_of_column(&key).ok()?;
    let group = agg.group_expr.get(i)?;
    let (stride, origin) = time_bucket(group)?;
    if !increases_with_bucket(group, stride) {
        return None;
    }
    // The table under the aggregate, and the query's own time range.
    let mut input = agg.input.as_ref();
    let (mut lo, mut hi) = (i64::MIN, i64::MAX);
    while let LogicalPlan::Filter(f) = input {
        for c in split_conjunction(&f.predicate) {
            if let Some((l, h)) = time_bound(c) {
                lo = lo.max(l);
                hi = hi.min(h);
            }
        }
        input = f.input.as_ref();
    }
    let LogicalPlan::TableScan(scan) = input else {
        return None;
    };
    let provider = source_as_provider(&scan.source).ok()?;
    let provider: &dyn std::any::Any = provider.as_ref();
    let table = provider.downcast_ref::<BufferTableProvider>()?.table();
    let latest = table.buffer.read().latest_time_before(hi)?;
    // `need` buckets back from the latest one, plus one spare for a bucket not yet full.
    let back = (need as i64).checked_mul(stride)?;
    let from = bin(latest, stride, origin)?.checked_sub(back)?;
    if from <= lo {
        return None;
    }
    let time = Expr::Column(datafusion::common::Column::new(
        Some(scan.table_name.clone()),
        TIME_COLUMN,
    ));
    let bound = time.gt_eq(lit(ScalarValue::TimestampNanosecond(Some(from), None)));
    let fast = limit_plan
        .clone()
        .transform_down(|p| match p {
            LogicalPlan::Aggregate(a) if Arc::ptr_eq(&a.input, &agg.input) => {
                let filtered =
                    LogicalPlan::Filter(Filter::try_new(bound.clone(), a.input.clone())?);
                let a = Aggregate::try_new(Arc::new(filtered), a.group_expr, a.aggr_expr)?;
                Ok(Transformed::new(
                    LogicalPlan::Aggregate(a),
                    true,
                    TreeNodeRecursion::Stop,
                ))
            }
            other => Ok(Transformed::no(other)),
        })
        .ok()?;
    if !fast.transformed {
        return None;
    }
    Some(LatestBuckets {
        schema: limit_plan.schema().clone(),
        bounded: fast.data,
        full: limit_plan.clone(),
        need,
        from,
    })
}

/// The bounded plan, and the plan as written for when the bounded one is short of `need`
/// rows.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct LatestBuckets {
    schema: DFSchemaRef,
    bounded: LogicalPlan,
    full: LogicalPlan,
    need: usize,
    /// The lower bound on time of the bounded plan (ns).
    from: i64,
}

impl PartialOrd for LatestBuckets {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        (self.need, self.from).partial_cmp(&(other.need, other.from))
    }
}

impl UserDefinedLogicalNodeCore for LatestBuckets {
    fn name(&self) -> &str {
        "LatestBuckets"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.bounded, &self.full]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        Vec::new()
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "LatestBuckets: first {} rows from time >= {} (else the whole range)",
            self.need,
            rfc3339(self.from)
        )
    }

    fn with_exprs_and_inputs(&self, _exprs: Vec<Expr>, inputs: Vec<LogicalPlan>) -> Result<Self> {
        let [bounded, full] = <[LogicalPlan; 2]>::try_from(inputs)
            .map_err(|_| DataFusionError::Plan("LatestBuckets has two inputs".into()))?;
        Ok(LatestBuckets {
            schema: full.schema().clone(),
            bounded,
            full,
            need: self.need,
            from: self.from,
        })
    }
}

fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

/// Plans [`LatestBuckets`].
#[derive(Debug, Default)]
pub(crate) struct LatestBucketsPlanner;

#[async_trait]
impl ExtensionPlanner for LatestBucketsPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        _session: &dyn Session,
        _ctx: &datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(node) = node.as_any().downcast_ref::<LatestBuckets>() else {
            return Ok(None);
        };
        let [bounded, full] = physical_inputs else {
            return plan_err!("LatestBuckets has two inputs");
        };
        Ok(Some(Arc::new(LatestBucketsExec::new(
            bounded.clone(),
            full.clone(),
            node.need,
            node.from,
        ))))
    }
}

/// Runs the bounded plan, then the full one if the bounded one has fewer than `need` rows.
#[derive(Debug)]
pub(crate) struct LatestBucketsExec {
    bounded: Arc<dyn ExecutionPlan>,
    full: Arc<dyn ExecutionPlan>,
    need: usize,
    from: i64,
    properties: Arc<PlanProperties>,
    metrics: ExecutionPlanMetricsSet,
}

impl LatestBucketsExec {
    fn new(
        bounded: Arc<dyn ExecutionPlan>,
        full: Arc<dyn ExecutionPlan>,
        need: usize,
        from: i64,
    ) -> LatestBucketsExec {
        let properties = PlanProperties::new(
            EquivalenceProperties::new(full.schema()),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        LatestBucketsExec {
            bounded,
            full,
            need,
            from,
            properties: Arc::new(properties),
            metrics: ExecutionPlanMetricsSet::new(),
        }
    }
}

impl DisplayAs for LatestBucketsExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "LatestBucketsExec: first {} rows from time >= {} (else the whole range)",
            self.need,
            rfc3339(self.from)
        )
    }
}

impl ExecutionPlan for LatestBucketsExec {
    fn name(&self) -> &str {
        "LatestBucketsExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition, Distribution::SinglePartition]
    }

    fn maintains_input_order(&self) -> Vec<bool> {
        vec![true, true]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.bounded, &self.full]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let [bounded, full] = <[Arc<dyn ExecutionPlan>; 2]>::try_from(children)
            .map_err(|_| DataFusionError::Plan("LatestBucketsExec has two inputs".into()))?;
        Ok(Arc::new(LatestBucketsExec::new(
            bounded, full, self.need, self.from,
        )))
    }

    fn with_new_children(
        self: Arc<Self>,
        children: Vec<Arc<dyn ExecutionPlan>>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        self.replace_children(
            children,
            ReplaceChildrenOptions::new(ChildrenPropertiesMode::Recompute),
        )
    }

    fn metrics(&self) -> Option<MetricsSet> {
        Some(self.metrics.clone_inner())
    }

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        if partition != 0 {
            return plan_err!("LatestBucketsExec has one partition, not {partition}");
        }
        let schema = self.schema();
        let bounded = self.bounded.execute(0, context.clone())?;
        let full = self.full.clone();
        let need = self.need;
        let fell_back = MetricBuilder::new(&self.metrics).counter("fell_back", 0);
        let out_schema = schema.clone();
        let answer = async move {
            let batches: Vec<RecordBatch> = bounded.try_collect().await?;
            let rows: usize = batches.iter().map(|b| b.num_rows()).sum();
            if rows >= need {
                let stream = futures::stream::iter(batches.into_iter().map(Ok));
                let stream: SendableRecordBatchStream =
                    Box::pin(RecordBatchStreamAdapter::new(out_schema, stream));
                return Ok(stream);
            }
            fell_back.add(1);
            full.execute(0, context)
        };
        let stream = futures::stream::once(answer).try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(
            schema,
            stream.boxed(),
        )))
    }
}

/// Groups by the `date_bin` bucket itself where a query groups by an expression that grows
/// strictly with it (TSBS's `CAST(extract(epoch FROM date_bin(…)) AS BIGINT)`): the same
/// groups, with the expression computed once per group above the aggregate instead of once per
/// row below it.
pub(crate) fn group_by_bucket(plan: LogicalPlan) -> Result<LogicalPlan> {
    if !plan.exists(|p| Ok(matches!(p, LogicalPlan::Aggregate(_))))? {
        return Ok(plan);
    }
    Ok(plan
        .transform_up_with_subqueries(|p| match p {
            LogicalPlan::Aggregate(agg) => bucket_groups(agg),
            other => Ok(Transformed::no(other)),
        })?
        .data)
}

fn bucket_groups(agg: Aggregate) -> Result<Transformed<LogicalPlan>> {
    let mut group_expr = agg.group_expr.clone();
    let mut above: Vec<Option<Expr>> = vec![None; group_expr.len()];
    for (i, g) in agg.group_expr.iter().enumerate() {
        let Some((stride, _)) = time_bucket(g) else {
            continue;
        };
        if matches!(g, Expr::ScalarFunction(f) if f.func.name() == "date_bin")
            || !increases_with_bucket(g, stride)
        {
            continue;
        }
        let name = format!("__bucket{i}");
        let mut inner = None;
        let outer = g.clone().transform_down(|e| match e {
            Expr::ScalarFunction(f) if f.func.name() == "date_bin" => {
                inner = Some(Expr::ScalarFunction(f));
                Ok(Transformed::new(
                    Expr::Column(datafusion::common::Column::from_name(&name)),
                    true,
                    TreeNodeRecursion::Jump,
                ))
            }
            other => Ok(Transformed::no(other)),
        })?;
        let Some(inner) = inner else { continue };
        group_expr[i] = inner.alias(&name);
        above[i] = Some(outer.data);
    }
    if above.iter().all(Option::is_none) {
        return Ok(Transformed::no(LogicalPlan::Aggregate(agg)));
    }
    let schema = agg.schema.clone();
    let bucketed = Aggregate::try_new(agg.input.clone(), group_expr, agg.aggr_expr.clone())?;
    let new_schema = bucketed.schema.clone();
    let mut exprs = Vec::with_capacity(schema.fields().len());
    for i in 0..schema.fields().len() {
        let (q, f) = schema.qualified_field(i);
        match above.get(i).cloned().flatten() {
            Some(e) => exprs.push(e.alias_qualified(q.cloned(), f.name())),
            None => {
                let (nq, nf) = new_schema.qualified_field(i);
                let c = Expr::Column(datafusion::common::Column::new(nq.cloned(), nf.name()));
                if nq == q && nf.name() == f.name() {
                    exprs.push(c);
                } else {
                    exprs.push(c.alias_qualified(q.cloned(), f.name()));
                }
            }
        }
    }
    let projection = datafusion::logical_expr::Projection::try_new(
        exprs,
        Arc::new(LogicalPlan::Aggregate(bucketed)),
    )?;
    Ok(Transformed::yes(LogicalPlan::Projection(projection)))
}
