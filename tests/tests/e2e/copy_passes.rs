//! The store primitives the migration engine stands on: stable-horizon passes that never skip
//! a late-committing transaction, and the target-order insert.

use std::collections::BTreeMap;

use chrono::Utc;
use serde_json::value::RawValue;
use sqlx::Connection;
use switchyard_store::{EventStore, FenceState, NewEvent, PassWindow, StoredEvent, StreamRef};
use switchyard_tests::{for_each_backend, Backend, Env, Result};
use uuid::Uuid;

fn event(kind: &str) -> Result<NewEvent> {
    Ok(NewEvent::new(
        Uuid::new_v4(),
        kind,
        RawValue::from_string(r#"{"k":1}"#.to_owned())?,
        None,
        None,
    ))
}

async fn stores(env: &Env) -> Result<(EventStore, EventStore)> {
    let source = EventStore::connect("shared", env.store_url("shared"), 4)?;
    let target = EventStore::connect("dedicated", env.store_url("dedicated"), 4)?;
    source.ensure_schema().await?;
    target.ensure_schema().await?;
    Ok((source, target))
}

/// A new `Cart` stream of `tenant`.
fn new_cart(tenant: Uuid) -> StreamRef<'static> {
    StreamRef {
        tenant_id: tenant,
        aggregate_type: "Cart",
        aggregate_id: Uuid::new_v4(),
    }
}

/// Copies one pass window into the target; returns how many rows it read.
async fn copy_pass(
    source: &EventStore,
    target: &EventStore,
    tenant: Uuid,
    window: PassWindow,
) -> Result<usize> {
    let mut after = 0;
    let mut copied = 0;
    loop {
        let batch = source.read_window(tenant, window, after, 3).await?;
        let Some(last) = batch.last() else {
            return Ok(copied);
        };
        after = last.global_position;
        let landed = target.insert_copied(&batch).await?;
        assert!(
            landed.iter().all(Option::is_some),
            "source order keeps streams in version order"
        );
        copied += batch.len();
    }
}

async fn all_ids(store: &EventStore, tenant: Uuid) -> Result<Vec<Uuid>> {
    let mut ids: Vec<Uuid> = store
        .read_tenant(tenant, 0, 10_000)
        .await?
        .iter()
        .map(|e| e.event_id)
        .collect();
    ids.sort();
    Ok(ids)
}

/// A transaction that took its position early but commits late is copied by the next pass,
/// where a position-based tail would have stepped over it for good.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_late_commit_is_never_skipped() -> Result<()> {
    let env = Env::new(Backend::Postgres, &["shared", "dedicated"], "").await?;
    let (source, target) = stores(&env).await?;
    let tenant = Uuid::new_v4();
    let stream = |aggregate_id| StreamRef {
        tenant_id: tenant,
        aggregate_type: "Order",
        aggregate_id,
    };
    source
        .append(stream(Uuid::new_v4()), Some(0), &[event("Early")?])
        .await?;

    // Hold a writer's transaction open after its insert took a position.
    let mut late = sqlx::PgConnection::connect(env.store_url("shared")).await?;
    sqlx::query("BEGIN").execute(&mut late).await?;
    let late_id = Uuid::new_v4();
    let late_position: i64 = sqlx::query_scalar(
        "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id, version, timestamp, payload)
         VALUES ($1, $2, 'Order', 'Late', $3, 1, now(), '{}') RETURNING global_position",
    )
    .bind(late_id)
    .bind(Uuid::new_v4())
    .bind(tenant)
    .fetch_one(&mut late)
    .await?;
    // Others commit after it, with higher positions.
    for _ in 0..4 {
        source
            .append(stream(Uuid::new_v4()), Some(0), &[event("After")?])
            .await?;
    }

    let first = PassWindow::first(source.horizon().await?);
    copy_pass(&source, &target, tenant, first).await?;
    let copied = all_ids(&target, tenant).await?;
    assert!(
        !copied.contains(&late_id),
        "an open transaction's row is not final yet"
    );
    assert!(
        copied.len() <= 1,
        "rows of transactions newer than the open one wait too"
    );

    sqlx::query("COMMIT").execute(&mut late).await?;
    // Pass after pass, as the tail does, until the target holds what the source holds. (Any
    // transaction open anywhere in the cluster holds the horizon back, so how many passes that
    // takes depends on what else runs; the test only bounds the time.)
    let mut window = first;
    let expected = all_ids(&source, tenant).await?;
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    while all_ids(&target, tenant).await? != expected {
        assert!(
            std::time::Instant::now() < deadline,
            "the tail never caught up"
        );
        window = window.next(source.horizon().await?);
        copy_pass(&source, &target, tenant, window).await?;
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert!(expected.contains(&late_id));
    let source_max = source
        .read_tenant(tenant, 0, 100)
        .await?
        .iter()
        .map(|e| e.global_position)
        .max();
    assert!(
        source_max > Some(late_position),
        "the late row had a lower position than rows copied before it"
    );
    assert_eq!(
        source
            .count_window(tenant, PassWindow::first(source.horizon().await?))
            .await?,
        6
    );
    Ok(())
}

