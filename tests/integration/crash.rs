//! Crash recovery: a child process writes in `sync` mode and is killed with SIGKILL at a random
//! moment, several rounds on the same directory. After each kill the database is reopened and
//! must hold every acknowledged write, exactly whole (no partial write visible), with sequence
//! numbers that keep increasing.
//!
//! The child also persists and compacts continuously (small thresholds, plus a thread calling
//! `persist` and `compact` in a loop) and re-writes some of its earlier batches unchanged, so
//! kills land during persistence, compaction and overwrite merges too: after reopen no batch
//! may be missing, doubled or partial, and every segment file on disk must be registered.
//!
//! A subscriber in the child follows the aggregate view and saves its copy of the result and
//! its position after every message; after each kill the parent resumes from that position
//! and must end up with exactly the view (no gap, no duplicate), without a snapshot unless the
//! view's log had to restart.
//!
//! The child is this same test binary, re-run with `crash_child` as the test filter and the data
//! directory in an environment variable (the sled crash-test pattern).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use arrow::array::AsArray;
use arrow::datatypes::{Float64Type, Int64Type};
use rivulet::{Config, Db, Precision};

const CHILD_DIR: &str = "RIVULET_CRASH_CHILD_DIR";
const CHILD_FIRST_BATCH: &str = "RIVULET_CRASH_FIRST_BATCH";
/// Rows per write.
const ROWS: usize = 25;
const WRITERS: u64 = 3;

/// A tiny deterministic generator (no extra dependency for one random delay per round).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        self.0 >> 33
    }
}

fn batch_lines(batch: u64) -> String {
    let mut s = String::new();
    for row in 0..ROWS {
        // Distinct series and time per row; the value encodes the batch for a sum check.
        s.push_str(&format!(
            "crash,batch=b{batch},row=r{row} v={batch}.0,n={row}i {}\n",
            batch * 1000 + row as u64
        ));
    }
    s
}

/// The child: writes batches from several threads forever, printing `ACK batch seq` after each
/// write returns. Does nothing when run as a normal test.
#[test]
fn crash_child() {
    let Some(dir) = std::env::var_os(CHILD_DIR) else {
        return;
    };
    let first: u64 = std::env::var(CHILD_FIRST_BATCH)
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let db = Db::open_with(Config {
        persist_bytes: 64 << 10,
        compaction_segments: 3,
        ..Config::with_dir(&dir)
    })
    .expect("child: open");
    let deadline = Instant::now() + Duration::from_secs(60);
    // Materialized views over the table, created (and backfilled) while the writers run, so
    // kills also land during view creation, backfill and maintenance.
    let viewer = db.clone();
    let views = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("child: runtime");
        while viewer.stats().tables == 0 && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        for sql in VIEWS {
            rt.block_on(viewer.sql(sql)).expect("child: create view");
        }
    });
    let mut threads: Vec<_> = (0..WRITERS)
        .map(|w| {
            let db = db.clone();
            std::thread::spawn(move || {
                let mut batch = first + w;
                while Instant::now() < deadline {
                    let receipt = db
                        .write_lines("main", &batch_lines(batch), Precision::Second)
                        .expect("child: write");
                    // One println is one write(2) of a whole line on a locked stdout.
                    println!("ACK {batch} {}", receipt.seq);
                    if batch.is_multiple_of(4) && batch >= first + WRITERS {
                        // Overwrite an earlier batch with the same rows (it may be persisted).
                        db.write_lines("main", &batch_lines(batch - WRITERS), Precision::Second)
                            .expect("child: overwrite");
                    }
                    batch += WRITERS;
                }
            })
        })
        .collect();
    let maintainer = db.clone();
    threads.push(std::thread::spawn(move || {
        while Instant::now() < deadline {
            maintainer.persist().expect("child: persist");
            maintainer.compact().expect("child: compact");
            std::thread::sleep(Duration::from_millis(5));
        }
    }));
    let follower = db.clone();
    let client_file = std::path::PathBuf::from(&dir).join("client.json");
    threads.push(std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("child: runtime");
        rt.block_on(follow(&follower, &client_file, deadline));
    }));
    views.join().expect("child views");
    for t in threads {
        t.join().expect("child thread");
    }
}

