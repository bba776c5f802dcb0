//! The Postgres wire protocol (`--pg-bind`), with pgwire: psql, Grafana's PostgreSQL data
//! source, DBeaver and every Postgres driver query Rivulet as they would a Postgres server.
//!
//! The password is a Rivulet token (the user name is free) and the Postgres database is the
//! Rivulet database. Every statement goes through the same front door as HTTP and Flight
//! ([`super::front`]): token, scope, database list, limits. Errors carry SQLSTATE codes (decided
//! here, from [`ApiError`], the one place for this protocol) and leave the connection usable.

use std::fmt::Debug;
use std::net::SocketAddr;
use std::sync::Arc;

use std::collections::HashMap;

use arrow::array::RecordBatch;
use arrow_pg::datatypes::{arrow_schema_to_pg_fields, encode_recordbatch};
use async_trait::async_trait;
use axum::http::{HeaderMap, StatusCode};
use futures::sink::Sink;
use futures::stream::{self, BoxStream, StreamExt};
use pgwire::api::auth::{
    DefaultServerParameterProvider, LoginInfo, StartupHandler, finish_authentication,
    protocol_negotiation, save_startup_parameters_to_metadata,
};
use pgwire::api::cancel::CancelHandler;
use pgwire::api::portal::Format;
use pgwire::api::query::{ExtendedQueryHandler, SimpleQueryHandler};
use pgwire::api::results::{FieldInfo, QueryResponse, Response, Tag};
use pgwire::api::store::PortalStore;
use pgwire::api::{
    ClientInfo, ClientPortalStore, ConnectionHandle, ConnectionManager, ErrorHandler,
    PgWireConnectionState, PgWireServerHandlers, PidSecretKeyGenerator,
    RandomPidSecretKeyGenerator,
};
use pgwire::error::{ErrorInfo, PgWireError, PgWireResult};
use pgwire::messages::cancel::CancelRequest;
use pgwire::messages::data::DataRow;
use pgwire::messages::startup::Authentication;
use pgwire::messages::startup::SecretKey;
use pgwire::messages::{PgWireBackendMessage, PgWireFrontendMessage};
use pgwire::types::format::FormatOptions;

mod extended;
mod settings;
mod subscribe;

use super::AppState;
use super::auth::Scope;
use super::error::ApiError;
use super::front::Admitted;
use crate::query::{PgSession, PgStatement, PlanOptions};

/// The Postgres front end over one [`AppState`] (the HTTP server's: same tokens, limits and
/// metrics). Serve it with [`super::serve_postgres`].
#[derive(Clone)]
pub struct Postgres {
    handlers: Arc<Handlers>,
}

impl Debug for Postgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Postgres").finish_non_exhaustive()
    }
}

impl Postgres {
    pub(crate) fn new(state: AppState) -> Postgres {
        let connections = Arc::new(ConnectionManager::new());
        let cancel = Arc::new(Cancels {
            connections: connections.clone(),
            streams: Default::default(),
        });
        let queries = Arc::new(Queries {
            state: state.clone(),
            parser: Arc::new(extended::Parser),
        });
        Postgres {
            handlers: Arc::new(Handlers {
                startup: Arc::new(Startup {
                    state,
                    connections,
                    cancels: cancel.clone(),
                    keys: RandomPidSecretKeyGenerator::default(),
                    parameters: parameters(),
                }),
                cancel,
                queries,
            }),
        }
    }

    /// Serves one accepted connection until the client leaves.
    pub(crate) async fn serve_connection(
        &self,
        stream: tokio::net::TcpStream,
        tls: Option<pgwire::tokio::TlsAcceptor>,
    ) -> std::io::Result<()> {
        pgwire::tokio::process_socket(stream, tls, self.handlers.clone()).await
    }
}

fn parameters() -> DefaultServerParameterProvider {
    let mut p = DefaultServerParameterProvider::default();
    p.server_version = format!("16.0 (Rivulet {})", env!("CARGO_PKG_VERSION"));
    p.is_superuser = false;
    p
}

struct Handlers {
    startup: Arc<Startup>,
    cancel: Arc<Cancels>,
    queries: Arc<Queries>,
}

