//! The cutover's hold on a tenant's fence in the source store (DESIGN.md "Cutover").
//!
//! On PostgreSQL, [`EventStore::lock_fence`] opens a transaction and takes `FOR UPDATE` on the
//! tenant's fence row: it waits for appends in flight (they hold `FOR SHARE`) to commit, then
//! holds every new append of the tenant — through the proxy or straight into the table — until
//! the lock is released. [`FenceLock::move_to`] marks the fence moved and commits;
//! [`FenceLock::release`] (or dropping the lock) rolls back and leaves the fence open.
//! The transaction carries a lock, statement and idle-in-transaction timeout, so a holder that
//! freezes (a stopped process, a lost client) loses the fence within its budget plus
//! [`FENCE_MARGIN`] instead of holding every writer of the tenant for hours; a wait that gives
//! up names the session holding the fence.
//! On SQLite the hold is a write transaction (`BEGIN IMMEDIATE`), which holds every writer of
//! the store for its short duration.

use std::time::Duration;

use chrono::Utc;

use sqlx::{PgPool, Postgres, Sqlite, Transaction};
use uuid::Uuid;

use super::{Backend, EventStore};
use crate::dialect::{Lite, Pg};
use crate::event::{format_timestamp, StoreError};

/// What a fence transaction may run or sit idle past its budget before PostgreSQL ends it
/// (`statement_timeout`, `idle_in_transaction_session_timeout`): room for the move and its
/// commit, which run after the budget is checked, never an open-ended hold.
pub const FENCE_MARGIN: Duration = Duration::from_millis(1000);

/// How far past the fence row's last write (`updated_at`, the start of the transaction that
/// wrote it) a transaction may have begun and still have written without seeing the row: the
/// writing statement's own duration, generously.
const FENCE_ROW_SETTLE_SECS: u32 = 1;

/// What a tenant's fence in a store admits (DESIGN.md invariant 8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FenceState {
    /// Everyone: the store the tenant lives in.
    Open,
    /// Switchyard's copiers only (a migration's target before its cutover commits, a store
    /// the tenant left while reverse replication keeps it current); everyone else is refused
    /// as if moved, to `moved_to`.
    Copiers,
    /// Nobody: the tenant went to `moved_to`.
    Moved,
}

impl FenceState {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Open => "open",
            Self::Copiers => "copiers",
            Self::Moved => "moved",
        }
    }

    /// Whether a fence in `state` (as stored) refuses the tenant's writers (everyone but a
    /// copier): `moved` and `copiers` both name, in `moved_to`, where the tenant lives.
    pub fn refuses_writers(state: &str) -> bool {
        state == Self::Moved.as_str() || state == Self::Copiers.as_str()
    }
}

/// An open source transaction holding a tenant's fence.
#[derive(Debug)]
pub struct FenceLock {
    tenant: Uuid,
    tx: Tx,
}

#[derive(Debug)]
enum Tx {
    Postgres(Transaction<'static, Postgres>),
    Sqlite(Transaction<'static, Sqlite>),
}

/// [`crate::dialect::on_backend!`] for a fence transaction: runs `$body` with `$tx` the
/// transaction and `$d` its backend's dialect.
macro_rules! on_tx {
    ($tx:expr, |$t:ident, $d:ident| $body:expr) => {
        match $tx {
            Tx::Postgres($t) => {
                let $d = Pg;
                $body
            }
            Tx::Sqlite($t) => {
                let $d = Lite;
                $body
            }
        }
    };
}

impl Pg {
    /// A fence row's `updated_at`: the transaction's start, which [`OLDER_WRITERS_SQL`]
    /// compares with other sessions' `xact_start`.
    pub(super) fn fence_stamp(self) -> &'static str {
        "now()"
    }
}

impl Lite {
    /// The clock in the event store's timestamp format (microseconds, `+00:00`).
    pub(super) fn fence_stamp(self) -> &'static str {
        "strftime('%Y-%m-%dT%H:%M:%f000+00:00', 'now')"
    }
}

