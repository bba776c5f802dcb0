//! A table: its schema, its series index and its mutable buffer.
//!
//! Three locks, each short and never held across `.await`:
//! - `schema`: replaced whole (copy-on-write `Arc`) when a write adds columns;
//! - `series`: only the writer (under the single write lock) touches it;
//! - `buffer`: appended to by the commit step, snapshotted by queries.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};

use super::buffer::{Chunk, TableBuffer};
use super::catalog::TableSchema;
use super::last::LastPoints;

/// A table of a database.
#[derive(Debug)]
pub(crate) struct Table {
    /// Stable id (storage never uses the name).
    pub id: u64,
    /// The database it belongs to.
    pub db: Arc<str>,
    /// The table (measurement) name.
    pub name: Arc<str>,
    schema: RwLock<Arc<TableSchema>>,
    /// Series identities, used to detect overwrites cheaply.
    pub(crate) series: Mutex<SeriesIndex>,
    /// Its rows: segments, and chunks not yet persisted.
    pub(crate) buffer: RwLock<TableBuffer>,
    /// Sort key and retention.
    pub(crate) settings: RwLock<TableSettings>,
    /// Latest point per series.
    pub(crate) last: Mutex<LastPoints>,
}

/// Per-table storage settings, kept in the catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct TableSettings {
    /// Tag columns segments are sorted by (then `time`): chosen at the first persist, highest
    /// cardinality first; tags added later are appended.
    pub sort_key: Vec<Arc<str>>,
    /// Partitions wholly older than this (ns) are dropped.
    pub retention: Option<i64>,
    /// The table holds a materialized view's rows: only its maintenance writes it.
    pub view: bool,
}

impl Table {
    /// A table with the given schema and an empty buffer.
    pub(crate) fn new(id: u64, db: Arc<str>, name: Arc<str>, schema: TableSchema) -> Table {
        Table {
            id,
            db,
            name,
            schema: RwLock::new(Arc::new(schema)),
            series: Mutex::new(SeriesIndex::default()),
            buffer: RwLock::new(TableBuffer::default()),
            settings: RwLock::new(TableSettings::default()),
            last: Mutex::new(LastPoints::default()),
        }
    }

    /// The current schema.
    pub(crate) fn schema(&self) -> Arc<TableSchema> {
        self.schema.read().clone()
    }

    /// Makes a committed chunk visible: appends it to the buffer and records its rows in the
    /// last-point state.
    pub(crate) fn apply(&self, chunk: Arc<Chunk>) {
        let whole_rows = self.schema.read().is_whole_rows();
        if let Err(e) = self.last.lock().observe_rows(&chunk, whole_rows) {
            tracing::error!(table = %self.name, error = %e, "could not update the last-point state");
        }
        self.buffer.write().push(chunk);
    }

    /// Replaces the schema (the writer adds columns).
    pub(crate) fn set_schema(&self, schema: TableSchema) {
        *self.schema.write() = Arc::new(schema);
    }
}

type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// Maps a series (the table's tag set) to a dense id, and remembers each series' latest time.
///
/// A point whose time is not after its series' latest time may overwrite an earlier point, so
/// the chunk holding it is marked for deduplication; in-order ingest never pays for it.
#[derive(Debug)]
pub(crate) struct SeriesIndex {
    /// Tag section exactly as a line protocol client wrote it → id (no unescaping, no sorting).
    raw: FastMap<Box<[u8]>, u32>,
    /// Canonical key (tags sorted by name, length-prefixed) → id.
    canonical: FastMap<Box<[u8]>, u32>,
    /// Latest time seen per series id.
    max_time: Vec<i64>,
    /// Latest time per series id in segments or being persisted (`max_time` at the last freeze).
    persisted: Vec<i64>,
    /// The latest time in the table's segments: a series first seen since open may have points
    /// up to it there, so its points up to it may overwrite.
    floor: i64,
    /// What the write being prepared changed, so a rejected write leaves nothing behind.
    undo: Option<SeriesUndo>,
    /// Per series id, the write (`generation`) that last recorded its latest time in `undo`:
    /// a write records each series once, not once per point.
    recorded_in: Vec<u32>,
    generation: u32,
}

/// What one write did to a [`SeriesIndex`]: undone with [`SeriesIndex::rollback`] when the
/// write is rejected (under the write lock, before any later write touched the index).
#[derive(Debug, Default)]
pub(crate) struct SeriesUndo {
    /// Series ids before the write (ids from here on are the write's).
    len: usize,
    raw: Vec<Box<[u8]>>,
    canonical: Vec<Box<[u8]>>,
    /// (id, latest time before the write) of older series the write moved on, once each.
    times: Vec<(u32, i64)>,
}

impl Default for SeriesIndex {
    fn default() -> Self {
        SeriesIndex {
            raw: FastMap::default(),
            canonical: FastMap::default(),
            max_time: Vec::new(),
            persisted: Vec::new(),
            floor: i64::MIN,
            undo: None,
            recorded_in: Vec::new(),
            generation: 0,
        }
    }
}

impl SeriesIndex {
    /// How many series the table has.
    pub(crate) fn series_count(&self) -> usize {
        self.max_time.len()
    }

    /// Sets the latest persisted time (see `floor`); only raises it.
    pub(crate) fn raise_floor(&mut self, time: i64) {
        self.floor = self.floor.max(time);
        for t in self.max_time.iter_mut().chain(self.persisted.iter_mut()) {
            *t = (*t).max(time);
        }
    }

    /// Starts recording what a write changes (see [`SeriesUndo`]).
    pub(crate) fn begin(&mut self) {
        self.generation = self.generation.wrapping_add(1);
        if self.generation == 0 {
            // Wrapped: no stale mark may look like this write's.
            self.recorded_in.fill(0);
            self.generation = 1;
        }
        self.undo = Some(SeriesUndo {
            len: self.max_time.len(),
            ..SeriesUndo::default()
        });
    }

