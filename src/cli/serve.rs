//! `rivulet serve`: the HTTP server on a data directory.

use std::net::SocketAddr;
use std::path::PathBuf;

use rivulet::server::{ServerConfig, router, serve};
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
    /// Allow listening on a non-loopback address although there is no authentication.
    #[arg(long, env = "RIVULET_INSECURE_NO_AUTH")]
    insecure_no_auth: bool,
}

pub(crate) fn run(args: ServeArgs) -> CliResult {
    if !args.bind.ip().is_loopback() && !args.insecure_no_auth {
        return Err(format!(
            "refusing to listen on {}: authentication is not available yet, so only loopback \
             addresses are allowed (pass --insecure-no-auth to override)",
            args.bind
        )
        .into());
    }
    let db = Db::open_with(Config {
        durability: args.durability,
        ..Config::with_dir(&args.data_dir)
    })?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let listener = tokio::net::TcpListener::bind(args.bind)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", args.bind))?;
        let addr = listener.local_addr()?;
        println!(
            "Rivulet {} listening on http://{addr} (data directory {}, no authentication: loopback only)",
            env!("CARGO_PKG_VERSION"),
            args.data_dir.display()
        );
        println!("Try:");
        println!(
            "  curl -XPOST 'http://{addr}/api/v2/write?bucket=main&precision=s' --data-binary 'cpu,host=a usage=1 1700000000'"
        );
        println!(
            "  curl 'http://{addr}/api/v3/query_sql?db=main&q=SELECT+*+FROM+cpu&format=json'"
        );
        let app = router(
            db.clone(),
            ServerConfig {
                max_body_bytes: args.max_body_bytes,
            },
        );
        serve(listener, app, shutdown_signal()).await?;
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
