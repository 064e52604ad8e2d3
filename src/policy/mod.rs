//! The per-request policy snapshot: compiled routes (first match wins) and the header
//! policy. One `Arc<Policy>` is loaded per request, so a reload swaps it atomically.

pub mod path;

use crate::config::raw::{Auth, RawProxy, RawRoute, UnderscoreHeaders, Unmatched};
use http::{HeaderName, HeaderValue, Method};
use path::{PathPattern, SplitPath};
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use xxhash_rust::xxh3::Xxh3Builder;

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
    pub scope_challenge: HeaderValue,
}

impl Route {
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
    pub identity: IdentityHeaders,
    pub forward_authorization: bool,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    pub default_max_body_bytes: Option<u64>,
    /// One log line per proxied request (target `keygate::access`).
    pub access_log: bool,
    /// `underscore_headers: keep`.
    pub keep_underscore_headers: bool,
    /// `Upgrade` protocols allowed through, lower-case.
    pub upgrades: Box<[Box<str>]>,
}

fn challenge(scopes: &[Box<str>]) -> HeaderValue {
    let v = format!(
        "Bearer realm=\"keygate\", error=\"insufficient_scope\", scope=\"{}\"",
        scopes.join(" ")
    );
    HeaderValue::from_str(&v).expect("scopes are validated to a header-safe alphabet")
}

/// `proxy.upgrades`: protocol names (RFC 9110 tokens), lower-cased; never `h2c`.
fn upgrades(list: &[String]) -> Result<Box<[Box<str>]>, (String, String)> {
    let field = || "proxy.upgrades".to_string();
    let mut out = Vec::with_capacity(list.len());
    for p in list {
        let token = !p.is_empty()
            && p.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            return Err((field(), format!("{p:?} is not a protocol name")));
        }
        let p = p.to_ascii_lowercase();
        if p == "h2c" {
            return Err((
                field(),
                "h2c cannot be tunnelled: RFC 9113 deprecates it, and the tunnel would bypass \
                 every route check"
                    .into(),
            ));
        }
        out.push(p.into_boxed_str());
    }
    Ok(out.into())
}

const RESERVED: &[&str] = &[
    "authorization",
    "host",
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "content-length",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "forwarded",
];

impl Policy {
    pub fn build(
        proxy: &RawProxy,
        raw_routes: &[RawRoute],
        unmatched: Unmatched,
    ) -> Result<Policy, (String, String)> {
        let ih = &proxy.identity_headers;
        let identity = IdentityHeaders {
            key_id: ih.key_id.0.clone(),
            tenant: ih.tenant.0.clone(),
            scopes: ih.scopes.0.clone(),
            key_type: ih.key_type.0.clone(),
        };
        let mut names = HashSet::new();
        for (field, name) in [
            ("key_id", &identity.key_id),
            ("tenant", &identity.tenant),
            ("scopes", &identity.scopes),
            ("key_type", &identity.key_type),
        ] {
            let path = format!("proxy.identity_headers.{field}");
            if RESERVED.contains(&name.as_str()) {
                return Err((
                    path,
                    format!("{name} is reserved and cannot carry identity"),
                ));
            }
            if !names.insert(name.clone()) {
                return Err((path, format!("{name} is used twice")));
            }
        }

        let mut seen = HashSet::new();
        let mut routes = Vec::with_capacity(raw_routes.len());
        for (i, r) in raw_routes.iter().enumerate() {
            let field = |f: &str| format!("routes[{i}].{f}");
            let name_ok = !r.name.is_empty()
                && r.name.len() <= 64
                && r.name
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'));
            if !name_ok {
                return Err((
                    field("name"),
                    format!(
                        "invalid route name {:?}: use 1-64 of A-Z a-z 0-9 _ . -",
                        r.name
                    ),
                ));
            }
            if !seen.insert(r.name.clone()) {
                return Err((field("name"), format!("duplicate route name {:?}", r.name)));
            }
            if r.name == "unmatched" {
                return Err((field("name"), "\"unmatched\" is reserved".into()));
            }
            let public = r.auth == Auth::None;
            if public && !r.scopes.is_empty() {
                return Err((
                    field("scopes"),
                    "a route with `auth: none` cannot require scopes".into(),
                ));
            }
            if public && r.allow_publishable {
                return Err((
                    field("allow_publishable"),
                    "a route with `auth: none` lets everyone through already".into(),
                ));
            }
            if let Some(ms) = &r.methods {
                if ms.is_empty() {
                    return Err((
                        field("methods"),
                        "empty list: omit it to match all methods".into(),
                    ));
                }
            }
            let scopes: Box<[Box<str>]> = r.scopes.iter().map(|s| s.0.as_str().into()).collect();
            routes.push(Route {
                name: r.name.as_str().into(),
                methods: r
                    .methods
                    .as_ref()
                    .map(|ms| ms.iter().map(|m| m.0.clone()).collect()),
                pattern: r.path.clone(),
                public,
                scope_challenge: challenge(&scopes),
                scopes,
                allow_publishable: r.allow_publishable,
                max_body_bytes: r.max_body_bytes,
            });
        }
        let unmatched = match unmatched {
            Unmatched::Deny => None,
            Unmatched::RequireKey => Some(Route {
                name: "unmatched".into(),
                methods: None,
                pattern: PathPattern::parse("/**").expect("a valid literal pattern"),
                public: false,
                scopes: Box::new([]),
                allow_publishable: false,
                max_body_bytes: None,
                scope_challenge: challenge(&[]),
            }),
        };
        let mut by_first: HashMap<Box<str>, Vec<usize>, Xxh3Builder> =
            HashMap::with_hasher(Xxh3Builder::new());
        let mut wild_first = Vec::new();
        for (i, r) in routes.iter().enumerate() {
            match r.pattern.first_literal() {
                Some(l) => by_first.entry(l.into()).or_default().push(i),
                None => wild_first.push(i),
            }
        }
        Ok(Policy {
            routes,
            by_first,
            wild_first,
            unmatched,
            identity,
            forward_authorization: proxy.forward_authorization,
            trusted_proxies: proxy.trusted_proxies.iter().map(|n| n.0).collect(),
            default_max_body_bytes: match proxy.limits.max_body_bytes {
                0 => None,
                n => Some(n),
            },
            access_log: proxy.access_log,
            keep_underscore_headers: proxy.underscore_headers == UnderscoreHeaders::Keep,
            upgrades: upgrades(&proxy.upgrades)?,
        })
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
    use crate::config::Config;
    use http::Method;

    fn policy(routes: &str) -> std::sync::Arc<super::Policy> {
        let text = format!(
            "proxy: {{ listen: \"127.0.0.1:0\", upstream: \"http://127.0.0.1:1\" }}\nadmin: {{ listen: \"127.0.0.1:0\" }}\nstore: {{ memory: {{}} }}\nroutes:\n{routes}"
        );
        Config::from_yaml(&text, "t", &[("X", "Y")]).unwrap().policy
    }

    #[test]
    fn first_match_wins_across_literal_and_wildcard_routes() {
        let p = policy(
            "  - { name: a, path: \"/*/x\" }\n  - { name: b, path: \"/users/**\" }\n  - { name: c, path: \"/**\", methods: [POST] }\n  - { name: d, path: \"/users/x\" }\n  - { name: root, path: / }\n",
        );
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
        let p = policy(
            "  - { name: admin, path: \"/admin/**\", scopes: [\"admin:write\"] }\n  - { name: users, path: \"/users/*\" }\n  - { name: rest, path: \"/**\", auth: none }\n",
        );
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
        let q = policy("  - { name: users, path: \"/users/*\" }\n");
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
