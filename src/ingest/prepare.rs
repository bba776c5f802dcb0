//! Turns parsed lines into per-table chunks, checking them against the catalog (Arrow batches:
//! [`super::batch`]).
//!
//! Runs under the single write lock, so the catalog cannot change underneath it. Nothing here
//! changes the catalog: new databases, tables and columns are returned as part of the
//! [`PreparedWrite`] and published only once the write's WAL record is written.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use super::builder::{ChunkBuilder, Value};
use super::line_protocol::{FieldValue, Line, LineError, MAX_LISTED_ERRORS, ParsedLines, Token};
use super::{Refusal, WriteError};
use crate::storage::buffer::Chunk;
use crate::storage::catalog::{
    Catalog, ColumnDef, ColumnKind, Database, FieldType, TIME_COLUMN, TableSchema, check_name,
};
pub(crate) use crate::storage::engine::PreparedTable;
use crate::storage::engine::WriteSet;
use crate::storage::table::{SeriesIndex, Table, canonical_key};

/// A validated write, ready to be sequenced.
pub(crate) struct PreparedWrite {
    pub(crate) db_name: Arc<str>,
    /// None when the database does not exist yet.
    pub(crate) db: Option<Arc<Database>>,
    pub(crate) tables: Vec<PreparedTable>,
    /// Lines rejected in accept-partial mode.
    pub(crate) rejected: Vec<LineError>,
    pub(crate) rejected_total: usize,
    pub(crate) rows: usize,
}

/// What a write reports beside its sequence: rows stored and lines rejected.
#[derive(Debug, Default)]
pub(crate) struct WriteSummary {
    pub(crate) rows: usize,
    pub(crate) rejected: Vec<LineError>,
    pub(crate) rejected_total: usize,
}

impl PreparedWrite {
    /// The part the storage engine logs and applies, and the summary for the caller.
    pub(crate) fn split(self) -> (WriteSet, WriteSummary) {
        let summary = WriteSummary {
            rows: self.rows,
            rejected: self.rejected,
            rejected_total: self.rejected_total,
        };
        let set = WriteSet {
            db_name: self.db_name,
            db: self.db,
            tables: self.tables,
        };
        (set, summary)
    }
}

/// Why a line with a new series is refused past the series cap.
pub(super) fn series_limit(table: &str, max: usize) -> String {
    format!(
        "table '{table}' has {max} series (distinct tag sets), the most allowed \
         (--max-series-per-table, Config::max_series_per_table); a new tag set is refused: \
         raise the limit, or keep unbounded values (ids, timestamps) in fields, not tags"
    )
}

/// Tables whose names start with this are Rivulet's own (e.g. view progress).
pub(crate) const RESERVED_PREFIX: &str = "__rivulet";

/// Names of the internal views that keep subscriptions to aggregate queries current (inside
/// the reserved namespace: no write or statement can make, read or drop one).
pub(crate) const SUBSCRIPTION_VIEW_PREFIX: &str = "__rivulet_sub_";

/// Resolves a table for writing: the catalog's, or a new unregistered one.
/// Only `system` writes (view maintenance, WAL replay) may write view tables or reserved names.
pub(super) fn resolve_table(
    catalog: &Catalog,
    db: Option<&Arc<Database>>,
    db_name: &Arc<str>,
    name: &str,
    system: bool,
    new_tables: usize,
) -> Result<(Arc<Table>, bool), Refusal> {
    if let Some(t) = db.and_then(|d| d.table(name)) {
        if !system && t.settings.read().view {
            return Err(Refusal(format!(
                "'{name}' is a materialized view: only its definition writes it"
            )));
        }
        return Ok((t, false));
    }
    if !system && name.starts_with(RESERVED_PREFIX) {
        return Err(Refusal(format!(
            "invalid table name '{name}': names starting with '{RESERVED_PREFIX}' are reserved"
        )));
    }
    check_name(name).map_err(|e| format!("invalid table name '{name}': {e}"))?;
    if !system {
        let limits = catalog.limits();
        if db.is_none() && catalog.database_names().len() >= limits.databases {
            return Err(Refusal(format!(
                "database '{db_name}' would be one more than the limit of {} databases \
                 (--max-databases, Config::max_databases)",
                limits.databases
            )));
        }
        if db.map_or(0, |d| d.table_count()) + new_tables >= limits.tables_per_database {
            return Err(Refusal(format!(
                "table '{name}' would be one more than the limit of {} tables in database \
                 '{db_name}' (--max-tables-per-database, Config::max_tables_per_database)",
                limits.tables_per_database
            )));
        }
    }
    let table = Table::new(
        catalog.allocate_id(),
        db_name.clone(),
        name.into(),
        TableSchema::new(Vec::new()),
    );
    Ok((Arc::new(table), true))
}

