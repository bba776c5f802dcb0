//! The analysis of a view definition: its shape (one SELECT over one table? grouped? window
//! functions?), its time bucket, its columns (time, keys, values, mergeable states) and the
//! strategy that follows.

use std::ops::ControlFlow;

use arrow::datatypes::{DataType, SchemaRef};
use datafusion::sql::sqlparser::ast::{
    self, Expr, FunctionArg, FunctionArgExpr, FunctionArgumentClause, FunctionArguments,
    GroupByExpr, SelectItem, SetExpr, TableFactor, Value,
};

use super::{
    Agg, OutColumn, Planned, Strategy, TimeMap, ViewPlan, key_type_ok, parse_query, plan_facts,
    value_type,
};
use crate::storage::catalog::TIME_COLUMN;
use crate::views::ViewError;

/// Evaluates constant parts of a definition (a `date_bin` stride or origin).
pub(crate) type Evaluate<'a> =
    &'a dyn Fn(&str) -> Result<datafusion::common::ScalarValue, ViewError>;

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
fn time_map(e: &Expr, eval: Evaluate) -> Result<TimeMap, ViewError> {
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

/// What the definition's query looks like, as far as maintenance cares.
struct Shape<'q> {
    /// The one SELECT (no CTE, ordering or limit), if it is one.
    select: Option<&'q ast::Select>,
    /// ... over one plain table without joins.
    single: bool,
    limited: bool,
    ordered: bool,
    /// The SELECT list matched to output columns (None: `*` or not one SELECT).
    items: Option<Vec<(String, &'q Expr)>>,
    grouped: bool,
    any_window: bool,
    subquery: bool,
    from_view: bool,
}

impl<'q> Shape<'q> {
    fn of(
        query: &'q ast::Query,
        schema: &SchemaRef,
        subquery: bool,
        from_view: bool,
        is_aggregate: &dyn Fn(&str) -> bool,
    ) -> Shape<'q> {
        let select = match (&*query.body, &query.with, &query.limit_clause, &query.fetch) {
            (SetExpr::Select(s), None, None, None) => Some(s.as_ref()),
            _ => None,
        };
        let single = select.is_some_and(|s| match s.from.as_slice() {
            [t] if t.joins.is_empty() => {
                matches!(&t.relation, TableFactor::Table { args: None, .. })
            }
            _ => false,
        });
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
        Shape {
            select,
            single,
            limited: query.limit_clause.is_some() || query.fetch.is_some(),
            ordered: query.order_by.is_some(),
            items,
            grouped,
            any_window,
            subquery,
            from_view,
        }
    }

    /// The expression of the output column `time`.
    fn time_expr(&self) -> Option<&'q Expr> {
        self.items.as_ref().and_then(|items| {
            items
                .iter()
                .find(|(n, _)| n == TIME_COLUMN)
                .map(|(_, e)| *e)
        })
    }
}

