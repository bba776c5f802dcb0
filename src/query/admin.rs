//! Storage statements DataFusion does not plan itself:
//! `ALTER TABLE [db.]name SET (retention = '30d' | 'none')`.

use super::QueryError;
use datafusion::sql::parser::{DFParser, Statement as DfStatement};
use datafusion::sql::sqlparser::ast::{
    AlterTableOperation, Expr, SqlOption, Statement, Value, ValueWithSpan,
};

/// A parsed storage statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum AdminStatement {
    /// Sets (Some, in ns) or clears (None) a table's retention.
    SetRetention {
        db: Option<String>,
        table: String,
        retention: Option<i64>,
    },
}

/// `Some` when `sql` is a storage statement (or a malformed one, with the reason).
pub(crate) fn parse(sql: &str) -> Option<Result<AdminStatement, QueryError>> {
    let head = sql.trim_start();
    if !head
        .get(..11)
        .is_some_and(|h| h.eq_ignore_ascii_case("alter table"))
    {
        return None;
    }
    let statements = match DFParser::parse_sql(sql) {
        Ok(s) => s,
        Err(e) => return Some(Err(QueryError::Invalid(e.to_string()))),
    };
    if statements.len() != 1 {
        return Some(Err(QueryError::Invalid(
            "send one statement at a time".to_string(),
        )));
    }
    let Some(DfStatement::Statement(statement)) = statements.front() else {
        return None;
    };
    let Statement::AlterTable(alter) = statement.as_ref() else {
        return None;
    };
    Some(parse_alter(alter))
}

fn parse_alter(
    alter: &datafusion::sql::sqlparser::ast::AlterTable,
) -> Result<AdminStatement, QueryError> {
    let parts: Vec<String> = alter
        .name
        .0
        .iter()
        .filter_map(|p| p.as_ident().map(|i| i.value.clone()))
        .collect();
    let (db, table) = match parts.as_slice() {
        [t] => (None, t.clone()),
        [d, t] => (Some(d.clone()), t.clone()),
        _ => {
            return Err(QueryError::Invalid(format!(
                "'{}' is not a table name",
                alter.name
            )));
        }
    };
    let [AlterTableOperation::SetOptionsParens { options }] = alter.operations.as_slice() else {
        return Err(QueryError::Invalid(
            "ALTER TABLE supports one operation: SET (retention = '<duration>' | 'none')"
                .to_string(),
        ));
    };
    let mut retention = None;
    for option in options {
        match option {
            SqlOption::KeyValue { key, value } if key.value.eq_ignore_ascii_case("retention") => {
                let text = match value {
                    Expr::Value(ValueWithSpan {
                        value: Value::SingleQuotedString(s),
                        ..
                    }) => s.clone(),
                    Expr::Identifier(i) => i.value.clone(),
                    other => {
                        return Err(QueryError::Invalid(format!(
                            "retention must be a quoted duration such as '30d', not {other}"
                        )));
                    }
                };
                retention = Some(parse_retention(&text)?);
            }
            other => {
                return Err(QueryError::Invalid(format!(
                    "unknown table option {other}; the supported option is retention"
                )));
            }
        }
    }
    let retention = retention.ok_or_else(|| {
        QueryError::Invalid("SET (…) needs retention = '<duration>' or 'none'".to_string())
    })?;
    Ok(AdminStatement::SetRetention {
        db,
        table,
        retention,
    })
}

/// `30d`, `12h`, `90m`, `45s`, `2w` (or combinations such as `1d12h`); `none`/`inf` clears.
pub(crate) fn parse_retention(text: &str) -> Result<Option<i64>, QueryError> {
    let t = text.trim();
    if t.eq_ignore_ascii_case("none")
        || t.eq_ignore_ascii_case("inf")
        || t.eq_ignore_ascii_case("infinite")
    {
        return Ok(None);
    }
    let bad = || {
        QueryError::Invalid(format!(
            "retention '{text}' is not a duration such as '30d', '12h', '90m' or 'none'"
        ))
    };
    let mut total: i64 = 0;
    let mut number = String::new();
    let mut any = false;
    for c in t.chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let unit: i64 = match c {
            'w' => 7 * 86_400,
            'd' => 86_400,
            'h' => 3_600,
            'm' => 60,
            's' => 1,
            _ => return Err(bad()),
        };
        let n: i64 = number.parse().map_err(|_| bad())?;
        number.clear();
        total = n
            .checked_mul(unit)
            .and_then(|v| v.checked_mul(1_000_000_000))
            .and_then(|v| total.checked_add(v))
            .ok_or_else(bad)?;
        any = true;
    }
    if !number.is_empty() || !any || total <= 0 {
        return Err(bad());
    }
    Ok(Some(total))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_retention_statements() {
        assert_eq!(
            parse("ALTER TABLE cpu SET (retention = '30d')"),
            Some(Ok(AdminStatement::SetRetention {
                db: None,
                table: "cpu".into(),
                retention: Some(30 * 86_400 * 1_000_000_000)
            }))
        );
        assert_eq!(
            parse("alter table other.cpu set (retention = 'none')"),
            Some(Ok(AdminStatement::SetRetention {
                db: Some("other".into()),
                table: "cpu".into(),
                retention: None
            }))
        );
        assert!(
            matches!(parse("ALTER TABLE cpu SET (retention = 'soon')"), Some(Err(e)) if e.to_string().contains("'soon'"))
        );
        assert!(
            matches!(parse("ALTER TABLE cpu SET (colour = 'red')"), Some(Err(e)) if e.to_string().contains("unknown table option"))
        );
        assert_eq!(parse("SELECT 1"), None);
        assert_eq!(
            parse_retention("1d12h"),
            Ok(Some(36 * 3_600 * 1_000_000_000))
        );
        assert!(parse_retention("0d").is_err());
        assert!(parse_retention("12").is_err());
    }
}
