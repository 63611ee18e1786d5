//! The HTTP API through its router (no socket), against a fake engine.

#![allow(clippy::unwrap_used)] // helpers in a test crate may panic: that fails the test

mod common;

use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, StatusCode, header};
use common::FakeFleet;
use events::wire::Buffer;
use events::{BatchMeta, DeliveryBatch, DeliveryCommand, DeliveryEvent, DeliveryStage, GeoPoint};
use serde_json::{Value, json};
use services::Services;
use tower::ServiceExt;

async fn setup() -> (Arc<FakeFleet>, Arc<Services<Arc<FakeFleet>>>, axum::Router) {
    let fleet = Arc::new(FakeFleet::default());
    let svc = Arc::new(Services::new(fleet.clone()).await.unwrap());
    let router = services::router(&svc).merge(services::internal_router(&svc));
    let (status, _, _) = call(&router, "PUT", "/internal/v1/accounts/acme", Some("{}")).await;
    assert_eq!(status, StatusCode::CREATED);
    (fleet, svc, router)
}

async fn call(
    router: &axum::Router,
    method: &str,
    uri: &str,
    body: Option<&str>,
) -> (StatusCode, Value, Option<String>) {
    let mut req = Request::builder().method(method).uri(uri);
    if body.is_some() {
        req = req.header(header::CONTENT_TYPE, "application/json");
    }
    let req = req.body(body.map_or_else(Body::empty, |b| Body::from(b.to_string()))).unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let retry = resp.headers().get(header::RETRY_AFTER).map(|v| v.to_str().unwrap().to_string());
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    let value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
    (status, value, retry)
}

fn order() -> String {
    json!({
        "owner": "acme",
        "pickup": {"lat": 47.6, "lon": -122.3},
        "dropoff": {"lat": 47.62, "lon": -122.35},
        "package": {"size": "small", "weight_kg": 1.2}
    })
    .to_string()
}

fn events_batch(events: &[DeliveryEvent]) -> DeliveryBatch {
    DeliveryBatch::encode(BatchMeta::default(), events, Buffer::new()).unwrap()
}

fn stage_event(delivery_id: u64, drone_id: u64, seq: u32, stage: DeliveryStage) -> DeliveryEvent {
    DeliveryEvent {
        delivery_id,
        seq,
        drone_id,
        ts_us: 1000 + u64::from(seq),
        location: GeoPoint::new(47.62, -122.35),
        stage,
    }
}

