//! SQL over HTTP: `/api/v3/query_sql` (read-only, InfluxDB 3 compatible) and `/api/v1/sql`
//! (statements: `INSERT` and queries).

use std::net::SocketAddr;

use futures::StreamExt;

use arrow::array::RecordBatch;
use axum::body::Body;
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;

use super::AppState;
use super::auth::Scope;
use super::body::read_json;
use super::error::ApiError;
use super::front::Running;

/// Media type of an Arrow IPC stream.
const ARROW_STREAM: &str = "application/vnd.apache.arrow.stream";

/// Parameters of `/api/v3/query_sql` (query string for GET, JSON body for POST).
#[derive(Debug, Deserialize)]
pub(crate) struct QueryParams {
    db: Option<String>,
    q: Option<String>,
    format: Option<String>,
}

/// Result encodings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    Json,
    JsonLines,
    Csv,
    Pretty,
    Parquet,
    Arrow,
}

fn format(params: &QueryParams, headers: &HeaderMap) -> Result<Format, ApiError> {
    let accepts_arrow = headers
        .get(header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|a| a.contains(ARROW_STREAM));
    match params.format.as_deref() {
        None if accepts_arrow => Ok(Format::Arrow),
        None | Some("json") => Ok(Format::Json),
        Some("jsonl") => Ok(Format::JsonLines),
        Some("csv") => Ok(Format::Csv),
        Some("pretty") => Ok(Format::Pretty),
        Some("parquet") => Ok(Format::Parquet),
        Some("arrow") => Ok(Format::Arrow),
        Some(other) => Err(ApiError::bad_request(format!(
            "unknown format '{other}': expected json, jsonl, csv, pretty, parquet or arrow"
        ))),
    }
}

fn encode(batches: &[RecordBatch], format: Format) -> Result<(Vec<u8>, &'static str), String> {
    let mut out = Vec::new();
    let content_type = match format {
        Format::Json => {
            let mut w = arrow::json::ArrayWriter::new(&mut out);
            for b in batches {
                w.write(b).map_err(|e| e.to_string())?;
            }
            w.finish().map_err(|e| e.to_string())?;
            drop(w);
            if out.is_empty() {
                out.extend_from_slice(b"[]");
            }
            "application/json"
        }
        Format::JsonLines => {
            let mut w = arrow::json::LineDelimitedWriter::new(&mut out);
            for b in batches {
                w.write(b).map_err(|e| e.to_string())?;
            }
            w.finish().map_err(|e| e.to_string())?;
            "application/jsonl"
        }
        Format::Csv => {
            let mut w = arrow::csv::WriterBuilder::new()
                .with_header(true)
                .build(&mut out);
            for b in batches {
                w.write(b).map_err(|e| e.to_string())?;
            }
            drop(w);
            "text/csv; charset=utf-8"
        }
        Format::Pretty => {
            let table =
                arrow::util::pretty::pretty_format_batches(batches).map_err(|e| e.to_string())?;
            out.extend_from_slice(format!("{table}\n").as_bytes());
            "text/plain; charset=utf-8"
        }
        Format::Parquet | Format::Arrow => {
            let Some(schema) = batches.first().map(|b| b.schema()) else {
                return Ok((
                    out,
                    if format == Format::Arrow {
                        ARROW_STREAM
                    } else {
                        "application/vnd.apache.parquet"
                    },
                ));
            };
            if format == Format::Arrow {
                let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema)
                    .map_err(|e| e.to_string())?;
                for b in batches {
                    w.write(b).map_err(|e| e.to_string())?;
                }
                w.finish().map_err(|e| e.to_string())?;
                drop(w);
                ARROW_STREAM
            } else {
                let mut w = parquet::arrow::ArrowWriter::try_new(&mut out, schema, None)
                    .map_err(|e| e.to_string())?;
                for b in batches {
                    w.write(b).map_err(|e| e.to_string())?;
                }
                w.close().map_err(|e| e.to_string())?;
                "application/vnd.apache.parquet"
            }
        }
    };
    Ok((out, content_type))
}

