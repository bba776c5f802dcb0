//! Materialized views with storage: tiered retention (raw data expires, the rollup stays),
//! views across restarts, and `Db::sync_views`.

use std::sync::Arc;

use arrow::array::AsArray;
use arrow::datatypes::Int64Type;
use rivulet::{Config, Db, Durability, ManualClock, Precision};

const DAY: i64 = 86_400_000_000_000;

fn config(dir: &std::path::Path, clock: Arc<ManualClock>) -> Config {
    Config {
        durability: Durability::None,
        background: false,
        clock,
        ..Config::with_dir(dir)
    }
}

fn count(rt: &tokio::runtime::Runtime, db: &Db, sql: &str) -> i64 {
    let b = rt.block_on(db.sql(sql)).expect(sql);
    b[0].column(0).as_primitive::<Int64Type>().value(0)
}

#[test]
fn raw_data_expires_while_the_rollup_stays() {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let clock = Arc::new(ManualClock::new(100 * DAY));
    let db = Db::open_with(config(dir.path(), clock.clone())).expect("open");
    // Days 1, 2 and 99: one point per host per hour.
    let mut lines = String::new();
    for day in [1i64, 2, 99] {
        for hour in 0..24i64 {
            for host in 0..3 {
                lines.push_str(&format!(
                    "cpu,host=h{host} usage={} {}\n",
                    hour + host,
                    day * DAY + hour * 3_600_000_000_000
                ));
            }
        }
    }
    db.write_lines("main", &lines, Precision::Nanosecond)
        .expect("write");
    rt.block_on(db.sql(
        "CREATE MATERIALIZED VIEW cpu_1d AS SELECT date_bin(INTERVAL '1 day', time) AS time, \
         host, sum(usage) AS total, count(*) AS n FROM cpu GROUP BY 1, 2",
    ))
    .expect("create");
    db.sync_views().expect("sync");
    db.persist().expect("persist");
    assert_eq!(count(&rt, &db, "SELECT count(*) FROM cpu_1d"), 9);

    // The raw table keeps 30 days; days 1 and 2 go.
    rt.block_on(db.sql("ALTER TABLE cpu SET (retention = '30d')"))
        .expect("alter");
    assert!(db.apply_retention().expect("retention") > 0);
    assert_eq!(count(&rt, &db, "SELECT count(*) FROM cpu"), 72);
    assert_eq!(count(&rt, &db, "SELECT count(*) FROM cpu_1d"), 9);

    // An overwrite in the expired range does not recompute the day from what is left.
    db.write_lines(
        "main",
        &format!("cpu,host=h0 usage=1000 {}", DAY + 3_600_000_000_000),
        Precision::Nanosecond,
    )
    .expect("late write");
    assert_eq!(
        count(
            &rt,
            &db,
            &format!("SELECT n FROM cpu_1d WHERE host = 'h0' AND time = to_timestamp_nanos({DAY})")
        ),
        24
    );

    // Restart: the view and its rows are still there, and it is maintained.
    db.close().expect("close");
    let db = Db::open_with(config(dir.path(), clock)).expect("reopen");
    assert_eq!(count(&rt, &db, "SELECT count(*) FROM cpu_1d"), 9);
    db.write_lines(
        "main",
        &format!("cpu,host=h9 usage=1 {}", 99 * DAY),
        Precision::Nanosecond,
    )
    .expect("write after reopen");
    assert_eq!(count(&rt, &db, "SELECT count(*) FROM cpu_1d"), 10);
    let status = rt
        .block_on(db.sql("SELECT strategy, last_error FROM system.views"))
        .expect("system.views");
    let text = arrow::util::pretty::pretty_format_batches(&status)
        .expect("format")
        .to_string();
    assert!(text.contains("aggregate-state"), "{text}");

    // The view's own retention (a table setting of the view) drops its old days too.
    rt.block_on(db.sql("ALTER TABLE cpu_1d SET (retention = '30d')"))
        .expect("alter view");
    db.persist().expect("persist");
    assert!(db.apply_retention().expect("retention") > 0);
    assert_eq!(count(&rt, &db, "SELECT count(*) FROM cpu_1d"), 4);
    db.close().expect("close");
}

#[test]
fn close_right_after_create_lets_the_backfill_finish() {
    // Close used to refuse the view's own writes ("the database is closed") while it waited for
    // the view to catch up, so it sat out the whole wait and closed without the view's rows.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open_with(Config {
        view_wait: std::time::Duration::from_secs(5),
        ..config(dir.path(), Arc::new(ManualClock::new(100 * DAY)))
    })
    .expect("open");
    let mut lines = String::new();
    for i in 0..20_000i64 {
        lines.push_str(&format!(
            "cpu,host=h{} usage={} {}\n",
            i % 50,
            i % 7,
            DAY + i
        ));
    }
    db.write_lines("main", &lines, Precision::Nanosecond)
        .expect("write");
    rt.block_on(
        db.sql(
            "CREATE MATERIALIZED VIEW hot AS SELECT time, host, usage FROM cpu WHERE usage >= 3",
        ),
    )
    .expect("create");
    db.close().expect("close");
    // The view's rows are in its segments: read them without Rivulet, as another engine would.
    let mut view_dir = None;
    for database in std::fs::read_dir(dir.path().join("tables")).expect("tables") {
        for table in std::fs::read_dir(database.expect("entry").path()).expect("dir") {
            let path = table.expect("entry").path();
            let meta: serde_json::Value = serde_json::from_str(
                &std::fs::read_to_string(path.join("_table.json")).expect("_table.json"),
            )
            .expect("json");
            if meta["table"] == "hot" {
                assert_eq!(meta["view"], true);
                view_dir = Some(path);
            }
        }
    }
    let view_dir = view_dir.expect("the view's table directory");
    let rows = rt.block_on(async {
        let ctx = datafusion::prelude::SessionContext::new();
        ctx.register_parquet(
            "hot",
            view_dir.to_str().expect("utf-8"),
            datafusion::prelude::ParquetReadOptions::default(),
        )
        .await
        .expect("register");
        let b = ctx
            .sql("SELECT count(*) FROM hot")
            .await
            .expect("plan")
            .collect()
            .await
            .expect("run");
        b[0].column(0).as_primitive::<Int64Type>().value(0)
    });
    let expected = (0..20_000i64).filter(|i| i % 7 >= 3).count() as i64;
    assert_eq!(rows, expected);
}

