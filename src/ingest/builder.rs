//! Builds one table's chunk (an Arrow batch plus series ids) row by row.
//!
//! Columns are "slots" created on first use; a row appends only the columns it carries and the
//! others are padded with nulls lazily, so sparse tables cost nothing per absent column. Tag
//! columns are dictionary-encoded; the tag keys of a series are resolved once per chunk and
//! replayed for its later rows, so a row costs one series lookup instead of one hash per tag.

use std::collections::HashMap;
use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, BooleanBuilder, DictionaryArray, Float64Builder, Int32Builder,
    Int64Builder, RecordBatch, StringBuilder, TimestampNanosecondArray, UInt64Builder,
};
use arrow::datatypes::{Field, Int32Type, Schema};
use arrow::error::ArrowError;

use crate::storage::buffer::{Chunk, min_max};
use crate::storage::catalog::{ColumnKind, FieldType, TIME_COLUMN, time_type};
use crate::storage::table::{OVER_PERSISTED, OVERLAPS};

type FastMap<K, V> = HashMap<K, V, ahash::RandomState>;

/// A value for a field slot.
#[derive(Debug, Clone, Copy)]
pub(crate) enum Value<'a> {
    Float(f64),
    Integer(i64),
    UInteger(u64),
    Boolean(bool),
    String(&'a str),
}

enum ColumnBuilder {
    Tag {
        keys: Int32Builder,
        values: StringBuilder,
        dict: FastMap<Box<str>, i32>,
    },
    Float(Float64Builder),
    Integer(Int64Builder),
    UInteger(UInt64Builder),
    String(StringBuilder),
    Boolean(BooleanBuilder),
}

impl ColumnBuilder {
    fn new(kind: ColumnKind) -> ColumnBuilder {
        match kind {
            ColumnKind::Tag | ColumnKind::Time => ColumnBuilder::Tag {
                keys: Int32Builder::new(),
                values: StringBuilder::new(),
                dict: FastMap::default(),
            },
            ColumnKind::Field(FieldType::Float) => ColumnBuilder::Float(Float64Builder::new()),
            ColumnKind::Field(FieldType::Integer) => ColumnBuilder::Integer(Int64Builder::new()),
            ColumnKind::Field(FieldType::UInteger) => ColumnBuilder::UInteger(UInt64Builder::new()),
            ColumnKind::Field(FieldType::String) => ColumnBuilder::String(StringBuilder::new()),
            ColumnKind::Field(FieldType::Boolean) => ColumnBuilder::Boolean(BooleanBuilder::new()),
        }
    }

    fn len(&self) -> usize {
        match self {
            ColumnBuilder::Tag { keys, .. } => keys.len(),
            ColumnBuilder::Float(b) => b.len(),
            ColumnBuilder::Integer(b) => b.len(),
            ColumnBuilder::UInteger(b) => b.len(),
            ColumnBuilder::String(b) => b.len(),
            ColumnBuilder::Boolean(b) => b.len(),
        }
    }

    fn append_nulls(&mut self, n: usize) {
        match self {
            ColumnBuilder::Tag { keys, .. } => keys.append_nulls(n),
            ColumnBuilder::Float(b) => b.append_nulls(n),
            ColumnBuilder::Integer(b) => b.append_nulls(n),
            ColumnBuilder::UInteger(b) => b.append_nulls(n),
            ColumnBuilder::String(b) => b.append_nulls(n),
            ColumnBuilder::Boolean(b) => b.append_nulls(n),
        }
    }

    fn finish(self) -> Result<ArrayRef, ArrowError> {
        Ok(match self {
            ColumnBuilder::Tag {
                mut keys,
                mut values,
                ..
            } => Arc::new(DictionaryArray::<Int32Type>::try_new(
                keys.finish(),
                Arc::new(values.finish()),
            )?),
            ColumnBuilder::Float(mut b) => Arc::new(b.finish()),
            ColumnBuilder::Integer(mut b) => Arc::new(b.finish()),
            ColumnBuilder::UInteger(mut b) => Arc::new(b.finish()),
            ColumnBuilder::String(mut b) => Arc::new(b.finish()),
            ColumnBuilder::Boolean(mut b) => Arc::new(b.finish()),
        })
    }
}

/// Builds the chunk of one table for one write.
pub(crate) struct ChunkBuilder {
    names: Vec<Arc<str>>,
    kinds: Vec<ColumnKind>,
    columns: Vec<ColumnBuilder>,
    /// Non-null values appended per slot (all-null slots are left out of the chunk).
    filled: Vec<usize>,
    by_name: FastMap<Arc<str>, usize>,
    time: Vec<i64>,
    series: Vec<u32>,
    /// `OVERLAPS` / `OVER_PERSISTED` flags of the rows so far.
    overlaps: u8,
    /// Series id → range of `series_tags` holding its (slot, key) pairs in this chunk.
    local_series: FastMap<u32, (u32, u32)>,
    series_tags: Vec<(u32, i32)>,
}

impl ChunkBuilder {
    pub(crate) fn new() -> ChunkBuilder {
        ChunkBuilder {
            names: Vec::new(),
            kinds: Vec::new(),
            columns: Vec::new(),
            filled: Vec::new(),
            by_name: FastMap::default(),
            time: Vec::new(),
            series: Vec::new(),
            overlaps: 0,
            local_series: FastMap::default(),
            series_tags: Vec::new(),
        }
    }

