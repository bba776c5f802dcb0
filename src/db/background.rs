//! The database's periodic background threads: WAL interval sync, persistence (with
//! compaction and retention), and the collector of idle shared subscription views. Each holds
//! the database weakly and is stopped (and joined) by close.

use std::sync::Arc;
use std::thread::JoinHandle;

use parking_lot::Mutex;

use super::DbInner;

/// Tells a periodic thread to stop.
type StopSignal = (parking_lot::Mutex<bool>, parking_lot::Condvar);

/// A running periodic thread.
type Slot = Mutex<Option<(JoinHandle<()>, Arc<StopSignal>)>>;

/// The periodic threads of one database.
#[derive(Default)]
pub(super) struct Threads {
    syncer: Slot,
    persister: Slot,
    /// Drops idle shared subscription views.
    collector: Slot,
}

impl Threads {
    /// Stops the persister and the collector (before the views stop).
    pub(super) fn stop_maintenance(&self) {
        stop_periodic(&self.persister);
        stop_periodic(&self.collector);
    }

    /// Stops the WAL syncer (after the last write).
    pub(super) fn stop_syncer(&self) {
        stop_periodic(&self.syncer);
    }
}

pub(super) fn start_syncer(inner: &Arc<DbInner>, every: std::time::Duration) {
    *inner.threads.syncer.lock() = spawn_periodic(inner, "rivulet-wal-sync", every, |inner| {
        match inner.engine.commit.sync_now() {
            Ok(()) => true,
            Err(e) => {
                tracing::error!(error = %e, "interval WAL fsync failed");
                false
            }
        }
    });
}

/// A thread named `name` that calls `step` every `every` until the handle is closed or dropped,
/// or `step` returns false. Stop it with [`stop_periodic`].
fn spawn_periodic(
    inner: &Arc<DbInner>,
    name: &str,
    every: std::time::Duration,
    step: impl Fn(&DbInner) -> bool + Send + 'static,
) -> Option<(JoinHandle<()>, Arc<StopSignal>)> {
    let stop: Arc<StopSignal> =
        Arc::new((parking_lot::Mutex::new(false), parking_lot::Condvar::new()));
    let weak = Arc::downgrade(inner);
    let stop2 = stop.clone();
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || {
            loop {
                {
                    let mut stopped = stop2.0.lock();
                    if !*stopped {
                        stop2.1.wait_for(&mut stopped, every);
                    }
                    if *stopped {
                        return;
                    }
                }
                let Some(inner) = weak.upgrade() else { return };
                if !step(&inner) {
                    return;
                }
            }
        });
    match handle {
        Ok(h) => Some((h, stop)),
        Err(e) => {
            tracing::error!(error = %e, thread = name, "could not start a background thread");
            None
        }
    }
}

/// Stops a thread started by [`spawn_periodic`] and waits for it (unless it is the caller: the
/// thread may itself drop the last handle).
fn stop_periodic(slot: &Slot) {
    if let Some((handle, stop)) = slot.lock().take() {
        *stop.0.lock() = true;
        stop.1.notify_all();
        if handle.thread().id() != std::thread::current().id() {
            let _ = handle.join();
        }
    }
}

/// Starts the thread that drops subscription views idle for their grace period.
pub(super) fn start_collector(inner: &Arc<DbInner>) {
    let every = (inner.config.shared_view_grace / 4).clamp(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_secs(60),
    );
    *inner.threads.collector.lock() = spawn_periodic(inner, "rivulet-sub-gc", every, |inner| {
        inner.subs.drop_idle_views();
        true
    });
}

/// Starts the thread that persists by size and age, compacts and applies retention.
pub(super) fn start_persister(inner: &Arc<DbInner>) {
    let every = std::time::Duration::from_millis(250);
    *inner.threads.persister.lock() = spawn_periodic(inner, "rivulet-persist", every, |inner| {
        if let Err(e) = inner.engine.background_step() {
            tracing::error!(error = %e, "background persistence failed; retrying");
            std::thread::sleep(std::time::Duration::from_secs(1));
        }
        true
    });
}
