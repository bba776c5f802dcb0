//! The fault sweep: a fixed workload (writes, a view and its backfill, a subscription and its
//! change log, persists, a compaction, close) runs once to count its storage I/O calls, then
//! once per call N and error kind with call N failing (EIO, ENOSPC, a short write). After each
//! run the directory is reopened without faults and checked: every acknowledged write is
//! there and nothing that was never written, the view equals its recompute, a write whose own
//! I/O failed was told so, and the database takes writes again.

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arrow::array::{Array, AsArray};
use futures::StreamExt;
use rivulet::{Config, Db, Durability, IoFaults, IoOp, Precision, SubscribeOptions};

/// The error a failed call returns.
#[derive(Debug, Clone, Copy)]
enum Kind {
    Eio,
    Enospc,
    ShortWrite,
}

impl Kind {
    fn error(self) -> std::io::Error {
        match self {
            Kind::Eio => std::io::Error::from_raw_os_error(5),
            Kind::Enospc => std::io::Error::from_raw_os_error(28),
            Kind::ShortWrite => std::io::Error::new(
                std::io::ErrorKind::WriteZero,
                "injected short write: failed to write whole buffer",
            ),
        }
    }
}

/// Counts storage I/O calls and fails call `target` (1-based), once.
#[derive(Debug)]
struct Sweep {
    target: u64,
    kind: Kind,
    calls: AtomicU64,
    /// The failed call: its operation, the workload step running then and whether it was
    /// made by the workload's own thread (not the view worker's or the commit thread's).
    fired: Mutex<Option<(IoOp, usize, bool)>>,
    workload_thread: std::thread::ThreadId,
    step: Arc<AtomicUsize>,
    ops: Mutex<Vec<IoOp>>,
}

impl IoFaults for Sweep {
    fn before(&self, op: IoOp, _path: &Path) -> std::io::Result<()> {
        let n = self.calls.fetch_add(1, Ordering::SeqCst) + 1;
        if self.target == 0 {
            if let Ok(mut ops) = self.ops.lock() {
                ops.push(op);
            }
            return Ok(());
        }
        if n == self.target {
            if let Ok(mut f) = self.fired.lock() {
                let own = std::thread::current().id() == self.workload_thread;
                *f = Some((op, self.step.load(Ordering::SeqCst), own));
            }
            return Err(self.kind.error());
        }
        Ok(())
    }
}

const HOUR: i64 = 3_600_000_000_000;

/// The points of write `i`: (host, time ns, value), unique by (host, time).
fn points(i: usize) -> Vec<(String, i64, i64)> {
    (0..6)
        .map(|k| {
            let n = (i * 6 + k) as i64;
            (format!("h{}", k % 3), n * HOUR / 2, n)
        })
        .collect()
}

fn lines(points: &[(String, i64, i64)]) -> String {
    points
        .iter()
        .map(|(h, t, v)| format!("cpu,host={h} u={v}i {t}\n"))
        .collect()
}

/// Steps a write can be told apart by (the sweep records which step a fault hit).
const STEP_OTHER: usize = 0;
const STEP_WRITE: usize = 1;

/// What a run did: the points acknowledged and every point attempted.
#[derive(Default)]
struct Outcome {
    acknowledged: BTreeSet<(String, i64, i64)>,
    attempted: BTreeSet<(String, i64, i64)>,
    /// Writes that returned an error.
    failed_writes: usize,
}

fn config(dir: &Path, faults: Option<Arc<dyn IoFaults>>) -> Config {
    Config {
        durability: Durability::Sync,
        background: false,
        partition: Duration::from_secs(3600 * 6),
        // A small WAL segment: the workload rolls to new segments too.
        wal_segment_bytes: 4096,
        io_faults: faults,
        // A run whose view cannot catch up fails its waits fast.
        view_wait: Duration::from_secs(3),
        ..Config::with_dir(dir)
    }
}

