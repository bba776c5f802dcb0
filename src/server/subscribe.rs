//! Subscriptions over HTTP: Server-Sent Events, WebSocket and long-poll. All three carry the
//! same messages (see `subscribe::encode`): a snapshot, then changes, progress, and reset or
//! lagged when a client is too far behind.

use std::collections::HashMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::time::Duration;

use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{ConnectInfo, Query, State};
use axum::http::{HeaderMap, HeaderValue};
use axum::response::sse::{Event, Sse};
use axum::response::{IntoResponse, Response};
use futures::{FutureExt, SinkExt, StreamExt};
use serde::Deserialize;

use super::auth::Scope;
use super::{ApiError, AppState, Stopping};
use crate::{ChangeBatch, ChangeKind, SubscribeOptions, error_json, message_arrow, message_json};

/// Query parameters of `/api/v1/subscribe` and `/api/v1/changes`.
#[derive(Debug, Deserialize)]
pub(crate) struct SubscribeParams {
    db: Option<String>,
    q: Option<String>,
    since: Option<u64>,
    snapshot: Option<bool>,
    progress_ms: Option<u64>,
    queue: Option<usize>,
    wait_ms: Option<u64>,
}

impl SubscribeParams {
    /// The database (default `main`), the token's access to it (read scope), and the query.
    fn authorized(
        &self,
        state: &AppState,
        headers: &HeaderMap,
        peer: SocketAddr,
    ) -> Result<(String, super::auth::Access, String), ApiError> {
        let db = self.db.clone().unwrap_or_else(|| "main".to_string());
        let access = state.authorize(headers, None, Scope::Read, Some(&db), peer, "subscribe")?;
        let q = self.query()?;
        Ok((db, access, q))
    }

    fn query(&self) -> Result<String, ApiError> {
        self.q
            .clone()
            .filter(|q| !q.trim().is_empty())
            .ok_or_else(|| ApiError::bad_request("missing query (parameter q)"))
    }

    fn options(&self, db: &str, since: Option<u64>) -> Result<SubscribeOptions, ApiError> {
        let mut o = SubscribeOptions {
            db: db.to_string(),
            since,
            ..SubscribeOptions::default()
        };
        if let Some(s) = self.snapshot {
            o.snapshot = s;
        }
        if let Some(ms) = self.progress_ms {
            if ms < 10 {
                return Err(ApiError::bad_request("progress_ms must be at least 10"));
            }
            o.progress_interval = Duration::from_millis(ms);
        }
        if let Some(q) = self.queue {
            if q == 0 || q > MAX_QUEUE {
                return Err(ApiError::bad_request(format!(
                    "queue must be between 1 and {MAX_QUEUE} changes"
                )));
            }
            o.queue_len = q;
        }
        Ok(o)
    }
}

/// What a client is told of a library error: the same classification as every other response
/// (internal failures are logged, and the client gets a generic message).
fn client_message(e: &crate::Error) -> String {
    super::error::classify(e).message().to_string()
}

/// The SSE event of a message. Only messages a client can resume from carry an `id`
/// (not the parts of a snapshot before its last, nor a reset).
fn event(m: &ChangeBatch) -> Event {
    let data = message_json(m, None).unwrap_or_else(|e| error_json(&client_message(&e), None));
    let e = Event::default().event(m.kind.name()).data(data);
    match m.kind {
        ChangeKind::Snapshot { last: false, .. } | ChangeKind::Reset => e,
        _ => e.id(m.seq.to_string()),
    }
}

/// `GET /api/v1/subscribe?db=D&q=SQL[&since=N][&snapshot=false][&progress_ms=M][&queue=N]`:
/// Server-Sent Events. `Last-Event-ID` (sent by `EventSource` on reconnect) resumes too.
pub(crate) async fn sse(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    stopping: Option<axum::Extension<Stopping>>,
    Query(params): Query<SubscribeParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (db, access, q) = params.authorized(&state, &headers, peer)?;
    let last_event = match headers.get("last-event-id") {
        Some(v) => Some(
            v.to_str()
                .ok()
                .and_then(|s| s.trim().parse::<u64>().ok())
                .ok_or_else(|| ApiError::bad_request("Last-Event-ID must be a sequence number"))?,
        ),
        None => None,
    };
    let options = params.options(&db, last_event.or(params.since))?;
    let sub = state
        .db
        .subscribe_within(&q, options, access.databases, access.owner)
        .await?;
    let stopping = Stopping::wait(stopping.map(|s| s.0));
    let stream = sub.take_until(Box::pin(stopping)).map(|m| {
        Ok::<_, Infallible>(match m {
            Ok(m) => event(&m),
            Err(e) => Event::default()
                .event("error")
                .data(error_json(&client_message(&e), None)),
        })
    });
    let mut response = Sse::new(stream).into_response();
    // Proxies (nginx) must not buffer the stream.
    response
        .headers_mut()
        .insert("x-accel-buffering", HeaderValue::from_static("no"));
    Ok(response)
}

