//! The WebSocket protocol on arbitrary client messages, against a real server on
//! 127.0.0.1:0: each message gets an answer or a close with a protocol code, and the server
//! keeps serving (a fresh connection subscribes after every input).
#![no_main]

use std::sync::OnceLock;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use libfuzzer_sys::fuzz_target;
use rivulet::server::{ConnectionLimits, ServerConfig, router, serve};
use rivulet::{Config, Db, Durability, Precision};
use tokio_tungstenite::tungstenite::Message;

struct Fixture {
    rt: tokio::runtime::Runtime,
    url: String,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let db = Db::open_with(Config {
            durability: Durability::None,
            ..Config::default()
        })
        .expect("db");
        db.write_lines("main", "cpu,host=a u=1 1", Precision::Second)
            .expect("seed");
        let addr = rt.block_on(async {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
                .await
                .expect("bind");
            let addr = listener.local_addr().expect("addr");
            let app = router(db, ServerConfig::default());
            tokio::spawn(serve(
                listener,
                app,
                ConnectionLimits::default(),
                std::future::pending(),
            ));
            addr
        });
        Fixture {
            rt,
            url: format!("ws://{addr}/api/v1/ws"),
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    f.rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(&f.url)
            .await
            .expect("the server keeps taking connections");
        let message = match std::str::from_utf8(data) {
            Ok(text) => Message::text(text),
            Err(_) => Message::binary(data.to_vec()),
        };
        if ws.send(message).await.is_err() {
            return;
        }
        // An answer (an error message, a subscription's first message) or a close.
        let _ = tokio::time::timeout(Duration::from_millis(200), ws.next()).await;
        let _ = ws.close(None).await;
    });
});
