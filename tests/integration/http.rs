//! The HTTP API against a real server on 127.0.0.1:0 with a real HTTP client.

use std::io::Write as _;
use std::net::SocketAddr;

use reqwest::StatusCode;
use rivulet::server::{ConnectionLimits, ServerConfig, router, serve};

use crate::common::Server;
use rivulet::Db;
use serde_json::Value;

#[tokio::test]
async fn v2_write_then_v3_query_returns_the_row() {
    let s = Server::in_memory().await;
    let r = s
        .post(
            "/api/v2/write?bucket=main&org=anything&precision=s",
            "cpu,host=a usage=1 1700000000",
        )
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        r.headers()
            .get("x-rivulet-seq")
            .and_then(|v| v.to_str().ok()),
        Some("1")
    );
    let rows = s
        .json("/api/v3/query_sql?db=main&q=SELECT+*+FROM+cpu&format=json")
        .await;
    assert_eq!(
        rows,
        serde_json::json!([{"host": "a", "time": "2023-11-14T22:13:20Z", "usage": 1.0}])
    );
}

#[tokio::test]
async fn v1_and_v3_writes_and_their_precisions() {
    let s = Server::in_memory().await;
    let r = s
        .post("/write?db=main&precision=ms&rp=autogen", "m v=1 1000")
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = s.post("/write?db=main&precision=u", "m v=2 2000000").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // precision=auto (the v3 default) guesses from magnitude: seconds here.
    let r = s.post("/api/v3/write_lp?db=main", "m v=3 3").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let r = s
        .post(
            "/api/v3/write_lp?db=main&precision=nanosecond",
            "m v=4 4000000000",
        )
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let rows = s
        .json("/api/v3/query_sql?db=main&q=SELECT+v,time+FROM+m+ORDER+BY+time")
        .await;
    let times: Vec<&str> = rows
        .as_array()
        .expect("array")
        .iter()
        .filter_map(|r| r["time"].as_str())
        .collect();
    assert_eq!(
        times,
        [
            "1970-01-01T00:00:01Z",
            "1970-01-01T00:00:02Z",
            "1970-01-01T00:00:03Z",
            "1970-01-01T00:00:04Z"
        ]
    );
    for (path, expected) in [
        (
            "/write?db=main&precision=x",
            "invalid precision 'x': expected n, u, ms or s",
        ),
        (
            "/api/v2/write?bucket=main&precision=n",
            "expected ns, us, ms or s",
        ),
        (
            "/api/v3/write_lp?db=main&precision=s",
            "expected auto, nanosecond",
        ),
    ] {
        let r = s.post(path, "m v=1 1").await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{path}");
        let body = r.text().await.expect("body");
        assert!(body.contains(expected), "{path}: {body}");
    }
}

#[tokio::test]
async fn bad_lines_are_reported_in_each_dialect_shape() {
    let s = Server::in_memory().await;
    let body = "cpu,host=a usage=1 1\ncpu,host=b usage=oops 2\ncpu,host=c usage=3 3";

    // v1: atomic, {"error": …} naming the line.
    let r = s.post("/write?db=main&precision=s", body).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.expect("json");
    let msg = v["error"].as_str().expect("error string");
    assert!(
        msg.contains("unable to parse 'cpu,host=b usage=oops 2'"),
        "{msg}"
    );
    assert!(msg.contains("line 2, column 18"), "{msg}");

    // v2: atomic, {"code": "invalid", "message": …}.
    let r = s.post("/api/v2/write?bucket=main&precision=s", body).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["code"], "invalid");
    assert!(v["message"].as_str().expect("message").contains("line 2"));

    // Nothing was written by the atomic writes: the table does not even exist.
    let r = s
        .get("/api/v3/query_sql?db=main&q=SELECT+count(*)+AS+n+FROM+cpu")
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error"].as_str().expect("error").contains("not found"),
        "{v}"
    );

    // v3: accept_partial (the default): good lines stored, bad ones listed.
    let r = s
        .post("/api/v3/write_lp?db=main&precision=second", body)
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.headers().contains_key("x-rivulet-seq"));
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error"]
            .as_str()
            .expect("error")
            .starts_with("partial write")
    );
    assert_eq!(v["data"][0]["line_number"], 2);
    assert_eq!(v["data"][0]["original_line"], "cpu,host=b usage=oops 2");
    let rows = s
        .json("/api/v3/query_sql?db=main&q=SELECT+count(*)+AS+n+FROM+cpu")
        .await;
    assert_eq!(rows[0]["n"], 2);

    // v3 with accept_partial=false: atomic.
    let r = s
        .post(
            "/api/v3/write_lp?db=main&precision=second&accept_partial=false",
            "cpu,host=d usage=4 4\nbad",
        )
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"], "parsing failed for write_lp endpoint");
    assert_eq!(v["data"][0]["line_number"], 2);
    let rows = s
        .json("/api/v3/query_sql?db=main&q=SELECT+count(*)+AS+n+FROM+cpu")
        .await;
    assert_eq!(rows[0]["n"], 2);

    // A missing database parameter.
    let r = s.post("/write", "m v=1").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"], "database is required (parameter db)");
}

#[tokio::test]
async fn gzip_bodies_and_size_limits() {
    let db = Db::open_in_memory().expect("db");
    let s = Server::start(
        db,
        ServerConfig {
            max_body_bytes: 1000,
            ..ServerConfig::default()
        },
    )
    .await;
    let gz = |text: &str| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(text.as_bytes()).expect("gzip");
        e.finish().expect("gzip")
    };
    let r = s
        .client
        .post(s.url("/api/v2/write?bucket=main&precision=s"))
        .header("Content-Encoding", "gzip")
        .body(gz("m v=1 1\nm v=2 2"))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);

    // Too large as sent.
    let big = "m v=1 1\n".repeat(200);
    let r = s.post("/api/v2/write?bucket=main&precision=s", &big).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["message"]
            .as_str()
            .expect("message")
            .contains("limit of 1000 bytes")
    );

    // Small when compressed, too large once decompressed.
    let compressed = gz(&big);
    assert!(compressed.len() < 1000);
    let r = s
        .client
        .post(s.url("/write?db=main&precision=s"))
        .header("Content-Encoding", "gzip")
        .body(compressed)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);

    // Broken gzip and unknown encodings.
    let r = s
        .client
        .post(s.url("/write?db=main"))
        .header("Content-Encoding", "gzip")
        .body("not gzip")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = s
        .client
        .post(s.url("/write?db=main"))
        .header("Content-Encoding", "br")
        .body("m v=1")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
}

