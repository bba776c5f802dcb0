//! Planning and running a [`GapFillNode`]: the bounds and stride become numbers, the input
//! (an aggregate's result: one row per group and bucket) is collected, sorted by group and
//! time, and every missing bucket gets a row.

use std::fmt;
use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, AsArray, Decimal128Array, RecordBatch, TimestampNanosecondArray, UInt32Array,
};
use arrow::compute::{SortColumn, SortOptions, cast, concat_batches, lexsort_to_indices, take};
use arrow::datatypes::{DataType, Decimal128Type, Float64Type, SchemaRef, TimeUnit};
use async_trait::async_trait;
use datafusion::catalog::Session;
use datafusion::common::tree_node::TreeNodeRecursion;
use datafusion::common::{ScalarValue, exec_err, plan_err};
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::memory_pool::MemoryConsumer;
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::logical_expr::{Expr, LogicalPlan, UserDefinedLogicalNode};
use datafusion::optimizer::simplify_expressions::ExprSimplifier;
use datafusion::physical_expr::{EquivalenceProperties, Partitioning, PhysicalExpr};
use datafusion::physical_plan::execution_plan::{Boundedness, EmissionType};
use datafusion::physical_plan::stream::RecordBatchStreamAdapter;
use datafusion::physical_plan::{
    ChildrenPropertiesMode, DisplayAs, DisplayFormatType, Distribution, ExecutionPlan,
    PlanProperties, ReplaceChildrenOptions,
};
use datafusion::physical_planner::{ExtensionPlanner, PhysicalPlanner};
use futures::{StreamExt, TryStreamExt};

use super::{Bound, FillStrategy, GapFillNode};
use crate::query::bounds::{bin, scalar_ns};

const NS_PER_DAY: i64 = 86_400_000_000_000;

/// Rows one gap-filling query may produce (series × buckets). A limit of the query engine:
/// a narrower time range or a wider stride stays under it.
pub(crate) const MAX_GAPFILL_ROWS: usize = 10_000_000;

/// Plans [`GapFillNode`]s.
#[derive(Debug, Default)]
pub(crate) struct GapFillPlanner;

#[async_trait]
impl ExtensionPlanner for GapFillPlanner {
    async fn plan_extension(
        &self,
        _planner: &dyn PhysicalPlanner,
        node: &dyn UserDefinedLogicalNode,
        _logical_inputs: &[&LogicalPlan],
        physical_inputs: &[Arc<dyn ExecutionPlan>],
        session: &dyn Session,
        _ctx: &datafusion::logical_expr::physical_planning_context::PhysicalPlanningContext,
    ) -> Result<Option<Arc<dyn ExecutionPlan>>> {
        let Some(node) = node.as_any().downcast_ref::<GapFillNode>() else {
            return Ok(None);
        };
        let [input] = physical_inputs else {
            return plan_err!("GapFill has one input");
        };
        let context = SimplifyContext::builder()
            .with_query_execution_start_time(session.execution_props().query_execution_start_time)
            .with_config_options(Arc::new(session.config_options().clone()))
            .build();
        let simplifier = ExprSimplifier::new(context);
        let value = |e: &Expr, what: &str| -> Result<ScalarValue> {
            match simplifier.simplify(e.clone())? {
                Expr::Literal(v, _) if !v.is_null() => Ok(v),
                other => plan_err!(
                    "{}: the {what} must be a constant, not {other}",
                    node.function
                ),
            }
        };
        let stride = stride_ns(&value(&node.stride, "stride")?, &node.function)?;
        let origin = scalar_ns(&value(&node.origin, "origin")?).ok_or_else(|| {
            DataFusionError::Plan(format!(
                "{}: the origin must be a timestamp (a time zone is not supported when filling gaps)",
                node.function
            ))
        })?;
        let bound = |b: &Bound| -> Result<i64> {
            let v = value(&b.expr, "time bound")?;
            scalar_ns(&v).ok_or_else(|| {
                DataFusionError::Plan(format!(
                    "{}: the time bound {} is not a timestamp",
                    node.function, b.expr
                ))
            })
        };
        let mut lo = i64::MIN;
        for b in &node.lower {
            let v = bound(b)?;
            lo = lo.max(if b.inclusive { v } else { v.saturating_add(1) });
        }
        let mut hi = i64::MAX;
        for b in &node.upper {
            let v = bound(b)?;
            hi = hi.min(if b.inclusive { v } else { v.saturating_sub(1) });
        }
        let spec = Spec {
            function: node.function.clone(),
            time: node.time,
            groups: node.groups.clone(),
            aggrs: node.aggrs.clone(),
            stride,
            origin,
            lo,
            hi,
        };
        Ok(Some(Arc::new(GapFillExec::new(input.clone(), spec))))
    }
}

