//! SQL over Rivulet tables with DataFusion.
//!
//! Every database is a DataFusion schema of the catalog `rivulet`; every table is a
//! [`TableProvider`](datafusion::catalog::TableProvider) reading the table's buffer with
//! projection and time-range pushdown. A session is cloned from one template per query, with the
//! requested database as its default schema. Identifiers are case-sensitive (no normalization),
//! like line protocol names and InfluxDB 3.

pub(crate) mod admin;
pub(crate) mod bounds;
mod catalog;
mod functions;
mod gapfill;
mod insert;
mod last_cache;
mod latest;
mod postgres;
mod rewrite;
mod system;
mod table;

pub(crate) use postgres::{PgSession, PgStatement};
pub(crate) use table::BufferTableProvider;

use std::sync::atomic::AtomicU64;
use std::sync::{Arc, OnceLock, Weak};

use arrow::array::RecordBatch;
use datafusion::common::tree_node::TreeNode;
use datafusion::dataframe::DataFrame;
use datafusion::error::DataFusionError;
use datafusion::execution::SessionStateBuilder;
use datafusion::execution::context::{SQLOptions, SessionContext};
use datafusion::execution::runtime_env::RuntimeEnvBuilder;
use datafusion::execution::session_state::SessionState;
use datafusion::logical_expr::LogicalPlan;
use datafusion::prelude::SessionConfig;

use datafusion::catalog::TableProvider;

use crate::storage::engine::Engine;
use crate::storage::table::Table;

/// Errors of the query layer's own statements (DataFusion's planning and execution errors
/// stay DataFusion's).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum QueryError {
    /// A storage statement (`ALTER TABLE …`), or a duration in one, is not valid.
    #[error("{0}")]
    Invalid(String),
}

/// The DataFusion catalog name under which databases appear as schemas.
pub(crate) const CATALOG_NAME: &str = "rivulet";

/// The write sequence a query reads up to, fixed when it is planned (and raised once, after
/// waiting for the materialized views it reads to catch up), plus what view maintenance reads
/// instead of whole tables.
#[derive(Debug, Default)]
pub(crate) struct QuerySnapshot {
    pub(crate) seq: std::sync::atomic::AtomicU64,
    /// By table id: read these rows instead of the table, or only a time range of it.
    pub(crate) overrides: std::collections::HashMap<u64, TableOverride>,
}

impl QuerySnapshot {
    pub(crate) fn new(seq: u64) -> QuerySnapshot {
        QuerySnapshot {
            seq: std::sync::atomic::AtomicU64::new(seq),
            overrides: Default::default(),
        }
    }

    pub(crate) fn seq(&self) -> u64 {
        self.seq.load(std::sync::atomic::Ordering::Acquire)
    }
}

/// What a view-maintenance query reads of one table.
#[derive(Debug, Clone)]
pub(crate) enum TableOverride {
    /// Only these rows (a write's delta), in any subset of the table's columns.
    Rows(Vec<RecordBatch>),
    /// Only rows with `lo <= time <= hi`.
    Range(i64, i64),
}

/// What the layers above add to the catalog queries see: how the storage table of a
/// materialized view is read, and the `system` schema. Implemented by the views layer.
pub(crate) trait QueryExtension: Send + Sync {
    /// The provider that reads `table`, which stores a materialized view's rows (None: the
    /// view is gone).
    fn view_table(&self, table: &Arc<Table>) -> Option<Arc<dyn TableProvider>>;
    /// The tables of the `system` schema.
    fn system_table_names(&self) -> Vec<String>;
    /// The `system` table called `name`, computed now, with only the rows of `databases`
    /// (None: every database).
    fn system_table(
        &self,
        name: &str,
        databases: Option<&[String]>,
    ) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError>;
}

/// More tables of the `system` schema, from a layer above (the subscription layer's
/// `system.subscriptions`).
pub(crate) trait SystemTables: Send + Sync {
    /// The names it answers.
    fn names(&self) -> Vec<String>;
    /// The table called `name`, computed now, with only the rows of `databases` (None: all).
    fn table(
        &self,
        name: &str,
        databases: Option<&[String]>,
    ) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError>;
}

/// What the catalog adapters and table providers of one query engine share.
pub(crate) struct Reader {
    pub(crate) engine: Arc<Engine>,
    extension: OnceLock<Weak<dyn QueryExtension>>,
    /// More `system` tables, installed once while the database opens.
    system_tables: OnceLock<Weak<dyn SystemTables>>,
    /// Segment files included in query scans (a file outside a query's time range is never
    /// opened, so this shows pruning).
    pub(crate) segments_scanned: AtomicU64,
}

