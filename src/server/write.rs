//! Line protocol writes in the three InfluxDB dialects: `/write` (1.x), `/api/v2/write` (2.x)
//! and `/api/v3/write_lp` (3.x), with their parameter names and error shapes.

use std::collections::HashMap;
use std::net::SocketAddr;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use serde_json::json;

use super::AppState;
use super::auth::Scope;
use super::body::read_body;
use super::error::{ApiError, Dialect};
use super::metrics::Metrics;
use crate::{Error, LineError, Precision, WriteError, WriteOptions, WriteReceipt};

/// Header carrying the write's sequence number.
pub(crate) const SEQ_HEADER: &str = "x-rivulet-seq";

/// `/write` parameters (InfluxDB 1.x). `p` carries the token; `rp`, `u` and `consistency` are
/// accepted and ignored.
#[derive(Debug, Deserialize)]
pub(crate) struct V1Params {
    db: Option<String>,
    precision: Option<String>,
    /// The token, for 1.x clients that send credentials as parameters.
    p: Option<String>,
}

/// `/api/v2/write` parameters (InfluxDB 2.x). `org` is accepted and ignored.
#[derive(Debug, Deserialize)]
pub(crate) struct V2Params {
    bucket: Option<String>,
    precision: Option<String>,
}

/// `/api/v3/write_lp` parameters (InfluxDB 3).
#[derive(Debug, Deserialize)]
pub(crate) struct V3Params {
    db: Option<String>,
    precision: Option<String>,
    accept_partial: Option<bool>,
}

fn precision(value: Option<&str>, dialect: Dialect) -> Result<Precision, ApiError> {
    let Some(v) = value else {
        return Ok(match dialect {
            Dialect::V3 => Precision::Auto,
            _ => Precision::Nanosecond,
        });
    };
    let known = match dialect {
        Dialect::V1 => ["n", "ns", "u", "us", "ms", "s"].contains(&v),
        Dialect::V2 => ["ns", "us", "ms", "s"].contains(&v),
        Dialect::V3 => ["auto", "nanosecond", "microsecond", "millisecond", "second"].contains(&v),
    };
    let expected = match dialect {
        Dialect::V1 => "n, u, ms or s",
        Dialect::V2 => "ns, us, ms or s",
        Dialect::V3 => "auto, nanosecond, microsecond, millisecond or second",
    };
    match v.parse::<Precision>() {
        Ok(p) if known => Ok(p),
        _ => Err(
            ApiError::bad_request(format!("invalid precision '{v}': expected {expected}"))
                .dialect(dialect),
        ),
    }
}

fn utf8(body: &Bytes, dialect: Dialect) -> Result<&str, ApiError> {
    std::str::from_utf8(body).map_err(|e| {
        let at = e.valid_up_to();
        let line = 1 + body[..at].iter().filter(|&&b| b == b'\n').count();
        ApiError::bad_request(format!("line {line}: the body is not valid UTF-8")).dialect(dialect)
    })
}

/// Rejects a body with a line longer than `max` bytes, naming the first such line.
fn check_line_lengths(body: &[u8], max: usize, dialect: Dialect) -> Result<(), ApiError> {
    for (i, line) in body.split(|&b| b == b'\n').enumerate() {
        if line.len() > max {
            return Err(ApiError::bad_request(format!(
                "line {} is {} bytes long; the limit is {max} bytes",
                i + 1,
                line.len()
            ))
            .dialect(dialect));
        }
    }
    Ok(())
}

/// The texts of the lines `line_nos` (1-based), each cut to 100 characters, for error
/// reports: one pass over the body however many lines are reported (a report of 1,000 bad
/// lines re-split a 10 MiB body 1,000 times before).
fn line_texts(body: &str, line_nos: impl Iterator<Item = usize>) -> HashMap<usize, String> {
    let wanted: std::collections::BTreeSet<usize> = line_nos.collect();
    let Some(&last) = wanted.last() else {
        return HashMap::new();
    };
    body.split('\n')
        .enumerate()
        .take(last)
        .filter(|(i, _)| wanted.contains(&(i + 1)))
        .map(|(i, line)| {
            let line = line.trim_end_matches('\r');
            let text = match line.char_indices().nth(100) {
                Some((at, _)) => format!("{}…", &line[..at]),
                None => line.to_string(),
            };
            (i + 1, text)
        })
        .collect()
}

