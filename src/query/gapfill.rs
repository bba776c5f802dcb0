//! Gap filling: a row for every time bucket of every series, also where no data fell.
//!
//! ```sql
//! SELECT date_bin_gapfill(INTERVAL '5 minutes', time) AS t, host,
//!        avg(usage_user), locf(max(usage_user)), interpolate(min(usage_user))
//! FROM cpu
//! WHERE time >= now() - INTERVAL '1 hour' AND time < now()
//! GROUP BY 1, host
//! ```
//!
//! As InfluxDB 3 has it (TimescaleDB's `time_bucket_gapfill` too, for fixed widths):
//! - `date_bin_gapfill(stride, time [, origin])` buckets like `date_bin` (and
//!   `time_bucket_gapfill(width, time [, origin])` like `time_bucket`), as a `GROUP BY`
//!   expression of its own. The buckets filled run from the bucket of the query's lower time
//!   bound to the bucket of its upper bound, for each group of the other `GROUP BY` columns
//!   that has at least one row (with no other `GROUP BY` column, the one group always exists).
//! - The `WHERE` clause must bound `time` from below with a constant (`>=`, `>`, `BETWEEN`;
//!   `now() - INTERVAL …` is a constant of the query). Without an upper bound the buckets run
//!   up to `now()`.
//! - A filled bucket's aggregates are NULL, except under `locf(agg)` (the last non-NULL value
//!   before it in its group, if any) or `interpolate(agg)` (linear between the non-NULL values
//!   before and after it in its group, by bucket time; integers round toward zero). Both also
//!   fill NULLs the aggregate itself returned.
//! - The result is ordered by the other group columns, then by time.
//!
//! [`GapFillRule`] runs after type coercion: it replaces the gap-filling bucket function by
//! the plain one in the aggregate and puts a [`GapFillNode`] above it; `locf`/`interpolate`
//! in the projection above become the aggregate's column and a fill strategy of the node.
//! [`exec::GapFillExec`] does the filling. The three functions are only markers: called
//! anywhere else they fail with the rule's explanation.

mod exec;

pub(crate) use exec::GapFillPlanner;

use std::fmt;
use std::sync::Arc;

use arrow::datatypes::DataType;
use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::common::{DFSchema, DFSchemaRef, ScalarValue, exec_err, plan_err};
use datafusion::error::Result;
use datafusion::logical_expr::expr::ScalarFunction;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{
    Aggregate, BinaryExpr, ColumnarValue, Expr, Extension, Filter, LogicalPlan, Operator,
    Projection, ScalarFunctionArgs, ScalarUDF, ScalarUDFImpl, Signature,
    UserDefinedLogicalNodeCore, Volatility,
};
use datafusion::optimizer::AnalyzerRule;

/// TimescaleDB's default `time_bucket` origin for fixed widths: Monday 2000-01-03 UTC.
const TIME_BUCKET_ORIGIN_NS: i64 = 946_857_600_000_000_000;

/// The gap-filling functions, for registration.
pub(crate) fn functions(time_bucket: Arc<ScalarUDF>) -> Vec<ScalarUDF> {
    vec![
        ScalarUDF::from(BinGapfill {
            name: "date_bin_gapfill",
            inner: datafusion::functions::datetime::date_bin(),
        }),
        ScalarUDF::from(BinGapfill {
            name: "time_bucket_gapfill",
            inner: time_bucket,
        }),
        ScalarUDF::from(Fill::new("locf")),
        ScalarUDF::from(Fill::new("interpolate")),
    ]
}

const USAGE: &str = "use it as a GROUP BY expression of an aggregate whose WHERE clause bounds time, e.g. SELECT date_bin_gapfill(INTERVAL '1 minute', time) AS t, locf(avg(v)) FROM m WHERE time >= now() - INTERVAL '1 hour' GROUP BY 1";

/// `date_bin_gapfill` / `time_bucket_gapfill`: typed as the bucket function they stand for.
#[derive(Debug, PartialEq, Eq, Hash)]
struct BinGapfill {
    name: &'static str,
    inner: Arc<ScalarUDF>,
}

impl ScalarUDFImpl for BinGapfill {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        self.inner.signature()
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        self.inner.coerce_types(arg_types)
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        self.inner.return_type(arg_types)
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        exec_err!("{} fills gaps only in GROUP BY: {USAGE}", self.name)
    }
}