async fn text_of(s: &Server, path: &str) -> String {
    let r = s.get(path).await;
    assert_eq!(r.status(), StatusCode::OK, "{path}");
    r.text().await.expect("text")
}

#[tokio::test]
async fn query_formats() {
    let s = Server::in_memory().await;
    s.post(
        "/write?db=main&precision=s",
        "cpu,host=a usage=1.5 1\ncpu,host=b usage=2.5 2",
    )
    .await;
    let q = "/api/v3/query_sql?db=main&q=SELECT+host,usage+FROM+cpu+ORDER+BY+host";
    let text = |format: &'static str| {
        let url = s.url(&format!("{q}&format={format}"));
        let client = s.client.clone();
        async move {
            let r = client.get(url).send().await.expect("send");
            assert_eq!(r.status(), StatusCode::OK, "{format}");
            r.text().await.expect("text")
        }
    };
    assert_eq!(text("csv").await, "host,usage\na,1.5\nb,2.5\n");
    assert_eq!(
        text("jsonl").await,
        "{\"host\":\"a\",\"usage\":1.5}\n{\"host\":\"b\",\"usage\":2.5}\n"
    );
    assert!(text("pretty").await.contains("| a    | 1.5   |"));

    // Arrow IPC by Accept header, and Parquet: both decode to the same rows.
    let r = s
        .client
        .get(s.url(q))
        .header("Accept", "application/vnd.apache.arrow.stream")
        .send()
        .await
        .expect("send");
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/vnd.apache.arrow.stream")
    );
    let bytes = r.bytes().await.expect("bytes");
    let reader = arrow::ipc::reader::StreamReader::try_new(&bytes[..], None).expect("ipc");
    let rows: usize = reader.map(|b| b.expect("batch").num_rows()).sum();
    assert_eq!(rows, 2);
    let r = s
        .client
        .get(s.url(&format!("{q}&format=parquet")))
        .send()
        .await
        .expect("send");
    let bytes = r.bytes().await.expect("bytes");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(bytes, 1024)
        .expect("parquet");
    let rows: usize = reader.map(|b| b.expect("batch").num_rows()).sum();
    assert_eq!(rows, 2);

    // POST with a JSON body.
    let r = s
        .client
        .post(s.url("/api/v3/query_sql"))
        .json(&serde_json::json!({"db": "main", "q": "SELECT count(*) AS n FROM cpu"}))
        .send()
        .await
        .expect("send");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v, serde_json::json!([{"n": 2}]));

    // Empty results keep their schema: a CSV header, a valid Parquet file.
    assert_eq!(
        text_of(&s, &format!("{q}+LIMIT+0&format=csv")).await,
        "host,usage\n"
    );
    let r = s
        .client
        .get(s.url(&format!("{q}+LIMIT+0&format=parquet")))
        .send()
        .await
        .expect("send");
    let bytes = r.bytes().await.expect("bytes");
    let reader = parquet::arrow::arrow_reader::ParquetRecordBatchReader::try_new(bytes, 1024)
        .expect("an empty result is still a Parquet file");
    assert_eq!(
        reader.map(|b| b.expect("batch").num_rows()).sum::<usize>(),
        0
    );

    // An empty result is an empty array.
    let v = s
        .json("/api/v3/query_sql?db=main&q=SELECT+host+FROM+cpu+WHERE+usage+%3E+100")
        .await;
    assert_eq!(v, serde_json::json!([]));
}

