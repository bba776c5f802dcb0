//! The write-ahead log: segmented, append-only files of checksummed records.
//!
//! A segment file is `wal/<first sequence, 20 digits>.wal`: a 16-byte header (`RIVWAL` magic,
//! format version) then records `[payload length: u32 LE][crc32 of payload: u32 LE][payload]`.
//! A payload starts with the write's sequence (u64 LE) and a kind byte; a write record then holds
//! the database name and, per table, its name and the rows as an Arrow IPC stream (so the WAL
//! carries the schema of what it holds). Byte layouts: docs/file-format.md.
//!
//! Replay reads segments in order. A torn tail of the newest segment (an incomplete or
//! checksum-failing last record, nothing intact after it) is what a crash leaves: replay cuts it
//! off and reports it. Damage with intact records after it, or in an older segment, fails the
//! open with the file, the offset and the count of intact records that follow, unless the
//! operator opens with [`WalRecovery::SkipDamaged`] ([`scan`] tells the two apart).

mod scan;

pub use scan::WalRecovery;

use super::io::{Io, IoOp};
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::ipc::reader::StreamReader;
use arrow::ipc::writer::StreamWriter;

/// Magic bytes at the start of every segment.
pub(crate) const WAL_MAGIC: &[u8; 6] = b"RIVWAL";
/// The segment format version this build writes and reads.
pub(crate) const WAL_FORMAT_VERSION: u16 = 1;
const HEADER_LEN: u64 = 16;
const RECORD_HEADER_LEN: usize = 8;
/// Records larger than this are treated as corrupt (a torn length field).
const MAX_RECORD_BYTES: u32 = 1 << 30;
const KIND_WRITE: u8 = 1;

/// Errors of the WAL.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WalError {
    /// An I/O operation failed.
    #[error("WAL {op} failed for {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// Appending a write failed and was undone (the partial record cut off): nothing of the
    /// write is in the log, and the log takes the next write. A full disk reads "no space
    /// left on device": writes fail until space is freed, queries are still answered.
    #[error("the write was not stored: appending it to {path} failed ({source}) and was undone{hint}",
        hint = if source.raw_os_error() == Some(28) {
            "; the disk is full: writes are refused until space is freed, queries are still answered"
        } else {
            ""
        })]
    NotAppended {
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: io::Error,
    },
    /// A segment other than the last is damaged: replaying past it would lose data silently.
    #[error("WAL segment {path} is corrupt at byte {offset}: {reason}")]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// Offset of the bad record.
        offset: u64,
        /// What is wrong.
        reason: String,
    },
    /// A segment is damaged and intact records follow the damage (or later segments do):
    /// cutting the log there would drop acknowledged writes.
    #[error(
        "WAL segment {path} is damaged at byte {offset} ({reason}); {intact_after} intact \
         records follow it in that file and {later_segments} newer segments after it. Refusing \
         to open, since cutting the log there would drop acknowledged writes. {hint}",
        hint = WalRecovery::HINT
    )]
    Damaged {
        /// The file.
        path: PathBuf,
        /// Offset of the first bad record.
        offset: u64,
        /// What is wrong with it.
        reason: String,
        /// Intact records after the damage in the same file.
        intact_after: usize,
        /// Segments after this one.
        later_segments: usize,
    },
    /// A segment was written by an incompatible version of Rivulet.
    #[error("WAL segment {path} has format version {found}; this build reads version {expected}")]
    Version {
        /// The file.
        path: PathBuf,
        /// Version found.
        found: u16,
        /// Version this build reads.
        expected: u16,
    },
    /// A previous WAL write or fsync failed; the log cannot promise durability any more.
    #[error("the WAL stopped accepting writes after an I/O failure ({0}); reopen the database")]
    Poisoned(String),
    /// A record could not be applied at open (its rows no longer fit the catalog).
    #[error("WAL record {seq} could not be replayed: {source}")]
    Replay {
        /// The sequence of the record.
        seq: u64,
        /// Why.
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// A record's contents could not be encoded or decoded.
    #[error("WAL record {seq} could not be {op}: {reason}")]
    Record {
        /// The sequence of the record.
        seq: u64,
        /// "encoded", "decoded" or "replayed".
        op: &'static str,
        /// Why.
        reason: String,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WalError + 'a {
    move |source| WalError::Io {
        op,
        path: path.to_path_buf(),
        source,
    }
}

/// A decoded write record.
#[derive(Debug)]
pub(crate) struct WriteRecord {
    pub(crate) seq: u64,
    pub(crate) db: String,
    pub(crate) tables: Vec<(String, RecordBatch)>,
}

/// Encodes a write record's payload.
pub(crate) fn encode_write(
    seq: u64,
    db: &str,
    tables: &[(&str, &RecordBatch)],
    out: &mut Vec<u8>,
) -> Result<(), WalError> {
    let fail = |reason: String| WalError::Record {
        seq,
        op: "encoded",
        reason,
    };
    out.extend_from_slice(&seq.to_le_bytes());
    out.push(KIND_WRITE);
    put_bytes(out, db.as_bytes());
    out.extend_from_slice(&(tables.len() as u32).to_le_bytes());
    for (name, batch) in tables {
        put_bytes(out, name.as_bytes());
        let len_at = out.len();
        out.extend_from_slice(&0u32.to_le_bytes());
        let start = out.len();
        {
            let mut writer = StreamWriter::try_new(&mut *out, &batch.schema())
                .map_err(|e| fail(e.to_string()))?;
            writer.write(batch).map_err(|e| fail(e.to_string()))?;
            writer.finish().map_err(|e| fail(e.to_string()))?;
        }
        let len = (out.len() - start) as u32;
        out[len_at..len_at + 4].copy_from_slice(&len.to_le_bytes());
    }
    Ok(())
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    out.extend_from_slice(&(b.len() as u32).to_le_bytes());
    out.extend_from_slice(b);
}

struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.pos.checked_add(n)?;
        let s = self.buf.get(self.pos..end)?;
        self.pos = end;
        Some(s)
    }
    fn u32(&mut self) -> Option<u32> {
        self.take(4)
            .and_then(|b| b.try_into().ok())
            .map(u32::from_le_bytes)
    }
    fn u64(&mut self) -> Option<u64> {
        self.take(8)
            .and_then(|b| b.try_into().ok())
            .map(u64::from_le_bytes)
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
}

