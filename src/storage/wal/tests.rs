//! Unit tests of the wal module.
use std::sync::atomic::{AtomicUsize, Ordering};

use arrow::array::{Int64Array, RecordBatch};

use super::*;
use crate::storage::io::IoFaults;

/// A payload: the sequence, a write kind and some filler.
fn payload(seq: u64, buf: &mut Vec<u8>) {
    buf.extend_from_slice(&seq.to_le_bytes());
    buf.push(KIND_WRITE);
    buf.extend_from_slice(&[7u8; 24]);
}

fn write(dir: &Path, seqs: std::ops::RangeInclusive<u64>, max_segment_bytes: u64) {
    let mut w = WalWriter::new(dir, max_segment_bytes, Io::default());
    for seq in seqs {
        w.append(seq, |buf| {
            payload(seq, buf);
            Ok(())
        })
        .expect("append");
    }
    w.rotate().expect("rotate");
}

fn replayed(dir: &Path) -> (Vec<u64>, ReplayReport) {
    replayed_with(dir, WalRecovery::Strict).expect("replay")
}

fn replayed_with(dir: &Path, recovery: WalRecovery) -> Result<(Vec<u64>, ReplayReport), WalError> {
    let mut seqs = Vec::new();
    let report = replay(dir, recovery, &Io::default(), |p| {
        let seq = u64::from_le_bytes(p[..8].try_into().expect("8 bytes"));
        seqs.push(seq);
        Ok(seq)
    })?;
    Ok((seqs, report))
}

#[test]
fn records_replay_in_order_across_segments() {
    let dir = tempfile::tempdir().expect("tempdir");
    // Tiny segments: a new one after every record or two.
    write(dir.path(), 1..=10, 64);
    let (seqs, report) = replayed(dir.path());
    assert_eq!(seqs, (1..=10).collect::<Vec<_>>());
    assert_eq!(report.records, 10);
    assert_eq!(report.last_seq, Some(10));
    assert!(report.segments > 1, "{report:?}");
    assert!(report.truncated_tail.is_none());
}

#[test]
fn a_torn_tail_is_cut_off_and_reported() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), 1..=3, 1 << 20);
    let (_, path) = list_segments(dir.path())
        .expect("list")
        .pop()
        .expect("a segment");
    let len = std::fs::metadata(&path).expect("stat").len();
    let file = OpenOptions::new().write(true).open(&path).expect("open");
    file.set_len(len - 5).expect("tear");
    let (seqs, report) = replayed(dir.path());
    assert_eq!(seqs, [1, 2]);
    let (torn, offset, reason) = report.truncated_tail.expect("reported");
    assert_eq!(torn, path);
    assert!(offset > 0 && reason.contains("torn"), "{offset} {reason}");
    // The file was cut at the damaged record: a second replay finds it whole.
    let (again, report) = replayed(dir.path());
    assert_eq!(again, [1, 2]);
    assert!(report.truncated_tail.is_none());
}

#[test]
fn damage_in_an_earlier_segment_fails_the_replay() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), 1..=6, 64);
    let (_, first) = list_segments(dir.path()).expect("list").remove(0);
    let mut data = std::fs::read(&first).expect("read");
    let last = data.len() - 1;
    data[last] ^= 0xff;
    std::fs::write(&first, data).expect("write");
    let err = replayed_with(dir.path(), WalRecovery::Strict).expect_err("damaged");
    assert!(
        matches!(&err, WalError::Damaged { path, intact_after: 0, later_segments, .. }
            if *path == first && *later_segments > 0),
        "{err}"
    );
}

/// The record offsets of a segment written by `write` (records of equal length).
fn record_offsets(path: &Path) -> Vec<usize> {
    let data = std::fs::read(path).expect("read");
    scan::scan(&data, None).offsets
}

#[test]
fn a_flipped_byte_in_the_first_record_refuses_to_open_and_keeps_the_file() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), 1..=5, 1 << 20);
    let (_, path) = list_segments(dir.path()).expect("list").remove(0);
    let offsets = record_offsets(&path);
    assert_eq!(offsets.len(), 5);
    let mut data = std::fs::read(&path).expect("read");
    data[offsets[0] + RECORD_HEADER_LEN + 10] ^= 0x01;
    std::fs::write(&path, &data).expect("write");

    let err = replayed_with(dir.path(), WalRecovery::Strict).expect_err("damaged");
    let WalError::Damaged {
        path: named,
        offset,
        intact_after,
        later_segments,
        reason,
    } = &err
    else {
        panic!("not a damage error: {err}");
    };
    assert_eq!(named, &path);
    assert_eq!(*offset, offsets[0] as u64);
    assert_eq!((*intact_after, *later_segments), (4, 0));
    assert!(reason.contains("checksum"), "{reason}");
    let text = err.to_string();
    assert!(
        text.contains("4 intact records") && text.contains("--wal-recovery skip-damaged"),
        "{text}"
    );
    assert_eq!(std::fs::read(&path).expect("read"), data, "nothing was cut");
}