fn copy_of(e: &StoredEvent) -> StoredEvent {
    StoredEvent {
        payload: e.payload.clone(),
        ..e.clone()
    }
}

/// Versions land only after their predecessor; re-inserting is idempotent; every field but the
/// position is kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_never_gets_a_gap() -> Result<()> {
    for_each_backend(|backend| async move {
        let env = Env::new(backend, &["shared", "dedicated"], "").await?;
        let (source, target) = stores(&env).await?;
        let tenant = Uuid::new_v4();
        let stream = new_cart(tenant);
        let ts = Utc::now();
        let events = vec![
            NewEvent::new(
                Uuid::new_v4(),
                "A",
                RawValue::from_string(r#"{"x":{"y":[1,2]}}"#.to_owned())?,
                Some("me".into()),
                Some(ts),
            ),
            event("B")?,
            event("C")?,
        ];
        source.append(stream, Some(0), &events).await?;
        let stored = source.read_stream(stream, 1, 10).await?;

        // v2 and v3 before v1: nothing lands.
        let landed = target
            .insert_copied(&[copy_of(&stored[1]), copy_of(&stored[2])])
            .await?;
        assert_eq!(landed, vec![None, None]);
        // v1 then v3: only v1.
        let landed = target
            .insert_copied(&[copy_of(&stored[0]), copy_of(&stored[2])])
            .await?;
        assert!(landed[0].is_some() && landed[1].is_none(), "{landed:?}");
        // Everything, twice: all land, the second time with the same positions.
        let all: Vec<StoredEvent> = stored.iter().map(copy_of).collect();
        let first = target.insert_copied(&all).await?;
        let second = target.insert_copied(&all).await?;
        assert!(first.iter().all(Option::is_some));
        assert_eq!(first, second);
        let copied = target.read_stream(stream, 1, 10).await?;
        for (a, b) in stored.iter().zip(&copied) {
            assert_eq!(
                (
                    a.event_id,
                    a.version,
                    &a.event_type,
                    &a.actor_id,
                    a.timestamp,
                    a.created_at
                ),
                (
                    b.event_id,
                    b.version,
                    &b.event_type,
                    &b.actor_id,
                    b.timestamp,
                    b.created_at
                )
            );
            let (pa, pb): (serde_json::Value, serde_json::Value) = (
                serde_json::from_str(a.payload.get())?,
                serde_json::from_str(b.payload.get())?,
            );
            assert_eq!(pa, pb);
        }
        assert_eq!(target.count_tenant(tenant).await?, 3);
        // Fences open idempotently.
        target.open_fence(tenant, 1).await?;
        target.open_fence(tenant, 2).await?;
        assert_eq!(
            target.fence(tenant).await?.map(|f| f.0),
            Some("open".to_owned())
        );
        assert_eq!(target.delete_tenant(tenant).await?, 3);
        Ok(())
    })
    .await
}

