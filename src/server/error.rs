//! The one place where errors become HTTP responses.
//!
//! Client mistakes (bad lines, bad SQL, unknown tables) are 4xx with the message; failures of the
//! server itself (I/O, a poisoned WAL) are 5xx whose details go to the log, not to the client.
//! Write errors use the JSON shape of the InfluxDB API version the client spoke, so its client
//! libraries show them.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use datafusion::error::DataFusionError;
use serde_json::{Value, json};

use crate::{Error, WalError, WriteError};

/// The API whose error shape a response uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Dialect {
    /// InfluxDB 1.x: `{"error": "…"}`.
    V1,
    /// InfluxDB 2.x: `{"code": "invalid", "message": "…"}`.
    V2,
    /// InfluxDB 3 and Rivulet's own endpoints: `{"error": "…", "data": …}`.
    V3,
}

/// An error response.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    message: String,
    data: Option<Value>,
    dialect: Dialect,
    /// The Postgres SQLSTATE of a query error, where the status says too little (which kind
    /// of bad SQL); the Postgres front end falls back to one per status.
    sqlstate: Option<&'static str>,
}

impl ApiError {
    /// The message the client gets.
    pub(crate) fn message(&self) -> &str {
        &self.message
    }

    pub(crate) fn new(status: StatusCode, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            message: message.into(),
            data: None,
            dialect: Dialect::V3,
            sqlstate: None,
        }
    }

    pub(crate) fn with_sqlstate(mut self, code: &'static str) -> ApiError {
        self.sqlstate = Some(code);
        self
    }

    /// The SQLSTATE the query layer's error implies, if it said.
    pub(crate) fn sqlstate(&self) -> Option<&'static str> {
        self.sqlstate
    }

    pub(crate) fn bad_request(message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, message)
    }

    pub(crate) fn with_data(mut self, data: Value) -> ApiError {
        self.data = Some(data);
        self
    }

    pub(crate) fn dialect(mut self, dialect: Dialect) -> ApiError {
        self.dialect = dialect;
        self
    }

    /// The status of the response.
    pub fn status(&self) -> StatusCode {
        self.status
    }
}

fn internal(e: &dyn std::fmt::Display) -> ApiError {
    tracing::error!(error = %e, "request failed");
    ApiError::new(
        StatusCode::INTERNAL_SERVER_ERROR,
        "internal error; the details are in the server log",
    )
}

impl From<Error> for ApiError {
    fn from(e: Error) -> ApiError {
        classify(&e)
    }
}

/// The response for `e` (internal failures are logged here, and answered with a generic
/// message).
pub(crate) fn classify(e: &Error) -> ApiError {
    match e {
        Error::Write(WriteError::Rejected { .. })
        | Error::Write(WriteError::InvalidDatabase(_))
        | Error::Write(WriteError::InvalidBatch { .. })
        | Error::Write(WriteError::Wal(WalError::Record { .. })) => {
            ApiError::bad_request(e.to_string())
        }
        Error::Write(WriteError::Full(_)) => {
            tracing::error!(error = %e, "write refused");
            ApiError::new(StatusCode::INSUFFICIENT_STORAGE, e.to_string())
        }
        Error::Write(WriteError::Wal(WalError::NotAppended { source, .. })) => {
            tracing::error!(error = %e, "write not stored");
            let status = if source.raw_os_error() == Some(28) {
                StatusCode::INSUFFICIENT_STORAGE
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            ApiError::new(
                status,
                if status == StatusCode::INSUFFICIENT_STORAGE {
                    "the write was not stored: the disk is full. Writes are refused until space \
                     is freed; queries are still answered"
                } else {
                    "the write was not stored: the storage failed; see the server log"
                },
            )
        }
        Error::Write(WriteError::Wal(WalError::Poisoned(_))) => {
            tracing::error!(error = %e, "write refused");
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "the database cannot accept writes after a storage failure; see the server log",
            )
        }
        Error::Closed => ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "the database is closing"),
        Error::Denied(_) => ApiError::new(StatusCode::FORBIDDEN, e.to_string()),
        // The client chose a format (or endpoint) that holds the whole result: its fix.
        Error::ResultTooLarge(_) => ApiError::bad_request(e.to_string()),
        Error::View(v) => match v {
            crate::ViewError::Invalid(_) => ApiError::bad_request(e.to_string()),
            crate::ViewError::NotFound(_) => ApiError::new(StatusCode::NOT_FOUND, e.to_string()),
            crate::ViewError::Exists(_) => ApiError::new(StatusCode::CONFLICT, e.to_string()),
            crate::ViewError::Behind(_) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string())
            }
            _ => internal(e),
        },
        Error::Subscribe(crate::SubscribeError::Unsupported(_)) => {
            ApiError::bad_request(e.to_string())
        }
        Error::Subscribe(crate::SubscribeError::TooMany(_)) => {
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, e.to_string())
        }
        Error::Subscribe(crate::SubscribeError::Ended(_)) => {
            ApiError::new(StatusCode::GONE, e.to_string())
        }
        Error::Query(q) => from_datafusion(q, e),
        _ => internal(e),
    }
}

fn from_datafusion(q: &DataFusionError, whole: &Error) -> ApiError {
    use datafusion::common::SchemaError;
    let bad = |code: &'static str| ApiError::bad_request(whole.to_string()).with_sqlstate(code);
    match q.find_root() {
        DataFusionError::SQL(..) => bad("42601"),
        DataFusionError::SchemaError(e, _) => match e.as_ref() {
            SchemaError::FieldNotFound { .. } => bad("42703"),
            SchemaError::AmbiguousReference { .. } => bad("42702"),
            _ => bad("42P01"),
        },
        DataFusionError::Plan(m) if m.contains("not found") && m.contains("table") => bad("42P01"),
        DataFusionError::Plan(_) | DataFusionError::Configuration(_) => bad("42000"),
        DataFusionError::NotImplemented(_) => bad("0A000"),
        DataFusionError::ArrowError(e, _)
            if matches!(e.as_ref(), arrow::error::ArrowError::DivideByZero) =>
        {
            bad("22012")
        }
        // Arrow errors in a query are the query's: a failed cast, …
        DataFusionError::Execution(_) | DataFusionError::ArrowError(..) => bad("22000"),
        DataFusionError::ResourcesExhausted(_) => {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, whole.to_string()).with_sqlstate("53000")
        }
        // An INSERT's write failed inside the query: classify the write's own error.
        DataFusionError::External(inner) => match inner.downcast_ref::<Error>() {
            Some(write_error) => classify(write_error),
            None => internal(whole),
        },
        _ => internal(whole),
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = match self.dialect {
            Dialect::V1 => json!({ "error": self.message }),
            Dialect::V2 => json!({
                "code": if self.status.is_server_error() { "internal error" } else { "invalid" },
                "message": self.message,
            }),
            Dialect::V3 => match self.data {
                Some(data) => json!({ "error": self.message, "data": data }),
                None => json!({ "error": self.message }),
            },
        };
        (self.status, Json(body)).into_response()
    }
}
