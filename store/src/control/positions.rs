//! `migration_position_map`: where each copied event of a migration landed (source position →
//! target position), and the translation of subscription checkpoints through it.

use uuid::Uuid;

use super::migrations::MigrationError;
use super::Backend;
use super::ControlDb;
use crate::dialect::on_backend;
use crate::event::StoreError;

/// The smallest target position of the migration's events past source position `$2` (or
/// past every target position when there is none): a translated checkpoint stays below it.
const NEXT_UNSEEN: &str = "coalesce((SELECT min(n.target_position) FROM migration_position_map n
                     WHERE n.migration_id = $1 AND n.source_position > $2), 9223372036854775807)";

/// A source position's place in the target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct Translation {
    /// The source position of the event at `target_position`: the one asked for when
    /// `exact`, else one below it.
    pub source_position: i64,
    pub target_position: i64,
    pub exact: bool,
}

impl ControlDb {
    /// Records `(source_position, target_position, event_id)` triples of copied events in one
    /// statement. Idempotent: a source position already mapped keeps its first mapping.
    /// Returns how many were new.
    pub async fn insert_position_map(
        &self,
        migration_id: Uuid,
        positions: &[(i64, i64, Uuid)],
    ) -> Result<u64, MigrationError> {
        if positions.is_empty() {
            return Ok(0);
        }
        let affected = match &self.backend {
            Backend::Postgres(pool) => {
                let (sources, (targets, ids)): (Vec<i64>, (Vec<i64>, Vec<Uuid>)) =
                    positions.iter().map(|&(s, t, e)| (s, (t, e))).unzip();
                sqlx::query(
                    "INSERT INTO migration_position_map
                         (migration_id, source_position, target_position, event_id)
                     SELECT $1, s, t, e FROM UNNEST($2::bigint[], $3::bigint[], $4::uuid[])
                         AS batch (s, t, e)
                     ON CONFLICT (migration_id, source_position) DO NOTHING",
                )
                .bind(migration_id)
                .bind(sources)
                .bind(targets)
                .bind(ids)
                .execute(pool)
                .await?
                .rows_affected()
            }
            Backend::Sqlite(pool) => {
                // One JSON array parameter, so any batch size fits SQLite's parameter limit.
                let batch = serde_json::to_string(positions)
                    .map_err(|e| StoreError::Corrupt(format!("position batch: {e}")))?;
                sqlx::query(
                    "INSERT INTO migration_position_map
                         (migration_id, source_position, target_position, event_id)
                     SELECT $1, json_extract(value, '$[0]'), json_extract(value, '$[1]'),
                            json_extract(value, '$[2]')
                     FROM json_each($2) WHERE true
                     ON CONFLICT (migration_id, source_position) DO NOTHING",
                )
                .bind(migration_id.to_string())
                .bind(batch)
                .execute(pool)
                .await?
                .rows_affected()
            }
        };
        Ok(affected)
    }

    /// How many events the position map holds for the migration.
    pub async fn position_map_len(&self, migration_id: Uuid) -> Result<i64, MigrationError> {
        Ok(on_backend!(self, |pool, d| {
            sqlx::query_scalar::<_, i64>(
                "SELECT count(*) FROM migration_position_map WHERE migration_id = $1",
            )
            .bind(d.id(migration_id))
            .fetch_one(pool)
            .await?
        }))
    }

    /// The target position a subscription checkpoint at `source_position` continues from:
    /// just before the smallest target position of the tenant's events with a source position
    /// past it, so everything it has not seen is delivered (some it has seen may be delivered
    /// again), never skipped. Target positions follow landing order, not source order (the
    /// mirror and the tail land concurrently), so "the event at the checkpoint" is not the
    /// answer. Given as the mapped event with the largest target position below that one
    /// (its source position is at or below the checkpoint): `exact` when it is the
    /// checkpoint's own event. `None` when the first event in the target is already past the
    /// checkpoint (start the subscription at 0).
    pub async fn translate_position(
        &self,
        migration_id: Uuid,
        source_position: i64,
    ) -> Result<Option<Translation>, MigrationError> {
        Ok(self
            .translate_with_event(migration_id, source_position)
            .await?
            .map(|(translation, _)| translation))
    }

    /// Like [`Self::translate_position`], with the event recorded at the answered position.
    pub async fn translate_with_event(
        &self,
        migration_id: Uuid,
        source_position: i64,
    ) -> Result<Option<(Translation, Uuid)>, MigrationError> {
        let found: Option<(i64, i64, String)> = on_backend!(self, |pool, d| {
            let sql = format!(
                "SELECT source_position, target_position, CAST(event_id AS TEXT)
                   FROM migration_position_map
                  WHERE migration_id = $1 AND target_position < {NEXT_UNSEEN}
                  ORDER BY target_position DESC LIMIT 1",
            );
            sqlx::query_as(&sql)
                .bind(d.id(migration_id))
                .bind(source_position)
                .fetch_optional(pool)
                .await?
        });
        found
            .map(|(source, target, event)| {
                let event = Uuid::parse_str(&event).map_err(|e| {
                    MigrationError::Store(StoreError::Corrupt(format!(
                        "position map event_id: {e}"
                    )))
                })?;
                Ok((
                    Translation {
                        source_position: source,
                        target_position: target,
                        exact: source == source_position,
                    },
                    event,
                ))
            })
            .transpose()
    }

