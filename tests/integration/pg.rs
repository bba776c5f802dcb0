//! The Postgres wire protocol with a real Postgres client (tokio-postgres): the extended
//! protocol with `$1` parameters and binary results, the simple protocol, SQLSTATE errors after
//! which the connection stays usable, the catalog psql reads, tokens and their scopes.

use std::time::{Duration, SystemTime};

use rivulet::Precision;
use rivulet::server::ServerConfig;
use tokio_postgres::error::SqlState;
use tokio_postgres::{Client, NoTls, SimpleQueryMessage};

use crate::common::{Server, memory_db, rt};

/// A client of `s`'s Postgres port on database `db`, with `password` (a token).
async fn connect(
    s: &Server,
    db: &str,
    password: Option<&str>,
) -> Result<Client, tokio_postgres::Error> {
    let mut config = tokio_postgres::Config::new();
    config
        .host("127.0.0.1")
        .port(s.pg_addr.port())
        .user("anyone")
        .dbname(db)
        .connect_timeout(Duration::from_secs(10));
    if let Some(p) = password {
        config.password(p);
    }
    let (client, connection) = config.connect(NoTls).await?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// The text rows of a simple query.
async fn simple(client: &Client, sql: &str) -> Vec<Vec<String>> {
    client
        .simple_query(sql)
        .await
        .expect("simple query")
        .into_iter()
        .filter_map(|m| match m {
            SimpleQueryMessage::Row(r) => Some(
                (0..r.len())
                    .map(|i| r.get(i).unwrap_or("NULL").to_string())
                    .collect(),
            ),
            _ => None,
        })
        .collect()
}

fn code(e: &tokio_postgres::Error) -> Option<&SqlState> {
    e.code()
}

#[test]
fn postgres_clients_query_with_parameters_binary_results_and_sqlstate_errors() {
    rt().block_on(async {
        let db = memory_db();
        db.write_lines(
            "main",
            "cpu,host=a,region=eu usage=95.5,n=3i,ok=true 1700000000\n\
             cpu,host=b,region=us usage=12.25,n=4i,ok=false 1700000010\n\
             cpu,host=a,region=eu usage=80,n=5i,ok=true 1700000020",
            Precision::Second,
        )
        .expect("write");
        let s = Server::start(db, ServerConfig::default()).await;
        let c = connect(&s, "main", None).await.expect("connect");

        // Extended protocol: Parse/Describe/Bind/Execute with a text parameter; tokio-postgres
        // asks for binary results, so every value is decoded from its binary form.
        let rows = c
            .query(
                "SELECT host, usage, n, ok, time FROM cpu WHERE host = $1 ORDER BY time",
                &[&"a"],
            )
            .await
            .expect("query");
        assert_eq!(rows.len(), 2);
        assert_eq!(rows[0].get::<_, String>("host"), "a");
        assert_eq!(rows[0].get::<_, f64>("usage"), 95.5);
        assert_eq!(rows[1].get::<_, i64>("n"), 5);
        assert!(rows[0].get::<_, bool>("ok"));
        let t: SystemTime = rows[0].get("time");
        assert_eq!(
            t.duration_since(SystemTime::UNIX_EPOCH)
                .expect("after epoch"),
            Duration::from_secs(1_700_000_000)
        );
        // Column types as Postgres names them: tags are text, time is timestamptz.
        let types: Vec<String> = rows[0]
            .columns()
            .iter()
            .map(|c| c.type_().name().to_string())
            .collect();
        assert_eq!(types, ["text", "float8", "int8", "bool", "timestamptz"]);

        // Numeric and time parameters.
        let rows = c
            .query(
                "SELECT count(*) AS k FROM cpu WHERE usage > $1 AND n >= $2",
                &[&50.0f64, &4i64],
            )
            .await
            .expect("numeric params");
        assert_eq!(rows[0].get::<_, i64>("k"), 1);
        let from = SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_005);
        let rows = c
            .query(
                "SELECT host FROM cpu WHERE time >= $1 ORDER BY time",
                &[&from],
            )
            .await
            .expect("time param");
        assert_eq!(rows.len(), 2);

        // A prepared statement runs again with other values.
        let stmt = c
            .prepare("SELECT usage FROM cpu WHERE host = $1 ORDER BY time")
            .await
            .expect("prepare");
        assert_eq!(stmt.params().len(), 1);
        assert_eq!(c.query(&stmt, &[&"b"]).await.expect("b").len(), 1);
        assert_eq!(c.query(&stmt, &[&"a"]).await.expect("a").len(), 2);

        // Simple protocol, several statements in one string; text results.
        let rows = simple(&c, "SELECT count(*) FROM cpu; SELECT max(n) FROM cpu").await;
        assert_eq!(rows, [["3"], ["5"]]);

        // Errors carry SQLSTATE codes, and the connection stays usable.
        let e = c
            .query("SELECT nope FROM cpu", &[])
            .await
            .expect_err("column");
        assert_eq!(code(&e), Some(&SqlState::UNDEFINED_COLUMN), "{e:?}");
        let e = c.query("SELECT * FROM nope", &[]).await.expect_err("table");
        assert_eq!(code(&e), Some(&SqlState::UNDEFINED_TABLE), "{e:?}");
        let e = c.simple_query("SELEC 1").await.expect_err("syntax");
        assert_eq!(code(&e), Some(&SqlState::SYNTAX_ERROR), "{e:?}");
        let e = c.simple_query("SHOW nope").await.expect_err("setting");
        assert_eq!(code(&e), Some(&SqlState::UNDEFINED_OBJECT), "{e:?}");
        assert_eq!(simple(&c, "SELECT count(*) FROM cpu").await, [["3"]]);

        // What drivers and tools send around their queries.
        c.batch_execute("SET application_name = 'test'; SET extra_float_digits = 3")
            .await
            .expect("set");
        assert_eq!(simple(&c, "SHOW application_name").await, [["test"]]);
        assert_eq!(
            simple(&c, "SHOW TRANSACTION ISOLATION LEVEL").await,
            [["read committed"]]
        );
        assert_eq!(simple(&c, "SHOW search_path").await, [["main"]]);
        c.batch_execute("BEGIN; COMMIT")
            .await
            .expect("transactions");

        // The catalog psql, Grafana and DBeaver browse.
        let tables = simple(
            &c,
            "SELECT n.nspname, c.relname FROM pg_catalog.pg_class c \
             JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relkind = 'r' AND n.nspname = current_schema() ORDER BY 2",
        )
        .await;
        assert_eq!(tables, [["main", "cpu"]]);
        let columns = simple(
            &c,
            "SELECT column_name, data_type FROM information_schema.columns \
             WHERE table_schema = current_schema() AND table_name = 'cpu' ORDER BY 1",
        )
        .await;
        assert_eq!(columns.len(), 6, "{columns:?}");
        assert_eq!(simple(&c, "SELECT current_database()").await, [["main"]]);
        // psql's `\d cpu` looks the table up by name, then its columns by oid.
        let found = simple(
            &c,
            "SELECT c.oid, n.nspname, c.relname FROM pg_catalog.pg_class c \
             LEFT JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
             WHERE c.relname OPERATOR(pg_catalog.~) '^(cpu)$' COLLATE pg_catalog.default \
             AND pg_catalog.pg_table_is_visible(c.oid) ORDER BY 2, 3",
        )
        .await;
        assert_eq!(found.len(), 1, "{found:?}");
        let oid = &found[0][0];
        let attrs = simple(
            &c,
            &format!(
                "SELECT a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod) \
                 FROM pg_catalog.pg_attribute a WHERE a.attrelid = '{oid}' AND a.attnum > 0 \
                 AND NOT a.attisdropped ORDER BY a.attnum"
            ),
        )
        .await;
        assert!(
            attrs.contains(&vec![
                "time".to_string(),
                "timestamp with time zone".to_string()
            ]),
            "{attrs:?}"
        );
        // Other protocols' sessions do not see the Postgres catalog.
        let leaked =
            s.db.query(
                "main",
                "SELECT * FROM information_schema.tables WHERE table_schema = 'pg_catalog'",
            )
            .await
            .expect("information_schema");
        assert_eq!(leaked.iter().map(|b| b.num_rows()).sum::<usize>(), 0);
        s.stop().await;
    });
}