fn line_reports(body: &str, errors: &[LineError]) -> serde_json::Value {
    let texts = line_texts(body, errors.iter().map(|e| e.line));
    errors
        .iter()
        .map(|e| {
            json!({
                "original_line": texts.get(&e.line).map_or("", String::as_str),
                "line_number": e.line,
                "column": e.column,
                "error_message": e.reason,
            })
        })
        .collect()
}

fn accepted(receipt: &WriteReceipt) -> Response {
    let mut response = StatusCode::NO_CONTENT.into_response();
    if let Ok(v) = HeaderValue::from_str(&receipt.seq.to_string()) {
        response.headers_mut().insert(SEQ_HEADER, v);
    }
    response
}

/// One write request, whichever dialect it came in.
struct WriteRequest {
    db: Option<String>,
    precision: Precision,
    accept_partial: bool,
    headers: HeaderMap,
    body: Body,
    dialect: Dialect,
    peer: SocketAddr,
    v1_password: Option<String>,
}

/// Authorizes and runs a write, counting it in the metrics.
async fn write(state: AppState, req: WriteRequest) -> Result<Response, ApiError> {
    let metrics = state.metrics.clone();
    let result = write_inner(state, req).await;
    match &result {
        Ok(r) if r.status() == StatusCode::NO_CONTENT => Metrics::add(&metrics.writes, 1),
        _ => Metrics::add(&metrics.write_errors, 1),
    }
    result
}

/// Runs a write on the blocking pool (it waits for an fsync) and shapes the answer.
async fn write_inner(state: AppState, req: WriteRequest) -> Result<Response, ApiError> {
    let WriteRequest {
        db,
        precision,
        accept_partial,
        headers,
        body,
        dialect,
        peer,
        v1_password,
    } = req;
    state
        .authorize(
            &headers,
            v1_password.as_deref(),
            Scope::Write,
            db.as_deref(),
            peer,
            "write",
        )
        .map_err(|e| e.dialect(dialect))?;
    let db = db.filter(|d| !d.is_empty()).ok_or_else(|| {
        let what = match dialect {
            Dialect::V1 => "database is required (parameter db)",
            Dialect::V2 => "bucket is required (parameter bucket)",
            Dialect::V3 => "database is required (parameter db)",
        };
        ApiError::bad_request(what).dialect(dialect)
    })?;
    let bytes = read_body(
        &headers,
        body,
        state.config.max_body_bytes,
        state.config.body_read_timeout,
        dialect,
    )
    .await?;
    utf8(&bytes, dialect)?;
    check_line_lengths(&bytes, state.config.max_line_bytes, dialect)?;
    Metrics::add(&state.metrics.write_bytes, bytes.len() as u64);
    let options = WriteOptions {
        precision,
        accept_partial,
        first_line: 1,
    };
    let db_handle = state.db.clone();
    let body_for_write = bytes.clone();
    let result = tokio::task::spawn_blocking(move || {
        let text = std::str::from_utf8(&body_for_write).unwrap_or_default();
        db_handle.write_lines_with(&db, text, &options)
    })
    .await
    .map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("write task failed: {e}"),
        )
    })?;
    let text = std::str::from_utf8(&bytes).unwrap_or_default();
    if let Ok(receipt) = &result {
        Metrics::add(&state.metrics.write_rows, receipt.rows as u64);
    }
    match result {
        Ok(receipt) if receipt.rejected_total == 0 => Ok(accepted(&receipt)),
        Ok(receipt) if receipt.rows == 0 => {
            // Nothing stored: not a partial write, and no sequence of this request to report.
            let message = match dialect {
                Dialect::V3 => "parsing failed for write_lp endpoint".to_string(),
                _ => format!(
                    "{} bad line(s); nothing was written",
                    receipt.rejected_total
                ),
            };
            Err(rejected(message, text, &receipt.rejected, dialect))
        }
        Ok(receipt) => {
            // Accept-partial: the good lines are stored; report the bad ones with a 400.
            let message = format!(
                "partial write of line protocol occurred: {} line(s) rejected, {} row(s) written",
                receipt.rejected_total, receipt.rows
            );
            let mut response = rejected(message, text, &receipt.rejected, dialect).into_response();
            if let Ok(v) = HeaderValue::from_str(&receipt.seq.to_string()) {
                response.headers_mut().insert(SEQ_HEADER, v);
            }
            Ok(response)
        }
        Err(Error::Write(WriteError::Rejected { errors, total, .. })) => {
            let message = match dialect {
                Dialect::V3 => "parsing failed for write_lp endpoint".to_string(),
                _ => format!("{total} bad line(s); nothing was written"),
            };
            Err(rejected(message, text, &errors, dialect))
        }
        Err(e) => Err(ApiError::from(e).dialect(dialect)),
    }
}

