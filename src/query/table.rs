//! The [`TableProvider`] of a Rivulet table: the buffer's chunks, deduplicated, projected onto
//! the table schema, with chunks outside the query's time range skipped.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::catalog::{Session, TableProvider};
use datafusion::common::ScalarValue;
use datafusion::datasource::TableType;
use datafusion::datasource::memory::MemorySourceConfig;
use datafusion::datasource::sink::DataSinkExec;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::dml::InsertOp;
use datafusion::logical_expr::{Between, BinaryExpr, Expr, Operator, TableProviderFilterPushDown};
use datafusion::physical_plan::ExecutionPlan;

use super::QuerySnapshot;
use super::insert::TableSink;
use crate::db::DbInner;
use crate::storage::buffer::{Chunk, merge_chunks, projected_schema};
use crate::storage::catalog::{TIME_COLUMN, TableSchema};
use crate::storage::table::Table;

/// Reads one table.
#[derive(Debug)]
pub(crate) struct BufferTableProvider {
    db: Weak<DbInner>,
    table: Arc<Table>,
    /// The schema as of planning: scans project onto it even if columns are added meanwhile.
    schema: Arc<TableSchema>,
    time_default: Expr,
}

impl BufferTableProvider {
    pub(crate) fn new(db: Weak<DbInner>, table: Arc<Table>) -> BufferTableProvider {
        let schema = table.schema();
        BufferTableProvider {
            db,
            table,
            schema,
            time_default: datafusion::functions::expr_fn::now(),
        }
    }

    /// The table's chunks, merged first if some may hold overwritten points.
    fn chunks(&self, snapshot_seq: Option<u64>) -> Result<Vec<Arc<Chunk>>> {
        let db = self
            .db
            .upgrade()
            .ok_or_else(|| DataFusionError::Execution("the database is closed".to_string()))?;
        // The query's sequence, read before the buffer: every chunk up to it is in the buffer.
        let visible = snapshot_seq.unwrap_or_else(|| db.visible_seq());
        let snapshot = self.table.buffer.read().snapshot().up_to(visible);
        if !snapshot.needs_dedup() {
            return Ok(snapshot.chunks);
        }
        // The schema read after the snapshot covers every column of its chunks: writers
        // publish columns before their chunks become visible.
        let schema = self.table.schema();
        let merged = Arc::new(merge_chunks(&schema, &snapshot.chunks)?);
        self.table
            .buffer
            .write()
            .install_merged(&snapshot.chunks, merged.clone());
        Ok(vec![merged])
    }
}

/// Nanoseconds of a timestamp literal.
fn literal_ns(expr: &Expr) -> Option<i64> {
    let Expr::Literal(value, _) = expr else {
        return None;
    };
    match value {
        ScalarValue::TimestampNanosecond(Some(v), _) => Some(*v),
        ScalarValue::TimestampMicrosecond(Some(v), _) => v.checked_mul(1_000),
        ScalarValue::TimestampMillisecond(Some(v), _) => v.checked_mul(1_000_000),
        ScalarValue::TimestampSecond(Some(v), _) => v.checked_mul(1_000_000_000),
        _ => None,
    }
}

fn is_time(expr: &Expr) -> bool {
    matches!(expr, Expr::Column(c) if c.name == TIME_COLUMN)
}

/// The inclusive time range `[lo, hi]` a filter restricts `time` to, if it is a time filter.
pub(crate) fn time_bounds(expr: &Expr) -> Option<(i64, i64)> {
    match expr {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (op, v) = if is_time(left) {
                (*op, literal_ns(right)?)
            } else if is_time(right) {
                (op.swap()?, literal_ns(left)?)
            } else if *op == Operator::And {
                let (a, b) = (time_bounds(left), time_bounds(right));
                return match (a, b) {
                    (Some(a), Some(b)) => Some((a.0.max(b.0), a.1.min(b.1))),
                    (a, b) => a.or(b),
                };
            } else {
                return None;
            };
            match op {
                Operator::Eq => Some((v, v)),
                Operator::Gt => Some((v.saturating_add(1), i64::MAX)),
                Operator::GtEq => Some((v, i64::MAX)),
                Operator::Lt => Some((i64::MIN, v.saturating_sub(1))),
                Operator::LtEq => Some((i64::MIN, v)),
                _ => None,
            }
        }
        Expr::Between(Between {
            expr,
            negated: false,
            low,
            high,
        }) if is_time(expr) => Some((literal_ns(low)?, literal_ns(high)?)),
        _ => None,
    }
}

#[async_trait]
impl TableProvider for BufferTableProvider {
    fn schema(&self) -> SchemaRef {
        self.schema.arrow().clone()
    }

    fn table_type(&self) -> TableType {
        TableType::Base
    }

    fn get_column_default(&self, column: &str) -> Option<&Expr> {
        (column == TIME_COLUMN).then_some(&self.time_default)
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Time filters prune chunks; DataFusion still applies them to the rows.
        Ok(filters
            .iter()
            .map(|f| {
                if time_bounds(f).is_some() {
                    TableProviderFilterPushDown::Inexact
                } else {
                    TableProviderFilterPushDown::Unsupported
                }
            })
            .collect())
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        _limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let (lo, hi) = filters
            .iter()
            .filter_map(time_bounds)
            .fold((i64::MIN, i64::MAX), |(lo, hi), (a, b)| {
                (lo.max(a), hi.min(b))
            });
        let columns: Vec<usize> = match projection {
            Some(p) => p.clone(),
            None => (0..self.schema.columns().len()).collect(),
        };
        let out_schema = projected_schema(&self.schema, &columns);
        let partitions = state.config().target_partitions().max(1);
        let mut parts: Vec<Vec<_>> = vec![Vec::new(); partitions];
        let mut next = 0;
        if lo <= hi {
            let snapshot = state
                .config()
                .get_extension::<QuerySnapshot>()
                .map(|s| s.seq);
            for chunk in self.chunks(snapshot)? {
                if chunk.max_time < lo || chunk.min_time > hi {
                    continue;
                }
                let batch = chunk.project(&self.schema, &columns, &out_schema)?;
                parts[next % partitions].push(batch);
                next += 1;
            }
        }
        parts.retain(|p| !p.is_empty());
        if parts.is_empty() {
            parts.push(Vec::new());
        }
        Ok(MemorySourceConfig::try_new_exec(&parts, out_schema, None)?)
    }

    async fn insert_into(
        &self,
        _state: &dyn Session,
        input: Arc<dyn ExecutionPlan>,
        insert_op: InsertOp,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        if insert_op != InsertOp::Append {
            return Err(DataFusionError::NotImplemented(format!(
                "{insert_op} is not supported: time-series tables only append (a point with the same series and time overwrites)"
            )));
        }
        let sink = TableSink::new(
            self.db.clone(),
            self.table.db.to_string(),
            self.table.name.to_string(),
            self.schema.arrow().clone(),
        );
        Ok(Arc::new(DataSinkExec::new(input, Arc::new(sink), None)))
    }
}