/// The tail, the final delta and several proxies' mirrors insert the same events at once, each
/// batch in its own order (a mirror batches in arrival order). Copiers racing over the same
/// rows in opposite orders deadlocked on PostgreSQL (one of them failed with 40P01 after
/// `deadlock_timeout`); they now all insert in source position order. The answers still
/// follow the caller's order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn copiers_racing_in_opposite_orders_never_deadlock() -> Result<()> {
    const ROUNDS: usize = 8;
    const PER_ROUND: usize = 300;
    for_each_backend(|backend| async move {
        let env = Env::new(backend, &["shared", "dedicated"], "").await?;
        let (source, target) = stores(&env).await?;
        let tenant = Uuid::new_v4();
        for round in 0..ROUNDS {
            // One-event streams, so every row lands whatever the order.
            for _ in 0..PER_ROUND {
                let stream = StreamRef {
                    tenant_id: tenant,
                    aggregate_type: "Order",
                    aggregate_id: Uuid::new_v4(),
                };
                source.append(stream, Some(0), &[event("Placed")?]).await?;
            }
            let window = PassWindow::first(i64::MAX);
            let mut after = 0;
            let mut fresh = Vec::new();
            loop {
                let batch = source.read_window(tenant, window, after, 500).await?;
                let Some(last) = batch.last() else { break };
                after = last.global_position;
                fresh.extend(batch);
            }
            let fresh: Vec<StoredEvent> = fresh.split_off(fresh.len() - PER_ROUND);
            let forward: Vec<StoredEvent> = fresh.iter().map(copy_of).collect();
            let backward: Vec<StoredEvent> = fresh.iter().rev().map(copy_of).collect();
            let (a, b) = tokio::join!(
                target.insert_copied(&forward),
                target.insert_copied(&backward)
            );
            let (a, b) = (a?, b.map_err(|e| anyhow::anyhow!("round {round}: {e}"))?);
            let mut b_forward = b.clone();
            b_forward.reverse();
            assert_eq!(
                a, b_forward,
                "round {round}: both answer the same positions"
            );
            let where_now = target
                .positions_of(&fresh.iter().map(|e| e.event_id).collect::<Vec<_>>())
                .await?;
            for (e, p) in backward.iter().zip(&b) {
                assert_eq!(Some(where_now[&e.event_id]), *p, "answers in input order");
            }
            // Landed in source position order.
            let positions: Vec<i64> = forward.iter().map(|e| where_now[&e.event_id]).collect();
            assert!(positions.is_sorted(), "round {round}: {positions:?}");
        }
        assert_eq!(
            target.count_tenant(tenant).await?,
            i64::try_from(ROUNDS * PER_ROUND)?
        );
        Ok(())
    })
    .await
}

