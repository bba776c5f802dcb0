//! The embedded API end to end: writes of both kinds, queries, restarts, faults and locks.

use std::io::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use crate::common::{rt, table};
use arrow::array::{
    ArrayRef, DictionaryArray, Float32Array, Float64Array, Int32Array, RecordBatch, StringArray,
    TimestampMillisecondArray,
};
use arrow::datatypes::{DataType, Field, Int32Type, Schema, TimeUnit};
use futures::TryStreamExt;
use rivulet::{
    Config, Db, Durability, Error, IoFaults, IoOp, ManualClock, Precision, WriteError, WriteOptions,
};

fn fixture_lines() -> &'static str {
    "cpu,host=a,dc=x usage=1.5,n=1i 10\n\
     cpu,host=b,dc=x usage=2.5,n=2i 10\n\
     cpu,host=a,dc=x usage=3.5 20\n\
     mem,host=a used=100u,ok=true,s=\"x y\" 10\n"
}

#[test]
fn restart_gives_identical_results() {
    let dir = tempfile::tempdir().expect("tempdir");
    let queries = [
        "SELECT * FROM cpu ORDER BY time, host",
        "SELECT * FROM mem",
        "SELECT * FROM other.t ORDER BY time",
        "SELECT host, sum(usage), count(n) FROM cpu GROUP BY host ORDER BY host",
    ];
    let before: Vec<String> = {
        let db = Db::open(dir.path()).expect("open");
        db.write_lines("main", fixture_lines(), Precision::Second)
            .expect("write");
        // An overwrite of one field of an existing point, and a late point.
        db.write_lines(
            "main",
            "cpu,dc=x,host=a usage=9.5 10\ncpu,host=b,dc=x usage=0.5 5",
            Precision::Second,
        )
        .expect("overwrite");
        db.write_lines("other", "t v=1 1\nt v=2 2", Precision::Second)
            .expect("other db");
        let out = queries.iter().map(|q| table(&db, q)).collect();
        db.close().expect("close");
        out
    };
    assert!(
        before[0].contains("| 9.5   |"),
        "overwrite visible: {}",
        before[0]
    );
    assert!(
        !before[0].contains("| 1.5   |"),
        "old value gone: {}",
        before[0]
    );
    let db = Db::open(dir.path()).expect("reopen");
    let after: Vec<String> = queries.iter().map(|q| table(&db, q)).collect();
    assert_eq!(before, after);
    assert_eq!(
        db.databases(),
        vec!["main".to_string(), "other".to_string()]
    );
}

#[test]
fn sequences_increase_and_continue_across_restarts() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut last = 0;
    for round in 0..3 {
        let db = Db::open(dir.path()).expect("open");
        assert_eq!(db.last_seq(), last, "round {round}");
        for i in 0..3 {
            let r = db
                .write_lines("main", &format!("s v={i} {i}"), Precision::Second)
                .expect("write");
            assert!(r.seq > last, "sequence {} after {last}", r.seq);
            last = r.seq;
        }
        db.close().expect("close");
    }
    // A restart without writes keeps the sequence too.
    drop(Db::open(dir.path()).expect("open"));
    let db = Db::open(dir.path()).expect("open");
    let r = db
        .write_lines("main", "s v=9 9", Precision::Second)
        .expect("write");
    assert_eq!(r.seq, last + 1);
}

#[test]
fn concurrent_writers_get_distinct_sequences_and_lose_nothing() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path()).expect("open");
    let threads: Vec<_> = (0..4)
        .map(|t| {
            let db = db.clone();
            std::thread::spawn(move || {
                (0..50)
                    .map(|i| {
                        let line = format!("c,t=t{t} v={i} {i}");
                        db.write_lines("main", &line, Precision::Second)
                            .expect("write")
                            .seq
                    })
                    .collect::<Vec<u64>>()
            })
        })
        .collect();
    let mut seqs: Vec<u64> = threads
        .into_iter()
        .flat_map(|t| t.join().expect("thread"))
        .collect();
    seqs.sort_unstable();
    seqs.dedup();
    assert_eq!(seqs.len(), 200, "every write has its own sequence");
    assert!(table(&db, "SELECT count(*) FROM c").contains("| 200      |"));
    assert_eq!(db.last_seq(), *seqs.last().expect("seqs"));
}

