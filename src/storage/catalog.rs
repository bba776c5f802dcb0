//! The catalog: databases, tables and their columns, persisted in sled.
//!
//! The in-memory catalog is the one queries and writes read; sled is its durable copy. Catalog
//! writes are not fsynced on their own: every WAL record carries the schema of the rows it holds
//! (Arrow IPC), so replay re-creates any database, table or column sled lost in a crash. sled is
//! flushed before anything that would make the WAL unable to do so (close, and later WAL
//! truncation).
//!
//! Keys (all UTF-8, values JSON): `meta/format` → format version; `meta/next_seq` → the next
//! write sequence as of the last clean close; `meta/next_id` → the next database or table id,
//! written when a table is dropped; `db/<name>` → [`DatabaseRecord`];
//! `table/<db id:016x>/<name>` → [`TableRecord`]. Names are never file-system paths.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arrow::datatypes::{DataType, Field, Schema, SchemaRef, TimeUnit};
use parking_lot::RwLock;
use serde::{Deserialize, Serialize};

use super::io::{Io, IoOp};
use super::table::Table;

/// The catalog format version this build writes and reads.
pub(crate) const CATALOG_FORMAT_VERSION: u32 = 1;

/// Longest table, tag or field name, in bytes.
pub(crate) const MAX_NAME_BYTES: usize = 512;

/// The name of the timestamp column every table has.
pub(crate) const TIME_COLUMN: &str = "time";

/// The Arrow type of the `time` column.
pub(crate) fn time_type() -> DataType {
    DataType::Timestamp(TimeUnit::Nanosecond, Some("UTC".into()))
}

/// The Arrow type of tag columns.
pub(crate) fn tag_type() -> DataType {
    DataType::Dictionary(Box::new(DataType::Int32), Box::new(DataType::Utf8))
}

/// Errors of the catalog.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// sled failed.
    #[error("catalog storage error: {0}")]
    Sled(#[from] sled::Error),
    /// A stored record could not be decoded.
    #[error("catalog record '{key}' is corrupt: {reason}")]
    Corrupt {
        /// The sled key.
        key: String,
        /// What is wrong.
        reason: String,
    },
    /// A file operation on the catalog failed.
    #[error("catalog {op} failed: {source}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The OS error.
        source: std::io::Error,
    },
    /// The catalog was written by an incompatible version.
    #[error(
        "catalog format version {found} is not supported (this build reads version {expected})"
    )]
    Version {
        /// Version found on disk.
        found: u32,
        /// Version this build supports.
        expected: u32,
    },
}

/// The type of a field column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FieldType {
    /// `Float64`.
    Float,
    /// `Int64` (line protocol `i` suffix).
    Integer,
    /// `UInt64` (line protocol `u` suffix).
    UInteger,
    /// `Utf8`.
    String,
    /// `Boolean`.
    Boolean,
}

impl FieldType {
    /// The Arrow type the field is stored as.
    pub fn data_type(self) -> DataType {
        match self {
            FieldType::Float => DataType::Float64,
            FieldType::Integer => DataType::Int64,
            FieldType::UInteger => DataType::UInt64,
            FieldType::String => DataType::Utf8,
            FieldType::Boolean => DataType::Boolean,
        }
    }

    /// The field type for an Arrow type, if it is one.
    pub fn from_data_type(dt: &DataType) -> Option<FieldType> {
        match dt {
            DataType::Float64 => Some(FieldType::Float),
            DataType::Int64 => Some(FieldType::Integer),
            DataType::UInt64 => Some(FieldType::UInteger),
            DataType::Utf8 => Some(FieldType::String),
            DataType::Boolean => Some(FieldType::Boolean),
            _ => None,
        }
    }

    /// The name users see in errors.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::Float => "float",
            FieldType::Integer => "integer",
            FieldType::UInteger => "unsigned integer",
            FieldType::String => "string",
            FieldType::Boolean => "boolean",
        }
    }
}

/// What a column is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ColumnKind {
    /// The `time` column.
    Time,
    /// A tag: part of the series identity, dictionary-encoded string.
    Tag,
    /// A field of the given type.
    Field(FieldType),
}

