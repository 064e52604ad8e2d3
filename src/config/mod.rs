//! Loading and validating configuration: YAML (strict) -> `RawConfig` -> typed `Config`.
//! Errors name the file, the line and the field path: the line of the value, or for a
//! field that is missing, of the mapping that lacks it (`locate`); a YAML syntax error is
//! said in YAML terms before any field is read (`syntax`).
//! The typed config splits by type into what a reload may swap (`Live`) and what needs a
//! restart (`Fixed`); `sections` validates one YAML section per function.
#![allow(
    clippy::disallowed_methods,
    reason = "config files are read at start and at reload, never per request"
)]

pub mod raw;

mod backend;
mod locate;
mod scanning;
mod sections;
mod syntax;

use crate::key::Prefixes;
use crate::policy::Policy;
use crate::store::redis::RedisSettings;
use raw::RawConfig;
pub use raw::ScanAction;
pub use scanning::{ScanKey, SecretScanning};
use secrecy::{ExposeSecret, SecretString};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// A refused configuration: which file, which field, which line, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub source: String,
    pub field: String,
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.source)?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.field.is_empty() {
            write!(f, ": field `{}`", self.field)?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

#[derive(Debug, Clone)]
pub enum StoreConfig {
    Redis(RedisSettings),
    Memory,
}

impl StoreConfig {
    /// For metrics and logs: memory, standalone, sentinel or cluster.
    pub fn mode(&self) -> &'static str {
        match self {
            StoreConfig::Memory => "memory",
            StoreConfig::Redis(r) => r.mode.name(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Timeouts {
    pub upstream: Duration,
    pub header_read: Duration,
    pub idle: Duration,
    pub write: Duration,
    pub drain: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_uri_bytes: usize,
    pub max_connections: usize,
    pub admin_max_connections: usize,
}

/// `cache.on_store_error`: what a cached key gets while the store is failing.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnStoreError {
    /// Cached keys keep passing within their TTL.
    #[default]
    ServeCached,
    /// Every key check answers 503.
    Deny,
}

/// An `http://host:port` or `https://host:port` upstream (no path, query or userinfo).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upstream {
    pub scheme: http::uri::Scheme,
    pub authority: http::uri::Authority,
}

impl Upstream {
    pub fn parse(s: &str) -> Result<Self, String> {
        let uri: http::Uri = s
            .parse()
            .map_err(|e| format!("invalid upstream URL {s:?}: {e}"))?;
        let scheme = uri
            .scheme()
            .cloned()
            .ok_or("upstream URL needs http:// or https://")?;
        if scheme != http::uri::Scheme::HTTP && scheme != http::uri::Scheme::HTTPS {
            return Err(format!(
                "upstream scheme {scheme} is not supported; use http:// or https://"
            ));
        }
        let authority = uri
            .authority()
            .cloned()
            .ok_or("upstream URL needs a host")?;
        if authority.as_str().contains('@') {
            return Err("upstream URL must not carry credentials".into());
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err("upstream URL must not have a path or query".into());
        }
        Ok(Upstream { scheme, authority })
    }
}

/// A validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub fixed: Fixed,
    pub live: Live,
}

/// Hot-reloadable: a reload swaps all of this at once.
#[derive(Debug, Clone)]
pub struct Live {
    /// Routes and header policy.
    pub policy: Arc<Policy>,
    pub cache: CacheRules,
    pub rate_limits: RateLimitRules,
}

/// `rate_limits`, the reloadable part.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RateLimitRules {
    /// `mode: exact`: one atomic store script per limited request.
    pub exact: bool,
    /// `on_store_error: deny`: 503 while the store cannot be asked.
    pub deny_on_store_error: bool,
    /// `RateLimit` headers on admitted answers.
    pub headers: bool,
}

/// How long cache entries are trusted, and what happens while the store fails.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CacheRules {
    pub ttl: Duration,
    pub negative_ttl: Duration,
    pub on_store_error: OnStoreError,
}

/// Needs a restart: these are read once, when listeners, clients and the store are built.
#[derive(Debug, Clone)]
pub struct Fixed {
    pub proxy_listen: SocketAddr,
    /// Proxy worker threads (`proxy.workers` resolved).
    pub proxy_workers: usize,
    pub admin_listen: SocketAddr,
    pub upstream: Upstream,
    /// Trusted CA file for an `https://` upstream (system roots when absent).
    pub upstream_ca: Option<PathBuf>,
    /// Certificate and key files of the proxy listener's TLS.
    pub tls: Option<(PathBuf, PathBuf)>,
    /// Certificate and key files of the admin listener's TLS.
    pub admin_tls: Option<(PathBuf, PathBuf)>,
    pub timeouts: Timeouts,
    pub limits: Limits,
    pub root_token: Option<SecretString>,
    pub default_tenant: String,
    pub store: StoreConfig,
    pub last_used_interval: Duration,
    /// `store.dormant_interval`: how often dormant keys are counted.
    pub dormant_interval: Duration,
    pub cache_max_entries: u64,
    pub prefixes: Prefixes,
    pub pepper: Option<SecretString>,
    /// `keys.legacy`: accepted formats of imported keys.
    pub legacy: crate::key::LegacyFormats,
    /// `rate_limits.sync_interval` (local mode).
    pub limit_sync_interval: Duration,
    /// The secret-scanning report listener; `None`: off.
    pub secret_scanning: Option<SecretScanning>,
}

