//! The one configuration file both programs read.
//!
//! A TOML file (`--config FILE` or `SWITCHYARD_CONFIG`), then `SWITCHYARD_…` environment
//! overrides, then `${VAR}` expansion in the values that carry secrets (store and control URLs,
//! the admin token), then validation. With no file at all the embedded default applies: SQLite
//! files under `./switchyard-data/`. Unknown keys are an error, in the file and in the
//! environment, so a typo never silently becomes a default.
//!
//! This crate is `switchyard-config`: both programs load their configuration through it, and
//! `switchyard-store` takes from it only the database URL types ([`url::StoreUrl`]) and the
//! TLS rule its pools follow ([`tls::url_sets_mode`]). It opens no connection and depends on no
//! driver, so the SQL crate knows nothing of listeners or header sizes and the config loader
//! (and its fuzz target) builds without sqlx.

pub mod tls;
pub mod url;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::tls::Keys;
use crate::url::StoreUrl;

/// Where the embedded default keeps its files.
pub const EMBEDDED_DIR: &str = "switchyard-data";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("environment variable {var}: {message}")]
    Env { var: String, message: String },
    #[error("invalid config: {0}")]
    Invalid(String),
}

/// The whole configuration, as validated. Field docs give the defaults.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Config {
    /// Control database: routing, migrations, audit. Default: `sqlite://switchyard-data/control.db`.
    #[serde(default = "default_control_url")]
    pub control_url: String,
    /// TLS to a PostgreSQL control database: `disable`, `prefer`, `require`, `verify-ca` or
    /// `verify-full`. Default empty: the URL's own `sslmode=`, else `prefer`.
    #[serde(default)]
    pub control_sslmode: String,
    /// PEM file of the CA that signed the control database's certificate; needed by
    /// `verify-ca` and `verify-full`. Default empty: the URL's own `sslrootcert=`, else none.
    #[serde(default)]
    pub control_ssl_root_cert: String,
    /// Store for tenants that have no routing row. Default: `shared`.
    #[serde(default = "default_store_id")]
    pub default_store: String,
    /// Event stores. Default: the embedded `shared` and `dedicated` SQLite files.
    #[serde(default = "default_stores")]
    pub stores: Vec<StoreConfig>,
    #[serde(default)]
    pub proxy: ProxyConfig,
    #[serde(default)]
    pub control: ControlConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub id: String,
    /// `postgres://…` or `sqlite://path`; `${VAR}` is expanded from the environment.
    pub url: String,
    /// Connections each process keeps to this store at most. Default: 16.
    #[serde(default = "default_pool_size")]
    pub max_connections: u32,
    /// TLS to this store (PostgreSQL): `disable`, `prefer`, `require`, `verify-ca` or
    /// `verify-full`. Default empty: the URL's own `sslmode=`, else `prefer`.
    #[serde(default)]
    pub sslmode: String,
    /// PEM file of the CA that signed this store's certificate; needed by `verify-ca` and
    /// `verify-full`. Default empty: the URL's own `sslrootcert=`, else none.
    #[serde(default)]
    pub ssl_root_cert: String,
}

/// The `[proxy]` section. A [`Duration`] field is read from its key with `_ms` added, in whole
/// milliseconds (`gate_wait` from `gate_wait_ms`); a path field is `None` when its key is empty.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ProxyConfig {
    /// Data-plane listener (`address:port`). Default `127.0.0.1:7070`.
    #[serde(with = "socket_addr::proxy_listen")]
    pub listen: SocketAddr,
    /// Admin listener (health, metrics, routes; `address:port`). Default `127.0.0.1:7071`.
    #[serde(with = "socket_addr::proxy_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Bearer token required by mutating admin calls; empty means none. `${VAR}` is expanded.
    pub admin_token: String,
    /// Identifies this proxy in the control database's `proxies` table. Default: hostname-pid.
    pub proxy_id: String,
    /// Largest request body accepted, in bytes. Default 1 MiB.
    pub max_body_bytes: usize,
    /// Most events in one append. Default 1000.
    pub max_events_per_append: usize,
    /// Bytes of committed appends (payloads plus event metadata) one target store's mirror
    /// queue holds, from queueing until its worker is done with them; past it a new append is
    /// not mirrored (counted; the tail copies it). At least `max_body_bytes`. Default 64 MiB.
    pub mirror_queue_bytes: usize,
    /// Longest `event_type`, `aggregate_type` and `actor_id`, in bytes (the columns are
    /// VARCHAR(255)). Default 255.
    pub max_field_bytes: usize,
    /// How long a writer waits at a closed gate before 503 `writes_paused`. Default 5000.
    #[serde(rename = "gate_wait_ms", with = "millis")]
    pub gate_wait: Duration,
    /// Whole-request deadline. Default 30000.
    #[serde(rename = "request_timeout_ms", with = "millis")]
    pub request_timeout: Duration,
    /// Requests handled at once before new ones are shed with 503. Default 1024.
    pub max_concurrent_requests: usize,
    /// Fairness during a migration: the share (more than 0, at most 1) of
    /// `max_concurrent_requests`, and of each store's `max_connections`, that requests of
    /// migrating tenants (route `bulk_copy`, `dual_write` or `cutover_paused`) may hold
    /// together; past it their requests get 503 `tenant_overloaded` and other tenants keep the
    /// rest. 1 turns it off. Default 0.5.
    pub migrating_tenant_share: f64,
    /// Routing safety-net poll interval. Default 1000.
    #[serde(rename = "routing_poll_ms", with = "millis")]
    pub routing_poll: Duration,
    /// Whether to LISTEN for routing notifications (PostgreSQL control database only).
    /// Default true; turning it off leaves only the poll.
    pub routing_listen: bool,
    /// How long shutdown waits for in-flight requests. Default 10000.
    #[serde(rename = "shutdown_grace_ms", with = "millis")]
    pub shutdown_grace: Duration,
    /// How long a client may take to send a request's headers, from its first byte (or, for
    /// the first request, from connecting): slow-loris protection. Default 10000.
    #[serde(rename = "header_read_timeout_ms", with = "millis")]
    pub header_read_timeout: Duration,
    /// How long an idle keep-alive connection (no request in progress, nothing sent) stays
    /// open between requests. Default 75000.
    #[serde(rename = "keep_alive_idle_ms", with = "millis")]
    pub keep_alive_idle: Duration,
    /// How long a client may take to send a request's body once its headers arrived; then 408
    /// `body_timeout`. Default 10000.
    #[serde(rename = "body_read_timeout_ms", with = "millis")]
    pub body_read_timeout: Duration,
    /// Largest request head (request line and headers), in bytes; larger heads get 431.
    /// At least 8192. Default 16384.
    pub max_header_bytes: usize,
    /// Open connections on the data port at most; further ones get 503
    /// `too_many_connections` and are closed. Default 4096.
    pub max_connections: usize,
    /// Data-plane requests per second allowed per client IP address (token bucket); over it,
    /// 429 `rate_limited` with Retry-After. 0 turns the limit off. Default 0.
    pub rate_limit_per_second: u32,
    /// Requests a client IP may send in a burst above the rate. Default 0, meaning the same as
    /// `rate_limit_per_second`.
    pub rate_limit_burst: u32,
    /// PEM certificate chain; with `tls_key_path`, both listeners (data and admin) speak TLS
    /// only. Empty means plain TCP.
    #[serde(with = "optional_path")]
    pub tls_cert_path: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `tls_cert_path`.
    #[serde(with = "optional_path")]
    pub tls_key_path: Option<PathBuf>,
    /// PEM CA certificate(s); when set (with `tls_cert_path`), the data listener accepts only
    /// clients presenting a certificate that CA signed (mutual TLS). The admin listener does
    /// not ask for one (probes and scrapers). Empty means no client certificates.
    #[serde(with = "optional_path")]
    pub tls_client_ca_path: Option<PathBuf>,
    /// Data-plane bearer tokens: a file of `<token> <tenant-uuid>[,<tenant-uuid>...]` or
    /// `<token> *` lines (`#` comments). When set, every data-plane request needs
    /// `Authorization: Bearer <token>` allowed its tenant. Re-read when its content changes.
    /// Empty means no tokens.
    #[serde(with = "optional_path")]
    pub data_tokens_file: Option<PathBuf>,
    /// How often `data_tokens_file` is checked for changes. Default 2000.
    #[serde(rename = "data_tokens_poll_ms", with = "millis")]
    pub data_tokens_poll: Duration,
    /// Lets the data plane listen on a non-loopback address with neither `data_tokens_file`
    /// nor `tls_client_ca_path` (otherwise the proxy refuses to start). Logged as a warning
    /// and exported as `switchyard_proxy_data_plane_unauthenticated`. Default false.
    pub allow_unauthenticated: bool,
}