#[test]
fn write_batch_maps_arrow_columns() {
    let db = Db::open_in_memory().expect("open");
    let schema = Arc::new(Schema::new(vec![
        Field::new(
            "time",
            DataType::Timestamp(TimeUnit::Millisecond, None),
            false,
        ),
        Field::new(
            "host",
            DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8)),
            true,
        ),
        Field::new("usage", DataType::Float32, true),
        Field::new("cores", DataType::Int32, true),
        Field::new("label", DataType::Utf8, true),
    ]));
    let host: DictionaryArray<Int32Type> = vec!["a", "b", "a"].into_iter().collect();
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(TimestampMillisecondArray::from(vec![1000, 1000, 2000])) as ArrayRef,
            Arc::new(host),
            Arc::new(Float32Array::from(vec![Some(0.5), None, Some(1.5)])),
            Arc::new(Int32Array::from(vec![4, 8, 4])),
            Arc::new(StringArray::from(vec![Some("x"), Some("y"), None])),
        ],
    )
    .expect("batch");
    let r = db.write_batch("main", "cpu", &batch).expect("write_batch");
    assert_eq!(r.rows, 3);
    let out = table(&db, "SELECT * FROM cpu ORDER BY time, host");
    assert_eq!(
        out,
        "+-------+------+-------+----------------------+-------+\n\
         | cores | host | label | time                 | usage |\n\
         +-------+------+-------+----------------------+-------+\n\
         | 4     | a    | x     | 1970-01-01T00:00:01Z | 0.5   |\n\
         | 8     | b    | y     | 1970-01-01T00:00:01Z |       |\n\
         | 4     | a    |       | 1970-01-01T00:00:02Z | 1.5   |\n\
         +-------+------+-------+----------------------+-------+"
    );
    // A plain string column the table already has as a tag is a tag.
    let schema = Arc::new(Schema::new(vec![
        Field::new("time", DataType::Int64, false),
        Field::new("host", DataType::Utf8, true),
        Field::new("usage", DataType::Float64, true),
    ]));
    let batch = RecordBatch::try_new(
        schema,
        vec![
            Arc::new(arrow::array::Int64Array::from(vec![1_000_000_000])) as ArrayRef,
            Arc::new(StringArray::from(vec!["a"])),
            Arc::new(Float64Array::from(vec![7.0])),
        ],
    )
    .expect("batch");
    db.write_batch("main", "cpu", &batch).expect("utf8 tag");
    let out = table(
        &db,
        "SELECT usage, cores FROM cpu WHERE host = 'a' AND time = '1970-01-01T00:00:01Z'",
    );
    assert!(
        out.contains("| 7.0   | 4     |"),
        "overwrite keeps other fields: {out}"
    );
}

fn batch_of(fields: Vec<Field>, arrays: Vec<ArrayRef>) -> RecordBatch {
    RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays).expect("batch")
}

#[test]
fn write_batch_rejects_bad_batches_clearly() {
    let db = Db::open_in_memory().expect("open");
    db.write_lines("main", "cpu,host=a usage=1 1", Precision::Second)
        .expect("seed");
    let time = || Field::new("time", DataType::Int64, false);
    let times = || Arc::new(arrow::array::Int64Array::from(vec![1i64])) as ArrayRef;
    let cases: Vec<(RecordBatch, &str)> = vec![
        (
            batch_of(
                vec![Field::new("usage", DataType::Float64, true)],
                vec![Arc::new(Float64Array::from(vec![1.0]))],
            ),
            "no 'time' column",
        ),
        (
            batch_of(
                vec![time(), Field::new("usage", DataType::Int32, true)],
                vec![times(), Arc::new(Int32Array::from(vec![1]))],
            ),
            "field 'usage' of table 'cpu' in database 'main' has type float, but this line writes integer",
        ),
        (
            batch_of(
                vec![time(), Field::new("host", DataType::Float64, true)],
                vec![times(), Arc::new(Float64Array::from(vec![1.0]))],
            ),
            "'host' is a tag",
        ),
        (
            batch_of(
                vec![time(), Field::new("usage", DataType::Float64, true)],
                vec![times(), Arc::new(Float64Array::from(vec![None]))],
            ),
            "row 0 has no field values",
        ),
        (
            batch_of(
                vec![time(), Field::new("d", DataType::Date32, true)],
                vec![times(), Arc::new(arrow::array::Date32Array::from(vec![1]))],
            ),
            "column 'd' has unsupported type Date32",
        ),
        (
            batch_of(
                vec![
                    Field::new("time", DataType::Int64, true),
                    Field::new("usage", DataType::Float64, true),
                ],
                vec![
                    Arc::new(arrow::array::Int64Array::from(vec![None])),
                    Arc::new(Float64Array::from(vec![1.0])),
                ],
            ),
            "column 'time' has 1 null values",
        ),
    ];
    for (batch, want) in cases {
        let err = db
            .write_batch("main", "cpu", &batch)
            .expect_err(want)
            .to_string();
        assert!(err.contains(want), "expected '{want}' in: {err}");
        assert!(err.contains("table 'cpu'"), "names the table: {err}");
    }
    assert!(table(&db, "SELECT count(*) FROM cpu").contains("| 1        |"));
}