/// A session in a store's database whose writes may have escaped a tenant's fence (see
/// [`EventStore::writers_older_than_fence`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OlderWriter {
    pub pid: i32,
    pub application_name: String,
    pub client_addr: String,
    pub xact_start: String,
}

impl std::fmt::Display for OlderWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "pid {} (application {:?}, client {}, in a transaction since {})",
            self.pid, self.application_name, self.client_addr, self.xact_start
        )
    }
}

/// Sessions in a transaction that began before the tenant's fence row was last written and
/// that wrote `events` (so they may hold rows of the tenant inserted before the fence existed,
/// which no fence held), or whose snapshot predates the row (a repeatable-read transaction
/// that would not see the fence when it inserts). Their rows would commit behind a moved
/// fence, never copied. Run on `exec`, excluding its own session.
///
/// A snapshot's `backend_xmin` is the oldest transaction running anywhere on the server when it
/// was taken: a transaction open in another database since before the fence row puts every
/// session's below the row. So a snapshot counts as predating the row only if its transaction
/// also began before the row settled.
const OLDER_WRITERS_SQL: &str = "
    SELECT a.pid, coalesce(a.application_name, ''), coalesce(a.client_addr::text, 'local'),
           a.xact_start::text
      FROM pg_stat_activity a, switchyard_fences f
     WHERE f.tenant_id = $1
       AND a.datname = current_database()
       AND a.pid <> pg_backend_pid()
       AND a.backend_type = 'client backend'
       AND a.xact_start IS NOT NULL
       AND ((age(a.backend_xmin) >= age(f.xmin)
             AND a.xact_start < f.updated_at + make_interval(secs => $2))
            OR (EXISTS (SELECT 1 FROM pg_locks l
                         WHERE l.pid = a.pid AND l.relation = 'events'::regclass
                           AND l.mode = 'RowExclusiveLock' AND l.granted)
                AND (a.xact_start < f.updated_at + make_interval(secs => $2)
                     OR age(a.backend_xid) >= age(f.xmin))))
     ORDER BY a.xact_start";

type OlderWriterRow = (i32, String, String, String);

fn older_writers(rows: Vec<OlderWriterRow>) -> Vec<OlderWriter> {
    rows.into_iter()
        .map(
            |(pid, application_name, client_addr, xact_start)| OlderWriter {
                pid,
                application_name,
                client_addr,
                xact_start,
            },
        )
        .collect()
}

/// Takes `FOR UPDATE` on the tenant's fence row in `tx` (session `pid`, whose `lock_timeout`
/// bounds the wait).
/// A wait that gives up answers [`StoreError::Held`] naming the sessions that held the row,
/// as seen from `pool` halfway through the wait.
async fn lock_row(
    tx: &mut Transaction<'static, Postgres>,
    pool: &PgPool,
    (tenant, pid): (Uuid, i32),
    wait: Duration,
) -> Result<(), StoreError> {
    let lock = sqlx::query("SELECT state FROM switchyard_fences WHERE tenant_id = $1 FOR UPDATE")
        .bind(tenant)
        .execute(&mut **tx);
    tokio::pin!(lock);
    let look = async {
        tokio::time::sleep(wait / 2).await;
        holders(pool, pid).await
    };
    let seen = tokio::select! {
        done = &mut lock => return done.map(|_| ()).map_err(StoreError::from),
        seen = look => seen,
    };
    match lock.await {
        Ok(_) => Ok(()),
        // 55P03 lock_not_available (lock_timeout), 57014 query_canceled (statement_timeout).
        Err(sqlx::Error::Database(db))
            if db.code().is_some_and(|c| c == "55P03" || c == "57014") =>
        {
            Err(StoreError::Held(format!(
                "the fence of tenant {tenant} stayed held for {} ms by {}",
                wait.as_millis(),
                if seen.is_empty() {
                    "a session that has let go since".to_owned()
                } else {
                    seen.join("; ")
                }
            )))
        }
        Err(e) => Err(e.into()),
    }
}