impl std::fmt::Debug for Reader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reader")
            .field("engine", &self.engine)
            .finish_non_exhaustive()
    }
}

impl Reader {
    /// The extension, while it lives.
    pub(crate) fn extension(&self) -> Option<Arc<dyn QueryExtension>> {
        self.extension.get().and_then(Weak::upgrade)
    }

    /// The `system` tables of the layers above, while they live.
    pub(crate) fn system_tables(&self) -> Option<Arc<dyn SystemTables>> {
        self.system_tables.get().and_then(Weak::upgrade)
    }
}

/// DataFusion's physical planner, with Rivulet's plan nodes (gap filling).
#[derive(Debug)]
struct Planner;

#[async_trait::async_trait]
impl datafusion::execution::context::QueryPlanner for Planner {
    async fn create_physical_plan(
        &self,
        logical_plan: &LogicalPlan,
        session_state: &dyn datafusion::catalog::Session,
    ) -> Result<Arc<dyn datafusion::physical_plan::ExecutionPlan>, DataFusionError> {
        use datafusion::physical_planner::PhysicalPlanner as _;
        datafusion::physical_planner::DefaultPhysicalPlanner::with_extension_planners(vec![
            Arc::new(gapfill::GapFillPlanner),
            Arc::new(latest::LatestBucketsPlanner),
        ])
        .create_physical_plan(logical_plan, session_state)
        .await
    }
}

/// Plans and runs SQL for one [`Db`](crate::Db).
pub(crate) struct QueryEngine {
    template: SessionState,
    reader: Arc<Reader>,
    /// Postgres compatibility, built when the first Postgres client connects.
    postgres: OnceLock<Arc<postgres::PgCompat>>,
}

/// How to plan a query besides its text: as a Postgres client's SQL, and with values for its
/// `$1` placeholders.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct PlanOptions<'a> {
    /// Read the SQL as Postgres SQL with this connection's `pg_catalog`.
    pub(crate) postgres: Option<&'a PgSession>,
    /// Values of the placeholders (`$1`, …), filled in before any rewrite looks at the plan.
    pub(crate) params: Option<&'a datafusion::common::ParamValues>,
}

impl QueryEngine {
    pub(crate) fn new(
        engine: Arc<Engine>,
        default_database: &str,
        memory_limit: Option<usize>,
    ) -> Result<QueryEngine, DataFusionError> {
        let data_dir = engine.data_dir.clone();
        let rewrites = engine.config.query_rewrites;
        let reader = Arc::new(Reader {
            engine,
            extension: OnceLock::new(),
            system_tables: OnceLock::new(),
            segments_scanned: AtomicU64::new(0),
        });
        // `DATAFUSION_*` environment variables set DataFusion's own options (as in
        // datafusion-cli), e.g. `DATAFUSION_EXECUTION_TARGET_PARTITIONS=4`; Rivulet's choices
        // below win.
        let mut config = SessionConfig::from_env()?
            .with_default_catalog_and_schema(CATALOG_NAME, default_database)
            .with_create_default_catalog_and_schema(false)
            .with_information_schema(true);
        config.options_mut().sql_parser.enable_ident_normalization = false;
        let mut runtime = RuntimeEnvBuilder::new();
        if let Some(limit) = memory_limit {
            runtime = runtime.with_memory_limit(limit, 1.0);
        }
        let runtime = runtime.build_arc()?;
        if let Some(dir) = &data_dir {
            crate::storage::layout::register_store(&runtime, dir)
                .map_err(|e| DataFusionError::External(Box::new(e)))?;
        }
        let mut builder = SessionStateBuilder::new()
            .with_config(config)
            .with_runtime_env(runtime)
            .with_default_features()
            .with_analyzer_rule(Arc::new(gapfill::GapFillRule))
            .with_query_planner(Arc::new(Planner));
        if rewrites {
            // After DataFusion's rules: they leave projections and filters next to the scans.
            builder = builder.with_optimizer_rule(Arc::new(rewrite::LastPointRewrite));
        }
        let template = builder.build();
        let ctx = SessionContext::new_with_state(template);
        let time_bucket = Arc::new(datafusion::logical_expr::ScalarUDF::from(
            functions::TimeBucket::default(),
        ));
        ctx.register_udf(time_bucket.as_ref().clone());
        for f in gapfill::functions(time_bucket) {
            ctx.register_udf(f);
        }
        ctx.register_udtf(
            "last_cache",
            Arc::new(last_cache::LastCacheFunction {
                reader: reader.clone(),
            }),
        );
        ctx.register_catalog(
            CATALOG_NAME,
            Arc::new(catalog::RivuletCatalog::new(reader.clone())),
        );
        Ok(QueryEngine {
            template: ctx.state(),
            reader,
            postgres: OnceLock::new(),
        })
    }