#[test]
fn atomic_and_partial_line_writes() {
    let db = Db::open_in_memory().expect("open");
    let body = "m v=1 1\nm v=oops 2\nm v=3 3\nm v=4i 4\n";
    let err = db
        .write_lines("main", body, Precision::Second)
        .expect_err("bad lines");
    match &err {
        Error::Write(WriteError::Rejected { errors, total, .. }) => {
            assert_eq!(
                *total, 1,
                "syntax errors are reported before type checks: {err}"
            );
            assert_eq!(errors[0].line, 2);
        }
        other => panic!("unexpected error {other}"),
    }
    let r = db
        .write_lines_with(
            "main",
            body,
            &WriteOptions {
                accept_partial: true,
                ..WriteOptions::precision(Precision::Second)
            },
        )
        .expect("partial");
    assert_eq!(r.rows, 2);
    assert_eq!(r.rejected_total, 2);
    let lines: Vec<usize> = r.rejected.iter().map(|e| e.line).collect();
    assert_eq!(lines, vec![2, 4]);
    assert!(
        r.rejected[1]
            .reason
            .contains("has type float, but this line writes integer")
    );
}

#[test]
fn missing_timestamps_use_the_injected_clock() {
    let clock = Arc::new(ManualClock::new(5_000_000_000));
    let db = Db::open_with(Config {
        clock: clock.clone(),
        ..Config::default()
    })
    .expect("open");
    db.write_lines("main", "m v=1", Precision::Second)
        .expect("write");
    clock.advance(1_000_000_000);
    db.write_lines("main", "m v=2", Precision::Second)
        .expect("write");
    assert_eq!(
        table(&db, "SELECT time, v FROM m ORDER BY time"),
        "+----------------------+-----+\n\
         | time                 | v   |\n\
         +----------------------+-----+\n\
         | 1970-01-01T00:00:05Z | 1.0 |\n\
         | 1970-01-01T00:00:06Z | 2.0 |\n\
         +----------------------+-----+"
    );
}

#[test]
fn streaming_queries_yield_batches() {
    let db = Db::open_in_memory().expect("open");
    let lines: String = (0..1000)
        .map(|i| format!("m,k=k{} v={i} {i}\n", i % 7))
        .collect();
    db.write_lines("main", &lines, Precision::Second)
        .expect("write");
    let rows = rt().block_on(async {
        let stream = db
            .sql_stream("main", "SELECT k, v FROM m WHERE v >= 500")
            .await?;
        let batches: Vec<RecordBatch> = stream.try_collect().await?;
        Ok::<usize, Error>(batches.iter().map(|b| b.num_rows()).sum())
    });
    assert_eq!(rows.expect("stream"), 500);
}

#[test]
fn overwrites_after_a_merge_still_win() {
    let db = Db::open_in_memory().expect("open");
    db.write_lines("main", "m,k=a v=1 1\nm,k=a v=2 2", Precision::Second)
        .expect("w");
    db.write_lines("main", "m,k=a v=10 1", Precision::Second)
        .expect("overwrite");
    // This query merges the chunks and installs the merged one.
    assert!(table(&db, "SELECT sum(v) FROM m").contains("| 12.0     |"));
    db.write_lines("main", "m,k=a v=100 2\nm,k=b v=5 2", Precision::Second)
        .expect("w");
    assert!(table(&db, "SELECT sum(v) FROM m").contains("| 115.0    |"));
    assert!(table(&db, "SELECT count(*) FROM m").contains("| 3        |"));
}