#[test]
fn skip_damaged_keeps_every_intact_record_and_sets_the_file_aside() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), 1..=6, 1 << 20);
    let (_, path) = list_segments(dir.path()).expect("list").remove(0);
    let offsets = record_offsets(&path);
    let mut data = std::fs::read(&path).expect("read");
    // Record 2's length field and record 4's payload.
    data[offsets[1]] ^= 0x40;
    data[offsets[3] + RECORD_HEADER_LEN + 3] ^= 0x80;
    std::fs::write(&path, &data).expect("write");

    let (seqs, report) = replayed_with(dir.path(), WalRecovery::SkipDamaged).expect("recovered");
    assert_eq!(seqs, [1, 3, 5, 6]);
    let [recovered] = report.recovered.as_slice() else {
        panic!("one recovered segment: {report:?}");
    };
    assert_eq!(recovered.path, path);
    assert_eq!(recovered.kept, 4);
    assert_eq!(recovered.damaged.len(), 2);
    assert_eq!(recovered.damaged[0].0, offsets[1] as u64);
    assert_eq!(recovered.damaged[0].1, offsets[2] as u64);
    assert_eq!(std::fs::read(&recovered.moved_to).expect("copy"), data);
    assert!(report.truncated_tail.is_none());
    // The segment now holds the intact records only: a strict replay reads it whole.
    let (again, report) = replayed(dir.path());
    assert_eq!(again, [1, 3, 5, 6]);
    assert!(report.recovered.is_empty());
}

#[test]
fn a_torn_last_record_after_intact_ones_is_still_a_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), 1..=4, 1 << 20);
    let (_, path) = list_segments(dir.path()).expect("list").remove(0);
    let offsets = record_offsets(&path);
    let mut data = std::fs::read(&path).expect("read");
    // The last record fails its checksum: a crash tore its block, nothing follows it.
    data[offsets[3] + RECORD_HEADER_LEN + 12] ^= 0xff;
    std::fs::write(&path, &data).expect("write");
    let (seqs, report) = replayed(dir.path());
    assert_eq!(seqs, [1, 2, 3]);
    assert_eq!(report.truncated_tail.map(|t| t.1), Some(offsets[3] as u64));
}

#[test]
fn a_record_out_of_sequence_is_never_a_tail() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut w = WalWriter::new(dir.path(), 1 << 20, Io::default());
    for seq in [1, 2, 2] {
        w.append(seq, |buf| {
            payload(seq, buf);
            Ok(())
        })
        .expect("append");
    }
    w.rotate().expect("rotate");
    let err = replayed_with(dir.path(), WalRecovery::Strict).expect_err("out of order");
    assert!(err.to_string().contains("does not follow"), "{err}");
}

#[test]
fn another_format_version_is_refused() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), 1..=1, 1 << 20);
    let (_, path) = list_segments(dir.path()).expect("list").remove(0);
    let mut data = std::fs::read(&path).expect("read");
    data[6] = 9;
    std::fs::write(&path, data).expect("write");
    let err = replay(dir.path(), WalRecovery::SkipDamaged, &Io::default(), |_| {
        Ok(1)
    })
    .expect_err("version");
    assert!(matches!(err, WalError::Version { found: 9, .. }), "{err}");
}

#[test]
fn wholly_persisted_segments_are_removed() {
    let dir = tempfile::tempdir().expect("tempdir");
    write(dir.path(), 1..=10, 64);
    let before = list_segments(dir.path()).expect("list").len();
    let removed = remove_segments_through(dir.path(), 5, true).expect("remove");
    assert!(removed > 0 && removed < before, "{removed} of {before}");
    let (seqs, _) = replayed(dir.path());
    assert!(seqs.first().is_some_and(|&s| s <= 6), "{seqs:?}");
    assert_eq!(seqs.last(), Some(&10));
}

#[test]
fn a_write_record_round_trips() {
    let batch = RecordBatch::try_from_iter([(
        "v",
        std::sync::Arc::new(Int64Array::from(vec![1, 2, 3])) as arrow::array::ArrayRef,
    )])
    .expect("batch");
    let mut out = Vec::new();
    encode_write(42, "main", &[("cpu", &batch)], &mut out).expect("encode");
    let record = decode_write(&out).expect("decode");
    assert_eq!(record.seq, 42);
    assert_eq!(record.db, "main");
    assert_eq!(record.tables.len(), 1);
    assert_eq!(record.tables[0].0, "cpu");
    assert_eq!(record.tables[0].1, batch);
    assert!(decode_write(&out[..out.len() - 3]).is_err());
}

/// Fails the `n`-th call of `op`.
#[derive(Debug)]
struct FailNth {
    op: IoOp,
    n: usize,
    calls: AtomicUsize,
}

impl IoFaults for FailNth {
    fn before(&self, op: IoOp, _path: &Path) -> io::Result<()> {
        if op == self.op && self.calls.fetch_add(1, Ordering::SeqCst) + 1 == self.n {
            return Err(io::Error::other("injected"));
        }
        Ok(())
    }
}

#[test]
fn the_io_seam_fails_the_chosen_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let io = Io::new(Some(std::sync::Arc::new(FailNth {
        op: IoOp::WalAppend,
        n: 2,
        calls: AtomicUsize::new(0),
    })));
    let mut w = WalWriter::new(dir.path(), 1 << 20, io);
    let mut append = |seq| {
        w.append(seq, |buf| {
            payload(seq, buf);
            Ok(())
        })
    };
    append(1).expect("first append");
    let err = append(2).expect_err("second append fails");
    // Undone, not fatal: the log takes the next append, and holds records 1 and 3 only.
    assert!(matches!(err, WalError::NotAppended { .. }), "{err}");
    append(3).expect("the log takes the next append");
    drop(w);
    let (seqs, _) = replayed(dir.path());
    assert_eq!(seqs, [1, 3]);
}