#[tokio::test]
async fn the_query_endpoint_is_read_only() {
    let s = Server::in_memory().await;
    s.post("/write?db=main&precision=s", "cpu,host=a usage=1 1")
        .await;
    for (sql, expected) in [
        (
            "INSERT INTO cpu (host, usage, time) VALUES ('x', 1.0, now())",
            "DML not supported",
        ),
        ("CREATE TABLE t (x INT)", "DDL not supported"),
        ("SET datafusion.execution.batch_size = 1", "not supported"),
        (
            "COPY (SELECT 1) TO '/tmp/rivulet-copy-test.csv'",
            "not supported",
        ),
        (
            "EXPLAIN ANALYZE COPY (SELECT 1) TO '/tmp/rivulet-copy-test.csv'",
            "not supported",
        ),
        ("SELECT 1; SELECT 2", "single SQL statement"),
        ("SELEC 1", "SQL error"),
        ("SELECT * FROM nope", "not found"),
    ] {
        let r = s
            .client
            .get(s.url("/api/v3/query_sql"))
            .query(&[("db", "main"), ("q", sql)])
            .send()
            .await
            .expect("send");
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{sql}");
        let v: Value = r.json().await.expect("json");
        let msg = v["error"].as_str().expect("error");
        assert!(msg.contains(expected), "{sql}: {msg}");
    }
    assert!(!std::path::Path::new("/tmp/rivulet-copy-test.csv").exists());
    let r = s.get("/api/v3/query_sql?db=main").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);

    // The statement endpoint runs INSERT.
    let r = s
        .client
        .post(s.url("/api/v1/sql"))
        .json(&serde_json::json!({"db": "main", "q": "INSERT INTO cpu (host, usage, time) VALUES ('x', 5.0, '1970-01-01T00:00:09Z')"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v, serde_json::json!([{"count": 1}]));
    let rows = s
        .json("/api/v3/query_sql?db=main&q=SELECT+sum(usage)+AS+s+FROM+cpu")
        .await;
    assert_eq!(rows, serde_json::json!([{"s": 6.0}]));
}

#[tokio::test]
async fn health_and_ping() {
    let s = Server::in_memory().await;
    let v = s.json("/health").await;
    assert_eq!(v["status"], "pass");
    assert_eq!(v["version"], env!("CARGO_PKG_VERSION"));
    let r = s.get("/ping").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
}

#[tokio::test]
async fn graceful_shutdown_keeps_acknowledged_writes() {
    let dir = tempfile::tempdir().expect("tempdir");
    let db = Db::open(dir.path()).expect("db");
    let s = Server::start(db, ServerConfig::default()).await;
    let mut acked = 0;
    for i in 0..20 {
        let r = s
            .post(
                "/api/v2/write?bucket=main&precision=s",
                &format!("m,k=k{i} v={i} {i}"),
            )
            .await;
        if r.status() == StatusCode::NO_CONTENT {
            acked += 1;
        }
    }
    let db = s.stop().await;
    db.close().expect("close");
    let db = Db::open(dir.path()).expect("reopen");
    let batches = db.sql("SELECT count(*) FROM m").await.expect("count");
    let n = arrow::util::pretty::pretty_format_batches(&batches)
        .expect("fmt")
        .to_string();
    assert_eq!(acked, 20);
    assert!(n.contains("| 20       |"), "{n}");
}

#[tokio::test]
async fn tokens_scopes_and_databases() {
    let db = Db::open_in_memory().expect("db");
    let tokens = [
        "admin:admin-token-0123456789",
        "write:write-token-0123456789:main",
        "read:read-token-01234567890",
    ];
    let config = ServerConfig {
        auth: rivulet::server::Auth::new(
            tokens.iter().map(|t| t.parse().expect("token")).collect(),
        )
        .expect("auth"),
        ..ServerConfig::default()
    };
    let s = Server::start(db, config).await;
    let send = |method: reqwest::Method, path: &str, auth: Option<&str>, body: &str| {
        let mut r = s.client.request(method, s.url(path)).body(body.to_string());
        if let Some(a) = auth {
            r = r.header("Authorization", a);
        }
        r.send()
    };
    let write = "/api/v2/write?bucket=main&precision=s";
    let line = "m v=1 1";
    use reqwest::Method;
    let status = |r: reqwest::Response| r.status();

    // No token, a wrong token.
    assert_eq!(
        status(send(Method::POST, write, None, line).await.expect("send")),
        StatusCode::UNAUTHORIZED
    );
    assert_eq!(
        status(
            send(
                Method::POST,
                write,
                Some("Bearer nope-nope-nope-nope"),
                line
            )
            .await
            .expect("send")
        ),
        StatusCode::UNAUTHORIZED
    );
    // The write token writes to main (both header styles and the v1 `p` parameter)…
    assert_eq!(
        status(
            send(
                Method::POST,
                write,
                Some("Bearer write-token-0123456789"),
                line
            )
            .await
            .expect("send")
        ),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        status(
            send(
                Method::POST,
                write,
                Some("Token write-token-0123456789"),
                line
            )
            .await
            .expect("send")
        ),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        status(
            send(
                Method::POST,
                "/write?db=main&u=x&p=write-token-0123456789",
                None,
                line
            )
            .await
            .expect("send")
        ),
        StatusCode::NO_CONTENT
    );
    // …but not to another database, and it cannot read.
    let r = send(
        Method::POST,
        "/api/v2/write?bucket=other",
        Some("Bearer write-token-0123456789"),
        line,
    )
    .await
    .expect("send");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["message"], "this token may not write on database 'other'");
    let query = "/api/v3/query_sql?db=main&q=SELECT+count(*)+AS+n+FROM+m";
    assert_eq!(
        status(
            send(
                Method::GET,
                query,
                Some("Bearer write-token-0123456789"),
                ""
            )
            .await
            .expect("send")
        ),
        StatusCode::FORBIDDEN
    );
    // The read token reads but cannot write or run statements.
    let r = send(
        Method::GET,
        query,
        Some("Bearer read-token-01234567890"),
        "",
    )
    .await
    .expect("send");
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.expect("json");
    // Two points: the v1 write has no precision, so its `1` is one nanosecond.
    assert_eq!(v, serde_json::json!([{"n": 2}]));
    assert_eq!(
        status(
            send(
                Method::POST,
                write,
                Some("Bearer read-token-01234567890"),
                line
            )
            .await
            .expect("send")
        ),
        StatusCode::FORBIDDEN
    );
    let stmt = r#"{"db":"main","q":"SELECT 1"}"#;
    let r = s
        .client
        .post(s.url("/api/v1/sql"))
        .header("Authorization", "Bearer read-token-01234567890")
        .header("Content-Type", "application/json")
        .body(stmt)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = s
        .client
        .post(s.url("/api/v1/sql"))
        .header("Authorization", "Bearer admin-token-0123456789")
        .header("Content-Type", "application/json")
        .body(stmt)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::OK);
    // Health and ping need no token; metrics do.
    assert_eq!(
        status(send(Method::GET, "/health", None, "").await.expect("send")),
        StatusCode::OK
    );
    assert_eq!(
        status(send(Method::GET, "/ping", None, "").await.expect("send")),
        StatusCode::NO_CONTENT
    );
    assert_eq!(
        status(send(Method::GET, "/metrics", None, "").await.expect("send")),
        StatusCode::UNAUTHORIZED
    );
    let r = send(
        Method::GET,
        "/metrics",
        Some("Bearer read-token-01234567890"),
        "",
    )
    .await
    .expect("send");
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.expect("text");
    assert!(text.contains("rivulet_auth_failures_total "), "{text}");
    let failures: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("rivulet_auth_failures_total "))
        .and_then(|v| v.parse().ok())
        .expect("auth failures");
    assert_eq!(failures, 7);
}

#[tokio::test]
async fn metrics_count_writes_and_queries() {
    let s = Server::in_memory().await;
    s.post("/api/v2/write?bucket=main&precision=s", "m v=1 1\nm v=2 2")
        .await;
    s.post("/api/v2/write?bucket=main&precision=s", "m v=oops 3")
        .await;
    s.json("/api/v3/query_sql?db=main&q=SELECT+*+FROM+m").await;
    let text = s.get("/metrics").await.text().await.expect("text");
    for expected in [
        "rivulet_writes_total 1\n",
        "rivulet_write_rows_total 2\n",
        "rivulet_write_errors_total 1\n",
        "rivulet_queries_total 1\n",
        "rivulet_query_duration_seconds_count 1\n",
        "rivulet_buffer_rows 2\n",
        "rivulet_tables 1\n",
        "rivulet_last_sequence 1\n",
        "# TYPE rivulet_query_duration_seconds histogram\n",
        // In memory nothing is persisted: the hot-segment cache is empty, its limit the default.
        "rivulet_hot_cache_segments 0\n",
        "rivulet_hot_cache_limit_bytes 1073741824\n",
        "# TYPE rivulet_hot_cache_hits_total counter\n",
    ] {
        assert!(text.contains(expected), "missing {expected:?} in\n{text}");
    }
    // This request's connection at least (the client may pool more).
    let open: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("rivulet_http_open_connections "))
        .and_then(|v| v.parse().ok())
        .expect("open connections gauge");
    assert!(open >= 1);
}

