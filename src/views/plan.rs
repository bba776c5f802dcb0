//! How a materialized view is maintained: its definition is analysed once (at creation and at
//! open) into a [`ViewPlan`]: the strategy, the storage layout (time, key tags, value or state
//! fields), the SQL that produces storage rows, and the expressions that turn stored rows into
//! the view's columns.
//!
//! Strategies, cheapest first:
//! - **projection**: no aggregation over one table that keeps `time` and every tag: only the
//!   newly written rows are transformed;
//! - **aggregate**: `GROUP BY` a time bucket (or `time`) and tags with count, sum, min, max,
//!   avg, first/last by time, stddev/variance: the delta's partial states are merged into the
//!   stored states;
//! - **recompute**: anything else: the time buckets a change touched are recomputed from the
//!   stored data ("dirty windows"); with no time bucket to restrict by, the whole view.
//!
//! Overwrites and late points always go through recompute of the touched buckets.

use arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr as DfExpr, LogicalPlan};
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::{
    self, Expr, FunctionArg, FunctionArgExpr, FunctionArgumentClause, FunctionArguments,
    GroupByExpr, SelectItem, SetExpr, Statement, TableFactor, Value,
};
use std::ops::ControlFlow;

use crate::storage::catalog::{FieldType, TIME_COLUMN};

/// How the view's `time` relates to its primary source's `time`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TimeMap {
    /// `time` passes through.
    Identity,
    /// `date_bin(stride, time, origin)` (or a fixed-unit `date_trunc`).
    Bin { stride: i64, origin: i64 },
    /// No usable relation (no `time` column, or not a bucket of the source's time): a change
    /// recomputes the whole view.
    None,
}

impl TimeMap {
    /// The view-time range a source-time range `[lo, hi]` maps to.
    pub(crate) fn out_range(self, lo: i64, hi: i64) -> Option<(i64, i64)> {
        match self {
            TimeMap::Identity => Some((lo, hi)),
            TimeMap::Bin { .. } => Some((self.bucket(lo), self.bucket(hi))),
            TimeMap::None => None,
        }
    }

    /// The source-time range feeding the view-time range `[lo, hi]`.
    pub(crate) fn source_range(self, lo: i64, hi: i64) -> Option<(i64, i64)> {
        match self {
            TimeMap::Identity => Some((lo, hi)),
            TimeMap::Bin { stride, .. } => Some((lo, hi.saturating_add(stride - 1))),
            TimeMap::None => None,
        }
    }

    /// The bucket (view time) of source time `t`.
    pub(crate) fn bucket(self, t: i64) -> i64 {
        match self {
            TimeMap::Bin { stride, origin } => {
                let d = (t as i128 - origin as i128).div_euclid(stride as i128);
                (origin as i128 + d * stride as i128).clamp(i64::MIN as i128, i64::MAX as i128)
                    as i64
            }
            _ => t,
        }
    }

    /// End (exclusive) of the bucket holding source time `t`.
    pub(crate) fn bucket_end(self, t: i64) -> i64 {
        match self {
            TimeMap::Bin { stride, .. } => self.bucket(t).saturating_add(stride),
            _ => t.saturating_add(1),
        }
    }
}

/// The maintenance strategy, shown in `system.views`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Strategy {
    Projection,
    Aggregate,
    Recompute,
}

impl Strategy {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Strategy::Projection => "projection",
            Strategy::Aggregate => "aggregate-state",
            Strategy::Recompute => "dirty-windows",
        }
    }
}

/// An aggregate whose partial state merges.
#[derive(Debug, Clone, PartialEq)]
pub(crate) enum Agg {
    Count(String),
    Sum(String),
    Min(String),
    Max(String),
    Avg(String),
    First(String),
    Last(String),
    /// Variance or standard deviation, sample or population.
    Var {
        arg: String,
        sample: bool,
        sqrt: bool,
    },
}