/// The `[control]` section; [`Duration`] fields as in [`ProxyConfig`].
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ControlConfig {
    /// `serve` admin listener (`address:port`). Default `127.0.0.1:7072`.
    #[serde(with = "socket_addr::control_admin_listen")]
    pub admin_listen: SocketAddr,
    /// Bearer token required by `serve`'s mutating admin calls; empty means none. `${VAR}` is
    /// expanded.
    pub admin_token: String,
    /// Budget of the whole cutover sequence. Default 2000.
    #[serde(rename = "cutover_timeout_ms", with = "millis")]
    pub cutover_timeout: Duration,
    /// Largest lag at which cutover proceeds without `--force`. Default 0.
    pub cutover_max_lag_events: u64,
    /// Events per copy batch. Default 5000.
    pub batch_size: u32,
    /// Copy rate limit in events per second; 0 = unlimited. Default 0.
    pub max_rate: u64,
    /// Most cutovers `--cutover auto` tries (counting those that rolled back); then it stops
    /// and says why in `status`, and the operator cuts over by hand. Default 5.
    pub auto_cutover_attempts: u32,
    /// Wait after the first rolled-back automatic cutover before the next; doubles after each
    /// (at most 5 minutes). Default 2000.
    #[serde(rename = "auto_cutover_backoff_ms", with = "millis")]
    pub auto_cutover_backoff: Duration,
    /// After a cutover, keep the store the tenant left current (proxies mirror the tenant's
    /// appends back to it as copiers), unless `migrate start --no-reverse`. Default true.
    pub reverse_replication: bool,
    /// Rows of a tenant `complete --cleanup` and `cleanup` delete per batch (one short
    /// transaction each). Default 1000.
    pub cleanup_batch_size: u32,
    /// Pause between two cleanup batches, so the store's other tenants keep their share of
    /// it. Default 100.
    #[serde(rename = "cleanup_pause_ms", with = "millis")]
    pub cleanup_pause: Duration,
    /// Hours after its cutover `serve` completes a migrated migration by itself (the end of
    /// the undo window; it deletes nothing). 0 = never: completing ends the possibility of a
    /// revert, so it is the operator's decision unless they set a grace period. Default 0.
    pub reverse_replication_hours: f64,
}

/// Why a process refuses a config whose `default_store` is not the one the control database
/// records (issue 14 item 12): two processes with different defaults split the history of
/// every tenant without a routing row between two stores.
pub fn default_store_mismatch(configured: &str, recorded: &str) -> String {
    format!(
        "this config's default_store is {configured:?}, but the control database records \
         {recorded:?} as the store of every tenant without a routing row; a process using another \
         default would read and write those tenants in the wrong store. Set default_store = \
         {recorded:?} in the config, or change the recorded default with \
         `switchyard-control routing set-default STORE`"
    )
}

fn default_control_url() -> String {
    format!("sqlite://{EMBEDDED_DIR}/control.db")
}
fn default_store_id() -> String {
    "shared".to_owned()
}
fn default_pool_size() -> u32 {
    16
}
fn default_stores() -> Vec<StoreConfig> {
    ["shared", "dedicated"]
        .into_iter()
        .map(|id| StoreConfig {
            id: id.to_owned(),
            url: format!("sqlite://{EMBEDDED_DIR}/{id}.db"),
            max_connections: default_pool_size(),
            sslmode: String::new(),
            ssl_root_cert: String::new(),
        })
        .collect()
}

impl Default for ProxyConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 7070)),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7071)),
            admin_token: String::new(),
            proxy_id: String::new(),
            max_body_bytes: 1 << 20,
            max_events_per_append: 1000,
            mirror_queue_bytes: 64 << 20,
            max_field_bytes: 255,
            gate_wait: Duration::from_millis(5000),
            request_timeout: Duration::from_millis(30_000),
            max_concurrent_requests: 1024,
            migrating_tenant_share: 0.5,
            routing_poll: Duration::from_millis(1000),
            routing_listen: true,
            shutdown_grace: Duration::from_millis(10_000),
            header_read_timeout: Duration::from_millis(10_000),
            keep_alive_idle: Duration::from_millis(75_000),
            body_read_timeout: Duration::from_millis(10_000),
            max_header_bytes: 16 * 1024,
            max_connections: 4096,
            rate_limit_per_second: 0,
            rate_limit_burst: 0,
            tls_cert_path: None,
            tls_key_path: None,
            tls_client_ca_path: None,
            data_tokens_file: None,
            data_tokens_poll: Duration::from_millis(2000),
            allow_unauthenticated: false,
        }
    }
}

impl Default for ControlConfig {
    fn default() -> Self {
        Self {
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7072)),
            admin_token: String::new(),
            cutover_timeout: Duration::from_millis(2000),
            cutover_max_lag_events: 0,
            batch_size: 5000,
            max_rate: 0,
            auto_cutover_attempts: 5,
            auto_cutover_backoff: Duration::from_millis(2000),
            reverse_replication: true,
            cleanup_batch_size: 1000,
            cleanup_pause: Duration::from_millis(100),
            reverse_replication_hours: 0.0,
        }
    }
}

impl Default for Config {
    /// The embedded default: SQLite files under `./switchyard-data/`.
    fn default() -> Self {
        Self {
            control_url: default_control_url(),
            control_sslmode: String::new(),
            control_ssl_root_cert: String::new(),
            default_store: default_store_id(),
            stores: default_stores(),
            proxy: ProxyConfig::default(),
            control: ControlConfig::default(),
        }
    }
}

impl ProxyConfig {
    /// Whether data-plane requests must authenticate (bearer tokens or client certificates).
    pub fn data_plane_authenticated(&self) -> bool {
        self.data_tokens_file.is_some() || self.tls_client_ca_path.is_some()
    }

    /// Why the proxy must not start with this data plane: a listener beyond loopback that
    /// nobody has to authenticate to, unless `allow_unauthenticated` says so. Checked by the
    /// proxy only (the control plane reads the same file but serves no data plane).
    pub fn unauthenticated_exposure(&self) -> Option<String> {
        (!self.data_plane_authenticated()
            && !self.allow_unauthenticated
            && !self.listen.ip().is_loopback())
            .then(|| {
                format!(
                    "proxy.listen = \"{}\" is not a loopback address and the data plane has no \
                     authentication: anyone who can reach it could read and write every \
                     tenant's events; set proxy.data_tokens_file (SWITCHYARD_PROXY_DATA_TOKENS_FILE) \
                     or proxy.tls_client_ca_path, bind it to 127.0.0.1, or set \
                     proxy.allow_unauthenticated = true if the network alone guards it",
                    self.listen
                )
            })
    }
}

