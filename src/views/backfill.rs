//! Backfill: a new view computed over everything stored, one piece (at least a partition
//! long, a whole number of buckets) at a time, so memory stays bounded by a piece.

use std::sync::Arc;

use super::maintain::{Writes, read_seq, recompute, recompute_all, write};
use super::plan::{Strategy, TimeMap};
use super::{View, Views};
use crate::error::Error;

/// The time extent of a table: segments and buffered chunks.
pub(super) fn extent(table: &crate::storage::table::Table) -> Option<(i64, i64)> {
    let snap = table.buffer.read().snapshot();
    let mut lo = i64::MAX;
    let mut hi = i64::MIN;
    for s in snap.segments.iter() {
        lo = lo.min(s.meta.min_time);
        hi = hi.max(s.meta.max_time);
    }
    for c in snap.frozen.iter().chain(&snap.chunks) {
        lo = lo.min(c.min_time);
        hi = hi.max(c.max_time);
    }
    (lo <= hi).then_some((lo, hi))
}

/// Computes a new view over everything stored, one piece (at least a partition long, a whole
/// number of buckets) at a time, so memory stays bounded by a piece.
pub(super) async fn backfill_view(db: &Views, view: &Arc<View>, upto: u64) -> Result<(), Error> {
    let plan = &view.plan;
    let source = view
        .primary_id
        .and_then(|id| db.engine.table_by_id(id))
        .and_then(|t| extent(&t));
    let stored = extent(&view.table);
    match (plan.time, source) {
        (TimeMap::None, _) | (_, None) => {
            view.status.lock().backfill = Some((0, 1));
            let out = recompute_all(db, view, upto).await?;
            let mut writes = Writes::default();
            writes.batches.extend(out.rows);
            write(db, view, writes, upto).await?;
            view.status.lock().backfill = Some((1, 1));
        }
        (time, Some((mut lo, mut hi))) => {
            if let Some((a, b)) = stored {
                // Rows left by an interrupted backfill or an earlier definition.
                lo = lo.min(a);
                hi = hi.max(b);
            }
            let partition = (db.engine.config.partition.as_nanos() as i64).max(1);
            let (start, step) = match time {
                TimeMap::Bin { stride, .. } => {
                    let step = ((partition + stride - 1) / stride)
                        .max(1)
                        .saturating_mul(stride);
                    (time.bucket(lo), step)
                }
                _ => (lo, partition),
            };
            let total = ((hi as i128 - start as i128) / step as i128 + 1) as u64;
            view.status.lock().backfill = Some((0, total));
            let mut a = start;
            let mut done = 0;
            loop {
                let b = a.saturating_add(step - 1);
                let out = match time {
                    TimeMap::Bin { stride, .. } => (a, b.saturating_sub(stride - 1).max(a)),
                    _ => (a, b),
                };
                let (new, deleted) = recompute(db, view, Some((a, b)), out, upto, None).await?;
                let fence = (a, b, read_seq(db, upto));
                let mut writes = Writes::default();
                writes.batches.extend(deleted);
                writes.batches.push(new);
                write(db, view, writes, upto).await?;
                done += 1;
                {
                    let mut st = view.status.lock();
                    st.backfill = Some((done, total));
                    if plan.strategy == Strategy::Aggregate {
                        st.fences.push(fence);
                    }
                }
                if b >= hi || b == i64::MAX {
                    break;
                }
                a = b + 1;
            }
        }
    }
    db.finish_backfill(view)?;
    let mut st = view.status.lock();
    st.backfill = None;
    st.backfill_pending = false;
    Ok(())
}