impl Fixed {
    /// The fields that differ, named as in the YAML. `self` is destructured without `..`,
    /// so a field added to `Fixed` does not compile until it is compared here.
    pub fn changed(&self, other: &Fixed) -> Vec<&'static str> {
        let Fixed {
            proxy_listen,
            proxy_workers,
            admin_listen,
            upstream,
            upstream_ca,
            tls,
            admin_tls,
            timeouts,
            limits,
            root_token,
            default_tenant,
            store,
            last_used_interval,
            dormant_interval,
            cache_max_entries,
            prefixes,
            pepper,
            legacy,
            limit_sync_interval,
            secret_scanning,
        } = self;
        let o = other;
        let (proxy_limits, admin_max) = limits.differ(&o.limits);
        [
            ("proxy.listen", *proxy_listen != o.proxy_listen),
            ("proxy.workers", *proxy_workers != o.proxy_workers),
            ("admin.listen", *admin_listen != o.admin_listen),
            ("proxy.upstream", *upstream != o.upstream),
            ("proxy.upstream_ca", *upstream_ca != o.upstream_ca),
            ("proxy.tls", *tls != o.tls),
            ("admin.tls", *admin_tls != o.admin_tls),
            ("proxy.timeouts", *timeouts != o.timeouts),
            ("proxy.limits", proxy_limits),
            ("admin.max_connections", admin_max),
            ("admin.root_token", !same_secret(root_token, &o.root_token)),
            ("admin.default_tenant", *default_tenant != o.default_tenant),
            ("store", !same_store(store, &o.store)),
            (
                "store.last_used_interval",
                *last_used_interval != o.last_used_interval,
            ),
            (
                "store.dormant_interval",
                *dormant_interval != o.dormant_interval,
            ),
            (
                "cache.max_entries",
                *cache_max_entries != o.cache_max_entries,
            ),
            ("keys.prefixes", *prefixes != o.prefixes),
            ("keys.pepper_env", !same_secret(pepper, &o.pepper)),
            ("keys.legacy", *legacy != o.legacy),
            (
                "rate_limits.sync_interval",
                *limit_sync_interval != o.limit_sync_interval,
            ),
            ("secret_scanning", *secret_scanning != o.secret_scanning),
        ]
        .into_iter()
        .filter_map(|(name, changed)| changed.then_some(name))
        .collect()
    }
}

impl Limits {
    /// (any of `proxy.limits` differs, `admin.max_connections` differs)
    fn differ(&self, other: &Limits) -> (bool, bool) {
        let Limits {
            max_header_bytes,
            max_uri_bytes,
            max_connections,
            admin_max_connections,
        } = self;
        let proxy = *max_header_bytes != other.max_header_bytes
            || *max_uri_bytes != other.max_uri_bytes
            || *max_connections != other.max_connections;
        (proxy, *admin_max_connections != other.admin_max_connections)
    }
}

/// Compared by value, never printed.
fn same_secret(a: &Option<SecretString>, b: &Option<SecretString>) -> bool {
    match (a, b) {
        (None, None) => true,
        (Some(a), Some(b)) => a.expose_secret() == b.expose_secret(),
        _ => false,
    }
}

fn same_store(a: &StoreConfig, b: &StoreConfig) -> bool {
    match (a, b) {
        (StoreConfig::Memory, StoreConfig::Memory) => true,
        (StoreConfig::Redis(x), StoreConfig::Redis(y)) => x == y,
        _ => false,
    }
}

/// Where environment overrides come from (the process environment, or a map in tests).
pub trait Env {
    fn var(&self, name: &str) -> Option<String>;
}

pub struct ProcessEnv;

impl Env for ProcessEnv {
    fn var(&self, name: &str) -> Option<String> {
        std::env::var(name).ok().filter(|v| !v.is_empty())
    }
}

impl<const N: usize> Env for [(&str, &str); N] {
    fn var(&self, name: &str) -> Option<String> {
        self.as_slice().var(name)
    }
}

impl Env for &[(&str, &str)] {
    fn var(&self, name: &str) -> Option<String> {
        self.iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.to_string())
    }
}

impl Config {
    /// Read and validate a file, with overrides from the process environment.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let source = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            source: source.clone(),
            field: String::new(),
            line: None,
            message: format!("cannot read: {e}"),
        })?;
        Config::from_yaml(&text, &source, &ProcessEnv)
    }

    /// Parse and validate YAML text. `source` names it in errors.
    pub fn from_yaml(text: &str, source: &str, env: &dyn Env) -> Result<Config, ConfigError> {
        let refuse = |field: String, line, message| ConfigError {
            source: source.to_string(),
            field,
            line,
            message,
        };
        syntax::check(text).map_err(|e| refuse(String::new(), e.line, e.message))?;
        let de = serde_norway::Deserializer::from_str(text);
        let raw: RawConfig = serde_path_to_error::deserialize(de).map_err(|e| {
            let (field, line, message) = serde_refusal(text, e);
            refuse(field, line, message)
        })?;
        let (fixed, live) = sections::validate(raw, env).map_err(|e| match e.field {
            sections::Field::File(path) => {
                refuse(path.to_string(), locate::line_of(text, &path), e.message)
            }
            sections::Field::Outside(name) => refuse(name, None, e.message),
        })?;
        Ok(Config { fixed, live })
    }
}

