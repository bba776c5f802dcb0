//! Live results over the Postgres wire: `SUBSCRIBE [TO] <query | view> [WITH (snapshot = false,
//! progress = true, since = N)]`, as Materialize has it, and `COPY (SUBSCRIBE …) TO STDOUT`.
//!
//! The answer is a COPY OUT stream in text format, one line per row: `seq`, `op`, then the
//! query's columns (tab-separated, `\N` for NULL). psql prints COPY data as it arrives, so a
//! plain `SUBSCRIBE` in psql shows the snapshot and then each change as it is written; a driver
//! reads it with its COPY API (tokio-postgres' `copy_out`). Each message is flushed at once.
//! It runs until the client cancels (`CancelRequest`: the statement ends with SQLSTATE 57014,
//! as Postgres ends a cancelled COPY) or the database closes. These are the subscriptions the
//! HTTP transports serve: the same planner, quotas and `--max-subscriptions` cap.

use std::fmt::Debug;

use arrow::array::RecordBatch;
use arrow::util::display::{ArrayFormatter, FormatOptions};
use futures::StreamExt;
use futures::sink::{Sink, SinkExt};
use pgwire::api::ClientInfo;
use pgwire::api::results::{Response, Tag};
use pgwire::error::{PgWireError, PgWireResult};
use pgwire::messages::PgWireBackendMessage;
use pgwire::messages::copy::{CopyData, CopyDone, CopyOutResponse};

use super::{Queries, pg_error, session, user_error};
use crate::{ChangeBatch, ChangeKind, SubscribeOptions};

/// A parsed `SUBSCRIBE`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Subscribe {
    /// The query subscribed to.
    pub(crate) sql: String,
    pub(crate) snapshot: bool,
    pub(crate) progress: bool,
    pub(crate) since: Option<u64>,
}

/// Strips a leading keyword (any case) and the space after it.
fn keyword<'a>(s: &'a str, word: &str) -> Option<&'a str> {
    let s = s.trim_start();
    let head = s.get(..word.len())?;
    let rest = &s[word.len()..];
    (head.eq_ignore_ascii_case(word)
        && (rest.is_empty() || rest.starts_with(|c: char| c.is_whitespace() || c == '(')))
    .then_some(rest)
}

/// The text inside the parentheses `s` starts with, and what follows them.
fn parenthesized(s: &str) -> Option<(&str, &str)> {
    let s = s.trim_start();
    if !s.starts_with('(') {
        return None;
    }
    let (mut depth, mut quoted) = (0usize, false);
    for (i, c) in s.char_indices() {
        match c {
            '\'' => quoted = !quoted,
            '(' if !quoted => depth += 1,
            ')' if !quoted => {
                depth -= 1;
                if depth == 0 {
                    return Some((&s[1..i], &s[i + 1..]));
                }
            }
            _ => {}
        }
    }
    None
}

/// `Some` when `sql` is a `SUBSCRIBE` (or `COPY (SUBSCRIBE …) TO STDOUT`), with its parts or
/// the reason it cannot be read.
pub(crate) fn parse(sql: &str) -> Option<PgWireResult<Subscribe>> {
    let sql = sql.trim().trim_end_matches(';').trim_end();
    let body = match keyword(sql, "copy") {
        Some(rest) => {
            let (inner, after) = parenthesized(rest)?;
            let rest = keyword(inner, "subscribe")?;
            let after = after.trim();
            let to = keyword(after, "to").map(str::trim);
            if !to.is_some_and(|t| t.eq_ignore_ascii_case("stdout")) {
                return Some(Err(user_error(
                    "0A000",
                    "COPY (SUBSCRIBE …) streams only TO STDOUT",
                )));
            }
            rest
        }
        None => keyword(sql, "subscribe")?,
    };
    Some(parse_body(body))
}

