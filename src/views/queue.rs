//! The maintenance queue and the registry of views: the group-commit step hands it every
//! applied write that touches a view's source (never blocking), writers are held back while it
//! is over its bound, the worker takes rounds from it, and queries wait on it for views to
//! catch up.

use std::collections::{HashSet, VecDeque};
use std::sync::Arc;

use parking_lot::{Condvar, Mutex, RwLock};

use super::{View, ViewError};
use crate::storage::buffer::Chunk;
use crate::storage::commit::ApplyObserver;
use crate::storage::table::Table;

/// A write handed to the worker: its sequence and the chunks of watched tables.
/// (Queued when, by the database clock, ns.)
pub(super) type Item = (u64, Vec<(u64, Arc<Chunk>)>, i64);

#[derive(Default)]
struct Queue {
    items: VecDeque<Item>,
    bytes: usize,
    /// Largest sequence queued.
    pushed: u64,
    /// Largest sequence processed.
    done: u64,
    stop: bool,
    /// Views have work without queued writes (creation, recovery, retry).
    kick: bool,
    /// The log stopped taking writes (a storage failure): views cannot write their rows.
    stopped: Option<String>,
}

/// State shared by writers (through [`ApplyObserver`]), the worker and waiting queries.
pub(crate) struct ViewsShared {
    queue: Mutex<Queue>,
    wake: Condvar,
    progress: Condvar,
    /// Base tables some view reads.
    watched: RwLock<HashSet<u64>>,
    pub(crate) views: RwLock<Vec<Arc<View>>>,
    max_bytes: usize,
    /// Measures the queue's lag (what `system.views` shows).
    pub(super) clock: Arc<dyn crate::clock::Clock>,
    /// The stored views are loaded (queries and writes wait for it after open).
    loaded: std::sync::atomic::AtomicBool,
}

impl std::fmt::Debug for ViewsShared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ViewsShared").finish_non_exhaustive()
    }
}

impl ApplyObserver for ViewsShared {
    fn admit(&self) {
        // A view loaded at open takes the writes it missed from a snapshot of its sources,
        // then starts watching them: a user write in between would reach neither. User writes
        // wait for the load (it only plans the definitions), then for room in the queue.
        self.wait_loaded();
        self.wait_for_room();
    }

    fn applied(&self, seq: u64, chunks: &[(Arc<Table>, Arc<Chunk>)]) {
        let relevant: Vec<(u64, Arc<Chunk>)> = {
            let watched = self.watched.read();
            if watched.is_empty() {
                return;
            }
            chunks
                .iter()
                .filter(|(t, _)| watched.contains(&t.id))
                .map(|(t, c)| (t.id, c.clone()))
                .collect()
        };
        if relevant.is_empty() {
            return;
        }
        let bytes: usize = relevant
            .iter()
            .map(|(_, c)| c.batch.get_array_memory_size())
            .sum();
        let mut q = self.queue.lock();
        q.bytes += bytes;
        q.pushed = q.pushed.max(seq);
        q.items.push_back((seq, relevant, self.clock.now_ns()));
        self.wake.notify_one();
    }

    fn stopped(&self, reason: &str) {
        self.queue.lock().stopped = Some(reason.to_string());
        self.progress.notify_all();
    }
}

impl ViewsShared {
    pub(crate) fn new(
        max_bytes: usize,
        done: u64,
        clock: Arc<dyn crate::clock::Clock>,
    ) -> ViewsShared {
        ViewsShared {
            queue: Mutex::new(Queue {
                done,
                pushed: done,
                ..Queue::default()
            }),
            wake: Condvar::new(),
            progress: Condvar::new(),
            watched: RwLock::new(HashSet::new()),
            views: RwLock::new(Vec::new()),
            max_bytes,
            clock,
            loaded: std::sync::atomic::AtomicBool::new(false),
        }
    }

    /// Waits until the worker has loaded the stored views (right after open).
    pub(crate) fn wait_loaded(&self) {
        if self.loaded.load(std::sync::atomic::Ordering::Acquire) {
            return;
        }
        let mut q = self.queue.lock();
        while !self.loaded.load(std::sync::atomic::Ordering::Acquire) && !q.stop {
            self.progress
                .wait_for(&mut q, std::time::Duration::from_millis(50));
        }
    }

    pub(super) fn set_loaded(&self) {
        let _q = self.queue.lock();
        self.loaded
            .store(true, std::sync::atomic::Ordering::Release);
        self.progress.notify_all();
    }

    /// The view `name` of database `db`.
    pub(crate) fn get(&self, db: &str, name: &str) -> Option<Arc<View>> {
        self.views
            .read()
            .iter()
            .find(|v| v.db.as_ref() == db && v.def.lock().name == name)
            .cloned()
    }