impl PgWireServerHandlers for Handlers {
    fn simple_query_handler(&self) -> Arc<impl SimpleQueryHandler> {
        self.queries.clone()
    }

    fn extended_query_handler(&self) -> Arc<impl ExtendedQueryHandler> {
        self.queries.clone()
    }

    fn startup_handler(&self) -> Arc<impl StartupHandler> {
        self.startup.clone()
    }

    fn error_handler(&self) -> Arc<impl ErrorHandler> {
        Arc::new(Errors)
    }

    fn cancel_handler(&self) -> Arc<impl CancelHandler> {
        self.cancel.clone()
    }
}

/// `CancelRequest`s: pgwire cancels a statement while it plans (its connection manager), and
/// the connection's watch ends a result while it streams (a `SUBSCRIBE`'s never ends alone).
struct Cancels {
    connections: Arc<ConnectionManager>,
    /// By backend pid: the secret key and the connection's cancel counter.
    streams: parking_lot::Mutex<HashMap<i32, (SecretKey, tokio::sync::watch::Sender<u64>)>>,
}

#[async_trait]
impl CancelHandler for Cancels {
    async fn on_cancel_request(&self, request: CancelRequest) {
        self.connections
            .cancel(request.pid, &request.secret_key)
            .await;
        let streams = self.streams.lock();
        if let Some((key, tx)) = streams.get(&request.pid)
            && *key == request.secret_key
        {
            tx.send_modify(|n| *n += 1);
        }
    }
}

/// Removes a connection's cancel counter when the connection ends.
struct CancelGuard {
    cancels: Arc<Cancels>,
    pid: i32,
}

impl Drop for CancelGuard {
    fn drop(&mut self) {
        self.cancels.streams.lock().remove(&self.pid);
    }
}

struct Errors;

impl ErrorHandler for Errors {
    fn on_error<C: ClientInfo>(&self, client: &C, error: &mut PgWireError) {
        tracing::debug!(peer = %client.socket_addr(), %error, "Postgres error sent");
    }
}

/// What a connection holds once its token is checked.
struct Session {
    /// The token it logged in with (None: authentication is off): every statement is checked
    /// with it, for the scope the statement needs.
    password: Option<String>,
    db: String,
    peer: SocketAddr,
    pg: PgSession,
    /// Raised by a `CancelRequest` for this connection.
    cancel: tokio::sync::watch::Receiver<u64>,
    _cancel_guard: CancelGuard,
}

fn session<C: ClientInfo + ?Sized>(client: &C) -> PgWireResult<Arc<Session>> {
    client
        .session_extensions()
        .get::<Session>()
        .ok_or_else(|| user_error("08P01", "the connection has not logged in"))
}

/// An error the client sees, with its SQLSTATE; the connection stays usable.
fn user_error(code: &str, message: impl Into<String>) -> PgWireError {
    PgWireError::UserError(Box::new(ErrorInfo::new(
        "ERROR".to_string(),
        code.to_string(),
        message.into(),
    )))
}

/// The SQLSTATE of a Rivulet error: the query layer's own where it gave one, else by status.
fn pg_error(e: ApiError) -> PgWireError {
    let code = e.sqlstate().unwrap_or(match e.status() {
        StatusCode::UNAUTHORIZED => "28P01",
        StatusCode::FORBIDDEN => "42501",
        StatusCode::NOT_FOUND => "42704",
        StatusCode::CONFLICT => "42710",
        StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => "57014",
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => "53000",
        StatusCode::INSUFFICIENT_STORAGE => "53100",
        StatusCode::GONE => "57P01",
        s if s.is_client_error() => "42000",
        _ => "XX000",
    });
    user_error(code, e.message())
}

struct Startup {
    state: AppState,
    connections: Arc<ConnectionManager>,
    cancels: Arc<Cancels>,
    keys: RandomPidSecretKeyGenerator,
    parameters: DefaultServerParameterProvider,
}

