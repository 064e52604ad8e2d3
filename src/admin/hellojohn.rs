//! The HelloJohn document's surface: `/v1/api-keys` list (filters `type`, `revoked`,
//! `unused_for`),
//! create (201, key shown once), get, patch (name, scopes), delete (204) and
//! `POST /v1/api-keys/rotate` (new key now, old key refused after the grace period).
//! Additive: `environment`, `ratelimits` and `credits` on create, `ratelimits` and
//! `credits` on patch; `limit`/`cursor` on list with `next_cursor` in the body;
//! `environment`, `revoked_at`, `ratelimits` and `credits` on the key object;
//! `GET /v1/api-keys/{id}/usage`.

use super::keys::{self, check_name, check_scopes, KeyId, NewKeySpec};
use super::limits::{self, CreditsBody, RateLimitBody, Shown, Usage};
use super::{AdminState, ApiError, Auth, JsonBody, OnKey, QueryParams, Read, Write};
use crate::key::{Environment, KeyType};
use crate::store::{KeyRecord, KeyUpdate};
use crate::time::{now_ms, rfc3339};
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Default page size of `GET /v1/api-keys`.
pub const DEFAULT_LIMIT: usize = 100;

/// The document's API key object.
#[derive(Serialize)]
pub struct ApiKey {
    id: String,
    name: String,
    #[serde(rename = "type")]
    key_type: &'static str,
    environment: &'static str,
    prefix: String,
    last_four: String,
    scopes: Vec<String>,
    created_at: String,
    last_used_at: Option<String>,
    expires_at: Option<String>,
    revoked: bool,
    revoked_at: Option<String>,
    #[serde(flatten)]
    limits: Shown,
}

impl ApiKey {
    fn new(r: &KeyRecord, now: u64, limits: Shown) -> Self {
        ApiKey {
            id: r.id.clone(),
            name: r.name.clone(),
            key_type: r.key_type.as_str(),
            environment: r.environment.as_str(),
            prefix: r.prefix.clone(),
            last_four: r.last_four.clone(),
            scopes: r.scopes.clone(),
            created_at: rfc3339(r.created_at),
            last_used_at: r.last_used_at.map(rfc3339),
            expires_at: r.expires_at.map(rfc3339),
            revoked: r.is_revoked_at(now),
            revoked_at: r.revoked_at.map(rfc3339),
            limits,
        }
    }
}

#[derive(Serialize)]
pub struct ListBody {
    data: Vec<ApiKey>,
    next_cursor: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
    #[serde(default, rename = "type")]
    key_type: Option<String>,
    #[serde(default)]
    revoked: Option<String>,
    #[serde(default)]
    limit: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
    #[serde(default)]
    unused_for: Option<String>,
}

pub async fn list(
    State(s): State<Arc<AdminState>>,
    Auth { caller, .. }: Auth<Read>,
    QueryParams(q): QueryParams<ListQuery>,
) -> Result<Json<ListBody>, ApiError> {
    let type_filter = match q.key_type.as_deref() {
        None => None,
        Some(t) => Some(KeyType::parse(t).ok_or_else(|| {
            ApiError::bad_request(
                "invalid_query",
                "parameter `type`: use publishable or secret",
            )
        })?),
    };
    let include_revoked = match q.revoked.as_deref() {
        None | Some("false") => false,
        Some("true") => true,
        Some(_) => {
            return Err(ApiError::bad_request(
                "invalid_query",
                "parameter `revoked`: use true or false",
            ))
        }
    };
    let page = keys::page_request(q.limit.as_deref(), q.cursor, DEFAULT_LIMIT)?;
    // One `now` for the filter and the answer: they agree on which keys are revoked.
    let now = now_ms();
    let cutoff = keys::unused_cutoff(q.unused_for.as_deref(), now)?;
    let keep = |r: &KeyRecord| {
        type_filter.is_none_or(|t| r.key_type == t)
            && (include_revoked || !r.is_revoked_at(now))
            && cutoff.is_none_or(|c| keys::unused_since(r, c))
    };
    let found = keys::scan(&s, &caller, page, keep).await?;
    let shown = limits::shown_all(&s, &found.items).await?;
    Ok(Json(ListBody {
        data: (found.items.iter().zip(shown))
            .map(|(r, l)| ApiKey::new(r, now, l))
            .collect(),
        next_cursor: found.next_cursor,
    }))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    name: String,
    #[serde(rename = "type")]
    key_type: KeyType,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    expires_in: Option<String>,
    #[serde(default)]
    environment: Option<Environment>,
    #[serde(default)]
    ratelimits: Option<Vec<RateLimitBody>>,
    #[serde(default)]
    credits: Option<CreditsBody>,
}

#[derive(Serialize)]
pub struct Created {
    id: String,
    name: String,
    #[serde(rename = "type")]
    key_type: &'static str,
    environment: &'static str,
    key: String,
    prefix: String,
    last_four: String,
    scopes: Vec<String>,
    expires_at: Option<String>,
    created_at: String,
    #[serde(flatten)]
    limits: Shown,
}

