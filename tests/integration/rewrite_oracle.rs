//! Query rewrites against the plain plan: every TSBS query, the latest-row shapes the
//! last-point rewrite recognises and the aggregates a materialized view answers (and some
//! each must not), on random write sequences (out of order, overwrites, several series per
//! host, persists and a reopen in the middle), run on a database with rewrites and on one
//! without (`Config::query_rewrites`), both with the same views. The answers must be equal;
//! where a rewrite must apply, `EXPLAIN` must show `LastPointsExec` or the view's scan.

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

/// The views both databases keep (one made before the writes, one backfilled after them).
const VIEWS: &[&str] = &[
    "CREATE MATERIALIZED VIEW cpu_1m AS SELECT date_bin(INTERVAL '1 minute', time) AS time, hostname, max(usage_user) AS mx, avg(usage_user) AS av, count(usage_user) AS n, min(usage_system) AS mn, sum(usage_system) AS sm, count(*) AS points FROM cpu GROUP BY 1, hostname",
    "CREATE MATERIALIZED VIEW cpu_10m AS SELECT hostname, region, date_bin(INTERVAL '10 minutes', time) AS time, max(usage_user) AS mx, count(*) AS points FROM cpu GROUP BY hostname, region, 3",
];

/// Aggregates over `cpu`, and whether a view must answer them.
const VIEW_QUERIES: &[(&str, bool)] = &[
    // TSBS single-groupby, double-groupby and groupby-orderby-limit (as in QUERIES).
    (
        "SELECT CAST(extract(epoch FROM date_bin(INTERVAL '1 minute', time, TIMESTAMP '1970-01-01')) AS BIGINT) AS t, max(usage_user) FROM cpu WHERE hostname = 'host_1' AND time >= TIMESTAMP '1970-01-01 00:10:00' AND time < TIMESTAMP '1970-01-01 01:10:00' GROUP BY 1 ORDER BY 1",
        true,
    ),
    (
        "SELECT hostname, CAST(extract(epoch FROM date_bin(INTERVAL '1 hour', time, TIMESTAMP '1970-01-01')) AS BIGINT) AS t, avg(usage_user) FROM cpu WHERE time >= TIMESTAMP '1970-01-01 00:00:00' AND time < TIMESTAMP '1970-01-01 02:00:00' GROUP BY 1, 2 ORDER BY 1, 2",
        true,
    ),
    (
        "SELECT CAST(extract(epoch FROM date_bin(INTERVAL '1 minute', time, TIMESTAMP '1970-01-01')) AS BIGINT) AS t, max(usage_user) FROM cpu WHERE time < TIMESTAMP '1970-01-01 01:30:00' GROUP BY 1 ORDER BY 1 DESC LIMIT 5",
        true,
    ),
    // Bounds off the buckets: the partial buckets at both ends come from the table.
    (
        "SELECT hostname, date_bin(INTERVAL '5 minutes', time) AS t, count(usage_user), sum(usage_system), min(usage_system), count(*) FROM cpu WHERE time >= TIMESTAMP '1970-01-01 00:03:17' AND time <= TIMESTAMP '1970-01-01 01:42:05' GROUP BY 1, 2",
        true,
    ),
    (
        "SELECT max(usage_user), avg(usage_user), count(*) FROM cpu WHERE hostname IN ('host_1', 'host_3') AND time > TIMESTAMP '1970-01-01 00:20:00'",
        true,
    ),
    (
        "SELECT hostname, avg(usage_user), count(*) FROM cpu GROUP BY hostname",
        true,
    ),
    // The coarser view, and a tag only it keys by.
    (
        "SELECT region, date_bin(INTERVAL '30 minutes', time) AS t, max(usage_user), count(*) FROM cpu WHERE time BETWEEN TIMESTAMP '1970-01-01 00:05:00' AND TIMESTAMP '1970-01-01 01:55:00' GROUP BY 1, 2",
        true,
    ),
    // Not answered: a tag no view keys by, a field filter, buckets that cut view buckets, a
    // range inside one bucket, aggregates no view keeps (deterministic ones: a float
    // stddev's last digit depends on how the plain plan's partitions happen to merge).
    ("SELECT rack, max(usage_user) FROM cpu GROUP BY rack", false),
    (
        "SELECT hostname, max(usage_user) FROM cpu WHERE usage_user > 50 GROUP BY hostname",
        false,
    ),
    (
        "SELECT date_bin(INTERVAL '1 minute', time, TIMESTAMP '1970-01-01 00:00:30') AS t, max(usage_user) FROM cpu GROUP BY 1",
        false,
    ),
    (
        "SELECT date_bin(INTERVAL '90 seconds', time) AS t, max(usage_user) FROM cpu GROUP BY 1",
        false,
    ),
    (
        "SELECT hostname, max(usage_user) FROM cpu WHERE time >= TIMESTAMP '1970-01-01 00:10:10' AND time < TIMESTAMP '1970-01-01 00:10:50' GROUP BY 1",
        false,
    ),
    (
        "SELECT hostname, count(DISTINCT usage_user), median(usage_system) FROM cpu GROUP BY hostname",
        false,
    ),
];

