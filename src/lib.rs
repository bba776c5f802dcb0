//! # Rivulet
//!
//! An embedded time-series database with continuous queries, on Apache Arrow and DataFusion.
//! Points arrive as InfluxDB line protocol or Arrow batches, are logged to a WAL, land in a
//! columnar buffer and are queried with SQL.
//!
//! ```
//! use rivulet::{Db, Precision};
//!
//! # fn main() -> Result<(), rivulet::Error> {
//! let db = Db::open_in_memory()?;
//! let receipt = db.write_lines(
//!     "main",
//!     "cpu,host=a usage=0.5 1700000000\ncpu,host=b usage=0.7 1700000000",
//!     Precision::Second,
//! )?;
//! assert_eq!(receipt.rows, 2);
//!
//! let rt = tokio::runtime::Builder::new_current_thread().build().expect("runtime");
//! let batches = rt.block_on(db.sql("SELECT host, usage FROM cpu ORDER BY host"))?;
//! let text = arrow::util::pretty::pretty_format_batches(&batches).expect("format").to_string();
//! assert!(text.contains("| a    | 0.5   |"));
//! db.close()?;
//! # Ok(())
//! # }
//! ```
//!
//! ## Data model
//! A [`Db`] holds databases (created on first write); a database holds tables. Every table has
//! `time` (`Timestamp(ns, UTC)`), tag columns (dictionary-encoded strings that identify a
//! series) and field columns (`Float64`, `Int64`, `UInt64`, `Utf8`, `Boolean`). A field keeps its
//! first type. Same series and same time is the same point: a later write overwrites the fields
//! it carries.
//!
//! ## Arrow writes
//! [`Db::write_batch`] maps columns as follows: `time` is a timestamp of any unit (or Int64
//! nanoseconds) without nulls; dictionary-encoded string columns, and string columns the table
//! already has as tags, are tags; every other column is a field.
//!
//! ## Durability
//! A write returns after its WAL record is durable ([`Durability::Sync`], the default), with
//! a sequence number that increases strictly and continues across restarts.

#![forbid(unsafe_code)]

mod clock;
mod config;
mod db;
mod error;
mod ingest;
mod query;
pub mod server;
mod storage;
mod subscribe;
mod views;

pub use clock::{Clock, ManualClock, SystemClock};
pub use config::{Config, Durability};
pub use db::{CompactReport, Db, DbStats, PersistReport, ViewError, WriteOptions, WriteReceipt};
pub use error::Error;
pub use ingest::WriteError;
pub use ingest::check::ImportCheck;
pub use ingest::line_protocol::{self, LineError, Precision};
pub use storage::catalog::{CatalogError, ColumnKind, FieldType};
pub use storage::hot::HotCacheStats;
pub use storage::io::{IoFaults, IoOp};
pub use storage::segment::SegmentError;
pub use storage::wal::{RecoveredSegment, ReplayReport, WalError, WalRecovery};
pub use subscribe::{ChangeBatch, ChangeKind, Op, SubscribeError, SubscribeOptions, Subscription};
pub use subscribe::{error_json, message_arrow, message_json};
