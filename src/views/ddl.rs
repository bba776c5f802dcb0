//! Materialized-view statements, which DataFusion does not plan:
//! `CREATE MATERIALIZED VIEW [IF NOT EXISTS] name [WITH (k = 'v', …)] AS SELECT …`,
//! `DROP MATERIALIZED VIEW [IF EXISTS] name`, `SHOW MATERIALIZED VIEWS`,
//! `CHECK MATERIALIZED VIEW name`.

use serde::{Deserialize, Serialize};

use super::ViewError;
use crate::query::admin::parse_retention;

/// When subscribers hear of a window (used by subscriptions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Emit {
    #[default]
    OnChange,
    OnWindowClose,
}

/// What happens to a point later than the view's lateness.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Late {
    /// It still corrects the view.
    #[default]
    Correct,
    /// It is left out of the view and counted.
    Drop,
}

/// `WITH (…)` options of a view.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub(crate) struct ViewOptions {
    /// A window is final once the source's max time minus this has passed its end.
    #[serde(default)]
    pub lateness_ns: i64,
    #[serde(default)]
    pub emit: Emit,
    /// The view's own retention.
    #[serde(default)]
    pub retention_ns: Option<i64>,
    #[serde(default)]
    pub late: Late,
}

/// A parsed view statement.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ViewStatement {
    Create {
        db: Option<String>,
        name: String,
        if_not_exists: bool,
        options: ViewOptions,
        query: String,
    },
    Drop {
        db: Option<String>,
        name: String,
        if_exists: bool,
    },
    Show,
    Check {
        db: Option<String>,
        name: String,
    },
}

struct Cursor<'a> {
    s: &'a str,
    at: usize,
}

impl<'a> Cursor<'a> {
    fn skip_ws(&mut self) {
        let rest = &self.s[self.at..];
        self.at += rest.len() - rest.trim_start().len();
    }

    /// Consumes keyword `kw` (case-insensitive, whole word).
    fn keyword(&mut self, kw: &str) -> bool {
        self.skip_ws();
        let rest = &self.s[self.at..];
        let matches = rest
            .get(..kw.len())
            .is_some_and(|h| h.eq_ignore_ascii_case(kw))
            && !rest[kw.len()..]
                .chars()
                .next()
                .is_some_and(|c| c.is_alphanumeric() || c == '_');
        if matches {
            self.at += kw.len();
        }
        matches
    }

    fn punct(&mut self, c: char) -> bool {
        self.skip_ws();
        if self.s[self.at..].starts_with(c) {
            self.at += c.len_utf8();
            true
        } else {
            false
        }
    }

    /// An identifier, bare or "double quoted".
    fn ident(&mut self) -> Result<String, ViewError> {
        self.skip_ws();
        let rest = &self.s[self.at..];
        if let Some(body) = rest.strip_prefix('"') {
            let mut out = String::new();
            let mut chars = body.char_indices().peekable();
            while let Some((i, c)) = chars.next() {
                if c == '"' {
                    if chars.peek().is_some_and(|&(_, n)| n == '"') {
                        out.push('"');
                        chars.next();
                        continue;
                    }
                    self.at += 1 + i + 1;
                    return Ok(out);
                }
                out.push(c);
            }
            return Err(ViewError::Invalid("unterminated quoted name".to_string()));
        }
        let len = rest
            .char_indices()
            .find(|&(_, c)| !(c.is_alphanumeric() || c == '_' || c == '-'))
            .map_or(rest.len(), |(i, _)| i);
        if len == 0 {
            return Err(ViewError::Invalid(format!(
                "expected a view name at '{}'",
                rest.chars().take(20).collect::<String>()
            )));
        }
        self.at += len;
        Ok(rest[..len].to_string())
    }

    /// `name` or `db.name`.
    fn name(&mut self) -> Result<(Option<String>, String), ViewError> {
        let first = self.ident()?;
        if self.punct('.') {
            Ok((Some(first), self.ident()?))
        } else {
            Ok((None, first))
        }
    }

    /// A single-quoted string.
    fn string(&mut self) -> Result<String, ViewError> {
        self.skip_ws();
        let rest = &self.s[self.at..];
        let Some(body) = rest.strip_prefix('\'') else {
            return Err(ViewError::Invalid(format!(
                "expected a quoted value at '{}'",
                rest.chars().take(20).collect::<String>()
            )));
        };
        let mut out = String::new();
        let mut chars = body.char_indices().peekable();
        while let Some((i, c)) = chars.next() {
            if c == '\'' {
                if chars.peek().is_some_and(|&(_, n)| n == '\'') {
                    out.push('\'');
                    chars.next();
                    continue;
                }
                self.at += 1 + i + 1;
                return Ok(out);
            }
            out.push(c);
        }
        Err(ViewError::Invalid("unterminated quoted value".to_string()))
    }

    fn end(&mut self) -> Result<(), ViewError> {
        self.skip_ws();
        let _ = self.punct(';');
        self.skip_ws();
        if self.at == self.s.len() {
            Ok(())
        } else {
            Err(ViewError::Invalid(format!(
                "unexpected '{}' at the end of the statement",
                self.s[self.at..].chars().take(20).collect::<String>()
            )))
        }
    }
}

