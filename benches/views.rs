//! Materialized-view maintenance benchmarks.
//!
//! `cargo bench --bench views` —
//! - `views/update_per_batch/<strategy>/<history>`: one 10,000-row batch (1,000 hosts × 10
//!   timestamps, after the history) written and applied to one view, over a table holding 1M
//!   or 10M rows of history (`RIVULET_VIEWS_HISTORY=1000000,50000000` sets the sizes, `none`
//!   skips the group); the cost per batch should not grow with the history.
//! - `views/ingest/<n>_views`: rows/s of TSBS line protocol (10 tags, 10 fields, durability
//!   `sync`) in 10,000-row writes with 0, 1 and 10 views, each iteration ending when every view
//!   has applied its writes.
//! - then prints write-acknowledged → visible-in-view latency percentiles (p50/p99) for the
//!   aggregate view, measured over 300 writes.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, DictionaryArray, Float64Array, RecordBatch, TimestampNanosecondArray,
};
use arrow::datatypes::Int32Type;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rivulet::{Config, Db, Durability, Precision};

#[path = "common/tsbs.rs"]
mod tsbs;

const HOSTS: usize = 1000;
const STEPS_PER_BATCH: usize = 10;
const BATCH: usize = HOSTS * STEPS_PER_BATCH;
const INTERVAL_NS: i64 = 10_000_000_000;

/// Rows for timestamps `step..step + steps`, every host at each (TSBS-like, in time order).
fn batch(step: usize, steps: usize) -> RecordBatch {
    let n = HOSTS * steps;
    let names: Vec<String> = (0..HOSTS).map(|h| format!("host_{h}")).collect();
    let hosts: DictionaryArray<Int32Type> = (0..n).map(|i| names[i % HOSTS].as_str()).collect();
    let times = TimestampNanosecondArray::from(
        (0..n)
            .map(|i| (step + i / HOSTS) as i64 * INTERVAL_NS)
            .collect::<Vec<_>>(),
    )
    .with_timezone("UTC");
    let usage: Float64Array = (0..n)
        .map(|i| Some(((i * 7919 + step * 31) % 1000) as f64 / 10.0))
        .collect();
    RecordBatch::try_from_iter(vec![
        ("hostname", Arc::new(hosts) as ArrayRef),
        ("time", Arc::new(times)),
        ("usage_user", Arc::new(usage)),
    ])
    .expect("batch")
}

const PROJECTION: &str = "SELECT time, hostname, usage_user FROM cpu WHERE usage_user > 90";
const AGGREGATE: &str = "SELECT date_bin(INTERVAL '1 minute', time) AS time, hostname, \
     avg(usage_user) AS avg_user, max(usage_user) AS max_user, count(*) AS n FROM cpu GROUP BY 1, 2";
const DIRTY: &str = "SELECT date_bin(INTERVAL '1 minute', time) AS time, \
     count(DISTINCT hostname) AS hosts, approx_percentile_cont(0.9) WITHIN GROUP \
     (ORDER BY usage_user) AS p90 FROM cpu GROUP BY 1";

/// Ten views of the kinds a dashboard keeps, over the TSBS cpu table.
fn ten_views() -> Vec<String> {
    // A projection keeps every tag (so each row keeps its point's key).
    let tags = "hostname, region, datacenter, rack, os, arch, team, service, service_version, \
                service_environment";
    let mut v = Vec::new();
    for (i, bucket) in ["10 seconds", "1 minute", "5 minutes", "1 hour"]
        .iter()
        .enumerate()
    {
        v.push(format!(
            "SELECT date_bin(INTERVAL '{bucket}', time) AS time, hostname, avg(usage_user) AS a{i}, \
             max(usage_user) AS m{i}, count(*) AS n FROM cpu GROUP BY 1, 2"
        ));
    }
    for (i, bucket) in ["1 minute", "1 hour"].iter().enumerate() {
        v.push(format!(
            "SELECT date_bin(INTERVAL '{bucket}', time) AS time, min(usage_user) AS lo{i}, \
             max(usage_user) AS hi{i}, stddev(usage_user) AS sd{i} FROM cpu GROUP BY 1"
        ));
    }
    v.push(format!(
        "SELECT time, {tags}, usage_user FROM cpu WHERE usage_user > 90"
    ));
    v.push(format!(
        "SELECT time, {tags}, usage_system FROM cpu WHERE usage_system < 1"
    ));
    v.push(
        "SELECT date_bin(INTERVAL '1 minute', time) AS time, hostname, \
         first_value(usage_user ORDER BY time) AS f, last_value(usage_user ORDER BY time) AS l \
         FROM cpu GROUP BY 1, 2"
            .to_string(),
    );
    v.push(
        "SELECT hostname, sum(usage_user) AS total, count(*) AS n FROM cpu GROUP BY hostname"
            .to_string(),
    );
    v
}

fn open(dir: &std::path::Path) -> Db {
    open_with(dir, Durability::None)
}

fn open_with(dir: &std::path::Path, durability: Durability) -> Db {
    Db::open_with(Config {
        durability,
        // Backfills over 50M rows take longer than the default wait.
        view_wait: Duration::from_secs(3600),
        ..Config::with_dir(dir)
    })
    .expect("open")
}

