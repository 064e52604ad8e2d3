//! The jack document's surface: `POST /v1/keys` (create; the key is shown once),
//! `GET /v1/keys` (list, prefix only), `DELETE /v1/keys/{id}` (revoke, 200).
//! Additive: `scopes`, `expires_in`, `ratelimits` and `credits` on create; `limit` and
//! `cursor` on list, with the next cursor in the `X-Next-Cursor` response header, and the
//! `unused_for` filter (dormant keys);
//! `ratelimits` and `credits` on the key object.

use super::keys::{self, check_name, NewKeySpec};
use super::limits::{self, CreditsBody, RateLimitBody, Shown};
use super::{AdminState, ApiError, Auth, JsonBody, OnKey, QueryParams, Read, Write};
use crate::key::{Environment, KeyType};
use crate::store::KeyRecord;
use crate::time::{now_ms, rfc3339};
use axum::extract::State;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Default page of `GET /v1/keys`: the largest (the document lists "all keys").
pub const LIST_LIMIT: usize = keys::MAX_LIMIT;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    label: String,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    expires_in: Option<String>,
    #[serde(default)]
    ratelimits: Option<Vec<RateLimitBody>>,
    #[serde(default)]
    credits: Option<CreditsBody>,
}

#[derive(Serialize)]
pub struct Created {
    id: String,
    key: String,
    prefix: String,
    label: String,
    org_id: String,
    scopes: Vec<String>,
    created_at: String,
    expires_at: Option<String>,
    #[serde(flatten)]
    limits: Shown,
}

#[derive(Serialize)]
pub struct JackKey {
    id: String,
    prefix: String,
    label: String,
    org_id: String,
    scopes: Vec<String>,
    created_at: String,
    last_used_at: Option<String>,
    expires_at: Option<String>,
    revoked_at: Option<String>,
    /// A revocation scheduled by a rotation (the key still works until then).
    revokes_at: Option<String>,
    #[serde(flatten)]
    limits: Shown,
}

impl JackKey {
    fn new(r: &KeyRecord, limits: Shown) -> Self {
        let now = now_ms();
        let (revoked_at, revokes_at) = match r.revoked_at {
            Some(t) if t <= now => (Some(rfc3339(t)), None),
            Some(t) => (None, Some(rfc3339(t))),
            None => (None, None),
        };
        JackKey {
            id: r.id.clone(),
            prefix: r.prefix.clone(),
            label: r.name.clone(),
            org_id: r.tenant.clone(),
            scopes: r.scopes.clone(),
            created_at: rfc3339(r.created_at),
            last_used_at: r.last_used_at.map(rfc3339),
            expires_at: r.expires_at.map(rfc3339),
            revoked_at,
            revokes_at,
            limits,
        }
    }
}

pub async fn create(
    State(s): State<Arc<AdminState>>,
    Auth { caller, .. }: Auth<Write>,
    JsonBody(b): JsonBody<CreateBody>,
) -> Result<Response, ApiError> {
    let name = check_name("label", &b.label)?;
    let (scopes, expires_at) = keys::scopes_and_expiry(&caller, b.scopes, b.expires_in.as_deref())?;
    let now = now_ms();
    let limits = limits::from_body(b.ratelimits, b.credits, now)?;
    let (r, new) = keys::create(
        &s,
        &caller,
        NewKeySpec {
            name,
            key_type: KeyType::Secret,
            environment: Environment::Live,
            scopes,
            expires_at,
            limits,
        },
        now,
    )
    .await?;
    let body = Created {
        id: r.id.clone(),
        key: new.text,
        prefix: r.prefix.clone(),
        label: r.name.clone(),
        org_id: r.tenant.clone(),
        scopes: r.scopes.clone(),
        created_at: rfc3339(r.created_at),
        expires_at: r.expires_at.map(rfc3339),
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListQuery {
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
) -> Result<Response, ApiError> {
    let page = keys::page_request(q.limit.as_deref(), q.cursor, LIST_LIMIT)?;
    let page = match keys::unused_cutoff(q.unused_for.as_deref(), now_ms())? {
        None => keys::list(&s, &caller, &page).await?,
        Some(cutoff) => keys::scan(&s, &caller, page, |r| keys::unused_since(r, cutoff)).await?,
    };
    let shown = limits::shown_all(&s, &page.items).await?;
    let items: Vec<JackKey> = page
        .items
        .iter()
        .zip(shown)
        .map(|(r, l)| JackKey::new(r, l))
        .collect();
    let mut resp = Json(items).into_response();
    if let Some(c) = page
        .next_cursor
        .and_then(|c| HeaderValue::from_str(&c).ok())
    {
        resp.headers_mut().insert("x-next-cursor", c);
    }
    Ok(resp)
}

pub async fn revoke(
    State(s): State<Arc<AdminState>>,
    OnKey { caller, id, .. }: OnKey<Write>,
) -> Result<Json<JackKey>, ApiError> {
    let r = keys::revoke(&s, &caller, &id).await?;
    // Read after the revoke: a 503 here leaves it done (revoking again changes nothing).
    let shown = limits::shown(&s, &r).await?;
    Ok(Json(JackKey::new(&r, shown)))
}
