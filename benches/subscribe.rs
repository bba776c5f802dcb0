//! Subscription benchmarks.
//!
//! `cargo bench --bench subscribe` —
//! - `subscribe/encode_change`: one 1,000-row change of an aggregate view turned into the JSON
//!   every transport sends (done once per change, shared by all its subscribers);
//! - then, at a sustained ingest of 100,000 rows/s (1,000-row writes every 10 ms, durability
//!   `sync`, background persistence on), with 1, 100 and 1,000 embedded subscribers to an
//!   aggregate view (`SELECT * FROM cpu_1m`, keyed) and to an alert stream over the table
//!   (`SELECT … FROM cpu WHERE usage_user > 90`, append): latency from a write's
//!   acknowledgement to the first change reflecting it at each subscriber (p50/p99/max over
//!   every write × subscriber), and change messages delivered per second.
//!
//! `RIVULET_SUB_SECS` sets the seconds of ingest per run (default 10);
//! `RIVULET_SUB_COUNTS=1,100,1000` the subscriber counts; `RIVULET_SUB_KINDS=view,alerts`
//! which subscriptions.

use std::sync::Arc;
use std::time::{Duration, Instant};

use arrow::array::{
    ArrayRef, DictionaryArray, Float64Array, RecordBatch, TimestampNanosecondArray,
};
use arrow::datatypes::Int32Type;
use criterion::{Criterion, criterion_group, criterion_main};
use futures::StreamExt;
use parking_lot::Mutex;
use rivulet::{ChangeKind, Config, Db, Durability, SubscribeOptions};

const HOSTS: usize = 1000;
const VIEW: &str = "CREATE MATERIALIZED VIEW cpu_1m AS SELECT date_bin(INTERVAL '1 minute', time) AS time, \
     hostname, avg(usage_user) AS avg_user, max(usage_user) AS max_user, count(*) AS n \
     FROM cpu GROUP BY 1, 2";
const ALERTS: &str = "SELECT time, hostname, usage_user FROM cpu WHERE usage_user > 90";

/// Every host at data time `step` seconds.
fn batch(step: usize) -> RecordBatch {
    let names: Vec<String> = (0..HOSTS).map(|h| format!("host_{h}")).collect();
    let hosts: DictionaryArray<Int32Type> = names.iter().map(|s| s.as_str()).collect();
    let times = TimestampNanosecondArray::from(vec![step as i64 * 1_000_000_000; HOSTS])
        .with_timezone("UTC");
    let usage: Float64Array = (0..HOSTS)
        .map(|i| Some(((i * 7919 + step * 31) % 1000) as f64 / 10.0))
        .collect();
    RecordBatch::try_from_iter(vec![
        ("hostname", Arc::new(hosts) as ArrayRef),
        ("time", Arc::new(times)),
        ("usage_user", Arc::new(usage)),
    ])
    .expect("batch")
}

fn open(dir: &std::path::Path) -> Db {
    Db::open_with(Config {
        durability: Durability::Sync,
        ..Config::with_dir(dir)
    })
    .expect("open")
}

fn encode_change(c: &mut Criterion) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    db.write_batch("main", "cpu", &batch(0)).expect("write");
    rt.block_on(db.sql(VIEW)).expect("create");
    let change = rt.block_on(async {
        let mut sub = db
            .subscribe("SELECT * FROM cpu_1m", SubscribeOptions::default())
            .await
            .expect("subscribe");
        loop {
            let m = sub.next().await.expect("message").expect("ok");
            if matches!(m.kind, ChangeKind::Snapshot { last: true, .. }) {
                break;
            }
        }
        db.write_batch("main", "cpu", &batch(1)).expect("write");
        loop {
            let m = sub.next().await.expect("message").expect("ok");
            if m.kind == ChangeKind::Change {
                return m;
            }
        }
    });
    assert_eq!(change.rows.num_rows(), HOSTS);
    c.bench_function("subscribe/encode_change/1000_rows", |b| {
        b.iter(|| {
            // A fresh copy each time: the encoding is cached per change.
            rivulet::message_json(&change.uncached(), None)
                .expect("json")
                .len()
        })
    });
    db.close().expect("close");
}

struct Run {
    rows_per_sec: f64,
    p50: Duration,
    p99: Duration,
    max: Duration,
    messages_per_sec: f64,
    samples: usize,
    detail: String,
}

