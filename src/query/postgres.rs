//! Postgres compatibility for the Postgres wire front end (`server::pg`): the `pg_catalog`
//! tables and functions that psql, Grafana and DBeaver read to list and describe tables, and the
//! rewrites that turn their Postgres-only SQL (`OPERATOR(pg_catalog.~)`, `COLLATE`,
//! `'cpu'::regclass`, …) into SQL DataFusion plans. Both come from the datafusion-pg-catalog
//! crate (docs/decisions/0009-postgres-wire.md); this module fits them to Rivulet's catalog,
//! scopes and snapshots.

use std::sync::Arc;

use datafusion::catalog::{
    CatalogProviderList, MemoryCatalogProvider, MemoryCatalogProviderList, SchemaProvider,
};
use datafusion::error::DataFusionError;
use datafusion::execution::context::SessionContext;
use datafusion::execution::session_state::SessionState;
use datafusion::sql::sqlparser::ast::Statement;
use datafusion_pg_catalog::pg_catalog::context::EmptyContextProvider;
use datafusion_pg_catalog::pg_catalog::{
    PgCatalogSchemaProvider, PgCatalogStaticTables, setup_pg_catalog,
};
use datafusion_pg_catalog::sql::PostgresCompatibilityParser;

use super::catalog::RivuletCatalog;
use super::{CATALOG_NAME, Reader};

/// The schema Postgres clients read the catalog from.
pub(crate) const PG_CATALOG: &str = "pg_catalog";

/// A catalog only [`PgCompat::new`] uses, to let datafusion-pg-catalog install its functions.
const SETUP_CATALOG: &str = "__rivulet_pg_setup";

/// What every Postgres session shares: the parser with its rewrite rules, the catalog's static
/// tables (`pg_type`, `pg_proc`, …) and a session template with the Postgres functions
/// (`format_type`, `pg_table_is_visible`, `pg_get_expr`, …) and type names (`regclass`, …).
pub(crate) struct PgCompat {
    parser: PostgresCompatibilityParser,
    static_tables: Arc<PgCatalogStaticTables>,
    template: SessionState,
}

impl std::fmt::Debug for PgCompat {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgCompat").finish_non_exhaustive()
    }
}

/// One Postgres connection's `pg_catalog`, over the databases its token may use. It lives as
/// long as the connection, so object ids (`pg_class.oid`) stay the same across its queries, as
/// psql's `\d cpu` needs (it looks the table up, then asks for its columns by oid).
#[derive(Debug, Clone)]
pub(crate) struct PgSession {
    pub(crate) pg_catalog: Arc<dyn SchemaProvider>,
}

impl PgCompat {
    /// Builds the shared parts over the engine's session `template`.
    pub(crate) fn new(template: &SessionState) -> Result<PgCompat, DataFusionError> {
        // A catalog list of its own: the template's is shared by every query's session.
        let state = datafusion::execution::SessionStateBuilder::new_from_existing(template.clone())
            .with_catalog_list(Arc::new(MemoryCatalogProviderList::new()))
            .build();
        let ctx = SessionContext::new_with_state(state);
        ctx.register_catalog(SETUP_CATALOG, Arc::new(MemoryCatalogProvider::new()));
        setup_pg_catalog(&ctx, SETUP_CATALOG, EmptyContextProvider).map_err(|e| *e)?;
        Ok(PgCompat {
            parser: PostgresCompatibilityParser::new(),
            static_tables: Arc::new(PgCatalogStaticTables::try_new()?),
            template: ctx.state(),
        })
    }

    /// A connection's `pg_catalog` over the databases `scope` allows (None: all).
    pub(crate) fn session(
        &self,
        reader: Arc<Reader>,
        scope: Option<Arc<[String]>>,
    ) -> Result<PgSession, DataFusionError> {
        use datafusion::catalog::CatalogProviderList as _;
        let list = MemoryCatalogProviderList::new();
        list.register_catalog(
            CATALOG_NAME.to_string(),
            Arc::new(RivuletCatalog::scoped(reader, scope)),
        );
        let list: Arc<dyn CatalogProviderList> = Arc::new(list);
        let pg_catalog = PgCatalogSchemaProvider::try_new(
            list,
            self.static_tables.clone(),
            EmptyContextProvider,
        )?;
        Ok(PgSession {
            pg_catalog: Arc::new(pg_catalog),
        })
    }

    /// The session template with the Postgres functions installed.
    pub(crate) fn template(&self) -> &SessionState {
        &self.template
    }

    /// Parses `sql` as Postgres SQL, rewritten for DataFusion: exactly one statement.
    pub(crate) fn parse(&self, sql: &str) -> Result<Statement, DataFusionError> {
        let mut statements = self
            .parser
            .parse(sql)
            .map_err(|e| DataFusionError::SQL(Box::new(e), None))?;
        match statements.len() {
            1 => Ok(statements.remove(0)),
            0 => Err(DataFusionError::Plan("the query is empty".to_string())),
            n => Err(DataFusionError::Plan(format!(
                "{n} statements in one query; send them one at a time"
            ))),
        }
    }
}

