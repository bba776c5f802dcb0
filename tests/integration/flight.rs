//! Arrow Flight on the HTTP port with a real Flight client (arrow-flight's `FlightClient` over
//! a tonic channel): InfluxDB 3's JSON ticket, tokens and their scopes, errors as gRPC codes.

use arrow::array::RecordBatch;
use arrow_flight::{FlightClient, Ticket};
use futures::TryStreamExt;
use rivulet::Precision;
use rivulet::server::ServerConfig;
use tonic::Code;

use crate::common::{Server, memory_db, pretty, rt};

async fn client(s: &Server, token: Option<&str>) -> FlightClient {
    let channel = tonic::transport::Channel::from_shared(s.url(""))
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut client = FlightClient::new(channel);
    if let Some(t) = token {
        client
            .add_header("authorization", &format!("Bearer {t}"))
            .expect("header");
    }
    client
}

fn ticket(db: &str, sql: &str) -> Ticket {
    Ticket::new(
        serde_json::json!({"database": db, "sql_query": sql, "query_type": "sql"}).to_string(),
    )
}

async fn get(client: &mut FlightClient, t: Ticket) -> Result<Vec<RecordBatch>, tonic::Status> {
    let stream = client.do_get(t).await.map_err(status)?;
    stream.try_collect().await.map_err(status)
}

fn status(e: arrow_flight::error::FlightError) -> tonic::Status {
    match e {
        arrow_flight::error::FlightError::Tonic(s) => *s,
        other => tonic::Status::unknown(other.to_string()),
    }
}

/// Every endpoint's batches of `info`, as a table.
async fn rows_of(
    sql: &mut arrow_flight::sql::client::FlightSqlServiceClient<tonic::transport::Channel>,
    info: arrow_flight::FlightInfo,
) -> String {
    let mut out = Vec::new();
    for endpoint in info.endpoint {
        let batches: Vec<RecordBatch> = sql
            .do_get(endpoint.ticket.expect("ticket"))
            .await
            .expect("do_get")
            .try_collect()
            .await
            .expect("batches");
        out.extend(batches);
    }
    pretty(&out)
}

#[test]
fn influxdb3_tickets_query_over_flight_on_the_http_port() {
    rt().block_on(async {
        let db = memory_db();
        let lines: Vec<String> = (0..5000)
            .map(|i| format!("cpu,host=h{} usage={} {}", i % 7, i % 100, i))
            .collect();
        db.write_lines("main", &lines.join("\n"), Precision::Second)
            .expect("write");
        let s = Server::start(db, ServerConfig::default()).await;
        let mut c = client(&s, None).await;
        let batches = get(
            &mut c,
            ticket(
                "main",
                "SELECT host, count(*) AS n FROM cpu GROUP BY host ORDER BY host",
            ),
        )
        .await
        .expect("query");
        let table = pretty(&batches);
        assert!(table.contains("| h0   | 715 |"), "{table}");
        // Every row arrives, batch by batch.
        let all = get(&mut c, ticket("main", "SELECT * FROM cpu"))
            .await
            .expect("all");
        assert_eq!(all.iter().map(|b| b.num_rows()).sum::<usize>(), 5000);
        // The same listener still serves HTTP.
        assert_eq!(s.get("/health").await.status(), 200);

        // Bad SQL and bad tickets: InvalidArgument with the message.
        let e = get(&mut c, ticket("main", "SELECT nope FROM cpu"))
            .await
            .expect_err("bad sql");
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().contains("nope"), "{e}");
        let e = get(&mut c, Ticket::new("not json"))
            .await
            .expect_err("bad ticket");
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        assert!(e.message().contains("InfluxDB 3 query ticket"), "{e}");
        let e = get(
            &mut c,
            Ticket::new(
                r#"{"database": "main", "sql_query": "SELECT 1", "query_type": "influxql"}"#,
            ),
        )
        .await
        .expect_err("influxql");
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        // Statements are not queries.
        let e = get(&mut c, ticket("main", "DROP TABLE cpu"))
            .await
            .expect_err("ddl");
        assert_eq!(e.code(), Code::InvalidArgument, "{e}");
        // A descriptor that is not a Flight SQL command is refused, named.
        let e = c
            .get_flight_info(arrow_flight::FlightDescriptor::new_cmd("SELECT 1"))
            .await
            .expect_err("not a command");
        assert_ne!(status(e).code(), Code::Ok);
        s.stop().await;
    });
}

