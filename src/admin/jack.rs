//! The jack document's surface: `POST /v1/keys` (create; the key is shown once),
//! `GET /v1/keys` (list, prefix only), `DELETE /v1/keys/{id}` (revoke, 200).
//! Additive: `scopes` and `expires_in` on create; `limit` and `cursor` on list, with the
//! next cursor in the `X-Next-Cursor` response header.

use super::{
    authorize, check_name, create_key, read_json, revoke_key, AdminState, ApiError, NewKeySpec,
};
use crate::key::{Environment, KeyType};
use crate::store::{KeyRecord, PageRequest};
use crate::time::rfc3339;
use axum::extract::{Path, RawQuery, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Default and largest page of `GET /v1/keys` (the document lists "all keys").
pub const LIST_LIMIT: usize = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    label: String,
    #[serde(default)]
    scopes: Option<Vec<String>>,
    #[serde(default)]
    expires_in: Option<String>,
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
}

impl From<&KeyRecord> for JackKey {
    fn from(r: &KeyRecord) -> Self {
        let now = crate::time::now_ms();
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
        }
    }
}

/// `90d`, `12h`, `1y`: a positive duration, at most 100 years.
pub fn parse_expires_in(field: &'static str, s: &str) -> Result<u64, ApiError> {
    let bad = || {
        ApiError::bad_request(
            "invalid_field",
            format!("field `{field}`: invalid duration {s:?}; use e.g. 12h, 90d, 1y"),
        )
    };
    let d = crate::time::parse_duration(s).map_err(|_| bad())?;
    let ms = d.as_millis();
    if ms == 0 || ms > 100 * 366 * 86_400_000 {
        return Err(bad());
    }
    Ok(ms as u64)
}

pub async fn create(
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let caller = authorize(&s, &headers, "keys:write").await?;
    let b: CreateBody = read_json(&headers, body).await?;
    let name = check_name("label", &b.label)?;
    let (scopes, expires_at) =
        super::scopes_and_expiry(&caller, b.scopes, b.expires_in.as_deref())?;
    let (r, new) = create_key(
        &s,
        &caller,
        NewKeySpec {
            name,
            key_type: KeyType::Secret,
            environment: Environment::Live,
            scopes,
            expires_at,
        },
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
struct ListQuery {
    #[serde(default)]
    limit: Option<String>,
    #[serde(default)]
    cursor: Option<String>,
}

/// Parse `limit` and `cursor` from a query string (unknown parameters refused).
pub fn page_request(query: Option<&str>, default_limit: usize) -> Result<PageRequest, ApiError> {
    let q: ListQuery = serde_urlencoded::from_str(query.unwrap_or(""))
        .map_err(|e| ApiError::bad_request("invalid_query", format!("invalid query: {e}")))?;
    let limit = match q.limit {
        None => default_limit,
        Some(l) => match l.parse::<usize>() {
            Ok(n) if (1..=LIST_LIMIT).contains(&n) => n,
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_query",
                    format!("parameter `limit`: use 1 to {LIST_LIMIT}"),
                ))
            }
        },
    };
    Ok(PageRequest {
        limit,
        cursor: q.cursor,
    })
}

pub async fn list(
    State(s): State<Arc<AdminState>>,
    headers: HeaderMap,
    RawQuery(query): RawQuery,
) -> Result<Response, ApiError> {
    let caller = authorize(&s, &headers, "keys:read").await?;
    let page = s
        .store
        .list(&caller.tenant, &page_request(query.as_deref(), LIST_LIMIT)?)
        .await?;
    let items: Vec<JackKey> = page.items.iter().map(JackKey::from).collect();
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
    headers: HeaderMap,
    Path(id): Path<String>,
) -> Result<Json<JackKey>, ApiError> {
    let caller = authorize(&s, &headers, "keys:write").await?;
    let r = revoke_key(&s, &caller, &id).await?;
    Ok(Json(JackKey::from(&r)))
}
