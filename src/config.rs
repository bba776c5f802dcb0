//! Configuration of a [`Db`](crate::Db): one struct, every default documented.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::clock::{Clock, SystemClock};
use crate::storage::io::IoFaults;
use crate::storage::wal::WalRecovery;

/// When a write is acknowledged relative to its WAL record reaching the disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Durability {
    /// A write returns only after its WAL record is fsynced (concurrent writers share one fsync).
    /// The default.
    #[default]
    Sync,
    /// A write returns once its record is written to the OS; a background thread fsyncs at this
    /// interval. A machine crash can lose the last interval; a process crash loses nothing.
    Interval(Duration),
    /// Writes never wait for an fsync (tests and benchmarks); segment files are still synced
    /// when they are started, rotated and on close. A process crash loses nothing the OS received.
    None,
}

impl std::str::FromStr for Durability {
    type Err = String;

    /// `sync`, `none`, or `interval:<ms>` (e.g. `interval:100`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "sync" => Ok(Durability::Sync),
            "none" => Ok(Durability::None),
            _ => match s.strip_prefix("interval:").map(str::parse::<u64>) {
                Some(Ok(ms)) if ms > 0 => Ok(Durability::Interval(Duration::from_millis(ms))),
                _ => Err(format!(
                    "unknown durability '{s}': expected sync, none or interval:<milliseconds>"
                )),
            },
        }
    }
}

