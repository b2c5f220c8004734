//! One conformance suite for the store traits, run against RocksDB and against a PostgreSQL the test starts
//! (skipped, saying why, where PostgreSQL cannot run); the manifest cache through a database crash; export.

use std::collections::HashSet;
use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use fog_proto::manifest::{ManifestBuilder, MIN_CHUNK_SIZE};
use fog_proto::NodeId;
use fog_testkit::pg::TestPostgres;

use super::cache::{CacheLimits, ManifestCache, OpLabel, StoreMetrics};
use super::*;

/// A complete manifest of deterministic content for `url` (3 chunks; `seed` varies the bytes).
fn manifest(url: &str, seed: u64) -> StoredManifest {
    let mut builder = ManifestBuilder::with_groups(MIN_CHUNK_SIZE, Some(4096));
    builder.update(&fog_testkit::test_bytes(2 * MIN_CHUNK_SIZE as usize + 1000, seed));
    let manifest = builder.finish(url.to_string(), Some("video/mp4".into()), Some(format!("\"{seed}\"")));
    StoredManifest { manifest, ingested_at_ms: 1_700_000_000_000 + seed, published: seed.is_multiple_of(2) }
}

fn node(n: u8) -> NodeId {
    NodeId([n; 32])
}

/// A PostgreSQL for one test, or why there is none (the test then skips).
fn postgres(test: &str) -> Option<TestPostgres> {
    if let Some(why) = TestPostgres::unavailable() {
        eprintln!("SKIPPED {test}: {why}");
        return None;
    }
    Some(TestPostgres::start())
}

/// What every implementation must do. `open` opens the same stores again (each call after the previous
/// `Stores` is dropped), to check what was written survives.
async fn conformance<F, Fut>(open: F)
where
    F: Fn() -> Fut,
    Fut: Future<Output = Stores>,
{
    let stores = open().await;
    let (m, a) = (&stores.manifests, &stores.admin);
    assert_eq!((stores.manifest_count, stores.blocked.len()), (0, 0), "a new store is empty");
    assert_eq!(m.get("http://o.example/none").await.expect("get"), None);

    // Put: new, then replacing.
    let first = manifest("http://o.example/a.mp4", 1);
    assert!(m.put(&first).await.expect("put"), "a new URL");
    assert_eq!(m.get("http://o.example/a.mp4").await.expect("get"), Some(first.clone()));
    let replaced = manifest("http://o.example/a.mp4", 2);
    assert!(!m.put(&replaced).await.expect("put"), "the URL was there");
    assert_eq!(m.get("http://o.example/a.mp4").await.expect("get"), Some(replaced.clone()));
    assert_eq!(m.count().await.expect("count"), 1);

    // Insert never overwrites.
    let other = manifest("http://o.example/b.mp4", 3);
    assert_eq!(m.insert(&other).await.expect("insert"), Inserted::New);
    assert_eq!(m.insert(&other).await.expect("insert"), Inserted::Same);
    assert_eq!(m.insert(&first).await.expect("insert"), Inserted::Conflict(Box::new(replaced.clone())));
    assert_eq!(m.get("http://o.example/a.mp4").await.expect("get"), Some(replaced.clone()));

    // Paging: bytewise URL order (upper case before lower, longer after its prefix), every one once.
    let mut urls: Vec<String> =
        ["http://o.example/B", "http://o.example/a.mp4/x", "http://o.example/é", "http://o.example/0"]
            .into_iter()
            .map(String::from)
            .collect();
    for (i, url) in urls.iter().enumerate() {
        m.put(&manifest(url, 10 + i as u64)).await.expect("put");
    }
    urls.extend(["http://o.example/a.mp4".to_string(), "http://o.example/b.mp4".to_string()]);
    urls.sort();
    let mut paged = Vec::new();
    let mut after: Option<String> = None;
    loop {
        let page = m.page(after.as_deref(), 4).await.expect("page");
        assert!(page.len() <= 4);
        let Some(last) = page.last() else { break };
        after = Some(last.manifest.url.clone());
        paged.extend(page.into_iter().map(|s| s.manifest.url));
    }
    assert_eq!(paged, urls);
    assert_eq!(m.count().await.expect("count"), urls.len() as u64);

    // The block list: idempotent both ways.
    a.set_blocked(&node(1), true).await.expect("block");
    a.set_blocked(&node(2), true).await.expect("block");
    a.set_blocked(&node(2), true).await.expect("block again");
    a.set_blocked(&node(3), false).await.expect("unblock one never blocked");
    a.set_blocked(&node(1), false).await.expect("unblock");
    assert_eq!(a.blocked_nodes().await.expect("blocked"), HashSet::from([node(2)]));
    drop(stores);

    // Durable: all of it is there when opened again (for PostgreSQL, the schema set-up runs again).
    let stores = open().await;
    assert_eq!(stores.manifest_count, urls.len() as u64);
    assert_eq!(stores.blocked, HashSet::from([node(2)]));
    assert_eq!(stores.manifests.get("http://o.example/a.mp4").await.expect("get"), Some(replaced));
    assert_eq!(
        stores.manifests.get("http://o.example/é").await.expect("get"),
        Some(manifest("http://o.example/é", 12))
    );
}

