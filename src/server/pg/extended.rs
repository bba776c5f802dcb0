//! The extended query protocol: `Parse` plans the statement once for its parameter types and
//! result columns; `Bind` + `Execute` run it with the values, through the same front door.

use std::fmt::Debug;
use std::sync::Arc;

use arrow::datatypes::DataType;
use arrow_pg::datatypes::{arrow_schema_to_pg_fields, into_pg_type};
use async_trait::async_trait;
use futures::sink::Sink;
use pgwire::api::portal::{Format, Portal};
use pgwire::api::query::ExtendedQueryHandler;
use pgwire::api::results::{FieldInfo, Response};
use pgwire::api::stmt::QueryParser;
use pgwire::api::store::PortalStore;
use pgwire::api::{ClientInfo, ClientPortalStore, Type};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;

use super::settings::control;
use super::subscribe::{self, Subscribe};
use super::{AppState, Queries, admit, is_write, pg_error, session, user_error};
use crate::query::{PgStatement, PlanOptions};

/// A statement prepared with `Parse`.
#[derive(Debug, Clone)]
pub(crate) struct Prepared {
    statement: PgStatement,
    /// Placeholder types (`$1`, …), as planned.
    params: Vec<Option<DataType>>,
    /// The result's columns (none for statements without rows).
    schema: Option<arrow::datatypes::SchemaRef>,
    /// A `SUBSCRIBE`: answered as COPY OUT.
    subscribe: Option<Subscribe>,
}

pub(super) struct Parser;

#[async_trait]
impl QueryParser for Parser {
    type Statement = Prepared;

    async fn parse_sql<C>(
        &self,
        client: &C,
        sql: &str,
        _types: &[Option<Type>],
    ) -> PgWireResult<Option<Prepared>>
    where
        C: ClientInfo + Unpin + Send + Sync,
    {
        let state = client
            .session_extensions()
            .get::<AppState>()
            .ok_or_else(|| user_error("08P01", "the connection has not logged in"))?;
        if sql.trim().trim_end_matches(';').trim().is_empty() {
            return Ok(None);
        }
        if let Some(request) = subscribe::parse(sql) {
            return Ok(Some(Prepared {
                statement: PgStatement::Query(sql.to_string()),
                params: Vec::new(),
                schema: None,
                subscribe: Some(request?),
            }));
        }
        let mut statements = state
            .db
            .postgres_statements(sql)
            .map_err(|e| pg_error(e.into()))?;
        if statements.len() != 1 {
            return Err(user_error(
                "42601",
                "a prepared statement holds exactly one statement",
            ));
        }
        let statement = statements.remove(0);
        let PgStatement::Query(text) = &statement else {
            let schema = matches!(statement, PgStatement::Show(_)).then(|| {
                let name = match &statement {
                    PgStatement::Show(n) => n.clone(),
                    _ => String::new(),
                };
                Arc::new(arrow::datatypes::Schema::new(vec![
                    arrow::datatypes::Field::new(name, DataType::Utf8, true),
                ]))
            });
            return Ok(Some(Prepared {
                statement,
                params: Vec::new(),
                schema,
                subscribe: None,
            }));
        };
        let session = session(client)?;
        let admitted = admit(&state, &session, text)?;
        let df = admitted
            .plan(
                text,
                PlanOptions {
                    postgres: Some(&session.pg),
                    params: None,
                },
            )
            .await
            .map_err(pg_error)?;
        let types = df
            .logical_plan()
            .get_parameter_types()
            .map_err(|e| pg_error(crate::Error::from(e).into()))?;
        let mut numbered: Vec<(usize, Option<DataType>)> = types
            .into_iter()
            .filter_map(|(k, v)| Some((k.trim_start_matches('$').parse::<usize>().ok()?, v)))
            .collect();
        numbered.sort_by_key(|(n, _)| *n);
        let count = numbered.last().map_or(0, |(n, _)| *n);
        let mut params = vec![None; count];
        for (n, t) in numbered {
            if n >= 1 {
                params[n - 1] = t;
            }
        }
        let schema = (!is_write(text)).then(|| Arc::new(df.schema().as_arrow().clone()));
        Ok(Some(Prepared {
            statement,
            params,
            schema,
            subscribe: None,
        }))
    }

    fn get_parameter_types(&self, stmt: &Prepared) -> PgWireResult<Vec<Type>> {
        stmt.params
            .iter()
            .map(|t| match t {
                Some(t) => into_pg_type(t),
                None => Ok(Type::UNKNOWN),
            })
            .collect()
    }

    fn get_result_schema(
        &self,
        stmt: &Prepared,
        column_format: Option<&Format>,
    ) -> PgWireResult<Vec<FieldInfo>> {
        match &stmt.schema {
            Some(schema) => arrow_schema_to_pg_fields(
                schema,
                column_format.unwrap_or(&Format::UnifiedText),
                None,
            ),
            None => Ok(Vec::new()),
        }
    }
}

#[async_trait]
impl ExtendedQueryHandler for Queries {
    type Statement = Prepared;
    type QueryParser = Parser;

    fn query_parser(&self) -> Arc<Parser> {
        self.parser.clone()
    }

    async fn do_query<C>(
        &self,
        client: &mut C,
        portal: &Portal<Prepared>,
        _max_rows: usize,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + ClientPortalStore + Sink<PgWireBackendMessage> + Unpin + Send + Sync,
        C::PortalStore: PortalStore,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let prepared = &portal.statement.statement;
        if let Some(request) = &prepared.subscribe {
            return self.subscribe(client, request.clone()).await;
        }
        let PgStatement::Query(sql) = &prepared.statement else {
            return control(client, prepared.statement.clone());
        };
        let inferred: Vec<Option<&DataType>> = prepared.params.iter().map(Option::as_ref).collect();
        let params = arrow_pg::datatypes::df::deserialize_parameters(portal, &inferred)?;
        let params = (!prepared.params.is_empty()).then_some(params);
        self.run(client, sql, params.as_ref(), &portal.result_column_format)
            .await
    }
}
