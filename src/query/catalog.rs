//! DataFusion catalog adapters: the `rivulet` catalog lists databases; each database's schema
//! lists its tables. Both read the live catalog, so tables created by writes appear at once.

use std::sync::{Arc, Weak};

use async_trait::async_trait;
use datafusion::catalog::{CatalogProvider, SchemaProvider, TableProvider};
use datafusion::error::{DataFusionError, Result};

use super::table::BufferTableProvider;
use crate::db::DbInner;
use crate::ingest::prepare::RESERVED_PREFIX;

/// The schema of Rivulet's own tables (`system.views`).
pub(crate) const SYSTEM_SCHEMA: &str = "system";

fn upgrade(db: &Weak<DbInner>) -> Result<Arc<DbInner>> {
    db.upgrade()
        .ok_or_else(|| DataFusionError::Execution("the database is closed".to_string()))
}

/// All databases of a [`Db`](crate::Db).
#[derive(Debug)]
pub(crate) struct RivuletCatalog {
    db: Weak<DbInner>,
}

impl RivuletCatalog {
    pub(crate) fn new(db: Weak<DbInner>) -> RivuletCatalog {
        RivuletCatalog { db }
    }
}

impl CatalogProvider for RivuletCatalog {
    fn schema_names(&self) -> Vec<String> {
        match self.db.upgrade() {
            Some(db) => db
                .catalog
                .databases()
                .iter()
                .map(|d| d.name.to_string())
                .collect(),
            None => Vec::new(),
        }
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        if name == SYSTEM_SCHEMA {
            return Some(Arc::new(SystemSchema {
                db: self.db.clone(),
            }));
        }
        // Unknown databases are empty schemas, so `SELECT` on a fresh database says "table not
        // found" rather than "schema not found".
        Some(Arc::new(DatabaseSchema {
            db: self.db.clone(),
            name: name.to_string(),
        }))
    }
}

/// The tables of one database.
#[derive(Debug)]
struct DatabaseSchema {
    db: Weak<DbInner>,
    name: String,
}

#[async_trait]
impl SchemaProvider for DatabaseSchema {
    fn table_names(&self) -> Vec<String> {
        self.db
            .upgrade()
            .and_then(|db| db.catalog.database(&self.name))
            .map(|d| {
                d.tables()
                    .iter()
                    .filter(|t| !t.name.starts_with(RESERVED_PREFIX))
                    .map(|t| t.name.to_string())
                    .collect()
            })
            .unwrap_or_default()
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        let db = upgrade(&self.db)?;
        if name.starts_with(RESERVED_PREFIX) {
            return Ok(None);
        }
        let Some(table) = db.catalog.table(&self.name, name) else {
            return Ok(None);
        };
        if table.settings.read().view {
            // A view's rows are read through its definition's columns.
            return Ok(db
                .views
                .by_table(table.id)
                .map(|v| v.provider.clone() as Arc<dyn TableProvider>));
        }
        Ok(Some(
            Arc::new(BufferTableProvider::new(self.db.clone(), table)) as Arc<dyn TableProvider>,
        ))
    }

    fn table_exist(&self, name: &str) -> bool {
        !name.starts_with(RESERVED_PREFIX)
            && self
                .db
                .upgrade()
                .is_some_and(|db| db.catalog.table(&self.name, name).is_some())
    }
}

/// `system.views`: one row per materialized view, computed when a query reads it.
#[derive(Debug)]
struct SystemSchema {
    db: Weak<DbInner>,
}

#[async_trait]
impl SchemaProvider for SystemSchema {
    fn table_names(&self) -> Vec<String> {
        vec!["views".to_string()]
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        if name != "views" {
            return Ok(None);
        }
        let db = upgrade(&self.db)?;
        let batch = db
            .views_batch(None)
            .map_err(|e| DataFusionError::Execution(e.to_string()))?;
        Ok(Some(Arc::new(datafusion::datasource::MemTable::try_new(
            batch.schema(),
            vec![vec![batch]],
        )?)))
    }

    fn table_exist(&self, name: &str) -> bool {
        name == "views"
    }
}
