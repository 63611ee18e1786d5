//! The Delivery History contract, run against every store: the embedded one (redb) and
//! PostgreSQL. The PostgreSQL run reads `FLEETSTREAM_PG_URL` (default
//! `postgresql://postgres@127.0.0.1:5432/test`); without a server it prints SKIP, unless
//! `FLEETSTREAM_REQUIRE_SERVICES=1`, when it fails.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

use events::wire::Buffer;
use events::{BatchMeta, DeliveryBatch, DeliveryEvent, DeliveryStage, GeoPoint};
use services::history::History;

fn batch(events: &[(u64, u32, DeliveryStage)]) -> DeliveryBatch {
    let events: Vec<DeliveryEvent> = events
        .iter()
        .map(|&(delivery_id, seq, stage)| DeliveryEvent {
            delivery_id,
            seq,
            drone_id: 7,
            ts_us: 1_000 + u64::from(seq),
            location: GeoPoint::new(47.6, -122.3),
            stage,
        })
        .collect();
    DeliveryBatch::encode(BatchMeta::default(), &events, Buffer::new()).unwrap()
}

fn ids(page: &[services::history::OwnedDelivery]) -> Vec<u64> {
    page.iter().map(|d| d.delivery_id).collect()
}

/// What every history store must do.
fn contract(h: &History) {
    use DeliveryStage::*;
    assert_eq!(h.next_offset().unwrap(), None, "a new store starts from the beginning");
    h.note_delivery(1, "acme", 100).unwrap();
    h.note_delivery(2, "acme", 200).unwrap();
    h.note_delivery(3, "other", 150).unwrap();
    let first = batch(&[(1, 0, Created), (2, 0, Created)]);
    let second = batch(&[(1, 1, InTransit)]);
    h.apply_many(&[(0, &first), (1, &second)]).unwrap();
    assert_eq!(h.next_offset().unwrap(), Some(2), "the offset after the last batch, stored with it");

    // A replayed batch changes nothing.
    h.apply(1, &second).unwrap();
    let events = h.events_of(1).unwrap().unwrap();
    let stages: Vec<_> = events.iter().map(|e| e.stage).collect();
    assert_eq!(stages, [Created, InTransit]);
    assert_eq!((events[1].seq, events[1].drone_id, events[1].ts_us), (1, 7, 1_001));
    assert_eq!(h.events_of(3).unwrap(), Some(Vec::new()), "known (ordered) but no event yet");
    assert_eq!(h.events_of(99).unwrap(), None, "unknown");

    // Owner queries: by creation time, paged, with each delivery's latest stage.
    let page = h.by_owner("acme", 0, u64::MAX, None, 1).unwrap();
    assert_eq!(ids(&page), [1]);
    assert_eq!(page[0].stage, Some(InTransit));
    let next = h.by_owner("acme", 0, u64::MAX, Some((page[0].created_us, page[0].delivery_id)), 1).unwrap();
    assert_eq!(ids(&next), [2]);
    assert_eq!(next[0].stage, Some(Created));
    assert!(h.by_owner("acme", 0, u64::MAX, Some((200, 2)), 1).unwrap().is_empty());
    assert_eq!(ids(&h.by_owner("acme", 150, u64::MAX, None, 10).unwrap()), [2], "from 150");
    assert_eq!(ids(&h.by_owner("acme", 0, 200, None, 10).unwrap()), [1], "before 200");
    assert_eq!(ids(&h.by_owner("other", 0, u64::MAX, None, 10).unwrap()), [3]);

    // Notes written on their own (shutdown) are queryable, without a stage yet.
    h.note_delivery(4, "acme", 300).unwrap();
    h.flush().unwrap();
    let late = h.by_owner("acme", 250, u64::MAX, None, 10).unwrap();
    assert_eq!((ids(&late), late[0].stage), (vec![4], None));
    assert_eq!(h.next_offset().unwrap(), Some(2), "a flush leaves the offset alone");
}

#[test]
fn the_embedded_store_keeps_the_contract() {
    let dir = std::env::temp_dir().join(format!("fleetstream-history-contract-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    contract(&History::open(&dir.join("history.redb")).unwrap());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_postgres_store_keeps_the_contract() {
    let url =
        std::env::var("FLEETSTREAM_PG_URL").unwrap_or_else(|_| "postgresql://postgres@127.0.0.1:5432/test".into());
    let schema = format!("fleetstream_contract_{}", std::process::id());
    let history = match History::open_postgres(&url, &schema) {
        Ok(h) => h,
        Err(error) if std::env::var("FLEETSTREAM_REQUIRE_SERVICES").as_deref() != Ok("1") => {
            println!("SKIP the_postgres_store_keeps_the_contract: no PostgreSQL at {url}: {error}");
            return;
        }
        Err(error) => panic!("PostgreSQL at {url} is required (FLEETSTREAM_REQUIRE_SERVICES=1): {error}"),
    };
    contract(&history);
    drop(history);
    // Opening again finds the schema migrated and the data there.
    let again = History::open_postgres(&url, &schema).unwrap();
    assert_eq!(again.next_offset().unwrap(), Some(2));
    drop(again);
    let mut admin = postgres::Client::connect(&url, postgres::NoTls).unwrap();
    admin.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).unwrap();
}