impl Startup {
    /// Checks `password` for reading the connection's database and keeps the session.
    async fn login<C>(&self, client: &mut C, password: Option<String>) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let login = LoginInfo::from_client_info(client);
        let db = login.database().unwrap_or("main").to_string();
        let peer = client.socket_addr();
        let admitted = self
            .state
            .admit(&HeaderMap::new(), password.as_deref(), Scope::Read, &db, peer)
            .map_err(|e| {
                let code = if e.status() == StatusCode::UNAUTHORIZED {
                    "28P01"
                } else {
                    "28000"
                };
                PgWireError::UserError(Box::new(ErrorInfo::new(
                    "FATAL".to_string(),
                    code.to_string(),
                    format!(
                        "{} (the password is a Rivulet token; the database is the Rivulet database)",
                        e.message()
                    ),
                )))
            })?;
        let pg = self
            .state
            .db
            .postgres_session(admitted.databases())
            .map_err(|e| pg_error(e.into()))?;
        let (pid, key) = self.keys.generate(client);
        client.set_pid_and_secret_key(pid, key.clone());
        let (handle, guard) = self.connections.register(pid, key.clone());
        let (cancel_tx, cancel) = tokio::sync::watch::channel(0u64);
        self.cancels.streams.lock().insert(pid, (key, cancel_tx));
        let extensions = client.session_extensions();
        extensions.insert::<Arc<ConnectionHandle>>(handle);
        extensions.insert(guard);
        // The parser sees only the client: it finds the server there.
        extensions.insert(self.state.clone());
        extensions.insert(Session {
            password,
            db,
            peer,
            pg,
            cancel,
            _cancel_guard: CancelGuard {
                cancels: self.cancels.clone(),
                pid,
            },
        });
        finish_authentication(client, &self.parameters).await
    }
}

#[async_trait]
impl StartupHandler for Startup {
    async fn on_startup<C>(
        &self,
        client: &mut C,
        message: PgWireFrontendMessage,
    ) -> PgWireResult<()>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        use futures::SinkExt as _;
        match message {
            PgWireFrontendMessage::Startup(ref startup) => {
                protocol_negotiation(client, startup).await?;
                save_startup_parameters_to_metadata(client, startup);
                if self.state.config.auth.enabled() {
                    client.set_state(PgWireConnectionState::AuthenticationInProgress);
                    client
                        .send(PgWireBackendMessage::Authentication(
                            Authentication::CleartextPassword,
                        ))
                        .await?;
                } else {
                    self.login(client, None).await?;
                }
            }
            PgWireFrontendMessage::PasswordMessageFamily(pwd) => {
                let pwd = pwd.into_password()?;
                self.login(client, Some(pwd.password)).await?;
            }
            _ => {}
        }
        Ok(())
    }
}

/// The first keyword of `sql`, lowercased.
fn first_word(sql: &str) -> String {
    sql.trim_start_matches(|c: char| c.is_whitespace() || c == '(')
        .split(|c: char| !c.is_ascii_alphabetic())
        .next()
        .unwrap_or("")
        .to_ascii_lowercase()
}

/// Statements that change something: planned with the token checked for admin scope (as
/// `/api/v1/sql`), every other statement is a read-only query.
fn is_write(sql: &str) -> bool {
    matches!(
        first_word(sql).as_str(),
        "insert" | "create" | "drop" | "alter" | "delete" | "update" | "refresh" | "truncate"
    )
}

/// The front door for one statement of `session`: its token checked for the scope `sql`
/// needs.
fn admit(state: &AppState, session: &Session, sql: &str) -> PgWireResult<Admitted> {
    let scope = if is_write(sql) {
        Scope::Admin
    } else {
        Scope::Read
    };
    state
        .admit(
            &HeaderMap::new(),
            session.password.as_deref(),
            scope,
            &session.db,
            session.peer,
        )
        .map_err(pg_error)
}

struct Queries {
    state: AppState,
    parser: Arc<extended::Parser>,
}

impl Queries {
    fn admit(&self, session: &Session, sql: &str) -> PgWireResult<Admitted> {
        admit(&self.state, session, sql)
    }

