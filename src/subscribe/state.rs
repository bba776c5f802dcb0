//! One subscriber: how it starts (the query analysed, its source and compiled feed found or
//! made, the resume point checked) and the state machine that turns the source's log into
//! its messages: snapshot parts, then changes, progress, reset or lagged.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};

use arrow::array::RecordBatch;
use datafusion::physical_plan::SendableRecordBatchStream;
use futures::StreamExt;

use super::feed::{self, Feed};
use super::log::{Read, Source};
use super::{ChangeBatch, ChangeKind, Hub, SubscribeError, SubscribeOptions, Subscription};
use crate::error::Error;

/// Counts a subscriber while it lives (the clock says when the last one left).
struct Attached(Arc<Source>, Arc<dyn crate::clock::Clock>);

impl Drop for Attached {
    fn drop(&mut self) {
        if self.0.subscribers.fetch_sub(1, Ordering::AcqRel) == 1 {
            *self.0.idle_since.lock() = Some(self.1.now_ns());
        }
    }
}

enum Phase {
    /// Take a snapshot (after a reset with this reason, if any).
    Snapshot(Option<String>),
    /// Sending the snapshot's parts.
    Snapshotting(Snapshotting),
    Live,
}

/// A snapshot being sent: its stream, the batch read ahead, and the position it brings the
/// client to.
struct Snapshotting {
    stream: SendableRecordBatchStream,
    next: Option<RecordBatch>,
    first: bool,
    seq: u64,
    watermark: Option<i64>,
}

struct State {
    /// Lists it in `system.subscriptions` while it lives.
    _registration: super::listing::Registration,
    hub: Arc<Hub>,
    /// Keeps the database open while the subscription lives.
    _keep: Option<Arc<dyn std::any::Any + Send + Sync>>,
    source: Arc<Source>,
    _attached: Attached,
    feed: Arc<Feed>,
    sql: String,
    options: SubscribeOptions,
    databases: Option<Vec<String>>,
    /// `sql` reads the subscription view the hub made for the query subscribed to.
    subscription_view: bool,
    phase: Phase,
    cursor: u64,
    /// What the source reflects at `cursor`.
    applied: u64,
    position: Arc<AtomicU64>,
    out: VecDeque<ChangeBatch>,
    rx: tokio::sync::watch::Receiver<u64>,
    quiet_since: tokio::time::Instant,
    done: bool,
}

impl State {
    fn applied(&self) -> u64 {
        self.applied
    }

    fn emit(&mut self, m: ChangeBatch) {
        self.out.push_back(m);
    }

    /// Plans the snapshot at the source's current frontier.
    async fn start_snapshot(&mut self, reset: Option<String>) -> Result<(), Error> {
        let df = self
            .hub
            .plan(
                &self.options.db,
                &self.sql,
                self.databases.as_deref(),
                self.subscription_view,
            )
            .await?;
        let (seq, watermark) = {
            let log = self.source.log.lock();
            let seq = self.source.frontier(&log, self.hub.visible());
            self.applied = self.source.applied_at(seq);
            (seq, log.watermark)
        };
        let (state, plan) = df.into_parts();
        if let Some(s) = state
            .config()
            .get_extension::<crate::query::QuerySnapshot>()
        {
            s.seq.store(seq, Ordering::Release);
        }
        let stream = datafusion::dataframe::DataFrame::new(state, plan)
            .execute_stream()
            .await?;
        if let Some(reason) = reset {
            let mut m =
                ChangeBatch::control(ChangeKind::Reset, seq, self.applied(), &self.feed.schema);
            m.reason = Some(reason);
            self.emit(m);
        }
        self.phase = Phase::Snapshotting(Snapshotting {
            stream,
            next: None,
            first: true,
            seq,
            watermark,
        });
        Ok(())
    }

    async fn step(&mut self) -> Result<(), Error> {
        match std::mem::replace(&mut self.phase, Phase::Live) {
            Phase::Snapshot(reset) => self.start_snapshot(reset).await,
            Phase::Snapshotting(part) => self.snapshot_part(part).await,
            Phase::Live => {
                if self.read_log()? {
                    return Ok(());
                }
                self.wait().await
            }
        }
    }

