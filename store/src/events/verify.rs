//! What verification asks of a store: per-stream counts, last versions and digests of a
//! tenant's events, digests of version ranges (for bisection), and version slices.
//!
//! **Digests.** A stream's digest is the XOR of one 64-bit hash per event over `(event_id,
//! version, event_type, payload, actor_id, timestamp)`, every part seeded with the version, so
//! it does not depend on the order rows are read and a moved, changed, missing or extra event
//! changes it. Two flavours, never compared with each other:
//!
//! - [`Digesting::InDatabase`] (PostgreSQL only): computed by the server with its hash
//!   functions; the payload through `jsonb_hash_extended`, so key order and whitespace do not
//!   matter. Nothing but the aggregates crosses the network.
//! - [`Digesting::Canonical`] (any backend, used when either side is SQLite): rows are read
//!   and hashed here over canonical JSON (keys sorted, no whitespace) and the timestamp in
//!   microseconds, so PostgreSQL JSONB and SQLite text compare equal.
//!
//! [`Digesting::Count`] computes counts and last versions only.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::hash::{Hash, Hasher};

use futures_util::TryStreamExt;
use sqlx::Row;
use uuid::Uuid;

use super::copy::{PG_WINDOW, SQLITE_WINDOW};
use super::{Backend, EventStore, PassWindow};
use crate::event::{StoreError, StoredEvent};

/// A stream of a tenant: `(aggregate_type, aggregate_id)`.
pub type StreamKey = (String, Uuid);

/// How digests are computed (see the module docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Digesting {
    Count,
    InDatabase,
    Canonical,
}

/// One stream's summary over the rows asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct StreamDigest {
    pub count: i64,
    /// 0 when the stream has no such rows.
    pub last_version: i32,
    /// 0 with [`Digesting::Count`].
    pub digest: i64,
    /// Rows past the bound (or of a stream that was not listed): [`EventStore::bounded_digests`]
    /// only.
    pub beyond: i64,
}

/// One event's hash under PostgreSQL: its parts' hashes (each seeded with the version),
/// combined and hashed again so that XOR-ing rows cannot cancel parts against each other.
/// `timestamp AT TIME ZONE 'UTC'` keeps it independent of the session's time zone.
const PG_ROW_HASH: &str = "hashint8extended(uuid_hash_extended(e.event_id, e.version)
      # hashtextextended(concat_ws('|', e.event_type, coalesce(e.actor_id, '\u{1}'),
                                  (e.timestamp AT TIME ZONE 'UTC')::text), e.version)
      # jsonb_hash_extended(e.payload, e.version), e.version)";

/// The backend's column list for rows hashed here (`payload` as text).
const PG_COLUMNS: &str = "e.global_position, e.event_id, e.aggregate_type, e.aggregate_id, \
     e.tenant_id, e.event_type, e.version, e.actor_id, e.timestamp, e.payload::text AS payload, \
     e.created_at";
const SQLITE_COLUMNS: &str = "e.global_position, e.event_id, e.aggregate_type, e.aggregate_id, \
     e.tenant_id, e.event_type, e.version, e.actor_id, e.timestamp, e.payload, e.created_at";

/// The canonical hash of one event (see the module docs). Deterministic across processes and
/// backends: the same event read from PostgreSQL or SQLite hashes the same.
pub(super) fn canonical_event_hash(e: &StoredEvent) -> i64 {
    // FNV-1a over a length-prefixed encoding: simple, stable, and good enough to tell rows
    // apart (this is a consistency check, not an adversarial setting).
    struct Fnv(u64);
    impl Hasher for Fnv {
        fn finish(&self) -> u64 {
            self.0
        }
        fn write(&mut self, bytes: &[u8]) {
            for b in bytes {
                self.0 ^= u64::from(*b);
                self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
            }
        }
    }
    let mut h = Fnv(0xcbf2_9ce4_8422_2325);
    e.event_id.as_bytes().hash(&mut h);
    e.version.hash(&mut h);
    e.event_type.hash(&mut h);
    e.actor_id.hash(&mut h);
    e.timestamp.timestamp_micros().hash(&mut h);
    canonical_json(e.payload.get()).hash(&mut h);
    // Final avalanche (splitmix64) so XOR-combining rows mixes all bits.
    let mut z = h.finish();
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^= z >> 31;
    i64::from_ne_bytes(z.to_ne_bytes())
}

