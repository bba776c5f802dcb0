//! Subscription views: a subscription to an aggregate (or join, window…) query is served by an
//! internal materialized view made for it, one per database and normalized query text,
//! whoever subscribes to it.
//!
//! They live in a reserved namespace (`__rivulet_sub_<SHA-256>`) that no write or statement
//! can make, read or drop; they are left out of `SHOW MATERIALIZED VIEWS` and `system.views`,
//! dropped a grace period after their last subscriber leaves ([`Hub::drop_idle_views`], on a
//! timer) and at the next open; and they are bounded in number, in total and per token
//! ([`SharedLimits`]), counting those still in their grace period.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use sha2::{Digest, Sha256};

use super::{Hub, SubscribeError};
use crate::error::Error;
use crate::ingest::prepare::SUBSCRIPTION_VIEW_PREFIX;

/// Bounds on the subscription views.
#[derive(Debug, Clone, Copy)]
pub(crate) struct SharedLimits {
    /// Subscription views in all (`--max-shared-views`).
    pub total: usize,
    /// … made by one token (`--max-shared-views-per-token`).
    pub per_owner: usize,
    /// A view nobody subscribes to is dropped after this long (`--shared-view-grace-secs`).
    pub grace: Duration,
}

/// One subscription view the hub made.
#[derive(Debug)]
pub(super) struct SharedView {
    /// The normalized query it keeps current.
    query: String,
    /// The token whose subscription made it (None: an embedded caller or no authentication):
    /// it counts against that token's quota until it is dropped.
    owner: Option<Arc<str>>,
    /// When it was made (database clock, ns): idle from then until someone subscribes.
    made: i64,
    /// Subscribe calls between finding the view and attaching to its log: it is in use.
    attaching: Arc<std::sync::atomic::AtomicUsize>,
}

/// Marks a subscription view in use while a subscribe call attaches to it (the collector
/// leaves it alone); dropped once the subscription counts as a subscriber.
pub(super) struct Attaching(Arc<std::sync::atomic::AtomicUsize>);

impl Attaching {
    fn new(count: &Arc<std::sync::atomic::AtomicUsize>) -> Attaching {
        count.fetch_add(1, Ordering::AcqRel);
        Attaching(count.clone())
    }
}

impl Drop for Attaching {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The registry: (database, view name) → what it is.
pub(super) type Registry = HashMap<(Arc<str>, String), SharedView>;

/// `sql` with its layout normalized (keywords, spacing, a trailing `;`): two texts of one
/// query share a view. Unparsable text (it planned, so it parses) is kept trimmed.
pub(super) fn normalize(sql: &str) -> String {
    use datafusion::sql::sqlparser::dialect::GenericDialect;
    use datafusion::sql::sqlparser::parser::Parser;
    let text = sql_text(sql);
    match Parser::parse_sql(&GenericDialect {}, text) {
        Ok(statements) => statements
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join("; "),
        Err(_) => text.to_string(),
    }
}

/// `sql` without surrounding space and a trailing `;`: what the view is made of.
fn sql_text(sql: &str) -> &str {
    sql.trim().trim_end_matches(';').trim()
}

/// The name of the subscription view of `query` (normalized) in database `db`: a SHA-256 of
/// both, so no crafted text can take over another query's view.
pub(super) fn view_name(db: &str, query: &str) -> String {
    let mut hash = Sha256::new();
    hash.update((db.len() as u64).to_le_bytes());
    hash.update(db.as_bytes());
    hash.update(query.as_bytes());
    let digest = hash.finalize();
    let mut name = String::with_capacity(SUBSCRIPTION_VIEW_PREFIX.len() + 64);
    name.push_str(SUBSCRIPTION_VIEW_PREFIX);
    for b in digest {
        name.push_str(&format!("{b:02x}"));
    }
    name
}

impl Hub {
    /// The subscription view keeping `sql` current in database `db_name`, made when missing
    /// (within the quotas; `owner` is the subscribing token), and the mark that keeps it from
    /// being collected until the caller has attached to it.
    pub(super) async fn shared_view(
        &self,
        db_name: &str,
        sql: &str,
        databases: Option<&[String]>,
        owner: Option<&Arc<str>>,
    ) -> Result<(String, Attaching), Error> {
        let query = normalize(sql);
        let name = view_name(db_name, &query);
        let key: (Arc<str>, String) = (db_name.into(), name.clone());
        let attaching = {
            let mut shared = self.shared.lock();
            if let Some(existing) = shared.get(&key) {
                if existing.query != query {
                    return Err(Error::Subscribe(SubscribeError::Internal(format!(
                        "subscription view name {name} is taken by another query"
                    ))));
                }
                let attaching = Attaching::new(&existing.attaching);
                if self.views.get(db_name, &name).is_some() {
                    return Ok((name, attaching));
                }
                // Being made by a concurrent subscribe: making it below meets `Exists`.
                attaching
            } else {
                self.admit(&shared, owner)?;
                let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
                let attaching = Attaching::new(&count);
                shared.insert(
                    key.clone(),
                    SharedView {
                        query: query.clone(),
                        owner: owner.cloned(),
                        made: self.now(),
                        attaching: count,
                    },
                );
                attaching
            }
        };
        if self.views.get(db_name, &name).is_none() {
            match self
                .views
                .create_subscription_view(db_name, &name, sql_text(sql), databases)
                .await
            {
                Ok(_) => {
                    tracing::info!(view = %name, query = %query, "subscription view created");
                }
                // A concurrent subscribe made it first.
                Err(Error::View(crate::ViewError::Exists(_)))
                    if self.views.get(db_name, &name).is_some() => {}
                Err(e) => {
                    self.shared.lock().remove(&key);
                    return Err(e);
                }
            }
        }
        Ok((name, attaching))
    }

