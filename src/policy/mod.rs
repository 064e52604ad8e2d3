//! Request policy as data: the compiled route table (first match wins) and the header
//! policy, built by `Policy::new` from typed specs that `config` has already validated.
//! One `Arc<Policy>` is loaded per request, so a reload swaps it atomically.

pub mod path;

use crate::error::Challenge;
use http::{HeaderName, Method};
use path::{PathPattern, SplitPath};
use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use xxhash_rust::xxh3::Xxh3Builder;

/// The route of a request that no route matched (or that was refused before routing):
/// its metrics label and its access-log name, reserved in the config.
pub const UNMATCHED: &str = "unmatched";

/// One route as the config file describes it, already validated.
#[derive(Debug, Clone)]
pub struct RouteSpec {
    /// Unique among the routes, and not `unmatched`: the metrics label.
    pub name: String,
    /// `None` matches every method.
    pub methods: Option<Vec<Method>>,
    pub pattern: PathPattern,
    /// `auth: none`: served without a key (then `scopes` is empty).
    pub public: bool,
    /// Each a `key::valid_scope`, so they join into a `WWW-Authenticate` value.
    pub scopes: Vec<String>,
    pub allow_publishable: bool,
    pub max_body_bytes: Option<u64>,
    /// Credits a request on this route spends (default 1).
    pub cost: u64,
    /// The route's own rate limits, on top of the key's.
    pub rate_limits: Vec<RouteLimit>,
}

/// A route's rate limit: `limit` requests per `window_ms`, counted per key or per tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteLimit {
    /// Unique in its route; a metric label and the `RateLimit` headers' policy name.
    pub name: Arc<str>,
    pub limit: u64,
    pub window_ms: u64,
    pub by: LimitBy,
    /// Its `RateLimit-Policy` value, the same for every key (`kept`).
    pub policy: http::HeaderValue,
}

impl RouteLimit {
    pub fn new(name: &str, limit: u64, window_ms: u64, by: LimitBy) -> RouteLimit {
        let policy = crate::error::ratelimit_policy(name, limit, window_ms);
        RouteLimit {
            name: name.into(),
            limit,
            window_ms,
            by,
            policy: kept(policy),
        }
    }
}

/// `value` kept for the life of the process, so a clone copies a pointer: no reference
/// count for every thread to write. For values fixed by the config (a route limit's
/// `RateLimit-Policy`); each text is kept once, and past `MAX_KEPT` texts (reloads that
/// keep changing limits) the value is returned as it is.
#[allow(clippy::disallowed_types, reason = "config load and reload only")]
fn kept(value: http::HeaderValue) -> http::HeaderValue {
    const MAX_KEPT: usize = 10_000;
    static KEPT: std::sync::Mutex<BTreeSet<&'static str>> = std::sync::Mutex::new(BTreeSet::new());
    // Visible ASCII, as `from_static` wants (anything else stays as it is).
    let Ok(text) = value.to_str() else {
        return value;
    };
    let mut kept = KEPT.lock().unwrap_or_else(|e| e.into_inner());
    let text = match kept.get(text) {
        Some(&text) => text,
        None if kept.len() >= MAX_KEPT => return value,
        None => {
            let text: &'static str = Box::leak(text.into());
            kept.insert(text);
            text
        }
    };
    http::HeaderValue::from_static(text)
}

/// Whose requests a route limit counts together.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LimitBy {
    /// Each key's (its budget: a rotated key shares it with its successor).
    Key,
    /// All keys of a tenant together.
    Tenant,
}

/// A request no route matches: a 404, or served to any valid key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Unmatched {
    Deny,
    RequireKey,
}

/// What the proxy does with headers and bodies whatever the route.
#[derive(Debug, Clone)]
pub struct HeaderPolicy {
    pub identity: IdentityHeaders,
    pub forward_authorization: bool,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// `None`: no limit unless a route sets one.
    pub default_max_body_bytes: Option<u64>,
    /// One log line per proxied request (target `keygate::access`).
    pub access_log: bool,
    /// `underscore_headers: keep`.
    pub keep_underscore_headers: bool,
    /// `Upgrade` protocols allowed through, lower-case (never `h2c`).
    pub upgrades: Box<[Box<str>]>,
    /// `Deprecation` and `Sunset` on the answers to an ending key (`proxy::lifecycle`).
    pub lifecycle: Lifecycle,
}

