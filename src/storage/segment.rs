//! Segments: immutable Parquet files holding one table's rows of one time partition.
//!
//! A segment's rows are deduplicated (one row per series and time) and sorted by the table's
//! sort key (its tag columns, highest cardinality first) then `time`; tags stay
//! dictionary-encoded, everything is zstd-compressed, with row-group and page statistics, so
//! DataFusion prunes row groups and pages by time and by tag. Within a partition no two segments
//! hold the same point: a write that overwrites persisted points is merged with the segments it
//! overlaps when it is persisted. Layout and keys: docs/file-format.md.

use std::fs::File;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arrow::array::{ArrayRef, RecordBatch};
use arrow::compute::{SortColumn, SortOptions, lexsort_to_indices, take_record_batch};
use arrow::datatypes::SchemaRef;
use arrow::error::ArrowError;
use parquet::arrow::ArrowWriter;
use parquet::arrow::arrow_reader::ParquetRecordBatchReaderBuilder;
use parquet::basic::{Compression, ZstdLevel};
use parquet::file::metadata::SortingColumn;
use parquet::file::properties::{EnabledStatistics, WriterProperties};
use serde::{Deserialize, Serialize};

use super::catalog::TIME_COLUMN;
use super::io::{Io, IoOp};

/// The segment format version this build writes and reads (stored in each file's metadata and
/// in the manifest).
pub(crate) const SEGMENT_FORMAT_VERSION: u32 = 1;
/// Rows per Parquet row group: small enough that a tag or time filter skips most of a file.
const ROW_GROUP_ROWS: usize = 65_536;
/// Rows per data page: the unit the page index prunes. Rows are sorted by series then time, so
/// a page holds a stretch of one series' time: at 1024 rows (under 3 hours of a 10-second
/// series) a time filter skips most of a series' pages, not only other series. (8192 rows held
/// a whole day of such a series in one page: a 12-hour query decoded all of it.)
const PAGE_ROWS: usize = 1_024;

/// Errors of segment files.
#[derive(Debug, thiserror::Error)]
pub enum SegmentError {
    /// A file operation failed.
    #[error("segment {op} failed for {path}: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Parquet encoding or decoding failed.
    #[error("segment {path}: {source}")]
    Parquet {
        /// The file.
        path: PathBuf,
        /// The Parquet error.
        source: parquet::errors::ParquetError,
    },
    /// Arrow failed while sorting or merging rows.
    #[error("segment rows: {0}")]
    Arrow(#[from] ArrowError),
    /// The manifest could not be read or written.
    #[error("segment manifest: {0}")]
    Manifest(String),
    /// The data directory's layout is unknown, or a path does not fit it.
    #[error("data directory layout: {0}")]
    Layout(String),
}

pub(crate) fn io_err(op: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> SegmentError {
    let path = path.to_path_buf();
    move |source| SegmentError::Io { op, path, source }
}

fn pq_err(path: &Path) -> impl FnOnce(parquet::errors::ParquetError) -> SegmentError {
    let path = path.to_path_buf();
    move |source| SegmentError::Parquet { path, source }
}

/// What the manifest records about a segment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct SegmentMeta {
    /// Unique id (also the file name).
    pub id: u64,
    /// The table it belongs to.
    pub table_id: u64,
    /// Start of its time partition (ns since the epoch).
    pub partition: i64,
    /// Smallest and largest `time` it holds.
    pub min_time: i64,
    pub max_time: i64,
    /// Rows it holds.
    pub rows: u64,
    /// File size in bytes.
    pub bytes: u64,
    /// Newest write sequence whose rows it may hold.
    pub max_seq: u64,
    /// Path relative to the data directory.
    pub path: String,
    /// Format version of the file.
    pub format: u32,
}

/// An open segment. Queries hold an `Arc` for as long as they may read the file; a segment
/// replaced by compaction or dropped by retention is deleted when the last holder lets go.
#[derive(Debug)]
pub(crate) struct Segment {
    pub meta: SegmentMeta,
    /// Absolute path of the file.
    pub path: PathBuf,
    obsolete: AtomicBool,
}

impl Segment {
    pub(crate) fn new(meta: SegmentMeta, data_dir: &Path) -> Segment {
        let path = data_dir.join(&meta.path);
        Segment {
            meta,
            path,
            obsolete: AtomicBool::new(false),
        }
    }

