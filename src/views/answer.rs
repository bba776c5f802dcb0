//! Answering an aggregate over a table from a materialized view that keeps the same
//! aggregate, when the answer is provably the same.
//!
//! A query such as
//! ```sql
//! SELECT date_bin(INTERVAL '1 hour', time) AS hour, hostname, avg(usage_user) FROM cpu
//! WHERE hostname IN ('host_1', 'host_2') AND time >= '…' AND time < '…' GROUP BY 1, 2
//! ```
//! reads the states of a view such as `SELECT date_bin(INTERVAL '1 minute', time) AS time,
//! hostname, avg(usage_user) AS u FROM cpu GROUP BY 1, 2` for the view buckets wholly inside
//! the time range, aggregates the raw rows of the partial buckets at the range's ends the same
//! way, and merges both (sum of counts, sum of sums, min of mins, …). It applies only when
//! every step keeps the answer:
//! - the query groups by source tags the view keys by and by (any function of) one
//!   `date_bin(stride, time, origin)` whose buckets are unions of the view's (stride a
//!   multiple of the view's, origins aligned), or not by time at all;
//! - its aggregates are `count`, `sum`, `min`, `max`, `avg` of a column (no `DISTINCT`,
//!   `FILTER` or ordering), each kept by the view as a state;
//! - its `WHERE` holds only predicates on those tags and constant bounds on `time`;
//! - the view reads that one table with no `WHERE`, keeps every late point
//!   (`late = 'correct'`), has no retention of its own, and the table has none either (the
//!   view would keep buckets the table no longer has);
//! - the view reflects every write the query sees: nothing left to backfill or recompute, and
//!   its applied sequence at or past the table's newest write (else the query waits for it a
//!   moment, then reads the table as usual: under a steady stream of writes to the table the
//!   view is often a round behind, and the table answers).
//!
//! Floating-point sums are merged in a different order than one pass over the rows adds them,
//! as DataFusion's own parallel aggregation does. `EXPLAIN` shows the view's storage scan
//! (`TableScan: <db>.<view>` under `SubqueryAlias: answered_by_view`);
//! [`Config::query_rewrites`](crate::Config::query_rewrites) turns this off.

use std::sync::Arc;

use arrow::datatypes::{DataType, IntervalMonthDayNano, TimeUnit};
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::common::{Column, DFSchemaRef, ScalarValue, TableReference};
use datafusion::dataframe::DataFrame;
use datafusion::datasource::{provider_as_source, source_as_provider};
use datafusion::error::DataFusionError;
use datafusion::functions_aggregate::expr_fn::{count, max, min, sum};
use datafusion::logical_expr::utils::{conjunction, split_conjunction};
use datafusion::logical_expr::{
    Aggregate, Expr, LogicalPlan, LogicalPlanBuilder, TableScan, cast, col, lit,
};

use super::ddl::Late;
use super::plan::{Agg, OutColumn, Strategy, TimeMap, ViewPlan, parse_query};
use super::provider::DELETED;
use super::{View, Views};
use crate::error::Error;
use crate::query::bounds::{time_bound, time_bucket};
use crate::query::{BufferTableProvider, QuerySnapshot};
use crate::storage::catalog::{ColumnKind, TIME_COLUMN};
use crate::storage::table::Table;

/// How long a query waits for a view that lags behind the table before reading the table.
const LAG_WAIT: std::time::Duration = std::time::Duration::from_millis(25);

/// Internal column names of the rewritten plan.
const BUCKET: &str = "__view_bucket";

