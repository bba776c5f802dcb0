//! `rivulet serve`: the HTTP server on a data directory.

use std::net::SocketAddr;
use std::path::PathBuf;

use rivulet::server::{
    Auth, ConnectionLimits, ServerConfig, Tls, Token, serve_postgres, serve_with, services,
};
use rivulet::{Config, Db, Durability};

use super::CliResult;

#[derive(Debug, clap::Args)]
pub(crate) struct ServeArgs {
    /// The data directory.
    #[arg(long, env = "RIVULET_DATA_DIR", default_value = "./rivulet-data")]
    data_dir: PathBuf,
    /// Address to listen on.
    #[arg(long, env = "RIVULET_BIND", default_value = "127.0.0.1:8181")]
    bind: SocketAddr,
    /// WAL durability: sync, none or interval:<ms>.
    #[arg(long, env = "RIVULET_DURABILITY", default_value = "sync")]
    durability: Durability,
    /// Largest request body in bytes, also after gzip decompression.
    #[arg(long, env = "RIVULET_MAX_BODY_BYTES", default_value_t = 10 << 20)]
    max_body_bytes: usize,
    /// An access token, `SCOPE:SECRET[:DB,…]` with SCOPE admin, write or read; repeatable
    /// (env: `;`-separated). Without tokens there is no authentication and only loopback
    /// addresses are served.
    #[arg(long = "token", env = "RIVULET_TOKENS", value_delimiter = ';')]
    tokens: Vec<Token>,
    /// Allow a non-loopback address without tokens.
    #[arg(long, env = "RIVULET_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
    /// Cancel queries running longer than this many seconds.
    #[arg(long, env = "RIVULET_QUERY_TIMEOUT_SECS", default_value_t = 60)]
    query_timeout_secs: u64,
    /// Memory all running queries together may use, in bytes.
    #[arg(long, env = "RIVULET_QUERY_MEMORY_BYTES", default_value_t = 4 << 30)]
    query_memory_bytes: usize,
    /// Longest line protocol line in bytes.
    #[arg(long, env = "RIVULET_MAX_LINE_BYTES", default_value_t = 1 << 20)]
    max_line_bytes: usize,
    /// Open connections at once; more are closed.
    #[arg(long, env = "RIVULET_MAX_CONNECTIONS", default_value_t = 4096)]
    max_connections: usize,
    /// Requests served at once; more are answered 503.
    #[arg(long, env = "RIVULET_MAX_CONCURRENT_REQUESTS", default_value_t = 1024)]
    max_concurrent_requests: usize,
    /// Server-Sent Event subscriptions open at once (not counted as requests).
    #[arg(long, env = "RIVULET_MAX_SUBSCRIPTIONS", default_value_t = 10_000)]
    max_subscriptions: usize,
    /// Answer every query by scanning, never from maintained state (the last-point state
    /// answers latest-row-per-series queries by default; EXPLAIN shows LastPointsExec).
    #[arg(long, env = "RIVULET_NO_QUERY_REWRITES")]
    no_query_rewrites: bool,
    /// Largest result held whole before it is sent (format=pretty and parquet, /api/v1/sql,
    /// long-poll answers); streamed formats have no limit (docs/limits.md).
    #[arg(long, env = "RIVULET_MAX_RESULT_BYTES", default_value_t = 64 << 20)]
    max_result_bytes: usize,
    /// Seconds a client may take nothing of a response being sent before its connection is
    /// closed (a reader that stalls a streamed result releases its permit and query).
    #[arg(long, env = "RIVULET_WRITE_TIMEOUT_SECS", default_value_t = 30)]
    write_timeout_secs: u64,
    /// Serve HTTPS (and wss://) with this PEM certificate chain (the server's first); needs
    /// --tls-key. rustls: no system OpenSSL.
    #[arg(long, env = "RIVULET_TLS_CERT", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// The PEM private key (PKCS#8, PKCS#1 or SEC1) of --tls-cert.
    #[arg(long, env = "RIVULET_TLS_KEY", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// Internal views serving subscriptions to aggregate (join, window…) queries, one per
    /// distinct query, counting those in their grace period (docs/limits.md).
    #[arg(long, env = "RIVULET_MAX_SHARED_VIEWS", default_value_t = 64)]
    max_shared_views: usize,
    /// … of those, made by one token's subscriptions.
    #[arg(long, env = "RIVULET_MAX_SHARED_VIEWS_PER_TOKEN", default_value_t = 16)]
    max_shared_views_per_token: usize,
    /// Seconds a subscription view is kept after its last subscriber leaves (a client that
    /// reconnects sooner resumes where it was).
    #[arg(long, env = "RIVULET_SHARED_VIEW_GRACE", default_value_t = 300)]
    shared_view_grace_secs: u64,
    /// A web page origin (`https://dash.example.com`) whose browser requests are taken besides
    /// the server's own; repeatable (env: `,`-separated). Other origins are refused.
    #[arg(
        long = "cors-origin",
        env = "RIVULET_CORS_ORIGINS",
        value_delimiter = ','
    )]
    cors_origins: Vec<String>,
    /// Memory for segments kept decoded, so queries over recent data skip Parquet decoding
    /// (least recently used first out; 0 turns it off; docs/limits.md).
    #[arg(long, env = "RIVULET_HOT_CACHE_BYTES", default_value_t = 1 << 30)]
    hot_cache_bytes: usize,
    /// Address of the Postgres wire protocol (psql, Grafana's PostgreSQL data source, any
    /// Postgres driver: the password is a token, the database the Rivulet database), or `off`.
    /// Default: 127.0.0.1:5433 (loopback; skipped with a warning when the port is taken).
    #[arg(long, env = "RIVULET_PG_BIND")]
    pg_bind: Option<String>,
    /// How the directory is opened.
    #[command(flatten)]
    open: super::OpenArgs,
}