/// A serde refusal as (field, line, message). serde_norway locates an error raised inside
/// the node it reads (a wrong type, an unknown key), but one raised by a field's own
/// parser, or a missing field, at the enclosing mapping; `locate` finds the node itself.
fn serde_refusal(
    text: &str,
    e: serde_path_to_error::Error<serde_norway::Error>,
) -> (String, Option<usize>, String) {
    let path = field_path(e.path());
    let unlocated = e.path().to_string();
    let inner = e.into_inner();
    let location = inner.location();
    let mut message = inner.to_string();
    // serde_norway adds ` at line L column C` and starts with the path it was reading.
    if let Some(l) = &location {
        let at = format!(" at line {} column {}", l.line(), l.column());
        if let Some(m) = message.strip_suffix(&at) {
            message = m.to_string();
        }
    }
    let Some(mut path) = path else {
        return (unlocated, location.map(|l| l.line()), message);
    };
    message = without_path_prefix(&path, message);
    let mut line = None;
    if let Some(name) = serde_says("missing field `", &message) {
        path = path.key(name);
        message = "required field is missing".into();
    } else if let Some(name) = serde_says("duplicate field `", &message) {
        path = path.key(name);
        line = locate::line_of_repeat(text, &path);
        message = "duplicate key: set it once".into();
    }
    let line = line
        .or_else(|| locate::line_of(text, &path))
        .or(location.map(|l| l.line()));
    (path.to_string(), line, message)
}

/// serde_path_to_error's path, or `None` if a step is not a plain key or index.
fn field_path(path: &serde_path_to_error::Path) -> Option<locate::FieldPath> {
    use serde_path_to_error::Segment;
    let mut out = locate::FieldPath::default();
    for segment in path.iter() {
        out = match segment {
            Segment::Seq { index } => out.index(*index),
            Segment::Map { key } => out.key(key),
            Segment::Enum { .. } | Segment::Unknown => return None,
        };
    }
    Some(out)
}

/// The message without the `path: ` serde_norway starts it with (the path of the mapping
/// it was in: `path` or one of its ancestors, indices from 0).
fn without_path_prefix(path: &locate::FieldPath, message: String) -> String {
    let mut steps = path.0.clone();
    while !steps.is_empty() {
        let prefix = format!("{}: ", locate::FieldPath(steps.clone()).zero_based());
        if let Some(rest) = message.strip_prefix(&prefix) {
            return rest.to_string();
        }
        steps.pop();
    }
    message
}

/// The field named by serde's own wording of a missing or repeated one: "missing field
/// `name`", "duplicate field `name`".
fn serde_says<'m>(prefix: &str, message: &'m str) -> Option<&'m str> {
    message.strip_prefix(prefix)?.strip_suffix('`')
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "
proxy:
  listen: 127.0.0.1:8080
  upstream: http://127.0.0.1:3000
store:
  memory: {}