impl Views {
    /// Replaces the aggregates of `df` a view can answer (see the module documentation).
    pub(crate) async fn answer_from_views(&self, df: DataFrame) -> Result<DataFrame, Error> {
        if !self.engine.config.query_rewrites || self.shared.views.read().is_empty() {
            return Ok(df);
        }
        let mut found = Vec::new();
        let _ = df.logical_plan().apply_with_subqueries(|node| {
            if let LogicalPlan::Aggregate(agg) = node
                && let Some(ask) = Ask::of(agg)
                && let Some(view) = self.view_for(&ask)
            {
                found.push(view);
            }
            Ok(datafusion::common::tree_node::TreeNodeRecursion::Continue)
        });
        if found.is_empty() {
            return Ok(df);
        }
        // Every view found must reflect the whole table; a lagging one gets a moment.
        let mut current = Vec::new();
        for view in found {
            if self.reflects_table(&view).await {
                current.push(view);
            }
        }
        if current.is_empty() {
            return Ok(df);
        }
        let (state, plan) = df.into_parts();
        let Some(snapshot) = state.config().get_extension::<QuerySnapshot>() else {
            return Ok(DataFrame::new(state, plan));
        };
        // Read up to the sequence visible now. Each view's applied sequence is read before it,
        // and its table's newest write after it: if that write is not past the applied
        // sequence, the view's storage at that sequence holds every write the table has there.
        let mut applied = Vec::with_capacity(current.len());
        for v in &current {
            match settled(v) {
                Some(a) => applied.push(a),
                None => return Ok(DataFrame::new(state, plan)),
            }
        }
        let seq = self.engine.visible_seq();
        if current
            .iter()
            .zip(&applied)
            .any(|(v, &a)| !self.table_within(v, a))
        {
            return Ok(DataFrame::new(state, plan));
        }
        let rewritten = plan
            .transform_up_with_subqueries(|node| match node {
                LogicalPlan::Aggregate(agg) => {
                    let answer = Ask::of(&agg).and_then(|ask| {
                        let view = current.iter().find(|v| self.view_matches(v, &ask))?;
                        ask.answer(view).ok()
                    });
                    match answer {
                        Some(plan) => Ok(Transformed::yes(plan)),
                        None => Ok(Transformed::no(LogicalPlan::Aggregate(agg))),
                    }
                }
                other => Ok(Transformed::no(other)),
            })
            .map_err(Error::from)?;
        if rewritten.transformed {
            snapshot
                .seq
                .fetch_max(seq, std::sync::atomic::Ordering::AcqRel);
        }
        Ok(DataFrame::new(state, rewritten.data))
    }

    /// The view best suited to answer `ask` (the coarsest buckets), if any.
    fn view_for(&self, ask: &Ask) -> Option<Arc<View>> {
        self.all()
            .into_iter()
            .filter(|v| self.view_matches(v, ask))
            .max_by_key(|v| match v.plan.time {
                TimeMap::Bin { stride, .. } => stride,
                _ => 0,
            })
    }

    fn view_matches(&self, view: &View, ask: &Ask) -> bool {
        let plan = &view.plan;
        let TimeMap::Bin { stride, origin } = plan.time else {
            return false;
        };
        if view.is_subscription_view()
            || plan.strategy != Strategy::Aggregate
            || view.primary_id != Some(ask.table.id)
            || view.source_ids != [ask.table.id]
            || view.db.as_ref() != ask.table.db.as_ref()
            || ask.table.settings.read().retention.is_some()
        {
            return false;
        }
        {
            let def = view.def.lock();
            if def.options.late != Late::Correct
                || def.options.retention_ns.is_some()
                || !def.backfilled
                || !has_no_where(&def.sql)
            {
                return false;
            }
        }
        let Some(keyed) = &plan.keyed else {
            return false;
        };
        let keys_ok = ask
            .tags
            .iter()
            .all(|t| keyed.tags.iter().any(|(_, tag)| tag == t));
        let aggs_ok = ask.aggs.iter().all(|a| state_of(plan, a).is_some());
        let time_ok = match ask.bucket {
            Some((s, o)) => {
                s % stride == 0 && (o as i128 - origin as i128).rem_euclid(stride as i128) == 0
            }
            None => true,
        };
        let (m0, m1) = middle(ask.lo, ask.hi, plan.time);
        keys_ok && aggs_ok && time_ok && m0 < m1
    }

    /// Whether the view reflects every write to its table (waiting a moment if it lags).
    async fn reflects_table(&self, view: &Arc<View>) -> bool {
        if self.current(view) {
            return true;
        }
        let Some(table) = self.engine.table_by_id(view.source_ids[0]) else {
            return false;
        };
        let target = table.buffer.read().latest_seq();
        let shared = self.shared.clone();
        let views = vec![view.clone()];
        let waited =
            tokio::task::spawn_blocking(move || shared.wait(&views, target, LAG_WAIT)).await;
        matches!(waited, Ok(Ok(()))) && self.current(view)
    }

