//! Accounts: who may order deliveries. An internal service with its own store; the scheduler
//! asks it before anything else is done for an order.
//!
//! | method | path | what |
//! |---|---|---|
//! | PUT | `/internal/v1/accounts/{owner}` | create or update `{may_order}` (default `true`); `201` new, `200` updated |
//! | GET | `/internal/v1/accounts/{owner}` | the account, `404` if unknown |

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::{Deserialize, Serialize};

use crate::Error;
use crate::api::ApiJson;
use crate::store::Store;

/// One account.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Account {
    /// The owner name orders are placed under.
    pub owner: String,
    /// Whether it may order (an account can be suspended without being deleted).
    pub may_order: bool,
}

/// `PUT /v1/accounts/{owner}`'s body.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct PutAccount {
    #[serde(default = "yes")]
    may_order: bool,
}

fn yes() -> bool {
    true
}

/// The Accounts service.
#[derive(Debug)]
pub struct Accounts {
    store: Store,
}

/// Checks an owner name: 1 to 128 visible ASCII characters, no `/`.
pub fn valid_owner(owner: &str) -> Result<(), Error> {
    let ok = !owner.is_empty() && owner.len() <= 128 && owner.bytes().all(|b| b.is_ascii_graphic() && b != b'/');
    if ok {
        Ok(())
    } else {
        Err(Error::BadRequest("owner must be 1 to 128 visible ASCII characters without '/'".into()))
    }
}

impl Accounts {
    /// Accounts kept in `store`.
    pub fn new(store: Store) -> Arc<Self> {
        Arc::new(Self { store })
    }

    /// Creates or updates an account. `true`: it is new.
    pub async fn put(&self, owner: &str, may_order: bool) -> Result<bool, Error> {
        valid_owner(owner)?;
        self.store.put(owner, &Account { owner: owner.to_string(), may_order }).await
    }

    /// The account of `owner`.
    pub fn get(&self, owner: &str) -> Result<Option<Account>, Error> {
        self.store.get(owner)
    }

    /// The service's routes.
    pub fn router(self: &Arc<Self>) -> Router {
        Router::new().route("/internal/v1/accounts/{owner}", get(get_account).put(put_account)).with_state(self.clone())
    }

    /// The public routes (`/v1/accounts/{owner}`, admin keys only).
    pub fn public_router(self: &Arc<Self>) -> Router {
        Router::new().route("/v1/accounts/{owner}", get(get_account).put(put_account)).with_state(self.clone())
    }
}

/// Open or update an account (admin keys).
#[utoipa::path(
    put, path = "/v1/accounts/{owner}", tag = "accounts",
    params(("owner" = String, Path, description = "the owner orders are placed under", min_length = 1, max_length = 128, pattern = r"^[!-.0-~]+$")),
    request_body = PutAccount,
    responses(
        (status = 201, description = "opened", body = Account),
        (status = 200, description = "updated", body = Account),
        (status = 400, description = "not a valid owner name or body", body = crate::error::ErrorBody),
        (status = 401, description = "no API key", body = crate::error::ErrorBody),
        (status = 403, description = "not an admin key", body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn put_account(
    State(accounts): State<Arc<Accounts>>,
    Path(owner): Path<String>,
    ApiJson(body): ApiJson<PutAccount>,
) -> Result<impl IntoResponse, Error> {
    let fresh = accounts.put(&owner, body.may_order).await?;
    let status = if fresh { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(Account { owner, may_order: body.may_order })))
}

/// An account (admin keys).
#[utoipa::path(
    get, path = "/v1/accounts/{owner}", tag = "accounts",
    params(("owner" = String, Path, description = "the owner orders are placed under", min_length = 1, max_length = 128, pattern = r"^[!-.0-~]+$")),
    responses(
        (status = 200, description = "the account", body = Account),
        (status = 404, description = "no such account", body = crate::error::ErrorBody),
        (status = 401, description = "no API key", body = crate::error::ErrorBody),
        (status = 403, description = "not an admin key", body = crate::error::ErrorBody),
    )
)]
pub(crate) async fn get_account(
    State(accounts): State<Arc<Accounts>>,
    Path(owner): Path<String>,
) -> Result<impl IntoResponse, Error> {
    valid_owner(&owner)?;
    accounts.get(&owner)?.map(Json).ok_or(Error::NotFoundNamed { what: "account", name: owner })
}