/// Column lookups for one table during one write: the schema plus the columns this write adds.
pub(super) struct Columns<'s> {
    pub(super) schema: &'s TableSchema,
    pub(super) added: Vec<ColumnDef>,
    pub(super) added_by_name: HashMap<Arc<str>, usize>,
    pub(super) db: &'s str,
    pub(super) table: &'s str,
    /// The column cap (`Limits::columns_per_table`) and whether it applies (not to Rivulet's
    /// own writes).
    pub(super) max_columns: usize,
    pub(super) system: bool,
}

impl Columns<'_> {
    /// The kind of column `name` for a value of `want`, adding the column if it is new.
    pub(super) fn resolve(&mut self, name: &str, want: ColumnKind) -> Result<ColumnKind, Refusal> {
        if name == TIME_COLUMN {
            return Err(Refusal(format!(
                "'{TIME_COLUMN}' is reserved for the timestamp and cannot be a tag or field name"
            )));
        }
        let have = self
            .schema
            .column(name)
            .map(|c| c.kind)
            .or_else(|| self.added_by_name.get(name).map(|&i| self.added[i].kind));
        match have {
            Some(kind) if kind == want => Ok(kind),
            Some(kind) => Err(Refusal(self.conflict(name, kind, want))),
            None => {
                check_name(name).map_err(|e| format!("invalid column name '{name}': {e}"))?;
                let have = self.schema.columns().len().max(1) + self.added.len();
                if !self.system && have >= self.max_columns {
                    return Err(Refusal(format!(
                        "column '{name}' would be one more than the limit of {} columns of table \
                         '{}' in database '{}' (--max-columns-per-table, \
                         Config::max_columns_per_table)",
                        self.max_columns, self.table, self.db
                    )));
                }
                let name: Arc<str> = name.into();
                self.added_by_name.insert(name.clone(), self.added.len());
                self.added.push(ColumnDef { name, kind: want });
                Ok(want)
            }
        }
    }

    /// Forgets the columns added after `mark` (they came from a line that was rejected).
    pub(super) fn rollback(&mut self, mark: usize) {
        for c in self.added.drain(mark..) {
            self.added_by_name.remove(&c.name);
        }
    }

    fn conflict(&self, name: &str, have: ColumnKind, want: ColumnKind) -> String {
        let (db, table) = (self.db, self.table);
        match (have, want) {
            (ColumnKind::Field(h), ColumnKind::Field(w)) => format!(
                "field '{name}' of table '{table}' in database '{db}' has type {}, but this line writes {}",
                h.name(),
                w.name()
            ),
            _ => format!(
                "'{name}' is {} of table '{table}' in database '{db}', but this line writes it as {}",
                have.describe(),
                want.describe()
            ),
        }
    }

    /// The columns added, keeping only those the chunk used.
    fn into_added(self, builder: &ChunkBuilder) -> Vec<ColumnDef> {
        let used: std::collections::HashSet<&str> =
            builder.used_columns().map(|(n, _)| &**n).collect();
        self.added
            .into_iter()
            .filter(|c| used.contains(&*c.name))
            .collect()
    }
}

pub(super) fn field_kind(v: &FieldValue<'_>) -> ColumnKind {
    ColumnKind::Field(match v {
        FieldValue::Float(_) => FieldType::Float,
        FieldValue::Integer(_) => FieldType::Integer,
        FieldValue::UInteger(_) => FieldType::UInteger,
        FieldValue::Boolean(_) => FieldType::Boolean,
        FieldValue::String(_) => FieldType::String,
    })
}

