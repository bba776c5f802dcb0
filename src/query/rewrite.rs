//! Answering a query from maintained state when the answer is provably the same.
//!
//! **Latest row per series.** Every table keeps the latest point of each series
//! ([`LastPoints`](crate::storage::last::LastPoints), also behind `last_cache('t')`). The row a
//! query keeps when it asks for the newest row of each group of series is always one of those
//! points, so such a query reads the last-point state (one row per series) instead of the
//! table and computes the same answer. [`LastPointRewrite`] recognises two shapes:
//!
//! 1. a ranking window kept at its first rank:
//!    `row_number() | rank() | dense_rank() OVER (PARTITION BY <tags> ORDER BY time DESC, …)`
//!    under a filter `= 1` (or `<= 1`, `< 2`), the `lastpoint` query as users write it;
//! 2. an aggregate grouped by tags whose every value comes from the newest row of its group:
//!    `first_value(x ORDER BY time DESC)`, `last_value(x ORDER BY time)`, `max(time)` (what
//!    `DISTINCT ON (tags) … ORDER BY tags, time DESC` becomes).
//!
//! Why it is exact: the newest row of a group is a row with the latest time among the group's
//! rows; every series of the group has its own latest point at or before that time, and the
//! newest row is the latest point of its series. Ties (several series at the same latest
//! time) have the same candidates in both reads. What may sit between the scan and the
//! window or aggregate is limited to what keeps that argument: filters on tags only (they keep
//! or drop whole series), lower bounds on `time` (a series' newest row passes one if any of
//! its rows does), row-wise projections and aliases. Anything else (a field filter, an upper
//! time bound, a `LIMIT`, a join) leaves the query as it is.
//!
//! `EXPLAIN` shows `LastPointsExec` where the state answered. The rewrite is on by default;
//! [`Config::query_rewrites`](crate::Config::query_rewrites) turns it off.

use std::any::Any;
use std::fmt;
use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{Column, ScalarValue};
use datafusion::datasource::{DefaultTableSource, TableType, provider_as_source};
use datafusion::error::Result;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::expr::{AggregateFunction, WindowFunction};
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, Expr, LogicalPlan, Operator, TableProviderFilterPushDown, TableScan,
    WindowFunctionDefinition,
};
use datafusion::optimizer::{OptimizerConfig, OptimizerRule};
use datafusion::physical_expr::PhysicalExpr;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, ExecutionPlan, PlanProperties,
    ReplaceChildrenOptions,
};

use super::table::BufferTableProvider;
use crate::storage::catalog::ColumnKind;

/// The optimizer rule (see the module documentation). Runs after DataFusion's own rules, on
/// the plan they leave (projections pushed into scans, filters next to them).
#[derive(Debug, Default)]
pub(crate) struct LastPointRewrite;

impl OptimizerRule for LastPointRewrite {
    fn name(&self) -> &str {
        "rivulet_last_point"
    }

    fn rewrite(
        &self,
        plan: LogicalPlan,
        _config: &dyn OptimizerConfig,
    ) -> Result<Transformed<LogicalPlan>> {
        plan.transform_down_with_subqueries(|node| {
            let rewritten = match &node {
                LogicalPlan::Filter(filter) => split_conjunction(&filter.predicate)
                    .into_iter()
                    .filter_map(first_rank_column)
                    .find_map(|c| through_to_window(&filter.input, &c))
                    .and_then(|input| with_input(&node, input)),
                LogicalPlan::Aggregate(agg) => {
                    latest_of_groups(agg).and_then(|input| with_input(&node, input))
                }
                _ => None,
            };
            Ok(match rewritten {
                // The new scan is no longer a table's: nothing below matches again.
                Some(plan) => Transformed::new(plan, true, TreeNodeRecursion::Jump),
                None => Transformed::no(node),
            })
        })
    }
}

