//! Ingest benchmarks: line protocol parsing and end-to-end writes.
//!
//! `cargo bench --bench ingest` — groups `ingest/parse_lp` (bytes/s on one core) and
//! `ingest/write` (rows/s through WAL + buffer, durability `none` and `sync`).

#[path = "common/tsbs.rs"]
mod tsbs;

use std::sync::Arc;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use rivulet::line_protocol::{ParseOptions, parse};
use rivulet::{Config, Db, Durability, Precision};

const HOSTS: usize = 1000;
const BATCH: usize = 5000;

fn parse_lp(c: &mut Criterion) {
    let mut rng = tsbs::Rng::new(42);
    let text = tsbs::lines(HOSTS, 0, BATCH, &mut rng);
    let mut g = c.benchmark_group("ingest/parse_lp");
    g.throughput(Throughput::Bytes(text.len() as u64));
    g.bench_function("tsbs_cpu_5000_lines", |b| {
        b.iter(|| {
            let parsed = parse(&text, ParseOptions::default());
            assert_eq!(parsed.lines.len(), BATCH);
            parsed.lines.len()
        })
    });
    g.finish();
}

fn write(c: &mut Criterion) {
    let mut g = c.benchmark_group("ingest/write");
    g.throughput(Throughput::Elements(BATCH as u64));
    g.sample_size(30);
    for (name, durability) in [("none", Durability::None), ("sync", Durability::Sync)] {
        let dir = tempfile::tempdir().expect("tempdir");
        let db = Db::open_with(Config {
            durability,
            ..Config::with_dir(dir.path())
        })
        .expect("open");
        let mut rng = tsbs::Rng::new(7);
        let mut next_row = 0usize;
        g.bench_function(format!("lp_5000_rows_{name}"), |b| {
            b.iter_batched(
                || {
                    let text = tsbs::lines(HOSTS, next_row, BATCH, &mut rng);
                    next_row += BATCH;
                    text
                },
                |text| {
                    db.write_lines("main", &text, Precision::Nanosecond)
                        .expect("write")
                },
                BatchSize::LargeInput,
            )
        });
        db.close().expect("close");
    }
    // Arrow batches through write_batch (the embedded fast path), durability none.
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open_with(Config {
        durability: Durability::None,
        ..Config::with_dir(dir.path())
    })
    .expect("open");
    let source = Db::open_in_memory().expect("source");
    let mut rng = tsbs::Rng::new(9);
    let text = tsbs::lines(HOSTS, 0, BATCH, &mut rng);
    source
        .write_lines("main", &text, Precision::Nanosecond)
        .expect("source write");
    let rt = tokio::runtime::Builder::new_current_thread()
        .build()
        .expect("rt");
    let batches = rt
        .block_on(source.sql("SELECT * FROM cpu"))
        .expect("source rows");
    let batch =
        Arc::new(arrow::compute::concat_batches(&batches[0].schema(), &batches).expect("concat"));
    let mut shift = 0i64;
    g.bench_function("arrow_5000_rows_none", |b| {
        b.iter_batched(
            || {
                // Move the batch forward in time so every write is new points.
                shift += 1_000_000_000_000;
                shifted(&batch, shift)
            },
            |batch| db.write_batch("main", "cpu", &batch).expect("write_batch"),
            BatchSize::LargeInput,
        )
    });
    g.finish();
}

fn shifted(batch: &arrow::array::RecordBatch, by: i64) -> arrow::array::RecordBatch {
    use arrow::array::{Array, ArrayRef, TimestampNanosecondArray};
    let idx = batch.schema().index_of("time").expect("time");
    let times = batch
        .column(idx)
        .as_any()
        .downcast_ref::<TimestampNanosecondArray>()
        .expect("ns");
    let moved: TimestampNanosecondArray = times.iter().map(|t| t.map(|t| t + by)).collect();
    let mut cols: Vec<ArrayRef> = batch.columns().to_vec();
    cols[idx] = Arc::new(moved.with_timezone("UTC"));
    arrow::array::RecordBatch::try_new(batch.schema(), cols).expect("batch")
}

criterion_group!(benches, parse_lp, write);
criterion_main!(benches);
