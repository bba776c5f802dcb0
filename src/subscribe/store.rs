//! View change logs on disk, so subscribers to a view resume across a restart. The file I/O
//! happens outside the hub's and the logs' locks: the hub takes what it needs under the log
//! lock, then calls here.
//!
//! One file per view (`changes/<view table id>.log`), a sequence of records
//! `[u32 length][u32 crc32][payload]` (little-endian). A payload is a start marker
//! (`0x01`, u64 start: every change after it follows) or an entry (`0x02`, u64 seq, u64
//! applied, i64 wall-clock ms, u8 has-watermark, i64 watermark, then one Arrow IPC stream of
//! the view's changed rows plus a `__deleted` column).
//!
//! The start marker also holds the view's applied sequence when the log (re)started, u64.
//!
//! Entries are appended after the view write they describe is durable, without an fsync of
//! their own: a killed process loses nothing (the OS has the bytes), and a lost tail (an OS
//! crash) is detected at open because the view's stored applied sequence (written with each of
//! its writes) is then newer than the last logged entry's; the log then restarts and older
//! positions get a `reset`. A torn tail is dropped at open; damage with intact records after
//! it, and a file that cannot be read, are set aside, never cut or overwritten silently
//! ([`Store::read`]). The file is rewritten from the in-memory log
//! when it grows past twice the log's byte limit.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use parking_lot::Mutex;

use super::log::{Entry, EntryData};
use crate::storage::io::{Io, IoOp};

const START: u8 = 1;
const ENTRY: u8 = 2;

/// Errors of the change-log files.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StoreError {
    /// A file operation failed.
    #[error("view change log {op} {path} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> StoreError {
    let path = path.to_path_buf();
    move |source| StoreError::Io { op, path, source }
}

/// One view's open log file and its size.
type LogFile = Arc<Mutex<Option<(File, u64)>>>;

/// The change-log files of one data directory.
pub(crate) struct Store {
    dir: PathBuf,
    io: Io,
    /// Per view; the map lock is only held to find a file, its own lock while writing it.
    files: Mutex<HashMap<u64, LogFile>>,
    /// Views whose unreadable file could not be moved aside: never written over.
    broken: Mutex<std::collections::HashSet<u64>>,
}

/// What a view's file held: its start marker (start, applied) and the entries after it.
#[derive(Default)]
pub(crate) struct Stored {
    pub(crate) start: Option<u64>,
    pub(crate) marker_applied: u64,
    pub(crate) entries: Vec<Entry>,
}

impl Stored {
    /// Whether the file holds every change of a view whose stored applied sequence is
    /// `applied`: the view's progress is written only with its rows, so the log is complete
    /// when it has logged that write.
    pub(crate) fn complete(&self, applied: u64) -> bool {
        let logged = self
            .entries
            .last()
            .map_or(self.marker_applied, |e| e.applied);
        self.start.is_some() && logged >= applied
    }
}

fn record(payload: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(payload.len() + 8);
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    out.extend_from_slice(&crc32fast::hash(payload).to_le_bytes());
    out.extend_from_slice(payload);
    out
}

fn start_record(start: u64, applied: u64) -> Vec<u8> {
    let mut p = vec![START];
    p.extend_from_slice(&start.to_le_bytes());
    p.extend_from_slice(&applied.to_le_bytes());
    record(&p)
}

fn entry_record(e: &Entry) -> Option<Vec<u8>> {
    let EntryData::View { rows, deleted } = &e.data else {
        return None;
    };
    let mut fields: Vec<Field> = rows
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    fields.push(Field::new(
        super::super::views::provider::DELETED,
        DataType::Boolean,
        true,
    ));
    let mut columns = rows.columns().to_vec();
    columns.push(Arc::new(deleted.clone()));
    let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), columns).ok()?;
    let mut ipc = Vec::new();
    {
        let mut w = StreamWriter::try_new(&mut ipc, &batch.schema()).ok()?;
        w.write(&batch).ok()?;
        w.finish().ok()?;
    }
    let mut p = vec![ENTRY];
    p.extend_from_slice(&e.seq.to_le_bytes());
    p.extend_from_slice(&e.applied.to_le_bytes());
    p.extend_from_slice(&(e.at / 1_000_000).to_le_bytes());
    p.push(u8::from(e.watermark.is_some()));
    p.extend_from_slice(&e.watermark.unwrap_or(0).to_le_bytes());
    p.extend_from_slice(&ipc);
    Some(record(&p))
}

