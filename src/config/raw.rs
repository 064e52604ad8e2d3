//! The YAML file as written: serde structs, strict (unknown fields refused), one doc
//! comment per field. `super` validates them into the typed `Config`.

use super::{OnStoreError, Upstream};
use crate::policy::path::PathPattern;
use serde::de::{self, Deserializer};
use serde::Deserialize;
use std::net::SocketAddr;
use std::time::Duration;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawConfig {
    /// The proxy listener and what it forwards to.
    pub proxy: RawProxy,
    /// The admin listener (key management, health, metrics).
    #[serde(default)]
    pub admin: RawAdmin,
    /// Where key records live.
    pub store: RawStore,
    /// The in-process cache in front of the store.
    #[serde(default)]
    pub cache: RawCache,
    /// Key text format and the pepper. Absent and present-but-empty differ: see
    /// `sections::keys`.
    #[serde(default)]
    pub keys: Option<RawKeys>,
    /// Ordered route list: the first match wins.
    #[serde(default)]
    pub routes: Vec<RawRoute>,
    /// What to do with a request no route matches: `deny` (404) or `require_key`.
    #[serde(default)]
    pub unmatched: Unmatched,
    /// How rate limits and credits are counted.
    #[serde(default)]
    pub rate_limits: RawRateLimits,
    /// The listener for secret scanners' reports of leaked keys; off when absent.
    #[serde(default)]
    pub secret_scanning: Option<RawSecretScanning>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRateLimits {
    /// `local` (default: decided in this process, counts exchanged with the store every
    /// `sync_interval`) or `exact` (one atomic store script per limited request).
    #[serde(default)]
    pub mode: LimitMode,
    /// `local` mode: how often counts are exchanged with the store.
    #[serde(default = "default_sync_interval")]
    pub sync_interval: HumanDuration,
    /// While the store cannot be asked: `allow` (admit, mark the request to the upstream
    /// with `x-keygate-ratelimit: unchecked`, count it) or `deny` (503).
    #[serde(default)]
    pub on_store_error: LimitOnStoreError,
    /// `RateLimit-Policy` and `RateLimit` headers on admitted answers (refusals always
    /// carry them).
    #[serde(default = "yes")]
    pub headers: bool,
}

impl Default for RawRateLimits {
    fn default() -> Self {
        RawRateLimits {
            mode: LimitMode::default(),
            sync_interval: default_sync_interval(),
            on_store_error: LimitOnStoreError::default(),
            headers: true,
        }
    }
}

fn default_sync_interval() -> HumanDuration {
    HumanDuration(Duration::from_millis(50))
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LimitMode {
    #[default]
    Local,
    Exact,
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LimitOnStoreError {
    #[default]
    Allow,
    Deny,
}

/// A route's rate limit as written.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRouteLimit {
    /// A metric label and the `RateLimit` headers' policy name: 1-32 of a-z 0-9 _ . -
    pub name: String,
    pub limit: u64,
    /// Whole seconds, 1s to 366d.
    pub window: HumanDuration,
    /// `key` (default: each key's requests) or `tenant` (all keys of a tenant together).
    #[serde(default)]
    pub by: RawLimitBy,
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum RawLimitBy {
    #[default]
    Key,
    Tenant,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawProxy {
    /// Address the proxy listens on, e.g. `0.0.0.0:8080`.
    pub listen: SocketAddr,
    /// The application, e.g. `http://127.0.0.1:3000` (or `https://`).
    pub upstream: Upstream,
    /// For an `https://` upstream: PEM CA certificate(s) to trust instead of the system
    /// store.
    #[serde(default)]
    pub upstream_ca: Option<String>,
    /// Serve TLS on the proxy listener with this PEM certificate chain and key
    /// (reloaded when the files change).
    #[serde(default)]
    pub tls: Option<RawTls>,
    /// Log one line per request (method, route, status, decision, key id, tenant,
    /// duration; never a path or a key). Default on.
    #[serde(default = "yes")]
    pub access_log: bool,
    /// Pass the client's `Authorization` header to the upstream (default: strip it).
    #[serde(default)]
    pub forward_authorization: bool,
    /// Names of the identity headers keygate sets (and strips when a client sends them).
    #[serde(default)]
    pub identity_headers: RawIdentityHeaders,
    /// Peers (IPs or CIDRs) whose `X-Forwarded-*` and `Forwarded` headers are kept and
    /// extended; from anyone else they are overwritten or removed.
    #[serde(default)]
    pub trusted_proxies: Vec<IpNet>,
    /// Client headers with `_` in the name: `drop` (default: CGI, WSGI, Rack and PHP
    /// read `x_keygate_tenant` as `x-keygate-tenant`) or `keep` (only those that would
    /// read as a header keygate sets or strips are dropped).
    #[serde(default)]
    pub underscore_headers: UnderscoreHeaders,
    /// `Upgrade` protocols tunnelled after the upstream answers 101 (default
    /// `[websocket]`); any other offer is removed. `h2c` is never allowed.
    #[serde(default = "default_upgrades")]
    pub upgrades: Vec<String>,
    /// `Deprecation` and `Sunset` on every answer to a key in a rotation's grace period,
    /// `Sunset` on every answer to a key expiring within `sunset_window`. Default on.
    #[serde(default = "yes")]
    pub key_lifecycle_headers: bool,
    /// How far ahead an expiry is announced with `Sunset` (default `7d`, at most `366d`).
    #[serde(default = "default_sunset_window")]
    pub sunset_window: HumanDuration,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: RawTimeouts,
    /// Size and connection limits.
    #[serde(default)]
    pub limits: RawLimits,
    /// Proxy worker threads, each an event loop serving the connections handed to it with
    /// its own upstream connections: `auto` (the CPUs this process may use, cgroup quota
    /// included) or a number.
    #[serde(default)]
    pub workers: Workers,
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum UnderscoreHeaders {
    #[default]
    Drop,
    Keep,
}

fn default_sunset_window() -> HumanDuration {
    HumanDuration(Duration::from_secs(7 * 86_400))
}

fn default_upgrades() -> Vec<String> {
    vec!["websocket".into()]
}

/// `proxy.workers`: `auto` or a count from 1 to 1024.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Workers {
    #[default]
    Auto,
    Count(usize),
}

impl Workers {
    /// The thread count: `auto` is what `std::thread::available_parallelism` reports
    /// (on Linux it honours the cgroup CPU quota and the affinity mask).
    pub fn resolve(self) -> usize {
        match self {
            Workers::Count(n) => n,
            Workers::Auto => std::thread::available_parallelism().map_or(1, |n| n.get()),
        }
    }
}

impl<'de> Deserialize<'de> for Workers {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = Workers;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("`auto` or a number of threads from 1 to 1024")
            }
            fn visit_u64<E: de::Error>(self, n: u64) -> Result<Workers, E> {
                match n {
                    1..=1024 => Ok(Workers::Count(n as usize)),
                    _ => Err(E::custom(format!(
                        "{n} worker threads: expected `auto` or 1 to 1024"
                    ))),
                }
            }
            fn visit_i64<E: de::Error>(self, n: i64) -> Result<Workers, E> {
                match u64::try_from(n) {
                    Ok(n) => self.visit_u64(n),
                    Err(_) => Err(E::custom(format!(
                        "{n} worker threads: expected `auto` or 1 to 1024"
                    ))),
                }
            }
            fn visit_str<E: de::Error>(self, s: &str) -> Result<Workers, E> {
                match s {
                    "auto" => Ok(Workers::Auto),
                    _ => Err(E::custom(format!(
                        "`{s}`: expected `auto` or a number of threads from 1 to 1024"
                    ))),
                }
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    /// PEM certificate chain, leaf first.
    pub cert: String,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub key: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawIdentityHeaders {
    pub key_id: HeaderName,
    pub tenant: HeaderName,
    pub scopes: HeaderName,
    pub key_type: HeaderName,
}

impl Default for RawIdentityHeaders {
    fn default() -> Self {
        let h = |s: &'static str| HeaderName(http::HeaderName::from_static(s));
        RawIdentityHeaders {
            key_id: h("x-keygate-key-id"),
            tenant: h("x-keygate-tenant"),
            scopes: h("x-keygate-scopes"),
            key_type: h("x-keygate-key-type"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawTimeouts {
    /// From sending the request upstream to its response head (504 after).
    pub upstream: HumanDuration,
    /// For a client to send a complete request head.
    pub header_read: HumanDuration,
    /// A connection with no request in progress is closed after this (HTTP/2: GOAWAY).
    pub idle: HumanDuration,
    /// A response write that makes no progress for this long (the client stopped
    /// reading) closes the connection.
    pub write: HumanDuration,
    /// At shutdown, how long in-flight requests may take to finish.
    pub drain: HumanDuration,
}

impl Default for RawTimeouts {
    fn default() -> Self {
        RawTimeouts {
            upstream: HumanDuration(Duration::from_secs(30)),
            header_read: HumanDuration(Duration::from_secs(10)),
            idle: HumanDuration(Duration::from_secs(60)),
            write: HumanDuration(Duration::from_secs(30)),
            drain: HumanDuration(Duration::from_secs(10)),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawLimits {
    /// Largest request head in bytes (431 beyond).
    pub max_header_bytes: usize,
    /// Longest request target in bytes (414 beyond).
    pub max_uri_bytes: usize,
    /// Default largest request body in bytes (413 beyond); routes may override. 0 = no limit.
    pub max_body_bytes: u64,
    /// Open client connections at most; further connections wait in the accept backlog.
    pub max_connections: usize,
}

impl Default for RawLimits {
    fn default() -> Self {
        RawLimits {
            max_header_bytes: 65536,
            max_uri_bytes: 8192,
            max_body_bytes: 0,
            max_connections: 10_000,
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAdmin {
    /// Address of the admin API; loopback by default. Must differ from the proxy's.
    #[serde(default = "default_admin_listen")]
    pub listen: SocketAddr,
    /// Environment variable holding the root token (bootstraps the first keys).
    #[serde(default = "default_root_env")]
    pub root_token_env: String,
    /// File holding the root token (used when the variable is unset).
    #[serde(default)]
    pub root_token_file: Option<String>,
    /// Tenant the root token acts in when a request has no `X-Tenant-ID`.
    #[serde(default = "default_tenant")]
    pub default_tenant: Tenant,
    /// Serve the admin API over TLS with this PEM certificate chain and key.
    #[serde(default)]
    pub tls: Option<RawTls>,
    /// Open admin connections at most (the proxy's `timeouts` apply to them too);
    /// further connections wait in the accept backlog.
    #[serde(default = "default_admin_connections")]
    pub max_connections: usize,
}

fn default_admin_connections() -> usize {
    256
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            tls: None,
            max_connections: default_admin_connections(),
            listen: default_admin_listen(),
            root_token_env: default_root_env(),
            root_token_file: None,
            default_tenant: default_tenant(),
        }
    }
}

fn yes() -> bool {
    true
}

fn default_admin_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9901))
}
fn default_root_env() -> String {
    "KEYGATE_ROOT_TOKEN".into()
}
fn default_tenant() -> Tenant {
    Tenant("default".into())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawStore {
    /// Redis: production, shared by every replica.
    #[serde(default)]
    pub redis: Option<RawRedis>,
    /// In-process memory: `--dev` and tests; keys vanish on exit.
    #[serde(default)]
    pub memory: Option<RawMemory>,
    /// How often noted key uses are written to the store (`last_used_at`), in one batch.
    #[serde(default = "default_last_used_interval")]
    pub last_used_interval: HumanDuration,
    /// How often the background count of dormant keys (`keygate_keys_dormant`) runs.
    #[serde(default = "default_dormant_interval")]
    pub dormant_interval: HumanDuration,
}

fn default_dormant_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(300))
}

fn default_last_used_interval() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRedis {
    /// One server: `redis://host:port/db` (`KEYGATE_REDIS_URL` overrides).
    #[serde(default)]
    pub url: Option<String>,
    /// A primary found and followed through the sentinels.
    #[serde(default)]
    pub sentinel: Option<RawSentinel>,
    /// A Redis Cluster.
    #[serde(default)]
    pub cluster: Option<RawCluster>,
    /// Replicas that must confirm a management write before it succeeds (`WAIT`);
    /// default 1 with `sentinel` or `cluster`, 0 with `url`.
    #[serde(default)]
    pub min_replicas_ack: Option<u32>,
    /// How long a write waits for those confirmations.
    #[serde(default = "default_ack_timeout")]
    pub ack_timeout: HumanDuration,
    /// Prefix of every key and channel keygate uses.
    #[serde(default = "default_namespace")]
    pub namespace: String,
    /// Bound on every Redis call.
    #[serde(default = "default_store_timeout")]
    pub timeout: HumanDuration,
    /// For `rediss://`: PEM CA certificate(s) to trust instead of the system store.
    #[serde(default)]
    pub ca_file: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSentinel {
    /// The name the sentinels monitor the primary under (`sentinel monitor <name> ...`).
    pub master_name: String,
    /// The sentinels, `host:port`.
    pub nodes: Vec<String>,
    /// Environment variable holding the data nodes' password.
    #[serde(default)]
    pub password_env: Option<String>,
    /// Environment variable holding the sentinels' own password, when they have one.
    #[serde(default)]
    pub sentinel_password_env: Option<String>,
    /// TLS to the sentinels and the data nodes (`ca_file` applies).
    #[serde(default)]
    pub tls: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCluster {
    /// Seed nodes, `redis://host:port` (the rest are discovered).
    pub nodes: Vec<String>,
}

fn default_ack_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(500))
}

fn default_namespace() -> String {
    "keygate".into()
}
fn default_store_timeout() -> HumanDuration {
    HumanDuration(Duration::from_millis(250))
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawMemory {}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawCache {
    /// How long a valid key is trusted without asking the store: the worst-case staleness
    /// of a revocation when change notifications are lost.
    pub ttl: HumanDuration,
    /// How long an unknown key is remembered as unknown.
    pub negative_ttl: HumanDuration,
    /// Entries at most (valid and unknown together).
    pub max_entries: u64,
    /// While the store is failing: `serve_cached` (cached keys keep passing within
    /// their TTL) or `deny` (every key check answers 503).
    pub on_store_error: OnStoreError,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            ttl: HumanDuration(Duration::from_secs(300)),
            negative_ttl: HumanDuration(Duration::from_secs(2)),
            max_entries: 1_000_000,
            on_store_error: OnStoreError::ServeCached,
        }
    }
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawKeys {
    /// Type prefixes of generated keys.
    #[serde(default)]
    pub prefixes: RawPrefixes,
    /// Environment variable holding an optional pepper: digests become HMAC-SHA-256.
    #[serde(default = "default_pepper_env")]
    pub pepper_env: String,
    /// Formats of keys made before keygate (imported), accepted besides keygate's own.
    #[serde(default)]
    pub legacy: Vec<RawLegacyFormat>,
}

/// `keys.legacy[]`: one accepted format of imported keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawLegacyFormat {
    /// Unique; 1-32 of `a-z 0-9 _ -`.
    pub name: String,
    /// Text every such key starts with (may be empty); visible ASCII.
    #[serde(default)]
    pub prefix: String,
    /// Shortest token, prefix included (at least 16).
    pub min_length: usize,
    /// Longest token, prefix included (at most 512).
    pub max_length: usize,
    /// Alphabet after the prefix: `base64url`, `hex`, `alnum` or `token68`.
    pub charset: crate::key::Charset,
}

pub(super) const DEFAULT_PEPPER_ENV: &str = "KEYGATE_PEPPER";

fn default_pepper_env() -> String {
    DEFAULT_PEPPER_ENV.into()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RawPrefixes {
    pub secret_live: Prefix,
    pub publishable_live: Prefix,
    pub secret_test: Prefix,
    pub publishable_test: Prefix,
}

impl Default for RawPrefixes {
    fn default() -> Self {
        let d = crate::key::Prefixes::default();
        RawPrefixes {
            secret_live: Prefix(d.secret_live),
            publishable_live: Prefix(d.publishable_live),
            secret_test: Prefix(d.secret_test),
            publishable_test: Prefix(d.publishable_test),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawRoute {
    /// Unique; the metrics label.
    pub name: String,
    /// Methods this route matches; absent = all.
    #[serde(default)]
    pub methods: Option<Vec<Method>>,
    /// Path pattern: literal segments, `*` (one segment), `**` (the rest, last only).
    pub path: PathPattern,
    /// `key` (default) or `none` (public).
    #[serde(default)]
    pub auth: Auth,
    /// Scopes a key must hold, all of them.
    #[serde(default)]
    pub scopes: Vec<Scope>,
    /// Whether publishable keys may pass.
    #[serde(default)]
    pub allow_publishable: bool,
    /// Largest request body for this route (413 beyond); overrides the proxy default.
    #[serde(default)]
    pub max_body_bytes: Option<u64>,
    /// Credits a request spends on a key that has credits (default 1; 0: free).
    #[serde(default)]
    pub cost: Option<u64>,
    /// Limits on top of the key's own, counted per key or per tenant.
    #[serde(default)]
    pub rate_limits: Vec<RawRouteLimit>,
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Auth {
    #[default]
    Key,
    None,
}

#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum Unmatched {
    #[default]
    Deny,
    RequireKey,
}

/// `250ms`, `30s`, `5m`, `1h`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HumanDuration(pub Duration);

impl<'de> serde::Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        // humantime reads `M` as a month (30.44 days): `1M` meant as a minute would make a
        // rate window or a timeout 43,830 times longer without a word.
        let months = s
            .split(|c: char| !c.is_ascii_alphabetic())
            .any(|unit| matches!(unit, "M" | "month" | "months"));
        if months {
            return Err(de::Error::custom(format!(
                "invalid duration {s:?}: months are not a unit here (`m` is minutes); use d or w"
            )));
        }
        crate::time::parse_duration(&s)
            .map(HumanDuration)
            .map_err(|e| {
                de::Error::custom(format!(
                    "invalid duration {s:?} ({e}); use e.g. 250ms, 30s, 5m"
                ))
            })
    }
}

impl<'de> serde::Deserialize<'de> for Upstream {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        Upstream::parse(&s).map_err(de::Error::custom)
    }
}

#[derive(Debug, Clone)]
pub struct HeaderName(pub http::HeaderName);

impl<'de> serde::Deserialize<'de> for HeaderName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        http::HeaderName::from_bytes(s.as_bytes())
            .map(HeaderName)
            .map_err(|_| de::Error::custom(format!("invalid header name {s:?}")))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Method(pub http::Method);

impl<'de> serde::Deserialize<'de> for Method {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let upper = s.to_ascii_uppercase();
        match upper.as_str() {
            "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE" | "OPTIONS" | "TRACE"
            | "CONNECT" => Ok(Method(
                http::Method::from_bytes(upper.as_bytes()).map_err(de::Error::custom)?,
            )),
            _ => Err(de::Error::custom(format!("unknown HTTP method {s:?}"))),
        }
    }
}

#[derive(Debug, Clone)]
pub struct IpNet(pub ipnet::IpNet);

impl<'de> serde::Deserialize<'de> for IpNet {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if let Ok(n) = s.parse::<ipnet::IpNet>() {
            return Ok(IpNet(n));
        }
        s.parse::<std::net::IpAddr>()
            .map(|ip| IpNet(ipnet::IpNet::from(ip)))
            .map_err(|_| de::Error::custom(format!("invalid IP or CIDR {s:?}")))
    }
}

/// A tenant id: 1-64 of `[A-Za-z0-9_.-]` (it appears in store keys and headers).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tenant(pub String);

impl<'de> serde::Deserialize<'de> for Tenant {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if crate::key::valid_tenant(&s) {
            Ok(Tenant(s))
        } else {
            Err(de::Error::custom(format!(
                "invalid tenant {s:?}: use 1-64 characters of A-Z a-z 0-9 _ . -"
            )))
        }
    }
}

/// A key type prefix: 2-16 of `[a-z0-9_]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prefix(pub String);

impl<'de> serde::Deserialize<'de> for Prefix {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        let ok = (2..=16).contains(&s.len())
            && s.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if ok {
            Ok(Prefix(s))
        } else {
            Err(de::Error::custom(format!(
                "invalid key prefix {s:?}: use 2-16 characters of a-z 0-9 _"
            )))
        }
    }
}

/// A scope: `*` or `[a-z0-9_.-]+(:[a-z0-9_.*-]+)*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Scope(pub String);

impl<'de> serde::Deserialize<'de> for Scope {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        if crate::key::valid_scope(&s) {
            Ok(Scope(s))
        } else {
            Err(de::Error::custom(format!(
                "invalid scope {s:?}: use `*` or lowercase words joined by `:`, e.g. users:read"
            )))
        }
    }
}

/// `secret_scanning`: where a scanner (GitHub's partner programme) reports leaked keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSecretScanning {
    /// Address of the report listener; must differ from the proxy's and the admin's.
    pub listen: SocketAddr,
    /// The scanner's ECDSA P-256 public keys, chosen by the request's
    /// `GITHUB-PUBLIC-KEY-IDENTIFIER`.
    pub public_keys: Vec<RawScanKey>,
    /// `revoke` (default: a reported live key is revoked) or `report` (logged only).
    #[serde(default)]
    pub action: ScanAction,
    /// Serve the listener over TLS with this PEM certificate chain and key.
    #[serde(default)]
    pub tls: Option<RawTls>,
}

/// One of the scanner's public keys.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawScanKey {
    /// The identifier the scanner sends in `GITHUB-PUBLIC-KEY-IDENTIFIER`.
    pub key_identifier: String,
    /// The key as PEM (`-----BEGIN PUBLIC KEY-----`, SubjectPublicKeyInfo).
    pub pem: String,
}

/// What a report of a live key does.
#[derive(Debug, Default, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum ScanAction {
    /// Revoke the key (on every replica, through the store's change feed).
    #[default]
    Revoke,
    /// Only log the audit event and answer; the key keeps working.
    Report,
}
