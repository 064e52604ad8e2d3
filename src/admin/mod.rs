//! The admin port (axum), never the proxy port. Endpoints:
//! - `GET /healthz` (alive), `GET /readyz` (config loaded, store answering), `GET /metrics`
//! - `POST /v1/keys`, `GET /v1/keys`, `DELETE /v1/keys/{id}`: the jack document (`jack.rs`)
//! - `GET|POST /v1/api-keys`, `GET|PATCH|DELETE /v1/api-keys/{id}`,
//!   `POST /v1/api-keys/rotate`: the HelloJohn document (`hellojohn.rs`)
//! - `GET /openapi.json`: the OpenAPI 3.1 document of all of the above
//!
//! Management calls authenticate with the root token or a secret key holding
//! `keys:read` / `keys:write`, and act only inside the caller's tenant.

pub mod hellojohn;
pub mod jack;

use crate::cache::{Entry, KeyCache};
use crate::config::raw::Tenant;
use crate::connection::{self, Port, ServerSettings};
use crate::key::{self, Digest, Environment, KeyHasher, KeyType, NewKey, Prefixes};
use crate::metrics::Metrics;
use crate::proxy;
use crate::store::{KeyRecord, KeyStore, StoreError};
use axum::extract::State;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use http_body_util::BodyExt;
use serde::de::DeserializeOwned;
use serde_json::json;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Largest admin request body.
pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub struct AdminState {
    pub store: Arc<dyn KeyStore>,
    pub cache: Arc<KeyCache>,
    pub hasher: KeyHasher,
    pub prefixes: Prefixes,
    /// SHA-256 of the root token: compared in constant time, length-independent.
    pub root_digest: Option<Digest>,
    pub default_tenant: String,
    pub ready: Arc<AtomicBool>,
    pub metrics: Arc<Metrics>,
}

pub fn router(state: Arc<AdminState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/v1/keys", get(jack::list).post(jack::create))
        .route("/v1/keys/{id}", axum::routing::delete(jack::revoke))
        .route("/v1/api-keys", get(hellojohn::list).post(hellojohn::create))
        .route(
            "/v1/api-keys/rotate",
            axum::routing::post(hellojohn::rotate),
        )
        .route(
            "/v1/api-keys/{id}",
            get(hellojohn::get)
                .patch(hellojohn::update)
                .delete(hellojohn::revoke),
        )
        .route("/openapi.json", get(openapi))
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Serve the admin router until `shutdown`: at most `settings.max_connections` at once
/// (more wait in the accept backlog), TLS when `tls` is given, the proxy's deadlines on
/// every connection; at shutdown, stop accepting and let requests finish for `drain`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    tls: Option<tokio_rustls::TlsAcceptor>,
    settings: ServerSettings,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    let slots = Arc::new(tokio::sync::Semaphore::new(settings.max_connections));
    let port = Arc::new(Port::new("admin", &settings, tls, shutdown.clone()));
    let mut connections = tokio::task::JoinSet::new();
    while let Some((stream, peer, permit)) =
        connection::accept(&listener, &slots, &mut shutdown).await
    {
        let accepted = tokio::time::Instant::now();
        while connections.try_join_next().is_some() {}
        let (router, port) = (router.clone(), port.clone());
        connections.spawn(async move {
            let _permit = permit;
            serve_one(&port, stream, peer, accepted, router).await;
        });
    }
    connection::drain(&mut connections, settings.deadlines.drain).await;
}

/// One admin connection: the router behind keygate's connection deadlines.
async fn serve_one(
    port: &Port,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
    accepted: tokio::time::Instant,
    router: Router,
) {
    use tower_service::Service;
    let handler = move |_tls| {
        move |req| {
            let mut router = router.clone();
            async move {
                match router.call(req).await {
                    Ok(resp) => resp,
                    Err(never) => match never {},
                }
            }
        }
    };
    port.serve_tcp(stream, peer, accepted, handler).await;
}

async fn healthz() -> Json<serde_json::Value> {
    Json(json!({"status": "ok"}))
}

async fn readyz(State(s): State<Arc<AdminState>>) -> Response {
    if !s.ready.load(Ordering::Acquire) {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": "shutting down or not started"})),
        )
            .into_response();
    }
    match s.store.ping().await {
        Ok(()) => Json(json!({"status": "ready", "store": s.store.kind()})).into_response(),
        Err(e) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({"status": "not_ready", "reason": e.to_string()})),
        )
            .into_response(),
    }
}

async fn metrics(State(s): State<Arc<AdminState>>) -> Response {
    s.metrics.cache_entries.set(s.cache.entry_count() as i64);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        s.metrics.render(),
    )
        .into_response()
}

