//! `CHECK MATERIALIZED VIEW`: recompute a view with plain DataFusion over its sources and
//! list the rows that differ (the same oracle the tests use).

use std::sync::Arc;

use arrow::array::{Array, ArrayRef, Float64Array, RecordBatch, StringArray};

use super::Views;
use super::error::ViewError;
use super::plan;
use crate::error::Error;

impl Views {
    /// Recomputes a view with plain DataFusion over its sources and lists the rows that
    /// differ: one `ok` row when none do.
    pub(crate) async fn check_view(
        self: &Arc<Self>,
        db: &str,
        name: &str,
    ) -> Result<RecordBatch, Error> {
        let view = self.get(db, name).ok_or_else(|| {
            Error::View(ViewError::NotFound(format!(
                "materialized view '{name}' not found in database '{db}'"
            )))
        })?;
        let mut attempt = 0;
        loop {
            attempt += 1;
            let seq = self.engine.visible_seq();
            let shared = self.shared.clone();
            let timeout = self.engine.config.view_wait;
            let waiting = vec![view.clone()];
            tokio::task::spawn_blocking(move || shared.wait(&waiting, seq, timeout))
                .await
                .map_err(|e| Error::View(ViewError::Internal(e.to_string())))?
                .map_err(Error::View)?;
            let at = self.engine.visible_seq();
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
