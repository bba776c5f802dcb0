//! Backfill: a new view computed over everything stored, one piece (at least a partition
//! long, a whole number of buckets) at a time, so memory stays bounded by a piece.

use std::collections::BTreeSet;
use std::sync::Arc;

use super::maintain::{Writes, read_seq, recompute, recompute_all, write};
use super::plan::{Strategy, TimeMap};
use super::{View, Views};
use crate::error::Error;
use crate::storage::buffer::time_values;
use crate::storage::table::Table;

/// The time extent of a table: segments and buffered chunks.
pub(super) fn extent(table: &Table) -> Option<(i64, i64)> {
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

/// Adds the start of every piece (`start + k * step`) that holds rows of `table`: segments by
/// their time range (a segment lies within one partition, so it meets one or two pieces),
/// buffered chunks by their rows' times.
fn occupied_pieces(
    table: &Table,
    start: i64,
    step: i64,
    into: &mut BTreeSet<i64>,
) -> Result<(), Error> {
    let piece = |t: i64| {
        let k = (i128::from(t) - i128::from(start)).div_euclid(i128::from(step));
        i64::try_from(i128::from(start) + k * i128::from(step)).unwrap_or(i64::MAX)
    };
    let snap = table.buffer.read().snapshot();
    for s in snap.segments.iter() {
        let mut p = piece(s.meta.min_time);
        while p <= s.meta.max_time {
            into.insert(p);
            match p.checked_add(step) {
                Some(next) => p = next,
                None => break,
            }
        }
    }
    for c in snap.frozen.iter().chain(&snap.chunks) {
        if piece(c.min_time) == piece(c.max_time) {
            into.insert(piece(c.min_time));
        } else {
            into.extend(time_values(&c.batch)?.iter().map(|&t| piece(t)));
        }
    }
    Ok(())
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
    // Visits only the pieces that hold rows (data spread over years costs what it holds, not
    // one query per empty day).
    match (plan.time, source) {
        (TimeMap::None, _) | (_, None) => {
            view.status.lock().backfill = Some((0, 1));
            let out = recompute_all(db, view, upto).await?;
            let mut writes = Writes::default();
            writes.batches.extend(out.rows);
            write(db, view, writes, upto).await?;
            view.status.lock().backfill = Some((1, 1));
        }
        (time, Some((mut lo, _))) => {
            if let Some((a, _)) = stored {
                // Rows left by an interrupted backfill or an earlier definition.
                lo = lo.min(a);
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
            // Only the pieces holding source rows or stored view rows: the others produce
            // nothing and delete nothing (pieces are whole buckets, so a source row and its
            // view row fall in the same piece).
            let mut pieces = BTreeSet::new();
            if let Some(source) = view.primary_id.and_then(|id| db.engine.table_by_id(id)) {
                occupied_pieces(&source, start, step, &mut pieces)?;
            }
            occupied_pieces(&view.table, start, step, &mut pieces)?;
            let total = pieces.len() as u64;
            view.status.lock().backfill = Some((0, total));
            for (done, a) in pieces.into_iter().enumerate() {
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
                let mut st = view.status.lock();
                st.backfill = Some((done as u64 + 1, total));
                if plan.strategy == Strategy::Aggregate {
                    st.fences.push(fence);
                }
            }
        }
    }
    db.finish_backfill(view)?;
    let mut st = view.status.lock();
    st.backfill = None;
    st.backfill_pending = false;
    Ok(())
}
