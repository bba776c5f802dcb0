//! Where Rivulet's files live in a data directory. Every path under `tables/` is built here,
//! from ids only: no database, table, tag or field name ever becomes a path component.
//!
//! ```text
//! tables/<database id:016x>/<table id:016x>/_table.json
//! tables/<database id:016x>/<table id:016x>/partition=<start>/<segment id:016x>.parquet
//! ```
//!
//! `_table.json` names the table for engines that read the directory without Rivulet (its
//! database, name, columns and sort key, as of the last persist). DataFusion reads segments
//! through an object store rooted at the data directory ([`register_store`]), by a location
//! built from the id-based relative path ([`location`]), so the data directory's own path may
//! hold any bytes and nothing is escaped twice.
//!
//! Layout 1 (before 0.1's storage-names fix) put escaped names in the directories
//! (`tables/main/temp%C3%A9rature/…`); [`migrate`] moves such a directory to layout 2 on open.
//! Format details: docs/file-format.md §1.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use datafusion::datasource::object_store::ObjectStoreUrl;
use datafusion::execution::runtime_env::RuntimeEnv;
use datafusion::object_store::local::LocalFileSystem;
use serde::{Deserialize, Serialize};

use super::catalog::{Catalog, ColumnDef};
use super::io::{Io, IoOp};
use super::manifest::Manifest;
use super::segment::{SegmentError, SegmentMeta, io_err, sync_dir};
use super::table::Table;

/// The layout version this build writes (stored as `meta/layout` in the manifest).
pub(crate) const LAYOUT_VERSION: u32 = 2;

/// The directory holding every table's files, relative to the data directory.
pub(crate) const TABLES_DIR: &str = "tables";

/// The metadata file of a table directory.
pub(crate) const TABLE_META_FILE: &str = "_table.json";

/// The directory of a table's files, relative to the data directory:
/// `tables/<database id:016x>/<table id:016x>`.
pub(crate) fn table_dir(db_id: u64, table_id: u64) -> PathBuf {
    Path::new(TABLES_DIR)
        .join(format!("{db_id:016x}"))
        .join(format!("{table_id:016x}"))
}

/// A segment file, relative to the data directory.
pub(crate) fn segment_path(
    db_id: u64,
    table_id: u64,
    partition: i64,
    partition_len: i64,
    segment_id: u64,
) -> PathBuf {
    table_dir(db_id, table_id)
        .join(partition_dir(partition, partition_len))
        .join(format!("{segment_id:016x}.parquet"))
}

/// Directory name of a partition: `partition=2024-01-01` for whole days, with the time of day
/// otherwise (`partition=2024-01-01T06-00-00`).
pub(crate) fn partition_dir(start: i64, len: i64) -> String {
    let Some(dt) = arrow::array::temporal_conversions::timestamp_ns_to_datetime(start) else {
        return format!("partition={start}");
    };
    if len % 86_400_000_000_000 == 0 {
        format!("partition={}", dt.format("%Y-%m-%d"))
    } else {
        format!("partition={}", dt.format("%Y-%m-%dT%H-%M-%S"))
    }
}

/// The URL of the object store that reads a data directory's files (each `Db` registers its
/// own store, rooted at its directory, in its own DataFusion runtime).
pub(crate) fn store_url() -> datafusion::error::Result<ObjectStoreUrl> {
    ObjectStoreUrl::parse("rivulet-data://local/")
}

/// Registers the store rooted at `data_dir` under [`store_url`] in `runtime`.
pub(crate) fn register_store(runtime: &RuntimeEnv, data_dir: &Path) -> Result<(), SegmentError> {
    let fail = |e: &dyn std::fmt::Display| {
        SegmentError::Layout(format!("object store for {}: {e}", data_dir.display()))
    };
    let store = LocalFileSystem::new_with_prefix(data_dir).map_err(|e| fail(&e))?;
    let url = store_url().map_err(|e| fail(&e))?;
    runtime.register_object_store(url.as_ref(), Arc::new(store));
    Ok(())
}

/// The object-store location of a file under the data directory, from its relative path.
///
/// The one place a path is handed to DataFusion: relative paths are built from ids by this
/// module (ASCII letters, digits, `_`, `-`, `=`, `.`), so they are used verbatim, never escaped;
/// anything else is refused rather than guessed at.
pub(crate) fn location(rel: &str) -> Result<datafusion::object_store::path::Path, SegmentError> {
    let safe = |part: &str| {
        !part.is_empty()
            && part != "."
            && part != ".."
            && part
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'-' | b'=' | b'.'))
    };
    if rel.split('/').all(safe) {
        datafusion::object_store::path::Path::parse(rel)
            .map_err(|e| SegmentError::Layout(format!("segment path '{rel}': {e}")))
    } else {
        Err(SegmentError::Layout(format!(
            "segment path '{rel}' is not an id-based path of this layout"
        )))
    }
}