impl Config {
    /// Loads the file (if any), applies the process environment, expands secrets, validates.
    pub fn load(path: Option<&Path>) -> Result<Self, ConfigError> {
        let vars: Vec<(String, String)> = std::env::vars().collect();
        let text = match path {
            Some(path) => {
                Some(
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                        path: path.to_owned(),
                        source,
                    })?,
                )
            }
            None => None,
        };
        Self::from_parts(text.as_deref(), path, &vars)
    }

    /// [`Config::load`] with the file text and environment given, for tests and `check-config`.
    pub fn from_parts(
        text: Option<&str>,
        path: Option<&Path>,
        vars: &[(String, String)],
    ) -> Result<Self, ConfigError> {
        let path_buf = path.map_or_else(|| PathBuf::from("<none>"), Path::to_owned);
        let mut config: Config = match text {
            Some(text) => toml::from_str(text).map_err(|e| ConfigError::Parse {
                path: path_buf.clone(),
                message: parse_message(&e, text),
            })?,
            None => Config::default(),
        };
        config.apply_env(vars)?;
        config.expand_secrets(vars)?;
        config.resolve_tls()?;
        config.validate()?;
        Ok(config)
    }

    /// Applies `SWITCHYARD_<KEY>`, `SWITCHYARD_PROXY_<KEY>`, `SWITCHYARD_CONTROL_<KEY>` and
    /// `SWITCHYARD_STORE_<ID>_URL` (`_SSLMODE`, `_SSL_ROOT_CERT`) overrides. A variable in one of
    /// those families that names no key is an error; other `SWITCHYARD_` variables
    /// (`SWITCHYARD_CONFIG`, `SWITCHYARD_LOG`) are not configuration keys and are left alone.
    fn apply_env(&mut self, vars: &[(String, String)]) -> Result<(), ConfigError> {
        let mut tree = toml::Value::try_from(&*self)
            .map_err(|e| ConfigError::Invalid(format!("serialising defaults: {e}")))?;
        let mut changed = false;
        for (var, value) in vars {
            let Some(key) = var.strip_prefix("SWITCHYARD_") else {
                continue;
            };
            if let Some(rest) = key.strip_prefix("STORE_") {
                let slot = ["_URL", "_SSLMODE", "_SSL_ROOT_CERT"]
                    .into_iter()
                    .find_map(|suffix| {
                        let id = rest.strip_suffix(suffix)?;
                        let index = self.stores.iter().position(|s| env_name(&s.id) == id)?;
                        Some((index, suffix))
                    });
                match slot {
                    Some((index, suffix)) => {
                        let store = &mut self.stores[index];
                        let field = match suffix {
                            "_URL" => &mut store.url,
                            "_SSLMODE" => &mut store.sslmode,
                            _ => &mut store.ssl_root_cert,
                        };
                        field.clone_from(value);
                    }
                    None => {
                        return Err(ConfigError::Env {
                            var: var.clone(),
                            message: "names no configured store (expected \
                                      SWITCHYARD_STORE_<ID>_URL, _SSLMODE or _SSL_ROOT_CERT)"
                                .to_owned(),
                        })
                    }
                }
                continue;
            }
            let table = tree.as_table_mut().expect("a struct serialises to a table");
            let slot = find_env_slot(table, key);
            match slot {
                Some(slot) => {
                    *slot = parse_like(slot, value).map_err(|message| ConfigError::Env {
                        var: var.clone(),
                        message,
                    })?;
                    changed = true;
                }
                None if key.starts_with("PROXY_") || key.starts_with("CONTROL_") => {
                    return Err(ConfigError::Env {
                        var: var.clone(),
                        message: "names no configuration key".to_owned(),
                    })
                }
                None => {}
            }
        }
        if changed {
            // Keep the store URLs set above: they live in `self`, not in the tree.
            let stores = std::mem::take(&mut self.stores);
            *self = tree.try_into().map_err(|e: toml::de::Error| {
                ConfigError::Invalid(format!(
                    "after environment overrides: {}",
                    without_values(e.message())
                ))
            })?;
            self.stores = stores;
        }
        Ok(())
    }

    fn expand_secrets(&mut self, vars: &[(String, String)]) -> Result<(), ConfigError> {
        self.control_url = expand(&self.control_url, vars, "control_url", true)?;
        self.proxy.admin_token = expand(&self.proxy.admin_token, vars, "proxy.admin_token", false)?;
        self.control.admin_token = expand(
            &self.control.admin_token,
            vars,
            "control.admin_token",
            false,
        )?;
        for store in &mut self.stores {
            let name = format!("the url of store {:?}", store.id);
            store.url = expand(&store.url, vars, &name, true)?;
        }
        Ok(())
    }

    /// Resolves each PostgreSQL database's TLS settings (keys and URL parameters, see
    /// [`crate::tls::resolve`]) and writes them into both: the URL, where the driver reads them,
    /// and the keys, so that the keys show what applies and resolving again agrees.
    fn resolve_tls(&mut self) -> Result<(), ConfigError> {
        resolve_tls_of(
            &mut self.control_url,
            &mut self.control_sslmode,
            &mut self.control_ssl_root_cert,
            CONTROL_TLS_KEYS,
            "",
        )?;
        for store in &mut self.stores {
            let context = format!("store {:?}: ", store.id);
            resolve_tls_of(
                &mut store.url,
                &mut store.sslmode,
                &mut store.ssl_root_cert,
                STORE_TLS_KEYS,
                &context,
            )?;
        }
        Ok(())
    }

    /// Checks everything that can be checked without a network (but the TLS settings, which
    /// [`Config::resolve_tls`] checks as it resolves them).
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |m: String| Err(ConfigError::Invalid(m));
        if self.stores.is_empty() {
            return invalid("no [[stores]] configured".to_owned());
        }
        let mut seen = BTreeSet::new();
        for (n, store) in (1..).zip(&self.stores) {
            // Not quoted back: what is not an id may be a value pasted in the wrong place.
            if !is_store_id(&store.id) {
                return invalid(format!(
                    "the id of [[stores]] number {n} must be 1 to 64 letters, digits, '-' and '_'"
                ));
            }
            if !seen.insert(store.id.as_str()) {
                return invalid(format!("store id {:?} is configured twice", store.id));
            }
            if store.max_connections == 0 {
                return invalid(format!("store {:?}: max_connections must be > 0", store.id));
            }
            StoreUrl::parse(&store.url)
                .map_err(|e| ConfigError::Invalid(format!("store {:?}: {e}", store.id)))?;
        }
        if !seen.contains(self.default_store.as_str()) {
            let named = if is_store_id(&self.default_store) {
                format!("default_store {:?}", self.default_store)
            } else {
                "default_store (not a store id)".to_owned()
            };
            return invalid(format!(
                "{named} is not one of the configured stores ({})",
                seen.into_iter().collect::<Vec<_>>().join(", ")
            ));
        }
        StoreUrl::parse(&self.control_url)
            .map_err(|e| ConfigError::Invalid(format!("control_url: {e}")))?;
        let p = &self.proxy;
        for (name, value) in [
            ("proxy.max_body_bytes", p.max_body_bytes as u64),
            (
                "proxy.max_events_per_append",
                p.max_events_per_append as u64,
            ),
            ("proxy.max_field_bytes", p.max_field_bytes as u64),
            ("proxy.mirror_queue_bytes", p.mirror_queue_bytes as u64),
            ("proxy.request_timeout_ms", as_millis(p.request_timeout)),
            (
                "proxy.max_concurrent_requests",
                p.max_concurrent_requests as u64,
            ),
            ("proxy.routing_poll_ms", as_millis(p.routing_poll)),
            (
                "proxy.header_read_timeout_ms",
                as_millis(p.header_read_timeout),
            ),
            ("proxy.keep_alive_idle_ms", as_millis(p.keep_alive_idle)),
            ("proxy.body_read_timeout_ms", as_millis(p.body_read_timeout)),
            ("proxy.max_connections", p.max_connections as u64),
            ("proxy.data_tokens_poll_ms", as_millis(p.data_tokens_poll)),
            (
                "control.cutover_timeout_ms",
                as_millis(self.control.cutover_timeout),
            ),
            ("control.batch_size", u64::from(self.control.batch_size)),
            (
                "control.cleanup_batch_size",
                u64::from(self.control.cleanup_batch_size),
            ),
        ] {
            if value == 0 {
                return invalid(format!("{name} must be > 0"));
            }
        }
        let hours = self.control.reverse_replication_hours;
        if !(hours.is_finite() && hours >= 0.0) {
            return invalid(format!(
                "control.reverse_replication_hours = {hours} must be 0 (never) or more"
            ));
        }
        if self.control.cleanup_pause > MAX_CLEANUP_PAUSE {
            return invalid(format!(
                "control.cleanup_pause_ms must be at most {} (a cleanup's claim is renewed \
                 between batches)",
                MAX_CLEANUP_PAUSE.as_millis()
            ));
        }
        if p.mirror_queue_bytes < p.max_body_bytes {
            return invalid(format!(
                "proxy.mirror_queue_bytes ({}) must be at least proxy.max_body_bytes ({}): a \
                 largest append would never fit in a mirror queue",
                p.mirror_queue_bytes, p.max_body_bytes
            ));
        }
        if !(p.migrating_tenant_share > 0.0 && p.migrating_tenant_share <= 1.0) {
            return invalid(format!(
                "proxy.migrating_tenant_share = {} must be more than 0 and at most 1",
                p.migrating_tenant_share
            ));
        }
        if p.max_header_bytes < MIN_HEADER_BYTES {
            return invalid(format!(
                "proxy.max_header_bytes must be at least {MIN_HEADER_BYTES}"
            ));
        }
        if p.tls_cert_path.is_none() != p.tls_key_path.is_none() {
            return invalid(
                "proxy.tls_cert_path and proxy.tls_key_path must be set together".to_owned(),
            );
        }
        if p.tls_client_ca_path.is_some() && p.tls_cert_path.is_none() {
            return invalid(
                "proxy.tls_client_ca_path needs proxy.tls_cert_path and proxy.tls_key_path \
                 (client certificates are asked for in the TLS handshake)"
                    .to_owned(),
            );
        }
        if p.admin_token.is_empty() && !p.admin_listen.ip().is_loopback() {
            return invalid(format!(
                "proxy.admin_listen = \"{}\" is not a loopback address and proxy.admin_token is \
                 empty: anyone who can reach it could reload routing or resume writes; set \
                 proxy.admin_token (SWITCHYARD_PROXY_ADMIN_TOKEN) or bind it to 127.0.0.1",
                p.admin_listen
            ));
        }
        let c = &self.control;
        if c.admin_token.is_empty() && !c.admin_listen.ip().is_loopback() {
            return invalid(format!(
                "control.admin_listen = \"{}\" is not a loopback address and control.admin_token \
                 is empty: anyone who can reach it could change serve's log level; set \
                 control.admin_token (SWITCHYARD_CONTROL_ADMIN_TOKEN) or bind it to 127.0.0.1",
                c.admin_listen
            ));
        }
        Ok(())
    }

    pub fn store(&self, id: &str) -> Option<&StoreConfig> {
        self.stores.iter().find(|s| s.id == id)
    }

    /// The configuration as TOML with every secret replaced, for `check-config` and logs.
    pub fn redacted_toml(&self) -> String {
        let mut copy = self.clone();
        copy.control_url = crate::url::redact(&copy.control_url);
        if !copy.proxy.admin_token.is_empty() {
            copy.proxy.admin_token = "<redacted>".to_owned();
        }
        if !copy.control.admin_token.is_empty() {
            copy.control.admin_token = "<redacted>".to_owned();
        }
        for store in &mut copy.stores {
            store.url = crate::url::redact(&store.url);
        }
        toml::to_string_pretty(&copy).unwrap_or_else(|e| format!("# unprintable: {e}"))
    }
}