/// A stride of fixed length, in nanoseconds.
fn stride_ns(v: &ScalarValue, function: &str) -> Result<i64> {
    let ns = match v {
        ScalarValue::IntervalMonthDayNano(Some(i)) if i.months == 0 => (i.days as i128)
            .checked_mul(NS_PER_DAY as i128)
            .map(|d| d + i.nanoseconds as i128),
        ScalarValue::IntervalDayTime(Some(i)) => {
            Some(i.days as i128 * NS_PER_DAY as i128 + i.milliseconds as i128 * 1_000_000)
        }
        ScalarValue::DurationNanosecond(Some(n)) => Some(*n as i128),
        ScalarValue::DurationMicrosecond(Some(n)) => Some(*n as i128 * 1_000),
        ScalarValue::DurationMillisecond(Some(n)) => Some(*n as i128 * 1_000_000),
        ScalarValue::DurationSecond(Some(n)) => Some(*n as i128 * 1_000_000_000),
        ScalarValue::IntervalMonthDayNano(_) | ScalarValue::IntervalYearMonth(_) => {
            return plan_err!(
                "{function}: a stride in months or years has buckets of different lengths; fill gaps with a fixed stride (days, hours, minutes, …)"
            );
        }
        other => return plan_err!("{function}: the stride must be an interval, not {other}"),
    };
    match ns.and_then(|n| i64::try_from(n).ok()) {
        Some(n) if n > 0 => Ok(n),
        _ => plan_err!("{function}: the stride must be positive and at most 292 years"),
    }
}

/// What a [`GapFillExec`] fills, in numbers.
#[derive(Debug, Clone)]
struct Spec {
    function: String,
    time: usize,
    groups: Vec<usize>,
    aggrs: Vec<(usize, FillStrategy)>,
    stride: i64,
    origin: i64,
    /// Inclusive range of times the buckets cover.
    lo: i64,
    hi: i64,
}

impl Spec {
    /// The first bucket and the number of buckets.
    fn grid(&self) -> Result<(i64, usize)> {
        if self.hi < self.lo {
            return Ok((0, 0));
        }
        let (Some(first), Some(last)) = (
            bin(self.lo, self.stride, self.origin),
            bin(self.hi, self.stride, self.origin),
        ) else {
            return exec_err!("{}: the time range is out of bounds", self.function);
        };
        let n = (last as i128 - first as i128) / self.stride as i128 + 1;
        match usize::try_from(n) {
            Ok(n) if n <= MAX_GAPFILL_ROWS => Ok((first, n)),
            _ => exec_err!(
                "{}: {n} buckets of {} ns between the time bounds, more than the {MAX_GAPFILL_ROWS} rows a gap-filling query may produce; narrow the time range or widen the stride",
                self.function,
                self.stride
            ),
        }
    }
}

/// Fills gaps (see [`super`]).
#[derive(Debug)]
pub(crate) struct GapFillExec {
    input: Arc<dyn ExecutionPlan>,
    spec: Spec,
    properties: Arc<PlanProperties>,
}

impl GapFillExec {
    fn new(input: Arc<dyn ExecutionPlan>, spec: Spec) -> GapFillExec {
        let schema = input.schema();
        let fields: Vec<_> = schema
            .fields()
            .iter()
            .enumerate()
            .map(|(i, f)| {
                if spec.aggrs.iter().any(|(a, _)| *a == i) {
                    Arc::new(f.as_ref().clone().with_nullable(true))
                } else {
                    f.clone()
                }
            })
            .collect();
        let schema = Arc::new(arrow::datatypes::Schema::new_with_metadata(
            fields,
            schema.metadata().clone(),
        ));
        let properties = PlanProperties::new(
            EquivalenceProperties::new(schema),
            Partitioning::UnknownPartitioning(1),
            EmissionType::Final,
            Boundedness::Bounded,
        );
        GapFillExec {
            input,
            spec,
            properties: Arc::new(properties),
        }
    }
}