    /// Nothing left to do for the view, and its applied sequence covers its table.
    fn current(&self, view: &View) -> bool {
        settled(view).is_some_and(|applied| self.table_within(view, applied))
    }

    /// The view's table holds no write after `applied`.
    fn table_within(&self, view: &View, applied: u64) -> bool {
        match self.engine.table_by_id(view.source_ids[0]) {
            Some(table) => table.buffer.read().latest_seq() <= applied,
            None => false,
        }
    }
}

/// The view's applied sequence, if it has no work left (backfill, recomputes).
fn settled(view: &View) -> Option<u64> {
    let st = view.status.lock();
    let idle = st.backfill.is_none()
        && !st.backfill_pending
        && st.backfill_slices.is_none()
        && !st.full
        && st.pending.is_empty();
    idle.then_some(st.applied)
}

/// Whether a view's definition has no `WHERE` (and so keeps every row of its table).
fn has_no_where(sql: &str) -> bool {
    use datafusion::sql::sqlparser::ast::SetExpr;
    match parse_query(sql) {
        Ok(q) => matches!(q.body.as_ref(), SetExpr::Select(s) if s.selection.is_none()),
        Err(_) => false,
    }
}

/// The view column (index) keeping `agg` as a state.
fn state_of(plan: &ViewPlan, agg: &Agg) -> Option<usize> {
    plan.columns.iter().position(|(_, c)| match (c, agg) {
        (OutColumn::State(have), want) => same_agg(have, want),
        _ => false,
    })
}

fn same_agg(a: &Agg, b: &Agg) -> bool {
    let n = |s: &str| s.trim_matches('"').to_string();
    match (a, b) {
        (Agg::Count(x), Agg::Count(y))
        | (Agg::Sum(x), Agg::Sum(y))
        | (Agg::Min(x), Agg::Min(y))
        | (Agg::Max(x), Agg::Max(y))
        | (Agg::Avg(x), Agg::Avg(y)) => n(x) == n(y),
        _ => false,
    }
}

/// The view buckets wholly inside the source range `[lo, hi)`: `[m0, m1)`.
fn middle(lo: i64, hi: i64, time: TimeMap) -> (i64, i64) {
    let m0 = if lo == i64::MIN || time.bucket(lo) == lo {
        lo
    } else {
        time.bucket_end(lo)
    };
    let m1 = if hi == i64::MAX { hi } else { time.bucket(hi) };
    (m0, m1)
}

/// An aggregate query in the terms a view answers.
struct Ask {
    table: Arc<Table>,
    scan: TableScan,
    /// The aggregate's schema (what the answer must produce).
    schema: DFSchemaRef,
    group_expr: Vec<Expr>,
    /// `(stride, origin)` of the query's time bucket, if it groups by one.
    bucket: Option<(i64, i64)>,
    /// Tags it groups or filters by.
    tags: Vec<String>,
    /// Per aggregate expression.
    aggs: Vec<Agg>,
    /// Predicates on tags only.
    tag_filters: Vec<Expr>,
    /// Source time range `[lo, hi)`.
    lo: i64,
    hi: i64,
}