/// The column `c` of a conjunct that keeps only the first rank: `c = 1`, `c <= 1`, `c < 2`
/// (either way round, through casts).
fn first_rank_column(conjunct: &Expr) -> Option<Column> {
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = conjunct else {
        return None;
    };
    let (column, op, value) = match (strip_casts(left), strip_casts(right)) {
        (Expr::Column(c), Expr::Literal(v, _)) => (c, *op, v),
        (Expr::Literal(v, _), Expr::Column(c)) => (c, op.swap()?, v),
        _ => return None,
    };
    let value = match value.cast_to(&datafusion::arrow::datatypes::DataType::Int64) {
        Ok(ScalarValue::Int64(Some(v))) => v,
        _ => return None,
    };
    let first_only = matches!(
        (op, value),
        (Operator::Eq | Operator::LtEq, 1) | (Operator::Lt, 2)
    );
    first_only.then(|| column.clone())
}

fn strip_casts(expr: &Expr) -> &Expr {
    match expr {
        Expr::Cast(c) => strip_casts(&c.expr),
        Expr::TryCast(c) => strip_casts(&c.expr),
        other => other,
    }
}

/// For a node that passes columns on (projection, alias, filter): its input, and what
/// `column` of its output is in that input (None when the node computes the column).
fn passed_on<'a>(plan: &'a LogicalPlan, column: &Column) -> Option<(&'a LogicalPlan, Column)> {
    match plan {
        LogicalPlan::Projection(p) => {
            let i = p.schema.index_of_column(column).ok()?;
            match unalias(&p.expr[i]) {
                Expr::Column(inner) => Some((p.input.as_ref(), inner.clone())),
                _ => None,
            }
        }
        LogicalPlan::SubqueryAlias(s) => {
            let i = s.schema.index_of_column(column).ok()?;
            Some((
                s.input.as_ref(),
                Column::from(s.input.schema().qualified_field(i)),
            ))
        }
        LogicalPlan::Filter(f) => Some((f.input.as_ref(), column.clone())),
        _ => None,
    }
}

/// `plan` (a projection, alias, filter, window or aggregate) with `input` in place of its
/// input.
fn with_input(plan: &LogicalPlan, input: LogicalPlan) -> Option<LogicalPlan> {
    let input = Arc::new(input);
    let mut plan = plan.clone();
    match &mut plan {
        LogicalPlan::Projection(p) => p.input = input,
        LogicalPlan::SubqueryAlias(s) => s.input = input,
        LogicalPlan::Filter(f) => f.input = input,
        LogicalPlan::Window(w) => w.input = input,
        LogicalPlan::Aggregate(a) => a.input = input,
        _ => return None,
    }
    Some(plan)
}

/// Follows `column` from the output of `plan` down to the window that computes it; when that
/// is a ranking over the newest rows of groups of series, returns `plan` with the window's
/// table scan reading the last-point state. (A filter on the way removes rows after ranking:
/// the first ranks stay first.)
fn through_to_window(plan: &LogicalPlan, column: &Column) -> Option<LogicalPlan> {
    if let LogicalPlan::Window(w) = plan {
        let i = w.schema.index_of_column(column).ok()?;
        let below = w.input.schema().fields().len();
        // One window function only: another one's values would change with its input.
        if i < below || w.window_expr.len() != 1 {
            return None;
        }
        let Expr::WindowFunction(wf) = unalias(&w.window_expr[i - below]) else {
            return None;
        };
        return with_input(plan, ranks_newest(wf, &w.input)?);
    }
    let (input, inner) = passed_on(plan, column)?;
    with_input(plan, through_to_window(input, &inner)?)
}

/// For `row_number`/`rank`/`dense_rank() OVER (PARTITION BY <tags> ORDER BY time DESC, …)`
/// over `input`: `input` reading the last-point state.
fn ranks_newest(wf: &WindowFunction, input: &LogicalPlan) -> Option<LogicalPlan> {
    let WindowFunctionDefinition::WindowUDF(udf) = &wf.fun else {
        return None;
    };
    let p = &wf.params;
    if !matches!(udf.name(), "row_number" | "rank" | "dense_rank")
        || p.filter.is_some()
        || p.distinct
    {
        return None;
    }
    let groups = tag_columns(&p.partition_by, input)?;
    newest_first(&p.order_by, &groups, input)?;
    with_last_points(input)
}