#[test]
fn a_backfill_over_decades_of_sparse_data_visits_only_what_holds_rows() {
    // Points 40 years apart, persisted and buffered: the backfill computes the few pieces
    // that hold rows (it used to run one query per day in between) and equals its recompute.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let db =
        Db::open_with(config(dir.path(), Arc::new(ManualClock::new(100 * DAY)))).expect("open");
    let year = 365 * 86_400;
    db.write_lines(
        "main",
        "cpu,host=a usage=1 0\ncpu,host=b usage=2 60",
        Precision::Second,
    )
    .expect("write");
    db.persist().expect("persist");
    db.write_lines(
        "main",
        &format!(
            "cpu,host=a usage=3 {}\ncpu,host=a usage=4 {}",
            20 * year,
            40 * year
        ),
        Precision::Second,
    )
    .expect("write");
    rt.block_on(db.sql(
        "CREATE MATERIALIZED VIEW daily AS SELECT date_bin(INTERVAL '1 day', time) AS time, \
         host, sum(usage) AS total FROM cpu GROUP BY 1, 2",
    ))
    .expect("create");
    db.sync_views().expect("sync");
    assert_eq!(count(&rt, &db, "SELECT count(*) FROM daily"), 4);
    let check = rt
        .block_on(db.sql("CHECK MATERIALIZED VIEW daily"))
        .expect("check");
    let text = arrow::util::pretty::pretty_format_batches(&check)
        .expect("format")
        .to_string();
    assert!(text.contains("| ok "), "{text}");
    db.close().expect("close");
}

#[test]
fn a_backfill_in_slices_between_rounds_equals_its_recompute_with_writes_landing_meanwhile() {
    // One piece per round (slice 0): the backfill spans many rounds, and writes land in
    // pieces already done, pieces still to do and new ones. The view ends equal to its
    // recompute, and another view is maintained between the slices.
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let hour = 3_600_000_000_000i64;
    let db = Db::open_with(Config {
        partition: std::time::Duration::from_secs(3600),
        view_backfill_slice: std::time::Duration::ZERO,
        ..config(dir.path(), Arc::new(ManualClock::new(100 * DAY)))
    })
    .expect("open");
    let mut lines = String::new();
    for h in 0..120i64 {
        for host in 0..3 {
            lines.push_str(&format!(
                "cpu,host=h{host} usage={} {}\n",
                h + host,
                h * hour
            ));
        }
    }
    db.write_lines("main", &lines, Precision::Nanosecond)
        .expect("write");
    db.persist().expect("persist");
    db.write_lines("main", "mem,host=a used=1 0", Precision::Nanosecond)
        .expect("write mem");
    rt.block_on(db.sql(
        "CREATE MATERIALIZED VIEW mem_hourly AS SELECT date_bin(INTERVAL '1 hour', time) AS time, \
         count(*) AS n FROM mem GROUP BY 1",
    ))
    .expect("create mem view");
    db.sync_views().expect("sync");
    rt.block_on(db.sql(
        "CREATE MATERIALIZED VIEW hourly AS SELECT date_bin(INTERVAL '1 hour', time) AS time, \
         host, sum(usage) AS total, count(*) AS n FROM cpu GROUP BY 1, 2",
    ))
    .expect("create");
    let mut seen_under_way = false;
    for i in 0..30i64 {
        let at = [i * 4 * hour, (119 - i) * hour, (150 + i) * hour];
        let mut batch = String::new();
        for t in at {
            batch.push_str(&format!("cpu,host=h9 usage={i} {}\n", t + i));
        }
        db.write_lines("main", &batch, Precision::Nanosecond)
            .expect("write during the backfill");
        db.write_lines(
            "main",
            &format!("mem,host=a used=1 {}", i * hour),
            Precision::Nanosecond,
        )
        .expect("write mem");
        let progress = rt
            .block_on(db.sql("SELECT backfill FROM system.views WHERE name = 'hourly'"))
            .expect("progress");
        seen_under_way |= progress[0].column(0).null_count() == 0;
    }
    db.sync_views().expect("sync");
    assert!(
        seen_under_way,
        "the backfill finished before any write: nothing was sliced"
    );
    for view in ["hourly", "mem_hourly"] {
        let check = rt
            .block_on(db.sql(&format!("CHECK MATERIALIZED VIEW {view}")))
            .expect("check");
        let text = arrow::util::pretty::pretty_format_batches(&check)
            .expect("format")
            .to_string();
        assert!(text.contains("| ok "), "{view}: {text}");
    }
    assert_eq!(
        count(&rt, &db, "SELECT count(*) FROM hourly"),
        count(
            &rt,
            &db,
            "SELECT count(*) FROM (SELECT date_bin(INTERVAL '1 hour', time), host FROM cpu GROUP BY 1, 2)"
        )
    );
    db.close().expect("close");
}