    /// The view stored in table `id`.
    pub(crate) fn by_table(&self, id: u64) -> Option<Arc<View>> {
        self.views.read().iter().find(|v| v.table.id == id).cloned()
    }

    /// Adds a view (sorted by depth) and watches its base sources.
    pub(crate) fn add(&self, view: Arc<View>) {
        let mut views = self.views.write();
        views.push(view);
        views.sort_by_key(|v| v.depth);
        self.rewatch(&views);
        drop(views);
        self.kick();
    }

    /// Removes the view stored in table `id`.
    pub(crate) fn remove(&self, id: u64) {
        let mut views = self.views.write();
        views.retain(|v| v.table.id != id);
        self.rewatch(&views);
    }

    fn rewatch(&self, views: &[Arc<View>]) {
        let storage: HashSet<u64> = views.iter().map(|v| v.table.id).collect();
        *self.watched.write() = views
            .iter()
            .flat_map(|v| v.source_ids.iter().copied())
            .filter(|id| !storage.contains(id))
            .collect();
    }

    /// Wakes the worker for views with work of their own.
    pub(crate) fn kick(&self) {
        self.queue.lock().kick = true;
        self.wake.notify_one();
    }

    /// Asks the worker to stop after the current round.
    pub(crate) fn stop(&self) {
        self.queue.lock().stop = true;
        self.wake.notify_all();
        self.progress.notify_all();
    }

    /// Blocks a writer while the queue is over its bound (the worker drains it).
    pub(crate) fn wait_for_room(&self) {
        let mut q = self.queue.lock();
        while q.bytes > self.max_bytes && !q.stop && q.stopped.is_none() {
            self.progress
                .wait_for(&mut q, std::time::Duration::from_millis(100));
        }
    }

    /// Whether every view in `views` reflects every write up to `seq`.
    fn caught_up(&self, q: &Queue, views: &[Arc<View>], seq: u64) -> bool {
        q.done >= seq.min(q.pushed) && views.iter().all(|v| !v.status.lock().has_work())
    }

    /// Waits until `views` reflect every write up to `seq`, or `timeout` passes.
    pub(crate) fn wait(
        &self,
        views: &[Arc<View>],
        seq: u64,
        timeout: std::time::Duration,
    ) -> Result<(), ViewError> {
        // A real-time bound on a blocking wait (not the database clock, which tests freeze).
        let deadline = std::time::Instant::now() + timeout;
        let mut q = self.queue.lock();
        loop {
            if self.caught_up(&q, views, seq) {
                return Ok(());
            }
            if q.stop {
                return Err(ViewError::Behind("the database is closing".to_string()));
            }
            if let Some(reason) = &q.stopped {
                return Err(ViewError::Behind(format!(
                    "materialized views cannot catch up with write {seq}: writes stopped after \
                     a storage failure ({reason})"
                )));
            }
            let now = std::time::Instant::now();
            if now >= deadline {
                let mut parts = Vec::new();
                for v in views {
                    let st = v.status.lock();
                    let mut s = format!("'{}' has applied writes up to {}", v.name(), st.applied);
                    if let Some((done, total)) = st.backfill {
                        s.push_str(&format!(", backfill {done}/{total}"));
                    }
                    if let Some(e) = &st.last_error {
                        s.push_str(&format!(", last error: {e}"));
                    }
                    parts.push(s);
                }
                return Err(ViewError::Behind(format!(
                    "materialized views did not catch up with write {seq} within {:?}: {}",
                    timeout,
                    parts.join("; ")
                )));
            }
            self.progress.wait_for(&mut q, deadline - now);
        }
    }

    /// The worker's next round: every queued write (None when stopping).
    pub(super) fn next_round(&self) -> Option<(Vec<Item>, u64)> {
        let mut q = self.queue.lock();
        loop {
            if !q.items.is_empty() || q.kick {
                q.kick = false;
                let items: Vec<Item> = q.items.drain(..).collect();
                let upto = items.last().map_or(q.done, |i| i.0);
                return Some((items, upto));
            }
            if q.stop {
                return None;
            }
            self.wake
                .wait_for(&mut q, std::time::Duration::from_millis(500));
            if !q.stop
                && q.items.is_empty()
                && self.views.read().iter().any(|v| v.status.lock().has_work())
            {
                // Retry views whose last round failed.
                q.kick = true;
            }
        }
    }

    /// Marks a round done.
    pub(super) fn finish_round(&self, upto: u64, bytes: usize) {
        let mut q = self.queue.lock();
        q.done = q.done.max(upto);
        q.bytes = q.bytes.saturating_sub(bytes);
        self.progress.notify_all();
    }
}