/// JSON text with sorted keys and no whitespace; the text itself when it does not parse.
pub fn canonical_json(text: &str) -> String {
    // serde_json's map is ordered by key (no `preserve_order` feature), so re-serialising
    // sorts the keys.
    serde_json::from_str::<serde_json::Value>(text)
        .map(|v| v.to_string())
        .unwrap_or_else(|_| text.to_owned())
}

/// Whether two payloads are equal as JSON (key order and whitespace aside).
pub fn json_equal(a: &str, b: &str) -> bool {
    match (
        serde_json::from_str::<serde_json::Value>(a),
        serde_json::from_str::<serde_json::Value>(b),
    ) {
        (Ok(a), Ok(b)) => a == b,
        _ => a == b,
    }
}

fn fold(map: &mut HashMap<StreamKey, StreamDigest>, e: &StoredEvent, within: bool, hash: bool) {
    let entry = map
        .entry((e.aggregate_type.clone(), e.aggregate_id))
        .or_default();
    if within {
        entry.count += 1;
        entry.last_version = entry.last_version.max(e.version);
        if hash {
            entry.digest ^= canonical_event_hash(e);
        }
    } else {
        entry.beyond += 1;
    }
}

impl EventStore {
    /// Per stream of the tenant, over its rows in `window` (a pass window as the copy uses;
    /// `PassWindow::first(i64::MAX)` is every row): count, last version and digest.
    pub async fn window_digests(
        &self,
        tenant: Uuid,
        window: PassWindow,
        mode: Digesting,
    ) -> Result<HashMap<StreamKey, StreamDigest>, StoreError> {
        let mut out = HashMap::new();
        match (&self.backend, mode) {
            (Backend::Postgres(pool), Digesting::Count | Digesting::InDatabase) => {
                let digest = if mode == Digesting::Count {
                    "0::int8".to_owned()
                } else {
                    format!("coalesce(bit_xor({PG_ROW_HASH}), 0)")
                };
                let sql = format!(
                    "SELECT e.aggregate_type, e.aggregate_id, count(*), max(e.version), {digest}
                       FROM events e WHERE {} GROUP BY 1, 2",
                    alias(PG_WINDOW)
                );
                let mut rows = sqlx::query_as::<_, (String, Uuid, i64, i32, i64)>(&sql)
                    .bind(tenant)
                    .bind(0_i64)
                    .bind(window.from.map(|f| f.to_string()))
                    .bind(window.to.to_string())
                    .fetch(pool);
                while let Some((t, id, count, last_version, digest)) = rows.try_next().await? {
                    out.insert(
                        (t, id),
                        StreamDigest {
                            count,
                            last_version,
                            digest,
                            beyond: 0,
                        },
                    );
                }
            }
            (Backend::Sqlite(pool), Digesting::Count) => {
                let sql = format!(
                    "SELECT e.aggregate_type, e.aggregate_id, count(*), max(e.version)
                       FROM events e WHERE {} GROUP BY 1, 2",
                    alias(SQLITE_WINDOW)
                );
                let mut rows = sqlx::query_as::<_, (String, String, i64, i32)>(&sql)
                    .bind(tenant.to_string())
                    .bind(0_i64)
                    .bind(window.from)
                    .bind(window.to)
                    .fetch(pool);
                while let Some((t, id, count, last_version)) = rows.try_next().await? {
                    out.insert(
                        (t, parse_uuid(&id)?),
                        StreamDigest {
                            count,
                            last_version,
                            ..StreamDigest::default()
                        },
                    );
                }
            }
            (Backend::Sqlite(_), Digesting::InDatabase) => return Err(in_database_needs_pg()),
            (_, Digesting::Canonical) => {
                self.scan_tenant(tenant, Some(window), |e, in_window| {
                    if in_window {
                        fold(&mut out, e, true, true);
                    }
                })
                .await?;
            }
        }
        Ok(out)
    }

