//! The crate's top-level error: one variant per module error, plus opening failures.

use std::path::{Path, PathBuf};

use crate::ingest::WriteError;
use crate::storage::catalog::CatalogError;
use crate::storage::segment::SegmentError;
use crate::storage::wal::WalError;

/// Any error of a [`Db`](crate::Db) operation.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// A write was refused or failed.
    #[error(transparent)]
    Write(#[from] WriteError),
    /// A query failed (planning or execution).
    #[error("{0}")]
    Query(#[from] datafusion::error::DataFusionError),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// The WAL could not be replayed on open.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// A segment file, or the segment manifest, failed.
    #[error(transparent)]
    Segment(#[from] SegmentError),
    /// A file-system operation failed.
    #[error("{op} {path} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The OS error.
        source: std::io::Error,
    },
    /// Another process has the data directory open.
    #[error("data directory {0} is in use by another process")]
    Locked(PathBuf),
    /// The configuration is invalid.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// The caller may not touch a database the statement names.
    #[error("{0}")]
    Denied(String),
    /// A materialized-view statement failed, or a view did not catch up in time.
    #[error(transparent)]
    View(#[from] crate::db::ViewError),
    /// The database was closed.
    #[error("the database is closed")]
    Closed,
    /// A subscription could not start, or ended.
    #[error(transparent)]
    Subscribe(#[from] crate::subscribe::SubscribeError),
}

impl From<arrow::error::ArrowError> for Error {
    fn from(e: arrow::error::ArrowError) -> Error {
        Error::Segment(SegmentError::Arrow(e))
    }
}

impl Error {
    pub(crate) fn io(op: &'static str, path: &Path, source: std::io::Error) -> Error {
        Error::Io {
            op,
            path: path.to_path_buf(),
            source,
        }
    }
}
