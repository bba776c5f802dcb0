//! The hot-segment cache: segments kept decoded in memory, so queries over recent data do not
//! decode Parquet again.
//!
//! A segment enters when it is persisted or compacted from hot segments (its rows are in hand
//! then), or, after a restart, when a query reads it and the cache has room for it (decoded on
//! a side thread; a scan never evicts anything). Entries leave least recently used first when
//! the cache is over its byte limit, and when their segment is replaced or dropped. Each entry
//! keeps min/max/null statistics per slice of [`SLICE_ROWS`] rows, so a scan skips the slices
//! a query's filters rule out, as the Parquet scan skips pages.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use arrow::array::{Array, ArrayRef, BooleanArray, RecordBatch, UInt64Array};
use datafusion::common::pruning::PruningStatistics;
use datafusion::common::{Column, ScalarValue};
use datafusion::functions_aggregate::min_max::{MaxAccumulator, MinAccumulator};
use datafusion::logical_expr::Accumulator;
use parking_lot::Mutex;

use super::segment::Segment;

/// Rows per slice of a cached segment: the unit of pruning (the Parquet page size).
pub(crate) const SLICE_ROWS: usize = 1_024;

/// Kept slices next to each other are handed out as one batch up to this many rows.
const BATCH_ROWS: usize = 8_192;

/// One decoded segment: its rows in file order (sorted by the sort key, then time), cut into
/// slices with statistics.
#[derive(Debug)]
pub(crate) struct HotSegment {
    batches: Vec<RecordBatch>,
    /// (batch, offset, rows) of each slice.
    slices: Vec<(usize, usize, usize)>,
    /// By column name: per-slice minimums, maximums and null counts, computed by the first
    /// scan that prunes (a persist only hands its rows over, so it costs what it did without
    /// the cache).
    stats: OnceLock<HashMap<String, ColumnStats>>,
    bytes: usize,
}

#[derive(Debug)]
struct ColumnStats {
    min: Option<ArrayRef>,
    max: Option<ArrayRef>,
    nulls: ArrayRef,
}

impl HotSegment {
    /// Cuts `batches` (a segment's rows in file order) into slices (their statistics are
    /// computed when first needed).
    pub(crate) fn new(batches: Vec<RecordBatch>) -> HotSegment {
        let batches: Vec<RecordBatch> = batches.into_iter().filter(|b| b.num_rows() > 0).collect();
        let mut slices = Vec::new();
        for (i, b) in batches.iter().enumerate() {
            let mut offset = 0;
            while offset < b.num_rows() {
                let rows = SLICE_ROWS.min(b.num_rows() - offset);
                slices.push((i, offset, rows));
                offset += rows;
            }
        }
        let bytes = batches.iter().map(RecordBatch::get_array_memory_size).sum();
        HotSegment {
            batches,
            slices,
            stats: OnceLock::new(),
            bytes,
        }
    }

    /// The slice statistics, computed on first use.
    fn stats(&self) -> &HashMap<String, ColumnStats> {
        self.stats.get_or_init(|| {
            let mut stats = HashMap::new();
            let Some(first) = self.batches.first() else {
                return stats;
            };
            for (c, field) in first.schema().fields().iter().enumerate() {
                let columns: Vec<ArrayRef> = self
                    .slices
                    .iter()
                    .map(|&(b, offset, rows)| self.batches[b].column(c).slice(offset, rows))
                    .collect();
                stats.insert(field.name().clone(), column_stats(&columns));
            }
            stats
        })
    }

    /// Memory the decoded rows take.
    pub(crate) fn bytes(&self) -> usize {
        self.bytes
    }

    /// Rows held.
    #[cfg(test)]
    fn rows(&self) -> usize {
        self.slices.iter().map(|s| s.2).sum()
    }

