//! Who is calling a management endpoint: `authorize` (root token or a secret key with
//! the needed scope, tenant resolved) and the extractors handlers take instead of
//! calling it: `Auth<Read>` / `Auth<Write>`, and `OnKey<_>` for `/{id}` paths.

use super::keys::KeyId;
use super::{AdminState, ApiError};
use crate::auth::{self, Need};
use crate::error::{Challenge, Deny};
use crate::key;

use axum::extract::{FromRequestParts, Path};
use axum::http::request::Parts;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use std::marker::PhantomData;
use std::sync::Arc;
use std::time::Instant;

/// Who is calling the admin API, and in which tenant they act.
#[derive(Debug, Clone)]
pub struct Caller {
    pub tenant: String,
    /// `None` for the root token (which holds every scope).
    pub key_scopes: Option<Vec<String>>,
}

impl Caller {
    /// May this caller hand out `scopes`? Root may; a key only scopes it holds itself.
    pub fn may_grant(&self, scopes: &[String]) -> bool {
        match &self.key_scopes {
            None => true,
            Some(held) => key::grants_all(held, scopes),
        }
    }
    pub fn scopes_or_all(&self) -> Vec<String> {
        self.key_scopes.clone().unwrap_or_else(|| vec!["*".into()])
    }
}

/// The scope a management call needs, as a type: `Auth<Read>`, `Auth<Write>`.
pub trait Scope: Send + Sync + 'static {
    const SCOPE: &'static str;
}

/// `keys:read`: list and get.
pub struct Read;
/// `keys:write`: create, patch, revoke, rotate.
pub struct Write;

impl Scope for Read {
    const SCOPE: &'static str = "keys:read";
}
impl Scope for Write {
    const SCOPE: &'static str = "keys:write";
}

/// A caller authenticated for scope `S` (`Auth { caller, .. }: Auth<Write>`). Taken
/// before the body, so credentials are judged before anything else the client sent.
pub struct Auth<S> {
    pub caller: Caller,
    scope: PhantomData<S>,
}

impl<S: Scope> FromRequestParts<Arc<AdminState>> for Auth<S> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AdminState>,
    ) -> Result<Self, ApiError> {
        let caller = authorize(state, &parts.headers, S::SCOPE).await?;
        Ok(Auth {
            caller,
            scope: PhantomData,
        })
    }
}

/// A call on one key (`/{id}` paths), checked in the order clients have always seen:
/// a path parameter that is not UTF-8 is axum's own 400 before anything else, then the
/// caller (scope `S`), then the id (anything not one of our ids is 404 `key_not_found`),
/// and only then a body.
pub struct OnKey<S> {
    pub caller: Caller,
    pub id: KeyId,
    scope: PhantomData<S>,
}

impl<S: Scope> FromRequestParts<Arc<AdminState>> for OnKey<S> {
    type Rejection = Response;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &Arc<AdminState>,
    ) -> Result<Self, Response> {
        let Path(raw) = Path::<String>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let Auth { caller, .. } = Auth::<S>::from_request_parts(parts, state)
            .await
            .map_err(IntoResponse::into_response)?;
        let id = KeyId::parse(&raw).map_err(IntoResponse::into_response)?;
        Ok(OnKey {
            caller,
            id,
            scope: PhantomData,
        })
    }
}

/// Authenticate a management call needing `scope` (`keys:read` or `keys:write`): the
/// root token, or a key judged by the proxy's own decision (`auth::Verifier::verify`).
pub async fn authorize(
    s: &AdminState,
    headers: &HeaderMap,
    scope: &'static str,
) -> Result<Caller, ApiError> {
    let refused = match check(s, headers, scope).await {
        Ok(caller) => return Ok(caller),
        Err(e) => e,
    };
    Err(match &s.root_digest {
        None if refused.status == StatusCode::UNAUTHORIZED => no_root_token(refused),
        _ => refused,
    })
}

/// Without a root token the first caller has no way in: a 401 says why, since the token
/// they sent is likely meant as one.
fn no_root_token(mut refused: ApiError) -> ApiError {
    refused.message.push_str(
        "; no root token is configured: set KEYGATE_ROOT_TOKEN (or the variable named by \
         admin.root_token_env) or admin.root_token_file, and restart",
    );
    refused
}

