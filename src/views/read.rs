//! Reads that involve views: every query plan goes through [`Views::plan_read`], which waits
//! until the views it reads reflect every write visible when it was planned
//! (read-your-writes).

use std::sync::Arc;

use datafusion::dataframe::DataFrame;
use datafusion::logical_expr::LogicalPlan;

use super::error::ViewError;
use super::{View, Views};
use crate::error::Error;
use crate::query::{PlanOptions, QuerySnapshot};

impl Views {
    /// Plans `sql` (a query; statements are the caller's) with `db` as the default database,
    /// touching only `databases` (None: any), reading up to the sequence visible now, then
    /// waits for the views it reads, and lets views answer aggregates they keep
    /// ([`Views::answer_from_views`]). `allow_dml` lets `INSERT` through.
    pub(crate) async fn plan_read(
        &self,
        db: &str,
        sql: &str,
        allow_dml: bool,
        databases: Option<&[String]>,
        options: PlanOptions<'_>,
    ) -> Result<DataFrame, Error> {
        let df = self
            .plan_read_reaching(db, sql, allow_dml, databases, false, options)
            .await?;
        // Queries only: a subscription's snapshot keeps the sequence it was planned at.
        let df = self.answer_from_views(df).await?;
        Ok(self.query.bound_latest_buckets(df)?)
    }

    /// [`plan_read`](Self::plan_read); with `subscription_views`, the subscription layer's
    /// internal views resolve too.
    pub(crate) async fn plan_read_reaching(
        &self,
        db: &str,
        sql: &str,
        allow_dml: bool,
        databases: Option<&[String]>,
        subscription_views: bool,
        options: PlanOptions<'_>,
    ) -> Result<DataFrame, Error> {
        if self.engine.is_closed() {
            return Err(Error::Closed);
        }
        self.shared.wait_loaded();
        let df = self
            .query
            .plan_reaching(
                db,
                sql,
                allow_dml,
                self.engine.visible_seq(),
                databases,
                subscription_views,
                options,
            )
            .await
            .map_err(|e| match crate::query::Denied::find(&e) {
                Some(denied) => Error::Denied(denied.to_string()),
                None => e.into(),
            })?;
        if let Some(allowed) = databases
            && let Some(other) = crate::query::databases_outside(df.logical_plan(), allowed)?
        {
            return Err(Error::Denied(format!(
                "this token may not use database '{other}'"
            )));
        }
        self.await_views(df, db).await
    }

    /// The views a plan reads.
    pub(crate) fn views_in(&self, plan: &LogicalPlan, default_db: &str) -> Vec<Arc<View>> {
        use datafusion::common::tree_node::TreeNodeRecursion;
        let mut out: Vec<Arc<View>> = Vec::new();
        let _ = plan.apply_with_subqueries(|node| {
            if let LogicalPlan::TableScan(scan) = node {
                let db = scan.table_name.schema().unwrap_or(default_db);
                if let Some(v) = self.get(db, scan.table_name.table())
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
                if let Some(v) = self.by_table(id)
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
        let seq = snapshot
            .as_ref()
            .map_or(self.engine.visible_seq(), |s| s.seq());
        let shared = self.shared.clone();
        let timeout = self.engine.config.view_wait;
        tokio::task::spawn_blocking(move || shared.wait(&views, seq, timeout))
            .await
            .map_err(|e| Error::View(ViewError::Internal(e.to_string())))?
            .map_err(Error::View)?;
        if let Some(s) = snapshot {
            s.seq.store(
                self.engine.visible_seq(),
                std::sync::atomic::Ordering::Release,
            );
        }
        Ok(DataFrame::new(state, plan))
    }
}
