//! The routing table: tenant → route, read lock-free by every request.
//!
//! The table is immutable once built and published through `ArcSwap`; a request takes one
//! snapshot (`Routes::load`) and uses it to the end. Tenants are spread over [`SHARDS`]
//! shards, each an `Arc<HashMap>`, so applying a change clones only the shards it touches
//! (about 4,000 entries each at a million tenants) instead of the whole map, and the new table
//! shares every other shard with the old one. A change is applied whole or not at all.
//!
//! Beside the table, [`Routes`] keeps the tenants this proxy saw moved by a source's fence
//! before routing said so ([`Moved`]): their reads follow the fence, not the stale route.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use arc_swap::ArcSwap;
use switchyard_store::{RouteRecord, RoutingState};
use tokio::sync::watch;
use uuid::Uuid;

/// Index of a store in the proxy's configured store list.
pub type StoreIdx = u16;

/// A route naming a store this proxy does not have configured; requests for it fail with 503.
pub const UNKNOWN_STORE: StoreIdx = StoreIdx::MAX;

const SHARDS: usize = 256;

/// Where one tenant's requests go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Route {
    pub state: RoutingState,
    /// The authoritative store (the source while migrating).
    pub store: StoreIdx,
    /// The migration's target, while one is active.
    pub target: Option<StoreIdx>,
    pub epoch: i64,
    pub migration_id: Option<Uuid>,
}

impl Route {
    pub fn normal(store: StoreIdx) -> Self {
        Self {
            state: RoutingState::Normal,
            store,
            target: None,
            epoch: 0,
            migration_id: None,
        }
    }
}

/// Hashes UUIDs (already random) with one multiply per word instead of SipHash.
#[derive(Clone, Copy, Default, Debug)]
pub struct UuidHasher(u64);

impl Hasher for UuidHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for chunk in bytes.chunks(8) {
            let mut word = [0u8; 8];
            word[..chunk.len()].copy_from_slice(chunk);
            self.write_u64(u64::from_le_bytes(word));
        }
    }
    fn write_u64(&mut self, word: u64) {
        self.0 = (self.0.rotate_left(5) ^ word).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
    fn write_usize(&mut self, _len: usize) {
        // The length prefix `Hash for [u8]` writes is always 16 for a UUID: nothing to mix.
    }
}

#[derive(Clone, Copy, Default, Debug)]
pub struct BuildUuidHasher;

impl BuildHasher for BuildUuidHasher {
    type Hasher = UuidHasher;
    fn build_hasher(&self) -> UuidHasher {
        UuidHasher::default()
    }
}

type Shard = HashMap<Uuid, Route, BuildUuidHasher>;

fn shard_of(tenant: &Uuid) -> usize {
    // The last byte is random in both v4 and v7 UUIDs.
    usize::from(tenant.as_bytes()[15]) % SHARDS
}

/// One immutable version of the routing table.
#[derive(Debug, Clone)]
pub struct RoutingTable {
    epoch: i64,
    default: Route,
    shards: Arc<[Arc<Shard>]>,
    len: usize,
    /// Tenants whose route is not `normal` (migrating, at a gate): few, kept beside the shards
    /// so the heartbeat never walks a table of millions to find them.
    migrating: Arc<std::collections::BTreeSet<Uuid>>,
}

impl RoutingTable {
    /// A table with no tenant rows: everyone goes to `default_store`.
    pub fn empty(default_store: StoreIdx) -> Self {
        let shards: Vec<Arc<Shard>> = (0..SHARDS).map(|_| Arc::new(Shard::default())).collect();
        Self {
            epoch: 0,
            default: Route::normal(default_store),
            shards: shards.into(),
            len: 0,
            migrating: Arc::default(),
        }
    }

    /// The tenant's route: its row, or the default store.
    #[inline]
    pub fn get(&self, tenant: &Uuid) -> &Route {
        self.shards[shard_of(tenant)]
            .get(tenant)
            .unwrap_or(&self.default)
    }

    /// The tenant's row, if it has one.
    pub fn row(&self, tenant: &Uuid) -> Option<&Route> {
        self.shards[shard_of(tenant)].get(tenant)
    }

    pub fn epoch(&self) -> i64 {
        self.epoch
    }

