//! The HelloJohn document's surface: `/v1/api-keys` list (filters `type`, `revoked`),
//! create (201, key shown once), get, patch (name, scopes), delete (204) and
//! `POST /v1/api-keys/rotate` (new key now, old key refused after the grace period).
//! Additive: `environment` on create; `limit`/`cursor` on list with `next_cursor` in the
//! body; `environment` and `revoked_at` on the key object.

use super::jack::page_request;
use super::{
    authorize, check_name, check_scopes, create_key, get_key, parse_id, read_json, revoke_key,
    AdminState, ApiError, NewKeySpec,
};
use crate::key::{Environment, KeyType};
use crate::store::{order_key, KeyRecord, KeyUpdate, PageRequest, StoreError};
use crate::time::{now_ms, rfc3339};
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Default page size of `GET /v1/api-keys`.
pub const DEFAULT_LIMIT: usize = 100;
/// Store pages scanned per list call when filters skip many keys (then `next_cursor`
/// lets the client continue).
const MAX_SCAN_PAGES: usize = 10;

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
}

impl ApiKey {
    fn new(r: &KeyRecord, now: u64) -> Self {
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
struct ListQuery {
    #[serde(default, rename = "type")]
    key_type: Option<String>,
    #[serde(default)]
    revoked: Option<String>,
    #[serde(default)]
    limit: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
}

pub async fn list(
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Json<ListBody>, ApiError> {
    let caller = authorize(&s, &headers, "keys:read").await?;
    let q: ListQuery = serde_urlencoded::from_str(query.as_deref().unwrap_or(""))
        .map_err(|e| ApiError::bad_request("invalid_query", format!("invalid query: {e}")))?;
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
    // Reuse the jack surface's parsing of limit and cursor.
    let mut lc = Vec::new();
    if let Some(l) = &q.limit {
        lc.push(("limit", l.as_str()));
    }
    if let Some(c) = &q.cursor {
        lc.push(("cursor", c.as_str()));
    }
    let lc = serde_urlencoded::to_string(lc).unwrap_or_default();
    let PageRequest { limit, mut cursor } = page_request(Some(&lc), DEFAULT_LIMIT)?;

    let now = now_ms();
    let mut data = Vec::new();
    let mut next_cursor = None;
    for _ in 0..MAX_SCAN_PAGES {
        let page = s
            .store
            .list(
                &caller.tenant,
                &PageRequest {
                    limit,
                    cursor: cursor.clone(),
                },
            )
            .await?;
        let n = page.items.len();
        for (i, r) in page.items.iter().enumerate() {
            let keep = type_filter.is_none_or(|t| r.key_type == t)
                && (include_revoked || !r.is_revoked_at(now));
            if keep {
                data.push(ApiKey::new(r, now));
            }
            if data.len() == limit {
                let more = i + 1 < n || page.next_cursor.is_some();
                next_cursor = more.then(|| order_key(r));
                return Ok(Json(ListBody { data, next_cursor }));
            }
        }
        match page.next_cursor {
            Some(c) => {
                next_cursor = Some(c.clone());
                cursor = Some(c);
            }
            None => {
                next_cursor = None;
                break;
            }
        }
    }
    Ok(Json(ListBody { data, next_cursor }))
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
}

pub async fn create(
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let caller = authorize(&s, &headers, "keys:write").await?;
    let b: CreateBody = read_json(&headers, body).await?;
    let name = check_name("name", &b.name)?;
    let (scopes, expires_at) =
        super::scopes_and_expiry(&caller, b.scopes, b.expires_in.as_deref())?;
    let (r, new) = create_key(
        &s,
        &caller,
        NewKeySpec {
            name,
            key_type: b.key_type,
            environment: b.environment.unwrap_or(Environment::Live),
            scopes,
            expires_at,
        },
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
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<ApiKey>, ApiError> {
    let caller = authorize(&s, &headers, "keys:read").await?;
    let r = get_key(&s, &caller, &id).await?;
    Ok(Json(ApiKey::new(&r, now_ms())))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    scopes: Option<Vec<String>>,
}

pub async fn update(
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: axum::body::Body,
) -> Result<Json<ApiKey>, ApiError> {
    let caller = authorize(&s, &headers, "keys:write").await?;
    let id = parse_id(&id)?.to_string();
    let b: UpdateBody = read_json(&headers, body).await?;
    let change = KeyUpdate {
        name: b
            .name
            .as_deref()
            .map(|n| check_name("name", n))
            .transpose()?,
        scopes: b.scopes.map(|sc| check_scopes("scopes", sc)).transpose()?,
    };
    if change.name.is_none() && change.scopes.is_none() {
        return Err(ApiError::bad_request(
            "invalid_body",
            "give `name` and/or `scopes` to change",
        ));
    }
    if let Some(sc) = &change.scopes {
        if !caller.may_grant(sc) {
            return Err(super::escalation());
        }
    }
    // No separate read first: the store refuses a key revoked by `now` in the same atomic
    // step as the write (a read-then-write let a revoke land in between and the PATCH
    // answer 200 for a revoked key). A revoke stamped after `now` orders after this
    // change. One `now` for the check and the answer, so a 200 never shows `revoked`.
    let now = now_ms();
    let r = s
        .store
        .update(&caller.tenant, &id, &change, now)
        .await?
        .ok_or_else(ApiError::key_not_found)?;
    // The proxy enforces the new scopes at once.
    s.cache.invalidate(&r.digest).await;
    tracing::info!(id = %r.id, tenant = %r.tenant, prefix = %r.prefix, "key updated");
    Ok(Json(ApiKey::new(&r, now)))
}

pub async fn revoke(
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    let caller = authorize(&s, &headers, "keys:write").await?;
    revoke_key(&s, &caller, &id).await?;
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
}

/// Longest grace period accepted.
const MAX_GRACE_MS: u64 = 366 * 86_400_000;

pub async fn rotate(
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Json<Rotated>, ApiError> {
    let caller = authorize(&s, &headers, "keys:write").await?;
    let b: RotateBody = read_json(&headers, body).await?;
    let grace_ms = match b.grace_period.as_deref() {
        None => 3_600_000,
        Some(g) => {
            let d = crate::time::parse_duration(g).map_err(|_| {
                ApiError::bad_request(
                    "invalid_field",
                    format!("field `grace_period`: invalid duration {g:?}; use e.g. 0s, 1h, 24h"),
                )
            })?;
            let ms = d.as_millis() as u64;
            if ms > MAX_GRACE_MS {
                return Err(ApiError::bad_request(
                    "invalid_field",
                    "field `grace_period`: at most 366d",
                ));
            }
            ms
        }
    };
    let old = get_key(&s, &caller, &b.id).await?;
    // The caller receives the new key's text: it must hold every scope it carries.
    if !caller.may_grant(&old.scopes) {
        return Err(super::escalation());
    }
    let now = now_ms();
    // Fast paths only (no key generated for a refusal): the store decides both again
    // atomically, which is what keeps concurrent rotations from forking the key.
    if old.is_revoked_at(now) || old.is_expired_at(now) {
        return Err(StoreError::NotRotatable.into());
    }
    if old.successor_id.is_some() {
        return Err(StoreError::AlreadyRotated.into());
    }
    let new_key = super::new_key_text(&s, old.key_type, old.environment)?;
    let new = KeyRecord {
        id: uuid::Uuid::now_v7().to_string(),
        tenant: old.tenant.clone(),
        name: old.name.clone(),
        key_type: old.key_type,
        environment: old.environment,
        prefix: new_key.display_prefix(),
        last_four: new_key.last_four(),
        scopes: old.scopes.clone(),
        created_at: now,
        last_used_at: None,
        // Same lifetime as the old key had, counted from now.
        expires_at: old
            .expires_at
            .map(|e| now + e.saturating_sub(old.created_at)),
        revoked_at: None,
        successor_id: None,
        digest: s.hasher.digest(&new_key.text),
    };
    let revokes_at = now + grace_ms;
    let updated_old = s
        .store
        .rotate(&caller.tenant, &old.id, &new, revokes_at, now)
        .await?
        .ok_or_else(ApiError::key_not_found)?;
    s.cache.invalidate(&updated_old.digest).await;
    s.cache.invalidate(&new.digest).await;
    tracing::info!(old = %old.id, new = %new.id, tenant = %new.tenant, prefix = %new.prefix, "key rotated");
    Ok(Json(Rotated {
        id: new.id.clone(),
        key: new_key.text,
        old_key_id: old.id,
        old_key_revokes_at: rfc3339(updated_old.revoked_at.unwrap_or(revokes_at)),
        name: new.name,
        key_type: new.key_type.as_str(),
        prefix: new.prefix,
        last_four: new.last_four,
        scopes: new.scopes,
        created_at: rfc3339(new.created_at),
        expires_at: new.expires_at.map(rfc3339),
    }))
}
