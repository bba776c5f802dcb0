//! Segments: persistence, restart equivalence, pruning, overwrites across buffer, segments and
//! compaction, retention, and reading a table directory with plain DataFusion.

use std::path::Path;
use std::time::Duration;

use crate::common::{rt, table};
use arrow::util::pretty::pretty_format_batches;
use rivulet::{Config, Db, Durability, Precision};

const DAY: i64 = 86_400;

/// A database that only persists and compacts when told to.
fn open(dir: &Path) -> Db {
    Db::open_with(Config {
        durability: Durability::None,
        background: false,
        ..Config::with_dir(dir)
    })
    .expect("open")
}

/// [`open`] without the hot-segment cache: queries read the segment files.
fn open_cold(dir: &Path) -> Db {
    Db::open_with(Config {
        durability: Durability::None,
        background: false,
        hot_cache_bytes: 0,
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
    let table_dir = table_dir(dir.path(), "main", "cpu");
    let mut entries: Vec<String> = std::fs::read_dir(&table_dir)
        .expect("table dir")
        .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        [
            "_table.json",
            "partition=2024-01-01",
            "partition=2024-01-02"
        ]
    );
    assert_eq!(wal_files(dir.path()), 0);
}

#[test]
fn a_one_hour_query_opens_only_segments_of_that_hour() {
    let dir = tempfile::tempdir().expect("tempdir");
    // The files themselves are scanned (not the hot-segment cache): their pruning is shown.
    let db = open_cold(dir.path());
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
    let path = table_dir(dir.path(), "main", "cpu");
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
    assert_eq!(
        parquet_files(&table_dir(dir.path(), "main", "cpu")).len(),
        2,
        "dropped segment files are deleted"
    );
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
    let partition = table_dir(dir.path(), "main", "cpu").join("partition=2024-01-01");
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
    let db = open_cold(dir.path());
    // 4 hosts × 40,000 points: one segment of three 65,536-row row groups, sorted by host.
    db.write_lines("main", &crate::common::host_runs(), Precision::Second)
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

/// The directory of table `table` of database `db`, found the way another engine would: by
/// the `_table.json` that names it.
fn table_dir(data: &Path, db: &str, table: &str) -> std::path::PathBuf {
    for database in std::fs::read_dir(data.join("tables")).expect("tables") {
        for dir in std::fs::read_dir(database.expect("entry").path()).expect("database dir") {
            let dir = dir.expect("entry").path();
            let Ok(text) = std::fs::read_to_string(dir.join("_table.json")) else {
                continue;
            };
            let meta: serde_json::Value = serde_json::from_str(&text).expect("_table.json");
            if meta["database"] == db && meta["table"] == table {
                return dir;
            }
        }
    }
    panic!("no _table.json names {db}.{table} under {}", data.display());
}

/// Segment files under `dir`, recursively.
fn parquet_files(dir: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("dir") {
            let p = e.expect("entry").path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == "parquet") {
                out.push(p);
            }
        }
    }
    out.sort();
    out
}

/// A SQL identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A line protocol measurement.
fn lp_measurement(name: &str) -> String {
    name.replace(',', "\\,").replace(' ', "\\ ")
}

/// A line protocol tag key, tag value or field key.
fn lp_key(name: &str) -> String {
    name.replace(',', "\\,")
        .replace('=', "\\=")
        .replace(' ', "\\ ")
}