/// Stream and event ids are unique per store only. A target that holds another tenant's event
/// under one of ours, or another tenant's stream under one of our stream ids, never counts
/// that as ours (issue 14 item 3): the copy answers a divergence, inserts nothing into the
/// foreign stream, and leaves the other tenant's rows as they were. The same event copied
/// twice is present, not inserted twice; another event at a taken version is a divergence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_foreign_event_or_stream_in_the_target_never_counts_as_copied() -> Result<()> {
    use switchyard_store::{Divergence, Landing};
    for_each_backend(|backend| async move {
        let env = Env::new(backend, &["shared", "dedicated"], "").await?;
        let (source, target) = stores(&env).await?;
        let (ours, theirs) = (Uuid::new_v4(), Uuid::new_v4());
        let (shared_stream, own_stream) = (Uuid::new_v4(), Uuid::new_v4());
        let on = |tenant_id, aggregate_id| StreamRef {
            tenant_id,
            aggregate_type: "Order",
            aggregate_id,
        };
        let mine = [event("A")?, event("B")?];
        source
            .append(
                on(ours, shared_stream),
                Some(0),
                &[event("S1")?, event("S2")?],
            )
            .await?;
        source.append(on(ours, own_stream), Some(0), &mine).await?;
        // The other tenant, in the target: a stream with our stream's id, and an event with
        // the id of our own stream's first event.
        target
            .append(on(theirs, shared_stream), Some(0), &[event("Theirs")?])
            .await?;
        let stolen = NewEvent::new(
            mine[0].event_id,
            "Theirs",
            RawValue::from_string(r#"{"k":1}"#.to_owned())?,
            None,
            None,
        );
        target
            .append(on(theirs, Uuid::new_v4()), Some(0), &[stolen])
            .await?;
        let before = target.read_tenant(theirs, 0, 100).await?;

        let batch = source
            .read_window(ours, PassWindow::first(i64::MAX), 0, 100)
            .await?;
        let landed = target.copy_in(&batch).await?;
        let by_id = |id: Uuid| {
            batch
                .iter()
                .zip(&landed)
                .find(|(e, _)| e.event_id == id)
                .map(|(_, l)| *l)
        };
        for e in batch.iter().filter(|e| e.aggregate_id == shared_stream) {
            assert_eq!(
                by_id(e.event_id),
                Some(Landing::Diverged(Divergence::ForeignStream)),
                "version {} of a stream the other tenant owns in the target",
                e.version
            );
        }
        assert_eq!(
            by_id(mine[0].event_id),
            Some(Landing::Diverged(Divergence::EventIdTaken)),
            "a foreign event with our id is not our event"
        );
        assert_eq!(
            target.insert_copied(&batch).await?,
            vec![None; batch.len()],
            "nothing of ours is in the target"
        );
        assert_eq!(target.count_tenant(ours).await?, 0);
        let after = target.read_tenant(theirs, 0, 100).await?;
        assert_eq!(
            after
                .iter()
                .map(|e| (e.event_id, e.aggregate_id, e.version))
                .collect::<Vec<_>>(),
            before
                .iter()
                .map(|e| (e.event_id, e.aggregate_id, e.version))
                .collect::<Vec<_>>(),
            "the other tenant's rows are unchanged"
        );
        assert_eq!(
            target.landing_status(&batch).await?,
            landed,
            "looking without writing says the same"
        );

        // A stream of ours with nothing colliding: inserted once, then present (not inserted
        // again).
        let third = Uuid::new_v4();
        source
            .append(on(ours, third), Some(0), &[event("C1")?, event("C2")?])
            .await?;
        let clean = &target;
        let own: Vec<StoredEvent> = source
            .read_stream(on(ours, third), 1, 10)
            .await?
            .iter()
            .map(copy_of)
            .collect();
        let first = clean.copy_in(&own).await?;
        assert!(
            first.iter().all(|l| matches!(l, Landing::Inserted(_))),
            "{first:?}"
        );
        let second = clean.copy_in(&own).await?;
        assert!(
            second.iter().all(|l| matches!(l, Landing::Present(_))),
            "{second:?}"
        );
        // Another event at version 2 of that stream can never land.
        let mut impostor = copy_of(&own[1]);
        impostor.event_id = Uuid::new_v4();
        assert_eq!(
            clean.copy_in(&[impostor]).await?,
            vec![Landing::Diverged(Divergence::VersionTaken)]
        );
        // The same id with other content is not that event.
        let mut altered = copy_of(&own[1]);
        altered.payload = RawValue::from_string(r#"{"k":2}"#.to_owned())?;
        assert_eq!(
            clean.copy_in(&[altered]).await?,
            vec![Landing::Diverged(Divergence::EventIdTaken)]
        );
        Ok(())
    })
    .await
}

/// Rows whose `txid` a writer set (NULL, or an old value below the horizon, as a restore or an
/// `INSERT … SELECT` of every column does) still fall into the next pass window (issue 14
/// item 13): the store stamps every inserted row with its own transaction's id.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rows_with_a_txid_set_by_the_writer_fall_in_a_later_window() -> Result<()> {
    let env = Env::new(Backend::Postgres, &["shared", "dedicated"], "").await?;
    let (source, _target) = stores(&env).await?;
    let tenant = Uuid::new_v4();
    source
        .append(
            StreamRef {
                tenant_id: tenant,
                aggregate_type: "Order",
                aggregate_id: Uuid::new_v4(),
            },
            Some(0),
            &[event("Early")?],
        )
        .await?;
    let first = PassWindow::first(source.horizon().await?);
    let mut conn = sqlx::PgConnection::connect(env.store_url("shared")).await?;
    let mut written = Vec::new();
    for txid in ["NULL", "'1'::xid8", "'3'::xid8"] {
        let id = Uuid::new_v4();
        sqlx::query(&format!(
            "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id, version, timestamp, payload, txid)
             VALUES ($1, $2, 'Order', 'Restored', $3, 1, now(), '{{}}', {txid})"
        ))
        .bind(id)
        .bind(Uuid::new_v4())
        .bind(tenant)
        .execute(&mut conn)
        .await?;
        written.push(id);
    }
    // A later window, up to a horizon past those inserts, holds them all.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let later = loop {
        let next = first.next(source.horizon().await?);
        let ids: Vec<Uuid> = source
            .read_window(tenant, next, 0, 100)
            .await?
            .iter()
            .map(|e| e.event_id)
            .collect();
        if written.iter().all(|id| ids.contains(id)) {
            break ids;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "rows with a writer-set txid never fell into a window after the first: {ids:?}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert_eq!(later.len(), 3, "{later:?}");
    Ok(())
}

/// The cutover's copy and check of its final delta in one call per store: every row's landing
/// by identity, and each listed range counted once the batch landed (rows inserted now, rows
/// already there, and a version only the target has), as the separate calls would answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copy_of_the_delta_answers_identity_and_the_landed_counts_at_once() -> Result<()> {
    for_each_backend(|backend| async move {
        let env = Env::new(backend, &["shared", "dedicated"], "").await?;
        let (source, target) = stores(&env).await?;
        let tenant = Uuid::new_v4();
        let stream = |aggregate_id| StreamRef {
            tenant_id: tenant,
            aggregate_type: "Cart",
            aggregate_id,
        };
        let (a, b) = (Uuid::new_v4(), Uuid::new_v4());
        source
            .append(
                stream(a),
                Some(0),
                &[event("A1")?, event("A2")?, event("A3")?],
            )
            .await?;
        source
            .append(stream(b), Some(0), &[event("B1")?, event("B2")?])
            .await?;
        let mut delta = source.read_tenant(tenant, 0, 100).await?;
        delta.sort_by_key(|e| e.global_position);
        let delta: Vec<StoredEvent> = delta.iter().map(copy_of).collect();
        // The target has stream a's version 1 (the mirror) and three events of its own in
        // stream b: b's delta events can never land (their versions are taken).
        let a1 = delta.iter().find(|e| e.aggregate_id == a && e.version == 1);
        target
            .insert_copied(&[a1.cloned().ok_or_else(|| anyhow::anyhow!("no a1"))?])
            .await?;
        target
            .append(
                stream(b),
                Some(0),
                &[event("X1")?, event("X2")?, event("X3")?],
            )
            .await?;

        let ranges = vec![
            (("Cart".to_owned(), a), 2, i32::MAX),
            (("Cart".to_owned(), b), 1, i32::MAX),
        ];
        let no_hint = std::collections::HashMap::new();
        let (landed, counts) = target
            .copy_in_counting(tenant, &delta, &ranges, &no_hint)
            .await?;
        for (e, landing) in delta.iter().zip(&landed) {
            let expected = match (e.aggregate_id == a, e.version) {
                (true, 1) => "present",
                (true, _) => "inserted",
                (false, _) => "diverged",
            };
            let got = match landing {
                switchyard_store::Landing::Inserted(_) => "inserted",
                switchyard_store::Landing::Present(_) => "present",
                switchyard_store::Landing::Diverged(_) => "diverged",
                switchyard_store::Landing::Waiting => "waiting",
            };
            assert_eq!(got, expected, "{} v{}", e.event_type, e.version);
        }
        let a_counts = counts[&("Cart".to_owned(), a)];
        assert_eq!((a_counts.count, a_counts.last_version), (2, 3));
        let b_counts = counts[&("Cart".to_owned(), b)];
        assert_eq!((b_counts.count, b_counts.last_version), (3, 3));
        // The same as counting afterwards, and a second copy finds everything present.
        let after = target
            .range_digests(tenant, &ranges, switchyard_store::Digesting::Count)
            .await?;
        assert_eq!(counts, after);
        let (again, counts_again) = target
            .copy_in_counting(tenant, &delta, &ranges, &no_hint)
            .await?;
        assert!(
            again
                .iter()
                .zip(&landed)
                .all(|(x, y)| x.position() == y.position()),
            "{again:?} {landed:?}"
        );
        assert_eq!(counts_again, after);
        Ok(())
    })
    .await
}

