//! The config loader (TOML, `SWITCHYARD_*` overrides, `${VAR}` expansion, validation) on
//! arbitrary file bytes: no panic, and no error echoes the planted secret
//! (`check_load_config`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_config::check_load_config;

fuzz_target!(|data: &[u8]| check_load_config(data));
