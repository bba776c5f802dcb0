//! Reading one WAL segment's records back, and telling a torn tail from damage.
//!
//! A segment is read record by record. At a record that is torn, fails its checksum or breaks
//! the sequence order, the scan looks for intact records after it: it resynchronises byte by
//! byte on a position whose record header has a length that fits, whose payload is a write
//! record with a sequence after the last good one, and whose checksum matches (a false match
//! needs a 32-bit checksum collision on top of the other checks). What it finds decides what
//! the damage is:
//!
//! - nothing intact after it, in the newest segment: a **torn tail**, the normal state after a
//!   crash mid-append; nothing after it was acknowledged, and replay cuts it off;
//! - intact records after it, or damage in an older segment: **damage**, and cutting the log
//!   there would drop acknowledged writes, so replay refuses to open
//!   ([`WalError::Damaged`](super::WalError::Damaged)) unless the operator chose
//!   [`WalRecovery::SkipDamaged`], which keeps every intact record and moves the damaged file
//!   aside (docs/recovery.md).

use std::ops::Range;

use super::{HEADER_LEN, KIND_WRITE, MAX_RECORD_BYTES, RECORD_HEADER_LEN};

/// What replay does with a damaged WAL segment (not a torn tail, which is always cut).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum WalRecovery {
    /// Refuse to open, naming the file, the offset and how many intact records follow. The
    /// default: nothing acknowledged is dropped without the operator deciding it.
    #[default]
    Strict,
    /// Keep every intact record, move the damaged file aside (`<segment>.damaged`, next to it)
    /// and replace it with one holding only the intact records; the damaged bytes are lost.
    SkipDamaged,
}

impl WalRecovery {
    /// What an error about a damaged segment tells the operator.
    pub(crate) const HINT: &'static str = "To keep every intact record and set the damaged file \
        aside, open with --wal-recovery skip-damaged (Config::wal_recovery); docs/recovery.md";
}

impl std::str::FromStr for WalRecovery {
    type Err = String;

    /// `strict` or `skip-damaged`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "strict" => Ok(WalRecovery::Strict),
            "skip-damaged" => Ok(WalRecovery::SkipDamaged),
            _ => Err(format!(
                "unknown WAL recovery '{s}': expected strict or skip-damaged"
            )),
        }
    }
}

/// One damaged stretch of a segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Damage {
    /// Where the first bad record starts.
    pub(crate) offset: u64,
    /// Where the next intact record starts (the file's end when none follows).
    pub(crate) end: u64,
    /// What was wrong with the first bad record.
    pub(crate) reason: String,
    /// Whether the bad record is one a crash can leave: torn, or failing its checksum. A record
    /// whose checksum holds but whose sequence is out of order was written wrong, never torn.
    pub(crate) tearable: bool,
}

/// The records of one segment.
#[derive(Debug, Default)]
pub(crate) struct Scan {
    /// Payload byte ranges of the intact records, in file order.
    pub(crate) records: Vec<Range<usize>>,
    /// The record offsets of `records` (where each record's header starts).
    pub(crate) offsets: Vec<usize>,
    /// Damaged stretches, in file order.
    pub(crate) damage: Vec<Damage>,
    /// How many of `records` come after the first damage.
    pub(crate) intact_after_damage: usize,
    /// The highest sequence among `records`.
    pub(crate) last_seq: Option<u64>,
}

impl Scan {
    /// Whether the only damage is a torn tail: one tearable stretch with nothing intact after it.
    pub(crate) fn torn_tail_only(&self) -> bool {
        matches!(self.damage.as_slice(), [d] if d.tearable) && self.intact_after_damage == 0
    }
}

/// The sequence of a payload (its first 8 bytes).
pub(crate) fn payload_seq(payload: &[u8]) -> Option<u64> {
    Some(u64::from_le_bytes(payload.get(..8)?.try_into().ok()?))
}

/// The record at `pos`: its payload range and sequence, or why it is not intact (and whether a
/// crash could have left it so).
fn record_at(
    data: &[u8],
    pos: usize,
    after: Option<u64>,
) -> Result<(Range<usize>, u64), (String, bool)> {
    let header = data
        .get(pos..pos + RECORD_HEADER_LEN)
        .ok_or_else(|| ("torn record header".to_string(), true))?;
    let len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]);
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if len > MAX_RECORD_BYTES {
        return Err((format!("record length {len} is implausible"), true));
    }
    let start = pos + RECORD_HEADER_LEN;
    let end = start + len as usize;
    let payload = data
        .get(start..end)
        .ok_or_else(|| ("torn record".to_string(), true))?;
    if payload.len() < 9 {
        // Every payload holds at least a sequence and a kind: zeros from a preallocated or
        // torn block are damage, not an empty record.
        return Err((format!("record of {len} bytes is too short"), true));
    }
    if crc32fast::hash(payload) != crc {
        return Err(("checksum mismatch".to_string(), true));
    }
    let seq = payload_seq(payload).unwrap_or(0);
    if let Some(last) = after.filter(|&last| seq <= last) {
        return Err((format!("sequence {seq} does not follow {last}"), false));
    }
    Ok((start..end, seq))
}

/// The first position at or after `from` where an intact write record with a sequence after
/// `after` starts.
fn next_intact(data: &[u8], from: usize, after: Option<u64>) -> Option<usize> {
    let min_len = RECORD_HEADER_LEN + 9;
    let last_start = data.len().checked_sub(min_len)?;
    (from..=last_start).find(|&p| {
        let len = u32::from_le_bytes([data[p], data[p + 1], data[p + 2], data[p + 3]]) as usize;
        let start = p + RECORD_HEADER_LEN;
        // Cheap checks first: the length fits, the kind is a write, the sequence follows.
        len >= 9
            && len <= data.len() - start
            && data[start + 8] == KIND_WRITE
            && payload_seq(&data[start..]).is_some_and(|s| after.is_none_or(|a| s > a))
            && record_at(data, p, after).is_ok()
    })
}

/// Scans a segment's bytes (header included; the caller checked it) for its records, after
/// the sequence `after` (the last one replayed from earlier segments).
pub(crate) fn scan(data: &[u8], after: Option<u64>) -> Scan {
    let mut out = Scan::default();
    let mut pos = HEADER_LEN as usize;
    let mut last = after;
    while pos < data.len() {
        match record_at(data, pos, last) {
            Ok((range, seq)) => {
                if !out.damage.is_empty() {
                    out.intact_after_damage += 1;
                }
                out.offsets.push(pos);
                pos = range.end;
                out.records.push(range);
                last = Some(seq);
                out.last_seq = Some(seq);
            }
            Err((reason, tearable)) => {
                let next = next_intact(data, pos + 1, last);
                out.damage.push(Damage {
                    offset: pos as u64,
                    end: next.unwrap_or(data.len()) as u64,
                    reason,
                    tearable,
                });
                match next {
                    Some(p) => pos = p,
                    None => break,
                }
            }
        }
    }
    out
}