/// The sessions `pid` waits for, described for an operator.
async fn holders(pool: &PgPool, pid: i32) -> Vec<String> {
    type Holder = (i32, String, String, String, String);
    let rows: Result<Vec<Holder>, _> = sqlx::query_as(
        "SELECT pid, coalesce(application_name, ''), coalesce(client_addr::text, 'local'),
                coalesce(state, ''), coalesce(xact_start::text, '')
           FROM pg_stat_activity WHERE pid = ANY (pg_blocking_pids($1))",
    )
    .bind(pid)
    .fetch_all(pool)
    .await;
    rows.unwrap_or_default()
        .into_iter()
        .map(|(pid, app, client, state, since)| {
            format!("pid {pid} (application {app:?}, client {client}, {state}, in a transaction since {since})")
        })
        .collect()
}

impl EventStore {
    /// Takes the tenant's fence, waiting at most `budget` for appends in flight (PostgreSQL
    /// `lock_timeout`). Each later statement of the transaction may run, and the transaction
    /// may sit idle, for `budget` plus [`FENCE_MARGIN`]; past that PostgreSQL ends it and the
    /// fence stays as it was.
    pub async fn lock_fence(
        &self,
        tenant: Uuid,
        budget: Duration,
    ) -> Result<FenceLock, StoreError> {
        let millis = budget.as_millis().clamp(1, u128::from(u32::MAX));
        let bound = (budget + FENCE_MARGIN)
            .as_millis()
            .clamp(1, u128::from(u32::MAX));
        // The two backends hold a fence differently, so the arms stay apart: PostgreSQL takes
        // the row `FOR UPDATE` under three timeouts and names a holder it gave up on
        // ([`lock_row`]); SQLite's write transaction (`BEGIN IMMEDIATE`) holds every writer of
        // the store and has nothing to wait for once begun.
        match &self.backend {
            Backend::Postgres(pool) => {
                let mut tx = pool.begin().await?;
                // The three bounds (transaction-local) and this session's pid, in one round trip.
                let (pid, ..): (i32, String, String, String) = sqlx::query_as(
                    "SELECT pg_backend_pid(),
                            set_config('lock_timeout', $1, true),
                            set_config('statement_timeout', $2, true),
                            set_config('idle_in_transaction_session_timeout', $2, true)",
                )
                .bind(millis.to_string())
                .bind(bound.to_string())
                .fetch_one(&mut *tx)
                .await?;
                // The row exists since the migration started; create it if someone removed it.
                sqlx::query(&ensure_fence_row(Pg.fence_stamp()))
                    .bind(tenant)
                    .execute(&mut *tx)
                    .await?;
                lock_row(&mut tx, pool, (tenant, pid), budget).await?;
                Ok(FenceLock {
                    tenant,
                    tx: Tx::Postgres(tx),
                })
            }
            Backend::Sqlite(pool) => {
                let mut tx = Lite.begin(pool).await?;
                sqlx::query(&ensure_fence_row(Lite.fence_stamp()))
                    .bind(Lite.id(tenant))
                    .execute(&mut *tx)
                    .await?;
                Ok(FenceLock {
                    tenant,
                    tx: Tx::Sqlite(tx),
                })
            }
        }
    }

