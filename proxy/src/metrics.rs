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
    pub mirror_writes: IntCounterVec,
    pub fence_rejections: IntCounter,
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
    pub build_info: IntGaugeVecHolder,
}

/// Wraps the build-info gauge so it is registered once with constant labels.
#[derive(Clone, Debug)]
pub struct IntGaugeVecHolder(pub prometheus::IntGaugeVec);

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
        for outcome in ["ok", "deferred", "failed", "dropped"] {
            mirror_writes.with_label_values(&[outcome]);
        }
        let fence_rejections = IntCounter::new(
            "switchyard_proxy_fence_rejections_total",
            "Appends a store refused because the tenant's fence had moved.",
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
            Box::new(mirror_writes.clone()),
            Box::new(fence_rejections.clone()),
            Box::new(routing_epoch.clone()),
            Box::new(routing_tenants.clone()),
            Box::new(routing_reloads.clone()),
            Box::new(routing_unknown_stores.clone()),
            Box::new(routing_moved_tenants.clone()),
            Box::new(store_up.clone()),
            Box::new(build_info.clone()),
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
            mirror_writes,
            fence_rejections,
            routing_epoch,
            routing_tenants,
            routing_reloads,
            routing_unknown_stores,
            routing_moved_tenants,
            store_up,
            build_info: IntGaugeVecHolder(build_info),
        }
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