impl ColumnKind {
    /// The Arrow type of a column of this kind.
    pub fn data_type(self) -> DataType {
        match self {
            ColumnKind::Time => time_type(),
            ColumnKind::Tag => tag_type(),
            ColumnKind::Field(t) => t.data_type(),
        }
    }

    /// The name users see in errors.
    pub fn describe(self) -> String {
        match self {
            ColumnKind::Time => "the time column".to_string(),
            ColumnKind::Tag => "a tag".to_string(),
            ColumnKind::Field(t) => format!("a {} field", t.name()),
        }
    }
}

/// A stored view definition: (database name, JSON).
pub(crate) type StoredView = (Arc<str>, Vec<u8>);

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct ColumnDef {
    /// Column name.
    pub name: Arc<str>,
    /// Time, tag or field (with type).
    pub kind: ColumnKind,
}

/// A table's schema: its columns sorted by name (as InfluxDB 3 shows them) and the Arrow schema.
#[derive(Debug)]
pub(crate) struct TableSchema {
    columns: Vec<ColumnDef>,
    /// A later write of a point replaces the whole row (nulls included) instead of only the
    /// fields it carries: materialized-view tables, whose rows are always written whole.
    whole_rows: bool,
    by_name: HashMap<Arc<str>, usize>,
    arrow: SchemaRef,
}

impl TableSchema {
    /// Builds a schema; `time` is always present.
    pub(crate) fn new(mut columns: Vec<ColumnDef>) -> TableSchema {
        if !columns.iter().any(|c| c.kind == ColumnKind::Time) {
            columns.push(ColumnDef {
                name: TIME_COLUMN.into(),
                kind: ColumnKind::Time,
            });
        }
        columns.sort_by(|a, b| a.name.cmp(&b.name));
        let by_name = columns
            .iter()
            .enumerate()
            .map(|(i, c)| (c.name.clone(), i))
            .collect();
        let fields: Vec<Field> = columns
            .iter()
            .map(|c| {
                Field::new(
                    c.name.as_ref(),
                    c.kind.data_type(),
                    c.kind != ColumnKind::Time,
                )
            })
            .collect();
        TableSchema {
            columns,
            whole_rows: false,
            by_name,
            arrow: Arc::new(Schema::new(fields)),
        }
    }

    /// Columns sorted by name.
    pub(crate) fn columns(&self) -> &[ColumnDef] {
        &self.columns
    }

    /// The column called `name`.
    pub(crate) fn column(&self, name: &str) -> Option<&ColumnDef> {
        self.by_name.get(name).map(|&i| &self.columns[i])
    }

    /// The Arrow schema queries see.
    pub(crate) fn arrow(&self) -> &SchemaRef {
        &self.arrow
    }

    /// A new schema with `added` columns appended.
    pub(crate) fn with_columns(&self, added: &[ColumnDef]) -> TableSchema {
        let mut cols = self.columns.clone();
        cols.extend(added.iter().cloned());
        TableSchema::new(cols).whole_rows(self.whole_rows)
    }

    /// The schema with [`Self::is_whole_rows`] set to `on`.
    pub(crate) fn whole_rows(mut self, on: bool) -> TableSchema {
        self.whole_rows = on;
        self
    }

    /// Whether a later write of a point replaces its whole row.
    pub(crate) fn is_whole_rows(&self) -> bool {
        self.whole_rows
    }
}

/// Stored form of a database.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct DatabaseRecord {
    /// Stable id, used in storage paths and keys.
    pub id: u64,
    /// Name.
    pub name: String,
}

/// Stored form of a table.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct TableRecord {
    /// Stable id, used in storage paths and keys.
    pub id: u64,
    /// Name.
    pub name: String,
    /// Columns (any order).
    pub columns: Vec<ColumnDef>,
    /// Tag columns segments are sorted by (absent before the first persist).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sort_key: Vec<String>,
    /// Retention in nanoseconds (absent: keep forever).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub retention_ns: Option<i64>,
    /// The table stores a materialized view's rows (written only by its maintenance).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub view: bool,
}

/// A database: a namespace of tables.
#[derive(Debug)]
pub(crate) struct Database {
    /// Stable id.
    pub id: u64,
    /// Name.
    pub name: Arc<str>,
    tables: RwLock<BTreeMap<Arc<str>, Arc<Table>>>,
}

