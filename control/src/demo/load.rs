//! The demo's load: writers appending one event at a time through the proxy over HTTP,
//! retrying the same body on 503 or a dropped connection, each acknowledgement recorded with
//! its latency.

use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use tokio::sync::watch;
use uuid::Uuid;

use super::DemoError;

/// One acknowledged append of a writer.
#[derive(Debug, Clone)]
pub(super) struct Acked {
    pub(super) stream: Uuid,
    pub(super) event_id: Uuid,
    pub(super) version: i64,
    pub(super) store_id: String,
    /// Since the run's start.
    pub(super) started: Duration,
    pub(super) latency: Duration,
}

/// What one writer did.
#[derive(Debug, Default)]
pub(super) struct WriterResult {
    pub(super) acked: Vec<Acked>,
    pub(super) retried: u64,
}

/// One request with a JSON body: the status and the whole reply, or why there was none.
pub(super) async fn request(
    client: &Client<HttpConnector, Full<Bytes>>,
    method: Method,
    url: &str,
    body: Bytes,
) -> Result<(StatusCode, Bytes), String> {
    let request = Request::builder()
        .method(method)
        .uri(url)
        .header("content-type", "application/json")
        .body(Full::new(body))
        .map_err(|e| e.to_string())?;
    let response = client.request(request).await.map_err(|e| e.to_string())?;
    let status = response.status();
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// One writer: appends one event at a time to its own streams through the proxy, retrying the
/// same body (same event id) on 503 or a dropped connection, and records every
/// acknowledgement with its latency.
pub(super) async fn writer(
    client: Client<HttpConnector, Full<Bytes>>,
    base: String,
    tenant: Uuid,
    w: usize,
    t0: Instant,
    pause: Duration,
    stop: watch::Receiver<bool>,
) -> Result<WriterResult, DemoError> {
    const STREAMS: usize = 4;
    let streams: Vec<Uuid> = (0..STREAMS).map(|_| Uuid::new_v4()).collect();
    let mut versions = [0i64; STREAMS];
    let mut result = WriterResult::default();
    let mut seq = 0u64;
    while !*stop.borrow() {
        let s = usize::try_from(seq).unwrap_or(0) % STREAMS;
        seq += 1;
        let event_id = Uuid::new_v4();
        let body = serde_json::json!({
            "expected_version": versions[s],
            "events": [{
                "event_id": event_id,
                "event_type": "Deposited",
                "actor_id": format!("writer-{w}"),
                "payload": { "writer": w, "seq": seq, "amount": seq % 13 },
            }],
        });
        let body =
            Bytes::from(serde_json::to_vec(&body).map_err(|e| DemoError::Failed(e.to_string()))?);
        let url = format!(
            "{base}/v1/tenants/{tenant}/streams/Account/{}/events",
            streams[s]
        );
        let began = Instant::now();
        let deadline = began + Duration::from_secs(30);
        loop {
            match request(&client, Method::POST, &url, body.clone()).await {
                Ok((StatusCode::CREATED, reply)) => {
                    let reply: serde_json::Value = serde_json::from_slice(&reply)
                        .map_err(|e| DemoError::Failed(format!("append reply: {e}")))?;
                    let version = reply["first_version"].as_i64().unwrap_or(-1);
                    versions[s] = reply["last_version"].as_i64().unwrap_or(versions[s]);
                    result.acked.push(Acked {
                        stream: streams[s],
                        event_id,
                        version,
                        store_id: reply["store_id"].as_str().unwrap_or_default().to_owned(),
                        started: began.duration_since(t0),
                        latency: began.elapsed(),
                    });
                    break;
                }
                Ok((status, reply)) if status.is_server_error() => {
                    if Instant::now() > deadline {
                        return Err(DemoError::Failed(format!(
                            "writer {w}: append still refused after 30 s: {status} {}",
                            String::from_utf8_lossy(&reply)
                        )));
                    }
                    result.retried += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
                Ok((status, reply)) => {
                    return Err(DemoError::Failed(format!(
                        "writer {w}: append refused: {status} {}",
                        String::from_utf8_lossy(&reply)
                    )))
                }
                Err(e) => {
                    if Instant::now() > deadline {
                        return Err(DemoError::Failed(format!("writer {w}: {e}")));
                    }
                    result.retried += 1;
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        }
        if !pause.is_zero() {
            tokio::time::sleep(pause).await;
        }
    }
    Ok(result)
}