/// A subscriber's copy of a keyed result: position and rows by key (JSON, as sent).
#[derive(Default, serde::Serialize, serde::Deserialize)]
struct ClientState {
    seq: u64,
    rows: BTreeMap<String, serde_json::Value>,
    /// Snapshots received (the first, and one per reset).
    snapshots: u64,
}

impl ClientState {
    fn load(path: &std::path::Path) -> Option<ClientState> {
        serde_json::from_slice(&std::fs::read(path).ok()?).ok()
    }

    /// Applies one message (JSON, as every transport sends it).
    fn apply(&mut self, m: &rivulet::ChangeBatch) {
        let v: serde_json::Value =
            serde_json::from_str(&rivulet::message_json(m, None).expect("json")).expect("parse");
        if v["type"] == "snapshot" && v["first"] == true {
            self.rows.clear();
            self.snapshots += 1;
        }
        for c in v["changes"].as_array().into_iter().flatten() {
            let key = format!("{}|{}", c["row"]["time"], c["row"]["batch"]);
            match c["op"].as_str() {
                Some("upsert") => {
                    self.rows.insert(key, c["row"].clone());
                }
                Some("delete") => {
                    self.rows.remove(&key);
                }
                other => panic!("unexpected op {other:?}"),
            }
        }
        if !(v["type"] == "reset" || (v["type"] == "snapshot" && v["last"] == false)) {
            self.seq = v["seq"].as_u64().expect("seq");
        }
    }
}

const FOLLOWED: &str = "SELECT * FROM crash_1m";

/// The child's subscriber: resumes from its saved state, saves it after every message.
async fn follow(db: &Db, path: &std::path::Path, deadline: Instant) {
    use futures::StreamExt;
    let mut state = ClientState::load(path).unwrap_or_default();
    let since = (state.snapshots > 0).then_some(state.seq);
    let mut sub = loop {
        match db
            .subscribe(
                FOLLOWED,
                rivulet::SubscribeOptions {
                    since,
                    ..Default::default()
                },
            )
            .await
        {
            Ok(s) => break s,
            Err(_) if Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err(e) => panic!("child: subscribe: {e}"),
        }
    };
    while let Some(m) = sub.next().await {
        let m = m.expect("child: message");
        state.apply(&m);
        // Whole file or nothing (a kill mid-write leaves the previous one).
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, serde_json::to_vec(&state).expect("encode")).expect("child: save");
        std::fs::rename(&tmp, path).expect("child: save");
    }
}

/// The rows of `sql` as the subscription JSON encodes them, by key.
async fn result_rows(db: &Db, sql: &str) -> BTreeMap<String, serde_json::Value> {
    let batches = db.sql(sql).await.expect("query");
    let mut out = BTreeMap::new();
    for b in &batches {
        let mut lines = Vec::new();
        let mut w = arrow::json::writer::WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, arrow::json::writer::LineDelimited>(&mut lines);
        w.write(b).expect("json");
        w.finish().expect("json");
        drop(w);
        for line in String::from_utf8(lines).expect("utf-8").lines() {
            let row: serde_json::Value = serde_json::from_str(line).expect("row");
            out.insert(format!("{}|{}", row["time"], row["batch"]), row);
        }
    }
    out
}

/// Views the child creates: the aggregate (state-merge) and projection strategies.
const VIEWS: &[&str] = &[
    "CREATE MATERIALIZED VIEW IF NOT EXISTS crash_1m AS SELECT date_bin(INTERVAL '1 minute', time) \
     AS time, batch, sum(v) AS s, count(*) AS n, max(n) AS top FROM crash GROUP BY 1, 2",
    "CREATE MATERIALIZED VIEW IF NOT EXISTS crash_high AS SELECT time, batch, row, v FROM crash \
     WHERE n > 20",
];