    /// The rows of the slices `keep` selects (all when None), adjacent ones joined into
    /// batches of up to [`BATCH_ROWS`] rows (zero-copy slices of the cached arrays).
    pub(crate) fn batches(&self, keep: Option<&[bool]>) -> Vec<RecordBatch> {
        let mut out = Vec::new();
        let mut run: Option<(usize, usize, usize)> = None;
        for (i, &(b, offset, rows)) in self.slices.iter().enumerate() {
            if keep.is_some_and(|k| !k.get(i).copied().unwrap_or(true)) {
                if let Some((b, o, n)) = run.take() {
                    out.push(self.batches[b].slice(o, n));
                }
                continue;
            }
            run = match run {
                Some((rb, o, n)) if rb == b && o + n == offset && n + rows <= BATCH_ROWS => {
                    Some((rb, o, n + rows))
                }
                Some((rb, o, n)) => {
                    out.push(self.batches[rb].slice(o, n));
                    Some((b, offset, rows))
                }
                None => Some((b, offset, rows)),
            };
        }
        if let Some((b, o, n)) = run {
            out.push(self.batches[b].slice(o, n));
        }
        out
    }
}

/// Per-slice min/max (None when the type has no min/max accumulator) and null counts.
fn column_stats(columns: &[ArrayRef]) -> ColumnStats {
    let nulls: ArrayRef = Arc::new(UInt64Array::from_iter_values(
        columns.iter().map(|c| c.null_count() as u64),
    ));
    let Some(first) = columns.first() else {
        return ColumnStats {
            min: None,
            max: None,
            nulls,
        };
    };
    if let Some((min, max)) = dictionary_extremes(columns) {
        return ColumnStats {
            min: Some(min),
            max: Some(max),
            nulls,
        };
    }
    let extremes = || -> datafusion::error::Result<(ArrayRef, ArrayRef)> {
        let t = first.data_type().clone();
        let (mut mins, mut maxs) = (Vec::new(), Vec::new());
        for c in columns {
            let mut min = MinAccumulator::try_new(&t)?;
            let mut max = MaxAccumulator::try_new(&t)?;
            min.update_batch(std::slice::from_ref(c))?;
            max.update_batch(std::slice::from_ref(c))?;
            mins.push(min.evaluate()?);
            maxs.push(max.evaluate()?);
        }
        Ok((
            ScalarValue::iter_to_array(mins)?,
            ScalarValue::iter_to_array(maxs)?,
        ))
    };
    // A type without min/max (lists, say) is just not pruned.
    let (min, max) = match extremes() {
        Ok((min, max)) => (Some(min), Some(max)),
        Err(_) => (None, None),
    };
    ColumnStats { min, max, nulls }
}

/// Per-slice min/max of dictionary-encoded strings (tags), as strings (pruning casts them
/// back), read through the keys without materializing the strings; None for other columns.
fn dictionary_extremes(columns: &[ArrayRef]) -> Option<(ArrayRef, ArrayRef)> {
    use arrow::array::{DictionaryArray, StringArray};
    use arrow::datatypes::Int32Type;
    let mut mins: Vec<Option<String>> = Vec::with_capacity(columns.len());
    let mut maxs: Vec<Option<String>> = Vec::with_capacity(columns.len());
    for c in columns {
        let dict = c.as_any().downcast_ref::<DictionaryArray<Int32Type>>()?;
        let values = dict.values().as_any().downcast_ref::<StringArray>()?;
        let (mut min, mut max): (Option<&str>, Option<&str>) = (None, None);
        let mut last_key = None;
        for key in dict.keys().iter().flatten() {
            // Rows are sorted by tags: runs of one key are the rule.
            if last_key == Some(key) {
                continue;
            }
            last_key = Some(key);
            let Ok(idx) = usize::try_from(key) else {
                continue;
            };
            if idx >= values.len() || values.is_null(idx) {
                continue;
            }
            let v = values.value(idx);
            if min.is_none_or(|m| v < m) {
                min = Some(v);
            }
            if max.is_none_or(|m| v > m) {
                max = Some(v);
            }
        }
        mins.push(min.map(str::to_string));
        maxs.push(max.map(str::to_string));
    }
    Some((
        Arc::new(StringArray::from(mins)),
        Arc::new(StringArray::from(maxs)),
    ))
}

impl PruningStatistics for HotSegment {
    fn min_values(&self, column: &Column) -> Option<ArrayRef> {
        self.stats().get(column.name()).and_then(|s| s.min.clone())
    }

    fn max_values(&self, column: &Column) -> Option<ArrayRef> {
        self.stats().get(column.name()).and_then(|s| s.max.clone())
    }

    fn num_containers(&self) -> usize {
        self.slices.len()
    }