routes:
  - { name: health, path: /healthz, auth: none }
  - { name: users, methods: [GET], path: \"/users/**\", scopes: [\"users:read\"] }
";

    fn load(text: &str) -> Result<Config, ConfigError> {
        Config::from_yaml(text, "test.yaml", &[("X", "Y")])
    }

    #[test]
    fn the_base_config_loads() {
        let c = load(BASE).unwrap();
        assert_eq!(c.live.policy.routes().len(), 2);
        assert_eq!(c.live.cache.ttl, Duration::from_secs(300));
        assert!(matches!(c.fixed.store, StoreConfig::Memory));
    }

    #[test]
    fn rate_limits_load_and_bad_ones_name_their_field() {
        let limited = BASE.replace(
            "scopes: [\"users:read\"] }",
            "scopes: [\"users:read\"], cost: 5, rate_limits: [{ name: per-key, limit: 100, \
             window: 1s }, { name: per-tenant, limit: 1000, window: 1m, by: tenant }] }",
        );
        let c = load(&format!("{limited}rate_limits: {{ mode: exact }}\n")).unwrap();
        let route = &c.live.policy.routes()[1];
        assert_eq!(route.cost, 5);
        assert_eq!(route.rate_limits.len(), 2);
        assert_eq!(route.rate_limits[1].by, crate::policy::LimitBy::Tenant);
        assert_eq!(route.rate_limits[1].window_ms, 60_000);
        assert!(c.live.rate_limits.exact && c.live.rate_limits.headers);
        assert_eq!(c.fixed.limit_sync_interval, Duration::from_millis(50));
        let cases = [
            (
                "window: 1s }",
                "window: 1500ms }",
                "routes[2].rate_limits[1].window",
            ),
            (
                "name: per-tenant",
                "name: per-key",
                "routes[2].rate_limits[2].name",
            ),
            (
                "name: per-key",
                "name: credits",
                "routes[2].rate_limits[1].name",
            ),
            (
                "name: per-key",
                "name: Per Key",
                "routes[2].rate_limits[1].name",
            ),
            ("limit: 100,", "limit: 0,", "routes[2].rate_limits[1].limit"),
            ("cost: 5", "cost: 1000001", "routes[2].cost"),
            ("auth: none }", "auth: none, cost: 1 }", "routes[1].cost"),
        ];
        for (from, to, field) in cases {
            let e = load(&limited.replacen(from, to, 1)).unwrap_err();
            assert_eq!(e.field, field, "{e}");
            assert!(e.line.is_some(), "{e}");
        }
        let e = load(&format!("{BASE}rate_limits: {{ sync_interval: 1ms }}\n")).unwrap_err();
        assert_eq!(e.field, "rate_limits.sync_interval", "{e}");
        let e = load(&format!("{BASE}rate_limits: {{ mode: fast }}\n")).unwrap_err();
        assert_eq!(e.field, "rate_limits.mode", "{e}");
    }

    /// No identity header may take a name the proxy strips from clients: the upstream
    /// would read the tenant or scopes as a method override, a client address or
    /// keygate's own rate-limit mark.
    #[test]
    fn identity_headers_take_no_name_the_proxy_strips() {
        for name in [
            "x-keygate-ratelimit",
            "x-http-method-override",
            "x-real-ip",
            "host",
            "x_http_method_override",
            "x_keygate_ratelimit",
            "true_client_ip",
            "proxy-authorization",
            "http2-settings",
        ] {
            let text = BASE.replace(
                "  upstream: http://127.0.0.1:3000",
                &format!(
                    "  upstream: http://127.0.0.1:3000\n  identity_headers: {{ tenant: {name} }}"
                ),
            );
            let e = load(&text).unwrap_err();
            assert_eq!(e.field, "proxy.identity_headers.tenant", "{name}: {e}");
            assert!(e.message.contains("reserved"), "{name}: {e}");
        }
        let ok = BASE.replace(
            "  upstream: http://127.0.0.1:3000",
            "  upstream: http://127.0.0.1:3000\n  identity_headers: { tenant: x-tenant }",
        );
        load(&ok).expect("a name of its own");
    }

    #[test]
    fn errors_name_field_and_line() {
        let e = load(&BASE.replace(
            "listen: 127.0.0.1:8080",
            "listen: 127.0.0.1:8080\n  lisen: x",
        ))
        .unwrap_err();
        assert_eq!(e.line, Some(4), "{e}");
        assert!(e.message.contains("unknown field `lisen`"), "{e}");

        let e = load(&format!("{BASE}cache: {{ ttl: 5 parsecs }}\n")).unwrap_err();
        assert_eq!(e.field, "cache.ttl", "{e}");
        assert_eq!(e.line, Some(10), "{e}");
        assert!(
            e.to_string().starts_with("test.yaml:10: field `cache.ttl`"),
            "{e}"
        );

        // `M` is humantime's month: refused, with `m` named, in any spelling of a month.
        for month in ["1M", "2 months", "1month 2d"] {
            let e = load(&format!("{BASE}cache: {{ ttl: {month} }}\n")).unwrap_err();
            assert_eq!(e.field, "cache.ttl", "{e}");
            assert!(e.message.contains("`m` is minutes"), "{month}: {e}");
        }
        load(&format!("{BASE}cache: {{ ttl: 1m }}\n")).expect("minutes");

        // Indices count from 1, like `check-config`'s table: the second route's first scope.
        let e = load(&BASE.replace("users:read", "Users Read")).unwrap_err();
        assert_eq!(e.field, "routes[2].scopes[1]", "{e}");

        let e = load(&BASE.replace("\"/users/**\"", "\"/users/**/x\"")).unwrap_err();
        assert_eq!(e.field, "routes[2].path", "{e}");

        let e = load(&BASE.replace("memory: {}", "memory: {}\n  redis: { url: redis://x }"))
            .unwrap_err();
        assert_eq!(e.field, "store", "{e}");

        let e = load(&BASE.replace("name: users", "name: health")).unwrap_err();
        assert!(e.field.starts_with("routes[2].name"), "{e}");

        let e = load(&format!("{BASE}admin: {{ listen: 127.0.0.1:8080 }}\n")).unwrap_err();
        assert_eq!(e.field, "admin.listen", "{e}");
    }

    /// A config in block style, so that every field has a line of its own.
    const BLOCK: &str = "\
proxy:
  listen: 127.0.0.1:8080
  upstream: http://127.0.0.1:3000
  timeouts:
    idle: 60s
store:
  redis:
    url: redis://127.0.0.1:6379
    namespace: keygate
    timeout: 250ms
routes:
  - name: health
    path: /healthz
    auth: none
  - name: users
    path: /users/**
    scopes:
      - users:read
";

    /// `BLOCK` with `from` replaced by `to`, refused: (line, field, message).
    fn refusal(from: &str, to: &str) -> (Option<usize>, String, String) {
        assert!(BLOCK.contains(from), "{from:?}");
        let e = load(&BLOCK.replacen(from, to, 1)).unwrap_err();
        // Named once: serde_norway's messages start with the path it was reading.
        let top = e.field.split(['.', '[']).next().unwrap();
        assert!(
            !e.message.contains(&e.field) && !e.message.starts_with(top),
            "the field is named twice: {e}"
        );
        (e.line, e.field, e.message)
    }

    #[test]
    fn a_bad_value_names_the_line_of_the_value() {
        assert!(load(BLOCK).is_ok());
        let cases = [
            // Refused by a field's own parser (serde): the value's line, not its mapping's.
            (
                "timeout: 250ms",
                "timeout: 5 parsecs",
                10,
                "store.redis.timeout",
            ),
            ("upstream: http:", "upstream: ftp:", 3, "proxy.upstream"),
            ("path: /users/**", "path: /users/**/x", 16, "routes[2].path"),
            ("- users:read", "- Users Read", 18, "routes[2].scopes[1]"),
            // Refused after parsing (`sections`): located the same way.
            ("idle: 60s", "idle: 0s", 5, "proxy.timeouts.idle"),
            (
                "namespace: keygate",
                "namespace: bad ns",
                9,
                "store.redis.namespace",
            ),
            ("name: users", "name: health", 15, "routes[2].name"),
            ("name: health", "name: unmatched", 12, "routes[1].name"),
            (
                "auth: none",
                "auth: none\n    scopes: [a]",
                15,
                "routes[1].scopes",
            ),
            // A mapping is named by its key's line (a block mapping starts a line later).
            ("  redis:", "  memory: {}\n  redis:", 6, "store"),
            // A key nothing expects, or one written twice: its own line.
            ("  listen:", "  lisen: x\n  listen:", 2, "proxy.lisen"),
            (
                "  upstream:",
                "  listen: :1\n  upstream:",
                3,
                "proxy.listen",
            ),
        ];
        for (from, to, line, field) in cases {
            let (l, f, m) = refusal(from, to);
            assert_eq!((l, f.as_str()), (Some(line), field), "{from} -> {to}: {m}");
        }
    }

    #[test]
    fn a_missing_field_names_the_line_of_the_mapping_that_lacks_it() {
        let (line, field, message) = refusal("  upstream: http://127.0.0.1:3000\n", "");
        assert_eq!((line, field.as_str()), (Some(1), "proxy.upstream"));
        assert_eq!(message, "required field is missing");
        // In a list, the line of the element that lacks it.
        let (line, field, _) = refusal("    path: /users/**\n", "");
        assert_eq!((line, field.as_str()), (Some(15), "routes[2].path"));
        // A default that a check refuses: the line of the mapping it would be written in.
        let (line, field, _) = refusal("  timeouts:\n", "  timeouts:\n    upstream: 0s\n");
        assert_eq!((line, field.as_str()), (Some(5), "proxy.timeouts.upstream"));
        let text = format!("{BLOCK}cache:\n  ttl: 1s\n");
        let e = load(&text).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (Some(19), "cache.negative_ttl"));
        // A top-level field: the line the document's mapping starts on.
        let no_proxy = BLOCK.split_once("store:").unwrap().1;
        let e = load(&format!("# no proxy\nstore:{no_proxy}")).unwrap_err();
        assert_eq!((e.line, e.field.as_str()), (Some(2), "proxy"), "{e}");
    }

    #[test]
    fn a_value_from_the_environment_has_no_line() {
        let e = Config::from_yaml(BLOCK, "t", &[("KEYGATE_UPSTREAM", "ftp://x")]).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (None, "KEYGATE_UPSTREAM"),
            "{e}"
        );
        let e = Config::from_yaml(BLOCK, "t", &[("KEYGATE_REDIS_URL", "http://x")]).unwrap_err();
        assert_eq!(
            (e.line, e.field.as_str()),
            (None, "KEYGATE_REDIS_URL"),
            "{e}"
        );
    }

    #[test]
    fn yaml_syntax_errors_are_said_in_yaml_terms() {
        let syntax = |from: &str, to: &str| {
            let e = load(&BLOCK.replacen(from, to, 1)).unwrap_err();
            assert_eq!(e.field, "", "{e}");
            (e.line, e.message)
        };
        let tab = "tab character used for indentation; YAML indents with spaces".to_string();
        assert_eq!(syntax("  upstream:", "\tupstream:"), (Some(3), tab.clone()));
        assert_eq!(
            syntax("proxy:\n  listen:", "proxy:\n\tlisten:"),
            (Some(2), tab)
        );
        // An unclosed `{` is named where it opens, however far away libyaml gives up.
        let (line, message) = syntax("  redis:\n", "  redis: {\n");
        assert_eq!(line, Some(7), "{message}");
        assert!(
            message.starts_with("YAML syntax: the `{` opened on this line is still open"),
            "{message}"
        );
        let (line, message) = syntax("    scopes:\n", "    scopes: [users:read\n");
        assert_eq!(line, Some(17), "{message}");
        assert!(message.contains("`[` opened on this line"), "{message}");
        let (line, message) = syntax("namespace: keygate", "namespace: \"keygate");
        assert_eq!(line, Some(9), "{message}");
        assert!(
            message.contains("quoted string opened on this line"),
            "{message}"
        );
        let (line, message) = syntax("  listen: 127.0.0.1:8080", "  listen: a: b");
        assert_eq!(line, Some(2), "{message}");
        assert_eq!(
            message,
            "YAML syntax: mapping values are not allowed in this context"
        );
    }

    #[test]
    fn proxy_workers_are_auto_or_a_sane_count() {
        let with = |v: &str| {
            load(&BASE.replace(
                "listen: 127.0.0.1:8080",
                &format!("listen: 127.0.0.1:8080\n  workers: {v}"),
            ))
        };
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(load(BASE).unwrap().fixed.proxy_workers, cpus);
        assert_eq!(with("auto").unwrap().fixed.proxy_workers, cpus);
        assert_eq!(with("3").unwrap().fixed.proxy_workers, 3);
        for bad in ["0", "-1", "5000", "lots", "1.5"] {
            let e = with(bad).unwrap_err();
            assert_eq!(e.field, "proxy.workers", "{bad}: {e}");
            assert_eq!(e.line, Some(4), "{bad}: {e}");
        }
    }

    #[test]
    fn environment_overrides() {
        let text = BASE.replace("memory: {}", "redis: { url: \"redis://127.0.0.1:1/0\" }");
        let c = Config::from_yaml(
            &text,
            "t",
            &[
                ("KEYGATE_REDIS_URL", "redis://10.0.0.1:6380/2"),
                ("KEYGATE_ROOT_TOKEN", "0123456789abcdef0123"),
            ],
        )
        .unwrap();
        match c.fixed.store {
            StoreConfig::Redis(r) => assert_eq!(
                r.mode,
                crate::store::redis::Mode::Standalone {
                    url: "redis://10.0.0.1:6380/2".into()
                }
            ),
            StoreConfig::Memory => panic!("expected redis"),
        }
        assert_eq!(
            c.fixed.root_token.unwrap().expose_secret(),
            "0123456789abcdef0123"
        );
        let e = Config::from_yaml(BASE, "t", &[("KEYGATE_ROOT_TOKEN", "short")]).unwrap_err();
        assert_eq!(e.field, "admin.root_token");
    }

    /// `store.redis`: exactly one of url/sentinel/cluster, the environment replacing the
    /// file's mode, and `min_replicas_ack` defaulting by mode.
    #[test]
    fn redis_modes_and_replica_acknowledgement() {
        use crate::store::redis::Mode;
        let with = |redis: &str| BASE.replace("memory: {}", &format!("redis:\n    {redis}"));
        let settings = |text: &str, env: &[(&str, &str)]| match Config::from_yaml(text, "t", &env)
            .unwrap()
            .fixed
            .store
        {
            StoreConfig::Redis(r) => r,
            StoreConfig::Memory => panic!("expected redis"),
        };
        let sentinel = with(
            "sentinel: { master_name: mymaster, nodes: [\"10.0.0.1:26379\", \"10.0.0.2:26379\"], password_env: RP }",
        );
        let r = settings(&sentinel, &[("RP", "s3cret")]);
        let Mode::Sentinel(s) = &r.mode else {
            panic!("{:?}", r.mode)
        };
        assert_eq!((s.master_name.as_str(), s.nodes.len()), ("mymaster", 2));
        assert_eq!(s.password.as_deref(), Some("s3cret"));
        assert_eq!(
            (r.min_replicas_ack, r.ack_timeout),
            (1, Duration::from_millis(500))
        );
        assert!(
            !format!("{:?}", r.mode).contains("s3cret"),
            "the password shows"
        );
        let e = Config::from_yaml(&sentinel, "t", &[("X", "Y")]).unwrap_err();
        assert_eq!(e.field, "store.redis.sentinel.password_env", "{e}");
        assert!(e.message.contains("RP"), "{e}");

        let standalone = with("url: redis://10.0.0.1:6379/0");
        assert_eq!(settings(&standalone, &[]).min_replicas_ack, 0);
        let cluster = with("cluster: { nodes: [\"redis://10.0.0.1:7000\"] }\n    min_replicas_ack: 2\n    ack_timeout: 1s");
        let r = settings(&cluster, &[]);
        assert!(matches!(r.mode, Mode::Cluster { ref nodes } if nodes.len() == 1));
        assert_eq!(
            (r.min_replicas_ack, r.ack_timeout),
            (2, Duration::from_secs(1))
        );

        // The environment picks the mode.
        let r = settings(
            &standalone,
            &[
                ("KEYGATE_REDIS_SENTINEL_NODES", "10.0.0.9:26379"),
                ("KEYGATE_REDIS_SENTINEL_MASTER", "m"),
            ],
        );
        assert!(matches!(r.mode, Mode::Sentinel(ref s) if s.master_name == "m"));
        let r = settings(
            &standalone,
            &[(
                "KEYGATE_REDIS_CLUSTER_NODES",
                "redis://a:7000, redis://b:7000",
            )],
        );
        assert!(matches!(r.mode, Mode::Cluster { ref nodes } if nodes.len() == 2));

        for (text, field) in [
            (
                with("url: redis://a\n    cluster: { nodes: [\"redis://b\"] }"),
                "store.redis.cluster",
            ),
            (with("namespace: x"), "store.redis"),
            (
                with("sentinel: { master_name: m, nodes: [\"nohost\"] }"),
                "store.redis.sentinel.nodes[1]",
            ),
            (
                with("sentinel: { master_name: m, nodes: [] }"),
                "store.redis.sentinel.nodes",
            ),
            (
                with("cluster: { nodes: [\"http://b\"] }"),
                "store.redis.cluster.nodes[1]",
            ),
            (
                with("url: redis://a\n    min_replicas_ack: 99"),
                "store.redis.min_replicas_ack",
            ),
            (
                with("url: redis://a\n    ack_timeout: 0s"),
                "store.redis.ack_timeout",
            ),
            (
                with("url: redis://a\n    ack_timeout: 500us"),
                "store.redis.ack_timeout",
            ),
        ] {
            let e = load(&text).unwrap_err();
            assert_eq!(e.field, field, "{text}: {e}");
        }
        let e = Config::from_yaml(
            &standalone,
            "t",
            &[
                ("KEYGATE_REDIS_URL", "redis://a"),
                ("KEYGATE_REDIS_CLUSTER_NODES", "redis://b"),
            ],
        )
        .unwrap_err();
        assert!(e.message.contains("only one"), "{e}");
    }

    /// `keys.pepper_env` defaults to KEYGATE_PEPPER in a `keys:` section; without one a
    /// set KEYGATE_PEPPER is refused (0.1 ignored it there), never silently dropped.
    #[test]
    fn the_pepper_is_used_as_documented_or_refused() {
        let pepper = [("KEYGATE_PEPPER", "pepper-pepper")];
        let with = |keys: &str| format!("{BASE}keys: {keys}\n");
        let used = Config::from_yaml(&with("{}"), "t", &pepper).unwrap();
        assert!(used.fixed.pepper.is_some());
        let none = Config::from_yaml(&with("{ pepper_env: \"\" }"), "t", &pepper).unwrap();
        assert!(none.fixed.pepper.is_none());
        let e = Config::from_yaml(BASE, "t.yaml", &pepper).unwrap_err();
        assert_eq!((e.field.as_str(), e.line), ("keys", Some(2)), "{e}");
        assert!(e.message.contains("no `keys:` section"), "{e}");
        assert!(load(BASE).unwrap().fixed.pepper.is_none());
    }

    /// `keys.legacy`: formats load as written; each mistake names the entry's field and line.
    #[test]
    fn legacy_formats_are_validated_with_their_line() {
        let with = |legacy: &str| format!("{BASE}keys:\n  legacy:\n{legacy}");
        let ok = with(
            "    - { name: acme, prefix: acme_, min_length: 37, max_length: 37, charset: hex }\n    \
             - { name: any, min_length: 16, max_length: 512, charset: token68 }\n",
        );
        let c = load(&ok).unwrap();
        let acme = c
            .fixed
            .legacy
            .find(&format!("acme_{}", "0".repeat(32)))
            .unwrap();
        assert_eq!(
            (acme.name.as_str(), acme.charset),
            ("acme", crate::key::Charset::Hex)
        );
        assert_eq!(
            c.fixed.legacy.find("any+token/oflength16==").unwrap().name,
            "any"
        );
        assert!(load(BASE).unwrap().fixed.legacy.is_empty());
        let line = |entry: &str| {
            with(&format!("    - {{ name: ok, min_length: 16, max_length: 20, charset: hex }}\n    - {entry}\n"))
        };
        for (entry, field, said) in [
            ("{ name: Bad, min_length: 16, max_length: 20, charset: hex }", "keys.legacy[2].name", "a-z"),
            ("{ name: ok, min_length: 16, max_length: 20, charset: hex }", "keys.legacy[2].name", "twice"),
            ("{ name: b, min_length: 15, max_length: 20, charset: hex }", "keys.legacy[2].min_length", "at least 16"),
            ("{ name: b, prefix: \"abcdefghijklmnopq\", min_length: 16, max_length: 20, charset: hex }", "keys.legacy[2].min_length", "prefix"),
            ("{ name: b, min_length: 16, max_length: 513, charset: hex }", "keys.legacy[2].max_length", "512"),
            ("{ name: b, min_length: 20, max_length: 19, charset: hex }", "keys.legacy[2].max_length", "min_length"),
            ("{ name: b, prefix: sk_live_x, min_length: 16, max_length: 20, charset: hex }", "keys.legacy[2].prefix", "keys.prefixes"),
            ("{ name: b, prefix: \"a b\", min_length: 16, max_length: 20, charset: hex }", "keys.legacy[2].prefix", "visible"),
            ("{ name: b, min_length: 16, max_length: 20, charset: base64 }", "keys.legacy[2].charset", "base64url"),
            ("{ name: b, min_length: 16, max_length: 20 }", "keys.legacy[2].charset", "missing"),
        ] {
            let e = load(&line(entry)).unwrap_err();
            assert_eq!((e.field.as_str(), e.line), (field, Some(13)), "{entry}: {e}");
            assert!(e.message.contains(said), "{entry}: {e}");
            assert!(e.to_string().starts_with("test.yaml"), "{e}");
        }
    }

    #[test]
    fn a_reload_names_the_fields_that_need_a_restart() {
        let text = format!("{BASE}keys: {{ pepper_env: KEYGATE_PEPPER }}\n");
        let a = Config::from_yaml(&text, "t", &[("KEYGATE_PEPPER", "pepper-one")]).unwrap();
        assert_eq!(a.fixed.changed(&a.fixed), Vec::<&str>::new());
        let text = text
            .replace("127.0.0.1:8080", "127.0.0.1:8081")
            .replace("users:read", "users:write");
        let b = Config::from_yaml(&text, "t", &[("KEYGATE_PEPPER", "pepper-two")]).unwrap();
        // Routes are live: only the listener and the pepper are reported.
        assert_eq!(
            a.fixed.changed(&b.fixed),
            ["proxy.listen", "keys.pepper_env"]
        );
    }

    #[test]
    fn shipped_configs_are_valid() {
        for f in ["config/keygate.yaml", "config/dev.yaml"] {
            let text =
                std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/").to_string() + f)
                    .unwrap();
            Config::from_yaml(&text, f, &[("X", "Y")]).unwrap_or_else(|e| panic!("{e}"));
        }
    }
}

