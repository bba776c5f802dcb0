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
//!
//! The analysis is in [`analyse`], the SQL that produces aggregate states in [`state_sql`].

mod analyse;
mod state_sql;

pub(crate) use analyse::analyse;

use arrow::datatypes::{DataType, SchemaRef};
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr as DfExpr, LogicalPlan};
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::{self, Statement};

use super::ViewError;
use crate::storage::catalog::FieldType;

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
pub(crate) fn parse_query(sql: &str) -> Result<ast::Query, ViewError> {
    let mut statements = DFParser::parse_sql(sql).map_err(|e| ViewError::Invalid(e.to_string()))?;
    if statements.len() != 1 {
        return Err(ViewError::Invalid(
            "a view is defined by one SELECT".to_string(),
        ));
    }
    match statements.pop_front() {
        Some(DfStatement::Statement(s)) => match *s {
            Statement::Query(q) => Ok(*q),
            other => Err(ViewError::Invalid(format!(
                "a view is defined by a SELECT, not {other}"
            ))),
        },
        _ => Err(ViewError::Invalid(
            "a view is defined by a SELECT".to_string(),
        )),
    }
}

/// Sources, a clock function if any, whether there is a subquery.
pub(crate) type PlanFacts = (Vec<(String, String)>, Option<String>, bool);

/// Source tables and views the plan reads, `(database, name)`, in plan order, and whether the
/// plan calls a function of the clock or holds a subquery.
pub(crate) fn plan_facts(plan: &LogicalPlan, default_db: &str) -> Result<PlanFacts, ViewError> {
    let mut sources: Vec<(String, String)> = Vec::new();
    let mut clock = None;
    let mut subquery = false;
    let mut gap_fill = false;
    plan.apply_with_subqueries(|node| {
        if let LogicalPlan::Extension(e) = node
            && e.node.name() == "GapFill"
        {
            gap_fill = true;
        }
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
                    DfExpr::ScalarFunction(f)
                        if matches!(
                            f.name(),
                            "date_bin_gapfill" | "time_bucket_gapfill" | "locf" | "interpolate"
                        ) =>
                    {
                        gap_fill = true;
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
    .map_err(|e| ViewError::Invalid(e.to_string()))?;
    if gap_fill {
        return Err(ViewError::Invalid(
            "a view does not fill gaps: keep date_bin(…) buckets in the view and query it with date_bin_gapfill(…), locf() or interpolate()".to_string(),
        ));
    }
    Ok((sources, clock, subquery))
}

/// Quotes an identifier for generated SQL.
pub(crate) fn quote(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Whether a type can be a key (stored as a tag string).
pub(super) fn key_type_ok(t: &DataType) -> bool {
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
