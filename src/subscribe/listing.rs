//! `system.subscriptions`: one row per open subscription (embedded streams and every HTTP
//! transport alike), listed while its stream lives.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Weak};

use arrow::array::{
    ArrayRef, BooleanArray, RecordBatch, StringArray, TimestampNanosecondArray, UInt64Array,
};
use datafusion::catalog::TableProvider;
use datafusion::datasource::MemTable;
use datafusion::error::DataFusionError;

use super::hub::Hub;
use super::log::SourceKind;

/// The open subscriptions, by id.
#[derive(Default)]
pub(crate) struct Listing {
    next_id: AtomicU64,
    open: parking_lot::Mutex<BTreeMap<u64, Listed>>,
}

/// What `system.subscriptions` shows of one subscription.
struct Listed {
    database: String,
    query: String,
    /// The table or view it follows; None for a subscription view (internal).
    source: Option<String>,
    kind: &'static str,
    started_ns: i64,
    position: Arc<AtomicU64>,
}

/// Keeps a subscription listed until dropped with its stream.
pub(crate) struct Registration {
    hub: Weak<Hub>,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        if let Some(hub) = self.hub.upgrade() {
            hub.listing.open.lock().remove(&self.id);
        }
    }
}

impl Hub {
    /// Lists a subscription to `source` until the registration is dropped.
    pub(super) fn register(
        self: &Arc<Self>,
        database: &str,
        query: &str,
        source: &SourceKind,
        subscription_view: bool,
        position: Arc<AtomicU64>,
    ) -> Registration {
        let (name, kind) = match source {
            SourceKind::Table(t) => (Some(t.name.to_string()), "table"),
            SourceKind::View(_) if subscription_view => (None, "query"),
            SourceKind::View(v) => (Some(v.name()), "view"),
        };
        let id = self.listing.next_id.fetch_add(1, Ordering::Relaxed) + 1;
        self.listing.open.lock().insert(
            id,
            Listed {
                database: database.to_string(),
                query: query.to_string(),
                source: name,
                kind,
                started_ns: self.engine.config.clock.now_ns(),
                position,
            },
        );
        Registration {
            hub: Arc::downgrade(self),
            id,
        }
    }
}

impl crate::query::SystemTables for Hub {
    fn names(&self) -> Vec<String> {
        vec!["subscriptions".to_string()]
    }

    fn table(
        &self,
        name: &str,
        databases: Option<&[String]>,
    ) -> Result<Option<Arc<dyn TableProvider>>, DataFusionError> {
        if name != "subscriptions" {
            return Ok(None);
        }
        let mut id = Vec::new();
        let mut database = Vec::new();
        let mut query = Vec::new();
        let mut source = Vec::new();
        let mut kind = Vec::new();
        let mut shared = Vec::new();
        let mut started = Vec::new();
        let mut position = Vec::new();
        for (&n, l) in self.listing.open.lock().iter() {
            if databases.is_some_and(|d| !d.contains(&l.database)) {
                continue;
            }
            id.push(n);
            database.push(l.database.clone());
            query.push(l.query.clone());
            source.push(l.source.clone());
            kind.push(l.kind);
            shared.push(l.kind == "query");
            started.push(l.started_ns);
            position.push(l.position.load(Ordering::Acquire));
        }
        let batch = RecordBatch::try_from_iter([
            ("id", Arc::new(UInt64Array::from(id)) as ArrayRef),
            ("database", Arc::new(StringArray::from(database))),
            ("query", Arc::new(StringArray::from(query))),
            ("source", Arc::new(StringArray::from(source))),
            ("source_kind", Arc::new(StringArray::from(kind))),
            ("shared_view", Arc::new(BooleanArray::from(shared))),
            (
                "started",
                Arc::new(TimestampNanosecondArray::from(started).with_timezone("UTC")),
            ),
            ("position", Arc::new(UInt64Array::from(position))),
        ])?;
        Ok(Some(Arc::new(MemTable::try_new(
            batch.schema(),
            vec![vec![batch]],
        )?)))
    }
}