async fn check(
    s: &AdminState,
    headers: &HeaderMap,
    scope: &'static str,
) -> Result<Caller, ApiError> {
    let token = auth::bearer(headers).map_err(|d| refusal(d, scope))?;
    let asked_tenant = asked_tenant(headers)?;
    if let Some(root) = &s.root_digest {
        if key::ct_eq(&key::sha256(token.as_bytes()), root) {
            return Ok(Caller {
                tenant: asked_tenant.unwrap_or_else(|| s.default_tenant.clone()),
                key_scopes: None,
            });
        }
    }
    let need = Need {
        scopes: &[scope],
        allow_publishable: false,
        challenge: &Challenge::default(),
    };
    let rules = s.live.load().auth;
    let verdict = s
        .verifier
        .verify(token, &need, rules, &s.store, Instant::now())
        .await;
    if let Some(e) = &verdict.store_error {
        tracing::warn!(error = %e, "key store read failed (admin auth)");
    }
    verdict.result.map_err(|d| refusal(d, scope))?;
    let Some(id) = verdict.identity else {
        return Err(refusal(Deny::UnknownKey, scope));
    };
    if asked_tenant.as_deref().is_some_and(|t| t != id.tenant()) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "tenant_mismatch",
            "header `X-Tenant-ID` names another tenant than the calling key's",
        ));
    }
    Ok(Caller {
        tenant: id.tenant().to_string(),
        key_scopes: Some(id.scopes().map(String::from).collect()),
    })
}

/// `X-Tenant-ID`, when sent: a valid tenant name or a 400.
fn asked_tenant(headers: &HeaderMap) -> Result<Option<String>, ApiError> {
    let Some(v) = headers.get("x-tenant-id") else {
        return Ok(None);
    };
    match v.to_str() {
        Ok(t) if key::valid_tenant(t) => Ok(Some(t.to_string())),
        _ => Err(ApiError::bad_request(
            "invalid_tenant",
            "header `X-Tenant-ID`: use 1-64 characters of A-Z a-z 0-9 _ . -",
        )),
    }
}

/// The admin API's answer to a refused key (its own realm and wording; publishable keys
/// never manage keys). Every `Deny` is listed: one a key check cannot give is a bug.
pub fn refusal(deny: Deny, scope: &str) -> ApiError {
    use Deny::*;
    let unauthorized = |code, msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, code, msg);
    let forbidden = |code, msg: String| ApiError::new(StatusCode::FORBIDDEN, code, msg);
    match deny {
        MultipleAuthorization => ApiError::bad_request(
            "multiple_authorization",
            "send exactly one Authorization header",
        ),
        UnsupportedScheme => unauthorized(
            "unsupported_auth_scheme",
            "only the Bearer authorization scheme is accepted",
        ),
        MissingKey => unauthorized("missing_key", "send Authorization: Bearer <key>"),
        MalformedKey => unauthorized("malformed_key", "the API key is malformed"),
        UnknownKey => unauthorized("unknown_key", "the API key is not valid"),
        ExpiredKey => unauthorized("expired_key", "the API key has expired"),
        RevokedKey => forbidden("revoked_key", "the API key has been revoked".into()),
        PublishableNotAllowed => forbidden(
            "publishable_key_forbidden",
            "publishable keys cannot manage keys".into(),
        ),
        InsufficientScope(_) => forbidden(
            "insufficient_scope",
            format!("this call needs the `{scope}` scope"),
        ),
        StoreUnavailable => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the key store is unavailable; retry shortly",
        ),
        NoRoute | BadPath | BadHost | BadRequestBody | TooManyHeaders | RequestTimeout
        | BadMethod | UriTooLong | BodyTooLarge | UpstreamUnavailable | UpstreamTimeout
        | RateLimited(_) | CreditsExhausted(_) => {
            tracing::error!(
                code = deny.code(),
                "a key check gave a request-level refusal"
            );
            ApiError::new(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                "the key check failed",
            )
        }
    }
}
