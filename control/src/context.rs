//! What every command works with: the validated config and lazily opened databases.

use std::collections::BTreeMap;

use switchyard_config::Config;
use switchyard_store::{ControlDb, EventStore, StoreError};

use crate::engine::{default_worker_id, Engine};

use crate::cli::CliError;

/// The config plus connections, opened on first use.
#[derive(Debug)]
pub struct Context {
    pub config: Config,
    control: Option<ControlDb>,
    stores: BTreeMap<String, EventStore>,
}

impl Context {
    pub fn new(config: Config) -> Self {
        Self {
            config,
            control: None,
            stores: BTreeMap::new(),
        }
    }

    /// The control database. Embedded (SQLite) control databases get their schema here, so
    /// the embedded default needs no `init`.
    pub async fn control(&mut self) -> Result<&ControlDb, CliError> {
        if self.control.is_none() {
            let db = ControlDb::connect(&self.config.control_url, 4)
                .map_err(CliError::store("control database"))?;
            if db.is_embedded() {
                db.ensure_schema()
                    .await
                    .map_err(CliError::store("control database"))?;
                // The embedded default has no `init`: the first program to start records it.
                db.record_default_store(&self.config.default_store)
                    .await
                    .map_err(CliError::store("control database"))?;
            }
            self.control = Some(db);
        }
        Ok(self.control.as_ref().expect("set above"))
    }

    /// A configured store by id.
    pub fn store(&mut self, id: &str) -> Result<&EventStore, CliError> {
        if !self.stores.contains_key(id) {
            let cfg = self.config.store(id).ok_or_else(|| {
                CliError::Refused(format!(
                    "store {id:?} is not configured (configured: {})",
                    self.config
                        .stores
                        .iter()
                        .map(|s| s.id.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                ))
            })?;
            let store =
                EventStore::connect_copier(&cfg.id, &cfg.url, 4).map_err(CliError::store(id))?;
            self.stores.insert(id.to_owned(), store);
        }
        Ok(&self.stores[id])
    }

    /// The migration engine over this config (its own pools), with embedded schemas ready.
    pub async fn engine(&self) -> Result<Engine, CliError> {
        let engine = Engine::new(&self.config, default_worker_id())
            .map_err(|e| CliError::Failed(e.to_string()))?;
        engine
            .prepare_embedded()
            .await
            .map_err(|e| CliError::Failed(e.to_string()))?;
        engine.check_default_store().await?;
        Ok(engine)
    }

    /// The default store recorded in the control database (the config's while none is); refused
    /// when this config names another (see [`crate::engine::default_store_mismatch`]).
    pub async fn default_store(&mut self) -> Result<String, CliError> {
        let configured = self.config.default_store.clone();
        let recorded = self
            .control()
            .await?
            .default_store()
            .await
            .map_err(CliError::store("control database"))?
            .unwrap_or_else(|| configured.clone());
        if recorded != configured {
            return Err(CliError::Refused(crate::engine::default_store_mismatch(
                &configured,
                &recorded,
            )));
        }
        Ok(recorded)
    }

    /// Every configured store id, in config order.
    pub fn store_ids(&self) -> Vec<String> {
        self.config.stores.iter().map(|s| s.id.clone()).collect()
    }

    /// Closes every pool opened.
    pub async fn close(&self) {
        if let Some(control) = &self.control {
            control.close().await;
        }
        for store in self.stores.values() {
            store.close().await;
        }
    }
}

impl CliError {
    /// Wraps a database error with what was being talked to.
    pub fn store(what: &str) -> impl FnOnce(StoreError) -> CliError + '_ {
        move |e| CliError::Failed(format!("{what}: {e}"))
    }
}
