//! What a query reads for a materialized view: its storage table without deleted rows, with
//! stored states turned into the view's columns (avg = sum / count, …) and every column cast
//! back to the type the definition produces. Filters are pushed through to the storage scan,
//! so a time filter on a view prunes its segments like any table's.

use std::sync::Arc;

use arrow::datatypes::{DataType, SchemaRef};
use async_trait::async_trait;
use datafusion::catalog::{Session, TableProvider};
use datafusion::datasource::{TableType, provider_as_source};
use datafusion::error::Result;
use datafusion::functions::expr_fn::{coalesce, sqrt};
use datafusion::logical_expr::{
    Expr, LogicalPlanBuilder, TableProviderFilterPushDown, cast, col, lit, when,
};
use datafusion::physical_plan::ExecutionPlan;

use super::plan::{Agg, OutColumn, ViewPlan};
use crate::storage::catalog::TIME_COLUMN;

/// Column of the storage table marking a deleted view row.
pub(crate) const DELETED: &str = "__deleted";

/// The view as a table.
#[derive(Debug)]
pub(crate) struct ViewProvider {
    pub(crate) storage: Arc<dyn TableProvider>,
    pub(crate) columns: Vec<(String, Expr)>,
    pub(crate) schema: SchemaRef,
}

/// The expressions computing the view's columns from its storage columns.
pub(crate) fn final_columns(plan: &ViewPlan, storage: &SchemaRef) -> Vec<(String, Expr)> {
    let f64 = DataType::Float64;
    plan.columns
        .iter()
        .enumerate()
        .map(|(i, (name, c))| {
            let want = plan
                .schema
                .field_with_name(name)
                .map(|f| f.data_type().clone())
                .unwrap_or(DataType::Null);
            let state = |s: &str| col(format!("\"{}\"", ViewPlan::state_column(i, s)));
            let stored = |n: &str| {
                storage
                    .field_with_name(n)
                    .ok()
                    .map(|f| f.data_type().clone())
            };
            let plain = |n: &str| {
                let e = col(format!("\"{}\"", n.replace('"', "\"\"")));
                // Same type: no cast, so filters reach the storage scan as plain columns.
                if stored(n).as_ref() == Some(&want) {
                    e
                } else {
                    cast(e, want.clone())
                }
            };
            let expr = match c {
                OutColumn::Time => return (name.clone(), plain(TIME_COLUMN)),
                OutColumn::Key | OutColumn::Value => return (name.clone(), plain(name)),
                OutColumn::State(agg) => match agg {
                    Agg::Count(_) => coalesce(vec![state("c"), lit(0i64)]),
                    Agg::Sum(_) | Agg::Min(_) | Agg::Max(_) | Agg::First(_) | Agg::Last(_) => {
                        state("v")
                    }
                    Agg::Avg(_) => cast(state("s"), f64.clone()) / cast(state("c"), f64.clone()),
                    Agg::Var {
                        sample, sqrt: root, ..
                    } => {
                        let n = cast(state("n"), f64.clone());
                        let var = if *sample {
                            when(n.clone().gt(lit(1.0)), state("q") / (n - lit(1.0)))
                                .end()
                                .unwrap_or(lit(f64::NAN))
                        } else {
                            when(n.clone().gt(lit(0.0)), state("q") / n)
                                .end()
                                .unwrap_or(lit(f64::NAN))
                        };
                        // Rounding can leave a tiny negative sum of squares.
                        let var = when(var.clone().lt(lit(0.0)), lit(0.0))
                            .otherwise(var)
                            .unwrap_or(lit(f64::NAN));
                        if *root { sqrt(var) } else { var }
                    }
                },
            };
            (name.clone(), cast(expr, want))
        })
        .collect()
}

#[async_trait]
impl TableProvider for ViewProvider {
    fn schema(&self) -> SchemaRef {
        self.schema.clone()
    }

    fn table_type(&self) -> TableType {
        TableType::View
    }

    fn supports_filters_pushdown(
        &self,
        filters: &[&Expr],
    ) -> Result<Vec<TableProviderFilterPushDown>> {
        // Applied again on top: pushed down only to prune.
        Ok(vec![TableProviderFilterPushDown::Inexact; filters.len()])
    }

    async fn scan(
        &self,
        state: &dyn Session,
        projection: Option<&Vec<usize>>,
        filters: &[Expr],
        limit: Option<usize>,
    ) -> Result<Arc<dyn ExecutionPlan>> {
        let mut builder =
            LogicalPlanBuilder::scan("__storage", provider_as_source(self.storage.clone()), None)?
                .filter(col(DELETED).is_not_true())?
                .project(self.columns.iter().map(|(name, e)| e.clone().alias(name)))?;
        for f in filters {
            builder = builder.filter(f.clone())?;
        }
        if let Some(p) = projection {
            let names: Vec<Expr> = p
                .iter()
                .map(|&i| {
                    col(format!(
                        "\"{}\"",
                        self.schema.field(i).name().replace('"', "\"\"")
                    ))
                })
                .collect();
            builder = builder.project(names)?;
        }
        if let Some(n) = limit {
            builder = builder.limit(0, Some(n))?;
        }
        state.create_physical_plan(&builder.build()?).await
    }
}