/// Table (and tag, and field) names line protocol allows that a naive path scheme would
/// break on: separators, escapes, dots, case twins, normalization twins, scripts, reserved
/// Windows names, long names.
fn awkward_names() -> Vec<String> {
    let mut names: Vec<String> = [
        "my meas",
        "a,b",
        "k=v",
        "q\"uo'te",
        "50%off",
        "%41",
        "a/b",
        "..",
        "../x",
        ".hidden",
        "🔥📈",
        "e\u{301}",
        "\u{e9}",
        "שלום עולם",
        "مرحبا",
        "日本",
        "température",
        "cpu",
        "CPU",
        "CON",
        "nul",
        "trailing.",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    names.push("x".repeat(200));
    names.push("日".repeat(66)); // 198 bytes
    names
}

#[test]
fn any_utf8_names_survive_persist_compaction_reopen_views_subscriptions_and_retention() {
    use futures::StreamExt;

    let root = tempfile::tempdir().expect("tempdir");
    // The directory's own path may hold anything too.
    let dir = root.path().join("data dir 100% é %41 [x]");
    // 2024-01-06T00:00:00Z.
    let clock = std::sync::Arc::new(rivulet::ManualClock::new(
        (1_704_067_200 + 5 * DAY) * 1_000_000_000,
    ));
    let config = || Config {
        durability: Durability::None,
        background: false,
        clock: clock.clone(),
        ..Config::with_dir(&dir)
    };
    let names = awkward_names();
    let (day1, day4) = (1_704_067_200, 1_704_067_200 + 3 * DAY);
    let write = |db: &Db, db_name: &str, name: &str, t: i64, v: i64| {
        let line = format!(
            "{m},{k}={tv} {f}={v}i {t}",
            m = lp_measurement(name),
            k = lp_key(name),
            tv = lp_key(name),
            f = lp_key(&format!("{name} v")),
        );
        db.write_lines(db_name, &line, Precision::Second)
            .unwrap_or_else(|e| panic!("writing {name:?}: {e}"));
    };
    let select = |name: &str| {
        format!(
            "SELECT {k} AS k, time, {f} AS v FROM {t} ORDER BY time",
            k = ident(name),
            f = ident(&format!("{name} v")),
            t = ident(name),
        )
    };
    let rt = rt();
    let db = Db::open_with(config()).expect("open");
    // Two segments of day 1 (compacted into one below) and one of day 4, per table; the
    // `cpu` table of a second database `Main` beside `main`.
    for (i, name) in names.iter().enumerate() {
        write(&db, "main", name, day1, i as i64);
    }
    write(&db, "Main", "cpu", day1, 1000);
    db.persist().expect("persist");
    for (i, name) in names.iter().enumerate() {
        write(&db, "main", name, day1 + 60, 100 + i as i64);
        write(&db, "main", name, day4, 200 + i as i64);
    }
    db.persist().expect("persist");
    let expected: Vec<String> = names.iter().map(|n| table(&db, &select(n))).collect();
    for (i, (name, out)) in names.iter().zip(&expected).enumerate() {
        assert_eq!(
            out.matches(&format!("| {}", 100 + i)).count(),
            1,
            "{name:?}: {out}"
        );
        assert!(out.contains(&format!("| {}", 200 + i)), "{name:?}: {out}");
    }
    // A view over each table, keyed by its tag, and a subscription to each table.
    for (i, name) in names.iter().enumerate() {
        rt.block_on(db.sql(&format!(
            "CREATE MATERIALIZED VIEW v{i} AS SELECT date_bin(INTERVAL '1 day', time) AS time, {k}, sum({f}) AS total FROM {t} GROUP BY 1, 2",
            k = ident(name),
            f = ident(&format!("{name} v")),
            t = ident(name),
        )))
        .unwrap_or_else(|e| panic!("view over {name:?}: {e}"));
    }
    let mut subs = Vec::new();
    for name in &names {
        let sql = format!(
            "SELECT time, {k}, {f} FROM {t} WHERE {f} >= 300",
            k = ident(name),
            f = ident(&format!("{name} v")),
            t = ident(name),
        );
        subs.push(
            rt.block_on(db.subscribe(&sql, rivulet::SubscribeOptions::default()))
                .unwrap_or_else(|e| panic!("subscribing to {name:?}: {e}")),
        );
    }
    for (i, name) in names.iter().enumerate() {
        write(&db, "main", name, day4 + 60, 300 + i as i64);
    }
    for (i, (name, sub)) in names.iter().zip(&mut subs).enumerate() {
        let rows: usize = rt.block_on(async {
            let mut seen = 0;
            while seen == 0 {
                let m = tokio::time::timeout(Duration::from_secs(30), sub.next())
                    .await
                    .unwrap_or_else(|_| panic!("no change for {name:?}"))
                    .expect("open")
                    .expect("message");
                if m.kind == rivulet::ChangeKind::Change {
                    let text = pretty_format_batches(std::slice::from_ref(&m.rows))
                        .expect("fmt")
                        .to_string();
                    assert!(
                        text.contains(&format!("| {} ", 300 + i)),
                        "{name:?}: {text}"
                    );
                    seen = m.rows.num_rows();
                }
            }
            seen
        });
        assert_eq!(rows, 1, "{name:?}");
    }
    drop(subs);
    let expected: Vec<String> = names.iter().map(|n| table(&db, &select(n))).collect();
    let views: Vec<String> = (0..names.len())
        .map(|i| table(&db, &format!("SELECT * FROM v{i} ORDER BY time")))
        .collect();
    let report = db.compact().expect("compact");
    assert!(report.partitions >= names.len(), "{report:?}");
    assert_eq!(
        names
            .iter()
            .map(|n| table(&db, &select(n)))
            .collect::<Vec<_>>(),
        expected
    );
    db.close().expect("close");

    // Reopened: the same rows, the same views; every path under tables/ is made of ids.
    let db = Db::open_with(config()).expect("reopen");
    assert_eq!(
        names
            .iter()
            .map(|n| table(&db, &select(n)))
            .collect::<Vec<_>>(),
        expected
    );
    let reopened: Vec<String> = (0..names.len())
        .map(|i| table(&db, &format!("SELECT * FROM v{i} ORDER BY time")))
        .collect();
    assert_eq!(reopened, views);
    assert!(table(&db, "SELECT * FROM \"Main\".cpu").contains("| 1000 "));
    for file in parquet_files(&dir.join("tables")) {
        let rel = file.strip_prefix(dir.join("tables")).expect("under tables");
        for part in rel.iter() {
            let part = part.to_str().expect("ascii");
            assert!(
                part.bytes().all(|b| b.is_ascii_hexdigit()
                    || b"=-.".contains(&b)
                    || b.is_ascii_alphanumeric())
                    && (part.starts_with("partition=") || part.len() == 16 || part.len() == 24),
                "{rel:?}"
            );
        }
    }
    for name in &names {
        let meta = table_dir(&dir, "main", name).join("_table.json");
        assert!(meta.exists(), "{name:?}");
    }

    // Retention drops the day-1 partitions of every table (now Jan 6, keep 3 days).
    for name in &names {
        table(
            &db,
            &format!("ALTER TABLE {} SET (retention = '3d')", ident(name)),
        );
    }
    assert_eq!(db.apply_retention().expect("retention"), names.len());
    for (i, name) in names.iter().enumerate() {
        let out = table(&db, &select(name));
        assert!(!out.contains("2024-01-01"), "{name:?}: {out}");
        assert!(out.contains(&format!("| {}", 200 + i)), "{name:?}: {out}");
    }
    db.close().expect("close");
    let db = Db::open_with(config()).expect("reopen");
    for name in &names {
        let files = parquet_files(&table_dir(&dir, "main", name));
        assert!(!files.is_empty(), "{name:?}");
        assert!(
            files
                .iter()
                .all(|f| f.to_string_lossy().contains("/partition=2024-01-04/")),
            "{name:?}: {files:?}"
        );
    }
    db.close().expect("close");
}

/// Unpacks `tests/fixtures/layout-v1.tar.gz` (written by the build before id-based paths; see
/// tests/fixtures/README.md) into `into`; returns the data directory.
fn layout_v1_fixture(into: &Path) -> std::path::PathBuf {
    let file = std::fs::File::open(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/layout-v1.tar.gz"),
    )
    .expect("fixture");
    tar::Archive::new(flate2::read::GzDecoder::new(file))
        .unpack(into)
        .expect("unpack");
    into.join("layout-v1")
}

/// What the layout-1 fixture holds, query by query (database, SQL, a cell every answer has).
const LAYOUT_V1_QUERIES: &[(&str, &str, &str)] = &[
    (
        "main",
        "SELECT host, time, usage FROM cpu ORDER BY time",
        "| a    | 2024-01-02T00:00:00Z | 3.0   |",
    ),
    (
        "main",
        "SELECT host, usage FROM \"CPU\"",
        "| A    | 10.0  |",
    ),
    ("main", "SELECT lieu, v FROM \"my meas\"", "| x    | 1.0 |"),
    (
        "main",
        "SELECT lieu, v FROM \"température\"",
        "| paris | 21.5 |",
    ),
    (
        "main",
        "SELECT \"都市\", \"温度\" FROM \"日本\"",
        "| 東京 | 8.5  |",
    ),
    (
        "main",
        "SELECT \"t%ag\", \"f%ield\" FROM \"a,b=c\"\"d'e%f/..g\"",
        "| 1    | 1      |",
    ),
    (
        "main",
        "SELECT time, host, total FROM cpu_1d ORDER BY time, host",
        "| 2024-01-02T00:00:00Z | a    | 3.0   |",
    ),
    ("other", "SELECT host, usage FROM cpu", "| z    | 7.0   |"),
];

fn answer_layout_v1_queries(db: &Db) {
    for (database, sql, cell) in LAYOUT_V1_QUERIES {
        let batches = rt().block_on(db.sql_in(database, sql)).expect(sql);
        let out = pretty_format_batches(&batches).expect("format").to_string();
        assert!(out.contains(cell), "{sql}: {out}");
    }
}

#[test]
fn a_layout_1_directory_is_moved_to_id_paths_on_open() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = layout_v1_fixture(tmp.path());
    assert!(dir.join("tables/main/temp%C3%A9rature").exists());
    let db = open(&dir);
    answer_layout_v1_queries(&db);
    // The old name-based directories are gone; each table's files are under its ids, named by
    // its `_table.json`.
    assert!(!dir.join("tables/main").exists());
    assert!(!dir.join("tables/other").exists());
    let cpu = table_dir(&dir, "main", "cpu");
    assert_eq!(parquet_files(&cpu).len(), 2);
    let meta: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(cpu.join("_table.json")).expect("read"))
            .expect("json");
    assert_eq!(meta["layout"], 2);
    assert_eq!(meta["sort_key"], serde_json::json!(["host"]));
    assert_eq!(parquet_files(&table_dir(&dir, "main", "日本")).len(), 1);
    assert_eq!(parquet_files(&table_dir(&dir, "main", "cpu_1d")).len(), 2);
    // New writes land beside the moved segments, and the view keeps up, across a restart.
    db.write_lines("main", "cpu,host=a usage=4 1704153660", Precision::Second)
        .expect("write");
    db.persist().expect("persist");
    let day2 = "SELECT total FROM cpu_1d WHERE host = 'a' AND time = '2024-01-02T00:00:00Z'";
    assert!(table(&db, day2).contains("| 7.0 "));
    db.close().expect("close");
    let db = open(&dir);
    assert!(table(&db, day2).contains("| 7.0 "));
    assert_eq!(parquet_files(&table_dir(&dir, "main", "cpu")).len(), 3);
    db.close().expect("close");
}

