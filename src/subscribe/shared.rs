//! Shared views: a subscription to an aggregate (or join, window…) query is served by a
//! materialized view made for it, one per distinct query text, dropped once nobody has
//! subscribed to it for the change-log age (checked on a timer, [`Hub::drop_idle_views`]).

use std::sync::Arc;
use std::sync::atomic::Ordering;

use super::Hub;
use super::log::SourceKind;
use crate::error::Error;

/// Name prefix of the views made for subscriptions to aggregate queries.
pub(crate) const SHARED_VIEW_PREFIX: &str = "rivulet_sub_";

impl Hub {
    /// The shared view keeping `sql` current in database `db_name` (created when missing):
    /// one per distinct query text, whoever subscribes to it.
    pub(super) async fn shared_view(
        &self,
        db_name: &str,
        sql: &str,
        databases: Option<&[String]>,
    ) -> Result<String, Error> {
        let text = sql.trim().trim_end_matches(';').trim();
        let mut reversed: Vec<u8> = text.bytes().collect();
        reversed.reverse();
        let hash = (u64::from(crc32fast::hash(text.as_bytes())) << 32)
            | u64::from(crc32fast::hash(&reversed));
        let name = format!("{SHARED_VIEW_PREFIX}{hash:016x}");
        if self.views.get(db_name, &name).is_none() {
            let statement = crate::views::ddl::ViewStatement::Create {
                db: None,
                name: name.clone(),
                if_not_exists: true,
                options: crate::views::ddl::ViewOptions::default(),
                query: text.to_string(),
            };
            self.views
                .run_statement(db_name, statement, databases)
                .await?;
            tracing::info!(view = %name, query = %text, "shared view created for subscriptions");
        }
        Ok(name)
    }

    /// Drops the shared views nobody has subscribed to for the change-log age. Blocks (a drop
    /// persists): the database's timer thread runs it.
    pub(crate) fn drop_idle_views(&self) {
        let age = i64::try_from(self.limits.age.as_nanos()).unwrap_or(i64::MAX);
        let now = self.now();
        let idle: Vec<(Arc<str>, String)> = self
            .view_logs
            .read()
            .values()
            .filter_map(|c| c.get())
            .filter_map(|s| match &s.kind {
                SourceKind::View(v)
                    if s.subscribers.load(Ordering::Acquire) == 0
                        && s.idle_since
                            .lock()
                            .is_some_and(|t| now.saturating_sub(t) > age) =>
                {
                    let name = v.name();
                    name.starts_with(SHARED_VIEW_PREFIX)
                        .then(|| (v.db.clone(), name))
                }
                _ => None,
            })
            .collect();
        for (database, name) in idle {
            match self.views.drop_view(&database, &name, true) {
                Ok(_) => tracing::info!(view = %name, "idle shared subscription view dropped"),
                Err(e) => tracing::warn!(view = %name, error = %e, "idle shared view not dropped"),
            }
        }
    }
}
