//! `INSERT INTO table …`: the inserted rows go through the normal write path as one atomic
//! write (WAL, sequence, group commit), exactly like a line protocol write.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::arrow::compute::concat_batches;
use datafusion::arrow::datatypes::SchemaRef;
use datafusion::datasource::sink::DataSink;
use datafusion::error::{DataFusionError, Result};
use datafusion::execution::{SendableRecordBatchStream, TaskContext};
use datafusion::physical_plan::{DisplayAs, DisplayFormatType};
use futures::TryStreamExt;

use crate::error::Error;
use crate::ingest::batch::prepare_batch;
use crate::storage::engine::{Engine, Origin};

/// Writes the rows of an `INSERT` into one table.
#[derive(Debug)]
pub(crate) struct TableSink {
    engine: Arc<Engine>,
    database: String,
    table: String,
    schema: SchemaRef,
}

impl TableSink {
    pub(crate) fn new(
        engine: Arc<Engine>,
        database: String,
        table: String,
        schema: SchemaRef,
    ) -> Self {
        TableSink {
            engine,
            database,
            table,
            schema,
        }
    }
}

impl DisplayAs for TableSink {
    fn fmt_as(&self, _t: DisplayFormatType, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RivuletSink: table={}.{}", self.database, self.table)
    }
}

#[async_trait]
impl DataSink for TableSink {
    fn schema(&self) -> &SchemaRef {
        &self.schema
    }

    async fn write_all(
        &self,
        data: SendableRecordBatchStream,
        _context: &Arc<TaskContext>,
    ) -> Result<u64> {
        let schema = data.schema();
        let batches: Vec<_> = data.try_collect().await?;
        let batch = concat_batches(&schema, &batches)?;
        let rows = batch.num_rows() as u64;
        if rows == 0 {
            return Ok(0);
        }
        let engine = self.engine.clone();
        let (database, table) = (self.database.clone(), self.table.clone());
        // Writes block until durable: keep them off the async worker threads. A failure is
        // the write's own error (the server classifies it as for any write).
        tokio::task::spawn_blocking(move || {
            engine.write::<(), Error>(Origin::User, |catalog| {
                let (set, _) = prepare_batch(catalog, &database, &table, &batch)?.split();
                Ok((set, ()))
            })
        })
        .await
        .map_err(|e| DataFusionError::External(Box::new(e)))?
        .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(rows)
    }
}
