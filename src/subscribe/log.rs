//! Change logs: one per source (a materialized view or a table), shared by all its
//! subscribers, holding recent entries by size and age so subscribers can resume.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use arrow::array::{BooleanArray, RecordBatch};
use parking_lot::Mutex;

use super::feed::Feed;
use crate::storage::buffer::Chunk;
use crate::storage::table::Table;
use crate::views::View;

/// A change-log entry: one write's rows for a source.
pub(crate) struct Entry {
    pub seq: u64,
    pub applied: u64,
    pub data: EntryData,
    /// When it was logged, by the database clock (ns since the epoch).
    pub at: i64,
    pub bytes: usize,
    /// The view's watermark after this change (views with a time bucket).
    pub watermark: Option<i64>,
}

pub(crate) enum EntryData {
    /// Rows written to a table, as the write carried them.
    Chunk(Arc<Chunk>),
    /// A view's changed rows as its columns, and which of them are deletions.
    View {
        rows: RecordBatch,
        deleted: BooleanArray,
    },
}

/// What a source is.
pub(crate) enum SourceKind {
    Table(Arc<Table>),
    View(Arc<View>),
}

/// The change log of one source.
#[derive(Default)]
pub(crate) struct Log {
    pub entries: VecDeque<Arc<Entry>>,
    pub bytes: usize,
    /// Every change after this sequence is in `entries`.
    pub start: u64,
    /// A view write is under way: changes up to `complete` are logged.
    pub writing: bool,
    pub complete: u64,
    pub watermark: Option<i64>,
    /// Set when the source is gone.
    pub closed: Option<String>,
}

/// One source with its log and subscribers.
pub(crate) struct Source {
    pub kind: SourceKind,
    pub log: Mutex<Log>,
    pub(super) tx: tokio::sync::watch::Sender<u64>,
    pub(super) subscribers: AtomicUsize,
    /// Appended to since the last notification.
    pub(super) dirty: AtomicBool,
    /// When the last subscriber left (table streams are dropped after the log age).
    pub(super) idle_since: Mutex<Option<i64>>,
    /// Compiled queries by (database, query text).
    pub(super) feeds: Mutex<HashMap<(String, String), Weak<Feed>>>,
}

/// What a subscriber finds in the log after its position.
pub(super) enum Read {
    /// Entries after the position, the frontier, and what a view reflects at the frontier.
    Entries(Vec<Arc<Entry>>, u64, u64),
    /// Its position is older than the log.
    Behind(u64),
    Closed(String),
}

impl Source {
    pub(super) fn new(kind: SourceKind, start: u64, now: i64) -> Source {
        Source {
            kind,
            log: Mutex::new(Log {
                start,
                complete: start,
                ..Log::default()
            }),
            tx: tokio::sync::watch::channel(start).0,
            subscribers: AtomicUsize::new(0),
            dirty: AtomicBool::new(false),
            idle_since: Mutex::new(Some(now)),
            feeds: Mutex::new(HashMap::new()),
        }
    }

    /// The sequence up to which the log is complete (under the log lock).
    pub(super) fn frontier(&self, log: &Log, visible: u64) -> u64 {
        if log.writing {
            log.complete
        } else {
            visible.max(log.complete)
        }
    }

    pub(super) fn read_after(&self, cursor: u64, visible: &dyn Fn() -> u64) -> Read {
        let log = self.log.lock();
        if let Some(reason) = &log.closed {
            return Read::Closed(reason.clone());
        }
        let frontier = self.frontier(&log, visible());
        if cursor < log.start {
            return Read::Behind(log.start);
        }
        let from = log.entries.partition_point(|e| e.seq <= cursor);
        let entries = log
            .entries
            .range(from..)
            .take_while(|e| e.seq <= frontier)
            .cloned()
            .collect();
        let frontier = frontier.max(cursor);
        Read::Entries(entries, frontier, self.applied_at(frontier))
    }

    /// What the source reflects once every logged change is applied (read under the log
    /// lock: a view's applied sequence moves only after its round's change is logged).
    pub(super) fn applied_at(&self, frontier: u64) -> u64 {
        match &self.kind {
            SourceKind::View(v) => v.status.lock().applied,
            SourceKind::Table(_) => frontier,
        }
    }

    /// Appends an entry (in sequence order) and trims the log to its bounds.
    pub(super) fn push(
        &self,
        log: &mut Log,
        entry: Entry,
        max_bytes: usize,
        max_age: Duration,
        now: i64,
    ) {
        let max_age = i64::try_from(max_age.as_nanos()).unwrap_or(i64::MAX);
        log.bytes += entry.bytes;
        log.entries.push_back(Arc::new(entry));
        while log.entries.len() > 1
            && (log.bytes > max_bytes
                || log
                    .entries
                    .front()
                    .is_some_and(|e| now.saturating_sub(e.at) > max_age))
        {
            if let Some(e) = log.entries.pop_front() {
                log.bytes -= e.bytes;
                log.start = log.start.max(e.seq);
            }
        }
        self.dirty.store(true, Ordering::Release);
    }

    pub(super) fn notify(&self, seq: u64) {
        self.tx.send_replace(seq);
    }

    pub(super) fn close(&self, reason: &str) {
        self.log.lock().closed = Some(reason.to_string());
        let seq = *self.tx.borrow();
        self.tx.send_replace(seq.saturating_add(1));
    }
}

/// Limits of the change logs.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LogLimits {
    pub bytes: usize,
    pub age: Duration,
}