/// Collects a result that a response must hold whole, failing once it holds more than
/// `limit` bytes of Arrow memory (so no such response can take the server's memory).
async fn collect_within(running: Running, limit: usize) -> Result<Vec<RecordBatch>, ApiError> {
    let Running {
        schema,
        mut batches,
    } = running;
    let mut out = Vec::new();
    let mut bytes = 0usize;
    while let Some(batch) = batches.next().await {
        let batch = batch?;
        bytes = bytes.saturating_add(batch_bytes(&batch));
        if bytes > limit {
            return Err(crate::Error::ResultTooLarge(format!(
                "the result passed the limit of {limit} bytes for a response held whole \
                 (format=pretty or parquet, /api/v1/sql) (--max-result-bytes, \
                 ServerConfig::max_result_bytes): use a streamed format (json, jsonl, csv, \
                 arrow), add a LIMIT, or raise the limit"
            ))
            .into());
        }
        out.push(batch);
    }
    if out.is_empty() {
        out.push(RecordBatch::new_empty(schema));
    }
    Ok(out)
}

/// Bytes of the Arrow buffers `batch` uses (its slices, not whole shared buffers).
fn batch_bytes(batch: &RecordBatch) -> usize {
    batch
        .columns()
        .iter()
        .map(|c| c.to_data().get_slice_memory_size().unwrap_or(0))
        .sum()
}

/// Encodes a result batch by batch, for streamed responses.
enum StreamEncoder {
    /// A JSON array: `[`, rows separated by commas, `]`.
    Json {
        rows: usize,
    },
    JsonLines,
    Csv {
        header: bool,
    },
    Arrow(Option<Box<arrow::ipc::writer::StreamWriter<Vec<u8>>>>),
}

impl StreamEncoder {
    fn new(format: Format) -> Option<StreamEncoder> {
        match format {
            Format::Json => Some(StreamEncoder::Json { rows: 0 }),
            Format::JsonLines => Some(StreamEncoder::JsonLines),
            Format::Csv => Some(StreamEncoder::Csv { header: true }),
            Format::Arrow => Some(StreamEncoder::Arrow(None)),
            // A Parquet footer and an aligned table need the whole result.
            Format::Parquet | Format::Pretty => None,
        }
    }

    fn batch(&mut self, batch: &RecordBatch) -> Result<Vec<u8>, String> {
        let mut out = Vec::new();
        match self {
            StreamEncoder::Json { rows } => {
                let mut lines = Vec::new();
                let mut w = arrow::json::LineDelimitedWriter::new(&mut lines);
                w.write(batch).map_err(|e| e.to_string())?;
                w.finish().map_err(|e| e.to_string())?;
                for line in lines.split(|&b| b == b'\n').filter(|l| !l.is_empty()) {
                    out.push(if *rows == 0 { b'[' } else { b',' });
                    out.extend_from_slice(line);
                    *rows += 1;
                }
            }
            StreamEncoder::JsonLines => {
                let mut w = arrow::json::LineDelimitedWriter::new(&mut out);
                w.write(batch).map_err(|e| e.to_string())?;
                w.finish().map_err(|e| e.to_string())?;
            }
            StreamEncoder::Csv { header } => {
                let mut w = arrow::csv::WriterBuilder::new()
                    .with_header(*header)
                    .build(&mut out);
                w.write(batch).map_err(|e| e.to_string())?;
                *header = false;
            }
            StreamEncoder::Arrow(writer) => {
                if writer.is_none() {
                    *writer = Some(Box::new(
                        arrow::ipc::writer::StreamWriter::try_new(Vec::new(), &batch.schema())
                            .map_err(|e| e.to_string())?,
                    ));
                }
                if let Some(w) = writer {
                    w.write(batch).map_err(|e| e.to_string())?;
                    out = std::mem::take(w.get_mut());
                }
            }
        }
        Ok(out)
    }

    fn finish(&mut self) -> Result<Vec<u8>, String> {
        match self {
            StreamEncoder::Json { rows: 0 } => Ok(b"[]".to_vec()),
            StreamEncoder::Json { .. } => Ok(b"]".to_vec()),
            StreamEncoder::Arrow(Some(w)) => {
                w.finish().map_err(|e| e.to_string())?;
                Ok(std::mem::take(w.get_mut()))
            }
            _ => Ok(Vec::new()),
        }
    }
}

fn content_type(format: Format) -> &'static str {
    match format {
        Format::Json => "application/json",
        Format::JsonLines => "application/jsonl",
        Format::Csv => "text/csv; charset=utf-8",
        Format::Pretty => "text/plain; charset=utf-8",
        Format::Parquet => "application/vnd.apache.parquet",
        Format::Arrow => ARROW_STREAM,
    }
}

