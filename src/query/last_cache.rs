//! `last_cache('table')`: the latest row of every series of a table, from the maintained
//! last-point state (no scan), as in InfluxDB 3. Fields overwritten at the same time merge
//! last-write-wins. Only tables of the query's database are reachable (so a token limited to
//! databases cannot read others through it).

use std::sync::Arc;

use datafusion::catalog::{TableFunctionArgs, TableFunctionImpl, TableProvider};
use datafusion::datasource::MemTable;
use datafusion::error::{DataFusionError, Result};
use datafusion::logical_expr::Expr;

use super::Reader;

#[derive(Debug)]
pub(crate) struct LastCacheFunction {
    pub(crate) reader: Arc<Reader>,
}

impl TableFunctionImpl for LastCacheFunction {
    fn call_with_args(&self, args: TableFunctionArgs) -> Result<Arc<dyn TableProvider>> {
        let usage = || {
            DataFusionError::Plan(
                "last_cache takes one argument, the table name as a string: last_cache('cpu')"
                    .to_string(),
            )
        };
        let [Expr::Literal(value, _)] = args.exprs() else {
            return Err(usage());
        };
        let name = value.try_as_str().flatten().ok_or_else(usage)?;
        // Rivulet's own tables (views' storage) are read through their views only.
        let reserved = name.starts_with(crate::ingest::prepare::RESERVED_PREFIX);
        let database = args
            .session()
            .config()
            .options()
            .catalog
            .default_schema
            .clone();
        let table = self
            .reader
            .engine
            .catalog()
            .table(&database, name)
            .filter(|_| !reserved)
            .ok_or_else(|| {
                DataFusionError::Plan(format!("table '{name}' not found in database '{database}'"))
            })?;
        let schema = table.schema();
        let snapshot = table.last.lock().snapshot();
        let (batch, _) = snapshot.to_batch(&schema)?;
        Ok(Arc::new(MemTable::try_new(
            schema.arrow().clone(),
            vec![vec![batch]],
        )?))
    }
}
