//! The views layer's error: what a view statement, a view's maintenance or a read waiting
//! for views reports.

use crate::error::Error;

/// A view statement's error.
#[derive(Debug, thiserror::Error)]
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
}

/// An invalid definition or statement.
pub(crate) fn invalid(m: impl Into<String>) -> Error {
    Error::View(ViewError::Invalid(m.into()))
}
