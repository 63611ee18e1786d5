//! Package: the packages being delivered. An internal service with its own store. A package
//! is named by its delivery's id, so creating it is an idempotent PUT: a retried call stores
//! the same record again instead of making a second package.
//!
//! | method | path | what |
//! |---|---|---|
//! | PUT | `/internal/v1/packages/{id}` | create or replace `{size, weight_kg, tag?}`; `201` new, `200` replaced |
//! | GET | `/internal/v1/packages/{id}` | the package, `404` if unknown |
//! | DELETE | `/internal/v1/packages/{id}` | remove it (a failed order's compensation); `204`, also when already gone |

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};

use crate::Error;
use crate::api::{ApiJson, parse_id};
use crate::state::Package;
use crate::store::Store;

/// The Package service.
#[derive(Debug)]
pub struct Packages {
    store: Store,
}

impl Packages {
    /// Packages kept in `store`.
    pub fn new(store: Store) -> Arc<Self> {
        Arc::new(Self { store })
    }

    /// The package of delivery `id`.
    pub fn get(&self, id: u64) -> Result<Option<Package>, Error> {
        self.store.get(&crate::store::id_key(id))
    }

    /// Every stored package id.
    pub fn ids(&self) -> Result<Vec<u64>, Error> {
        Ok(self.store.all::<Package>()?.into_iter().filter_map(|(k, _)| k.parse().ok()).collect())
    }

    /// The service's routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new()
            .route("/internal/v1/packages/{id}", get(get_package).put(put_package).delete(delete_package))
            .with_state(self.clone())
    }
}

async fn put_package(
    State(packages): State<Arc<Packages>>,
    Path(id): Path<String>,
    ApiJson(package): ApiJson<Package>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    crate::state::validate_package(&package)?;
    let fresh = packages.store.put(&crate::store::id_key(id), &package).await?;
    Ok((if fresh { StatusCode::CREATED } else { StatusCode::OK }, Json(package)))
}

async fn get_package(
    State(packages): State<Arc<Packages>>,
    Path(id): Path<String>,
) -> Result<impl IntoResponse, Error> {
    let id = parse_id(&id)?;
    packages.get(id)?.map(Json).ok_or(Error::NotFound { what: "package", id })
}

async fn delete_package(State(packages): State<Arc<Packages>>, Path(id): Path<String>) -> Result<StatusCode, Error> {
    let id = parse_id(&id)?;
    packages.store.delete(&crate::store::id_key(id)).await?;
    Ok(StatusCode::NO_CONTENT)
}