/// The workload; every failure is recorded, none panics.
fn workload(rt: &tokio::runtime::Runtime, db: &Db, step: &AtomicUsize) -> Outcome {
    let mut out = Outcome::default();
    let write = |i: usize, out: &mut Outcome| {
        let p = points(i);
        out.attempted.extend(p.iter().cloned());
        step.store(STEP_WRITE, Ordering::SeqCst);
        let r = db.write_lines("main", &lines(&p), Precision::Nanosecond);
        step.store(STEP_OTHER, Ordering::SeqCst);
        match r {
            Ok(_) => out.acknowledged.extend(p),
            Err(_) => out.failed_writes += 1,
        }
    };
    write(0, &mut out);
    write(1, &mut out);
    let _ = rt.block_on(db.sql(
        "CREATE MATERIALIZED VIEW hourly AS SELECT date_bin(INTERVAL '1 hour', time) AS time, \
         host, sum(u) AS total, count(*) AS n FROM cpu GROUP BY 1, 2",
    ));
    let _ = db.sync_views();
    // A subscriber: the view's change log is written from now on.
    let sub = rt.block_on(db.subscribe(
        "SELECT * FROM hourly",
        SubscribeOptions {
            progress_interval: Duration::from_millis(50),
            ..SubscribeOptions::default()
        },
    ));
    write(2, &mut out);
    let _ = db.persist();
    write(3, &mut out);
    write(4, &mut out);
    let _ = db.sync_views();
    let _ = db.persist();
    let _ = db.compact();
    write(5, &mut out);
    let _ = db.sync_views();
    if let Ok(mut sub) = sub {
        // Take what is ready; the stream itself is not under test here.
        rt.block_on(async {
            while let Ok(Some(_)) =
                tokio::time::timeout(Duration::from_millis(20), sub.next()).await
            {}
        });
    }
    out
}

/// The points stored in `cpu`.
fn stored(rt: &tokio::runtime::Runtime, db: &Db) -> BTreeSet<(String, i64, i64)> {
    let batches = rt
        .block_on(db.sql("SELECT host, CAST(time AS BIGINT) AS t, u FROM cpu"))
        .unwrap_or_default();
    let mut out = BTreeSet::new();
    for b in &batches {
        let hosts = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)
            .expect("host as text");
        let hosts = hosts.as_string::<i32>();
        let times = b.column(1).as_primitive::<arrow::datatypes::Int64Type>();
        let values = b.column(2).as_primitive::<arrow::datatypes::Int64Type>();
        for r in 0..b.num_rows() {
            if values.is_valid(r) {
                out.insert((hosts.value(r).to_string(), times.value(r), values.value(r)));
            }
        }
    }
    out
}

/// One run with call `target` failing with `kind`; returns what the failed call was.
fn run(rt: &tokio::runtime::Runtime, target: u64, kind: Kind) -> Option<(IoOp, usize, bool)> {
    let started = std::time::Instant::now();
    let dir = tempfile::tempdir().expect("tempdir");
    let step = Arc::new(AtomicUsize::new(STEP_OTHER));
    let sweep = Arc::new(Sweep {
        target,
        kind,
        calls: AtomicU64::new(0),
        fired: Mutex::new(None),
        workload_thread: std::thread::current().id(),
        step: step.clone(),
        ops: Mutex::new(Vec::new()),
    });
    let outcome = match Db::open_with(config(dir.path(), Some(sweep.clone()))) {
        Ok(db) => {
            let outcome = workload(rt, &db, &step);
            let _ = db.close();
            outcome
        }
        // The fault hit the open itself: nothing was acknowledged.
        Err(_) => Outcome::default(),
    };
    let fired = *sweep.fired.lock().expect("fired");
    let what = format!("call {target} ({fired:?}) failing with {kind:?}");
    if let Some((op, STEP_WRITE, true)) = fired
        && matches!(op, IoOp::WalAppend | IoOp::WalSync | IoOp::WalCreate)
    {
        assert!(
            outcome.failed_writes > 0,
            "{what}: the write whose WAL I/O failed was acknowledged"
        );
    }
    let db = Db::open_with(config(dir.path(), None))
        .unwrap_or_else(|e| panic!("{what}: the directory does not reopen: {e}"));
    db.sync_views()
        .unwrap_or_else(|e| panic!("{what}: the views do not catch up after reopen: {e}"));
    let present = stored(rt, &db);
    let lost: Vec<_> = outcome.acknowledged.difference(&present).collect();
    assert!(
        lost.is_empty(),
        "{what}: acknowledged points lost: {lost:?}"
    );
    let invented: Vec<_> = present.difference(&outcome.attempted).collect();
    assert!(
        invented.is_empty(),
        "{what}: points never written: {invented:?}"
    );
    if rt
        .block_on(db.sql("SELECT count(*) FROM system.views WHERE name = 'hourly'"))
        .map(|b| {
            b[0].column(0)
                .as_primitive::<arrow::datatypes::Int64Type>()
                .value(0)
                == 1
        })
        .unwrap_or(false)
    {
        let check = rt
            .block_on(db.sql("CHECK MATERIALIZED VIEW hourly"))
            .unwrap_or_else(|e| panic!("{what}: CHECK failed to run: {e}"));
        let text = arrow::util::pretty::pretty_format_batches(&check)
            .expect("format")
            .to_string();
        assert!(
            text.contains("| ok "),
            "{what}: the view differs from its recompute:\n{text}"
        );
    }
    // It takes writes again, and they survive another reopen.
    db.write_lines("main", "after v=1 1", Precision::Second)
        .unwrap_or_else(|e| panic!("{what}: no writes after reopen: {e}"));
    db.close()
        .unwrap_or_else(|e| panic!("{what}: close after reopen: {e}"));
    if std::env::var_os("RIVULET_SWEEP_VERBOSE").is_some() {
        eprintln!("{what}: {:?}", started.elapsed());
    }
    fired
}