/// The cutover reads, before its pause, how far each stream holds only the tenant's rows in the
/// target (`owned_heads`), so that the fenced copy looks for another tenant's rows only past
/// that. A stream with another tenant's row or a gap is not answered; and another tenant's row
/// written right past the answer (by a direct writer: Switchyard's own append refuses a stream
/// of another tenant) still keeps the delta out of that stream. PostgreSQL only: SQLite's
/// landing takes no such answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_tenants_row_past_what_the_tenant_owned_still_keeps_the_delta_out() -> Result<()> {
    use switchyard_store::{Divergence, Landing};
    let env = Env::new(Backend::Postgres, &["shared", "dedicated"], "").await?;
    let (source, target) = stores(&env).await?;
    let mut db = sqlx::PgConnection::connect(env.store_url("dedicated")).await?;
    let (ours, theirs) = (Uuid::new_v4(), Uuid::new_v4());
    let (kept, mixed, gapped) = (new_cart(ours), new_cart(ours), new_cart(ours));
    for s in [kept, mixed, gapped] {
        source
            .append(s, Some(0), &[event("1")?, event("2")?, event("3")?])
            .await?;
    }
    let window = PassWindow::first(source.horizon().await?);
    copy_pass(&source, &target, ours, window).await?;
    // A direct writer's row of another tenant at the next version of a stream.
    let theirs_at = |s: StreamRef<'static>, version: i32| {
        sqlx::query(
            "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id, \
             version, timestamp, payload) VALUES ($1, $2, 'Cart', 'Theirs', $3, $4, now(), '{}')",
        )
        .bind(Uuid::new_v4())
        .bind(s.aggregate_id)
        .bind(theirs)
        .bind(version)
    };
    theirs_at(mixed, 4).execute(&mut db).await?;
    // A gap: version 2 of `gapped` is gone from the target.
    sqlx::query("DELETE FROM events WHERE aggregate_id = $1 AND version = 2")
        .bind(gapped.aggregate_id)
        .execute(&mut db)
        .await?;
    let key = |s: StreamRef<'static>| (s.aggregate_type.to_owned(), s.aggregate_id);
    let absent = new_cart(ours);
    let owned = target
        .owned_heads(ours, &[key(kept), key(mixed), key(gapped), key(absent)])
        .await?;
    assert_eq!(
        owned,
        [(key(kept), 3)].into_iter().collect(),
        "only the stream wholly the tenant's, without a gap"
    );

    // Another tenant's row lands right past what `kept` was owned through; then the tenant's
    // next two versions, the final delta.
    theirs_at(kept, 4).execute(&mut db).await?;
    source
        .append(kept, Some(3), &[event("4")?, event("5")?])
        .await?;
    let delta: Vec<StoredEvent> = source
        .read_tenant(ours, 0, 100)
        .await?
        .into_iter()
        .filter(|e| e.aggregate_id == kept.aggregate_id && e.version > 3)
        .collect();
    let ranges = vec![(key(kept), 4, i32::MAX)];
    let (landed, counts) = target
        .copy_in_counting(ours, &delta, &ranges, &owned)
        .await?;
    assert_eq!(
        landed,
        vec![
            Landing::Diverged(Divergence::ForeignStream),
            Landing::Diverged(Divergence::ForeignStream)
        ],
        "the tenant's versions 4 and 5 on a stream another tenant wrote version 4 of"
    );
    assert_eq!(counts[&key(kept)].count, 0, "none of ours past version 3");
    Ok(())
}

