//! Arrow Flight on the HTTP port, as InfluxDB 3 serves it: gRPC (HTTP/2) requests to
//! `/arrow.flight.protocol.FlightService/*` on the same listener as the HTTP API, so a client
//! given the server's URL just works.
//!
//! `DoGet` takes InfluxDB 3's JSON ticket, what the v3 client libraries (influxdb3-python,
//! -go, -java, …) send:
//! `{"database": "main", "sql_query": "SELECT …", "query_type": "sql"}` (`"namespace_name"`,
//! `"bucket"` and `"db"` are accepted for the database; `"params"` hold named values for
//! `$name` placeholders). The
//! token comes in the `authorization` metadata (`Bearer …` or `Token …`), checked with the
//! same scopes, database limits and read-only rules as `/api/v3/query_sql`; the query runs
//! with the same timeout and streams batch by batch. Errors become gRPC codes in
//! [`status`], the one place: bad SQL or ticket → `InvalidArgument` with the message, no or a
//! wrong token → `Unauthenticated`, a database outside the token's → `PermissionDenied`,
//! the query timeout → `DeadlineExceeded`.
//!
//! Flight SQL statement queries work as Flight SQL clients (ADBC, JDBC, Grafana's InfluxDB SQL
//! mode) send them: `GetFlightInfo` with `CommandStatementQuery` (the database from the
//! `database`, `bucket-name` or `iox-namespace-name` header, as InfluxDB 3 accepts) answers the
//! schema and a ticket; `DoGet` with that ticket runs the query. `GetCatalogs`,
//! `GetDbSchemas`, `GetTables` (with the tables' schemas when asked) and `GetTableTypes` list
//! what the token may read, from `information_schema` through the same scoped planning (ADBC's
//! `get_objects`). Prepared statements with parameters and `GetSqlInfo` are in [`prepared`].

use std::net::SocketAddr;
use std::pin::Pin;

use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::server::FlightSqlService;
use arrow_flight::sql::server::PeekableFlightDataStream;
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest,
    ActionCreatePreparedStatementResult, CommandGetCatalogs, CommandGetDbSchemas,
    CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandPreparedStatementQuery,
    CommandStatementQuery, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo,
    TicketStatementQuery,
};
use arrow_flight::{
    Action, ActionType, Criteria, Empty, FlightData, FlightDescriptor, FlightEndpoint, FlightInfo,
    HandshakeRequest, HandshakeResponse, PollInfo, PutResult, SchemaResult, Ticket,
};
use axum::extract::ConnectInfo;
use axum::http::StatusCode;
use futures::{Stream, TryStreamExt};
use prost::Message as _;
use tonic::{Request, Response, Status, Streaming};

mod prepared;

use super::AppState;
use super::auth::Scope;
use super::error::ApiError;

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

/// The Flight service over one server's state.
#[derive(Clone)]
pub(crate) struct Flight {
    pub(crate) state: AppState,
}

/// InfluxDB 3's `DoGet` ticket.
#[derive(Debug, serde::Deserialize)]
struct InfluxTicket {
    #[serde(alias = "namespace_name", alias = "bucket", alias = "db")]
    database: Option<String>,
    sql_query: String,
    #[serde(default)]
    query_type: Option<String>,
    #[serde(default)]
    params: Option<serde_json::Value>,
    /// A prepared statement's bound parameters (Arrow IPC, hex; `prepared`).
    #[serde(default)]
    params_ipc: Option<String>,
}

/// An HTTP error as the gRPC status a Flight client expects (the one place this is decided).
pub(crate) fn status(e: ApiError) -> Status {
    let message = e.message().to_string();
    match e.status() {
        StatusCode::BAD_REQUEST
        | StatusCode::PAYLOAD_TOO_LARGE
        | StatusCode::UNPROCESSABLE_ENTITY
        | StatusCode::UNSUPPORTED_MEDIA_TYPE => Status::invalid_argument(message),
        StatusCode::UNAUTHORIZED => Status::unauthenticated(message),
        StatusCode::FORBIDDEN => Status::permission_denied(message),
        StatusCode::NOT_FOUND => Status::not_found(message),
        StatusCode::GATEWAY_TIMEOUT | StatusCode::REQUEST_TIMEOUT => {
            Status::deadline_exceeded(message)
        }
        StatusCode::SERVICE_UNAVAILABLE | StatusCode::TOO_MANY_REQUESTS => {
            Status::unavailable(message)
        }
        StatusCode::INSUFFICIENT_STORAGE => Status::resource_exhausted(message),
        _ => {
            tracing::warn!(error = %message, "Flight request failed");
            Status::internal("the server could not answer; see its log")
        }
    }
}

