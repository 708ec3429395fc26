//! The engine's Prometheus metrics (served by `serve` on its admin port). Per-migration
//! series carry the migration and tenant ids: they change a few times a second at most, and
//! are removed when the migration stops being driven here.

use prometheus::{
    Gauge, GaugeVec, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry,
};
use switchyard_store::{CleanupRecord, MigrationRecord};

#[derive(Clone, Debug)]
pub struct EngineMetrics {
    pub registry: Registry,
    pub copy_events: IntCounter,
    pub copy_rate: GaugeVec,
    pub lag: IntGaugeVec,
    /// Streams whose events can never land in the target (divergence), per migration.
    pub divergent_streams: IntGaugeVec,
    pub progress: GaugeVec,
    pub migrations_driven: prometheus::IntGauge,
    pub up: Gauge,
    pub verify_events: IntCounterVec,
    pub verify_violations: IntCounterVec,
    pub verify_duration: HistogramVec,
    /// Cutovers run or recovered (finished or rolled back after their driver died) by this
    /// process, by outcome (`migrated`, `rolled_back`).
    pub cutovers: IntCounterVec,
    /// How long the tenant's writes were held by cutovers run here.
    pub cutover_pause: Histogram,
    /// Fleet view from the control database (refreshed by `serve`): migrations by state.
    pub migrations: IntGaugeVec,
    /// Fleet view: one series per active migration, labelled with its state, always 1.
    pub migration_info: IntGaugeVec,
    /// Fleet view: the control database's routing epoch (what proxies should have loaded).
    pub routing_epoch: IntGauge,
    /// Fleet view: cleanups still deleting, and the rows they have left to delete.
    pub cleanups_running: IntGauge,
    pub cleanup_rows_left: IntGauge,
    /// Rows of tenants deleted by cleanups run by this process.
    pub cleanup_rows_deleted: IntCounter,
}