/// A transaction open in another database of the same server (another store, the control
/// database, anyone's) never holds a pass back: the horizon passes rows committed after it
/// began. With `pg_snapshot_xmin` (the whole server's oldest running transaction) the pass
/// stopped below it for as long as it stayed open.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn another_databases_open_transaction_never_holds_a_pass_back() -> Result<()> {
    let env = Env::new(Backend::Postgres, &["shared", "dedicated"], "").await?;
    let (source, _target) = stores(&env).await?;
    // An open transaction with an id, in the other store's database.
    let mut elsewhere = sqlx::PgConnection::connect(env.store_url("dedicated")).await?;
    sqlx::query("BEGIN").execute(&mut elsewhere).await?;
    let older: i64 = sqlx::query_scalar("SELECT txid_current()::bigint")
        .fetch_one(&mut elsewhere)
        .await?;
    let tenant = Uuid::new_v4();
    source
        .append(
            StreamRef {
                tenant_id: tenant,
                aggregate_type: "Order",
                aggregate_id: Uuid::new_v4(),
            },
            Some(0),
            &[event("Committed")?],
        )
        .await?;
    let committed: i64 =
        sqlx::query_scalar("SELECT max(txid::text::bigint) FROM events WHERE tenant_id = $1")
            .bind(tenant)
            .fetch_one(&mut sqlx::PgConnection::connect(env.store_url("shared")).await?)
            .await?;
    assert!(committed > older, "the row's transaction began later");
    let horizon = source.horizon().await?;
    assert!(
        horizon > committed,
        "the horizon {horizon} passes the committed row's transaction {committed}, not held at {older}"
    );
    let first = PassWindow::first(horizon);
    let read = source.read_window(tenant, first, 0, 10).await?;
    assert_eq!(read.len(), 1, "the committed row is in the first pass");
    sqlx::query("ROLLBACK").execute(&mut elsewhere).await?;
    Ok(())
}

