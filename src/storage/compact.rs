//! Compaction and retention (the [`Engine`]'s): merging a partition's segments into one, and
//! dropping the partitions past a table's retention.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use arrow::array::RecordBatch;

use super::engine::{Engine, StorageError};
use super::persist::segment_meta;
use super::segment::{Segment, SegmentMeta, SegmentWriter};
use super::table::Table;

/// What a call to [`Db::compact`](crate::Db::compact) did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CompactReport {
    /// Partitions compacted.
    pub partitions: usize,
    /// Segments merged away.
    pub segments_in: usize,
    /// Segments written.
    pub segments_out: usize,
}

impl Engine {
    /// Compacts every partition holding at least `min_segments` segments into one segment.
    pub(crate) fn compact(
        &self,
        min_segments: usize,
        full: bool,
    ) -> Result<CompactReport, StorageError> {
        let (Some(manifest), Some(data_dir)) = (&self.manifest, &self.data_dir) else {
            return Ok(CompactReport::default());
        };
        let _compacting = self.compact_lock.lock();
        let mut report = CompactReport::default();
        for db in self.catalog().databases() {
            for table in db.tables() {
                let segments = table.buffer.read().segments();
                // Size tiers (rows, powers of 4) within each partition: merging segments of
                // similar size keeps the rewrite cost of a growing partition logarithmic. A full
                // compaction merges the whole partition.
                let mut groups: BTreeMap<(i64, u32), Vec<Arc<Segment>>> = BTreeMap::new();
                for s in segments.iter() {
                    let tier = if full {
                        0
                    } else {
                        s.meta.rows.max(1).ilog2() / 2
                    };
                    groups
                        .entry((s.meta.partition, tier))
                        .or_default()
                        .push(s.clone());
                }
                for ((partition, _), inputs) in groups {
                    if inputs.len() < min_segments.max(2) {
                        continue;
                    }
                    let ids: Vec<u64> = inputs.iter().map(|s| s.meta.id).collect();
                    // Hot inputs make a hot output.
                    let keep_hot = self.config.hot_cache_bytes > 0 && self.hot.holds_all(&ids);
                    let (meta, rows) = self.compact_partition(
                        data_dir, manifest, &table, partition, &inputs, keep_hot,
                    )?;
                    if let Err(e) = manifest.commit(
                        std::slice::from_ref(&meta),
                        &inputs.iter().map(|s| s.meta.clone()).collect::<Vec<_>>(),
                        None,
                        &[],
                    ) {
                        // As in persist: sled may hold the change unflushed; stop writes.
                        self.commit
                            .poison(format!("the segment manifest could not be updated: {e}"));
                        return Err(e.into());
                    }
                    for id in &ids {
                        self.hot.remove(*id);
                    }
                    if keep_hot {
                        self.hot.insert(meta.id, super::hot::HotSegment::new(rows));
                    }
                    table.buffer.write().replace_segments(
                        &ids,
                        vec![Arc::new(Segment::new(meta, data_dir))],
                        None,
                    );
                    for s in &inputs {
                        s.mark_obsolete();
                    }
                    report.partitions += 1;
                    report.segments_in += inputs.len();
                    report.segments_out += 1;
                }
            }
        }
        Ok(report)
    }

    /// Merges sorted, non-overlapping segments of one partition into one, streaming (bounded
    /// memory): DataFusion's sort-preserving merge over one Parquet scan per segment.
    fn compact_partition(
        &self,
        data_dir: &Path,
        manifest: &crate::storage::manifest::Manifest,
        table: &Arc<Table>,
        partition: i64,
        inputs: &[Arc<Segment>],
        keep_rows: bool,
    ) -> Result<(SegmentMeta, Vec<RecordBatch>), StorageError> {
        use futures::StreamExt;

        let schema = table.schema();
        let sort_key = table.settings.read().sort_key.clone();
        let plan = super::segment_scan::merge_plan(&schema, &sort_key, inputs)?;
        let max_seq = inputs.iter().map(|s| s.meta.max_seq).max().unwrap_or(0);
        let (id, rel, path) = self.new_segment_path(data_dir, manifest, table, partition)?;
        let mut writer = SegmentWriter::create(&self.io, &path, schema.arrow(), &sort_key)?;
        let mut rows = Vec::new();
        // DataFusion needs a runtime; a scoped thread keeps this callable from async code too.
        let streamed: Result<(), StorageError> = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    let rt = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .map_err(|e| {
                            StorageError::io("starting", Path::new("compaction runtime"), e)
                        })?;
                    rt.block_on(async {
                        let ctx = datafusion::execution::TaskContext::default()
                            .with_runtime(self.runtime.clone());
                        let mut stream = plan.execute(0, Arc::new(ctx))?;
                        while let Some(batch) = stream.next().await {
                            let batch = batch?;
                            writer.write(&batch)?;
                            if keep_rows {
                                rows.push(batch);
                            }
                        }
                        Ok::<(), StorageError>(())
                    })
                })
                .join()
                .unwrap_or_else(|_| {
                    Err(StorageError::Config(
                        "the compaction thread panicked".into(),
                    ))
                })
        });
        streamed?;
        let meta = segment_meta(id, table.id, partition, max_seq, &rel, writer.finish()?);
        Ok((meta, rows))
    }

    /// Drops the partitions of tables with a retention that lie wholly before now − retention.
    pub(crate) fn apply_retention(&self) -> Result<usize, StorageError> {
        let Some(manifest) = &self.manifest else {
            return Ok(0);
        };
        let _compacting = self.compact_lock.lock();
        let now = self.config.clock.now_ns();
        let len = self.partition_len();
        let mut dropped = 0;
        for db in self.catalog().databases() {
            for table in db.tables() {
                let Some(retention) = table.settings.read().retention else {
                    continue;
                };
                let cutoff = now.saturating_sub(retention);
                let expired: Vec<Arc<Segment>> = table
                    .buffer
                    .read()
                    .segments()
                    .iter()
                    .filter(|s| s.meta.partition.saturating_add(len) <= cutoff)
                    .cloned()
                    .collect();
                if expired.is_empty() {
                    continue;
                }
                let metas: Vec<SegmentMeta> = expired.iter().map(|s| s.meta.clone()).collect();
                if let Err(e) = manifest.commit(&[], &metas, None, &[]) {
                    // As in persist: sled may hold the change unflushed; stop writes.
                    self.commit
                        .poison(format!("the segment manifest could not be updated: {e}"));
                    return Err(e.into());
                }
                let ids: Vec<u64> = metas.iter().map(|m| m.id).collect();
                table
                    .buffer
                    .write()
                    .replace_segments(&ids, Vec::new(), None);
                for s in &expired {
                    s.mark_obsolete();
                    self.hot.remove(s.meta.id);
                }
                dropped += expired.len();
            }
        }
        Ok(dropped)
    }
}