/// The OpenAPI 3.1 document of the admin API (kept in the repo as `openapi.json`).
pub const OPENAPI: &str = include_str!("openapi.json");

/// Every (method, path) the router serves, as written in `openapi.json`.
pub const ROUTES: &[(&str, &str)] = &[
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
    ("get", "/openapi.json"),
    ("get", "/v1/keys"),
    ("post", "/v1/keys"),
    ("delete", "/v1/keys/{id}"),
    ("get", "/v1/api-keys"),
    ("post", "/v1/api-keys"),
    ("post", "/v1/api-keys/rotate"),
    ("get", "/v1/api-keys/{id}"),
    ("patch", "/v1/api-keys/{id}"),
    ("delete", "/v1/api-keys/{id}"),
];

async fn openapi() -> Response {
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        )],
        OPENAPI,
    )
        .into_response()
}

async fn method_not_allowed() -> ApiError {
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        "this endpoint does not accept that method",
    )
}

async fn not_found() -> ApiError {
    ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint")
}

/// An admin API error: `{"error": {"code", "message"}}`.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad_request(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, code, message)
    }
    pub fn key_not_found() -> Self {
        Self::new(StatusCode::NOT_FOUND, "key_not_found", "no such key")
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::BadCursor => {
                ApiError::bad_request("invalid_cursor", "field `cursor`: invalid cursor")
            }
            StoreError::Conflict => {
                ApiError::new(StatusCode::CONFLICT, "conflict", "the key already exists")
            }
            StoreError::NotRotatable => ApiError::new(
                StatusCode::CONFLICT,
                "key_not_rotatable",
                "the key is revoked or expired and cannot be rotated",
            ),
            StoreError::AlreadyRotated => ApiError::new(
                StatusCode::CONFLICT,
                "key_already_rotated",
                "the key already has a successor (rotation in progress); rotate the new key instead",
            ),
            StoreError::Revoked => ApiError::new(
                StatusCode::CONFLICT,
                "key_revoked",
                "a revoked key cannot be changed",
            ),
            other => {
                tracing::error!(error = %other, "key store error in admin API");
                ApiError::new(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "store_unavailable",
                    "the key store is unavailable; retry shortly",
                )
            }
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut resp = (
            self.status,
            Json(json!({"error": {"code": self.code, "message": self.message}})),
        )
            .into_response();
        let challenge = match (self.status, self.code) {
            (StatusCode::UNAUTHORIZED, "missing_key" | "unsupported_auth_scheme") => {
                Some("Bearer realm=\"keygate-admin\"")
            }
            (StatusCode::UNAUTHORIZED, _) => {
                Some("Bearer realm=\"keygate-admin\", error=\"invalid_token\"")
            }
            (StatusCode::FORBIDDEN, "insufficient_scope") => {
                Some("Bearer realm=\"keygate-admin\", error=\"insufficient_scope\"")
            }
            _ => None,
        };
        if let Some(c) = challenge {
            resp.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static(c));
        }
        if self.status == StatusCode::PAYLOAD_TOO_LARGE {
            // The rest of the body is not read: the connection cannot be reused.
            resp.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        if self.status == StatusCode::SERVICE_UNAVAILABLE {
            resp.headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        }
        resp
    }
}

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

