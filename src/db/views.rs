//! The database side of materialized views: statements, loading at open, recovery, the
//! system writes that store view rows, and read-your-writes waiting.

use std::sync::Arc;

use arrow::array::{
    Array, ArrayRef, BooleanArray, Float64Array, RecordBatch, RecordBatchOptions, StringArray,
    TimestampNanosecondArray, UInt64Array,
};
use arrow::datatypes::Schema;
use datafusion::common::{DFSchema, ScalarValue};
use datafusion::dataframe::DataFrame;
use datafusion::error::DataFusionError;
use datafusion::logical_expr::{ColumnarValue, LogicalPlan};
use datafusion::prelude::SessionContext;

use super::DbInner;
use crate::error::Error;
use crate::ingest::WriteError;
use crate::ingest::prepare::prepare_system_batch;
use crate::query::QuerySnapshot;
use crate::storage::catalog::{ColumnDef, ColumnKind, FieldType, TIME_COLUMN};
use crate::storage::table::Table;
use crate::views::ddl::{ViewOptions, ViewStatement};
use crate::views::plan::{self, OutColumn, Planned, Strategy, ViewPlan};
use crate::views::provider::{DELETED, final_columns};
use crate::views::{PROGRESS_TABLE, Status, View, ViewDef, ViewProvider};

/// A view statement's error.
#[derive(Debug, thiserror::Error)]
pub enum ViewError {
    /// The definition or statement is not valid.
    #[error("{0}")]
    Invalid(String),
    /// No such view.
    #[error("{0}")]
    NotFound(String),
    /// The name is taken.
    #[error("{0}")]
    Exists(String),
    /// A query waited too long for a view to catch up.
    #[error("{0}")]
    Behind(String),
}

fn invalid(m: impl Into<String>) -> Error {
    Error::View(ViewError::Invalid(m.into()))
}

/// Evaluates a constant SQL expression (a `date_bin` stride or origin).
fn eval_constant(sql: &str) -> Result<ScalarValue, String> {
    let ctx = SessionContext::new();
    let schema = DFSchema::empty();
    let expr = ctx
        .parse_sql_expr(sql, &schema)
        .map_err(|e| e.to_string())?;
    let physical = ctx
        .create_physical_expr(expr, &schema)
        .map_err(|e| e.to_string())?;
    let one = RecordBatch::try_new_with_options(
        Arc::new(Schema::empty()),
        Vec::new(),
        &RecordBatchOptions::new().with_row_count(Some(1)),
    )
    .map_err(|e| e.to_string())?;
    match physical.evaluate(&one).map_err(|e| e.to_string())? {
        ColumnarValue::Scalar(s) => Ok(s),
        ColumnarValue::Array(a) => ScalarValue::try_from_array(&a, 0).map_err(|e| e.to_string()),
    }
}

fn one_row(columns: Vec<(&str, ArrayRef)>) -> Result<DataFrame, Error> {
    let batch = RecordBatch::try_from_iter(columns)?;
    Ok(SessionContext::new().read_batch(batch)?)
}

impl DbInner {
    /// Rivulet's own write of several tables of database `db`, as one WAL record.
    pub(crate) fn write_system(
        &self,
        db: &str,
        tables: Vec<(String, RecordBatch)>,
    ) -> Result<u64, Error> {
        let receipt = self.write(crate::storage::engine::Origin::System, |catalog| {
            let mut all: Option<crate::ingest::prepare::PreparedWrite> = None;
            for (table, batch) in &tables {
                let p = prepare_system_batch(catalog, db, table, batch)?;
                match &mut all {
                    None => all = Some(p),
                    Some(a) => {
                        a.rows += p.rows;
                        a.tables.extend(p.tables);
                    }
                }
            }
            all.ok_or_else(|| WriteError::InvalidBatch {
                db: db.to_string(),
                table: String::new(),
                reason: "nothing to write".to_string(),
            })
        })?;
        Ok(receipt.seq)
    }