#[test]
fn new_columns_appear_and_old_rows_read_null() {
    let db = Db::open_in_memory().expect("open");
    db.write_lines("main", "m a=1 1", Precision::Second)
        .expect("w");
    db.write_lines("main", "m,t=x b=2i 2", Precision::Second)
        .expect("w");
    assert_eq!(
        table(&db, "SELECT a, b, t FROM m ORDER BY time"),
        "+-----+---+---+\n\
         | a   | b | t |\n\
         +-----+---+---+\n\
         | 1.0 |   |   |\n\
         |     | 2 | x |\n\
         +-----+---+---+"
    );
}

#[test]
fn a_data_directory_is_opened_by_one_process_at_a_time() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path()).expect("open");
    match Db::open(dir.path()) {
        Err(Error::Locked(_)) => {}
        other => panic!("expected Locked, got {other:?}"),
    }
    db.close().expect("close");
    Db::open(dir.path()).expect("open after close");
}

fn wal_files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(dir.join("wal"))
        .expect("wal dir")
        .map(|e| e.expect("entry").path())
        .collect();
    files.sort();
    files
}

#[test]
fn a_torn_wal_tail_is_cut_off_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        // Close without persisting: the rows stay in the WAL, whose tail this test tears.
        let db = Db::open_with(Config {
            persist_on_close: false,
            ..Config::with_dir(dir.path())
        })
        .expect("open");
        db.write_lines("main", "m v=1 1\nm v=2 2", Precision::Second)
            .expect("w");
        db.write_lines("main", "m v=3 3", Precision::Second)
            .expect("w");
        db.close().expect("close");
    }
    let last = wal_files(dir.path()).pop().expect("a segment");
    let len = std::fs::metadata(&last).expect("meta").len();
    // A crash mid-append: half of a record header and garbage.
    std::fs::OpenOptions::new()
        .append(true)
        .open(&last)
        .and_then(|mut f| f.write_all(&[200, 0, 0, 0, 1, 2, 3]))
        .expect("append garbage");
    let db = Db::open(dir.path()).expect("reopen");
    let report = db.replay_report().clone();
    assert_eq!(report.records, 2);
    let (path, offset, reason) = report.truncated_tail.expect("tail reported");
    assert_eq!(path, last);
    assert_eq!(offset, len);
    assert!(reason.contains("torn"), "{reason}");
    assert!(table(&db, "SELECT count(*) FROM m").contains("| 3        |"));
    db.write_lines("main", "m v=4 4", Precision::Second)
        .expect("write after repair");
    db.close().expect("close");
    let db = Db::open(dir.path()).expect("reopen again");
    assert!(db.replay_report().truncated_tail.is_none());
    assert!(table(&db, "SELECT count(*) FROM m").contains("| 4        |"));
}

#[test]
fn wal_damage_before_intact_records_refuses_to_open_until_the_operator_skips_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    {
        let db = Db::open_with(Config {
            persist_on_close: false,
            ..Config::with_dir(dir.path())
        })
        .expect("open");
        for v in 1..=3 {
            db.write_lines("main", &format!("m v={v} {v}"), Precision::Second)
                .expect("w");
        }
        db.close().expect("close");
    }
    let segment = wal_files(dir.path()).pop().expect("a segment");
    let mut data = std::fs::read(&segment).expect("read");
    // One flipped bit inside the first record's rows (16-byte header, 8-byte record header).
    data[16 + 8 + 40] ^= 0x04;
    std::fs::write(&segment, &data).expect("damage");

    let Err(err) = Db::open(dir.path()) else {
        panic!("a damaged WAL must not open");
    };
    let text = err.to_string();
    let name = segment.file_name().and_then(|n| n.to_str()).expect("name");
    for part in [
        name,
        "at byte 16",
        "2 intact records",
        "--wal-recovery skip-damaged",
    ] {
        assert!(text.contains(part), "'{part}' missing from: {text}");
    }
    assert_eq!(
        std::fs::read(&segment).expect("read"),
        data,
        "refusing cut nothing"
    );

    let db = Db::open_with(Config {
        wal_recovery: rivulet::WalRecovery::SkipDamaged,
        ..Config::with_dir(dir.path())
    })
    .expect("open, skipping the damage");
    assert_eq!(db.replay_report().records, 2);
    let recovered = db.replay_report().recovered.clone();
    assert_eq!(recovered.len(), 1, "{recovered:?}");
    assert_eq!(
        std::fs::read(&recovered[0].moved_to).expect("kept aside"),
        data
    );
    let values = table(&db, "SELECT v FROM m ORDER BY v");
    assert!(
        values.contains("| 2.0 |") && values.contains("| 3.0 |"),
        "{values}"
    );
    assert!(
        !values.contains("| 1.0 |"),
        "the damaged record is the lost one: {values}"
    );
    assert!(table(&db, "SELECT count(*) FROM m").contains("| 2        |"));
    db.close().expect("close");
    let db = Db::open(dir.path()).expect("a strict open after the repair");
    assert!(table(&db, "SELECT count(*) FROM m").contains("| 2        |"));
}