    /// Per listed stream, over its versions up to the stream's bound: count, last version,
    /// digest. With `scan_all`, every stream of the tenant is reported and `beyond` counts the
    /// rows past the bound (or of streams not listed); otherwise only listed streams are read
    /// (through the stream index, see [`EventStore::range_digests`]) and `beyond` stays 0.
    pub async fn bounded_digests(
        &self,
        tenant: Uuid,
        bounds: &[(StreamKey, i32)],
        scan_all: bool,
        mode: Digesting,
    ) -> Result<HashMap<StreamKey, StreamDigest>, StoreError> {
        if !scan_all {
            let ranges: Vec<(StreamKey, i32, i32)> =
                bounds.iter().map(|(k, b)| (k.clone(), 1, *b)).collect();
            return self.range_digests(tenant, &ranges, mode).await;
        }
        let mut out = HashMap::new();
        match (&self.backend, mode) {
            (Backend::Postgres(pool), Digesting::Count | Digesting::InDatabase) => {
                let hash = if mode == Digesting::Count {
                    "0::int8".to_owned()
                } else {
                    format!(
                        "coalesce(bit_xor({PG_ROW_HASH}) FILTER (WHERE e.version <= b.bound), 0)"
                    )
                };
                let (types, ids) = key_columns(bounds.iter().map(|b| &b.0));
                let versions: Vec<i32> = bounds.iter().map(|b| b.1).collect();
                let sql = format!(
                    "SELECT e.aggregate_type, e.aggregate_id,
                            count(*) FILTER (WHERE e.version <= b.bound),
                            coalesce(max(e.version) FILTER (WHERE e.version <= b.bound), 0),
                            {hash},
                            count(*) FILTER (WHERE b.bound IS NULL OR e.version > b.bound)
                       FROM events e
                       LEFT JOIN unnest($2::text[], $3::uuid[], $4::int4[])
                            AS b(aggregate_type, aggregate_id, bound)
                         ON b.aggregate_id = e.aggregate_id AND b.aggregate_type = e.aggregate_type
                      WHERE e.tenant_id = $1
                      GROUP BY 1, 2"
                );
                let rows = sqlx::query_as::<_, (String, Uuid, i64, i32, i64, i64)>(&sql)
                    .bind(tenant)
                    .bind(&types)
                    .bind(&ids)
                    .bind(&versions)
                    .fetch(pool);
                collect_digests(rows, &mut out).await?;
            }
            (Backend::Sqlite(_), Digesting::InDatabase) => return Err(in_database_needs_pg()),
            (_, mode) => {
                let bound: HashMap<&StreamKey, i32> = bounds.iter().map(|(k, v)| (k, *v)).collect();
                let hash = mode != Digesting::Count;
                self.scan_tenant(tenant, None, |e, _| {
                    let key = (e.aggregate_type.clone(), e.aggregate_id);
                    match bound.get(&key) {
                        Some(b) => fold(&mut out, e, e.version <= *b, hash),
                        None => fold(&mut out, e, false, hash),
                    }
                })
                .await?;
            }
        }
        report_empty(bounds.iter().map(|(k, _)| k), &mut out);
        Ok(out)
    }

