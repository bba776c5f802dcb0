//! Time-series SQL functions beyond DataFusion's own.
//!
//! `time_bucket(width, ts [, origin | time_zone])`, as TimescaleDB has it: the start of the
//! bucket of `width` that holds `ts`.
//! - Buckets are aligned to an origin, by default Monday 2000-01-03 00:00 (so weeks start on
//!   Mondays; TimescaleDB's default), or 2000-01-01 for widths in months or years. Any width
//!   that divides a day gives the same buckets as `date_bin`.
//! - Widths are fixed (days, hours… down to nanoseconds) or calendar months (`'1 month'`,
//!   `'3 months'`, `'1 year'`); a width mixing months with days or smaller is refused, as is a
//!   width that is not positive.
//! - With a time zone name (`'Europe/Berlin'`), buckets follow that zone's wall clock: a
//!   `'1 day'` bucket starts at local midnight, including on the days daylight saving time
//!   changes (those buckets are 23 or 25 hours long). A local bucket start that does not exist
//!   (inside a spring-forward gap) is the first instant after the gap; one that exists twice
//!   is the earlier.
//! - With an origin timestamp, buckets are aligned to it instead (in UTC).
//!
//! The result keeps the input's time zone annotation; NULL in gives NULL out.

use std::str::FromStr;
use std::sync::Arc;

use arrow::array::timezone::Tz;
use arrow::array::{Array, ArrayRef, AsArray, TimestampNanosecondArray};
use arrow::datatypes::{DataType, IntervalMonthDayNano, IntervalUnit, TimeUnit};
use chrono::{Datelike, NaiveDate, NaiveDateTime, Offset, TimeZone, Utc};
use datafusion::common::{ScalarValue, exec_err, plan_err};
use datafusion::error::Result;
use datafusion::logical_expr::sort_properties::{ExprProperties, SortProperties};
use datafusion::logical_expr::{
    ColumnarValue, ScalarFunctionArgs, ScalarUDFImpl, Signature, Volatility,
};

const NS_PER_DAY: i64 = 86_400_000_000_000;

/// `time_bucket` (see the module documentation).
#[derive(Debug, PartialEq, Eq, Hash)]
pub(crate) struct TimeBucket {
    signature: Signature,
}

impl Default for TimeBucket {
    fn default() -> Self {
        TimeBucket {
            signature: Signature::user_defined(Volatility::Immutable),
        }
    }
}

/// How buckets are aligned.
enum Align {
    /// To this instant (ns since the epoch, UTC).
    Origin(i64),
    /// To the default origin, on the wall clock of this zone.
    Zone(Tz),
}

impl ScalarUDFImpl for TimeBucket {
    fn name(&self) -> &str {
        "time_bucket"
    }

    fn signature(&self) -> &Signature {
        &self.signature
    }

    fn coerce_types(&self, arg_types: &[DataType]) -> Result<Vec<DataType>> {
        let usage = "time_bucket takes (width INTERVAL, ts TIMESTAMP [, origin TIMESTAMP | time_zone TEXT]), e.g. time_bucket(INTERVAL '5 minutes', time)";
        if !(2..=3).contains(&arg_types.len()) {
            return plan_err!("{usage}");
        }
        let width = match &arg_types[0] {
            DataType::Interval(_) | DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => {
                DataType::Interval(IntervalUnit::MonthDayNano)
            }
            other => return plan_err!("{usage}; the width is {other}"),
        };
        let ts = match &arg_types[1] {
            DataType::Timestamp(_, tz) => DataType::Timestamp(TimeUnit::Nanosecond, tz.clone()),
            DataType::Null => DataType::Timestamp(TimeUnit::Nanosecond, None),
            other => return plan_err!("{usage}; the timestamp is {other}"),
        };
        let mut out = vec![width, ts];
        if let Some(third) = arg_types.get(2) {
            out.push(match third {
                DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View => DataType::Utf8,
                DataType::Timestamp(_, tz) => DataType::Timestamp(TimeUnit::Nanosecond, tz.clone()),
                other => return plan_err!("{usage}; the third argument is {other}"),
            });
        }
        Ok(out)
    }

