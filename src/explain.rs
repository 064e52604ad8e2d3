//! What `POST /v1/explain` and `keygate explain` say about one decision: the normalised
//! path, the route and what it requires, the outcome with the status and code the proxy
//! answers (`Deny`'s one mapping), and short reasons. It describes an `auth::Decision`
//! made by the proxy's own function; it decides nothing itself.

use crate::auth::{self, Ask, Credential, Decision, KeyCheck};
use crate::cache::Identity;
use crate::error::Deny;
use crate::policy::{Policy, Route};
use http::Method;
use serde::Serialize;

/// Longest method `explain` accepts (the proxy's parser has no own bound below the
/// request head's).
pub const MAX_METHOD_LEN: usize = 64;

/// The answer: `{"normalized_path", "route", "decision", "reasons"}`.
#[derive(Debug, Serialize)]
pub struct Explanation {
    /// `None` when the method, or the path itself, was refused.
    pub normalized_path: Option<String>,
    pub route: Option<RouteShown>,
    pub decision: Outcome,
    pub reasons: Vec<String>,
}

/// A route and what it requires.
#[derive(Debug, Serialize)]
pub struct RouteShown {
    pub name: String,
    pub scopes: Vec<String>,
    /// `none` (public) or `key`.
    pub auth: &'static str,
    pub allow_publishable: bool,
}

/// Allowed (`status` null: the upstream answers), or the proxy's own answer.
#[derive(Debug, Serialize)]
pub struct Outcome {
    pub allowed: bool,
    pub status: Option<u16>,
    /// `allowed`, or the refusal's stable code.
    pub code: &'static str,
}

/// A method as a request line carries it: an HTTP token of at most `MAX_METHOD_LEN`.
pub fn parse_method(text: &str) -> Result<Method, String> {
    if text.is_empty() || text.len() > MAX_METHOD_LEN {
        return Err(format!("use 1 to {MAX_METHOD_LEN} characters"));
    }
    Method::from_bytes(text.as_bytes()).map_err(|_| {
        format!("{text:?} is not an HTTP method (letters, digits and !#$%&'*+-.^_`|~)")
    })
}

/// The path part of what was given: a query string is never looked at by the proxy.
pub fn path_only(text: &str) -> &str {
    text.split_once('?').map_or(text, |(p, _)| p)
}

/// The route part alone, offline (`keygate explain`): no key is checked.
pub fn route_only(policy: &Policy, method: &Method, path: &str) -> Explanation {
    let ask = Ask {
        method,
        path: path_only(path),
        credential: Credential::Token(""),
        transport: None,
    };
    explain(method, path, &auth::route(policy, &ask))
}

/// Describe `d`, the decision on `method` and `raw` (the path as given).
pub fn explain(method: &Method, raw: &str, d: &Decision<'_, '_>) -> Explanation {
    let mut reasons = Vec::new();
    path_reasons(method, raw, d, &mut reasons);
    if let Some((index, route)) = d.route {
        route_reasons(method, index, route, &mut reasons);
    } else if let (Some(Deny::NoRoute), Some(Ok(n))) = (&d.refused, &d.path) {
        reasons.push(format!(
            "no route matches {method} {} and unmatched is deny",
            n.path
        ));
    }
    if let (Some(k), Some((_, route))) = (&d.key, d.route) {
        key_reasons(k, route, &mut reasons);
    }
    let result = d.result();
    if result.is_ok() && d.key.is_some() {
        reasons.push("rate limits, credits and body size are not checked here".into());
    }
    Explanation {
        normalized_path: match &d.path {
            Some(Ok(n)) => Some(n.path.to_string()),
            _ => None,
        },
        route: d.route.map(|(_, r)| shown(r)),
        decision: match result {
            Ok(()) => Outcome {
                allowed: true,
                status: None,
                code: "allowed",
            },
            Err(deny) => Outcome {
                allowed: false,
                status: Some(deny.status().as_u16()),
                code: deny.code(),
            },
        },
        reasons,
    }
}