    /// Sends the next part of the snapshot (looking one batch ahead to mark the last part;
    /// empty batches are skipped).
    async fn snapshot_part(&mut self, part: Snapshotting) -> Result<(), Error> {
        let Snapshotting {
            mut stream,
            next,
            first,
            seq,
            watermark,
        } = part;
        let mut current = match next {
            Some(b) => Some(b),
            None => stream.next().await.transpose()?,
        };
        let mut following = None;
        while current.is_some() {
            match stream.next().await.transpose()? {
                Some(b) if b.num_rows() == 0 => continue,
                other => {
                    following = other;
                    break;
                }
            }
        }
        let last = following.is_none();
        let rows = match current.take() {
            Some(b) => b,
            None => RecordBatch::new_empty(self.feed.schema.clone()),
        };
        let (rows, ops, finals) = self.feed.snapshot_rows(rows, watermark)?;
        let applied = self.applied();
        self.emit(ChangeBatch {
            kind: ChangeKind::Snapshot { first, last },
            seq,
            applied,
            rows,
            ops,
            finals,
            reason: None,
            json: Arc::new(OnceLock::new()),
        });
        if last {
            self.cursor = seq;
            self.quiet_since = tokio::time::Instant::now();
        } else {
            self.phase = Phase::Snapshotting(Snapshotting {
                stream,
                next: following,
                first: false,
                seq,
                watermark,
            });
        }
        Ok(())
    }

    /// Takes what the log holds after the cursor: changes (conflated when too many for a keyed
    /// result), or a reset / lagged when the cursor is older than the log. True when it queued
    /// a message or changed phase.
    fn read_log(&mut self) -> Result<bool, Error> {
        self.rx.borrow_and_update();
        let hub = self.hub.clone();
        match self.source.read_after(self.cursor, &|| hub.visible()) {
            Read::Closed(reason) => Err(SubscribeError::Ended(reason).into()),
            Read::Behind(start) => {
                let reason = format!(
                    "the change log starts after sequence {start}; this subscriber was at {}",
                    self.cursor
                );
                if self.feed.keyed() {
                    self.phase = Phase::Snapshot(Some(reason));
                } else {
                    self.lagged(reason);
                }
                Ok(true)
            }
            Read::Entries(entries, frontier, applied) => {
                if entries.len() > self.options.queue_len && !self.feed.keyed() {
                    self.lagged(format!(
                        "{} changes behind (queue {})",
                        entries.len(),
                        self.options.queue_len
                    ));
                    return Ok(true);
                }
                let mut processed = Vec::new();
                for e in &entries {
                    if let Some(p) = self.feed.process(e)? {
                        processed.push(p);
                    }
                }
                if processed.len() > self.options.queue_len {
                    // Keyed: the latest row per key says everything a slow client needs.
                    let merged = self.feed.conflate(&processed)?;
                    processed = vec![Arc::new(merged)];
                }
                let sent = !processed.is_empty();
                for p in processed {
                    self.emit(ChangeBatch::from_processed(&p));
                }
                self.cursor = frontier;
                self.applied = self.applied.max(applied);
                if sent {
                    self.quiet_since = tokio::time::Instant::now();
                }
                Ok(sent)
            }
        }
    }

    /// Waits for the log to move, or sends progress after `progress_interval` of quiet.
    async fn wait(&mut self) -> Result<(), Error> {
        let deadline = self.quiet_since + self.options.progress_interval;
        tokio::select! {
            changed = self.rx.changed() => {
                if changed.is_err() {
                    return Err(SubscribeError::Ended("the database is closing".into()).into());
                }
            }
            _ = tokio::time::sleep_until(deadline) => {
                let m = ChangeBatch::control(ChangeKind::Progress, self.cursor, self.applied(), &self.feed.schema);
                self.emit(m);
                self.quiet_since = tokio::time::Instant::now();
            }
        }
        Ok(())
    }

    fn lagged(&mut self, reason: String) {
        let mut m = ChangeBatch::control(
            ChangeKind::Lagged,
            self.cursor,
            self.applied(),
            &self.feed.schema,
        );
        m.reason = Some(reason);
        self.emit(m);
        self.done = true;
    }

    async fn next(&mut self) -> Option<Result<ChangeBatch, Error>> {
        loop {
            if let Some(m) = self.out.pop_front() {
                if !matches!(
                    m.kind,
                    ChangeKind::Snapshot { last: false, .. } | ChangeKind::Reset
                ) {
                    self.position.store(m.seq, Ordering::Release);
                }
                return Some(Ok(m));
            }
            if self.done {
                return None;
            }
            if let Err(e) = self.step().await {
                self.done = true;
                return Some(Err(e));
            }
        }
    }
}