/// `locf` / `interpolate`: the value of their argument, filled by the gap-fill node.
#[derive(Debug, PartialEq, Eq, Hash)]
struct Fill {
    name: &'static str,
    signature: Signature,
}

impl Fill {
    fn new(name: &'static str) -> Fill {
        Fill {
            name,
            signature: Signature::any(1, Volatility::Immutable),
        }
    }
}

impl ScalarUDFImpl for Fill {
    fn name(&self) -> &str {
        self.name
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match arg_types.first() {
            Some(t) => Ok(t.clone()),
            None => plan_err!("{} takes one aggregate", self.name),
        }
    }

    fn invoke_with_args(&self, _args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        exec_err!(
            "{}() fills an aggregate of a gap-filling query: {USAGE}",
            self.name
        )
    }
}

/// How a gap-filled aggregate column gets its values in filled buckets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd)]
pub(crate) enum FillStrategy {
    Null,
    Locf,
    Interpolate,
}

fn is_bin(name: &str) -> bool {
    matches!(name, "date_bin_gapfill" | "time_bucket_gapfill")
}

fn is_fill(name: &str) -> bool {
    matches!(name, "locf" | "interpolate")
}

fn contains(expr: &Expr, pred: fn(&str) -> bool) -> bool {
    expr.exists(|e| Ok(matches!(e, Expr::ScalarFunction(f) if pred(f.func.name()))))
        .unwrap_or(false)
}

fn plan_uses_gapfill(plan: &LogicalPlan) -> Result<bool> {
    plan.exists(|p| {
        Ok(p.expressions()
            .iter()
            .any(|e| contains(e, |n| is_bin(n) || is_fill(n))))
    })
}

/// The analyzer rule (see the module documentation).
#[derive(Debug, Default)]
pub(crate) struct GapFillRule;

impl AnalyzerRule for GapFillRule {
    fn analyze(&self, plan: LogicalPlan, _config: &ConfigOptions) -> Result<LogicalPlan> {
        if !plan_uses_gapfill(&plan)? {
            return Ok(plan);
        }
        let plan = plan
            .transform_up_with_subqueries(|p| match p {
                LogicalPlan::Aggregate(agg) => rewrite_aggregate(agg),
                LogicalPlan::Projection(proj) => rewrite_projection(proj),
                other => Ok(Transformed::no(other)),
            })?
            .data;
        // What is left is a marker outside the places it means something.
        let mut misplaced = None;
        plan.apply_with_subqueries(|p| {
            for e in p.expressions() {
                e.apply(|e| {
                    if let Expr::ScalarFunction(f) = e
                        && (is_bin(f.func.name()) || is_fill(f.func.name()))
                    {
                        misplaced = Some(f.func.name().to_string());
                        return Ok(TreeNodeRecursion::Stop);
                    }
                    Ok(TreeNodeRecursion::Continue)
                })?;
            }
            Ok(if misplaced.is_some() {
                TreeNodeRecursion::Stop
            } else {
                TreeNodeRecursion::Continue
            })
        })?;
        match misplaced {
            Some(name) if is_bin(&name) => {
                plan_err!("{name} must be a GROUP BY expression by itself: {USAGE}")
            }
            Some(name) => plan_err!(
                "{name}() must wrap an aggregate in the SELECT list of a query grouped by date_bin_gapfill: {USAGE}"
            ),
            None => Ok(plan),
        }
    }

    fn name(&self) -> &str {
        "gap_fill"
    }
}

