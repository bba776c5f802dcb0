//! The SQL/statement endpoint (`POST /api/v1/sql`) on arbitrary bodies, through the real
//! router: every body gets an answer (never a panic, never a 500 for a client's mistake).
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use rivulet::server::{ServerConfig, router};
use rivulet::{Config, Db, Durability, Precision};

struct Fixture {
    rt: tokio::runtime::Runtime,
    db: Db,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let db = Db::open_with(Config {
            durability: Durability::None,
            ..Config::default()
        })
        .expect("db");
        db.write_lines("main", "cpu,host=a u=1 1\ncpu,host=b u=2 2", Precision::Second)
            .expect("seed");
        Fixture {
            rt: tokio::runtime::Runtime::new().expect("runtime"),
            db,
        }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let sql = String::from_utf8_lossy(data);
    // As the JSON body a client sends, and as raw bytes (bad JSON must be a 400).
    let bodies = [
        serde_json::json!({ "db": "main", "q": sql }).to_string().into_bytes(),
        data.to_vec(),
    ];
    for body in bodies {
        let status = f.rt.block_on(async {
            use tower::ServiceExt;
            let request = axum::http::Request::post("/api/v1/sql")
                .header("content-type", "application/json")
                .header("host", "127.0.0.1")
                .extension(axum::extract::ConnectInfo(std::net::SocketAddr::from((
                    [127, 0, 0, 1],
                    9,
                ))))
                .body(axum::body::Body::from(body))
                .expect("request");
            router(f.db.clone(), ServerConfig::default())
                .oneshot(request)
                .await
                .map(|r| r.status())
        });
        if let Ok(status) = status {
            assert!(status != 500, "a 500 for {sql:?}");
        }
    }
});
