//! Segments: persistence, restart equivalence, pruning, overwrites across buffer, segments and
//! compaction, retention, and reading a table directory with plain DataFusion.

use std::path::Path;
use std::time::Duration;

use arrow::util::pretty::pretty_format_batches;
use rivulet::{Config, Db, Durability, Precision};

const DAY: i64 = 86_400;

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

fn table(db: &Db, sql: &str) -> String {
    let batches = rt().block_on(db.sql(sql)).expect(sql);
    pretty_format_batches(&batches).expect("format").to_string()
}

/// A database that only persists and compacts when told to.
fn open(dir: &Path) -> Db {
    Db::open_with(Config {
        durability: Durability::None,
        background: false,
        ..Config::with_dir(dir)
    })
    .expect("open")
}

/// `hosts` hosts, one point every `step` seconds over `days` days from 2024-01-01.
fn lines(hosts: usize, days: i64, step: i64) -> String {
    let start = 1_704_067_200;
    let mut out = String::new();
    let mut t = start;
    let mut i = 0u64;
    while t < start + days * DAY {
        for h in 0..hosts {
            i += 1;
            out.push_str(&format!(
                "cpu,host=h{h},dc=dc{} usage={},n={}i {t}\n",
                h % 3,
                // Quarters: exact in binary, so sums do not depend on the order rows are added in.
                (i * 7919 % 1000) as f64 / 4.0,
                i % 97
            ));
        }
        t += step;
    }
    out
}

fn wal_files(dir: &Path) -> usize {
    std::fs::read_dir(dir.join("wal")).expect("wal dir").count()
}

const QUERIES: &[&str] = &[
    "SELECT count(*), sum(usage), sum(n), min(time), max(time) FROM cpu",
    "SELECT host, dc, count(*), avg(usage), max(n) FROM cpu GROUP BY host, dc ORDER BY host",
    "SELECT * FROM cpu WHERE host = 'h1' AND time >= '2024-01-02T03:00:00Z' AND time < '2024-01-02T04:00:00Z' ORDER BY time",
    "SELECT date_bin(INTERVAL '6 hours', time) AS t, dc, max(usage) FROM cpu GROUP BY 1, 2 ORDER BY 1, 2",
];

#[test]
fn persisted_data_reads_the_same_before_and_after_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = lines(5, 3, 600);
    let (in_buffer, persisted) = {
        let db = open(dir.path());
        db.write_lines("main", &data, Precision::Second)
            .expect("write");
        let in_buffer: Vec<String> = QUERIES.iter().map(|q| table(&db, q)).collect();
        let report = db.persist().expect("persist");
        assert_eq!(report.rows, 5 * 3 * 144);
        assert_eq!(report.segments, 3, "one segment per day partition");
        let stats = db.stats();
        assert_eq!(stats.buffer_rows, 0);
        assert_eq!(stats.segments, 3);
        assert_eq!(stats.persisted_seq, report.persisted_seq);
        assert_eq!(
            wal_files(dir.path()),
            0,
            "the WAL is trimmed after persisting"
        );
        let persisted: Vec<String> = QUERIES.iter().map(|q| table(&db, q)).collect();
        db.close().expect("close");
        (in_buffer, persisted)
    };
    assert_eq!(in_buffer, persisted);
    let db = open(dir.path());
    assert_eq!(db.replay_report().records, 0);
    let reopened: Vec<String> = QUERIES.iter().map(|q| table(&db, q)).collect();
    assert_eq!(in_buffer, reopened);
    // Sequences continue after the WAL was emptied.
    let before = db.last_seq();
    let receipt = db
        .write_lines(
            "main",
            "cpu,host=h9,dc=dc0 usage=1 1704067200",
            Precision::Second,
        )
        .expect("write");
    assert!(receipt.seq > before);
}