#[test]
fn corruption_before_the_last_segment_refuses_to_open() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = || Config {
        wal_segment_bytes: 1, // every write starts a new segment
        persist_on_close: false,
        ..Config::with_dir(dir.path())
    };
    {
        let db = Db::open_with(config()).expect("open");
        for i in 0..3 {
            db.write_lines("main", &format!("m v={i} {i}"), Precision::Second)
                .expect("w");
        }
        db.close().expect("close");
    }
    let files = wal_files(dir.path());
    assert_eq!(files.len(), 3);
    let mut bytes = std::fs::read(&files[0]).expect("read");
    let n = bytes.len();
    bytes[n - 3] ^= 0xff; // flip bits inside the first record's payload
    std::fs::write(&files[0], bytes).expect("write");
    let err = Db::open_with(config()).expect_err("corrupt");
    let msg = err.to_string();
    assert!(
        msg.contains("is damaged")
            && msg.contains("checksum mismatch")
            && msg.contains("2 newer segments"),
        "{msg}"
    );
}

/// Fails every fsync after the first `ok_syncs`.
#[derive(Debug)]
struct FailSyncAfter {
    ok_syncs: usize,
    syncs: AtomicUsize,
}

impl IoFaults for FailSyncAfter {
    fn before(&self, op: IoOp, _path: &std::path::Path) -> std::io::Result<()> {
        if op != IoOp::WalSync {
            return Ok(());
        }
        if self.syncs.fetch_add(1, Ordering::SeqCst) >= self.ok_syncs {
            Err(std::io::Error::other("injected fsync failure"))
        } else {
            Ok(())
        }
    }
}

#[test]
fn a_failed_fsync_fails_the_write_and_stops_the_log() {
    let dir = tempfile::tempdir().expect("tempdir");
    let faults = Arc::new(FailSyncAfter {
        ok_syncs: 2,
        syncs: AtomicUsize::new(0),
    });
    {
        let db = Db::open_with(Config {
            io_faults: Some(faults),
            ..Config::with_dir(dir.path())
        })
        .expect("open");
        db.write_lines("main", "m v=1 1", Precision::Second)
            .expect("acknowledged 1");
        db.write_lines("main", "m v=2 2", Precision::Second)
            .expect("acknowledged 2");
        let err = db
            .write_lines("main", "m v=3 3", Precision::Second)
            .expect_err("fsync fails");
        assert!(err.to_string().contains("injected fsync failure"), "{err}");
        // Not visible: the write was not acknowledged.
        assert!(table(&db, "SELECT count(*) FROM m").contains("| 2        |"));
        let err = db
            .write_lines("main", "m v=4 4", Precision::Second)
            .expect_err("poisoned");
        assert!(err.to_string().contains("reopen the database"), "{err}");
        drop(db);
    }
    // After reopening, the acknowledged writes are there (the failed one may or may not be:
    // it was never acknowledged).
    let db = Db::open(dir.path()).expect("reopen");
    let out = table(&db, "SELECT count(*) AS n FROM m WHERE v <= 2");
    assert!(out.contains("| 2 |"), "{out}");
    db.write_lines("main", "m v=5 5", Precision::Second)
        .expect("writes again");
}

#[test]
fn interval_and_none_durability_keep_data_across_close() {
    for durability in [
        Durability::Interval(std::time::Duration::from_millis(5)),
        Durability::None,
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let db = Db::open_with(Config {
                durability,
                ..Config::with_dir(dir.path())
            })
            .expect("open");
            for i in 0..20 {
                db.write_lines("main", &format!("m v={i} {i}"), Precision::Second)
                    .expect("w");
            }
            std::thread::sleep(std::time::Duration::from_millis(20));
            db.close().expect("close");
        }
        let db = Db::open(dir.path()).expect("reopen");
        assert!(
            table(&db, "SELECT count(*) FROM m").contains("| 20       |"),
            "{durability:?}"
        );
    }
}