    /// Postgres compatibility (built on first use).
    fn postgres(&self) -> Result<Arc<postgres::PgCompat>, DataFusionError> {
        if let Some(pg) = self.postgres.get() {
            return Ok(pg.clone());
        }
        let pg = Arc::new(postgres::PgCompat::new(&self.template)?);
        // Two first clients may race: both built one, the first stored wins.
        Ok(self.postgres.get_or_init(|| pg).clone())
    }

    /// A Postgres connection's `pg_catalog` over the databases it may use (None: any).
    pub(crate) fn postgres_session(
        &self,
        databases: Option<&[String]>,
    ) -> Result<PgSession, DataFusionError> {
        self.postgres()?
            .session(self.reader.clone(), databases.map(Into::into))
    }

    /// The statements of a Postgres simple-query string.
    pub(crate) fn postgres_statements(
        &self,
        sql: &str,
    ) -> Result<Vec<PgStatement>, DataFusionError> {
        Ok(self.postgres()?.statements(sql))
    }

    /// Installs the extension that reads views and the `system` schema (once).
    pub(crate) fn set_extension(&self, extension: Weak<dyn QueryExtension>) {
        let _ = self.reader.extension.set(extension);
    }

    /// Installs more `system` tables (once).
    pub(crate) fn set_system_tables(&self, tables: Weak<dyn SystemTables>) {
        let _ = self.reader.system_tables.set(tables);
    }

    /// What the table providers share (for providers made outside the catalog, e.g. a view's
    /// storage table).
    pub(crate) fn reader(&self) -> &Arc<Reader> {
        &self.reader
    }