impl Database {
    /// The table called `name`.
    pub(crate) fn table(&self, name: &str) -> Option<Arc<Table>> {
        self.tables.read().get(name).cloned()
    }

    /// All tables, sorted by name.
    pub(crate) fn tables(&self) -> Vec<Arc<Table>> {
        self.tables.read().values().cloned().collect()
    }

    /// How many tables it has (views' storage included).
    pub(crate) fn table_count(&self) -> usize {
        self.tables.read().len()
    }
}

/// Caps on what writes may create (docs/limits.md). Checked when a write is prepared:
/// writes prepared at the same moment may together pass a cap by their own new entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Limits {
    /// Databases (`--max-databases`).
    pub(crate) databases: usize,
    /// Tables in one database (`--max-tables-per-database`).
    pub(crate) tables_per_database: usize,
    /// Columns of one table, `time` and tags included (`--max-columns-per-table`).
    pub(crate) columns_per_table: usize,
    /// Series (distinct tag sets) of one table since open (`--max-series-per-table`).
    pub(crate) series_per_table: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            databases: 100,
            tables_per_database: 2000,
            columns_per_table: 500,
            series_per_table: 1_000_000,
        }
    }
}

/// The catalog of databases and tables.
pub(crate) struct Catalog {
    limits: Limits,
    sled: sled::Db,
    io: Io,
    tree: sled::Tree,
    databases: RwLock<BTreeMap<Arc<str>, Arc<Database>>>,
    next_id: AtomicU64,
}

impl std::fmt::Debug for Catalog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Catalog")
            .field(
                "databases",
                &self.databases.read().keys().collect::<Vec<_>>(),
            )
            .finish()
    }
}

fn corrupt(key: &[u8], reason: impl ToString) -> CatalogError {
    CatalogError::Corrupt {
        key: String::from_utf8_lossy(key).into_owned(),
        reason: reason.to_string(),
    }
}

impl Catalog {
    /// The caps on what writes create.
    pub(crate) fn limits(&self) -> Limits {
        self.limits
    }

    /// Sets the caps (at open, before any write).
    pub(crate) fn with_limits(mut self, limits: Limits) -> Catalog {
        self.limits = limits;
        self
    }

