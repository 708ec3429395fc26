//! The end-to-end test harness: fresh databases per test (a PostgreSQL database with a unique
//! name, or SQLite files in a temporary folder), config files for them, the real binaries
//! started as processes on random ports, and a small HTTP client.
//!
//! PostgreSQL is found at `SWITCHYARD_TEST_PG_URL` (default
//! `postgres://postgres@127.0.0.1:5432/postgres`); the test script makes sure one runs.
//!
//! The harness is split by role: [`databases`], [`processes`], [`http_client`], [`faults`],
//! [`scenario`] (setup and load) and [`checks`] (verdicts); everything is re-exported here, so
//! a test file needs one `use switchyard_tests::*`.

pub use anyhow::Result;

pub mod checks;
pub mod databases;
pub mod faults;
pub mod http_client;
pub mod processes;
pub mod scenario;

pub use checks::*;
pub use databases::*;
pub use faults::*;
pub use http_client::*;
pub use processes::*;
pub use scenario::*;
