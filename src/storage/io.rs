//! The storage I/O seam: every file operation that makes data durable or reads it back at
//! open goes through [`Io::check`] first, so a test can fail the N-th call of any kind
//! ([`IoFaults`]): WAL appends, creations and fsyncs, segment writes and syncs, renames, the
//! manifest commit, the catalog flush, the table metadata file and the views' change logs.
//! Without a hook ([`Config::io_faults`](crate::Config::io_faults) unset) a check is one
//! branch.

use std::fmt::Debug;
use std::io;
use std::path::Path;
use std::sync::Arc;

/// A kind of storage I/O operation a fault hook can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum IoOp {
    /// Appending a record to the WAL.
    WalAppend,
    /// Fsyncing a WAL segment.
    WalSync,
    /// Reading a WAL segment at open.
    WalRead,
    /// Creating a WAL segment (header written and fsynced, directory fsynced).
    WalCreate,
    /// Writing a segment file's rows.
    SegmentWrite,
    /// Fsyncing a finished segment file, or a directory a file was created or renamed in.
    FileSync,
    /// Renaming a finished file into place (segment, `_table.json`, change log, migration).
    Rename,
    /// Committing the segment manifest (one sled batch, flushed).
    ManifestCommit,
    /// Flushing the catalog (sled).
    CatalogFlush,
    /// Writing a table's `_table.json`.
    TableMetaWrite,
    /// Reading a view's change log at open.
    ChangeLogRead,
    /// Appending to or rewriting a view's change log.
    ChangeLogWrite,
}

/// A hook that lets tests fail storage I/O at chosen points (the fault sweep fails the N-th
/// call of each kind in turn).
pub trait IoFaults: Send + Sync + Debug {
    /// Called before each storage I/O operation `op` on `path`; an error fails that operation
    /// as the operation's own error would.
    fn before(&self, op: IoOp, path: &Path) -> io::Result<()>;
}

/// The seam every storage file operation passes: cheap to clone, a no-op without a hook.
#[derive(Clone, Default)]
pub(crate) struct Io {
    faults: Option<Arc<dyn IoFaults>>,
}

impl Debug for Io {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Io")
            .field("faults", &self.faults.is_some())
            .finish()
    }
}

impl Io {
    pub(crate) fn new(faults: Option<Arc<dyn IoFaults>>) -> Io {
        Io { faults }
    }

    /// Asks the hook whether `op` on `path` may happen now.
    pub(crate) fn check(&self, op: IoOp, path: &Path) -> io::Result<()> {
        match &self.faults {
            Some(f) => f.before(op, path),
            None => Ok(()),
        }
    }
}
