//! The engine's Prometheus metrics (served by `serve` on its admin port). Per-migration
//! series carry the migration and tenant ids: they change a few times a second at most, and
//! are removed when the migration stops being driven here.

use prometheus::{Gauge, GaugeVec, IntCounter, IntGaugeVec, Opts, Registry};
use switchyard_store::MigrationRecord;

#[derive(Clone, Debug)]
pub struct EngineMetrics {
    pub registry: Registry,
    pub copy_events: IntCounter,
    pub copy_rate: GaugeVec,
    pub lag: IntGaugeVec,
    pub progress: GaugeVec,
    pub migrations_driven: prometheus::IntGauge,
    pub up: Gauge,
}

impl EngineMetrics {
    pub fn new() -> Self {
        let registry = Registry::new();
        let labels = &["migration_id", "tenant_id"];
        let copy_events = IntCounter::new(
            "switchyard_control_copy_events_total",
            "Events copied into migration targets by bulk copy and tail.",
        )
        .expect("valid metric");
        let copy_rate = GaugeVec::new(
            Opts::new(
                "switchyard_control_copy_rate_events_per_second",
                "Copy rate of the last batch of each migration driven here.",
            ),
            labels,
        )
        .expect("valid metric");
        let lag = IntGaugeVec::new(
            Opts::new(
                "switchyard_control_migration_lag_events",
                "Source events of the tenant not yet in the target.",
            ),
            labels,
        )
        .expect("valid metric");
        let progress = GaugeVec::new(
            Opts::new(
                "switchyard_control_copy_progress_ratio",
                "Bulk-copy progress of each migration driven here, 0 to 1.",
            ),
            labels,
        )
        .expect("valid metric");
        let migrations_driven = prometheus::IntGauge::new(
            "switchyard_control_migrations_driven",
            "Migrations this process drives now.",
        )
        .expect("valid metric");
        let up =
            Gauge::new("switchyard_control_up", "1 while the worker runs.").expect("valid metric");
        let build_info = IntGaugeVec::new(
            Opts::new("switchyard_build_info", "Build information; always 1."),
            &["program", "version"],
        )
        .expect("valid metric");
        build_info
            .with_label_values(&["switchyard-control", env!("CARGO_PKG_VERSION")])
            .set(1);
        for collector in [
            Box::new(copy_events.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(copy_rate.clone()),
            Box::new(lag.clone()),
            Box::new(progress.clone()),
            Box::new(migrations_driven.clone()),
            Box::new(up.clone()),
            Box::new(build_info),
        ] {
            registry
                .register(collector)
                .expect("metric names are unique");
        }
        Self {
            registry,
            copy_events,
            copy_rate,
            lag,
            progress,
            migrations_driven,
            up,
        }
    }

    pub fn copied(&self, n: usize) {
        self.copy_events.inc_by(n as u64);
    }

    pub fn observe_rate(&self, record: &MigrationRecord, rate: f64) {
        let (m, t) = (record.id.to_string(), record.tenant_id.to_string());
        self.copy_rate.with_label_values(&[&m, &t]).set(rate);
        self.progress
            .with_label_values(&[&m, &t])
            .set(record.progress_percentage() / 100.0);
    }

    pub fn observe_lag(&self, record: &MigrationRecord, lag: i64) {
        let (m, t) = (record.id.to_string(), record.tenant_id.to_string());
        self.lag.with_label_values(&[&m, &t]).set(lag);
    }

    /// Drops a migration's series once it is no longer driven here.
    pub fn forget(&self, record: &MigrationRecord) {
        let (m, t) = (record.id.to_string(), record.tenant_id.to_string());
        for vec in [&self.copy_rate, &self.progress] {
            let _ = vec.remove_label_values(&[&m, &t]);
        }
        let _ = self.lag.remove_label_values(&[&m, &t]);
    }

    pub fn render(&self) -> String {
        let mut out = Vec::new();
        prometheus::Encoder::encode(
            &prometheus::TextEncoder::new(),
            &self.registry.gather(),
            &mut out,
        )
        .expect("encoding to a Vec cannot fail");
        String::from_utf8(out).unwrap_or_default()
    }
}

impl Default for EngineMetrics {
    fn default() -> Self {
        Self::new()
    }
}