/// Starts a subscription (see [`crate::Db::subscribe`]): `databases` are the ones its caller
/// may read (None: any), `owner` the token it came with (quotas count per token).
pub(crate) async fn subscribe(
    hub: &Arc<Hub>,
    sql: &str,
    options: SubscribeOptions,
    databases: Option<Vec<String>>,
    owner: Option<Arc<str>>,
) -> Result<Subscription, Error> {
    let user_sql = sql;
    // Planned with the caller's rights whether or not a subscription view serves it.
    let df = hub
        .plan(&options.db, sql, databases.as_deref(), false)
        .await?;
    let (session, plan) = df.into_parts();
    match feed::analyse(&hub.views, &options.db, &plan) {
        Ok(target) => start(hub, sql, sql, options, databases, false, session, target).await,
        Err(refused) if feed::needs_view(&plan) => {
            // An aggregate (or join, window…) query: kept current by a subscription view.
            let (name, attaching) = hub
                .shared_view(&options.db, sql, databases.as_deref(), owner.as_ref())
                .await
                .map_err(|e| match e {
                    Error::View(v) => Error::Subscribe(SubscribeError::Unsupported(format!(
                        "{refused}; a materialized view for it could not be created: {v}"
                    ))),
                    other => other,
                })?;
            let sql = format!("SELECT * FROM {}", crate::views::plan::quote(&name));
            let df = hub
                .plan(&options.db, &sql, databases.as_deref(), true)
                .await?;
            let (session, plan) = df.into_parts();
            let target = feed::analyse(&hub.views, &options.db, &plan)?;
            let subscription = start(
                hub, &sql, user_sql, options, databases, true, session, target,
            )
            .await;
            // Attached (a subscriber of the view's log) or failed: the collector may judge it.
            drop(attaching);
            subscription
        }
        Err(e) => Err(e),
    }
}

/// Starts following `target` (what `sql` reads, planned in `session`); listed with the
/// query the user subscribed to (`listed`).
#[allow(clippy::too_many_arguments)]
async fn start(
    hub: &Arc<Hub>,
    sql: &str,
    listed: &str,
    options: SubscribeOptions,
    databases: Option<Vec<String>>,
    subscription_view: bool,
    session: datafusion::execution::session_state::SessionState,
    target: feed::Analysed,
) -> Result<Subscription, Error> {
    let source = match &target.source {
        feed::Target::View(v) => hub.view_source(v),
        feed::Target::Table(t) => hub.table_source(t),
    };
    let feed = {
        let key = (options.db.clone(), sql.to_string());
        let mut feeds = source.feeds.lock();
        feeds.retain(|_, f| f.strong_count() > 0);
        match feeds.get(&key).and_then(Weak::upgrade) {
            Some(f) => f,
            None => {
                let f = Arc::new(Feed::new(&session, &source, target)?);
                feeds.insert(key, Arc::downgrade(&f));
                f
            }
        }
    };
    source.subscribers.fetch_add(1, Ordering::AcqRel);
    *source.idle_since.lock() = None;
    let attached = Attached(source.clone(), hub.engine.config.clock.clone());
    let position = Arc::new(AtomicU64::new(0));
    let registration = hub.register(
        &options.db,
        listed,
        &source.kind,
        subscription_view,
        position.clone(),
    );
    let mut state = State {
        _registration: registration,
        hub: hub.clone(),
        _keep: hub.hold(),
        rx: source.tx.subscribe(),
        source,
        _attached: attached,
        feed: feed.clone(),
        sql: sql.to_string(),
        databases,
        subscription_view,
        phase: Phase::Live,
        cursor: 0,
        applied: 0,
        position: position.clone(),
        out: VecDeque::new(),
        quiet_since: tokio::time::Instant::now(),
        done: false,
        options,
    };
    let visible = hub.visible();
    let frontier = {
        let log = state.source.log.lock();
        (log.start, state.source.frontier(&log, visible))
    };
    match state.options.since {
        Some(since) if since >= frontier.0 && since <= frontier.1 => state.cursor = since,
        Some(since) => {
            state.phase = Phase::Snapshot(Some(if since > frontier.1 {
                format!(
                    "sequence {since} is ahead of this source (at {})",
                    frontier.1
                )
            } else {
                format!(
                    "sequence {since} is older than the retained change log (it starts after {})",
                    frontier.0
                )
            }))
        }
        None if state.options.snapshot => {
            // Planned now, so a bad query fails the subscribe call itself.
            state.start_snapshot(None).await?;
        }
        None => {
            state.cursor = frontier.1;
            state.applied = state.source.applied_at(frontier.1);
        }
    }
    position.store(state.cursor, Ordering::Release);
    let schema = feed.schema.clone();
    let inner = futures::stream::unfold(
        state,
        |mut st| async move { st.next().await.map(|m| (m, st)) },
    );
    Ok(Subscription {
        schema,
        position,
        inner: Box::pin(inner),
    })
}