impl Agg {
    /// (suffix, SQL over the source rows) of each state column.
    pub(crate) fn states(&self) -> Vec<(&'static str, String)> {
        match self {
            Agg::Count(a) => vec![("c", format!("count({a})"))],
            Agg::Sum(a) => vec![("v", format!("sum({a})"))],
            Agg::Min(a) => vec![("v", format!("min({a})"))],
            Agg::Max(a) => vec![("v", format!("max({a})"))],
            Agg::Avg(a) => vec![("s", format!("sum({a})")), ("c", format!("count({a})"))],
            Agg::First(a) => vec![
                ("v", format!("first_value({a} ORDER BY \"time\")")),
                ("t", "min(\"time\")".to_string()),
            ],
            Agg::Last(a) => vec![
                ("v", format!("last_value({a} ORDER BY \"time\")")),
                ("t", "max(\"time\")".to_string()),
            ],
            Agg::Var { arg, .. } => vec![
                ("n", format!("count({arg})")),
                ("m", format!("avg({arg})")),
                (
                    "q",
                    format!("var_pop({arg}) * CAST(count({arg}) AS DOUBLE)"),
                ),
            ],
        }
    }

    /// SQL merging the delta's state (`d.<col>`) with the stored one (`s.<col>`, null when
    /// the key is new), per state column (same order as [`Self::states`]).
    pub(crate) fn merges(&self, c: &dyn Fn(&str) -> String) -> Vec<String> {
        let (d, s) = (
            |x: &str| format!("d.{}", c(x)),
            |x: &str| format!("s.{}", c(x)),
        );
        let add_nullable = |x: &str| {
            format!(
                "CASE WHEN {s} IS NULL THEN {d} WHEN {d} IS NULL THEN {s} ELSE {d} + {s} END",
                d = d(x),
                s = s(x)
            )
        };
        let add_count = |x: &str| format!("{} + COALESCE({}, 0)", d(x), s(x));
        match self {
            Agg::Count(_) => vec![add_count("c")],
            Agg::Sum(_) => vec![add_nullable("v")],
            Agg::Min(_) => vec![format!("least({}, {})", d("v"), s("v"))],
            Agg::Max(_) => vec![format!("greatest({}, {})", d("v"), s("v"))],
            Agg::Avg(_) => vec![add_nullable("s"), add_count("c")],
            Agg::First(_) => vec![
                format!(
                    "CASE WHEN {st} IS NULL OR {dt} < {st} THEN {dv} ELSE {sv} END",
                    st = s("t"),
                    dt = d("t"),
                    dv = d("v"),
                    sv = s("v")
                ),
                format!("least({}, {})", d("t"), s("t")),
            ],
            Agg::Last(_) => vec![
                format!(
                    "CASE WHEN {st} IS NULL OR {dt} >= {st} THEN {dv} ELSE {sv} END",
                    st = s("t"),
                    dt = d("t"),
                    dv = d("v"),
                    sv = s("v")
                ),
                format!("greatest({}, {})", d("t"), s("t")),
            ],
            Agg::Var { .. } => {
                let (dn, sn) = (d("n"), format!("COALESCE({}, 0)", s("n")));
                let (dm, sm, dq, sq) = (d("m"), s("m"), d("q"), s("q"));
                let n = format!("CAST({dn} + {sn} AS DOUBLE)");
                vec![
                    format!("{dn} + {sn}"),
                    format!(
                        "CASE WHEN {sn} = 0 THEN {dm} WHEN {dn} = 0 THEN {sm} \
                         ELSE ({dm} * CAST({dn} AS DOUBLE) + {sm} * CAST({sn} AS DOUBLE)) / {n} END"
                    ),
                    format!(
                        "CASE WHEN {sn} = 0 THEN {dq} WHEN {dn} = 0 THEN {sq} \
                         ELSE {dq} + {sq} + ({dm} - {sm}) * ({dm} - {sm}) * CAST({dn} AS DOUBLE) \
                         * CAST({sn} AS DOUBLE) / {n} END"
                    ),
                ]
            }
        }
    }
}

