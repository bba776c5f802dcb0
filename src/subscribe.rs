//! Live subscriptions: a snapshot of a query's result, then every change to it, pushed.
//!
//! Subscription path (docs/architecture.md §11):
//! 1. a subscription names one source, a materialized view or a table, with a filter and a
//!    projection on it ([`feed`]); anything else is refused with the reason;
//! 2. every source has one change log ([`Source`]) shared by all its subscribers: a table's
//!    log is fed by the group-commit step (the write's chunks, never blocking), a view's by the
//!    view worker after each round that changed it (the rows it wrote, as the view's columns);
//! 3. a subscriber first reads a snapshot at a sequence `V` (the storage reads it as of `V`),
//!    then every log entry after `V`, filtered and projected once per distinct query (the
//!    result is shared by its subscribers, JSON encoding included);
//! 4. the log keeps recent entries (by size and age), so a client that reconnects with the
//!    last sequence it saw resumes exactly; older than the log gets a `reset` and a snapshot.
//!    View logs are also written to disk, so they survive a restart ([`store`]);
//! 5. a subscriber only reads when its transport can take more: ingest never waits for it.
//!    One that falls more than its queue behind is conflated (keyed results: latest row per
//!    key) or told `lagged` and closed (append results).

mod encode;
pub(crate) mod feed;
mod hub;
mod listing;
mod log;
mod shared;
mod state;
pub(crate) mod store;

use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::task::{Context, Poll};
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use futures::Stream;

pub use encode::{error_json, message_arrow, message_json};
pub(crate) use hub::Hub;
pub(crate) use log::LogLimits;
pub(crate) use shared::SharedLimits;
pub(crate) use state::subscribe;

use crate::error::Error;
use feed::Processed;

/// Why a subscription could not start or had to end.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SubscribeError {
    /// The query cannot be maintained incrementally (the reason says why and what to do).
    #[error("cannot subscribe: {0}")]
    Unsupported(String),
    /// The source went away (the view or table was dropped) or the database is closing.
    #[error("subscription ended: {0}")]
    Ended(String),
    /// A quota is full (subscription views, in total or per token); the message names the
    /// limit and the flag that raises it.
    #[error("cannot subscribe: {0}")]
    TooMany(String),
    /// The subscription machinery failed (not the query's fault).
    #[error("subscription failed: {0}")]
    Internal(String),
}

/// What a [`ChangeBatch`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChangeKind {
    /// Part of the snapshot of the current result (`first`/`last` mark its start and end).
    Snapshot {
        /// The first part of this snapshot.
        first: bool,
        /// The last part: changes follow.
        last: bool,
    },
    /// Rows changed by the write(s) up to `seq`.
    Change,
    /// Nothing changed up to `seq`.
    Progress,
    /// The requested resume point is no longer retained: a fresh snapshot follows.
    Reset,
    /// The subscriber fell too far behind an append result and is closed; resume from `seq`.
    Lagged,
}

impl ChangeKind {
    /// The SSE event name.
    pub fn name(self) -> &'static str {
        match self {
            ChangeKind::Snapshot { .. } => "snapshot",
            ChangeKind::Change => "change",
            ChangeKind::Progress => "progress",
            ChangeKind::Reset => "reset",
            ChangeKind::Lagged => "lagged",
        }
    }
}

/// What happened to one row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// A new row of an append result (a table stream).
    Insert,
    /// The row with this key now has these values (keyed results: views).
    Upsert,
    /// The row with this key is gone.
    Delete,
}

impl Op {
    /// `insert`, `upsert` or `delete`.
    pub fn name(self) -> &'static str {
        match self {
            Op::Insert => "insert",
            Op::Upsert => "upsert",
            Op::Delete => "delete",
        }
    }
}

/// One message of a subscription.
#[derive(Debug, Clone)]
pub struct ChangeBatch {
    /// What this message is.
    pub kind: ChangeKind,
    /// Position in the stream: the write sequence this message brings the client to. Resume
    /// with the `seq` of the last change, progress or final snapshot part received.
    pub seq: u64,
    /// For a view, the last source write it reflects; for a table, `seq`.
    pub applied: u64,
    /// The rows (the query's columns); empty for progress, reset and lagged.
    pub rows: RecordBatch,
    /// One op per row.
    pub ops: Arc<[Op]>,
    /// Per row, whether its window is final (views with `emit = 'on_change'` and a time
    /// bucket); None otherwise.
    pub finals: Option<Arc<[bool]>>,
    /// A reason, for reset and lagged.
    pub reason: Option<String>,
    /// The rows as JSON, encoded once for every subscriber that shares them.
    pub(crate) json: Arc<OnceLock<String>>,
}

impl ChangeBatch {
    /// A copy that encodes its rows again (for benchmarks).
    #[doc(hidden)]
    pub fn uncached(&self) -> ChangeBatch {
        ChangeBatch {
            json: Arc::new(OnceLock::new()),
            ..self.clone()
        }
    }

    fn control(kind: ChangeKind, seq: u64, applied: u64, schema: &SchemaRef) -> ChangeBatch {
        ChangeBatch {
            kind,
            seq,
            applied,
            rows: RecordBatch::new_empty(schema.clone()),
            ops: Arc::from(Vec::new()),
            finals: None,
            reason: None,
            json: Arc::new(OnceLock::new()),
        }
    }

    fn from_processed(p: &Processed) -> ChangeBatch {
        ChangeBatch {
            kind: ChangeKind::Change,
            seq: p.seq,
            applied: p.applied,
            rows: p.rows.clone(),
            ops: p.ops.clone(),
            finals: p.finals.clone(),
            reason: None,
            json: p.json.clone(),
        }
    }
}

/// How to subscribe.
#[derive(Debug, Clone)]
pub struct SubscribeOptions {
    /// Database the query's unqualified names refer to. Default: `main`.
    pub db: String,
    /// Resume after this sequence (no snapshot) when the log still holds it; else a `reset`
    /// and a snapshot. Default: none (start with a snapshot).
    pub since: Option<u64>,
    /// Start with a snapshot of the current result. Default: true. With false and no `since`,
    /// only changes from now on are sent.
    pub snapshot: bool,
    /// A progress message is sent after this long without any other. Default: 2 s.
    pub progress_interval: Duration,
    /// Change messages a subscriber may fall behind before it is conflated (keyed results)
    /// or told `lagged` and closed (append results). Default: 1024.
    pub queue_len: usize,
}

impl Default for SubscribeOptions {
    fn default() -> Self {
        SubscribeOptions {
            db: "main".to_string(),
            since: None,
            snapshot: true,
            progress_interval: Duration::from_secs(2),
            queue_len: 1024,
        }
    }
}

/// A live subscription: a stream of [`ChangeBatch`]es that never ends on its own (only when
/// its source is dropped, the database closes, or it lags an append result).
///
/// Cancel-safe: a `next()` future dropped before it completes loses nothing (the next call
/// continues where it was). Dropping the subscription unsubscribes.
pub struct Subscription {
    schema: SchemaRef,
    position: Arc<AtomicU64>,
    inner: Pin<Box<dyn Stream<Item = Result<ChangeBatch, Error>> + Send>>,
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("position", &self.position())
            .finish_non_exhaustive()
    }
}

impl Subscription {
    /// The schema of the rows (the query's columns).
    pub fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    /// The sequence the client is at after the messages taken so far.
    pub fn position(&self) -> u64 {
        self.position.load(Ordering::Acquire)
    }
}

impl Stream for Subscription {
    type Item = Result<ChangeBatch, Error>;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}
