//! Databases for one test: a fresh PostgreSQL database with a unique name ([`TestDb`], dropped
//! with its connections after the test), SQLite files in a temporary folder ([`TempDir`]), and
//! [`Env`], a control database and stores of one [`Backend`] with a config file naming them.

use std::path::PathBuf;

use anyhow::{anyhow, bail, Context as _};
use serde_json::Value;
use sqlx::Connection;
use uuid::Uuid;

use crate::*;

/// The admin URL of the test PostgreSQL server.
pub fn pg_admin_url() -> String {
    std::env::var("SWITCHYARD_TEST_PG_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".to_owned())
}

/// The URL of database `name` on the test server.
pub fn pg_url(name: &str) -> String {
    let admin = pg_admin_url();
    let base = admin
        .rsplit_once('/')
        .map_or(admin.as_str(), |(base, _)| base);
    format!("{base}/{name}")
}

/// A PostgreSQL database that exists for one test and is dropped (with its connections) after.
#[derive(Debug)]
pub struct TestDb {
    pub name: String,
    pub url: String,
}

impl TestDb {
    pub async fn create(label: &str) -> Result<Self> {
        let name = format!("sy_{label}_{}", &Uuid::new_v4().simple().to_string()[..12]);
        let mut admin = sqlx::PgConnection::connect(&pg_admin_url())
            .await
            .with_context(|| format!("connecting to test PostgreSQL at {}", pg_admin_url()))?;
        sqlx::query(&format!("CREATE DATABASE \"{name}\""))
            .execute(&mut admin)
            .await?;
        admin.close().await?;
        Ok(Self {
            url: pg_url(&name),
            name,
        })
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs inside and outside runtimes alike: use a thread with its own runtime.
        let _ = std::thread::spawn(move || {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(async move {
                if let Ok(mut admin) = sqlx::PgConnection::connect(&pg_admin_url()).await {
                    let _ =
                        sqlx::query(&format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"))
                            .execute(&mut admin)
                            .await;
                }
            });
        })
        .join();
    }
}

/// A folder removed after the test.
#[derive(Debug)]
pub struct TempDir {
    pub path: PathBuf,
}

impl TempDir {
    pub fn new(label: &str) -> Result<Self> {
        let path =
            std::env::temp_dir().join(format!("switchyard-{label}-{}", Uuid::new_v4().simple()));
        std::fs::create_dir_all(&path)?;
        Ok(Self { path })
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.path);
    }
}

/// Which database product a test environment uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Postgres,
    Sqlite,
}

impl Backend {
    pub const ALL: [Self; 2] = [Self::Postgres, Self::Sqlite];
}

/// A control database and stores, fresh for one test, with a config file naming them.
#[derive(Debug)]
pub struct Env {
    pub backend: Backend,
    pub dir: TempDir,
    pub control_url: String,
    /// `(store id, url)` in config order; the first is the default store.
    pub stores: Vec<(String, String)>,
    pub config_path: PathBuf,
    _dbs: Vec<TestDb>,
}

impl Env {
    /// A control database plus `stores` (the first is the default), with `extra` appended to
    /// the config file (e.g. a `[proxy]` section).
    pub async fn new(backend: Backend, stores: &[&str], extra: &str) -> Result<Self> {
        let dir = TempDir::new("env")?;
        let mut dbs = Vec::new();
        let sqlite_url = |label: &str| {
            format!(
                "sqlite://{}",
                dir.path.join(format!("{label}.db")).display()
            )
        };
        let control_url;
        let mut store_urls = Vec::new();
        match backend {
            Backend::Sqlite => {
                control_url = sqlite_url("control");
                for id in stores {
                    store_urls.push(((*id).to_owned(), sqlite_url(id)));
                }
            }
            Backend::Postgres => {
                let db = TestDb::create("control").await?;
                control_url = db.url.clone();
                dbs.push(db);
                for id in stores {
                    let db = TestDb::create(&id.replace('-', "_")).await?;
                    store_urls.push(((*id).to_owned(), db.url.clone()));
                    dbs.push(db);
                }
            }
        }
        let mut toml = format!(
            "control_url = \"{control_url}\"\ndefault_store = \"{}\"\n",
            stores
                .first()
                .ok_or_else(|| anyhow!("an env needs a store"))?
        );
        for (id, url) in &store_urls {
            toml.push_str(&format!(
                "\n[[stores]]\nid = \"{id}\"\nurl = \"{url}\"\nmax_connections = 8\n"
            ));
        }
        toml.push('\n');
        toml.push_str(extra);
        let config_path = dir.path.join("switchyard.toml");
        std::fs::write(&config_path, toml)?;
        Ok(Self {
            backend,
            dir,
            control_url,
            stores: store_urls,
            config_path,
            _dbs: dbs,
        })
    }

    pub fn store_url(&self, id: &str) -> &str {
        self.stores
            .iter()
            .find(|(s, _)| s == id)
            .map_or("", |(_, url)| url.as_str())
    }

    /// Runs `switchyard-control --config <this env> ARGS` and returns its output.
    pub fn control(&self, args: &[&str]) -> Result<CommandOutput> {
        run_control(&self.config_path, args, &[])
    }

    /// Like [`Env::control`] but fails unless the command exits 0; parses `--json` output.
    pub fn control_json(&self, args: &[&str]) -> Result<Value> {
        let mut all = vec!["--json"];
        all.extend_from_slice(args);
        let out = self.control(&all)?;
        if out.code != 0 {
            bail!(
                "switchyard-control {args:?} exited {}: {}{}",
                out.code,
                out.stdout,
                out.stderr
            );
        }
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("parsing output of {args:?}: {}", out.stdout))
    }

    /// Starts a proxy on random ports with this env's config plus `env` variables.
    pub fn proxy(&self, env: &[(&str, &str)]) -> Result<ProxyProcess> {
        ProxyProcess::spawn(&self.config_path, env)
    }
}

/// Runs `body` once per backend, naming the backend in any failure.
pub async fn for_each_backend<F, Fut>(mut body: F) -> Result<()>
where
    F: FnMut(Backend) -> Fut,
    Fut: std::future::Future<Output = Result<()>>,
{
    for backend in Backend::ALL {
        body(backend)
            .await
            .with_context(|| format!("on {backend:?}"))?;
    }
    Ok(())
}
