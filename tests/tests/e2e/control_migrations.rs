//! The control database's migration records, against a fresh PostgreSQL database and a fresh
//! SQLite file: creation under the one-active-migration rule, compare-and-set transitions with
//! their audit rows and routes, progress, the position map, worker claims and proxy
//! heartbeats. Every scenario runs unchanged on both backends.

use std::future::Future;
use std::time::Duration;

use anyhow::{bail, ensure, Context as _};
use serde_json::json;
use switchyard_store::control::{Action, Progress, ProxyDetails, Translation};
use switchyard_store::{
    AuditNote, ControlDb, ErrorKind, MigrationError, MigrationRecord, MigrationState, NewMigration,
    RoutingState,
};
use switchyard_tests::{wait_for, Backend, Env, Result};
use uuid::Uuid;

/// Runs `scenario` on a fresh control database of every backend (schema created twice, to
/// show it is idempotent).
async fn on_every_backend<F, Fut>(scenario: F) -> Result<()>
where
    F: Fn(ControlDb) -> Fut,
    Fut: Future<Output = Result<()>>,
{
    for backend in Backend::ALL {
        let env = Env::new(backend, &["shared", "dedicated"], "").await?;
        let db = ControlDb::connect(&env.control_url, 16)?;
        db.ensure_schema().await?;
        db.ensure_schema().await?;
        let outcome = scenario(db.clone()).await;
        db.close().await;
        outcome.with_context(|| format!("on {backend:?}"))?;
    }
    Ok(())
}

fn new_migration(tenant_id: Uuid) -> NewMigration {
    NewMigration {
        tenant_id,
        source_store_id: "shared".to_owned(),
        target_store_id: "dedicated".to_owned(),
        config: json!({ "batch_size": 1000, "cutover": "manual" }),
        route_epoch: None,
        claim: None,
    }
}

fn operator() -> AuditNote {
    AuditNote::new("alice").with_reason("ticket 42")
}

async fn create(db: &ControlDb, tenant_id: Uuid) -> Result<MigrationRecord> {
    Ok(db
        .create_migration(&new_migration(tenant_id), &operator())
        .await?)
}