fn u64_at(p: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_le_bytes(p.get(at..at + 8)?.try_into().ok()?))
}

/// Parses one entry payload (after its kind byte).
fn parse_entry(p: &[u8]) -> Option<Entry> {
    let seq = u64_at(p, 0)?;
    let applied = u64_at(p, 8)?;
    let wall = u64_at(p, 16)? as i64;
    let has_wm = *p.get(24)? == 1;
    let wm = u64_at(p, 25)? as i64;
    let reader = StreamReader::try_new(std::io::Cursor::new(p.get(33..)?), None).ok()?;
    let mut batches = Vec::new();
    for b in reader {
        batches.push(b.ok()?);
    }
    let batch = batches.into_iter().next()?;
    let n = batch.num_columns();
    if n == 0 {
        return None;
    }
    let deleted = batch.column(n - 1).as_boolean_opt()?.clone();
    let rows = batch.project(&(0..n - 1).collect::<Vec<_>>()).ok()?;
    let at = wall.saturating_mul(1_000_000);
    Some(Entry {
        seq,
        applied,
        bytes: rows.get_array_memory_size() + deleted.get_array_memory_size(),
        data: EntryData::View { rows, deleted },
        at,
        watermark: has_wm.then_some(wm),
    })
}

/// The record at `at`: its payload, if it is whole and its checksum holds.
fn record_at(data: &[u8], at: usize) -> Option<&[u8]> {
    let len = u32::from_le_bytes(data.get(at..at + 4)?.try_into().ok()?) as usize;
    let crc = u32::from_le_bytes(data.get(at + 4..at + 8)?.try_into().ok()?);
    let p = data.get(at + 8..(at + 8).checked_add(len)?)?;
    (crc32fast::hash(p) == crc).then_some(p)
}

/// Applies one record to `stored`; false when its contents do not parse.
fn apply(stored: &mut Stored, p: &[u8]) -> bool {
    match p.first() {
        Some(&START) => {
            stored.start = u64_at(p, 1);
            stored.marker_applied = u64_at(p, 9).unwrap_or(0);
            stored.entries.clear();
            stored.start.is_some()
        }
        Some(&ENTRY) => match parse_entry(&p[1..]) {
            Some(e) => {
                stored.entries.push(e);
                true
            }
            None => false,
        },
        _ => false,
    }
}

