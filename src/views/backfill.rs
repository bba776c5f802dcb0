//! Backfill: a new view computed over everything stored, one piece (at least a partition
//! long, a whole number of buckets) at a time, so memory stays bounded by a piece.

use std::collections::{BTreeSet, VecDeque};
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

/// A backfill under way: the pieces it has left, done a slice per maintenance round.
#[derive(Debug)]
pub(crate) struct Slices {
    /// Starts of the pieces still to compute, in time order.
    pieces: VecDeque<i64>,
    /// Length of a piece (ns).
    step: i64,
    total: u64,
    /// The round (its last sequence) that did the first slice: writes after it reached
    /// pieces already done, and are recomputed once the backfill finishes.
    pub(super) started: u64,
}

/// A maintenance round of a view whose backfill is pending: the next slice of it, and once it
/// is done, the view's bookkeeping (its subscribers start over from a snapshot). None while
/// pieces are left (the worker is woken for them).
pub(super) async fn round(
    db: &Views,
    view: &Arc<View>,
    changes: &std::collections::HashMap<u64, super::Change>,
    upto: u64,
) -> Result<Option<super::maintain::Out>, Error> {
    use super::maintain::Out;
    let under_way = view
        .status
        .lock()
        .backfill_slices
        .as_ref()
        .map(|s| s.started);
    if under_way.is_none() {
        // Whatever was pending is covered by the backfill.
        let mut st = view.status.lock();
        st.pending.clear();
        st.full = false;
    }
    let finished = backfill_view(db, view, upto).await;
    if under_way.is_some_and(|started| started < upto) {
        // Pieces done in earlier rounds did not see this round's writes.
        super::maintain::pend(&mut view.status.lock(), view, changes);
    }
    if !finished? {
        // The rest in the next rounds, between the other views' maintenance.
        db.shared.kick();
        return Ok(None);
    }
    let source_max = view
        .primary_id
        .and_then(|id| db.engine.table_by_id(id))
        .and_then(|t| extent(&t))
        .map(|(_, hi)| hi);
    if let Some(m) = source_max {
        let mut st = view.status.lock();
        st.max_source_time = Some(st.max_source_time.map_or(m, |x| x.max(m)));
    }
    // Subscribers' earlier positions predate the backfill.
    if let Some(o) = db.observer() {
        o.reset(view, upto);
    }
    let more = {
        let mut st = view.status.lock();
        st.fences.retain(|f| f.2 > upto);
        st.has_work()
    };
    // (Not under the status lock: waiters take the queue's lock, then views' status.)
    if more {
        db.shared.kick();
    }
    Ok(Some(Out {
        ranges: Vec::new(),
        all: true,
        rows: None,
    }))
}

/// Plans the pieces of a new backfill; None when the view is computed whole (no time map, or
/// no source rows).
fn plan_slices(db: &Views, view: &Arc<View>, upto: u64) -> Result<Option<Slices>, Error> {
    let plan = &view.plan;
    let source = view
        .primary_id
        .and_then(|id| db.engine.table_by_id(id))
        .and_then(|t| extent(&t));
    let stored = extent(&view.table);
    let (time, mut lo) = match (plan.time, source) {
        (TimeMap::None, _) | (_, None) => return Ok(None),
        (time, Some((lo, _))) => (time, lo),
    };
    if let Some((a, _)) = stored {
        // Rows left by an interrupted backfill or an earlier definition.
        lo = lo.min(a);
    }
    let partition = i64::try_from(db.engine.config.partition.as_nanos())
        .unwrap_or(i64::MAX)
        .max(1);
    let (start, step) = match time {
        TimeMap::Bin { stride, .. } => {
            // Whole buckets of at least a partition (no overflow for any stride).
            let buckets = (partition / stride + i64::from(partition % stride != 0)).max(1);
            (time.bucket(lo), buckets.saturating_mul(stride))
        }
        _ => (lo, partition),
    };
    // Only the pieces holding source rows or stored view rows: the others produce nothing and
    // delete nothing (pieces are whole buckets, so a source row and its view row fall in the
    // same piece). Data spread over years costs what it holds, not one query per empty day.
    let mut pieces = BTreeSet::new();
    if let Some(source) = view.primary_id.and_then(|id| db.engine.table_by_id(id)) {
        occupied_pieces(&source, start, step, &mut pieces)?;
    }
    occupied_pieces(&view.table, start, step, &mut pieces)?;
    Ok(Some(Slices {
        total: pieces.len() as u64,
        pieces: pieces.into_iter().collect(),
        step,
        started: upto,
    }))
}

/// Computes a new view over everything stored, one piece (at least a partition long, a whole
/// number of buckets) at a time, so memory stays bounded by a piece, for at most about
/// `Config::view_backfill_slice` per call (at least one piece): a view over years of history
/// cannot hold up the maintenance of the others, nor, through the full queue, every writer. True when the backfill is done; false when pieces are left for the
/// next round (the caller wakes the worker for it).
pub(super) async fn backfill_view(db: &Views, view: &Arc<View>, upto: u64) -> Result<bool, Error> {
    let under_way = view.status.lock().backfill_slices.take();
    let mut slices = match under_way {
        Some(s) => s,
        None => match plan_slices(db, view, upto)? {
            Some(s) => s,
            None => {
                view.status.lock().backfill = Some((0, 1));
                let out = recompute_all(db, view, upto).await?;
                let mut writes = Writes::default();
                writes.batches.extend(out.rows);
                write(db, view, writes, upto).await?;
                view.status.lock().backfill = Some((1, 1));
                finish(db, view)?;
                return Ok(true);
            }
        },
    };
    let began = std::time::Instant::now();
    view.status.lock().backfill = Some((slices.total - slices.pieces.len() as u64, slices.total));
    while let Some(a) = slices.pieces.pop_front() {
        if let Err(e) = piece(db, view, a, slices.step, upto).await {
            slices.pieces.push_front(a);
            view.status.lock().backfill_slices = Some(slices);
            return Err(e);
        }
        view.status.lock().backfill =
            Some((slices.total - slices.pieces.len() as u64, slices.total));
        if began.elapsed() >= db.engine.config.view_backfill_slice && !slices.pieces.is_empty() {
            view.status.lock().backfill_slices = Some(slices);
            return Ok(false);
        }
    }
    finish(db, view)?;
    Ok(true)
}

/// Computes and writes the piece `[a, a + step)` of a backfill.
async fn piece(db: &Views, view: &Arc<View>, a: i64, step: i64, upto: u64) -> Result<(), Error> {
    let b = a.saturating_add(step - 1);
    let out = match view.plan.time {
        TimeMap::Bin { stride, .. } => (a, b.saturating_sub(stride - 1).max(a)),
        _ => (a, b),
    };
    let (new, deleted) = recompute(db, view, Some((a, b)), out, upto, None).await?;
    let fence = (a, b, read_seq(db, upto));
    let mut writes = Writes::default();
    writes.batches.extend(deleted);
    writes.batches.push(new);
    write(db, view, writes, upto).await?;
    if view.plan.strategy == Strategy::Aggregate {
        view.status.lock().fences.push(fence);
    }
    Ok(())
}

/// Marks the backfill done (stored, so a reopen does not start it again).
fn finish(db: &Views, view: &View) -> Result<(), Error> {
    db.finish_backfill(view)?;
    let mut st = view.status.lock();
    st.backfill = None;
    st.backfill_pending = false;
    Ok(())
}