/// Loads `rows` of history (then persisted to segments) and returns the next step.
fn load(db: &Db, rows: usize) -> usize {
    let steps = rows / HOSTS;
    let mut step = 0;
    while step < steps {
        let n = (steps - step).min(100);
        db.write_batch("main", "cpu", &batch(step, n))
            .expect("load");
        step += n;
    }
    db.persist().expect("persist");
    step
}

/// Waits until the views reflect every acknowledged write.
fn caught_up(_rt: &tokio::runtime::Runtime, db: &Db, _view: &str) {
    db.sync_views().expect("views catch up");
}

/// History sizes (`RIVULET_VIEWS_HISTORY`, comma-separated; `none` skips the group).
fn histories() -> Vec<usize> {
    match std::env::var("RIVULET_VIEWS_HISTORY") {
        Ok(s) if s.trim() == "none" => Vec::new(),
        Ok(s) => s.split(',').filter_map(|x| x.trim().parse().ok()).collect(),
        Err(_) => vec![1_000_000, 10_000_000],
    }
}

fn update_per_batch(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut g = c.benchmark_group("views/update_per_batch");
    g.sample_size(20);
    g.throughput(Throughput::Elements(BATCH as u64));
    for history in histories() {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open(dir.path());
        let mut step = load(&db, history);
        for (name, sql) in [
            ("projection", PROJECTION),
            ("aggregate", AGGREGATE),
            ("dirty_windows", DIRTY),
        ] {
            rt.block_on(db.sql(&format!("CREATE MATERIALIZED VIEW v_{name} AS {sql}")))
                .expect("create");
            caught_up(&rt, &db, &format!("v_{name}"));
            g.bench_function(format!("{name}/{history}"), |b| {
                b.iter_custom(|iters| {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let rows = batch(step, STEPS_PER_BATCH);
                        step += STEPS_PER_BATCH;
                        let started = Instant::now();
                        db.write_batch("main", "cpu", &rows).expect("write");
                        caught_up(&rt, &db, &format!("v_{name}"));
                        total += started.elapsed();
                    }
                    total
                })
            });
            rt.block_on(db.sql(&format!("DROP MATERIALIZED VIEW v_{name}")))
                .expect("drop");
        }
        db.close().expect("close");
    }
    g.finish();
}

/// Line protocol ingest (TSBS cpu rows, 10 tags and 10 fields, durability `sync`), 20 writes of
/// 10,000 rows per iteration, timed until every view has applied them.
fn ingest(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let mut g = c.benchmark_group("views/ingest");
    g.sample_size(10);
    const WRITES: usize = 20;
    g.throughput(Throughput::Elements((BATCH * WRITES) as u64));
    for n in [0usize, 1, 10] {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = open_with(dir.path(), Durability::Sync);
        let mut rng = tsbs::Rng::new(11);
        let mut row = 0usize;
        db.write_lines(
            "main",
            &tsbs::lines(HOSTS, row, 100_000, &mut rng),
            Precision::Nanosecond,
        )
        .expect("history");
        row += 100_000;
        let views: Vec<String> = match n {
            0 => Vec::new(),
            1 => vec![AGGREGATE.to_string()],
            _ => ten_views(),
        };
        for (i, sql) in views.iter().enumerate() {
            rt.block_on(db.sql(&format!("CREATE MATERIALIZED VIEW v{i} AS {sql}")))
                .expect("create");
        }
        db.sync_views().expect("backfill");
        g.bench_function(format!("{n}_views"), |b| {
            b.iter_custom(|iters| {
                let mut total = Duration::ZERO;
                for _ in 0..iters {
                    let texts: Vec<String> = (0..WRITES)
                        .map(|_| {
                            let t = tsbs::lines(HOSTS, row, BATCH, &mut rng);
                            row += BATCH;
                            t
                        })
                        .collect();
                    let started = Instant::now();
                    for t in &texts {
                        db.write_lines("main", t, Precision::Nanosecond)
                            .expect("write");
                    }
                    db.sync_views().expect("views catch up");
                    total += started.elapsed();
                }
                total
            })
        });
        db.close().expect("close");
    }
    g.finish();
}

/// Write acknowledged → visible in the aggregate view: one write of 1,000 rows (one timestamp
/// of every host) every 2 ms, each followed by waiting until the view has applied it.
fn latency(_c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    let first = load(&db, 100_000);
    rt.block_on(db.sql(&format!("CREATE MATERIALIZED VIEW v AS {AGGREGATE}")))
        .expect("create");
    caught_up(&rt, &db, "v");
    let mut samples = Vec::new();
    for step in first..first + 300 {
        db.write_batch("main", "cpu", &batch(step, 1))
            .expect("write");
        let acked = Instant::now();
        caught_up(&rt, &db, "v");
        samples.push(acked.elapsed());
        std::thread::sleep(Duration::from_millis(2));
    }
    samples.sort();
    let p = |q: f64| samples[((samples.len() - 1) as f64 * q) as usize];
    println!(
        "views/latency write-ack → visible in view (1,000-row writes, aggregate view): p50 {:?}, p99 {:?}, max {:?}",
        p(0.5),
        p(0.99),
        p(1.0)
    );
    db.close().expect("close");
}

criterion_group!(benches, update_per_batch, ingest, latency);
criterion_main!(benches);
