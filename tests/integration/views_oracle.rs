//! Property test of materialized views: after random write sequences — out of order,
//! duplicates and overwrites of some fields, late points, many small batches or one big one,
//! persistence and a reopen in the middle, views created before and after data exists — every
//! view equals the same SQL run by plain DataFusion over the deduplicated base data.

use std::collections::BTreeMap;
use std::sync::Arc;

use arrow::array::{
    ArrayRef, DictionaryArray, Float64Array, RecordBatch, TimestampNanosecondArray,
};
use arrow::datatypes::Int32Type;
use datafusion::prelude::SessionContext;
use proptest::prelude::*;
use rivulet::{Config, Db, Durability, Precision};

#[derive(Debug, Clone)]
struct Point {
    host: u8,
    /// Seconds; several one-minute buckets.
    time: u16,
    a: Option<i16>,
    b: Option<i16>,
}

fn point() -> impl Strategy<Value = Point> {
    (
        0u8..4,
        0u16..300,
        proptest::option::of(-20i16..20),
        proptest::option::of(-20i16..20),
    )
        .prop_filter("a point needs a field", |(_, _, a, b)| {
            a.is_some() || b.is_some()
        })
        .prop_map(|(host, time, a, b)| Point { host, time, a, b })
}

#[derive(Debug, Clone)]
enum Op {
    Write(Vec<Point>),
    Persist,
    Reopen,
}

fn op() -> impl Strategy<Value = Op> {
    prop_oneof![
        8 => proptest::collection::vec(point(), 1..12).prop_map(Op::Write),
        1 => Just(Op::Persist),
        1 => Just(Op::Reopen),
    ]
}

/// Views under test, in dependency order: (name, definition).
const VIEWS: &[(&str, &str)] = &[
    (
        "v_agg",
        "SELECT date_bin(INTERVAL '1 minute', time) AS time, host, avg(a) AS avg_a, \
         max(a) AS max_a, min(b) AS min_b, sum(a) AS sum_a, count(*) AS n, count(b) AS nb, \
         stddev(a) AS sd_a, var_pop(b) AS vp_b FROM m GROUP BY 1, 2",
    ),
    (
        "v_first",
        "SELECT date_bin(INTERVAL '1 minute', time) AS time, host, \
         first_value(a ORDER BY time) AS fa, last_value(b ORDER BY time) AS lb \
         FROM m GROUP BY 1, 2",
    ),
    ("v_proj", "SELECT time, host, a, b FROM m WHERE a > 0"),
    (
        "v_dirty",
        "SELECT date_bin(INTERVAL '1 minute', time) AS time, count(DISTINCT host) AS hosts, \
         median(a) AS med FROM m GROUP BY 1 HAVING count(*) > 1",
    ),
    (
        "v_total",
        "SELECT host, count(*) AS n, max(b) AS max_b FROM m GROUP BY host",
    ),
    (
        "v_rollup",
        "SELECT date_bin(INTERVAL '2 minutes', time) AS time, host, sum(n) AS n, \
         max(max_a) AS max_a FROM v_agg GROUP BY 1, 2",
    ),
];

fn line(p: &Point) -> String {
    let mut fields = Vec::new();
    if let Some(a) = p.a {
        fields.push(format!("a={a}"));
    }
    if let Some(b) = p.b {
        fields.push(format!("b={b}"));
    }
    format!("m,host=h{} {} {}", p.host, fields.join(","), p.time)
}

type Points = BTreeMap<(String, u16), (Option<i16>, Option<i16>)>;

fn apply(m: &mut Points, points: &[Point]) {
    for p in points {
        let e = m.entry((format!("h{}", p.host), p.time)).or_default();
        if p.a.is_some() {
            e.0 = p.a;
        }
        if p.b.is_some() {
            e.1 = p.b;
        }
    }
}