    /// Loads the catalog from `sled`.
    pub(crate) fn load(sled: sled::Db, io: Io) -> Result<Catalog, CatalogError> {
        let tree = sled.open_tree("catalog")?;
        match tree.get("meta/format")? {
            None => {
                tree.insert("meta/format", CATALOG_FORMAT_VERSION.to_string().as_bytes())?;
            }
            Some(v) => {
                let found: u32 = std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse().ok())
                    .ok_or_else(|| corrupt(b"meta/format", "not a number"))?;
                if found != CATALOG_FORMAT_VERSION {
                    return Err(CatalogError::Version {
                        found,
                        expected: CATALOG_FORMAT_VERSION,
                    });
                }
            }
        }
        let mut max_id = 0;
        let mut databases = BTreeMap::new();
        let mut by_id = HashMap::new();
        for item in tree.scan_prefix("db/") {
            let (key, value) = item?;
            let rec: DatabaseRecord =
                serde_json::from_slice(&value).map_err(|e| corrupt(&key, e))?;
            max_id = max_id.max(rec.id);
            let db = Arc::new(Database {
                id: rec.id,
                name: rec.name.as_str().into(),
                tables: RwLock::new(BTreeMap::new()),
            });
            by_id.insert(rec.id, db.clone());
            databases.insert(db.name.clone(), db);
        }
        for item in tree.scan_prefix("table/") {
            let (key, value) = item?;
            let rec: TableRecord = serde_json::from_slice(&value).map_err(|e| corrupt(&key, e))?;
            let db_id = std::str::from_utf8(&key)
                .ok()
                .and_then(|k| k.split('/').nth(1))
                .and_then(|id| u64::from_str_radix(id, 16).ok())
                .ok_or_else(|| corrupt(&key, "bad key"))?;
            let db = by_id
                .get(&db_id)
                .ok_or_else(|| corrupt(&key, format!("unknown database id {db_id}")))?;
            max_id = max_id.max(rec.id);
            let table = Arc::new(Table::new(
                rec.id,
                db.name.clone(),
                rec.name.as_str().into(),
                TableSchema::new(rec.columns).whole_rows(rec.view),
            ));
            *table.settings.write() = super::table::TableSettings {
                sort_key: rec.sort_key.iter().map(|s| s.as_str().into()).collect(),
                retention: rec.retention_ns,
                view: rec.view,
            };
            db.tables.write().insert(table.name.clone(), table);
        }
        // Ids are never reused (storage paths are built from them): `meta/next_id` remembers
        // ids of dropped tables above every remaining one.
        let stored_next = match tree.get("meta/next_id")? {
            None => 0,
            Some(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| corrupt(b"meta/next_id", "not a number"))?,
        };
        Ok(Catalog {
            limits: Limits::default(),
            sled,
            io,
            tree,
            databases: RwLock::new(databases),
            next_id: AtomicU64::new((max_id + 1).max(stored_next)),
        })
    }

    /// The database called `name`.
    pub(crate) fn database(&self, name: &str) -> Option<Arc<Database>> {
        self.databases.read().get(name).cloned()
    }

    /// All databases, sorted by name.
    pub(crate) fn databases(&self) -> Vec<Arc<Database>> {
        self.databases.read().values().cloned().collect()
    }

    /// The names of all databases, sorted.
    pub(crate) fn database_names(&self) -> Vec<String> {
        self.databases
            .read()
            .keys()
            .map(|n| n.to_string())
            .collect()
    }

    /// The table `name` of database `db`.
    pub(crate) fn table(&self, db: &str, name: &str) -> Option<Arc<Table>> {
        self.database(db)?.table(name)
    }

    /// A fresh id for a database or table.
    pub(crate) fn allocate_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Creates database `name` unless it exists; returns it.
    pub(crate) fn ensure_database(&self, name: &str) -> Result<Arc<Database>, CatalogError> {
        if let Some(db) = self.database(name) {
            return Ok(db);
        }
        let mut dbs = self.databases.write();
        if let Some(db) = dbs.get(name) {
            return Ok(db.clone());
        }
        let rec = DatabaseRecord {
            id: self.allocate_id(),
            name: name.to_string(),
        };
        let value = serde_json::to_vec(&rec).map_err(|e| corrupt(name.as_bytes(), e))?;
        self.tree.insert(format!("db/{name}"), value)?;
        let db = Arc::new(Database {
            id: rec.id,
            name: name.into(),
            tables: RwLock::new(BTreeMap::new()),
        });
        dbs.insert(db.name.clone(), db.clone());
        Ok(db)
    }

    /// Registers a new table, or stores an existing table's changed schema. The caller (the
    /// single writer) has already published `table`'s schema.
    pub(crate) fn save_table(&self, db: &Database, table: &Arc<Table>) -> Result<(), CatalogError> {
        let schema = table.schema();
        let settings = table.settings.read().clone();
        let rec = TableRecord {
            id: table.id,
            name: table.name.to_string(),
            columns: schema.columns().to_vec(),
            sort_key: settings.sort_key.iter().map(|s| s.to_string()).collect(),
            retention_ns: settings.retention,
            view: settings.view,
        };
        let key = format!("table/{:016x}/{}", db.id, table.name);
        let value = serde_json::to_vec(&rec).map_err(|e| corrupt(key.as_bytes(), e))?;
        self.tree.insert(key, value)?;
        db.tables
            .write()
            .entry(table.name.clone())
            .or_insert_with(|| table.clone());
        Ok(())
    }

    /// Removes `table` from `db` (its data must already be gone from the manifest). Its id is
    /// not given out again, even after a restart.
    pub(crate) fn drop_table(&self, db: &Database, name: &str) -> Result<(), CatalogError> {
        let key = format!("table/{:016x}/{}", db.id, name);
        let next = self.next_id.load(Ordering::Relaxed);
        self.tree
            .insert("meta/next_id", next.to_string().as_bytes())?;
        self.tree.remove(key)?;
        db.tables.write().remove(name);
        Ok(())
    }

    /// Stores a materialized view's definition (JSON) under database `db`.
    pub(crate) fn save_view(
        &self,
        db: &Database,
        name: &str,
        json: &[u8],
    ) -> Result<(), CatalogError> {
        self.tree
            .insert(format!("view/{:016x}/{}", db.id, name), json)?;
        Ok(())
    }

    /// Removes a materialized view's definition.
    pub(crate) fn remove_view(&self, db: &Database, name: &str) -> Result<(), CatalogError> {
        self.tree.remove(format!("view/{:016x}/{}", db.id, name))?;
        Ok(())
    }

    /// Every stored view definition.
    pub(crate) fn views(&self) -> Result<Vec<StoredView>, CatalogError> {
        let by_id: HashMap<u64, Arc<str>> = self
            .databases()
            .iter()
            .map(|d| (d.id, d.name.clone()))
            .collect();
        let mut out = Vec::new();
        for item in self.tree.scan_prefix("view/") {
            let (key, value) = item?;
            let db = std::str::from_utf8(&key)
                .ok()
                .and_then(|k| k.split('/').nth(1))
                .and_then(|id| u64::from_str_radix(id, 16).ok())
                .and_then(|id| by_id.get(&id).cloned())
                .ok_or_else(|| corrupt(&key, "bad key or unknown database"))?;
            out.push((db, value.to_vec()));
        }
        Ok(out)
    }

    /// The next write sequence recorded at the last clean close (0 when never recorded).
    pub(crate) fn stored_next_seq(&self) -> Result<u64, CatalogError> {
        match self.tree.get("meta/next_seq")? {
            None => Ok(0),
            Some(v) => std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| corrupt(b"meta/next_seq", "not a number")),
        }
    }

    /// Records the next write sequence, so sequences continue after the WAL is truncated.
    pub(crate) fn store_next_seq(&self, seq: u64) -> Result<(), CatalogError> {
        self.tree
            .insert("meta/next_seq", seq.to_string().as_bytes())?;
        Ok(())
    }

    /// The sled database (the segment manifest lives in it too).
    pub(crate) fn sled(&self) -> &sled::Db {
        &self.sled
    }

    /// Makes everything written to the catalog durable.
    pub(crate) fn flush(&self) -> Result<(), CatalogError> {
        self.io
            .check(IoOp::CatalogFlush, std::path::Path::new("catalog"))
            .map_err(|source| CatalogError::Io {
                op: "flushing",
                source,
            })?;
        self.sled.flush()?;
        Ok(())
    }
}

