//! Storage: the WAL, group commit, the catalog, tables and their mutable buffers.

pub(crate) mod buffer;
pub(crate) mod catalog;
pub(crate) mod commit;
pub(crate) mod last;
pub(crate) mod manifest;
pub(crate) mod segment;
pub(crate) mod table;
pub(crate) mod wal;
