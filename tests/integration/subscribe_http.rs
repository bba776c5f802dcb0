//! Subscriptions over HTTP against a real server with real clients: Server-Sent Events
//! (reqwest, parsed as an EventSource does), WebSocket (tokio-tungstenite), long-poll; resume
//! with `Last-Event-ID`; auth scopes; 1000 concurrent SSE subscribers.

use std::time::Duration;

use futures::{SinkExt, StreamExt};
use rivulet::server::{Auth, ServerConfig};
use rivulet::{Db, Precision};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message;

use crate::common::Server;

/// One Server-Sent Event.
#[derive(Debug, Clone, Default)]
struct Sse {
    id: Option<String>,
    event: String,
    data: Value,
}

/// Reads events from a `text/event-stream` response, as an `EventSource` does.
struct SseReader {
    response: reqwest::Response,
    buffer: String,
}

impl SseReader {
    async fn open(client: &reqwest::Client, url: &str, last_event_id: Option<u64>) -> SseReader {
        let mut request = client.get(url).header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.send().await.expect("request");
        assert_eq!(response.status(), 200, "GET {url}");
        assert_eq!(
            response.headers()["content-type"],
            "text/event-stream",
            "content type"
        );
        SseReader {
            response,
            buffer: String::new(),
        }
    }

    async fn next(&mut self) -> Sse {
        loop {
            if let Some(end) = self.buffer.find("\n\n") {
                let block: String = self.buffer.drain(..end + 2).collect();
                let mut e = Sse::default();
                let mut data = String::new();
                for line in block.lines() {
                    if let Some(v) = line.strip_prefix("id:") {
                        e.id = Some(v.trim().to_string());
                    } else if let Some(v) = line.strip_prefix("event:") {
                        e.event = v.trim().to_string();
                    } else if let Some(v) = line.strip_prefix("data:") {
                        data.push_str(v.trim_start());
                    }
                }
                if data.is_empty() {
                    continue; // a comment or keep-alive
                }
                e.data = serde_json::from_str(&data).expect("data is JSON");
                return e;
            }
            let chunk = tokio::time::timeout(Duration::from_secs(30), self.response.chunk())
                .await
                .expect("an event within 30 s")
                .expect("read")
                .expect("the stream goes on");
            self.buffer
                .push_str(std::str::from_utf8(&chunk).expect("utf-8"));
        }
    }

    /// Skips progress events.
    async fn next_data(&mut self) -> Sse {
        loop {
            let e = self.next().await;
            if e.event != "progress" {
                return e;
            }
        }
    }
}

fn write(db: &Db, lines: &str) -> u64 {
    db.write_lines("main", lines, Precision::Nanosecond)
        .expect("write")
        .seq
}