fn parse_body(body: &str) -> PgWireResult<Subscribe> {
    let body = keyword(body, "to").unwrap_or(body).trim();
    let mut out = Subscribe {
        sql: String::new(),
        snapshot: true,
        progress: false,
        since: None,
    };
    // Options: a trailing `WITH (…)` that holds only `name = value` pairs.
    let mut query = body;
    if let Some(at) = body.to_ascii_lowercase().rfind("with") {
        let (head, tail) = body.split_at(at);
        if let Some((options, after)) = parenthesized(&tail[4..])
            && after.trim().is_empty()
            && tail[4..].starts_with(|c: char| c.is_whitespace() || c == '(')
            && options.split(',').all(|o| o.contains('='))
        {
            for option in options.split(',') {
                let (name, value) = option.split_once('=').unwrap_or((option, ""));
                let (name, value) = (name.trim().to_ascii_lowercase(), value.trim());
                let value = value.trim_matches('\'');
                let flag = |v: &str| match v.to_ascii_lowercase().as_str() {
                    "true" | "on" | "1" => Ok(true),
                    "false" | "off" | "0" => Ok(false),
                    _ => Err(user_error(
                        "22023",
                        format!("SUBSCRIBE option {name} takes true or false, not '{v}'"),
                    )),
                };
                match name.as_str() {
                    "snapshot" => out.snapshot = flag(value)?,
                    "progress" => out.progress = flag(value)?,
                    "since" => {
                        out.since = Some(value.parse().map_err(|_| {
                            user_error(
                                "22023",
                                format!(
                                    "SUBSCRIBE option since takes a sequence number, not '{value}'"
                                ),
                            )
                        })?)
                    }
                    other => {
                        return Err(user_error(
                            "22023",
                            format!(
                                "unknown SUBSCRIBE option '{other}': expected snapshot, progress or since"
                            ),
                        ));
                    }
                }
            }
            query = head.trim_end();
        }
    }
    let query = match parenthesized(query) {
        Some((inner, after)) if after.trim().is_empty() => inner.trim(),
        _ => query,
    };
    if query.is_empty() {
        return Err(user_error(
            "42601",
            "SUBSCRIBE needs a query or a view: SUBSCRIBE TO SELECT … or SUBSCRIBE cpu_1m",
        ));
    }
    // A bare name (a view or a table) subscribes to all of it.
    let is_name = query
        .chars()
        .all(|c| c.is_alphanumeric() || c == '_' || c == '.' || c == '"');
    out.sql = if is_name {
        format!("SELECT * FROM {query}")
    } else {
        query.to_string()
    };
    Ok(out)
}

/// COPY text escaping of one value.
fn escape(value: &str, out: &mut String) {
    for c in value.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\t' => out.push_str("\\t"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            c => out.push(c),
        }
    }
}

/// The COPY text lines of one message: a row per row of a snapshot or change, one row (with
/// NULL columns) for progress (when asked for) and reset.
fn lines(batch: &ChangeBatch, columns: usize, progress: bool) -> PgWireResult<String> {
    let mut out = String::new();
    let marker = |op: &str, out: &mut String| {
        out.push_str(&format!("{}\t{op}", batch.seq));
        for _ in 0..columns {
            out.push_str("\t\\N");
        }
        out.push('\n');
    };
    match batch.kind {
        ChangeKind::Snapshot { .. } | ChangeKind::Change => {
            rows(&batch.rows, batch.seq, &batch.ops, &mut out)?;
        }
        ChangeKind::Progress if progress => marker("progress", &mut out),
        ChangeKind::Progress => {}
        ChangeKind::Reset => marker("reset", &mut out),
        ChangeKind::Lagged => {
            return Err(user_error(
                "53000",
                format!(
                    "the subscription fell too far behind and was closed: resume with \
                     WITH (since = {})",
                    batch.seq
                ),
            ));
        }
    }
    Ok(out)
}

fn rows(rows: &RecordBatch, seq: u64, ops: &[crate::Op], out: &mut String) -> PgWireResult<()> {
    let options = FormatOptions::default();
    let formatters = rows
        .columns()
        .iter()
        .map(|c| ArrayFormatter::try_new(c.as_ref(), &options))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| user_error("XX000", format!("formatting a change failed: {e}")))?;
    for row in 0..rows.num_rows() {
        let op = ops.get(row).map_or("insert", |o| o.name());
        out.push_str(&format!("{seq}\t{op}"));
        for (f, column) in formatters.iter().zip(rows.columns()) {
            out.push('\t');
            if column.is_null(row) {
                out.push_str("\\N");
            } else {
                escape(&f.value(row).to_string(), out);
            }
        }
        out.push('\n');
    }
    Ok(())
}