/// `proxy.key_lifecycle_headers` and `proxy.sunset_window`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lifecycle {
    pub headers: bool,
    /// An expiry at most this far ahead is announced with `Sunset`.
    pub sunset_window_ms: u64,
}

/// Everything `Policy::new` compiles.
#[derive(Debug, Clone)]
pub struct PolicySpec {
    /// In config order: the first match wins.
    pub routes: Vec<RouteSpec>,
    pub unmatched: Unmatched,
    pub headers: HeaderPolicy,
}

/// One compiled route.
#[derive(Debug)]
pub struct Route {
    pub name: Arc<str>,
    methods: Option<Box<[Method]>>,
    pub pattern: PathPattern,
    pub public: bool,
    pub scopes: Box<[Box<str>]>,
    pub allow_publishable: bool,
    pub max_body_bytes: Option<u64>,
    /// `WWW-Authenticate` for a key lacking this route's scopes, built once.
    pub scope_challenge: Challenge,
    pub cost: u64,
    pub rate_limits: Box<[RouteLimit]>,
    /// Unique in the process, never reused (a reload makes new routes): what per-key state
    /// made for this route (the rate limiter's) recognises it by.
    pub uid: u64,
}

static ROUTE_UIDS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);

impl Route {
    fn new(spec: RouteSpec) -> Route {
        let scopes: Box<[Box<str>]> = spec
            .scopes
            .into_iter()
            .map(String::into_boxed_str)
            .collect();
        Route {
            name: spec.name.into(),
            methods: spec.methods.map(Vec::into_boxed_slice),
            pattern: spec.pattern,
            public: spec.public,
            scope_challenge: Challenge::for_scopes(&scopes),
            scopes,
            allow_publishable: spec.allow_publishable,
            max_body_bytes: spec.max_body_bytes,
            cost: spec.cost,
            rate_limits: spec.rate_limits.into_boxed_slice(),
            uid: ROUTE_UIDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }

    fn matches_method(&self, method: &Method) -> bool {
        self.methods
            .as_ref()
            .is_none_or(|ms| ms.iter().any(|m| m == method))
    }

    pub fn methods_label(&self) -> String {
        match &self.methods {
            None => "*".into(),
            Some(ms) => ms.iter().map(Method::as_str).collect::<Vec<_>>().join(","),
        }
    }
}

/// Names of the headers that carry the caller's identity upstream.
#[derive(Debug, Clone)]
pub struct IdentityHeaders {
    pub key_id: HeaderName,
    pub tenant: HeaderName,
    pub scopes: HeaderName,
    pub key_type: HeaderName,
}

/// A `;params` path that picks different routes with and without its params.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ambiguous;

#[derive(Debug)]
pub struct Policy {
    routes: Vec<Route>,
    /// Route indexes by literal first segment, and those starting with a wildcard
    /// (or matching only `/`): a request checks only the routes that could match.
    by_first: HashMap<Box<str>, Vec<usize>, Xxh3Builder>,
    wild_first: Vec<usize>,
    unmatched: Option<Route>,
    pub headers: HeaderPolicy,
}

/// Route indexes by literal first segment, and those a request's first segment cannot
/// rule out; both ascending, so merging them keeps config order.
fn index(routes: &[Route]) -> (HashMap<Box<str>, Vec<usize>, Xxh3Builder>, Vec<usize>) {
    let mut by_first: HashMap<Box<str>, Vec<usize>, Xxh3Builder> =
        HashMap::with_hasher(Xxh3Builder::new());
    let mut wild_first = Vec::new();
    for (i, r) in routes.iter().enumerate() {
        match r.pattern.first_literal() {
            Some(l) => by_first.entry(l.into()).or_default().push(i),
            None => wild_first.push(i),
        }
    }
    (by_first, wild_first)
}

impl Policy {
    /// Compile the table. The spec is taken as validated (config does that, naming the
    /// YAML field of each refusal): this only indexes routes by their first segment.
    pub fn new(spec: PolicySpec) -> Policy {
        let PolicySpec {
            routes,
            unmatched,
            headers,
        } = spec;
        let routes: Vec<Route> = routes.into_iter().map(Route::new).collect();
        let unmatched = match unmatched {
            Unmatched::Deny => None,
            Unmatched::RequireKey => Some(Route::new(RouteSpec {
                name: UNMATCHED.into(),
                methods: None,
                pattern: PathPattern::parse("/**").expect("a valid literal pattern"),
                public: false,
                scopes: Vec::new(),
                allow_publishable: false,
                max_body_bytes: None,
                cost: 1,
                rate_limits: Vec::new(),
            })),
        };
        let (by_first, wild_first) = index(&routes);
        Policy {
            routes,
            by_first,
            wild_first,
            unmatched,
            headers,
        }
    }