/// Cutover pause buckets: 1 ms to 10 s.
const PAUSE_BUCKETS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

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
                "Source events of the tenant not yet in the target (during the bulk copy: events of its snapshot still to copy).",
            ),
            labels,
        )
        .expect("valid metric");
        let divergent_streams = IntGaugeVec::new(
            Opts::new(
                "switchyard_control_migration_divergent_streams",
                "Streams of the tenant with an event that can never land in the target (it holds a different event at that id or version, or the stream belongs to another tenant).",
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
            &["program", "version", "commit"],
        )
        .expect("valid metric");
        // The commit comes from SWITCHYARD_GIT_COMMIT at build time (the Dockerfile's
        // GIT_COMMIT build argument); "unknown" otherwise.
        build_info
            .with_label_values(&[
                "switchyard-control",
                env!("CARGO_PKG_VERSION"),
                option_env!("SWITCHYARD_GIT_COMMIT").unwrap_or("unknown"),
            ])
            .set(1);
        let verify_events = IntCounterVec::new(
            Opts::new(
                "switchyard_verify_events_total",
                "Source events compared by verifications (the cutover's delta check included).",
            ),
            &["level"],
        )
        .expect("valid metric");
        let verify_violations = IntCounterVec::new(
            Opts::new(
                "switchyard_verify_violations_total",
                "Streams found inconsistent by verifications.",
            ),
            &["level"],
        )
        .expect("valid metric");
        let verify_duration = HistogramVec::new(
            HistogramOpts::new(
                "switchyard_verify_duration_seconds",
                "How long each verification took.",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
            ]),
            &["level"],
        )
        .expect("valid metric");
        let cutovers = IntCounterVec::new(
            Opts::new(
                "switchyard_control_cutovers_total",
                "Cutovers run or recovered by this process by outcome (migrated, rolled_back).",
            ),
            &["outcome"],
        )
        .expect("valid metric");
        for level in ["count", "hash", "full"] {
            verify_events.with_label_values(&[level]);
            verify_violations.with_label_values(&[level]);
            verify_duration.with_label_values(&[level]);
        }
        for outcome in ["migrated", "rolled_back"] {
            cutovers.with_label_values(&[outcome]);
        }
        let cutover_pause = Histogram::with_opts(
            HistogramOpts::new(
                "switchyard_control_cutover_pause_seconds",
                "How long cutovers run by this process held the tenant's writes.",
            )
            .buckets(PAUSE_BUCKETS.to_vec()),
        )
        .expect("valid metric");
        let migrations = IntGaugeVec::new(
            Opts::new(
                "switchyard_control_migrations",
                "Migrations in the control database by state (all of them, terminal included).",
            ),
            &["state"],
        )
        .expect("valid metric");
        let migration_info = IntGaugeVec::new(
            Opts::new(
                "switchyard_control_migration_info",
                "One series per active migration with its state and stores; always 1.",
            ),
            &[
                "migration_id",
                "tenant_id",
                "state",
                "source_store",
                "target_store",
            ],
        )
        .expect("valid metric");
        let routing_epoch = IntGauge::new(
            "switchyard_control_routing_epoch",
            "The control database's routing epoch: proxies below it are stale.",
        )
        .expect("valid metric");
        let cleanups_running = IntGauge::new(
            "switchyard_control_cleanups_running",
            "Cleanups still deleting a tenant's rows from a store it left (control database).",
        )
        .expect("valid metric");
        let cleanup_rows_left = IntGauge::new(
            "switchyard_control_cleanup_rows_left",
            "Rows those cleanups have left to delete (counted when each started, less what it recorded deleted).",
        )
        .expect("valid metric");
        let cleanup_rows_deleted = IntCounter::new(
            "switchyard_control_cleanup_rows_deleted_total",
            "Rows of tenants deleted by cleanups run by this process.",
        )
        .expect("valid metric");
        for collector in [
            Box::new(cutovers.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(cleanups_running.clone()),
            Box::new(cleanup_rows_left.clone()),
            Box::new(cleanup_rows_deleted.clone()),
            Box::new(cutover_pause.clone()),
            Box::new(migrations.clone()),
            Box::new(migration_info.clone()),
            Box::new(routing_epoch.clone()),
            Box::new(verify_events.clone()),
            Box::new(verify_violations.clone()),
            Box::new(verify_duration.clone()),
            Box::new(copy_events.clone()),
            Box::new(copy_rate.clone()),
            Box::new(lag.clone()),
            Box::new(divergent_streams.clone()),
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
            divergent_streams,
            progress,
            migrations_driven,
            up,
            verify_events,
            verify_violations,
            verify_duration,
            cutovers,
            cutover_pause,
            migrations,
            migration_info,
            routing_epoch,
            cleanups_running,
            cleanup_rows_left,
            cleanup_rows_deleted,
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
        // During the bulk copy the lag is what is left of the copy's snapshot; from dual_write
        // on it is measured (`observe_lag`).
        self.lag
            .with_label_values(&[&m, &t])
            .set((record.events_total - record.events_copied).max(0));
    }

    pub fn observe_lag(&self, record: &MigrationRecord, lag: i64) {
        let (m, t) = (record.id.to_string(), record.tenant_id.to_string());
        self.lag.with_label_values(&[&m, &t]).set(lag);
    }

    pub fn observe_divergence(&self, record: &MigrationRecord, streams: usize) {
        let (m, t) = (record.id.to_string(), record.tenant_id.to_string());
        self.divergent_streams
            .with_label_values(&[&m, &t])
            .set(i64::try_from(streams).unwrap_or(i64::MAX));
    }

    pub fn observe_verification(&self, report: &crate::verify::Report) {
        let level = report.level.as_str();
        self.verify_events
            .with_label_values(&[level])
            .inc_by(u64::try_from(report.source_event_count).unwrap_or(0));
        self.verify_violations
            .with_label_values(&[level])
            .inc_by((report.violations.len() + report.violations_not_classified) as u64);
        #[allow(clippy::cast_precision_loss)]
        self.verify_duration
            .with_label_values(&[level])
            .observe(report.duration_ms as f64 / 1000.0);
    }

    /// Drops a migration's series once it is no longer driven here.
    pub fn forget(&self, record: &MigrationRecord) {
        let (m, t) = (record.id.to_string(), record.tenant_id.to_string());
        for vec in [&self.copy_rate, &self.progress] {
            let _ = vec.remove_label_values(&[&m, &t]);
        }
        let _ = self.lag.remove_label_values(&[&m, &t]);
        let _ = self.divergent_streams.remove_label_values(&[&m, &t]);
    }

    /// Replaces the fleet view with what the control database says now.
    pub fn observe_fleet(&self, all: &[MigrationRecord], routing_epoch: i64) {
        let mut by_state = std::collections::BTreeMap::new();
        for state in switchyard_store::MigrationState::ALL {
            by_state.insert(state.to_string(), 0_i64);
        }
        self.migration_info.reset();
        for record in all {
            let state = record.state.to_string();
            *by_state.entry(state.clone()).or_default() += 1;
            if !record.state.is_terminal() {
                self.migration_info
                    .with_label_values(&[
                        &record.id.to_string(),
                        &record.tenant_id.to_string(),
                        &state,
                        &record.source_store_id,
                        &record.target_store_id,
                    ])
                    .set(1);
            }
        }
        for (state, n) in by_state {
            self.migrations.with_label_values(&[&state]).set(n);
        }
        self.routing_epoch.set(routing_epoch);
    }

    /// Replaces the cleanups' fleet view with the cleanups running now.
    pub fn observe_cleanups(&self, running: &[CleanupRecord]) {
        self.cleanups_running
            .set(i64::try_from(running.len()).unwrap_or(i64::MAX));
        self.cleanup_rows_left.set(
            running
                .iter()
                .map(|c| (c.rows_total - c.rows_deleted).max(0))
                .sum(),
        );
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