    /// Runs one query or statement and answers with its rows (or its command tag).
    async fn run<C>(
        &self,
        client: &C,
        sql: &str,
        params: Option<&datafusion::common::ParamValues>,
        format: &Format,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ?Sized,
    {
        let session = session(client)?;
        let admitted = self.admit(&session, sql)?;
        let mut cancel = session.cancel.clone();
        cancel.mark_unchanged();
        let options = PlanOptions {
            postgres: Some(&session.pg),
            params,
        };
        // pgwire cancels the planning; the watch ends the stream.
        let running = admitted.run(sql, options).await.map_err(pg_error)?;
        let format_options = Arc::new(FormatOptions::from_client_metadata(client.metadata()));
        let fields = Arc::new(arrow_schema_to_pg_fields(
            &running.schema,
            format,
            Some(format_options),
        )?);
        if first_word(sql) == "insert" {
            let mut rows = 0u64;
            let mut batches = running.batches;
            while let Some(batch) = batches.next().await {
                rows += inserted(&batch.map_err(pg_error)?);
            }
            return Ok(Response::Execution(
                Tag::new("INSERT").with_oid(0).with_rows(rows as usize),
            ));
        }
        let rows = rows(fields.clone(), until_cancelled(running.batches, cancel));
        Ok(Response::Query(QueryResponse::new(fields, rows)))
    }
}

/// `batches` until the connection's cancel counter moves, then a 57014 error.
fn until_cancelled(
    batches: BoxStream<'static, Result<RecordBatch, ApiError>>,
    cancel: tokio::sync::watch::Receiver<u64>,
) -> BoxStream<'static, Result<RecordBatch, ApiError>> {
    stream::unfold(Some((batches, cancel)), |state| async move {
        let (mut batches, mut cancel) = state?;
        tokio::select! {
            next = batches.next() => next.map(|item| (item, Some((batches, cancel)))),
            changed = cancel.changed() => match changed {
                Ok(()) => Some((
                    Err(ApiError::new(
                        StatusCode::REQUEST_TIMEOUT,
                        "canceling statement due to user request",
                    )
                    .with_sqlstate("57014")),
                    None,
                )),
                // The connection is gone: nobody reads the rest.
                Err(_) => None,
            },
        }
    })
    .boxed()
}

/// The rows an `INSERT`'s result batch counts.
fn inserted(batch: &RecordBatch) -> u64 {
    use arrow::array::AsArray as _;
    batch
        .column_by_name("count")
        .and_then(|c| c.as_primitive_opt::<arrow::datatypes::UInt64Type>())
        .map_or(0, |c| c.iter().flatten().sum())
}

/// Batches as Postgres rows, encoded as `fields` say (text or binary per column).
fn rows(
    fields: Arc<Vec<FieldInfo>>,
    batches: BoxStream<'static, Result<RecordBatch, ApiError>>,
) -> BoxStream<'static, PgWireResult<DataRow>> {
    batches
        .flat_map(move |batch| match batch {
            Ok(batch) => stream::iter(encode_recordbatch(fields.clone(), batch)).boxed(),
            Err(e) => stream::once(async move { Err(pg_error(e)) }).boxed(),
        })
        .boxed()
}

#[async_trait]
impl SimpleQueryHandler for Queries {
    async fn do_query<C>(&self, client: &mut C, query: &str) -> PgWireResult<Vec<Response>>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        if query.trim().trim_end_matches(';').trim().is_empty() {
            return Ok(vec![Response::EmptyQuery]);
        }
        if let Some(request) = subscribe::parse(query) {
            return Ok(vec![self.subscribe(client, request?).await?]);
        }
        let statements = self
            .state
            .db
            .postgres_statements(query)
            .map_err(|e| pg_error(e.into()))?;
        let mut out = Vec::with_capacity(statements.len());
        for statement in statements {
            let response = match statement {
                PgStatement::Query(sql) => self.run(client, &sql, None, &Format::UnifiedText).await,
                other => settings::control(client, other),
            };
            match response {
                Ok(r) => out.push(r),
                // Later statements of the string are not run, as Postgres does.
                Err(PgWireError::UserError(info)) => {
                    out.push(Response::Error(info));
                    break;
                }
                Err(e) => return Err(e),
            }
        }
        Ok(out)
    }
}
