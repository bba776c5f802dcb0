//! Subscription messages as JSON (SSE, WebSocket text frames, long-poll) and Arrow IPC
//! (WebSocket binary frames). The rows of a change are encoded once and shared by every
//! subscriber that receives them.
//!
//! JSON message: `{"type":"change","seq":N,"applied":N,["id":S,]["first":B,"last":B,]
//! ["reason":S,]"changes":[{"op":"upsert","final":B,"row":{…}},…]}` (`final` only for views
//! with a time bucket and `emit = 'on_change'`; `changes` only for snapshot and change).

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{ArrayRef, BooleanArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use arrow::json::writer::{LineDelimited, WriterBuilder};

use super::{ChangeBatch, ChangeKind};
use crate::error::Error;

fn rows_json(m: &ChangeBatch) -> Result<&str, Error> {
    if let Some(s) = m.json.get() {
        return Ok(s);
    }
    let mut lines = Vec::new();
    {
        let mut w = WriterBuilder::new()
            .with_explicit_nulls(true)
            .build::<_, LineDelimited>(&mut lines);
        w.write(&m.rows)?;
        w.finish()?;
    }
    let text = String::from_utf8_lossy(&lines);
    let mut out = String::with_capacity(lines.len() + 40 * m.rows.num_rows() + 2);
    out.push('[');
    for (i, line) in text.lines().enumerate() {
        if i > 0 {
            out.push(',');
        }
        out.push_str("{\"op\":\"");
        out.push_str(m.ops.get(i).map_or("insert", |o| o.name()));
        out.push('"');
        if let Some(f) = m.finals.as_ref().and_then(|f| f.get(i)) {
            out.push_str(if *f {
                ",\"final\":true"
            } else {
                ",\"final\":false"
            });
        }
        out.push_str(",\"row\":");
        out.push_str(line);
        out.push('}');
    }
    out.push(']');
    let _ = m.json.set(out);
    Ok(m.json.get().map_or("[]", |s| s.as_str()))
}

/// One message as a JSON object; `id` is the WebSocket subscription id.
pub fn message_json(m: &ChangeBatch, id: Option<&str>) -> Result<String, Error> {
    let mut out = String::with_capacity(96);
    out.push_str("{\"type\":\"");
    out.push_str(m.kind.name());
    out.push('"');
    if let Some(id) = id {
        out.push_str(",\"id\":");
        out.push_str(&serde_json::Value::from(id).to_string());
    }
    out.push_str(&format!(",\"seq\":{},\"applied\":{}", m.seq, m.applied));
    if let ChangeKind::Snapshot { first, last } = m.kind {
        out.push_str(&format!(",\"first\":{first},\"last\":{last}"));
    }
    if let Some(r) = &m.reason {
        out.push_str(",\"reason\":");
        out.push_str(&serde_json::Value::from(r.as_str()).to_string());
    }
    if matches!(m.kind, ChangeKind::Snapshot { .. } | ChangeKind::Change) {
        out.push_str(",\"changes\":");
        out.push_str(rows_json(m)?);
    }
    out.push('}');
    Ok(out)
}

/// An error message (the subscription then ends).
pub fn error_json(message: &str, id: Option<&str>) -> String {
    let mut v = serde_json::json!({"type": "error", "message": message});
    if let Some(id) = id {
        v["id"] = serde_json::Value::from(id);
    }
    v.to_string()
}

/// A snapshot or change as one Arrow IPC stream: the rows plus `__op` (and `__final`)
/// columns; the schema's metadata carries `type`, `seq`, `applied`, `id`, `first`, `last`.
pub fn message_arrow(m: &ChangeBatch, id: Option<&str>) -> Result<Vec<u8>, Error> {
    let mut fields: Vec<Field> = m
        .rows
        .schema()
        .fields()
        .iter()
        .map(|f| f.as_ref().clone())
        .collect();
    let mut columns: Vec<ArrayRef> = m.rows.columns().to_vec();
    fields.push(Field::new("__op", DataType::Utf8, false));
    columns.push(Arc::new(StringArray::from_iter_values(
        m.ops.iter().map(|o| o.name()),
    )));
    if let Some(f) = &m.finals {
        fields.push(Field::new("__final", DataType::Boolean, false));
        columns.push(Arc::new(BooleanArray::from(f.to_vec())));
    }
    let mut meta = HashMap::new();
    meta.insert("type".to_string(), m.kind.name().to_string());
    meta.insert("seq".to_string(), m.seq.to_string());
    meta.insert("applied".to_string(), m.applied.to_string());
    if let Some(id) = id {
        meta.insert("id".to_string(), id.to_string());
    }
    if let ChangeKind::Snapshot { first, last } = m.kind {
        meta.insert("first".to_string(), first.to_string());
        meta.insert("last".to_string(), last.to_string());
    }
    let schema = Arc::new(Schema::new_with_metadata(fields, meta));
    let batch = RecordBatch::try_new_with_options(
        schema.clone(),
        columns,
        &arrow::array::RecordBatchOptions::new().with_row_count(Some(m.rows.num_rows())),
    )?;
    let mut out = Vec::new();
    {
        let mut w = arrow::ipc::writer::StreamWriter::try_new(&mut out, &schema)?;
        w.write(&batch)?;
        w.finish()?;
    }
    Ok(out)
}
