//! `POST /v1/explain`: what the proxy would decide on a request (method, path, key),
//! computed by its own decision (`auth::Verifier::decide`) without its side effects: no
//! last-used note, no rate limit or credit spent, no proxy metrics.

use super::keys::{self, KeyId};
use super::{limits, AdminState, ApiError, Auth, JsonBody, Read};
use crate::auth::{Ask, Credential};
use crate::explain::{self, Explanation};
use axum::extract::State;
use axum::Json;
use serde::Deserialize;
use std::sync::Arc;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExplainBody {
    method: String,
    path: String,
    /// A key's text; `null` is refused like any other wrong type.
    #[serde(default, deserialize_with = "limits::present")]
    key: Option<Option<String>>,
    /// A stored key of the caller's tenant, by id.
    #[serde(default, deserialize_with = "limits::present")]
    key_id: Option<Option<String>>,
}

/// The key to explain with, as given.
enum Given {
    Text(String),
    Id(KeyId),
}

fn given(key: Option<Option<String>>, key_id: Option<Option<String>>) -> Result<Given, ApiError> {
    let null = |field: &str| {
        ApiError::bad_request(
            "invalid_body",
            format!("field `{field}`: invalid type: null, expected a string"),
        )
    };
    match (key, key_id) {
        (Some(None), _) => Err(null("key")),
        (_, Some(None)) => Err(null("key_id")),
        (Some(Some(k)), None) => Ok(Given::Text(k)),
        // Not one of our ids: no such key, as on every `/{id}` endpoint.
        (None, Some(Some(id))) => KeyId::parse(&id).map(Given::Id),
        _ => Err(ApiError::bad_request(
            "invalid_body",
            "give exactly one of `key` and `key_id`",
        )),
    }
}

pub async fn explain(
    State(s): State<Arc<AdminState>>,
    Auth { caller, .. }: Auth<Read>,
    JsonBody(b): JsonBody<ExplainBody>,
) -> Result<Json<Explanation>, ApiError> {
    let method = explain::parse_method(&b.method)
        .map_err(|e| ApiError::bad_request("invalid_field", format!("field `method`: {e}")))?;
    let given = given(b.key, b.key_id)?;
    let record;
    let credential = match &given {
        Given::Text(t) => Credential::Token(t),
        // Another tenant's key id is 404 here, before anything is decided.
        Given::Id(id) => {
            record = keys::get(&s, &caller, id).await?;
            Credential::Digest(&record.digest)
        }
    };
    let snap = s.live.load();
    let ask = Ask {
        method: &method,
        path: explain::path_only(&b.path),
        credential,
        transport: None,
    };
    let decision = s
        .verifier
        .decide(&snap.policy, ask, snap.auth, &s.store)
        .await;
    if let Some(e) = decision
        .key
        .as_ref()
        .and_then(|k| k.verdict.store_error.as_ref())
    {
        tracing::warn!(error = %e, "key store read failed (explain)");
    }
    // A key of another tenant is not the caller's to explain: as if it did not exist.
    let identity = decision
        .key
        .as_ref()
        .and_then(|k| k.verdict.identity.as_ref());
    if identity.is_some_and(|id| id.tenant() != caller.tenant) {
        return Err(ApiError::key_not_found());
    }
    Ok(Json(explain::explain(&method, &b.path, &decision)))
}