#[test]
fn an_interrupted_layout_migration_finishes_on_the_next_open() {
    // Where each segment file ends up (segment ids are unique: the file name says which).
    let done = tempfile::tempdir().expect("tempdir");
    let migrated = layout_v1_fixture(done.path());
    open(&migrated).close().expect("close");
    let target: std::collections::HashMap<String, std::path::PathBuf> =
        parquet_files(&migrated.join("tables"))
            .into_iter()
            .map(|p| {
                let name = p.file_name().expect("name").to_string_lossy().into_owned();
                (name, p.strip_prefix(&migrated).expect("rel").to_path_buf())
            })
            .collect();
    // A crash after moving some files (every other one), and after moving all of them but
    // before the manifest commit: both states open and answer as before.
    for every in [2, 1] {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = layout_v1_fixture(tmp.path());
        for (i, file) in parquet_files(&dir.join("tables")).into_iter().enumerate() {
            if i % every != 0 {
                continue;
            }
            let name = file
                .file_name()
                .expect("name")
                .to_string_lossy()
                .into_owned();
            let to = dir.join(&target[&name]);
            std::fs::create_dir_all(to.parent().expect("parent")).expect("mkdir");
            std::fs::rename(&file, &to).expect("move");
        }
        let db = open(&dir);
        answer_layout_v1_queries(&db);
        db.close().expect("close");
        assert_eq!(parquet_files(&dir.join("tables")).len(), target.len());
    }
}