/// Property tests: a config file is operator input, but a mangled one (a bad merge, a
/// template gone wrong) must be an error with a message, never a panic.
#[cfg(test)]
mod props {
    use super::*;
    use proptest::prelude::*;

    const SHIPPED: &str = include_str!("../../config/keygate.yaml");
    const ENV: [(&str, &str); 2] = [
        ("KEYGATE_ROOT_TOKEN", "0123456789abcdef0123"),
        ("KEYGATE_PEPPER", "pepper-pepper-pepper"),
    ];

    /// YAML syntax, values at and past the edges of what fields accept, and config words.
    const TOKENS: &[&str] = &[
        ": ",
        "- ",
        "{",
        "}",
        "[",
        "]",
        "\"",
        "'",
        "#",
        "\n",
        "  ",
        ",",
        "0",
        "-1",
        "65536",
        "18446744073709551616",
        "1ms",
        "0s",
        "5 parsecs",
        "null",
        "~",
        "true",
        "&a ",
        "*a",
        "<<: *a",
        "!!binary ",
        "/**",
        "/a;b",
        "/%2e",
        "..",
        "*",
        "users:read",
        "Users Read",
        "redis://",
        "memory: {}",
        "redis: {}",
        "auth: none",
        "scopes: []",
        "methods: []",
        "unmatched: require_key",
        "é",
        "\t",
        "\u{0}",
        "0.0.0.0:0",
        "[::1]:99999",
        "x-keygate-key-id",
        "authorization",
        "host",
        "workers: 0",
        "max_body_bytes: ",
    ];