    /// Tenants with a row.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn default_route(&self) -> &Route {
        &self.default
    }

    /// Every row, for the admin listing (not for the request path).
    pub fn iter(&self) -> impl Iterator<Item = (&Uuid, &Route)> {
        self.shards.iter().flat_map(|shard| shard.iter())
    }

    /// The rows whose route is not `normal`, in tenant order; costs what they are, not what
    /// the table is.
    pub fn migrating(&self) -> impl Iterator<Item = (&Uuid, &Route)> {
        self.migrating
            .iter()
            .filter_map(|tenant| self.row(tenant).map(|route| (tenant, route)))
    }

    /// The next table: this one with `changes` applied (later changes of a tenant win), at
    /// `epoch`. Only the shards the changes touch are copied.
    pub fn with_changes(
        &self,
        changes: impl IntoIterator<Item = (Uuid, Route)>,
        epoch: i64,
    ) -> Self {
        let mut shards: Vec<Arc<Shard>> = self.shards.to_vec();
        let mut len = self.len;
        let mut migrating = Arc::clone(&self.migrating);
        for (tenant, route) in changes {
            let normal = route.state == RoutingState::Normal;
            if normal == migrating.contains(&tenant) {
                let set = Arc::make_mut(&mut migrating);
                if normal {
                    set.remove(&tenant);
                } else {
                    set.insert(tenant);
                }
            }
            let shard = Arc::make_mut(&mut shards[shard_of(&tenant)]);
            if shard.insert(tenant, route).is_none() {
                len += 1;
            }
        }
        Self {
            epoch: epoch.max(self.epoch),
            default: self.default,
            shards: shards.into(),
            len,
            migrating,
        }
    }
}

/// A tenant whose append met a moved fence in the store its route names: this proxy knows the
/// tenant left that store before routing tells it (its control database may be out of reach).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Moved {
    /// The store the route named when the fence refused the append.
    pub from: StoreIdx,
    /// The fence's `moved_to` as this proxy's index; [`UNKNOWN_STORE`] when not configured.
    pub to: StoreIdx,
    /// The route's epoch when the fence refused the append.
    pub epoch: i64,
}

impl Moved {
    /// Whether `route` is still the stale one the fence contradicted: it names `from`, and
    /// routing has not changed since, or only to the same move's `cutover_paused` (the fence
    /// moves between that and `normal` on the target). Any other newer route is routing's
    /// word, which wins (an emergency stop that reopened the fence leaves the tenant on
    /// `from` at a newer epoch).
    fn contradicts(&self, route: &Route) -> bool {
        route.store == self.from
            && (route.epoch <= self.epoch
                || (route.state == RoutingState::CutoverPaused && route.target == Some(self.to)))
    }
}

type MovedMap = HashMap<Uuid, Moved, BuildUuidHasher>;

/// The live table plus a signal for whoever waits on a change (writers at a gate).
#[derive(Debug)]
pub struct Routes {
    table: ArcSwap<RoutingTable>,
    changed: watch::Sender<i64>,
    loaded: std::sync::atomic::AtomicBool,
    /// Tenants seen moved off their route's store (few, and usually none): read lock-free by
    /// every read, written only when a fence refuses an append or a table is published.
    moved: ArcSwap<MovedMap>,
    /// Serialises writers of `moved`, so a table published while a move is noted still
    /// clears it.
    moved_writer: std::sync::Mutex<()>,
}

impl Routes {
    pub fn new(table: RoutingTable) -> Self {
        let (changed, _) = watch::channel(table.epoch());
        Self {
            table: ArcSwap::from_pointee(table),
            changed,
            loaded: std::sync::atomic::AtomicBool::new(false),
            moved: ArcSwap::default(),
            moved_writer: std::sync::Mutex::new(()),
        }
    }

    /// One snapshot of the table; hold it for the whole request.
    #[inline]
    pub fn load(&self) -> arc_swap::Guard<Arc<RoutingTable>> {
        self.table.load()
    }

    /// A full `Arc` of the current table, for work that outlives a request.
    pub fn load_full(&self) -> Arc<RoutingTable> {
        self.table.load_full()
    }

