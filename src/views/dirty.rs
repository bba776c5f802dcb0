//! Which rows of a maintenance round are plain appends and which make windows dirty, and the
//! keys a keyed aggregate view recomputes in them.

use std::sync::Arc;

use arrow::array::{Array, StringArray};
use arrow::compute::cast;
use arrow::datatypes::DataType;

use super::View;
use super::plan::Strategy;
use crate::error::Error;
use crate::storage::buffer::{Chunk, time_values};

/// Keys of a keyed aggregate view's dirty groups (one value set per key tag); None: whole
/// buckets.
pub(super) type DirtyKeys = Option<Vec<std::collections::BTreeSet<String>>>;

/// Adds the key tag values of `chunk` to `into`; false when a row lacks one (a null key:
/// the caller then recomputes whole buckets).
fn key_values(
    chunk: &Chunk,
    keyed: &super::plan::Keyed,
    into: &mut [std::collections::BTreeSet<String>],
) -> Result<bool, Error> {
    for ((_, tag), set) in keyed.tags.iter().zip(into.iter_mut()) {
        let Some(column) = chunk.batch.column_by_name(tag) else {
            return Ok(false);
        };
        let text = cast(column, &DataType::Utf8)?;
        let Some(text) = text.as_any().downcast_ref::<StringArray>() else {
            return Ok(false);
        };
        if text.null_count() > 0 {
            return Ok(false);
        }
        set.extend(text.iter().flatten().map(str::to_string));
    }
    Ok(true)
}

/// Splits a round's chunks into plain appends and dirty source ranges (added to `ranges`),
/// with the keys of the dirty groups of a keyed aggregate view.
#[allow(clippy::type_complexity)]
pub(super) fn classify(
    view: &View,
    chunks: Vec<Arc<Chunk>>,
    mut ranges: Vec<(i64, i64)>,
    fences: &[(i64, i64, u64)],
) -> Result<(Vec<Arc<Chunk>>, Vec<(i64, i64)>, DirtyKeys), Error> {
    let plan = &view.plan;
    // Dirty windows come from chunks only (no pending or upstream ranges): an aggregate view
    // keyed by source tags recomputes just the keys those chunks hold.
    let mut keys: DirtyKeys = plan
        .keyed
        .as_ref()
        .filter(|_| ranges.is_empty())
        .map(|k| vec![Default::default(); k.tags.len()]);
    let mut appends: Vec<Arc<Chunk>> = Vec::new();
    for c in chunks {
        let fenced = fences
            .iter()
            .any(|&(lo, hi, seq)| c.seq <= seq && c.max_time >= lo && c.min_time <= hi);
        if plan.strategy == Strategy::Recompute || c.overlaps || c.over_persisted || fenced {
            ranges.push((c.min_time, c.max_time));
            if let (Some(k), Some(keyed)) = (&mut keys, &plan.keyed)
                && !key_values(&c, keyed, k)?
            {
                keys = None;
            }
        } else {
            appends.push(c);
        }
    }
    Ok((appends, ranges, keys))
}

/// `keys` widened by the keys of appended chunks with rows in the dirty source ranges (None,
/// whole buckets, when such a chunk lacks a key).
pub(super) fn with_appended_keys(
    view: &View,
    mut keys: DirtyKeys,
    appends: &[Arc<Chunk>],
    dirty_src: &[(i64, i64)],
) -> Result<DirtyKeys, Error> {
    let (Some(k), Some(keyed)) = (&mut keys, &view.plan.keyed) else {
        return Ok(keys);
    };
    for c in appends {
        let overlaps = dirty_src
            .iter()
            .any(|&(lo, hi)| c.max_time >= lo && c.min_time <= hi);
        let inside = overlaps
            && time_values(&c.batch)?
                .iter()
                .any(|&t| dirty_src.iter().any(|&(lo, hi)| t >= lo && t <= hi));
        if inside && !key_values(c, keyed, k)? {
            return Ok(None);
        }
    }
    Ok(keys)
}