#[test]
fn closed_handles_refuse_writes() {
    let db = Db::open_in_memory().expect("open");
    let other = db.clone();
    db.close().expect("close");
    assert!(matches!(
        other.write_lines("main", "m v=1 1", Precision::Second),
        Err(Error::Closed)
    ));
}

#[test]
fn databases_tables_and_columns_are_capped_with_errors_naming_the_flag() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = || Config {
        max_databases: 2,
        max_tables_per_database: 2,
        max_columns_per_table: 4,
        ..Config::with_dir(dir.path())
    };
    let db = Db::open_with(config()).expect("open");
    let write = |database: &str, lines: &str| db.write_lines(database, lines, Precision::Second);
    write("main", "t1,host=a f1=1,f2=2 1").expect("time, a tag and two fields: 4 columns");
    write("other", "x v=1 1").expect("a second database");
    let e = write("third", "x v=1 1").expect_err("a third database");
    assert!(
        e.to_string()
            .contains("limit of 2 databases (--max-databases"),
        "{e}"
    );

    write("main", "t2 v=1 1").expect("a second table");
    // Atomic: a third table rejects the whole write, the good line with it.
    let e = write("main", "t1,host=b f1=5 2\nt3 v=1 1").expect_err("a third table");
    let text = e.to_string();
    assert!(
        text.contains("limit of 2 tables in database 'main' (--max-tables-per-database"),
        "{text}"
    );
    let e = write("main", "t1,host=a f3=1 3").expect_err("a fifth column");
    let text = e.to_string();
    assert!(
        text.contains("column 'f3'") && text.contains("--max-columns-per-table"),
        "{text}"
    );
    write("main", "t1,host=c f1=3,f2=4 4").expect("existing columns still take writes");
    db.close().expect("close");

    // Nothing the rejected writes named was created, and the caps hold after a restart.
    let db = Db::open_with(config()).expect("reopen");
    assert!(table(&db, "SELECT count(*) FROM t1").contains("| 2        |"));
    assert!(
        crate::common::rt()
            .block_on(db.sql_in("main", "SELECT * FROM t3"))
            .is_err(),
        "no table t3"
    );
    let e = db
        .write_lines("third", "x v=1 1", Precision::Second)
        .expect_err("still capped");
    assert!(e.to_string().contains("--max-databases"), "{e}");
}

#[test]
fn series_are_capped_and_a_rejected_write_leaves_none_of_its_series_behind() {
    let db = Db::open_with(Config {
        durability: Durability::None,
        max_series_per_table: 3,
        ..Config::default()
    })
    .expect("open");
    let write = |lines: &str| db.write_lines("main", lines, Precision::Second);
    // Atomic writes that fail (a bad line after good ones; a table past a cap) add no series.
    for bad in [
        "cpu,host=a u=1 1\ncpu,host=b u=1 1\ncpu,host=c u=oops 1",
        "cpu,host=a u=1 1\ncpu,host=b u=1 1\nmem,host=a u=1 1\nmem u=\"text\" 1",
        "cpu,host=a u=1 1\ncpu,host=b u=1 1\ncpu,host=c u=1 1\ncpu,host=d u=1 1",
    ] {
        write(bad).expect_err(bad);
    }
    // So three new series still fit (before the fix, the rejected writes' series filled the
    // index until a restart).
    write("cpu,host=x u=1 2\ncpu,host=y u=1 2\ncpu,host=z u=1 2").expect("three series");
    let e = write("cpu,host=w u=1 3").expect_err("a fourth series");
    let text = e.to_string();
    assert!(
        text.contains("3 series") && text.contains("--max-series-per-table"),
        "{text}"
    );
    // Known series keep taking points, also with their tags in another order.
    write("cpu,host=x u=2 4").expect("a known series");
    // Arrow batches are capped too, and a refused batch leaves no series behind either.
    let batch = |hosts: &[&str]| {
        use arrow::array::{DictionaryArray, Float64Array, TimestampNanosecondArray};
        use arrow::datatypes::Int32Type;
        let schema = Arc::new(arrow::datatypes::Schema::new(vec![
            arrow::datatypes::Field::new(
                "time",
                arrow::datatypes::DataType::Timestamp(arrow::datatypes::TimeUnit::Nanosecond, None),
                false,
            ),
            arrow::datatypes::Field::new(
                "host",
                arrow::datatypes::DataType::Dictionary(
                    Box::new(arrow::datatypes::DataType::Int32),
                    Box::new(arrow::datatypes::DataType::Utf8),
                ),
                true,
            ),
            arrow::datatypes::Field::new("u", arrow::datatypes::DataType::Float64, true),
        ]));
        let n = hosts.len();
        arrow::array::RecordBatch::try_new(
            schema,
            vec![
                Arc::new(TimestampNanosecondArray::from(vec![5_000_000_000i64; n])),
                Arc::new(
                    hosts
                        .iter()
                        .copied()
                        .collect::<DictionaryArray<Int32Type>>(),
                ),
                Arc::new(Float64Array::from(vec![1.0; n])),
            ],
        )
        .expect("batch")
    };
    let e = db
        .write_batch("main", "cpu", &batch(&["x", "v"]))
        .expect_err("a new series in a batch");
    assert!(e.to_string().contains("--max-series-per-table"), "{e}");
    db.write_batch("main", "cpu", &batch(&["x", "y", "z"]))
        .expect("known series in a batch");
    assert!(table(&db, "SELECT count(*) FROM cpu").contains("| 7        |"));
    // Partial mode keeps the lines that fit and names the one that does not.
    let r = db
        .write_lines_with(
            "main",
            "cpu,host=y u=3 6\ncpu,host=q u=1 6",
            &rivulet::WriteOptions {
                precision: Precision::Second,
                accept_partial: true,
                ..Default::default()
            },
        )
        .expect("partial");
    assert_eq!(r.rows, 1);
    assert!(
        r.rejected[0].reason.contains("--max-series-per-table"),
        "{:?}",
        r.rejected
    );
    db.close().expect("close");
}

