//! What the proxy's unit tests share: a proxy built on SQLite files in a fresh directory (the
//! embedded default's control database and stores), so a test gets the real `App` and
//! `AppState` in-process without PostgreSQL. The directory goes when the value is dropped.

use std::path::PathBuf;
use std::sync::Arc;

use switchyard_config::Config;

use crate::{App, AppState};

pub(crate) struct TestApp {
    pub(crate) app: App,
    dir: PathBuf,
}

impl TestApp {
    /// The embedded default's config on files of a fresh directory, changed by `adjust`; no
    /// database is touched (pools connect lazily), so paused-time tests can use it.
    pub(crate) fn build(adjust: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("switchyard-unit-{}", uuid::Uuid::new_v4()));
        std::fs::create_dir_all(&dir)?;
        let mut config = Config {
            control_url: format!("sqlite://{}", dir.join("control.db").display()),
            ..Config::default()
        };
        for store in &mut config.stores {
            store.url = format!(
                "sqlite://{}",
                dir.join(format!("{}.db", store.id)).display()
            );
        }
        adjust(&mut config);
        let app = App::build(config)?;
        Ok(Self { app, dir })
    }

    /// [`TestApp::build`] with the SQLite schemas created, as the proxy does at start.
    pub(crate) async fn start(adjust: impl FnOnce(&mut Config)) -> anyhow::Result<Self> {
        let test = Self::build(adjust)?;
        test.app.prepare_embedded().await?;
        Ok(test)
    }

    pub(crate) fn state(&self) -> &Arc<AppState> {
        self.app.state()
    }
}

impl Drop for TestApp {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
