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
