//! Group commit: makes appended WAL records durable and applies them to the buffers, in order.
//!
//! Writers append their record under the write lock and enqueue it here. Then each waits until
//! its sequence is applied. One waiter at a time becomes the leader: it takes every queued
//! record, issues one fsync that covers them all (durability `sync`), applies them to the table
//! buffers in sequence order, and wakes the others. Many concurrent writers therefore share one
//! fsync, and a reader never sees a write that is not durable, nor a later write without an
//! earlier one.
//!
//! A failed fsync poisons the queue: the failed writes and all later ones get an error, and the
//! database must be reopened (replay then decides what is durable). Never retry-and-ack.

use std::collections::VecDeque;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use parking_lot::{Condvar, Mutex};

use super::buffer::Chunk;
use super::io::Io;
use super::table::Table;
use super::wal::{WalError, WalWriter};
use crate::config::Durability;

/// Told of every write as it becomes visible, in sequence order (view maintenance). Must not
/// block: it runs in the group-commit step every writer waits for.
pub(crate) trait ApplyObserver: Send + Sync {
    fn applied(&self, seq: u64, chunks: &[(Arc<Table>, Arc<Chunk>)]);

    /// Called before a user write takes the write lock: an observer that has fallen too far
    /// behind (the view queue over its bound) blocks here until it catches up.
    fn admit(&self) {}

    /// Every write up to `seq` is now visible (called after `applied` for each of them).
    fn published(&self, _seq: u64) {}

    /// The log stopped taking writes after a storage failure (`reason`): nothing more will be
    /// applied until the database is reopened, so nobody should wait for it.
    fn stopped(&self, _reason: &str) {}
}

/// A sequenced write waiting to become visible.
pub(crate) struct PendingApply {
    pub(crate) seq: u64,
    pub(crate) chunks: Vec<(Arc<Table>, Arc<Chunk>)>,
}

struct State {
    queue: VecDeque<PendingApply>,
    leader: bool,
    /// Every write up to this sequence is durable (per the durability mode) and visible.
    applied_seq: u64,
    poisoned: Option<String>,
    sync_target: Option<(Arc<File>, PathBuf)>,
}

/// The commit queue of one database directory.
pub(crate) struct CommitQueue {
    state: Mutex<State>,
    wake: Condvar,
    durability: Durability,
    io: Io,
    /// fsyncs issued and their total time, for metrics.
    fsyncs: AtomicU64,
    fsync_nanos: AtomicU64,
    /// Arrow memory applied to the buffers (recounted after each persist).
    pub(crate) buffer_bytes: std::sync::atomic::AtomicUsize,
    /// Held weakly: observers belong to the layers above (and reach back into the engine).
    observers: parking_lot::RwLock<Vec<std::sync::Weak<dyn ApplyObserver>>>,
}

impl CommitQueue {
    pub(crate) fn new(applied_seq: u64, durability: Durability, io: Io) -> CommitQueue {
        CommitQueue {
            state: Mutex::new(State {
                queue: VecDeque::new(),
                leader: false,
                applied_seq,
                poisoned: None,
                sync_target: None,
            }),
            wake: Condvar::new(),
            durability,
            io,
            fsyncs: AtomicU64::new(0),
            fsync_nanos: AtomicU64::new(0),
            buffer_bytes: std::sync::atomic::AtomicUsize::new(0),
            observers: parking_lot::RwLock::new(Vec::new()),
        }
    }

    /// Adds an observer told of every applied write.
    pub(crate) fn add_observer(&self, observer: std::sync::Weak<dyn ApplyObserver>) {
        self.observers.write().push(observer);
    }

    /// The observers still alive.
    fn observers(&self) -> Vec<Arc<dyn ApplyObserver>> {
        self.observers
            .read()
            .iter()
            .filter_map(std::sync::Weak::upgrade)
            .collect()
    }

    /// Lets every observer hold a user write back ([`ApplyObserver::admit`]).
    pub(crate) fn admit(&self) {
        for o in self.observers() {
            o.admit();
        }
    }

    /// Fails if an earlier I/O failure poisoned the log.
    pub(crate) fn check(&self) -> Result<(), WalError> {
        match &self.state.lock().poisoned {
            Some(reason) => Err(WalError::Poisoned(reason.clone())),
            None => Ok(()),
        }
    }

    /// Marks the log unusable after an append failed part-way.
    pub(crate) fn poison(&self, reason: String) {
        let reason = {
            let mut st = self.state.lock();
            let reason = st.poisoned.get_or_insert(reason).clone();
            self.wake.notify_all();
            reason
        };
        for o in self.observers() {
            o.stopped(&reason);
        }
    }

    /// Sequence up to which every write is visible.
    pub(crate) fn applied_seq(&self) -> u64 {
        self.state.lock().applied_seq
    }

    /// Queues an appended record. Called under the write lock, so the queue is in sequence order.
    pub(crate) fn enqueue(&self, item: PendingApply, wal: Option<&WalWriter>) {
        let mut st = self.state.lock();
        if let Some(target) = wal.and_then(WalWriter::sync_target) {
            st.sync_target = Some(target);
        }
        st.queue.push_back(item);
    }