/// The functions whose answer is the session's database: `current_database()`, and
/// `current_schema()` / `current_schemas(bool)` (unqualified names are in the Rivulet database,
/// so that is the schema search path Grafana's and DBeaver's pickers look in).
pub(crate) fn session_functions(db: &str) -> Vec<datafusion::logical_expr::ScalarUDF> {
    use arrow::array::{ArrayRef, BooleanArray, ListBuilder, StringArray, StringBuilder};
    use arrow::datatypes::{DataType, Field};
    use datafusion::logical_expr::{ColumnarValue, Volatility, create_udf};
    let schema = db.to_string();
    let current_schema = move |_: &[ColumnarValue]| {
        Ok(ColumnarValue::Array(
            Arc::new(StringArray::from(vec![schema.clone()])) as ArrayRef,
        ))
    };
    let schema = db.to_string();
    let current_schemas = move |args: &[ColumnarValue]| {
        let args = ColumnarValue::values_to_arrays(args)?;
        let implicit = args
            .first()
            .and_then(|a| a.as_any().downcast_ref::<BooleanArray>())
            .is_some_and(|a| !a.is_empty() && a.value(0));
        let mut list = ListBuilder::new(StringBuilder::new());
        if implicit {
            list.values().append_value(PG_CATALOG);
        }
        list.values().append_value(&schema);
        list.append(true);
        Ok(ColumnarValue::Array(Arc::new(list.finish()) as ArrayRef))
    };
    vec![
        datafusion_pg_catalog::pg_catalog::create_current_database_udf(db),
        create_udf(
            "current_schema",
            vec![],
            DataType::Utf8,
            Volatility::Stable,
            Arc::new(current_schema),
        ),
        create_udf(
            "current_schemas",
            vec![DataType::Boolean],
            DataType::List(Arc::new(Field::new("item", DataType::Utf8, true))),
            Volatility::Stable,
            Arc::new(current_schemas),
        ),
    ]
}

/// One statement of a Postgres query string, as the wire front end treats it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum PgStatement {
    /// Planned and run like any query (its text rewritten for DataFusion).
    Query(String),
    /// `SET [SESSION | LOCAL] name { = | TO } value` (`SET TIME ZONE value` as `TimeZone`).
    Set { name: String, value: String },
    /// `SHOW name` (`SHOW TRANSACTION ISOLATION LEVEL` as `transaction_isolation`).
    Show(String),
    /// `BEGIN` / `START TRANSACTION`.
    Begin,
    /// `COMMIT` / `END`.
    Commit,
    /// `ROLLBACK`.
    Rollback,
}

impl PgCompat {
    /// Splits a simple-query string into its statements. Text the Postgres parser cannot read
    /// (Rivulet's own statements, such as `CREATE MATERIALIZED VIEW … WITH (…)`) is one query,
    /// left to the planner to accept or explain.
    pub(crate) fn statements(&self, sql: &str) -> Vec<PgStatement> {
        let Ok(statements) = self.parser.parse(sql) else {
            return vec![PgStatement::Query(sql.to_string())];
        };
        statements.into_iter().map(classify).collect()
    }
}

fn classify(statement: Statement) -> PgStatement {
    use datafusion::sql::sqlparser::ast::{Expr, Set, Value};
    let text = |e: &Expr| match e {
        Expr::Value(v) => match &v.value {
            Value::SingleQuotedString(s) | Value::DoubleQuotedString(s) => s.clone(),
            other => other.to_string(),
        },
        Expr::Identifier(i) => i.value.clone(),
        other => other.to_string(),
    };
    match &statement {
        Statement::Set(Set::SingleAssignment {
            variable, values, ..
        }) => PgStatement::Set {
            name: variable.to_string(),
            value: values.iter().map(text).collect::<Vec<_>>().join(", "),
        },
        Statement::Set(Set::SetTimeZone { value, .. }) => PgStatement::Set {
            name: "TimeZone".to_string(),
            value: text(value),
        },
        Statement::ShowVariable { variable } => {
            let words: Vec<String> = variable.iter().map(|i| i.value.to_lowercase()).collect();
            let name = if words == ["transaction", "isolation", "level"] {
                "transaction_isolation".to_string()
            } else {
                variable
                    .iter()
                    .map(|i| i.value.clone())
                    .collect::<Vec<_>>()
                    .join(".")
            };
            PgStatement::Show(name)
        }
        Statement::StartTransaction { .. } => PgStatement::Begin,
        Statement::Commit { .. } => PgStatement::Commit,
        Statement::Rollback { .. } => PgStatement::Rollback,
        _ => PgStatement::Query(statement.to_string()),
    }
}
