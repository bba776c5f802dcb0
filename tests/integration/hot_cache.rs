//! The hot-segment cache against the files: the same random writes (out of order, overwrites of
//! persisted points, several persists, a compaction, a reopen) on a database with the cache
//! and on one without (`Config::hot_cache_bytes = 0`); every query, with filters the slice
//! statistics prune by, must answer the same. Segments hold thousands of rows, so slices are
//! really skipped.

use crate::common::{host_runs, sorted_rows as rows};
use proptest::prelude::*;
use rivulet::{Config, Db, Durability, Precision};

/// The queries: TSBS shapes and filters on tags, fields and time that prune slices.
const QUERIES: &[&str] = &[
    "SELECT date_bin(INTERVAL '1 minute', time) AS t, max(usage_user) FROM cpu WHERE hostname = 'host_3' AND time >= TIMESTAMP '1970-01-01 00:10:00' AND time < TIMESTAMP '1970-01-01 01:10:00' GROUP BY 1",
    "SELECT hostname, date_bin(INTERVAL '1 hour', time) AS t, avg(usage_user), count(*) FROM cpu WHERE time >= TIMESTAMP '1970-01-01 00:00:00' AND time < TIMESTAMP '1970-01-01 02:00:00' GROUP BY 1, 2",
    "SELECT hostname, time, usage_user, usage_system FROM cpu WHERE usage_user > 90 AND time >= TIMESTAMP '1970-01-01 00:30:00'",
    "SELECT time, usage_user FROM cpu WHERE usage_user > 90 AND hostname = 'host_7'",
    "SELECT date_bin(INTERVAL '1 minute', time) AS t, max(usage_user) FROM cpu WHERE time < TIMESTAMP '1970-01-01 01:30:00' GROUP BY 1 ORDER BY 1 DESC LIMIT 5",
    "SELECT hostname, rack, time, usage_user, usage_system, note FROM cpu WHERE hostname IN ('host_1', 'host_8') AND rack = '1'",
    "SELECT hostname, count(*), min(time), max(time), sum(usage_system) FROM cpu GROUP BY hostname",
    "SELECT count(*) FROM cpu WHERE usage_system IS NULL",
    "SELECT count(*), max(usage_user) FROM cpu WHERE hostname > 'host_4' AND hostname <= 'host_6' AND usage_system < 10",
    "SELECT note, count(*) FROM cpu WHERE note IS NOT NULL GROUP BY note",
    "SELECT * FROM cpu WHERE time = TIMESTAMP '1970-01-01 00:20:00'",
];

/// A small deterministic generator (the case's seed decides everything).
struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

/// `n` lines: 10 hosts, 2 racks, times up to 2 h (some out of order and some repeating an
/// earlier point with other values), and a field (`note`) that appears only later.
fn lines(rng: &mut Rng, n: usize, with_note: bool) -> String {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let host = rng.next(10);
        let rack = rng.next(2);
        let time = rng.next(7200);
        let mut fields = vec![format!("usage_user={}", rng.next(100))];
        if rng.next(4) > 0 {
            fields.push(format!("usage_system={}", rng.next(100)));
        }
        if with_note && rng.next(8) == 0 {
            fields.push(format!("note=\"n{}\"", rng.next(3)));
        }
        out.push(format!(
            "cpu,hostname=host_{host},rack={rack} {} {time}",
            fields.join(",")
        ));
    }
    out.join("\n")
}

fn config(dir: &std::path::Path, hot: bool) -> Config {
    Config {
        durability: Durability::None,
        partition: std::time::Duration::from_secs(3600),
        background: false,
        hot_cache_bytes: if hot { 64 << 20 } else { 0 },
        ..Config::with_dir(dir)
    }
}