    /// Sessions whose rows of the tenant may have escaped its fence: in a transaction that
    /// began before the fence row was last written and wrote `events`, or that reads from a
    /// snapshot older than the row. Until they end, moving the fence could strand their rows
    /// in this store (they commit after the move, and no copy ever reads them). SQLite
    /// serialises writers behind the write lock the fence itself takes: none.
    pub async fn writers_older_than_fence(
        &self,
        tenant: Uuid,
    ) -> Result<Vec<OlderWriter>, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => Ok(older_writers(
                sqlx::query_as(OLDER_WRITERS_SQL)
                    .bind(tenant)
                    .bind(f64::from(FENCE_ROW_SETTLE_SECS))
                    .fetch_all(pool)
                    .await?,
            )),
            Backend::Sqlite(_) => Ok(Vec::new()),
        }
    }

    /// How long until the tenant's fence row is settled: until then a transaction that began
    /// after the row's last write counts as older than the fence once it writes `events`
    /// ([`Self::writers_older_than_fence`]: it may not have seen the row), and so does every
    /// writer the fence holds. A cutover taking the fence within that second after the
    /// migration opened it refused every time its writers queued on it. By the store's own
    /// clock; zero for a row settled long ago, for no row, and on SQLite.
    pub async fn fence_settles_in(&self, tenant: Uuid) -> Result<Duration, StoreError> {
        let Backend::Postgres(pool) = &self.backend else {
            return Ok(Duration::ZERO);
        };
        let secs: Option<f64> = sqlx::query_scalar(
            "SELECT extract(epoch FROM f.updated_at + make_interval(secs => $2) - clock_timestamp())::float8
               FROM switchyard_fences f WHERE f.tenant_id = $1",
        )
        .bind(tenant)
        .bind(f64::from(FENCE_ROW_SETTLE_SECS))
        .fetch_optional(pool)
        .await?;
        Ok(secs
            .filter(|s| *s > 0.0)
            .map_or(Duration::ZERO, Duration::from_secs_f64))
    }
}

impl FenceLock {
    /// The fence's state as this transaction sees it: `(state, moved_to)`.
    pub async fn state(&mut self) -> Result<(String, Option<String>), StoreError> {
        let tenant = self.tenant;
        on_tx!(&mut self.tx, |tx, d| {
            Ok(
                sqlx::query_as(
                    "SELECT state, moved_to FROM switchyard_fences WHERE tenant_id = $1",
                )
                .bind(d.id(tenant))
                .fetch_one(&mut **tx)
                .await?,
            )
        })
    }

    /// [`EventStore::writers_older_than_fence`], asked inside this transaction (holding the
    /// fence, so the answer cannot grow until the fence moves or is released).
    pub async fn older_writers(&mut self) -> Result<Vec<OlderWriter>, StoreError> {
        match &mut self.tx {
            Tx::Postgres(tx) => Ok(older_writers(
                sqlx::query_as(OLDER_WRITERS_SQL)
                    .bind(self.tenant)
                    .bind(f64::from(FENCE_ROW_SETTLE_SECS))
                    .fetch_all(&mut **tx)
                    .await?,
            )),
            Tx::Sqlite(_) => Ok(Vec::new()),
        }
    }

    /// Sessions waiting behind this lock right now (writers the fence is holding). SQLite
    /// cannot tell: 0.
    pub async fn blocked_writers(&mut self) -> Result<i64, StoreError> {
        match &mut self.tx {
            Tx::Postgres(tx) => Ok(sqlx::query_scalar(
                "SELECT count(*) FROM pg_stat_activity WHERE pg_backend_pid() = ANY (pg_blocking_pids(pid))",
            )
            .fetch_one(&mut **tx)
            .await?),
            Tx::Sqlite(_) => Ok(0),
        }
    }

