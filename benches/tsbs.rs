//! TSBS-style queries over persisted segments: 1000 hosts × 8640 points (one day at 10 s,
//! 8.64M rows, 86.4M field values).
//!
//! `RIVULET_TSBS_DIR=/path cargo bench --bench tsbs` reads a data directory loaded with
//! `rivulet write --data-dir /path cpu.lp` (the file from `../shared/bench/gen_cpu.py --hosts
//! 1000 --points-per-host 8640`); without it the bench generates the same shape of data
//! in-process into a temporary directory first (a minute or two). Queries follow
//! `../shared/bench/queries.py`.

#[path = "common/tsbs.rs"]
mod tsbs;

use criterion::{Criterion, criterion_group, criterion_main};
use rivulet::{Config, Db, Durability, Precision};

const HOSTS: usize = 1000;
const POINTS: usize = 8640;

fn ts(offset_s: i64) -> String {
    let ns = tsbs::START_NS + offset_s * 1_000_000_000;
    format!("to_timestamp_nanos({ns})")
}

/// Opens the data set read-only in effect: no background work, no persist on close, so the
/// segments measured are the ones `rivulet write` left.
fn open_dir(dir: &std::path::Path, pushdown: bool) -> Db {
    Db::open_with(Config {
        persist_on_close: false,
        background: false,
        parquet_filter_pushdown: pushdown,
        ..Config::with_dir(dir)
    })
    .expect("open the TSBS data directory")
}

fn open() -> (std::path::PathBuf, Option<tempfile::TempDir>) {
    if let Some(dir) = std::env::var_os("RIVULET_TSBS_DIR") {
        return (dir.into(), None);
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open_with(Config {
        durability: Durability::None,
        ..Config::with_dir(dir.path())
    })
    .expect("open");
    let mut rng = tsbs::Rng::new(7);
    let per_write = HOSTS * 10;
    for chunk in 0..HOSTS * POINTS / per_write {
        let text = tsbs::lines(HOSTS, chunk * per_write, per_write, &mut rng);
        db.write_lines("main", &text, Precision::Nanosecond)
            .expect("load");
    }
    db.persist().expect("persist");
    db.close().expect("close");
    (dir.path().to_path_buf(), Some(dir))
}

fn queries(c: &mut Criterion) {
    let (path, _dir) = open();
    for pushdown in [false, true] {
        let db = open_dir(&path, pushdown);
        run(c, &db, if pushdown { "tsbs-pushdown" } else { "tsbs" });
        db.close().expect("close");
    }
}

fn run(c: &mut Criterion, db: &Db, group: &str) {
    let stats = db.stats();
    let values = (stats.segment_rows + stats.buffer_rows as u64) * 10;
    eprintln!(
        "tsbs: {} rows in {} segments, {} segment bytes = {:.3} bytes per field value",
        stats.segment_rows,
        stats.segments,
        stats.segment_bytes,
        stats.segment_bytes as f64 / values.max(1) as f64
    );
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .build()
        .expect("runtime");
    let queries = [
        (
            "single-groupby-1-1-1",
            format!(
                "SELECT date_bin(INTERVAL '1 minute', time) AS t, max(usage_user) FROM cpu \
                 WHERE hostname = 'host_7' AND time >= {} AND time < {} GROUP BY 1 ORDER BY 1",
                ts(3 * 3600),
                ts(4 * 3600)
            ),
        ),
        (
            "double-groupby-1",
            format!(
                "SELECT hostname, date_bin(INTERVAL '1 hour', time) AS t, avg(usage_user) FROM cpu \
                 WHERE time >= {} AND time < {} GROUP BY 1, 2 ORDER BY 1, 2",
                ts(6 * 3600),
                ts(18 * 3600)
            ),
        ),
        (
            "high-cpu-1",
            format!(
                "SELECT * FROM cpu WHERE usage_user > 90 AND hostname = 'host_7' \
                 AND time >= {} AND time < {} ORDER BY time",
                ts(6 * 3600),
                ts(18 * 3600)
            ),
        ),
        (
            "high-cpu-all",
            format!(
                "SELECT * FROM cpu WHERE usage_user > 90 \
                 AND time >= {} AND time < {} ORDER BY hostname, time",
                ts(6 * 3600),
                ts(18 * 3600)
            ),
        ),
        (
            // Answered from the last-point state (Config::query_rewrites).
            "lastpoint",
            "SELECT hostname, time, usage_user FROM (SELECT hostname, time, usage_user, \
             row_number() OVER (PARTITION BY hostname ORDER BY time DESC) AS rn FROM cpu) s \
             WHERE rn = 1 ORDER BY hostname"
                .to_string(),
        ),
        (
            "lastpoint-last_cache",
            "SELECT hostname, time, usage_user FROM last_cache('cpu') ORDER BY hostname"
                .to_string(),
        ),
        (
            "groupby-orderby-limit",
            format!(
                "SELECT date_bin(INTERVAL '1 minute', time) AS t, max(usage_user) FROM cpu \
                 WHERE time < {} GROUP BY 1 ORDER BY 1 DESC LIMIT 5",
                ts(20 * 3600)
            ),
        ),
    ];
    let mut g = c.benchmark_group(group);
    g.sample_size(10);
    for (name, sql) in &queries {
        let rows: usize = rt
            .block_on(db.sql(sql))
            .expect(name)
            .iter()
            .map(|b| b.num_rows())
            .sum();
        eprintln!("{group}/{name}: {rows} rows");
        g.bench_function(*name, |b| {
            b.iter(|| rt.block_on(db.sql(sql)).expect("query"))
        });
    }
    g.finish();
}

criterion_group!(benches, queries);
criterion_main!(benches);
