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

use super::io::{Io, IoOp};
use super::segment::{SegmentError, SegmentMeta};

/// The manifest tree.
pub(crate) struct Manifest {
    sled: sled::Db,
    tree: sled::Tree,
    io: Io,
}

fn err(e: impl std::fmt::Display) -> SegmentError {
    SegmentError::Manifest(e.to_string())
}

fn key(meta: &SegmentMeta) -> String {
    format!("seg/{:016x}/{:016x}", meta.table_id, meta.id)
}

impl Manifest {
    pub(crate) fn open(sled: &sled::Db, io: Io) -> Result<Manifest, SegmentError> {
        Ok(Manifest {
            sled: sled.clone(),
            tree: sled.open_tree("manifest").map_err(err)?,
            io,
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
        let path = std::path::Path::new("manifest");
        self.io
            .check(IoOp::ManifestCommit, path)
            .map_err(super::segment::io_err("committing", path))?;
        self.tree.apply_batch(batch).map_err(err)?;
        self.sled.flush().map_err(err)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(id: u64, table_id: u64) -> SegmentMeta {
        SegmentMeta {
            id,
            table_id,
            partition: 0,
            min_time: 1,
            max_time: 2,
            rows: 3,
            bytes: 4,
            max_seq: 5,
            path: format!(
                "tables/0000000000000001/{table_id:016x}/partition=1970-01-01/{id:016x}.parquet"
            ),
            format: super::super::segment::SEGMENT_FORMAT_VERSION,
        }
    }

    fn temporary() -> sled::Db {
        sled::Config::new().temporary(true).open().expect("sled")
    }

    #[test]
    fn commits_add_and_remove_segments_atomically_with_the_persisted_sequence() {
        let sled = temporary();
        let m = Manifest::open(&sled, Io::default()).expect("open");
        assert_eq!(m.load().expect("load"), (Vec::new(), 0));
        m.commit(&[meta(1, 7), meta(2, 7)], &[], Some(10), &[])
            .expect("commit");
        m.commit(
            &[meta(3, 7)],
            &[meta(1, 7), meta(2, 7)],
            None,
            &[("last/0000000000000007".into(), b"state".to_vec())],
        )
        .expect("commit");
        let (segments, persisted) = m.load().expect("load");
        assert_eq!(segments, [meta(3, 7)]);
        assert_eq!(persisted, 10, "a commit without a sequence keeps it");
        assert_eq!(
            m.get("last/0000000000000007").expect("get").as_deref(),
            Some(&b"state"[..])
        );
    }

    #[test]
    fn a_record_of_another_format_or_a_corrupt_one_fails_the_load() {
        let sled = temporary();
        let m = Manifest::open(&sled, Io::default()).expect("open");
        let mut newer = meta(1, 7);
        newer.format = 99;
        m.commit(&[newer], &[], None, &[]).expect("commit");
        let err = m.load().expect_err("newer format");
        assert!(err.to_string().contains("format version 99"), "{err}");
        let sled = temporary();
        let m = Manifest::open(&sled, Io::default()).expect("open");
        m.tree
            .insert("seg/0000000000000007/0000000000000001", "{not json")
            .expect("insert");
        let err = m.load().expect_err("corrupt");
        assert!(err.to_string().contains("is corrupt"), "{err}");
    }

    #[test]
    fn the_partition_length_and_layout_are_recorded_once() {
        let sled = temporary();
        let m = Manifest::open(&sled, Io::default()).expect("open");
        let day = 86_400_000_000_000;
        m.check_partition(day).expect("first use records it");
        m.check_partition(day).expect("same length");
        let err = m.check_partition(day / 24).expect_err("another length");
        assert!(err.to_string().contains("cannot change"), "{err}");
        assert_eq!(m.layout().expect("layout"), None);
        m.set_layout(2).expect("set");
        assert_eq!(m.layout().expect("layout"), Some(2));
        assert!(m.next_id().expect("id") < m.next_id().expect("id"));
    }
}
