//! `system.views` (and `SHOW MATERIALIZED VIEWS`): one row per view, and how queries read
//! views at all (the [`QueryExtension`](crate::query::QueryExtension) the views layer gives
//! the query engine).

use std::sync::Arc;

use arrow::array::{
    ArrayRef, BooleanArray, Float64Array, RecordBatch, StringArray, TimestampNanosecondArray,
    UInt64Array,
};
use datafusion::error::DataFusionError;

use super::{View, Views};
use crate::error::Error;
use crate::storage::table::Table;

impl Views {
    /// One row per view (of `db`, or all): what `system.views` and `SHOW MATERIALIZED VIEWS`
    /// show.
    pub(crate) fn views_batch(&self, db: Option<&str>) -> Result<RecordBatch, Error> {
        self.views_batch_of(|d| db.is_none_or(|want| want == d))
    }

    /// [`views_batch`](Self::views_batch) of the views whose database passes `keep`.
    fn views_batch_of(&self, keep: impl Fn(&str) -> bool) -> Result<RecordBatch, Error> {
        let views: Vec<Arc<View>> = self
            .all()
            .iter()
            .filter(|v| keep(v.db.as_ref()) && !v.is_subscription_view())
            .cloned()
            .collect();
        let mut database = Vec::new();
        let mut name = Vec::new();
        let mut definition = Vec::new();
        let mut strategy = Vec::new();
        let mut emit = Vec::new();
        let mut lateness = Vec::new();
        let mut applied = Vec::new();
        let mut lag = Vec::new();
        let mut rows = Vec::new();
        let mut backfill = Vec::new();
        let mut late_dropped = Vec::new();
        let mut watermark = Vec::new();
        let mut error = Vec::new();
        let mut round_ms = Vec::new();
        let mut caught_up = Vec::new();
        for v in &views {
            let def = v.def.lock().clone();
            let st = v.status.lock();
            database.push(v.db.to_string());
            name.push(def.name.clone());
            definition.push(def.sql.clone());
            strategy.push(v.plan.strategy.name());
            emit.push(match def.options.emit {
                crate::views::ddl::Emit::OnChange => "on_change",
                crate::views::ddl::Emit::OnWindowClose => "on_window_close",
            });
            lateness.push(format!("{}s", def.options.lateness_ns / 1_000_000_000));
            applied.push(st.applied);
            lag.push(st.lag_ms);
            let (r, _) = v.table.buffer.read().size();
            let seg: u64 = v
                .table
                .buffer
                .read()
                .segments()
                .iter()
                .map(|s| s.meta.rows)
                .sum();
            rows.push(r as u64 + seg);
            backfill.push(st.backfill.map(|(d, t)| format!("{d}/{t}")));
            late_dropped.push(st.late_dropped);
            watermark.push(
                st.max_source_time
                    .map(|m| m.saturating_sub(def.options.lateness_ns)),
            );
            error.push(st.last_error.clone());
            round_ms.push(st.last_round_ms);
            caught_up.push(!st.has_work());
        }
        Ok(RecordBatch::try_from_iter(vec![
            (
                "database",
                Arc::new(StringArray::from(database)) as ArrayRef,
            ),
            ("name", Arc::new(StringArray::from(name))),
            ("definition", Arc::new(StringArray::from(definition))),
            ("strategy", Arc::new(StringArray::from(strategy))),
            ("emit", Arc::new(StringArray::from(emit))),
            ("lateness", Arc::new(StringArray::from(lateness))),
            ("applied_seq", Arc::new(UInt64Array::from(applied))),
            ("lag_ms", Arc::new(Float64Array::from(lag))),
            ("stored_rows", Arc::new(UInt64Array::from(rows))),
            ("backfill", Arc::new(StringArray::from(backfill))),
            ("late_dropped", Arc::new(UInt64Array::from(late_dropped))),
            (
                "watermark",
                Arc::new(TimestampNanosecondArray::from(watermark).with_timezone("UTC")),
            ),
            ("last_error", Arc::new(StringArray::from(error))),
            ("last_round_ms", Arc::new(Float64Array::from(round_ms))),
            ("idle", Arc::new(BooleanArray::from(caught_up))),
        ])?)
    }
}

impl crate::query::QueryExtension for Views {
    fn view_table(
        &self,
        table: &Arc<Table>,
    ) -> Option<Arc<dyn datafusion::catalog::TableProvider>> {
        self.by_table(table.id)
            .map(|v| v.provider.clone() as Arc<dyn datafusion::catalog::TableProvider>)
    }

    fn system_table_names(&self) -> Vec<String> {
        vec!["views".to_string()]
    }

    fn system_table(
        &self,
        name: &str,
        databases: Option<&[String]>,
    ) -> Result<Option<Arc<dyn datafusion::catalog::TableProvider>>, DataFusionError> {
        if name != "views" {
            return Ok(None);
        }
        let batch = self
            .views_batch_of(|db| databases.is_none_or(|d| d.iter().any(|a| a == db)))
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(Some(Arc::new(datafusion::datasource::MemTable::try_new(
            batch.schema(),
            vec![vec![batch]],
        )?)))
    }
}