/// Issue 19: a copier whose statement began before the tenant's rows in the target were
/// deleted (`migrate start --reset-target` in the store the tenant left, whose fence goes
/// from `copiers` to `moved`, is emptied, and admits copiers again for the new migration)
/// computed its stream heads from rows that are gone. Its fence check runs at the end of the
/// statement and sees `copiers` again: it must be refused there, not land a version above a
/// missing one (the gap left the next migration's copy waiting for ever on version 1: seen
/// once in `fault_scenarios::a_control_crash_at_every_cutover_step_is_finished_or_rolled_back`).
/// The copier is held mid-statement by an uncommitted row at the same stream version.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_copier_racing_a_reset_of_the_target_never_leaves_a_gap() -> Result<()> {
    let env = Env::new(Backend::Postgres, &["shared", "dedicated"], "").await?;
    let (source, target) = stores(&env).await?;
    let tenant = Uuid::new_v4();
    let stream = new_cart(tenant);
    let aggregate_id = stream.aggregate_id;
    let events: Vec<NewEvent> = (0..5).map(|_| event("E")).collect::<Result<_>>()?;
    source.append(stream, Some(0), &events).await?;
    let stored = source.read_stream(stream, 1, 10).await?;
    target.admit_copiers_only(tenant, 1, "shared").await?;
    let landed = target.insert_copied(&stored[..4]).await?;
    assert!(landed.iter().all(Option::is_some), "{landed:?}");

    // Another transaction holds version 5 of the stream, uncommitted (triggers off, so it
    // holds no fence row): the copier's insert of version 5 waits for it mid-statement.
    let mut blocker = sqlx::PgConnection::connect(env.store_url("dedicated")).await?;
    sqlx::query("BEGIN").execute(&mut blocker).await?;
    sqlx::query("SET LOCAL session_replication_role = replica")
        .execute(&mut blocker)
        .await?;
    sqlx::query(
        "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id,
                             version, timestamp, payload, created_at)
         VALUES ($1, $2, 'Cart', 'Held', $3, 5, now(), '{}', now())",
    )
    .bind(Uuid::new_v4())
    .bind(aggregate_id)
    .bind(tenant)
    .execute(&mut blocker)
    .await?;
    let copier = {
        let target = target.clone();
        let last = copy_of(&stored[4]);
        tokio::spawn(async move { target.insert_copied(&[last]).await })
    };
    let watch = sqlx::PgPool::connect(env.store_url("dedicated")).await?;
    switchyard_tests::wait_for_every(
        std::time::Duration::from_secs(10),
        std::time::Duration::from_millis(20),
        || {
            let watch = watch.clone();
            async move {
                let waiting: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM pg_stat_activity
                      WHERE datname = current_database() AND wait_event_type = 'Lock'
                        AND query LIKE '%switchyard.copier%'",
                )
                .fetch_one(&watch)
                .await?;
                Ok(waiting > 0)
            }
        },
    )
    .await?;

    // Meanwhile: the fence moves, the tenant's rows go, copiers are admitted again.
    let lock = target
        .lock_fence(tenant, std::time::Duration::from_secs(5))
        .await?;
    lock.move_to("shared", 2, FenceState::Moved).await?;
    assert_eq!(target.delete_tenant(tenant).await?, 4);
    target.admit_copiers_only(tenant, 3, "shared").await?;
    sqlx::query("ROLLBACK").execute(&mut blocker).await?;

    let answer = copier.await?;
    let versions: Vec<i32> =
        sqlx::query_scalar("SELECT version FROM events WHERE aggregate_id = $1 ORDER BY version")
            .bind(aggregate_id)
            .fetch_all(&watch)
            .await?;
    assert!(
        versions
            .iter()
            .copied()
            .eq(1..=i32::try_from(versions.len())?),
        "the target holds versions {versions:?} of the stream (the copier answered {answer:?})"
    );
    // A copier starting now lands the whole stream.
    let all: Vec<StoredEvent> = stored.iter().map(copy_of).collect();
    let landed = target.insert_copied(&all).await?;
    assert!(landed.iter().all(Option::is_some), "{landed:?}");
    Ok(())
}

/// Rows read through each of `events`' indexes, per the server's statistics.
async fn index_reads(url: &str) -> Result<BTreeMap<String, i64>> {
    let mut c = sqlx::PgConnection::connect(url).await?;
    let rows: Vec<(String, i64)> = sqlx::query_as(
        "SELECT indexrelname::text, idx_tup_read FROM pg_stat_user_indexes
          WHERE relname = 'events'",
    )
    .fetch_all(&mut c)
    .await?;
    Ok(rows.into_iter().collect())
}

