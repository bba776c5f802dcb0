//! View statements: `CREATE`, `DROP`, `SHOW` and `CHECK MATERIALIZED VIEW`, and building the
//! in-memory [`View`] of a definition (analysis, storage schema, provider).

use std::sync::Arc;

use arrow::array::{ArrayRef, RecordBatch, RecordBatchOptions, StringArray};
use arrow::datatypes::Schema;
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::dataframe::DataFrame;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::ColumnarValue;
use datafusion::prelude::SessionContext;

use super::ddl::{ViewOptions, ViewStatement};
use super::error::{ViewError, invalid};
use super::plan::{self, OutColumn, Planned, Strategy, ViewPlan};
use super::provider::{DELETED, final_columns};
use super::{Status, View, ViewDef, ViewProvider, Views};
use crate::error::Error;
use crate::storage::catalog::{ColumnDef, ColumnKind, FieldType, TIME_COLUMN};
use crate::storage::table::Table;

/// Evaluates a constant SQL expression (a `date_bin` stride or origin).
fn eval_constant(sql: &str) -> Result<ScalarValue, ViewError> {
    let ctx = SessionContext::new();
    let schema = DFSchema::empty();
    let expr = ctx
        .parse_sql_expr(sql, &schema)
        .map_err(|e| ViewError::Invalid(e.to_string()))?;
    let physical = ctx
        .create_physical_expr(expr, &schema)
        .map_err(|e| ViewError::Invalid(e.to_string()))?;
    let one = RecordBatch::try_new_with_options(
        Arc::new(Schema::empty()),
        Vec::new(),
        &RecordBatchOptions::new().with_row_count(Some(1)),
    )
    .map_err(|e| ViewError::Invalid(e.to_string()))?;
    match physical
        .evaluate(&one)
        .map_err(|e| ViewError::Invalid(e.to_string()))?
    {
        ColumnarValue::Scalar(s) => Ok(s),
        ColumnarValue::Array(a) => {
            ScalarValue::try_from_array(&a, 0).map_err(|e| ViewError::Invalid(e.to_string()))
        }
    }
}

fn one_row(columns: Vec<(&str, ArrayRef)>) -> Result<DataFrame, Error> {
    let batch = RecordBatch::try_from_iter(columns)?;
    Ok(SessionContext::new().read_batch(batch)?)
}

impl Views {
    /// Runs a view statement; the result describes what it did.
    pub(crate) async fn run_statement(
        self: &Arc<Self>,
        default_db: &str,
        statement: ViewStatement,
        databases: Option<&[String]>,
    ) -> Result<DataFrame, Error> {
        let allowed = |db: &str| -> Result<(), Error> {
            match databases {
                Some(list) if !list.iter().any(|d| d == db) => Err(Error::Denied(format!(
                    "this token may not use database '{db}'"
                ))),
                _ => Ok(()),
            }
        };
        match statement {
            ViewStatement::Create {
                db,
                name,
                if_not_exists,
                options,
                query,
            } => {
                let db = db.unwrap_or_else(|| default_db.to_string());
                allowed(&db)?;
                if let Some(existing) = self.get(&db, &name) {
                    if if_not_exists {
                        return one_row(vec![
                            ("view", Arc::new(StringArray::from(vec![name])) as ArrayRef),
                            (
                                "strategy",
                                Arc::new(StringArray::from(vec![existing.plan.strategy.name()])),
                            ),
                            ("status", Arc::new(StringArray::from(vec!["exists"]))),
                        ]);
                    }
                    return Err(Error::View(ViewError::Exists(format!(
                        "materialized view '{name}' already exists in database '{db}'"
                    ))));
                }
                let view = self
                    .create_view(&db, &name, options, &query, databases, false)
                    .await?;
                one_row(vec![
                    ("view", Arc::new(StringArray::from(vec![name])) as ArrayRef),
                    (
                        "strategy",
                        Arc::new(StringArray::from(vec![view.plan.strategy.name()])),
                    ),
                    ("status", Arc::new(StringArray::from(vec!["backfilling"]))),
                ])
            }
            ViewStatement::Drop {
                db,
                name,
                if_exists,
            } => {
                let db = db.unwrap_or_else(|| default_db.to_string());
                allowed(&db)?;
                reserved(&name)?;
                // Waits for a running maintenance round and persists: off the async threads.
                let inner = self.clone();
                let (d, n) = (db.clone(), name.clone());
                let dropped =
                    tokio::task::spawn_blocking(move || inner.drop_view(&d, &n, if_exists))
                        .await
                        .map_err(|e| {
                            Error::View(ViewError::Internal(format!("dropping the view: {e}")))
                        })??;
                one_row(vec![
                    ("view", Arc::new(StringArray::from(vec![name])) as ArrayRef),
                    (
                        "status",
                        Arc::new(StringArray::from(vec![if dropped {
                            "dropped"
                        } else {
                            "absent"
                        }])),
                    ),
                ])
            }
            ViewStatement::Show => {
                allowed(default_db)?;
                let batch = self.views_batch(Some(default_db))?;
                Ok(SessionContext::new().read_batch(batch)?)
            }
            ViewStatement::Check { db, name } => {
                let db = db.unwrap_or_else(|| default_db.to_string());
                allowed(&db)?;
                reserved(&name)?;
                let batch = self.check_view(&db, &name).await?;
                Ok(SessionContext::new().read_batch(batch)?)
            }
        }
    }