/// Ingests at 100k rows/s for `secs` with `n` subscribers to `sql`.
fn sustained(sql: &str, view: bool, n: usize, secs: u64) -> Run {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let dir = tempfile::tempdir().expect("tempdir");
    let db = open(dir.path());
    db.write_batch("main", "cpu", &batch(0)).expect("write");
    if view {
        rt.block_on(db.sql(VIEW)).expect("create");
        db.sync_views().expect("sync");
    }
    let acks: Arc<Mutex<Vec<(u64, Instant)>>> = Arc::new(Mutex::new(Vec::new()));
    let messages = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let warmup = Duration::from_secs(1);
    let started = Instant::now();
    let mut tasks = Vec::new();
    for _ in 0..n {
        let sub = rt
            .block_on(db.subscribe(sql, SubscribeOptions::default()))
            .expect("subscribe");
        let acks = acks.clone();
        let messages = messages.clone();
        tasks.push(rt.spawn(async move {
            let mut sub = sub;
            let mut next = 0usize;
            let mut latencies: Vec<Duration> = Vec::new();
            while let Some(m) = sub.next().await {
                let Ok(m) = m else { break };
                if m.kind != ChangeKind::Change {
                    if m.kind == ChangeKind::Lagged {
                        panic!("a subscriber lagged: {:?}", m.reason);
                    }
                    continue;
                }
                messages.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                let now = Instant::now();
                let acks = acks.lock();
                while next < acks.len() && acks[next].0 <= m.applied {
                    if acks[next].1.duration_since(started) > warmup {
                        latencies.push(now.saturating_duration_since(acks[next].1));
                    }
                    next += 1;
                }
            }
            latencies
        }));
    }
    // The writer: 1,000 rows every 10 ms.
    let period = Duration::from_millis(10);
    let writes = (secs * 100) as usize;
    let begin = Instant::now();
    let mut at = Instant::now();
    for step in 1..=writes {
        let seq = db
            .write_batch("main", "cpu", &batch(step))
            .expect("write")
            .seq;
        acks.lock().push((seq, Instant::now()));
        at += period;
        if let Some(wait) = at.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let elapsed = begin.elapsed();
    let rows_per_sec = (writes * HOSTS) as f64 / elapsed.as_secs_f64();
    // Let every subscriber see the last write, then end the subscriptions.
    let mut rounds = String::new();
    if view {
        db.sync_views().expect("sync");
        let b = rt
            .block_on(db.sql("SELECT last_round_ms, lag_ms FROM system.views"))
            .expect("system.views");
        rounds = arrow::util::pretty::pretty_format_batches(&b)
            .map(|t| t.to_string().replace('\n', " "))
            .unwrap_or_default();
    }
    let stats = db.stats();
    let fsync_ms = stats.wal_fsync_seconds * 1e3 / stats.wal_fsyncs.max(1) as f64;
    std::thread::sleep(Duration::from_millis(500));
    db.close().expect("close");
    let mut all: Vec<Duration> = Vec::new();
    for t in tasks {
        all.extend(rt.block_on(t).expect("subscriber"));
    }
    all.sort();
    let p = |q: f64| {
        all.get(((all.len().max(1) - 1) as f64 * q) as usize)
            .copied()
            .unwrap_or_default()
    };
    Run {
        rows_per_sec,
        p50: p(0.5),
        p99: p(0.99),
        max: p(1.0),
        messages_per_sec: messages.load(std::sync::atomic::Ordering::Relaxed) as f64
            / elapsed.as_secs_f64(),
        samples: all.len(),
        detail: format!("mean WAL fsync {fsync_ms:.2} ms; last view round {rounds}"),
    }
}

fn latency(_c: &mut Criterion) {
    let secs: u64 = std::env::var("RIVULET_SUB_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(10);
    let counts: Vec<usize> = std::env::var("RIVULET_SUB_COUNTS")
        .unwrap_or_else(|_| "1,100,1000".to_string())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let kinds = std::env::var("RIVULET_SUB_KINDS").unwrap_or_else(|_| "view,alerts".to_string());
    for (name, sql, view) in [
        ("view SELECT * FROM cpu_1m", "SELECT * FROM cpu_1m", true),
        ("alerts SELECT … WHERE usage_user > 90", ALERTS, false),
    ] {
        if !kinds.contains(if view { "view" } else { "alerts" }) {
            continue;
        }
        for &n in &counts {
            let r = sustained(sql, view, n, secs);
            println!(
                "subscribe/latency {name}, {n} subscribers: ingest {:.0} rows/s; write-ack → change p50 {:.2?} p99 {:.2?} max {:.2?} ({} samples); {:.0} change messages/s delivered ({})",
                r.rows_per_sec, r.p50, r.p99, r.max, r.samples, r.messages_per_sec, r.detail
            );
        }
    }
}

criterion_group!(benches, encode_change, latency);
criterion_main!(benches);