/// Applies `action` from the migration's current state, writing the route it implies.
async fn step(db: &ControlDb, id: Uuid, action: Action) -> Result<MigrationRecord> {
    let current = db.migration(id).await?;
    let to = switchyard_store::control::lifecycle::next(current.phase(), action)?.state;
    let route = current.implied_route(to);
    let done = db
        .transition(id, current.state, action, &operator(), Some(&route))
        .await?;
    Ok(done.record)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_active_migration_per_tenant() -> Result<()> {
    on_every_backend(|db| async move {
        let tenant = Uuid::new_v4();
        let first = create(&db, tenant).await?;
        assert_eq!(first.state, MigrationState::Pending);
        assert_eq!(first.paused_from, None);
        assert_eq!(first.config["batch_size"], 1000);
        assert_eq!((first.events_total, first.events_copied), (0, 0));
        assert!(first.started_at.is_none() && first.completed_at.is_none());
        assert_eq!(db.migration(first.id).await?, first);

        let log = db.audit_log(first.id).await?;
        assert_eq!(log.len(), 1);
        assert_eq!(log[0].action, "create");
        assert_eq!(log[0].to_state, Some(MigrationState::Pending));
        assert_eq!(log[0].actor, "alice");
        assert_eq!(log[0].reason.as_deref(), Some("ticket 42"));

        match db
            .create_migration(&new_migration(tenant), &operator())
            .await
        {
            Err(MigrationError::AlreadyActive {
                tenant_id,
                existing_id,
                state,
            }) => {
                assert_eq!((tenant_id, existing_id), (tenant, first.id));
                assert_eq!(state, MigrationState::Pending);
            }
            other => bail!("second create: {other:?}"),
        }

        let other_tenant = create(&db, Uuid::new_v4()).await?;
        let same_store = NewMigration {
            target_store_id: "shared".to_owned(),
            ..new_migration(Uuid::new_v4())
        };
        assert!(matches!(
            db.create_migration(&same_store, &operator()).await,
            Err(MigrationError::SameStore(_))
        ));

        let aborted = step(&db, first.id, Action::Abort).await?;
        assert_eq!(aborted.state, MigrationState::RolledBack);
        assert!(aborted.completed_at.is_some());
        let second = create(&db, tenant).await?;
        assert_ne!(second.id, first.id);
        assert_eq!(db.active_migration(tenant).await?, Some(second.clone()));

        let all: Vec<Uuid> = db.migrations(false).await?.iter().map(|m| m.id).collect();
        assert_eq!(all, vec![first.id, other_tenant.id, second.id]);
        let active: Vec<Uuid> = db.migrations(true).await?.iter().map(|m| m.id).collect();
        assert_eq!(active, vec![other_tenant.id, second.id]);

        let unknown = Uuid::new_v4();
        assert!(matches!(
            db.migration(unknown).await,
            Err(MigrationError::NotFound(id)) if id == unknown
        ));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_creators_get_one_winner() -> Result<()> {
    on_every_backend(|db| async move {
        let tenant = Uuid::new_v4();
        let tasks: Vec<_> = (0..8)
            .map(|_| {
                let db = db.clone();
                tokio::spawn(async move {
                    db.create_migration(&new_migration(tenant), &operator())
                        .await
                })
            })
            .collect();
        let mut winners = Vec::new();
        let mut refused = 0;
        for task in tasks {
            match task.await? {
                Ok(record) => winners.push(record.id),
                Err(MigrationError::AlreadyActive { .. }) => refused += 1,
                Err(e) => bail!("unexpected: {e}"),
            }
        }
        assert_eq!(winners.len(), 1, "winners {winners:?}");
        assert_eq!(refused, 7);
        assert_eq!(db.migrations(false).await?.len(), 1);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn racing_transitions_have_one_winner_and_one_audit_row() -> Result<()> {
    on_every_backend(|db| async move {
        let m = create(&db, Uuid::new_v4()).await?;
        step(&db, m.id, Action::StartCopy).await?;
        let tasks: Vec<_> = (0..8)
            .map(|i| {
                let db = db.clone();
                tokio::spawn(async move {
                    let note = AuditNote::new(format!("operator-{i}"));
                    db.transition(m.id, MigrationState::BulkCopy, Action::Pause, &note, None)
                        .await
                })
            })
            .collect();
        let mut won = 0;
        for task in tasks {
            match task.await? {
                Ok(done) => {
                    won += 1;
                    assert_eq!(done.record.state, MigrationState::Paused);
                    assert_eq!(done.record.paused_from, Some(MigrationState::BulkCopy));
                    assert_eq!(done.routing_epoch, None);
                }
                Err(MigrationError::StateChanged {
                    id,
                    expected,
                    actual,
                }) => {
                    assert_eq!(id, m.id);
                    assert_eq!(expected, MigrationState::BulkCopy);
                    assert_eq!(actual, MigrationState::Paused);
                }
                Err(e) => bail!("unexpected: {e}"),
            }
        }
        assert_eq!(won, 1);
        let pauses = db
            .audit_log(m.id)
            .await?
            .into_iter()
            .filter(|e| e.action == "pause")
            .count();
        assert_eq!(pauses, 1);

        let resumed = step(&db, m.id, Action::Resume).await?;
        assert_eq!(resumed.state, MigrationState::BulkCopy);
        assert_eq!(resumed.paused_from, None);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn refused_transitions_change_nothing() -> Result<()> {
    on_every_backend(|db| async move {
        let m = create(&db, Uuid::new_v4()).await?;
        let epoch = db.routing_epoch().await?;
        let audit = db.audit_log(m.id).await?;
        let route = m.implied_route(MigrationState::Cutover);

        // Illegal from the state it is in.
        match db
            .transition(
                m.id,
                MigrationState::Pending,
                Action::Cutover,
                &operator(),
                Some(&route),
            )
            .await
        {
            Err(e @ MigrationError::Illegal { .. }) => {
                assert_eq!(e.kind(), ErrorKind::Client);
                assert!(
                    e.to_string()
                        .contains("cannot cutover a migration that is pending"),
                    "{e}"
                );
            }
            other => bail!("illegal cutover: {other:?}"),
        }
        // Legal, but the caller's view is stale.
        assert!(matches!(
            db.transition(
                m.id,
                MigrationState::DualWrite,
                Action::Cutover,
                &operator(),
                Some(&route)
            )
            .await,
            Err(MigrationError::StateChanged {
                actual: MigrationState::Pending,
                ..
            })
        ));
        // A route of another tenant.
        let mut foreign = m.implied_route(MigrationState::BulkCopy);
        foreign.tenant_id = Uuid::new_v4();
        assert!(matches!(
            db.transition(
                m.id,
                MigrationState::Pending,
                Action::StartCopy,
                &operator(),
                Some(&foreign)
            )
            .await,
            Err(MigrationError::RouteOfOtherTenant { .. })
        ));
        let unknown = Uuid::new_v4();
        assert!(matches!(
            db.transition(unknown, MigrationState::Pending, Action::StartCopy, &operator(), None)
                .await,
            Err(MigrationError::NotFound(id)) if id == unknown
        ));

        assert_eq!(db.migration(m.id).await?, m);
        assert_eq!(db.audit_log(m.id).await?, audit);
        assert_eq!(db.routing_epoch().await?, epoch);
        assert_eq!(db.route(m.tenant_id).await?, None);

        // Terminal stays terminal.
        step(&db, m.id, Action::Fail).await?;
        let failed = db.migration(m.id).await?;
        for action in Action::ALL {
            assert!(matches!(
                db.transition(m.id, MigrationState::Failed, action, &operator(), None)
                    .await,
                Err(MigrationError::Illegal { .. })
            ));
        }
        assert_eq!(db.migration(m.id).await?, failed);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_whole_lifecycle_writes_routes_audit_and_timestamps() -> Result<()> {
    on_every_backend(|db| async move {
        let m = create(&db, Uuid::new_v4()).await?;
        let mut listener = db.routing_listener().await?;
        let path = [
            (
                Action::StartCopy,
                MigrationState::BulkCopy,
                RoutingState::BulkCopy,
            ),
            (
                Action::Pause,
                MigrationState::Paused,
                RoutingState::BulkCopy,
            ),
            (
                Action::Resume,
                MigrationState::BulkCopy,
                RoutingState::BulkCopy,
            ),
            (
                Action::CopyDone,
                MigrationState::DualWrite,
                RoutingState::DualWrite,
            ),
            (
                Action::Pause,
                MigrationState::Paused,
                RoutingState::BulkCopy,
            ),
            (
                Action::Resume,
                MigrationState::DualWrite,
                RoutingState::DualWrite,
            ),
            (
                Action::Cutover,
                MigrationState::Cutover,
                RoutingState::CutoverPaused,
            ),
            (
                Action::CutoverRollback,
                MigrationState::DualWrite,
                RoutingState::DualWrite,
            ),
            (
                Action::Cutover,
                MigrationState::Cutover,
                RoutingState::CutoverPaused,
            ),
            (
                Action::CutoverDone,
                MigrationState::Migrated,
                RoutingState::Normal,
            ),
        ];
        let mut state = MigrationState::Pending;
        for (action, to, routing) in path {
            let before = db.routing_epoch().await?;
            let current = db.migration(m.id).await?;
            let next = switchyard_store::control::lifecycle::next(current.phase(), action)?;
            let route = current.implied_route(next.state);
            let done = db
                .transition(m.id, state, action, &operator(), Some(&route))
                .await
                .with_context(|| format!("{action} from {state}"))?;
            assert_eq!(done.record.state, to, "{action}");
            assert_eq!(done.routing_epoch, Some(before + 1));
            assert_eq!(db.routing_epoch().await?, before + 1);
            let written = db.route(m.tenant_id).await?.context("route written")?;
            assert_eq!(written.migration_state, routing, "{action}");
            assert_eq!(written.epoch, before + 1);
            if let Some(listener) = listener.as_mut() {
                let epoch = tokio::time::timeout(Duration::from_secs(10), listener.recv())
                    .await
                    .context("NOTIFY within 10 s")??;
                assert_eq!(epoch, before + 1);
            }
            state = to;
        }

        let done = db.migration(m.id).await?;
        assert!(done.started_at.is_some());
        assert!(done.completed_at.is_some());
        assert!(done.started_at <= done.completed_at);
        assert_eq!(done.revision, 10);
        let route = db.route(m.tenant_id).await?.context("route")?;
        assert_eq!(route.store_id, "dedicated");
        assert_eq!(route.target_store_id, None);
        assert_eq!(route.active_migration_id, None);

        let log = db.audit_log(m.id).await?;
        let actions: Vec<&str> = log.iter().map(|e| e.action.as_str()).collect();
        assert_eq!(
            actions,
            [
                "create",
                "start_copy",
                "pause",
                "resume",
                "copy_done",
                "pause",
                "resume",
                "cutover",
                "cutover_rollback",
                "cutover",
                "cutover_done"
            ]
        );
        for pair in log.windows(2) {
            assert_eq!(pair[1].from_state, pair[0].to_state, "{:?}", pair[1]);
            assert!(pair[0].id < pair[1].id);
        }
        assert!(log
            .iter()
            .all(|e| e.tenant_id == m.tenant_id && e.actor == "alice"));

        // A fail records its reason as the error; an audit-only action records the state.
        let doomed = create(&db, Uuid::new_v4()).await?;
        let note = AuditNote::new("serve@host")
            .with_reason("target unreachable")
            .with_details(json!({ "attempts": 3 }));
        let failed = db
            .transition(
                doomed.id,
                MigrationState::Pending,
                Action::Fail,
                &note,
                None,
            )
            .await?;
        assert_eq!(
            failed.record.error_message.as_deref(),
            Some("target unreachable")
        );
        let entry = db
            .append_audit(doomed.id, "verify", &AuditNote::new("bob"))
            .await?;
        assert_eq!(entry.from_state, Some(MigrationState::Failed));
        assert_eq!(entry.to_state, None);
        let log = db.audit_log(doomed.id).await?;
        assert_eq!(log[1].details, Some(json!({ "attempts": 3 })));
        assert_eq!(log.last(), Some(&entry));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_and_errors_are_recorded() -> Result<()> {
    on_every_backend(|db| async move {
        let m = create(&db, Uuid::new_v4()).await?;
        let first = db
            .update_progress(
                m.id,
                None,
                &Progress {
                    events_total: Some(1000),
                    events_copied: Some(250),
                    copy_horizon: Some(i64::from(u32::MAX) + 7),
                    copy_position: Some(250),
                    ..Progress::default()
                },
            )
            .await?;
        assert_eq!((first.events_total, first.events_copied), (1000, 250));
        assert_eq!(first.copy_horizon, Some(i64::from(u32::MAX) + 7));
        assert_eq!(first.revision, m.revision + 1);
        assert!((first.progress_percentage() - 25.0).abs() < 1e-9);

        let second = db
            .update_progress(
                m.id,
                None,
                &Progress {
                    events_copied: Some(500),
                    tail_horizon: Some(42),
                    ..Progress::default()
                },
            )
            .await?;
        assert_eq!((second.events_total, second.events_copied), (1000, 500));
        assert_eq!(second.copy_position, Some(250));
        assert_eq!(second.tail_horizon, Some(42));

        let errored = db.set_error(m.id, Some("target refused a batch")).await?;
        assert_eq!(
            errored.error_message.as_deref(),
            Some("target refused a batch")
        );
        assert_eq!(errored.state, MigrationState::Pending);
        assert_eq!(db.set_error(m.id, None).await?.error_message, None);
        assert!(matches!(
            db.set_error(Uuid::new_v4(), None).await,
            Err(MigrationError::NotFound(_))
        ));
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_position_map_is_idempotent_and_translates() -> Result<()> {
    on_every_backend(|db| async move {
        let m = create(&db, Uuid::new_v4()).await?;
        let other = create(&db, Uuid::new_v4()).await?;
        let batch: Vec<(i64, i64, Uuid)> =
            (1..=5000).map(|i| (i * 10, i, Uuid::new_v4())).collect();
        assert_eq!(db.insert_position_map(m.id, &batch).await?, 5000);
        assert_eq!(db.insert_position_map(m.id, &batch).await?, 0);
        assert_eq!(db.insert_position_map(m.id, &[]).await?, 0);
        // A conflicting second mapping of a source position keeps the first.
        assert_eq!(
            db.insert_position_map(
                m.id,
                &[
                    (20, 999_999, Uuid::new_v4()),
                    (50_010, 5001, Uuid::new_v4())
                ]
            )
            .await?,
            1
        );
        assert_eq!(db.position_map_len(m.id).await?, 5001);
        db.insert_position_map(other.id, &[(5, 500, Uuid::new_v4())])
            .await?;

        let exact = Translation {
            source_position: 20,
            target_position: 2,
            exact: true,
        };
        assert_eq!(db.translate_position(m.id, 20).await?, Some(exact));
        assert_eq!(
            db.translate_position(m.id, 25).await?,
            Some(Translation {
                exact: false,
                ..exact
            })
        );
        assert_eq!(db.translate_position(m.id, 9).await?, None);
        assert_eq!(
            db.translate_position(m.id, i64::MAX).await?,
            Some(Translation {
                source_position: 50_010,
                target_position: 5001,
                exact: false
            })
        );
        assert_eq!(
            db.translate_position(other.id, 10)
                .await?
                .map(|t| t.target_position),
            Some(500)
        );
        assert_eq!(db.translate_position(Uuid::new_v4(), 10).await?, None);
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claims_exclude_other_workers_until_the_lease_expires() -> Result<()> {
    on_every_backend(|db| async move {
        let m = create(&db, Uuid::new_v4()).await?;
        let long = Duration::from_secs(60);
        assert_eq!(db.claimable("w1").await?.len(), 1);

        assert!(db.claim(m.id, "w1", long).await?);
        assert!(!db.claim(m.id, "w2", long).await?);
        assert!(db.claimable("w2").await?.is_empty());
        assert_eq!(db.claimable("w1").await?.len(), 1);
        let held = db.migration(m.id).await?;
        assert_eq!(held.claimed_by.as_deref(), Some("w1"));
        assert!(held.claimed_until.is_some());
        assert_eq!(
            held.revision, m.revision,
            "claims are not changes of the record"
        );

        // Only the holder may checkpoint.
        let progress = Progress {
            events_copied: Some(1),
            ..Progress::default()
        };
        db.update_progress(m.id, Some("w1"), &progress).await?;
        match db.update_progress(m.id, Some("w2"), &progress).await {
            Err(MigrationError::ClaimLost { holder, .. }) => {
                assert_eq!(holder.as_deref(), Some("w1"));
            }
            other => bail!("w2 checkpoint: {other:?}"),
        }

        // w1 renews with a short lease and stops renewing: w2 gets it once it expires.
        assert!(db.claim(m.id, "w1", Duration::from_millis(200)).await?);
        wait_for(Duration::from_secs(10), || {
            let db = db.clone();
            async move { Ok(db.claim(m.id, "w2", long).await?) }
        })
        .await
        .context("w2 takes over after the lease")?;
        assert_eq!(db.migration(m.id).await?.claimed_by.as_deref(), Some("w2"));
        assert!(!db.claim(m.id, "w1", long).await?);
        assert!(matches!(
            db.update_progress(m.id, Some("w1"), &progress).await,
            Err(MigrationError::ClaimLost { .. })
        ));

        assert!(!db.release(m.id, "w1").await?);
        assert!(db.release(m.id, "w2").await?);
        assert!(db.claim(m.id, "w1", long).await?);

        // A terminal migration is released and claimable by no one.
        step(&db, m.id, Action::Abort).await?;
        let ended = db.migration(m.id).await?;
        assert_eq!((ended.claimed_by, ended.claimed_until), (None, None));
        assert!(!db.claim(m.id, "w1", long).await?);
        assert!(db.claimable("w1").await?.is_empty());
        Ok(())
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_report_their_epoch() -> Result<()> {
    on_every_backend(|db| async move {
        assert!(db.proxies().await?.is_empty());
        db.upsert_proxy("p-1", "http://127.0.0.1:7071", 3, None)
            .await?;
        let details = ProxyDetails {
            version: Some("0.1.0".to_owned()),
            mirroring_tenants: vec![Uuid::new_v4()],
            data_url: Some("http://127.0.0.1:8070".to_owned()),
            shutting_down: false,
        };
        db.upsert_proxy("p-0", "http://127.0.0.1:8071", 1, Some(&details))
            .await?;
        let first = db.proxies().await?;
        ensure!(first.len() == 2, "{first:?}");
        assert_eq!(first[0].proxy_id, "p-0");
        assert_eq!(first[0].details, Some(details));

        db.upsert_proxy("p-1", "http://127.0.0.1:7071", 9, None)
            .await?;
        let second = db.proxies().await?;
        assert_eq!(second.len(), 2);
        assert_eq!(second[1].routing_epoch, 9);
        assert!(second[1].last_seen >= first[1].last_seen);

        // Silent proxies are forgotten; the ones that report are kept.
        assert_eq!(db.prune_proxies(Duration::from_secs(3600)).await?, 0);
        tokio::time::sleep(Duration::from_millis(1500)).await;
        db.upsert_proxy("p-1", "http://127.0.0.1:7071", 10, None)
            .await?;
        assert_eq!(db.prune_proxies(Duration::from_secs(1)).await?, 1);
        let left: Vec<String> = db
            .proxies()
            .await?
            .into_iter()
            .map(|p| p.proxy_id)
            .collect();
        assert_eq!(left, vec!["p-1".to_owned()]);
        Ok(())
    })
    .await
}

/// Issue 14 item 11: a migration is created only if the tenant's route is still the one its
/// source was chosen from, and `routing set` only while the tenant has no migration that is not
/// over; each checked in its own transaction after the routing epoch's lock, so of the two
/// racing, exactly one wins, every round.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn creating_a_migration_and_routing_by_hand_never_both_win() -> Result<()> {
    on_every_backend(|db| async move {
        // Deterministic: a route changed after it was read refuses the creation.
        let tenant = Uuid::new_v4();
        let epoch = db
            .set_route_by_hand(&switchyard_store::RouteUpdate::normal(tenant, "shared"))
            .await?;
        let stale = NewMigration {
            route_epoch: Some(0),
            ..new_migration(tenant)
        };
        match db.create_migration(&stale, &operator()).await {
            Err(e @ MigrationError::RouteChanged { .. }) => {
                assert_eq!(e.kind(), ErrorKind::Conflict);
            }
            other => bail!("a stale route epoch: {other:?}"),
        }
        assert!(db.active_migration(tenant).await?.is_none());
        let fresh = NewMigration {
            route_epoch: Some(epoch),
            ..new_migration(tenant)
        };
        let m = db.create_migration(&fresh, &operator()).await?;
        match db
            .set_route_by_hand(&switchyard_store::RouteUpdate::normal(tenant, "dedicated"))
            .await
        {
            Err(MigrationError::AlreadyActive { existing_id, .. }) => assert_eq!(existing_id, m.id),
            other => bail!("routing set beside a pending migration: {other:?}"),
        }

        // Racing: exactly one of the two wins.
        for round in 0..20 {
            let tenant = Uuid::new_v4();
            let create = NewMigration {
                route_epoch: Some(0),
                ..new_migration(tenant)
            };
            let note = operator();
            let route = switchyard_store::RouteUpdate::normal(tenant, "dedicated");
            let (created, routed) = tokio::join!(
                db.create_migration(&create, &note),
                db.set_route_by_hand(&route)
            );
            ensure!(
                created.is_ok() != routed.is_ok(),
                "round {round}: created {created:?}, routed {routed:?}"
            );
            let row = db.route(tenant).await?;
            let active = db.active_migration(tenant).await?;
            ensure!(
                row.is_some() != active.is_some(),
                "round {round}: route {row:?} and migration {active:?}"
            );
        }
        Ok(())
    })
    .await
}

/// Issue 14 item 8: a worker whose lease ran out writes no more progress, even before another
/// worker claims the migration.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn progress_writes_stop_when_the_lease_runs_out() -> Result<()> {
    on_every_backend(|db| async move {
        let m = create(&db, Uuid::new_v4()).await?;
        let progress = Progress {
            events_copied: Some(1),
            ..Progress::default()
        };
        assert!(db.claim(m.id, "w1", Duration::from_millis(300)).await?);
        db.update_progress(m.id, Some("w1"), &progress).await?;
        wait_for(Duration::from_secs(10), || {
            let (db, progress) = (db.clone(), progress.clone());
            async move {
                Ok(matches!(
                    db.update_progress(m.id, Some("w1"), &progress).await,
                    Err(MigrationError::ClaimLost { .. })
                ))
            }
        })
        .await
        .context("the expired lease refuses w1's checkpoint")?;
        assert_eq!(db.migration(m.id).await?.claimed_by.as_deref(), Some("w1"));
        // Renewing (a live driver's heartbeat) makes it the holder again.
        assert!(db.claim(m.id, "w1", Duration::from_secs(60)).await?);
        db.update_progress(m.id, Some("w1"), &progress).await?;
        Ok(())
    })
    .await
}

/// A feed cursor of a store the tenant left is translated through each migration's map to the
/// first position of the current store its consumer may not have seen: the smallest target
/// position of the events past it (events that landed out of source order come again, none is
/// skipped), past every copied event when it saw them all, hop by hop through a chain of
/// migrations; not through a migration whose fence has not moved, and not from a store the
/// tenant never left.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feed_cursor_is_translated_through_every_migration_to_the_current_store() -> Result<()> {
    on_every_backend(|db| async move {
        let tenant = Uuid::new_v4();
        let first = create(&db, tenant).await?;
        // Source 20 landed after source 30 (the mirror and the copier land concurrently).
        let map = [(10, 1), (20, 3), (30, 2), (40, 4)].map(|(s, t)| (s, t, Uuid::new_v4()));
        db.insert_position_map(first.id, &map).await?;
        step(&db, first.id, Action::StartCopy).await?;
        step(&db, first.id, Action::CopyDone).await?;
        // Dual-writing: the fence has not moved, the map may be partial.
        assert_eq!(
            db.translate_feed_cursor(tenant, "shared", 20, "dedicated")
                .await?,
            None
        );
        step(&db, first.id, Action::Cutover).await?;
        step(&db, first.id, Action::CutoverDone).await?;
        let to_dedicated = |p: i64| db.translate_feed_cursor(tenant, "shared", p, "dedicated");
        assert_eq!(to_dedicated(20).await?, Some(2));
        assert_eq!(to_dedicated(25).await?, Some(2));
        assert_eq!(to_dedicated(30).await?, Some(4));
        assert_eq!(to_dedicated(5).await?, Some(1));
        // Saw every copied event: the events appended after the cutover.
        assert_eq!(to_dedicated(40).await?, Some(5));
        assert_eq!(to_dedicated(1_000).await?, Some(5));

        let second = db
            .create_migration(
                &NewMigration {
                    source_store_id: "dedicated".to_owned(),
                    target_store_id: "archive".to_owned(),
                    ..new_migration(tenant)
                },
                &operator(),
            )
            .await?;
        let map =
            [(1, 101), (2, 102), (3, 103), (4, 104), (7, 105)].map(|(s, t)| (s, t, Uuid::new_v4()));
        db.insert_position_map(second.id, &map).await?;
        for action in [
            Action::StartCopy,
            Action::CopyDone,
            Action::Cutover,
            Action::CutoverDone,
        ] {
            step(&db, second.id, action).await?;
        }
        let other = Uuid::new_v4();
        for (tenant, from, position, to, expected) in [
            // shared 20 → dedicated from 2 → archive from 102 (dedicated's 2 is unseen).
            (tenant, "shared", 20, "archive", Some(102)),
            (tenant, "dedicated", 4, "archive", Some(105)),
            // Its own store: just past the cursor.
            (tenant, "archive", 7, "archive", Some(8)),
            (tenant, "nowhere", 7, "archive", None),
            (other, "shared", 20, "dedicated", None),
        ] {
            assert_eq!(
                db.translate_feed_cursor(tenant, from, position, to).await?,
                expected,
                "{from} {position} -> {to}"
            );
        }
        Ok(())
    })
    .await
}