/// `GET /api/v1/changes?db=D&q=SQL[&since=N][&wait_ms=M]`: long-poll. Without `since`, the
/// snapshot; with it, the changes after it, waiting up to `wait_ms` (default 30 s, at most
/// 120 s) when there are none. Answers `{"seq": N, "messages": [...]}`: poll again with
/// `since=N`.
pub(crate) async fn long_poll(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Query(params): Query<SubscribeParams>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let (db, access, q) = params.authorized(&state, &headers, peer)?;
    let wait = Duration::from_millis(params.wait_ms.unwrap_or(30_000).min(120_000));
    let mut options = params.options(&db, params.since)?;
    options.snapshot = true;
    options.progress_interval = wait.max(Duration::from_millis(1));
    let mut sub = state
        .db
        .subscribe_within(&q, options, access.databases, access.owner)
        .await?;
    let deadline = tokio::time::Instant::now() + wait;
    let limit = state.config.max_result_bytes;
    let mut answer = Answer {
        messages: Vec::new(),
        bytes: 0,
        limit,
    };
    loop {
        let next = match tokio::time::timeout_at(deadline, sub.next()).await {
            Ok(Some(next)) => next,
            Ok(None) | Err(_) => break,
        };
        let m = match next {
            Ok(m) => m,
            Err(e) if answer.messages.is_empty() => return Err(e.into()),
            Err(e) => {
                answer.messages.push(error_json(&client_message(&e), None));
                break;
            }
        };
        match m.kind {
            ChangeKind::Progress => break,
            ChangeKind::Snapshot { .. } | ChangeKind::Reset => {
                // A snapshot is answered whole (its parts do not move the position).
                answer.push(message_json(&m, None)?).map_err(|limit| {
                    ApiError::bad_request(format!(
                        "the snapshot passed the limit of {limit} bytes for one long-poll \
                         answer (--max-result-bytes, ServerConfig::max_result_bytes): \
                         subscribe with SSE or WebSocket, which stream it in parts, narrow \
                         the query, or raise the limit"
                    ))
                })?;
                if matches!(m.kind, ChangeKind::Snapshot { last: true, .. }) {
                    break;
                }
            }
            ChangeKind::Lagged => {
                answer.messages.push(message_json(&m, None)?);
                break;
            }
            ChangeKind::Change => {
                answer.add(message_json(&m, None)?);
                // Whatever else is ready now goes in the same answer, up to the limit (the
                // rest in the next one: nothing taken is left out).
                while answer.bytes <= answer.limit {
                    let Some(Some(Ok(m))) = sub.next().now_or_never() else {
                        break;
                    };
                    if m.kind != ChangeKind::Change {
                        break;
                    }
                    answer.add(message_json(&m, None)?);
                }
                break;
            }
        }
    }
    let messages = answer.messages;
    let body = format!(
        "{{\"seq\":{},\"messages\":[{}]}}",
        sub.position(),
        messages.join(",")
    );
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/json")],
        body,
    )
        .into_response())
}

/// A long-poll answer being gathered, and its size bound.
struct Answer {
    messages: Vec<String>,
    bytes: usize,
    limit: usize,
}

impl Answer {
    /// Adds a message (one already taken from the subscription: it must be sent).
    fn add(&mut self, json: String) {
        self.bytes = self.bytes.saturating_add(json.len());
        self.messages.push(json);
    }

    /// Adds a message that must fit: Err(limit) past the limit.
    fn push(&mut self, json: String) -> Result<(), usize> {
        self.add(json);
        if self.bytes > self.limit {
            return Err(self.limit);
        }
        Ok(())
    }
}

/// Largest `queue=` a subscriber may ask for (changes held for it before it conflates or lags).
const MAX_QUEUE: usize = 65_536;