    /// Plans a definition and analyses it.
    pub(super) async fn analyse_view(&self, db: &str, sql: &str) -> Result<ViewPlan, Error> {
        let seq = self.engine.visible_seq();
        let df = self
            .query
            .plan(db, sql, false, seq)
            .await
            .map_err(|e| invalid(format!("the view's query is not valid: {e}")))?;
        let schema = Arc::new(df.schema().as_arrow().clone());
        let planned = Planned {
            plan: df.logical_plan().clone(),
            schema,
        };
        let aggregates = self.query.aggregate_names();
        let tags_of = |d: &str, t: &str| {
            let table = self.engine.catalog().table(d, t)?;
            if table.settings.read().view {
                return None;
            }
            Some(
                table
                    .schema()
                    .columns()
                    .iter()
                    .filter(|c| c.kind == ColumnKind::Tag)
                    .map(|c| c.name.to_string())
                    .collect(),
            )
        };
        let is_view = |d: &str, t: &str| self.get(d, t).is_some();
        let is_aggregate = |n: &str| aggregates.contains(n);
        plan::analyse(
            sql,
            &planned,
            db,
            &tags_of,
            &is_view,
            &is_aggregate,
            &eval_constant,
        )
        .map_err(Error::View)
    }

    /// The storage schema of a view: time, key tags, value or state fields, `__deleted`.
    async fn storage_columns(&self, db: &str, plan: &ViewPlan) -> Result<Vec<ColumnDef>, Error> {
        let mut cols = vec![ColumnDef {
            name: TIME_COLUMN.into(),
            kind: ColumnKind::Time,
        }];
        let storage_schema = if plan.strategy == Strategy::Aggregate {
            let df = self
                .query
                .plan(db, &plan.storage_sql, false, self.engine.visible_seq())
                .await
                .map_err(|e| invalid(format!("the view's state query failed to plan: {e}")))?;
            Arc::new(df.schema().as_arrow().clone())
        } else {
            plan.schema.clone()
        };
        for (i, (name, c)) in plan.columns.iter().enumerate() {
            match c {
                OutColumn::Time => {}
                OutColumn::Key => cols.push(ColumnDef {
                    name: name.as_str().into(),
                    kind: ColumnKind::Tag,
                }),
                OutColumn::Value => {
                    let t = plan
                        .schema
                        .field_with_name(name)
                        .map_err(DataFusionError::from)?;
                    let ft = plan::value_type(t.data_type()).ok_or_else(|| {
                        invalid(format!("column '{name}' has a type a view cannot store"))
                    })?;
                    cols.push(ColumnDef {
                        name: name.as_str().into(),
                        kind: ColumnKind::Field(ft),
                    });
                }
                OutColumn::State(agg) => {
                    for (suffix, _) in agg.states() {
                        let n = ViewPlan::state_column(i, suffix);
                        let t = storage_schema
                            .field_with_name(&n)
                            .map_err(DataFusionError::from)?;
                        let ft = plan::value_type(t.data_type()).ok_or_else(|| {
                            invalid(format!(
                                "the state of column '{name}' has type {}, which a view cannot \
                                 store",
                                t.data_type()
                            ))
                        })?;
                        cols.push(ColumnDef {
                            name: n.as_str().into(),
                            kind: ColumnKind::Field(ft),
                        });
                    }
                }
            }
        }
        cols.push(ColumnDef {
            name: DELETED.into(),
            kind: ColumnKind::Field(FieldType::Boolean),
        });
        Ok(cols)
    }

    /// Builds the in-memory view for a definition whose storage table exists.
    pub(super) fn build_view(
        self: &Arc<Self>,
        db: &str,
        def: ViewDef,
        plan: ViewPlan,
        table: Arc<Table>,
    ) -> Result<Arc<View>, Error> {
        let mut source_ids = Vec::new();
        let mut depth = 0;
        for (d, t) in &plan.sources {
            let id = match self.get(d, t) {
                Some(v) => {
                    depth = depth.max(v.depth + 1);
                    v.table.id
                }
                None => {
                    self.engine
                        .catalog()
                        .table(d, t)
                        .ok_or_else(|| invalid(format!("table '{d}.{t}' not found")))?
                        .id
                }
            };
            source_ids.push(id);
        }
        let primary_id = source_ids.first().copied();
        let storage_schema = table.schema().arrow().clone();
        let provider = Arc::new(ViewProvider {
            storage: Arc::new(crate::query::BufferTableProvider::new(
                self.query.reader().clone(),
                table.clone(),
            )),
            columns: final_columns(&plan, &storage_schema),
            schema: plan.schema.clone(),
        });
        Ok(Arc::new(View {
            db: db.into(),
            def: parking_lot::Mutex::new(def),
            plan,
            table,
            source_ids,
            primary_id,
            depth,
            provider,
            status: parking_lot::Mutex::new(Status::default()),
        }))
    }

