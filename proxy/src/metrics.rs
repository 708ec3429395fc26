//! The proxy's Prometheus metrics, in an explicit registry served on the admin port only.
//! Labels stay bounded: operation and outcome, never tenant ids.

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// Request latency buckets: 100 µs to 10 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

#[derive(Clone, Debug)]
pub struct ProxyMetrics {
    pub registry: Registry,
    pub requests: IntCounterVec,
    pub request_duration: HistogramVec,
    pub appends_in_flight: IntGauge,
    pub gate_writers: IntGauge,
    pub gate_wait: Histogram,
    /// Requests refused to protect the others, by reason (see [`crate::fairness::Shed`]).
    pub shed_requests: IntCounterVec,
    pub mirror_writes: IntCounterVec,
    /// Events the mirror dropped before queueing them, by `reason`; their sum is
    /// `mirror_writes{outcome="dropped"}`.
    pub mirror_dropped: IntCounterVec,
    /// Bytes of committed appends queued or being written per target `store` (a configured
    /// store id).
    pub mirror_queue_bytes: prometheus::IntGaugeVec,
    pub fence_rejections: IntCounter,
    /// Appends acknowledged by the store a moved fence named, reached by following it rather
    /// than the route (`api::append`).
    pub appends_followed: IntCounter,
    /// Feed cursors of another store than the tenant's (`after_store`), by outcome:
    /// `translated`, `not_translatable` (422), `route_stale` (503, this proxy behind a move).
    pub feed_cursor_translations: IntCounterVec,
    pub routing_epoch: IntGauge,
    pub routing_tenants: IntGauge,
    pub routing_reloads: IntCounterVec,
    pub routing_unknown_stores: IntGauge,
    /// Tenants whose reads follow a moved fence ahead of routing (see `Routes::note_moved`);
    /// set when scraped.
    pub routing_moved_tenants: IntGauge,
    /// 1 when a store answered its last ping, 0 when not; `store` is a configured store id
    /// (bounded by the configuration).
    pub store_up: prometheus::IntGaugeVec,
    /// Data-plane tokens in use (from `proxy.data_tokens_file`).
    pub data_tokens: IntGauge,
    /// Re-reads of a changed tokens file by outcome (`ok`, `error`: the old tokens stay).
    pub data_token_reloads: IntCounterVec,
    /// 1 when the data plane listens beyond loopback with no authentication, by
    /// `proxy.allow_unauthenticated`.
    pub data_plane_unauthenticated: IntGauge,
}