/// One output column of the view.
#[derive(Debug, Clone)]
pub(crate) enum OutColumn {
    /// The view's `time` (stored as the storage time).
    Time,
    /// A grouping key or a kept source tag: stored as a tag.
    Key,
    /// A value stored as it is (projection and recompute views).
    Value,
    /// An aggregate kept as merge-able states.
    State(Agg),
}

/// The analysed definition.
#[derive(Debug, Clone)]
pub(crate) struct ViewPlan {
    pub(crate) strategy: Strategy,
    /// Every table or view the definition reads: (database, name).
    pub(crate) sources: Vec<(String, String)>,
    pub(crate) time: TimeMap,
    /// Output columns in order: (name, what it is).
    pub(crate) columns: Vec<(String, OutColumn)>,
    /// The view's output schema, as DataFusion plans the definition.
    pub(crate) schema: SchemaRef,
    /// SQL producing storage rows (the definition itself, or its state form).
    pub(crate) storage_sql: String,
    /// The view has a `time` column (else storage time is 0 and hidden).
    pub(crate) has_time: bool,
    /// For aggregate views keyed by source tags only: recomputing a bucket can be limited to
    /// the keys a change touched.
    pub(crate) keyed: Option<Keyed>,
}

/// The storage SQL of an aggregate view with a hole for a key predicate, and its keys as
/// (view column, source tag).
#[derive(Debug, Clone)]
pub(crate) struct Keyed {
    pub(crate) tags: Vec<(String, String)>,
    prefix: String,
    suffix: String,
}

impl Keyed {
    /// The storage SQL restricted to rows whose key tags take the given values.
    pub(crate) fn sql(&self, values: &[Vec<String>]) -> String {
        let pred: Vec<String> = self
            .tags
            .iter()
            .zip(values)
            .map(|((_, tag), vals)| {
                let list: Vec<String> = vals
                    .iter()
                    .map(|v| format!("'{}'", v.replace('\'', "''")))
                    .collect();
                format!("{} IN ({})", quote(tag), list.join(", "))
            })
            .collect();
        format!("{}{}{}", self.prefix, pred.join(" AND "), self.suffix)
    }
}

impl ViewPlan {
    /// Storage column name of state `suffix` of output column `i`.
    pub(crate) fn state_column(i: usize, suffix: &str) -> String {
        format!("__a{i}_{suffix}")
    }
}

/// What the analysis needs from the SQL engine.
pub(crate) struct Planned {
    pub(crate) plan: LogicalPlan,
    pub(crate) schema: SchemaRef,
}

/// The `SELECT` of a definition, parsed.
pub(crate) fn parse_query(sql: &str) -> Result<ast::Query, String> {
    let mut statements = DFParser::parse_sql(sql).map_err(|e| e.to_string())?;
    if statements.len() != 1 {
        return Err("a view is defined by one SELECT".to_string());
    }
    match statements.pop_front() {
        Some(DfStatement::Statement(s)) => match *s {
            Statement::Query(q) => Ok(*q),
            other => Err(format!("a view is defined by a SELECT, not {other}")),
        },
        _ => Err("a view is defined by a SELECT".to_string()),
    }
}

/// Sources, a clock function if any, whether there is a subquery.
pub(crate) type PlanFacts = (Vec<(String, String)>, Option<String>, bool);

/// Source tables and views the plan reads, `(database, name)`, in plan order, and whether the
/// plan calls a function of the clock or holds a subquery.
pub(crate) fn plan_facts(plan: &LogicalPlan, default_db: &str) -> Result<PlanFacts, String> {
    let mut sources: Vec<(String, String)> = Vec::new();
    let mut clock = None;
    let mut subquery = false;
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::TableScan(scan) = node {
            let db = scan.table_name.schema().unwrap_or(default_db).to_string();
            let t = (db, scan.table_name.table().to_string());
            if !sources.contains(&t) {
                sources.push(t);
            }
        }
        if matches!(
            node,
            LogicalPlan::Subquery(_) | LogicalPlan::SubqueryAlias(_)
        ) {
            subquery = true;
        }
        for e in node.expressions() {
            e.apply(|e| {
                match e {
                    DfExpr::ScalarFunction(f)
                        if matches!(
                            f.name(),
                            "now" | "current_date" | "current_time" | "random" | "uuid"
                        ) =>
                    {
                        clock = Some(f.name().to_string());
                    }
                    DfExpr::ScalarSubquery(_) | DfExpr::Exists(_) | DfExpr::InSubquery(_) => {
                        subquery = true;
                    }
                    _ => {}
                }
                Ok(TreeNodeRecursion::Continue)
            })?;
        }
        Ok(TreeNodeRecursion::Continue)
    })
    .map_err(|e| e.to_string())?;
    Ok((sources, clock, subquery))
}

