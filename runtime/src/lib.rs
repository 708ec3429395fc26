//! `switchyard-runtime`: what the proxy and the control plane's `serve` both run on, so that
//! neither borrows the other's internals.
//!
//! Logging with a filter changeable at run time ([`telemetry`]), the shutdown signal
//! ([`shutdown_signal`]), the accept loop with its connection limits and TLS ([`server`],
//! [`activity`], [`tls`]), the admin ports' bearer-token check ([`admin`]) and the one JSON
//! shape every error reply of both programs has ([`admin::error_body`]).

pub mod activity;
pub mod admin;
pub mod server;
pub mod telemetry;
pub mod tls;

/// Completes on SIGTERM or SIGINT: the shutdown signal of both programs.
pub async fn shutdown_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! {
                    _ = ctrl_c => {}
                    _ = term.recv() => {}
                }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}
