//! The integration tests, in one test binary (each binary links DataFusion again: one binary
//! builds and links once). `cargo test --test integration segments::` runs one module.
//!
//! - `embedded`: the embedded API end to end (writes, queries, restarts, faults, locks);
//! - `segments`: persistence, pruning, compaction, retention, the directory layout and names;
//! - `dedup_oracle`: last write wins per field, against a map of the same writes (proptest);
//! - `views`, `views_oracle`: materialized views with storage, and against plain DataFusion;
//! - `subscribe`: embedded subscriptions (snapshot, changes, resume, conflation, lagged);
//! - `http`, `subscribe_http`: the HTTP API and subscriptions over SSE, WebSocket, long-poll;
//! - `flight`: Arrow Flight on the HTTP port (InfluxDB 3 tickets) with arrow-flight's client;
//! - `pg`: the Postgres wire protocol with tokio-postgres (parameters, binary, errors, scopes);
//! - `hot_cache`: the hot-segment cache against the files (proptest), its limit;
//! - `rewrite_oracle`: query rewrites (the last-point state) against the plain plan (proptest);
//! - `fault_sweep`: every storage I/O call of a workload failing in turn;
//! - `crash`: SIGKILLed writer children (the child is this binary, run as `crash::crash_child`).

mod common;

mod crash;
mod dedup_oracle;
mod embedded;
mod fault_sweep;
mod flight;
mod hot_cache;
mod http;
mod pg;
mod rewrite_oracle;
mod segments;
mod subscribe;
mod subscribe_http;
mod views;
mod views_oracle;
