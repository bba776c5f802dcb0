//! Server counters, rendered in the Prometheus text format at `/metrics`.

use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use crate::DbStats;

/// Upper bounds (seconds) of the query latency histogram buckets.
const QUERY_BUCKETS: [f64; 10] = [0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 5.0, 30.0];

/// Counters updated by the handlers.
#[derive(Debug, Default)]
pub(crate) struct Metrics {
    pub(crate) writes: AtomicU64,
    pub(crate) write_rows: AtomicU64,
    pub(crate) write_bytes: AtomicU64,
    pub(crate) write_errors: AtomicU64,
    pub(crate) queries: AtomicU64,
    pub(crate) query_errors: AtomicU64,
    query_buckets: [AtomicU64; QUERY_BUCKETS.len()],
    query_nanos: AtomicU64,
    pub(crate) auth_failures: AtomicU64,
    pub(crate) in_flight: AtomicU64,
}

impl Metrics {
    pub(crate) fn add(counter: &AtomicU64, n: u64) {
        counter.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn observe_query(&self, took: Duration) {
        let secs = took.as_secs_f64();
        for (bucket, &le) in self.query_buckets.iter().zip(&QUERY_BUCKETS) {
            if secs <= le {
                bucket.fetch_add(1, Ordering::Relaxed);
            }
        }
        self.query_nanos
            .fetch_add(took.as_nanos() as u64, Ordering::Relaxed);
    }

    /// The Prometheus exposition text.
    pub(crate) fn render(&self, db: &DbStats, open_connections: u64) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::new();
        let counters = [
            (
                "rivulet_writes_total",
                "Write requests that stored rows.",
                get(&self.writes),
            ),
            (
                "rivulet_write_rows_total",
                "Rows stored by write requests.",
                get(&self.write_rows),
            ),
            (
                "rivulet_write_bytes_total",
                "Request body bytes of write requests.",
                get(&self.write_bytes),
            ),
            (
                "rivulet_write_errors_total",
                "Write requests that failed or rejected lines.",
                get(&self.write_errors),
            ),
            ("rivulet_queries_total", "Queries run.", get(&self.queries)),
            (
                "rivulet_query_errors_total",
                "Queries that failed.",
                get(&self.query_errors),
            ),
            (
                "rivulet_auth_failures_total",
                "Requests refused by authentication.",
                get(&self.auth_failures),
            ),
        ];
        for (name, help, value) in counters {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        self.render_query_histogram(&mut out);
        let gauges = [
            (
                "rivulet_http_requests_in_flight",
                "Requests being served.",
                get(&self.in_flight),
            ),
            (
                "rivulet_http_open_connections",
                "Open client connections.",
                open_connections,
            ),
            (
                "rivulet_subscribers",
                "Live subscriptions (all transports and embedded).",
                db.subscribers as u64,
            ),
            (
                "rivulet_last_sequence",
                "Sequence of the latest visible write.",
                db.last_seq,
            ),
            ("rivulet_databases", "Databases.", db.databases as u64),
            ("rivulet_tables", "Tables.", db.tables as u64),
            (
                "rivulet_buffer_rows",
                "Rows in the mutable buffers.",
                db.buffer_rows as u64,
            ),
            (
                "rivulet_buffer_bytes",
                "Memory of the mutable buffers.",
                db.buffer_bytes as u64,
            ),
            (
                "rivulet_persisted_sequence",
                "Every write up to this sequence is in segments.",
                db.persisted_seq,
            ),
            ("rivulet_segments", "Segment files.", db.segments as u64),
            (
                "rivulet_hot_cache_bytes",
                "Memory of the segments kept decoded (hot-segment cache).",
                db.hot_cache.bytes as u64,
            ),
            (
                "rivulet_hot_cache_limit_bytes",
                "The hot-segment cache's limit (--hot-cache-bytes).",
                db.hot_cache.limit_bytes as u64,
            ),
            (
                "rivulet_hot_cache_segments",
                "Segments kept decoded.",
                db.hot_cache.segments as u64,
            ),
            ("rivulet_segment_rows", "Rows in segments.", db.segment_rows),
            (
                "rivulet_segment_bytes",
                "Bytes of segment files.",
                db.segment_bytes,
            ),
        ];
        for (name, help, value) in gauges {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP rivulet_segments_scanned_total Segment files opened by queries.\n# TYPE rivulet_segments_scanned_total counter\nrivulet_segments_scanned_total {}",
            db.segments_scanned
        );
        for (name, help, value) in [
            (
                "rivulet_hot_cache_hits_total",
                "Segment reads by queries answered from the hot-segment cache.",
                db.hot_cache.hits,
            ),
            (
                "rivulet_hot_cache_misses_total",
                "Segment reads by queries that decoded the file.",
                db.hot_cache.misses,
            ),
            (
                "rivulet_hot_cache_evictions_total",
                "Segments dropped from the hot-segment cache to stay under its limit.",
                db.hot_cache.evictions,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {value}"
            );
        }
        let _ = writeln!(
            out,
            "# HELP rivulet_wal_fsync_seconds WAL fsyncs and the time spent in them.\n# TYPE rivulet_wal_fsync_seconds summary\nrivulet_wal_fsync_seconds_sum {}\nrivulet_wal_fsync_seconds_count {}",
            db.wal_fsync_seconds, db.wal_fsyncs
        );
        out
    }

    fn render_query_histogram(&self, out: &mut String) {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let _ = writeln!(
            out,
            "# HELP rivulet_query_duration_seconds Query latency.\n# TYPE rivulet_query_duration_seconds histogram"
        );
        for (bucket, le) in self.query_buckets.iter().zip(QUERY_BUCKETS) {
            let _ = writeln!(
                out,
                "rivulet_query_duration_seconds_bucket{{le=\"{le}\"}} {}",
                get(bucket)
            );
        }
        let count = get(&self.queries);
        let _ = writeln!(
            out,
            "rivulet_query_duration_seconds_bucket{{le=\"+Inf\"}} {count}"
        );
        let _ = writeln!(
            out,
            "rivulet_query_duration_seconds_sum {}\nrivulet_query_duration_seconds_count {count}",
            get(&self.query_nanos) as f64 / 1e9
        );
    }
}