/// `exprs` as columns, if each is a plain column that is a tag of the table `input` reads.
fn tag_columns<'a>(exprs: &'a [Expr], input: &LogicalPlan) -> Option<Vec<&'a Column>> {
    exprs
        .iter()
        .map(|e| match e {
            Expr::Column(c) if base_kind(input, c)? == ColumnKind::Tag => Some(c),
            _ => None,
        })
        .collect()
}

/// Checks that `order` sorts a group's rows newest first: keys that are group columns (constant
/// within a group), then `time DESC`; later keys only break ties and must be plain columns.
fn newest_first(
    order: &[datafusion::logical_expr::SortExpr],
    groups: &[&Column],
    input: &LogicalPlan,
) -> Option<()> {
    let mut keys = order.iter().skip_while(|s| match &s.expr {
        Expr::Column(c) => groups.contains(&c),
        _ => false,
    });
    let first = keys.next()?;
    let Expr::Column(time) = &first.expr else {
        return None;
    };
    if first.asc || base_kind(input, time)? != ColumnKind::Time {
        return None;
    }
    keys.all(|s| matches!(s.expr, Expr::Column(_)))
        .then_some(())
}

/// For an aggregate grouped by tags whose every value comes from a group's newest row: its
/// input reading the last-point state.
fn latest_of_groups(agg: &Aggregate) -> Option<LogicalPlan> {
    let input = agg.input.as_ref();
    let groups = tag_columns(&agg.group_expr, input)?;
    if agg.aggr_expr.is_empty() {
        return None;
    }
    for e in &agg.aggr_expr {
        let Expr::AggregateFunction(f) = unalias(e) else {
            return None;
        };
        newest_value(f, &groups, input)?;
    }
    with_last_points(input)
}

/// Checks that aggregate `f` takes its value from the newest row of the group:
/// `first_value(x ORDER BY time DESC)`, `last_value(x ORDER BY time)` (nulls respected), or
/// `max(time)`.
fn newest_value(f: &AggregateFunction, groups: &[&Column], input: &LogicalPlan) -> Option<()> {
    use datafusion::logical_expr::expr::NullTreatment;
    let p = &f.params;
    if p.distinct
        || p.filter.is_some()
        || matches!(p.null_treatment, Some(NullTreatment::IgnoreNulls))
        || !p.args.iter().all(|a| matches!(a, Expr::Column(_)))
    {
        return None;
    }
    match f.func.name() {
        "first_value" => newest_first(&p.order_by, groups, input),
        "last_value" => {
            let reversed: Vec<_> = p.order_by.iter().map(|s| s.reverse()).collect();
            newest_first(&reversed, groups, input)
        }
        "max" => match p.args.as_slice() {
            [Expr::Column(c)] if base_kind(input, c)? == ColumnKind::Time => Some(()),
            _ => None,
        },
        _ => None,
    }
}

fn unalias(expr: &Expr) -> &Expr {
    match expr {
        Expr::Alias(a) => unalias(&a.expr),
        other => other,
    }
}

/// The table a scan reads, when it is a Rivulet table's.
fn table_of(scan: &TableScan) -> Option<&BufferTableProvider> {
    let source = scan.source.as_ref().downcast_ref::<DefaultTableSource>()?;
    let provider: &dyn Any = source.table_provider.as_ref();
    provider.downcast_ref::<BufferTableProvider>()
}

/// What `column` (of `plan`'s output) is in the table the plan reads: the kind of the table
/// column it passes on unchanged, through projections, aliases and filters.
fn base_kind(plan: &LogicalPlan, column: &Column) -> Option<ColumnKind> {
    if let LogicalPlan::TableScan(scan) = plan {
        let table = table_of(scan)?;
        let i = scan.projected_schema.index_of_column(column).ok()?;
        return table.column_kind(scan.projected_schema.field(i).name());
    }
    let (input, inner) = passed_on(plan, column)?;
    base_kind(input, &inner)
}

