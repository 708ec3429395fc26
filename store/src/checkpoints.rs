//! eventsource-py subscription checkpoints (`projection_checkpoints`) in an application's
//! database, read and rewritten by `checkpoints migrate`.

use sqlx::{PgPool, Row, SqlitePool};
use uuid::Uuid;

use crate::event::StoreError;
use crate::url::{pg_pool, sqlite_pool, StoreUrl};

/// One projection's checkpoint.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Checkpoint {
    pub projection_name: String,
    pub global_position: Option<i64>,
    pub last_event_id: Option<Uuid>,
}

/// A rewrite of one checkpoint, applied only if the row still holds `from`.
#[derive(Debug, Clone)]
pub struct CheckpointRewrite {
    pub from: Checkpoint,
    pub global_position: i64,
    pub last_event_id: Uuid,
}

/// The database holding the checkpoints.
#[derive(Debug, Clone)]
pub enum CheckpointDb {
    Postgres(PgPool),
    Sqlite(SqlitePool),
}

impl CheckpointDb {
    pub fn connect(url: &str) -> Result<Self, StoreError> {
        Ok(match StoreUrl::parse(url)? {
            StoreUrl::Postgres(url) => Self::Postgres(pg_pool(&url, 2)?),
            StoreUrl::Sqlite(path) => Self::Sqlite(sqlite_pool(&path, 1)?),
        })
    }

    /// The checkpoints, by name; only `names` when given.
    pub async fn list(&self, names: Option<&[String]>) -> Result<Vec<Checkpoint>, StoreError> {
        let sql =
            "SELECT projection_name, global_position, CAST(last_event_id AS TEXT) AS last_event_id
                     FROM projection_checkpoints ORDER BY projection_name";
        let rows = match self {
            Self::Postgres(pool) => sqlx::query(sql)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| decode(r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))
                .collect::<Result<Vec<_>, StoreError>>()?,
            Self::Sqlite(pool) => sqlx::query(sql)
                .fetch_all(pool)
                .await?
                .iter()
                .map(|r| decode(r.try_get(0)?, r.try_get(1)?, r.try_get(2)?))
                .collect::<Result<Vec<_>, StoreError>>()?,
        };
        Ok(match names {
            Some(names) => rows
                .into_iter()
                .filter(|c| names.contains(&c.projection_name))
                .collect(),
            None => rows,
        })
    }

    /// Applies every rewrite in one transaction, each as a compare-and-set on the row's old
    /// values; answers the names whose rows changed meanwhile (nothing is applied then).
    pub async fn rewrite(&self, rewrites: &[CheckpointRewrite]) -> Result<Vec<String>, StoreError> {
        let mut changed = Vec::new();
        macro_rules! apply {
            ($pool:expr, $sql:expr) => {{
                let mut tx = $pool.begin().await?;
                for r in rewrites {
                    let done = sqlx::query($sql)
                        .bind(r.global_position)
                        .bind(r.last_event_id.to_string())
                        .bind(&r.from.projection_name)
                        .bind(r.from.global_position)
                        .bind(r.from.last_event_id.map(|u| u.to_string()))
                        .execute(&mut *tx)
                        .await?;
                    if done.rows_affected() != 1 {
                        changed.push(r.from.projection_name.clone());
                    }
                }
                if changed.is_empty() {
                    tx.commit().await?;
                } else {
                    tx.rollback().await?;
                }
            }};
        }
        match self {
            Self::Postgres(pool) => apply!(
                pool,
                "UPDATE projection_checkpoints
                    SET global_position = $1, last_event_id = $2::uuid, updated_at = now()
                  WHERE projection_name = $3 AND global_position IS NOT DISTINCT FROM $4
                    AND last_event_id IS NOT DISTINCT FROM $5::uuid"
            ),
            Self::Sqlite(pool) => apply!(
                pool,
                "UPDATE projection_checkpoints
                    SET global_position = ?1, last_event_id = ?2, updated_at = CURRENT_TIMESTAMP
                  WHERE projection_name = ?3 AND global_position IS ?4 AND last_event_id IS ?5"
            ),
        }
        Ok(changed)
    }

    pub async fn close(&self) {
        match self {
            Self::Postgres(pool) => pool.close().await,
            Self::Sqlite(pool) => pool.close().await,
        }
    }
}

fn decode(
    name: String,
    position: Option<i64>,
    event: Option<String>,
) -> Result<Checkpoint, StoreError> {
    Ok(Checkpoint {
        projection_name: name,
        global_position: position,
        last_event_id: event
            .map(|e| {
                Uuid::parse_str(&e)
                    .map_err(|err| StoreError::Corrupt(format!("last_event_id {e:?}: {err}")))
            })
            .transpose()?,
    })
}