#[tokio::test]
async fn rocksdb_conforms() {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("db");
    conformance(|| async { Stores::embedded(Arc::new(Db::open(&path).expect("open"))).await.expect("stores") }).await;
}

#[tokio::test]
async fn postgres_conforms() {
    let Some(pg) = postgres("postgres_conforms") else { return };
    pg.create_database("fog_conformance");
    let conn = pg.conn_str_db("fog_conformance");
    conformance(|| async { Stores::postgres(&conn).await.expect("stores") }).await;
    // Replicas set the schema up at the same time without tripping over each other.
    let opened = futures_join_all((0..4).map(|_| {
        let conn = conn.clone();
        async move { Stores::postgres(&conn).await }
    }))
    .await;
    assert!(opened.iter().all(Result::is_ok), "{opened:?}");
    assert_eq!(pg.psql_db("fog_conformance", "SELECT version FROM fog_schema WHERE component = 'store'"), "1");
}

/// Runs the futures concurrently (tasks on this runtime), in order of the results.
async fn futures_join_all<F>(futures: impl Iterator<Item = F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.map(tokio::spawn).collect();
    let mut out = Vec::new();
    for h in handles {
        out.push(h.await.expect("task"));
    }
    out
}

#[tokio::test]
async fn postgres_connection_strings_are_checked_and_a_missing_server_is_retryable() {
    let bad = Stores::postgres("host=127.0.0.1 port=notaport").await.expect_err("bad string");
    assert!(!bad.is_retryable(), "{bad}");
    // Nothing listens on port 1: the database is unavailable, which may pass.
    let down = Stores::postgres("host=127.0.0.1 port=1 user=postgres connect_timeout=2").await.expect_err("down");
    assert!(down.is_retryable(), "{down}");
}

fn errors(metrics: &StoreMetrics, op: &'static str) -> u64 {
    metrics.errors.get_or_create(&OpLabel { op }).get()
}