    /// Stops recording: what the write changed, for [`rollback`](Self::rollback).
    pub(crate) fn end(&mut self) -> Option<SeriesUndo> {
        self.undo.take()
    }

    /// Undoes a rejected write: its new series go, older ones get their latest times back.
    pub(crate) fn rollback(&mut self, undo: SeriesUndo) {
        for key in &undo.raw {
            self.raw.remove(key);
        }
        for key in &undo.canonical {
            self.canonical.remove(key);
        }
        self.max_time.truncate(undo.len);
        self.persisted.truncate(undo.len);
        self.recorded_in.truncate(undo.len);
        for &(id, time) in &undo.times {
            if let Some(t) = self.max_time.get_mut(id as usize) {
                *t = time;
            }
        }
    }

    /// The id of the series whose line protocol tag section is `raw`; `canonical` writes the
    /// canonical key into the buffer it is given when `raw` has not been seen before. None
    /// when it is a new series and the index already holds `max` (the write's line is
    /// refused).
    pub(crate) fn id_for_raw(
        &mut self,
        raw: &str,
        canonical: impl FnOnce(&mut Vec<u8>),
        max: usize,
    ) -> Option<u32> {
        if let Some(&id) = self.raw.get(raw.as_bytes()) {
            return Some(id);
        }
        let mut key = Vec::with_capacity(raw.len() + 16);
        canonical(&mut key);
        let id = self.id_for_canonical(&key, max)?;
        self.raw.insert(raw.as_bytes().into(), id);
        if let Some(u) = &mut self.undo {
            u.raw.push(raw.as_bytes().into());
        }
        Some(id)
    }

    /// The id of the series with canonical key `key` (see [`canonical_key`]); None when new
    /// and the index already holds `max`.
    pub(crate) fn id_for_canonical(&mut self, key: &[u8], max: usize) -> Option<u32> {
        if let Some(&id) = self.canonical.get(key) {
            return Some(id);
        }
        if self.max_time.len() >= max {
            return None;
        }
        let id = self.max_time.len() as u32;
        self.canonical.insert(key.into(), id);
        if let Some(u) = &mut self.undo {
            u.canonical.push(key.into());
        }
        self.max_time.push(self.floor);
        self.persisted.push(self.floor);
        self.recorded_in.push(0);
        Some(id)
    }

    /// Records a point of series `id` at `time`: [`OVERLAPS`] when it may overwrite an earlier
    /// point, plus [`OVER_PERSISTED`] when that point may be in segments (or being persisted).
    #[inline]
    pub(crate) fn observe(&mut self, id: u32, time: i64) -> u8 {
        let slot = &mut self.max_time[id as usize];
        if time > *slot {
            if let Some(u) = &mut self.undo
                && (id as usize) < u.len
                && self.recorded_in[id as usize] != self.generation
            {
                // The time before the write: once per series and write.
                self.recorded_in[id as usize] = self.generation;
                u.times.push((id, *slot));
            }
            *slot = time;
            0
        } else if time > self.persisted[id as usize] {
            OVERLAPS
        } else {
            OVERLAPS | OVER_PERSISTED
        }
    }

    /// Everything observed so far is being persisted (called under the write lock at freeze).
    pub(crate) fn mark_persisted(&mut self) {
        self.persisted.copy_from_slice(&self.max_time);
    }
}

/// [`SeriesIndex::observe`]: the point may overwrite an earlier one.
pub(crate) const OVERLAPS: u8 = 1;
/// [`SeriesIndex::observe`]: ... and that one may be persisted.
pub(crate) const OVER_PERSISTED: u8 = 2;

/// Writes the canonical series key for `tags` (any order) into `out`: tags sorted by name, each
/// name and value length-prefixed, so no byte in a value can make two tag sets collide.
pub(crate) fn canonical_key<'t>(tags: &mut [(&'t str, &'t str)], out: &mut Vec<u8>) {
    tags.sort_unstable_by(|a, b| a.0.cmp(b.0));
    for (k, v) in tags.iter() {
        out.extend_from_slice(&(k.len() as u32).to_le_bytes());
        out.extend_from_slice(k.as_bytes());
        out.extend_from_slice(&(v.len() as u32).to_le_bytes());
        out.extend_from_slice(v.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rolled_back_write_leaves_the_index_as_it_was_and_records_each_series_once() {
        let mut index = SeriesIndex::default();
        let a = index.id_for_canonical(b"a", 10).expect("a");
        index.observe(a, 5);
        index.begin();
        // Many in-order points of one old series: one undo entry.
        for t in 6..1000 {
            assert_eq!(index.observe(a, t), 0);
        }
        let b = index.id_for_raw(",h=b", |k| k.extend_from_slice(b"b"), 10);
        assert_eq!(b, Some(1));
        index.observe(1, 7);
        let undo = index.end().expect("recorded");
        assert_eq!(undo.times, [(a, 5)]);
        index.rollback(undo);
        // b is gone (a new write gets its id again), and a's latest time is 5 again: a point
        // at 6 is in order, not a possible overwrite.
        assert_eq!(index.observe(a, 6), 0);
        assert_eq!(index.id_for_canonical(b"c", 10), Some(1));
        assert_eq!(
            index.id_for_raw(",h=b", |k| k.extend_from_slice(b"b"), 10),
            Some(2)
        );
        // The next write records a afresh.
        index.begin();
        index.observe(a, 50);
        assert_eq!(index.end().expect("recorded").times, [(a, 6)]);
        // The cap counts series known.
        assert_eq!(index.id_for_canonical(b"d", 3), None);
    }
}