/// A disk that is full while `full` is set: every call that allocates space fails with
/// ENOSPC (fsyncs of what was written before do not).
#[derive(Debug, Default)]
struct DiskFull {
    full: std::sync::atomic::AtomicBool,
    segment_writes: AtomicUsize,
}

impl IoFaults for DiskFull {
    fn before(&self, op: IoOp, _path: &std::path::Path) -> std::io::Result<()> {
        if op == IoOp::SegmentWrite {
            self.segment_writes.fetch_add(1, Ordering::SeqCst);
        }
        let writes = !matches!(
            op,
            IoOp::WalRead | IoOp::ChangeLogRead | IoOp::WalSync | IoOp::FileSync
        );
        if writes && self.full.load(Ordering::SeqCst) {
            return Err(std::io::Error::from_raw_os_error(28));
        }
        Ok(())
    }
}

#[test]
fn a_full_disk_makes_the_database_read_only_until_space_returns() {
    let dir = tempfile::tempdir().expect("tempdir");
    let disk = Arc::new(DiskFull::default());
    let db = Db::open_with(Config {
        io_faults: Some(disk.clone()),
        background: false,
        max_buffer_bytes: 1,
        ..Config::with_dir(dir.path())
    })
    .expect("open");
    let write = |lines: &str| db.write_lines("main", lines, Precision::Second);
    write("m v=1 1").expect("disk has room");
    disk.full.store(true, Ordering::SeqCst);
    // The buffer must be persisted first, and that fails: the write is refused, clearly.
    let e = write("m v=2 2").expect_err("disk full");
    assert!(matches!(e, Error::Write(WriteError::Full(_))), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("persisting it to segments failed")
            && text.contains("No space left on device")
            && text.contains("queries are still answered"),
        "{text}"
    );
    // The next writes are refused at once, without another whole persist each.
    let tried = disk.segment_writes.load(Ordering::SeqCst);
    for i in 3..10 {
        write(&format!("m v={i} {i}")).expect_err("still full");
    }
    assert_eq!(disk.segment_writes.load(Ordering::SeqCst), tried);
    // Queries are answered meanwhile.
    assert!(table(&db, "SELECT count(*) FROM m").contains("| 1        |"));
    // Space returns: after the retry interval the next write persists and goes through.
    disk.full.store(false, Ordering::SeqCst);
    std::thread::sleep(std::time::Duration::from_millis(1100));
    write("m v=10 10").expect("room again");
    assert!(table(&db, "SELECT count(*) FROM m").contains("| 2        |"));
    db.close().expect("close");

    // The WAL itself full: the write is not stored, the log is not poisoned, nothing is
    // damaged.
    let db = Db::open_with(Config {
        io_faults: Some(disk.clone()),
        background: false,
        ..Config::with_dir(dir.path())
    })
    .expect("reopen");
    disk.full.store(true, Ordering::SeqCst);
    let e = db
        .write_lines("main", "m v=11 11", Precision::Second)
        .expect_err("WAL full");
    let text = e.to_string();
    assert!(
        text.contains("was not stored") && text.contains("the disk is full"),
        "{text}"
    );
    disk.full.store(false, Ordering::SeqCst);
    db.write_lines("main", "m v=12 12", Precision::Second)
        .expect("the log takes writes again");
    db.close().expect("close");
    let db = Db::open(dir.path()).expect("reopen strict: no damage");
    let out = table(&db, "SELECT v FROM m ORDER BY v");
    for v in ["| 1.0  |", "| 10.0 |", "| 12.0 |"] {
        assert!(out.contains(v), "{out}");
    }
    assert!(!out.contains("| 11.0 |"), "{out}");
}