/// Waits (up to a minute) until the cache has stored every queued write.
async fn drained(cache: &ManifestCache) {
    assert_eq!(cache.drain(Duration::from_secs(60)).await, 0, "queued writes stored once the database is back");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_manifest_cache_serves_and_holds_writes_while_postgres_is_down() {
    let Some(mut pg) = postgres("the_manifest_cache_serves_and_holds_writes_while_postgres_is_down") else {
        return;
    };
    let conn = pg.conn_str();
    let stores = Stores::postgres(&conn).await.expect("stores");
    let metrics = StoreMetrics::default();
    let limits = CacheLimits { pending_writes: 2, ..Default::default() };
    let cache = Arc::new(ManifestCache::new(stores.manifests.clone(), limits, 0, metrics.clone()));
    let writer = tokio::spawn(cache.clone().write_pending_forever());

    let before = manifest("http://o.example/before", 1);
    cache.put(before.clone()).await.expect("stored");
    assert_eq!(cache.pending(), 0, "written through while the database is up");
    assert_eq!(cache.count(), 1);

    pg.crash();
    // Resolves of cached manifests do not need the database.
    assert_eq!(cache.get("http://o.example/before").await.expect("from memory").as_deref(), Some(&before));
    // An uncached one does, and says a retry may help.
    let miss = cache.get("http://o.example/elsewhere").await.expect_err("database down");
    assert!(miss.is_retryable(), "{miss}");
    assert!(errors(&metrics, "get") >= 1);

    // Ingests go on: served from memory, written later, in order, the latest of a URL winning.
    let during = [manifest("http://o.example/during-1", 2), manifest("http://o.example/during-2", 3)];
    cache.put(during[0].clone()).await.expect("held");
    let superseded = manifest("http://o.example/during-2", 4);
    cache.put(superseded).await.expect("held");
    cache.put(during[1].clone()).await.expect("held, replacing the queued write of its URL");
    assert_eq!(cache.pending(), 2);
    assert_eq!(metrics.pending_writes.get(), 2);
    assert!(errors(&metrics, "put") >= 1);
    for m in &during {
        assert_eq!(cache.get(&m.manifest.url).await.expect("from memory").as_deref(), Some(m));
    }
    // The queue is bounded.
    let full = cache.put(manifest("http://o.example/too-many", 5)).await.expect_err("queue full");
    assert!(matches!(full, StoreError::PendingFull { held: 2 }) && full.is_retryable(), "{full}");

    pg.restart();
    drained(&cache).await;
    assert_eq!(metrics.pending_writes.get(), 0);
    assert_eq!(cache.count(), 3);
    // In the database itself, as another replica reads it.
    let other = Stores::postgres(&conn).await.expect("another replica");
    assert_eq!(other.manifest_count, 3);
    for m in during.iter().chain([&before]) {
        assert_eq!(other.manifests.get(&m.manifest.url).await.expect("get").as_ref(), Some(m));
    }
    assert_eq!(other.manifests.get("http://o.example/too-many").await.expect("get"), None);
    // Back to writing through.
    cache.put(manifest("http://o.example/after", 6)).await.expect("stored");
    assert_eq!(cache.pending(), 0);
    writer.abort();
}

#[tokio::test]
async fn the_manifest_cache_is_bounded_and_reads_through() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stores = Stores::embedded(Arc::new(Db::open(dir.path()).expect("db"))).await.expect("stores");
    let metrics = StoreMetrics::default();
    // Room for a few of these manifests (~1 KiB each, with their group hashes).
    let limits = CacheLimits { cache_bytes: 8_000, ..Default::default() };
    let cache = ManifestCache::new(stores.manifests.clone(), limits, 0, metrics.clone());
    let all: Vec<StoredManifest> = (0..20).map(|i| manifest(&format!("http://o.example/{i}"), i)).collect();
    for m in &all {
        cache.put(m.clone()).await.expect("put");
        let bytes = metrics.cache_bytes.get() as usize;
        assert!(bytes <= limits.cache_bytes, "{bytes} bytes cached");
    }
    assert!(cache.cached("http://o.example/0").is_none(), "the oldest, unused, went");
    assert!(cache.cached("http://o.example/19").is_some(), "the newest stayed");
    // Evicted ones are read from the store, and kept again.
    assert_eq!(cache.get("http://o.example/0").await.expect("get").as_deref(), Some(&all[0]));
    assert!(cache.cached("http://o.example/0").is_some());
    assert_eq!(cache.count(), 20);
    assert_eq!(cache.get("http://o.example/none").await.expect("get"), None);
}