fn rewrite_aggregate(agg: Aggregate) -> Result<Transformed<LogicalPlan>> {
    let found: Vec<usize> = agg
        .group_expr
        .iter()
        .enumerate()
        .filter(|(_, e)| contains(e, is_bin))
        .map(|(i, _)| i)
        .collect();
    let time = match found.as_slice() {
        [] => return Ok(Transformed::no(LogicalPlan::Aggregate(agg))),
        [one] => *one,
        _ => return plan_err!("a query can fill gaps along one date_bin_gapfill only"),
    };
    let Expr::ScalarFunction(call) = &agg.group_expr[time] else {
        return plan_err!("date_bin_gapfill must be a GROUP BY expression by itself: {USAGE}");
    };
    let name = call.func.name().to_string();
    let any: &dyn std::any::Any = call.func.inner().as_ref();
    let inner = match any.downcast_ref::<BinGapfill>() {
        Some(b) => b.inner.clone(),
        None => return plan_err!("{name}: not a gap-filling function"),
    };
    let Some(Expr::Column(time_col)) = call.args.get(1) else {
        return plan_err!("{name} buckets a column, e.g. {name}(INTERVAL '1 minute', time)");
    };
    let stride = call.args[0].clone();
    let origin = match call.args.get(2) {
        Some(e) => e.clone(),
        None => Expr::Literal(
            ScalarValue::TimestampNanosecond(
                Some(if name == "time_bucket_gapfill" {
                    TIME_BUCKET_ORIGIN_NS
                } else {
                    0
                }),
                None,
            ),
            None,
        ),
    };
    let mut bounds = Vec::new();
    collect_bounds(&agg.input, &time_col.name, &mut bounds);
    let (mut lower, mut upper) = (Vec::new(), Vec::new());
    for (expr, side, inclusive) in bounds {
        match side {
            Side::Lower => lower.push(Bound { expr, inclusive }),
            Side::Upper => upper.push(Bound { expr, inclusive }),
        }
    }
    if lower.is_empty() {
        return plan_err!(
            "{name} needs a lower bound on {} in WHERE (e.g. {} >= now() - INTERVAL '1 hour'): the buckets to fill start there",
            time_col.name,
            time_col.name
        );
    }
    if upper.is_empty() {
        upper.push(Bound {
            expr: datafusion::functions::expr_fn::now(),
            inclusive: true,
        });
    }
    let output_name = agg.group_expr[time].schema_name().to_string();
    let mut group_expr = agg.group_expr.clone();
    group_expr[time] =
        Expr::ScalarFunction(ScalarFunction::new_udf(inner, call.args.clone())).alias(output_name);
    let groups = agg.group_expr.len();
    let aggrs = agg.aggr_expr.len();
    let aggregate = LogicalPlan::Aggregate(Aggregate::try_new(
        agg.input.clone(),
        group_expr,
        agg.aggr_expr.clone(),
    )?);
    if aggregate.schema().fields().len() != groups + aggrs {
        return plan_err!("{name} cannot fill gaps of grouping sets");
    }
    let node = GapFillNode {
        schema: filled_schema(aggregate.schema(), groups)?,
        input: aggregate,
        function: name,
        time,
        groups: (0..groups).filter(|&i| i != time).collect(),
        aggrs: (groups..groups + aggrs)
            .map(|i| (i, FillStrategy::Null))
            .collect(),
        stride,
        origin,
        lower,
        upper,
    };
    Ok(Transformed::yes(LogicalPlan::Extension(Extension {
        node: Arc::new(node),
    })))
}

/// `locf(x)` / `interpolate(x)` in a projection over a gap fill (directly or through a
/// `HAVING` filter): `x`, filled by the node.
fn rewrite_projection(proj: Projection) -> Result<Transformed<LogicalPlan>> {
    if !proj.expr.iter().any(|e| contains(e, is_fill)) {
        return Ok(Transformed::no(LogicalPlan::Projection(proj)));
    }
    let (node, having) = match proj.input.as_ref() {
        LogicalPlan::Extension(e) => (gap_fill_node(e), None),
        LogicalPlan::Filter(f) => match f.input.as_ref() {
            LogicalPlan::Extension(e) => (gap_fill_node(e), Some(f)),
            _ => (None, None),
        },
        _ => (None, None),
    };
    // No gap fill below: the check after the rule explains.
    let Some(node) = node else {
        return Ok(Transformed::no(LogicalPlan::Projection(proj)));
    };
    let mut node = node.clone();
    let schema = node.schema.clone();
    let mut exprs = Vec::with_capacity(proj.expr.len());
    for e in &proj.expr {
        let name = e.schema_name().to_string();
        let replaced = e
            .clone()
            .transform_up(|e| {
                let Expr::ScalarFunction(f) = &e else {
                    return Ok(Transformed::no(e));
                };
                let strategy = match f.func.name() {
                    "locf" => FillStrategy::Locf,
                    "interpolate" => FillStrategy::Interpolate,
                    _ => return Ok(Transformed::no(e)),
                };
                let fname = f.func.name();
                let Some(Expr::Column(col)) = f.args.first() else {
                    return plan_err!(
                        "{fname}() takes an aggregate of the query, e.g. {fname}(avg(v))"
                    );
                };
                let index = schema.index_of_column(col)?;
                let Some(slot) = node.aggrs.iter_mut().find(|(i, _)| *i == index) else {
                    return plan_err!(
                        "{fname}() takes an aggregate of the query, not the group column {}",
                        col.name
                    );
                };
                if slot.1 != FillStrategy::Null && slot.1 != strategy {
                    return plan_err!("{} is filled two ways in one query", col.name);
                }
                if strategy == FillStrategy::Interpolate {
                    let t = schema.field(index).data_type();
                    if !t.is_numeric() {
                        return plan_err!(
                            "interpolate() takes a numeric aggregate; {} is {t}",
                            col.name
                        );
                    }
                }
                slot.1 = strategy;
                Ok(Transformed::yes(Expr::Column(col.clone())))
            })?
            .data;
        exprs.push(replaced.alias_if_changed(name)?);
    }
    let filled = LogicalPlan::Extension(Extension {
        node: Arc::new(node),
    });
    let input = match having {
        Some(f) => LogicalPlan::Filter(Filter::try_new(f.predicate.clone(), Arc::new(filled))?),
        None => filled,
    };
    Ok(Transformed::yes(LogicalPlan::Projection(
        Projection::try_new(exprs, Arc::new(input))?,
    )))
}

