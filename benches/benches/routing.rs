// Run: cargo bench -p switchyard-benches --bench routing

//! Route lookup on the request path, and the cost of publishing a routing change.
//!
//! Measures `Routes::load().get(&tenant)` (one `ArcSwap` snapshot plus a sharded map lookup)
//! at 1 and at 1,000,000 tenants, alone and beside a writer thread that publishes a new table
//! every millisecond, against the obvious alternative: a `std::sync::RwLock<HashMap<Uuid,
//! Route>>` read under its lock, beside a writer that takes the write lock and inserts one route
//! every millisecond. Looked-up tenants always have a row, visited in random order: over every
//! tenant (at a million tenants most lookups then miss the CPU caches), and over a hot set of
//! 1,000 tenants of the big table (cache-resident), which tells the structure's own cost from
//! memory latency. Finally it measures one change (`with_changes` of one route, then `store`)
//! at 1 and at 1,000,000 tenants.

use std::collections::HashMap;
use std::hint::black_box;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion};
use switchyard_proxy::routing::{Route, Routes, RoutingTable};
use uuid::Uuid;

/// Table sizes measured.
const SIZES: [usize; 2] = [1, 1_000_000];
/// Size of the cache-resident hot set looked up in the big table.
const HOT_TENANTS: usize = 1_000;
/// How often the concurrent writer publishes a change.
const WRITE_EVERY: Duration = Duration::from_millis(1);

/// `n` distinct random (v4) tenant ids, in random order.
fn tenants(n: usize) -> Vec<Uuid> {
    (0..n).map(|_| Uuid::new_v4()).collect()
}

/// A route that differs from the last one, so every change is a real change.
fn route(epoch: i64) -> Route {
    Route {
        epoch,
        ..Route::normal(1)
    }
}

fn routing_table(tenants: &[Uuid]) -> RoutingTable {
    RoutingTable::empty(0).with_changes(tenants.iter().map(|t| (*t, route(1))), 1)
}

fn locked_map(tenants: &[Uuid]) -> RwLock<HashMap<Uuid, Route>> {
    RwLock::new(tenants.iter().map(|t| (*t, route(1))).collect())
}

/// A thread that applies one change every [`WRITE_EVERY`] until dropped, then reports how many
/// changes it made per second, so a writer that could not keep up is visible in the output.
struct Writer {
    stop: Arc<AtomicBool>,
    writes: Arc<AtomicU64>,
    started: Instant,
    label: String,
    handle: Option<JoinHandle<()>>,
}

impl Writer {
    fn spawn(label: String, mut change: impl FnMut(i64) + Send + 'static) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let writes = Arc::new(AtomicU64::new(0));
        let handle = {
            let stop = Arc::clone(&stop);
            let writes = Arc::clone(&writes);
            std::thread::spawn(move || {
                let mut next = Instant::now() + WRITE_EVERY;
                let mut epoch = 2;
                while !stop.load(Ordering::Relaxed) {
                    change(epoch);
                    epoch += 1;
                    writes.fetch_add(1, Ordering::Relaxed);
                    let now = Instant::now();
                    if next > now {
                        std::thread::sleep(next - now);
                    }
                    // Never try to catch up in a burst after a late wake-up.
                    next = next.max(now) + WRITE_EVERY;
                }
            })
        };
        Self {
            stop,
            writes,
            started: Instant::now(),
            label,
            handle: Some(handle),
        }
    }
}

impl Drop for Writer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(handle) = self.handle.take() {
            // A panicked writer thread already printed its panic; nothing to add here.
            let _ = handle.join();
        }
        let secs = self.started.elapsed().as_secs_f64();
        let writes = self.writes.load(Ordering::Relaxed);
        let rate = writes as f64 / secs;
        eprintln!(
            "{}: concurrent writer made {writes} changes in {secs:.1} s ({rate:.0}/s)",
            self.label
        );
    }
}