async fn run(
    state: AppState,
    params: QueryParams,
    headers: HeaderMap,
    peer: SocketAddr,
) -> Result<Response, ApiError> {
    let db = params.db.clone().unwrap_or_else(|| "main".to_string());
    let admitted = state.admit(&headers, None, Scope::Read, &db, peer)?;
    let format = format(&params, &headers)?;
    let q = params
        .q
        .filter(|q| !q.trim().is_empty())
        .ok_or_else(|| ApiError::bad_request("missing query (parameter q)"))?;
    let running = admitted.run(&q, Default::default()).await?;
    let encoding_failed = |e: String| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the result failed: {e}"),
        )
    };

    let Some(mut encoder) = StreamEncoder::new(format) else {
        // Formats that need the whole result.
        let batches = collect_within(running, state.config.max_result_bytes).await?;
        let (body, content_type) = encode(&batches, format).map_err(encoding_failed)?;
        return Ok(([(header::CONTENT_TYPE, content_type)], body).into_response());
    };

    // Streamed formats: the first batch has arrived (or the result is empty), so errors found
    // when the query starts got a proper status; later batches are sent as they are computed.
    let Running {
        schema,
        mut batches,
    } = running;
    let first = match batches.next().await {
        Some(batch) => batch?,
        None => RecordBatch::new_empty(schema),
    };
    let head = encoder.batch(&first).map_err(encoding_failed)?;
    let rest = futures::stream::unfold(
        (batches, encoder, false),
        move |(mut batches, mut encoder, done)| async move {
            if done {
                return None;
            }
            let (chunk, done) = match batches.next().await {
                Some(Ok(batch)) => (encoder.batch(&batch), false),
                Some(Err(e)) => (Err(e.message().to_string()), true),
                None => (encoder.finish(), true),
            };
            // An error after the status was sent can only cut the response short.
            let item = chunk
                .map(axum::body::Bytes::from)
                .map_err(std::io::Error::other);
            Some((item, (batches, encoder, done)))
        },
    );
    let body =
        futures::stream::once(
            async move { Ok::<_, std::io::Error>(axum::body::Bytes::from(head)) },
        )
        .chain(rest);
    Ok((
        [(header::CONTENT_TYPE, content_type(format))],
        axum::body::Body::from_stream(body),
    )
        .into_response())
}

pub(crate) async fn query_get(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<QueryParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    run(state, params, headers, peer).await
}

pub(crate) async fn query_post(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    // `run` checks the database named in the body.
    let params: QueryParams =
        authorized_json(&state, &headers, body, Scope::Read, peer, "query").await?;
    run(state, params, headers, peer).await
}

/// Checks the token (without a database: that is in the body), then reads the JSON body within
/// the server's limits — so no unauthenticated client can make the server read a body.
async fn authorized_json<T: serde::de::DeserializeOwned>(
    state: &AppState,
    headers: &HeaderMap,
    body: Body,
    scope: Scope,
    peer: SocketAddr,
    what: &str,
) -> Result<T, ApiError> {
    state.authorize(headers, None, scope, None, peer, what)?;
    read_json(
        headers,
        body,
        state.config.max_body_bytes,
        state.config.body_read_timeout,
    )
    .await
}

/// `/api/v1/sql` body.
#[derive(Debug, Deserialize)]
pub(crate) struct StatementBody {
    db: Option<String>,
    q: String,
}

/// Runs a statement (`INSERT`, or a query) and answers with its result as JSON.
pub(crate) async fn statement(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: Body,
) -> Result<Response, ApiError> {
    let body: StatementBody =
        authorized_json(&state, &headers, body, Scope::Admin, peer, "statement").await?;
    let db = body.db.unwrap_or_else(|| "main".to_string());
    let admitted = state.admit(&headers, None, Scope::Admin, &db, peer)?;
    let running = admitted.run(&body.q, Default::default()).await?;
    let batches = collect_within(running, state.config.max_result_bytes).await?;
    let (out, content_type) = encode(&batches, Format::Json).map_err(|e| {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("encoding the result failed: {e}"),
        )
    })?;
    Ok(([(header::CONTENT_TYPE, content_type)], out).into_response())
}