#[tokio::test]
async fn schedule_track_and_complete_a_delivery() {
    let (fleet, svc, router) = setup().await;
    let (status, _, _) = call(&router, "PUT", "/v1/drones/7", None).await;
    assert_eq!(status, StatusCode::CREATED);
    let (status, body, _) = call(&router, "POST", "/v1/deliveries", Some(&order())).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["drone_id"], 7);
    assert_eq!(body["stage"], "created");
    let id = body["delivery_id"].as_u64().unwrap();
    assert!(
        matches!(fleet.commands.lock()[0], DeliveryCommand::Create { delivery_id, drone_id: 7, .. } if delivery_id == id)
    );
    let missions = fleet.missions.lock().clone();
    assert_eq!(missions.len(), 1, "the mission went into drone-commands");
    assert_eq!((missions[0].delivery_id, missions[0].drone_id), (id, 7));

    // The only drone is busy now.
    let (status, body, retry) = call(&router, "POST", "/v1/deliveries", Some(&order())).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(body["error"], "no_drone_available");
    assert_eq!(retry.as_deref(), Some("1"));

    svc.apply_delivery_events(
        &events_batch(&[
            stage_event(id, 7, 0, DeliveryStage::Created),
            stage_event(id, 7, 1, DeliveryStage::HeadedToPickup),
            stage_event(id, 7, 2, DeliveryStage::InTransit),
        ]),
        None,
    )
    .await
    .unwrap();
    let (status, body, _) = call(&router, "GET", &format!("/v1/deliveries/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["stage"], "in_transit");
    assert_eq!(body["drone"]["position"]["lat"], 47.61);
    assert_eq!(body["eta_s"], 213, "3.2 km to the drop-off at 15 m/s: {body}");
    assert_eq!(body["owner"], "acme");

    // A replayed older event changes nothing; completion frees the drone.
    svc.apply_delivery_events(
        &events_batch(&[
            stage_event(id, 7, 1, DeliveryStage::HeadedToPickup),
            stage_event(id, 7, 3, DeliveryStage::DeliveryComplete),
        ]),
        None,
    )
    .await
    .unwrap();
    let (_, body, _) = call(&router, "GET", &format!("/v1/deliveries/{id}"), None).await;
    assert_eq!(body["stage"], "delivery_complete");
    assert_eq!(svc.fleet_size(), (1, 1));
    let (status, _, _) = call(&router, "POST", "/v1/deliveries", Some(&order())).await;
    assert_eq!(status, StatusCode::CREATED);
}

/// Batches applied as one round end where applying them one by one would: the delivery at its
/// last stage (an older event in a later batch changes nothing) and its drone freed.
#[tokio::test]
async fn batches_applied_in_one_round_end_as_if_applied_one_by_one() {
    let (_, svc, router) = setup().await;
    call(&router, "PUT", "/v1/drones/7", None).await;
    let (_, body, _) = call(&router, "POST", "/v1/deliveries", Some(&order())).await;
    let id = body["delivery_id"].as_u64().unwrap();
    assert_eq!(svc.fleet_size(), (1, 0));
    let first = events_batch(&[
        stage_event(id, 7, 0, DeliveryStage::Created),
        stage_event(id, 7, 1, DeliveryStage::HeadedToPickup),
    ]);
    let second = events_batch(&[
        stage_event(id, 7, 2, DeliveryStage::InTransit),
        stage_event(id, 7, 1, DeliveryStage::HeadedToPickup),
    ]);
    svc.apply_delivery_event_batches(&[&first, &second], Some(1)).await.unwrap();
    let (_, body, _) = call(&router, "GET", &format!("/v1/deliveries/{id}"), None).await;
    assert_eq!(body["stage"], "in_transit", "{body}");
    let done = events_batch(&[stage_event(id, 7, 3, DeliveryStage::DeliveryComplete)]);
    svc.apply_delivery_event_batches(&[&second, &done], Some(3)).await.unwrap();
    assert_eq!(svc.delivery_events_position().unwrap(), Some(3), "the position commits with the round");
    let (_, body, _) = call(&router, "GET", &format!("/v1/deliveries/{id}"), None).await;
    assert_eq!(body["stage"], "delivery_complete", "{body}");
    assert_eq!(svc.fleet_size(), (1, 1), "the finished delivery freed its drone");
}

#[tokio::test]
async fn malformed_requests_get_400_with_a_reason() {
    let (_, _, router) = setup().await;
    call(&router, "POST", "/v1/drones", Some(r#"{"drones":[1,2,3]}"#)).await;
    let cases = [
        ("{not json", "not valid JSON"),
        (r#"{"owner":"a","pickup":{"lat":1,"lon":2},"package":{"size":"small","weight_kg":1}}"#, "dropoff"),
        (
            r#"{"owner":"a","pickup":{"lat":100,"lon":2},"dropoff":{"lat":1,"lon":2},"package":{"size":"small","weight_kg":1}}"#,
            "pickup",
        ),
        (
            r#"{"owner":"","pickup":{"lat":1,"lon":2},"dropoff":{"lat":1,"lon":2},"package":{"size":"small","weight_kg":1}}"#,
            "owner",
        ),
        (
            r#"{"owner":"a","pickup":{"lat":1,"lon":2},"dropoff":{"lat":1,"lon":2},"package":{"size":"huge","weight_kg":1}}"#,
            "size",
        ),
        (
            r#"{"owner":"a","pickup":{"lat":1,"lon":2},"dropoff":{"lat":1,"lon":2},"package":{"size":"small","weight_kg":1},"x":1}"#,
            "unknown field",
        ),
    ];
    for (body, needle) in cases {
        let (status, resp, _) = call(&router, "POST", "/v1/deliveries", Some(body)).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(resp["error"], "bad_request");
        let message = resp["message"].as_str().unwrap();
        assert!(message.contains(needle), "{message:?} should mention {needle:?}");
    }
    let (status, resp, _) = call(&router, "GET", "/v1/deliveries/abc", None).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert!(resp["message"].as_str().unwrap().contains("numeric"));
    let (status, resp, _) = call(&router, "GET", "/v1/deliveries/12345", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(resp["error"], "not_found");
}

#[tokio::test]
async fn an_engine_failure_leaves_nothing_behind() {
    let (fleet, svc, router) = setup().await;
    call(&router, "PUT", "/v1/drones/7", None).await;
    fleet.fail.store(true, Ordering::Relaxed);
    let (status, body, _) = call(&router, "POST", "/v1/deliveries", Some(&order())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "shutting_down");
    assert_eq!(svc.fleet_size(), (1, 1), "the drone was released");
    assert_eq!(svc.packages.ids().unwrap(), Vec::<u64>::new(), "the package was removed");
    assert_eq!(svc.deliveries.record_count(), 0, "the delivery record was removed");
    fleet.fail.store(false, Ordering::Relaxed);
    let (status, _, _) = call(&router, "POST", "/v1/deliveries", Some(&order())).await;
    assert_eq!(status, StatusCode::CREATED);
}

#[tokio::test]
async fn a_mission_that_cannot_be_queued_undoes_the_delivery() {
    let (fleet, svc, router) = setup().await;
    call(&router, "PUT", "/v1/drones/7", None).await;
    fleet.fail_queue.store(true, Ordering::Relaxed);
    let (status, body, _) = call(&router, "POST", "/v1/deliveries", Some(&order())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    assert_eq!(body["error"], "storage_full");
    let commands = fleet.commands.lock().clone();
    assert!(matches!(commands[..], [DeliveryCommand::Create { .. }, DeliveryCommand::Cancel { drone_id: 7, .. }]));
    assert_eq!(svc.fleet_size(), (1, 1), "the drone was released");
    assert!(fleet.missions.lock().is_empty());
}

/// An undo that cannot be made at once (the engine refuses the cancel) is tried again while
/// the node runs, until the half-made delivery is gone and its drone free.
#[tokio::test]
async fn an_undo_that_failed_is_tried_again_until_it_is_made() {
    let (fleet, svc, router) = setup().await;
    call(&router, "PUT", "/v1/drones/7", None).await;
    fleet.fail_queue.store(true, Ordering::Relaxed);
    fleet.fail_cancels.store(true, Ordering::Relaxed);
    let (status, body, _) = call(&router, "POST", "/v1/deliveries", Some(&order())).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{body}");
    let left = svc.scheduler.retry_left().await;
    assert_eq!((left.undone, left.left), (0, 1), "the engine still refuses: {left:?}");
    assert!(!fleet.commands.lock().iter().any(|c| matches!(c, DeliveryCommand::Cancel { .. })));

    fleet.fail_cancels.store(false, Ordering::Relaxed);
    let retried = svc.scheduler.retry_left().await;
    assert_eq!((retried.undone, retried.left), (1, 0), "{retried:?}");
    let commands = fleet.commands.lock().clone();
    assert!(matches!(commands[..], [DeliveryCommand::Create { .. }, DeliveryCommand::Cancel { drone_id: 7, .. }]));
    assert_eq!(svc.deliveries.record_count(), 0, "the record is gone");
    assert_eq!(svc.scheduler.retry_left().await, services::scheduler::Recovered::default(), "nothing left");
    assert_eq!(svc.scheduler.cut_short_schedules().unwrap(), Vec::<u64>::new(), "nor in the journal");
}

#[tokio::test]
async fn drones_are_read_from_the_engine() {
    let (_, _, router) = setup().await;
    let (status, body, _) = call(&router, "GET", "/v1/drones/5", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(body["battery_pct"], 77.0);
    let (status, _, _) = call(&router, "GET", "/v1/drones/500", None).await;
    assert_eq!(status, StatusCode::NOT_FOUND);
}

async fn post_keyed(router: &axum::Router, key: &str, body: &str) -> (StatusCode, Value, Option<String>) {
    let req = Request::builder()
        .method("POST")
        .uri("/v1/deliveries")
        .header(header::CONTENT_TYPE, "application/json")
        .header("idempotency-key", key)
        .body(Body::from(body.to_string()))
        .unwrap();
    let resp = router.clone().oneshot(req).await.unwrap();
    let status = resp.status();
    let replayed = resp.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap().to_string());
    let bytes = axum::body::to_bytes(resp.into_body(), 1 << 20).await.unwrap();
    (status, serde_json::from_slice(&bytes).unwrap_or(Value::Null), replayed)
}

/// A drone the engine has on a delivery the registry does not know of (a schedule cut short
/// by a crash after the engine took its create) is never offered: it is held for that delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drone_the_engine_has_on_an_unknown_delivery_is_not_offered() {
    let (fleet, svc, router) = setup().await;
    fleet.flying.lock().push((42, 999));
    call(&router, "POST", "/v1/drones", Some(r#"{"drones":[42]}"#)).await;
    let (status, body, _) = call(&router, "POST", "/v1/deliveries", Some(&order())).await;
    assert_eq!(status, StatusCode::CONFLICT, "{body}");
    assert_eq!(body["error"], "no_drone_available");
    let (_, drone, _) = call(&router, "GET", "/v1/drones/42", None).await;
    assert_eq!(drone["assigned_delivery"], 999, "{drone}");
    assert!(fleet.commands.lock().is_empty(), "no create was sent for the busy drone");
    // The delivery's end frees it.
    fleet.flying.lock().clear();
    svc.apply_delivery_events(&events_batch(&[stage_event(999, 42, 0, DeliveryStage::Cancelled)]), None).await.unwrap();
    let (status, body, _) = call(&router, "POST", "/v1/deliveries", Some(&order())).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["drone_id"], 42);
}

/// Another node gave a drone a delivery after this node last looked (a shared store): the
/// engine refuses the create as `drone_busy`, the schedule is undone with the drone looked up
/// again (and held for the other delivery), and tried again, never with that drone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drone_the_engine_refuses_as_busy_is_passed_over_on_the_next_try() {
    let (fleet, svc, router) = setup().await;
    call(&router, "POST", "/v1/drones", Some(r#"{"drones":[42]}"#)).await;
    fleet.flying.lock().push((42, 999));
    let (status, body, _) = call(&router, "POST", "/v1/deliveries", Some(&order())).await;
    assert_eq!(status, StatusCode::CONFLICT, "tried again, no other drone: {body}");
    assert_eq!(body["error"], "no_drone_available");
    let (_, drone, _) = call(&router, "GET", "/v1/drones/42", None).await;
    assert_eq!(drone["assigned_delivery"], 999, "held for the other delivery: {drone}");
    assert!(fleet.commands.lock().iter().all(|c| matches!(c, DeliveryCommand::Cancel { .. })), "no create landed");
    call(&router, "POST", "/v1/drones", Some(r#"{"drones":[43]}"#)).await;
    let (status, body, _) = call(&router, "POST", "/v1/deliveries", Some(&order())).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    assert_eq!(body["drone_id"], 43);
    assert_eq!(svc.fleet_size(), (2, 0));
}

/// A client that goes away mid-request (its request future dropped) does not stop the saga:
/// it runs to its end, and a retry with the same key gets its result instead of waiting for a
/// key that would never be finished.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_client_went_away_is_carried_to_its_end() {
    let (fleet, _, router) = setup().await;
    call(&router, "POST", "/v1/drones", Some(r#"{"drones":[1,2,3]}"#)).await;
    fleet.command_delay_ms.store(300, Ordering::Relaxed);
    let gone = tokio::time::timeout(Duration::from_millis(50), post_keyed(&router, "order-gone", &order())).await;
    assert!(gone.is_err(), "the client gave up mid-saga");
    let retry = tokio::time::timeout(Duration::from_secs(5), post_keyed(&router, "order-gone", &order())).await;
    let (status, body, replayed) = retry.expect("the retry must not wait forever for the abandoned key");
    assert_eq!((status, replayed.as_deref()), (StatusCode::CREATED, Some("true")), "{body}");
    assert_eq!(fleet.commands.lock().len(), 1, "the abandoned request created the delivery once");
    assert_eq!(fleet.missions.lock().len(), 1, "and its drone was told");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idempotency_key_makes_a_retried_post_return_the_first_result() {
    let (fleet, _, router) = setup().await;
    call(&router, "POST", "/v1/drones", Some(r#"{"drones":[1,2,3]}"#)).await;
    let (status, first, replayed) = post_keyed(&router, "order-17", &order()).await;
    assert_eq!((status, replayed.as_deref()), (StatusCode::CREATED, Some("false")), "{first}");
    let (status, again, replayed) = post_keyed(&router, "order-17", &order()).await;
    assert_eq!((status, replayed.as_deref()), (StatusCode::CREATED, Some("true")));
    assert_eq!(again["delivery_id"], first["delivery_id"], "the same delivery");
    assert_eq!(fleet.commands.lock().len(), 1, "the engine saw one create");
    assert_eq!(fleet.missions.lock().len(), 1, "one mission");

    // Concurrent retries of a new key: one runs, the others wait for it and get its result.
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let router = router.clone();
            tokio::spawn(async move { post_keyed(&router, "order-18", &order()).await })
        })
        .collect();
    let mut ids = Vec::new();
    for t in tasks {
        let (status, v, _) = t.await.unwrap();
        assert_eq!(status, StatusCode::CREATED);
        ids.push(v["delivery_id"].as_u64().unwrap());
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one delivery for one key");
    assert_eq!(fleet.commands.lock().len(), 2);

    // The same key with a different request is refused; a failed request can be retried.
    let other = order().replace("1.2", "3.4");
    let (status, v, _) = post_keyed(&router, "order-17", &other).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{v}");
    assert_eq!(v["error"], "idempotency_key_reused");
    fleet.fail.store(true, Ordering::Relaxed);
    let (status, _, _) = post_keyed(&router, "order-19", &order()).await;
    assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    fleet.fail.store(false, Ordering::Relaxed);
    let (status, _, replayed) = post_keyed(&router, "order-19", &order()).await;
    assert_eq!((status, replayed.as_deref()), (StatusCode::CREATED, Some("false")), "a failure is not remembered");
}

#[tokio::test]
async fn only_existing_accounts_that_may_order_can_schedule() {
    let (fleet, svc, router) = setup().await;
    call(&router, "PUT", "/v1/drones/7", None).await;
    let (status, body, _) = call(&router, "POST", "/v1/deliveries", Some(&order().replace("acme", "nobody"))).await;
    assert_eq!(status, StatusCode::UNPROCESSABLE_ENTITY, "{body}");
    assert_eq!(body["error"], "unknown_account");
    let (status, _, _) = call(&router, "PUT", "/internal/v1/accounts/acme", Some(r#"{"may_order":false}"#)).await;
    assert_eq!(status, StatusCode::OK);
    let (status, body, _) = call(&router, "POST", "/v1/deliveries", Some(&order())).await;
    assert_eq!(status, StatusCode::FORBIDDEN, "{body}");
    assert_eq!(body["error"], "account_not_allowed");
    assert!(fleet.commands.lock().is_empty());
    assert_eq!(svc.fleet_size(), (1, 1));
    let (status, body, _) = call(&router, "PUT", "/internal/v1/accounts/a%2Fb", Some("{}")).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
}

#[tokio::test]
async fn the_package_and_the_record_are_stored_with_the_delivery() {
    let (_, svc, router) = setup().await;
    call(&router, "PUT", "/v1/drones/7", None).await;
    let (status, body, _) = call(&router, "POST", "/v1/deliveries", Some(&order())).await;
    assert_eq!(status, StatusCode::CREATED, "{body}");
    let id = body["delivery_id"].as_u64().unwrap();
    let (status, package, _) = call(&router, "GET", &format!("/internal/v1/packages/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(package["size"], "small");
    let (status, assignment, _) = call(&router, "GET", &format!("/internal/v1/assignments/{id}"), None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(assignment["drone_id"], 7);
    // Assignment is idempotent per delivery: asking again gives the same drone.
    let again = r#"{"pickup":{"lat":1.0,"lon":2.0}}"#;
    let (status, assignment, _) = call(&router, "PUT", &format!("/internal/v1/assignments/{id}"), Some(again)).await;
    assert_eq!((status, assignment["drone_id"].as_u64()), (StatusCode::OK, Some(7)));
    assert_eq!(svc.delivery(id).map(|r| r.drone_id), Some(7));
}

#[tokio::test]
async fn the_openapi_document_describes_the_public_api() {
    let (_, _, router) = setup().await;
    let (status, doc, _) = call(&router, "GET", "/v1/openapi.json", None).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(doc["info"]["version"], "v1");
    for (path, method) in [
        ("/v1/deliveries", "post"),
        ("/v1/deliveries/{id}", "get"),
        ("/v1/deliveries/{id}", "patch"),
        ("/v1/deliveries/{id}", "delete"),
        ("/v1/deliveries/{id}/notifications", "post"),
        ("/v1/deliveries/{id}/history", "get"),
        ("/v1/history", "get"),
        ("/v1/drones/{id}", "get"),
    ] {
        assert!(doc["paths"][path][method].is_object(), "{method} {path} is described");
    }
    let create = &doc["components"]["schemas"]["CreateDelivery"];
    assert_eq!(create["properties"]["pickup"]["$ref"], "#/components/schemas/GeoPoint", "{create}");
    let required: Vec<&str> = create["required"].as_array().unwrap().iter().map(|v| v.as_str().unwrap()).collect();
    assert_eq!(required, ["owner", "pickup", "dropoff", "package"]);
    let stages = doc["components"]["schemas"]["DeliveryStage"]["enum"].as_array().unwrap();
    assert!(stages.iter().any(|s| s == "delivery_complete"), "{stages:?}");
}

#[tokio::test]
async fn a_restarted_delivery_service_reads_each_delivery_where_it_stood() {
    use services::deliveries::DeliveryService;
    let fleet = Arc::new(FakeFleet::default());
    let store = services::store::Store::in_memory().unwrap();
    let stores = services::deliveries::DeliveryStores::in_file(&store);
    let svc = DeliveryService::open(fleet.clone(), stores.clone(), Default::default()).unwrap();
    let record: services::DeliveryRecord = serde_json::from_value(json!({
        "delivery_id": 42, "owner": "acme", "drone_id": 7,
        "pickup": {"lat": 47.6, "lon": -122.3}, "dropoff": {"lat": 47.62, "lon": -122.35},
        "package": {"size": "small", "weight_kg": 1.0},
        "stage": "created", "created_us": 1, "updated_us": 1
    }))
    .unwrap();
    assert!(svc.put(record).await.unwrap());
    let changed = svc
        .apply_delivery_events(&events_batch(&[
            stage_event(42, 7, 0, DeliveryStage::Created),
            stage_event(42, 7, 1, DeliveryStage::HeadedToPickup),
            stage_event(42, 7, 2, DeliveryStage::InTransit),
        ]))
        .unwrap();
    assert_eq!(changed.len(), 1, "one write per delivery per batch, with its latest stage");
    svc.persist(&changed, &[], services::store::Batch::new()).await.unwrap();
    drop(svc);

    let again = DeliveryService::open(fleet, stores, Default::default()).unwrap();
    assert_eq!(again.record(42).map(|r| r.stage), Some(DeliveryStage::InTransit));
    // An older event replayed after the restart changes nothing.
    assert!(
        again
            .apply_delivery_events(&events_batch(&[stage_event(42, 7, 1, DeliveryStage::HeadedToPickup)]))
            .unwrap()
            .is_empty()
    );
    assert_eq!(again.record(42).map(|r| r.stage), Some(DeliveryStage::InTransit));
}

#[tokio::test]
async fn finished_deliveries_beyond_the_held_count_leave_memory_and_are_read_from_the_store() {
    use services::deliveries::{DeliveryLimits, DeliveryService};
    let fleet = Arc::new(FakeFleet::default());
    let store = services::store::Store::in_memory().unwrap();
    let stores = services::deliveries::DeliveryStores::in_file(&store);
    let limits = DeliveryLimits { finished_held: 2, ..Default::default() };
    let svc = DeliveryService::open(fleet.clone(), stores.clone(), limits).unwrap();
    for id in 1..=5u64 {
        let record: services::DeliveryRecord = serde_json::from_value(json!({
            "delivery_id": id, "owner": "acme", "drone_id": id,
            "pickup": {"lat": 47.6, "lon": -122.3}, "dropoff": {"lat": 47.62, "lon": -122.35},
            "package": {"size": "small", "weight_kg": 1.0},
            "stage": "created", "created_us": id, "updated_us": id
        }))
        .unwrap();
        assert!(svc.put(record).await.unwrap());
    }
    // Deliveries 1 to 4 finish in that order; 5 stays under way.
    for id in 1..=4u64 {
        let changed = svc
            .apply_delivery_events(&events_batch(&[
                stage_event(id, id, 1, DeliveryStage::HeadedToPickup),
                stage_event(id, id, 2, DeliveryStage::InTransit),
                stage_event(id, id, 3, DeliveryStage::DeliveryComplete),
            ]))
            .unwrap();
        svc.persist(&changed, &[], services::store::Batch::new()).await.unwrap();
    }
    assert_eq!(svc.record_count(), 3, "the delivery under way and the two finished last");
    assert!(svc.record(1).is_none() && svc.record(2).is_none(), "the first two to finish were let go");
    assert!(svc.record(4).is_some() && svc.record(5).is_some());
    for id in 1..=4u64 {
        let r = svc.lookup(id).unwrap().expect("every finished delivery is still answered");
        assert_eq!(r.stage, DeliveryStage::DeliveryComplete);
    }
    assert_eq!(svc.record_count(), 3, "reading a finished delivery does not hold it again");
    // Late repeats of a let-go delivery's events change nothing.
    assert!(
        svc.apply_delivery_events(&events_batch(&[stage_event(1, 1, 3, DeliveryStage::DeliveryComplete)]))
            .unwrap()
            .is_empty()
    );
    drop(svc);

    // A restart holds the same: the delivery under way and the two most recently finished.
    let again = DeliveryService::open(fleet, stores, limits).unwrap();
    assert_eq!(again.record_count(), 3);
    assert_eq!(again.record(5).map(|r| r.stage), Some(DeliveryStage::Created));
    assert!(again.record(3).is_some() && again.record(4).is_some() && again.record(2).is_none());
    assert_eq!(again.lookup(1).unwrap().map(|r| r.stage), Some(DeliveryStage::DeliveryComplete));
}