#[tokio::test]
async fn export_copies_once_and_refuses_to_overwrite() {
    let Some(pg) = postgres("export_copies_once_and_refuses_to_overwrite") else { return };
    let dir = tempfile::tempdir().expect("tempdir");
    let from = Stores::embedded(Arc::new(Db::open(dir.path()).expect("db"))).await.expect("embedded");
    // More than a page of manifests.
    let all: Vec<StoredManifest> =
        (0..EXPORT_PAGE as u64 + 6).map(|i| manifest(&format!("http://o.example/{i}"), i)).collect();
    for m in &all {
        from.manifests.put(m).await.expect("put");
    }
    for n in [7, 8] {
        from.admin.set_blocked(&node(n), true).await.expect("block");
    }
    let to = Stores::postgres(&pg.conn_str()).await.expect("postgres");
    let done = export(&from, &to).await.expect("export");
    assert_eq!(done, Exported { manifests_new: all.len() as u64, manifests_same: 0, blocked_nodes: 2 });
    for m in &all {
        assert_eq!(to.manifests.get(&m.manifest.url).await.expect("get").as_ref(), Some(m));
    }
    assert_eq!(to.admin.blocked_nodes().await.expect("blocked"), HashSet::from([node(7), node(8)]));

    // Again: nothing changes.
    let again = export(&from, &to).await.expect("export again");
    assert_eq!(again, Exported { manifests_new: 0, manifests_same: all.len() as u64, blocked_nodes: 2 });
    assert_eq!(to.manifests.count().await.expect("count"), all.len() as u64);

    // A replica ingested a URL differently meanwhile: the export stops there, leaving it.
    let theirs = manifest("http://o.example/3", 1000);
    to.manifests.put(&theirs).await.expect("put");
    let conflict = export(&from, &to).await.expect_err("conflict");
    assert!(matches!(&conflict, StoreError::Conflict { url, .. } if url == "http://o.example/3"), "{conflict}");
    assert!(!conflict.is_retryable());
    assert_eq!(to.manifests.get("http://o.example/3").await.expect("get"), Some(theirs));
}

/// A real store whose next read (or write), once armed, holds its answer until released: a read or write
/// under way when another replica's write is announced.
#[derive(Debug)]
struct Held {
    inner: Arc<dyn ManifestStore>,
    armed: std::sync::atomic::AtomicBool,
    armed_put: std::sync::atomic::AtomicBool,
    entered: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

impl ManifestStore for Held {
    fn get<'a>(&'a self, url: &'a str) -> StoreFuture<'a, Option<StoredManifest>> {
        Box::pin(async move {
            let read = self.inner.get(url).await;
            if self.armed.swap(false, std::sync::atomic::Ordering::SeqCst) {
                self.entered.notify_one();
                self.release.notified().await;
            }
            read
        })
    }
    fn put<'a>(&'a self, stored: &'a StoredManifest) -> StoreFuture<'a, bool> {
        Box::pin(async move {
            let put = self.inner.put(stored).await;
            if self.armed_put.swap(false, std::sync::atomic::Ordering::SeqCst) {
                self.entered.notify_one();
                self.release.notified().await;
            }
            put
        })
    }
    fn insert<'a>(&'a self, stored: &'a StoredManifest) -> StoreFuture<'a, Inserted> {
        self.inner.insert(stored)
    }
    fn count(&self) -> StoreFuture<'_, u64> {
        self.inner.count()
    }
    fn page<'a>(&'a self, after: Option<&'a str>, limit: usize) -> StoreFuture<'a, Vec<StoredManifest>> {
        self.inner.page(after, limit)
    }
    fn shared(&self) -> bool {
        true
    }
}

fn invalidations(metrics: &StoreMetrics, direction: &'static str) -> u64 {
    metrics.invalidations.get_or_create(&super::cache::DirectionLabel { direction }).get()
}