/// `Some` when `sql` is a view statement (or a malformed one, with the reason).
pub(crate) fn parse(sql: &str) -> Option<Result<ViewStatement, ViewError>> {
    let mut c = Cursor { s: sql, at: 0 };
    if c.keyword("create") {
        if !(c.keyword("materialized") && c.keyword("view")) {
            return None;
        }
        return Some(parse_create(&mut c));
    }
    if c.keyword("drop") {
        if !(c.keyword("materialized") && c.keyword("view")) {
            return None;
        }
        return Some((|| {
            let if_exists = if c.keyword("if") {
                if !c.keyword("exists") {
                    return Err(ViewError::Invalid("expected IF EXISTS".to_string()));
                }
                true
            } else {
                false
            };
            let (db, name) = c.name()?;
            c.end()?;
            Ok(ViewStatement::Drop {
                db,
                name,
                if_exists,
            })
        })());
    }
    if c.keyword("show") {
        if !(c.keyword("materialized") && c.keyword("views")) {
            return None;
        }
        return Some(c.end().map(|_| ViewStatement::Show));
    }
    if c.keyword("check") {
        if !(c.keyword("materialized") && c.keyword("view")) {
            return Some(Err(ViewError::Invalid(
                "CHECK takes MATERIALIZED VIEW name: CHECK MATERIALIZED VIEW cpu_1m".to_string(),
            )));
        }
        return Some((|| {
            let (db, name) = c.name()?;
            c.end()?;
            Ok(ViewStatement::Check { db, name })
        })());
    }
    None
}

fn parse_create(c: &mut Cursor<'_>) -> Result<ViewStatement, ViewError> {
    let if_not_exists = if c.keyword("if") {
        if !(c.keyword("not") && c.keyword("exists")) {
            return Err(ViewError::Invalid("expected IF NOT EXISTS".to_string()));
        }
        true
    } else {
        false
    };
    let (db, name) = c.name()?;
    let mut options = ViewOptions::default();
    if c.keyword("with") {
        if !c.punct('(') {
            return Err(ViewError::Invalid(
                "expected WITH (option = 'value', …)".to_string(),
            ));
        }
        loop {
            let key = c.ident()?.to_ascii_lowercase();
            if !c.punct('=') {
                return Err(ViewError::Invalid(format!("expected = after option {key}")));
            }
            let value = c.string()?;
            match key.as_str() {
                "lateness" => {
                    options.lateness_ns = parse_retention(&value)
                        .map_err(|_| {
                            format!("lateness '{value}' is not a duration such as '5m' or '1h'")
                        })?
                        .unwrap_or(0);
                }
                "retention" => options.retention_ns = parse_retention(&value)?,
                "emit" => {
                    options.emit = match value.to_ascii_lowercase().as_str() {
                        "on_change" => Emit::OnChange,
                        "on_window_close" => Emit::OnWindowClose,
                        _ => {
                            return Err(ViewError::Invalid(format!(
                                "emit '{value}' is not 'on_change' or 'on_window_close'"
                            )));
                        }
                    }
                }
                "late" => {
                    options.late = match value.to_ascii_lowercase().as_str() {
                        "correct" => Late::Correct,
                        "drop" => Late::Drop,
                        _ => {
                            return Err(ViewError::Invalid(format!(
                                "late '{value}' is not 'correct' or 'drop'"
                            )));
                        }
                    }
                }
                other => {
                    return Err(ViewError::Invalid(format!(
                        "unknown view option '{other}'; the options are lateness, emit, \
                         retention and late"
                    )));
                }
            }
            if c.punct(',') {
                continue;
            }
            if c.punct(')') {
                break;
            }
            return Err(ViewError::Invalid(
                "expected , or ) in WITH (…)".to_string(),
            ));
        }
    }
    if !c.keyword("as") {
        return Err(ViewError::Invalid(
            "expected AS SELECT … after the view name".to_string(),
        ));
    }
    let query = c.s[c.at..].trim().trim_end_matches(';').trim().to_string();
    if query.is_empty() {
        return Err(ViewError::Invalid("expected a SELECT after AS".to_string()));
    }
    Ok(ViewStatement::Create {
        db,
        name,
        if_not_exists,
        options,
        query,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_view_statements() {
        let Some(Ok(ViewStatement::Create {
            name,
            if_not_exists,
            options,
            query,
            ..
        })) = parse(
            "create materialized view if not exists cpu_1m with (lateness = '5m', emit = 'on_window_close') as SELECT 1;",
        )
        else {
            panic!("not parsed");
        };
        assert_eq!(name, "cpu_1m");
        assert!(if_not_exists);
        assert_eq!(options.lateness_ns, 300_000_000_000);
        assert_eq!(options.emit, Emit::OnWindowClose);
        assert_eq!(query, "SELECT 1");
        assert_eq!(
            parse("DROP MATERIALIZED VIEW IF EXISTS other.\"a b\""),
            Some(Ok(ViewStatement::Drop {
                db: Some("other".into()),
                name: "a b".into(),
                if_exists: true
            }))
        );
        assert_eq!(
            parse("show materialized views"),
            Some(Ok(ViewStatement::Show))
        );
        assert!(matches!(
            parse("CREATE MATERIALIZED VIEW v WITH (colour = 'red') AS SELECT 1"),
            Some(Err(e)) if e.to_string().contains("unknown view option")
        ));
        assert_eq!(parse("CREATE TABLE t (a int)"), None);
        assert_eq!(parse("SELECT 1"), None);
    }
}