#[test]
fn a_newer_layout_is_refused_with_its_version() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = open(dir.path());
        db.write_lines("main", "cpu,host=a usage=1 1", Precision::Second)
            .expect("write");
        db.close().expect("close");
    }
    {
        let sled = sled::open(dir.path().join("catalog")).expect("sled");
        sled.open_tree("manifest")
            .expect("tree")
            .insert("meta/layout", "3")
            .expect("insert");
        sled.flush().expect("flush");
    }
    let err = Db::open_with(Config {
        background: false,
        ..Config::with_dir(dir.path())
    })
    .expect_err("layout 3");
    assert!(err.to_string().contains("layout version 3"), "{err}");
}

#[test]
fn cli_write_then_sql_reads_tables_named_in_any_script() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("d");
    let bin = env!("CARGO_BIN_EXE_rivulet");
    let run = |args: &[&str], stdin: &str| {
        use std::io::Write;
        let mut child = std::process::Command::new(bin)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .expect("spawn");
        child
            .stdin
            .take()
            .expect("stdin")
            .write_all(stdin.as_bytes())
            .expect("write stdin");
        let out = child.wait_with_output().expect("wait");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "{args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        text
    };
    let d = data.to_str().expect("utf-8");
    run(
        &["write", "--data-dir", d, "-"],
        "température,lieu=a v=1 1\nmy\\ meas,lieu=b v=2 2\n日本,lieu=c v=3 3\ncpu,lieu=d v=4 4\nCPU,lieu=e v=5 5\n",
    );
    for (table, lieu) in [
        ("température", "a"),
        ("my meas", "b"),
        ("日本", "c"),
        ("cpu", "d"),
        ("CPU", "e"),
    ] {
        let out = run(
            &[
                "sql",
                "--data-dir",
                d,
                &format!("SELECT lieu, v FROM {}", ident(table)),
            ],
            "",
        );
        assert!(out.contains(&format!("| {lieu}    |")), "{table}: {out}");
    }
}

