//! Command-line commands.

mod serve;
mod sql;
mod write;

use std::path::PathBuf;

use clap::{Parser, Subcommand};
use rivulet::WalRecovery;

/// Rivulet: an embedded time-series database with continuous queries.
#[derive(Debug, Parser)]
#[command(name = "rivulet", version, about)]
pub(crate) struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
// Parsed once at start-up: the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
enum Command {
    /// Serve the HTTP API (InfluxDB-compatible writes, SQL queries) on a data directory.
    Serve(serve::ServeArgs),
    /// Import a line protocol file (or `-` for stdin) into a data directory.
    Write(write::WriteArgs),
    /// Run a SQL query against a data directory and print the result.
    Sql(sql::SqlArgs),
}

/// Options shared by commands that open a data directory.
#[derive(Debug, clap::Args)]
struct DataDirArgs {
    /// The data directory.
    #[arg(long, env = "RIVULET_DATA_DIR", default_value = "./rivulet-data")]
    data_dir: PathBuf,
    /// The database.
    #[arg(long, env = "RIVULET_DB", default_value = "main")]
    db: String,
    /// How the directory is opened.
    #[command(flatten)]
    open: OpenArgs,
}

/// How every command opens a data directory: WAL recovery and the caps on what writes create.
#[derive(Debug, clap::Args)]
pub(crate) struct OpenArgs {
    /// What to do with a damaged WAL segment at open: strict (refuse to open, naming the file
    /// and offset) or skip-damaged (keep every intact record, set the damaged file aside).
    /// docs/recovery.md.
    #[arg(long, env = "RIVULET_WAL_RECOVERY", default_value = "strict")]
    wal_recovery: WalRecovery,
    /// Databases writes may create (docs/limits.md).
    #[arg(long, env = "RIVULET_MAX_DATABASES", default_value_t = 100)]
    max_databases: usize,
    /// Tables in one database, views' storage included (docs/limits.md).
    #[arg(long, env = "RIVULET_MAX_TABLES_PER_DATABASE", default_value_t = 2000)]
    max_tables_per_database: usize,
    /// Columns of one table, `time` and tags included (docs/limits.md).
    #[arg(long, env = "RIVULET_MAX_COLUMNS_PER_TABLE", default_value_t = 500)]
    max_columns_per_table: usize,
    /// Series (distinct tag sets) of one table (docs/limits.md).
    #[arg(
        long,
        env = "RIVULET_MAX_SERIES_PER_TABLE",
        default_value_t = 1_000_000
    )]
    max_series_per_table: usize,
}

impl OpenArgs {
    /// `config` with these options.
    pub(crate) fn apply(&self, config: rivulet::Config) -> rivulet::Config {
        rivulet::Config {
            wal_recovery: self.wal_recovery,
            max_databases: self.max_databases,
            max_tables_per_database: self.max_tables_per_database,
            max_columns_per_table: self.max_columns_per_table,
            max_series_per_table: self.max_series_per_table,
            ..config
        }
    }
}

impl DataDirArgs {
    /// The configuration these options describe.
    fn config(&self) -> rivulet::Config {
        self.open.apply(rivulet::Config {
            default_database: self.db.clone(),
            // One-shot commands (`write`, `sql`) exit when done: segments kept decoded for
            // later queries would only cost the import time and memory.
            hot_cache_bytes: 0,
            ..rivulet::Config::with_dir(&self.data_dir)
        })
    }
}

/// A command's failure, printed as `error: …` with a non-zero exit.
pub(crate) type CliResult = Result<(), Box<dyn std::error::Error>>;

pub(crate) fn run(cli: Cli) -> CliResult {
    match cli.command {
        Command::Serve(args) => serve::run(args),
        Command::Write(args) => write::run(args),
        Command::Sql(args) => sql::run(args),
    }
}