    fn return_type(&self, arg_types: &[DataType]) -> Result<DataType> {
        match arg_types.get(1) {
            Some(DataType::Timestamp(_, tz)) => {
                Ok(DataType::Timestamp(TimeUnit::Nanosecond, tz.clone()))
            }
            _ => Ok(DataType::Timestamp(TimeUnit::Nanosecond, None)),
        }
    }

    fn invoke_with_args(&self, args: ScalarFunctionArgs) -> Result<ColumnarValue> {
        let (Some(width), Some(ts)) = (args.args.first(), args.args.get(1)) else {
            return exec_err!("time_bucket takes a width and a timestamp");
        };
        let width = match width {
            ColumnarValue::Scalar(ScalarValue::IntervalMonthDayNano(Some(w))) => *w,
            ColumnarValue::Scalar(ScalarValue::IntervalMonthDayNano(None)) => {
                return Ok(ColumnarValue::Scalar(null_like(&args.return_field)));
            }
            _ => return exec_err!("time_bucket: the width must be a constant interval"),
        };
        let stride = Stride::of(width)?;
        let align = match args.args.get(2) {
            None => Align::Origin(stride.default_origin()),
            Some(ColumnarValue::Scalar(ScalarValue::Utf8(Some(zone)))) => {
                match Tz::from_str(zone) {
                    Ok(tz) => Align::Zone(tz),
                    Err(_) => {
                        return exec_err!(
                            "time_bucket: unknown time zone '{zone}' (an IANA name such as 'Europe/Berlin', or an offset such as '+02:00')"
                        );
                    }
                }
            }
            Some(ColumnarValue::Scalar(ScalarValue::TimestampNanosecond(Some(o), _))) => {
                Align::Origin(*o)
            }
            Some(ColumnarValue::Scalar(s)) if s.is_null() => {
                return Ok(ColumnarValue::Scalar(null_like(&args.return_field)));
            }
            Some(_) => {
                return exec_err!(
                    "time_bucket: the origin or time zone must be a constant, not a column"
                );
            }
        };
        let tz = match args.return_field.data_type() {
            DataType::Timestamp(_, tz) => tz.clone(),
            _ => None,
        };
        match ts {
            ColumnarValue::Scalar(ScalarValue::TimestampNanosecond(v, _)) => {
                let out = v.map(|v| bucket(v, &stride, &align)).transpose()?;
                Ok(ColumnarValue::Scalar(ScalarValue::TimestampNanosecond(
                    out, tz,
                )))
            }
            ColumnarValue::Scalar(s) if s.is_null() => {
                Ok(ColumnarValue::Scalar(null_like(&args.return_field)))
            }
            ColumnarValue::Array(a) => {
                let values = a.as_primitive_opt::<arrow::datatypes::TimestampNanosecondType>();
                let Some(values) = values else {
                    return exec_err!(
                        "time_bucket: expected nanosecond timestamps, got {}",
                        a.data_type()
                    );
                };
                let out: TimestampNanosecondArray = values
                    .iter()
                    .map(|v| v.map(|v| bucket(v, &stride, &align)).transpose())
                    .collect::<Result<_>>()?;
                Ok(ColumnarValue::Array(
                    Arc::new(out.with_timezone_opt(tz)) as ArrayRef
                ))
            }
            other => exec_err!("time_bucket: unexpected timestamp {}", other.data_type()),
        }
    }

    fn output_ordering(&self, input: &[ExprProperties]) -> Result<SortProperties> {
        // Monotonic in the timestamp when the width and alignment are constants.
        let constant = |i: usize| {
            input
                .get(i)
                .is_none_or(|p| p.sort_properties == SortProperties::Singleton)
        };
        Ok(if constant(0) && constant(2) {
            input
                .get(1)
                .map_or(SortProperties::Unordered, |p| p.sort_properties)
        } else {
            SortProperties::Unordered
        })
    }
}

fn null_like(field: &arrow::datatypes::FieldRef) -> ScalarValue {
    ScalarValue::try_from(field.data_type()).unwrap_or(ScalarValue::Null)
}

/// A bucket width: fixed nanoseconds or calendar months.
enum Stride {
    Nanos(i64),
    Months(i32),
}