/// A server with `main_lines` in `main`, a table in `other`, and one token that may read
/// `main` only.
async fn scoped_server(main_lines: &str) -> Server {
    let db = memory_db();
    db.write_lines("main", main_lines, Precision::Second)
        .expect("write");
    db.write_lines("other", "mem,host=a used=7 1", Precision::Second)
        .expect("write");
    let config = ServerConfig {
        auth: rivulet::server::Auth::new(vec![
            "read:main-reader-0123456789:main".parse().expect("token"),
        ])
        .expect("auth"),
        ..ServerConfig::default()
    };
    Server::start(db, config).await
}

#[test]
fn flight_queries_need_a_token_with_the_database_in_scope() {
    rt().block_on(async {
        let s = scoped_server("cpu,host=a usage=1 1").await;
        let e = get(
            &mut client(&s, None).await,
            ticket("main", "SELECT * FROM cpu"),
        )
        .await
        .expect_err("no token");
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
        let e = get(
            &mut client(&s, Some("wrong-token-0123456789")).await,
            ticket("main", "SELECT * FROM cpu"),
        )
        .await
        .expect_err("wrong token");
        assert_eq!(e.code(), Code::Unauthenticated, "{e}");
        let mut reader = client(&s, Some("main-reader-0123456789")).await;
        let rows = get(&mut reader, ticket("main", "SELECT usage FROM cpu"))
            .await
            .expect("in scope");
        assert_eq!(rows.iter().map(|b| b.num_rows()).sum::<usize>(), 1);
        let e = get(&mut reader, ticket("other", "SELECT * FROM mem"))
            .await
            .expect_err("database out of scope");
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        let e = get(&mut reader, ticket("main", "SELECT * FROM other.mem"))
            .await
            .expect_err("naming another database");
        assert_eq!(e.code(), Code::PermissionDenied, "{e}");
        s.stop().await;
    });
}

#[test]
fn flight_sql_statement_queries_take_the_database_from_a_header() {
    rt().block_on(async {
        let s = scoped_server("cpu,host=a usage=1 1\ncpu,host=b usage=2 2").await;
        let channel = tonic::transport::Channel::from_shared(s.url(""))
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut sql = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
        sql.set_header("authorization", "Bearer main-reader-0123456789");
        sql.set_header("database", "main");
        let info = sql
            .execute(
                "SELECT host, usage FROM cpu ORDER BY host".to_string(),
                None,
            )
            .await
            .expect("execute");
        // The announced schema is the one the batches arrive in (tags as plain strings).
        let schema = info.clone().try_decode_schema().expect("schema");
        assert_eq!(schema.field(0).name(), "host");
        assert_eq!(
            schema.field(0).data_type(),
            &arrow::datatypes::DataType::Utf8
        );
        let mut rows = Vec::new();
        for endpoint in info.endpoint {
            let ticket = endpoint.ticket.expect("ticket");
            let batches: Vec<RecordBatch> = sql
                .do_get(ticket)
                .await
                .expect("do_get")
                .try_collect()
                .await
                .expect("batches");
            for b in &batches {
                assert_eq!(b.schema().fields(), schema.fields());
            }
            rows.extend(batches);
        }
        let table = pretty(&rows);
        assert!(table.contains("| a    | 1.0   |"), "{table}");
        assert!(table.contains("| b    | 2.0   |"), "{table}");
        // Catalog calls list what the token may read (ADBC's get_objects, Grafana's pickers).
        let info = sql.get_catalogs().await.expect("catalogs");
        assert!(rows_of(&mut sql, info).await.contains("rivulet"));
        let info = sql
            .get_db_schemas(arrow_flight::sql::CommandGetDbSchemas::default())
            .await
            .expect("schemas");
        let schemas = rows_of(&mut sql, info).await;
        assert!(schemas.contains("main"), "{schemas}");
        assert!(!schemas.contains("other"), "{schemas}");
        let info = sql
            .get_tables(arrow_flight::sql::CommandGetTables {
                include_schema: true,
                ..Default::default()
            })
            .await
            .expect("tables");
        let tables = rows_of(&mut sql, info).await;
        assert!(tables.contains("| cpu "), "{tables}");
        assert!(!tables.contains("mem"), "{tables}");
        let info = sql.get_table_types().await.expect("table types");
        assert!(rows_of(&mut sql, info).await.contains("BASE TABLE"));
        // Bad SQL: the planning error as InvalidArgument; the database header is scoped.
        let e = sql
            .execute("SELECT nope FROM cpu".to_string(), None)
            .await
            .expect_err("bad sql");
        assert!(e.to_string().contains("nope"), "{e}");
        sql.set_header("database", "other");
        let e = sql
            .execute("SELECT * FROM mem".to_string(), None)
            .await
            .expect_err("out of scope");
        assert!(
            e.to_string().contains("may not read on database 'other'"),
            "{e}"
        );
        s.stop().await;
    });
}

