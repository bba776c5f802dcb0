//! Ingest: line protocol parsing and turning rows (lines or Arrow batches) into per-table
//! Arrow chunks checked against the catalog. Pure: nothing here writes; the storage engine
//! logs and applies what it prepares.

pub(crate) mod batch;
pub(crate) mod builder;
pub(crate) mod check;
pub mod line_protocol;
pub(crate) mod prepare;

use line_protocol::LineError;

use crate::storage::catalog::CatalogError;
use crate::storage::wal::WalError;

/// Why a line, a column or a batch does not fit (the reason a [`LineError`] or
/// [`WriteError::InvalidBatch`] carries).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub(crate) struct Refusal(pub(crate) String);

impl From<String> for Refusal {
    fn from(reason: String) -> Refusal {
        Refusal(reason)
    }
}

impl From<Refusal> for String {
    fn from(r: Refusal) -> String {
        r.0
    }
}

/// Why a write was refused or failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WriteError {
    /// Bad lines in an atomic write: nothing was written.
    #[error("{} rejected in database '{db}'; nothing was written. {}", plural(*.total, "bad line"), summary(.errors, *.total))]
    Rejected {
        /// The target database.
        db: String,
        /// The bad lines (at most 1000 are listed).
        errors: Vec<LineError>,
        /// How many lines were bad in all.
        total: usize,
    },
    /// The database name is not allowed.
    #[error("{0}")]
    InvalidDatabase(String),
    /// An Arrow batch does not fit the table.
    #[error("invalid batch for table '{table}' in database '{db}': {reason}")]
    InvalidBatch {
        /// The target database.
        db: String,
        /// The target table.
        table: String,
        /// What is wrong.
        reason: String,
    },
    /// The WAL failed.
    #[error(transparent)]
    Wal(#[from] WalError),
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// Building Arrow arrays failed.
    #[error("building rows failed: {0}")]
    Arrow(#[from] arrow::error::ArrowError),
    /// The write buffer is full and persisting it fails (typically: the disk is full).
    /// Writes are refused until a persist succeeds; queries are still answered.
    #[error("{0}")]
    Full(String),
}

fn plural(n: usize, what: &str) -> String {
    if n == 1 {
        format!("1 {what}")
    } else {
        format!("{n} {what}s")
    }
}

fn summary(errors: &[LineError], total: usize) -> String {
    let shown: Vec<String> = errors.iter().take(5).map(|e| e.to_string()).collect();
    let mut s = shown.join("; ");
    if total > shown.len() {
        s.push_str(&format!("; and {} more", total - shown.len()));
    }
    s
}
