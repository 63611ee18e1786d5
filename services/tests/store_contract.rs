//! The services' store keeps one contract on both backends: the embedded redb file and the
//! PostgreSQL table several nodes share. On PostgreSQL two handles stand for two nodes: each
//! sees what the other wrote, keeps its [`Store::local`] namespaces apart, and a versioned
//! write of a node that is behind never overwrites a newer one.
//!
//! The PostgreSQL run reads `FLEETSTREAM_PG_URL` (default
//! `postgresql://postgres@127.0.0.1:5432/test`); without a server it prints SKIP, unless
//! `FLEETSTREAM_REQUIRE_SERVICES=1`, when it fails.

#![allow(clippy::unwrap_used)] // a test: a panic fails it

use services::store::{Batch, Store};

async fn contract(store: &Store) {
    let (a, b) = (store.namespace("a"), store.namespace("b"));
    assert!(a.put("k1", &1u32).await.unwrap(), "a new key");
    assert!(!a.put("k1", &2u32).await.unwrap(), "a key replaced");
    b.put("k1", &10u32).await.unwrap();
    let mut batch = Batch::new();
    batch.put(&a, "k2", &3u32).unwrap();
    batch.put(&b, "k2", &30u32).unwrap();
    batch.delete(&b, "k1");
    assert_eq!(store.enqueue(batch).await.unwrap(), vec![true, true, true]);
    assert_eq!(a.all::<u32>().unwrap(), vec![("k1".into(), 2), ("k2".into(), 3)]);
    assert_eq!(b.all::<u32>().unwrap(), vec![("k2".into(), 30)]);
    assert_eq!(a.get::<u32>("k2").unwrap(), Some(3));
    assert_eq!(a.get::<u32>("nope").unwrap(), None);
    let many = a.get_many::<u32>(&["k2".into(), "nope".into(), "k1".into()]).unwrap();
    assert_eq!(many, vec![Some(3), None, Some(2)]);
    assert!(a.delete("k1").await.unwrap());
    assert!(!a.delete("k1").await.unwrap());
    // Any character may be in a key (an idempotency key is scoped as `owner\0key`).
    a.put("acme\u{0}retry-1", &7u32).await.unwrap();
    assert_eq!(a.get::<u32>("acme\u{0}retry-1").unwrap(), Some(7));
    assert!(a.delete("acme\u{0}retry-1").await.unwrap());
    // A namespace's range ends at its own keys: "a0" sorts right after every "a/..." key.
    store.put("a0", &99u32).await.unwrap();
    assert_eq!(a.all::<u32>().unwrap(), vec![("k2".into(), 3)]);
}

#[tokio::test]
async fn the_embedded_store_keeps_the_contract() {
    contract(&Store::in_memory().unwrap()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_postgres_store_keeps_the_contract_and_is_shared() {
    let url =
        std::env::var("FLEETSTREAM_PG_URL").unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into());
    let schema = format!("fleetstream_store_{}", std::process::id());
    let one = match Store::open_postgres(&url, &schema, "one") {
        Ok(store) => store,
        Err(error) if std::env::var("FLEETSTREAM_REQUIRE_SERVICES").as_deref() != Ok("1") => {
            println!("SKIP the_postgres_store_keeps_the_contract: no PostgreSQL at {url}: {error}");
            return;
        }
        Err(error) => panic!("PostgreSQL at {url} is required (FLEETSTREAM_REQUIRE_SERVICES=1): {error}"),
    };
    assert!(one.is_shared());
    contract(&one).await;

    // A second node: the same records, its own local namespace.
    let two = Store::open_postgres(&url, &schema, "two").unwrap();
    assert_eq!(two.namespace("a").get::<u32>("k2").unwrap(), Some(3));
    one.local("positions").put("log", &5u64).await.unwrap();
    two.local("positions").put("log", &9u64).await.unwrap();
    assert_eq!(one.local("positions").get::<u64>("log").unwrap(), Some(5));
    assert_eq!(two.local("positions").get::<u64>("log").unwrap(), Some(9));

    // Versioned writes: the newer version stays whoever writes last.
    let records = one.namespace("records");
    let mut ahead = Batch::new();
    ahead.put_versioned(&records, "d1", &"in_transit", 3).unwrap();
    assert_eq!(one.enqueue(ahead).await.unwrap(), vec![true]);
    let mut behind = Batch::new();
    behind.put_versioned(&two.namespace("records"), "d1", &"headed_to_pickup", 2).unwrap();
    assert_eq!(two.enqueue(behind).await.unwrap(), vec![false], "an older version lands nowhere");
    assert_eq!(records.get::<String>("d1").unwrap().as_deref(), Some("in_transit"));
    let mut same = Batch::new();
    same.put_versioned(&two.namespace("records"), "d1", &"in_transit, new places", 3).unwrap();
    two.enqueue(same).await.unwrap();
    assert_eq!(records.get::<String>("d1").unwrap().as_deref(), Some("in_transit, new places"));

    // Opening again finds the schema migrated and the data there.
    drop((one, two));
    let again = Store::open_postgres(&url, &schema, "one").unwrap();
    assert_eq!(again.local("positions").get::<u64>("log").unwrap(), Some(5));
    drop(again);
    tokio::task::spawn_blocking(move || {
        postgres::Client::connect(&url, postgres::NoTls)?.batch_execute(&format!("DROP SCHEMA {schema} CASCADE"))
    })
    .await
    .unwrap()
    .unwrap();
}
