//! The admin router, built from one route table (what the OpenAPI test reads is what
//! is served), with the health, metrics and OpenAPI endpoints and keygate's JSON
//! 404/405 fallbacks.

use super::{explain, hellojohn, import, jack, AdminState, ApiError};
use axum::extract::State;
use axum::handler::Handler;
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodFilter};
use axum::{Json, Router};
use serde_json::json;
use std::sync::atomic::Ordering;
use std::sync::Arc;

/// The OpenAPI 3.1 document of the admin API (kept in the repo as `openapi.json`).
pub const OPENAPI: &str = include_str!("openapi.json");

pub fn router(state: Arc<AdminState>) -> Router {
    // The 405 fallback reaches only routes added before it: it comes after the table.
    routes()
        .router
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .with_state(state)
}

/// Every route, one (method, path) at a time; axum merges methods added to one path.
fn routes() -> Table {
    Table::default()
        .add(Method::GET, "/healthz", healthz)
        .add(Method::GET, "/readyz", readyz)
        .add(Method::GET, "/metrics", metrics)
        .add(Method::GET, "/openapi.json", openapi)
        .add_listing(Method::GET, "/v1/keys", jack::list)
        .add(Method::POST, "/v1/keys", jack::create)
        .add(Method::DELETE, "/v1/keys/{id}", jack::revoke)
        .add_listing(Method::GET, "/v1/api-keys", hellojohn::list)
        .add(Method::POST, "/v1/api-keys", hellojohn::create)
        .add(Method::POST, "/v1/api-keys/rotate", hellojohn::rotate)
        .add(Method::POST, "/v1/api-keys/import", import::import)
        .add(Method::GET, "/v1/api-keys/{id}", hellojohn::get)
        .add(Method::PATCH, "/v1/api-keys/{id}", hellojohn::update)
        .add(Method::DELETE, "/v1/api-keys/{id}", hellojohn::revoke)
        .add(Method::GET, "/v1/api-keys/{id}/usage", hellojohn::usage)
        .add(Method::POST, "/v1/explain", explain::explain)
}

/// A router under construction that remembers what it serves.
#[derive(Default)]
struct Table {
    router: Router<Arc<AdminState>>,
    served: Vec<(Method, &'static str)>,
}

impl Table {
    /// A route; under `/v1/` it takes no query (the documents refuse unknown parameters,
    /// and only the lists have any).
    fn add<H, T>(self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, Arc<AdminState>>,
        T: 'static,
    {
        let strict = path.starts_with("/v1/");
        self.with(method, path, handler, strict)
    }

    /// A list: its handler reads (and checks) the query itself.
    fn add_listing<H, T>(self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, Arc<AdminState>>,
        T: 'static,
    {
        self.with(method, path, handler, false)
    }

    fn with<H, T>(mut self, method: Method, path: &'static str, handler: H, no_query: bool) -> Self
    where
        H: Handler<T, Arc<AdminState>>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone())
            .expect("the table names only standard methods, each of which has a filter");
        let mut route = on(filter, handler);
        if no_query {
            route = route.layer(axum::middleware::from_fn(refuse_query));
        }
        self.router = self.router.route(path, route);
        self.served.push((method, path));
        self
    }
}

/// 400 `invalid_query` for a query string on a route that takes none (a bare `?` passes).
async fn refuse_query(req: axum::extract::Request, next: axum::middleware::Next) -> Response {
    match req.uri().query() {
        Some(q) if !q.is_empty() => {
            ApiError::bad_request("invalid_query", "this endpoint takes no query parameters")
                .into_response()
        }
        _ => next.run(req).await,
    }
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
    s.metrics
        .cache_entries
        .set(s.verifier.cache.entry_count() as i64);
    (
        [(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
        )],
        s.metrics.render(),
    )
        .into_response()
}

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

#[cfg(test)]
mod tests;