#[test]
fn postgres_logins_use_tokens_and_their_database_scope() {
    rt().block_on(async {
        let db = memory_db();
        db.write_lines("main", "cpu,host=a usage=1 1", Precision::Second)
            .expect("write");
        db.write_lines("other", "mem,host=a used=7 1", Precision::Second)
            .expect("write");
        let config = ServerConfig {
            auth: rivulet::server::Auth::new(vec![
                "read:main-reader-0123456789:main".parse().expect("token"),
                "admin:the-admin-0123456789".parse().expect("token"),
            ])
            .expect("auth"),
            ..ServerConfig::default()
        };
        let s = Server::start(db, config).await;
        // The server asks for a password (tokio-postgres then refuses to go on without one).
        let e = connect(&s, "main", None).await.expect_err("no password");
        assert!(format!("{e:?}").contains("password missing"), "{e:?}");
        let e = connect(&s, "main", Some("wrong-token-0123456789"))
            .await
            .expect_err("wrong token");
        assert_eq!(code(&e), Some(&SqlState::INVALID_PASSWORD), "{e:?}");
        let e = connect(&s, "other", Some("main-reader-0123456789"))
            .await
            .expect_err("database out of scope");
        assert_eq!(
            code(&e),
            Some(&SqlState::INVALID_AUTHORIZATION_SPECIFICATION),
            "{e:?}"
        );

        let reader = connect(&s, "main", Some("main-reader-0123456789"))
            .await
            .expect("reader");
        assert_eq!(simple(&reader, "SELECT count(*) FROM cpu").await, [["1"]]);
        let e = reader
            .simple_query("SELECT * FROM other.mem")
            .await
            .expect_err("other database");
        assert_eq!(code(&e), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e:?}");
        // The catalog lists only what the token may read.
        let schemas = simple(&reader, "SELECT nspname FROM pg_catalog.pg_namespace").await;
        assert!(!schemas.iter().any(|r| r[0] == "other"), "{schemas:?}");
        // Writes need an admin token, as on /api/v1/sql.
        let e = reader
            .simple_query("INSERT INTO cpu (time, host, usage) VALUES (2, 'b', 2.0)")
            .await
            .expect_err("read-only token");
        assert_eq!(code(&e), Some(&SqlState::INSUFFICIENT_PRIVILEGE), "{e:?}");

        let admin = connect(&s, "main", Some("the-admin-0123456789"))
            .await
            .expect("admin");
        let n = admin
            .execute(
                "INSERT INTO cpu (time, host, usage) VALUES (to_timestamp(2), 'b', 2.0)",
                &[],
            )
            .await
            .expect("insert");
        assert_eq!(n, 1);
        assert_eq!(simple(&reader, "SELECT count(*) FROM cpu").await, [["2"]]);
        s.stop().await;
    });
}