    /// Publishes a new table and wakes everyone waiting for a change; forgets the moves it
    /// supersedes.
    pub fn store(&self, table: RoutingTable) {
        let epoch = table.epoch();
        self.table.store(Arc::new(table));
        self.loaded
            .store(true, std::sync::atomic::Ordering::Release);
        if !self.moved.load().is_empty() {
            // After the table is published: a move noted meanwhile is checked against it.
            let _writer = self.moved_writer.lock().expect("not poisoned");
            let table = self.table.load();
            let mut moved = MovedMap::clone(&self.moved.load());
            moved.retain(|tenant, m| m.contradicts(table.get(tenant)));
            self.moved.store(Arc::new(moved));
        }
        self.changed.send_replace(epoch);
    }

    /// Notes that `tenant`'s fence refused an append because it moved, unless the table in
    /// use already left the store that refused it.
    pub fn note_moved(&self, tenant: Uuid, moved: Moved) {
        let _writer = self.moved_writer.lock().expect("not poisoned");
        if moved.contradicts(self.table.load().get(&tenant)) {
            let mut map = MovedMap::clone(&self.moved.load());
            map.insert(tenant, moved);
            self.moved.store(Arc::new(map));
        }
    }

    /// Forgets a move of `tenant` off `store`: an append there succeeded, so its fence is open
    /// (an emergency stop reopened it).
    pub fn forget_moved(&self, tenant: &Uuid, store: StoreIdx) {
        if self
            .moved
            .load()
            .get(tenant)
            .is_none_or(|m| m.from != store)
        {
            return;
        }
        let _writer = self.moved_writer.lock().expect("not poisoned");
        let mut map = MovedMap::clone(&self.moved.load());
        if map.get(tenant).is_some_and(|m| m.from == store) {
            map.remove(tenant);
            self.moved.store(Arc::new(map));
        }
    }

    /// Where `tenant`'s fence said it went, when `route` (this proxy's) still names the store
    /// it left; lock-free, one atomic load when no move is known.
    #[inline]
    pub fn moved_to(&self, tenant: &Uuid, route: &Route) -> Option<StoreIdx> {
        let moved = self.moved.load();
        if moved.is_empty() {
            return None;
        }
        moved
            .get(tenant)
            .filter(|m| m.contradicts(route))
            .map(|m| m.to)
    }

    /// How many tenants are known moved ahead of routing (the metric).
    pub fn moved_len(&self) -> usize {
        self.moved.load().len()
    }

    /// Whether a table has been loaded from the control database at least once.
    pub fn is_loaded(&self) -> bool {
        self.loaded.load(std::sync::atomic::Ordering::Acquire)
    }

    /// Waits up to `limit` for the first table from the control database; whether it came.
    pub async fn wait_loaded(&self, limit: std::time::Duration) -> bool {
        // Subscribe before checking, so a table published in between still wakes us.
        let mut changed = self.changed.subscribe();
        let _ = tokio::time::timeout(limit, async {
            while !self.is_loaded() {
                if changed.changed().await.is_err() {
                    return;
                }
            }
        })
        .await;
        self.is_loaded()
    }

    /// A receiver that fires on every published table.
    pub fn subscribe(&self) -> watch::Receiver<i64> {
        self.changed.subscribe()
    }
}