#[test]
fn explain_shows_the_gap_fill_with_its_buckets_and_fills() {
    let db = crate::common::memory_db();
    db.write_lines("main", fixture_lines(), Precision::Second)
        .expect("write");
    db.persist().expect("persist");
    let sql = "SELECT date_bin_gapfill(INTERVAL '5 seconds', time) AS t, host, locf(avg(usage)), interpolate(max(n)) \
               FROM cpu WHERE time >= '1970-01-01T00:00:00Z' AND time < '1970-01-01T00:00:30Z' GROUP BY 1, host";
    let explain = table(&db, &format!("EXPLAIN {sql}"));
    for part in [
        "GapFill: date_bin_gapfill",
        "aggregates=[locf(avg(cpu.usage)), interpolate(max(cpu.n))]",
        "GapFillExec: time=",
        "range=[1970-01-01T00:00:00Z, 1970-01-01T00:00:29.999999999Z]",
    ] {
        assert!(explain.contains(part), "{part} in {explain}");
    }
    // 6 buckets for each of the two hosts, from the persisted segment.
    let rows = table(&db, &format!("SELECT count(*) AS n FROM ({sql}) s"));
    assert!(rows.contains("| 12 |"), "{rows}");
}

#[test]
fn the_newest_buckets_are_read_first_and_the_whole_range_only_when_they_fall_short() {
    let rt = rt();
    let on = crate::common::memory_db();
    let off = Db::open_with(Config {
        durability: Durability::None,
        query_rewrites: false,
        ..Config::default()
    })
    .expect("open");
    // Dense: a point every 10 s for two hours; sparse: two points an hour apart.
    let dense: Vec<String> = (0..720)
        .map(|i| format!("cpu,host=h{} v={} {}", i % 3, i % 17, i * 10))
        .collect();
    let sparse = "mem,host=a v=1 0\nmem,host=a v=2 3600\n";
    // The answer's older bucket is the oldest the bounded plan reads (the newest bucket but one
    // is empty), with a point at its very start: the bound must be on the bucket boundary.
    let edge = "gap,host=a v=1 0\ngap,host=a v=2 480\ngap,host=a v=3 530\ngap,host=a v=4 600\n";
    for db in [&on, &off] {
        db.write_lines("main", &dense.join("\n"), Precision::Second)
            .expect("write");
        db.write_lines("main", sparse, Precision::Second)
            .expect("write");
        db.write_lines("main", edge, Precision::Second)
            .expect("write");
    }
    for (table, fell_back) in [
        ("cpu", "fell_back=0"),
        ("mem", "fell_back=1"),
        ("gap", "fell_back=0"),
    ] {
        let sql = format!(
            "SELECT date_bin(INTERVAL '1 minute', time) AS t, max(v), count(*) FROM {table} GROUP BY 1 ORDER BY 1 DESC LIMIT 2"
        );
        assert_eq!(table_of(&on, &rt, &sql), table_of(&off, &rt, &sql), "{sql}");
        let explain = table_of(&on, &rt, &format!("EXPLAIN ANALYZE {sql}"));
        assert!(explain.contains("LatestBucketsExec"), "{explain}");
        assert!(explain.contains(fell_back), "{fell_back} in {explain}");
    }
}

fn table_of(db: &Db, rt: &tokio::runtime::Runtime, sql: &str) -> String {
    crate::common::pretty(&rt.block_on(db.sql(sql)).expect(sql))
}