impl Queries {
    /// Streams `request` to `client` as COPY OUT until the client cancels.
    pub(super) async fn subscribe<C>(
        &self,
        client: &mut C,
        request: Subscribe,
    ) -> PgWireResult<Response>
    where
        C: ClientInfo + Sink<PgWireBackendMessage> + Unpin + Send,
        C::Error: Debug,
        PgWireError: From<<C as Sink<PgWireBackendMessage>>::Error>,
    {
        let session = session(client)?;
        let admitted = self.admit(&session, &request.sql)?;
        let permit = self.state.subscription_permit().map_err(pg_error)?;
        let options = SubscribeOptions {
            db: session.db.clone(),
            since: request.since,
            snapshot: request.snapshot,
            ..SubscribeOptions::default()
        };
        let mut subscription = self
            .state
            .db
            .subscribe_within(
                &request.sql,
                options,
                admitted.databases().map(<[String]>::to_vec),
                admitted.owner(),
            )
            .await
            .map_err(|e| pg_error(e.into()))?;
        let columns = subscription.schema().fields().len();
        let width = i16::try_from(columns + 2)
            .map_err(|_| user_error("54011", "too many columns to subscribe to"))?;
        client
            .send(PgWireBackendMessage::CopyOutResponse(CopyOutResponse::new(
                0,
                width,
                vec![0; columns + 2],
            )))
            .await?;
        let _permit = permit;
        let mut sent = 0usize;
        while let Some(message) = subscription.next().await {
            let message = message.map_err(|e| pg_error(e.into()))?;
            let text = lines(&message, columns, request.progress)?;
            if text.is_empty() {
                continue;
            }
            sent += text.matches('\n').count();
            // Sent (flushed) at once: a live result must not wait in a buffer.
            client
                .send(PgWireBackendMessage::CopyData(CopyData::new(text.into())))
                .await?;
        }
        // The database closed.
        client
            .send(PgWireBackendMessage::CopyDone(CopyDone::new()))
            .await?;
        Ok(Response::Execution(Tag::new("SUBSCRIBE").with_rows(sent)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(sql: &str) -> Subscribe {
        match parse(sql) {
            Some(Ok(s)) => s,
            other => panic!("{sql}: {other:?}"),
        }
    }

    #[test]
    fn subscribe_statements_parse_as_materialize_writes_them() {
        let s = ok("SUBSCRIBE TO SELECT * FROM cpu_1m");
        assert_eq!(s.sql, "SELECT * FROM cpu_1m");
        assert!(s.snapshot && !s.progress && s.since.is_none());
        let s = ok("subscribe cpu_1m with (snapshot = false, progress = true);");
        assert_eq!(s.sql, "SELECT * FROM cpu_1m");
        assert!(!s.snapshot && s.progress);
        let s = ok("SUBSCRIBE (SELECT host, usage FROM cpu WHERE usage > 90) WITH (since = 42)");
        assert_eq!(s.sql, "SELECT host, usage FROM cpu WHERE usage > 90");
        assert_eq!(s.since, Some(42));
        let s = ok("COPY (SUBSCRIBE TO SELECT * FROM cpu) TO STDOUT");
        assert_eq!(s.sql, "SELECT * FROM cpu");
        // A CTE's WITH is the query's, not options.
        let s = ok("SUBSCRIBE WITH t AS (SELECT * FROM cpu) SELECT * FROM t");
        assert_eq!(s.sql, "WITH t AS (SELECT * FROM cpu) SELECT * FROM t");
        assert!(parse("SELECT 1").is_none());
        assert!(parse("SUBSCRIBERS").is_none());
        assert!(matches!(
            parse("SUBSCRIBE cpu WITH (snapshot = maybe)"),
            Some(Err(_))
        ));
        assert!(matches!(
            parse("SUBSCRIBE cpu WITH (colour = 1)"),
            Some(Err(_))
        ));
        assert!(matches!(
            parse("COPY (SUBSCRIBE cpu) TO '/tmp/x'"),
            Some(Err(_))
        ));
        assert!(matches!(parse("SUBSCRIBE TO "), Some(Err(_))));
    }
}