    /// Marks a view's backfill done in its stored definition.
    pub(crate) fn finish_backfill(&self, view: &View) -> Result<(), Error> {
        let mut def = view.def.lock().clone();
        def.backfilled = true;
        self.save_view_def(&view.db, &def)?;
        *view.def.lock() = def;
        Ok(())
    }

    fn save_view_def(&self, db: &str, def: &ViewDef) -> Result<(), Error> {
        let database = self
            .engine
            .catalog()
            .database(db)
            .ok_or_else(|| invalid(format!("database '{db}' not found")))?;
        let json = serde_json::to_vec(def).map_err(|e| invalid(e.to_string()))?;
        self.engine
            .catalog()
            .save_view(&database, &def.name, &json)?;
        self.engine.catalog().flush()?;
        Ok(())
    }

    /// Runs a view statement; the result describes what it did.
    pub(crate) async fn run_view_statement(
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
                if let Some(existing) = self.views.get(&db, &name) {
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
                    .create_view(&db, &name, options, &query, databases)
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
                // Waits for a running maintenance round and persists: off the async threads.
                let inner = self.clone();
                let (d, n) = (db.clone(), name.clone());
                let dropped =
                    tokio::task::spawn_blocking(move || inner.drop_view(&d, &n, if_exists))
                        .await
                        .map_err(|e| invalid(format!("dropping the view failed: {e}")))??;
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
                let batch = self.check_view(&db, &name).await?;
                Ok(SessionContext::new().read_batch(batch)?)
            }
        }
    }

    /// Plans a definition and analyses it.
    async fn analyse_view(&self, db: &str, sql: &str) -> Result<ViewPlan, Error> {
        let seq = self.visible_seq();
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
        let is_view = |d: &str, t: &str| self.views.get(d, t).is_some();
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
        .map_err(invalid)
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
                .plan(db, &plan.storage_sql, false, self.visible_seq())
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
    fn build_view(
        self: &Arc<Self>,
        db: &str,
        def: ViewDef,
        plan: ViewPlan,
        table: Arc<Table>,
    ) -> Result<Arc<View>, Error> {
        let mut source_ids = Vec::new();
        let mut depth = 0;
        for (d, t) in &plan.sources {
            let id = match self.views.get(d, t) {
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

    async fn create_view(
        self: &Arc<Self>,
        db: &str,
        name: &str,
        options: ViewOptions,
        sql: &str,
        databases: Option<&[String]>,
    ) -> Result<Arc<View>, Error> {
        crate::storage::catalog::check_name(name)
            .map_err(|e| invalid(format!("invalid view name '{name}': {e}")))?;
        if name.starts_with("__") {
            return Err(invalid(format!(
                "invalid view name '{name}': names starting with '__' are reserved"
            )));
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
        view.status.lock().applied = self.visible_seq();
        self.views.add(view.clone());
        Ok(view)
    }

    fn drop_view(&self, db: &str, name: &str, if_exists: bool) -> Result<bool, Error> {
        let Some(view) = self.views.get(db, name) else {
            if if_exists {
                return Ok(false);
            }
            return Err(Error::View(ViewError::NotFound(format!(
                "materialized view '{name}' not found in database '{db}'"
            ))));
        };
        let dependents: Vec<String> = self
            .views
            .views
            .read()
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
            let _round = self.view_round.lock();
            self.views.remove(view.table.id);
        }
        self.subs.view_dropped(view.table.id, name);
        self.engine.drop_table(db, &view.table, |catalog| {
            let database = catalog.database(db);
            match database {
                Some(d) => catalog.remove_view(&d, name),
                None => Ok(()),
            }
        })?;
        Ok(true)
    }

    /// Loads the stored views (in dependency order) and queues their recovery. Runs on the
    /// maintenance thread at open.
    pub(crate) async fn load_views(self: &Arc<Self>) -> Result<(), Error> {
        let mut defs: Vec<(Arc<str>, ViewDef)> = Vec::new();
        for (db, json) in self.engine.catalog().views()? {
            let def: ViewDef = serde_json::from_slice(&json)
                .map_err(|e| invalid(format!("a stored view definition is corrupt: {e}")))?;
            defs.push((db, def));
        }
        let progress = self.stored_progress();
        let persisted = self
            .engine
            .persisted_seq
            .load(std::sync::atomic::Ordering::Acquire);
        while !defs.is_empty() {
            let before = defs.len();
            let mut rest = Vec::new();
            for (db, def) in defs {
                let Some(table) = self.engine.catalog().table(&db, &def.name) else {
                    tracing::error!(view = %def.name, "a view's table is missing; the view is skipped");
                    continue;
                };
                let plan = match self.analyse_view(&db, &def.sql).await {
                    Ok(p) => p,
                    Err(e) => {
                        rest.push((db, def, e.to_string()));
                        continue;
                    }
                };
                let view = self.build_view(&db, def.clone(), plan, table)?;
                {
                    let mut st = view.status.lock();
                    let applied = progress
                        .get(&(db.to_string(), def.name.clone()))
                        .copied()
                        .unwrap_or(0);
                    st.applied = applied;
                    if !def.backfilled {
                        st.backfill_pending = true;
                    } else {
                        self.recovery_ranges(&view, applied, persisted, &mut st);
                    }
                }
                self.views.add(view);
            }
            if rest.len() == before {
                for (_, def, e) in rest {
                    tracing::error!(view = %def.name, error = %e, "a stored view could not be loaded");
                }
                break;
            }
            defs = rest.into_iter().map(|(d, v, _)| (d, v)).collect();
        }
        Ok(())
    }

    /// What a view missed before a crash: the time ranges of its sources written after its
    /// applied sequence (segments and chunks newer than it), to recompute.
    fn recovery_ranges(&self, view: &View, applied: u64, _persisted: u64, st: &mut Status) {
        for &id in &view.source_ids {
            let Some(table) = self.engine.table_by_id(id) else {
                continue;
            };
            let snap = table.buffer.read().snapshot();
            let mut ranges: Vec<(i64, i64)> = snap
                .segments
                .iter()
                .filter(|s| s.meta.max_seq > applied)
                .map(|s| (s.meta.min_time, s.meta.max_time))
                .collect();
            ranges.extend(
                snap.frozen
                    .iter()
                    .chain(&snap.chunks)
                    .filter(|c| c.seq > applied)
                    .map(|c| (c.min_time, c.max_time)),
            );
            if ranges.is_empty() {
                continue;
            }
            if Some(id) == view.primary_id && view.plan.time != plan::TimeMap::None {
                st.pending.extend(ranges);
            } else {
                st.full = true;
            }
            let max = snap
                .segments
                .iter()
                .map(|s| s.meta.max_time)
                .chain(snap.chunks.iter().map(|c| c.max_time))
                .max();
            if Some(id) == view.primary_id {
                st.max_source_time = max;
            }
        }
    }

    /// Each view's applied sequence, from the progress tables: (db, view) → sequence.
    fn stored_progress(&self) -> std::collections::HashMap<(String, String), u64> {
        let mut out = std::collections::HashMap::new();
        for db in self.engine.catalog().databases() {
            let Some(table) = db.table(PROGRESS_TABLE) else {
                continue;
            };
            let schema = table.schema();
            let Ok((batch, _)) = table.last.lock().snapshot().to_batch(&schema) else {
                continue;
            };
            let (Some(views), Some(applied)) = (
                batch.column_by_name("view"),
                batch.column_by_name("applied"),
            ) else {
                continue;
            };
            let Ok(views) = arrow::compute::cast(views, &arrow::datatypes::DataType::Utf8) else {
                continue;
            };
            let (Some(views), Some(applied)) = (
                views.as_any().downcast_ref::<StringArray>(),
                applied.as_any().downcast_ref::<UInt64Array>(),
            ) else {
                continue;
            };
            for i in 0..batch.num_rows() {
                if views.is_valid(i) && applied.is_valid(i) {
                    out.insert(
                        (db.name.to_string(), views.value(i).to_string()),
                        applied.value(i),
                    );
                }
            }
        }
        out
    }

    /// The views a plan reads.
    pub(crate) fn views_in(&self, plan: &LogicalPlan, default_db: &str) -> Vec<Arc<View>> {
        use datafusion::common::tree_node::TreeNodeRecursion;
        let mut out: Vec<Arc<View>> = Vec::new();
        let _ = plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                let db = scan.table_name.schema().unwrap_or(default_db);
                if let Some(v) = self.views.get(db, scan.table_name.table())
                    && !out.iter().any(|o| Arc::ptr_eq(o, &v))
                {
                    out.push(v);
                }
            }
            Ok(TreeNodeRecursion::Continue)
        });
        // Views read through views must be current too.
        let mut i = 0;
        while i < out.len() {
            for id in out[i].source_ids.clone() {
                if let Some(v) = self.views.by_table(id)
                    && !out.iter().any(|o| Arc::ptr_eq(o, &v))
                {
                    out.push(v);
                }
            }
            i += 1;
        }
        out
    }

    /// Read-your-writes: waits until the views `df` reads reflect every write visible when it
    /// was planned, then lets it read up to the sequence visible now (which holds their rows).
    pub(crate) async fn await_views(
        &self,
        df: DataFrame,
        default_db: &str,
    ) -> Result<DataFrame, Error> {
        let views = self.views_in(df.logical_plan(), default_db);
        if views.is_empty() {
            return Ok(df);
        }
        let (state, plan) = df.into_parts();
        let snapshot = state.config().get_extension::<QuerySnapshot>();
        let seq = snapshot.as_ref().map_or(self.visible_seq(), |s| s.seq());
        let shared = self.views.clone();
        let timeout = self.config.view_wait;
        tokio::task::spawn_blocking(move || shared.wait(&views, seq, timeout))
            .await
            .map_err(|e| Error::View(ViewError::Behind(e.to_string())))?
            .map_err(|e| Error::View(ViewError::Behind(e)))?;
        if let Some(s) = snapshot {
            s.seq
                .store(self.visible_seq(), std::sync::atomic::Ordering::Release);
        }
        Ok(DataFrame::new(state, plan))
    }

    /// One row per view (of `db`, or all): what `system.views` and `SHOW MATERIALIZED VIEWS`
    /// show.
    pub(crate) fn views_batch(&self, db: Option<&str>) -> Result<RecordBatch, Error> {
        let views: Vec<Arc<View>> = self
            .views
            .views
            .read()
            .iter()
            .filter(|v| db.is_none_or(|d| v.db.as_ref() == d))
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

    /// Recomputes a view with plain DataFusion over its sources and lists the rows that
    /// differ: one `ok` row when none do.
    async fn check_view(self: &Arc<Self>, db: &str, name: &str) -> Result<RecordBatch, Error> {
        let view = self.views.get(db, name).ok_or_else(|| {
            Error::View(ViewError::NotFound(format!(
                "materialized view '{name}' not found in database '{db}'"
            )))
        })?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let seq = self.visible_seq();
            let shared = self.views.clone();
            let timeout = self.config.view_wait;
            let waiting = vec![view.clone()];
            tokio::task::spawn_blocking(move || shared.wait(&waiting, seq, timeout))
                .await
                .map_err(|e| Error::View(ViewError::Behind(e.to_string())))?
                .map_err(|e| Error::View(ViewError::Behind(e)))?;
            let at = self.visible_seq();
            let sql = view.def.lock().sql.clone();
            let expected = self
                .query
                .plan(db, &sql, false, at)
                .await?
                .collect()
                .await?;
            let actual = self
                .query
                .plan(
                    db,
                    &format!("SELECT * FROM {}", plan::quote(name)),
                    false,
                    at,
                )
                .await?
                .collect()
                .await?;
            let (missing, extra) = diff_rows(&expected, &actual)?;
            // Writes racing the check can make it differ for a moment: look again once.
            if (missing.is_empty() && extra.is_empty()) || attempt >= 3 {
                let total = actual.iter().map(|b| b.num_rows()).sum::<usize>();
                let mut status = Vec::new();
                let mut detail = Vec::new();
                if missing.is_empty() && extra.is_empty() {
                    status.push("ok".to_string());
                    detail.push(format!("{total} rows equal the recompute"));
                }
                for m in missing {
                    status.push("missing".to_string());
                    detail.push(m);
                }
                for e in extra {
                    status.push("extra".to_string());
                    detail.push(e);
                }
                return Ok(RecordBatch::try_from_iter(vec![
                    ("status", Arc::new(StringArray::from(status)) as ArrayRef),
                    ("row", Arc::new(StringArray::from(detail))),
                ])?);
            }
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
    }
}

impl crate::query::QueryExtension for DbInner {
    fn view_table(
        &self,
        table: &Arc<Table>,
    ) -> Option<Arc<dyn datafusion::catalog::TableProvider>> {
        self.views
            .by_table(table.id)
            .map(|v| v.provider.clone() as Arc<dyn datafusion::catalog::TableProvider>)
    }

    fn system_table_names(&self) -> Vec<String> {
        vec!["views".to_string()]
    }

    fn system_table(
        &self,
        name: &str,
    ) -> Result<Option<Arc<dyn datafusion::catalog::TableProvider>>, DataFusionError> {
        if name != "views" {
            return Ok(None);
        }
        let batch = self
            .views_batch(None)
            .map_err(|e| DataFusionError::External(Box::new(e)))?;
        Ok(Some(Arc::new(datafusion::datasource::MemTable::try_new(
            batch.schema(),
            vec![vec![batch]],
        )?)))
    }
}

/// Rows of `expected` not in `actual` and the reverse, rendered as text (floats compared to
/// 9 significant digits, since merged states may round differently from one pass).
pub(crate) fn diff_rows(
    expected: &[RecordBatch],
    actual: &[RecordBatch],
) -> Result<(Vec<String>, Vec<String>), Error> {
    let mut want = render(expected)?;
    let mut got = render(actual)?;
    want.sort();
    got.sort();
    let mut missing = Vec::new();
    let mut extra = Vec::new();
    let (mut i, mut j) = (0, 0);
    while i < want.len() || j < got.len() {
        match (want.get(i), got.get(j)) {
            (Some(a), Some(b)) if a == b => {
                i += 1;
                j += 1;
            }
            (Some(a), Some(b)) if a < b => {
                missing.push(a.clone());
                i += 1;
            }
            (Some(_), Some(b)) => {
                extra.push(b.clone());
                j += 1;
            }
            (Some(a), None) => {
                missing.push(a.clone());
                i += 1;
            }
            (None, Some(b)) => {
                extra.push(b.clone());
                j += 1;
            }
            (None, None) => break,
        }
    }
    Ok((missing, extra))
}

fn render(batches: &[RecordBatch]) -> Result<Vec<String>, Error> {
    let mut out = Vec::new();
    for b in batches {
        let schema = b.schema();
        let columns: Vec<ArrayRef> = b
            .columns()
            .iter()
            .map(|c| match c.data_type() {
                arrow::datatypes::DataType::Dictionary(_, v) => arrow::compute::cast(c, v),
                _ => Ok(c.clone()),
            })
            .collect::<Result<_, _>>()?;
        for row in 0..b.num_rows() {
            let mut parts = Vec::with_capacity(columns.len());
            for (f, c) in schema.fields().iter().zip(&columns) {
                let text = if c.is_null(row) {
                    "NULL".to_string()
                } else if let Some(x) = c.as_any().downcast_ref::<Float64Array>() {
                    let v = x.value(row);
                    if v == 0.0 || !v.is_finite() {
                        format!("{v}")
                    } else {
                        format!("{v:.8e}")
                    }
                } else {
                    arrow::util::display::array_value_to_string(c, row)?
                };
                parts.push(format!("{}={text}", f.name()));
            }
            out.push(parts.join(", "));
        }
    }
    Ok(out)
}