    /// Marks the fence moved to `target` under `epoch` and commits: from now on no append of
    /// the tenant lands in this store. `after` is what the fence admits from then on:
    /// [`FenceState::Copiers`] (reverse replication keeps this store current) or
    /// [`FenceState::Moved`] (nobody).
    pub async fn move_to(
        self,
        target: &str,
        epoch: i64,
        after: FenceState,
    ) -> Result<(), StoreError> {
        debug_assert!(after != FenceState::Open, "a move never opens the fence");
        match self.tx {
            Tx::Postgres(mut tx) => {
                sqlx::query(
                    "UPDATE switchyard_fences SET state = $4, moved_to = $2, epoch = $3, updated_at = now()
                     WHERE tenant_id = $1",
                )
                .bind(self.tenant)
                .bind(target)
                .bind(epoch)
                .bind(after.as_str())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
            Tx::Sqlite(mut tx) => {
                sqlx::query(
                    "UPDATE switchyard_fences SET state = ?5, moved_to = ?2, epoch = ?3, updated_at = ?4
                     WHERE tenant_id = ?1",
                )
                .bind(self.tenant.to_string())
                .bind(target)
                .bind(epoch)
                .bind(format_timestamp(&Utc::now()))
                .bind(after.as_str())
                .execute(&mut *tx)
                .await?;
                tx.commit().await?;
            }
        }
        Ok(())
    }

    /// Rolls back: the fence stays as it was, and held writers proceed.
    pub async fn release(self) -> Result<(), StoreError> {
        on_tx!(self.tx, |tx, _d| tx.rollback().await?);
        Ok(())
    }
}

impl EventStore {
    /// Opens a moved (or copiers-only) fence again (emergency stop: the tenant stays on this store). Takes the
    /// fence first, so a cutover holding it commits or rolls back before the fence is read
    /// (an `UPDATE … WHERE state = 'moved'` alone would skip a row the cutover holds, then
    /// the cutover would move it); gives up after `wait` naming the holder
    /// ([`StoreError::Held`]). Answers whether the fence was moved and is open now.
    pub async fn reopen_fence(&self, tenant: Uuid, wait: Duration) -> Result<bool, StoreError> {
        let mut lock = self.lock_fence(tenant, wait).await?;
        let (state, _) = lock.state().await?;
        if !FenceState::refuses_writers(&state) {
            lock.release().await?;
            return Ok(false);
        }
        on_tx!(lock.tx, |tx, d| {
            let mut tx = tx;
            let sql = format!(
                "UPDATE switchyard_fences SET state = 'open', moved_to = NULL, updated_at = {}
                  WHERE tenant_id = $1",
                d.fence_stamp()
            );
            sqlx::query(&sql)
                .bind(d.id(tenant))
                .execute(&mut *tx)
                .await?;
            tx.commit().await?;
        });
        Ok(true)
    }

    /// Each listed stream's event count and last version here (absent streams are left out).
    /// One statement over arrays on PostgreSQL, one per stream on SQLite (no arrays to bind).
    pub async fn stream_heads(
        &self,
        tenant: Uuid,
        streams: &[(String, Uuid)],
    ) -> Result<std::collections::HashMap<(String, Uuid), (i64, i32)>, StoreError> {
        let mut out = std::collections::HashMap::new();
        if streams.is_empty() {
            return Ok(out);
        }
        let types: Vec<&str> = streams.iter().map(|s| s.0.as_str()).collect();
        let ids: Vec<Uuid> = streams.iter().map(|s| s.1).collect();
        match &self.backend {
            Backend::Postgres(pool) => {
                let rows: Vec<(String, Uuid, i64, i32)> = sqlx::query_as(
                    "SELECT e.aggregate_type, e.aggregate_id, count(*), max(e.version)
                       FROM unnest($2::text[], $3::uuid[]) AS s(aggregate_type, aggregate_id)
                       JOIN events e ON e.aggregate_type = s.aggregate_type AND e.aggregate_id = s.aggregate_id
                      WHERE e.tenant_id = $1
                      GROUP BY e.aggregate_type, e.aggregate_id",
                )
                .bind(tenant)
                .bind(&types)
                .bind(&ids)
                .fetch_all(pool)
                .await?;
                for (t, id, count, max) in rows {
                    out.insert((t, id), (count, max));
                }
            }
            Backend::Sqlite(pool) => {
                for (t, id) in streams {
                    let row: (i64, Option<i32>) = sqlx::query_as(
                        "SELECT count(*), max(version) FROM events
                          WHERE tenant_id = ?1 AND aggregate_type = ?2 AND aggregate_id = ?3",
                    )
                    .bind(tenant.to_string())
                    .bind(t)
                    .bind(id.to_string())
                    .fetch_one(pool)
                    .await?;
                    if let (count, Some(max)) = row {
                        out.insert((t.clone(), *id), (count, max));
                    }
                }
            }
        }
        Ok(out)
    }
}

/// Creates the tenant's fence row, open, when it is missing (it exists since the migration
/// started, unless someone removed it).
fn ensure_fence_row(stamp: &str) -> String {
    format!(
        "INSERT INTO switchyard_fences (tenant_id, state, epoch, updated_at)
         VALUES ($1, 'open', 0, {stamp}) ON CONFLICT (tenant_id) DO NOTHING"
    )
}
