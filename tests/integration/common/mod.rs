//! What the integration tests share: a real server on 127.0.0.1:0 with a real HTTP client,
//! runtimes, and rendering results for whole-result comparisons (the DataFusion oracles render
//! their recomputes the same way).

use std::net::SocketAddr;
use std::time::Duration;

use arrow::array::RecordBatch;
use arrow::util::pretty::pretty_format_batches;
use reqwest::StatusCode;
use rivulet::server::{ConnectionLimits, ServerConfig, serve, serve_postgres, services};
use rivulet::{Config, Db, Durability};
use serde_json::Value;

/// A current-thread runtime (blocking tests that call async APIs).
pub(crate) fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

/// A multi-thread runtime with `workers` threads (tests whose database work runs beside it).
pub(crate) fn multi_thread_rt(workers: usize) -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(workers)
        .enable_all()
        .build()
        .expect("runtime")
}

/// The result of `sql` as a pretty table.
pub(crate) fn table(db: &Db, sql: &str) -> String {
    let batches = rt().block_on(db.sql(sql)).expect(sql);
    pretty(&batches)
}

/// The rows of `sql`, each as text (cells joined by `|`), sorted.
pub(crate) fn sorted_rows(db: &Db, rt: &tokio::runtime::Runtime, sql: &str) -> Vec<String> {
    let batches = rt
        .block_on(db.sql(sql))
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    let mut out = Vec::new();
    for batch in &batches {
        for row in 0..batch.num_rows() {
            let cells: Vec<String> = batch
                .columns()
                .iter()
                .map(|c| arrow::util::display::array_value_to_string(c, row).expect("display"))
                .collect();
            out.push(cells.join("|"));
        }
    }
    out.sort();
    out
}

/// 4 hosts × 40,000 points (`cpu,host=hN v=T`, one a second from 2024-01-01): a segment of
/// them spans several row groups and slices, sorted by host.
pub(crate) fn host_runs() -> String {
    let mut text = String::new();
    for h in 0..4 {
        for t in 0..40_000 {
            text.push_str(&format!("cpu,host=h{h} v={t}i {}\n", 1_704_067_200 + t));
        }
    }
    text
}

/// Batches as a pretty table.
pub(crate) fn pretty(batches: &[RecordBatch]) -> String {
    pretty_format_batches(batches).expect("format").to_string()
}

/// An in-memory database without fsyncs.
pub(crate) fn memory_db() -> Db {
    Db::open_with(Config {
        durability: Durability::None,
        ..Config::default()
    })
    .expect("db")
}

/// A server on 127.0.0.1:0 over a database, with an HTTP client.
pub(crate) struct Server {
    pub(crate) addr: SocketAddr,
    /// The Postgres wire protocol's address (the same state: tokens, limits).
    pub(crate) pg_addr: SocketAddr,
    pub(crate) client: reqwest::Client,
    pub(crate) db: Db,
    shutdown: Option<tokio::sync::oneshot::Sender<()>>,
    task: Option<tokio::task::JoinHandle<std::io::Result<()>>>,
}

impl Server {
    /// Serves `db` with `config`.
    pub(crate) async fn start(db: Db, config: ServerConfig) -> Server {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let addr = listener.local_addr().expect("addr");
        let pg_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind");
        let pg_addr = pg_listener.local_addr().expect("addr");
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        let (app, postgres) = services(db.clone(), config);
        tokio::spawn(serve_postgres(
            pg_listener,
            postgres,
            ConnectionLimits::default(),
            None,
            async move {
                let mut stop = stop_rx;
                let _ = stop.wait_for(|s| *s).await;
            },
        ));
        let task = tokio::spawn(serve(
            listener,
            app,
            ConnectionLimits::default(),
            async move {
                let _ = rx.await;
                let _ = stop_tx.send(true);
            },
        ));
        Server {
            addr,
            pg_addr,
            client: reqwest::Client::new(),
            db,
            shutdown: Some(tx),
            task: Some(task),
        }
    }

    /// Serves a fresh in-memory database with the default configuration.
    pub(crate) async fn in_memory() -> Server {
        Server::start(memory_db(), ServerConfig::default()).await
    }

    /// Serves a fresh in-memory database with `config`.
    pub(crate) async fn in_memory_with(config: ServerConfig) -> Server {
        Server::start(memory_db(), config).await
    }

    pub(crate) fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub(crate) async fn post(&self, path: &str, body: &str) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .body(body.to_string())
            .send()
            .await
            .expect("request")
    }

    pub(crate) async fn get(&self, path: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .send()
            .await
            .expect("request")
    }

    /// `GET path`, which must answer 200 with JSON.
    pub(crate) async fn json(&self, path: &str) -> Value {
        let r = self.get(path).await;
        assert_eq!(r.status(), StatusCode::OK, "GET {path}");
        r.json().await.expect("json")
    }

    /// Stops the server (open subscriptions must not keep it from stopping) and hands back
    /// the database.
    pub(crate) async fn stop(mut self) -> Db {
        if let Some(tx) = self.shutdown.take() {
            let _ = tx.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(Duration::from_secs(20), task)
                .await
                .expect("the server stops with subscriptions open")
                .expect("join")
                .expect("serve");
        }
        self.db
    }
}