    /// Per listed stream, over its versions `lo..=hi`: count, last version, digest (`beyond`
    /// stays 0). Reads only those rows, through the stream index: the cutover compares the
    /// versions its final delta wrote with this, so the time under the fence follows the
    /// delta, not the length of the streams it touched.
    pub async fn range_digests(
        &self,
        tenant: Uuid,
        ranges: &[(StreamKey, i32, i32)],
        mode: Digesting,
    ) -> Result<HashMap<StreamKey, StreamDigest>, StoreError> {
        let mut out = HashMap::new();
        match (&self.backend, mode) {
            (Backend::Postgres(pool), Digesting::Count | Digesting::InDatabase) => {
                let hash = if mode == Digesting::Count {
                    "0::int8".to_owned()
                } else {
                    format!("coalesce(bit_xor({PG_ROW_HASH}), 0)")
                };
                let (types, ids) = key_columns(ranges.iter().map(|r| &r.0));
                let los: Vec<i32> = ranges.iter().map(|r| r.1).collect();
                let his: Vec<i32> = ranges.iter().map(|r| r.2).collect();
                let sql = format!(
                    "SELECT e.aggregate_type, e.aggregate_id, count(*),
                            coalesce(max(e.version), 0), {hash}, 0::int8
                       FROM unnest($2::text[], $3::uuid[], $4::int4[], $5::int4[])
                            AS b(aggregate_type, aggregate_id, lo, hi)
                       JOIN events e ON e.aggregate_id = b.aggregate_id
                                    AND e.aggregate_type = b.aggregate_type
                                    AND e.version BETWEEN b.lo AND b.hi
                      WHERE e.tenant_id = $1
                      GROUP BY 1, 2"
                );
                let rows = sqlx::query_as::<_, (String, Uuid, i64, i32, i64, i64)>(&sql)
                    .bind(tenant)
                    .bind(&types)
                    .bind(&ids)
                    .bind(&los)
                    .bind(&his)
                    .fetch(pool);
                collect_digests(rows, &mut out).await?;
            }
            (Backend::Sqlite(_), Digesting::InDatabase) => return Err(in_database_needs_pg()),
            (Backend::Sqlite(pool), Digesting::Count) => {
                // One statement for every range (a query per stream made the cutover's check
                // under the fence grow with the streams its delta touched: issue 17).
                let rows: Vec<(String, String, i64, i32)> = sqlx::query_as(SQLITE_RANGE_COUNTS)
                    .bind(tenant.to_string())
                    .bind(ranges_json(ranges)?)
                    .fetch_all(pool)
                    .await?;
                collect_sqlite_counts(rows, &mut out)?;
            }
            (_, mode) => {
                for (key, lo, hi) in ranges {
                    let rows = self.stream_slice(tenant, key, *lo, *hi).await?;
                    for e in &rows {
                        fold(&mut out, e, true, mode != Digesting::Count);
                    }
                }
            }
        }
        report_empty(ranges.iter().map(|(k, _, _)| k), &mut out);
        Ok(out)
    }