impl Ask {
    fn of(agg: &Aggregate) -> Option<Ask> {
        let mut conjuncts = Vec::new();
        let mut input = agg.input.as_ref();
        while let LogicalPlan::Filter(f) = input {
            conjuncts.extend(split_conjunction(&f.predicate).into_iter().cloned());
            input = f.input.as_ref();
        }
        let LogicalPlan::TableScan(scan) = input else {
            return None;
        };
        if !scan.filters.is_empty() || scan.fetch.is_some() {
            return None;
        }
        let provider = source_as_provider(&scan.source).ok()?;
        let provider: &dyn std::any::Any = provider.as_ref();
        let table = provider
            .downcast_ref::<BufferTableProvider>()?
            .table()
            .clone();
        if table.settings.read().view {
            return None;
        }
        let schema = table.schema();
        let is_tag = |name: &str| {
            schema
                .columns()
                .iter()
                .any(|c| c.name.as_ref() == name && c.kind == ColumnKind::Tag)
        };
        let mut tags: Vec<String> = Vec::new();
        let mut bucket = None;
        for g in &agg.group_expr {
            match g {
                Expr::Column(c) if is_tag(&c.name) => tags.push(c.name.clone()),
                other => {
                    if bucket.is_some() {
                        return None;
                    }
                    bucket = Some(time_bucket(other)?);
                }
            }
        }
        let mut aggs = Vec::new();
        for a in &agg.aggr_expr {
            aggs.push(agg_of(a, &|n| {
                schema.columns().iter().any(|c| c.name.as_ref() == n)
            })?);
        }
        let (mut lo, mut hi) = (i64::MIN, i64::MAX);
        let mut tag_filters = Vec::new();
        for c in conjuncts {
            let cols = c.column_refs();
            if !cols.is_empty() && cols.iter().all(|col| is_tag(&col.name)) && !c.is_volatile() {
                for col in cols {
                    if !tags.contains(&col.name) {
                        tags.push(col.name.clone());
                    }
                }
                tag_filters.push(c);
                continue;
            }
            let (l, h) = time_bound(&c)?;
            lo = lo.max(l);
            hi = hi.min(h);
        }
        Some(Ask {
            table,
            scan: scan.clone(),
            schema: agg.schema.clone(),
            group_expr: agg.group_expr.clone(),
            bucket,
            tags,
            aggs,
            tag_filters,
            lo,
            hi,
        })
    }