#[test]
fn every_storage_io_call_of_a_workload_can_fail_without_losing_acknowledged_data() {
    let rt = crate::common::multi_thread_rt(2);
    // The clean run: how many calls, of which kinds.
    let dir = tempfile::tempdir().expect("tempdir");
    let step = Arc::new(AtomicUsize::new(STEP_OTHER));
    let counter = Arc::new(Sweep {
        target: 0,
        kind: Kind::Eio,
        calls: AtomicU64::new(0),
        fired: Mutex::new(None),
        workload_thread: std::thread::current().id(),
        step: step.clone(),
        ops: Mutex::new(Vec::new()),
    });
    let db = Db::open_with(config(dir.path(), Some(counter.clone()))).expect("open");
    let clean = workload(&rt, &db, &step);
    db.close().expect("close");
    assert_eq!(clean.failed_writes, 0);
    let total = counter.calls.load(Ordering::SeqCst);
    eprintln!("fault sweep: the clean run makes {total} storage I/O calls");
    let ops = counter.ops.lock().expect("ops").clone();
    for op in [
        IoOp::WalAppend,
        IoOp::WalSync,
        IoOp::WalCreate,
        IoOp::SegmentWrite,
        IoOp::FileSync,
        IoOp::Rename,
        IoOp::ManifestCommit,
        IoOp::CatalogFlush,
        IoOp::TableMetaWrite,
        IoOp::ChangeLogWrite,
    ] {
        assert!(ops.contains(&op), "the workload never does {op:?}: {ops:?}");
    }
    // Runs end on their own schedule (view worker, commit thread): counts can differ a little
    // between runs, so the sweep goes a few calls past the clean run's total. One thread per
    // error kind (the runs wait on fsyncs more than they compute).
    let fired_any = AtomicBool::new(false);
    let covered = AtomicUsize::new(0);
    std::thread::scope(|scope| {
        for kind in [Kind::Eio, Kind::Enospc, Kind::ShortWrite] {
            let (fired_any, covered) = (&fired_any, &covered);
            scope.spawn(move || {
                let rt = crate::common::multi_thread_rt(1);
                for target in 1..=total + 3 {
                    if run(&rt, target, kind).is_some() {
                        covered.fetch_add(1, Ordering::SeqCst);
                        fired_any.store(true, Ordering::SeqCst);
                    }
                }
            });
        }
    });
    let covered = covered.load(Ordering::SeqCst);
    assert!(fired_any.load(Ordering::SeqCst));
    eprintln!(
        "fault sweep: {total} storage I/O calls in the clean run, {covered} faulted runs \
         (3 error kinds per call)"
    );
}