/// Fails storage I/O call `target` (1-based; 0: none) and counts them all.
#[derive(Debug)]
struct FailCall {
    target: u64,
    calls: std::sync::atomic::AtomicU64,
}

impl rivulet::IoFaults for FailCall {
    fn before(&self, _op: rivulet::IoOp, _path: &Path) -> std::io::Result<()> {
        let n = self.calls.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
        if n == self.target {
            return Err(std::io::Error::from_raw_os_error(5));
        }
        Ok(())
    }
}

#[test]
fn every_storage_io_call_of_the_layout_migration_can_fail_and_the_next_open_finishes_it() {
    // The fault sweep over the layout-1 → 2 migration: opening the fixture with call N
    // failing (EIO), for every N the clean migration makes; the next open, without faults,
    // finishes the move and answers every query of the fixture.
    let open_with = |dir: &Path, target: u64| {
        let faults = std::sync::Arc::new(FailCall {
            target,
            calls: std::sync::atomic::AtomicU64::new(0),
        });
        let db = Db::open_with(Config {
            durability: Durability::None,
            background: false,
            io_faults: Some(faults.clone()),
            ..Config::with_dir(dir)
        });
        (db, faults)
    };
    let tmp = tempfile::tempdir().expect("tempdir");
    let dir = layout_v1_fixture(tmp.path());
    let (db, counted) = open_with(&dir, 0);
    let db = db.expect("clean migration");
    let total = counted.calls.load(std::sync::atomic::Ordering::SeqCst);
    db.close().expect("close");
    assert!(total > 5, "the migration made only {total} storage calls");
    for target in 1..=total {
        let tmp = tempfile::tempdir().expect("tempdir");
        let dir = layout_v1_fixture(tmp.path());
        if let (Ok(db), _) = open_with(&dir, target) {
            let _ = db.close();
        }
        let db = open(&dir);
        answer_layout_v1_queries(&db);
        db.close()
            .unwrap_or_else(|e| panic!("call {target}: close after the finished migration: {e}"));
    }
}
