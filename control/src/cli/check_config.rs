//! `check-config`: load a config file exactly as the programs would and say what is wrong.

use std::path::Path;

use serde_json::json;
use switchyard_config::Config;

use super::{emit, CliError};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// The file to check (default: --config, or none for the embedded default).
    pub file: Option<std::path::PathBuf>,
}

pub fn run(global: Option<&Path>, args: &Args, json: bool) -> Result<(), CliError> {
    let path = args.file.as_deref().or(global);
    let config =
        Config::load(path).map_err(|e| CliError::Refused(format!("config is invalid: {e}")))?;
    let shown = path.map_or_else(
        || "<embedded default>".to_owned(),
        |p| p.display().to_string(),
    );
    emit(
        json,
        &json!({ "valid": true, "file": shown, "stores": config.stores.len(), "default_store": config.default_store }),
        |_| format!("{shown}: valid\n\n{}", config.redacted_toml()),
    );
    Ok(())
}