fn flight_error(e: FlightError) -> Status {
    match e {
        FlightError::Tonic(s) => *s,
        FlightError::ExternalError(e) => match e.downcast::<datafusion::error::DataFusionError>() {
            Ok(e) => status(crate::Error::from(*e).into()),
            Err(e) => Status::internal(e.to_string()),
        },
        other => Status::internal(other.to_string()),
    }
}

fn unimplemented(what: &str) -> Status {
    Status::unimplemented(format!(
        "{what} is not served yet; query with DoGet and an InfluxDB 3 ticket \
         ({{\"database\": …, \"sql_query\": …, \"query_type\": \"sql\"}}) or a Flight SQL \
         statement (GetFlightInfo, then DoGet)"
    ))
}

impl Flight {
    async fn query(
        &self,
        headers: &axum::http::HeaderMap,
        peer: SocketAddr,
        ticket: &[u8],
    ) -> Result<BoxStream<FlightData>, Status> {
        let state = &self.state;
        let ticket: InfluxTicket = serde_json::from_slice(ticket).map_err(|e| {
            Status::invalid_argument(format!(
                "the ticket is not an InfluxDB 3 query ticket ({{\"database\": …, \"sql_query\": …, \"query_type\": \"sql\"}}): {e}"
            ))
        })?;
        match ticket.query_type.as_deref() {
            None | Some("sql") => {}
            Some(other) => {
                return Err(Status::invalid_argument(format!(
                    "query_type '{other}' is not supported; Rivulet answers \"sql\""
                )));
            }
        }
        let params = prepared::ticket_params(ticket.params.as_ref(), ticket.params_ipc.as_deref())?;
        let db = ticket.database.unwrap_or_else(|| "main".to_string());
        let admitted = state
            .admit(headers, None, Scope::Read, &db, peer)
            .map_err(status)?;
        if ticket.sql_query.trim().is_empty() {
            return Err(Status::invalid_argument("the ticket's sql_query is empty"));
        }
        let options = crate::query::PlanOptions {
            postgres: None,
            params: params.as_ref(),
        };
        let running = admitted
            .run(&ticket.sql_query, options)
            .await
            .map_err(status)?;
        let schema = running.schema;
        let batches = running
            .batches
            .map_err(|e| FlightError::Tonic(Box::new(status(e))));
        let encoded = FlightDataEncoderBuilder::new()
            .with_schema(schema)
            .build(batches)
            .map_err(flight_error);
        Ok(Box::pin(encoded))
    }
}

impl Flight {
    /// Runs the JSON ticket `ticket` for the caller of `request`.
    async fn query_ticket(
        &self,
        request: &Request<Ticket>,
        ticket: &[u8],
    ) -> Result<Response<BoxStream<FlightData>>, Status> {
        let peer = peer_of(request)?;
        let headers = request.metadata().clone().into_headers();
        Ok(Response::new(self.query(&headers, peer, ticket).await?))
    }
}

/// The `FlightInfo` of a planned statement: the schema its batches arrive in and one endpoint
/// with `ticket`.
fn statement_info(
    df: &datafusion::dataframe::DataFrame,
    ticket: Vec<u8>,
    request: Request<FlightDescriptor>,
) -> Result<Response<FlightInfo>, Status> {
    let schema = hydrated(df.schema().as_arrow());
    let info = FlightInfo::new()
        .try_with_schema(&schema)
        .map_err(|e| Status::internal(e.to_string()))?
        .with_endpoint(FlightEndpoint::new().with_ticket(Ticket::new(ticket)))
        .with_descriptor(request.into_inner());
    Ok(Response::new(info))
}