#[test]
fn close_persists_and_the_directory_has_hive_style_partitions() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = open(dir.path());
        db.write_lines("main", &lines(2, 2, 3600), Precision::Second)
            .expect("write");
        db.close().expect("close");
    }
    let table_dir = dir.path().join("tables").join("main").join("cpu");
    let mut partitions: Vec<String> = std::fs::read_dir(&table_dir)
        .expect("table dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    partitions.sort();
    assert_eq!(partitions, ["partition=2024-01-01", "partition=2024-01-02"]);
    assert_eq!(wal_files(dir.path()), 0);
}

#[test]
fn a_one_hour_query_opens_only_segments_of_that_hour() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    // Three days, persisted twice a day: six segments over three partitions.
    for day in 0..3 {
        for half in 0..2 {
            let start = 1_704_067_200 + day * DAY + half * DAY / 2;
            let mut text = String::new();
            for t in (start..start + DAY / 2).step_by(600) {
                text.push_str(&format!("cpu,host=a,dc=x usage=1,n=1i {t}\n"));
            }
            db.write_lines("main", &text, Precision::Second)
                .expect("write");
            db.persist().expect("persist");
        }
    }
    assert_eq!(db.stats().segments, 6);
    let before = db.stats().segments_scanned;
    let hour = table(
        &db,
        "SELECT count(*) FROM cpu WHERE time >= '2024-01-02T13:00:00Z' AND time < '2024-01-02T14:00:00Z'",
    );
    assert!(hour.contains("| 6 "), "{hour}");
    assert_eq!(
        db.stats().segments_scanned - before,
        1,
        "only the afternoon segment of day 2"
    );

    // After compaction the day is one segment: still only that one is opened.
    let report = db.compact().expect("compact");
    assert_eq!(report.partitions, 3);
    assert_eq!(db.stats().segments, 3);
    let before = db.stats().segments_scanned;
    let again = table(
        &db,
        "SELECT count(*) FROM cpu WHERE time >= '2024-01-02T13:00:00Z' AND time < '2024-01-02T14:00:00Z'",
    );
    assert_eq!(hour, again);
    assert_eq!(db.stats().segments_scanned - before, 1);

    // EXPLAIN ANALYZE shows row groups pruned by statistics inside the file.
    let explain = table(
        &db,
        "EXPLAIN ANALYZE SELECT count(*) FROM cpu WHERE time >= '2024-01-02T13:00:00Z' AND time < '2024-01-02T14:00:00Z'",
    );
    assert!(explain.contains("DataSourceExec"), "{explain}");
    assert!(
        explain.contains("row_groups_pruned_statistics"),
        "{explain}"
    );
}

#[test]
fn overwrites_win_across_buffer_segments_and_compaction() {
    let dir = tempfile::tempdir().expect("tempdir");
    let q = "SELECT host, time, a, b FROM cpu ORDER BY host, time";
    let db = open(dir.path());
    db.write_lines(
        "main",
        "cpu,host=x a=1,b=1 100\ncpu,host=y a=1,b=1 100\ncpu,host=x a=1,b=1 200",
        Precision::Second,
    )
    .expect("write");
    db.persist().expect("persist");
    // Overwrite one field of a persisted point: visible from the buffer, the old value is not.
    db.write_lines("main", "cpu,host=x a=2 100", Precision::Second)
        .expect("overwrite");
    let expected = table(&db, q);
    assert!(
        expected.contains("| x    | 1970-01-01T00:01:40Z | 2.0 | 1.0 |"),
        "{expected}"
    );
    assert_eq!(
        table(&db, "SELECT count(*) FROM cpu"),
        table(&db, "SELECT 3 AS \"count(*)\"")
    );
    // Persisted: the overwrite is merged into the segment it overwrote.
    db.persist().expect("persist");
    assert_eq!(table(&db, q), expected);
    // Overwrite again, persist into a second segment of the same partition, compact.
    db.write_lines(
        "main",
        "cpu,host=y b=5 100\ncpu,host=z a=7 150",
        Precision::Second,
    )
    .expect("overwrite");
    db.persist().expect("persist");
    let expected = table(&db, q);
    assert!(
        expected.contains("| y    | 1970-01-01T00:01:40Z | 1.0 | 5.0 |"),
        "{expected}"
    );
    db.compact().expect("compact");
    assert_eq!(table(&db, q), expected);
    db.close().expect("close");
    let db = open(dir.path());
    assert_eq!(table(&db, q), expected);
    // After a restart the series index is empty: an overwrite must still be detected.
    db.write_lines("main", "cpu,host=x b=9 200", Precision::Second)
        .expect("overwrite after restart");
    let after = table(&db, q);
    assert!(
        after.contains("| x    | 1970-01-01T00:03:20Z | 1.0 | 9.0 |"),
        "{after}"
    );
    assert_eq!(
        table(&db, "SELECT count(*) AS n FROM cpu"),
        table(&db, "SELECT 4 AS n")
    );
}