/// Byte column (1-based) of `token` in the line starting at `line_start`.
pub(super) fn column_of(line_start: &str, token: &str) -> usize {
    (token.as_ptr() as usize).saturating_sub(line_start.as_ptr() as usize) + 1
}

struct Rejections {
    list: Vec<LineError>,
    total: usize,
}

impl Rejections {
    fn push(&mut self, e: LineError) {
        self.total += 1;
        if self.list.len() < MAX_LISTED_ERRORS {
            self.list.push(e);
        }
    }
}

/// Validates parsed lines against the catalog and builds one chunk per table.
///
/// Atomic mode (`accept_partial == false`): any bad line, syntax or schema, rejects the whole
/// write and every bad line is reported. Partial mode: bad lines are left out and reported.
pub(crate) fn prepare_lines(
    catalog: &Catalog,
    db_name: &str,
    parsed: &ParsedLines<'_>,
    default_time: i64,
    accept_partial: bool,
) -> Result<PreparedWrite, WriteError> {
    let db_name: Arc<str> = db_name.into();
    let db = catalog.database(&db_name);
    let mut run = LineRun {
        parsed,
        db_name: &db_name,
        catalog_limits: catalog.limits(),
        default_time,
        accept_partial,
        rejected: Rejections {
            list: parsed.errors.clone(),
            total: parsed.error_count,
        },
        scratch: String::new(),
    };
    let mut tables = Vec::new();
    let mut rows = 0;
    for (name, line_ids) in &group_by_table(parsed) {
        let new_tables = tables.iter().filter(|t: &&PreparedTable| t.is_new).count();
        let (table, is_new) =
            match resolve_table(catalog, db.as_ref(), &db_name, name, false, new_tables) {
                Ok(t) => t,
                Err(reason) => {
                    for &i in line_ids {
                        let line = &parsed.lines[i as usize];
                        run.rejected.push(LineError {
                            line: line.line_no,
                            column: 1,
                            reason: reason.0.clone(),
                        });
                    }
                    continue;
                }
            };
        let part = match run.table_chunk(&table, name, line_ids) {
            Ok(p) => p,
            Err(e) => {
                rollback_series(tables);
                return Err(e);
            }
        };
        if let Some((chunk, new_columns, series_undo)) = part {
            rows += chunk.rows();
            tables.push(PreparedTable {
                table,
                is_new,
                new_columns,
                chunk,
                series_undo,
            });
        }
    }
    let mut rejected = run.rejected;
    rejected.list.sort_by_key(|e| e.line);
    if !accept_partial && rejected.total > 0 {
        // Tables before the first bad line took their series in: they go again.
        rollback_series(tables);
        return Err(WriteError::Rejected {
            db: db_name.to_string(),
            errors: rejected.list,
            total: rejected.total,
        });
    }
    Ok(PreparedWrite {
        db_name,
        db,
        tables,
        rejected: rejected.list,
        rejected_total: rejected.total,
        rows,
    })
}

/// Undoes what `tables` (of a rejected write) did to their series indexes.
fn rollback_series(tables: Vec<PreparedTable>) {
    for mut t in tables {
        if let Some(undo) = t.series_undo.take() {
            t.table.series.lock().rollback(undo);
        }
    }
}