/// The contents of `_table.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct TableMetaFile {
    /// The layout version ([`LAYOUT_VERSION`]).
    pub layout: u32,
    /// The database's id and name.
    pub database_id: u64,
    pub database: String,
    /// The table's id and name.
    pub table_id: u64,
    pub table: String,
    /// The table stores a materialized view's rows.
    #[serde(default)]
    pub view: bool,
    /// Columns, sorted by name, as in the catalog.
    pub columns: Vec<ColumnDef>,
    /// Tag columns the segments are sorted by, before `time`.
    pub sort_key: Vec<String>,
}

impl TableMetaFile {
    pub(crate) fn of(db_id: u64, table: &Table) -> TableMetaFile {
        let settings = table.settings.read().clone();
        TableMetaFile {
            layout: LAYOUT_VERSION,
            database_id: db_id,
            database: table.db.to_string(),
            table_id: table.id,
            table: table.name.to_string(),
            view: settings.view,
            columns: table.schema().columns().to_vec(),
            sort_key: settings.sort_key.iter().map(|s| s.to_string()).collect(),
        }
    }
}

/// Writes the table's `_table.json` unless it already says the same: to a temporary file,
/// fsynced, renamed, directory fsynced (and its parents', which may be new).
pub(crate) fn write_table_meta(
    io: &Io,
    data_dir: &Path,
    db_id: u64,
    table: &Table,
) -> Result<(), SegmentError> {
    let dir = data_dir.join(table_dir(db_id, table.id));
    let path = dir.join(TABLE_META_FILE);
    let mut json = serde_json::to_vec_pretty(&TableMetaFile::of(db_id, table))
        .map_err(|e| SegmentError::Layout(format!("{}: {e}", path.display())))?;
    json.push(b'\n');
    match std::fs::read(&path) {
        Ok(old) if old == json => return Ok(()),
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("reading", &path)(e)),
    }
    std::fs::create_dir_all(&dir).map_err(io_err("creating directory", &dir))?;
    let tmp = dir.join(format!("{TABLE_META_FILE}.tmp"));
    {
        use std::io::Write;
        io.check(IoOp::TableMetaWrite, &tmp)
            .map_err(io_err("writing", &tmp))?;
        let mut f = std::fs::File::create(&tmp).map_err(io_err("creating", &tmp))?;
        f.write_all(&json).map_err(io_err("writing", &tmp))?;
        io.check(IoOp::FileSync, &tmp)
            .and_then(|()| f.sync_all())
            .map_err(io_err("fsync", &tmp))?;
    }
    io.check(IoOp::Rename, &tmp)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(io_err("renaming", &tmp))?;
    // The table directory, and the database and `tables` directories that may be new.
    for d in path.ancestors().skip(1).take(3) {
        sync_dir(io, d)?;
    }
    Ok(())
}

/// Removes a dropped table's `_table.json` (its segments go when nobody reads them; the empty
/// directories at the next open).
pub(crate) fn remove_table_meta(data_dir: &Path, db_id: u64, table_id: u64) {
    let path = data_dir
        .join(table_dir(db_id, table_id))
        .join(TABLE_META_FILE);
    if let Err(e) = std::fs::remove_file(&path)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        // Left behind, it is removed with the directory on the next open.
        tracing::warn!(path = %path.display(), error = %e, "could not remove a dropped table's metadata file");
    }
}