/// Largest message a WebSocket client may send, and subscriptions per connection.
const WS_MAX_CLIENT_MESSAGE: usize = 64 << 10;
const WS_MAX_SUBSCRIPTIONS: usize = 256;
/// Bytes a WebSocket may hold unsent before the connection is closed.
const WS_MAX_WRITE_BUFFER: usize = 16 << 20;
/// A message the client does not take within this time closes the connection (a client that
/// stopped reading holds no permit and no buffer for longer).
const WS_WRITE_TIMEOUT: Duration = Duration::from_secs(30);

/// `GET /api/v1/ws`: WebSocket. The client sends `{"op":"subscribe","id":"s1","db":"main",
/// "q":"SELECT …","since":123,"format":"json"|"arrow"}` and `{"op":"unsubscribe","id":"s1"}`;
/// every server message carries the subscription's `id`.
pub(crate) async fn websocket(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    stopping: Option<axum::Extension<Stopping>>,
    headers: HeaderMap,
    upgrade: WebSocketUpgrade,
) -> Result<Response, ApiError> {
    state.authorize(&headers, None, Scope::Read, None, peer, "websocket")?;
    // The connection counts as a subscription for its whole life (the request permit ends
    // with the upgrade); each subscription on it takes one more.
    let permit = state.subscription_permit()?;
    Ok(upgrade
        .max_message_size(WS_MAX_CLIENT_MESSAGE)
        .max_frame_size(WS_MAX_CLIENT_MESSAGE)
        .write_buffer_size(128 << 10)
        .max_write_buffer_size(WS_MAX_WRITE_BUFFER)
        .on_upgrade(move |socket| async move {
            let _permit = permit;
            connection(state, socket, headers, peer, stopping.map(|s| s.0)).await;
        }))
}

#[derive(Debug, Deserialize)]
struct ClientMessage {
    op: String,
    id: Option<String>,
    format: Option<String>,
    /// `db`, `q`, `since`, `snapshot`, `progress_ms`, `queue`: as the SSE parameters.
    #[serde(flatten)]
    params: SubscribeParams,
}

async fn connection(
    state: AppState,
    socket: WebSocket,
    headers: HeaderMap,
    peer: SocketAddr,
    stopping: Option<Stopping>,
) {
    let (mut sink, mut incoming) = socket.split();
    let mut stopping = std::pin::pin!(Stopping::wait(stopping));
    // Bounded: a slow connection stops its subscriptions from reading further (they then
    // conflate or lag), never the database.
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Message>(64);
    let mut subs: HashMap<String, tokio::task::JoinHandle<()>> = HashMap::new();
    loop {
        tokio::select! {
            message = incoming.next() => {
                let text = match message {
                    Some(Ok(Message::Text(t))) => t,
                    Some(Ok(Message::Binary(_))) => {
                        let e = error_json("send JSON text frames", None);
                        if !send(&mut sink, Message::Text(e.into())).await { break; }
                        continue;
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_))) => continue,
                    Some(Err(e)) => {
                        // Tell the client why, with the protocol's code, then end.
                        let (code, reason) = close_code(e);
                        let frame = axum::extract::ws::CloseFrame {
                            code,
                            reason: reason.into(),
                        };
                        let _ = send(&mut sink, Message::Close(Some(frame))).await;
                        break;
                    }
                    Some(Ok(Message::Close(_))) | None => break,
                };
                subs.retain(|_, h| !h.is_finished());
                if let Err(e) = command(&state, &headers, peer, text.as_str(), &tx, &mut subs)
                    && !send(&mut sink, Message::Text(e.into())).await
                {
                    break;
                }
            }
            Some(out) = rx.recv() => {
                if !send(&mut sink, out).await { break; }
            }
            _ = &mut stopping => {
                let _ = sink.send(Message::Close(None)).await;
                break;
            }
        }
    }
    for (_, h) in subs {
        h.abort();
    }
}

/// The close code and reason for a frame the client sent that broke the protocol: 1009 for a
/// message over the size limit, 1007 for text that is not UTF-8, 1002 for the rest.
fn close_code(e: axum::Error) -> (u16, String) {
    use tungstenite::error::{CapacityError, Error as WsError};
    match e.into_inner().downcast::<WsError>().map(|b| *b) {
        Ok(WsError::Capacity(CapacityError::MessageTooLong { .. })) => (
            1009,
            format!("message too big: at most {WS_MAX_CLIENT_MESSAGE} bytes per client message"),
        ),
        Ok(WsError::Capacity(_)) => (1009, "message too big".to_string()),
        Ok(WsError::Utf8(_)) => (1007, "text frames must be UTF-8".to_string()),
        _ => (1002, "protocol error".to_string()),
    }
}