/// `plan` (projections, aliases and filters over one table scan) with the scan reading the
/// last-point state, if every node keeps the newest row of each series where it was.
fn with_last_points(plan: &LogicalPlan) -> Option<LogicalPlan> {
    match plan {
        LogicalPlan::Projection(p) if p.expr.iter().all(row_wise) => {
            with_input(plan, with_last_points(&p.input)?)
        }
        LogicalPlan::SubqueryAlias(s) => with_input(plan, with_last_points(&s.input)?),
        LogicalPlan::Filter(f)
            if split_conjunction(&f.predicate)
                .into_iter()
                .all(|c| keeps_newest(c, &f.input)) =>
        {
            with_input(plan, with_last_points(&f.input)?)
        }
        LogicalPlan::TableScan(scan) => {
            table_of(scan)?;
            let all_kept = scan.filters.iter().all(|f| {
                split_conjunction(f)
                    .into_iter()
                    .all(|c| keeps_newest(c, plan))
            });
            if scan.fetch.is_some() || !all_kept {
                return None;
            }
            let source = scan.source.as_ref().downcast_ref::<DefaultTableSource>()?;
            let mut scan = scan.clone();
            scan.source = provider_as_source(Arc::new(LastPointsProvider {
                inner: source.table_provider.clone(),
            }));
            Some(LogicalPlan::TableScan(scan))
        }
        _ => None,
    }
}

/// A projection expression computed from its row alone (no subquery, nothing volatile).
fn row_wise(expr: &Expr) -> bool {
    let mut ok = !expr.is_volatile();
    let _ = expr.apply(|e| {
        if matches!(
            e,
            Expr::ScalarSubquery(_)
                | Expr::Exists(_)
                | Expr::InSubquery(_)
                | Expr::AggregateFunction(_)
                | Expr::WindowFunction(_)
        ) {
            ok = false;
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    });
    ok
}

/// A filter conjunct over `input`'s rows that keeps or drops each series' newest row with the
/// series (tags only), or a lower bound on `time` (which a series' newest row passes if any of
/// its rows does).
fn keeps_newest(conjunct: &Expr, input: &LogicalPlan) -> bool {
    if !row_wise(conjunct) {
        return false;
    }
    let refs = conjunct.column_refs();
    if !refs.is_empty()
        && refs
            .iter()
            .all(|c| base_kind(input, c) == Some(ColumnKind::Tag))
    {
        return true;
    }
    let Expr::BinaryExpr(BinaryExpr { left, op, right }) = conjunct else {
        return false;
    };
    let (time, op, bound) = match (left.as_ref(), right.as_ref()) {
        (Expr::Column(c), other) => (c, *op, other),
        (other, Expr::Column(c)) => match op.swap() {
            Some(op) => (c, op, other),
            None => return false,
        },
        _ => return false,
    };
    matches!(op, Operator::Gt | Operator::GtEq)
        && bound.column_refs().is_empty()
        && base_kind(input, time) == Some(ColumnKind::Time)
}

/// A table read from its last-point state (falling back to the table itself when the state
/// cannot answer for the query's snapshot, see [`BufferTableProvider::last_points`]).
#[derive(Debug)]
struct LastPointsProvider {
    inner: Arc<dyn TableProvider>,
}

#[async_trait]
impl TableProvider for LastPointsProvider {
    fn schema(&self) -> SchemaRef {
        self.inner.schema()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        self.inner.supports_filters_pushdown(filters)
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let provider: &dyn Any = self.inner.as_ref();
        if let Some(table) = provider.downcast_ref::<BufferTableProvider>()
            && let Some((plan, series)) = table.last_points(state, projection)?
        {
            return Ok(Arc::new(LastPointsExec {
                table: table.name().to_string(),
                series,
                input: plan,
            }));
        }
        self.inner.scan(state, projection, filters, limit).await
    }
}

/// The rows of a table's last-point state (one per series): a memory scan under a name that
/// `EXPLAIN` shows.
#[derive(Debug)]
struct LastPointsExec {
    table: String,
    series: usize,
    input: Arc<dyn ExecutionPlan>,
}

impl DisplayAs for LastPointsExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        write!(
            f,
            "LastPointsExec: table={}, series={} (answered from the last-point state)",
            self.table, self.series
        )
    }
}

impl ExecutionPlan for LastPointsExec {
    fn name(&self) -> &str {
        "LastPointsExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        self.input.properties()
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        Vec::new()
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        _children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        Ok(self)
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

    fn execute(
        &self,
        partition: usize,
        context: Arc<TaskContext>,
    ) -> Result<SendableRecordBatchStream> {
        self.input.execute(partition, context)
    }
}
