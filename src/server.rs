//! The HTTP server: InfluxDB-compatible writes, the SQL query API, statements and health.
//!
//! [`router`] builds the whole axum `Router` from a [`Db`], so tests bind it to `127.0.0.1:0`.
//! Errors become HTTP responses in exactly one place ([`error`]); every write and query runs
//! through the same library calls an embedded user makes (writes on the blocking pool, since
//! they wait for an fsync).

mod auth;
mod body;
mod error;
mod flight;
mod front;
mod metrics;
mod origin;
mod pg;
mod query;
mod subscribe;
mod tls;
mod write;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};

use crate::Db;

pub use auth::{Auth, Scope, Token};
pub use error::ApiError;
pub use pg::Postgres;
pub use tls::Tls;

use metrics::Metrics;

/// Settings of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request body, before and after gzip decompression. Default: 10 MiB (as InfluxDB 3).
    pub max_body_bytes: usize,
    /// Tokens; empty turns authentication off. Default: empty.
    pub auth: Auth,
    /// A query running longer is cancelled with a 504. Default: 60 s.
    pub query_timeout: Duration,
    /// Requests served at once; more get a 503 at once instead of queueing. Default: 1024.
    pub max_concurrent_requests: usize,
    /// A request body must arrive within this time, or the request gets a 408. Default: 60 s.
    pub body_read_timeout: Duration,
    /// Longest line protocol line, in bytes; a longer one is rejected with a 400 naming it.
    /// Default: 1 MiB.
    pub max_line_bytes: usize,
    /// Server-Sent Event subscriptions open at once (they are not counted as requests).
    /// Default: 10,000.
    pub max_subscriptions: usize,
    /// Web page origins (`https://dash.example.com`) whose browser requests are taken besides
    /// the server's own; every other origin is refused (`server::origin`). Default: none.
    pub cors_origins: Vec<String>,
    /// Without tokens, serve any `Host` name, not only IP addresses and `localhost` (turns off
    /// the DNS-rebinding guard; `--insecure-no-auth` sets it). Default: false.
    pub allow_any_host: bool,
    /// Largest result a response must hold whole before sending it (`format=pretty` and
    /// `parquet`, `/api/v1/sql`, a long-poll answer), measured as Arrow memory (long-poll: JSON
    /// bytes); past it the request fails with a 400 naming the limit. Streamed formats have no
    /// such limit. Default: 64 MiB.
    pub max_result_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 10 << 20,
            auth: Auth::default(),
            query_timeout: Duration::from_secs(60),
            max_concurrent_requests: 1024,
            body_read_timeout: Duration::from_secs(60),
            max_line_bytes: 1 << 20,
            max_subscriptions: 10_000,
            cors_origins: Vec::new(),
            allow_any_host: false,
            max_result_bytes: 64 << 20,
        }
    }
}

/// What every handler can reach.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) db: Db,
    pub(crate) config: Arc<ServerConfig>,
    pub(crate) metrics: Arc<Metrics>,
    requests: Arc<tokio::sync::Semaphore>,
    subscriptions: Arc<tokio::sync::Semaphore>,
}

/// The server's routes over `db`. Serve it with [`serve`] (handlers read the client address).
pub fn router(db: Db, config: ServerConfig) -> Router {
    services(db, config).0
}

/// The HTTP routes and the Postgres front end over one state: the same tokens, limits and
/// metrics. Serve them with [`serve`] and [`serve_postgres`].
pub fn services(db: Db, config: ServerConfig) -> (Router, Postgres) {
    let limit = config.max_body_bytes;
    let state = AppState {
        db,
        requests: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_requests)),
        subscriptions: Arc::new(tokio::sync::Semaphore::new(config.max_subscriptions)),
        config: Arc::new(config),
        metrics: Arc::new(Metrics::default()),
    };
    let app = Router::new()
        .route("/write", post(write::v1))
        .route("/api/v2/write", post(write::v2))
        .route("/api/v3/write_lp", post(write::v3))
        .route(
            "/api/v3/query_sql",
            get(query::query_get).post(query::query_post),
        )
        .route("/api/v1/sql", post(query::statement))
        .route("/api/v1/subscribe", get(subscribe::sse))
        .route("/api/v1/changes", get(subscribe::long_poll))
        .route("/api/v1/ws", get(subscribe::websocket))
        .route("/health", get(health))
        .route("/ping", get(ping).head(ping))
        .route("/metrics", get(metrics_text))
        .route_service(
            "/arrow.flight.protocol.FlightService/{*method}",
            arrow_flight::flight_service_server::FlightServiceServer::new(flight::Front(Arc::new(
                flight::Flight {
                    state: state.clone(),
                },
            ))),
        )
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limit_requests,
        ))
        .layer(middleware::from_fn_with_state(state.clone(), origin::guard))
        // Bodies are read with our own limit (it also applies after decompression).
        .layer(DefaultBodyLimit::max(limit.saturating_add(1)))
        .with_state(state.clone());
    (app, Postgres::new(state))
}

