//! Property test of "same series and time = same point, last write wins per field": random
//! write sequences (out of order, overwrites of some fields, many small batches or one big one,
//! a query — which merges the buffer — in the middle, a reopen in the middle, persistence to
//! segments and compaction in the middle, across several time partitions) must read back
//! exactly what a plain map of the same writes holds, and so must a query between any of them.

use std::collections::BTreeMap;

use proptest::prelude::*;
use rivulet::{Config, Db, Durability, Precision};

/// One point written: series (tag value), time, and some of the two fields.
#[derive(Debug, Clone)]
struct Point {
    host: u8,
    time: u8,
    a: Option<i16>,
    b: Option<i16>,
}

fn point() -> impl Strategy<Value = Point> {
    (
        0u8..4,
        0u8..12,
        proptest::option::of(-50i16..50),
        proptest::option::of(-50i16..50),
    )
        .prop_filter("a point needs a field", |(_, _, a, b)| {
            a.is_some() || b.is_some()
        })
        .prop_map(|(host, time, a, b)| Point { host, time, a, b })
}

fn line(p: &Point) -> String {
    let mut fields = Vec::new();
    if let Some(a) = p.a {
        fields.push(format!("a={a}i"));
    }
    if let Some(b) = p.b {
        fields.push(format!("b={b}i"));
    }
    format!("m,host=h{} {} {}", p.host, fields.join(","), p.time)
}

/// The oracle: a map from (host, time) to the latest value of each field.
fn oracle(points: &[Point]) -> Points {
    let mut m: Points = BTreeMap::new();
    for p in points {
        let e = m.entry((format!("h{}", p.host), p.time)).or_default();
        if p.a.is_some() {
            e.0 = p.a;
        }
        if p.b.is_some() {
            e.1 = p.b;
        }
    }
    m
}

fn read_back(db: &Db, rt: &tokio::runtime::Runtime) -> Points {
    points_of(db, rt, "m")
}

/// `SELECT host, time, a, b FROM <from>` as a map; a point read twice fails the test.
fn points_of(db: &Db, rt: &tokio::runtime::Runtime, from: &str) -> Points {
    let sql = format!(
        "SELECT CAST(host AS VARCHAR) AS host, CAST(time AS BIGINT) AS t, a, b FROM {from}"
    );
    let batches = rt.block_on(db.sql(&sql)).expect(&sql);
    let mut out = BTreeMap::new();
    for batch in batches {
        use arrow::array::{Array, AsArray};
        use arrow::datatypes::Int64Type;
        let host =
            arrow::compute::cast(batch.column(0), &arrow::datatypes::DataType::Utf8).expect("cast");
        let host = host.as_string::<i32>();
        let t = batch.column(1).as_primitive::<Int64Type>();
        let a = batch.column(2).as_primitive::<Int64Type>();
        let b = batch.column(3).as_primitive::<Int64Type>();
        for i in 0..batch.num_rows() {
            let time = (t.value(i) / 1_000_000_000) as u8;
            let get = |c: &arrow::array::Int64Array| c.is_valid(i).then(|| c.value(i) as i16);
            let prev = out.insert((host.value(i).to_string(), time), (get(a), get(b)));
            assert!(
                prev.is_none(),
                "duplicate point {} at {time}",
                host.value(i)
            );
        }
    }
    out
}

/// (host, time) → (a, b), as the oracle and the readers produce them.
type Key = (String, u8);
type Fields = (Option<i16>, Option<i16>);
type Points = BTreeMap<Key, Fields>;

/// The oracle's latest point per host.
fn latest(all: &Points) -> Points {
    let mut out: BTreeMap<String, (Key, Fields)> = BTreeMap::new();
    for (k, v) in all {
        out.insert(k.0.clone(), (k.clone(), *v)); // keys ascend by time within a host
    }
    out.into_values().collect()
}

/// `last_cache('m')` as the same map.
fn last_points(db: &Db, rt: &tokio::runtime::Runtime) -> Points {
    points_of(db, rt, "last_cache('m')")
}

/// Points in the first `i + 1` chunks.
fn written(chunks: &[&[Point]], i: usize) -> usize {
    chunks[..=i].iter().map(|c| c.len()).sum()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]

    #[test]
    fn reads_equal_the_last_write_per_field(
        points in proptest::collection::vec(point(), 1..60),
        batch in 1usize..8,
        query_at in 0usize..60,
        reopen_at in 0usize..60,
        persist_at in proptest::collection::vec(0usize..60, 0..4),
        compact_at in 0usize..60,
        persist_on_close in any::<bool>(),
    ) {
        // Both fields exist from the first write on, so the query can name them.
        let mut points = points;
        points.insert(0, Point { host: 9, time: 0, a: Some(0), b: Some(0) });
        let dir = tempfile::tempdir().expect("tempdir");
        let config = || Config {
            durability: Durability::None,
            // Points span times 0..12 s: three partitions.
            partition: std::time::Duration::from_secs(4),
            background: false,
            persist_on_close,
            ..Config::with_dir(dir.path())
        };
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        let mut db = Db::open_with(config()).expect("open");
        let chunks: Vec<&[Point]> = points.chunks(batch).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let body: Vec<String> = chunk.iter().map(line).collect();
            db.write_lines("main", &body.join("\n"), Precision::Second).expect("write");
            if i == query_at % chunks.len() {
                // A read in the middle merges the chunks so far; later writes must still win.
                prop_assert_eq!(read_back(&db, &rt), oracle(&points[..written(&chunks, i)]));
            }
            if persist_at.iter().any(|&p| i == p % chunks.len()) {
                db.persist().expect("persist");
                prop_assert_eq!(read_back(&db, &rt), oracle(&points[..written(&chunks, i)]));
            }
            if i == compact_at % chunks.len() {
                db.compact().expect("compact");
            }
            if i == reopen_at % chunks.len() {
                db.close().expect("close");
                db = Db::open_with(config()).expect("reopen");
            }
        }
        prop_assert_eq!(read_back(&db, &rt), oracle(&points));
        prop_assert_eq!(last_points(&db, &rt), latest(&oracle(&points)));
        // One big write of the same sequence gives the same answer.
        let one = Db::open_in_memory().expect("memory");
        let body: Vec<String> = points.iter().map(line).collect();
        one.write_lines("main", &body.join("\n"), Precision::Second).expect("write");
        prop_assert_eq!(read_back(&one, &rt), oracle(&points));
    }
}
