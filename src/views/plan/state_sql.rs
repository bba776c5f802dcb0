//! The SQL that produces an aggregate view's storage rows: its keys and, per aggregate
//! column, the partial states merged into stored ones (count, sum, …), and the same SQL
//! restricted to some keys' groups when the view is keyed by source tags only.

use arrow::datatypes::{DataType, SchemaRef};
use datafusion::sql::sqlparser::ast::{self, Expr};

use super::{Keyed, OutColumn, ViewPlan, quote};

/// The storage SQL of an aggregate view (`select`, its output `items` matched to `columns`),
/// and its keyed form when every key is a source tag (`source_tags`) selected as it is.
pub(super) fn aggregate_sql(
    sel: &ast::Select,
    items: &[(String, &Expr)],
    columns: &[(String, OutColumn)],
    schema: &SchemaRef,
    source_tags: &[String],
) -> (String, Option<Keyed>) {
    let mut list = Vec::new();
    let mut keys = 0;
    for (i, ((name, e), (_, c))) in items.iter().zip(columns).enumerate() {
        match c {
            OutColumn::Time | OutColumn::Key => {
                list.insert(keys, format!("{e} AS {}", quote(name)));
                keys += 1;
            }
            OutColumn::State(agg) => {
                for (suffix, s) in agg.states() {
                    list.push(format!(
                        "{s} AS {}",
                        quote(&ViewPlan::state_column(i, suffix))
                    ));
                }
            }
            OutColumn::Value => {}
        }
    }
    let from = sel
        .from
        .iter()
        .map(|f| f.to_string())
        .collect::<Vec<_>>()
        .join(", ");
    let mut sql = format!("SELECT {} FROM {from}", list.join(", "));
    if let Some(w) = &sel.selection {
        sql.push_str(&format!(" WHERE {w}"));
    }
    let mut group = String::new();
    if keys > 0 {
        let ordinals: Vec<String> = (1..=keys).map(|k| k.to_string()).collect();
        group = format!(" GROUP BY {}", ordinals.join(", "));
    }
    let keyed = key_tags(items, columns, schema, source_tags).map(|tags| {
        let prefix = match &sel.selection {
            Some(w) => format!("SELECT {} FROM {from} WHERE ({w}) AND ", list.join(", ")),
            None => format!("SELECT {} FROM {from} WHERE ", list.join(", ")),
        };
        Keyed {
            tags,
            prefix,
            suffix: group.clone(),
        }
    });
    sql.push_str(&group);
    (sql, keyed)
}

/// (output column, source tag) for every key, when every key is a string source tag selected
/// as it is: a group then depends on its tags' rows only.
fn key_tags(
    items: &[(String, &Expr)],
    columns: &[(String, OutColumn)],
    schema: &SchemaRef,
    source_tags: &[String],
) -> Option<Vec<(String, String)>> {
    let mut tags = Vec::new();
    for ((name, e), (_, c)) in items.iter().zip(columns) {
        if !matches!(c, OutColumn::Key) {
            continue;
        }
        let tag = match e {
            Expr::Identifier(i) => Some(i.value.clone()),
            Expr::CompoundIdentifier(p) => p.last().map(|i| i.value.clone()),
            _ => None,
        };
        let string = schema
            .field_with_name(name)
            .is_ok_and(|f| matches!(f.data_type(), DataType::Utf8 | DataType::Dictionary(_, _)));
        match tag {
            Some(t) if string && source_tags.contains(&t) => tags.push((name.clone(), t)),
            _ => return None,
        }
    }
    let keys = columns
        .iter()
        .filter(|c| matches!(c.1, OutColumn::Key))
        .count();
    (!tags.is_empty() && tags.len() == keys).then_some(tags)
}
