//! DataFusion catalog adapters: the `rivulet` catalog lists databases; each database's schema
//! lists its tables. Both read the live catalog, so tables created by writes appear at once.

use std::sync::Arc;

use async_trait::async_trait;
use datafusion::catalog::{CatalogProvider, SchemaProvider, TableProvider};
use datafusion::error::Result;

use super::Reader;
use super::table::BufferTableProvider;
use crate::ingest::prepare::{RESERVED_PREFIX, SUBSCRIPTION_VIEW_PREFIX};

/// The schema of Rivulet's own tables (`system.views`).
pub(crate) const SYSTEM_SCHEMA: &str = "system";

/// All databases of a [`Db`](crate::Db), or those a scoped reader may use.
#[derive(Debug)]
pub(crate) struct RivuletCatalog {
    reader: Arc<Reader>,
    /// The databases of a scoped reader (a token with a database list); None: all.
    scope: Option<Arc<[String]>>,
    /// Subscription views (`__rivulet_sub_…`) resolve: only the subscription layer's own
    /// plans over the view it made set this.
    subscription_views: bool,
    /// Postgres clients' `pg_catalog` schema (a pgwire session's, see `query::postgres`).
    pg_catalog: Option<Arc<dyn SchemaProvider>>,
}

impl RivuletCatalog {
    pub(crate) fn new(reader: Arc<Reader>) -> RivuletCatalog {
        RivuletCatalog {
            reader,
            scope: None,
            subscription_views: false,
            pg_catalog: None,
        }
    }

    /// The catalog a reader limited to `databases` sees: it lists only them, `system` tables
    /// hold only their rows, and a table of another database fails planning with
    /// [`Denied`](super::Denied) (so `DESCRIBE other.t`, which scans nothing, is refused too).
    pub(crate) fn scoped(reader: Arc<Reader>, databases: Option<Arc<[String]>>) -> RivuletCatalog {
        RivuletCatalog {
            reader,
            scope: databases,
            subscription_views: false,
            pg_catalog: None,
        }
    }

    /// Lets subscription views resolve (the subscription layer reading the view it made).
    pub(crate) fn with_subscription_views(mut self) -> RivuletCatalog {
        self.subscription_views = true;
        self
    }

    /// Serves `schema` as `pg_catalog` (a Postgres session's catalog tables).
    pub(crate) fn with_pg_catalog(mut self, schema: Arc<dyn SchemaProvider>) -> RivuletCatalog {
        self.pg_catalog = Some(schema);
        self
    }

    fn allows(&self, db: &str) -> bool {
        self.scope
            .as_ref()
            .is_none_or(|s| s.iter().any(|d| d == db))
    }
}

impl CatalogProvider for RivuletCatalog {
    fn schema_names(&self) -> Vec<String> {
        let mut names = self.reader.engine.catalog().database_names();
        names.retain(|n| self.allows(n));
        names
    }

    fn schema(&self, name: &str) -> Option<Arc<dyn SchemaProvider>> {
        if name == super::postgres::PG_CATALOG
            && let Some(pg) = &self.pg_catalog
        {
            return Some(pg.clone());
        }
        if name == SYSTEM_SCHEMA {
            return Some(Arc::new(SystemSchema {
                reader: self.reader.clone(),
                scope: self.scope.clone(),
            }));
        }
        if !self.allows(name) {
            return Some(Arc::new(DeniedSchema {
                name: name.to_string(),
            }));
        }
        // Unknown databases are empty schemas, so `SELECT` on a fresh database says "table not
        // found" rather than "schema not found".
        Some(Arc::new(DatabaseSchema {
            reader: self.reader.clone(),
            name: name.to_string(),
            subscription_views: self.subscription_views,
        }))
    }
}

/// The tables of one database.
#[derive(Debug)]
struct DatabaseSchema {
    reader: Arc<Reader>,
    name: String,
    subscription_views: bool,
}

impl DatabaseSchema {
    /// Whether `name` is hidden from this reader (Rivulet's own tables).
    fn hidden(&self, name: &str) -> bool {
        name.starts_with(RESERVED_PREFIX)
            && !(self.subscription_views && name.starts_with(SUBSCRIPTION_VIEW_PREFIX))
    }
}

#[async_trait]
impl SchemaProvider for DatabaseSchema {
    fn table_names(&self) -> Vec<String> {
        self.reader
            .engine
            .catalog()
            .database(&self.name)
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
        if self.hidden(name) {
            return Ok(None);
        }
        let Some(table) = self.reader.engine.catalog().table(&self.name, name) else {
            return Ok(None);
        };
        if table.settings.read().view {
            // A view's rows are read through its definition's columns.
            return Ok(self.reader.extension().and_then(|x| x.view_table(&table)));
        }
        Ok(Some(
            Arc::new(BufferTableProvider::new(self.reader.clone(), table))
                as Arc<dyn TableProvider>,
        ))
    }

    fn table_exist(&self, name: &str) -> bool {
        !self.hidden(name)
            && self
                .reader
                .engine
                .catalog()
                .table(&self.name, name)
                .is_some()
    }
}

/// A database a scoped reader may not use: it lists nothing and naming a table in it fails.
#[derive(Debug)]
struct DeniedSchema {
    name: String,
}

#[async_trait]
impl SchemaProvider for DeniedSchema {
    fn table_names(&self) -> Vec<String> {
        Vec::new()
    }

    async fn table(&self, _: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        Err(datafusion::error::DataFusionError::External(Box::new(
            super::Denied(self.name.clone()),
        )))
    }

    fn table_exist(&self, _: &str) -> bool {
        false
    }
}

/// The `system` schema: Rivulet's own tables (`system.views`), from the query extension, with
/// only the rows of a scoped reader's databases.
#[derive(Debug)]
struct SystemSchema {
    reader: Arc<Reader>,
    scope: Option<Arc<[String]>>,
}

#[async_trait]
impl SchemaProvider for SystemSchema {
    fn table_names(&self) -> Vec<String> {
        let mut names: Vec<String> = super::system::STORAGE_TABLES
            .iter()
            .map(|n| n.to_string())
            .collect();
        names.extend(
            self.reader
                .extension()
                .map(|x| x.system_table_names())
                .unwrap_or_default(),
        );
        names.extend(
            self.reader
                .system_tables()
                .map(|x| x.names())
                .unwrap_or_default(),
        );
        names
    }

    async fn table(&self, name: &str) -> Result<Option<Arc<dyn TableProvider>>> {
        if let Some(t) =
            super::system::storage_table(&self.reader.engine, name, self.scope.as_deref())?
        {
            return Ok(Some(t));
        }
        if let Some(x) = self.reader.extension()
            && let Some(t) = x.system_table(name, self.scope.as_deref())?
        {
            return Ok(Some(t));
        }
        match self.reader.system_tables() {
            Some(x) => x.table(name, self.scope.as_deref()),
            None => Ok(None),
        }
    }

    fn table_exist(&self, name: &str) -> bool {
        self.table_names().iter().any(|n| n == name)
    }
}
