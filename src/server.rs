//! The HTTP server: InfluxDB-compatible writes, the SQL query API, statements and health.
//!
//! [`router`] builds the whole axum `Router` from a [`Db`], so tests bind it to `127.0.0.1:0`.
//! Errors become HTTP responses in exactly one place ([`error`]); every write and query runs
//! through the same library calls an embedded user makes (writes on the blocking pool, since
//! they wait for an fsync).

mod error;
mod query;
mod write;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::DefaultBodyLimit;
use axum::routing::{get, post};

use crate::Db;

pub use error::ApiError;

/// Settings of the HTTP server.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// Largest request body, before and after gzip decompression. Default: 10 MiB (as InfluxDB 3).
    pub max_body_bytes: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            max_body_bytes: 10 << 20,
        }
    }
}

/// What every handler can reach.
#[derive(Debug, Clone)]
pub(crate) struct AppState {
    pub(crate) db: Db,
    pub(crate) config: Arc<ServerConfig>,
}

/// The server's routes over `db`.
pub fn router(db: Db, config: ServerConfig) -> Router {
    let limit = config.max_body_bytes;
    let state = AppState {
        db,
        config: Arc::new(config),
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
        // Bodies are read with our own limit (it also applies after decompression).
        .layer(DefaultBodyLimit::max(limit.saturating_add(1)))
        .with_state(state)
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