/// Reads COPY data until `lines` lines have arrived.
async fn read_lines(
    stream: &mut std::pin::Pin<Box<tokio_postgres::CopyOutStream>>,
    lines: usize,
) -> Vec<String> {
    use futures::StreamExt;
    let mut out: Vec<String> = Vec::new();
    while out.len() < lines {
        let chunk = tokio::time::timeout(Duration::from_secs(20), stream.next())
            .await
            .expect("a change in time")
            .expect("the stream goes on")
            .expect("copy data");
        let text = String::from_utf8(chunk.to_vec()).expect("utf-8");
        out.extend(text.lines().map(str::to_string));
    }
    out
}

#[test]
fn subscribe_over_postgres_streams_the_snapshot_then_every_change_until_cancelled() {
    rt().block_on(async {
        let db = memory_db();
        db.write_lines(
            "main",
            "cpu,host=a usage=10 60\ncpu,host=a usage=20 70\ncpu,host=b usage=5 60",
            Precision::Second,
        )
        .expect("write");
        db.sql(
            "CREATE MATERIALIZED VIEW cpu_1m AS SELECT host, date_bin(INTERVAL '1 minute', time) AS time, \
             avg(usage) AS usage, count(*) AS n FROM cpu GROUP BY host, date_bin(INTERVAL '1 minute', time)",
        )
        .await
        .expect("view");
        db.sync_views().expect("views");
        let s = Server::start(db.clone(), ServerConfig::default()).await;
        let c = connect(&s, "main", None).await.expect("connect");

        // The snapshot: `seq`, `op`, then the view's columns, ordered by key.
        let stream = c
            .copy_out("SUBSCRIBE TO SELECT host, time, usage, n FROM cpu_1m")
            .await
            .expect("subscribe");
        let mut stream = Box::pin(stream);
        let mut snapshot = read_lines(&mut stream, 2).await;
        snapshot.sort();
        let fields: Vec<Vec<&str>> = snapshot.iter().map(|l| l.split('\t').collect()).collect();
        assert_eq!(fields[0][1..], ["upsert", "a", "1970-01-01T00:01:00Z", "15.0", "2"]);
        assert_eq!(fields[1][1..], ["upsert", "b", "1970-01-01T00:01:00Z", "5.0", "1"]);

        // A write moves one row: one line, with a later sequence.
        db.write_lines("main", "cpu,host=b usage=7 80", Precision::Second)
            .expect("write");
        let change = read_lines(&mut stream, 1).await;
        let f: Vec<&str> = change[0].split('\t').collect();
        assert_eq!(f[1..], ["upsert", "b", "1970-01-01T00:01:00Z", "6.0", "2"]);
        let first_seq: u64 = fields[0][0].parse().expect("seq");
        assert!(f[0].parse::<u64>().expect("seq") > first_seq);

        // A CancelRequest ends it with SQLSTATE 57014; the connection stays usable.
        c.cancel_token().cancel_query(NoTls).await.expect("cancel");
        let end = tokio::time::timeout(Duration::from_secs(20), async {
            use futures::StreamExt;
            loop {
                match stream.next().await {
                    Some(Ok(_)) => continue,
                    Some(Err(e)) => return Some(e),
                    None => return None,
                }
            }
        })
        .await
        .expect("ends after the cancel")
        .expect("with an error");
        assert_eq!(code(&end), Some(&SqlState::QUERY_CANCELED), "{end:?}");
        assert_eq!(simple(&c, "SELECT count(*) FROM cpu").await, [["4"]]);
        // Errors before the stream starts are plain errors.
        let Err(e) = c.copy_out("SUBSCRIBE TO SELECT nope FROM cpu").await else {
            panic!("a bad column must fail");
        };
        assert_eq!(code(&e), Some(&SqlState::UNDEFINED_COLUMN), "{e:?}");

        // Without the snapshot, with progress: only what happens from now on.
        let stream = c
            .copy_out("SUBSCRIBE cpu WITH (snapshot = false)")
            .await
            .expect("subscribe to a table");
        let mut stream = Box::pin(stream);
        db.write_lines("main", "cpu,host=z usage=1 90", Precision::Second)
            .expect("write");
        let rows = read_lines(&mut stream, 1).await;
        assert!(rows[0].contains("\tinsert\tz\t"), "{rows:?}");

        drop(stream);
        s.stop().await;
    });
}