/// Authenticate a management call needing `scope` (`keys:read` or `keys:write`).
pub async fn authorize(
    s: &AdminState,
    headers: &HeaderMap,
    scope: &'static str,
) -> Result<Caller, ApiError> {
    use crate::error::Deny;
    let unauthorized = |code, msg: &str| ApiError::new(StatusCode::UNAUTHORIZED, code, msg);
    let token = proxy::bearer(headers).map_err(|d| match d {
        Deny::MultipleAuthorization => ApiError::bad_request(
            "multiple_authorization",
            "send exactly one Authorization header",
        ),
        Deny::UnsupportedScheme => unauthorized(
            "unsupported_auth_scheme",
            "only the Bearer authorization scheme is accepted",
        ),
        Deny::MissingKey => unauthorized("missing_key", "send Authorization: Bearer <key>"),
        _ => unauthorized("malformed_key", "the API key is malformed"),
    })?;
    let asked_tenant = match headers.get("x-tenant-id") {
        None => None,
        Some(v) => match v.to_str() {
            Ok(t) if Tenant::valid(t) => Some(t.to_string()),
            _ => {
                return Err(ApiError::bad_request(
                    "invalid_tenant",
                    "header `X-Tenant-ID`: use 1-64 characters of A-Z a-z 0-9 _ . -",
                ))
            }
        },
    };

    if let Some(root) = &s.root_digest {
        if key::ct_eq(&key::sha256(token.as_bytes()), root) {
            return Ok(Caller {
                tenant: asked_tenant.unwrap_or_else(|| s.default_tenant.clone()),
                key_scopes: None,
            });
        }
    }

    let parsed = key::parse(&s.prefixes, token)
        .map_err(|_| unauthorized("malformed_key", "the API key is malformed"))?;
    let digest = s.hasher.digest(token);
    let entry = match s.cache.lookup(&digest).await {
        Ok((e, _)) => e,
        Err(e) => {
            tracing::warn!(error = %e, "key store read failed (admin auth)");
            return Err(ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                "the key store is unavailable; retry shortly",
            ));
        }
    };
    let Entry::Known(id) = entry else {
        return Err(unauthorized("unknown_key", "the API key is not valid"));
    };
    let now = crate::time::now_ms();
    if !key::ct_eq(&id.digest, &digest) {
        return Err(unauthorized("unknown_key", "the API key is not valid"));
    }
    if id.is_revoked_at(now) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "revoked_key",
            "the API key has been revoked",
        ));
    }
    if id.is_expired_at(now) {
        return Err(unauthorized("expired_key", "the API key has expired"));
    }
    if parsed.key_type != KeyType::Secret || id.key_type != KeyType::Secret {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "publishable_key_forbidden",
            "publishable keys cannot manage keys",
        ));
    }
    if !id.grants_all(&[scope]) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "insufficient_scope",
            format!("this call needs the `{scope}` scope"),
        ));
    }
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

/// Read a JSON body strictly: JSON content type, size limit, unknown fields refused,
/// errors naming the field.
pub async fn read_json<T: DeserializeOwned>(
    headers: &HeaderMap,
    body: axum::body::Body,
) -> Result<T, ApiError> {
    let is_json = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split(';').next())
        .is_some_and(|m| {
            let m = m.trim();
            m.eq_ignore_ascii_case("application/json")
                || (m.len() > 5 && m[m.len() - 5..].eq_ignore_ascii_case("+json"))
        });
    if !is_json {
        return Err(ApiError::bad_request(
            "unsupported_content_type",
            "send the body as Content-Type: application/json",
        ));
    }
    let bytes = http_body_util::Limited::new(body, MAX_BODY_BYTES)
        .collect()
        .await
        .map_err(|e| {
            if e.is::<http_body_util::LengthLimitError>() {
                ApiError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "body_too_large",
                    format!("the body exceeds {MAX_BODY_BYTES} bytes"),
                )
            } else {
                ApiError::bad_request("bad_body", "the request body could not be read")
            }
        })?
        .to_bytes();
    let de = &mut serde_json::Deserializer::from_slice(&bytes);
    serde_path_to_error::deserialize(de).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner();
        let msg = if path == "." || path.is_empty() {
            format!("invalid body: {inner}")
        } else {
            format!("field `{path}`: {inner}")
        };
        ApiError::bad_request("invalid_body", msg)
    })
}

/// Check a human label: 1-200 characters, no control characters.
pub fn check_name(field: &'static str, name: &str) -> Result<String, ApiError> {
    let trimmed = name.trim();
    if trimmed.is_empty() || trimmed.chars().count() > 200 {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("field `{field}`: must be 1 to 200 characters"),
        ));
    }
    if trimmed.chars().any(char::is_control) {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("field `{field}`: control characters are not allowed"),
        ));
    }
    Ok(trimmed.to_string())
}

/// Check a scope list: well-formed, at most 64, duplicates dropped, order kept.
pub fn check_scopes(field: &'static str, scopes: Vec<String>) -> Result<Vec<String>, ApiError> {
    if scopes.is_empty() || scopes.len() > 64 {
        return Err(ApiError::bad_request(
            "invalid_field",
            format!("field `{field}`: give 1 to 64 scopes"),
        ));
    }
    let mut out: Vec<String> = Vec::with_capacity(scopes.len());
    for (i, s) in scopes.into_iter().enumerate() {
        if !key::valid_scope(&s) {
            return Err(ApiError::bad_request(
                "invalid_field",
                format!(
                    "field `{field}[{i}]`: invalid scope {s:?}: use `*` or lowercase words joined by `:`"
                ),
            ));
        }
        if !out.contains(&s) {
            out.push(s);
        }
    }
    Ok(out)
}