    /// Whether the migration mapped some source position to `target_position` for `event_id`:
    /// a checkpoint already holding that pair was translated before.
    pub async fn maps_to_target(
        &self,
        migration_id: Uuid,
        target_position: i64,
        event_id: Uuid,
    ) -> Result<bool, MigrationError> {
        let n: i64 = on_backend!(self, |pool, d| {
            sqlx::query_scalar(
                "SELECT count(*) FROM migration_position_map
                  WHERE migration_id = $1 AND target_position = $2
                    AND CAST(event_id AS TEXT) = $3",
            )
            .bind(d.id(migration_id))
            .bind(target_position)
            .bind(event_id.to_string())
            .fetch_one(pool)
            .await?
        });
        Ok(n > 0)
    }
}

/// The most migrations a feed cursor is translated through (a tenant moved on and on, or back
/// and forth); past it the cursor is not translated.
const MAX_CURSOR_HOPS: usize = 16;

impl ControlDb {
    /// Where a feed cursor at `position` of store `from_store` continues in `to_store`, the
    /// store the tenant now reads from: the first position there that the cursor's consumer
    /// may not have seen, to be read with `FeedStart::From` (every event of the tenant at or
    /// past it is delivered, so none is skipped; some seen before may come again). Follows the
    /// tenant's migrations from `from_store` on (the latest one in `cutover` or `migrated`
    /// leaving each store: a cutover moves the fence only after its position map is
    /// complete), translating through each one's map ([`Self::first_unseen_target`]). `None`
    /// when no such chain of migrations leads from `from_store` to `to_store`.
    pub async fn translate_feed_cursor(
        &self,
        tenant_id: Uuid,
        from_store: &str,
        position: i64,
        to_store: &str,
    ) -> Result<Option<i64>, MigrationError> {
        let mut store = from_store.to_owned();
        // "Every event at or past `first` may be unseen" in `store`'s positions.
        let mut first = position.saturating_add(1);
        for _ in 0..MAX_CURSOR_HOPS {
            if store == to_store {
                return Ok(Some(first));
            }
            let Some((migration, target)) = self.moved_from(tenant_id, &store).await? else {
                return Ok(None);
            };
            first = self.first_unseen_target(migration, first - 1).await?;
            store = target;
        }
        Ok((store == to_store).then_some(first))
    }

    /// The tenant's latest migration off `store` whose fence moved or may have moved (its
    /// position map is then complete), with its target.
    async fn moved_from(
        &self,
        tenant_id: Uuid,
        store: &str,
    ) -> Result<Option<(Uuid, String)>, MigrationError> {
        let found: Option<(String, String)> = on_backend!(self, |pool, d| {
            sqlx::query_as(
                "SELECT CAST(id AS TEXT), target_store_id FROM tenant_migrations
                  WHERE tenant_id = $1 AND source_store_id = $2
                    AND state IN ('cutover', 'migrated')
                  ORDER BY created_at DESC, id DESC LIMIT 1",
            )
            .bind(d.id(tenant_id))
            .bind(store)
            .fetch_optional(pool)
            .await?
        });
        found
            .map(|(id, target)| {
                let id = Uuid::parse_str(&id).map_err(|e| {
                    MigrationError::Store(StoreError::Corrupt(format!("migration id: {e}")))
                })?;
                Ok((id, target))
            })
            .transpose()
    }

    /// The first target position a consumer that saw the source up to `source_position` may
    /// not have seen: the smallest target position of the migration's events past it, else
    /// (it saw them all) one past the largest mapped target position — the tenant's events
    /// appended to the target after the cutover come after every copied one — else (nothing
    /// was copied) 0. Every event the consumer has not seen is at or past it in the target.
    pub async fn first_unseen_target(
        &self,
        migration_id: Uuid,
        source_position: i64,
    ) -> Result<i64, MigrationError> {
        Ok(on_backend!(self, |pool, d| {
            sqlx::query_scalar::<_, i64>(
                "SELECT coalesce(
                     (SELECT min(target_position) FROM migration_position_map
                       WHERE migration_id = $1 AND source_position > $2),
                     (SELECT max(target_position) + 1 FROM migration_position_map
                       WHERE migration_id = $1),
                     0)",
            )
            .bind(d.id(migration_id))
            .bind(source_position)
            .fetch_one(pool)
            .await?
        }))
    }
}