/// Reads a change-log file's records. Returns what it held and, when damage was followed by
/// intact records, (offset of the first damage, why, entries kept after it); a torn tail is
/// dropped without a report.
fn parse(data: &[u8]) -> (Stored, Option<(usize, &'static str, usize)>) {
    let mut stored = Stored::default();
    let mut at = 0;
    let mut damage = None;
    while at < data.len() {
        match record_at(data, at) {
            Some(p) if apply(&mut stored, p) => at += 8 + p.len(),
            found => {
                let reason = if found.is_some() {
                    "a record that does not parse"
                } else {
                    "a torn record or a checksum mismatch"
                };
                // The next position where an intact, parseable record starts.
                let mut probe = Stored::default();
                let next = (at + 1..data.len()).find(|&q| {
                    record_at(data, q).is_some_and(|p| {
                        matches!(p.first(), Some(&START | &ENTRY)) && apply(&mut probe, p)
                    })
                });
                let Some(next) = next else {
                    break; // a torn tail
                };
                damage.get_or_insert((at, reason, 0));
                // Entries before the damage cannot be resumed across it: the log restarts
                // just before the first intact entry after it.
                let first = record_at(data, next).map_or(0, |p| {
                    if p.first() == Some(&ENTRY) {
                        u64_at(p, 1).unwrap_or(0)
                    } else {
                        0
                    }
                });
                stored.entries.clear();
                stored.start = Some(first.saturating_sub(1));
                at = next;
            }
        }
    }
    if let Some(d) = damage.as_mut() {
        d.2 = stored.entries.len();
    }
    (stored, damage)
}

impl Store {
    pub(crate) fn new(data_dir: &Path, io: Io) -> Store {
        Store {
            dir: data_dir.join("changes"),
            io,
            files: Mutex::new(HashMap::new()),
            broken: Mutex::new(std::collections::HashSet::new()),
        }
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    fn file(&self, id: u64) -> LogFile {
        self.files.lock().entry(id).or_default().clone()
    }

    /// Reads the file of the view stored in table `id` (nothing when there is no file).
    ///
    /// A torn tail (a record cut short or failing its checksum, nothing intact after it) is
    /// what a crash leaves and is dropped. Damage with intact records after it is never cut
    /// silently: the file as found is kept aside (`<id>.log.damaged`), the log keeps the intact
    /// records after the last damage (its start moves to just before them, so older positions
    /// get a `reset`), and the error is logged with the file, the offset and what was kept. A
    /// file that cannot be read at all (EIO) is moved aside (`<id>.log.unreadable`), never
    /// overwritten, and the log restarts; if it cannot even be moved, the view's file is left
    /// alone until the next open.
    pub(crate) fn read(&self, id: u64) -> Result<Stored, StoreError> {
        let path = self.path(id);
        let data = match self
            .io
            .check(IoOp::ChangeLogRead, &path)
            .and_then(|()| std::fs::read(&path))
        {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Stored::default()),
            Err(e) => {
                let aside = path.with_extension("log.unreadable");
                if let Err(moved) = self
                    .io
                    .check(IoOp::Rename, &path)
                    .and_then(|()| std::fs::rename(&path, &aside))
                {
                    tracing::error!(path = %path.display(), error = %moved, "an unreadable view change log could not be moved aside; it is left alone until the next open");
                    self.broken.lock().insert(id);
                }
                return Err(io_err("reading", &path)(e));
            }
        };
        let (stored, damage) = parse(&data);
        if let Some((offset, reason, kept)) = damage {
            let aside = path.with_extension("log.damaged");
            let moved = self
                .io
                .check(IoOp::ChangeLogWrite, &aside)
                .and_then(|()| std::fs::write(&aside, &data));
            tracing::error!(
                path = %path.display(), offset, reason, kept, aside = %aside.display(),
                moved = moved.is_ok(),
                "view change log is damaged with intact records after the damage: it was kept aside, the log resumes after the damage, older positions get a reset"
            );
        }
        Ok(stored)
    }

    /// Replaces the file of view `id` with a start marker (`start`, `applied`) and `entries`.
    pub(crate) fn rewrite<'a>(
        &self,
        id: u64,
        (start, applied): (u64, u64),
        entries: impl Iterator<Item = &'a Arc<Entry>>,
    ) -> Result<(), StoreError> {
        if self.broken.lock().contains(&id) {
            return Ok(());
        }
        let path = self.path(id);
        let tmp = path.with_extension("tmp");
        let file = self.file(id);
        let mut slot = file.lock();
        *slot = None;
        std::fs::create_dir_all(&self.dir).map_err(io_err("creating", &self.dir))?;
        let mut bytes = start_record(start, applied);
        for e in entries {
            if let Some(r) = entry_record(e) {
                bytes.extend_from_slice(&r);
            }
        }
        self.io
            .check(IoOp::ChangeLogWrite, &tmp)
            .and_then(|()| std::fs::write(&tmp, &bytes))
            .map_err(io_err("writing", &tmp))?;
        self.io
            .check(IoOp::Rename, &tmp)
            .and_then(|()| std::fs::rename(&tmp, &path))
            .map_err(io_err("renaming", &tmp))?;
        let f = OpenOptions::new()
            .append(true)
            .open(&path)
            .map_err(io_err("opening", &path))?;
        *slot = Some((f, bytes.len() as u64));
        Ok(())
    }

    /// Appends `entry` to the file of view `id`; true when the file has grown past twice
    /// `max_bytes` (or is not open) and should be rewritten from the log.
    pub(crate) fn append(
        &self,
        id: u64,
        entry: &Entry,
        max_bytes: usize,
    ) -> Result<bool, StoreError> {
        if self.broken.lock().contains(&id) {
            return Ok(false);
        }
        let Some(record) = entry_record(entry) else {
            return Ok(false);
        };
        let path = self.path(id);
        let file = self.file(id);
        let mut slot = file.lock();
        let Some((f, size)) = slot.as_mut() else {
            return Ok(true);
        };
        if let Err(e) = self
            .io
            .check(IoOp::ChangeLogWrite, &path)
            .and_then(|()| f.write_all(&record))
        {
            *slot = None;
            return Err(io_err("appending to", &path)(e));
        }
        *size += record.len() as u64;
        Ok(*size > 2 * max_bytes as u64)
    }

    /// Deletes the file of the view stored in table `id`.
    pub(crate) fn remove(&self, id: u64) {
        self.files.lock().remove(&id);
        let _ = std::fs::remove_file(self.path(id));
    }
}

#[cfg(test)]
mod tests {
    use arrow::array::{BooleanArray, Float64Array, RecordBatch};

    use super::*;