    /// Where DataFusion reads the file (see [`super::layout::location`]).
    pub(crate) fn location(&self) -> Result<datafusion::object_store::path::Path, SegmentError> {
        super::layout::location(&self.meta.path)
    }

    /// The manifest no longer lists this segment: delete the file once nobody reads it.
    pub(crate) fn mark_obsolete(&self) {
        self.obsolete.store(true, Ordering::Release);
    }

    /// True once the manifest no longer lists it.
    pub(crate) fn is_obsolete(&self) -> bool {
        self.obsolete.load(Ordering::Acquire)
    }

    /// True when the segment's rows may fall in `[lo, hi]`.
    pub(crate) fn overlaps(&self, lo: i64, hi: i64) -> bool {
        self.meta.max_time >= lo && self.meta.min_time <= hi
    }
}

impl Drop for Segment {
    fn drop(&mut self) {
        if self.obsolete.load(Ordering::Acquire)
            && let Err(e) = std::fs::remove_file(&self.path)
            && e.kind() != std::io::ErrorKind::NotFound
        {
            // Left behind, it is removed as an orphan on the next open.
            tracing::warn!(path = %self.path.display(), error = %e, "could not delete an obsolete segment");
        }
    }
}

/// Start of the partition holding `time`, for partitions of `len` nanoseconds.
pub(crate) fn partition_of(time: i64, len: i64) -> i64 {
    time.div_euclid(len).saturating_mul(len)
}

/// Sorts `batch` by `sort_key` (tag column names, absent ones skipped) then `time`, nulls first.
pub(crate) fn sort_batch(
    batch: &RecordBatch,
    sort_key: &[Arc<str>],
) -> Result<RecordBatch, ArrowError> {
    let options = Some(SortOptions {
        descending: false,
        nulls_first: true,
    });
    let mut columns: Vec<SortColumn> = sort_key
        .iter()
        .filter_map(|name| batch.column_by_name(name))
        .map(|values| SortColumn {
            values: values.clone(),
            options,
        })
        .collect();
    if let Some(time) = batch.column_by_name(TIME_COLUMN) {
        columns.push(SortColumn {
            values: time.clone(),
            options,
        });
    }
    if columns.is_empty() || batch.num_rows() < 2 {
        return Ok(batch.clone());
    }
    let indices = lexsort_to_indices(&columns, None)?;
    take_record_batch(batch, &indices)
}

/// Writes a segment file: to a temporary name, fsynced, renamed into place, directory fsynced —
/// so a file under its final name is always whole.
pub(crate) struct SegmentWriter {
    io: Io,
    writer: Option<ArrowWriter<File>>,
    tmp: PathBuf,
    path: PathBuf,
    rows: u64,
    min_time: i64,
    max_time: i64,
}

impl SegmentWriter {
    pub(crate) fn create(
        io: &Io,
        path: &Path,
        schema: &SchemaRef,
        sort_key: &[Arc<str>],
    ) -> Result<SegmentWriter, SegmentError> {
        let dir = path.parent().ok_or_else(|| {
            SegmentError::Manifest(format!("{} has no directory", path.display()))
        })?;
        std::fs::create_dir_all(dir).map_err(io_err("creating directory", dir))?;
        let tmp = path.with_extension("parquet.tmp");
        let file = File::create(&tmp).map_err(io_err("creating", &tmp))?;
        let mut sorting: Vec<SortingColumn> = sort_key
            .iter()
            .filter_map(|name| schema.index_of(name).ok())
            .map(|i| SortingColumn {
                column_idx: i as i32,
                descending: false,
                nulls_first: true,
            })
            .collect();
        if let Ok(i) = schema.index_of(TIME_COLUMN) {
            sorting.push(SortingColumn {
                column_idx: i as i32,
                descending: false,
                nulls_first: true,
            });
        }
        let props = WriterProperties::builder()
            .set_compression(Compression::ZSTD(
                ZstdLevel::try_new(3).map_err(pq_err(path))?,
            ))
            .set_max_row_group_row_count(Some(ROW_GROUP_ROWS))
            .set_data_page_row_count_limit(PAGE_ROWS)
            .set_statistics_enabled(EnabledStatistics::Page)
            .set_sorting_columns(Some(sorting))
            .set_key_value_metadata(Some(vec![parquet::file::metadata::KeyValue::new(
                "rivulet.segment_format".to_string(),
                SEGMENT_FORMAT_VERSION.to_string(),
            )]))
            .set_created_by(format!("rivulet {}", env!("CARGO_PKG_VERSION")))
            .build();
        let writer =
            ArrowWriter::try_new(file, schema.clone(), Some(props)).map_err(pq_err(path))?;
        Ok(SegmentWriter {
            io: io.clone(),
            writer: Some(writer),
            tmp,
            path: path.to_path_buf(),
            rows: 0,
            min_time: i64::MAX,
            max_time: i64::MIN,
        })
    }