    /// The plan answering the aggregate from `view`'s states plus the raw rows of the
    /// partial buckets at the ends of the range.
    fn answer(&self, view: &View) -> Result<LogicalPlan, DataFusionError> {
        let plan = &view.plan;
        let TimeMap::Bin { stride, origin } = plan.time else {
            return Err(DataFusionError::Plan("not a bucketed view".into()));
        };
        let keyed = plan
            .keyed
            .as_ref()
            .ok_or_else(|| DataFusionError::Plan("not a keyed view".into()))?;
        let storage = view.provider.storage.clone();
        let storage_schema = storage.schema();
        let key_column = |tag: &str| -> Result<String, DataFusionError> {
            keyed
                .tags
                .iter()
                .find(|(_, t)| t == tag)
                .map(|(c, _)| c.clone())
                .ok_or_else(|| DataFusionError::Plan(format!("the view does not key by {tag}")))
        };
        let (m0, m1) = middle(self.lo, self.hi, plan.time);
        let ts = |v: i64| {
            lit(ScalarValue::TimestampNanosecond(
                Some(v),
                Some("UTC".into()),
            ))
        };
        let time_type = DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()));
        // Group tags as the query types them.
        let group_tags: Vec<(String, DataType)> = self
            .group_expr
            .iter()
            .enumerate()
            .filter_map(|(i, g)| match g {
                Expr::Column(c) => Some((c.name.clone(), self.schema.field(i).data_type().clone())),
                _ => None,
            })
            .collect();
        // State columns: (name in the union, the view's storage column, its type).
        let mut states: Vec<(String, String, DataType)> = Vec::new();
        for (j, agg) in self.aggs.iter().enumerate() {
            let i = state_of(plan, agg)
                .ok_or_else(|| DataFusionError::Plan("the view lacks an aggregate".into()))?;
            for (suffix, _) in agg.states() {
                let stored = ViewPlan::state_column(i, suffix);
                let t = storage_schema.field_with_name(&stored)?.data_type().clone();
                states.push((format!("__q{j}_{suffix}"), stored, t));
            }
        }
        // The view's part: its buckets in [m0, m1).
        let unqualify = |e: &Expr, rename: &dyn Fn(&str) -> Result<String, DataFusionError>| {
            e.clone().transform(|e| match e {
                Expr::Column(c) => Ok(Transformed::yes(Expr::Column(Column::from_name(rename(
                    &c.name,
                )?)))),
                other => Ok(Transformed::no(other)),
            })
        };
        let mut view_filter = vec![col(DELETED).is_not_true()];
        if m0 != i64::MIN {
            view_filter.push(col(TIME_COLUMN).gt_eq(ts(m0)));
        }
        if m1 != i64::MAX {
            view_filter.push(col(TIME_COLUMN).lt(ts(m1)));
        }
        for f in &self.tag_filters {
            view_filter.push(unqualify(f, &key_column)?.data);
        }
        let mut view_cols = vec![cast(col(TIME_COLUMN), time_type.clone()).alias(BUCKET)];
        for (tag, t) in &group_tags {
            view_cols.push(
                cast(Expr::Column(Column::from_name(key_column(tag)?)), t.clone()).alias(tag),
            );
        }
        for (name, stored, t) in &states {
            view_cols.push(cast(Expr::Column(Column::from_name(stored)), t.clone()).alias(name));
        }
        let view_ref = TableReference::partial(view.db.as_ref(), view.name());
        let view_part = LogicalPlanBuilder::scan(view_ref, provider_as_source(storage), None)?
            .filter(conjunction(view_filter).unwrap_or(lit(true)))?
            .project(view_cols)?
            .alias("answered_by_view")?
            .build()?;
        // The table's part: the partial buckets at the ends, as states of view buckets.
        let time_col = Expr::Column(Column::new(Some(self.scan.table_name.clone()), TIME_COLUMN));
        let mut edges = Vec::new();
        if m0 != i64::MIN && self.lo < m0 {
            edges.push(time_col.clone().lt(ts(m0)));
        }
        if m1 != i64::MAX && m1 < self.hi {
            edges.push(time_col.clone().gt_eq(ts(m1)));
        }
        let mut input = view_part;
        if !edges.is_empty() {
            let mut filter = self.tag_filters.clone();
            if self.lo != i64::MIN {
                filter.push(time_col.clone().gt_eq(ts(self.lo)));
            }
            if self.hi != i64::MAX {
                filter.push(time_col.clone().lt(ts(self.hi)));
            }
            filter.push(datafusion::logical_expr::or(
                edges[0].clone(),
                edges.get(1).cloned().unwrap_or(lit(false)),
            ));
            let bin = date_bin(stride, time_col.clone(), origin).alias(BUCKET);
            let mut group = vec![bin];
            for (tag, _) in &group_tags {
                group.push(Expr::Column(Column::new(
                    Some(self.scan.table_name.clone()),
                    tag,
                )));
            }
            let mut aggr = Vec::new();
            for (j, agg) in self.aggs.iter().enumerate() {
                for (suffix, e) in raw_states(agg, &self.scan.table_name) {
                    aggr.push(e.alias(format!("__q{j}_{suffix}")));
                }
            }
            let mut cols = vec![cast(col(BUCKET), time_type.clone()).alias(BUCKET)];
            for (tag, t) in &group_tags {
                cols.push(cast(Expr::Column(Column::from_name(tag)), t.clone()).alias(tag));
            }
            for (name, _, t) in &states {
                cols.push(cast(col(name.as_str()), t.clone()).alias(name));
            }
            let raw = LogicalPlanBuilder::from(LogicalPlan::TableScan(self.scan.clone()))
                .filter(conjunction(filter).unwrap_or(lit(true)))?
                .aggregate(group, aggr)?
                .project(cols)?
                .build()?;
            input = LogicalPlanBuilder::from(input).union(raw)?.build()?;
        }
        // Merge the states into the query's groups and aggregates.
        let mut group = Vec::new();
        let mut finals = Vec::new();
        for (i, g) in self.group_expr.iter().enumerate() {
            let (q, f) = self.schema.qualified_field(i);
            let merged_name = format!("__g{i}");
            match g {
                Expr::Column(c) => {
                    group.push(Expr::Column(Column::from_name(&c.name)).alias(&merged_name))
                }
                other => {
                    let e = other.clone().transform(|e| match e {
                        Expr::Column(c) if c.name == TIME_COLUMN => {
                            Ok(Transformed::yes(Expr::Column(Column::from_name(BUCKET))))
                        }
                        other => Ok(Transformed::no(other)),
                    })?;
                    group.push(e.data.alias(&merged_name));
                }
            }
            finals.push(
                cast(col(merged_name.as_str()), f.data_type().clone())
                    .alias_qualified(q.cloned(), f.name()),
            );
        }
        let groups = self.group_expr.len();
        let mut aggr = Vec::new();
        let f64 = DataType::Float64;
        for (j, agg) in self.aggs.iter().enumerate() {
            let s = |suffix: &str| col(format!("__q{j}_{suffix}").as_str());
            let m = |part: &str| format!("__m{j}{part}");
            let value = match agg {
                Agg::Count(_) => {
                    aggr.push(sum(s("c")).alias(m("")));
                    // A count of a group that exists is never NULL.
                    datafusion::functions::expr_fn::coalesce(vec![col(m("").as_str()), lit(0i64)])
                }
                Agg::Sum(_) => {
                    aggr.push(sum(s("v")).alias(m("")));
                    col(m("").as_str())
                }
                Agg::Min(_) => {
                    aggr.push(min(s("v")).alias(m("")));
                    col(m("").as_str())
                }
                Agg::Max(_) => {
                    aggr.push(max(s("v")).alias(m("")));
                    col(m("").as_str())
                }
                Agg::Avg(_) => {
                    aggr.push(sum(s("s")).alias(m("_s")));
                    aggr.push(sum(s("c")).alias(m("_c")));
                    cast(col(m("_s").as_str()), f64.clone())
                        / cast(col(m("_c").as_str()), f64.clone())
                }
                _ => return Err(DataFusionError::Plan("not a merged aggregate".into())),
            };
            let (q, f) = self.schema.qualified_field(groups + j);
            finals.push(cast(value, f.data_type().clone()).alias_qualified(q.cloned(), f.name()));
        }
        LogicalPlanBuilder::from(input)
            .aggregate(group, aggr)?
            .project(finals)?
            .build()
    }
}

