//! The crate's top-level error: one variant per module error, plus opening failures.

use std::path::PathBuf;

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
    /// A result that had to be held whole passed its size limit (the message names it).
    #[error("{0}")]
    ResultTooLarge(String),
}

impl From<arrow::error::ArrowError> for Error {
    fn from(e: arrow::error::ArrowError) -> Error {
        Error::Segment(SegmentError::Arrow(e))
    }
}

impl From<crate::query::QueryError> for Error {
    /// A malformed storage statement is a planning error, like any bad SQL.
    fn from(e: crate::query::QueryError) -> Error {
        Error::Query(datafusion::error::DataFusionError::Plan(e.to_string()))
    }
}

impl From<crate::storage::engine::StorageError> for Error {
    fn from(e: crate::storage::engine::StorageError) -> Error {
        use crate::storage::engine::StorageError as S;
        match e {
            // A failure of the write path, as writers have always seen it.
            S::Wal(w) => Error::Write(WriteError::Wal(w)),
            S::Replay(w) => Error::Wal(w),
            S::Catalog(c) => Error::Catalog(c),
            S::Segment(s) => Error::Segment(s),
            S::Io { op, path, source } => Error::Io { op, path, source },
            S::Locked(p) => Error::Locked(p),
            S::Config(m) => Error::Config(m),
            S::Closed => Error::Closed,
            S::Full(m) => Error::Write(WriteError::Full(m)),
            S::Merge(q) => Error::Query(q),
            e @ (S::DatabaseNotFound(_) | S::TableNotFound { .. }) => {
                Error::Query(datafusion::error::DataFusionError::Plan(e.to_string()))
            }
        }
    }
}