fn encode(q: &str) -> String {
    q.replace(' ', "+")
        .replace('\'', "%27")
        .replace('>', "%3E")
        .replace('=', "%3D")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sse_snapshot_changes_and_resume_with_last_event_id() {
    let server = Server::in_memory_with(ServerConfig::default()).await;
    write(&server.db, "cpu,hostname=h1 usage_user=50 0");
    server
        .db
        .sql(
            "CREATE MATERIALIZED VIEW cpu_1m AS SELECT date_bin(INTERVAL '1 minute', time) AS time, \
             hostname, avg(usage_user) AS avg_user, count(*) AS n FROM cpu GROUP BY 1, 2",
        )
        .await
        .expect("create");
    let client = reqwest::Client::new();
    let url = server.url(&format!(
        "/api/v1/subscribe?db=main&q={}&progress_ms=100",
        encode("SELECT * FROM cpu_1m")
    ));
    let mut events = SseReader::open(&client, &url, None).await;
    let snapshot = events.next_data().await;
    assert_eq!(snapshot.event, "snapshot");
    assert_eq!(snapshot.data["first"], true);
    assert_eq!(snapshot.data["last"], true);
    assert_eq!(snapshot.data["changes"][0]["op"], "upsert");
    assert_eq!(snapshot.data["changes"][0]["final"], false);
    assert_eq!(snapshot.data["changes"][0]["row"]["hostname"], "h1");
    assert_eq!(snapshot.data["changes"][0]["row"]["n"], 1);
    assert!(snapshot.id.is_some(), "the last snapshot part has an id");

    // A write over HTTP: its change arrives, with the write's sequence reflected.
    let r = client
        .post(server.url("/api/v3/write_lp?db=main&precision=nanosecond"))
        .body("cpu,hostname=h1 usage_user=100 1000")
        .send()
        .await
        .expect("write");
    assert_eq!(r.status(), 204);
    let change = events.next_data().await;
    assert_eq!(change.event, "change", "{change:?}");
    let row = &change.data["changes"][0];
    assert_eq!(row["op"], "upsert");
    assert_eq!(row["row"]["avg_user"], 75.0);
    assert_eq!(row["row"]["n"], 2);
    let seen: u64 = change.id.as_deref().expect("id").parse().expect("number");
    assert_eq!(change.data["seq"], seen);
    drop(events);

    // Missed while disconnected; the reconnect sends Last-Event-ID.
    write(&server.db, "cpu,hostname=h2 usage_user=10 0");
    server.db.sync_views().expect("sync");
    let mut events = SseReader::open(&client, &url, Some(seen)).await;
    let change = events.next_data().await;
    assert_eq!(change.event, "change", "no snapshot on resume: {change:?}");
    assert_eq!(change.data["changes"].as_array().map(Vec::len), Some(1));
    assert_eq!(change.data["changes"][0]["row"]["hostname"], "h2");
    // Progress events carry the position when nothing changes.
    let progress = events.next().await;
    assert_eq!(progress.event, "progress");
    assert!(progress.data["seq"].as_u64() >= change.data["seq"].as_u64());

    // Errors before the stream starts are plain HTTP errors.
    let r = client
        .get(server.url(&format!(
            "/api/v1/subscribe?q={}",
            encode("SELECT * FROM cpu ORDER BY time")
        )))
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 400);
    let body: Value = r.json().await.expect("json");
    assert!(body.to_string().contains("ORDER BY"), "{body}");
    drop(events);
    server.stop().await.close().expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_many_subscriptions_per_connection_json_and_arrow() {
    let server = Server::in_memory_with(ServerConfig::default()).await;
    write(&server.db, "cpu,host=a usage=95 0\ncpu,host=b usage=5 0");
    let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/api/v1/ws", server.addr))
        .await
        .expect("connect");
    async fn recv(
        ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
    ) -> Message {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
                .await
                .expect("a frame within 30 s")
                .expect("open")
                .expect("frame");
            if let Message::Text(t) = &m
                && t.contains("\"type\":\"progress\"")
            {
                continue;
            }
            return m;
        }
    }
    fn json(m: Message) -> Value {
        match m {
            Message::Text(t) => serde_json::from_str(&t).expect("json"),
            other => panic!("expected a text frame: {other:?}"),
        }
    }
    let subscribe = serde_json::json!({
        "op": "subscribe", "id": "hot", "db": "main",
        "q": "SELECT time, host, usage FROM cpu WHERE usage > 90",
    });
    ws.send(Message::Text(subscribe.to_string().into()))
        .await
        .expect("send");
    let ack = json(recv(&mut ws).await);
    assert_eq!(ack["type"], "subscribed");
    assert_eq!(ack["columns"], serde_json::json!(["time", "host", "usage"]));
    let snapshot = json(recv(&mut ws).await);
    assert_eq!(snapshot["type"], "snapshot");
    assert_eq!(snapshot["id"], "hot");
    assert_eq!(snapshot["changes"].as_array().map(Vec::len), Some(1));

    // A second subscription on the same connection, as Arrow IPC frames.
    let subscribe = serde_json::json!({
        "op": "subscribe", "id": "all", "q": "SELECT * FROM cpu", "format": "arrow",
        "snapshot": false,
    });
    ws.send(Message::Text(subscribe.to_string().into()))
        .await
        .expect("send");
    assert_eq!(json(recv(&mut ws).await)["type"], "subscribed");
    write(&server.db, "cpu,host=c usage=99 1");
    let mut got_hot = false;
    let mut got_all = false;
    while !(got_hot && got_all) {
        match recv(&mut ws).await {
            Message::Text(t) => {
                let v: Value = serde_json::from_str(&t).expect("json");
                assert_eq!(v["type"], "change", "{v}");
                assert_eq!(v["id"], "hot");
                assert_eq!(v["changes"][0]["op"], "insert");
                assert_eq!(v["changes"][0]["row"]["host"], "c");
                got_hot = true;
            }
            Message::Binary(b) => {
                let reader = arrow::ipc::reader::StreamReader::try_new(
                    std::io::Cursor::new(b.to_vec()),
                    None,
                )
                .expect("arrow ipc");
                let meta = reader.schema().metadata().clone();
                assert_eq!(meta["id"], "all");
                assert_eq!(meta["type"], "change");
                let batches: Vec<_> = reader.map(|b| b.expect("batch")).collect();
                assert_eq!(batches[0].num_rows(), 1);
                assert!(batches[0].column_by_name("__op").is_some());
                got_all = true;
            }
            other => panic!("unexpected frame {other:?}"),
        }
    }

    // Unsubscribe one: the other goes on.
    ws.send(Message::Text(
        serde_json::json!({"op": "unsubscribe", "id": "all"})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    assert_eq!(json(recv(&mut ws).await)["type"], "unsubscribed");
    write(&server.db, "cpu,host=d usage=97 2");
    let v = json(recv(&mut ws).await);
    assert_eq!(
        (v["id"].as_str(), v["type"].as_str()),
        (Some("hot"), Some("change"))
    );

    // Bad messages get errors, the connection stays.
    ws.send(Message::Text(
        "{\"op\":\"subscribe\",\"id\":\"x\",\"q\":\"SELECT * FROM cpu LIMIT 1\"}".into(),
    ))
    .await
    .expect("send");
    let v = json(recv(&mut ws).await);
    assert_eq!(v["type"], "error");
    assert_eq!(v["id"], "x");
    assert!(v["message"].as_str().unwrap_or("").contains("LIMIT"), "{v}");
    ws.send(Message::Text("not json".into()))
        .await
        .expect("send");
    assert_eq!(json(recv(&mut ws).await)["type"], "error");
    // Client messages are bounded.
    let huge = format!(
        "{{\"op\":\"subscribe\",\"id\":\"{}\"}}",
        "x".repeat(100_000)
    );
    let _ = ws.send(Message::Text(huge.into())).await;
    let closed = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            match ws.next().await {
                None | Some(Err(_)) | Some(Ok(Message::Close(_))) => return,
                Some(Ok(_)) => {}
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "an oversized message closes the connection");
    server.stop().await.close().expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_returns_the_snapshot_then_waits_for_changes() {
    let server = Server::in_memory_with(ServerConfig::default()).await;
    write(&server.db, "cpu,host=a usage=1 0");
    let client = reqwest::Client::new();
    let q = encode("SELECT * FROM cpu");
    let first: Value = client
        .get(server.url(&format!("/api/v1/changes?q={q}")))
        .send()
        .await
        .expect("poll")
        .json()
        .await
        .expect("json");
    assert_eq!(first["messages"][0]["type"], "snapshot");
    let seq = first["seq"].as_u64().expect("seq");
    // Nothing new: the poll waits, then answers with no messages.
    let empty: Value = client
        .get(server.url(&format!("/api/v1/changes?q={q}&since={seq}&wait_ms=200")))
        .send()
        .await
        .expect("poll")
        .json()
        .await
        .expect("json");
    assert_eq!(empty["messages"], serde_json::json!([]));
    assert!(empty["seq"].as_u64() >= Some(seq));
    // A write during the wait ends it.
    let db = server.db.clone();
    let writer = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        write(&db, "cpu,host=b usage=2 1")
    });
    let next: Value = client
        .get(server.url(&format!("/api/v1/changes?q={q}&since={seq}&wait_ms=20000")))
        .send()
        .await
        .expect("poll")
        .json()
        .await
        .expect("json");
    let written = writer.await.expect("writer");
    assert_eq!(next["messages"][0]["type"], "change", "{next}");
    assert_eq!(next["messages"][0]["changes"][0]["row"]["host"], "b");
    assert_eq!(next["seq"].as_u64(), Some(written));
    server.stop().await.close().expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_need_read_access_to_the_database() {
    let config = ServerConfig {
        auth: Auth::new(vec![
            "read:0123456789abcdef0123:main".parse().expect("token"),
            "read:fedcba9876543210fedc:other".parse().expect("token"),
        ])
        .expect("auth"),
        ..ServerConfig::default()
    };
    let server = Server::in_memory_with(config).await;
    write(&server.db, "cpu,host=a usage=1 0");
    let client = reqwest::Client::new();
    let url = server.url(&format!(
        "/api/v1/subscribe?db=main&q={}",
        encode("SELECT * FROM cpu")
    ));
    let r = client.get(&url).send().await.expect("request");
    assert_eq!(r.status(), 401);
    let r = client
        .get(&url)
        .bearer_auth("fedcba9876543210fedc")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 403);
    let r = client
        .get(&url)
        .bearer_auth("0123456789abcdef0123")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 200);
    drop(r);
    // A token for another database cannot reach this one through a qualified name.
    let url = server.url(&format!(
        "/api/v1/changes?db=other&q={}",
        encode("SELECT * FROM main.cpu")
    ));
    let r = client
        .get(&url)
        .bearer_auth("fedcba9876543210fedc")
        .send()
        .await
        .expect("request");
    assert_eq!(r.status(), 403);
    // WebSocket: the upgrade needs a token.
    let e = tokio_tungstenite::connect_async(format!("ws://{}/api/v1/ws", server.addr)).await;
    assert!(e.is_err(), "an upgrade without a token is refused");
    server.stop().await.close().expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_sse_subscribers_each_get_every_change() {
    let server = Server::in_memory_with(ServerConfig::default()).await;
    write(&server.db, "cpu,host=a usage=1 0");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .build()
        .expect("client");
    let url = server.url(&format!(
        "/api/v1/subscribe?q={}&progress_ms=1000",
        encode("SELECT * FROM cpu WHERE usage > 0")
    ));
    let mut readers = Vec::new();
    for _ in 0..1000 {
        let mut r = SseReader::open(&client, &url, None).await;
        assert_eq!(r.next_data().await.event, "snapshot");
        readers.push(r);
    }
    assert_eq!(server.db.stats().subscribers, 1000);
    let mut last = 0;
    for i in 1..=5 {
        last = write(&server.db, &format!("cpu,host=a usage={i} {i}"));
    }
    let tasks: Vec<_> = readers
        .into_iter()
        .map(|mut r| {
            tokio::spawn(async move {
                let mut rows = 0;
                loop {
                    let e = r.next().await;
                    if e.event == "change" {
                        rows += e.data["changes"].as_array().map_or(0, Vec::len);
                    }
                    if e.data["seq"].as_u64() >= Some(last) && rows >= 5 {
                        return rows;
                    }
                }
            })
        })
        .collect();
    for t in tasks {
        assert_eq!(t.await.expect("task"), 5);
    }
    server.stop().await.close().expect("close");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn websocket_connections_and_their_subscriptions_count_against_the_cap() {
    let server = Server::in_memory_with(ServerConfig {
        max_subscriptions: 2,
        ..ServerConfig::default()
    })
    .await;
    write(&server.db, "cpu,host=a usage=95 0");
    let url = format!("ws://{}/api/v1/ws", server.addr);
    let (mut ws, _) = tokio_tungstenite::connect_async(&url)
        .await
        .expect("connect");
    async fn next_text(
        ws: &mut (impl StreamExt<Item = Result<Message, tokio_tungstenite::tungstenite::Error>> + Unpin),
    ) -> Value {
        loop {
            let m = tokio::time::timeout(Duration::from_secs(30), ws.next())
                .await
                .expect("a frame within 30 s")
                .expect("open")
                .expect("frame");
            if let Message::Text(t) = m {
                return serde_json::from_str::<Value>(&t).expect("json");
            }
        }
    }
    let subscribe = |id: &str| {
        Message::Text(
            serde_json::json!({"op": "subscribe", "id": id, "db": "main", "q": "SELECT time, host, usage FROM cpu"})
                .to_string()
                .into(),
        )
    };
    // The connection holds one permit, its first subscription the second.
    ws.send(subscribe("a")).await.expect("send");
    let ack = next_text(&mut ws).await;
    assert_eq!(ack["type"], "subscribed", "{ack}");
    // Past the cap: the next subscription is refused on the socket, another socket at the upgrade.
    ws.send(subscribe("b")).await.expect("send");
    let refused = loop {
        let m = next_text(&mut ws).await;
        if m["id"] == "b" {
            break m;
        }
    };
    assert_eq!(refused["type"], "error", "{refused}");
    assert!(
        refused.to_string().contains("--max-subscriptions 2"),
        "{refused}"
    );
    match tokio_tungstenite::connect_async(&url).await {
        Err(tokio_tungstenite::tungstenite::Error::Http(r)) => assert_eq!(r.status(), 503),
        other => panic!(
            "a connection past the cap must be refused: {:?}",
            other.map(|(_, r)| r.status())
        ),
    }
    // Closing the socket gives both permits back.
    ws.close(None).await.expect("close");
    drop(ws);
    let mut reopened = None;
    for _ in 0..100 {
        if let Ok((ws, _)) = tokio_tungstenite::connect_async(&url).await {
            reopened = Some(ws);
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(reopened.is_some(), "the permits came back");
    // A long-poll queue beyond the bound is refused.
    let r = server
        .client
        .get(server.url(&format!(
            "/api/v1/changes?db=main&q={}&queue=10000000",
            encode("SELECT time, host, usage FROM cpu")
        )))
        .send()
        .await
        .expect("send");
    assert_eq!(r.status(), 400);
    assert!(r.text().await.expect("text").contains("65536"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_token_gets_429_past_its_share_of_subscription_views() {
    // One subscription view per token: a read token's second distinct aggregate query is
    // refused with 429 naming the flag, while another token still gets its own.
    let db = rivulet::Db::open_with(rivulet::Config {
        durability: rivulet::Durability::None,
        max_shared_views_per_token: 1,
        ..rivulet::Config::default()
    })
    .expect("db");
    let config = ServerConfig {
        auth: Auth::new(vec![
            "read:0123456789abcdef0123".parse().expect("token"),
            "read:fedcba9876543210fedc".parse().expect("token"),
        ])
        .expect("auth"),
        ..ServerConfig::default()
    };
    let server = Server::start(db, config).await;
    write(&server.db, "cpu,host=a usage=1 0");
    let client = reqwest::Client::new();
    let changes = |q: &str| {
        server.url(&format!(
            "/api/v1/changes?db=main&wait_ms=1&q={}",
            encode(q)
        ))
    };
    let max = "SELECT host, max(usage) AS top FROM cpu GROUP BY host";
    let min = "SELECT host, min(usage) AS low FROM cpu GROUP BY host";
    let get = |url: String, token: &'static str| {
        let client = client.clone();
        async move {
            client
                .get(url)
                .bearer_auth(token)
                .send()
                .await
                .expect("request")
        }
    };
    let r = get(changes(max), "0123456789abcdef0123").await;
    assert_eq!(r.status(), 200, "{}", r.text().await.unwrap_or_default());
    let r = get(changes(min), "0123456789abcdef0123").await;
    assert_eq!(r.status(), 429);
    let body = r.text().await.expect("body");
    assert!(body.contains("--max-shared-views-per-token"), "{body}");
    // The same query as a view it already made costs nothing.
    let r = get(changes(max), "0123456789abcdef0123").await;
    assert_eq!(r.status(), 200);
    let r = get(changes(min), "fedcba9876543210fedc").await;
    assert_eq!(r.status(), 200);
    assert_eq!(server.db.subscription_views(), 2);
    server.stop().await.close().expect("close");
}

/// The close code the server ends `ws` with (None: it closed without one, or not at all).
async fn close_code(
    ws: &mut tokio_tungstenite::WebSocketStream<
        tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>,
    >,
) -> Option<u16> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, ws.next()).await {
            Ok(Some(Ok(Message::Close(frame)))) => return frame.map(|f| u16::from(f.code)),
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(_)) | None) | Err(_) => return None,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_websocket_frames_close_with_the_protocol_s_codes_and_the_server_keeps_serving() {
    use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
    use tokio_tungstenite::tungstenite::protocol::frame::{Frame, FrameHeader};
    let server = Server::in_memory().await;
    write(&server.db, "cpu,host=a usage=1 0");
    let url = format!("ws://{}/api/v1/ws", server.addr);
    let connect = || async {
        tokio_tungstenite::connect_async(&url)
            .await
            .expect("connect")
            .0
    };
    let raw = |opcode: OpCode, is_final: bool, payload: Vec<u8>| {
        Message::Frame(Frame::from_payload(
            FrameHeader {
                is_final,
                opcode,
                ..FrameHeader::default()
            },
            payload.into(),
        ))
    };
    // Oversized: a message over 64 KiB → 1009 (message too big).
    let mut ws = connect().await;
    let _ = ws.send(Message::text("x".repeat(100 << 10))).await;
    assert_eq!(close_code(&mut ws).await, Some(1009), "oversized message");
    // Invalid UTF-8 in a text frame → 1007 (invalid payload).
    let mut ws = connect().await;
    let _ = ws
        .send(raw(
            OpCode::Data(Data::Text),
            true,
            vec![b'{', 0xff, 0xfe, b'}'],
        ))
        .await;
    assert_eq!(close_code(&mut ws).await, Some(1007), "invalid UTF-8");
    // A reserved opcode → 1002 (protocol error).
    let mut ws = connect().await;
    let _ = ws
        .send(raw(OpCode::Data(Data::Reserved(3)), true, b"hi".to_vec()))
        .await;
    assert_eq!(close_code(&mut ws).await, Some(1002), "reserved opcode");
    // A continuation with nothing to continue → 1002.
    let mut ws = connect().await;
    let _ = ws
        .send(raw(OpCode::Data(Data::Continue), true, b"hi".to_vec()))
        .await;
    assert_eq!(close_code(&mut ws).await, Some(1002), "stray continuation");
    // A fragmented message whose pieces add up is one message: the subscription works.
    let mut ws = connect().await;
    let text = r#"{"op":"subscribe","id":"s1","db":"main","q":"SELECT * FROM cpu"}"#.as_bytes();
    let (a, b) = text.split_at(20);
    ws.send(raw(OpCode::Data(Data::Text), false, a.to_vec()))
        .await
        .expect("first fragment");
    ws.send(raw(OpCode::Data(Data::Continue), true, b.to_vec()))
        .await
        .expect("last fragment");
    let first = loop {
        match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
            Ok(Some(Ok(Message::Text(t)))) => break t.to_string(),
            Ok(Some(Ok(_))) => continue,
            other => panic!("no answer to a fragmented subscribe: {other:?}"),
        }
    };
    assert!(first.contains("\"s1\""), "{first}");
    // Messages that are not the protocol's get an error message, and the socket stays open.
    for bad in [
        "",
        "null",
        "[1,2]",
        "{\"op\":\"subscribe\"}",
        "{\"op\":\"dance\",\"id\":\"x\"}",
    ] {
        ws.send(Message::text(bad)).await.expect("send");
        let answer = loop {
            match tokio::time::timeout(Duration::from_secs(10), ws.next()).await {
                Ok(Some(Ok(Message::Text(t)))) if t.contains("error") => break t.to_string(),
                Ok(Some(Ok(_))) => continue,
                other => panic!("{bad:?}: no error message: {other:?}"),
            }
        };
        assert!(answer.contains("\"error\""), "{bad:?}: {answer}");
    }
    // The server still serves new connections and plain requests.
    let mut ws = connect().await;
    ws.send(Message::text(
        r#"{"op":"subscribe","id":"s2","db":"main","q":"SELECT * FROM cpu"}"#,
    ))
    .await
    .expect("send");
    assert!(matches!(
        tokio::time::timeout(Duration::from_secs(10), ws.next()).await,
        Ok(Some(Ok(_)))
    ));
    assert_eq!(server.get("/health").await.status(), 200);
    server.stop().await.close().expect("close");
}