    /// Segment files queries have opened since open.
    pub(crate) fn segments_scanned(&self) -> u64 {
        self.reader
            .segments_scanned
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Names (and aliases) of the aggregate functions queries can call.
    pub(crate) fn aggregate_names(&self) -> std::collections::HashSet<String> {
        let mut names: std::collections::HashSet<String> = self
            .template
            .aggregate_functions()
            .keys()
            .cloned()
            .collect();
        for f in self.template.aggregate_functions().values() {
            for a in f.aliases() {
                names.insert(a.clone());
            }
        }
        names
    }

    /// A session with `db` as the default database, reading `snapshot`.
    pub(crate) fn context(&self, db: &str, snapshot: QuerySnapshot) -> SessionContext {
        self.scoped_context(db, snapshot, None, false, None)
    }

    /// [`context`](Self::context) for a reader limited to `databases`: its catalog lists only
    /// those (`information_schema` too), `system` tables hold only their rows, and naming
    /// another database fails planning with [`Denied`]. `subscription_views`: the
    /// subscription layer's internal views resolve (no user plan sets it). `postgres`: a
    /// Postgres session, with its functions and its `pg_catalog`.
    fn scoped_context(
        &self,
        db: &str,
        snapshot: QuerySnapshot,
        databases: Option<&[String]>,
        subscription_views: bool,
        postgres: Option<(&postgres::PgCompat, &PgSession)>,
    ) -> SessionContext {
        let mut state = match postgres {
            Some((pg, _)) => pg.template().clone(),
            None => self.template.clone(),
        };
        if databases.is_some() || subscription_views || postgres.is_some() {
            use datafusion::catalog::CatalogProviderList as _;
            let list = datafusion::catalog::MemoryCatalogProviderList::new();
            let mut catalog =
                catalog::RivuletCatalog::scoped(self.reader.clone(), databases.map(Into::into));
            if subscription_views {
                catalog = catalog.with_subscription_views();
            }
            if let Some((_, session)) = postgres {
                catalog = catalog.with_pg_catalog(session.pg_catalog.clone());
            }
            list.register_catalog(CATALOG_NAME.to_string(), Arc::new(catalog));
            state = SessionStateBuilder::new_from_existing(state)
                .with_catalog_list(Arc::new(list))
                .build();
        }
        state.config_mut().options_mut().catalog.default_schema = db.to_string();
        // One visible sequence for the whole query: every table scan reads up to it, so a
        // query sees a write to several tables entirely or not at all.
        state.config_mut().set_extension(Arc::new(snapshot));
        let ctx = SessionContext::new_with_state(state);
        if postgres.is_some() {
            for f in postgres::session_functions(db) {
                ctx.register_udf(f);
            }
        }
        ctx
    }

    /// Plans `sql` with `db` as the default database. DDL, session statements and `COPY` are
    /// refused; DML (`INSERT`) only when `allow_dml`.
    pub(crate) async fn plan(
        &self,
        db: &str,
        sql: &str,
        allow_dml: bool,
        visible_seq: u64,
    ) -> Result<DataFrame, DataFusionError> {
        self.plan_reaching(
            db,
            sql,
            allow_dml,
            visible_seq,
            None,
            false,
            PlanOptions::default(),
        )
        .await
    }

    /// [`plan`](Self::plan) for a reader limited to `databases` (None: any); with
    /// `subscription_views`, the subscription layer's internal views resolve too (its plans
    /// over the view it made for a query).
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn plan_reaching(
        &self,
        db: &str,
        sql: &str,
        allow_dml: bool,
        visible_seq: u64,
        databases: Option<&[String]>,
        subscription_views: bool,
        options: PlanOptions<'_>,
    ) -> Result<DataFrame, DataFusionError> {
        let pg = match options.postgres {
            Some(session) => Some((self.postgres()?, session)),
            None => None,
        };
        let ctx = self.scoped_context(
            db,
            QuerySnapshot::new(visible_seq),
            databases,
            subscription_views,
            pg.as_ref()
                .map(|(compat, session)| (compat.as_ref(), *session)),
        );
        let sql_options = SQLOptions::new()
            .with_allow_ddl(false)
            .with_allow_statements(false)
            .with_allow_dml(allow_dml);
        let mut df = match &pg {
            None => ctx.sql_with_options(sql, sql_options).await?,
            Some((compat, _)) => {
                let statement = compat.parse(sql)?;
                let plan = ctx
                    .state()
                    .statement_to_plan(datafusion::sql::parser::Statement::Statement(Box::new(
                        statement,
                    )))
                    .await?;
                sql_options.verify_plan(&plan)?;
                ctx.execute_logical_plan(plan).await?
            }
        };
        if let Some(params) = options.params {
            df = df.with_param_values(params.clone())?;
        }
        // DataFusion counts `COPY … TO 'file'` as DML; it would write arbitrary files. Look at the
        // whole plan: `EXPLAIN ANALYZE COPY …` runs it too.
        let has_copy = df
            .logical_plan()
            .exists(|p| Ok(matches!(p, LogicalPlan::Copy(_))))?;
        if has_copy {
            return Err(DataFusionError::Plan(
                "COPY is not allowed: query results are returned, not written to files".to_string(),
            ));
        }
        Ok(df)
    }

    /// Lets `ORDER BY <bucket> DESC LIMIT k` queries over an aggregate read the newest buckets
    /// first, and aggregates grouped by a function of a bucket group by the bucket
    /// ([`latest`]), unless rewrites are off.
    pub(crate) fn bound_latest_buckets(&self, df: DataFrame) -> Result<DataFrame, DataFusionError> {
        if !self.reader.engine.config.query_rewrites {
            return Ok(df);
        }
        let (state, plan) = df.into_parts();
        let plan = latest::bound_latest_buckets(plan)?;
        let plan = latest::group_by_bucket(plan)?;
        Ok(DataFrame::new(state, plan))
    }
}

/// A plan named a database its reader may not use (raised by a scoped catalog while planning).
#[derive(Debug, thiserror::Error)]
#[error("this token may not use database '{0}'")]
pub(crate) struct Denied(pub(crate) String);

impl Denied {
    /// The denial inside a planning error, however DataFusion wrapped it.
    pub(crate) fn find(e: &DataFusionError) -> Option<&Denied> {
        let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(e);
        while let Some(err) = cur {
            if let Some(d) = err.downcast_ref::<Denied>() {
                return Some(d);
            }
            if let Some(DataFusionError::External(inner)) = err.downcast_ref::<DataFusionError>()
                && let Some(d) = inner.downcast_ref::<Denied>()
            {
                return Some(d);
            }
            cur = err.source();
        }
        None
    }
}

/// The first database (schema) that `plan` reads or writes and that is not in `allowed`,
/// looking into subqueries too. Unqualified table names are the query's default database.
pub(crate) fn databases_outside(
    plan: &LogicalPlan,
    allowed: &[String],
) -> Result<Option<String>, DataFusionError> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut outside = None;
    plan.apply_with_subqueries(|node| {
        let table = match node {
            LogicalPlan::TableScan(scan) => Some(&scan.table_name),
            LogicalPlan::Dml(dml) => Some(&dml.table_name),
            _ => None,
        };
        // `system`, `information_schema` and `pg_catalog` are scoped by the reader's catalog.
        if let Some(schema) = table.and_then(|t| t.schema())
            && !allowed.iter().any(|a| a == schema)
            && schema != catalog::SYSTEM_SCHEMA
            && schema != "information_schema"
            && schema != postgres::PG_CATALOG
        {
            outside = Some(schema.to_string());
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    Ok(outside)
}