/// Brings the directory to [`LAYOUT_VERSION`] before segments are loaded: records the version
/// in a new directory, migrates a layout-1 directory, refuses an unknown one.
///
/// Migration, crash-safe at every step because each step can be repeated:
/// 1. every registered segment whose file is still at its layout-1 path is renamed to its
///    id-based path (a file already there was moved by an interrupted migration);
/// 2. the new directories and the old ones are fsynced; every table with segments gets its
///    `_table.json`;
/// 3. one manifest commit rewrites every segment's `path` and sets `meta/layout = 2`.
///
/// A crash before 3 leaves the manifest at layout 1 with some files moved: the next open
/// finds them at their new paths and finishes. Empty layout-1 directories are removed by the
/// sweep that follows ([`remove_unlisted`]).
pub(crate) fn migrate(
    io: &Io,
    data_dir: &Path,
    catalog: &Catalog,
    manifest: &Manifest,
    partition_len: i64,
) -> Result<usize, SegmentError> {
    match manifest.layout()? {
        Some(LAYOUT_VERSION) => return Ok(0),
        None | Some(1) => {}
        Some(found) => {
            return Err(SegmentError::Layout(format!(
                "the data directory has layout version {found}; this build reads layout {LAYOUT_VERSION} and migrates layout 1"
            )));
        }
    }
    let (segments, _) = manifest.load()?;
    if segments.is_empty() {
        // A new directory, or one without segments: nothing to move.
        manifest.set_layout(LAYOUT_VERSION)?;
        return Ok(0);
    }
    let mut db_of_table = HashMap::new();
    for db in catalog.databases() {
        for table in db.tables() {
            db_of_table.insert(table.id, (db.id, table));
        }
    }
    let mut moved = Vec::with_capacity(segments.len());
    let mut dirs: HashSet<PathBuf> = HashSet::new();
    for meta in segments {
        let Some((db_id, _)) = db_of_table.get(&meta.table_id) else {
            return Err(SegmentError::Manifest(format!(
                "segments are registered for table id {}, which the catalog does not have",
                meta.table_id
            )));
        };
        let rel = segment_path(
            *db_id,
            meta.table_id,
            meta.partition,
            partition_len,
            meta.id,
        );
        let new = data_dir.join(&rel);
        let old = data_dir.join(&meta.path);
        if old != new {
            if old.exists() {
                let parent = new.parent().unwrap_or(data_dir);
                std::fs::create_dir_all(parent).map_err(io_err("creating directory", parent))?;
                io.check(IoOp::Rename, &old)
                    .and_then(|()| std::fs::rename(&old, &new))
                    .map_err(io_err("moving", &old))?;
                if let Some(p) = old.parent() {
                    dirs.insert(p.to_path_buf());
                }
            } else if !new.exists() {
                return Err(SegmentError::Manifest(format!(
                    "segment {} is registered but missing",
                    old.display()
                )));
            }
            for d in new.ancestors().skip(1).take(4) {
                dirs.insert(d.to_path_buf());
            }
        }
        moved.push(SegmentMeta {
            path: rel.to_string_lossy().into_owned(),
            ..meta
        });
    }
    for d in &dirs {
        sync_dir(io, d)?;
    }
    let with_segments: HashSet<u64> = moved.iter().map(|m| m.table_id).collect();
    for id in with_segments {
        if let Some((db_id, table)) = db_of_table.get(&id) {
            write_table_meta(io, data_dir, *db_id, table)?;
        }
    }
    manifest.commit(&moved, &[], None, &[layout_record()])?;
    tracing::info!(
        segments = moved.len(),
        "moved the data directory to layout {LAYOUT_VERSION} (id-based table directories)"
    );
    Ok(moved.len())
}

/// The manifest record of the current layout version.
fn layout_record() -> (String, Vec<u8>) {
    (
        "meta/layout".to_string(),
        LAYOUT_VERSION.to_string().into_bytes(),
    )
}

/// Removes what the manifest and the catalog do not account for under `tables/`: segment files
/// not listed (`known`, absolute paths), temporary files, the `_table.json` of tables the
/// catalog no longer has (`tables`, relative table directories), then empty directories.
pub(crate) fn remove_unlisted(
    data_dir: &Path,
    known: &HashSet<PathBuf>,
    tables: &HashSet<PathBuf>,
) -> Result<usize, SegmentError> {
    let root = data_dir.join(TABLES_DIR);
    let mut removed = 0;
    remove_unlisted_in(data_dir, &root, known, tables, &mut removed)?;
    Ok(removed)
}

/// One directory of [`remove_unlisted`]; returns whether it is empty afterwards.
fn remove_unlisted_in(
    data_dir: &Path,
    dir: &Path,
    known: &HashSet<PathBuf>,
    tables: &HashSet<PathBuf>,
    removed: &mut usize,
) -> Result<bool, SegmentError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(true),
        Err(e) => return Err(io_err("listing", dir)(e)),
    };
    let mut empty = true;
    for entry in entries {
        let entry = entry.map_err(io_err("listing", dir))?;
        let path = entry.path();
        let kind = entry.file_type().map_err(io_err("listing", &path))?;
        if kind.is_dir() {
            if remove_unlisted_in(data_dir, &path, known, tables, removed)? {
                std::fs::remove_dir(&path).map_err(io_err("removing directory", &path))?;
            } else {
                empty = false;
            }
            continue;
        }
        let keep = known.contains(&path)
            || (entry.file_name() == TABLE_META_FILE
                && dir
                    .strip_prefix(data_dir)
                    .is_ok_and(|rel| tables.contains(rel)));
        if keep {
            empty = false;
        } else {
            tracing::info!(path = %path.display(), "removing a file the manifest does not list");
            std::fs::remove_file(&path).map_err(io_err("removing", &path))?;
            *removed += 1;
        }
    }
    Ok(empty)
}