impl Stride {
    fn of(w: IntervalMonthDayNano) -> Result<Stride> {
        if w.months != 0 {
            if w.days != 0 || w.nanoseconds != 0 {
                return exec_err!(
                    "time_bucket: a width mixes months with days or smaller units; use one or the other"
                );
            }
            if w.months < 0 {
                return exec_err!("time_bucket: the width must be positive");
            }
            return Ok(Stride::Months(w.months));
        }
        let ns = i64::from(w.days)
            .checked_mul(NS_PER_DAY)
            .and_then(|d| d.checked_add(w.nanoseconds));
        match ns {
            Some(ns) if ns > 0 => Ok(Stride::Nanos(ns)),
            Some(_) => exec_err!("time_bucket: the width must be positive"),
            None => exec_err!("time_bucket: the width is too large"),
        }
    }

    /// TimescaleDB's default origin: Monday 2000-01-03 for fixed widths, 2000-01-01 for months.
    fn default_origin(&self) -> i64 {
        match self {
            Stride::Nanos(_) => 946_857_600_000_000_000,
            Stride::Months(_) => 946_684_800_000_000_000,
        }
    }
}

/// The bucket start of `t` (ns, UTC).
fn bucket(t: i64, stride: &Stride, align: &Align) -> Result<i64> {
    match align {
        Align::Origin(origin) => bin(t, *origin, stride),
        Align::Zone(tz) => {
            // On the zone's wall clock: shift to local time, bin, shift the start back.
            let utc = Utc.timestamp_nanos(t);
            let offset = tz.offset_from_utc_datetime(&utc.naive_utc()).fix();
            let local = t.saturating_add(i64::from(offset.local_minus_utc()) * 1_000_000_000);
            let start = bin(local, stride.default_origin(), stride)?;
            let naive = Utc.timestamp_nanos(start).naive_utc();
            to_utc(tz, naive)
        }
    }
}

/// `t` binned by `stride` from `origin` (both on one clock).
fn bin(t: i64, origin: i64, stride: &Stride) -> Result<i64> {
    match stride {
        Stride::Nanos(n) => {
            let delta = i128::from(t) - i128::from(origin);
            let start = i128::from(origin) + delta.div_euclid(i128::from(*n)) * i128::from(*n);
            i64::try_from(start)
                .or_else(|_| exec_err!("time_bucket: the bucket start is out of range"))
        }
        Stride::Months(n) => {
            let at = Utc.timestamp_nanos(t).naive_utc();
            let base = Utc.timestamp_nanos(origin).naive_utc();
            let months = |d: &NaiveDateTime| i64::from(d.year()) * 12 + i64::from(d.month0());
            let mut k = (months(&at) - months(&base)).div_euclid(i64::from(*n));
            // A bucket starts at the origin's day and time of its month; `at` may be before
            // that in its month.
            loop {
                let start = add_months(base, k * i64::from(*n))?;
                if start <= at || k == i64::MIN {
                    return start.and_utc().timestamp_nanos_opt().map_or_else(
                        || exec_err!("time_bucket: the bucket start is out of range"),
                        Ok,
                    );
                }
                k -= 1;
            }
        }
    }
}

fn add_months(base: NaiveDateTime, months: i64) -> Result<NaiveDateTime> {
    let total = i64::from(base.year()) * 12 + i64::from(base.month0()) + months;
    let (year, month0) = (total.div_euclid(12), total.rem_euclid(12));
    let date = i32::try_from(year)
        .ok()
        .and_then(|y| NaiveDate::from_ymd_opt(y, month0 as u32 + 1, base.day().min(28)))
        .map(|d| d.and_time(base.time()));
    date.map_or_else(
        || exec_err!("time_bucket: the bucket start is out of range"),
        Ok,
    )
}

/// The instant of wall-clock time `local` in `tz`: the earlier of two, or the first instant
/// after a gap.
fn to_utc(tz: &Tz, local: NaiveDateTime) -> Result<i64> {
    let mut probe = local;
    // Zones move their clocks by multiples of 15 minutes, by at most a day.
    for _ in 0..=96 {
        if let Some(dt) = tz.from_local_datetime(&probe).earliest() {
            return dt.with_timezone(&Utc).timestamp_nanos_opt().map_or_else(
                || exec_err!("time_bucket: the bucket start is out of range"),
                Ok,
            );
        }
        probe += chrono::Duration::minutes(15);
    }
    exec_err!("time_bucket: no instant in this time zone for {local}")
}