    /// The slot of column `name`, created with `kind` on first use.
    pub(crate) fn slot(&mut self, name: &str, kind: ColumnKind) -> usize {
        if let Some(&slot) = self.by_name.get(name) {
            if self.kinds[slot] != kind && self.filled[slot] == 0 {
                // Created for a line that was then rejected: nothing was appended to it.
                self.kinds[slot] = kind;
                self.columns[slot] = ColumnBuilder::new(kind);
            }
            return slot;
        }
        let name: Arc<str> = name.into();
        let slot = self.columns.len();
        self.names.push(name.clone());
        self.kinds.push(kind);
        self.columns.push(ColumnBuilder::new(kind));
        self.filled.push(0);
        self.by_name.insert(name, slot);
        slot
    }

    fn pad(&mut self, slot: usize) {
        let row = self.time.len();
        let col = &mut self.columns[slot];
        let len = col.len();
        if len < row {
            col.append_nulls(row - len);
        }
    }

    /// Appends the tags of series `sid` to the current row if this chunk has seen the series;
    /// returns false when the caller must supply them with [`ChunkBuilder::add_series_tags`].
    pub(crate) fn replay_series_tags(&mut self, sid: u32) -> bool {
        let Some(&(start, end)) = self.local_series.get(&sid) else {
            return false;
        };
        for i in start..end {
            let (slot, key) = self.series_tags[i as usize];
            self.pad(slot as usize);
            if let ColumnBuilder::Tag { keys, .. } = &mut self.columns[slot as usize] {
                keys.append_value(key);
            }
            self.filled[slot as usize] += 1;
        }
        true
    }

    /// Appends the tags of a series new to this chunk to the current row and remembers them.
    pub(crate) fn add_series_tags<'v>(
        &mut self,
        sid: u32,
        tags: impl IntoIterator<Item = (usize, &'v str)>,
    ) {
        let start = self.series_tags.len() as u32;
        for (slot, value) in tags {
            self.pad(slot);
            let key = match &mut self.columns[slot] {
                ColumnBuilder::Tag { keys, values, dict } => {
                    let key = match dict.get(value) {
                        Some(&k) => k,
                        None => {
                            let k = values.len() as i32;
                            values.append_value(value);
                            dict.insert(value.into(), k);
                            k
                        }
                    };
                    keys.append_value(key);
                    key
                }
                _ => continue,
            };
            self.filled[slot] += 1;
            self.series_tags.push((slot as u32, key));
        }
        let end = self.series_tags.len() as u32;
        self.local_series.insert(sid, (start, end));
    }

    /// Appends a field value to the current row. The caller checked the slot's type.
    pub(crate) fn append_field(&mut self, slot: usize, value: Value<'_>) {
        self.pad(slot);
        match (&mut self.columns[slot], value) {
            (ColumnBuilder::Float(b), Value::Float(v)) => b.append_value(v),
            (ColumnBuilder::Integer(b), Value::Integer(v)) => b.append_value(v),
            (ColumnBuilder::UInteger(b), Value::UInteger(v)) => b.append_value(v),
            (ColumnBuilder::Boolean(b), Value::Boolean(v)) => b.append_value(v),
            (ColumnBuilder::String(b), Value::String(v)) => b.append_value(v),
            // Unreachable by contract; keep the row well-formed rather than panic.
            (col, _) => col.append_nulls(1),
        }
        self.filled[slot] += 1;
    }

    /// Ends the current row.
    pub(crate) fn finish_row(&mut self, time: i64, sid: u32, overlaps: u8) {
        self.time.push(time);
        self.series.push(sid);
        self.overlaps |= overlaps;
    }

    /// The names and kinds of the slots that received at least one value.
    pub(crate) fn used_columns(&self) -> impl Iterator<Item = (&Arc<str>, ColumnKind)> {
        self.names
            .iter()
            .zip(&self.kinds)
            .zip(&self.filled)
            .filter(|(_, n)| **n > 0)
            .map(|((name, kind), _)| (name, *kind))
    }

    /// The finished chunk (sequence 0 until the write is sequenced), or None without rows.
    pub(crate) fn finish(self) -> Result<Option<Chunk>, ArrowError> {
        let rows = self.time.len();
        if rows == 0 {
            return Ok(None);
        }
        let (min_time, max_time) = min_max(&self.time);
        let mut fields = vec![Field::new(TIME_COLUMN, time_type(), false)];
        let mut arrays: Vec<ArrayRef> = vec![Arc::new(
            TimestampNanosecondArray::from(self.time).with_timezone("UTC"),
        )];
        for (((name, kind), mut col), filled) in self
            .names
            .into_iter()
            .zip(self.kinds)
            .zip(self.columns)
            .zip(self.filled)
        {
            if filled == 0 {
                continue;
            }
            let len = col.len();
            if len < rows {
                col.append_nulls(rows - len);
            }
            let array = col.finish()?;
            fields.push(Field::new(name.as_ref(), kind.data_type(), true));
            arrays.push(array);
        }
        let batch = RecordBatch::try_new(Arc::new(Schema::new(fields)), arrays)?;
        Ok(Some(Chunk {
            seq: 0,
            batch,
            series: self.series.into(),
            min_time,
            max_time,
            overlaps: self.overlaps & OVERLAPS != 0,
            over_persisted: self.overlaps & OVER_PERSISTED != 0,
            merged: false,
        }))
    }
}
