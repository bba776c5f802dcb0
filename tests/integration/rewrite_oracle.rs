//! Query rewrites against the plain plan: every TSBS query, and the latest-row shapes the
//! last-point rewrite recognises (and some it must not), on random write sequences (out of
//! order, overwrites, several series per host, persists and a reopen in the middle), run on a
//! database with rewrites and on one without (`Config::query_rewrites`). The answers must be
//! equal; where the rewrite must apply, `EXPLAIN` must show `LastPointsExec`.

use crate::common::sorted_rows as rows;
use proptest::prelude::*;
use rivulet::{Config, Db, Durability, Precision};

/// One point: host (its region follows from it), rack (so a host may have two series), time
/// in seconds, and some of the two fields.
#[derive(Debug, Clone)]
struct Point {
    host: u8,
    rack: u8,
    time: u16,
    user: Option<u8>,
    system: Option<u8>,
}

fn point() -> impl Strategy<Value = Point> {
    (
        0u8..5,
        0u8..2,
        0u16..7200,
        proptest::option::weighted(0.9, 0u8..100),
        proptest::option::weighted(0.9, 0u8..100),
    )
        .prop_filter("a point needs a field", |p| p.3.is_some() || p.4.is_some())
        .prop_map(|(host, rack, time, user, system)| Point {
            host,
            rack,
            time,
            user,
            system,
        })
}

fn line(p: &Point) -> String {
    let mut fields = Vec::new();
    if let Some(v) = p.user {
        fields.push(format!("usage_user={v}"));
    }
    if let Some(v) = p.system {
        fields.push(format!("usage_system={v}"));
    }
    format!(
        "cpu,hostname=host_{},region=r{},rack={} {} {}",
        p.host,
        p.host % 2,
        p.rack,
        fields.join(","),
        p.time
    )
}

/// The queries, and whether the last-point state must answer them.
const QUERIES: &[(&str, bool)] = &[
    // The six TSBS queries (queries.py's SQL).
    (
        "SELECT CAST(extract(epoch FROM date_bin(INTERVAL '1 minute', time, TIMESTAMP '1970-01-01')) AS BIGINT) AS t, max(usage_user) FROM cpu WHERE hostname = 'host_1' AND time >= TIMESTAMP '1970-01-01 00:10:00' AND time < TIMESTAMP '1970-01-01 01:10:00' GROUP BY 1 ORDER BY 1",
        false,
    ),
    (
        "SELECT hostname, CAST(extract(epoch FROM date_bin(INTERVAL '1 hour', time, TIMESTAMP '1970-01-01')) AS BIGINT) AS t, avg(usage_user) FROM cpu WHERE time >= TIMESTAMP '1970-01-01 00:00:00' AND time < TIMESTAMP '1970-01-01 02:00:00' GROUP BY 1, 2 ORDER BY 1, 2",
        false,
    ),
    // lastpoint: with two series per host, ties pick either row, so only (host, time) is
    // compared.
    (
        "SELECT hostname, CAST(extract(epoch FROM time) AS BIGINT) FROM (SELECT *, row_number() OVER (PARTITION BY hostname ORDER BY time DESC) AS rn FROM cpu) s WHERE rn = 1 ORDER BY hostname",
        true,
    ),
    (
        "SELECT CAST(extract(epoch FROM time) AS BIGINT) AS t, usage_user, usage_system FROM cpu WHERE usage_user > 90 AND hostname = 'host_2' AND time >= TIMESTAMP '1970-01-01 00:00:00' AND time < TIMESTAMP '1970-01-01 01:00:00' ORDER BY 1",
        false,
    ),
    (
        "SELECT hostname, CAST(extract(epoch FROM time) AS BIGINT) AS t, usage_user, usage_system FROM cpu WHERE usage_user > 90 AND time >= TIMESTAMP '1970-01-01 00:30:00' AND time < TIMESTAMP '1970-01-01 02:00:00' ORDER BY 1, 2",
        false,
    ),
    (
        "SELECT CAST(extract(epoch FROM date_bin(INTERVAL '1 minute', time, TIMESTAMP '1970-01-01')) AS BIGINT) AS t, max(usage_user) FROM cpu WHERE time < TIMESTAMP '1970-01-01 01:30:00' GROUP BY 1 ORDER BY 1 DESC LIMIT 5",
        false,
    ),
    // Latest row per series, whole rows (one row per series and time: no ties).
    (
        "SELECT hostname, rack, time, usage_user, usage_system FROM (SELECT *, row_number() OVER (PARTITION BY hostname, rack, region ORDER BY time DESC) AS rn FROM cpu) s WHERE rn = 1 ORDER BY 1, 2",
        true,
    ),
    (
        "SELECT DISTINCT ON (hostname, rack) hostname, rack, time, usage_user, usage_system FROM cpu ORDER BY hostname, rack, time DESC",
        true,
    ),
    // Ties kept whole by rank().
    (
        "SELECT region, hostname, rack, time, usage_user FROM (SELECT *, rank() OVER (PARTITION BY region ORDER BY time DESC) AS r FROM cpu) s WHERE r = 1",
        true,
    ),
    ("SELECT region, max(time) FROM cpu GROUP BY region", true),
    (
        "SELECT hostname, rack, last_value(usage_user ORDER BY time), max(time) FROM cpu WHERE region = 'r1' GROUP BY hostname, rack",
        true,
    ),
    // A lower time bound and a tag filter keep the answer.
    (
        "SELECT hostname, rack, usage_user FROM (SELECT *, row_number() OVER (PARTITION BY hostname, rack ORDER BY time DESC) AS rn FROM cpu WHERE time >= TIMESTAMP '1970-01-01 01:00:00' AND hostname <> 'host_3') s WHERE rn = 1",
        true,
    ),
    // Not rewritten: an upper bound, a field filter, the second row, IGNORE NULLS.
    (
        "SELECT hostname, rack, usage_user FROM (SELECT *, row_number() OVER (PARTITION BY hostname, rack ORDER BY time DESC) AS rn FROM cpu WHERE time < TIMESTAMP '1970-01-01 01:00:00') s WHERE rn = 1",
        false,
    ),
    (
        "SELECT hostname, rack, usage_user FROM (SELECT *, row_number() OVER (PARTITION BY hostname, rack ORDER BY time DESC) AS rn FROM cpu WHERE usage_user < 50) s WHERE rn = 1",
        false,
    ),
    (
        "SELECT hostname, rack, usage_user FROM (SELECT *, row_number() OVER (PARTITION BY hostname, rack ORDER BY time DESC) AS rn FROM cpu) s WHERE rn = 2",
        false,
    ),
    (
        "SELECT hostname, rack, first_value(usage_system ORDER BY time DESC) IGNORE NULLS FROM cpu GROUP BY hostname, rack",
        false,
    ),
];