/// Reads every segment until the read-through decodes (one at a time) hold all `segments`,
/// for up to 30 s.
fn wait_for_fill(db: &Db, rt: &tokio::runtime::Runtime, segments: usize) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while db.stats().hot_cache.segments < segments && std::time::Instant::now() < deadline {
        rows(db, rt, "SELECT count(*) FROM cpu");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 6, ..ProptestConfig::default() })]

    #[test]
    fn hot_segments_answer_as_the_files(
        seed in 1u64..u64::MAX,
        batches in proptest::collection::vec(200usize..2500, 2..5),
        compact in any::<bool>(),
    ) {
        let (dir_hot, dir_cold) = (tempfile::tempdir().expect("dir"), tempfile::tempdir().expect("dir"));
        let rt = tokio::runtime::Builder::new_current_thread().build().expect("rt");
        let hot = Db::open_with(config(dir_hot.path(), true)).expect("open");
        let cold = Db::open_with(config(dir_cold.path(), false)).expect("open");
        let mut rng = Rng(seed);
        let last = batches.len() - 1;
        for (i, n) in batches.iter().enumerate() {
            // Later batches overwrite persisted points and bring a new column.
            let body = lines(&mut rng, *n, i > 0);
            for db in [&hot, &cold] {
                db.write_lines("main", &body, Precision::Second).expect("write");
                if i < last {
                    db.persist().expect("persist");
                }
            }
        }
        if compact {
            hot.compact().expect("compact");
            cold.compact().expect("compact");
        }
        prop_assert!(hot.stats().hot_cache.segments > 0, "persisted segments are hot");
        prop_assert_eq!(cold.stats().hot_cache.segments, 0);
        for sql in QUERIES {
            prop_assert_eq!(rows(&hot, &rt, sql), rows(&cold, &rt, sql), "{}", sql);
        }
        // After a reopen the cache fills from the segments queries read.
        hot.close().expect("close");
        let hot = Db::open_with(config(dir_hot.path(), true)).expect("reopen");
        for sql in QUERIES {
            prop_assert_eq!(rows(&hot, &rt, sql), rows(&cold, &rt, sql), "reopened: {}", sql);
        }
        let segments = rt.block_on(hot.sql("SELECT count(*) FROM system.segments")).expect("segments");
        let count = arrow::util::display::array_value_to_string(segments[0].column(0), 0).expect("n");
        let count: usize = count.parse().expect("count");
        wait_for_fill(&hot, &rt, count);
        prop_assert_eq!(hot.stats().hot_cache.segments, count);
        for sql in QUERIES {
            prop_assert_eq!(rows(&hot, &rt, sql), rows(&cold, &rt, sql), "refilled: {}", sql);
        }
        let stats = hot.stats().hot_cache;
        prop_assert!(stats.hits > 0 && stats.misses > 0, "{:?}", stats);
        prop_assert!(stats.bytes > 0 && stats.bytes <= stats.limit_bytes, "{:?}", stats);
    }
}

/// Past its limit the cache drops the least recently used segments, and with a limit of 0 it
/// holds nothing.
#[test]
fn the_limit_holds_and_zero_turns_it_off() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let dir = tempfile::tempdir().expect("dir");
    let mut rng = Rng(7);
    let db = Db::open_with(Config {
        hot_cache_bytes: 200_000,
        ..config(dir.path(), true)
    })
    .expect("open");
    for _ in 0..6 {
        db.write_lines("main", &lines(&mut rng, 2000, false), Precision::Second)
            .expect("write");
        db.persist().expect("persist");
    }
    let stats = db.stats().hot_cache;
    assert!(stats.bytes <= 200_000, "{stats:?}");
    assert!(stats.evictions > 0, "{stats:?}");
    // Hot and cold segments together answer as the files alone.
    let sql = "SELECT hostname, count(*), sum(usage_user), max(time) FROM cpu GROUP BY 1";
    let mixed = rows(&db, &rt, sql);
    db.close().expect("close");
    let db = Db::open_with(config(dir.path(), false)).expect("reopen");
    assert_eq!(rows(&db, &rt, sql), mixed);
    assert_eq!(db.stats().hot_cache.segments, 0);
    assert_eq!(db.stats().hot_cache.limit_bytes, 0);
}

/// A tag filter skips the slices of other hosts in a hot segment (sorted by host): the filter
/// above the scan sees about one host's rows, not all four.
#[test]
fn a_tag_filter_skips_slices_of_a_hot_segment() {
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let dir = tempfile::tempdir().expect("dir");
    let db = Db::open_with(Config {
        partition: std::time::Duration::from_secs(86_400),
        ..config(dir.path(), true)
    })
    .expect("open");
    db.write_lines("main", &host_runs(), Precision::Second)
        .expect("write");
    db.persist().expect("persist");
    assert_eq!(db.stats().hot_cache.segments, 1);
    let explain = rows(
        &db,
        &rt,
        "EXPLAIN ANALYZE SELECT count(*), sum(v) FROM cpu WHERE host = 'h3'",
    )
    .join("\n");
    // FilterExec's `selectivity=…% (passed/input)`, counts as `40.19 K`.
    let input: f64 = explain
        .split("selectivity=")
        .nth(1)
        .and_then(|s| s.split('/').nth(1))
        .and_then(|s| s.split(')').next())
        .and_then(|s| match s.strip_suffix(" K") {
            Some(k) => k.parse::<f64>().ok().map(|k| k * 1000.0),
            None => s.parse().ok(),
        })
        .unwrap_or_else(|| panic!("no filter selectivity in {explain}"));
    assert!(
        (40_000.0..=42_048.0).contains(&input),
        "the filter saw {input} rows: {explain}"
    );
    assert_eq!(
        rows(
            &db,
            &rt,
            "SELECT count(*), sum(v) FROM cpu WHERE host = 'h3'"
        ),
        vec!["40000|799980000".to_string()]
    );
    assert!(db.stats().hot_cache.hits > 0);
}