/// Sends one message within [`WS_WRITE_TIMEOUT`]; false when the connection is done.
async fn send(sink: &mut futures::stream::SplitSink<WebSocket, Message>, message: Message) -> bool {
    matches!(
        tokio::time::timeout(WS_WRITE_TIMEOUT, sink.send(message)).await,
        Ok(Ok(()))
    )
}

/// Runs one client message; an error is the JSON message to send back.
fn command(
    state: &AppState,
    headers: &HeaderMap,
    peer: SocketAddr,
    text: &str,
    tx: &tokio::sync::mpsc::Sender<Message>,
    subs: &mut HashMap<String, tokio::task::JoinHandle<()>>,
) -> Result<(), String> {
    let m: ClientMessage = serde_json::from_str(text)
        .map_err(|e| error_json(&format!("not a valid message: {e}"), None))?;
    let id =
        m.id.clone()
            .ok_or_else(|| error_json("the message has no \"id\"", None))?;
    let fail = |msg: &str| error_json(msg, Some(&id));
    match m.op.as_str() {
        "unsubscribe" => match subs.remove(&id) {
            Some(h) => {
                h.abort();
                let _ = tx.try_send(Message::Text(
                    serde_json::json!({"type": "unsubscribed", "id": id})
                        .to_string()
                        .into(),
                ));
                Ok(())
            }
            None => Err(fail("no subscription with this id")),
        },
        "subscribe" => {
            if subs.contains_key(&id) {
                return Err(fail("a subscription with this id is active"));
            }
            if subs.len() >= WS_MAX_SUBSCRIPTIONS {
                return Err(fail(&format!(
                    "at most {WS_MAX_SUBSCRIPTIONS} subscriptions per connection"
                )));
            }
            let (db, access, q) = m
                .params
                .authorized(state, headers, peer)
                .map_err(|e| fail(e.message()))?;
            let arrow = match m.format.as_deref() {
                None | Some("json") => false,
                Some("arrow") => true,
                Some(other) => {
                    return Err(fail(&format!(
                        "unknown format '{other}': expected json or arrow"
                    )));
                }
            };
            let options = m
                .params
                .options(&db, m.params.since)
                .map_err(|e| fail(e.message()))?;
            let permit = state.subscription_permit().map_err(|e| fail(e.message()))?;
            let db_handle = state.db.clone();
            let tx = tx.clone();
            let task_id = id.clone();
            let handle = tokio::spawn(async move {
                let _permit = permit;
                let id = task_id;
                let mut sub = match db_handle
                    .subscribe_within(&q, options, access.databases, access.owner)
                    .await
                {
                    Ok(s) => s,
                    Err(e) => {
                        let _ = tx
                            .send(Message::Text(
                                error_json(&client_message(&e), Some(&id)).into(),
                            ))
                            .await;
                        return;
                    }
                };
                let columns: Vec<&String> =
                    sub.schema().fields().iter().map(|f| f.name()).collect();
                let ack = serde_json::json!({
                    "type": "subscribed", "id": id, "seq": sub.position(), "columns": columns,
                });
                if tx
                    .send(Message::Text(ack.to_string().into()))
                    .await
                    .is_err()
                {
                    return;
                }
                while let Some(m) = sub.next().await {
                    let frame = match m {
                        Ok(m)
                            if arrow
                                && matches!(
                                    m.kind,
                                    ChangeKind::Snapshot { .. } | ChangeKind::Change
                                ) =>
                        {
                            match message_arrow(&m, Some(&id)) {
                                Ok(bytes) => Message::Binary(bytes.into()),
                                Err(e) => {
                                    Message::Text(error_json(&client_message(&e), Some(&id)).into())
                                }
                            }
                        }
                        Ok(m) => Message::Text(
                            message_json(&m, Some(&id))
                                .unwrap_or_else(|e| error_json(&client_message(&e), Some(&id)))
                                .into(),
                        ),
                        Err(e) => Message::Text(error_json(&client_message(&e), Some(&id)).into()),
                    };
                    if tx.send(frame).await.is_err() {
                        return;
                    }
                }
            });
            subs.insert(id, handle);
            Ok(())
        }
        other => Err(fail(&format!(
            "unknown op '{other}': expected subscribe or unsubscribe"
        ))),
    }
}