#[test]
fn plain_datafusion_reads_a_table_directory() {
    let dir = tempfile::tempdir().expect("tempdir");
    let ours = {
        let db = open(dir.path());
        db.write_lines("main", &lines(4, 2, 900), Precision::Second)
            .expect("write");
        db.persist().expect("persist");
        db.write_lines(
            "main",
            "cpu,host=h1,dc=dc1 usage=99.5 1704067200",
            Precision::Second,
        )
        .expect("overwrite");
        let out = table(
            &db,
            "SELECT host, dc, time, usage, n FROM cpu ORDER BY host, time",
        );
        db.close().expect("close");
        out
    };
    let path = dir.path().join("tables/main/cpu/");
    let theirs = rt().block_on(async {
        let ctx = datafusion::prelude::SessionContext::new();
        ctx.register_parquet(
            "cpu",
            path.to_str().expect("utf-8 path"),
            datafusion::prelude::ParquetReadOptions::default(),
        )
        .await
        .expect("register");
        let batches = ctx
            .sql("SELECT host, dc, time, usage, n FROM cpu ORDER BY host, time")
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        pretty_format_batches(&batches).expect("format").to_string()
    });
    assert_eq!(ours, theirs);
}

#[test]
fn retention_drops_whole_partitions_and_survives_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = std::sync::Arc::new(rivulet::ManualClock::new(
        1_704_067_200_000_000_000 + 5 * DAY * 1_000_000_000,
    ));
    let config = || Config {
        durability: Durability::None,
        background: false,
        clock: clock.clone(),
        ..Config::with_dir(dir.path())
    };
    let db = Db::open_with(config()).expect("open");
    db.write_lines("main", &lines(2, 5, 3600), Precision::Second)
        .expect("write");
    db.persist().expect("persist");
    assert_eq!(db.stats().segments, 5);
    let set = table(&db, "ALTER TABLE cpu SET (retention = '2d')");
    assert!(set.contains("main.cpu") && set.contains("172800s"), "{set}");
    // now = Jan 6 00:00; cutoff Jan 4 00:00: Jan 1-3 go, Jan 4 and 5 stay.
    assert_eq!(db.apply_retention().expect("retention"), 3);
    let min = table(&db, "SELECT min(time) AS t FROM cpu");
    assert!(min.contains("2024-01-04T00:00:00Z"), "{min}");
    db.close().expect("close");
    let db = Db::open_with(config()).expect("reopen");
    assert_eq!(db.stats().segments, 2);
    let dir_count = std::fs::read_dir(dir.path().join("tables/main/cpu"))
        .expect("dir")
        .map(|e| std::fs::read_dir(e.expect("e").path()).expect("p").count())
        .sum::<usize>();
    assert_eq!(dir_count, 2, "dropped segment files are deleted");
    let err = rt()
        .block_on(db.sql("ALTER TABLE cpu SET (retention = 'forever')"))
        .expect_err("bad duration");
    assert!(err.to_string().contains("'forever'"), "{err}");
    let err = rt()
        .block_on(db.sql("ALTER TABLE nope SET (retention = '1d')"))
        .expect_err("unknown table");
    assert!(err.to_string().contains("table 'nope' not found"), "{err}");
}