#[tokio::test]
async fn slow_queries_are_cancelled_at_the_timeout() {
    let db = Db::open_in_memory().expect("db");
    let s = Server::start(
        db,
        ServerConfig {
            query_timeout: std::time::Duration::from_millis(200),
            ..ServerConfig::default()
        },
    )
    .await;
    let r = s
        .client
        .get(s.url("/api/v3/query_sql"))
        .query(&[("q", "SELECT count(*) FROM generate_series(1, 100000000000)")])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::GATEWAY_TIMEOUT);
    let v: Value = r.json().await.expect("json");
    assert!(
        v["error"]
            .as_str()
            .expect("error")
            .contains("limit of 0.2 s"),
        "{v}"
    );
}

async fn raw_exchange(addr: SocketAddr, request: &[u8], wait: std::time::Duration) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream.write_all(request).await.expect("write");
    let mut out = Vec::new();
    let _ = tokio::time::timeout(wait, stream.read_to_end(&mut out)).await;
    String::from_utf8_lossy(&out).into_owned()
}

async fn start_with_limits(
    limits: ConnectionLimits,
    config: ServerConfig,
) -> (SocketAddr, tokio::sync::oneshot::Sender<()>) {
    let db = Db::open_in_memory().expect("db");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (tx, rx) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(serve(listener, router(db, config), limits, async {
        let _ = rx.await;
    }));
    (addr, tx)
}