/// A cursor over `keys` that a lookup loop advances by one each iteration.
struct Cursor<'a> {
    keys: &'a [Uuid],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn new(keys: &'a [Uuid]) -> Self {
        Self { keys, at: 0 }
    }

    #[inline]
    fn advance(&mut self) -> &'a Uuid {
        let key = &self.keys[self.at];
        self.at += 1;
        if self.at == self.keys.len() {
            self.at = 0;
        }
        key
    }
}

/// A writer that publishes a new table with one changed tenant every [`WRITE_EVERY`].
fn table_writer(label: String, routes: &Arc<Routes>, keys: &Arc<Vec<Uuid>>) -> Writer {
    let routes = Arc::clone(routes);
    let keys = Arc::clone(keys);
    let mut cursor = 0;
    Writer::spawn(label, move |epoch| {
        let tenant = keys[cursor % keys.len()];
        cursor += 1;
        let next = routes.load().with_changes([(tenant, route(epoch))], epoch);
        routes.store(next);
    })
}

/// A writer that inserts one route under the write lock every [`WRITE_EVERY`].
fn map_writer(
    label: String,
    map: &Arc<RwLock<HashMap<Uuid, Route>>>,
    keys: &Arc<Vec<Uuid>>,
) -> Writer {
    let map = Arc::clone(map);
    let keys = Arc::clone(keys);
    let mut cursor = 0;
    Writer::spawn(label, move |epoch| {
        let tenant = keys[cursor % keys.len()];
        cursor += 1;
        map.write()
            .expect("no lookup panics while holding the lock")
            .insert(tenant, route(epoch));
    })
}

fn lookup(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_lookup");
    for &size in &SIZES {
        let keys = Arc::new(tenants(size));
        let routes = Arc::new(Routes::new(routing_table(&keys)));
        let map = Arc::new(locked_map(&keys));
        // Uniform over every tenant (most lookups miss the caches), and, for the big table,
        // over a hot set that stays cached, to tell the structure's cost from memory latency.
        let mut visits = vec![(size.to_string(), size)];
        if size > HOT_TENANTS {
            visits.push((format!("{size}_hot{HOT_TENANTS}"), HOT_TENANTS));
        }
        for (case, visited) in visits {
            let visited = &keys[..visited];
            for concurrent_writer in [false, true] {
                let writes = if concurrent_writer {
                    "swap_every_1ms"
                } else {
                    "no_writer"
                };

                let writer = concurrent_writer
                    .then(|| table_writer(format!("arcswap/{writes}/{case}"), &routes, &keys));
                group.bench_function(BenchmarkId::new(format!("arcswap/{writes}"), &case), |b| {
                    let mut cursor = Cursor::new(visited);
                    b.iter(|| black_box(routes.load().get(black_box(cursor.advance())).store));
                });
                drop(writer);

                let writer = concurrent_writer
                    .then(|| map_writer(format!("rwlock/{writes}/{case}"), &map, &keys));
                group.bench_function(
                    BenchmarkId::new(format!("rwlock_hashmap/{writes}"), &case),
                    |b| {
                        let mut cursor = Cursor::new(visited);
                        b.iter(|| {
                            let guard = map.read().expect("the writer never panics holding it");
                            black_box(guard.get(black_box(cursor.advance())).map(|r| r.store))
                        });
                    },
                );
                drop(writer);
            }
        }
    }
    group.finish();
}

fn apply_change(c: &mut Criterion) {
    let mut group = c.benchmark_group("route_change");
    for &size in &SIZES {
        let keys = tenants(size);
        let routes = Routes::new(routing_table(&keys));
        group.bench_function(BenchmarkId::new("with_changes_1_and_store", size), |b| {
            let mut cursor = Cursor::new(&keys);
            let mut epoch = 2;
            b.iter(|| {
                let next = routes
                    .load()
                    .with_changes([(*cursor.advance(), route(epoch))], epoch);
                routes.store(next);
                epoch += 1;
            });
        });
    }
    group.finish();
}

fn config() -> Criterion {
    Criterion::default()
        .sample_size(50)
        .warm_up_time(Duration::from_secs(1))
        .measurement_time(Duration::from_secs(4))
}

criterion_group! {
    name = benches;
    config = config();
    targets = lookup, apply_change
}
criterion_main!(benches);
