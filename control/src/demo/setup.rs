//! Setting the demo up: fresh stores (SQLite files, PostgreSQL databases, or a config file's
//! stores) and the config over them, removing what it made afterwards; waiting for the
//! in-process proxy to be ready; seeding the tenant in the source.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde_json::value::RawValue;
use switchyard_client::AdminClient;
use switchyard_config::{Config, ControlConfig, ProxyConfig, StoreConfig};
use switchyard_store::{EventStore, NewEvent, StreamRef};
use uuid::Uuid;

use super::{DemoError, Stores};

/// What the demo made and must clean up.
#[derive(Debug)]
pub(super) struct Made {
    pub(super) label: String,
    dir: Option<PathBuf>,
    pg: Option<(String, Vec<String>)>,
}

impl Made {
    pub(super) async fn remove(&self) {
        if let Some(dir) = &self.dir {
            let _ = std::fs::remove_dir_all(dir);
            // The parent too, if the demo left it empty (it fails otherwise, as it should).
            if let Some(parent) = dir.parent() {
                let _ = std::fs::remove_dir(parent);
            }
        }
        if let Some((server, names)) = &self.pg {
            for name in names {
                if let Err(e) = switchyard_store::provision::drop_database(server, name).await {
                    eprintln!("demo: dropping database {name}: {e}");
                }
            }
        }
    }
}

fn demo_config(control_url: String, shared: String, dedicated: String) -> Config {
    let store = |id: &str, url: String| StoreConfig {
        id: id.to_owned(),
        url,
        max_connections: 8,
        sslmode: String::new(),
        ssl_root_cert: String::new(),
    };
    Config {
        control_url,
        control_sslmode: String::new(),
        control_ssl_root_cert: String::new(),
        default_store: "shared".to_owned(),
        stores: vec![store("shared", shared), store("dedicated", dedicated)],
        proxy: ProxyConfig::default(),
        control: ControlConfig::default(),
    }
}

/// Creates what `stores` asks for and returns the config over it.
pub(super) async fn prepare(stores: &Stores) -> Result<(Config, Made), DemoError> {
    let stamp = chrono::Utc::now().format("%Y%m%d-%H%M%S").to_string();
    let suffix = &Uuid::new_v4().simple().to_string()[..6];
    match stores {
        Stores::Embedded { parent } => {
            let dir = parent.join(format!("demo-{stamp}-{suffix}"));
            std::fs::create_dir_all(&dir)
                .map_err(|e| DemoError::Setup(format!("creating {}: {e}", dir.display())))?;
            let url = |name: &str| format!("sqlite://{}", dir.join(name).display());
            let config = demo_config(url("control.db"), url("shared.db"), url("dedicated.db"));
            Ok((
                config,
                Made {
                    label: dir.display().to_string(),
                    dir: Some(dir),
                    pg: None,
                },
            ))
        }
        Stores::Postgres { server_url } => {
            let base = format!("sy_demo_{}_{suffix}", stamp.replace('-', "_"));
            let names: Vec<String> = ["control", "shared", "dedicated"]
                .iter()
                .map(|n| format!("{base}_{n}"))
                .collect();
            let mut urls = Vec::new();
            let mut made = Made {
                label: names.join(", "),
                dir: None,
                pg: Some((server_url.clone(), Vec::new())),
            };
            for name in &names {
                let created = switchyard_store::provision::create_database(server_url, name).await;
                if let Err(e) = created {
                    made.remove().await;
                    return Err(DemoError::Setup(format!("creating database {name}: {e}")));
                }
                if let Some((_, made_names)) = &mut made.pg {
                    made_names.push(name.clone());
                }
                urls.push(
                    switchyard_store::provision::database_url(server_url, name)
                        .map_err(|e| DemoError::Setup(e.to_string()))?,
                );
            }
            let mut urls = urls.into_iter();
            let mut next = || urls.next().unwrap_or_default();
            let config = demo_config(next(), next(), next());
            Ok((config, made))
        }
        Stores::Config(config) => Ok((
            (**config).clone(),
            Made {
                label: "the stores of the config file (demo tenant left in place)".to_owned(),
                dir: None,
                pg: None,
            },
        )),
    }
}

/// Waits (up to 20 s) until the proxy's admin port says it is ready.
pub(super) async fn wait_ready(admin: &AdminClient) -> Result<(), DemoError> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if admin.ready().await.is_ok_and(|r| r.ready) {
            return Ok(());
        }
        if Instant::now() > deadline {
            return Err(DemoError::Setup(format!(
                "the proxy was not ready at {} within 20 s",
                admin.base()
            )));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Writes `events` events of the tenant into the source directly, 100 per stream.
pub(super) async fn seed(
    source: &EventStore,
    tenant: Uuid,
    events: u64,
) -> Result<Vec<Uuid>, DemoError> {
    const PER_STREAM: u64 = 100;
    let mut ids = Vec::new();
    let mut written = 0u64;
    let mut seq = 0u64;
    while written < events {
        let n = PER_STREAM.min(events - written);
        let stream = Uuid::new_v4();
        let batch: Vec<NewEvent> = (0..n)
            .map(|_| {
                seq += 1;
                let payload = RawValue::from_string(format!(
                    "{{\"seq\":{seq},\"amount\":{},\"note\":\"seeded by the demo\"}}",
                    seq % 97
                ))
                .expect("valid JSON");
                NewEvent::new(
                    Uuid::new_v4(),
                    "OrderPlaced",
                    payload,
                    Some("demo-seed".to_owned()),
                    None,
                )
            })
            .collect();
        source
            .append(
                StreamRef {
                    tenant_id: tenant,
                    aggregate_type: "Order",
                    aggregate_id: stream,
                },
                Some(0),
                &batch,
            )
            .await
            .map_err(|e| DemoError::Failed(format!("seeding the source: {e}")))?;
        ids.extend(batch.iter().map(|e| e.event_id));
        written += n;
    }
    Ok(ids)
}
