//! `SET`, `SHOW` and transaction statements over the Postgres wire: what drivers and tools send
//! around their queries.

use std::sync::Arc;

use futures::stream;
use pgwire::api::ClientInfo;
use pgwire::api::Type;
use pgwire::api::results::{DataRowEncoder, FieldInfo, QueryResponse, Response, Tag};
use pgwire::error::PgWireResult;

use super::{session, user_error};
use crate::query::PgStatement;

/// A one-row, one-column text result (`SHOW`).
pub(super) fn one_value(name: &str, value: &str) -> PgWireResult<Response> {
    let fields = Arc::new(vec![FieldInfo::new(
        name.to_string(),
        None,
        None,
        Type::TEXT,
        pgwire::api::results::FieldFormat::Text,
    )]);
    let mut encoder = DataRowEncoder::new(fields.clone());
    encoder.encode_field(&Some(value))?;
    let row = encoder.take_row();
    Ok(Response::Query(QueryResponse::new(
        fields,
        stream::iter(vec![Ok(row)]),
    )))
}

/// The value `SHOW name` answers: what the client set, else the server's.
fn setting<C: ClientInfo + ?Sized>(client: &C, name: &str) -> PgWireResult<String> {
    let lower = name.to_ascii_lowercase();
    if let Some((_, v)) = client
        .metadata()
        .iter()
        .find(|(k, _)| k.to_ascii_lowercase() == lower)
    {
        return Ok(v.clone());
    }
    let value = match lower.as_str() {
        "server_version" => format!("16.0 (Rivulet {})", env!("CARGO_PKG_VERSION")),
        "server_version_num" => "160000".to_string(),
        "server_encoding" | "client_encoding" => "UTF8".to_string(),
        "datestyle" => "ISO, MDY".to_string(),
        "timezone" => "UTC".to_string(),
        "intervalstyle" => "postgres".to_string(),
        "integer_datetimes" | "standard_conforming_strings" => "on".to_string(),
        "transaction_isolation" | "default_transaction_isolation" => "read committed".to_string(),
        "transaction_read_only" | "default_transaction_read_only" => "off".to_string(),
        "search_path" => session(client)?.db.clone(),
        "max_identifier_length" => "63".to_string(),
        "lc_collate" | "lc_ctype" => "C".to_string(),
        "application_name" => String::new(),
        "statement_timeout" | "lock_timeout" | "idle_in_transaction_session_timeout" => {
            "0".to_string()
        }
        _ => {
            return Err(user_error(
                "42704",
                format!("unrecognized configuration parameter \"{name}\""),
            ));
        }
    };
    Ok(value)
}

/// `SET`, `SHOW` and transaction statements (Rivulet has no transactions: each statement is
/// atomic on its own, as in autocommit mode).
pub(super) fn control<C: ClientInfo + ?Sized>(
    client: &mut C,
    statement: PgStatement,
) -> PgWireResult<Response> {
    match statement {
        PgStatement::Set { name, value } => {
            client.metadata_mut().insert(name, value);
            Ok(Response::Execution(Tag::new("SET")))
        }
        PgStatement::Show(name) => one_value(&name, &setting(client, &name)?),
        PgStatement::Begin => Ok(Response::TransactionStart(Tag::new("BEGIN"))),
        PgStatement::Commit => Ok(Response::TransactionEnd(Tag::new("COMMIT"))),
        PgStatement::Rollback => Ok(Response::TransactionEnd(Tag::new("ROLLBACK"))),
        PgStatement::Query(_) => Err(user_error("XX000", "not a control statement")),
    }
}