fn answered_from_state(db: &Db, rt: &tokio::runtime::Runtime, sql: &str) -> bool {
    rows(db, rt, &format!("EXPLAIN {sql}"))
        .iter()
        .any(|r| r.contains("LastPointsExec"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    #[test]
    fn rewritten_queries_answer_as_the_plain_plan(
        points in proptest::collection::vec(point(), 1..80),
        batch in 1usize..20,
        persist_at in proptest::collection::vec(0usize..80, 0..3),
        reopen_at in 0usize..80,
    ) {
        // Both fields and every tag exist from the first write on, so the queries plan.
        let mut points = points;
        points.insert(0, Point { host: 0, rack: 0, time: 0, user: Some(1), system: Some(1) });
        let (dir_on, dir_off) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
        let config = |dir: &std::path::Path, rewrites: bool| Config {
            durability: Durability::None,
            partition: std::time::Duration::from_secs(3600),
            background: false,
            query_rewrites: rewrites,
            ..Config::with_dir(dir)
        };
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        let mut on = Db::open_with(config(dir_on.path(), true)).expect("open");
        let mut off = Db::open_with(config(dir_off.path(), false)).expect("open");
        let chunks: Vec<&[Point]> = points.chunks(batch).collect();
        for (i, chunk) in chunks.iter().enumerate() {
            let body: Vec<String> = chunk.iter().map(line).collect();
            for db in [&on, &off] {
                db.write_lines("main", &body.join("\n"), Precision::Second).expect("write");
            }
            if persist_at.iter().any(|&p| i == p % chunks.len()) {
                on.persist().expect("persist");
                off.persist().expect("persist");
            }
            if i == reopen_at % chunks.len() {
                on.close().expect("close");
                off.close().expect("close");
                on = Db::open_with(config(dir_on.path(), true)).expect("reopen");
                off = Db::open_with(config(dir_off.path(), false)).expect("reopen");
            }
        }
        for (sql, rewritten) in QUERIES {
            prop_assert_eq!(rows(&on, &rt, sql), rows(&off, &rt, sql), "{}", sql);
            prop_assert_eq!(answered_from_state(&on, &rt, sql), *rewritten, "EXPLAIN {}", sql);
            prop_assert!(!answered_from_state(&off, &rt, sql), "rewrites off: {}", sql);
        }
    }
}
