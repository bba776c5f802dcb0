//! Turns parsed lines or Arrow batches into per-table chunks, checking them against the catalog.
//!
//! Runs under the single write lock, so the catalog cannot change underneath it. Nothing here
//! changes the catalog: new databases, tables and columns are returned as part of the
//! [`PreparedWrite`] and published only once the write's WAL record is written.

use std::borrow::Cow;
use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{Array, ArrayRef, AsArray, RecordBatch};
use arrow::compute::cast;
use arrow::datatypes::{DataType, TimeUnit};

use super::WriteError;
use super::builder::{ChunkBuilder, Value};
use super::line_protocol::{FieldValue, LineError, MAX_LISTED_ERRORS, ParsedLines, Token};
use crate::storage::buffer::Chunk;
use crate::storage::catalog::{
    Catalog, ColumnDef, ColumnKind, Database, FieldType, TIME_COLUMN, TableSchema, check_name,
    tag_type, time_type,
};
pub(crate) use crate::storage::engine::PreparedTable;
use crate::storage::engine::WriteSet;
use crate::storage::table::{OVER_PERSISTED, OVERLAPS, Table, canonical_key};

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

/// Tables whose names start with this are Rivulet's own (e.g. view progress).
pub(crate) const RESERVED_PREFIX: &str = "__rivulet";

/// Resolves a table for writing: the catalog's, or a new unregistered one.
/// Only `system` writes (view maintenance, WAL replay) may write view tables or reserved names.
fn resolve_table(
    catalog: &Catalog,
    db: Option<&Arc<Database>>,
    db_name: &Arc<str>,
    name: &str,
    system: bool,
) -> Result<(Arc<Table>, bool), String> {
    if let Some(t) = db.and_then(|d| d.table(name)) {
        if !system && t.settings.read().view {
            return Err(format!(
                "'{name}' is a materialized view: only its definition writes it"
            ));
        }
        return Ok((t, false));
    }
    if !system && name.starts_with(RESERVED_PREFIX) {
        return Err(format!(
            "invalid table name '{name}': names starting with '{RESERVED_PREFIX}' are reserved"
        ));
    }
    check_name(name).map_err(|e| format!("invalid table name '{name}': {e}"))?;
    let table = Table::new(
        catalog.allocate_id(),
        db_name.clone(),
        name.into(),
        TableSchema::new(Vec::new()),
    );
    Ok((Arc::new(table), true))
}

/// Column lookups for one table during one write: the schema plus the columns this write adds.
struct Columns<'s> {
    schema: &'s TableSchema,
    added: Vec<ColumnDef>,
    added_by_name: HashMap<Arc<str>, usize>,
    db: &'s str,
    table: &'s str,
}

impl Columns<'_> {
    /// The kind of column `name` for a value of `want`, adding the column if it is new.
    fn resolve(&mut self, name: &str, want: ColumnKind) -> Result<ColumnKind, String> {
        if name == TIME_COLUMN {
            return Err(format!(
                "'{TIME_COLUMN}' is reserved for the timestamp and cannot be a tag or field name"
            ));
        }
        let have = self
            .schema
            .column(name)
            .map(|c| c.kind)
            .or_else(|| self.added_by_name.get(name).map(|&i| self.added[i].kind));
        match have {
            Some(kind) if kind == want => Ok(kind),
            Some(kind) => Err(self.conflict(name, kind, want)),
            None => {
                check_name(name).map_err(|e| format!("invalid column name '{name}': {e}"))?;
                let name: Arc<str> = name.into();
                self.added_by_name.insert(name.clone(), self.added.len());
                self.added.push(ColumnDef { name, kind: want });
                Ok(want)
            }
        }
    }

    /// Forgets the columns added after `mark` (they came from a line that was rejected).
    fn rollback(&mut self, mark: usize) {
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
        let used: Vec<&Arc<str>> = builder.used_columns().map(|(n, _)| n).collect();
        self.added
            .into_iter()
            .filter(|c| used.iter().any(|u| **u == c.name))
            .collect()
    }
}

fn field_kind(v: &FieldValue<'_>) -> ColumnKind {
    ColumnKind::Field(match v {
        FieldValue::Float(_) => FieldType::Float,
        FieldValue::Integer(_) => FieldType::Integer,
        FieldValue::UInteger(_) => FieldType::UInteger,
        FieldValue::Boolean(_) => FieldType::Boolean,
        FieldValue::String(_) => FieldType::String,
    })
}

