//! Storage: the WAL, group commit, the catalog, tables and their mutable buffers, segment files
//! and the data directory's layout.

pub(crate) mod buffer;
pub(crate) mod catalog;
pub(crate) mod commit;
pub(crate) mod compact;
pub(crate) mod engine;
pub(crate) mod hot;
pub(crate) mod io;
pub(crate) mod last;
pub(crate) mod layout;
pub(crate) mod manifest;
mod open;
pub(crate) mod persist;
pub(crate) mod segment;
pub(crate) mod segment_scan;
pub(crate) mod table;
pub(crate) mod wal;