/// Runs the child and kills it `kill_after` after its start, or after its first acknowledged
/// write when `after_first_ack` (so a long replay does not eat every round).
fn run_round(
    dir: &std::path::Path,
    first_batch: u64,
    kill_after: Duration,
    after_first_ack: bool,
) -> Vec<(u64, u64)> {
    let exe = std::env::current_exe().expect("test binary path");
    let mut child = Command::new(exe)
        .args([
            "crash::crash_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_DIR, dir)
        .env(CHILD_FIRST_BATCH, first_batch.to_string())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn child");
    let stdout = child.stdout.take().expect("child stdout");
    let (tx, rx) = mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if let Some(rest) = line.strip_prefix("ACK ") {
                let mut it = rest.split(' ').map(|s| s.parse::<u64>());
                if let (Some(Ok(b)), Some(Ok(s))) = (it.next(), it.next()) {
                    let _ = tx.send((b, s));
                }
            }
        }
    });
    let mut acks = Vec::new();
    if after_first_ack && let Ok(first) = rx.recv_timeout(Duration::from_secs(30)) {
        acks.push(first);
    }
    std::thread::sleep(kill_after);
    child.kill().expect("kill child");
    child.wait().expect("reap child");
    reader.join().expect("reader thread");
    acks.extend(rx.try_iter());
    acks
}

async fn batches_in_db(db: &Db) -> BTreeMap<String, (i64, f64)> {
    let result = db
        .sql("SELECT batch, count(*) AS n, sum(v) AS s FROM crash GROUP BY batch")
        .await;
    let mut out = BTreeMap::new();
    let Ok(batches) = result else {
        return out; // the table does not exist yet: nothing was written
    };
    for b in batches {
        let names = arrow::compute::cast(b.column(0), &arrow::datatypes::DataType::Utf8)
            .expect("cast batch tag");
        let names = names.as_string::<i32>();
        let counts = b.column(1).as_primitive::<Int64Type>();
        let sums = b.column(2).as_primitive::<Float64Type>();
        for i in 0..b.num_rows() {
            out.insert(names.value(i).to_string(), (counts.value(i), sums.value(i)));
        }
    }
    out
}

fn parquet_files(dir: &std::path::Path) -> usize {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .map(|e| e.expect("dir entry").path())
        .map(|p| {
            if p.is_dir() {
                parquet_files(&p)
            } else {
                usize::from(p.extension().is_some_and(|e| e == "parquet"))
            }
        })
        .sum()
}