    /// Count and digest of one stream's versions `lo..=hi` (PostgreSQL, in the database).
    pub async fn range_digest(
        &self,
        tenant: Uuid,
        stream: &StreamKey,
        lo: i32,
        hi: i32,
    ) -> Result<(i64, i64), StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                let sql = format!(
                    "SELECT count(*), coalesce(bit_xor({PG_ROW_HASH}), 0) FROM events e
                      WHERE e.aggregate_id = $1 AND e.aggregate_type = $2 AND e.tenant_id = $3
                        AND e.version BETWEEN $4 AND $5"
                );
                Ok(sqlx::query_as(&sql)
                    .bind(stream.1)
                    .bind(&stream.0)
                    .bind(tenant)
                    .bind(lo)
                    .bind(hi)
                    .fetch_one(pool)
                    .await?)
            }
            Backend::Sqlite(_) => {
                let rows = self.stream_slice(tenant, stream, lo, hi).await?;
                let digest = rows.iter().fold(0, |d, e| d ^ canonical_event_hash(e));
                Ok((i64::try_from(rows.len()).unwrap_or(i64::MAX), digest))
            }
        }
    }

    /// One stream's events with versions `lo..=hi`, in version order.
    pub async fn stream_slice(
        &self,
        tenant: Uuid,
        stream: &StreamKey,
        lo: i32,
        hi: i32,
    ) -> Result<Vec<StoredEvent>, StoreError> {
        match &self.backend {
            Backend::Postgres(pool) => {
                let sql = format!(
                    "SELECT {PG_COLUMNS} FROM events e
                      WHERE e.aggregate_id = $1 AND e.aggregate_type = $2 AND e.tenant_id = $3
                        AND e.version BETWEEN $4 AND $5
                      ORDER BY e.version, e.global_position"
                );
                let rows = sqlx::query(&sql)
                    .bind(stream.1)
                    .bind(&stream.0)
                    .bind(tenant)
                    .bind(lo)
                    .bind(hi)
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(super::postgres::decode).collect()
            }
            Backend::Sqlite(pool) => {
                let sql = format!(
                    "SELECT {SQLITE_COLUMNS} FROM events e
                      WHERE e.aggregate_id = ?1 AND e.aggregate_type = ?2 AND e.tenant_id = ?3
                        AND e.version BETWEEN ?4 AND ?5
                      ORDER BY e.version, e.global_position"
                );
                let rows = sqlx::query(&sql)
                    .bind(stream.1.to_string())
                    .bind(&stream.0)
                    .bind(tenant.to_string())
                    .bind(lo)
                    .bind(hi)
                    .fetch_all(pool)
                    .await?;
                rows.iter().map(super::sqlite::decode).collect()
            }
        }
    }

    /// Every event of the tenant, streamed to `f` with whether it lies in `window` (`None`:
    /// every row counts as inside).
    async fn scan_tenant(
        &self,
        tenant: Uuid,
        window: Option<PassWindow>,
        mut f: impl FnMut(&StoredEvent, bool),
    ) -> Result<(), StoreError> {
        let window = window.unwrap_or(PassWindow::first(i64::MAX));
        match &self.backend {
            Backend::Postgres(pool) => {
                let sql = format!(
                    "SELECT {PG_COLUMNS}, ({}) AS in_window FROM events e WHERE e.tenant_id = $1",
                    alias(PG_WINDOW)
                );
                let mut rows = sqlx::query(&sql)
                    .bind(tenant)
                    .bind(0_i64)
                    .bind(window.from.map(|f| f.to_string()))
                    .bind(window.to.to_string())
                    .fetch(pool);
                while let Some(row) = rows.try_next().await? {
                    let inside: bool = row.try_get("in_window")?;
                    f(&super::postgres::decode(&row)?, inside);
                }
            }
            Backend::Sqlite(pool) => {
                let sql = format!(
                    "SELECT {SQLITE_COLUMNS}, ({}) AS in_window FROM events e WHERE e.tenant_id = ?1",
                    alias(SQLITE_WINDOW)
                );
                let mut rows = sqlx::query(&sql)
                    .bind(tenant.to_string())
                    .bind(0_i64)
                    .bind(window.from)
                    .bind(window.to)
                    .fetch(pool);
                while let Some(row) = rows.try_next().await? {
                    let inside: bool = row.try_get("in_window")?;
                    f(&super::sqlite::decode(&row)?, inside);
                }
            }
        }
        Ok(())
    }
}

/// The copy's window predicate over the alias `e`.
fn alias(window: &str) -> String {
    window
        .replace("tenant_id", "e.tenant_id")
        .replace("global_position", "e.global_position")
        .replace("txid", "e.txid")
}

fn parse_uuid(text: &str) -> Result<Uuid, StoreError> {
    Uuid::parse_str(text).map_err(|e| StoreError::Corrupt(format!("aggregate_id {text:?}: {e}")))
}

/// Reads `(type, id, count, last version, digest, beyond)` rows into `out`.
async fn collect_digests(
    mut rows: impl futures_util::Stream<Item = Result<(String, Uuid, i64, i32, i64, i64), sqlx::Error>>
        + Unpin,
    out: &mut HashMap<StreamKey, StreamDigest>,
) -> Result<(), StoreError> {
    while let Some((t, id, count, last_version, digest, beyond)) = rows.try_next().await? {
        out.insert(
            (t, id),
            StreamDigest {
                count,
                last_version,
                digest,
                beyond,
            },
        );
    }
    Ok(())
}