impl ProxyMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_requests_total",
                "Data-plane requests by operation and outcome.",
            ),
            &["operation", "outcome"],
        )
        .expect("valid metric");
        let request_duration = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_proxy_request_duration_seconds",
                "Data-plane request latency by operation and outcome.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["operation", "outcome"],
        )
        .expect("valid metric");
        let appends_in_flight = IntGauge::new(
            "switchyard_proxy_appends_in_flight",
            "Appends being handled now.",
        )
        .expect("valid metric");
        let gate_writers = IntGauge::new(
            "switchyard_proxy_gate_writers",
            "Writers waiting at a closed cutover gate now.",
        )
        .expect("valid metric");
        let gate_wait = Histogram::with_opts(
            HistogramOpts::new(
                "switchyard_proxy_gate_wait_seconds",
                "How long writers waited at a cutover gate.",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let shed_requests = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_shed_requests_total",
                "Data-plane requests refused to protect other requests, by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for reason in crate::fairness::Shed::ALL {
            shed_requests.with_label_values(&[reason.as_str()]);
        }
        let mirror_writes = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_mirror_writes_total",
                "Dual-write mirror writes to migration targets by outcome.",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        // Every outcome is exported from the start, so rates and alerts see a 0 before the first
        // failure.
        for outcome in ["ok", "healed", "deferred", "failed", "dropped"] {
            mirror_writes.with_label_values(&[outcome]);
        }
        let mirror_dropped = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_mirror_dropped_events_total",
                "Events the dual-write mirror dropped (left to the migration's tail) by reason.",
            ),
            &["reason"],
        )
        .expect("valid metric");
        for reason in crate::mirror::DropReason::ALL {
            mirror_dropped.with_label_values(&[reason.label()]);
        }
        let mirror_queue_bytes = prometheus::IntGaugeVec::new(
            Opts::new(
                "switchyard_proxy_mirror_queue_bytes",
                "Bytes of committed appends queued for a target store's mirror worker or being \
                 written by it (bounded by proxy.mirror_queue_bytes).",
            ),
            &["store"],
        )
        .expect("valid metric");
        let fence_rejections = IntCounter::new(
            "switchyard_proxy_fence_rejections_total",
            "Appends a store refused because the tenant's fence had moved.",
        )
        .expect("valid metric");
        let appends_followed = IntCounter::new(
            "switchyard_proxy_appends_followed_total",
            "Appends acknowledged by the store a moved fence named, sent there by following the \
             fence rather than the route (never mirrored).",
        )
        .expect("valid metric");
        let feed_cursor_translations = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_feed_cursor_translations_total",
                "Feed cursors of a store the tenant left, translated to its current store's \
                 positions or refused, by outcome.",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        let routing_epoch = IntGauge::new(
            "switchyard_proxy_routing_epoch",
            "Routing epoch of the table in use.",
        )
        .expect("valid metric");
        let routing_tenants = IntGauge::new(
            "switchyard_proxy_routing_tenants",
            "Tenants with a routing row in the table in use.",
        )
        .expect("valid metric");
        let routing_reloads = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_routing_reloads_total",
                "Routing table reloads by trigger and outcome.",
            ),
            &["trigger", "outcome"],
        )
        .expect("valid metric");
        let routing_unknown_stores = IntGauge::new(
            "switchyard_proxy_routing_unknown_store_routes",
            "Routes naming a store this proxy has not configured (their requests get 503).",
        )
        .expect("valid metric");
        let routing_moved_tenants = IntGauge::new(
            "switchyard_proxy_routing_moved_tenants",
            "Tenants whose source fence refused an append through this proxy as moved while \
             routing still names that source; their reads follow the fence.",
        )
        .expect("valid metric");
        let store_up = prometheus::IntGaugeVec::new(
            Opts::new(
                "switchyard_proxy_store_up",
                "Whether a configured store answered its last ping (1) or not (0), checked on \
                 every /readyz and /metrics request; not part of readiness.",
            ),
            &["store"],
        )
        .expect("valid metric");
        let data_tokens = IntGauge::new(
            "switchyard_proxy_data_tokens",
            "Data-plane bearer tokens in use (from proxy.data_tokens_file).",
        )
        .expect("valid metric");
        let data_token_reloads = IntCounterVec::new(
            Opts::new(
                "switchyard_proxy_data_token_reloads_total",
                "Re-reads of a changed data tokens file by outcome (on error the tokens in use \
                 stay).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for outcome in ["ok", "error"] {
            data_token_reloads.with_label_values(&[outcome]);
        }
        let data_plane_unauthenticated = IntGauge::new(
            "switchyard_proxy_data_plane_unauthenticated",
            "1 when the data plane listens beyond loopback with neither tokens nor client \
             certificates (proxy.allow_unauthenticated = true), else 0.",
        )
        .expect("valid metric");
        let build_info = prometheus::IntGaugeVec::new(
            Opts::new("switchyard_build_info", "Build information; always 1."),
            &["program", "version", "commit"],
        )
        .expect("valid metric");
        // The commit comes from SWITCHYARD_GIT_COMMIT at build time (the Dockerfile's
        // GIT_COMMIT build argument); "unknown" otherwise.
        build_info
            .with_label_values(&[
                "switchyard-proxy",
                env!("CARGO_PKG_VERSION"),
                option_env!("SWITCHYARD_GIT_COMMIT").unwrap_or("unknown"),
            ])
            .set(1);
        for collector in [
            Box::new(requests.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(request_duration.clone()),
            Box::new(appends_in_flight.clone()),
            Box::new(gate_writers.clone()),
            Box::new(gate_wait.clone()),
            Box::new(shed_requests.clone()),
            Box::new(mirror_writes.clone()),
            Box::new(mirror_dropped.clone()),
            Box::new(mirror_queue_bytes.clone()),
            Box::new(fence_rejections.clone()),
            Box::new(appends_followed.clone()),
            Box::new(feed_cursor_translations.clone()),
            Box::new(routing_epoch.clone()),
            Box::new(routing_tenants.clone()),
            Box::new(routing_reloads.clone()),
            Box::new(routing_unknown_stores.clone()),
            Box::new(routing_moved_tenants.clone()),
            Box::new(store_up.clone()),
            Box::new(data_tokens.clone()),
            Box::new(data_token_reloads.clone()),
            Box::new(data_plane_unauthenticated.clone()),
            Box::new(build_info),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            requests,
            request_duration,
            appends_in_flight,
            gate_writers,
            gate_wait,
            shed_requests,
            mirror_writes,
            mirror_dropped,
            mirror_queue_bytes,
            fence_rejections,
            appends_followed,
            feed_cursor_translations,
            routing_epoch,
            routing_tenants,
            routing_reloads,
            routing_unknown_stores,
            routing_moved_tenants,
            store_up,
            data_tokens,
            data_token_reloads,
            data_plane_unauthenticated,
        }
    }

    /// Counts a request refused for `reason`.
    pub fn shed(&self, reason: crate::fairness::Shed) {
        self.shed_requests
            .with_label_values(&[reason.as_str()])
            .inc();
    }

    /// Requests refused for `reason` so far.
    pub fn shed_count(&self, reason: crate::fairness::Shed) -> u64 {
        self.shed_requests
            .with_label_values(&[reason.as_str()])
            .get()
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        TextEncoder::new()
            .encode(&self.registry.gather(), &mut out)
            .expect("encoding to a Vec cannot fail");
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for ProxyMetrics {
    fn default() -> Self {
        Self::new()
    }
}