/// The names of the control database's TLS keys, and a store's, for errors.
const CONTROL_TLS_KEYS: Keys<'static> = Keys {
    url: "control_url",
    sslmode: "control_sslmode",
    ssl_root_cert: "control_ssl_root_cert",
};
const STORE_TLS_KEYS: Keys<'static> = Keys {
    url: "url",
    sslmode: "sslmode",
    ssl_root_cert: "ssl_root_cert",
};

/// Resolves one database's TLS settings ([`crate::tls::resolve`], its error after `context`,
/// which store) and writes them into its URL and keys.
fn resolve_tls_of(
    url: &mut String,
    sslmode: &mut String,
    ssl_root_cert: &mut String,
    keys: Keys<'_>,
    context: &str,
) -> Result<(), ConfigError> {
    let resolved = crate::tls::resolve(url, sslmode, ssl_root_cert, keys)
        .map_err(|e| ConfigError::Invalid(format!("{context}{e}")))?;
    if let Some(tls) = resolved {
        *url = crate::tls::with_tls(url, &tls);
        *sslmode = tls.mode.as_str().to_owned();
        *ssl_root_cert = tls.root_cert.unwrap_or_default();
    }
    Ok(())
}

/// A duration as the whole milliseconds its key counts (saturating; for messages and checks).
fn as_millis(duration: Duration) -> u64 {
    u64::try_from(duration.as_millis()).unwrap_or(u64::MAX)
}

/// A `…_ms` key: whole milliseconds in the file and the environment, a [`Duration`] in the
/// program. Read as a `u64`, so a bad value is refused as before the type changed.
mod millis {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        value: &Duration,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_u64(super::as_millis(*value))
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Duration, D::Error> {
        u64::deserialize(deserializer).map(Duration::from_millis)
    }
}

/// A listen key: an `address:port` string in the file and the environment, a [`SocketAddr`]
/// in the program. A string that is not one is refused while the file (or the environment)
/// is read, with the key named: `proxy.listen is not an address:port (…)`, never the value.
mod socket_addr {
    use std::net::SocketAddr;

    use serde::de::Error as _;
    use serde::{Deserialize, Deserializer, Serializer};

    fn serialize<S: Serializer>(value: &SocketAddr, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(value)
    }

    fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
        key: &str,
    ) -> Result<SocketAddr, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse()
            .map_err(|e| D::Error::custom(format!("{key} is not an address:port ({e})")))
    }

    /// One serde module per key, so the error names it in full (serde does not tell a field's
    /// deserializer its name).
    macro_rules! listen_key {
        ($module:ident, $key:literal) => {
            pub(crate) mod $module {
                use std::net::SocketAddr;

                use serde::{Deserializer, Serializer};

                pub(crate) fn serialize<S: Serializer>(
                    value: &SocketAddr,
                    serializer: S,
                ) -> Result<S::Ok, S::Error> {
                    super::serialize(value, serializer)
                }

                pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
                    deserializer: D,
                ) -> Result<SocketAddr, D::Error> {
                    super::deserialize(deserializer, $key)
                }
            }
        };
    }

    listen_key!(proxy_listen, "proxy.listen");
    listen_key!(proxy_admin_listen, "proxy.admin_listen");
    listen_key!(control_admin_listen, "control.admin_listen");
}

/// A path key: a string in the file and the environment, where empty means none (so
/// `SWITCHYARD_PROXY_TLS_CERT_PATH=` unsets it and `check-config` prints it as `""`).
mod optional_path {
    use std::path::PathBuf;

    use serde::{Deserialize, Deserializer, Serializer};