    /// Refuses a new subscription view past the quotas (a 429 for clients).
    fn admit(&self, shared: &Registry, owner: Option<&Arc<str>>) -> Result<(), Error> {
        let limits = self.shared_limits;
        if shared.len() >= limits.total {
            return Err(Error::Subscribe(SubscribeError::TooMany(format!(
                "{} subscription views exist, the most allowed (--max-shared-views, \
                 Config::max_shared_views); each aggregate query being subscribed to, or \
                 left less than {:?} ago (--shared-view-grace-secs), holds one. Subscribe to a \
                 query already in use, or create a materialized view and subscribe to it",
                shared.len(),
                limits.grace
            ))));
        }
        if let Some(owner) = owner {
            let mine = shared
                .values()
                .filter(|v| v.owner.as_ref() == Some(owner))
                .count();
            if mine >= limits.per_owner {
                return Err(Error::Subscribe(SubscribeError::TooMany(format!(
                    "this token made {mine} subscription views, the most one token may \
                     (--max-shared-views-per-token, Config::max_shared_views_per_token); each \
                     aggregate query it subscribes to, or left less than {:?} ago \
                     (--shared-view-grace-secs), holds one",
                    limits.grace
                ))));
            }
        }
        Ok(())
    }

    /// The subscription views in existence (their grace period included).
    pub(crate) fn shared_view_count(&self) -> usize {
        self.shared.lock().len()
    }

    /// Drops the subscription views nobody has subscribed to for the grace period. Blocks (a
    /// drop persists): the database's timer thread runs it.
    pub(crate) fn drop_idle_views(&self) {
        let grace = i64::try_from(self.shared_limits.grace.as_nanos()).unwrap_or(i64::MAX);
        let now = self.now();
        let candidates: Vec<((Arc<str>, String), i64)> = self
            .shared
            .lock()
            .iter()
            .filter(|(_, v)| v.attaching.load(Ordering::Acquire) == 0)
            .map(|(k, v)| (k.clone(), v.made))
            .collect();
        for ((db, name), made) in candidates {
            let Some(view) = self.views.get(&db, &name) else {
                // Still being made (its subscribe call holds it), or gone.
                if now.saturating_sub(made) > grace {
                    self.shared.lock().remove(&(db, name));
                }
                continue;
            };
            let source = self
                .view_logs
                .read()
                .get(&view.table.id)
                .and_then(|c| c.get().cloned());
            let idle_since = match &source {
                Some(s) if s.subscribers.load(Ordering::Acquire) > 0 => continue,
                Some(s) => s.idle_since.lock().unwrap_or(made),
                None => made,
            };
            if now.saturating_sub(idle_since) <= grace {
                continue;
            }
            // Out of the registry first, unless a subscribe call has found it meanwhile: a
            // later one makes it anew.
            let key = (db.clone(), name.clone());
            {
                let mut shared = self.shared.lock();
                if shared
                    .get(&key)
                    .is_none_or(|v| v.attaching.load(Ordering::Acquire) > 0)
                {
                    continue;
                }
                shared.remove(&key);
            }
            match self.views.drop_view(&db, &name, true) {
                Ok(_) => tracing::info!(view = %name, "idle subscription view dropped"),
                Err(e) => {
                    tracing::warn!(view = %name, error = %e, "idle subscription view not dropped")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_hash_the_database_and_the_normalized_query() {
        let a = normalize("select  host, count(*) from cpu group by host;");
        let b = normalize("SELECT host, count(*)\nFROM cpu GROUP BY host");
        assert_eq!(a, b);
        assert_eq!(view_name("main", &a), view_name("main", &b));
        assert_ne!(view_name("main", &a), view_name("other", &a));
        // The length prefix keeps (db, query) pairs apart whatever their split.
        assert_ne!(view_name("ma", "inSELECT 1"), view_name("main", "SELECT 1"));
        let name = view_name("main", &a);
        assert!(name.starts_with(SUBSCRIPTION_VIEW_PREFIX));
        assert_eq!(name.len(), SUBSCRIPTION_VIEW_PREFIX.len() + 64);
    }
}
