//! fleetstream's HTTP services: delivery scheduling and status, and the drone registry.
//!
//! The services program against `events::FleetControl` only, never against the engine, so they
//! run beside the engine in one process (the default) or, later, in processes of their own.
//!
//! Data flow:
//! ```text
//!  POST /v1/deliveries ─► registry: take a free drone ─► FleetControl::command(Create) ─► 201
//!  delivery-events stream ─► Services::apply_delivery_events ─► read model (stage per delivery),
//!                                                               drone freed on completion/cancel
//!  GET /v1/deliveries/{id} ─► read model + FleetControl::drone (last known position)
//! ```

pub mod accounts;
mod api;
pub mod auth;
pub mod breaker;
pub mod client;
pub mod deliveries;
pub mod drones;
pub mod error;
pub mod history;
mod history_pg;
mod idempotency;
pub mod ids;
pub mod notify;
pub mod packages;
pub mod saga;
pub mod scheduler;
pub mod spans;
mod state;
pub mod store;
mod store_pg;
pub mod throttle;
pub mod tls;
pub mod trace;

pub use api::{
    ApiDoc, CommonAnswers, JsonLines, RequestRules, internal_router, openapi_router, router, router_with, uniform,
};
pub use error::Error;
pub use state::{
    CreateDelivery, DELIVERY_EVENTS_POSITION, DeliveryRecord, Package, Reschedule, Services, ServicesConfig,
    ServicesStore, node_name, positions,
};
