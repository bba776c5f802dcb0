//! Flight SQL prepared statements and `GetSqlInfo`, and query parameters of InfluxDB 3 tickets.
//!
//! Prepared statements keep no server state: the handle is the JSON ticket itself (database,
//! SQL, and after `DoPut` the bound parameter row as Arrow IPC, hex), so a handle survives a
//! restart or another server behind a balancer, and closing one frees nothing. Parameters are
//! positional (`$1`, …) or named (`$host`), typed by the plan; values are checked against those
//! types when the statement runs.

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::IpcMessage;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::error::FlightError;
use arrow_flight::sql::metadata::{SqlInfoData, SqlInfoDataBuilder};
use arrow_flight::sql::{
    ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult, SqlInfo,
};
use arrow_flight::{SchemaAsIpc, sql::server::PeekableFlightDataStream};
use datafusion::common::{ParamValues, ScalarValue};
use futures::TryStreamExt;
use tonic::{Request, Status};

use super::{Flight, hydrated, status};

/// What `GetSqlInfo` answers.
pub(super) fn sql_info() -> Result<SqlInfoData, Status> {
    let mut b = SqlInfoDataBuilder::new();
    b.append(SqlInfo::FlightSqlServerName, "Rivulet");
    b.append(SqlInfo::FlightSqlServerVersion, env!("CARGO_PKG_VERSION"));
    b.append(SqlInfo::FlightSqlServerArrowVersion, "59");
    // Queries only; statements go to /api/v1/sql or the Postgres port.
    b.append(SqlInfo::FlightSqlServerReadOnly, true);
    b.append(SqlInfo::FlightSqlServerSql, true);
    b.append(SqlInfo::FlightSqlServerSubstrait, false);
    b.append(SqlInfo::FlightSqlServerTransaction, 0i32);
    b.append(SqlInfo::FlightSqlServerCancel, false);
    b.append(SqlInfo::FlightSqlServerStatementTimeout, 0i32);
    b.append(SqlInfo::SqlIdentifierQuoteChar, "\"");
    b.append(SqlInfo::SqlDdlCatalog, false);
    b.append(SqlInfo::SqlDdlSchema, false);
    b.append(SqlInfo::SqlDdlTable, false);
    // Identifiers are case-sensitive (no folding), as line protocol names.
    b.append(SqlInfo::SqlIdentifierCase, 3i32);
    b.append(SqlInfo::SqlQuotedIdentifierCase, 3i32);
    b.append(SqlInfo::SqlAllTablesAreSelectable, true);
    b.append(SqlInfo::SqlNullOrdering, 2i32);
    b.build().map_err(|e| Status::internal(e.to_string()))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok())
        .collect()
}

/// An Arrow schema as the IPC bytes Flight SQL carries.
fn schema_bytes(schema: &Schema) -> Result<prost::bytes::Bytes, Status> {
    let options = arrow::ipc::writer::IpcWriteOptions::default();
    let IpcMessage(bytes) = SchemaAsIpc::new(schema, &options)
        .try_into()
        .map_err(|e: arrow::error::ArrowError| Status::internal(e.to_string()))?;
    Ok(bytes)
}

/// The placeholders of a plan as a parameter schema (`$1` … in order, then named ones).
fn parameter_schema(df: &datafusion::dataframe::DataFrame) -> Result<Schema, Status> {
    let types = df
        .logical_plan()
        .get_parameter_types()
        .map_err(|e| status(crate::Error::from(e).into()))?;
    let mut names: Vec<(String, Option<DataType>)> = types.into_iter().collect();
    names.sort_by_key(|(name, _)| {
        let n = name.trim_start_matches('$').parse::<usize>();
        (n.is_err(), n.unwrap_or(0), name.clone())
    });
    Ok(Schema::new(
        names
            .into_iter()
            .map(|(name, t)| Field::new(name, t.unwrap_or(DataType::Null), true))
            .collect::<Vec<_>>(),
    ))
}