/// Checks the output columns (no reserved or repeated names, `time` a timestamp); returns
/// whether there is a `time`.
fn check_columns(schema: &SchemaRef) -> Result<bool, ViewError> {
    let mut names = std::collections::HashSet::new();
    for f in schema.fields() {
        if f.name().starts_with("__") {
            return Err(ViewError::Invalid(format!(
                "column '{}': names starting with '__' are reserved",
                f.name()
            )));
        }
        if !names.insert(f.name().clone()) {
            return Err(ViewError::Invalid(format!(
                "column '{}' appears twice; give each column its own name with AS",
                f.name()
            )));
        }
    }
    match schema.field_with_name(TIME_COLUMN) {
        Ok(f) if !matches!(f.data_type(), DataType::Timestamp(_, _)) => {
            Err(ViewError::Invalid(format!(
                "column 'time' has type {}; a view's 'time' must be a timestamp (e.g. \
             date_bin(INTERVAL '1 minute', time) AS time)",
                f.data_type()
            )))
        }
        Ok(_) => Ok(true),
        Err(_) => Ok(false),
    }
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
) -> Result<ViewPlan, ViewError> {
    let query = parse_query(sql)?;
    let (sources, clock, subquery) = plan_facts(&planned.plan, default_db)?;
    if let Some(f) = clock {
        return Err(ViewError::Invalid(format!(
            "a view cannot call {f}(): its rows would change with the clock, not with the data"
        )));
    }
    if sources.is_empty() {
        return Err(ViewError::Invalid(
            "a view must read at least one table".to_string(),
        ));
    }
    let schema = planned.schema.clone();
    let has_time = check_columns(&schema)?;
    let from_view = sources.iter().any(|(d, t)| is_view(d, t));
    let shape = Shape::of(&query, &schema, subquery, from_view, is_aggregate);
    let mut time = match shape.time_expr() {
        Some(e) if !shape.limited => time_map(e, eval)?,
        _ => TimeMap::None,
    };
    // Window functions and subqueries look across time buckets: a change anywhere may move
    // any row, so they recompute the whole view.
    let time_identity = time == TimeMap::Identity;
    if shape.any_window || subquery {
        time = TimeMap::None;
    }
    let (columns, mut strategy) = if shape.grouped {
        grouped_columns(&shape, &schema, is_aggregate, has_time, time)?
    } else {
        let primary = sources
            .first()
            .ok_or_else(|| ViewError::Invalid("a view must read a table".to_string()))?;
        let ok_time = has_time && time_identity;
        projection_columns(&shape, &schema, primary, tags_of, ok_time)?
    };
    if from_view {
        strategy = Strategy::Recompute;
    }
    check_value_types(&columns, &schema)?;
    let (storage_sql, keyed) = match (strategy, shape.select, &shape.items) {
        (Strategy::Aggregate, Some(select), Some(items)) => {
            let source_tags = sources
                .first()
                .and_then(|(d, t)| tags_of(d, t))
                .unwrap_or_default();
            super::state_sql::aggregate_sql(select, items, &columns, &schema, &source_tags)
        }
        (Strategy::Aggregate, _, _) => {
            return Err(ViewError::Invalid(
                "a grouped view must be one SELECT listing its columns".to_string(),
            ));
        }
        _ => (sql.to_string(), None),
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

/// The columns of a grouped view: keys (items without aggregates), `time`, and values or
/// mergeable states; aggregate unless something forces a recompute.
fn grouped_columns(
    shape: &Shape<'_>,
    schema: &SchemaRef,
    is_aggregate: &dyn Fn(&str) -> bool,
    has_time: bool,
    time: TimeMap,
) -> Result<(Vec<(String, OutColumn)>, Strategy), ViewError> {
    let Some(items) = &shape.items else {
        return Err(ViewError::Invalid(
            "a grouped view must list its columns (no *) so its keys are known".to_string(),
        ));
    };
    let sel = shape
        .select
        .ok_or_else(|| ViewError::Invalid("a grouped view must be one SELECT".to_string()))?;
    let mut strategy = Strategy::Aggregate;
    if !shape.single
        || shape.subquery
        || shape.from_view
        || sel.having.is_some()
        || sel.distinct.is_some()
        || shape.ordered
        || shape.any_window
        || matches!(sel.group_by, GroupByExpr::All(_))
        || matches!(&sel.group_by, GroupByExpr::Expressions(_, m) if !m.is_empty())
    {
        strategy = Strategy::Recompute;
    }
    let mut columns = Vec::new();
    for (name, e) in items {
        if name == TIME_COLUMN {
            if has_aggregate(e, is_aggregate) {
                return Err(ViewError::Invalid(
                    "the view's 'time' must be a grouping key".to_string(),
                ));
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
                .map_err(|e| ViewError::Invalid(e.to_string()))?
                .data_type();
            if !key_type_ok(t) {
                return Err(ViewError::Invalid(format!(
                    "grouping key '{name}' has type {t}; a view's keys are strings, integers \
                     or booleans (besides 'time')"
                )));
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
    Ok((columns, strategy))
}

/// The columns of a view without `GROUP BY`: its rows keep the key of their source rows, so it
/// must select `time` as it is (`ok_time`) and every tag of the primary source.
fn projection_columns(
    shape: &Shape<'_>,
    schema: &SchemaRef,
    (pdb, ptable): &(String, String),
    tags_of: &dyn Fn(&str, &str) -> Option<Vec<String>>,
    ok_time: bool,
) -> Result<(Vec<(String, OutColumn)>, Strategy), ViewError> {
    // Over a view, its keys are the upstream's keys (none known here).
    let tags = tags_of(pdb, ptable).unwrap_or_default();
    if !ok_time {
        return Err(ViewError::Invalid(format!(
            "a view without GROUP BY must select '{TIME_COLUMN}' of '{ptable}' as it is, so \
             each of its rows keeps the key of the point it comes from"
        )));
    }
    for tag in &tags {
        if schema.field_with_name(tag).is_err() {
            return Err(ViewError::Invalid(format!(
                "a view without GROUP BY must select every tag of '{ptable}' (missing \
                 '{tag}'), so each of its rows keeps the key of the point it comes from"
            )));
        }
    }
    let strategy = if shape.single && !shape.subquery && !shape.any_window && !shape.from_view {
        Strategy::Projection
    } else {
        Strategy::Recompute
    };
    let columns = schema
        .fields()
        .iter()
        .map(|f| {
            let kind = if f.name() == TIME_COLUMN {
                OutColumn::Time
            } else if tags.contains(f.name())
                || (shape.from_view && tags.is_empty() && is_key_of_view(f.data_type()))
            {
                OutColumn::Key
            } else {
                OutColumn::Value
            };
            (f.name().clone(), kind)
        })
        .collect();
    Ok((columns, strategy))
}

/// Every value column has a type a view can store.
fn check_value_types(columns: &[(String, OutColumn)], schema: &SchemaRef) -> Result<(), ViewError> {
    for (name, c) in columns {
        if matches!(c, OutColumn::Value) {
            let t = schema
                .field_with_name(name)
                .map_err(|e| ViewError::Invalid(e.to_string()))?
                .data_type();
            if value_type(t).is_none() {
                return Err(ViewError::Invalid(format!(
                    "column '{name}' has type {t}, which a view cannot store; CAST it to DOUBLE, \
                     BIGINT or VARCHAR"
                )));
            }
        }
    }
    Ok(())
}

/// Over a view, the string-like columns of a projection are taken as its keys.
fn is_key_of_view(t: &DataType) -> bool {
    matches!(t, DataType::Dictionary(_, _))
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::RecordBatch;
    use arrow::datatypes::{Field, Schema, TimeUnit};
    use datafusion::common::{DFSchema, ScalarValue};
    use datafusion::logical_expr::ColumnarValue;
    use datafusion::prelude::SessionContext;

    use super::*;

    fn eval(sql: &str) -> Result<ScalarValue, ViewError> {
        let ctx = SessionContext::new();
        let schema = DFSchema::empty();
        let fail = |e: datafusion::error::DataFusionError| ViewError::Invalid(e.to_string());
        let expr = ctx.parse_sql_expr(sql, &schema).map_err(fail)?;
        let physical = ctx.create_physical_expr(expr, &schema).map_err(fail)?;
        let one = RecordBatch::try_new_with_options(
            Arc::new(Schema::empty()),
            Vec::new(),
            &arrow::array::RecordBatchOptions::new().with_row_count(Some(1)),
        )
        .map_err(|e| ViewError::Invalid(e.to_string()))?;
        match physical.evaluate(&one).map_err(fail)? {
            ColumnarValue::Scalar(s) => Ok(s),
            ColumnarValue::Array(a) => ScalarValue::try_from_array(&a, 0).map_err(fail),
        }
    }

    /// Analyses `sql` over a table `cpu` (time, tag `host`, field `usage`).
    fn analysed(sql: &str) -> Result<ViewPlan, ViewError> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .expect("runtime");
        let ctx = SessionContext::new();
        let schema = Arc::new(Schema::new(vec![
            Field::new(
                TIME_COLUMN,
                DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into())),
                false,
            ),
            Field::new(
                "host",
                DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
                true,
            ),
            Field::new("usage", DataType::Float64, true),
        ]));
        let table = datafusion::datasource::MemTable::try_new(schema, vec![vec![]]).expect("table");
        ctx.register_table("cpu", Arc::new(table))
            .expect("register");
        let df = rt.block_on(ctx.sql(sql)).expect("plan");
        let planned = Planned {
            plan: df.logical_plan().clone(),
            schema: Arc::new(df.schema().as_arrow().clone()),
        };
        let state = ctx.state();
        let aggregates: std::collections::HashSet<String> = state
            .aggregate_functions()
            .iter()
            .flat_map(|(k, f)| std::iter::once(k.clone()).chain(f.aliases().iter().cloned()))
            .collect();
        analyse(
            sql,
            &planned,
            "main",
            &|_, t| (t == "cpu").then(|| vec!["host".to_string()]),
            &|_, _| false,
            &|n| aggregates.contains(n),
            &eval,
        )
    }

    #[test]
    fn a_filtered_projection_keeps_the_source_key() {
        let plan = analysed("SELECT time, host, usage FROM cpu WHERE usage > 90").expect("plan");
        assert_eq!(plan.strategy, Strategy::Projection);
        assert_eq!(plan.time, TimeMap::Identity);
        assert!(matches!(plan.columns[1], (ref n, OutColumn::Key) if n == "host"));
        assert!(matches!(plan.columns[2].1, OutColumn::Value));
    }

    #[test]
    fn a_bucketed_aggregate_merges_states_and_is_keyed_by_its_tags() {
        let plan = analysed(
            "SELECT date_bin(INTERVAL '1 minute', time) AS time, host, avg(usage) AS a, count(*) AS n \
             FROM cpu GROUP BY 1, 2",
        )
        .expect("plan");
        assert_eq!(plan.strategy, Strategy::Aggregate);
        assert!(
            matches!(
                plan.time,
                TimeMap::Bin {
                    stride: 60_000_000_000,
                    ..
                }
            ),
            "{:?}",
            plan.time
        );
        assert!(matches!(plan.columns[2].1, OutColumn::State(Agg::Avg(_))));
        assert!(
            plan.storage_sql.contains("GROUP BY 1, 2"),
            "{}",
            plan.storage_sql
        );
        let keyed = plan.keyed.expect("keyed by host");
        assert_eq!(keyed.tags, [("host".to_string(), "host".to_string())]);
    }

    #[test]
    fn what_cannot_be_merged_recomputes_its_windows() {
        let plan = analysed(
            "SELECT date_bin(INTERVAL '1 hour', time) AS time, host, median(usage) AS m \
             FROM cpu GROUP BY 1, 2",
        )
        .expect("plan");
        assert_eq!(plan.strategy, Strategy::Recompute);
        assert!(matches!(plan.columns[2].1, OutColumn::Value));
        assert!(plan.keyed.is_none());
    }

    #[test]
    fn definitions_a_view_cannot_keep_are_refused_with_the_reason() {
        for (sql, reason) in [
            (
                "SELECT time, host, now() AS t FROM cpu",
                "cannot call now()",
            ),
            ("SELECT host, usage FROM cpu", "must select 'time'"),
            ("SELECT time, usage FROM cpu", "every tag of 'cpu'"),
            ("SELECT time, host, usage AS __x FROM cpu", "reserved"),
            (
                "SELECT date_bin(INTERVAL '1 minute', time) AS time, usage AS k, count(*) AS n \
                 FROM cpu GROUP BY 1, 2",
                "grouping key 'k' has type Float64",
            ),
        ] {
            let err = analysed(sql).expect_err(sql);
            assert!(err.to_string().contains(reason), "{sql}: {err}");
        }
    }
}