/// Two replicas' caches over one store: a write at one, once stored, drops the other's cached manifest
/// if it differs; a read under way when the write is announced is read again rather than kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_announced_by_another_replica_replaces_the_cached_manifest() {
    let dir = tempfile::tempdir().expect("tempdir");
    let stores = Stores::embedded(Arc::new(Db::open(dir.path()).expect("db"))).await.expect("stores");
    let held = Arc::new(Held {
        inner: stores.manifests.clone(),
        armed: false.into(),
        armed_put: false.into(),
        entered: Default::default(),
        release: Default::default(),
    });
    let (ma, mb) = (StoreMetrics::default(), StoreMetrics::default());
    let a = Arc::new(ManifestCache::new(stores.manifests.clone(), CacheLimits::default(), 0, ma.clone()));
    let b = Arc::new(ManifestCache::new(held.clone(), CacheLimits::default(), 0, mb.clone()));
    // What the bus carries from A to B, in order, once each write is durable.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    a.on_written(move |url, content| tx.send((url.to_string(), content)).expect("B listens"));
    let deliver = |(url, content): (String, fog_proto::ContentId)| b.invalidate(&url, content);

    let url = "http://o.example/changing.mp4";
    let (v1, v2, v3) = (manifest(url, 1), manifest(url, 2), manifest(url, 3));
    a.put(v1.clone()).await.expect("put");
    let announced = rx.try_recv().expect("announced once stored");
    assert_eq!(announced, (url.to_string(), v1.manifest.content_id()));
    assert_eq!(b.get(url).await.expect("get").as_deref(), Some(&v1));
    deliver(announced);
    assert_eq!(b.cached(url).as_deref(), Some(&v1), "the same content stays cached");
    assert_eq!(mb.invalidated.get(), 0);

    // The origin changed; A ingested it again: B drops v1 and reads v2 from the store.
    a.put(v2.clone()).await.expect("put");
    deliver(rx.try_recv().expect("announced"));
    assert!(b.cached(url).is_none(), "the old manifest is not served from memory");
    assert_eq!(mb.invalidated.get(), 1);
    assert_eq!(b.get(url).await.expect("get").as_deref(), Some(&v2));
    assert_eq!(b.cached(url).as_deref(), Some(&v2));

    // B reads (its cache emptied, as after a bus reconnection) and the read is slow: A's next write is
    // announced before it answers with v2. That answer is not kept: B reads again and keeps v3.
    b.forget_all();
    assert!(b.cached(url).is_none());
    held.armed.store(true, std::sync::atomic::Ordering::SeqCst);
    let reading = tokio::spawn({
        let b = b.clone();
        async move { b.get(url).await.expect("get").map(|m| (*m).clone()) }
    });
    held.entered.notified().await;
    a.put(v3.clone()).await.expect("put");
    deliver(rx.try_recv().expect("announced"));
    held.release.notify_one();
    assert_eq!(reading.await.expect("read").as_ref(), Some(&v3), "read again after the announcement");
    assert_eq!(b.cached(url).as_deref(), Some(&v3));
    assert_eq!((invalidations(&ma, "sent"), invalidations(&mb, "received")), (3, 3));
    assert_eq!(invalidations(&mb, "sent"), 0, "B announces nothing without a listener");

    // Both write the URL at once, A's stored last: B's own write, announced over by A's before B took
    // it back, is not kept; B serves what the store holds.
    let (vb, va) = (manifest(url, 4), manifest(url, 5));
    held.armed_put.store(true, std::sync::atomic::Ordering::SeqCst);
    let writing = tokio::spawn({
        let (b, vb) = (b.clone(), vb.clone());
        async move { b.put(vb).await.expect("put") }
    });
    held.entered.notified().await;
    a.put(va.clone()).await.expect("put");
    deliver(rx.try_recv().expect("announced"));
    held.release.notify_one();
    writing.await.expect("write");
    assert!(b.cached(url).is_none(), "B's own write may not be the latest");
    assert_eq!(b.get(url).await.expect("get").as_deref(), Some(&va));
}