#[test]
fn flight_sql_prepared_statements_take_parameters_and_sql_info_describes_the_server() {
    rt().block_on(async {
        let s =
            scoped_server("cpu,host=a usage=1 1\ncpu,host=b usage=2 2\ncpu,host=a usage=3 3").await;
        let channel = tonic::transport::Channel::from_shared(s.url(""))
            .expect("url")
            .connect()
            .await
            .expect("connect");
        let mut sql = arrow_flight::sql::client::FlightSqlServiceClient::new(channel);
        sql.set_header("authorization", "Bearer main-reader-0123456789");
        sql.set_header("database", "main");
        let mut stmt = sql
            .prepare(
                "SELECT host, usage FROM cpu WHERE host = $1 AND usage > $2 ORDER BY time"
                    .to_string(),
                None,
            )
            .await
            .expect("prepare");
        // The parameters' types come from the plan.
        let params = stmt.parameter_schema().expect("parameter schema").clone();
        assert_eq!(params.fields().len(), 2, "{params:?}");
        assert_eq!(
            params.field(1).data_type(),
            &arrow::datatypes::DataType::Float64
        );
        assert_eq!(
            stmt.dataset_schema().expect("schema").field(0).name(),
            "host"
        );
        let bind = |host: &str, above: f64| {
            RecordBatch::try_new(
                std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
                    arrow::datatypes::Field::new("$1", arrow::datatypes::DataType::Utf8, false),
                    arrow::datatypes::Field::new("$2", arrow::datatypes::DataType::Float64, false),
                ])),
                vec![
                    std::sync::Arc::new(arrow::array::StringArray::from(vec![host])),
                    std::sync::Arc::new(arrow::array::Float64Array::from(vec![above])),
                ],
            )
            .expect("batch")
        };
        stmt.set_parameters(bind("a", 0.5)).expect("bind");
        let info = stmt.execute().await.expect("execute");
        let rows = rows_of(&mut sql, info).await;
        assert!(
            rows.contains("| a    | 1.0   |") && rows.contains("| a    | 3.0   |"),
            "{rows}"
        );
        assert!(!rows.contains("| b "), "{rows}");
        // Again with other values.
        stmt.set_parameters(bind("a", 2.0)).expect("bind");
        let info = stmt.execute().await.expect("execute");
        let rows = rows_of(&mut sql, info).await;
        assert_eq!(
            rows.lines().filter(|l| l.starts_with("| a")).count(),
            1,
            "{rows}"
        );
        // A value of the wrong type is the caller's error.
        let wrong = RecordBatch::try_new(
            std::sync::Arc::new(arrow::datatypes::Schema::new(vec![
                arrow::datatypes::Field::new("$1", arrow::datatypes::DataType::Utf8, false),
                arrow::datatypes::Field::new("$2", arrow::datatypes::DataType::Utf8, false),
            ])),
            vec![
                std::sync::Arc::new(arrow::array::StringArray::from(vec!["a"])),
                std::sync::Arc::new(arrow::array::StringArray::from(vec!["high"])),
            ],
        )
        .expect("batch");
        stmt.set_parameters(wrong).expect("bind");
        let e = match stmt.execute().await {
            Ok(info) => {
                let ticket = info.endpoint[0].ticket.clone().expect("ticket");
                match sql.do_get(ticket).await {
                    Ok(stream) => stream
                        .try_collect::<Vec<RecordBatch>>()
                        .await
                        .expect_err("wrong type"),
                    Err(e) => e,
                }
            }
            Err(e) => e,
        };
        assert_eq!(status(e).code(), Code::InvalidArgument);
        stmt.close().await.expect("close");

        // GetSqlInfo: who the server is and what it takes.
        let info = sql
            .get_sql_info(vec![
                arrow_flight::sql::SqlInfo::FlightSqlServerName,
                arrow_flight::sql::SqlInfo::FlightSqlServerReadOnly,
            ])
            .await
            .expect("sql info");
        let rows = rows_of(&mut sql, info).await;
        assert!(rows.contains("Rivulet"), "{rows}");

        // InfluxDB 3 tickets carry named parameters.
        let mut c = client(&s, Some("main-reader-0123456789")).await;
        let t = Ticket::new(
            serde_json::json!({
                "database": "main",
                "sql_query": "SELECT count(*) AS n FROM cpu WHERE host = $host",
                "query_type": "sql",
                "params": {"host": "a"},
            })
            .to_string(),
        );
        let rows = pretty(&get(&mut c, t).await.expect("named params"));
        assert!(rows.contains("| 2 |"), "{rows}");
        s.stop().await;
    });
}
