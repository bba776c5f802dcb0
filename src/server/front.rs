//! The one front door of every query, whatever protocol carried it (HTTP, Arrow Flight, the
//! Postgres wire): check the token for the database, plan within the read-only rules and the
//! token's databases, run under the query timeout, count it in `/metrics`, and stream the
//! batches as they are computed. The protocols only decode requests and encode batches.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use arrow::array::RecordBatch;
use arrow::datatypes::SchemaRef;
use axum::http::{HeaderMap, StatusCode};
use futures::StreamExt;
use futures::stream::BoxStream;

use super::AppState;
use super::auth::{Access, Scope};
use super::error::ApiError;
use super::metrics::Metrics;
use crate::query::PlanOptions;

/// A request whose token may run `scope` work on `db`.
#[derive(Debug, Clone)]
pub(crate) struct Admitted {
    state: AppState,
    db: String,
    access: Access,
    scope: Scope,
    peer: SocketAddr,
}

/// A running query: its schema and its batches, each within the query's deadline (past it the
/// stream ends with a timeout error and the query is cancelled).
pub(crate) struct Running {
    pub(crate) schema: SchemaRef,
    pub(crate) batches: BoxStream<'static, Result<RecordBatch, ApiError>>,
}

/// The error of a query that ran past `timeout`.
pub(crate) fn timed_out(timeout: Duration) -> ApiError {
    ApiError::new(
        StatusCode::GATEWAY_TIMEOUT,
        format!(
            "the query ran longer than the limit of {} s and was cancelled (--query-timeout)",
            timeout.as_secs_f64()
        ),
    )
}

impl AppState {
    /// Checks the token (a bearer token in `headers`, or `password`: InfluxDB 1.x's `p`, the
    /// Postgres password) for `scope` on `db`.
    pub(crate) fn admit(
        &self,
        headers: &HeaderMap,
        password: Option<&str>,
        scope: Scope,
        db: &str,
        peer: SocketAddr,
    ) -> Result<Admitted, ApiError> {
        let what = if scope == Scope::Admin {
            "statement"
        } else {
            "query"
        };
        let access = self.authorize(headers, password, scope, Some(db), peer, what)?;
        Ok(Admitted {
            state: self.clone(),
            db: db.to_string(),
            access,
            scope,
            peer,
        })
    }
}

impl Admitted {
    /// The databases the token may use (None: any).
    pub(crate) fn databases(&self) -> Option<&[String]> {
        self.access.databases.as_deref()
    }

    /// The token, for per-token quotas (None: authentication is off).
    pub(crate) fn owner(&self) -> Option<std::sync::Arc<str>> {
        self.access.owner.clone()
    }

    /// The database unqualified names are in.
    pub(crate) fn db(&self) -> &str {
        &self.db
    }

    /// Plans `sql` without running it (a result's schema, a prepared statement's parameters).
    /// Statements (`INSERT`, view DDL) only with admin scope.
    pub(crate) async fn plan(
        &self,
        sql: &str,
        options: PlanOptions<'_>,
    ) -> Result<datafusion::dataframe::DataFrame, ApiError> {
        if sql.trim().is_empty() {
            return Err(ApiError::bad_request("the query is empty"));
        }
        let timeout = self.state.config.query_timeout;
        let planned = self.state.db.plan_with(
            &self.db,
            sql,
            self.scope == Scope::Admin,
            self.databases(),
            options,
        );
        match tokio::time::timeout(timeout, planned).await {
            Ok(Ok(df)) => Ok(df),
            Ok(Err(e)) => Err(e.into()),
            Err(_) => Err(timed_out(timeout)),
        }
    }

    /// Plans and starts `sql`, waiting for its first batch so that errors found when it starts
    /// are still the request's error; later batches arrive as they are computed.
    pub(crate) async fn run(
        &self,
        sql: &str,
        options: PlanOptions<'_>,
    ) -> Result<Running, ApiError> {
        let state = &self.state;
        if self.scope == Scope::Admin {
            tracing::warn!(target: "rivulet::audit", peer = %self.peer, db = self.db, statement = %sql, "statement");
        }
        Metrics::add(&state.metrics.queries, 1);
        let started = Instant::now();
        let timeout = state.config.query_timeout;
        let deadline = tokio::time::Instant::now() + timeout;
        let metrics = state.metrics.clone();
        let failed = |e: ApiError| {
            Metrics::add(&metrics.query_errors, 1);
            metrics.observe_query(started.elapsed());
            e
        };
        let planned = async {
            let df = self.plan(sql, options).await?;
            df.execute_stream()
                .await
                .map_err(|e| ApiError::from(crate::Error::from(e)))
        };
        let mut stream = match tokio::time::timeout_at(deadline, planned).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return Err(failed(e)),
            Err(_) => return Err(failed(timed_out(timeout))),
        };
        let first = match tokio::time::timeout_at(deadline, stream.next()).await {
            Ok(Some(Ok(b))) => Some(b),
            Ok(Some(Err(e))) => return Err(failed(crate::Error::from(e).into())),
            Ok(None) => None,
            Err(_) => return Err(failed(timed_out(timeout))),
        };
        metrics.observe_query(started.elapsed());
        let schema = stream.schema();
        let rest = futures::stream::unfold(Some(stream), move |stream| async move {
            let mut stream = stream?;
            match tokio::time::timeout_at(deadline, stream.next()).await {
                Ok(Some(Ok(batch))) => Some((Ok(batch), Some(stream))),
                Ok(Some(Err(e))) => Some((Err(crate::Error::from(e).into()), None)),
                Ok(None) => None,
                Err(_) => {
                    tracing::warn!("streamed query cancelled at its timeout");
                    Some((Err(timed_out(timeout)), None))
                }
            }
        });
        // Fused: a caller may poll again after the end (an empty result's first batch).
        let batches = futures::stream::iter(first.map(Ok))
            .chain(rest)
            .fuse()
            .boxed();
        Ok(Running { schema, batches })
    }
}