fn peer_of<T>(request: &Request<T>) -> Result<SocketAddr, Status> {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
        .ok_or_else(|| Status::internal("no peer address"))
}

/// The database of a Flight SQL call: the `database` header (or `bucket-name`,
/// `iox-namespace-name`, as InfluxDB 3 accepts), else `main`.
fn database_of<T>(request: &Request<T>) -> String {
    ["database", "bucket-name", "iox-namespace-name"]
        .iter()
        .find_map(|h| {
            request
                .metadata()
                .get(*h)?
                .to_str()
                .ok()
                .map(str::to_string)
        })
        .unwrap_or_else(|| "main".to_string())
}

/// The schema batches of `schema` arrive in: the encoder sends dictionary columns (tags) as
/// their values, and Flight SQL clients check the announced schema against the stream's.
fn hydrated(schema: &arrow::datatypes::Schema) -> arrow::datatypes::Schema {
    let fields: Vec<arrow::datatypes::Field> = schema
        .fields()
        .iter()
        .map(|f| match f.data_type() {
            arrow::datatypes::DataType::Dictionary(_, value) => {
                f.as_ref().clone().with_data_type(value.as_ref().clone())
            }
            _ => f.as_ref().clone(),
        })
        .collect();
    arrow::datatypes::Schema::new_with_metadata(fields, schema.metadata().clone())
}

/// Flight SQL: statement queries (`GetFlightInfo` with `CommandStatementQuery`, then `DoGet`
/// with the statement ticket, which holds the same JSON as an InfluxDB 3 ticket).
#[tonic::async_trait]
impl FlightSqlService for Flight {
    type FlightService = Flight;