pub(crate) fn run(args: ServeArgs) -> CliResult {
    let auth = Auth::new(args.tokens.clone())?;
    for origin in &args.cors_origins {
        let rest = origin
            .strip_prefix("http://")
            .or_else(|| origin.strip_prefix("https://"));
        if rest.is_none_or(|r| r.is_empty() || r.trim_end_matches('/').contains('/')) {
            return Err(format!(
                "--cors-origin '{origin}' is not an origin: give scheme://host[:port], as a \
                 browser sends it (e.g. https://dash.example.com)"
            )
            .into());
        }
    }
    if !args.bind.ip().is_loopback() && !auth.enabled() && !args.insecure_no_auth {
        return Err(format!(
            "refusing to listen on {} without authentication: give --token SCOPE:SECRET, or \
             --insecure-no-auth to serve anyone who can reach it",
            args.bind
        )
        .into());
    }
    let pg_bind: Option<(SocketAddr, bool)> = match args.pg_bind.as_deref() {
        Some("off") => None,
        Some(addr) => Some((
            addr.parse().map_err(|e| {
                format!("--pg-bind '{addr}' is not an address (IP:PORT) or 'off': {e}")
            })?,
            true,
        )),
        None => Some((SocketAddr::from(([127, 0, 0, 1], 5433)), false)),
    };
    if let Some((addr, _)) = pg_bind
        && !addr.ip().is_loopback()
        && !auth.enabled()
        && !args.insecure_no_auth
    {
        return Err(format!(
            "refusing to serve Postgres on {addr} without authentication: give --token \
             SCOPE:SECRET, or --insecure-no-auth to serve anyone who can reach it"
        )
        .into());
    }
    // Checked before the database opens: a bad certificate is a start-up error.
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(Tls::from_pem_files(cert, key)?),
        _ => None,
    };
    let scheme = if tls.is_some() { "https" } else { "http" };
    let db = Db::open_with(args.open.apply(Config {
        durability: args.durability,
        query_memory_limit: Some(args.query_memory_bytes),
        max_shared_views: args.max_shared_views,
        max_shared_views_per_token: args.max_shared_views_per_token,
        shared_view_grace: std::time::Duration::from_secs(args.shared_view_grace_secs),
        query_rewrites: !args.no_query_rewrites,
        hot_cache_bytes: args.hot_cache_bytes,
        ..Config::with_dir(&args.data_dir)
    }))?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.bind)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.bind))?;
        let addr = listener.local_addr()?;
        let auth_note = if auth.enabled() {
            format!("{} token(s)", args.tokens.len())
        } else {
            "no authentication".to_string()
        };
        println!(
            "Rivulet {} listening on {scheme}://{addr} (data directory {}, {auth_note})",
            env!("CARGO_PKG_VERSION"),
            args.data_dir.display()
        );
        // With tokens, the examples need one: show where it goes, never the secret itself.
        let auth_header = if auth.enabled() {
            " -H 'Authorization: Bearer YOUR_TOKEN'"
        } else {
            ""
        };
        // A self-signed certificate: curl must be told to trust it.
        let cacert = args
            .tls_cert
            .as_ref()
            .map(|c| format!(" --cacert '{}'", c.display()))
            .unwrap_or_default();
        println!("Try:");
        println!(
            "  curl{cacert}{auth_header} -XPOST '{scheme}://{addr}/api/v2/write?bucket=main&precision=s' --data-binary 'cpu,host=a usage=1 1700000000'"
        );
        println!(
            "  curl{cacert}{auth_header} '{scheme}://{addr}/api/v3/query_sql?db=main&q=SELECT+*+FROM+cpu&format=json'"
        );
        println!("  # live: a snapshot, then every change (write again in another terminal)");
        println!(
            "  curl{cacert}{auth_header} -N -H 'Accept: text/event-stream' '{scheme}://{addr}/api/v1/subscribe?db=main&q=SELECT+*+FROM+cpu'"
        );
        let pg_listener = match pg_bind {
            None => None,
            Some((addr, explicit)) => match tokio::net::TcpListener::bind(addr).await {
                Ok(l) => Some(l),
                Err(e) if !explicit => {
                    eprintln!(
                        "rivulet: Postgres wire protocol not served: cannot listen on {addr}: {e} \
                         (choose another address with --pg-bind, or --pg-bind off)"
                    );
                    None
                }
                Err(e) => return Err(format!("cannot listen on {addr} (--pg-bind): {e}").into()),
            },
        };
        if let Some(l) = &pg_listener {
            let pg_addr = l.local_addr()?;
            let password = if auth.enabled() { " password=YOUR_TOKEN" } else { "" };
            let ssl = if tls.is_some() { " sslmode=require" } else { "" };
            println!(
                "Postgres wire protocol on {pg_addr}: psql \"host={} port={} dbname=main user=rivulet{password}{ssl}\"",
                pg_addr.ip(),
                pg_addr.port()
            );
        }
        let (app, postgres) = services(
            db.clone(),
            ServerConfig {
                max_body_bytes: args.max_body_bytes,
                auth,
                query_timeout: std::time::Duration::from_secs(args.query_timeout_secs.max(1)),
                max_concurrent_requests: args.max_concurrent_requests.max(1),
                max_subscriptions: args.max_subscriptions.max(1),
                max_line_bytes: args.max_line_bytes.max(1),
                cors_origins: args.cors_origins.clone(),
                allow_any_host: args.insecure_no_auth,
                max_result_bytes: args.max_result_bytes.max(1),
                ..ServerConfig::default()
            },
        );
        let limits = ConnectionLimits {
            max_connections: args.max_connections.max(1),
            write_timeout: std::time::Duration::from_secs(args.write_timeout_secs.max(1)),
            ..ConnectionLimits::default()
        };
        // One signal stops both servers.
        let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
        tokio::spawn(async move {
            shutdown_signal().await;
            let _ = stop_tx.send(true);
        });
        let stopped = |mut rx: tokio::sync::watch::Receiver<bool>| async move {
            let _ = rx.wait_for(|s| *s).await;
        };
        let pg_task = pg_listener.map(|l| {
            tokio::spawn(serve_postgres(
                l,
                postgres,
                limits.clone(),
                tls.clone(),
                stopped(stop_rx.clone()),
            ))
        });
        serve_with(listener, app, limits, tls, stopped(stop_rx)).await?;
        if let Some(task) = pg_task {
            match task.await {
                Ok(Err(e)) => tracing::warn!(error = %e, "the Postgres server stopped with an error"),
                Err(e) => tracing::warn!(error = %e, "the Postgres server task failed"),
                Ok(Ok(())) => {}
            }
        }
        Ok::<(), Box<dyn std::error::Error>>(())
    })?;
    // In-flight requests have finished: sync the WAL and the catalog.
    db.close()?;
    eprintln!("rivulet: shut down cleanly");
    Ok(())
}

/// Completes on SIGINT (Ctrl-C) or SIGTERM.
async fn shutdown_signal() {
    let ctrl_c = async {
        if let Err(e) = tokio::signal::ctrl_c().await {
            tracing::error!(error = %e, "cannot listen for Ctrl-C");
            std::future::pending::<()>().await;
        }
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                std::future::pending::<()>().await;
            }
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
    eprintln!("rivulet: shutting down (finishing in-flight requests)");
}