/// The schema of a gap fill over `input`: its aggregates (the columns after the `groups`
/// group columns) are NULL in filled buckets.
fn filled_schema(input: &DFSchemaRef, groups: usize) -> Result<DFSchemaRef> {
    let fields = input
        .iter()
        .enumerate()
        .map(|(i, (q, f))| {
            let f = if i >= groups && !f.is_nullable() {
                Arc::new(f.as_ref().clone().with_nullable(true))
            } else {
                f.clone()
            };
            (q.cloned(), f)
        })
        .collect();
    Ok(Arc::new(DFSchema::new_with_metadata(
        fields,
        input.metadata().clone(),
    )?))
}

fn gap_fill_node(e: &Extension) -> Option<&GapFillNode> {
    e.node.as_any().downcast_ref::<GapFillNode>()
}

enum Side {
    Lower,
    Upper,
}

/// Constant bounds on the column `time` in the filters under an aggregate (through
/// projections that pass the column on, and aliases).
fn collect_bounds(plan: &LogicalPlan, time: &str, out: &mut Vec<(Expr, Side, bool)>) {
    match plan {
        LogicalPlan::Filter(f) => {
            for c in split_conjunction(&f.predicate) {
                bound_of(c, time, out);
            }
            collect_bounds(&f.input, time, out);
        }
        LogicalPlan::TableScan(scan) => {
            for f in &scan.filters {
                for c in split_conjunction(f) {
                    bound_of(c, time, out);
                }
            }
        }
        LogicalPlan::SubqueryAlias(s) => collect_bounds(&s.input, time, out),
        LogicalPlan::Projection(p) => {
            let passed = p.expr.iter().find_map(|e| {
                let (inner, name) = match e {
                    Expr::Alias(a) => (a.expr.as_ref(), a.name.clone()),
                    other => (other, other.schema_name().to_string()),
                };
                match inner {
                    Expr::Column(c) if name == time || c.name == time && name == c.flat_name() => {
                        Some(c.name.clone())
                    }
                    _ => None,
                }
            });
            if let Some(name) = passed {
                collect_bounds(&p.input, &name, out);
            }
        }
        _ => {}
    }
}

fn is_time(e: &Expr, time: &str) -> bool {
    matches!(e, Expr::Column(c) if c.name == time)
}

fn is_constant(e: &Expr) -> bool {
    e.column_refs().is_empty() && !e.is_volatile()
}

fn bound_of(c: &Expr, time: &str, out: &mut Vec<(Expr, Side, bool)>) {
    match c {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (value, op) = if is_time(left, time) && is_constant(right) {
                (right.as_ref(), *op)
            } else if is_time(right, time) && is_constant(left) {
                match op.swap() {
                    Some(op) => (left.as_ref(), op),
                    None => return,
                }
            } else {
                return;
            };
            let (side, inclusive) = match op {
                Operator::GtEq => (Side::Lower, true),
                Operator::Gt => (Side::Lower, false),
                Operator::LtEq => (Side::Upper, true),
                Operator::Lt => (Side::Upper, false),
                Operator::Eq => {
                    out.push((value.clone(), Side::Lower, true));
                    (Side::Upper, true)
                }
                _ => return,
            };
            out.push((value.clone(), side, inclusive));
        }
        Expr::Between(b)
            if !b.negated
                && is_time(&b.expr, time)
                && is_constant(&b.low)
                && is_constant(&b.high) =>
        {
            out.push((b.low.as_ref().clone(), Side::Lower, true));
            out.push((b.high.as_ref().clone(), Side::Upper, true));
        }
        _ => {}
    }
}