#[test]
fn kill_during_ingest_loses_no_acknowledged_write() {
    let dir = tempfile::tempdir().expect("tempdir");
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    println!("crash test seed {seed}");
    let mut rng = Lcg(seed);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let mut acked: BTreeMap<u64, u64> = BTreeMap::new();
    let mut max_seq = 0u64;
    let rounds = 6;
    let mut segments_seen = 0;
    let mut views_checked = 0;
    let mut resumed_exactly = 0;
    for round in 0..rounds {
        // Every third round may die during open/replay; the others mid-ingest.
        let kill_after = Duration::from_millis(rng.next() % 500);
        let acks = run_round(dir.path(), round * 1_000_000, kill_after, round % 3 != 2);
        let mut seqs_this_round = std::collections::BTreeSet::new();
        for (batch, seq) in acks {
            assert!(
                seqs_this_round.insert(seq),
                "sequence {seq} acknowledged twice"
            );
            assert!(
                seq > max_seq,
                "round {round}: sequence {seq} does not continue after {max_seq}"
            );
            acked.insert(batch, seq);
        }
        if let Some(&s) = seqs_this_round.iter().next_back() {
            max_seq = s;
        }

        let db = Db::open(dir.path()).expect("reopen after kill");
        let present = runtime.block_on(batches_in_db(&db));
        for (batch, seq) in &acked {
            let key = format!("b{batch}");
            let Some(&(n, sum)) = present.get(&key) else {
                panic!("round {round}: acknowledged batch {batch} (seq {seq}) is missing");
            };
            assert_eq!(n, ROWS as i64, "round {round}: batch {batch} has {n} rows");
            assert_eq!(sum, (*batch * ROWS as u64) as f64, "batch {batch} values");
        }
        for (key, (n, _)) in &present {
            assert_eq!(
                *n, ROWS as i64,
                "round {round}: partial write {key} is visible"
            );
        }
        // Every series was written once (rewrites are identical): one latest point each.
        if !present.is_empty() {
            let n = runtime
                .block_on(db.sql("SELECT count(*) FROM last_cache('crash')"))
                .expect("last_cache");
            let n = n[0].column(0).as_primitive::<Int64Type>().value(0);
            assert_eq!(
                n,
                present.len() as i64 * ROWS as i64,
                "round {round}: last_cache has one row per series"
            );
        }
        // Every view equals the recompute of its definition.
        let views = runtime
            .block_on(db.sql("SELECT name FROM system.views ORDER BY name"))
            .expect("system.views");
        for batch in &views {
            let names = batch.column(0).as_string::<i32>();
            for i in 0..batch.num_rows() {
                let name = names.value(i);
                let check = runtime
                    .block_on(db.sql(&format!("CHECK MATERIALIZED VIEW {name}")))
                    .expect("check view");
                let text = arrow::util::pretty::pretty_format_batches(&check)
                    .expect("format")
                    .to_string();
                assert!(
                    text.contains("| ok "),
                    "round {round}: view {name} differs from its recompute:\n{text}"
                );
                views_checked += 1;
            }
        }
        // The child's subscriber, resumed from what it had saved, ends up with exactly the view.
        // The parent then saves its own copy, so the next child resumes from it.
        let client_file = dir.path().join("client.json");
        let mut client = ClientState::load(&client_file).unwrap_or_default();
        let resuming = client.snapshots > 0;
        let snapshots = client.snapshots;
        let view_exists = runtime
            .block_on(db.sql("SELECT count(*) FROM system.views WHERE name = 'crash_1m'"))
            .expect("system.views")[0]
            .column(0)
            .as_primitive::<Int64Type>()
            .value(0)
            == 1;
        if view_exists {
            runtime.block_on(async {
                use futures::StreamExt;
                db.sync_views().expect("sync views");
                let target = db.last_seq();
                let mut sub = db
                    .subscribe(
                        FOLLOWED,
                        rivulet::SubscribeOptions {
                            since: resuming.then_some(client.seq),
                            progress_interval: Duration::from_millis(20),
                            ..Default::default()
                        },
                    )
                    .await
                    .expect("resume");
                while client.seq < target || client.snapshots == 0 {
                    let m = tokio::time::timeout(Duration::from_secs(30), sub.next())
                        .await
                        .expect("a message")
                        .expect("stream")
                        .expect("message");
                    client.apply(&m);
                }
                let want = result_rows(&db, FOLLOWED).await;
                assert!(
                    client.rows == want,
                    "round {round}: the resumed subscriber differs from the view ({} vs {} rows)",
                    client.rows.len(),
                    want.len()
                );
            });
            if resuming && client.snapshots == snapshots {
                resumed_exactly += 1;
            }
            std::fs::write(&client_file, serde_json::to_vec(&client).expect("encode"))
                .expect("save client");
        }
        // No segment file on disk is unregistered (orphans are removed on open).
        let files = parquet_files(&dir.path().join("tables"));
        segments_seen = segments_seen.max(files);
        assert_eq!(
            files,
            db.stats().segments,
            "round {round}: files on disk vs registered segments"
        );
        // The sequence continues past everything acknowledged (and anything replayed).
        assert!(db.last_seq() >= max_seq, "last_seq went backwards");
        let receipt = db
            .write_lines("main", "marker v=1 1", Precision::Second)
            .expect("write after reopen");
        assert!(
            receipt.seq > max_seq,
            "sequence {} after reopen is not past {max_seq}",
            receipt.seq
        );
        max_seq = receipt.seq;
        db.close().expect("close");
        println!(
            "round {round}: killed after {kill_after:?}, {} batches acknowledged so far, {} present",
            acked.len(),
            present.len()
        );
    }
    assert!(segments_seen > 0, "the child never persisted a segment");
    assert!(views_checked > 0, "the child never created its views");
    println!("the subscriber resumed without a reset after {resumed_exactly} of {rounds} kills");
    assert!(
        resumed_exactly > 0,
        "the child's subscriber never resumed exactly after a kill"
    );
    assert!(
        !acked.is_empty(),
        "no write was acknowledged in {rounds} rounds: the child never made progress"
    );
}