/// Translates control-database rows into routes, naming stores by index.
pub fn route_of(record: &RouteRecord, index: impl Fn(&str) -> Option<StoreIdx>) -> Route {
    Route {
        state: record.migration_state,
        store: index(&record.store_id).unwrap_or(UNKNOWN_STORE),
        target: record
            .target_store_id
            .as_deref()
            .map(|id| index(id).unwrap_or(UNKNOWN_STORE)),
        epoch: record.epoch,
        migration_id: record.active_migration_id,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn route(store: StoreIdx, epoch: i64) -> Route {
        Route {
            epoch,
            ..Route::normal(store)
        }
    }

    #[test]
    fn absent_tenants_take_the_default() {
        let table = RoutingTable::empty(3);
        assert_eq!(table.get(&Uuid::new_v4()).store, 3);
        assert!(table.is_empty());
    }

    #[test]
    fn a_change_leaves_the_old_snapshot_untouched() {
        let t = Uuid::new_v4();
        let old = RoutingTable::empty(0).with_changes([(t, route(1, 1))], 1);
        let new = old.with_changes([(t, route(2, 2))], 2);
        assert_eq!(old.get(&t).store, 1);
        assert_eq!(new.get(&t).store, 2);
        assert_eq!((old.epoch(), new.epoch()), (1, 2));
        assert_eq!(new.len(), 1);
    }

    /// A noted move sends reads to the fence's store until routing speaks: a newer route
    /// off the source, or a newer route that keeps the tenant there (an emergency stop
    /// reopened the fence), clears it; the same move's `cutover_paused` keeps it; so does an
    /// append that succeeded elsewhere, but not one on the source.
    #[test]
    fn a_noted_move_lasts_until_routing_or_the_source_says_otherwise() {
        let t = Uuid::new_v4();
        let dual = Route {
            state: RoutingState::DualWrite,
            target: Some(2),
            ..route(1, 5)
        };
        let moved = Moved {
            from: 1,
            to: 2,
            epoch: 5,
        };
        let routes = Routes::new(RoutingTable::empty(0).with_changes([(t, dual)], 5));
        routes.note_moved(t, moved);
        assert_eq!(routes.moved_to(&t, &dual), Some(2));
        assert_eq!(routes.moved_to(&Uuid::new_v4(), &dual), None);

        let paused = Route {
            state: RoutingState::CutoverPaused,
            ..route(1, 6)
        };
        let paused = Route {
            target: Some(2),
            ..paused
        };
        routes.store(routes.load().with_changes([(t, paused)], 6));
        assert_eq!(
            routes.moved_to(&t, &paused),
            Some(2),
            "the same move's pause"
        );
        routes.forget_moved(&t, 2);
        assert_eq!(
            routes.moved_len(),
            1,
            "an append elsewhere says nothing of the source"
        );

        routes.store(routes.load().with_changes([(t, route(2, 7))], 7));
        assert_eq!(routes.moved_len(), 0, "routing names the target");
        routes.note_moved(t, moved);
        assert_eq!(
            routes.moved_len(),
            0,
            "routing already left the refused route"
        );

        let routes = Routes::new(RoutingTable::empty(0).with_changes([(t, dual)], 5));
        routes.note_moved(t, moved);
        routes.store(routes.load().with_changes([(t, route(1, 7))], 7));
        assert_eq!(
            routes.moved_len(),
            0,
            "a newer route on the source clears it"
        );
        let routes = Routes::new(RoutingTable::empty(0).with_changes([(t, dual)], 5));
        routes.note_moved(t, moved);
        routes.forget_moved(&t, 1);
        assert_eq!(
            routes.moved_to(&t, &dual),
            None,
            "the source took an append"
        );
    }

    proptest! {
        /// Any sequence of batches applied shard-wise equals a plain map built from the same
        /// changes, and the migrating set is exactly its rows that are not normal.
        #[test]
        fn sharded_updates_equal_a_plain_map(
            batches in proptest::collection::vec(
                proptest::collection::vec((0u8..40, 0u16..5, 0usize..4), 0..20), 1..10)
        ) {
            let tenants: Vec<Uuid> = (0..40).map(|_| Uuid::new_v4()).collect();
            let mut table = RoutingTable::empty(9);
            let mut model: HashMap<Uuid, Route> = HashMap::new();
            for (epoch, batch) in (1..).zip(&batches) {
                let changes: Vec<(Uuid, Route)> = batch
                    .iter()
                    .map(|&(t, s, state)| {
                        let route = Route { state: RoutingState::ALL[state], ..route(s, epoch) };
                        (tenants[usize::from(t)], route)
                    })
                    .collect();
                for (t, r) in &changes {
                    model.insert(*t, *r);
                }
                table = table.with_changes(changes, epoch);
            }
            prop_assert_eq!(table.len(), model.len());
            for t in &tenants {
                prop_assert_eq!(table.get(t).store, model.get(t).map_or(9, |r| r.store));
            }
            let mut expected: Vec<(Uuid, Route)> = model
                .into_iter()
                .filter(|(_, r)| r.state != RoutingState::Normal)
                .collect();
            expected.sort_by_key(|(t, _)| *t);
            let migrating: Vec<(Uuid, Route)> =
                table.migrating().map(|(t, r)| (*t, *r)).collect();
            prop_assert_eq!(migrating, expected);
        }
    }
}