/// Evaluates constant parts of a definition (a `date_bin` stride or origin).
pub(crate) type Evaluate<'a> = &'a dyn Fn(&str) -> Result<datafusion::common::ScalarValue, String>;

fn is_time_ident(e: &Expr) -> bool {
    match e {
        Expr::Identifier(i) => i.value == TIME_COLUMN,
        Expr::CompoundIdentifier(parts) => parts.last().is_some_and(|i| i.value == TIME_COLUMN),
        Expr::Nested(inner) => is_time_ident(inner),
        _ => false,
    }
}

fn function_args(f: &ast::Function) -> Option<(&[FunctionArg], &[FunctionArgumentClause], bool)> {
    match &f.args {
        FunctionArguments::List(list) => Some((
            &list.args,
            &list.clauses,
            list.duplicate_treatment.is_some(),
        )),
        FunctionArguments::None => Some((&[], &[], false)),
        FunctionArguments::Subquery(_) => None,
    }
}

fn arg_expr(a: &FunctionArg) -> Option<&Expr> {
    match a {
        FunctionArg::Unnamed(FunctionArgExpr::Expr(e)) => Some(e),
        _ => None,
    }
}

fn function_name(f: &ast::Function) -> String {
    f.name.to_string().to_ascii_lowercase()
}

/// The time mapping of the view's `time` expression.
fn time_map(e: &Expr, eval: Evaluate) -> Result<TimeMap, String> {
    if is_time_ident(e) {
        return Ok(TimeMap::Identity);
    }
    let Expr::Function(f) = e else {
        return Ok(TimeMap::None);
    };
    let Some((args, clauses, distinct)) = function_args(f) else {
        return Ok(TimeMap::None);
    };
    if distinct || !clauses.is_empty() || f.over.is_some() {
        return Ok(TimeMap::None);
    }
    let args: Vec<&Expr> = args.iter().filter_map(arg_expr).collect();
    match (function_name(f).as_str(), args.as_slice()) {
        ("date_bin", [stride, t, rest @ ..]) if is_time_ident(t) && rest.len() <= 1 => {
            use datafusion::common::ScalarValue as S;
            let day = 86_400_000_000_000i64;
            let stride = match eval(&stride.to_string())? {
                S::IntervalMonthDayNano(Some(v)) if v.months == 0 => (v.days as i64)
                    .checked_mul(day)
                    .and_then(|d| d.checked_add(v.nanoseconds))
                    .unwrap_or(0),
                S::IntervalDayTime(Some(v)) => (v.days as i64)
                    .checked_mul(day)
                    .and_then(|d| d.checked_add(v.milliseconds as i64 * 1_000_000))
                    .unwrap_or(0),
                _ => return Ok(TimeMap::None),
            };
            if stride <= 0 {
                return Ok(TimeMap::None);
            }
            let origin = match rest.first() {
                None => 0,
                Some(o) => match eval(&format!("CAST({o} AS TIMESTAMP)"))? {
                    S::TimestampNanosecond(Some(v), _) => v,
                    S::TimestampMicrosecond(Some(v), _) => v.saturating_mul(1_000),
                    S::TimestampMillisecond(Some(v), _) => v.saturating_mul(1_000_000),
                    S::TimestampSecond(Some(v), _) => v.saturating_mul(1_000_000_000),
                    _ => return Ok(TimeMap::None),
                },
            };
            Ok(TimeMap::Bin { stride, origin })
        }
        ("date_trunc" | "datetrunc", [unit, t]) if is_time_ident(t) => {
            let unit = match unit {
                Expr::Value(v) => match &v.value {
                    Value::SingleQuotedString(s) => s.to_ascii_lowercase(),
                    _ => return Ok(TimeMap::None),
                },
                _ => return Ok(TimeMap::None),
            };
            let stride = match unit.as_str() {
                "second" => 1_000_000_000,
                "minute" => 60_000_000_000,
                "hour" => 3_600_000_000_000,
                "day" => 86_400_000_000_000,
                _ => return Ok(TimeMap::None),
            };
            Ok(TimeMap::Bin { stride, origin: 0 })
        }
        _ => Ok(TimeMap::None),
    }
}

