//! Opening a database: the order in which the layers are built and wired.
//!
//! 1. the storage engine opens the directory (lock, catalog, layout, segments, WAL replay:
//!    storage/engine.rs), validating replayed rows with the ingest layer's rules;
//! 2. the query engine is built on the engine;
//! 3. the views layer is built on both (its queue observes the engine's writes; it reads views
//!    for the query engine);
//! 4. the subscription hub is built on the engine and views (it observes table writes and view
//!    changes);
//! 5. the background threads start: WAL interval sync, persistence, the view worker (which
//!    loads the stored views and resumes their change logs), the shared-view collector.

use std::sync::{Arc, Weak};

use arrow::array::RecordBatch;

use super::{DbInner, background};
use crate::config::{Config, Durability};
use crate::error::Error;
use crate::ingest::batch::prepare_system_batch;
use crate::query::QueryEngine;
use crate::storage::catalog::Catalog;
use crate::storage::engine::Engine;

impl DbInner {
    /// Opens the engine, then wires the layers above it and starts the background threads
    /// (see the module docs for the order).
    pub(super) fn open(config: Config) -> Result<Arc<DbInner>, Error> {
        let replay_prepare = |catalog: &Catalog, db: &str, table: &str, batch: &RecordBatch| {
            prepare_system_batch(catalog, db, table, batch)
                .map(|p| p.split().0)
                .map_err(|e| Box::new(e) as Box<dyn std::error::Error + Send + Sync>)
        };
        let engine = Arc::new(Engine::open(config, &replay_prepare)?);
        let config = engine.config.clone();
        let query = Arc::new(
            QueryEngine::new(
                engine.clone(),
                &config.default_database,
                config.query_memory_limit,
            )
            .map_err(|e| Error::Config(format!("query engine: {e}")))?,
        );
        let views = crate::views::Views::new(engine.clone(), query.clone());
        let subs = Arc::new(crate::subscribe::Hub::new(
            engine.clone(),
            views.clone(),
            crate::subscribe::LogLimits {
                bytes: config.subscribe_log_bytes,
                age: config.subscribe_log_age,
            },
            crate::subscribe::SharedLimits {
                total: config.max_shared_views,
                per_owner: config.max_shared_views_per_token,
                grace: config.shared_view_grace,
            },
        ));
        engine.add_observer(&(subs.clone() as Arc<dyn crate::storage::commit::ApplyObserver>));
        let observer: Weak<dyn crate::views::ViewObserver> = Arc::downgrade(&subs) as _;
        views.set_observer(observer);
        let listing: Weak<dyn crate::query::SystemTables> = Arc::downgrade(&subs) as _;
        query.set_system_tables(listing);
        let inner = Arc::new(DbInner {
            query,
            config,
            engine: engine.clone(),
            threads: background::Threads::default(),
            views,
            subs,
        });
        let keep: Weak<dyn std::any::Any + Send + Sync> = Arc::downgrade(&inner) as _;
        inner.subs.keep_alive(keep);
        inner.engine.recount_buffer();
        if let Durability::Interval(every) = inner.config.durability {
            background::start_syncer(&inner, every);
        }
        if inner.config.background && inner.engine.manifest.is_some() {
            background::start_persister(&inner);
        }
        inner.views.start()?;
        background::start_collector(&inner);
        Ok(inner)
    }
}