    fn null_counts(&self, column: &Column) -> Option<ArrayRef> {
        self.stats().get(column.name()).map(|s| s.nulls.clone())
    }

    fn row_counts(&self) -> Option<ArrayRef> {
        Some(Arc::new(UInt64Array::from_iter_values(
            self.slices.iter().map(|s| s.2 as u64),
        )))
    }

    fn contained(
        &self,
        _column: &Column,
        _values: &std::collections::HashSet<ScalarValue>,
    ) -> Option<BooleanArray> {
        None
    }
}

/// What `/metrics` shows of the cache.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HotCacheStats {
    /// The byte limit (0: the cache is off).
    pub limit_bytes: usize,
    /// Memory of the decoded segments held.
    pub bytes: usize,
    /// Segments held.
    pub segments: usize,
    /// Segment reads by queries answered from the cache, and those that read the file.
    pub hits: u64,
    pub misses: u64,
    /// Segments dropped to stay under the limit.
    pub evictions: u64,
}

struct Entry {
    segment: Arc<HotSegment>,
    used: u64,
}

#[derive(Default)]
struct Lru {
    entries: HashMap<u64, Entry>,
    bytes: usize,
    clock: u64,
}

/// The cache, by segment id (ids are never reused).
pub(crate) struct HotSegments {
    limit: usize,
    lru: Mutex<Lru>,
    /// One read-through decode at a time.
    filling: AtomicBool,
    hits: AtomicU64,
    misses: AtomicU64,
    evictions: AtomicU64,
}

impl std::fmt::Debug for HotSegments {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HotSegments")
            .field("stats", &self.stats())
            .finish()
    }
}

impl HotSegments {
    pub(crate) fn new(limit: usize) -> HotSegments {
        HotSegments {
            limit,
            lru: Mutex::new(Lru::default()),
            filling: AtomicBool::new(false),
            hits: AtomicU64::new(0),
            misses: AtomicU64::new(0),
            evictions: AtomicU64::new(0),
        }
    }

