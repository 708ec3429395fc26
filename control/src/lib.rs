//! `switchyard-control`: the control plane. The operator CLI (one subcommand per file in
//! `cli/`) and, as the engine grows, the migration engine and the `serve` worker.

pub mod cli;
pub mod context;
pub mod demo;
pub mod engine;
pub mod fault;
pub mod serve;
pub mod verify;