/// Serves the Postgres wire protocol on `listener` until `shutdown` completes (then open
/// connections are closed). TLS when `tls` is given (a client's `SSLRequest` is refused
/// cleanly, with `N`, when not); at most `limits.max_connections` connections at once.
pub async fn serve_postgres(
    listener: tokio::net::TcpListener,
    postgres: Postgres,
    limits: ConnectionLimits,
    tls: Option<Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let acceptor = tls.map(|t| t.postgres_acceptor());
    let mut tasks = tokio::task::JoinSet::new();
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            // Reap finished connections as they end.
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "Postgres accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small responses (gRPC frames, Postgres rows, events) go out at once: with Nagle's
        // algorithm they waited for the client's delayed ACK (~40 ms a query over Flight).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; closing the new Postgres connection");
            drop(stream);
            continue;
        };
        let postgres = postgres.clone();
        let acceptor = acceptor.clone();
        tasks.spawn(async move {
            let _permit = permit;
            if let Err(e) = postgres.serve_connection(stream, acceptor).await {
                tracing::debug!(%peer, error = %e, "Postgres connection ended with an error");
            }
        });
    }
    tasks.shutdown().await;
    Ok(())
}

impl AppState {
    /// One of the `--max-subscriptions` permits (SSE streams, WebSocket connections and each
    /// subscription on them), or a 503 saying the cap is reached.
    pub(crate) fn subscription_permit(
        &self,
    ) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        self.subscriptions.clone().try_acquire_owned().map_err(|_| {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                format!(
                    "too many subscriptions (--max-subscriptions {}); retry shortly",
                    self.config.max_subscriptions
                ),
            )
        })
    }
}

/// Caps concurrent requests (503 past the cap) and counts the ones in flight.
async fn limit_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    // Event streams live long: they have their own cap.
    let (pool, what) = if request.uri().path() == "/api/v1/subscribe" {
        (&state.subscriptions, "subscriptions")
    } else {
        (&state.requests, "requests")
    };
    let Ok(_permit) = pool.clone().try_acquire_owned() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            format!("too many concurrent {what}; retry shortly"),
        )
        .into_response();
    };
    // Held until the response body is finished (streamed results included) or dropped.
    let guard = InFlight::new(state.metrics.clone(), _permit);
    let response = next.run(request).await;
    // Frame by frame, so trailers (gRPC's status) pass too.
    response.map(|body| {
        use http_body_util::BodyExt as _;
        axum::body::Body::new(body.map_frame(move |frame| {
            let _held = &guard;
            frame
        }))
    })
}

/// Fires when the server starts shutting down: subscription streams end then, so a graceful
/// shutdown does not wait for them forever.
#[derive(Debug, Clone)]
pub(crate) struct Stopping(tokio::sync::watch::Receiver<bool>);

impl Stopping {
    /// Completes when the server is shutting down (never without a server around).
    pub(crate) async fn wait(stopping: Option<Stopping>) {
        match stopping {
            Some(mut s) => {
                let _ = s.0.wait_for(|stopped| *stopped).await;
            }
            None => std::future::pending::<()>().await,
        }
    }
}

/// Counts a request in flight and holds its concurrency permit; both end on drop.
struct InFlight {
    metrics: Arc<Metrics>,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

impl InFlight {
    fn new(metrics: Arc<Metrics>, permit: tokio::sync::OwnedSemaphorePermit) -> InFlight {
        Metrics::add(&metrics.in_flight, 1);
        InFlight {
            metrics,
            _permit: permit,
        }
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.metrics
            .in_flight
            .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

async fn metrics_text(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    open: Option<axum::Extension<OpenConnections>>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let access = state.authorize(&headers, None, Scope::Read, None, peer, "metrics")?;
    // Metrics are server-wide: a token limited to some databases does not see them.
    if access.databases.is_some() {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "metrics cover every database: use a token without a database list",
        ));
    }
    let open = open.map_or(0, |o| o.0.0.load(std::sync::atomic::Ordering::Relaxed));
    let text = state.metrics.render(&state.db.stats(), open);
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        text,
    )
        .into_response())
}

impl AppState {
    /// Checks the request's token, counting failures.
    pub(crate) fn authorize(
        &self,
        headers: &HeaderMap,
        v1_password: Option<&str>,
        needed: Scope,
        db: Option<&str>,
        peer: SocketAddr,
        what: &str,
    ) -> Result<auth::Access, ApiError> {
        self.config
            .auth
            .check(headers, v1_password, needed, db, Some(peer), what)
            .inspect_err(|_| Metrics::add(&self.metrics.auth_failures, 1))
    }
}

async fn health() -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({
        "status": "pass",
        "version": env!("CARGO_PKG_VERSION"),
    }))
}

async fn ping() -> impl axum::response::IntoResponse {
    (
        axum::http::StatusCode::NO_CONTENT,
        [(
            "X-Influxdb-Version",
            concat!("rivulet-", env!("CARGO_PKG_VERSION")),
        )],
    )
}

/// The number of open connections, handed to every request by [`serve`] (for `/metrics`).
#[derive(Debug, Clone)]
pub(crate) struct OpenConnections(Arc<std::sync::atomic::AtomicU64>);