/// Newest buckets first, and whether the bounded plan must be tried (`LatestBuckets`; only
/// where no view answers the aggregate first).
const LATEST_QUERIES: &[(&str, bool)] = &[
    (
        "SELECT CAST(extract(epoch FROM date_bin(INTERVAL '1 minute', time, TIMESTAMP '1970-01-01')) AS BIGINT) AS t, max(usage_system) FROM cpu WHERE time < TIMESTAMP '1970-01-01 01:30:00' GROUP BY 1 ORDER BY 1 DESC LIMIT 5",
        true,
    ),
    (
        "SELECT date_bin(INTERVAL '10 minutes', time) AS t, max(usage_system), count(*) FROM cpu GROUP BY 1 ORDER BY 1 DESC LIMIT 3",
        true,
    ),
    (
        "SELECT date_bin(INTERVAL '5 minutes', time) AS t, hostname, max(usage_system) FROM cpu GROUP BY 1, 2 ORDER BY 1 DESC, 2 LIMIT 3 OFFSET 2",
        true,
    ),
    (
        "SELECT date_bin(INTERVAL '10 minutes', time) AS t, count(usage_system) FROM cpu WHERE hostname <> 'host_2' GROUP BY 1 HAVING max(usage_system) > 10 ORDER BY 1 DESC LIMIT 2",
        true,
    ),
    (
        "SELECT date_bin(INTERVAL '10 minutes', time) AS t, max(usage_system) FROM cpu GROUP BY 1 ORDER BY 1 LIMIT 3",
        false,
    ),
    (
        "SELECT CAST(extract(epoch FROM date_bin(INTERVAL '500 milliseconds', time)) AS BIGINT) AS t, count(*) FROM cpu GROUP BY 1 ORDER BY 1 DESC LIMIT 3",
        false,
    ),
];

fn explain_shows(db: &Db, rt: &tokio::runtime::Runtime, sql: &str, what: &str) -> bool {
    rows(db, rt, &format!("EXPLAIN {sql}"))
        .iter()
        .any(|r| r.contains(what))
}

fn answered_by_view(db: &Db, rt: &tokio::runtime::Runtime, sql: &str) -> bool {
    rows(db, rt, &format!("EXPLAIN {sql}"))
        .iter()
        .any(|r| r.contains("answered_by_view"))
}

fn answered_from_state(db: &Db, rt: &tokio::runtime::Runtime, sql: &str) -> bool {
    rows(db, rt, &format!("EXPLAIN {sql}"))
        .iter()
        .any(|r| r.contains("LastPointsExec"))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, ..ProptestConfig::default() })]

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
            // A view kept from the first write on, one backfilled half way.
            let create: &[&str] = match (i, chunks.len() / 2) {
                (0, 0) => VIEWS,
                (0, _) => &VIEWS[..1],
                (i, half) if i == half => &VIEWS[1..],
                _ => &[],
            };
            let body: Vec<String> = chunk.iter().map(line).collect();
            for db in [&on, &off] {
                db.write_lines("main", &body.join("\n"), Precision::Second).expect("write");
                for view in create {
                    rt.block_on(db.sql(view)).expect("view");
                }
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
        on.sync_views().expect("sync");
        off.sync_views().expect("sync");
        for (sql, rewritten) in QUERIES {
            prop_assert_eq!(rows(&on, &rt, sql), rows(&off, &rt, sql), "{}", sql);
            prop_assert_eq!(answered_from_state(&on, &rt, sql), *rewritten, "EXPLAIN {}", sql);
            prop_assert!(!answered_from_state(&off, &rt, sql), "rewrites off: {}", sql);
        }
        for (sql, rewritten) in LATEST_QUERIES {
            prop_assert_eq!(rows(&on, &rt, sql), rows(&off, &rt, sql), "{}", sql);
            prop_assert_eq!(explain_shows(&on, &rt, sql, "LatestBuckets"), *rewritten, "EXPLAIN {}", sql);
            prop_assert!(!explain_shows(&off, &rt, sql, "LatestBuckets"), "rewrites off: {}", sql);
        }
        for (sql, rewritten) in VIEW_QUERIES {
            prop_assert_eq!(rows(&on, &rt, sql), rows(&off, &rt, sql), "{}", sql);
            prop_assert_eq!(answered_by_view(&on, &rt, sql), *rewritten, "EXPLAIN {}", sql);
            prop_assert!(!answered_by_view(&off, &rt, sql), "rewrites off: {}", sql);
        }
    }
}
