//! Reading time bounds and time buckets out of a query's expressions, for the rewrites that
//! need them as numbers (the latest-buckets bound here, view answers in the views layer).
//! Works on plans as SQL planning leaves them (before type coercion): constants are folded by
//! DataFusion's simplifier, with `now()` as of the call.

use arrow::datatypes::{DataType, TimeUnit};
use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{Transformed, TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::simplify::SimplifyContext;
use datafusion::logical_expr::{Between, BinaryExpr, Expr, Operator, cast, lit};
use datafusion::optimizer::simplify_expressions::ExprSimplifier;

use crate::storage::catalog::TIME_COLUMN;

const NS_PER_DAY: i64 = 86_400_000_000_000;

/// `e` folded to a non-NULL constant (cast to `as_type` first), if it is one.
pub(crate) fn constant(e: &Expr, as_type: Option<DataType>) -> Option<ScalarValue> {
    if !e.column_refs().is_empty() || e.is_volatile() {
        return None;
    }
    let e = match as_type {
        Some(t) => cast(e.clone(), t),
        None => e.clone(),
    };
    let context = SimplifyContext::builder().with_current_time().build();
    match ExprSimplifier::new(context).simplify(e).ok()? {
        Expr::Literal(v, _) if !v.is_null() => Some(v),
        _ => None,
    }
}

/// A constant timestamp, in nanoseconds.
pub(crate) fn timestamp(e: &Expr) -> Option<i64> {
    scalar_ns(&constant(
        e,
        Some(DataType::Timestamp(TimeUnit::Nanosecond, None)),
    )?)
}

/// Nanoseconds since the epoch of a timestamp value of any unit (None: not a timestamp, NULL,
/// or out of range).
pub(crate) fn scalar_ns(v: &ScalarValue) -> Option<i64> {
    match v {
        ScalarValue::TimestampNanosecond(Some(n), _) => Some(*n),
        ScalarValue::TimestampMicrosecond(Some(n), _) => n.checked_mul(1_000),
        ScalarValue::TimestampMillisecond(Some(n), _) => n.checked_mul(1_000_000),
        ScalarValue::TimestampSecond(Some(n), _) => n.checked_mul(1_000_000_000),
        _ => None,
    }
}

fn is_time(e: &Expr) -> bool {
    matches!(e, Expr::Column(c) if c.name == TIME_COLUMN)
}

/// `[lo, hi)` of a constant bound on `time` (None: the predicate is not one).
pub(crate) fn time_bound(c: &Expr) -> Option<(i64, i64)> {
    match c {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (value, op) = if is_time(left) {
                (right.as_ref(), *op)
            } else if is_time(right) {
                (left.as_ref(), op.swap()?)
            } else {
                return None;
            };
            let v = timestamp(value)?;
            match op {
                Operator::GtEq => Some((v, i64::MAX)),
                Operator::Gt => Some((v.checked_add(1)?, i64::MAX)),
                Operator::Lt => Some((i64::MIN, v)),
                Operator::LtEq => Some((i64::MIN, v.checked_add(1)?)),
                Operator::Eq => Some((v, v.checked_add(1)?)),
                _ => None,
            }
        }
        Expr::Between(Between {
            expr,
            negated: false,
            low,
            high,
        }) if is_time(expr) => Some((timestamp(low)?, timestamp(high)?.checked_add(1)?)),
        _ => None,
    }
}

/// A fixed stride, in nanoseconds.
pub(crate) fn stride(e: &Expr) -> Option<i64> {
    let ns = match constant(e, None)? {
        ScalarValue::IntervalMonthDayNano(Some(i)) if i.months == 0 => (i.days as i64)
            .checked_mul(NS_PER_DAY)?
            .checked_add(i.nanoseconds)?,
        ScalarValue::IntervalDayTime(Some(i)) => (i.days as i64)
            .checked_mul(NS_PER_DAY)?
            .checked_add((i.milliseconds as i64).checked_mul(1_000_000)?)?,
        _ => return None,
    };
    (ns > 0).then_some(ns)
}

/// `(stride, origin)` of an expression that depends on `time` only through
/// `date_bin(stride, time [, origin])` with constant arguments (one stride and origin).
pub(crate) fn time_bucket(e: &Expr) -> Option<(i64, i64)> {
    let mut found: Option<(i64, i64)> = None;
    let mut ok = true;
    let stripped = e
        .clone()
        .transform_down(|e| {
            if let Expr::ScalarFunction(f) = &e
                && f.func.name() == "date_bin"
                && f.args.get(1).is_some_and(is_time)
            {
                let s = f.args.first().and_then(stride);
                let o = match f.args.get(2) {
                    Some(o) => timestamp(o),
                    None => Some(0),
                };
                match (s, o) {
                    (Some(s), Some(o)) if found.is_none_or(|f| f == (s, o)) => found = Some((s, o)),
                    _ => ok = false,
                }
                return Ok(Transformed::new(lit(0i64), true, TreeNodeRecursion::Jump));
            }
            Ok(Transformed::no(e))
        })
        .ok()?
        .data;
    // Nothing else may read `time` (or any other column).
    if ok && stripped.column_refs().is_empty() {
        found
    } else {
        None
    }
}

/// The bucket of `t`: `origin + floor((t - origin) / stride) * stride`, as `date_bin`.
pub(crate) fn bin(t: i64, stride: i64, origin: i64) -> Option<i64> {
    let d = (t as i128 - origin as i128).div_euclid(stride as i128);
    i64::try_from(origin as i128 + d * stride as i128).ok()
}

/// Whether `e` grows strictly with the start of its `date_bin` bucket (of `stride`): the
/// bucket itself, its epoch (`extract(epoch FROM …)`), and casts of those that keep distinct
/// buckets distinct.
pub(crate) fn increases_with_bucket(e: &Expr, stride: i64) -> bool {
    match e {
        Expr::Alias(a) => increases_with_bucket(&a.expr, stride),
        Expr::ScalarFunction(f) if f.func.name() == "date_bin" => true,
        Expr::ScalarFunction(f) if f.func.name() == "date_part" => {
            let epoch = matches!(
                f.args.first(),
                Some(Expr::Literal(ScalarValue::Utf8(Some(p)), _)) if p.eq_ignore_ascii_case("epoch")
            );
            epoch
                && f.args
                    .get(1)
                    .is_some_and(|a| increases_with_bucket(a, stride))
        }
        Expr::Cast(c) => {
            let keeps = match c.field.data_type() {
                DataType::Timestamp(_, _) | DataType::Float64 => true,
                // Whole seconds: distinct buckets stay distinct when a bucket is a second or
                // longer.
                DataType::Int64 => stride >= 1_000_000_000,
                _ => false,
            };
            keeps && increases_with_bucket(&c.expr, stride)
        }
        _ => false,
    }
}