impl DisplayAs for GapFillExec {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut fmt::Formatter) -> fmt::Result {
        let schema = self.input.schema();
        let name = |i: usize| schema.field(i).name().clone();
        let fills: Vec<String> = self
            .spec
            .aggrs
            .iter()
            .map(|(i, s)| match s {
                FillStrategy::Null => name(*i),
                FillStrategy::Locf => format!("locf({})", name(*i)),
                FillStrategy::Interpolate => format!("interpolate({})", name(*i)),
            })
            .collect();
        write!(
            f,
            "GapFillExec: time={}, groups=[{}], aggregates=[{}], stride={}ns, range=[{}, {}]",
            name(self.spec.time),
            self.spec
                .groups
                .iter()
                .map(|&i| name(i))
                .collect::<Vec<_>>()
                .join(", "),
            fills.join(", "),
            self.spec.stride,
            rfc3339(self.spec.lo),
            rfc3339(self.spec.hi)
        )
    }
}

fn rfc3339(ns: i64) -> String {
    chrono::DateTime::from_timestamp_nanos(ns).to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)
}

impl ExecutionPlan for GapFillExec {
    fn name(&self) -> &str {
        "GapFillExec"
    }

    fn properties(&self) -> &Arc<PlanProperties> {
        &self.properties
    }

    fn required_input_distribution(&self) -> Vec<Distribution> {
        vec![Distribution::SinglePartition]
    }

    fn children(&self) -> Vec<&Arc<dyn ExecutionPlan>> {
        vec![&self.input]
    }

    fn apply_expressions(
        &self,
        _f: &mut dyn FnMut(&Arc<dyn PhysicalExpr>) -> Result<TreeNodeRecursion>,
    ) -> Result<TreeNodeRecursion> {
        Ok(TreeNodeRecursion::Continue)
    }

    fn replace_children(
        self: Arc<Self>,
        mut children: Vec<Arc<dyn ExecutionPlan>>,
        _options: ReplaceChildrenOptions,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        match (children.pop(), children.is_empty()) {
            (Some(input), true) => Ok(Arc::new(GapFillExec::new(input, self.spec.clone()))),
            _ => plan_err!("GapFillExec has one input"),
        }
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
        if partition != 0 {
            return exec_err!("GapFillExec has one partition, not {partition}");
        }
        let schema = self.input.schema();
        let input = self.input.execute(0, context.clone())?;
        let spec = self.spec.clone();
        let batch_size = context.session_config().batch_size().max(1);
        let reservation = MemoryConsumer::new("GapFillExec").register(context.memory_pool());
        let out_schema = self.schema();
        let out_schema_filled = out_schema.clone();
        let filled = async move {
            let mut batches = Vec::new();
            let mut input = input;
            while let Some(batch) = input.next().await {
                let batch = batch?;
                reservation.try_grow(batch.get_array_memory_size())?;
                batches.push(batch);
            }
            let batch = concat_batches(&schema, &batches)?;
            drop(batches);
            let out = fill(&batch, &spec, &out_schema_filled)?;
            reservation.try_grow(out.get_array_memory_size())?;
            let chunks: Vec<Result<RecordBatch>> = (0..out.num_rows())
                .step_by(batch_size)
                .map(|at| Ok(out.slice(at, batch_size.min(out.num_rows() - at))))
                .collect();
            Ok::<_, DataFusionError>(futures::stream::iter(chunks))
        };
        let stream = futures::stream::once(filled).try_flatten();
        Ok(Box::pin(RecordBatchStreamAdapter::new(out_schema, stream)))
    }
}

