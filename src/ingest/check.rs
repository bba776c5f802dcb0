//! Checking line protocol without writing it: the first pass of an atomic multi-chunk import
//! (`rivulet write` checks a whole file before writing any of it).

use std::collections::HashMap;

use super::line_protocol::{LineError, ParsedLines};
use super::prepare::{Columns, column_of, field_kind};
use crate::storage::catalog::{Catalog, ColumnDef, ColumnKind, TableSchema, check_name};

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
            max_columns: catalog.limits().columns_per_table,
            system: false,
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
                    reason: reason.0,
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