    /// First route matching method and normalised path; `unmatched: require_key` gives
    /// a key-only pseudo-route; `deny` gives `None`.
    /// The index is `None` for the `unmatched` pseudo-route.
    pub fn find(&self, method: &Method, path: &str) -> Option<(Option<usize>, &Route)> {
        let found = match SplitPath::new(path) {
            Some(split) => {
                let literal = split
                    .first()
                    .and_then(|f| self.by_first.get(f))
                    .map_or(&[][..], Vec::as_slice);
                // Merge the two ascending index lists: first match in config order wins.
                let (mut a, mut b) = (literal.iter().peekable(), self.wild_first.iter().peekable());
                let mut hit = None;
                while let Some(&i) = match (a.peek(), b.peek()) {
                    (Some(&&x), Some(&&y)) if x < y => a.next(),
                    (Some(_), Some(_)) => b.next(),
                    (Some(_), None) => a.next(),
                    (None, _) => b.next(),
                } {
                    let r = &self.routes[i];
                    if r.matches_method(method) && r.pattern.matches_split(&split) {
                        hit = Some(i);
                        break;
                    }
                }
                hit
            }
            None => self
                .routes
                .iter()
                .position(|r| r.matches_method(method) && r.pattern.matches(path)),
        };
        match found {
            Some(i) => Some((Some(i), &self.routes[i])),
            None => self.unmatched.as_ref().map(|r| (None, r)),
        }
    }

    /// `find` for a path that may carry `;params`: Tomcat and Spring match `admin;x` as
    /// `admin`, Express, Go and Flask as `admin;x`. With `;` in the path both readings must
    /// pick the same route (or both none), else `Err(Ambiguous)`. Without `;` this is
    /// `find` and costs nothing more.
    pub fn find_unambiguous(
        &self,
        method: &Method,
        path: &str,
        has_params: bool,
    ) -> Result<Option<(Option<usize>, &Route)>, Ambiguous> {
        let found = self.find(method, path);
        if has_params {
            let stripped = self.find(method, &path::strip_params(path));
            if found.map(|(i, _)| i) != stripped.map(|(i, _)| i) {
                return Err(Ambiguous);
            }
        }
        Ok(found)
    }

    pub fn routes(&self) -> &[Route] {
        &self.routes
    }

    /// The name a request is counted and logged under: its route's, else `unmatched`.
    pub fn route_name(&self, index: Option<usize>) -> &str {
        index.map_or(UNMATCHED, |i| &self.routes[i].name)
    }

