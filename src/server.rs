//! The HTTP server: InfluxDB-compatible writes, the SQL query API, statements and health.
//!
//! [`router`] builds the whole axum `Router` from a [`Db`], so tests bind it to `127.0.0.1:0`.
//! Errors become HTTP responses in exactly one place ([`error`]); every write and query runs
//! through the same library calls an embedded user makes (writes on the blocking pool, since
//! they wait for an fsync).

mod auth;
mod error;
mod metrics;
mod query;
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
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 10 << 20,
            auth: Auth::default(),
            query_timeout: Duration::from_secs(60),
            max_concurrent_requests: 1024,
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
}

/// The server's routes over `db`. Serve it with [`serve`] (handlers read the client address).
pub fn router(db: Db, config: ServerConfig) -> Router {
    let limit = config.max_body_bytes;
    let state = AppState {
        db,
        requests: Arc::new(tokio::sync::Semaphore::new(config.max_concurrent_requests)),
        config: Arc::new(config),
        metrics: Arc::new(Metrics::default()),
    };
    Router::new()
        .route("/write", post(write::v1))
        .route("/api/v2/write", post(write::v2))
        .route("/api/v3/write_lp", post(write::v3))
        .route(
            "/api/v3/query_sql",
            get(query::query_get).post(query::query_post),
        )
        .route("/api/v1/sql", post(query::statement))
        .route("/health", get(health))
        .route("/ping", get(ping).head(ping))
        .route("/metrics", get(metrics_text))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            limit_requests,
        ))
        // Bodies are read with our own limit (it also applies after decompression).
        .layer(DefaultBodyLimit::max(limit.saturating_add(1)))
        .with_state(state)
}

/// Caps concurrent requests (503 past the cap) and counts the ones in flight.
async fn limit_requests(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Ok(_permit) = state.requests.clone().try_acquire_owned() else {
        return ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "too many concurrent requests; retry shortly",
        )
        .into_response();
    };
    Metrics::add(&state.metrics.in_flight, 1);
    let response = next.run(request).await;
    state
        .metrics
        .in_flight
        .fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    response
}

async fn metrics_text(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    state.authorize(&headers, None, Scope::Read, None, peer, "metrics")?;
    let text = state.metrics.render(&state.db.stats());
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
    ) -> Result<(), ApiError> {
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

/// Serves `router` on `listener` until `shutdown` completes, then lets in-flight requests finish.
pub async fn serve(
    listener: tokio::net::TcpListener,
    app: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(
        listener,
        app.into_make_service_with_connect_info::<SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}
