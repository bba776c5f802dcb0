//! Storage statements run through the statement path (`ALTER TABLE … SET (retention = …)`).

use std::sync::Arc;

use arrow::array::RecordBatch;

use super::DbInner;
use crate::error::Error;
use crate::storage::engine::StorageError;

impl DbInner {
    /// Runs a storage statement; the result is one row describing what it set.
    pub(super) fn run_admin(
        &self,
        default_db: &str,
        statement: crate::query::admin::AdminStatement,
        databases: Option<&[String]>,
    ) -> Result<datafusion::dataframe::DataFrame, Error> {
        use crate::query::admin::AdminStatement;
        let AdminStatement::SetRetention {
            db,
            table,
            retention,
        } = statement;
        let db = db.unwrap_or_else(|| default_db.to_string());
        if let Some(allowed) = databases
            && !allowed.contains(&db)
        {
            return Err(Error::Denied(format!(
                "this token may not use database '{db}'"
            )));
        }
        self.engine
            .set_retention(&db, &table, retention)
            .map_err(|e| match e {
                StorageError::DatabaseNotFound(_) | StorageError::TableNotFound { .. } => {
                    Error::Query(datafusion::error::DataFusionError::Plan(e.to_string()))
                }
                other => other.into(),
            })?;
        let shown = retention.map_or_else(
            || "none".to_string(),
            |ns| format!("{}s", ns / 1_000_000_000),
        );
        let batch = RecordBatch::try_from_iter([
            (
                "table",
                Arc::new(arrow::array::StringArray::from(vec![format!(
                    "{db}.{table}"
                )])) as arrow::array::ArrayRef,
            ),
            (
                "retention",
                Arc::new(arrow::array::StringArray::from(vec![shown])) as arrow::array::ArrayRef,
            ),
        ])?;
        Ok(datafusion::prelude::SessionContext::new().read_batch(batch)?)
    }
}