/// Everything [`Db::open_with`](crate::Db::open_with) needs.
#[derive(Debug, Clone)]
pub struct Config {
    /// The data directory; `None` keeps everything in memory (no WAL, nothing survives close).
    /// Default: `None`.
    pub data_dir: Option<PathBuf>,
    /// WAL durability. Default: [`Durability::Sync`].
    pub durability: Durability,
    /// A WAL segment is closed and a new one started past this size. Default: 64 MiB.
    pub wal_segment_bytes: u64,
    /// The database a query's unqualified table names refer to. Default: `main`.
    pub default_database: String,
    /// Stamps points written without a timestamp. Default: the system clock.
    pub clock: Arc<dyn Clock>,
    /// Memory all running queries together may use (DataFusion memory pool) before a query fails
    /// with a "resources exhausted" error. Default: `None` (no limit).
    pub query_memory_limit: Option<usize>,
    /// Test hook that fails WAL appends or fsyncs. Default: none.
    pub io_faults: Option<Arc<dyn IoFaults>>,
    /// Length of a time partition: segments never span two, retention drops whole ones, and
    /// queries skip the ones outside their time range. Default: 1 day.
    pub partition: Duration,
    /// The buffer is persisted to segments once it holds this much Arrow memory. Default: 64 MiB.
    pub persist_bytes: usize,
    /// ... or when this long has passed since the last persist and the buffer holds rows.
    /// Default: 5 minutes.
    pub persist_age: Duration,
    /// Past this much buffer memory, writes wait for persistence instead of growing memory.
    /// Default: 1 GiB.
    pub max_buffer_bytes: usize,
    /// When a partition holds this many segments of similar size (rows within a power of 4),
    /// the background merges them into one. Default: 4.
    pub compaction_segments: usize,
    /// Apply a query's filters while decoding segment files (late materialization: other
    /// columns are decoded only for rows that pass), not only to prune row groups and pages.
    /// Default: false (on the TSBS benchmark it was 2–8% slower: pruning already skips most
    /// rows, and the filters are evaluated again above the scan).
    pub parquet_filter_pushdown: bool,
    /// Answer queries from maintained state when the answer is provably the same: the newest
    /// row per series (`row_number() OVER (PARTITION BY tags ORDER BY time DESC) = 1`,
    /// `DISTINCT ON`, `first_value … ORDER BY time DESC`) from the last-point state, shown as
    /// `LastPointsExec` by `EXPLAIN`; an aggregate over a table (`count`, `sum`, `min`, `max`,
    /// `avg` by tags and time buckets) from a materialized view keeping it at equal or finer
    /// buckets, plus the table's rows of partial buckets, shown as `answered_by_view` by
    /// `EXPLAIN`; and `… GROUP BY <bucket> ORDER BY <bucket> DESC LIMIT k` first over the newest
    /// buckets only (`LatestBuckets`). Default: true.
    pub query_rewrites: bool,
    /// Memory for segments kept decoded (the hot-segment cache): recently persisted and
    /// compacted segments, and after a restart those queries read while there is room, so
    /// queries over recent data do not decode Parquet again. Least recently used segments
    /// leave first; 0 turns the cache off. Default: 1 GiB.
    pub hot_cache_bytes: usize,
    /// Persist the buffer when the database is closed, so the next open replays nothing.
    /// Default: true. (False leaves the buffered writes to WAL replay: a faster close.)
    pub persist_on_close: bool,
    /// Run persistence, compaction and retention in a background thread (with a data
    /// directory). Default: true. Tests turn it off and call [`Db::persist`](crate::Db::persist).
    pub background: bool,
    /// How long a query waits for the materialized views it reads to reflect the writes
    /// visible when it started (read-your-writes) before failing. Default: 30 s.
    pub view_wait: Duration,
    /// How long one maintenance round works on a view's backfill before the other views have
    /// their turn (at least one piece, a partition's worth, per round). Default: 100 ms.
    pub view_backfill_slice: Duration,
    /// Bytes of written rows waiting for view maintenance before writers wait for it to catch
    /// up. Default: 256 MiB.
    pub view_queue_bytes: usize,
    /// Each view's and subscribed table's change log keeps at most this many bytes of recent
    /// changes, for subscribers that fall behind or reconnect. Default: 64 MiB.
    pub subscribe_log_bytes: usize,
    /// … and changes at most this old. Default: 1 hour.
    pub subscribe_log_age: Duration,
    /// What opening does with a damaged WAL segment (a torn tail is always cut). Default:
    /// [`WalRecovery::Strict`], refuse to open and say where the damage is.
    pub wal_recovery: WalRecovery,
    /// Databases writes may create; a write that would create one more is rejected, naming
    /// the limit. Default: 100.
    pub max_databases: usize,
    /// Tables (measurements) in one database, views' storage tables included. Default: 2000.
    pub max_tables_per_database: usize,
    /// Columns of one table, `time` and tags included (InfluxDB 3 Core's default). Default: 500.
    pub max_columns_per_table: usize,
    /// Series (distinct tag sets) of one table: a line with a new one past it is rejected,
    /// naming the limit (InfluxDB 1.x's `max-series-per-database` default). Default: 1,000,000.
    pub max_series_per_table: usize,
    /// Internal views made for subscriptions to aggregate (join, window…) queries, one per
    /// distinct query, counting those in their grace period; one more is refused (HTTP 429).
    /// Default: 64.
    pub max_shared_views: usize,
    /// … of those, made by one token's subscriptions. Default: 16.
    pub max_shared_views_per_token: usize,
    /// A subscription view nobody subscribes to is dropped after this long (a client that
    /// reconnects sooner resumes where it was). Default: 5 minutes.
    pub shared_view_grace: Duration,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            data_dir: None,
            durability: Durability::Sync,
            wal_segment_bytes: 64 << 20,
            default_database: "main".to_string(),
            clock: Arc::new(SystemClock),
            query_memory_limit: None,
            io_faults: None,
            partition: Duration::from_secs(86_400),
            persist_bytes: 64 << 20,
            persist_age: Duration::from_secs(300),
            max_buffer_bytes: 1 << 30,
            compaction_segments: 4,
            background: true,
            persist_on_close: true,
            parquet_filter_pushdown: false,
            query_rewrites: true,
            hot_cache_bytes: 1 << 30,
            view_wait: Duration::from_secs(30),
            view_backfill_slice: Duration::from_millis(100),
            view_queue_bytes: 256 << 20,
            subscribe_log_bytes: 64 << 20,
            subscribe_log_age: Duration::from_secs(3600),
            wal_recovery: WalRecovery::Strict,
            max_databases: 100,
            max_tables_per_database: 2000,
            max_columns_per_table: 500,
            max_series_per_table: 1_000_000,
            max_shared_views: 64,
            max_shared_views_per_token: 16,
            shared_view_grace: Duration::from_secs(300),
        }
    }
}

impl Config {
    /// The defaults, stored in `dir`.
    pub fn with_dir(dir: impl Into<PathBuf>) -> Config {
        Config {
            data_dir: Some(dir.into()),
            ..Config::default()
        }
    }
}