    async fn do_handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<BoxStream<HandshakeResponse>>, Status> {
        // Tokens travel with every call; there is no session to set up.
        Ok(Response::new(Box::pin(futures::stream::once(async {
            Ok(HandshakeResponse::default())
        }))))
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let admitted = self.access(&request)?;
        let db = admitted.db().to_string();
        // Planned once for the schema; DoGet plans it again to run it.
        let df = admitted
            .plan(&query.query, Default::default())
            .await
            .map_err(status)?;
        let handle =
            serde_json::json!({"database": db, "sql_query": query.query, "query_type": "sql"});
        let ticket = TicketStatementQuery {
            statement_handle: handle.to_string().into_bytes().into(),
        };
        statement_info(&df, ticket.as_any().encode_to_vec(), request)
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<BoxStream<FlightData>>, Status> {
        self.query_ticket(&request, &ticket.statement_handle).await
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        metadata_info(query.as_any(), &schema, request)
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<Ticket>,
    ) -> Result<Response<BoxStream<FlightData>>, Status> {
        let mut builder = query.into_builder();
        let mut seen = std::collections::BTreeSet::new();
        for t in self.tables(&request).await? {
            if seen.insert(t.catalog.clone()) {
                builder.append(t.catalog);
            }
        }
        one_batch(builder.build())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        metadata_info(query.as_any(), &schema, request)
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<BoxStream<FlightData>>, Status> {
        let mut builder = query.into_builder();
        let mut seen = std::collections::BTreeSet::new();
        for t in self.tables(&request).await? {
            if seen.insert((t.catalog.clone(), t.schema.clone())) {
                builder.append(t.catalog, t.schema);
            }
        }
        one_batch(builder.build())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        metadata_info(query.as_any(), &schema, request)
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<BoxStream<FlightData>>, Status> {
        let with_schema = query.include_schema;
        let mut builder = query.into_builder();
        for t in self.tables(&request).await? {
            let schema = if with_schema {
                self.table_schema(&request, &t).await?
            } else {
                arrow::datatypes::Schema::empty()
            };
            builder
                .append(&t.catalog, &t.schema, &t.name, &t.kind, &schema)
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        one_batch(builder.build())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        metadata_info(query.as_any(), &schema, request)
    }

    async fn do_get_table_types(
        &self,
        query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<BoxStream<FlightData>>, Status> {
        let mut builder = query.into_builder();
        for kind in ["BASE TABLE", "VIEW"] {
            builder.append(kind);
        }
        one_batch(builder.build())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let info = prepared::sql_info()?;
        let schema = query.clone().into_builder(&info).schema();
        metadata_info(query.as_any(), &schema, request)
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<BoxStream<FlightData>>, Status> {
        let info = prepared::sql_info()?;
        one_batch(query.into_builder(&info).build())
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        self.prepare(query, &request).await
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let handle = self.bind(&query.prepared_statement_handle, request).await?;
        Ok(DoPutPreparedStatementResult {
            prepared_statement_handle: Some(handle),
        })
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket: InfluxTicket = serde_json::from_slice(&query.prepared_statement_handle)
            .map_err(|e| {
                Status::invalid_argument(format!("not a Rivulet prepared statement handle: {e}"))
            })?;
        let df = self
            .access(&request)?
            .plan(&ticket.sql_query, Default::default())
            .await
            .map_err(status)?;
        statement_info(&df, query.as_any().encode_to_vec(), request)
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<BoxStream<FlightData>>, Status> {
        self.query_ticket(&request, &query.prepared_statement_handle)
            .await
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        // Handles hold the whole statement: nothing to free.
        Ok(())
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}

/// One table as `information_schema.tables` lists it.
struct TableName {
    catalog: String,
    schema: String,
    name: String,
    kind: String,
}

impl Flight {
    /// The tables the caller's token may read (`information_schema.tables`, planned through the
    /// same scoped path as queries).
    async fn tables<T>(&self, request: &Request<T>) -> Result<Vec<TableName>, Status> {
        let batches = self
            .collect(
                request,
                "SELECT table_catalog, table_schema, table_name, table_type FROM information_schema.tables ORDER BY 1, 2, 3",
            )
            .await?;
        let mut out = Vec::new();
        for b in &batches {
            let col = |i: usize| {
                arrow::compute::cast(b.column(i), &arrow::datatypes::DataType::Utf8)
                    .map_err(|e| Status::internal(e.to_string()))
            };
            let (c, s, n, k) = (col(0)?, col(1)?, col(2)?, col(3)?);
            let text = |a: &arrow::array::ArrayRef, i: usize| {
                use arrow::array::AsArray as _;
                a.as_string::<i32>().value(i).to_string()
            };
            for i in 0..b.num_rows() {
                out.push(TableName {
                    catalog: text(&c, i),
                    schema: text(&s, i),
                    name: text(&n, i),
                    kind: text(&k, i),
                });
            }
        }
        Ok(out)
    }

    /// A table's schema as its rows arrive over Flight.
    async fn table_schema<T>(
        &self,
        request: &Request<T>,
        t: &TableName,
    ) -> Result<arrow::datatypes::Schema, Status> {
        let quote = |s: &str| format!("\"{}\"", s.replace('"', "\"\""));
        let sql = format!(
            "SELECT * FROM {}.{}.{} LIMIT 0",
            quote(&t.catalog),
            quote(&t.schema),
            quote(&t.name)
        );
        let df = self
            .access(request)?
            .plan(&sql, Default::default())
            .await
            .map_err(status)?;
        Ok(hydrated(df.schema().as_arrow()))
    }

    /// The caller's token checked for reading the call's database.
    fn access<T>(&self, request: &Request<T>) -> Result<super::front::Admitted, Status> {
        let peer = peer_of(request)?;
        let db = database_of(request);
        let headers = request.metadata().clone().into_headers();
        self.state
            .admit(&headers, None, Scope::Read, &db, peer)
            .map_err(status)
    }

    async fn collect<T>(
        &self,
        request: &Request<T>,
        sql: &str,
    ) -> Result<Vec<arrow::array::RecordBatch>, Status> {
        let df = self
            .access(request)?
            .plan(sql, Default::default())
            .await
            .map_err(status)?;
        df.collect()
            .await
            .map_err(|e| status(crate::Error::from(e).into()))
    }
}

/// The `FlightInfo` of a metadata command: its result schema and a ticket repeating it.
fn metadata_info(
    command: arrow_flight::sql::Any,
    schema: &arrow::datatypes::Schema,
    request: Request<FlightDescriptor>,
) -> Result<Response<FlightInfo>, Status> {
    let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(command.encode_to_vec()));
    let info = FlightInfo::new()
        .try_with_schema(schema)
        .map_err(|e| Status::internal(e.to_string()))?
        .with_endpoint(endpoint)
        .with_descriptor(request.into_inner());
    Ok(Response::new(info))
}

/// One built batch as a Flight stream.
fn one_batch(
    batch: Result<arrow::array::RecordBatch, impl std::fmt::Display>,
) -> Result<Response<BoxStream<FlightData>>, Status> {
    let batch = batch.map_err(|e| Status::internal(e.to_string()))?;
    let schema = batch.schema();
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .build(futures::stream::once(async move { Ok(batch) }))
        .map_err(flight_error);
    Ok(Response::new(Box::pin(stream)))
}

/// What is routed: InfluxDB 3's JSON tickets first, Flight SQL for the rest.
#[derive(Clone)]
pub(crate) struct Front(pub(crate) std::sync::Arc<Flight>);

#[tonic::async_trait]
impl FlightService for Front {
    type HandshakeStream = BoxStream<HandshakeResponse>;
    type ListFlightsStream = BoxStream<FlightInfo>;
    type DoGetStream = BoxStream<FlightData>;
    type DoPutStream = BoxStream<PutResult>;
    type DoExchangeStream = BoxStream<FlightData>;
    type DoActionStream = BoxStream<arrow_flight::Result>;
    type ListActionsStream = BoxStream<ActionType>;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        FlightService::handshake(self.0.as_ref(), request).await
    }

    async fn list_flights(
        &self,
        _request: Request<Criteria>,
    ) -> Result<Response<Self::ListFlightsStream>, Status> {
        Err(unimplemented("ListFlights"))
    }

    async fn get_flight_info(
        &self,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        FlightService::get_flight_info(self.0.as_ref(), request).await
    }

    async fn poll_flight_info(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<PollInfo>, Status> {
        Err(unimplemented("PollFlightInfo"))
    }

    async fn get_schema(
        &self,
        _request: Request<FlightDescriptor>,
    ) -> Result<Response<SchemaResult>, Status> {
        Err(unimplemented("GetSchema"))
    }

    async fn do_get(
        &self,
        request: Request<Ticket>,
    ) -> Result<Response<Self::DoGetStream>, Status> {
        let json = request
            .get_ref()
            .ticket
            .iter()
            .find(|b| !b.is_ascii_whitespace())
            == Some(&b'{');
        if !json {
            return FlightService::do_get(self.0.as_ref(), request)
                .await
                .map_err(|e| match e.code() {
                    tonic::Code::InvalidArgument if e.message().contains("DecodeError") => {
                        Status::invalid_argument(format!(
                            "the ticket is neither an InfluxDB 3 query ticket ({{\"database\": …, \"sql_query\": …, \"query_type\": \"sql\"}}) nor a Flight SQL ticket: {}",
                            e.message()
                        ))
                    }
                    _ => e,
                });
        }
        let peer = peer_of(&request)?;
        let headers = request.metadata().clone().into_headers();
        let stream = self
            .0
            .query(&headers, peer, &request.get_ref().ticket)
            .await?;
        Ok(Response::new(stream))
    }

    async fn do_put(
        &self,
        request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoPutStream>, Status> {
        // Flight SQL's: binding a prepared statement's parameters. Writes go to the HTTP
        // write endpoints (line protocol) for now.
        FlightService::do_put(self.0.as_ref(), request).await
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(unimplemented("DoExchange"))
    }

    async fn do_action(
        &self,
        request: Request<Action>,
    ) -> Result<Response<Self::DoActionStream>, Status> {
        FlightService::do_action(self.0.as_ref(), request).await
    }

    async fn list_actions(
        &self,
        request: Request<Empty>,
    ) -> Result<Response<Self::ListActionsStream>, Status> {
        FlightService::list_actions(self.0.as_ref(), request).await
    }
}
