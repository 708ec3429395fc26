//! Switchyard's benchmarks: criterion micro-benches of hot paths in `benches/` (route lookup
//! and route changes, `benches/routing.rs`) and end-to-end load harnesses in `src/bin/`
//! (`append_overhead`: what the proxy adds to an append over direct sqlx). Each file starts
//! with its run command; results go to `BENCHMARKS.md` at the workspace root. What they report
//! alike (latencies, percentiles, load, `main`) is in [`report`], the flags they share in
//! [`args`].

pub mod args;
pub mod report;
pub mod writer;

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use sqlx::{Connection, PgConnection};
use switchyard_client::{metric_by_label, AdminClient};
use uuid::Uuid;

/// Polls a proxy's `/readyz` until it answers ready (routing loaded, stores reachable), for at
/// most 30 s.
pub async fn wait_ready(admin: &AdminClient) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if admin.ready().await.is_ok_and(|r| r.ready) {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the proxy at {} did not become ready within 30 s",
                admin.base()
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A counter of a proxy's `/metrics` by the value of `label` (whole counts).
pub async fn counters(
    admin: &AdminClient,
    metric: &str,
    label: &str,
) -> Result<BTreeMap<String, u64>> {
    let text = admin.metrics().await.context("reading /metrics")?;
    Ok(metric_by_label(&text, metric, label)
        .into_iter()
        .map(|(value, n)| {
            // Prometheus prints counters as floats; these count events or requests.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            (value, n as u64)
        })
        .collect())
}

/// Versions per seeded stream.
pub const SEED_STREAM_LEN: u64 = 100;

// ---------------------------------------------------------------------------------------------
// Databases

/// `url` with its database name replaced by `database`.
pub fn with_database(url: &str, database: &str) -> Result<String> {
    let (base, query) = match url.split_once('?') {
        Some((base, query)) => (base, Some(query)),
        None => (url, None),
    };
    let scheme_end = base.find("://").context("--pg-url has no scheme")? + 3;
    let authority_end = base[scheme_end..]
        .find('/')
        .map_or(base.len(), |i| scheme_end + i);
    let mut out = format!("{}/{database}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

/// The URL without its password, for messages.
pub fn redact(url: &str) -> String {
    match (url.find("://"), url.find('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let userinfo = &url[scheme + 3..at];
            match userinfo.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &url[..scheme + 3], &url[at..]),
                None => url.to_owned(),
            }
        }
        _ => url.to_owned(),
    }
}

/// A TOML basic string holding `s`.
pub fn toml_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => {
                let _ = write!(out, "\\u{:04X}", u32::from(c));
            }
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

/// The benchmark's databases: created through the admin connection, all dropped at the end.
#[derive(Debug)]
pub struct Databases {
    pub admin: PgConnection,
    admin_url: String,
    prefix: String,
    created: Vec<String>,
}

impl Databases {
    pub async fn connect(admin_url: &str, label: &str) -> Result<Self> {
        let admin = PgConnection::connect(admin_url)
            .await
            .with_context(|| format!("connecting to --pg-url {}", redact(admin_url)))?;
        Ok(Self {
            admin,
            admin_url: admin_url.to_owned(),
            prefix: format!("sy_{label}_{}", &Uuid::new_v4().simple().to_string()[..10]),
            created: Vec::new(),
        })
    }

    /// Creates `<prefix>_<suffix>` and answers its name and URL.
    pub async fn create(&mut self, suffix: &str) -> Result<(String, String)> {
        let name = format!("{}_{suffix}", self.prefix);
        sqlx::query(&format!("CREATE DATABASE {name}"))
            .execute(&mut self.admin)
            .await
            .with_context(|| format!("creating database {name}"))?;
        self.created.push(name.clone());
        let url = with_database(&self.admin_url, &name)?;
        Ok((name, url))
    }

    pub async fn drop_one(&mut self, name: &str) -> Result<()> {
        sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .execute(&mut self.admin)
            .await
            .with_context(|| format!("dropping database {name}"))?;
        self.created.retain(|n| n != name);
        Ok(())
    }

    pub async fn drop_all(&mut self) -> Result<()> {
        let mut first_error = None;
        for name in std::mem::take(&mut self.created) {
            match sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                .execute(&mut self.admin)
                .await
            {
                Ok(_) => eprintln!("dropped database {name}"),
                Err(e) => {
                    eprintln!("could not drop database {name}: {e}");
                    first_error.get_or_insert(e);
                }
            }
        }
        match first_error {
            Some(e) => Err(e.into()),
            None => Ok(()),
        }
    }

    /// Flushes dirty buffers, so one measurement does not pay for the previous one's writes.
    pub async fn checkpoint(&mut self) -> Result<()> {
        sqlx::query("CHECKPOINT")
            .execute(&mut self.admin)
            .await
            .context("CHECKPOINT (needs a superuser or pg_checkpoint)")?;
        Ok(())
    }
}

/// Seeds `events` events of `tenant` into the source store: streams of `SEED_STREAM_LEN` versions,
/// in version order, timestamps a second apart, payloads of about 150 bytes; and, interleaved
/// with them, `other_ratio` events of other tenants (50 of them, one-event streams) per event
/// of `tenant`, as in a shared store.
///
/// With `fixed`, event ids and timestamps are functions of the row number, so two stores
/// seeded alike hold the same events (the verification benchmark's source and target).
pub async fn seed(
    url: &str,
    tenant: Uuid,
    events: u64,
    other_ratio: u64,
    fixed: bool,
) -> Result<(f64, f64)> {
    let mut conn = PgConnection::connect(url).await?;
    let started = Instant::now();
    sqlx::query(
        "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id,
                             actor_id, version, timestamp, payload, created_at)
         SELECT CASE WHEN $5 THEN md5('event:' || g)::uuid ELSE gen_random_uuid() END,
                CASE WHEN mine THEN md5($1::text || ':' || (i / $3))::uuid
                     ELSE md5('other:' || g)::uuid END,
                'BenchOrder',
                (ARRAY['OrderPlaced', 'OrderPaid', 'OrderPacked', 'OrderShipped', 'OrderDelivered'])[1 + g % 5],
                CASE WHEN mine THEN $1 ELSE md5('tenant:' || (g % 50))::uuid END,
                'seed-user-' || (g % 50),
                CASE WHEN mine THEN (i % $3 + 1)::int ELSE 1 END,
                (CASE WHEN $5 THEN timestamptz '2026-01-01 00:00:00+00' ELSE now() END) - ($2 * $4 - g) * interval '1 second',
                jsonb_build_object(
                    'order_id', md5(g::text)::uuid,
                    'customer', 'customer-' || lpad((g % 10000)::text, 5, '0'),
                    'seq', g,
                    'amount_cents', 1000 + g % 90000,
                    'currency', 'EUR',
                    'items', jsonb_build_array(jsonb_build_object('sku', 'SKU-' || (g % 97), 'qty', 1 + g % 3))),
                (CASE WHEN $5 THEN timestamptz '2026-01-01 00:00:00+00' ELSE now() END) - ($2 * $4 - g) * interval '1 second'
           FROM (SELECT g, g % $4 = 0 AS mine, g / $4 AS i
                   FROM generate_series(0, $2 * $4 - 1) AS g) AS s
          ORDER BY g",
    )
    .bind(tenant)
    .bind(i64::try_from(events).context("--events fits i64")?)
    .bind(i64::try_from(SEED_STREAM_LEN).context("stream length")?)
    .bind(i64::try_from(other_ratio + 1).context("--other-tenants-ratio fits i64")?)
    .bind(fixed)
    .execute(&mut conn)
    .await
    .context("seeding the source")?;
    sqlx::query("VACUUM (ANALYZE) events")
        .execute(&mut conn)
        .await
        .context("vacuuming the source")?;
    let seconds = started.elapsed().as_secs_f64();
    let payload_bytes: f64 =
        sqlx::query_scalar("SELECT avg(length(payload::text))::float8 FROM events")
            .fetch_one(&mut conn)
            .await?;
    conn.close().await?;
    Ok((seconds, payload_bytes))
}

// ---------------------------------------------------------------------------------------------
// The machine and the proxy

/// The real proxy, in-process on `127.0.0.1:0`, until [`InProcessProxy::stop`].
#[derive(Debug)]
pub struct InProcessProxy {
    /// `http://addr` of the data plane.
    pub data: String,
    /// `http://addr` of the admin port.
    pub admin: String,
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl InProcessProxy {
    pub async fn start(config: switchyard_config::Config) -> Result<Self> {
        let app = switchyard_proxy::App::build(config).context("building the proxy")?;
        let data = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let admin = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let (data_url, admin_url) = (
            format!("http://{}", data.local_addr()?),
            format!("http://{}", admin.local_addr()?),
        );
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(app.run(data, admin, async {
            let _ = stopped.await;
        }));
        Ok(Self {
            data: data_url,
            admin: admin_url,
            stop,
            task,
        })
    }

    /// Shuts the proxy down as SIGTERM would, waiting up to 15 s.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        if tokio::time::timeout(std::time::Duration::from_secs(15), self.task)
            .await
            .is_err()
        {
            eprintln!("the proxy did not stop within 15 s");
        }
    }
}