/// The values a ticket carries: InfluxDB 3's named `params` (`{"host": "a"}`) or a prepared
/// statement's bound row.
pub(super) fn ticket_params(
    params: Option<&serde_json::Value>,
    params_ipc: Option<&str>,
) -> Result<Option<ParamValues>, Status> {
    if let Some(ipc) = params_ipc {
        let bytes = unhex(ipc).ok_or_else(|| {
            Status::invalid_argument("the statement handle's parameters are damaged")
        })?;
        let reader = arrow::ipc::reader::StreamReader::try_new(std::io::Cursor::new(bytes), None)
            .map_err(|e| Status::invalid_argument(format!("statement parameters: {e}")))?;
        let mut values = Vec::new();
        for batch in reader {
            let batch = batch
                .map_err(|e| Status::invalid_argument(format!("statement parameters: {e}")))?;
            values = row(&batch)?;
        }
        return Ok(Some(ParamValues::from(values)));
    }
    let Some(params) = params.filter(|p| !p.is_null()) else {
        return Ok(None);
    };
    let serde_json::Value::Object(map) = params else {
        return Err(Status::invalid_argument(
            "\"params\" must be an object of named values, e.g. {\"host\": \"a\"} for $host",
        ));
    };
    let mut values = std::collections::HashMap::new();
    for (name, v) in map {
        let scalar = match v {
            serde_json::Value::Null => ScalarValue::Null,
            serde_json::Value::Bool(b) => ScalarValue::Boolean(Some(*b)),
            serde_json::Value::String(s) => ScalarValue::Utf8(Some(s.clone())),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => ScalarValue::Int64(Some(i)),
                None => ScalarValue::Float64(n.as_f64()),
            },
            other => {
                return Err(Status::invalid_argument(format!(
                    "parameter '{name}' is {other}: give a string, number, boolean or null"
                )));
            }
        };
        values.insert(name.clone(), scalar);
    }
    Ok(Some(ParamValues::from(values)))
}

/// The one row of bound parameters, as values.
fn row(batch: &RecordBatch) -> Result<Vec<ScalarValue>, Status> {
    if batch.num_rows() != 1 {
        return Err(Status::invalid_argument(format!(
            "bind exactly one row of parameters (got {}); run the statement once per row",
            batch.num_rows()
        )));
    }
    batch
        .columns()
        .iter()
        .map(|c| {
            ScalarValue::try_from_array(c, 0)
                .map_err(|e| Status::invalid_argument(format!("a parameter: {e}")))
        })
        .collect()
}

impl Flight {
    /// `CreatePreparedStatement`: plans the query for its result and parameter schemas.
    pub(super) async fn prepare(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: &Request<arrow_flight::Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let admitted = self.access(request)?;
        let df = admitted
            .plan(&query.query, Default::default())
            .await
            .map_err(status)?;
        let dataset = hydrated(df.schema().as_arrow());
        let parameters = parameter_schema(&df)?;
        let handle = serde_json::json!({
            "database": admitted.db(),
            "sql_query": query.query,
            "query_type": "sql",
        });
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: handle.to_string().into_bytes().into(),
            dataset_schema: schema_bytes(&dataset)?,
            parameter_schema: schema_bytes(&parameters)?,
        })
    }

    /// `DoPut` of a prepared statement's parameters: a new handle holding them.
    pub(super) async fn bind(
        &self,
        handle: &[u8],
        request: Request<PeekableFlightDataStream>,
    ) -> Result<prost::bytes::Bytes, Status> {
        // The caller's token must be good before its data is read.
        self.access(&request)?;
        let mut ticket: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(handle)
            .map_err(|e| {
                Status::invalid_argument(format!("not a Rivulet prepared statement handle: {e}"))
            })?;
        let batches: Vec<RecordBatch> = FlightRecordBatchStream::new_from_flight_data(
            request.into_inner().map_err(FlightError::from),
        )
        .try_collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("reading the parameters failed: {e}")))?;
        let Some(batch) = batches.into_iter().rfind(|b| b.num_rows() > 0) else {
            ticket.remove("params_ipc");
            return Ok(serde_json::Value::Object(ticket)
                .to_string()
                .into_bytes()
                .into());
        };
        row(&batch)?;
        let mut ipc = Vec::new();
        {
            let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut ipc, &batch.schema())
                .map_err(|e| Status::internal(e.to_string()))?;
            w.write(&batch)
                .map_err(|e| Status::internal(e.to_string()))?;
            w.finish().map_err(|e| Status::internal(e.to_string()))?;
        }
        ticket.insert(
            "params_ipc".to_string(),
            serde_json::Value::String(hex(&ipc)),
        );
        Ok(serde_json::Value::Object(ticket)
            .to_string()
            .into_bytes()
            .into())
    }
}