/// Found by a revert test that hung on the CI machine (autovacuum off there, so nothing ever
/// analyzes a store): a long-lived session settles, after five runs of a prepared statement, on
/// one generic plan for it, made for the store as it was then, and keeps it until the table's
/// statistics change. Made on a nearly empty store, the copiers' landing and classifying
/// statements read a stream through `events`' index on `aggregate_type` and tenant: on the
/// grown store, every row of that type, per stream and per row. One classifying statement of a
/// revert's tail batch ran for over 7 minutes (`EXPLAIN` of its generic plan on an 800-row
/// store: the type index), and the revert never caught up. The control plane's sessions plan
/// each run for the store as it is ([`switchyard_store::url::Planning::EachRun`]).
///
/// The target database makes every session use generic plans (`plan_cache_mode`, what a
/// settled session does); a control-plane pool of one session copies and classifies batches
/// on a small store (800 rows of another type), the store then grows by 200,000 rows of the
/// copied type, and the same statements run again on that session: they read fewer index
/// entries than the store grew by (counted by the server's statistics, flushed when the session
/// ends); before, 6,440,480 through the type index.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn statements_planned_on_a_small_store_do_not_scan_it_once_it_grew() -> Result<()> {
    const GROWTH: i64 = 200_000;
    let env = Env::new(Backend::Postgres, &["shared", "dedicated"], "").await?;
    let url = env.store_url("dedicated");
    let source = EventStore::connect("shared", env.store_url("shared"), 2)?;
    source.ensure_schema().await?;
    let mut c = sqlx::PgConnection::connect(url).await?;
    let db: String = sqlx::query_scalar("SELECT current_database()")
        .fetch_one(&mut c)
        .await?;
    sqlx::query(&format!(
        "ALTER DATABASE \"{db}\" SET plan_cache_mode = force_generic_plan"
    ))
    .execute(&mut c)
    .await?;
    c.close().await?;
    let target = EventStore::connect_copier("dedicated", url, 1)?;
    target.ensure_schema().await?;
    let tenant = Uuid::new_v4();
    // Batches of 20 events of 4 streams, as a copier lands them.
    let workload = || {
        let (source, target) = (&source, &target);
        async move {
            let mut written = Vec::new();
            for _ in 0..4 {
                let events = (0..5).map(|_| event("Added")).collect::<Result<Vec<_>>>()?;
                let stream = new_cart(tenant);
                source.append(stream, Some(0), &events).await?;
                written.extend(source.read_stream(stream, 0, 100).await?);
            }
            let batch: Vec<StoredEvent> = written.iter().map(copy_of).collect();
            let landed = target.insert_copied(&batch).await?;
            assert!(landed.iter().all(Option::is_some), "{landed:?}");
            target.landing_status(&batch).await?;
            Result::<()>::Ok(())
        }
    };
    let grow = |rows: i64, aggregate_type: &'static str| async move {
        let mut c = sqlx::PgConnection::connect(url).await?;
        sqlx::query(
            "INSERT INTO events (event_id, aggregate_id, aggregate_type, event_type, tenant_id,
                                 version, timestamp, payload)
             SELECT gen_random_uuid(), gen_random_uuid(), $3, 'Added', $1, 1, now(), '{}'
               FROM generate_series(1, $2)",
        )
        .bind(Uuid::new_v4())
        .bind(rows)
        .bind(aggregate_type)
        .execute(&mut c)
        .await?;
        c.close().await?;
        Result::<()>::Ok(())
    };
    // Another type, so that reading the small store through the type index reads little.
    grow(800, "Order").await?;
    for _ in 0..10 {
        workload().await?;
    }
    grow(GROWTH, "Cart").await?;
    let before = index_reads(url).await?;
    workload().await?;
    // The session's statistics reach the server when it ends.
    target.close().await;
    let mut read = BTreeMap::new();
    for _ in 0..100 {
        read = index_reads(url).await?;
        for (index, n) in &mut read {
            *n -= before.get(index).copied().unwrap_or_default();
        }
        read.retain(|_, n| *n > 0);
        if !read.is_empty() {
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    let total: i64 = read.values().sum();
    assert!(total > 0, "the session's index reads were counted");
    // The small store's reads may be counted here too (a session's statistics are flushed
    // when it goes idle, at most once a second): a few tens of thousands. One look at a stream
    // through the type index on the grown store reads the 200,000 rows it grew by.
    assert!(
        total < GROWTH,
        "copying and classifying 20 events read {total} index entries, more than the store grew \
         by: {read:?}"
    );
    Ok(())
}
