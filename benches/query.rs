//! Query benchmarks over the mutable buffer.
//!
//! `cargo bench --bench query` — group `query/scan`: 1000 hosts × 100 points (100k rows,
//! 1M field values) in memory.

#[path = "common/tsbs.rs"]
mod tsbs;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use rivulet::{Db, Precision};

const HOSTS: usize = 1000;
const POINTS: usize = 100;

fn scan(c: &mut Criterion) {
    let db = Db::open_in_memory().expect("open");
    let mut rng = tsbs::Rng::new(1);
    for chunk in 0..POINTS / 5 {
        let text = tsbs::lines(HOSTS, chunk * HOSTS * 5, HOSTS * 5, &mut rng);
        db.write_lines("main", &text, Precision::Nanosecond)
            .expect("load");
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let rows = (HOSTS * POINTS) as u64;
    let mut g = c.benchmark_group("query/scan");
    g.throughput(Throughput::Elements(rows));
    let end = tsbs::START_NS + 30 * tsbs::INTERVAL_NS;
    let queries = [
        ("count", "SELECT count(*) FROM cpu".to_string()),
        (
            "sum_by_host",
            "SELECT hostname, sum(usage_user) FROM cpu GROUP BY hostname".to_string(),
        ),
        (
            "max_by_minute_one_host",
            "SELECT date_bin(INTERVAL '1 minute', time) AS t, max(usage_user) FROM cpu WHERE hostname = 'host_7' GROUP BY 1".to_string(),
        ),
        (
            "time_range_30_of_100",
            format!("SELECT avg(usage_idle) FROM cpu WHERE time < to_timestamp_nanos({end})"),
        ),
    ];
    for (name, sql) in &queries {
        g.bench_function(*name, |b| {
            b.iter(|| rt.block_on(db.sql(sql)).expect("query"))
        });
    }
    g.finish();
}

criterion_group!(benches, scan);
criterion_main!(benches);