    /// Waits until write `seq` is durable and visible.
    pub(crate) fn wait(&self, seq: u64) -> Result<(), WalError> {
        let mut st = self.state.lock();
        loop {
            if st.applied_seq >= seq {
                return Ok(());
            }
            if let Some(reason) = &st.poisoned {
                return Err(WalError::Poisoned(reason.clone()));
            }
            if st.leader {
                self.wake.wait(&mut st);
                continue;
            }
            st.leader = true;
            let batch: Vec<PendingApply> = st.queue.drain(..).collect();
            let target = st.sync_target.clone();
            drop(st);

            let synced = match (self.durability, &target) {
                (Durability::Sync, Some((file, path))) => self.timed_sync(file, path),
                _ => Ok(()),
            };
            let last = batch.last().map(|p| p.seq);
            if synced.is_ok() {
                let mut bytes = 0;
                let observers = self.observers();
                for item in batch {
                    for (table, chunk) in &item.chunks {
                        bytes += chunk.batch.get_array_memory_size();
                        table.apply(chunk.clone());
                    }
                    for o in &observers {
                        o.applied(item.seq, &item.chunks);
                    }
                }
                self.buffer_bytes.fetch_add(bytes, Ordering::Relaxed);
            }

            st = self.state.lock();
            st.leader = false;
            let mut published = None;
            let mut stopped = None;
            match synced {
                Ok(()) => {
                    if let Some(last) = last {
                        st.applied_seq = st.applied_seq.max(last);
                        published = Some(st.applied_seq);
                    }
                }
                Err(e) => {
                    tracing::error!(error = %e, "WAL fsync failed; refusing further writes");
                    stopped = Some(st.poisoned.get_or_insert(e.to_string()).clone());
                }
            }
            self.wake.notify_all();
            if published.is_some() || stopped.is_some() {
                drop(st);
                for o in self.observers() {
                    if let Some(seq) = published {
                        o.published(seq);
                    }
                    if let Some(reason) = &stopped {
                        o.stopped(reason);
                    }
                }
                st = self.state.lock();
            }
        }
    }

    fn timed_sync(&self, file: &File, path: &std::path::Path) -> Result<(), WalError> {
        let started = std::time::Instant::now();
        let result = WalWriter::sync(&self.io, file, path);
        self.fsyncs.fetch_add(1, Ordering::Relaxed);
        self.fsync_nanos
            .fetch_add(started.elapsed().as_nanos() as u64, Ordering::Relaxed);
        result
    }

    /// (fsyncs issued, total seconds spent in them).
    pub(crate) fn fsync_stats(&self) -> (u64, f64) {
        (
            self.fsyncs.load(Ordering::Relaxed),
            self.fsync_nanos.load(Ordering::Relaxed) as f64 / 1e9,
        )
    }

    /// Fsyncs the current segment (durability `interval`, and on close).
    pub(crate) fn sync_now(&self) -> Result<(), WalError> {
        let target = self.state.lock().sync_target.clone();
        if let Some((file, path)) = target
            && let Err(e) = self.timed_sync(&file, &path)
        {
            self.poison(e.to_string());
            return Err(e);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use parking_lot::Mutex as PlMutex;

    use super::*;

    /// Records what it is told.
    #[derive(Default)]
    struct Recorder {
        applied: PlMutex<Vec<u64>>,
        published: PlMutex<Vec<u64>>,
    }

    impl ApplyObserver for Recorder {
        fn applied(&self, seq: u64, _chunks: &[(Arc<Table>, Arc<Chunk>)]) {
            self.applied.lock().push(seq);
        }

        fn published(&self, seq: u64) {
            self.published.lock().push(seq);
        }
    }

    fn queue() -> CommitQueue {
        CommitQueue::new(0, Durability::None, Io::default())
    }

    #[test]
    fn one_waiter_applies_every_queued_write_in_order() {
        let q = queue();
        let recorder = Arc::new(Recorder::default());
        let observer: Arc<dyn ApplyObserver> = recorder.clone();
        q.add_observer(Arc::downgrade(&observer));
        for seq in 1..=3 {
            q.enqueue(
                PendingApply {
                    seq,
                    chunks: Vec::new(),
                },
                None,
            );
        }
        assert_eq!(q.applied_seq(), 0);
        // Waiting for the last write applies all three (one leader, one "fsync").
        q.wait(3).expect("wait");
        assert_eq!(q.applied_seq(), 3);
        assert_eq!(*recorder.applied.lock(), [1, 2, 3]);
        assert_eq!(*recorder.published.lock(), [3]);
        // Already applied: returns at once.
        q.wait(2).expect("wait");
    }

    #[test]
    fn concurrent_writers_all_return_once_applied() {
        let q = Arc::new(queue());
        for seq in 1..=8 {
            q.enqueue(
                PendingApply {
                    seq,
                    chunks: Vec::new(),
                },
                None,
            );
        }
        let waiters: Vec<_> = (1..=8)
            .map(|seq| {
                let q = q.clone();
                std::thread::spawn(move || q.wait(seq))
            })
            .collect();
        for w in waiters {
            w.join().expect("join").expect("wait");
        }
        assert_eq!(q.applied_seq(), 8);
    }

    #[test]
    fn a_poisoned_queue_fails_every_later_wait() {
        let q = queue();
        q.poison("disk on fire".to_string());
        q.enqueue(
            PendingApply {
                seq: 1,
                chunks: Vec::new(),
            },
            None,
        );
        let err = q.wait(1).expect_err("poisoned");
        assert!(
            matches!(err, WalError::Poisoned(ref m) if m.contains("disk on fire")),
            "{err}"
        );
        assert!(q.check().is_err());
        assert_eq!(q.applied_seq(), 0, "nothing poisoned becomes visible");
    }

    #[test]
    fn dropped_observers_are_skipped() {
        let q = queue();
        {
            let observer: Arc<dyn ApplyObserver> = Arc::new(Recorder::default());
            q.add_observer(Arc::downgrade(&observer));
        }
        q.enqueue(
            PendingApply {
                seq: 1,
                chunks: Vec::new(),
            },
            None,
        );
        q.admit();
        q.wait(1).expect("wait");
    }
}