    /// Makes the internal view `name` (in the subscription views' reserved namespace) that
    /// keeps `sql` current for subscriptions; it starts backfilling at once.
    pub(crate) async fn create_subscription_view(
        self: &Arc<Self>,
        db: &str,
        name: &str,
        sql: &str,
        databases: Option<&[String]>,
    ) -> Result<Arc<View>, Error> {
        if !name.starts_with(crate::ingest::prepare::SUBSCRIPTION_VIEW_PREFIX) {
            return Err(Error::View(ViewError::Internal(format!(
                "'{name}' is not a subscription view name"
            ))));
        }
        self.create_view(db, name, ViewOptions::default(), sql, databases, true)
            .await
    }

    async fn create_view(
        self: &Arc<Self>,
        db: &str,
        name: &str,
        options: ViewOptions,
        sql: &str,
        databases: Option<&[String]>,
        subscription: bool,
    ) -> Result<Arc<View>, Error> {
        crate::storage::catalog::check_name(name)
            .map_err(|e| invalid(format!("invalid view name '{name}': {e}")))?;
        if !subscription {
            reserved(name)?;
        }
        let database = self
            .engine
            .catalog()
            .database(db)
            .ok_or_else(|| invalid(format!("database '{db}' not found: write to it first")))?;
        if database.table(name).is_some() {
            return Err(Error::View(ViewError::Exists(format!(
                "a table named '{name}' already exists in database '{db}'"
            ))));
        }
        let plan = self.analyse_view(db, sql).await?;
        if let Some(allowed) = databases
            && let Some((d, _)) = plan.sources.iter().find(|(d, _)| !allowed.contains(d))
        {
            return Err(Error::Denied(format!(
                "this token may not use database '{d}'"
            )));
        }
        if plan.sources.iter().any(|(d, t)| d == db && t == name) {
            return Err(invalid(format!("view '{name}' cannot read itself")));
        }
        let columns = self.storage_columns(db, &plan).await?;
        let def = ViewDef {
            name: name.to_string(),
            sql: sql.to_string(),
            options: options.clone(),
            backfilled: false,
        };
        let json = serde_json::to_vec(&def).map_err(|e| invalid(e.to_string()))?;
        let table = self
            .engine
            .create_view_table(&database, name, columns, options.retention_ns, |catalog| {
                catalog.save_view(&database, name, &json)
            })?
            .ok_or_else(|| {
                Error::View(ViewError::Exists(format!(
                    "a table named '{name}' already exists in database '{db}'"
                )))
            })?;
        let view = self.build_view(db, def, plan, table)?;
        view.status.lock().backfill_pending = true;
        view.status.lock().applied = self.engine.visible_seq();
        self.shared.add(view.clone());
        Ok(view)
    }

    /// Drops every subscription view: they are made for the subscriptions of one run and do
    /// not outlive it (called once the stored views are loaded, before anyone subscribes).
    pub(crate) fn drop_subscription_views(&self) {
        for view in self.all() {
            if view.is_subscription_view() {
                let name = view.name();
                if let Err(e) = self.drop_view(&view.db, &name, true) {
                    tracing::warn!(view = %name, error = %e, "subscription view of an earlier run not dropped");
                }
            }
        }
    }

    pub(crate) fn drop_view(&self, db: &str, name: &str, if_exists: bool) -> Result<bool, Error> {
        let Some(view) = self.get(db, name) else {
            if if_exists {
                return Ok(false);
            }
            return Err(Error::View(ViewError::NotFound(format!(
                "materialized view '{name}' not found in database '{db}'"
            ))));
        };
        let dependents: Vec<String> = self
            .all()
            .iter()
            .filter(|v| v.source_ids.contains(&view.table.id))
            .map(|v| v.name())
            .collect();
        if !dependents.is_empty() {
            return Err(invalid(format!(
                "materialized view '{name}' is read by {}: drop those first",
                dependents.join(", ")
            )));
        }
        {
            // No round is running once this is held.
            let _round = self.round.lock();
            self.shared.remove(view.table.id);
        }
        if let Some(o) = self.observer() {
            o.dropped(view.table.id, name);
        }
        self.engine.drop_table(db, &view.table, |catalog| {
            let database = catalog.database(db);
            match database {
                Some(d) => catalog.remove_view(&d, name),
                None => Ok(()),
            }
        })?;
        Ok(true)
    }
}

/// Refuses the reserved view names (`__…`, the subscription views among them) in statements.
fn reserved(name: &str) -> Result<(), Error> {
    if name.starts_with("__") {
        return Err(invalid(format!(
            "invalid view name '{name}': names starting with '__' are reserved"
        )));
    }
    Ok(())
}
