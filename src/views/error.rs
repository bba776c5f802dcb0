//! The views layer's error: what a view statement, a view's maintenance or a read waiting
//! for views reports.

use crate::error::Error;

/// A view statement's error.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ViewError {
    /// The definition or statement is not valid.
    #[error("{0}")]
    Invalid(String),
    /// No such view.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken.
    #[error("{0}")]
    Exists(String),
    /// A query waited too long for a view to catch up.
    #[error("{0}")]
    Behind(String),
    /// View maintenance failed inside the server (not the statement's fault).
    #[error("view maintenance failed: {0}")]
    Internal(String),
}

impl From<String> for ViewError {
    /// A message explaining why a definition or statement is not valid.
    fn from(m: String) -> ViewError {
        ViewError::Invalid(m)
    }
}

impl From<crate::query::QueryError> for ViewError {
    fn from(e: crate::query::QueryError) -> ViewError {
        ViewError::Invalid(e.to_string())
    }
}

/// An invalid definition or statement.
pub(crate) fn invalid(m: impl Into<String>) -> Error {
    Error::View(ViewError::Invalid(m.into()))
}