/// The filled rows of `batch` (one row per group and bucket, in any order).
fn fill(batch: &RecordBatch, spec: &Spec, schema: &SchemaRef) -> Result<RecordBatch> {
    let time_type = schema.field(spec.time).data_type().clone();
    let DataType::Timestamp(_, tz) = &time_type else {
        return exec_err!(
            "{}: the bucket is {time_type}, not a timestamp",
            spec.function
        );
    };
    // Sorted by the group columns, then time.
    let mut keys: Vec<SortColumn> = spec
        .groups
        .iter()
        .map(|&i| SortColumn {
            values: batch.column(i).clone(),
            options: Some(SortOptions::default()),
        })
        .collect();
    let times_in = cast(
        batch.column(spec.time),
        &DataType::Timestamp(TimeUnit::Nanosecond, None),
    )?;
    keys.push(SortColumn {
        values: times_in.clone(),
        options: Some(SortOptions::default()),
    });
    let order = lexsort_to_indices(&keys, None)?;
    let sorted: Vec<ArrayRef> = batch
        .columns()
        .iter()
        .map(|c| take(c.as_ref(), &order, None))
        .collect::<std::result::Result<_, _>>()?;
    let times = take(times_in.as_ref(), &order, None)?;
    let times = times.as_primitive::<arrow::datatypes::TimestampNanosecondType>();
    let group_ranges: Vec<std::ops::Range<usize>> = if spec.groups.is_empty() {
        std::iter::once(0..batch.num_rows()).collect()
    } else {
        let cols: Vec<ArrayRef> = spec.groups.iter().map(|&i| sorted[i].clone()).collect();
        arrow::compute::partition(&cols)?.ranges()
    };
    let (first, buckets) = spec.grid()?;
    let total = group_ranges.len().saturating_mul(buckets);
    if total > MAX_GAPFILL_ROWS {
        return exec_err!(
            "{}: {} series × {buckets} buckets is more than the {MAX_GAPFILL_ROWS} rows a gap-filling query may produce; narrow the time range, widen the stride or filter the series",
            spec.function,
            group_ranges.len()
        );
    }
    // Per output row: the input row it copies (None: a filled bucket), its group's first
    // row, its time.
    let mut source: Vec<Option<u32>> = Vec::with_capacity(total + batch.num_rows());
    let mut key_row: Vec<u32> = Vec::with_capacity(source.capacity());
    let mut out_time: Vec<Option<i64>> = Vec::with_capacity(source.capacity());
    let mut out_groups: Vec<std::ops::Range<usize>> = Vec::with_capacity(group_ranges.len());
    for range in &group_ranges {
        let start = source.len();
        let key = range.start as u32;
        let mut row = range.start;
        let mut emit = |src: Option<u32>, t: Option<i64>| {
            source.push(src);
            key_row.push(key);
            out_time.push(t);
        };
        for k in 0..buckets {
            let t = first + (k as i64) * spec.stride;
            // Rows before this bucket (a NULL bucket, or off the grid) come as they are.
            while row < range.end && (times.is_null(row) || times.value(row) < t) {
                emit(
                    Some(row as u32),
                    times.is_valid(row).then(|| times.value(row)),
                );
                row += 1;
            }
            if row < range.end && times.value(row) == t {
                emit(Some(row as u32), Some(t));
                row += 1;
            } else {
                emit(None, Some(t));
            }
        }
        while row < range.end {
            emit(
                Some(row as u32),
                times.is_valid(row).then(|| times.value(row)),
            );
            row += 1;
        }
        out_groups.push(start..source.len());
    }
    let key_idx = UInt32Array::from(key_row);
    let src_idx = UInt32Array::from(source.clone());
    let time_out = TimestampNanosecondArray::from(out_time.clone()).with_timezone_opt(tz.clone());
    let time_out = cast(&time_out, &time_type)?;
    let mut columns: Vec<ArrayRef> = Vec::with_capacity(sorted.len());
    for (i, col) in sorted.iter().enumerate() {
        let column = if i == spec.time {
            time_out.clone()
        } else if spec.groups.contains(&i) {
            take(col.as_ref(), &key_idx, None)?
        } else {
            match spec.aggrs.iter().find(|(a, _)| *a == i).map(|(_, s)| *s) {
                Some(FillStrategy::Locf) => {
                    let idx = locf_indices(col.as_ref(), &source, &out_groups);
                    take(col.as_ref(), &idx, None)?
                }
                Some(FillStrategy::Interpolate) => {
                    let values = take(col.as_ref(), &src_idx, None)?;
                    interpolate(&values, &out_time, &out_groups)?
                }
                _ => take(col.as_ref(), &src_idx, None)?,
            }
        };
        columns.push(column);
    }
    Ok(RecordBatch::try_new(schema.clone(), columns)?)
}