#[test]
fn unregistered_files_are_removed_on_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = open(dir.path());
        db.write_lines("main", &lines(2, 1, 3600), Precision::Second)
            .expect("write");
        db.close().expect("close");
    }
    let partition = dir.path().join("tables/main/cpu/partition=2024-01-01");
    std::fs::write(partition.join("00000000deadbeef.parquet"), b"junk").expect("orphan");
    std::fs::write(partition.join("00000000deadbeef.parquet.tmp"), b"junk").expect("tmp");
    let db = open(dir.path());
    assert_eq!(std::fs::read_dir(&partition).expect("dir").count(), 1);
    assert_eq!(
        table(&db, "SELECT count(*) AS n FROM cpu"),
        table(&db, "SELECT 48 AS n")
    );
}

#[test]
fn writes_past_the_buffer_cap_persist_instead_of_growing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open_with(Config {
        durability: Durability::None,
        background: false,
        max_buffer_bytes: 256 << 10,
        ..Config::with_dir(dir.path())
    })
    .expect("open");
    let data = lines(10, 2, 300);
    for chunk in data.lines().collect::<Vec<_>>().chunks(500) {
        db.write_lines("main", &chunk.join("\n"), Precision::Second)
            .expect("write");
        assert!(db.stats().buffer_bytes < 2 << 20, "{:?}", db.stats());
    }
    assert!(db.stats().segments >= 2, "{:?}", db.stats());
    assert_eq!(
        table(&db, "SELECT count(*) AS n FROM cpu"),
        table(&db, "SELECT 5760 AS n")
    );
    std::thread::sleep(Duration::from_millis(1));
}

#[test]
fn overwrites_of_persisted_points_read_like_an_all_in_memory_database() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    let memory = Db::open_in_memory().expect("memory");
    let both = |text: &str| {
        db.write_lines("main", text, Precision::Second)
            .expect("write");
        memory
            .write_lines("main", text, Precision::Second)
            .expect("write memory");
    };
    both(&lines(3, 2, 120));
    db.persist().expect("persist");
    // Overwrites in the middle of day 1 (one field) and at the end of day 2, plus new points.
    both("cpu,host=h1,dc=dc1 usage=-1 1704110400\ncpu,host=h2,dc=dc2 n=-5i 1704239880");
    both(&lines(1, 1, 3600).replace("h0", "h7"));
    let queries = [
        "SELECT count(*), sum(usage), sum(n) FROM cpu",
        "SELECT host, usage FROM cpu ORDER BY host, usage",
        "SELECT host, time, usage, n FROM cpu WHERE time >= '2024-01-01T11:00:00Z' AND time < '2024-01-01T13:00:00Z' ORDER BY host, time",
        "SELECT host, time, usage, n FROM cpu WHERE time >= '2024-01-02T23:00:00Z' ORDER BY host, time",
        "SELECT dc, max(usage), min(n) FROM cpu WHERE host <> 'h0' GROUP BY dc ORDER BY dc",
    ];
    let expect: Vec<String> = queries.iter().map(|q| table(&memory, q)).collect();
    let got: Vec<String> = queries.iter().map(|q| table(&db, q)).collect();
    assert_eq!(got, expect, "overwrites in the buffer over segments");
    db.persist().expect("persist the overwrites");
    let got: Vec<String> = queries.iter().map(|q| table(&db, q)).collect();
    assert_eq!(got, expect, "after merging them into the segments");
    db.compact().expect("compact");
    let got: Vec<String> = queries.iter().map(|q| table(&db, q)).collect();
    assert_eq!(got, expect, "after compaction");
}