/// Byte column (1-based) of `token` in the line starting at `line_start`.
fn column_of(line_start: &str, token: &str) -> usize {
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
    let mut rejected = Rejections {
        list: parsed.errors.clone(),
        total: parsed.error_count,
    };

    // Group lines by measurement, keeping input order within each table.
    let mut groups: Vec<(Cow<'_, str>, Vec<u32>)> = Vec::new();
    let mut group_of: HashMap<Cow<'_, str>, usize> = HashMap::new();
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

    let mut tables = Vec::with_capacity(groups.len());
    let mut rows = 0;
    let mut scratch = String::new();
    let mut tag_scratch: Vec<(Cow<'_, str>, Cow<'_, str>)> = Vec::new();
    for (name, line_ids) in &groups {
        let (table, is_new) = match resolve_table(catalog, db.as_ref(), &db_name, name, false) {
            Ok(t) => t,
            Err(reason) => {
                for &i in line_ids {
                    let line = &parsed.lines[i as usize];
                    rejected.push(LineError {
                        line: line.line_no,
                        column: 1,
                        reason: reason.clone(),
                    });
                }
                continue;
            }
        };
        let schema = table.schema();
        let mut columns = Columns {
            schema: &schema,
            added: Vec::new(),
            added_by_name: HashMap::new(),
            db: &db_name,
            table: name,
        };
        let mut builder = ChunkBuilder::new();
        let mut series = table.series.lock();
        // Shape caches: lines of one table usually repeat the same keys in the same order.
        let mut tag_cache: Vec<(&str, usize)> = Vec::new();
        let mut field_cache: Vec<(&str, ColumnKind, usize)> = Vec::new();
        let mut tag_slots: Vec<usize> = Vec::new();
        let mut field_slots: Vec<usize> = Vec::new();

        for &i in line_ids {
            let line = &parsed.lines[i as usize];
            let line_start = line.measurement.raw();
            let tags = parsed.tags(line);
            let fields = parsed.fields(line);
            tag_slots.clear();
            field_slots.clear();
            let mut error: Option<LineError> = None;
            let mark = columns.added.len();

            for (n, (key, _)) in tags.iter().enumerate() {
                if let Some(&(raw, slot)) = tag_cache.get(n)
                    && raw == key.raw()
                {
                    tag_slots.push(slot);
                    continue;
                }
                let key_text = key.to_cow();
                match columns.resolve(&key_text, ColumnKind::Tag) {
                    Ok(kind) => {
                        let slot = builder.slot(&key_text, kind);
                        tag_slots.push(slot);
                        if key.plain().is_some() {
                            tag_cache.truncate(n);
                            if tag_cache.len() == n {
                                tag_cache.push((key.raw(), slot));
                            }
                        }
                    }
                    Err(reason) => {
                        error = Some(LineError {
                            line: line.line_no,
                            column: column_of(line_start, key.raw()),
                            reason,
                        });
                        break;
                    }
                }
            }
            if error.is_none() {
                for (n, (key, value)) in fields.iter().enumerate() {
                    let want = field_kind(value);
                    if let Some(&(raw, kind, slot)) = field_cache.get(n)
                        && raw == key.raw()
                        && kind == want
                    {
                        field_slots.push(slot);
                        continue;
                    }
                    let key_text = key.to_cow();
                    match columns.resolve(&key_text, want) {
                        Ok(kind) => {
                            let slot = builder.slot(&key_text, kind);
                            field_slots.push(slot);
                            if key.plain().is_some() {
                                field_cache.truncate(n);
                                if field_cache.len() == n {
                                    field_cache.push((key.raw(), kind, slot));
                                }
                            }
                        }
                        Err(reason) => {
                            error = Some(LineError {
                                line: line.line_no,
                                column: column_of(line_start, key.raw()),
                                reason,
                            });
                            break;
                        }
                    }
                }
            }
            if let Some(e) = error {
                columns.rollback(mark);
                // Cached shapes may point at the rolled-back columns.
                tag_cache.clear();
                field_cache.clear();
                rejected.push(e);
                continue;
            }
            if !accept_partial && rejected.total > 0 {
                // The write is rejected anyway: keep validating to report every bad line.
                continue;
            }

            let time = line.timestamp.unwrap_or(default_time);
            let sid = series.id_for_raw(line.raw_tags, |out| {
                tag_scratch.clear();
                tag_scratch.extend(tags.iter().map(|(k, v)| (k.to_cow(), v.to_cow())));
                let mut pairs: Vec<(&str, &str)> = tag_scratch
                    .iter()
                    .map(|(k, v)| (k.as_ref(), v.as_ref()))
                    .collect();
                canonical_key(&mut pairs, out);
            });
            let overlaps = series.observe(sid, time);
            if !builder.replay_series_tags(sid) {
                tag_scratch.clear();
                tag_scratch.extend(tags.iter().map(|(_, v)| (Cow::Borrowed(""), v.to_cow())));
                builder.add_series_tags(
                    sid,
                    tag_slots
                        .iter()
                        .zip(&tag_scratch)
                        .map(|(&slot, (_, v))| (slot, v.as_ref())),
                );
            }
            for (&slot, (_, value)) in field_slots.iter().zip(fields) {
                let v = match value {
                    FieldValue::Float(v) => Value::Float(*v),
                    FieldValue::Integer(v) => Value::Integer(*v),
                    FieldValue::UInteger(v) => Value::UInteger(*v),
                    FieldValue::Boolean(v) => Value::Boolean(*v),
                    FieldValue::String(s) => Value::String(unescaped(s, &mut scratch)),
                };
                builder.append_field(slot, v);
            }
            builder.finish_row(time, sid, overlaps);
        }
        drop(series);
        let new_columns = columns.into_added(&builder);
        if let Some(chunk) = builder.finish()? {
            rows += chunk.rows();
            tables.push(PreparedTable {
                table,
                is_new,
                new_columns,
                chunk,
            });
        }
    }

    if !accept_partial && rejected.total > 0 {
        rejected.list.sort_by_key(|e| e.line);
        return Err(WriteError::Rejected {
            db: db_name.to_string(),
            errors: rejected.list,
            total: rejected.total,
        });
    }
    rejected.list.sort_by_key(|e| e.line);
    Ok(PreparedWrite {
        db_name,
        db,
        tables,
        rejected: rejected.list,
        rejected_total: rejected.total,
        rows,
    })
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

/// Validates an Arrow batch for `table` and turns it into a chunk.
///
/// Column mapping: `time` must be a timestamp (any unit; stored as ns UTC) or Int64 nanoseconds,
/// without nulls. Dictionary-encoded string columns are tags, and so are string columns the
/// table already has as tags; other columns are fields: Float64/32, Int64/32/16/8,
/// UInt64/32/16/8, Utf8 (also LargeUtf8, Utf8View), Boolean. Every row needs a field value.
pub(crate) fn prepare_batch(
    catalog: &Catalog,
    db_name: &str,
    table_name: &str,
    batch: &RecordBatch,
) -> Result<PreparedWrite, WriteError> {
    prepare_batch_as(catalog, db_name, table_name, batch, false)
}

/// [`prepare_batch`] for Rivulet's own writes (view maintenance, WAL replay), which may write
/// view tables and reserved names.
pub(crate) fn prepare_system_batch(
    catalog: &Catalog,
    db_name: &str,
    table_name: &str,
    batch: &RecordBatch,
) -> Result<PreparedWrite, WriteError> {
    prepare_batch_as(catalog, db_name, table_name, batch, true)
}

fn prepare_batch_as(
    catalog: &Catalog,
    db_name: &str,
    table_name: &str,
    batch: &RecordBatch,
    system: bool,
) -> Result<PreparedWrite, WriteError> {
    let invalid = |reason: String| WriteError::InvalidBatch {
        db: db_name.to_string(),
        table: table_name.to_string(),
        reason,
    };
    let db_name_arc: Arc<str> = db_name.into();
    let db = catalog.database(db_name);
    let (table, is_new) =
        resolve_table(catalog, db.as_ref(), &db_name_arc, table_name, system).map_err(invalid)?;
    let schema = table.schema();
    let mut columns = Columns {
        schema: &schema,
        added: Vec::new(),
        added_by_name: HashMap::new(),
        db: db_name,
        table: table_name,
    };
    let rows = batch.num_rows();
    let mut time: Option<ArrayRef> = None;
    let mut tags: Vec<(Arc<str>, ArrayRef)> = Vec::new();
    let mut fields: Vec<(Arc<str>, ColumnKind, ArrayRef)> = Vec::new();
    for (field, array) in batch.schema().fields().iter().zip(batch.columns()) {
        let name = field.name().as_str();
        if name == TIME_COLUMN {
            let ns = match array.data_type() {
                DataType::Timestamp(_, _) | DataType::Int64 => {
                    // Not "safe": a time out of the nanosecond range is an error, not a null.
                    let strict = arrow::compute::CastOptions {
                        safe: false,
                        ..Default::default()
                    };
                    let as_ns = arrow::compute::cast_with_options(
                        array,
                        &DataType::Timestamp(TimeUnit::Nanosecond, None),
                        &strict,
                    )
                    .map_err(|e| invalid(format!("column 'time': {e}")))?;
                    cast(&as_ns, &time_type())
                        .map_err(|e| invalid(format!("column 'time': {e}")))?
                }
                other => {
                    return Err(invalid(format!(
                        "column 'time' has type {other}; expected a timestamp or Int64 nanoseconds"
                    )));
                }
            };
            if ns.null_count() > 0 {
                return Err(invalid(format!(
                    "column 'time' has {} null values; every row needs a time",
                    ns.null_count()
                )));
            }
            time = Some(ns);
            continue;
        }
        let existing_tag = schema
            .column(name)
            .is_some_and(|c| c.kind == ColumnKind::Tag);
        let dt = array.data_type();
        let is_string = matches!(
            dt,
            DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
        );
        let want = match dt {
            DataType::Dictionary(_, v)
                if matches!(
                    **v,
                    DataType::Utf8 | DataType::LargeUtf8 | DataType::Utf8View
                ) =>
            {
                ColumnKind::Tag
            }
            _ if is_string && existing_tag => ColumnKind::Tag,
            DataType::Float64 | DataType::Float32 | DataType::Float16 => {
                ColumnKind::Field(FieldType::Float)
            }
            DataType::Int64 | DataType::Int32 | DataType::Int16 | DataType::Int8 => {
                ColumnKind::Field(FieldType::Integer)
            }
            DataType::UInt64 | DataType::UInt32 | DataType::UInt16 | DataType::UInt8 => {
                ColumnKind::Field(FieldType::UInteger)
            }
            _ if is_string => ColumnKind::Field(FieldType::String),
            DataType::Boolean => ColumnKind::Field(FieldType::Boolean),
            DataType::Null => continue,
            other => {
                return Err(invalid(format!(
                    "column '{name}' has unsupported type {other}"
                )));
            }
        };
        let kind = columns.resolve(name, want).map_err(invalid)?;
        let converted =
            cast(array, &kind.data_type()).map_err(|e| invalid(format!("column '{name}': {e}")))?;
        let name: Arc<str> = name.into();
        match kind {
            ColumnKind::Tag => tags.push((name, converted)),
            _ => fields.push((name, kind, converted)),
        }
    }
    let Some(time) = time else {
        return Err(invalid("the batch has no 'time' column".to_string()));
    };
    if fields.is_empty() && rows > 0 {
        return Err(invalid("the batch has no field columns".to_string()));
    }
    // Every row needs at least one field value (a point without fields does not exist).
    for row in 0..rows {
        if fields.iter().all(|(_, _, a)| a.is_null(row)) {
            return Err(invalid(format!("row {row} has no field values")));
        }
    }
    let times = time.as_primitive::<arrow::datatypes::TimestampNanosecondType>();

    // Series ids from the tag values, sorted by tag name.
    let mut sorted_tags: Vec<(&str, &dyn Array)> =
        tags.iter().map(|(n, a)| (n.as_ref(), a.as_ref())).collect();
    sorted_tags.sort_unstable_by(|a, b| a.0.cmp(b.0));
    let dicts: Vec<_> = sorted_tags
        .iter()
        .map(|(n, a)| (*n, a.as_dictionary::<arrow::datatypes::Int32Type>()))
        .collect();
    let dict_values: Vec<_> = dicts
        .iter()
        .map(|(_, d)| d.values().as_string::<i32>().clone())
        .collect();
    let mut series_ids = Vec::with_capacity(rows);
    let mut overlaps = 0u8;
    let mut key = Vec::new();
    let mut pairs: Vec<(&str, &str)> = Vec::with_capacity(dicts.len());
    {
        let mut series = table.series.lock();
        for row in 0..rows {
            key.clear();
            pairs.clear();
            for ((name, dict), values) in dicts.iter().zip(&dict_values) {
                if dict.is_valid(row) {
                    let k = dict.keys().value(row) as usize;
                    pairs.push((name, values.value(k)));
                }
            }
            canonical_key(&mut pairs, &mut key);
            let sid = series.id_for_canonical(&key);
            overlaps |= series.observe(sid, times.value(row));
            series_ids.push(sid);
        }
    }

    let mut out_fields = vec![arrow::datatypes::Field::new(
        TIME_COLUMN,
        time_type(),
        false,
    )];
    let mut out_arrays = vec![time.clone()];
    for (name, array) in &tags {
        if array.null_count() < rows {
            out_fields.push(arrow::datatypes::Field::new(
                name.as_ref(),
                tag_type(),
                true,
            ));
            out_arrays.push(array.clone());
        }
    }
    for (name, kind, array) in &fields {
        if array.null_count() < rows {
            out_fields.push(arrow::datatypes::Field::new(
                name.as_ref(),
                kind.data_type(),
                true,
            ));
            out_arrays.push(array.clone());
        }
    }
    let used: Vec<String> = out_fields.iter().map(|f| f.name().clone()).collect();
    let new_columns = columns
        .added
        .into_iter()
        .filter(|c| used.iter().any(|u| u.as_str() == c.name.as_ref()))
        .collect();
    let out = RecordBatch::try_new(
        Arc::new(arrow::datatypes::Schema::new(out_fields)),
        out_arrays,
    )?;
    let mut tables = Vec::new();
    if rows > 0 {
        let (min_time, max_time) = crate::storage::buffer::min_max(times.values());
        tables.push(PreparedTable {
            table,
            is_new,
            new_columns,
            chunk: Chunk {
                seq: 0,
                batch: out,
                series: series_ids.into(),
                min_time,
                max_time,
                overlaps: overlaps & OVERLAPS != 0,
                over_persisted: overlaps & OVER_PERSISTED != 0,
                merged: false,
            },
        });
    }
    Ok(PreparedWrite {
        db_name: db_name_arc,
        db,
        tables,
        rejected: Vec::new(),
        rejected_total: 0,
        rows,
    })
}

/// Columns an import has introduced so far, per table, on top of the catalog.
#[derive(Debug, Default)]
pub struct ImportCheck {
    added: HashMap<String, Vec<ColumnDef>>,
}

/// Checks parsed lines against the catalog plus the columns earlier chunks of the same import
/// introduced, without writing anything: the first pass of an atomic multi-chunk import.
pub(crate) fn check_lines(
    catalog: &Catalog,
    db_name: &str,
    parsed: &ParsedLines<'_>,
    state: &mut ImportCheck,
) -> Vec<LineError> {
    let mut errors = parsed.errors.clone();
    let db = catalog.database(db_name);
    let empty = TableSchema::new(Vec::new());
    for line in &parsed.lines {
        let name = line.measurement.to_cow();
        let table = db.as_ref().and_then(|d| d.table(&name));
        if table.is_none()
            && let Err(e) = check_name(&name)
        {
            errors.push(LineError {
                line: line.line_no,
                column: 1,
                reason: format!("invalid table name '{name}': {e}"),
            });
            continue;
        }
        let schema = table.as_ref().map(|t| t.schema());
        let added = state.added.remove(name.as_ref()).unwrap_or_default();
        let mut columns = Columns {
            schema: schema.as_deref().unwrap_or(&empty),
            added_by_name: added
                .iter()
                .enumerate()
                .map(|(i, c)| (c.name.clone(), i))
                .collect(),
            added,
            db: db_name,
            table: &name,
        };
        let line_start = line.measurement.raw();
        let tags = parsed.tags(line).iter().map(|(k, _)| (k, ColumnKind::Tag));
        let fields = parsed.fields(line).iter().map(|(k, v)| (k, field_kind(v)));
        let mark = columns.added.len();
        for (key, want) in tags.chain(fields) {
            if let Err(reason) = columns.resolve(&key.to_cow(), want) {
                columns.rollback(mark);
                errors.push(LineError {
                    line: line.line_no,
                    column: column_of(line_start, key.raw()),
                    reason,
                });
                break;
            }
        }
        let added = columns.added;
        state.added.insert(name.into_owned(), added);
    }
    errors.sort_by_key(|e| e.line);
    errors
}