/// Whether `e` calls an aggregate or window function anywhere.
fn has_aggregate(e: &Expr, is_aggregate: &dyn Fn(&str) -> bool) -> bool {
    ast::visit_expressions(e, |x| match x {
        Expr::Function(f) if f.over.is_some() || is_aggregate(&function_name(f)) => {
            ControlFlow::Break(())
        }
        _ => ControlFlow::Continue(()),
    })
    .is_break()
}

/// A bare aggregate call whose state merges.
fn mergeable(e: &Expr) -> Option<Agg> {
    let Expr::Function(f) = e else { return None };
    if f.filter.is_some() || f.over.is_some() || f.null_treatment.is_some() {
        return None;
    }
    let (args, clauses, distinct) = function_args(f)?;
    if distinct || args.len() != 1 {
        return None;
    }
    let name = function_name(f);
    let star = matches!(args[0], FunctionArg::Unnamed(FunctionArgExpr::Wildcard));
    if star {
        return (name == "count" && clauses.is_empty()).then(|| Agg::Count("*".to_string()));
    }
    let arg = arg_expr(&args[0])?;
    let text = arg.to_string();
    let ordered_by_time = match clauses {
        [] => None,
        [FunctionArgumentClause::OrderBy(order)] => match order.as_slice() {
            [o] if is_time_ident(&o.expr) => Some(o.options.asc != Some(false)),
            _ => return None,
        },
        _ => return None,
    };
    let plain = |agg: Agg| ordered_by_time.is_none().then_some(agg);
    match name.as_str() {
        "count" => plain(Agg::Count(text)),
        "sum" => plain(Agg::Sum(text)),
        "min" => plain(Agg::Min(text)),
        "max" => plain(Agg::Max(text)),
        "avg" | "mean" => plain(Agg::Avg(text)),
        "first_value" => match ordered_by_time {
            Some(true) => Some(Agg::First(text)),
            Some(false) => Some(Agg::Last(text)),
            None => None,
        },
        "last_value" => match ordered_by_time {
            Some(true) => Some(Agg::Last(text)),
            Some(false) => Some(Agg::First(text)),
            None => None,
        },
        "var" | "var_samp" | "var_sample" | "variance" => plain(Agg::Var {
            arg: text,
            sample: true,
            sqrt: false,
        }),
        "var_pop" | "var_population" => plain(Agg::Var {
            arg: text,
            sample: false,
            sqrt: false,
        }),
        "stddev" | "stddev_samp" => plain(Agg::Var {
            arg: text,
            sample: true,
            sqrt: true,
        }),
        "stddev_pop" => plain(Agg::Var {
            arg: text,
            sample: false,
            sqrt: true,
        }),
        _ => None,
    }
}

/// Quotes an identifier for generated SQL.
pub(crate) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether a type can be a key (stored as a tag string).
fn key_type_ok(t: &DataType) -> bool {
    matches!(
        t,
        DataType::Utf8
            | DataType::LargeUtf8
            | DataType::Utf8View
            | DataType::Int8
            | DataType::Int16
            | DataType::Int32
            | DataType::Int64
            | DataType::UInt8
            | DataType::UInt16
            | DataType::UInt32
            | DataType::UInt64
            | DataType::Boolean
    ) || matches!(t, DataType::Dictionary(_, v) if matches!(**v, DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View))
}

