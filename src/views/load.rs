//! Loading the stored views at open, and what each missed before a crash.

use std::sync::Arc;

use arrow::array::{Array, StringArray, UInt64Array};

use super::error::invalid;
use super::plan;
use super::{PROGRESS_TABLE, Status, View, ViewDef, Views};
use crate::error::Error;

impl Views {
    /// Loads the stored views (in dependency order) and queues their recovery. Runs on the
    /// maintenance thread at open.
    pub(crate) async fn load(self: &Arc<Self>) -> Result<(), Error> {
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
                self.shared.add(view);
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
}