    /// Appends sorted rows.
    pub(crate) fn write(&mut self, batch: &RecordBatch) -> Result<(), SegmentError> {
        if batch.num_rows() == 0 {
            return Ok(());
        }
        let (lo, hi) = super::buffer::min_max(super::buffer::time_values(batch)?);
        self.min_time = self.min_time.min(lo);
        self.max_time = self.max_time.max(hi);
        self.rows += batch.num_rows() as u64;
        let path = &self.path;
        self.io
            .check(IoOp::SegmentWrite, &self.tmp)
            .map_err(io_err("writing", &self.tmp))?;
        match &mut self.writer {
            Some(w) => w.write(batch).map_err(pq_err(path)),
            None => Err(SegmentError::Manifest(
                "segment writer already finished".into(),
            )),
        }
    }

    /// Finishes the file; returns (rows, min time, max time, bytes).
    pub(crate) fn finish(mut self) -> Result<(u64, i64, i64, u64), SegmentError> {
        let writer = self
            .writer
            .take()
            .ok_or_else(|| SegmentError::Manifest("segment writer already finished".into()))?;
        let file = writer.into_inner().map_err(pq_err(&self.path))?;
        self.io
            .check(IoOp::FileSync, &self.tmp)
            .and_then(|()| file.sync_all())
            .map_err(io_err("fsync", &self.tmp))?;
        let bytes = file.metadata().map_err(io_err("stat", &self.tmp))?.len();
        drop(file);
        self.io
            .check(IoOp::Rename, &self.tmp)
            .and_then(|()| std::fs::rename(&self.tmp, &self.path))
            .map_err(io_err("renaming", &self.tmp))?;
        // The file's directory, and the entries of the directories that may have been created
        // for it (partition, table, database, `tables`) in theirs: a crash must not lose them
        // once the manifest lists the file and the WAL is gone.
        for dir in self.path.ancestors().skip(1).take(5) {
            sync_dir(&self.io, dir)?;
        }
        Ok((self.rows, self.min_time, self.max_time, bytes))
    }
}

impl Drop for SegmentWriter {
    fn drop(&mut self) {
        if self.writer.is_some() {
            // Abandoned (an error part-way): the temporary file is never referenced.
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

/// Fsyncs a directory so a file created or renamed in it survives a crash.
pub(crate) fn sync_dir(io: &Io, dir: &Path) -> Result<(), SegmentError> {
    io.check(IoOp::FileSync, dir)
        .and_then(|()| File::open(dir))
        .and_then(|d| d.sync_all())
        .map_err(io_err("syncing directory", dir))
}

/// Reads a whole segment (its own columns; callers project onto the table schema).
pub(crate) fn read_segment(path: &Path) -> Result<Vec<RecordBatch>, SegmentError> {
    let file = File::open(path).map_err(io_err("opening", path))?;
    let reader = ParquetRecordBatchReaderBuilder::try_new(file)
        .map_err(pq_err(path))?
        .with_batch_size(65_536)
        .build()
        .map_err(pq_err(path))?;
    let mut out = Vec::new();
    for batch in reader {
        out.push(batch?);
    }
    Ok(out)
}

/// Estimated distinct values of a column (exact for dictionary arrays: distinct keys used).
pub(crate) fn distinct_count(array: &ArrayRef) -> usize {
    use arrow::array::{Array, DictionaryArray};
    use arrow::datatypes::Int32Type;
    if let Some(dict) = array.as_any().downcast_ref::<DictionaryArray<Int32Type>>() {
        let values = dict.values();
        let mut seen = vec![false; values.len()];
        let mut strings = std::collections::HashSet::new();
        for key in dict.keys().iter().flatten() {
            let k = key as usize;
            if k < seen.len() && !seen[k] {
                seen[k] = true;
                if let Some(s) = values.as_any().downcast_ref::<arrow::array::StringArray>() {
                    strings.insert(s.value(k).to_string());
                }
            }
        }
        return strings.len();
    }
    array.len()
}
