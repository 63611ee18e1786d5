//! What several integration tests share: finding the NATS server they need.

#![allow(dead_code)] // each test crate uses part of it

/// The NATS server at `FLEETSTREAM_NATS_URL` (default `nats://127.0.0.1:4222`) and its URL.
/// Without one: prints a SKIP line naming `test` and returns `None`, unless
/// `FLEETSTREAM_REQUIRE_SERVICES=1`, when it fails the test.
pub async fn nats(test: &str) -> Option<(async_nats::Client, String)> {
    let url = std::env::var("FLEETSTREAM_NATS_URL").unwrap_or_else(|_| "nats://127.0.0.1:4222".into());
    match async_nats::connect(&url).await {
        Ok(client) => Some((client, url)),
        Err(error) => {
            assert!(
                std::env::var("FLEETSTREAM_REQUIRE_SERVICES").as_deref() != Ok("1"),
                "NATS at {url} is required (FLEETSTREAM_REQUIRE_SERVICES=1): {error}"
            );
            println!("SKIP {test}: no NATS at {url}: {error}");
            None
        }
    }
}