/// For each output row, the input row whose value it shows under `locf`: its own if that is
/// not NULL, else the latest earlier one of its group that is not NULL.
fn locf_indices(
    col: &dyn Array,
    source: &[Option<u32>],
    groups: &[std::ops::Range<usize>],
) -> UInt32Array {
    let mut out: Vec<Option<u32>> = Vec::with_capacity(source.len());
    for range in groups {
        let mut last = None;
        for src in &source[range.clone()] {
            if let Some(r) = src
                && col.is_valid(*r as usize)
            {
                last = Some(*r);
            }
            out.push(last);
        }
    }
    UInt32Array::from(out)
}

/// Linear interpolation of the NULLs of `values` between the non-NULL values around them in
/// their group, by time. Floats in f64; integers exactly, rounding toward zero.
fn interpolate(
    values: &ArrayRef,
    times: &[Option<i64>],
    groups: &[std::ops::Range<usize>],
) -> Result<ArrayRef> {
    let out_type = values.data_type().clone();
    let float = matches!(
        out_type,
        DataType::Float16 | DataType::Float32 | DataType::Float64
    );
    // Every output row: (known value or not). Worked in f64 or i128.
    let known: Vec<Option<usize>> = (0..values.len())
        .map(|i| (values.is_valid(i) && times[i].is_some()).then_some(i))
        .collect();
    let mut plan: Vec<Option<(usize, usize, i64)>> = vec![None; values.len()];
    for range in groups {
        let mut prev: Option<usize> = None;
        let mut pending: Vec<usize> = Vec::new();
        for i in range.clone() {
            if known[i].is_some() {
                if let Some(p) = prev {
                    for &g in &pending {
                        if let Some(t) = times[g] {
                            plan[g] = Some((p, i, t));
                        }
                    }
                }
                pending.clear();
                prev = Some(i);
            } else if values.is_null(i) {
                pending.push(i);
            }
        }
    }
    let at = |i: usize| times[i].unwrap_or(0) as i128;
    if float {
        let f = cast(values, &DataType::Float64)?;
        let f = f.as_primitive::<Float64Type>();
        let out: arrow::array::Float64Array = (0..f.len())
            .map(|i| match plan[i] {
                Some((a, b, t)) => {
                    let (ta, tb) = (at(a) as f64, at(b) as f64);
                    let (va, vb) = (f.value(a), f.value(b));
                    Some(va + (vb - va) * ((t as f64 - ta) / (tb - ta)))
                }
                None => f.is_valid(i).then(|| f.value(i)),
            })
            .collect();
        return Ok(cast(&out, &out_type)?);
    }
    let wide = DataType::Decimal128(38, 0);
    let d = cast(values, &wide)?;
    let d = d.as_primitive::<Decimal128Type>();
    let out: Decimal128Array = (0..d.len())
        .map(|i| match plan[i] {
            Some((a, b, t)) => {
                let (ta, tb) = (at(a), at(b));
                let (va, vb) = (d.value(a), d.value(b));
                let exact = (vb - va)
                    .checked_mul(t as i128 - ta)
                    .map(|n| va + n / (tb - ta));
                // Beyond i128 (values near the 64-bit limits, far apart): through f64.
                Some(exact.unwrap_or_else(|| {
                    let r = (vb - va) as f64 * ((t as i128 - ta) as f64 / (tb - ta) as f64);
                    va + r.trunc() as i128
                }))
            }
            None => d.is_valid(i).then(|| d.value(i)),
        })
        .collect();
    let out = out.with_precision_and_scale(38, 0)?;
    Ok(cast(&out, &out_type)?)
}