/// Decodes a payload written by [`encode_write`].
pub(crate) fn decode_write(payload: &[u8]) -> Result<WriteRecord, WalError> {
    let mut c = Cursor {
        buf: payload,
        pos: 0,
    };
    let seq = c.u64().unwrap_or(0);
    let fail = |reason: &str| WalError::Record {
        seq,
        op: "decoded",
        reason: reason.to_string(),
    };
    let kind = c.take(1).ok_or_else(|| fail("truncated"))?[0];
    if kind != KIND_WRITE {
        return Err(fail(&format!("unknown record kind {kind}")));
    }
    let db = c.bytes().ok_or_else(|| fail("truncated database name"))?;
    let db = std::str::from_utf8(db).map_err(|_| fail("database name is not UTF-8"))?;
    let n = c.u32().ok_or_else(|| fail("truncated"))?;
    let mut tables = Vec::with_capacity(n as usize);
    for _ in 0..n {
        let name = c.bytes().ok_or_else(|| fail("truncated table name"))?;
        let name = std::str::from_utf8(name).map_err(|_| fail("table name is not UTF-8"))?;
        let ipc = c.bytes().ok_or_else(|| fail("truncated table rows"))?;
        let reader = StreamReader::try_new(ipc, None).map_err(|e| fail(&e.to_string()))?;
        for batch in reader {
            let batch = batch.map_err(|e| fail(&e.to_string()))?;
            tables.push((name.to_string(), batch));
        }
    }
    Ok(WriteRecord {
        seq,
        db: db.to_string(),
        tables,
    })
}

/// Name of the segment whose first record has sequence `seq`.
fn segment_name(seq: u64) -> String {
    format!("{seq:020}.wal")
}

/// Lists segment files in sequence order.
pub(crate) fn list_segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, WalError> {
    let mut out = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(io_err("listing", dir))?;
    for entry in entries {
        let entry = entry.map_err(io_err("listing", dir))?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(seq) = name
            .strip_suffix(".wal")
            .and_then(|s| s.parse::<u64>().ok())
        {
            out.push((seq, entry.path()));
        }
    }
    out.sort();
    Ok(out)
}