#[tokio::test]
async fn slow_or_oversized_request_heads_and_bodies_are_cut_off() {
    let limits = ConnectionLimits {
        header_read_timeout: std::time::Duration::from_millis(300),
        max_head_bytes: 8192,
        ..ConnectionLimits::default()
    };
    let config = ServerConfig {
        body_read_timeout: std::time::Duration::from_millis(300),
        max_line_bytes: 100,
        ..ServerConfig::default()
    };
    let (addr, _stop) = start_with_limits(limits, config).await;
    let started = std::time::Instant::now();
    // Slowloris: a head that never ends is dropped after the timeout.
    let _ = raw_exchange(
        addr,
        b"POST /write?db=main HTTP/1.1\r\nHost: 127.0.0.1\r\n",
        std::time::Duration::from_secs(10),
    )
    .await;
    assert!(
        started.elapsed() < std::time::Duration::from_secs(5),
        "slow head was not cut off"
    );
    // A head larger than the limit.
    let long_url = format!(
        "GET /api/v3/query_sql?q={} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "x".repeat(20_000)
    );
    let answer = raw_exchange(addr, long_url.as_bytes(), std::time::Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    // A body that stops arriving.
    let answer = raw_exchange(
        addr,
        b"POST /write?db=main HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100\r\n\r\nm v=1",
        std::time::Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    // A line over the line limit.
    let body = format!("m v=1 1\nm,t={} v=1 2\n", "y".repeat(200));
    let request = format!(
        "POST /write?db=main HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let answer = raw_exchange(addr, request.as_bytes(), std::time::Duration::from_secs(5)).await;
    assert!(answer.starts_with("HTTP/1.1 400"), "{answer}");
    assert!(
        answer.contains("line 2 is 210 bytes long; the limit is 100 bytes"),
        "{answer}"
    );
}

#[tokio::test]
async fn connections_past_the_cap_are_closed() {
    use tokio::io::AsyncReadExt;
    let limits = ConnectionLimits {
        max_connections: 1,
        ..ConnectionLimits::default()
    };
    let (addr, _stop) = start_with_limits(limits, ServerConfig::default()).await;
    let first = tokio::net::TcpStream::connect(addr).await.expect("connect");
    // Give the server a moment to accept the first connection.
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let mut second = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(std::time::Duration::from_secs(5), second.read(&mut buf))
        .await
        .expect("the second connection is closed, not left hanging")
        .unwrap_or(0);
    assert_eq!(n, 0);
    drop(first);
    tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    let answer = raw_exchange(
        addr,
        b"GET /ping HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        std::time::Duration::from_secs(5),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
}

#[tokio::test]
async fn large_results_stream_as_one_document() {
    let s = Server::in_memory().await;
    for chunk in 0..4 {
        let body: String = (0..5000)
            .map(|i| format!("big,k=k{} v={i} {}\n", i % 10, chunk * 5000 + i))
            .collect();
        let r = s.post("/write?db=main&precision=s", &body).await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
    let rows = s
        .json("/api/v3/query_sql?db=main&q=SELECT+k,v+FROM+big")
        .await;
    assert_eq!(rows.as_array().expect("one JSON array").len(), 20_000);
    let csv = text_of(
        &s,
        "/api/v3/query_sql?db=main&q=SELECT+k,v+FROM+big&format=csv",
    )
    .await;
    assert_eq!(csv.lines().count(), 20_001, "one header, then every row");
    assert_eq!(csv.lines().filter(|l| *l == "k,v").count(), 1);
    let r = s
        .client
        .get(s.url("/api/v3/query_sql?db=main&q=SELECT+k,v+FROM+big"))
        .header("Accept", "application/vnd.apache.arrow.stream")
        .send()
        .await
        .expect("send");
    let bytes = r.bytes().await.expect("bytes");
    let reader = arrow::ipc::reader::StreamReader::try_new(&bytes[..], None).expect("ipc");
    let batches: Vec<_> = reader.map(|b| b.expect("batch")).collect();
    assert!(batches.len() > 1, "several batches in one IPC stream");
    assert_eq!(batches.iter().map(|b| b.num_rows()).sum::<usize>(), 20_000);
}

#[tokio::test]
async fn a_token_limited_to_databases_cannot_reach_others_through_sql() {
    let db = Db::open_in_memory().expect("db");
    db.write_lines("other", "secret v=42 1", rivulet::Precision::Second)
        .expect("seed other");
    db.write_lines("main", "m v=1 1", rivulet::Precision::Second)
        .expect("seed main");
    for (database, sql) in [
        (
            "main",
            "CREATE MATERIALIZED VIEW main_view AS SELECT count(*) AS n FROM m",
        ),
        (
            "other",
            "CREATE MATERIALIZED VIEW other_view AS SELECT max(v) AS top FROM secret",
        ),
    ] {
        db.sql_in(database, sql).await.expect(sql);
    }
    // A database named like Rivulet's own schemas cannot be created, nor listed in a token.
    let e = db
        .write_lines("system", "views v=1 1", rivulet::Precision::Second)
        .expect_err("reserved");
    assert!(e.to_string().contains("reserved"), "{e}");
    let e = "read:system-reader-0123456789:main,system"
        .parse::<rivulet::server::Token>()
        .expect_err("reserved");
    assert!(e.contains("reserved"), "{e}");
    let config = ServerConfig {
        auth: rivulet::server::Auth::new(vec![
            "read:main-reader-0123456789:main".parse().expect("token"),
            "admin:main-admin-0123456789:main".parse().expect("token"),
        ])
        .expect("auth"),
        ..ServerConfig::default()
    };
    let s = Server::start(db, config).await;
    let query = |sql: &'static str| {
        s.client
            .get(s.url("/api/v3/query_sql"))
            .query(&[("db", "main"), ("q", sql)])
            .header("Authorization", "Bearer main-reader-0123456789")
            .send()
    };
    let ok = query("SELECT v FROM m").await.expect("send");
    assert_eq!(ok.status(), StatusCode::OK);
    for sql in [
        "SELECT v FROM other.secret",
        "SELECT v FROM rivulet.other.secret",
        "SELECT * FROM m WHERE v IN (SELECT v FROM other.secret)",
        // DESCRIBE plans no table scan: the scoped catalog refuses it while planning.
        "DESCRIBE other.secret",
        "SELECT * FROM information_schema.columns WHERE table_schema = 'other'",
    ] {
        let r = query(sql).await.expect("send");
        let status = r.status();
        let text = r.text().await.expect("text");
        // information_schema of a scoped reader lists only its databases: nothing of `other`.
        if sql.contains("information_schema") {
            assert_eq!((status, text.as_str()), (StatusCode::OK, "[]"), "{sql}");
        } else {
            assert_eq!(status, StatusCode::FORBIDDEN, "{sql}: {text}");
            assert!(
                text.contains("may not use database 'other'"),
                "{sql}: {text}"
            );
        }
    }
    let tables = query("SELECT table_schema, table_name FROM information_schema.tables WHERE table_schema NOT IN ('information_schema')")
        .await
        .expect("send")
        .text()
        .await
        .expect("text");
    assert!(
        tables.contains(r#""table_name":"m""#) && !tables.contains("secret"),
        "{tables}"
    );
    // system.views holds only the views of the token's databases.
    let r = query("SELECT database, name FROM system.views")
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::OK);
    let views = r.text().await.expect("text");
    assert!(
        views.contains("main_view") && !views.contains("other_view"),
        "{views}"
    );
    // So do system.tables and system.segments: main's table m, nothing of other.
    for sql in [
        "SELECT database, table_name FROM system.tables",
        "SELECT database, table_name FROM system.segments",
        "SELECT database, query FROM system.subscriptions",
    ] {
        let r = query(sql).await.expect("send");
        assert_eq!(r.status(), StatusCode::OK, "{sql}");
        let text = r.text().await.expect("text");
        assert!(
            !text.contains("other") && !text.contains("secret"),
            "{sql}: {text}"
        );
        if sql.contains("system.tables") {
            assert!(text.contains(r#""table_name":"m""#), "{sql}: {text}");
        }
    }
    // Rivulet's own tables are not readable through last_cache either.
    let r = query("SELECT * FROM last_cache('__rivulet_views')")
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    // Nor can an admin token limited to main insert elsewhere.
    let r = s
        .client
        .post(s.url("/api/v1/sql"))
        .header("Authorization", "Bearer main-admin-0123456789")
        .json(&serde_json::json!({"db": "main", "q": "INSERT INTO other.secret (v, time) VALUES (1.0, now())"}))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Metrics span every database.
    let r = s
        .client
        .get(s.url("/metrics"))
        .header("Authorization", "Bearer main-reader-0123456789")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
}

#[tokio::test]
async fn multi_member_gzip_and_all_bad_partial_writes() {
    let s = Server::in_memory().await;
    let gz = |text: &str| {
        let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        e.write_all(text.as_bytes()).expect("gzip");
        e.finish().expect("gzip")
    };
    // Two gzip members back to back (`cat a.gz b.gz`): both are read.
    let mut body = gz("m v=1 1\n");
    body.extend(gz("m v=2 2\n"));
    let r = s
        .client
        .post(s.url("/api/v2/write?bucket=main&precision=s"))
        .header("Content-Encoding", "gzip")
        .body(body)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let rows = s
        .json("/api/v3/query_sql?db=main&q=SELECT+count(*)+AS+n+FROM+m")
        .await;
    assert_eq!(rows, serde_json::json!([{"n": 2}]));
    // accept_partial with every line bad is a parse failure, without a sequence.
    let r = s.post("/api/v3/write_lp?db=main", "bad\nworse").await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(!r.headers().contains_key("x-rivulet-seq"));
    let v: Value = r.json().await.expect("json");
    assert_eq!(v["error"], "parsing failed for write_lp endpoint");
}

#[tokio::test]
async fn materialized_views_over_http() {
    let s = Server::in_memory().await;
    s.post(
        "/write?db=main&precision=s",
        "cpu,host=a usage=1 0\ncpu,host=a usage=3 30\ncpu,host=b usage=5 10",
    )
    .await;
    let statement = |q: &str| {
        s.client
            .post(s.url("/api/v1/sql"))
            .json(&serde_json::json!({"db": "main", "q": q}))
            .send()
    };
    let r = statement(
        "CREATE MATERIALIZED VIEW cpu_1m AS SELECT date_bin(INTERVAL '1 minute', time) AS time, \
         host, avg(usage) AS avg_usage, count(*) AS n FROM cpu GROUP BY 1, 2",
    )
    .await
    .expect("send");
    assert_eq!(r.status(), StatusCode::OK);
    let v: Value = r.json().await.expect("json");
    assert_eq!(
        v,
        serde_json::json!([{"view": "cpu_1m", "strategy": "aggregate-state", "status": "backfilling"}])
    );
    // A write acknowledged before a query is in the view the query reads.
    s.post("/write?db=main&precision=s", "cpu,host=a usage=5 40")
        .await;
    let rows = s
        .json("/api/v3/query_sql?db=main&q=SELECT+host,+avg_usage,+n+FROM+cpu_1m+ORDER+BY+host")
        .await;
    assert_eq!(
        rows,
        serde_json::json!([{"host": "a", "avg_usage": 3.0, "n": 3}, {"host": "b", "avg_usage": 5.0, "n": 1}])
    );
    // Writes to a view are refused; statements need the statement endpoint.
    let r = s
        .post("/write?db=main&precision=s", "cpu_1m,host=a n=1i 0")
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = s
        .client
        .get(s.url("/api/v3/query_sql"))
        .query(&[("db", "main"), ("q", "DROP MATERIALIZED VIEW cpu_1m")])
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = statement("CREATE MATERIALIZED VIEW cpu_1m AS SELECT time, host, usage FROM cpu")
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::CONFLICT);
    let r = statement("CREATE MATERIALIZED VIEW bad AS SELECT * FROM nope")
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let r = statement("CHECK MATERIALIZED VIEW cpu_1m")
        .await
        .expect("send");
    let v: Value = r.json().await.expect("json");
    assert_eq!(v[0]["status"], "ok");
    let r = statement("DROP MATERIALIZED VIEW nope")
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    let rows = s
        .json("/api/v3/query_sql?db=main&q=SHOW+MATERIALIZED+VIEWS&format=json")
        .await;
    assert_eq!(rows[0]["name"], "cpu_1m");
    let r = statement("DROP MATERIALIZED VIEW cpu_1m")
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::OK);
}

/// Sends `body` to `path` as a browser on `origin` would (no preflight: `text/plain`).
async fn browser_post(
    s: &Server,
    path: &str,
    origin: Option<&str>,
    content_type: &str,
    body: &str,
) -> reqwest::Response {
    let mut r = s
        .client
        .post(s.url(path))
        .header("content-type", content_type)
        .body(body.to_string());
    if let Some(origin) = origin {
        r = r.header("origin", origin);
    }
    r.send().await.expect("send")
}

#[tokio::test]
async fn pages_on_other_origins_cannot_write_run_statements_or_open_websockets() {
    let s = Server::in_memory_with(ServerConfig {
        cors_origins: vec!["https://dash.example.com".to_string()],
        ..ServerConfig::default()
    })
    .await;
    let insert = r#"{"db":"main","q":"INSERT INTO cpu (host, usage, time) VALUES ('x', 5.0, '1970-01-01T00:00:09Z')"}"#;
    // Clients that are not browsers send none of the headers below and are unaffected.
    let r = browser_post(
        &s,
        "/api/v2/write?bucket=main",
        None,
        "text/plain",
        "cpu,host=a usage=3 3",
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    // A page on another site: a text/plain POST needs no preflight, so only the server stops it.
    let r = browser_post(
        &s,
        "/api/v1/sql",
        Some("http://evil.example"),
        "text/plain",
        insert,
    )
    .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let text = r.text().await.expect("text");
    assert!(
        text.contains("evil.example") && text.contains("--cors-origin"),
        "{text}"
    );
    let r = browser_post(
        &s,
        "/api/v2/write?bucket=main",
        Some("http://evil.example"),
        "text/plain",
        "cpu usage=1 1",
    )
    .await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Without an Origin but marked cross-site by the browser.
    let r = s
        .client
        .post(s.url("/api/v2/write?bucket=main"))
        .header("sec-fetch-site", "cross-site")
        .body("cpu usage=1 1")
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // A JSON endpoint takes JSON only: a text/plain body is refused even from a local client.
    let r = browser_post(&s, "/api/v1/sql", None, "text/plain", insert).await;
    assert_eq!(r.status(), StatusCode::UNSUPPORTED_MEDIA_TYPE);
    // DNS rebinding: a page whose name was re-pointed at 127.0.0.1 sends that name as Host.
    let r = s
        .client
        .get(s.url("/api/v3/query_sql?db=main&q=SELECT+1"))
        .header("host", format!("evil.example:{}", s.addr.port()))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    // Nothing above reached the database.
    let count = "/api/v3/query_sql?db=main&q=SELECT+count(*)+AS+n+FROM+cpu";
    assert_eq!(s.json(count).await, serde_json::json!([{"n": 1}]));

    // The WebSocket handshake from another origin is refused; from the allowed one it opens.
    let ws = |origin: &'static str| {
        let url = format!("ws://{}/api/v1/ws", s.addr);
        async move {
            use tokio_tungstenite::tungstenite::client::IntoClientRequest;
            let mut request = url.into_client_request().expect("request");
            request
                .headers_mut()
                .insert("origin", origin.parse().expect("header"));
            tokio_tungstenite::connect_async(request).await
        }
    };
    match ws("http://evil.example").await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 403),
        other => panic!(
            "a foreign origin's upgrade must be refused: {:?}",
            other.map(|(_, r)| r.status())
        ),
    }
    assert!(
        ws("https://dash.example.com").await.is_ok(),
        "an allowed origin opens"
    );

    // The server's own origin and an allowed one write and run statements.
    let own = format!("http://{}", s.addr);
    let r = browser_post(&s, "/api/v1/sql", Some(&own), "application/json", insert).await;
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "{}",
        r.text().await.unwrap_or_default()
    );
    let r = browser_post(
        &s,
        "/api/v2/write?bucket=main",
        Some("https://DASH.example.com/"),
        "text/plain",
        "cpu usage=2 2",
    )
    .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(s.json(count).await, serde_json::json!([{"n": 3}]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn results_held_whole_are_bounded_and_streamed_ones_are_not() {
    // format=pretty and parquet, /api/v1/sql and a long-poll snapshot hold the whole result:
    // past --max-result-bytes they fail with a 400 naming it, while streamed formats send any
    // size.
    let s = Server::in_memory_with(ServerConfig {
        max_result_bytes: 64 << 10,
        ..ServerConfig::default()
    })
    .await;
    let mut lines = String::new();
    for i in 0..20_000 {
        lines.push_str(&format!("cpu,host=h{} usage={i} {i}\n", i % 7));
    }
    assert!(
        s.post("/api/v3/write_lp?db=main", &lines)
            .await
            .status()
            .is_success()
    );
    let all = "SELECT+*+FROM+cpu";
    for format in ["pretty", "parquet"] {
        let r = s
            .get(&format!(
                "/api/v3/query_sql?db=main&q={all}&format={format}"
            ))
            .await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{format}");
        let body = r.text().await.expect("body");
        assert!(body.contains("--max-result-bytes"), "{format}: {body}");
        // A small result in the same format is fine.
        let r = s
            .get(&format!(
                "/api/v3/query_sql?db=main&q=SELECT+count(*)+FROM+cpu&format={format}"
            ))
            .await;
        assert_eq!(r.status(), StatusCode::OK, "{format}");
    }
    let r = s
        .get(&format!("/api/v3/query_sql?db=main&q={all}&format=jsonl"))
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    let text = r.text().await.expect("body");
    assert_eq!(text.lines().count(), 20_000);
    let r = s
        .client
        .post(s.url("/api/v1/sql"))
        .header("Content-Type", "application/json")
        .body(r#"{"db":"main","q":"SELECT * FROM cpu"}"#)
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert!(r.text().await.expect("body").contains("--max-result-bytes"));
    let r = s
        .get(&format!("/api/v1/changes?db=main&wait_ms=1&q={all}"))
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body = r.text().await.expect("body");
    assert!(
        body.contains("--max-result-bytes") && body.contains("SSE"),
        "{body}"
    );
    s.stop().await.close().expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_stops_reading_a_streamed_result_gives_its_permit_back() {
    use tokio::io::AsyncWriteExt;
    // One request at a time. The first client asks for a large streamed result and reads
    // none of it: once the socket buffers are full, the write timeout closes its connection,
    // which ends its query and frees the permit for the next client.
    let limits = ConnectionLimits {
        write_timeout: std::time::Duration::from_millis(500),
        ..ConnectionLimits::default()
    };
    let config = ServerConfig {
        max_concurrent_requests: 1,
        ..ServerConfig::default()
    };
    let (addr, _stop) = start_with_limits(limits, config).await;
    let mut stalled = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stalled
        .write_all(
            b"GET /api/v3/query_sql?q=SELECT+value,+value+*+2+AS+twice+FROM+generate_series(1,+200000000)&format=jsonl HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        )
        .await
        .expect("write");
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/api/v3/query_sql?q=SELECT+1&format=json");
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(60);
    let mut saw_busy = false;
    loop {
        let status = client.get(&url).send().await.expect("send").status();
        if status == StatusCode::OK {
            break;
        }
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        saw_busy = true;
        assert!(
            std::time::Instant::now() < deadline,
            "the stalled reader still holds the only permit"
        );
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(saw_busy, "the stalled request never held the permit");
    drop(stalled);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_a_self_signed_certificate() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio_rustls::rustls;
    use tokio_rustls::rustls::pki_types::pem::PemObject;
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tls");
    let (cert, key) = (fixtures.join("cert.pem"), fixtures.join("key.pem"));
    // Bad files are start-up errors naming the file.
    let e = rivulet::server::Tls::from_pem_files(&fixtures.join("missing.pem"), &key)
        .expect_err("no such file");
    assert!(e.contains("missing.pem"), "{e}");
    let e = rivulet::server::Tls::from_pem_files(&cert, &cert).expect_err("a certificate as key");
    assert!(e.contains("TLS key") && e.contains("cert.pem"), "{e}");
    let tls = rivulet::server::Tls::from_pem_files(&cert, &key).expect("tls");

    let db = Db::open_in_memory().expect("db");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    tokio::spawn(rivulet::server::serve_with(
        listener,
        router(db, ServerConfig::default()),
        ConnectionLimits::default(),
        Some(tls),
        async {
            let _ = stopped.await;
        },
    ));
    // A client that trusts only the test certificate.
    let mut roots = rustls::RootCertStore::empty();
    for c in rustls::pki_types::CertificateDer::pem_file_iter(&cert).expect("pem") {
        roots.add(c.expect("cert")).expect("root");
    }
    let config = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(std::sync::Arc::new(config));
    let exchange = |request: String| {
        let connector = connector.clone();
        async move {
            let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
            let name = rustls::pki_types::ServerName::try_from("localhost").expect("name");
            let mut tls = connector.connect(name, tcp).await.expect("handshake");
            tls.write_all(request.as_bytes()).await.expect("write");
            let mut out = Vec::new();
            let _ = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                tls.read_to_end(&mut out),
            )
            .await;
            String::from_utf8_lossy(&out).into_owned()
        }
    };
    let body = "cpu,host=a usage=42 1700000000";
    let answer = exchange(format!(
        "POST /api/v3/write_lp?db=main&precision=second HTTP/1.1\r\nHost: localhost\r\n\
         Connection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    ))
    .await;
    assert!(answer.starts_with("HTTP/1.1 204"), "{answer}");
    let answer = exchange(
        "GET /api/v3/query_sql?db=main&q=SELECT+usage+FROM+cpu&format=jsonl HTTP/1.1\r\n\
         Host: localhost\r\nConnection: close\r\n\r\n"
            .to_string(),
    )
    .await;
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    assert!(answer.contains("\"usage\":42"), "{answer}");
    // Plain HTTP on the TLS port gets no HTTP answer.
    let answer = raw_exchange(
        addr,
        b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        std::time::Duration::from_secs(5),
    )
    .await;
    assert!(!answer.contains("200 OK"), "{answer}");
    let _ = stop.send(());
}

/// SQL-shaped noise: keywords, names, literals and punctuation in any order.
fn sql_noise() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let token = prop_oneof![
        Just("SELECT"),
        Just("FROM"),
        Just("WHERE"),
        Just("GROUP BY"),
        Just("ORDER BY"),
        Just("LIMIT"),
        Just("JOIN"),
        Just("ON"),
        Just("UNION ALL"),
        Just("INSERT INTO"),
        Just("VALUES"),
        Just("CREATE MATERIALIZED VIEW"),
        Just("DROP MATERIALIZED VIEW"),
        Just("AS"),
        Just("COPY"),
        Just("TO"),
        Just("EXPLAIN"),
        Just("DESCRIBE"),
        Just("SHOW"),
        Just("cpu"),
        Just("host"),
        Just("usage"),
        Just("time"),
        Just("main.cpu"),
        Just("system.views"),
        Just("information_schema.tables"),
        Just("generate_series(1, 3)"),
        Just("date_bin(INTERVAL '1 hour', time)"),
        Just("count(*)"),
        Just("avg(usage)"),
        Just("*"),
        Just(","),
        Just("("),
        Just(")"),
        Just("'x'"),
        Just("\"q\""),
        Just("1"),
        Just("-1"),
        Just("1e308"),
        Just("NULL"),
        Just("="),
        Just("<"),
        Just("+"),
        Just("/"),
        Just("0"),
        Just(";"),
        Just("--"),
        Just("'"),
        Just("now()"),
        Just("CAST(1 AS TIMESTAMP)"),
        Just("__rivulet_views"),
        Just("\"__rivulet_sub_00\""),
        Just("last_cache('cpu')"),
    ];
    proptest::collection::vec(token, 1..14).prop_map(|t| t.join(" "))
}

#[test]
fn noise_on_the_statement_endpoint_never_gets_a_500_or_takes_the_server_down() {
    use proptest::prelude::*;
    let rt = crate::common::rt();
    let s = rt.block_on(Server::in_memory());
    assert!(
        rt.block_on(s.post(
            "/api/v3/write_lp?db=main",
            "cpu,host=a usage=1 1\ncpu,host=b usage=2 2"
        ))
        .status()
        .is_success()
    );
    let cases = std::env::var("RIVULET_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(256);
    let mut runner = proptest::test_runner::TestRunner::new(ProptestConfig {
        cases,
        ..ProptestConfig::default()
    });
    runner
        .run(&sql_noise(), |sql| {
            let status = rt.block_on(async {
                s.client
                    .post(s.url("/api/v1/sql"))
                    .header("Content-Type", "application/json")
                    .body(serde_json::json!({ "db": "main", "q": sql }).to_string())
                    .send()
                    .await
                    .map(|r| r.status())
            });
            let status = status.map_err(|e| TestCaseError::fail(format!("{sql}: {e}")))?;
            prop_assert!(
                status != StatusCode::INTERNAL_SERVER_ERROR,
                "{sql}: {status}"
            );
            Ok(())
        })
        .expect("statement noise");
    // Still serving, the data intact (an INSERT among the noise may have added rows).
    let r = rt.block_on(s.json("/api/v3/query_sql?db=main&q=SELECT+count(*)+AS+n+FROM+cpu"));
    assert!(r[0]["n"].as_u64().is_some_and(|n| n >= 2), "{r}");
    rt.block_on(s.stop()).close().expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_repeated_and_huge_parameters_and_bytes_that_are_not_utf8_get_a_4xx() {
    // Catalogue rows 11 and 16, over the wire: each gets a client error naming the problem,
    // and the server keeps serving.
    let s = Server::in_memory().await;
    assert!(
        s.post("/api/v3/write_lp?db=main", "m v=1 1")
            .await
            .status()
            .is_success()
    );
    for (path, want) in [
        ("/api/v3/query_sql?db=main&db=other&q=SELECT+1", "db"),
        ("/api/v3/query_sql?db=main&q=SELECT+1&q=SELECT+2", "q"),
        ("/api/v3/query_sql?db=main&q=SELECT+1&format=xml", "format"),
        ("/api/v3/query_sql?db=main&q=", "q"),
        // Decoded lossily (U+FFFD), so it is a SQL syntax error at column 1.
        ("/api/v3/query_sql?db=main&q=%FF%FE", "Column: 1"),
        ("/api/v1/changes?db=main&q=SELECT+*+FROM+m&queue=0", "queue"),
        (
            "/api/v1/changes?db=main&q=SELECT+*+FROM+m&since=-1",
            "since",
        ),
        (
            "/api/v1/changes?db=main&q=SELECT+*+FROM+m&wait_ms=soon",
            "wait_ms",
        ),
    ] {
        let r = s.get(path).await;
        let status = r.status();
        let body = r.text().await.expect("body");
        assert!(status.is_client_error(), "{path}: {status} {body}");
        assert!(
            body.to_lowercase().contains(&want.to_lowercase()),
            "{path}: {body}"
        );
    }
    for (path, body, want) in [
        (
            "/api/v3/write_lp?db=main&precision=parsec",
            b"m v=1 1".to_vec(),
            "precision",
        ),
        ("/api/v3/write_lp?db=main&db=x", b"m v=1 1".to_vec(), "db"),
        (
            "/api/v3/write_lp?db=main",
            vec![b'm', b' ', b'v', b'=', 0xff, 0xfe, b'1'],
            "UTF-8",
        ),
        (
            "/api/v3/write_lp?db=main",
            b"m\0 v=1 1".to_vec(),
            "control character",
        ),
        (
            "/api/v3/write_lp?db=ma%00in",
            b"m v=1 1".to_vec(),
            "database",
        ),
    ] {
        let r = s
            .client
            .post(s.url(path))
            .body(body)
            .send()
            .await
            .expect("send");
        let status = r.status();
        let text = r.text().await.expect("body");
        assert!(status.is_client_error(), "{path}: {status} {text}");
        assert!(
            text.to_lowercase().contains(&want.to_lowercase()),
            "{path}: {text}"
        );
    }
    // A 100 KB URL: 414 URI Too Long, or 431 when the head outgrows the read buffer first (the
    // HTTP/1-or-2 connection reads the first bytes to tell them apart); sent raw: HTTP clients
    // refuse to build it.
    let long = format!(
        "GET /api/v3/query_sql?db=main&q={} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        "x".repeat(100 << 10)
    );
    let answer = raw_exchange(s.addr, long.as_bytes(), std::time::Duration::from_secs(5)).await;
    assert!(
        answer.starts_with("HTTP/1.1 414") || answer.starts_with("HTTP/1.1 431"),
        "{}",
        &answer[..answer.len().min(200)]
    );
    assert_eq!(s.get("/health").await.status(), StatusCode::OK);
    s.stop().await.close().expect("close");
}