    fn entry(seq: u64, applied: u64, v: f64) -> Arc<Entry> {
        let rows = RecordBatch::try_from_iter([(
            "v",
            Arc::new(Float64Array::from(vec![v])) as arrow::array::ArrayRef,
        )])
        .expect("rows");
        let deleted = BooleanArray::from(vec![false]);
        Arc::new(Entry {
            seq,
            applied,
            bytes: rows.get_array_memory_size(),
            data: EntryData::View { rows, deleted },
            at: 1_700_000_000_000_000_000,
            watermark: Some(5),
        })
    }

    #[test]
    fn a_rewritten_log_with_appends_reads_back() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path(), Io::default());
        assert!(store.read(7).expect("read").start.is_none(), "no file yet");
        store
            .rewrite(7, (10, 9), [entry(11, 10, 1.0)].iter())
            .expect("rewrite");
        let grow = store
            .append(7, &entry(12, 11, 2.0), 1 << 20)
            .expect("append");
        assert!(!grow);
        let stored = store.read(7).expect("read");
        assert_eq!(stored.start, Some(10));
        assert_eq!(stored.marker_applied, 9);
        let seqs: Vec<u64> = stored.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [11, 12]);
        assert_eq!(stored.entries[1].watermark, Some(5));
        assert_eq!(stored.entries[0].at, 1_700_000_000_000_000_000);
        assert!(stored.complete(11));
        assert!(!stored.complete(12), "a write the log misses");
        store.remove(7);
        assert!(store.read(7).expect("read").start.is_none());
    }

    #[test]
    fn reading_stops_at_a_torn_record_and_appends_past_the_bound_ask_for_a_rewrite() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path(), Io::default());
        store
            .rewrite(3, (0, 0), [entry(1, 1, 1.0), entry(2, 2, 2.0)].iter())
            .expect("rewrite");
        let path = store.path(3);
        let len = std::fs::metadata(&path).expect("stat").len();
        OpenOptions::new()
            .write(true)
            .open(&path)
            .expect("open")
            .set_len(len - 3)
            .expect("tear");
        let stored = store.read(3).expect("read");
        assert_eq!(stored.entries.len(), 1);
        // A bound of one byte: the next append says the file has grown past twice it.
        store
            .rewrite(3, (0, 0), std::iter::empty())
            .expect("rewrite");
        assert!(store.append(3, &entry(4, 4, 4.0), 1).expect("append"));
    }

    #[test]
    fn damage_with_intact_entries_after_it_is_set_aside_and_the_log_resumes_after_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path(), Io::default());
        let entries: Vec<_> = (1..=4).map(|s| entry(s, s, s as f64)).collect();
        store.rewrite(5, (0, 0), entries.iter()).expect("rewrite");
        let path = store.path(5);
        let mut data = std::fs::read(&path).expect("read");
        // A flipped byte inside the second entry (the start marker is 8 + 17 bytes, then
        // equal-sized entries).
        let entry_len = (data.len() - 25) / 4;
        data[25 + entry_len + 20] ^= 0x10;
        std::fs::write(&path, &data).expect("damage");

        let stored = store.read(5).expect("read");
        let seqs: Vec<u64> = stored.entries.iter().map(|e| e.seq).collect();
        assert_eq!(seqs, [3, 4], "the entries after the damage are kept");
        assert_eq!(
            stored.start,
            Some(2),
            "positions before entry 3 cannot resume"
        );
        assert_eq!(
            std::fs::read(path.with_extension("log.damaged")).expect("kept aside"),
            data
        );
    }

    #[derive(Debug)]
    struct FailReads;

    impl crate::storage::io::IoFaults for FailReads {
        fn before(&self, op: IoOp, _: &Path) -> std::io::Result<()> {
            match op {
                IoOp::ChangeLogRead => Err(std::io::Error::other("EIO (injected)")),
                _ => Ok(()),
            }
        }
    }

    #[test]
    fn an_unreadable_log_is_moved_aside_not_read_as_empty_and_overwritten() {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::new(dir.path(), Io::default());
        store
            .rewrite(6, (0, 0), [entry(1, 1, 1.0)].iter())
            .expect("rewrite");
        let before = std::fs::read(store.path(6)).expect("read");
        let failing = Store::new(dir.path(), Io::new(Some(Arc::new(FailReads))));
        let Err(err) = failing.read(6) else {
            panic!("the read error is surfaced");
        };
        assert!(err.to_string().contains("EIO"), "{err}");
        assert_eq!(
            std::fs::read(store.path(6).with_extension("log.unreadable")).expect("moved aside"),
            before
        );
    }
}