/// Connection-level limits of [`serve`].
#[derive(Debug, Clone)]
pub struct ConnectionLimits {
    /// Open connections at once; further ones are closed at once. Default: 4096.
    pub max_connections: usize,
    /// A client must send a request's whole head (request line and headers) within this time
    /// (slowloris). Default: 10 s.
    pub header_read_timeout: Duration,
    /// Largest request head (URL plus headers), in bytes; larger gets a 431. Default: 64 KiB.
    pub max_head_bytes: usize,
    /// A connection whose client takes nothing of what is being sent for this long is closed:
    /// a client that stops reading a streamed result or event stream releases its request
    /// permit, its query and its buffers. Default: 30 s.
    pub write_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        ConnectionLimits {
            max_connections: 4096,
            header_read_timeout: Duration::from_secs(10),
            max_head_bytes: 64 << 10,
            write_timeout: Duration::from_secs(30),
        }
    }
}

/// Serves `app` on `listener` until `shutdown` completes, then lets in-flight requests finish.
///
/// Its own accept loop (on hyper) rather than `axum::serve`, for the connection cap, the
/// request-head timeout and size limit, and the client address every handler reads.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_with(listener, app, limits, None, shutdown).await
}

/// A connection's byte stream: plain TCP or TLS over it.
trait Conn: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Conn for T {}

/// [`serve`], with TLS on every connection when `tls` is given (`--tls-cert`, `--tls-key`):
/// the handshake must finish within the request-head timeout.
pub async fn serve_with(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: ConnectionLimits,
    tls: Option<Tls>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    use hyper_util::rt::{TokioIo, TokioTimer};
    use tower::ServiceExt;

    let connections = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let open = OpenConnections(Arc::new(std::sync::atomic::AtomicU64::new(0)));
    // Connections watch `stop` to shut down gracefully and hold `done` until they end.
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let (done_tx, mut done_rx) = tokio::sync::mpsc::channel::<()>(1);
    let mut shutdown = std::pin::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // Out of file descriptors and the like: wait instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        // Small responses (gRPC frames, Postgres rows, events) go out at once: with Nagle's
        // algorithm they waited for the client's delayed ACK (~40 ms a query over Flight).
        if let Err(e) = stream.set_nodelay(true) {
            tracing::debug!(%peer, error = %e, "cannot set TCP_NODELAY");
        }
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            tracing::warn!(%peer, "connection limit reached; closing the new connection");
            drop(stream);
            continue;
        };
        let app = app.clone();
        let open_now = open.clone();
        let stop_for_requests = stop_rx.clone();
        let service =
            hyper::service::service_fn(move |request: hyper::Request<hyper::body::Incoming>| {
                let mut request = request.map(axum::body::Body::new);
                request.extensions_mut().insert(ConnectInfo(peer));
                request.extensions_mut().insert(open_now.clone());
                request
                    .extensions_mut()
                    .insert(Stopping(stop_for_requests.clone()));
                app.clone().oneshot(request)
            });
        // HTTP/1.1, and HTTP/2 for gRPC (Arrow Flight) on the same port.
        let mut builder =
            hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
        builder
            .http1()
            .timer(TokioTimer::new())
            .header_read_timeout(limits.header_read_timeout)
            .max_buf_size(limits.max_head_bytes.max(8192));
        builder
            .http2()
            .timer(TokioTimer::new())
            .max_header_list_size(limits.max_head_bytes.max(8192) as u32);
        let mut stop = stop_rx.clone();
        let done = done_tx.clone();
        let open_count = open.0.clone();
        open_count.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let write_timeout = limits.write_timeout;
        let handshake_timeout = limits.header_read_timeout;
        let tls = tls.clone();
        tokio::spawn(async move {
            let stream: Box<dyn Conn> = match tls {
                None => Box::new(stream),
                Some(tls) => {
                    match tokio::time::timeout(handshake_timeout, tls.acceptor.accept(stream)).await
                    {
                        Ok(Ok(s)) => Box::new(s),
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "TLS handshake failed");
                            open_count.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                            drop((permit, done));
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            open_count.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
                            drop((permit, done));
                            return;
                        }
                    }
                }
            };
            // With upgrades: WebSocket connections start as HTTP requests.
            let mut stream = tokio_io_timeout::TimeoutStream::new(stream);
            stream.set_write_timeout(Some(write_timeout));
            let conn =
                builder.serve_connection_with_upgrades(TokioIo::new(Box::pin(stream)), service);
            let mut conn = std::pin::pin!(conn);
            tokio::select! {
                result = conn.as_mut() => {
                    if let Err(e) = result {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
                _ = async { stop.wait_for(|stopped| *stopped).await.map(|_| ()) } => {
                    conn.as_mut().graceful_shutdown();
                    if let Err(e) = conn.await {
                        tracing::debug!(%peer, error = %e, "connection ended with an error");
                    }
                }
            }
            open_count.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
            drop(permit);
            drop(done);
        });
    }
    let _ = stop_tx.send(true);
    drop(done_tx);
    // Every connection task holds a sender: this returns when the last one has finished.
    let _ = done_rx.recv().await;
    Ok(())
}