/// Count and last version per listed stream over its versions `lo..=hi` (SQLite): `?1` the
/// tenant, `?2` a JSON array of `[aggregate_type, aggregate_id, lo, hi]`. `CROSS JOIN` keeps
/// the list as the outer loop, so each range is one probe of the stream's version index.
pub(super) const SQLITE_RANGE_COUNTS: &str = "
SELECT e.aggregate_type, e.aggregate_id, count(*), coalesce(max(e.version), 0)
  FROM json_each(?2) AS r
 CROSS JOIN events e
 WHERE e.aggregate_id = json_extract(r.value, '$[1]')
   AND e.aggregate_type = json_extract(r.value, '$[0]')
   AND e.version BETWEEN json_extract(r.value, '$[2]') AND json_extract(r.value, '$[3]')
   AND e.tenant_id = ?1
 GROUP BY e.aggregate_type, e.aggregate_id";

/// `ranges` as [`SQLITE_RANGE_COUNTS`]'s `?2`.
pub(super) fn ranges_json(ranges: &[(StreamKey, i32, i32)]) -> Result<String, StoreError> {
    let list: Vec<(&str, String, i32, i32)> = ranges
        .iter()
        .map(|((t, id), lo, hi)| (t.as_str(), id.to_string(), *lo, *hi))
        .collect();
    serde_json::to_string(&list).map_err(|e| StoreError::Corrupt(e.to_string()))
}

/// [`SQLITE_RANGE_COUNTS`]'s rows into `out`.
pub(super) fn collect_sqlite_counts(
    rows: Vec<(String, String, i64, i32)>,
    out: &mut HashMap<StreamKey, StreamDigest>,
) -> Result<(), StoreError> {
    for (t, id, count, last_version) in rows {
        let id = Uuid::parse_str(&id)
            .map_err(|e| StoreError::Corrupt(format!("aggregate_id {id:?}: {e}")))?;
        out.insert(
            (t, id),
            StreamDigest {
                count,
                last_version,
                digest: 0,
                beyond: 0,
            },
        );
    }
    Ok(())
}

/// Streams as the two array parameters the queries unnest: types and ids.
fn key_columns<'a>(keys: impl Iterator<Item = &'a StreamKey>) -> (Vec<&'a str>, Vec<Uuid>) {
    keys.map(|(t, id)| (t.as_str(), *id)).unzip()
}

/// Listed streams with no rows at all are reported as empty.
pub(super) fn report_empty<'a>(
    listed: impl Iterator<Item = &'a StreamKey>,
    out: &mut HashMap<StreamKey, StreamDigest>,
) {
    for key in listed {
        if let Entry::Vacant(v) = out.entry(key.clone()) {
            v.insert(StreamDigest::default());
        }
    }
}

fn in_database_needs_pg() -> StoreError {
    StoreError::Corrupt("in-database digests need PostgreSQL on both sides".to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_json_ignores_key_order_and_whitespace() {
        assert_eq!(
            canonical_json(r#"{ "b": 1, "a": [1, {"d": 2, "c": 3}] }"#),
            canonical_json(r#"{"a":[1,{"c":3,"d":2}],"b":1}"#)
        );
        assert!(json_equal(r#"{"a": 1, "b": 2}"#, r#"{"b":2,"a":1}"#));
        assert!(!json_equal(r#"{"a": 1}"#, r#"{"a": 2}"#));
    }

    #[test]
    fn alias_prefixes_every_column_once() {
        let a = alias(PG_WINDOW);
        assert!(!a.contains("e.e."));
        assert!(a.contains("e.tenant_id = $1"));
        assert!(a.contains("e.txid < $4"));
    }
}