    pub(crate) fn serialize<S: Serializer>(
        value: &Option<PathBuf>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(
            &value
                .as_deref()
                .map(|p| p.to_string_lossy())
                .unwrap_or_default(),
        )
    }

    pub(crate) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Option<PathBuf>, D::Error> {
        String::deserialize(deserializer).map(|s| (!s.is_empty()).then(|| PathBuf::from(s)))
    }
}

/// The smallest head buffer the HTTP/1 server accepts.
pub const MIN_HEADER_BYTES: usize = 8192;

/// The longest `control.cleanup_pause_ms`: a cleanup renews its claim between batches, so a
/// pause must stay well inside the claim's lease.
pub const MAX_CLEANUP_PAUSE: Duration = Duration::from_secs(60);

/// The secret the config oracle plants: `#` and `@` keep it from being a bare TOML key or a
/// store id, so it can only be a value (or a quoted key).
#[doc(hidden)]
pub const ORACLE_SECRET: &str = "Mk#s3cr3t@pw";

/// [`Config::from_parts`] on arbitrary file bytes, for the fuzz target `load_config` and the
/// property tests: panics unless it returns, and an error's text holds [`ORACLE_SECRET`] (as
/// written or percent-encoded) nowhere, whether the file holds it or `${PW}` expands to it.
/// The environment also sets `proxy.admin_token` to it.
#[doc(hidden)]
pub fn check_load_config(bytes: &[u8]) {
    let text = String::from_utf8_lossy(bytes);
    let vars = [
        ("PW".to_owned(), ORACLE_SECRET.to_owned()),
        (
            "SWITCHYARD_PROXY_ADMIN_TOKEN".to_owned(),
            ORACLE_SECRET.to_owned(),
        ),
    ];
    if let Err(e) = Config::from_parts(Some(&text), Some(Path::new("fuzz.toml")), &vars) {
        let message = e.to_string();
        for secret in [ORACLE_SECRET.to_owned(), percent_encode(ORACLE_SECRET)] {
            assert!(
                !message.contains(&secret),
                "the error echoes the secret: {message}"
            );
        }
    }
}

/// 1 to 64 letters, digits, `-` and `_`.
fn is_store_id(id: &str) -> bool {
    (1..=64).contains(&id.len())
        && id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// `dedicated-a` → `DEDICATED_A`.
fn env_name(id: &str) -> String {
    id.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_uppercase()
            } else {
                '_'
            }
        })
        .collect()
}

/// Finds the scalar that `KEY` or `SECTION_KEY` names, case-insensitively.
fn find_env_slot<'a>(
    table: &'a mut toml::map::Map<String, toml::Value>,
    key: &str,
) -> Option<&'a mut toml::Value> {
    let mut found: Option<(String, Option<String>)> = None;
    for (name, value) in table.iter() {
        match value {
            toml::Value::Table(inner) => {
                for inner_name in inner.keys() {
                    if format!("{}_{}", env_name(name), env_name(inner_name)) == key {
                        found = Some((name.clone(), Some(inner_name.clone())));
                    }
                }
            }
            toml::Value::Array(_) => {}
            _ => {
                if env_name(name) == key {
                    found = Some((name.clone(), None));
                }
            }
        }
    }
    let (outer, inner) = found?;
    let slot = table.get_mut(&outer)?;
    match inner {
        Some(inner) => slot.as_table_mut()?.get_mut(&inner),
        None => Some(slot),
    }
}

fn parse_like(existing: &toml::Value, text: &str) -> Result<toml::Value, String> {
    match existing {
        toml::Value::Integer(_) => text
            .trim()
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| "is not a whole number".to_owned()),
        toml::Value::Float(_) => text
            .trim()
            .parse::<f64>()
            .map(toml::Value::Float)
            .map_err(|_| "is not a number".to_owned()),
        toml::Value::Boolean(_) => match text.trim() {
            "true" | "1" | "yes" => Ok(toml::Value::Boolean(true)),
            "false" | "0" | "no" => Ok(toml::Value::Boolean(false)),
            _ => Err("is not true or false".to_owned()),
        },
        _ => Ok(toml::Value::String(text.to_owned())),
    }
}

/// Expands `${VAR}` from the environment; an unset variable is an error (never an empty secret).
///
/// In a URL, a value that lands in the userinfo (`postgres://${USER}:${PASSWORD}@host/db`) or
/// in a query parameter's value (`?password=${PASSWORD}`) is percent-encoded, so a password
/// holding `@`, `:`, `/`, `?`, `#`, `%` or `&` stays one password; elsewhere (a whole URL, a
/// host, a path) the value is spliced as written. Errors name `field`, never its value.
fn expand(
    value: &str,
    vars: &[(String, String)],
    field: &str,
    url: bool,
) -> Result<String, ConfigError> {
    let encoded = if url {
        encoded_ranges(value)
    } else {
        Vec::new()
    };
    let mut out = String::with_capacity(value.len());
    let mut at = 0;
    while let Some(found) = value[at..].find("${") {
        let start = at + found;
        out.push_str(&value[at..start]);
        let end = value[start + 2..]
            .find('}')
            .map(|e| start + 2 + e)
            .ok_or_else(|| ConfigError::Invalid(format!("{field}: a ${{ is not closed by }}")))?;
        let name = &value[start + 2..end];
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            // Not quoted back: it is no variable name, and may be the secret itself.
            return Err(ConfigError::Invalid(format!(
                "{field}: a ${{…}} holds no variable name (letters, digits and '_')"
            )));
        }
        let found = vars
            .iter()
            .find(|(k, _)| k == name)
            .ok_or_else(|| ConfigError::Env {
                var: name.to_owned(),
                message: "is referenced as ${…} in the config but is not set".to_owned(),
            })?;
        if encoded.iter().any(|r| r.contains(&start)) {
            out.push_str(&percent_encode(&found.1));
        } else {
            out.push_str(&found.1);
        }
        at = end + 1;
    }
    out.push_str(&value[at..]);
    Ok(out)
}

/// Where in a URL template a value must be percent-encoded: the userinfo (up to the
/// authority's last `@`) and each query parameter's value. Found on the template, whose
/// `${NAME}` placeholders hold none of `/?#@&=`.
fn encoded_ranges(template: &str) -> Vec<std::ops::Range<usize>> {
    let mut ranges = Vec::new();
    let Some(scheme_end) = template.find("://") else {
        return ranges;
    };
    let authority_start = scheme_end + 3;
    let authority_end = template[authority_start..]
        .find(['/', '?', '#'])
        .map_or(template.len(), |e| authority_start + e);
    if let Some(at) = template[authority_start..authority_end].rfind('@') {
        ranges.push(authority_start..authority_start + at);
    }
    if let Some(q) = template.find('?') {
        let query_end = template[q..].find('#').map_or(template.len(), |e| q + e);
        let mut pair_start = q + 1;
        for pair in template[q + 1..query_end].split('&') {
            if let Some(eq) = pair.find('=') {
                ranges.push(pair_start + eq + 1..pair_start + pair.len());
            }
            pair_start += pair.len() + 1;
        }
    }
    ranges
}