/// The deduplicated base data as a plain Arrow batch, typed as Rivulet types it.
fn base_batch(m: &Points) -> RecordBatch {
    let hosts: DictionaryArray<Int32Type> = m.keys().map(|(h, _)| h.as_str()).collect();
    let times = TimestampNanosecondArray::from(
        m.keys()
            .map(|(_, t)| *t as i64 * 1_000_000_000)
            .collect::<Vec<_>>(),
    )
    .with_timezone("UTC");
    let a: Float64Array = m.values().map(|v| v.0.map(f64::from)).collect();
    let b: Float64Array = m.values().map(|v| v.1.map(f64::from)).collect();
    RecordBatch::try_from_iter(vec![
        ("host", Arc::new(hosts) as ArrayRef),
        ("time", Arc::new(times)),
        ("a", Arc::new(a)),
        ("b", Arc::new(b)),
    ])
    .expect("batch")
}

/// Rows as sorted text, floats to 6 significant digits (merged states round differently).
fn render(batches: &[RecordBatch]) -> Vec<String> {
    use arrow::array::Array;
    let mut out = Vec::new();
    for b in batches {
        let cols: Vec<ArrayRef> = b
            .columns()
            .iter()
            .map(|c| match c.data_type() {
                arrow::datatypes::DataType::Dictionary(_, v) => {
                    arrow::compute::cast(c, v).expect("cast")
                }
                _ => c.clone(),
            })
            .collect();
        for row in 0..b.num_rows() {
            let parts: Vec<String> = cols
                .iter()
                .map(|c| {
                    if c.is_null(row) {
                        "NULL".to_string()
                    } else if let Some(f) = c.as_any().downcast_ref::<Float64Array>() {
                        let v = f.value(row);
                        if v.abs() < 1e-9 {
                            "0".to_string()
                        } else {
                            format!("{v:.5e}")
                        }
                    } else {
                        arrow::util::display::array_value_to_string(c, row).expect("display")
                    }
                })
                .collect();
            out.push(parts.join(" | "));
        }
    }
    out.sort();
    out
}

/// Every view against plain DataFusion over `m`.
fn check(db: &Db, rt: &tokio::runtime::Runtime, m: &Points, created: usize) {
    let ctx = SessionContext::new();
    ctx.register_batch("m", base_batch(m)).expect("register");
    for (name, sql) in &VIEWS[..created] {
        let expected = rt
            .block_on(async { ctx.sql(sql).await?.collect().await })
            .expect(sql);
        // Views on views read the oracle's result of the view below.
        if let Some(b) = expected.first() {
            let all = arrow::compute::concat_batches(&b.schema(), &expected).expect("concat");
            ctx.register_batch(*name, all).expect("register view");
        }
        let actual = rt
            .block_on(db.sql(&format!("SELECT * FROM {name}")))
            .expect(name);
        assert_eq!(
            render(&actual),
            render(&expected),
            "view {name} differs from the recompute ({sql})"
        );
        let checked = rt
            .block_on(db.sql(&format!("CHECK MATERIALIZED VIEW {name}")))
            .expect("check");
        let status = arrow::util::pretty::pretty_format_batches(&checked)
            .expect("format")
            .to_string();
        assert!(status.contains("| ok "), "CHECK {name}: {status}");
    }
}

fn config(dir: &std::path::Path) -> Config {
    Config {
        durability: Durability::None,
        background: false,
        persist_on_close: false,
        partition: std::time::Duration::from_secs(120),
        ..Config::with_dir(dir)
    }
}