/// Deletes the segments that hold only records up to `seq` (all of them persisted): a segment
/// is covered when the next segment starts at or before `seq + 1`, or when it is not the
/// newest and `closed_through` says the writer rotated after `seq`. Returns how many it removed.
pub(crate) fn remove_segments_through(
    dir: &Path,
    seq: u64,
    rotated: bool,
) -> Result<usize, WalError> {
    let segments = list_segments(dir)?;
    let mut removed = 0;
    for (i, (first, path)) in segments.iter().enumerate() {
        let covered = match segments.get(i + 1) {
            Some((next, _)) => *next <= seq + 1,
            // The newest segment: only when the writer rotated away from it after `seq`.
            None => rotated && *first <= seq,
        };
        if covered {
            std::fs::remove_file(path).map_err(io_err("removing", path))?;
            removed += 1;
        }
    }
    if removed > 0 {
        sync_dir(dir)?;
    }
    Ok(removed)
}

/// What replay found.
#[derive(Debug, Default, Clone)]
pub struct ReplayReport {
    /// Segments read.
    pub segments: usize,
    /// Records replayed.
    pub records: u64,
    /// Highest sequence replayed.
    pub last_seq: Option<u64>,
    /// A torn tail was cut off the newest segment: (file, offset, reason).
    pub truncated_tail: Option<(PathBuf, u64, String)>,
    /// Damaged segments repaired under [`WalRecovery::SkipDamaged`].
    pub recovered: Vec<RecoveredSegment>,
}

/// A damaged segment that replay kept the intact records of (under
/// [`WalRecovery::SkipDamaged`]).
#[derive(Debug, Clone)]
pub struct RecoveredSegment {
    /// The segment, now holding only its intact records.
    pub path: PathBuf,
    /// The copy of the file as it was found.
    pub moved_to: PathBuf,
    /// The damaged stretches: (offset, end, reason).
    pub damaged: Vec<(u64, u64, String)>,
    /// Intact records kept.
    pub kept: usize,
}

/// Replays every record in `dir`, calling `apply(payload)` in order. A torn tail of the newest
/// segment is cut off; other damage fails the replay or, under `recovery`, is set aside
/// ([`scan`] tells them apart).
pub(crate) fn replay(
    dir: &Path,
    recovery: WalRecovery,
    io: &Io,
    mut apply: impl FnMut(&[u8]) -> Result<u64, WalError>,
) -> Result<ReplayReport, WalError> {
    let segments = list_segments(dir)?;
    let mut report = ReplayReport::default();
    let count = segments.len();
    for (i, (_, path)) in segments.iter().enumerate() {
        let is_last = i + 1 == count;
        report.segments += 1;
        let data = io
            .check(IoOp::WalRead, path)
            .and_then(|()| std::fs::read(path))
            .map_err(io_err("reading", path))?;
        if data.len() >= 8 && &data[..6] == WAL_MAGIC {
            let found = u16::from_le_bytes([data[6], data[7]]);
            if found != WAL_FORMAT_VERSION {
                return Err(WalError::Version {
                    path: path.clone(),
                    found,
                    expected: WAL_FORMAT_VERSION,
                });
            }
        }
        let mut bad_header = None;
        if let Err(Damage(reason)) = check_header(&data) {
            if is_last && data.len() < HEADER_LEN as usize {
                // A crash right after creating the file: nothing in it was acknowledged.
                truncate_tail(path, 0)?;
                std::fs::remove_file(path).map_err(io_err("removing", path))?;
                report.truncated_tail = Some((path.clone(), 0, reason));
                continue;
            }
            if recovery == WalRecovery::Strict {
                return Err(WalError::Corrupt {
                    path: path.clone(),
                    offset: 0,
                    reason: format!("{reason}; {}", WalRecovery::HINT),
                });
            }
            bad_header = Some(reason);
        }
        let found = scan::scan(&data, report.last_seq);
        let mut repair = bad_header.is_some();
        if let Some(first) = found.damage.first() {
            if is_last && !repair && found.torn_tail_only() {
                truncate_tail(path, first.offset)?;
                report.truncated_tail = Some((path.clone(), first.offset, first.reason.clone()));
            } else if recovery == WalRecovery::Strict {
                return Err(WalError::Damaged {
                    path: path.clone(),
                    offset: first.offset,
                    reason: first.reason.clone(),
                    intact_after: found.intact_after_damage,
                    later_segments: count - i - 1,
                });
            } else {
                repair = true;
            }
        }
        if repair {
            report
                .recovered
                .push(set_aside(io, path, &data, &found, bad_header)?);
        }
        for range in &found.records {
            apply(&data[range.clone()])?;
            report.records += 1;
        }
        if found.last_seq.is_some() {
            report.last_seq = found.last_seq;
        }
    }
    Ok(report)
}