fn shown(r: &Route) -> RouteShown {
    RouteShown {
        name: r.name.to_string(),
        scopes: r.scopes.iter().map(|s| s.to_string()).collect(),
        auth: if r.public { "none" } else { "key" },
        allow_publishable: r.allow_publishable,
    }
}

fn path_reasons(method: &Method, raw: &str, d: &Decision<'_, '_>, out: &mut Vec<String>) {
    if d.refused == Some(Deny::BadMethod) {
        out.push(format!(
            "method {method} has lower-case letters: WSGI and Rack would run it upper-cased"
        ));
        return;
    }
    let path = path_only(raw);
    if path.len() < raw.len() {
        out.push("the query string is ignored (keys in it are never looked at)".into());
    }
    match &d.path {
        Some(Err(e)) => out.push(format!("path refused: {e}")),
        Some(Ok(n)) if n.path != path => {
            out.push(format!("path normalized from {path} to {}", n.path));
        }
        Some(Ok(_)) => out.push(format!("path {path} is already normal")),
        None => {}
    }
    if matches!(&d.path, Some(Ok(_))) && d.route.is_none() && d.refused == Some(Deny::BadPath) {
        out.push(
            "path refused: its ;params pick another route when stripped (as servlet \
             containers do) than when kept"
                .into(),
        );
    }
}

fn route_reasons(method: &Method, index: Option<usize>, route: &Route, out: &mut Vec<String>) {
    match index {
        Some(_) => out.push(format!(
            "route {} matches {method} {}",
            route.name, route.pattern
        )),
        None => out.push("no route matches; unmatched: require_key asks for any valid key".into()),
    }
    let name = &route.name;
    if route.public {
        out.push(format!(
            "route {name} is public (auth: none): no key is checked"
        ));
        return;
    }
    if route.scopes.is_empty() {
        out.push(format!("route {name} requires any valid key"));
    } else {
        out.push(format!(
            "route {name} requires scopes [{}]",
            route.scopes.join(" ")
        ));
    }
    out.push(if route.allow_publishable {
        format!("route {name} allows publishable keys")
    } else {
        format!("route {name} allows secret keys only")
    });
}

fn key_reasons(k: &KeyCheck, route: &Route, out: &mut Vec<String>) {
    let v = &k.verdict;
    let Some(id) = &v.identity else {
        out.push(
            match &v.result {
                Err(Deny::MalformedKey) => {
                    "key is malformed: wrong prefix, length or checksum (no store lookup)"
                }
                Err(Deny::StoreUnavailable) if v.store_error.is_some() => {
                    "key is not cached and the key store could not be read"
                }
                Err(Deny::StoreUnavailable) => {
                    "the key store is failing and cache.on_store_error is deny"
                }
                _ => "no such key: well-formed, but not issued",
            }
            .into(),
        );
        return;
    };
    out.push(format!(
        "key {} ({}, tenant {}) holds scopes [{}]",
        id.id(),
        id.key_type.as_str(),
        id.tenant(),
        id.scopes().collect::<Vec<_>>().join(" ")
    ));
    match &v.result {
        Ok(()) => out.push(format!("key is valid for route {}", route.name)),
        Err(Deny::RevokedKey) => out.push(when("key was revoked at", id.revoked_at())),
        Err(Deny::ExpiredKey) => out.push(when("key expired at", id.expires_at())),
        Err(Deny::PublishableNotAllowed) => out.push(format!(
            "key is publishable and route {} allows secret keys only",
            route.name
        )),
        Err(Deny::InsufficientScope(_)) => missing_scopes(id, route, out),
        Err(Deny::StoreUnavailable) => {
            out.push("the key store is failing and cache.on_store_error is deny".into())
        }
        Err(_) => out.push("no such key: well-formed, but not issued".into()),
    }
}

fn when(what: &str, at: Option<u64>) -> String {
    match at {
        Some(ms) => format!("{what} {}", crate::time::rfc3339(ms)),
        None => what.trim_end_matches(" at").to_string(),
    }
}

fn missing_scopes(id: &Identity, route: &Route, out: &mut Vec<String>) {
    for s in route.scopes.iter().filter(|s| !id.grants_all(&[s])) {
        out.push(format!("key lacks scope {s}"));
    }
}