/// One constant bound on time.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd)]
pub(crate) struct Bound {
    pub(crate) expr: Expr,
    pub(crate) inclusive: bool,
}

/// Fills the gaps of its input, an aggregate grouped by a bucket of time.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub(crate) struct GapFillNode {
    input: LogicalPlan,
    schema: DFSchemaRef,
    /// The function as the user wrote it, for `EXPLAIN`.
    function: String,
    /// Input columns: the bucket, the other group columns, the aggregates and their fill.
    time: usize,
    groups: Vec<usize>,
    aggrs: Vec<(usize, FillStrategy)>,
    stride: Expr,
    origin: Expr,
    /// Every bound found (the tightest applies).
    lower: Vec<Bound>,
    upper: Vec<Bound>,
}

impl PartialOrd for GapFillNode {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        (&self.input, self.time, &self.groups, &self.aggrs).partial_cmp(&(
            &other.input,
            other.time,
            &other.groups,
            &other.aggrs,
        ))
    }
}

impl UserDefinedLogicalNodeCore for GapFillNode {
    fn name(&self) -> &str {
        "GapFill"
    }

    fn inputs(&self) -> Vec<&LogicalPlan> {
        vec![&self.input]
    }

    fn schema(&self) -> &DFSchemaRef {
        &self.schema
    }

    fn expressions(&self) -> Vec<Expr> {
        let mut exprs = vec![self.stride.clone(), self.origin.clone()];
        exprs.extend(self.lower.iter().map(|b| b.expr.clone()));
        exprs.extend(self.upper.iter().map(|b| b.expr.clone()));
        exprs
    }

    fn fmt_for_explain(&self, f: &mut fmt::Formatter) -> fmt::Result {
        let field = |i: usize| self.schema.field(i).name().clone();
        let fills: Vec<String> = self
            .aggrs
            .iter()
            .map(|(i, s)| match s {
                FillStrategy::Null => field(*i),
                FillStrategy::Locf => format!("locf({})", field(*i)),
                FillStrategy::Interpolate => format!("interpolate({})", field(*i)),
            })
            .collect();
        let bounds = |bs: &[Bound], strict: &str, loose: &str| -> String {
            bs.iter()
                .map(|b| format!("{} {}", if b.inclusive { loose } else { strict }, b.expr))
                .collect::<Vec<_>>()
                .join(" and ")
        };
        write!(
            f,
            "GapFill: {}, time={}, groups=[{}], aggregates=[{}], stride={}, origin={}, range=[{}, {}]",
            self.function,
            field(self.time),
            self.groups
                .iter()
                .map(|&i| field(i))
                .collect::<Vec<_>>()
                .join(", "),
            fills.join(", "),
            self.stride,
            self.origin,
            bounds(&self.lower, ">", ">="),
            bounds(&self.upper, "<", "<="),
        )
    }

    fn with_exprs_and_inputs(
        &self,
        exprs: Vec<Expr>,
        mut inputs: Vec<LogicalPlan>,
    ) -> Result<Self> {
        let (Some(input), true) = (inputs.pop(), inputs.is_empty()) else {
            return plan_err!("GapFill has one input");
        };
        if exprs.len() != 2 + self.lower.len() + self.upper.len() {
            return plan_err!("GapFill: {} expressions for its bounds", exprs.len());
        }
        let mut exprs = exprs.into_iter();
        let mut next = || {
            exprs
                .next()
                .unwrap_or_else(|| Expr::Literal(ScalarValue::Null, None))
        };
        let stride = next();
        let origin = next();
        let lower = self
            .lower
            .iter()
            .map(|b| Bound {
                expr: next(),
                inclusive: b.inclusive,
            })
            .collect();
        let upper = self
            .upper
            .iter()
            .map(|b| Bound {
                expr: next(),
                inclusive: b.inclusive,
            })
            .collect();
        Ok(GapFillNode {
            schema: filled_schema(input.schema(), self.groups.len() + 1)?,
            input,
            function: self.function.clone(),
            time: self.time,
            groups: self.groups.clone(),
            aggrs: self.aggrs.clone(),
            stride,
            origin,
            lower,
            upper,
        })
    }
}
