//! Logging setup shared by both programs: text or JSON lines on stderr, filtered by
//! `SWITCHYARD_LOG` (same syntax as `RUST_LOG`, default `info`). The filter can be replaced at
//! run time (the admin ports' `PUT /admin/log-level`) through [`set_filter`].
//!
//! What is logged at `info` and above never carries secrets (store URLs, tokens) or event
//! payloads: ids, counts, durations and outcomes only.

use std::sync::{Mutex, OnceLock};

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::{reload, EnvFilter, Layer, Registry};

/// The log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The installed filter's reload handle and its current text.
struct Reloadable {
    handle: reload::Handle<EnvFilter, Registry>,
    current: Mutex<String>,
}

static FILTER: OnceLock<Reloadable> = OnceLock::new();

/// Installs the global subscriber with `default_filter` unless `SWITCHYARD_LOG` is set.
pub fn init(format: LogFormat, default_filter: &str) {
    use std::io::IsTerminal;
    let text = std::env::var("SWITCHYARD_LOG")
        .ok()
        .filter(|v| EnvFilter::try_new(v).is_ok())
        .unwrap_or_else(|| default_filter.to_owned());
    let (filter, handle) = reload::Layer::new(EnvFilter::new(&text));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Text => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    match tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .try_init()
    {
        Ok(()) => {
            let _ = FILTER.set(Reloadable {
                handle,
                current: Mutex::new(text),
            });
        }
        Err(e) => eprintln!("logging already initialised: {e}"),
    }
}

/// The filter in force (`None` before [`init`]).
pub fn current_filter() -> Option<String> {
    FILTER
        .get()
        .map(|f| f.current.lock().map(|c| c.clone()).unwrap_or_default())
}

/// Replaces the filter: a level (`debug`) or any `SWITCHYARD_LOG` directive string
/// (`info,switchyard_proxy=debug`). Returns the filter now in force.
pub fn set_filter(directives: &str) -> Result<String, String> {
    let reloadable = FILTER
        .get()
        .ok_or_else(|| "logging is not initialised".to_owned())?;
    let directives = directives.trim();
    if directives.is_empty() || directives.len() > 1024 {
        return Err("the filter must be 1 to 1024 characters".to_owned());
    }
    // A bare word must be a level: a typo such as `debgu` would otherwise parse as a target.
    if !directives.contains(['=', ','])
        && directives
            .parse::<tracing::level_filters::LevelFilter>()
            .is_err()
    {
        return Err(format!(
            "{directives:?} is not a level (trace, debug, info, warn, error, off)"
        ));
    }
    let filter = EnvFilter::try_new(directives).map_err(|e| e.to_string())?;
    reloadable
        .handle
        .reload(filter)
        .map_err(|e| e.to_string())?;
    if let Ok(mut current) = reloadable.current.lock() {
        directives.clone_into(&mut current);
    }
    tracing::warn!(filter = directives, "log filter changed");
    Ok(directives.to_owned())
}

/// Handles a `PUT /admin/log-level` body: `{"level": "debug"}` or `{"filter": "…"}`.
pub fn set_from_json(body: &[u8]) -> Result<String, String> {
    let value: serde_json::Value =
        serde_json::from_slice(body).map_err(|e| format!("the body is not JSON: {e}"))?;
    let directives = value
        .get("filter")
        .or_else(|| value.get("level"))
        .and_then(serde_json::Value::as_str)
        .ok_or_else(|| {
            r#"expected {"level": "debug"} or {"filter": "info,switchyard_proxy=debug"}"#.to_owned()
        })?;
    set_filter(directives)
}