/// Why a name is not allowed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum NameError {
    /// A table, tag or field name is empty.
    #[error("the name is empty")]
    Empty,
    /// A table, tag or field name is too long.
    #[error("the name is {len} bytes long; the limit is {MAX_NAME_BYTES}")]
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// A name holds a control character.
    #[error("the name contains the control character {0:?}")]
    Control(char),
    /// A database name is empty or longer than 64 characters.
    #[error("database name '{0}' must be 1 to 64 characters long")]
    DatabaseLength(String),
    /// A database name holds something other than letters, digits, `_` and `-`.
    #[error("database name '{0}' may only contain letters, digits, '_' and '-'")]
    DatabaseCharacters(String),
    /// A database name that queries use for Rivulet's own schemas.
    #[error(
        "database name '{0}' is reserved: queries use it for Rivulet's own tables (system.views, information_schema)"
    )]
    DatabaseReserved(String),
}

/// Database names queries reserve for their own schemas.
pub(crate) const RESERVED_DATABASES: [&str; 2] = ["system", "information_schema"];

/// Why a table, tag or field name is not allowed, if it is not.
pub(crate) fn check_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() {
        return Err(NameError::Empty);
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(NameError::TooLong { len: name.len() });
    }
    if let Some(c) = name.chars().find(|c| c.is_control()) {
        return Err(NameError::Control(c));
    }
    Ok(())
}

/// Why a database name is not allowed, if it is not: 1–64 letters, digits, `_` or `-`.
pub(crate) fn check_database_name(name: &str) -> Result<(), NameError> {
    if name.is_empty() || name.len() > 64 {
        return Err(NameError::DatabaseLength(name.to_string()));
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    {
        return Err(NameError::DatabaseCharacters(name.to_string()));
    }
    if RESERVED_DATABASES.contains(&name) {
        return Err(NameError::DatabaseReserved(name.to_string()));
    }
    Ok(())
}

#[cfg(test)]
mod tests;