    /// The compiled table as `check-config` prints it.
    pub fn describe(&self) -> String {
        let mut out = String::new();
        out.push_str(&format!(
            "{:<4} {:<20} {:<24} {:<30} {:<6} {}\n",
            "#", "name", "methods", "path", "auth", "scopes / publishable"
        ));
        for (i, r) in self.routes.iter().enumerate() {
            let scopes = if r.public {
                "-".to_string()
            } else if r.scopes.is_empty() {
                "(any valid key)".to_string()
            } else {
                r.scopes.join(" ")
            };
            out.push_str(&format!(
                "{:<4} {:<20} {:<24} {:<30} {:<6} {}{}\n",
                i + 1,
                r.name,
                r.methods_label(),
                r.pattern,
                if r.public { "none" } else { "key" },
                scopes,
                if r.allow_publishable {
                    " +publishable"
                } else {
                    ""
                }
            ));
        }
        out.push_str(&format!(
            "unmatched requests: {}\n",
            if self.unmatched.is_some() {
                "require a valid key"
            } else {
                "denied (404)"
            }
        ));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A route limit's policy is made once per text: every reload that keeps the limit
    /// shares it, and a clone copies a pointer.
    #[test]
    fn a_route_limits_policy_is_kept_once() {
        let a = RouteLimit::new("per-key", 100, 60_000, LimitBy::Key);
        let b = RouteLimit::new("per-key", 100, 60_000, LimitBy::Tenant);
        let c = RouteLimit::new("per-key", 101, 60_000, LimitBy::Key);
        assert_eq!(a.policy, "\"per-key\";q=100;w=60");
        assert_eq!(c.policy, "\"per-key\";q=101;w=60");
        let at = |l: &RouteLimit| l.policy.as_bytes().as_ptr();
        assert_eq!(at(&a), at(&b));
        assert_eq!(at(&a), a.policy.clone().as_bytes().as_ptr());
        assert_ne!(at(&a), at(&c));
    }

    fn route(name: &str, path: &str) -> RouteSpec {
        RouteSpec {
            name: name.into(),
            methods: None,
            pattern: PathPattern::parse(path).unwrap(),
            public: false,
            scopes: Vec::new(),
            allow_publishable: false,
            max_body_bytes: None,
            cost: 1,
            rate_limits: Vec::new(),
        }
    }

    fn policy(routes: Vec<RouteSpec>) -> Policy {
        let h = HeaderName::from_static;
        Policy::new(PolicySpec {
            routes,
            unmatched: Unmatched::Deny,
            headers: HeaderPolicy {
                identity: IdentityHeaders {
                    key_id: h("x-keygate-key-id"),
                    tenant: h("x-keygate-tenant"),
                    scopes: h("x-keygate-scopes"),
                    key_type: h("x-keygate-key-type"),
                },
                forward_authorization: false,
                trusted_proxies: Vec::new(),
                default_max_body_bytes: None,
                access_log: true,
                keep_underscore_headers: false,
                upgrades: Box::new(["websocket".into()]),
                lifecycle: Lifecycle {
                    headers: true,
                    sunset_window_ms: 0,
                },
            },
        })
    }

    #[test]
    fn first_match_wins_across_literal_and_wildcard_routes() {
        let p = policy(vec![
            route("a", "/*/x"),
            route("b", "/users/**"),
            RouteSpec {
                methods: Some(vec![Method::POST]),
                ..route("c", "/**")
            },
            route("d", "/users/x"),
            route("root", "/"),
        ]);
        let name = |m: Method, path: &str| p.find(&m, path).map(|(_, r)| r.name.to_string());
        assert_eq!(name(Method::GET, "/users/x").as_deref(), Some("a"));
        assert_eq!(name(Method::GET, "/users/y").as_deref(), Some("b"));
        assert_eq!(name(Method::POST, "/other/y").as_deref(), Some("c"));
        assert_eq!(name(Method::GET, "/other/y"), None);
        assert_eq!(name(Method::GET, "/").as_deref(), Some("root"));
        assert_eq!(name(Method::POST, "/").as_deref(), Some("c"));
        let deep = format!("/users{}", "/x".repeat(40));
        assert_eq!(name(Method::GET, &deep).as_deref(), Some("b"));
    }

    #[test]
    fn a_params_path_must_pick_the_same_route_with_and_without_its_params() {
        let p = policy(vec![
            RouteSpec {
                scopes: vec!["admin:write".into()],
                ..route("admin", "/admin/**")
            },
            route("users", "/users/*"),
            RouteSpec {
                public: true,
                ..route("rest", "/**")
            },
        ]);
        let find = |path: &str| {
            let n = super::path::normalize_request(path).unwrap();
            p.find_unambiguous(&Method::GET, &n.path, n.has_params)
                .map(|f| f.map(|(_, r)| r.name.to_string()))
        };
        // `admin;x` is `admin` to Tomcat and Spring, a name of its own to Express.
        assert_eq!(find("/admin;x/secret"), Err(super::Ambiguous));
        assert_eq!(find("/admin;/secret"), Err(super::Ambiguous));
        assert_eq!(find("/users;x/1"), Err(super::Ambiguous));
        // The same route either way: served.
        assert_eq!(find("/users/1;jsessionid=abc"), Ok(Some("users".into())));
        assert_eq!(find("/admin/x;v=1"), Ok(Some("admin".into())));
        assert_eq!(find("/other;x/y"), Ok(Some("rest".into())));
        assert_eq!(find("/users/1"), Ok(Some("users".into())));

        // Route against no route is ambiguous too; no route either way is a 404.
        let q = policy(vec![route("users", "/users/*")]);
        let n = "/users;x/1";
        assert_eq!(
            q.find_unambiguous(&Method::GET, n, true)
                .map(|f| f.is_some()),
            Err(super::Ambiguous)
        );
        assert_eq!(
            q.find_unambiguous(&Method::GET, "/x;y", true)
                .map(|f| f.is_some()),
            Ok(false)
        );
    }
}