/// Line indices grouped by measurement, tables in order of first appearance, lines in input
/// order within each.
fn group_by_table<'p>(parsed: &'p ParsedLines<'_>) -> Vec<(Cow<'p, str>, Vec<u32>)> {
    let mut groups: Vec<(Cow<'p, str>, Vec<u32>)> = Vec::new();
    let mut group_of: HashMap<Cow<'p, str>, usize> = HashMap::new();
    let mut last: Option<(&str, usize)> = None;
    for (i, line) in parsed.lines.iter().enumerate() {
        let raw = line.measurement.raw();
        let g = match last {
            Some((name, g)) if name == raw => g,
            _ => {
                let name = line.measurement.to_cow();
                let g = *group_of.entry(name.clone()).or_insert_with(|| {
                    groups.push((name, Vec::new()));
                    groups.len() - 1
                });
                last = Some((raw, g));
                g
            }
        };
        groups[g].1.push(i as u32);
    }
    groups
}

/// A table's part of a write: its chunk, the columns it adds and what it did to the table's
/// series index.
type TableChunk = (
    Chunk,
    Vec<ColumnDef>,
    Option<crate::storage::table::SeriesUndo>,
);

/// One `prepare_lines` call: the lines, the write's settings and what it has rejected so far.
struct LineRun<'p, 'a> {
    parsed: &'p ParsedLines<'a>,
    db_name: &'p str,
    catalog_limits: crate::storage::catalog::Limits,
    default_time: i64,
    accept_partial: bool,
    rejected: Rejections,
    /// Unescaping buffer for string field values.
    scratch: String,
}

/// Column slots of the line being built, and caches of the key shapes recent lines of the
/// table used (lines of one table usually repeat the same keys in the same order).
#[derive(Default)]
struct Shapes<'a> {
    tag_cache: Vec<(&'a str, usize)>,
    field_cache: Vec<(&'a str, ColumnKind, usize)>,
    tag_slots: Vec<usize>,
    field_slots: Vec<usize>,
    /// Tag keys and values, unescaped.
    tag_scratch: Vec<(Cow<'a, str>, Cow<'a, str>)>,
}

impl<'a> LineRun<'_, 'a> {
    /// Validates the lines `line_ids` of table `name` and builds its chunk (None when no line
    /// was kept), with the columns it adds.
    fn table_chunk(
        &mut self,
        table: &Arc<Table>,
        name: &str,
        line_ids: &[u32],
    ) -> Result<Option<TableChunk>, WriteError> {
        let schema = table.schema();
        let mut columns = Columns {
            schema: &schema,
            added: Vec::new(),
            added_by_name: HashMap::new(),
            db: self.db_name,
            table: name,
            max_columns: self.catalog_limits.columns_per_table,
            system: false,
        };
        let mut builder = ChunkBuilder::new();
        let mut series = table.series.lock();
        series.begin();
        let mut shapes = Shapes::default();
        for &i in line_ids {
            let line = &self.parsed.lines[i as usize];
            let mark = columns.added.len();
            let mut refused = shapes.resolve(self.parsed, line, &mut columns, &mut builder);
            if refused.is_ok() && (self.accept_partial || self.rejected.total == 0) {
                refused = self.append(line, &mut shapes, &mut series, &mut builder);
            }
            // (Once the write is rejected, lines are still checked to report every bad one.)
            if let Err(e) = refused {
                columns.rollback(mark);
                // Cached shapes may point at the rolled-back columns.
                shapes.tag_cache.clear();
                shapes.field_cache.clear();
                self.rejected.push(e);
            }
        }
        let undo = series.end();
        let new_columns = columns.into_added(&builder);
        let finished = builder.finish();
        if finished.is_err() || (!self.accept_partial && self.rejected.total > 0) {
            // Nothing of this table will be stored: its new series go.
            if let Some(u) = undo {
                series.rollback(u);
            }
            drop(series);
            return Ok(finished?.map(|chunk| (chunk, Vec::new(), None)));
        }
        drop(series);
        Ok(finished?.map(|chunk| (chunk, new_columns, undo)))
    }

    /// Appends one validated line: its series, tags (once per series) and fields. Refused
    /// when it would be one series too many for the table.
    fn append(
        &mut self,
        line: &Line<'a>,
        shapes: &mut Shapes<'a>,
        series: &mut SeriesIndex,
        builder: &mut ChunkBuilder,
    ) -> Result<(), LineError> {
        let tags = self.parsed.tags(line);
        let fields = self.parsed.fields(line);
        let time = line.timestamp.unwrap_or(self.default_time);
        let tag_scratch = &mut shapes.tag_scratch;
        let max = self.catalog_limits.series_per_table;
        let sid = series
            .id_for_raw(
                line.raw_tags,
                |out| {
                    tag_scratch.clear();
                    tag_scratch.extend(tags.iter().map(|(k, v)| (k.to_cow(), v.to_cow())));
                    let mut pairs: Vec<(&str, &str)> = tag_scratch
                        .iter()
                        .map(|(k, v)| (k.as_ref(), v.as_ref()))
                        .collect();
                    canonical_key(&mut pairs, out);
                },
                max,
            )
            .ok_or_else(|| LineError {
                line: line.line_no,
                column: 1,
                reason: series_limit(line.measurement.to_cow().as_ref(), max),
            })?;
        let overlaps = series.observe(sid, time);
        if !builder.replay_series_tags(sid) {
            tag_scratch.clear();
            tag_scratch.extend(tags.iter().map(|(_, v)| (Cow::Borrowed(""), v.to_cow())));
            builder.add_series_tags(
                sid,
                shapes
                    .tag_slots
                    .iter()
                    .zip(tag_scratch.iter())
                    .map(|(&slot, (_, v))| (slot, v.as_ref())),
            );
        }
        for (&slot, (_, value)) in shapes.field_slots.iter().zip(fields) {
            let v = match value {
                FieldValue::Float(v) => Value::Float(*v),
                FieldValue::Integer(v) => Value::Integer(*v),
                FieldValue::UInteger(v) => Value::UInteger(*v),
                FieldValue::Boolean(v) => Value::Boolean(*v),
                FieldValue::String(s) => Value::String(unescaped(s, &mut self.scratch)),
            };
            builder.append_field(slot, v);
        }
        builder.finish_row(time, sid, overlaps);
        Ok(())
    }
}

impl<'a> Shapes<'a> {
    /// Resolves the line's tag and field keys to column slots (`tag_slots`, `field_slots`),
    /// adding new columns; the first key that does not fit the table rejects the line.
    fn resolve(
        &mut self,
        parsed: &ParsedLines<'a>,
        line: &Line<'a>,
        columns: &mut Columns<'_>,
        builder: &mut ChunkBuilder,
    ) -> Result<(), LineError> {
        let line_start = line.measurement.raw();
        let fail = |key: &Token<'_>, reason: Refusal| LineError {
            line: line.line_no,
            column: column_of(line_start, key.raw()),
            reason: reason.0,
        };
        self.tag_slots.clear();
        self.field_slots.clear();
        for (n, (key, _)) in parsed.tags(line).iter().enumerate() {
            if let Some(&(raw, slot)) = self.tag_cache.get(n)
                && raw == key.raw()
            {
                self.tag_slots.push(slot);
                continue;
            }
            let key_text = key.to_cow();
            let kind = columns
                .resolve(&key_text, ColumnKind::Tag)
                .map_err(|r| fail(key, r))?;
            let slot = builder.slot(&key_text, kind);
            self.tag_slots.push(slot);
            if key.plain().is_some() {
                self.tag_cache.truncate(n);
                if self.tag_cache.len() == n {
                    self.tag_cache.push((key.raw(), slot));
                }
            }
        }
        for (n, (key, value)) in parsed.fields(line).iter().enumerate() {
            let want = field_kind(value);
            if let Some(&(raw, kind, slot)) = self.field_cache.get(n)
                && raw == key.raw()
                && kind == want
            {
                self.field_slots.push(slot);
                continue;
            }
            let key_text = key.to_cow();
            let kind = columns.resolve(&key_text, want).map_err(|r| fail(key, r))?;
            let slot = builder.slot(&key_text, kind);
            self.field_slots.push(slot);
            if key.plain().is_some() {
                self.field_cache.truncate(n);
                if self.field_cache.len() == n {
                    self.field_cache.push((key.raw(), kind, slot));
                }
            }
        }
        Ok(())
    }
}

fn unescaped<'s>(token: &Token<'s>, scratch: &'s mut String) -> &'s str {
    match token.plain() {
        Some(s) => s,
        None => {
            scratch.clear();
            token.unescape_into(scratch);
            scratch.as_str()
        }
    }
}