    /// The decoded segment `id`, counted as a hit or a miss.
    pub(crate) fn get(&self, id: u64) -> Option<Arc<HotSegment>> {
        let mut lru = self.lru.lock();
        lru.clock += 1;
        let now = lru.clock;
        let found = lru.entries.get_mut(&id).map(|e| {
            e.used = now;
            e.segment.clone()
        });
        drop(lru);
        let counter = if found.is_some() {
            &self.hits
        } else {
            &self.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Holds `segment` as `id`, evicting the least recently used entries to make room (not
    /// held at all when it alone is over the limit).
    pub(crate) fn insert(&self, id: u64, segment: HotSegment) {
        self.put(id, segment, true);
    }

    /// Holds `segment` as `id` only if it fits without evicting anything.
    fn insert_if_room(&self, id: u64, segment: HotSegment) {
        self.put(id, segment, false);
    }

    fn put(&self, id: u64, segment: HotSegment, evict: bool) {
        let bytes = segment.bytes();
        if bytes > self.limit {
            return;
        }
        let mut lru = self.lru.lock();
        if !evict && lru.bytes + bytes > self.limit {
            return;
        }
        lru.clock += 1;
        let used = lru.clock;
        if let Some(old) = lru.entries.insert(
            id,
            Entry {
                segment: Arc::new(segment),
                used,
            },
        ) {
            lru.bytes -= old.segment.bytes();
        }
        lru.bytes += bytes;
        while lru.bytes > self.limit {
            let Some(oldest) = lru
                .entries
                .iter()
                .filter(|(k, _)| **k != id)
                .min_by_key(|(_, e)| e.used)
                .map(|(k, _)| *k)
            else {
                break;
            };
            if let Some(e) = lru.entries.remove(&oldest) {
                lru.bytes -= e.segment.bytes();
                self.evictions.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    /// Forgets segment `id` (replaced by compaction, merged by a persist, dropped).
    pub(crate) fn remove(&self, id: u64) {
        let mut lru = self.lru.lock();
        if let Some(e) = lru.entries.remove(&id) {
            lru.bytes -= e.segment.bytes();
        }
    }

    /// Whether every one of `ids` is held (without counting a hit).
    pub(crate) fn holds_all(&self, ids: &[u64]) -> bool {
        let lru = self.lru.lock();
        ids.iter().all(|id| lru.entries.contains_key(id))
    }

    /// Whether a segment of `bytes` would fit now.
    pub(crate) fn has_room(&self, bytes: usize) -> bool {
        self.limit > 0 && self.lru.lock().bytes + bytes <= self.limit
    }

    /// Decodes `segment` on a side thread and holds it if it still fits then (a query read
    /// it from the file; the next ones will not). One decode at a time; a segment that is
    /// replaced meanwhile is not held.
    pub(crate) fn fill_later(self: &Arc<Self>, segment: &Arc<Segment>) {
        // Decoded rows take a few times the compressed file.
        let estimate = (segment.meta.bytes as usize).saturating_mul(2);
        if !self.has_room(estimate) || self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let cache = self.clone();
        let segment = segment.clone();
        let spawned = std::thread::Builder::new()
            .name("rivulet-hot-fill".into())
            .spawn(move || {
                match super::segment::read_segment(&segment.path)
                    .map_err(|e| e.to_string())
                    .map(HotSegment::new)
                {
                    Ok(hot) if !segment.is_obsolete() => cache.insert_if_room(segment.meta.id, hot),
                    Ok(_) => {}
                    Err(e) => tracing::warn!(
                        segment = %segment.path.display(),
                        "hot-segment cache: could not decode the segment: {e}"
                    ),
                }
                cache.filling.store(false, Ordering::Release);
            });
        if spawned.is_err() {
            self.filling.store(false, Ordering::Release);
        }
    }

    pub(crate) fn stats(&self) -> HotCacheStats {
        let lru = self.lru.lock();
        HotCacheStats {
            limit_bytes: self.limit,
            bytes: lru.bytes,
            segments: lru.entries.len(),
            hits: self.hits.load(Ordering::Relaxed),
            misses: self.misses.load(Ordering::Relaxed),
            evictions: self.evictions.load(Ordering::Relaxed),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use arrow::array::Int64Array;

    fn segment(values: std::ops::Range<i64>) -> HotSegment {
        let batch = RecordBatch::try_from_iter(vec![(
            "v",
            Arc::new(Int64Array::from_iter_values(values)) as ArrayRef,
        )])
        .expect("batch");
        HotSegment::new(vec![batch])
    }

    #[test]
    fn slices_have_statistics_and_kept_ones_join() {
        let s = segment(0..3000);
        assert_eq!(s.num_containers(), 3);
        let min = s.min_values(&Column::from_name("v")).expect("min");
        let min = min.as_any().downcast_ref::<Int64Array>().expect("i64");
        assert_eq!(min.values().as_ref(), &[0, 1024, 2048]);
        let batches = s.batches(Some(&[false, true, true]));
        assert_eq!(batches.len(), 1);
        assert_eq!(batches[0].num_rows(), 3000 - 1024);
        let batches = s.batches(Some(&[true, false, true]));
        assert_eq!(
            batches
                .iter()
                .map(RecordBatch::num_rows)
                .collect::<Vec<_>>(),
            vec![1024, 3000 - 2048]
        );
        assert_eq!(s.rows(), 3000);
    }

    #[test]
    fn least_recently_used_goes_first_and_scans_do_not_evict() {
        let one = segment(0..10_000).bytes();
        let cache = HotSegments::new(one * 2 + one / 2);
        cache.insert(1, segment(0..10_000));
        cache.insert(2, segment(0..10_000));
        assert!(cache.get(1).is_some());
        cache.insert(3, segment(0..10_000));
        assert!(cache.get(2).is_none(), "2 was the least recently used");
        assert!(cache.get(1).is_some() && cache.get(3).is_some());
        cache.insert_if_room(4, segment(0..10_000));
        assert!(cache.get(4).is_none(), "a read-through never evicts");
        let st = cache.stats();
        assert_eq!((st.segments, st.evictions), (2, 1));
        assert_eq!(st.bytes, one * 2);
        cache.remove(1);
        assert_eq!(cache.stats().segments, 1);
        let tiny = HotSegments::new(10);
        tiny.insert(1, segment(0..10_000));
        assert_eq!(tiny.stats().segments, 0, "larger than the whole cache");
    }
}