/// Percent-encodes every byte but RFC 3986's unreserved characters.
fn percent_encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || matches!(byte, b'-' | b'.' | b'_' | b'~') {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

/// A TOML error as line, column and the parser's reason, without the offending line (which
/// `toml`'s own message quotes: a URL with its password) and without quoted values.
fn parse_message(e: &toml::de::Error, text: &str) -> String {
    let reason = without_values(e.message());
    match e.span() {
        Some(span) => {
            let before = text.get(..span.start).unwrap_or(text);
            let line_start = before.rfind('\n').map_or(0, |n| n + 1);
            let line = before.matches('\n').count() + 1;
            let column = before.len() - line_start + 1;
            // The key the error is at (a name, never a value): the line's text before its '='.
            let key = before[line_start..]
                .split_once('=')
                .map(|(key, _)| key.trim())
                .filter(|key| {
                    !key.is_empty()
                        && key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                });
            match key {
                Some(key) => format!("line {line}, column {column}, at `{key}`: {reason}"),
                None => format!("line {line}, column {column}: {reason}"),
            }
        }
        None => reason,
    }
}

/// A parser's message with every quoted part (`"…"`, `'…'`: serde quotes the values it
/// refuses) replaced by `"…"`; key names, which serde puts in backticks, stay when they are
/// bare keys (a quoted key such as `"postgres://u:pw@h/db" = 1`, unknown or duplicate, is
/// likelier a misplaced value than a name).
fn without_values(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    for (i, part) in without_quoted(message).split('`').enumerate() {
        if i > 0 {
            out.push('`');
        }
        let named = i % 2 == 1;
        let bare = part
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'));
        out.push_str(if named && !bare { "…" } else { part });
    }
    out
}

fn without_quoted(message: &str) -> String {
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some(open) = rest.find(['"', '\'']) {
        out.push_str(&rest[..open]);
        out.push_str("\"…\"");
        let quote = &rest[open..=open];
        match rest[open + 1..].find(quote) {
            Some(close) => rest = &rest[open + 1 + close + 1..],
            // An unclosed quote: drop the rest rather than risk showing a value.
            None => return out,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn no_file_is_the_embedded_default() {
        let c = Config::from_parts(None, None, &[]).expect("defaults are valid");
        assert_eq!(c.default_store, "shared");
        assert_eq!(c.stores.len(), 2);
        assert!(c.control_url.starts_with("sqlite://switchyard-data/"));
        assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:7070");
    }

    #[test]
    fn exposed_admin_ports_need_a_token() {
        for (key, token_key) in [
            (
                "SWITCHYARD_PROXY_ADMIN_LISTEN",
                "SWITCHYARD_PROXY_ADMIN_TOKEN",
            ),
            (
                "SWITCHYARD_CONTROL_ADMIN_LISTEN",
                "SWITCHYARD_CONTROL_ADMIN_TOKEN",
            ),
        ] {
            let err = Config::from_parts(None, None, &vars(&[(key, "0.0.0.0:7999")]))
                .expect_err("exposed without a token");
            assert!(err.to_string().contains("not a loopback address"), "{err}");
            Config::from_parts(
                None,
                None,
                &vars(&[(key, "0.0.0.0:7999"), (token_key, "t")]),
            )
            .expect("exposed with a token");
            Config::from_parts(None, None, &vars(&[(key, "127.0.0.1:7999")]))
                .expect("loopback without a token");
        }
    }

    #[test]
    fn an_exposed_data_plane_needs_authentication() {
        let exposed = ("SWITCHYARD_PROXY_LISTEN", "0.0.0.0:7070");
        let load = |extra: &[(&str, &str)]| {
            let mut all = vec![exposed];
            all.extend_from_slice(extra);
            Config::from_parts(None, None, &vars(&all)).expect("valid config")
        };
        let refusal = load(&[]).proxy.unauthenticated_exposure().expect("refused");
        assert!(
            refusal.contains("0.0.0.0:7070") && refusal.contains("allow_unauthenticated"),
            "{refusal}"
        );
        for allowed in [
            ("SWITCHYARD_PROXY_ALLOW_UNAUTHENTICATED", "true"),
            (
                "SWITCHYARD_PROXY_DATA_TOKENS_FILE",
                "/etc/switchyard/data-tokens",
            ),
        ] {
            assert_eq!(load(&[allowed]).proxy.unauthenticated_exposure(), None);
        }
        let loopback = Config::from_parts(None, None, &[]).expect("defaults");
        assert_eq!(loopback.proxy.unauthenticated_exposure(), None);
        // Client certificates are asked for in the TLS handshake: no TLS, no client CA.
        let err = Config::from_parts(
            None,
            None,
            &vars(&[("SWITCHYARD_PROXY_TLS_CLIENT_CA_PATH", "/etc/ca.pem")]),
        )
        .expect_err("a client CA without TLS");
        assert!(err.to_string().contains("tls_client_ca_path"), "{err}");
        let with_tls = Config::from_parts(
            None,
            None,
            &vars(&[
                exposed,
                ("SWITCHYARD_PROXY_TLS_CERT_PATH", "/c.pem"),
                ("SWITCHYARD_PROXY_TLS_KEY_PATH", "/k.pem"),
                ("SWITCHYARD_PROXY_TLS_CLIENT_CA_PATH", "/ca.pem"),
            ]),
        )
        .expect("mutual TLS");
        assert_eq!(with_tls.proxy.unauthenticated_exposure(), None);
    }

    /// `…_ms` keys become [`Duration`]s and path keys `Option<PathBuf>`s, from the file and the
    /// environment alike, and print back under the same keys.
    #[test]
    fn durations_and_paths_are_typed_under_their_keys() {
        let c = Config::from_parts(
            Some("[proxy]\ngate_wait_ms = 250\ntls_cert_path = \"/c.pem\"\ntls_key_path = \"/k.pem\"\n[control]\ncutover_timeout_ms = 1500\n"),
            None,
            &vars(&[
                ("SWITCHYARD_PROXY_ROUTING_POLL_MS", "40"),
                ("SWITCHYARD_PROXY_DATA_TOKENS_FILE", "/etc/tokens"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.proxy.gate_wait, Duration::from_millis(250));
        assert_eq!(c.proxy.routing_poll, Duration::from_millis(40));
        assert_eq!(c.control.cutover_timeout, Duration::from_millis(1500));
        assert_eq!(c.proxy.tls_cert_path, Some(PathBuf::from("/c.pem")));
        assert_eq!(c.proxy.data_tokens_file, Some(PathBuf::from("/etc/tokens")));
        assert_eq!(c.proxy.tls_client_ca_path, None);
        let printed = c.redacted_toml();
        for line in [
            "gate_wait_ms = 250",
            "routing_poll_ms = 40",
            "cutover_timeout_ms = 1500",
            "tls_cert_path = \"/c.pem\"",
            "tls_client_ca_path = \"\"",
        ] {
            assert!(printed.contains(line), "{line} in {printed}");
        }
        let reread = Config::from_parts(Some(&printed), None, &[]).expect("reads back");
        assert_eq!(reread, c);
        let d = Config::default();
        assert_eq!(d.proxy.shutdown_grace, Duration::from_secs(10));
        assert_eq!(d.proxy.data_tokens_file, None);
    }

    /// The key table of docs/reliability.md ("Proxy settings this document refers to") gives
    /// the defaults these structs have.
    #[test]
    fn the_documented_proxy_defaults_are_the_defaults() {
        let doc = std::fs::read_to_string(
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/reliability.md"),
        )
        .expect("docs/reliability.md");
        let toml::Value::Table(defaults) =
            toml::Value::try_from(ProxyConfig::default()).expect("serialises")
        else {
            panic!("a struct serialises to a table");
        };
        let section = doc
            .split("## Proxy settings this document refers to")
            .nth(1)
            .and_then(|rest| rest.split("\n## ").next())
            .expect("the section");
        let mut checked = 0;
        for row in section.lines().filter(|l| l.starts_with("| `")) {
            let cells: Vec<&str> = row.split(" | ").collect();
            let keys: Vec<&str> = cells[0].split('`').skip(1).step_by(2).collect();
            let shown: Vec<&str> = cells[1].split(", ").collect();
            for (n, key) in keys.iter().enumerate() {
                let value = defaults
                    .get(*key)
                    .unwrap_or_else(|| panic!("{key} is no key"));
                // A default cell is the value, maybe with a note: `0 (off)`, `16384 (min 8192)`.
                let cell = shown.get(n).or(shown.first()).expect("a default");
                let first = cell.split(' ').next().unwrap_or_default();
                let expected = match value {
                    toml::Value::String(text) if text.is_empty() => "empty".to_owned(),
                    other => other.to_string(),
                };
                assert_eq!(first, expected, "{key}: the docs say {cell:?}");
                checked += 1;
            }
        }
        assert!(checked >= 15, "only {checked} keys found in the table");
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = Config::from_parts(Some("[proxy]\nlisten_addr = \"x\"\n"), None, &[])
            .expect_err("unknown key");
        assert!(err.to_string().contains("listen_addr"), "{err}");
        let err = Config::from_parts(Some("colour = 1\n"), None, &[]).expect_err("unknown key");
        assert!(err.to_string().contains("colour"), "{err}");
    }

    #[test]
    fn env_overrides_sections_top_level_and_store_urls() {
        let text = r#"
control_url = "postgres://postgres@127.0.0.1/control"
default_store = "shared"
[[stores]]
id = "shared"
url = "postgres://postgres@127.0.0.1/a"
[[stores]]
id = "dedicated-a"
url = "postgres://postgres@127.0.0.1/b"
"#;
        let c = Config::from_parts(
            Some(text),
            None,
            &vars(&[
                ("SWITCHYARD_PROXY_LISTEN", "127.0.0.1:9000"),
                ("SWITCHYARD_PROXY_GATE_WAIT_MS", "250"),
                ("SWITCHYARD_PROXY_ROUTING_LISTEN", "false"),
                ("SWITCHYARD_CONTROL_BATCH_SIZE", "7"),
                ("SWITCHYARD_DEFAULT_STORE", "dedicated-a"),
                ("SWITCHYARD_STORE_DEDICATED_A_URL", "postgres://u:${PW}@h/b"),
                ("PW", "s3cret"),
                ("SWITCHYARD_CONFIG", "ignored.toml"),
            ]),
        )
        .expect("valid");
        assert_eq!(c.proxy.listen.to_string(), "127.0.0.1:9000");
        assert_eq!(c.proxy.gate_wait, Duration::from_millis(250));
        assert!(!c.proxy.routing_listen);
        assert_eq!(c.control.batch_size, 7);
        assert_eq!(c.default_store, "dedicated-a");
        assert_eq!(
            c.store("dedicated-a").map(|s| s.url.as_str()),
            Some("postgres://u:s3cret@h/b")
        );
        assert!(!c.redacted_toml().contains("s3cret"));
    }

    #[test]
    fn bad_env_values_and_names_are_errors() {
        let err = Config::from_parts(
            None,
            None,
            &vars(&[("SWITCHYARD_PROXY_GATE_WAIT_MS", "soon")]),
        )
        .expect_err("not a number");
        assert!(
            err.to_string().contains("SWITCHYARD_PROXY_GATE_WAIT_MS"),
            "{err}"
        );
        let err = Config::from_parts(None, None, &vars(&[("SWITCHYARD_PROXY_LISTN", "x")]))
            .expect_err("typo");
        assert!(err.to_string().contains("LISTN"), "{err}");
        let err = Config::from_parts(None, None, &vars(&[("SWITCHYARD_STORE_NOPE_URL", "x")]))
            .expect_err("no such store");
        assert!(err.to_string().contains("NOPE"), "{err}");
    }

    #[test]
    fn the_migrating_tenant_share_is_a_fraction_from_file_or_env() {
        assert!((Config::default().proxy.migrating_tenant_share - 0.5).abs() < f64::EPSILON);
        let c = Config::from_parts(Some("[proxy]\nmigrating_tenant_share = 0.25\n"), None, &[])
            .expect("valid");
        assert!((c.proxy.migrating_tenant_share - 0.25).abs() < f64::EPSILON);
        let c = Config::from_parts(
            None,
            None,
            &vars(&[("SWITCHYARD_PROXY_MIGRATING_TENANT_SHARE", "1")]),
        )
        .expect("valid");
        assert!((c.proxy.migrating_tenant_share - 1.0).abs() < f64::EPSILON);
        for bad in ["0", "1.5", "-0.1", "NaN", "half"] {
            let err = Config::from_parts(
                None,
                None,
                &vars(&[("SWITCHYARD_PROXY_MIGRATING_TENANT_SHARE", bad)]),
            )
            .expect_err(bad);
            assert!(
                err.to_string().contains("MIGRATING_TENANT_SHARE")
                    || err.to_string().contains("migrating_tenant_share"),
                "{bad}: {err}"
            );
        }
    }

    /// A secret in a file that does not parse, in a value of the wrong type, in an environment
    /// override of the wrong type or in an unclosed `${` never reaches the error.
    #[test]
    fn quoted_keys_are_not_echoed() {
        for text in [
            format!("\"{SECRET_KEY}\" = 1\n"),
            format!("\"{SECRET_KEY}\" = 1\n\"{SECRET_KEY}\" = 2\n"),
        ] {
            let err = Config::from_parts(Some(&text), None, &[])
                .expect_err(&text)
                .to_string();
            assert!(!err.contains(SECRET_KEY), "{err}");
            assert!(err.contains("`…`"), "{err}");
        }
        let err = Config::from_parts(Some("colour = 1\n"), None, &[]).expect_err("unknown");
        assert!(
            err.to_string().contains("`colour`"),
            "bare names stay: {err}"
        );
    }

    const SECRET_KEY: &str = "postgres://u:pw@h/db";

    #[test]
    fn errors_never_echo_values() {
        const SECRET: &str = "hunter2-Sup3rSecret";
        let cases = [
            format!("control_url = \"postgres://u:{SECRET}@h/db\"\nstores = oops\n"),
            format!("control_url = \"postgres://u:{SECRET}@h/db\n"),
            format!("[[stores]]\nid = \"s\"\nurl = \"postgres://h/db\"\nmax_connections = \"{SECRET}\"\n"),
            format!("[proxy]\nadmin_token = \"${{TOKEN{SECRET}\"\n"),
        ];
        for text in &cases {
            let err = Config::from_parts(Some(text), Some(Path::new("s.toml")), &[])
                .expect_err(text)
                .to_string();
            assert!(!err.contains(SECRET), "{text}: {err}");
            assert!(err.contains("line") || err.contains("admin_token"), "{err}");
        }
        let err = Config::from_parts(Some(&cases[2]), None, &[]).expect_err("a string");
        assert!(err.to_string().contains("at `max_connections`"), "{err}");
        let err = Config::from_parts(
            None,
            None,
            &vars(&[("SWITCHYARD_PROXY_GATE_WAIT_MS", SECRET)]),
        )
        .expect_err("not a number")
        .to_string();
        assert!(!err.contains(SECRET), "{err}");
    }

    /// A password holding URL delimiters stays one password, in the userinfo and in the query.
    #[test]
    fn expansion_percent_encodes_userinfo_and_query_values() {
        let env = vars(&[
            ("PW", "p@ss:w/rd?#%&x"),
            ("USER", "me@corp"),
            ("URL", "postgres://a:b@h/whole"),
            ("HOST", "db.internal:5433"),
        ]);
        let text = r#"
control_url = "${URL}"
[[stores]]
id = "shared"
url = "postgres://${USER}:${PW}@${HOST}/db?sslmode=require&password=${PW}"
"#;
        let c = Config::from_parts(Some(text), None, &env).expect("valid");
        assert_eq!(c.control_url, "postgres://a:b@h/whole");
        let url = &c.stores[0].url;
        assert_eq!(
            url,
            "postgres://me%40corp:p%40ss%3Aw%2Frd%3F%23%25%26x@db.internal:5433/db?sslmode=require&password=p%40ss%3Aw%2Frd%3F%23%25%26x"
        );
        let parsed = ::url::Url::parse(url).expect("parses");
        assert_eq!(parsed.host_str(), Some("db.internal"));
        assert_eq!(parsed.port(), Some(5433));
        assert_eq!(parsed.username(), "me%40corp");
        let password = parsed.password().expect("has one");
        assert_eq!(password, "p%40ss%3Aw%2Frd%3F%23%25%26x");
        assert!(!crate::url::redact(url).contains("p%40ss"));
        // Tokens are not URLs: spliced as written.
        let c = Config::from_parts(Some("[proxy]\nadmin_token = \"${PW}\"\n"), None, &env)
            .expect("valid");
        assert_eq!(c.proxy.admin_token, "p@ss:w/rd?#%&x");
    }

    /// The TLS keys, from the file and the environment, end up in the URL the driver reads;
    /// what cannot work is refused naming the key, never the URL.
    #[test]
    fn tls_keys_are_checked_and_written_into_the_url() {
        let ca = std::env::temp_dir().join(format!("switchyard-ca-{}.pem", uuid::Uuid::new_v4()));
        std::fs::write(
            &ca,
            "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n",
        )
        .expect("temp file");
        let ca = ca.display().to_string();
        let text = format!(
            r#"
control_url = "postgres://u:s3cret@db/control"
[[stores]]
id = "shared"
url = "postgres://u:s3cret@db/a?application_name=x"
sslmode = "verify-full"
ssl_root_cert = "{ca}"
[[stores]]
id = "dedicated-a"
url = "postgres://u:s3cret@db/b"
"#
        );
        let c = Config::from_parts(
            Some(&text),
            None,
            &vars(&[
                ("SWITCHYARD_CONTROL_SSLMODE", "require"),
                ("SWITCHYARD_CONTROL_SSL_ROOT_CERT", &ca),
                ("SWITCHYARD_STORE_DEDICATED_A_SSLMODE", "require"),
            ]),
        )
        .expect("valid");
        let encoded = ca.replace('/', "%2F");
        assert_eq!(
            c.stores[0].url,
            format!("postgres://u:s3cret@db/a?application_name=x&sslmode=verify-full&sslrootcert={encoded}")
        );
        // libpq's rule: require with a CA file checks the chain.
        assert_eq!(c.control_sslmode, "verify-ca");
        assert_eq!(
            c.control_url,
            format!("postgres://u:s3cret@db/control?sslmode=verify-ca&sslrootcert={encoded}")
        );
        assert_eq!(c.stores[1].url, "postgres://u:s3cret@db/b?sslmode=require");
        let mut again = c.clone();
        again.resolve_tls().expect("resolving again agrees");
        assert_eq!(again, c);

        let store = |lines: &str| {
            format!("[[stores]]\nid = \"shared\"\nurl = \"postgres://u:s3cret@db/a\"\n{lines}")
        };
        let cases = [
            (
                store("sslmode = \"verify-full\"\n"),
                "store \"shared\": sslmode verify-full checks the server's certificate against a \
                 CA: set ssl_root_cert",
            ),
            (
                "control_url = \"postgres://u:s3cret@db/c?sslmode=verify-ca\"\n".to_owned(),
                "set control_ssl_root_cert",
            ),
            (
                store("sslmode = \"verify-full\"\nssl_root_cert = \"/nonexistent/ca.pem\"\n"),
                "ssl_root_cert: cannot read the CA file \"/nonexistent/ca.pem\"",
            ),
            (
                store(&format!("ssl_root_cert = \"{ca}\"\n")),
                "ssl_root_cert is set but sslmode prefer never checks",
            ),
            (store("sslmode = \"verify_full\"\n"), "sslmode must be disable, prefer"),
            (
                "[[stores]]\nid = \"shared\"\nurl = \"postgres://u:s3cret@db/a?sslmode=disable\"\nsslmode = \"require\"\n".to_owned(),
                "sslmode = \"require\" but url says sslmode=disable",
            ),
            (
                "[[stores]]\nid = \"shared\"\nurl = \"sqlite://a.db\"\nsslmode = \"require\"\n".to_owned(),
                "sslmode applies to PostgreSQL only",
            ),
        ];
        for (text, needle) in &cases {
            let err = Config::from_parts(Some(text), None, &[])
                .expect_err(text)
                .to_string();
            assert!(err.contains(needle), "{text}: {err}");
            assert!(!err.contains("s3cret"), "{err}");
        }
        let typo = vars(&[("SWITCHYARD_STORE_SHARED_SSL_MODE", "x")]);
        let err = Config::from_parts(None, None, &typo).expect_err("typo");
        assert!(err.to_string().contains("SHARED_SSL_MODE"), "{err}");
    }

    #[test]
    fn a_listen_key_that_is_no_address_is_refused_at_load_naming_the_key() {
        for (key, var) in [
            ("proxy.listen", "SWITCHYARD_PROXY_LISTEN"),
            ("proxy.admin_listen", "SWITCHYARD_PROXY_ADMIN_LISTEN"),
            ("control.admin_listen", "SWITCHYARD_CONTROL_ADMIN_LISTEN"),
        ] {
            let (section, name) = key.split_once('.').expect("a dotted key");
            let text = format!("[{section}]\n{name} = \"localhost:70x\"\n");
            let err = Config::from_parts(Some(&text), None, &[]).expect_err(key);
            let message = err.to_string();
            assert!(
                message.contains(&format!("{key} is not an address:port")),
                "{message}"
            );
            assert!(
                !message.contains("localhost"),
                "echoes the value: {message}"
            );
            let env = vars(&[(var, "localhost:70x")]);
            let err = Config::from_parts(None, None, &env).expect_err(var);
            assert!(
                err.to_string()
                    .contains(&format!("{key} is not an address:port")),
                "{err}"
            );
        }
        let env = vars(&[("SWITCHYARD_CONTROL_ADMIN_LISTEN", "[::1]:9")]);
        let c = Config::from_parts(None, None, &env).expect("an IPv6 loopback address");
        assert_eq!(
            c.control.admin_listen,
            SocketAddr::from(([0, 0, 0, 0, 0, 0, 0, 1], 9))
        );
    }

    #[test]
    fn validation_names_the_problem() {
        let cases = [
            ("default_store = \"nope\"\n", "default_store"),
            ("[proxy]\nlisten = \"localhost\"\n", "proxy.listen"),
            ("[proxy]\nmax_body_bytes = 0\n", "max_body_bytes"),
            ("[[stores]]\nid = \"shared\"\nurl = \"mysql://x\"\n", "shared"),
            (
                "[[stores]]\nid = \"shared\"\nurl = \"sqlite://a\"\n[[stores]]\nid = \"shared\"\nurl = \"sqlite://b\"\n",
                "twice",
            ),
            ("control_url = \"postgres://${UNSET_VAR_FOR_TEST}@h/db\"\n", "UNSET_VAR_FOR_TEST"),
            ("[proxy]\nadmin_listen = \"0.0.0.0:7071\"\n", "admin_token"),
            ("[proxy]\nmax_header_bytes = 100\n", "max_header_bytes"),
            ("[proxy]\nmirror_queue_bytes = 0\n", "mirror_queue_bytes"),
            (
                "[proxy]\nmax_body_bytes = 2048\nmirror_queue_bytes = 1024\n",
                "at least proxy.max_body_bytes",
            ),
            ("[proxy]\ntls_cert_path = \"c.pem\"\n", "tls_key_path"),
        ];
        for (text, needle) in cases {
            let err = Config::from_parts(Some(text), None, &[]).expect_err(text);
            assert!(err.to_string().contains(needle), "{text}: {err}");
        }
    }
}