    #[derive(Debug, Clone)]
    enum Edit {
        Delete(prop::sample::Index, usize),
        Insert(prop::sample::Index, &'static str),
        ReplaceLine(prop::sample::Index, &'static str),
        DuplicateLine(prop::sample::Index),
        SwapLines(prop::sample::Index, prop::sample::Index),
    }

    fn edit() -> impl Strategy<Value = Edit> {
        let token = prop::sample::select(TOKENS);
        prop_oneof![
            (any::<prop::sample::Index>(), 1..40usize).prop_map(|(i, n)| Edit::Delete(i, n)),
            (any::<prop::sample::Index>(), token.clone()).prop_map(|(i, t)| Edit::Insert(i, t)),
            (any::<prop::sample::Index>(), token).prop_map(|(i, t)| Edit::ReplaceLine(i, t)),
            any::<prop::sample::Index>().prop_map(Edit::DuplicateLine),
            (any::<prop::sample::Index>(), any::<prop::sample::Index>())
                .prop_map(|(a, b)| Edit::SwapLines(a, b)),
        ]
    }

    fn apply(text: &str, edit: &Edit) -> String {
        let mut chars: Vec<char> = text.chars().collect();
        let mut lines: Vec<&str> = text.lines().collect();
        match edit {
            Edit::Delete(at, n) => {
                let i = at.index(chars.len() + 1);
                chars.drain(i..(i + n).min(chars.len()));
            }
            Edit::Insert(at, t) => {
                let i = at.index(chars.len() + 1);
                chars.splice(i..i, t.chars());
            }
            Edit::ReplaceLine(at, t) if !lines.is_empty() => {
                let i = at.index(lines.len());
                lines[i] = t;
                return lines.join("\n");
            }
            Edit::DuplicateLine(at) if !lines.is_empty() => {
                let i = at.index(lines.len());
                lines.insert(i, lines[i]);
                return lines.join("\n");
            }
            Edit::SwapLines(a, b) if !lines.is_empty() => {
                let (a, b) = (a.index(lines.len()), b.index(lines.len()));
                lines.swap(a, b);
                return lines.join("\n");
            }
            _ => {}
        }
        chars.into_iter().collect()
    }

    fn check(text: &str) -> Result<(), TestCaseError> {
        if let Err(e) = Config::from_yaml(text, "fuzz.yaml", &ENV) {
            prop_assert!(!e.message.trim().is_empty(), "no message: {:?}", e);
            prop_assert!(e.to_string().starts_with("fuzz.yaml"), "{}", e);
            // A line, when given, is one of the file's (or the one after its last).
            let lines = text.split('\n').count();
            prop_assert!(e.line.is_none_or(|l| (1..=lines + 1).contains(&l)), "{}", e);
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(3000))]

        #[test]
        fn a_mangled_shipped_config_loads_or_says_why(
            edits in prop::collection::vec(edit(), 1..5)
        ) {
            let text = edits.iter().fold(SHIPPED.to_string(), |t, e| apply(&t, e));
            check(&text)?;
        }

        #[test]
        fn arbitrary_text_loads_or_says_why(
            text in prop_oneof![
                any::<String>(),
                prop::collection::vec(prop::sample::select(TOKENS), 0..30).prop_map(|t| t.concat()),
            ]
        ) {
            check(&text)?;
        }
    }
}