/// The storage field type of a value column of type `t`.
pub(crate) fn value_type(t: &DataType) -> Option<FieldType> {
    Some(match t {
        DataType::Float64 | DataType::Float32 | DataType::Float16 => FieldType::Float,
        DataType::Int8 | DataType::Int16 | DataType::Int32 | DataType::Int64 => FieldType::Integer,
        DataType::Timestamp(_, _) | DataType::Date32 | DataType::Date64 => FieldType::Integer,
        DataType::UInt8 | DataType::UInt16 | DataType::UInt32 | DataType::UInt64 => {
            FieldType::UInteger
        }
        DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => FieldType::String,
        DataType::Dictionary(_, v)
            if matches!(
                **v,
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
            ) =>
        {
            FieldType::String
        }
        DataType::Boolean => FieldType::Boolean,
        _ => return None,
    })
}

/// Analyses a definition. `planned` is the definition planned by DataFusion (which already
/// rejected unknown tables and columns); `tags_of(db, table)` gives a source's tag columns
/// (None for a view); `is_aggregate` tells aggregate function names.
pub(crate) fn analyse(
    sql: &str,
    planned: &Planned,
    default_db: &str,
    tags_of: &dyn Fn(&str, &str) -> Option<Vec<String>>,
    is_view: &dyn Fn(&str, &str) -> bool,
    is_aggregate: &dyn Fn(&str) -> bool,
    eval: Evaluate,
) -> Result<ViewPlan, String> {
    let query = parse_query(sql)?;
    let (sources, clock, subquery) = plan_facts(&planned.plan, default_db)?;
    if let Some(f) = clock {
        return Err(format!(
            "a view cannot call {f}(): its rows would change with the clock, not with the data"
        ));
    }
    if sources.is_empty() {
        return Err("a view must read at least one table".to_string());
    }
    let schema = planned.schema.clone();
    let mut names = std::collections::HashSet::new();
    for f in schema.fields() {
        if f.name().starts_with("__") {
            return Err(format!(
                "column '{}': names starting with '__' are reserved",
                f.name()
            ));
        }
        if !names.insert(f.name().clone()) {
            return Err(format!(
                "column '{}' appears twice; give each column its own name with AS",
                f.name()
            ));
        }
    }
    let has_time = match schema.field_with_name(TIME_COLUMN) {
        Ok(f) => {
            if !matches!(f.data_type(), DataType::Timestamp(_, _)) {
                return Err(format!(
                    "column 'time' has type {}; a view's 'time' must be a timestamp (e.g. \
                     date_bin(INTERVAL '1 minute', time) AS time)",
                    f.data_type()
                ));
            }
            true
        }
        Err(_) => false,
    };

    // The simple shape: one SELECT over one table, no CTE, ordering or limit.
    let select = match (&*query.body, &query.with, &query.limit_clause, &query.fetch) {
        (SetExpr::Select(s), None, None, None) => Some(s),
        _ => None,
    };
    let limited = query.limit_clause.is_some() || query.fetch.is_some();
    let single = select.and_then(|s| match s.from.as_slice() {
        [t] if t.joins.is_empty() => match &t.relation {
            TableFactor::Table { args: None, .. } => Some(s),
            _ => None,
        },
        _ => None,
    });
    let primary = sources.first().cloned();

    // The items of the SELECT list, matched to output columns.
    let items: Option<Vec<(String, &Expr)>> = select.and_then(|s| {
        let mut out = Vec::new();
        for (item, field) in s.projection.iter().zip(schema.fields()) {
            match item {
                SelectItem::UnnamedExpr(e) | SelectItem::ExprWithAlias { expr: e, .. } => {
                    out.push((field.name().clone(), e))
                }
                _ => return None,
            }
        }
        (out.len() == schema.fields().len()).then_some(out)
    });
    let time_expr = items.as_ref().and_then(|items| {
        items
            .iter()
            .find(|(n, _)| n == TIME_COLUMN)
            .map(|(_, e)| *e)
    });
    let mut time = match time_expr {
        Some(e) if !limited => time_map(e, eval)?,
        _ => TimeMap::None,
    };

    let grouped = select.is_some_and(|s| match &s.group_by {
        GroupByExpr::Expressions(e, _) => !e.is_empty(),
        GroupByExpr::All(_) => true,
    }) || items
        .as_ref()
        .is_some_and(|items| items.iter().any(|(_, e)| has_aggregate(e, is_aggregate)));
    let any_window = items.as_ref().is_none_or(|items| {
        items.iter().any(|(_, e)| {
            ast::visit_expressions(*e, |x| match x {
                Expr::Function(f) if f.over.is_some() => ControlFlow::Break(()),
                _ => ControlFlow::Continue(()),
            })
            .is_break()
        })
    });
    let from_view = sources.iter().any(|(d, t)| is_view(d, t));
    // Window functions and subqueries look across time buckets: a change anywhere may move
    // any row, so they recompute the whole view.
    let time_identity = time == TimeMap::Identity;
    if any_window || subquery {
        time = TimeMap::None;
    }

    let mut columns: Vec<(String, OutColumn)> = Vec::new();
    let mut strategy;
    if grouped {
        // Keys: the items without aggregates. Values: the rest.
        let Some(items) = &items else {
            return Err(
                "a grouped view must list its columns (no *) so its keys are known".to_string(),
            );
        };
        strategy = Strategy::Aggregate;
        let sel = select.ok_or("a grouped view must be one SELECT")?;
        if single.is_none()
            || subquery
            || from_view
            || sel.having.is_some()
            || sel.distinct.is_some()
            || query.order_by.is_some()
            || any_window
            || matches!(sel.group_by, GroupByExpr::All(_))
            || matches!(&sel.group_by, GroupByExpr::Expressions(_, m) if !m.is_empty())
        {
            strategy = Strategy::Recompute;
        }
        for (name, e) in items {
            if name == TIME_COLUMN {
                if has_aggregate(e, is_aggregate) {
                    return Err("the view's 'time' must be a grouping key".to_string());
                }
                columns.push((name.clone(), OutColumn::Time));
            } else if has_aggregate(e, is_aggregate) {
                match mergeable(e) {
                    Some(agg) => columns.push((name.clone(), OutColumn::State(agg))),
                    None => {
                        strategy = Strategy::Recompute;
                        columns.push((name.clone(), OutColumn::Value));
                    }
                }
            } else {
                let t = schema
                    .field_with_name(name)
                    .map_err(|e| e.to_string())?
                    .data_type();
                if !key_type_ok(t) {
                    return Err(format!(
                        "grouping key '{name}' has type {t}; a view's keys are strings, integers \
                         or booleans (besides 'time')"
                    ));
                }
                columns.push((name.clone(), OutColumn::Key));
            }
        }
        if has_time && time == TimeMap::None {
            strategy = Strategy::Recompute;
        }
        if strategy == Strategy::Recompute {
            for c in &mut columns {
                if matches!(c.1, OutColumn::State(_)) {
                    c.1 = OutColumn::Value;
                }
            }
        }
    } else {
        // Rows keep the key of their source rows: `time` and every tag of the primary source.
        let Some((pdb, ptable)) = &primary else {
            return Err("a view must read a table".to_string());
        };
        // Over a view, its keys are the upstream's keys (none known here).
        let tags = tags_of(pdb, ptable).unwrap_or_default();
        if !has_time || !time_identity {
            return Err(format!(
                "a view without GROUP BY must select '{TIME_COLUMN}' of '{ptable}' as it is, so \
                 each of its rows keeps the key of the point it comes from"
            ));
        }
        for tag in &tags {
            if schema.field_with_name(tag).is_err() {
                return Err(format!(
                    "a view without GROUP BY must select every tag of '{ptable}' (missing \
                     '{tag}'), so each of its rows keeps the key of the point it comes from"
                ));
            }
        }
        strategy = if single.is_some() && !subquery && !any_window && !from_view {
            Strategy::Projection
        } else {
            Strategy::Recompute
        };
        for f in schema.fields() {
            let kind = if f.name() == TIME_COLUMN {
                OutColumn::Time
            } else if tags.contains(f.name())
                || (from_view && tags.is_empty() && is_key_of_view(f.data_type()))
            {
                OutColumn::Key
            } else {
                OutColumn::Value
            };
            columns.push((f.name().clone(), kind));
        }
    }
    if from_view {
        strategy = Strategy::Recompute;
    }
    for (name, c) in &columns {
        if matches!(c, OutColumn::Value) {
            let t = schema
                .field_with_name(name)
                .map_err(|e| e.to_string())?
                .data_type();
            if value_type(t).is_none() {
                return Err(format!(
                    "column '{name}' has type {t}, which a view cannot store; CAST it to DOUBLE, \
                     BIGINT or VARCHAR"
                ));
            }
        }
    }

    let mut keyed = None;
    let storage_sql = if strategy == Strategy::Aggregate {
        let sel = select.ok_or("a grouped view must be one SELECT")?;
        let items = items
            .as_ref()
            .ok_or("a grouped view must list its columns")?;
        let mut list = Vec::new();
        let mut keys = 0;
        for (i, ((name, e), (_, c))) in items.iter().zip(&columns).enumerate() {
            match c {
                OutColumn::Time | OutColumn::Key => {
                    list.insert(keys, format!("{e} AS {}", quote(name)));
                    keys += 1;
                }
                OutColumn::State(agg) => {
                    for (suffix, s) in agg.states() {
                        list.push(format!(
                            "{s} AS {}",
                            quote(&ViewPlan::state_column(i, suffix))
                        ));
                    }
                }
                OutColumn::Value => {}
            }
        }
        let from = sel
            .from
            .iter()
            .map(|f| f.to_string())
            .collect::<Vec<_>>()
            .join(", ");
        let mut sql = format!("SELECT {} FROM {from}", list.join(", "));
        if let Some(w) = &sel.selection {
            sql.push_str(&format!(" WHERE {w}"));
        }
        let mut group = String::new();
        if keys > 0 {
            let ordinals: Vec<String> = (1..=keys).map(|k| k.to_string()).collect();
            group = format!(" GROUP BY {}", ordinals.join(", "));
        }
        // Keyed by source tags only (as they are, strings): a group depends on its tags' rows.
        let source_tags = primary
            .as_ref()
            .and_then(|(d, t)| tags_of(d, t))
            .unwrap_or_default();
        let mut tags = Vec::new();
        for ((name, e), (_, c)) in items.iter().zip(&columns) {
            if !matches!(c, OutColumn::Key) {
                continue;
            }
            let tag = match e {
                Expr::Identifier(i) => Some(i.value.clone()),
                Expr::CompoundIdentifier(p) => p.last().map(|i| i.value.clone()),
                _ => None,
            };
            let string = schema.field_with_name(name).is_ok_and(|f| {
                matches!(f.data_type(), DataType::Utf8 | DataType::Dictionary(_, _))
            });
            match tag {
                Some(t) if string && source_tags.contains(&t) => tags.push((name.clone(), t)),
                _ => {
                    tags.clear();
                    break;
                }
            }
        }
        if !tags.is_empty()
            && tags.len()
                == columns
                    .iter()
                    .filter(|c| matches!(c.1, OutColumn::Key))
                    .count()
        {
            let prefix = match &sel.selection {
                Some(w) => format!("SELECT {} FROM {from} WHERE ({w}) AND ", list.join(", ")),
                None => format!("SELECT {} FROM {from} WHERE ", list.join(", ")),
            };
            keyed = Some(Keyed {
                tags,
                prefix,
                suffix: group.clone(),
            });
        }
        sql.push_str(&group);
        sql
    } else {
        sql.to_string()
    };
    Ok(ViewPlan {
        strategy,
        sources,
        time,
        columns,
        schema,
        storage_sql,
        has_time,
        keyed,
    })
}

/// Over a view, the string-like columns of a projection are taken as its keys.
fn is_key_of_view(t: &DataType) -> bool {
    matches!(t, DataType::Dictionary(_, _))
}