/// The optional `scopes` and `expires_in` of a create request, checked: scopes default
/// to the caller's own; `expires_in` becomes an absolute expiry.
pub fn scopes_and_expiry(
    caller: &Caller,
    scopes: Option<Vec<String>>,
    expires_in: Option<&str>,
) -> Result<(Vec<String>, Option<u64>), ApiError> {
    let scopes = match scopes {
        Some(sc) => check_scopes("scopes", sc)?,
        None => caller.scopes_or_all(),
    };
    let expires_at = expires_in
        .map(|e| jack::parse_expires_in("expires_in", e))
        .transpose()?
        .map(|ms| crate::time::now_ms() + ms);
    Ok((scopes, expires_at))
}

/// What to create; shared by both API surfaces.
pub struct NewKeySpec {
    pub name: String,
    pub key_type: KeyType,
    pub environment: Environment,
    pub scopes: Vec<String>,
    pub expires_at: Option<u64>,
}

/// Create a key in the caller's tenant. The full key text leaves only in the result.
pub async fn create_key(
    s: &AdminState,
    caller: &Caller,
    spec: NewKeySpec,
) -> Result<(KeyRecord, NewKey), ApiError> {
    if !caller.may_grant(&spec.scopes) {
        return Err(escalation());
    }
    let new = new_key_text(s, spec.key_type, spec.environment)?;
    let record = KeyRecord {
        id: uuid::Uuid::now_v7().to_string(),
        tenant: caller.tenant.clone(),
        name: spec.name,
        key_type: spec.key_type,
        environment: spec.environment,
        prefix: new.display_prefix(),
        last_four: new.last_four(),
        scopes: spec.scopes,
        created_at: crate::time::now_ms(),
        last_used_at: None,
        expires_at: spec.expires_at,
        revoked_at: None,
        successor_id: None,
        digest: s.hasher.digest(&new.text),
    };
    s.store.insert(&record).await?;
    // A create must clear a cached "unknown" for this digest.
    s.cache.invalidate(&record.digest).await;
    tracing::info!(id = %record.id, tenant = %record.tenant, prefix = %record.prefix, "key created");
    Ok((record, new))
}

pub fn escalation() -> ApiError {
    ApiError::new(
        StatusCode::FORBIDDEN,
        "scope_escalation",
        "field `scopes`: a key cannot hand out scopes it does not hold",
    )
}

/// Fresh key text from the OS CSPRNG.
pub fn new_key_text(
    s: &AdminState,
    key_type: KeyType,
    environment: Environment,
) -> Result<NewKey, ApiError> {
    key::generate(&s.prefixes, key_type, environment).map_err(|e| {
        tracing::error!(error = %e, "OS random number generator failed");
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "key generation failed",
        )
    })
}

/// Parse an id from a path: anything that is not one of our ids is simply not found.
pub fn parse_id(id: &str) -> Result<&str, ApiError> {
    uuid::Uuid::try_parse(id)
        .map(|_| id)
        .map_err(|_| ApiError::key_not_found())
}

/// Get one key of the caller's tenant.
pub async fn get_key(s: &AdminState, caller: &Caller, id: &str) -> Result<KeyRecord, ApiError> {
    let id = parse_id(id)?;
    s.store
        .by_id(&caller.tenant, id)
        .await?
        .ok_or_else(ApiError::key_not_found)
}

/// Revoke in the caller's tenant (idempotent) and evict it from this process's cache.
pub async fn revoke_key(s: &AdminState, caller: &Caller, id: &str) -> Result<KeyRecord, ApiError> {
    let id = parse_id(id)?;
    let record = s
        .store
        .revoke(&caller.tenant, id, crate::time::now_ms())
        .await?
        .ok_or_else(ApiError::key_not_found)?;
    s.cache.invalidate(&record.digest).await;
    tracing::info!(id = %record.id, tenant = %record.tenant, prefix = %record.prefix, "key revoked");
    Ok(record)
}

#[cfg(test)]
mod tests {
    /// Every route the router serves is in the OpenAPI document, and nothing else is.
    #[test]
    fn openapi_lists_exactly_the_served_routes() {
        let doc: serde_json::Value = serde_json::from_str(super::OPENAPI).expect("valid JSON");
        assert_eq!(doc["openapi"].as_str().map(|v| &v[..3]), Some("3.1"));
        let mut documented = Vec::new();
        for (path, item) in doc["paths"].as_object().expect("paths") {
            for method in ["get", "post", "put", "patch", "delete"] {
                if item.get(method).is_some() {
                    documented.push((method.to_string(), path.clone()));
                }
            }
        }
        let mut served: Vec<(String, String)> = super::ROUTES
            .iter()
            .map(|(m, p)| (m.to_string(), p.to_string()))
            .collect();
        documented.sort();
        served.sort();
        assert_eq!(documented, served);
    }
}