#[test]
fn last_cache_holds_the_latest_point_of_every_series_across_persist_and_restart() {
    let dir = tempfile::tempdir().expect("tempdir");
    let cached = "SELECT host, dc, time, usage, n FROM last_cache('cpu') ORDER BY host, dc";
    let scanned = "SELECT host, dc, time, usage, n FROM (SELECT *, row_number() OVER \
                   (PARTITION BY host, dc ORDER BY time DESC) AS rn FROM cpu) s WHERE rn = 1 \
                   ORDER BY host, dc";
    let check = |db: &Db, when: &str| {
        let (a, b) = (table(db, cached), table(db, scanned));
        assert_eq!(a, b, "{when}");
        a
    };
    let config = |persist_on_close| Config {
        durability: Durability::None,
        background: false,
        persist_on_close,
        ..Config::with_dir(dir.path())
    };
    let db = Db::open_with(config(true)).expect("open");
    db.write_lines("main", &lines(4, 1, 3600), Precision::Second)
        .expect("write");
    check(&db, "buffer");
    // Out of order (older than the latest: no change), an overwrite of one field of the
    // latest point of h1, a new series, a newer point for h2.
    db.write_lines(
        "main",
        "cpu,host=h0,dc=dc0 usage=1 1704067200\n\
         cpu,host=h1,dc=dc1 n=-7i 1704150000\n\
         cpu,host=h9,dc=dc0 usage=9 1704070000\n\
         cpu,host=h2,dc=dc2 usage=2.5 1704200000",
        Precision::Second,
    )
    .expect("write");
    let before = check(&db, "after overwrites");
    assert!(
        before.contains("| h1   | dc1 | 2024-01-01T23:00:00Z |"),
        "{before}"
    );
    db.persist().expect("persist");
    assert_eq!(check(&db, "after persist"), before);
    db.write_lines(
        "main",
        "cpu,host=h3,dc=dc0 usage=0.25 1704300000",
        Precision::Second,
    )
    .expect("write");
    let after = check(&db, "buffer over persisted state");
    db.close().expect("close");
    let db = Db::open_with(config(false)).expect("reopen");
    assert_eq!(check(&db, "reopened (persisted state)"), after);
    db.write_lines(
        "main",
        "cpu,host=h0,dc=dc0 usage=5 1704400000",
        Precision::Second,
    )
    .expect("write");
    let last = check(&db, "more writes");
    db.close().expect("close without persisting");
    let db = Db::open_with(config(true)).expect("reopen");
    assert_eq!(check(&db, "reopened (persisted state + WAL replay)"), last);
    for bad in [
        "SELECT * FROM last_cache('nope')",
        "SELECT * FROM last_cache(1)",
    ] {
        let err = rt().block_on(db.sql(bad)).expect_err(bad);
        assert!(
            err.to_string().contains("not found") || err.to_string().contains("table name"),
            "{err}"
        );
    }
}

/// `(total, matched)` of the first `row_groups_pruned_statistics` metric in an EXPLAIN ANALYZE.
fn row_groups(explain: &str) -> (u64, u64) {
    let at = explain
        .find("row_groups_pruned_statistics=")
        .unwrap_or_else(|| panic!("no row group metric in {explain}"));
    let rest = &explain[at + "row_groups_pruned_statistics=".len()..];
    let numbers: Vec<u64> = rest
        .split(|c: char| !c.is_ascii_digit())
        .filter(|s| !s.is_empty())
        .take(2)
        .map(|s| s.parse().expect("number"))
        .collect();
    (numbers[0], numbers[1])
}

#[test]
fn a_tag_filter_prunes_row_groups_of_a_segment() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    // 4 hosts × 40,000 points: one segment of three 65,536-row row groups, sorted by host.
    let mut text = String::new();
    for h in 0..4 {
        for t in 0..40_000 {
            text.push_str(&format!("cpu,host=h{h} v={t}i {}\n", 1_704_067_200 + t));
        }
    }
    db.write_lines("main", &text, Precision::Second)
        .expect("write");
    db.persist().expect("persist");
    assert_eq!(db.stats().segments, 1);
    let explain = table(
        &db,
        "EXPLAIN ANALYZE SELECT count(*), sum(v) FROM cpu WHERE host = 'h3'",
    );
    let (total, matched) = row_groups(&explain);
    assert_eq!(total, 3, "{explain}");
    assert!(
        matched < total,
        "host = 'h3' should skip row groups: {explain}"
    );
    assert_eq!(
        table(
            &db,
            "SELECT count(*) AS n, sum(v) AS s FROM cpu WHERE host = 'h3'"
        ),
        table(&db, "SELECT 40000 AS n, 799980000 AS s")
    );
}