pub async fn create(
    State(s): State<Arc<AdminState>>,
    Auth { caller, .. }: Auth<Write>,
    JsonBody(b): JsonBody<CreateBody>,
) -> Result<Response, ApiError> {
    let name = check_name("name", &b.name)?;
    let (scopes, expires_at) = keys::scopes_and_expiry(&caller, b.scopes, b.expires_in.as_deref())?;
    let now = now_ms();
    let limits = limits::from_body(b.ratelimits, b.credits, now)?;
    let (r, new) = keys::create(
        &s,
        &caller,
        NewKeySpec {
            name,
            key_type: b.key_type,
            environment: b.environment.unwrap_or(Environment::Live),
            scopes,
            expires_at,
            limits,
        },
        now,
    )
    .await?;
    let body = Created {
        id: r.id.clone(),
        name: r.name.clone(),
        key_type: r.key_type.as_str(),
        environment: r.environment.as_str(),
        key: new.text,
        prefix: r.prefix.clone(),
        last_four: r.last_four.clone(),
        scopes: r.scopes.clone(),
        expires_at: r.expires_at.map(rfc3339),
        created_at: rfc3339(r.created_at),
        // A new key's credits counter has just started: nothing spent yet.
        limits: Shown::new(&r.limits, None),
    };
    Ok((
        StatusCode::CREATED,
        [("cache-control", "no-store")],
        Json(body),
    )
        .into_response())
}

pub async fn get(
    State(s): State<Arc<AdminState>>,
    OnKey { caller, id, .. }: OnKey<Read>,
) -> Result<Json<ApiKey>, ApiError> {
    let r = keys::get(&s, &caller, &id).await?;
    let shown = limits::shown(&s, &r).await?;
    Ok(Json(ApiKey::new(&r, now_ms(), shown)))
}

/// `GET /v1/api-keys/{id}/usage`: the key's limits and credits as they stand now, and
/// its admitted and refused requests.
pub async fn usage(
    State(s): State<Arc<AdminState>>,
    OnKey { caller, id, .. }: OnKey<Read>,
) -> Result<Json<Usage>, ApiError> {
    let r = keys::get(&s, &caller, &id).await?;
    Ok(Json(limits::usage(&s, &r).await?))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    /// Replaces the list (`[]`: none); `null` or absent: unchanged.
    #[serde(default)]
    ratelimits: Option<Vec<RateLimitBody>>,
    /// An object: these credits from now on (a new balance); `null`: unlimited from now
    /// on; absent: unchanged.
    #[serde(default, deserialize_with = "limits::present")]
    credits: Option<Option<CreditsBody>>,
}

pub async fn update(
    State(s): State<Arc<AdminState>>,
    OnKey { caller, id, .. }: OnKey<Write>,
    JsonBody(b): JsonBody<UpdateBody>,
) -> Result<Json<ApiKey>, ApiError> {
    // One `now`: the credits' `set_at`, and the answer is built with the `now` the store
    // checked revocation at (see `keys::update`).
    let now = now_ms();
    let change = KeyUpdate {
        name: b
            .name
            .as_deref()
            .map(|n| check_name("name", n))
            .transpose()?,
        scopes: b.scopes.map(|sc| check_scopes("scopes", sc)).transpose()?,
        ratelimits: b.ratelimits.map(limits::check_ratelimits).transpose()?,
        credits: b
            .credits
            .map(|c| c.map(|c| limits::check_credits(c, now)).transpose())
            .transpose()?,
    };
    if change.name.is_none()
        && change.scopes.is_none()
        && change.ratelimits.is_none()
        && change.credits.is_none()
    {
        return Err(ApiError::bad_request(
            "invalid_body",
            "give at least one of `name`, `scopes`, `ratelimits` and `credits` to change",
        ));
    }
    let r = keys::update(&s, &caller, &id, &change, now).await?;
    let shown = match &change.credits {
        // Credits set just now: a new counter, nothing spent yet.
        Some(Some(set)) if r.limits.credits.as_ref() == Some(set) => Shown::new(&r.limits, None),
        // Read after the write: a 503 here leaves the change made (the same change
        // again gives the same key).
        _ => limits::shown(&s, &r).await?,
    };
    Ok(Json(ApiKey::new(&r, now, shown)))
}

pub async fn revoke(
    State(s): State<Arc<AdminState>>,
    OnKey { caller, id, .. }: OnKey<Write>,
) -> Result<StatusCode, ApiError> {
    keys::revoke(&s, &caller, &id).await?;
    Ok(StatusCode::NO_CONTENT)
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RotateBody {
    id: String,
    #[serde(default)]
    grace_period: Option<String>,
}

#[derive(Serialize)]
pub struct Rotated {
    id: String,
    key: String,
    old_key_id: String,
    old_key_revokes_at: String,
    name: String,
    #[serde(rename = "type")]
    key_type: &'static str,
    prefix: String,
    last_four: String,
    scopes: Vec<String>,
    created_at: String,
    expires_at: Option<String>,
    #[serde(flatten)]
    limits: Shown,
}

/// The document's default grace period: one hour.
const DEFAULT_GRACE_MS: u64 = 3_600_000;

pub async fn rotate(
    State(s): State<Arc<AdminState>>,
    Auth { caller, .. }: Auth<Write>,
    JsonBody(b): JsonBody<RotateBody>,
) -> Result<Json<Rotated>, ApiError> {
    let grace_ms = match b.grace_period.as_deref() {
        None => DEFAULT_GRACE_MS,
        Some(g) => keys::GRACE_PERIOD.parse(g)?,
    };
    let id = KeyId::parse(&b.id)?;
    let keys::Rotation {
        new,
        key,
        old_id,
        old_revokes_at,
        credits_remaining,
    } = keys::rotate(&s, &caller, &id, grace_ms).await?;
    let limits = Shown::new(&new.limits, credits_remaining);
    Ok(Json(Rotated {
        id: new.id,
        key: key.text,
        old_key_id: old_id,
        old_key_revokes_at: rfc3339(old_revokes_at),
        name: new.name,
        key_type: new.key_type.as_str(),
        prefix: new.prefix,
        last_four: new.last_four,
        scopes: new.scopes,
        created_at: rfc3339(new.created_at),
        expires_at: new.expires_at.map(rfc3339),
        limits,
    }))
}
