//! The demo's load: `switchyard-client`'s load writer appending one `Deposited` event at a
//! time to four `Account` streams per writer through the proxy, retrying the same event id on
//! a retryable refusal or a dropped connection (for up to 30 s), each acknowledgement
//! recorded with its latency.

use std::time::{Duration, Instant};

use serde_json::json;
use switchyard_client::{DataClient, Load, LoadPlan, NewEvent, Pacing};
use uuid::Uuid;

/// `writers` writers of `tenant` through `proxy`, pausing `pause` between appends; times are
/// measured from `started`.
pub(super) fn start(
    proxy: DataClient,
    tenant: Uuid,
    writers: usize,
    started: Instant,
    pause: Duration,
) -> Load {
    let plan = LoadPlan {
        aggregate_type: "Account".to_owned(),
        streams: 4,
        pacing: Pacing::Closed { pause },
        retry_pause: Duration::from_millis(5),
        give_up_after: Some(Duration::from_secs(30)),
        origin: started,
        ..LoadPlan::new(tenant)
    }
    .with_events(|w, seq| {
        vec![NewEvent::new(
            "Deposited",
            json!({ "writer": w, "seq": seq, "amount": seq % 13 }),
        )
        .with_actor(format!("writer-{w}"))]
    });
    Load::start(&[proxy], plan, writers)
}
