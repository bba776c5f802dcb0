//! View change logs on disk, so subscribers to a view resume across a restart.
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
//! positions get a `reset`. Reading
//! stops at the first torn or corrupt record. The file is rewritten from the in-memory log
//! when it grows past twice the log's byte limit.

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;
use parking_lot::Mutex;

use super::log::{Entry, EntryData, Log, LogLimits, Source};
use crate::views::View;

const START: u8 = 1;
const ENTRY: u8 = 2;

/// The change-log files of one data directory.
pub(crate) struct Store {
    dir: PathBuf,
    files: Mutex<HashMap<u64, (File, u64)>>,
}

fn wall_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
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
    let age = e.at.elapsed().as_millis() as i64;
    let mut p = vec![ENTRY];
    p.extend_from_slice(&e.seq.to_le_bytes());
    p.extend_from_slice(&e.applied.to_le_bytes());
    p.extend_from_slice(&(wall_ms() - age).to_le_bytes());
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
    let ago = Duration::from_millis((wall_ms() - wall).max(0) as u64);
    let at = Instant::now().checked_sub(ago).unwrap_or_else(Instant::now);
    Some(Entry {
        seq,
        applied,
        bytes: rows.get_array_memory_size() + deleted.get_array_memory_size(),
        data: EntryData::View { rows, deleted },
        at,
        watermark: has_wm.then_some(wm),
    })
}

impl Store {
    pub(crate) fn new(data_dir: PathBuf) -> Store {
        Store {
            dir: data_dir.join("changes"),
            files: Mutex::new(HashMap::new()),
        }
    }

    fn path(&self, id: u64) -> PathBuf {
        self.dir.join(format!("{id}.log"))
    }

    fn warn(&self, path: &Path, e: impl std::fmt::Display) {
        tracing::warn!(path = %path.display(), error = %e, "view change log not written; subscribers may get a reset after a restart");
    }

    /// Replaces the file of view `id` with `start` and `entries`.
    fn rewrite<'a>(
        &self,
        id: u64,
        (start, applied): (u64, u64),
        entries: impl Iterator<Item = &'a Arc<Entry>>,
    ) {
        let path = self.path(id);
        let tmp = path.with_extension("tmp");
        let result = (|| -> std::io::Result<(File, u64)> {
            std::fs::create_dir_all(&self.dir)?;
            let mut bytes = start_record(start, applied);
            for e in entries {
                if let Some(r) = entry_record(e) {
                    bytes.extend_from_slice(&r);
                }
            }
            std::fs::write(&tmp, &bytes)?;
            std::fs::rename(&tmp, &path)?;
            let file = OpenOptions::new().append(true).open(&path)?;
            Ok((file, bytes.len() as u64))
        })();
        match result {
            Ok(f) => {
                self.files.lock().insert(id, f);
            }
            Err(e) => {
                self.files.lock().remove(&id);
                self.warn(&path, e);
            }
        }
    }

    /// Fills `source`'s log from the file of `view` (a fresh log when there is none, or when
    /// the file misses a write the view made).
    pub(crate) fn load(&self, view: &Arc<View>, source: &Source, limits: LogLimits) {
        let id = view.table.id;
        let path = self.path(id);
        let mut log = source.log.lock();
        let fresh_start = log.start;
        let data = std::fs::read(&path).unwrap_or_default();
        let mut at = 0;
        let mut start = None;
        let mut marker_applied = 0;
        let mut entries: Vec<Entry> = Vec::new();
        while let (Some(len), Some(crc)) = (
            data.get(at..at + 4)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes),
            data.get(at + 4..at + 8)
                .and_then(|b| b.try_into().ok())
                .map(u32::from_le_bytes),
        ) {
            let Some(p) = data.get(at + 8..at + 8 + len as usize) else {
                break;
            };
            if crc32fast::hash(p) != crc {
                break;
            }
            match p.first() {
                Some(&START) => {
                    start = u64_at(p, 1);
                    marker_applied = u64_at(p, 9).unwrap_or(0);
                    entries.clear();
                }
                Some(&ENTRY) => match parse_entry(&p[1..]) {
                    Some(e) => entries.push(e),
                    None => break,
                },
                _ => break,
            }
            at += 8 + len as usize;
        }
        // The view's stored applied sequence is that of its last write (progress is written
        // only with its rows): the log is complete when it has logged that write.
        let applied = view.status.lock().applied;
        let backfilled = view.def.lock().backfilled;
        let logged = entries.last().map_or(marker_applied, |e| e.applied);
        let complete = start.is_some() && logged >= applied;
        if complete && backfilled {
            log.start = start.unwrap_or(fresh_start);
            for e in entries {
                source.push(&mut log, e, limits.bytes, limits.age);
            }
            if let Some(e) = log.entries.back() {
                log.watermark = e.watermark;
            }
        } else {
            log.start = fresh_start;
        }
        let start = log.start;
        self.rewrite(id, (start, applied), log.entries.iter());
    }

    /// Appends `entry` (just pushed to `log`) to the file of `view`.
    pub(crate) fn append(&self, view: &View, entry: &Entry, log: &Log, limits: LogLimits) {
        let id = view.table.id;
        let Some(record) = entry_record(entry) else {
            return;
        };
        let too_big = {
            let mut files = self.files.lock();
            match files.get_mut(&id) {
                Some((file, size)) => {
                    if let Err(e) = file.write_all(&record) {
                        files.remove(&id);
                        self.warn(&self.path(id), e);
                        return;
                    }
                    *size += record.len() as u64;
                    *size > 2 * limits.bytes as u64
                }
                None => true,
            }
        };
        if too_big {
            self.rewrite(id, (log.start, 0), log.entries.iter());
        }
    }

    /// The log of `view` restarts at `start`, the view having applied writes up to `applied`.
    pub(crate) fn reset(&self, view: &View, start: u64, applied: u64) {
        self.rewrite(view.table.id, (start, applied), std::iter::empty());
    }

    /// Deletes the file of the view stored in table `id`.
    pub(crate) fn remove(&self, id: u64) {
        self.files.lock().remove(&id);
        let _ = std::fs::remove_file(self.path(id));
    }
}