/// Keeps a copy of a damaged segment (`<segment>.damaged`, or `.damaged.N` when taken) and
/// replaces the segment with its intact records. Every step can be repeated after a crash: the
/// segment is replaced by a rename, after its copy is durable.
fn set_aside(
    io: &Io,
    path: &Path,
    data: &[u8],
    found: &scan::Scan,
    bad_header: Option<String>,
) -> Result<RecoveredSegment, WalError> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut moved_to = path.with_extension("wal.damaged");
    let mut n = 1;
    while moved_to.exists() {
        moved_to = path.with_extension(format!("wal.damaged.{n}"));
        n += 1;
    }
    let mut rewritten = Vec::with_capacity(data.len());
    rewritten.extend_from_slice(&segment_header());
    for (offset, range) in found.offsets.iter().zip(&found.records) {
        rewritten.extend_from_slice(&data[*offset..range.end]);
    }
    let tmp = path.with_extension("wal.tmp");
    for (target, bytes) in [(&moved_to, data), (&tmp, &rewritten[..])] {
        io.check(IoOp::WalCreate, target)
            .and_then(|()| {
                let mut f = File::create(target)?;
                f.write_all(bytes)?;
                f.sync_all()
            })
            .map_err(io_err("writing", target))?;
    }
    io.check(IoOp::Rename, &tmp)
        .and_then(|()| std::fs::rename(&tmp, path))
        .map_err(io_err("renaming", &tmp))?;
    sync_dir(dir)?;
    let mut damaged: Vec<(u64, u64, String)> = bad_header
        .map(|reason| (0, HEADER_LEN, reason))
        .into_iter()
        .collect();
    damaged.extend(
        found
            .damage
            .iter()
            .map(|d| (d.offset, d.end, d.reason.clone())),
    );
    tracing::error!(
        path = %path.display(), moved_to = %moved_to.display(), kept = found.records.len(),
        damaged = ?damaged,
        "WAL segment was damaged: its intact records are kept, the damaged bytes are lost, and the file as found is kept aside"
    );
    Ok(RecoveredSegment {
        path: path.to_path_buf(),
        moved_to,
        damaged,
        kept: found.records.len(),
    })
}

/// What is wrong with a segment's header.
#[derive(Debug)]
struct Damage(String);

/// A segment's 16-byte header.
fn segment_header() -> [u8; HEADER_LEN as usize] {
    let mut header = [0u8; HEADER_LEN as usize];
    header[..6].copy_from_slice(WAL_MAGIC);
    header[6..8].copy_from_slice(&WAL_FORMAT_VERSION.to_le_bytes());
    header
}

fn check_header(data: &[u8]) -> Result<(), Damage> {
    if data.len() < HEADER_LEN as usize {
        return Err(Damage("segment header is torn".to_string()));
    }
    if &data[..6] != WAL_MAGIC {
        return Err(Damage("not a Rivulet WAL segment (bad magic)".to_string()));
    }
    let version = u16::from_le_bytes([data[6], data[7]]);
    if version != WAL_FORMAT_VERSION {
        return Err(Damage(format!(
            "WAL format version {version} is not supported (this build reads version {WAL_FORMAT_VERSION})"
        )));
    }
    Ok(())
}

fn truncate_tail(path: &Path, len: u64) -> Result<(), WalError> {
    let f = OpenOptions::new()
        .write(true)
        .open(path)
        .map_err(io_err("opening", path))?;
    f.set_len(len).map_err(io_err("truncating", path))?;
    f.sync_all().map_err(io_err("syncing", path))
}

fn sync_dir(dir: &Path) -> Result<(), WalError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

/// The appending end of the log. Owned by the single writer (behind the write lock).
///
/// The first segment is created lazily by the first append, so opening a database to read it
/// leaves no empty segment behind.
#[derive(Debug)]
pub(crate) struct WalWriter {
    dir: PathBuf,
    current: Option<(PathBuf, Arc<File>)>,
    len: u64,
    max_segment_bytes: u64,
    io: Io,
    buf: Vec<u8>,
}

impl WalWriter {
    pub(crate) fn new(dir: &Path, max_segment_bytes: u64, io: Io) -> WalWriter {
        WalWriter {
            dir: dir.to_path_buf(),
            current: None,
            len: 0,
            max_segment_bytes,
            io,
            buf: Vec::new(),
        }
    }