/// A 400 naming each bad line, in the shape of the dialect.
fn rejected(message: String, body: &str, errors: &[LineError], dialect: Dialect) -> ApiError {
    match dialect {
        Dialect::V3 => ApiError::bad_request(message).with_data(line_reports(body, errors)),
        // 1.x and 2.x carry one message: name the lines in it, as InfluxDB's "unable to parse".
        _ => {
            let shown = &errors[..errors.len().min(20)];
            let texts = line_texts(body, shown.iter().map(|e| e.line));
            let lines: Vec<String> = shown
                .iter()
                .map(|e| {
                    let text = texts.get(&e.line).map_or("", String::as_str);
                    format!("unable to parse '{text}': {e}")
                })
                .collect();
            ApiError::bad_request(format!("{message}: {}", lines.join("; "))).dialect(dialect)
        }
    }
}

pub(crate) async fn v1(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<V1Params>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let precision = precision(params.precision.as_deref(), Dialect::V1)?;
    let req = WriteRequest {
        db: params.db,
        precision,
        accept_partial: false,
        headers,
        body,
        dialect: Dialect::V1,
        peer,
        v1_password: params.p,
    };
    write(state, req).await
}

pub(crate) async fn v2(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<V2Params>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let precision = precision(params.precision.as_deref(), Dialect::V2)?;
    let req = WriteRequest {
        db: params.bucket,
        precision,
        accept_partial: false,
        headers,
        body,
        dialect: Dialect::V2,
        peer,
        v1_password: None,
    };
    write(state, req).await
}

pub(crate) async fn v3(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<V3Params>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let precision = precision(params.precision.as_deref(), Dialect::V3)?;
    let req = WriteRequest {
        db: params.db,
        precision,
        // InfluxDB 3 accepts partial writes unless told otherwise.
        accept_partial: params.accept_partial.unwrap_or(true),
        headers,
        body,
        dialect: Dialect::V3,
        peer,
        v1_password: None,
    };
    write(state, req).await
}

#[cfg(test)]
mod tests {
    use super::line_texts;

    #[test]
    fn line_texts_index_the_body_once_for_every_reported_line() {
        let long = "x".repeat(150);
        let body = format!("a 1\r\nb 2\n{long}\n\nlast");
        let texts = line_texts(&body, [5, 1, 3, 1, 9].into_iter());
        assert_eq!(texts.get(&1).map(String::as_str), Some("a 1"));
        assert_eq!(texts.get(&3).map(|t| t.chars().count()), Some(101));
        assert_eq!(texts.get(&5).map(String::as_str), Some("last"));
        assert_eq!(texts.get(&9), None, "past the end");
        assert_eq!(texts.len(), 3);
        // A thousand bad lines in a 10 MiB body: one pass.
        let body = "bad\n".repeat(10 << 18);
        let texts = line_texts(&body, (1..=1000).map(|i| i * 2000));
        assert_eq!(texts.len(), 1000);
        assert!(texts.values().all(|t| t == "bad"));
    }
}