fn run_case(before: &[Op], after: &[Op], created_early: usize) {
    let rt = crate::common::multi_thread_rt(2);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut db = Db::open_with(config(dir.path())).expect("open");
    let mut m = Points::new();
    // Some views exist before any data (maintained from the first write), the rest are
    // created over data already stored (backfilled).
    db.write_lines("main", "m,host=h0 a=0,b=0 0", Precision::Second)
        .expect("seed");
    apply(
        &mut m,
        &[Point {
            host: 0,
            time: 0,
            a: Some(0),
            b: Some(0),
        }],
    );
    for (name, sql) in &VIEWS[..created_early] {
        rt.block_on(db.sql(&format!("CREATE MATERIALIZED VIEW {name} AS {sql}")))
            .expect("create");
    }
    let run = |db: &mut Db, m: &mut Points, op: &Op| match op {
        Op::Write(points) => {
            let lines: Vec<String> = points.iter().map(line).collect();
            db.write_lines("main", &lines.join("\n"), Precision::Second)
                .expect("write");
            apply(m, points);
        }
        Op::Persist => {
            db.persist().expect("persist");
        }
        Op::Reopen => {
            let old = std::mem::replace(db, Db::open_in_memory().expect("placeholder"));
            old.close().expect("close");
            *db = Db::open_with(config(dir.path())).expect("reopen");
        }
    };
    for op in before {
        run(&mut db, &mut m, op);
    }
    for (name, sql) in &VIEWS[created_early..] {
        rt.block_on(db.sql(&format!("CREATE MATERIALIZED VIEW {name} AS {sql}")))
            .expect("create late");
    }
    check(&db, &rt, &m, VIEWS.len());
    for op in after {
        run(&mut db, &mut m, op);
        check(&db, &rt, &m, VIEWS.len());
    }
    db.close().expect("close");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 8, .. ProptestConfig::default() })]

    #[test]
    fn views_equal_the_recompute(
        before in proptest::collection::vec(op(), 0..4),
        after in proptest::collection::vec(op(), 1..8),
        created_early in 1usize..=VIEWS.len(),
    ) {
        run_case(&before, &after, created_early);
    }
}

fn p(host: u8, time: u16, a: Option<i16>, b: Option<i16>) -> Point {
    Point { host, time, a, b }
}

/// A sequence the property test found: a write the view worker saw before the commit step had
/// published its sequence (recomputes read below it and lost the write).
#[test]
fn regression_recompute_reads_the_round_s_writes() {
    let before = vec![
        Op::Write(vec![
            p(1, 165, Some(14), Some(-14)),
            p(1, 101, Some(1), Some(-13)),
            p(0, 199, Some(-1), Some(11)),
        ]),
        Op::Write(vec![p(3, 109, Some(-18), None), p(2, 8, Some(-16), None)]),
        Op::Write(vec![
            p(1, 288, Some(-16), Some(-8)),
            p(3, 248, None, Some(-17)),
            p(3, 260, Some(18), None),
            p(0, 282, Some(-2), Some(-4)),
            p(2, 33, Some(-1), None),
            p(2, 3, None, Some(0)),
            p(2, 234, Some(-20), Some(4)),
            p(3, 248, None, Some(-13)),
            p(1, 211, Some(17), None),
            p(3, 130, Some(-4), Some(16)),
            p(0, 158, None, Some(-10)),
        ]),
    ];
    let after = vec![
        Op::Write(vec![p(2, 286, Some(3), None), p(2, 188, None, Some(15))]),
        Op::Write(vec![
            p(2, 64, Some(2), Some(-15)),
            p(1, 105, Some(17), Some(-13)),
            p(1, 203, Some(11), None),
            p(1, 194, Some(-10), None),
            p(1, 114, None, Some(-10)),
            p(0, 65, Some(-12), None),
        ]),
        Op::Write(vec![
            p(0, 125, Some(-7), None),
            p(3, 115, Some(18), None),
            p(1, 258, Some(2), Some(-3)),
            p(2, 151, Some(-7), None),
            p(2, 196, Some(-20), None),
            p(1, 55, Some(-6), None),
        ]),
        Op::Write(vec![
            p(0, 121, Some(-17), None),
            p(2, 201, None, Some(-13)),
            p(3, 167, None, Some(9)),
        ]),
        Op::Persist,
    ];
    run_case(&before, &after, 1);
}