    /// The file an fsync must cover for everything appended so far (None before any append).
    pub(crate) fn sync_target(&self) -> Option<(Arc<File>, PathBuf)> {
        self.current
            .as_ref()
            .map(|(path, file)| (file.clone(), path.clone()))
    }

    /// Appends one record. If it fails, the file may hold part of it: the caller poisons the log.
    /// Starts a new segment first when there is none or the current one is full (fsyncing it).
    pub(crate) fn append(
        &mut self,
        seq: u64,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), WalError>,
    ) -> Result<(), WalError> {
        self.buf.clear();
        self.buf.extend_from_slice(&[0u8; RECORD_HEADER_LEN]);
        encode(&mut self.buf)?;
        let payload_len = self.buf.len() - RECORD_HEADER_LEN;
        if payload_len > MAX_RECORD_BYTES as usize {
            return Err(WalError::Record {
                seq,
                op: "encoded",
                reason: format!(
                    "the write is {payload_len} bytes; one write may be at most {MAX_RECORD_BYTES} bytes"
                ),
            });
        }
        let crc = crc32fast::hash(&self.buf[RECORD_HEADER_LEN..]);
        self.buf[..4].copy_from_slice(&(payload_len as u32).to_le_bytes());
        self.buf[4..8].copy_from_slice(&crc.to_le_bytes());

        let rotate = match &self.current {
            None => true,
            Some((path, file)) if self.len >= self.max_segment_bytes => {
                WalWriter::sync(&self.io, file, path)?;
                true
            }
            Some(_) => false,
        };
        if rotate {
            // A segment that could not be made is removed again: nothing was appended.
            self.current = Some(new_segment(&self.io, &self.dir, seq).map_err(|e| match e {
                WalError::Io { path, source, .. } => WalError::NotAppended { path, source },
                other => other,
            })?);
            self.len = HEADER_LEN;
        }
        let Some((path, file)) = &self.current else {
            return Err(WalError::Poisoned("no WAL segment".to_string()));
        };
        let appended = self
            .io
            .check(IoOp::WalAppend, path)
            .and_then(|()| (&**file).write_all(&self.buf));
        if let Err(source) = appended {
            // Cut off whatever part of the record reached the file: the log stays whole and
            // takes the next write. Only if that fails too is the log unusable.
            let undone = file
                .set_len(self.len)
                .and_then(|()| (&**file).seek(SeekFrom::Start(self.len)).map(|_| ()));
            return Err(match undone {
                Ok(()) => WalError::NotAppended {
                    path: path.clone(),
                    source,
                },
                Err(_) => WalError::Io {
                    op: "append",
                    path: path.clone(),
                    source,
                },
            });
        }
        self.len += self.buf.len() as u64;
        if self.buf.capacity() > 64 << 20 {
            self.buf = Vec::new();
        }
        Ok(())
    }

    /// Closes the current segment (fsynced), so the next append starts a new one: everything
    /// appended so far is then in segments that [`remove_segments_through`] can delete once
    /// persisted.
    pub(crate) fn rotate(&mut self) -> Result<(), WalError> {
        if let Some((path, file)) = self.current.take() {
            WalWriter::sync(&self.io, &file, &path)?;
        }
        Ok(())
    }

    /// Fsyncs `file` (a target from [`WalWriter::sync_target`]), through the fault hook.
    pub(crate) fn sync(io: &Io, file: &File, path: &Path) -> Result<(), WalError> {
        io.check(IoOp::WalSync, path)
            .map_err(io_err("fsync", path))?;
        file.sync_data().map_err(io_err("fsync", path))
    }
}

fn new_segment(io: &Io, dir: &Path, seq: u64) -> Result<(PathBuf, Arc<File>), WalError> {
    let path = dir.join(segment_name(seq));
    io.check(IoOp::WalCreate, &path)
        .map_err(io_err("creating", &path))?;
    let mut file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(io_err("creating", &path))?;
    let made = file
        .write_all(&segment_header())
        .map_err(io_err("writing header", &path))
        .and_then(|()| file.sync_all().map_err(io_err("fsync", &path)))
        .and_then(|()| {
            file.seek(SeekFrom::End(0))
                .map(|_| ())
                .map_err(io_err("seeking", &path))
        })
        .and_then(|()| sync_dir(dir));
    if let Err(e) = made {
        // A half-made segment would sit before the next one as damage.
        drop(file);
        let _ = std::fs::remove_file(&path);
        return Err(e);
    }
    Ok((path, Arc::new(file)))
}

#[cfg(test)]
mod tests;
