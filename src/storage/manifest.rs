//! The segment manifest, in sled: which segment files make up each table, and up to which write
//! sequence everything is in segments.
//!
//! A segment becomes part of a table only through [`Manifest::commit`], one atomic sled batch
//! flushed to disk, after its file and directory entry are durable; files the manifest does not
//! list are removed on open. Keys (values JSON): `seg/<table id:016x>/<segment id:016x>` →
//! [`SegmentMeta`]; `meta/persisted_seq` → every write up to it is in registered segments (the
//! WAL before it may be deleted, and replay skips it); `meta/partition_ns` → the partition
//! length the directory was created with; `meta/layout` → the data directory's layout version
//! (storage/layout.rs); `last/<table id:016x>` → the table's last-point state
//! as of `persisted_seq` (an Arrow IPC stream, one row per series).

use super::segment::{SegmentError, SegmentMeta};

/// The manifest tree.
pub(crate) struct Manifest {
    sled: sled::Db,
    tree: sled::Tree,
}

fn err(e: impl std::fmt::Display) -> SegmentError {
    SegmentError::Manifest(e.to_string())
}

fn key(meta: &SegmentMeta) -> String {
    format!("seg/{:016x}/{:016x}", meta.table_id, meta.id)
}

impl Manifest {
    pub(crate) fn open(sled: &sled::Db) -> Result<Manifest, SegmentError> {
        Ok(Manifest {
            sled: sled.clone(),
            tree: sled.open_tree("manifest").map_err(err)?,
        })
    }

    /// Every registered segment, and the persisted sequence.
    pub(crate) fn load(&self) -> Result<(Vec<SegmentMeta>, u64), SegmentError> {
        let mut segments = Vec::new();
        for item in self.tree.scan_prefix("seg/") {
            let (k, v) = item.map_err(err)?;
            let meta: SegmentMeta = serde_json::from_slice(&v).map_err(|e| {
                err(format!(
                    "record '{}' is corrupt: {e}",
                    String::from_utf8_lossy(&k)
                ))
            })?;
            if meta.format != super::segment::SEGMENT_FORMAT_VERSION {
                return Err(err(format!(
                    "segment {} has format version {}; this build reads version {}",
                    meta.path,
                    meta.format,
                    super::segment::SEGMENT_FORMAT_VERSION
                )));
            }
            segments.push(meta);
        }
        let persisted = match self.tree.get("meta/persisted_seq").map_err(err)? {
            None => 0,
            Some(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| err("meta/persisted_seq is not a number"))?,
        };
        Ok((segments, persisted))
    }

    /// Records the partition length on first use and refuses a different one later: segments
    /// never span a partition, and retention drops whole ones, only if it never changes.
    pub(crate) fn check_partition(&self, len_ns: i64) -> Result<(), SegmentError> {
        match self.tree.get("meta/partition_ns").map_err(err)? {
            None => {
                self.tree
                    .insert("meta/partition_ns", len_ns.to_string().as_bytes())
                    .map_err(err)?;
                Ok(())
            }
            Some(v) => {
                let stored: i64 = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| err("meta/partition_ns is not a number"))?;
                if stored == len_ns {
                    Ok(())
                } else {
                    Err(err(format!(
                        "this data directory uses time partitions of {} s; the configuration asks for {} s (the partition length cannot change)",
                        stored / 1_000_000_000,
                        len_ns / 1_000_000_000
                    )))
                }
            }
        }
    }

    /// The data directory's layout version (`meta/layout`; absent in directories written before
    /// layout 2, which is layout 1).
    pub(crate) fn layout(&self) -> Result<Option<u32>, SegmentError> {
        match self.tree.get("meta/layout").map_err(err)? {
            None => Ok(None),
            Some(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse().ok())
                .map(Some)
                .ok_or_else(|| err("meta/layout is not a number")),
        }
    }

    /// Records the layout version of a directory that has no segments (flushed with the next
    /// commit; until then a reopen records it again).
    pub(crate) fn set_layout(&self, version: u32) -> Result<(), SegmentError> {
        self.tree
            .insert("meta/layout", version.to_string().as_bytes())
            .map_err(err)?;
        Ok(())
    }

    /// The stored value of `key` (e.g. a table's last-point state, `last/<table id:016x>`).
    pub(crate) fn get(&self, key: &str) -> Result<Option<Vec<u8>>, SegmentError> {
        Ok(self.tree.get(key).map_err(err)?.map(|v| v.to_vec()))
    }

    /// A fresh segment id, unique across restarts.
    pub(crate) fn next_id(&self) -> Result<u64, SegmentError> {
        self.sled.generate_id().map_err(err)
    }

    /// Atomically registers `added`, unregisters `removed` and records `persisted_seq`, then
    /// flushes sled (which also makes the catalog's pending changes durable).
    pub(crate) fn commit(
        &self,
        added: &[SegmentMeta],
        removed: &[SegmentMeta],
        persisted_seq: Option<u64>,
        extra: &[(String, Vec<u8>)],
    ) -> Result<(), SegmentError> {
        let mut batch = sled::Batch::default();
        for (k, v) in extra {
            batch.insert(k.as_bytes(), v.as_slice());
        }
        for meta in removed {
            batch.remove(key(meta).as_bytes());
        }
        for meta in added {
            batch.insert(key(meta).as_bytes(), serde_json::to_vec(meta).map_err(err)?);
        }
        if let Some(seq) = persisted_seq {
            batch.insert("meta/persisted_seq", seq.to_string().as_bytes());
        }
        self.tree.apply_batch(batch).map_err(err)?;
        self.sled.flush().map_err(err)?;
        Ok(())
    }
}