/// The raw rows' states of `agg` (same order as [`Agg::states`]).
fn raw_states(agg: &Agg, table: &TableReference) -> Vec<(&'static str, Expr)> {
    let arg = |a: &str| -> Expr {
        if a == "*" {
            lit(1i64)
        } else {
            Expr::Column(Column::new(Some(table.clone()), a.trim_matches('"')))
        }
    };
    match agg {
        Agg::Count(a) => vec![("c", count(arg(a)))],
        Agg::Sum(a) => vec![("v", sum(arg(a)))],
        Agg::Min(a) => vec![("v", min(arg(a)))],
        Agg::Max(a) => vec![("v", max(arg(a)))],
        Agg::Avg(a) => vec![("s", sum(arg(a))), ("c", count(arg(a)))],
        _ => Vec::new(),
    }
}

/// `date_bin(stride, time, origin)` with literal stride and origin.
fn date_bin(stride: i64, time: Expr, origin: i64) -> Expr {
    datafusion::functions::datetime::date_bin().call(vec![
        lit(ScalarValue::IntervalMonthDayNano(Some(
            IntervalMonthDayNano::new(0, 0, stride),
        ))),
        time,
        lit(ScalarValue::TimestampNanosecond(
            Some(origin),
            Some("UTC".into()),
        )),
    ])
}

/// The mergeable aggregate `e` is (None: not one a view keeps).
fn agg_of(e: &Expr, is_column: &dyn Fn(&str) -> bool) -> Option<Agg> {
    let Expr::AggregateFunction(f) = e else {
        return None;
    };
    let p = &f.params;
    if p.distinct || p.filter.is_some() || !p.order_by.is_empty() || p.null_treatment.is_some() {
        return None;
    }
    let [arg] = p.args.as_slice() else {
        return None;
    };
    let name = f.func.name();
    let arg = match arg {
        Expr::Column(c) if is_column(&c.name) => c.name.clone(),
        Expr::Literal(v, _) if name == "count" && !v.is_null() => "*".to_string(),
        _ => return None,
    };
    match name {
        "count" => Some(Agg::Count(arg)),
        "sum" if arg != "*" => Some(Agg::Sum(arg)),
        "min" if arg != "*" => Some(Agg::Min(arg)),
        "max" if arg != "*" => Some(Agg::Max(arg)),
        "avg" if arg != "*" => Some(Agg::Avg(arg)),
        _ => None,
    }
}
