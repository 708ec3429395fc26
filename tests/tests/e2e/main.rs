//! The end-to-end tests as one binary, a module per area: the real binaries (and the stores'
//! own SQL) against fresh PostgreSQL databases and SQLite files. One binary instead of one per
//! area: the test build links once (22 links filled a CI machine's disk and most of the build
//! time), and nextest still runs each test in its own process. Select an area with
//! `cargo nextest run -p switchyard-tests -E 'test(/^cutover::/)'`.

mod access;
mod bench_smoke;
mod cleanup;
mod client;
mod control_cli;
mod control_migrations;
mod copy_passes;
mod cutover;
mod data_plane;
mod demo;
mod deploy;
mod docs_commands;
mod eventsource_compat;
mod fault_scenarios;
mod faults;
mod feed;
mod hardening;
mod migration;
mod mirror;
mod openapi;
mod pg_tls;
mod proxy_lifecycle;
mod python_client;
mod revert;
mod routing;
mod soak;
mod undo;
mod verify;
