//! Redis key store: a hash per record keyed by digest, an id index, a per-tenant sorted
//! index, and a change counter. Every write is one Lua script, so it is atomic, and every
//! change is published (digest and sequence number, never a key) for other replicas.
//!
//! Layout under namespace `ns`:
//! - `ns:k:<digest hex>`  hash: the record
//! - `ns:id:<id>`         string: digest hex
//! - `ns:t:<tenant>`      sorted set (all scores 0, lexicographic): `<created hex16>:<id>`
//! - `ns:seq`             counter bumped by every change, carried in the published message
//! - `ns:events`          pub/sub channel: `<seq> <event> <digest hex> <commit ms>`
//!
//! The record hash holds one field per `KeyRecord` field (`fields`, `parse_record`).
//! A key's own limits (issue 14) are three optional fields, each absent when empty, so
//! a record without limits is stored exactly as before and an older record reads as
//! having none:
//! - `ratelimits`  JSON array of `{"name", "limit", "duration_ms"}` (`Vec<RateLimit>`)
//! - `credits`     JSON object `{"remaining", "set_at", "refill"?: {"amount", "interval_ms"}}`
//! - `budget`      text: the key id whose counters this key spends
//!
//! A key imported by its SHA-256 (issue 15) has `digest_alg` = `sha256` (absent on every
//! other record): its digest is unpeppered, and only a legacy-format token may match it.
//!
//! Separate fields make a PATCH of rate limits or credits a plain `HSET`/`HDEL` of its
//! own field in the update script, so concurrent changes of different fields never
//! overwrite each other. A field that does not decode is `StoreError::Corrupt`.
//!
//! `KeyStore::scripts` runs rate-limit scripts (`EVALSHA`, loading the script on
//! `NOSCRIPT`) on the current primary, over the read connection (a proxy worker's own
//! one for a `worker_reader`), never behind a management write's `WAIT`.

use super::topology::{self, Link, Node, SentinelWatch, Target};
use super::{
    check_cursor, order_key, Credits, KeyLimits, KeyRecord, KeyStore, KeyUpdate, Page, PageRequest,
    RateLimit, Scripts, StoreError,
};
use crate::key::{self, Digest, Environment, KeyType};
use async_trait::async_trait;
use redis::aio::ConnectionManagerConfig;
use redis::Script;
use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, LazyLock};
use std::time::Duration;

const INSERT: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 or redis.call('EXISTS', KEYS[2]) == 1 then
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
redis.call('SET', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], 0, ARGV[2])
local seq = redis.call('INCR', KEYS[4])
redis.call('PUBLISH', ARGV[3], seq .. ' create ' .. ARGV[1] .. ' ' .. ARGV[4])
return 1
";

static BY_ID: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local d = redis.call('GET', KEYS[1])
if not d then return false end
local rk = ARGV[1] .. d
if redis.call('HGET', rk, 'tenant') ~= ARGV[2] then return false end
return redis.call('HGETALL', rk)
",
    )
});

const REVOKE: &str = r"
local d = redis.call('GET', KEYS[1])
if not d then return false end
local rk = ARGV[1] .. d
if redis.call('HGET', rk, 'tenant') ~= ARGV[2] then return false end
local cur = redis.call('HGET', rk, 'revoked_at')
if not cur or tonumber(cur) > tonumber(ARGV[3]) then
  redis.call('HSET', rk, 'revoked_at', ARGV[3])
  local seq = redis.call('INCR', KEYS[2])
  redis.call('PUBLISH', ARGV[4], seq .. ' revoke ' .. d .. ' ' .. ARGV[3])
end
return redis.call('HGETALL', rk)
";

/// Returns `{status, record}`: 1 updated (or already so), 2 revoked at `now` (ARGV[4]),
/// nothing written; `false` when the key is not in the tenant. A change to what is
/// already stored is not published: replicas have nothing to drop. After name and
/// scopes, ARGV holds pairs `field, value` for the optional fields that change
/// (`limit_changes`): an empty value removes the field.
const UPDATE: &str = r"
local d = redis.call('GET', KEYS[1])
if not d then return false end
local rk = ARGV[1] .. d
if redis.call('HGET', rk, 'tenant') ~= ARGV[2] then return false end
local rev = redis.call('HGET', rk, 'revoked_at')
if rev and tonumber(rev) <= tonumber(ARGV[4]) then return {2, {}} end
local changed = false
if ARGV[5] == '1' and redis.call('HGET', rk, 'name') ~= ARGV[6] then
  redis.call('HSET', rk, 'name', ARGV[6])
  changed = true
end
if ARGV[7] == '1' and redis.call('HGET', rk, 'scopes') ~= ARGV[8] then
  redis.call('HSET', rk, 'scopes', ARGV[8])
  changed = true
end
for i = 9, #ARGV, 2 do
  local cur = redis.call('HGET', rk, ARGV[i])
  if ARGV[i + 1] == '' then
    if cur then
      redis.call('HDEL', rk, ARGV[i])
      changed = true
    end
  elseif cur ~= ARGV[i + 1] then
    redis.call('HSET', rk, ARGV[i], ARGV[i + 1])
    changed = true
  end
end
if changed then
  local seq = redis.call('INCR', KEYS[2])
  redis.call('PUBLISH', ARGV[3], seq .. ' update ' .. d .. ' ' .. ARGV[4])
end
return {1, redis.call('HGETALL', rk)}
";

/// Returns `{status, old record}`: 1 rotated, 2 revoked or expired, 3 new key conflicts,
/// 4 the old key already has a successor; `false` when the old key is not in the tenant.
const ROTATE: &str = r"
local d = redis.call('GET', KEYS[1])
if not d then return false end
local rk = ARGV[1] .. d
if redis.call('HGET', rk, 'tenant') ~= ARGV[2] then return false end
if redis.call('HGET', rk, 'successor_id') == ARGV[8] then
  -- This rotation ran before (a resend): answer as then, even if the grace is over.
  return {1, redis.call('HGETALL', rk)}
end
local now = tonumber(ARGV[4])
local rev = redis.call('HGET', rk, 'revoked_at')
local exp = redis.call('HGET', rk, 'expires_at')
if (rev and tonumber(rev) <= now) or (exp and tonumber(exp) <= now) then
  return {2, {}}
end
if redis.call('HEXISTS', rk, 'successor_id') == 1 then
  return {4, {}}
end
if redis.call('EXISTS', KEYS[2]) == 1 or redis.call('EXISTS', KEYS[3]) == 1 then
  return {3, {}}
end
redis.call('HSET', KEYS[2], unpack(ARGV, 9))
redis.call('SET', KEYS[3], ARGV[6])
redis.call('ZADD', KEYS[4], 0, ARGV[7])
if not rev or tonumber(rev) > tonumber(ARGV[5]) then
  redis.call('HSET', rk, 'revoked_at', ARGV[5])
end
redis.call('HSET', rk, 'successor_id', ARGV[8])
local seq = redis.call('INCR', KEYS[5])
redis.call('PUBLISH', ARGV[3], seq .. ' create ' .. ARGV[6] .. ' ' .. ARGV[4])
seq = redis.call('INCR', KEYS[5])
redis.call('PUBLISH', ARGV[3], seq .. ' rotate ' .. d .. ' ' .. ARGV[4])
return {1, redis.call('HGETALL', rk)}
";

static LIST: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"
local members = redis.call('ZRANGE', KEYS[1], ARGV[3], '-', 'BYLEX', 'REV', 'LIMIT', 0, tonumber(ARGV[4]))
local out = {}
for i, m in ipairs(members) do
  local id = string.sub(m, 18)
  local d = redis.call('GET', ARGV[2] .. id)
  if d then out[#out + 1] = redis.call('HGETALL', ARGV[1] .. d) else out[#out + 1] = {} end
end
return out
",
    )
});

const TOUCH: &str = r"
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    local cur = redis.call('HGET', KEYS[i], 'last_used_at')
    if not cur or tonumber(cur) < tonumber(ARGV[i]) then
      redis.call('HSET', KEYS[i], 'last_used_at', ARGV[i])
    end
  end
end
return #KEYS
";

/// Keys per `touch` script call, and per round trip. Redis runs a script, and all the
/// commands of one read from a client, without serving anyone else: a batch written as
/// one big pipeline held key reads (the cold path) back by hundreds of microseconds at a
/// time. Small sequential round trips keep each stall to tens of microseconds; the flush
/// is in the background, so its own latency does not matter.
const TOUCH_CHUNK: usize = 32;

/// Where the data lives.
#[derive(Clone, PartialEq)]
pub enum Mode {
    /// One server (it may have replicas; keygate talks to this one).
    Standalone { url: String },
    /// The primary that the sentinels name, followed through failovers.
    Sentinel(SentinelSettings),
    /// A Redis Cluster, from these seed URLs (see `store::cluster`).
    Cluster { nodes: Vec<String> },
}

impl Mode {
    /// For metrics and logs.
    pub fn name(&self) -> &'static str {
        match self {
            Mode::Standalone { .. } => "standalone",
            Mode::Sentinel(_) => "sentinel",
            Mode::Cluster { .. } => "cluster",
        }
    }
}

impl std::fmt::Debug for Mode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Mode::Standalone { url } => write!(f, "Standalone({})", redacted(url)),
            Mode::Sentinel(s) => write!(f, "Sentinel({} at {})", s.master_name, s.nodes.join(",")),
            Mode::Cluster { nodes } => {
                let shown: Vec<String> = nodes.iter().map(|n| redacted(n)).collect();
                write!(f, "Cluster({})", shown.join(","))
            }
        }
    }
}

#[derive(Clone, PartialEq)]
pub struct SentinelSettings {
    pub master_name: String,
    /// The sentinels, `host:port`.
    pub nodes: Vec<String>,
    /// The data nodes' password (from `password_env`).
    pub password: Option<String>,
    /// The sentinels' own password, when they have one (from `sentinel_password_env`).
    pub sentinel_password: Option<String>,
    /// `rediss://` to the data nodes and the sentinels.
    pub tls: bool,
}

/// Connection settings for the Redis store.
#[derive(Clone, Debug, PartialEq)]
pub struct RedisSettings {
    pub mode: Mode,
    pub namespace: String,
    /// Bound on every call, including reconnect attempts inside it.
    pub timeout: Duration,
    /// PEM CA certificate(s) trusted for `rediss://` instead of the system store.
    pub ca_file: Option<std::path::PathBuf>,
    /// A management write succeeds only once this many replicas have it (`WAIT`).
    pub min_replicas_ack: u32,
    /// How long a write waits for those replicas.
    pub ack_timeout: Duration,
}

/// A URL as logs may show it: the password, if any, left out.
fn redacted(url: &str) -> String {
    match url::Url::parse(url) {
        Ok(mut u) => {
            if u.password().is_some() {
                let _ = u.set_password(Some("REDACTED"));
            }
            u.to_string()
        }
        Err(_) => "(unparsable URL)".into(),
    }
}

impl RedisSettings {
    /// One standalone server, no replica acknowledgement: what tests and `url:` give.
    pub fn standalone(url: &str, namespace: &str, timeout: Duration) -> RedisSettings {
        RedisSettings {
            mode: Mode::Standalone { url: url.into() },
            namespace: namespace.into(),
            timeout,
            ca_file: None,
            min_replicas_ack: 0,
            ack_timeout: Duration::from_millis(500),
        }
    }

    /// Where the store is, as logs may show it (no password).
    pub fn display_url(&self) -> String {
        match &self.mode {
            Mode::Standalone { url } => redacted(url),
            other => format!("{other:?}"),
        }
    }

    /// A client for `url` (`rediss://` verifies against `ca_file` when set).
    pub fn client_for(&self, url: &str) -> Result<redis::Client, String> {
        match &self.ca_file {
            None => redis::Client::open(url).map_err(|e| e.to_string()),
            Some(ca) => {
                #[allow(clippy::disallowed_methods, reason = "once, when the client is built")]
                let pem = std::fs::read(ca).map_err(|e| format!("{}: {e}", ca.display()))?;
                redis::Client::build_with_tls(
                    url,
                    redis::TlsCertificates {
                        client_tls: None,
                        root_cert: Some(pem),
                    },
                )
                .map_err(|e| e.to_string())
            }
        }
    }

    /// The URL of a node at `host:port`, with a password and TLS as given. The password
    /// is percent-encoded whole (`%` included: the client decodes it again).
    fn node_url(addr: &str, password: Option<&str>, tls: bool) -> Result<String, String> {
        let scheme = if tls { "rediss" } else { "redis" };
        let auth = password.map_or_else(String::new, |p| {
            let encoded =
                percent_encoding::utf8_percent_encode(p, percent_encoding::NON_ALPHANUMERIC);
            format!(":{encoded}@")
        });
        let url = format!("{scheme}://{auth}{addr}/0");
        url::Url::parse(&url).map_err(|e| format!("node address {addr}: {e}"))?;
        Ok(url)
    }

    /// What the store talks to first: the server, or (Sentinel) none until the
    /// sentinels name one; with the watch that keeps a Sentinel target current.
    pub fn target(&self) -> Result<(Arc<Target>, Option<SentinelWatch>), String> {
        match &self.mode {
            Mode::Standalone { url } => {
                let client = self.client_for(url)?;
                let addr = url::Url::parse(url)
                    .ok()
                    .map(|u| {
                        format!(
                            "{}:{}",
                            u.host_str().unwrap_or("?"),
                            u.port().unwrap_or(6379)
                        )
                    })
                    .unwrap_or_else(|| "?".into());
                Ok((Target::new(Some(Node { addr, client })), None))
            }
            Mode::Sentinel(s) => {
                let (me, data, sentinel) = (self.clone(), s.clone(), s.clone());
                let node_client = move |addr: &str| {
                    me.client_for(&Self::node_url(addr, data.password.as_deref(), data.tls)?)
                };
                let me = self.clone();
                let sentinel_client = move |addr: &str| {
                    let url =
                        Self::node_url(addr, sentinel.sentinel_password.as_deref(), sentinel.tls)?;
                    // Sentinels have no databases.
                    me.client_for(url.trim_end_matches("/0"))
                };
                let watch = SentinelWatch {
                    master_name: s.master_name.clone(),
                    sentinels: s.nodes.clone(),
                    node_client: Arc::new(node_client),
                    sentinel_client: Arc::new(sentinel_client),
                    timeout: self.timeout.max(Duration::from_millis(500)),
                };
                Ok((Target::new(None), Some(watch)))
            }
            Mode::Cluster { .. } => Err("cluster mode has no single primary".into()),
        }
    }
}

#[derive(Clone)]
pub struct RedisStore {
    /// Reads, and the readiness ping.
    conn: Link,
    /// A proxy worker's own connection for key reads (`worker_reader`); `None` in the
    /// shared store, which reads over `conn`.
    reader: Option<Link>,
    /// Management writes, each followed by `WAIT` in the same pipeline. A `WAIT` holds
    /// its connection until the replicas answer, so each write has one to itself.
    writes: Arc<topology::Pool>,
    /// Bulk background writes (`touch`), so key reads never queue behind them.
    bulk: Link,
    /// Sentinel mode: what keeps the target on the primary (run by `follow_topology`).
    watch: Option<SentinelWatch>,
    ns: String,
    timeout: Duration,
    min_replicas_ack: u32,
    ack_timeout: Duration,
}

impl RedisStore {
    /// Connects lazily: keygate starts (and reports unready) while Redis is down, or
    /// (Sentinel) until the sentinels name a primary.
    pub fn connect(settings: &RedisSettings) -> Result<Self, StoreError> {
        let (target, watch) = settings
            .target()
            .map_err(|e| StoreError::Unavailable(format!("redis client: {e}")))?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(settings.timeout))
            .set_response_timeout(Some(settings.timeout))
            .set_number_of_retries(1)
            .set_max_delay(Duration::from_millis(500));
        let write_config = config
            .clone()
            .set_response_timeout(Some(settings.timeout + settings.ack_timeout));
        let bulk_config = config
            .clone()
            .set_response_timeout(Some(settings.timeout.max(Duration::from_secs(5))));
        Ok(RedisStore {
            conn: Link::new(target.clone(), config),
            reader: None,
            writes: Arc::new(topology::Pool::new(Link::new(target.clone(), write_config))),
            bulk: Link::new(target, bulk_config),
            watch,
            ns: settings.namespace.clone(),
            timeout: settings.timeout,
            min_replicas_ack: settings.min_replicas_ack,
            ack_timeout: settings.ack_timeout,
        })
    }

    /// What the store talks to: the change feed follows the same primary.
    pub fn target(&self) -> Arc<Target> {
        self.conn.target().clone()
    }

    /// Sentinel mode: keep every connection on the primary the sentinels name, until
    /// `shutdown`. Standalone: nothing to do.
    pub fn follow_topology(
        &self,
        shutdown: tokio::sync::watch::Receiver<bool>,
    ) -> Option<impl Future<Output = ()> + Send + 'static> {
        let watch = self.watch.clone()?;
        Some(topology::follow_sentinels(watch, self.target(), shutdown))
    }

    /// A copy of this store that reads keys over a connection of its own, for one proxy
    /// worker (a single-threaded runtime): the shared connection's task runs on the
    /// control runtime, and a read through it costs two cross-thread wake-ups (there and
    /// back), which on a busy machine is most of a miss's latency. Lazy: it connects, and
    /// spawns its task on the runtime that first uses it, on the worker's first miss.
    fn with_own_reader(&self) -> RedisStore {
        RedisStore {
            reader: Some(self.conn.sibling()),
            ..self.clone()
        }
    }

    pub fn channel(&self) -> String {
        format!("{}:events", self.ns)
    }

    fn rec_prefix(&self) -> String {
        format!("{}:k:", self.ns)
    }
    fn id_prefix(&self) -> String {
        format!("{}:id:", self.ns)
    }
    fn rec_key(&self, d: &Digest) -> String {
        format!("{}:k:{}", self.ns, key::hex(d))
    }
    fn id_key(&self, id: &str) -> String {
        format!("{}:id:{}", self.ns, id)
    }
    fn tenant_key(&self, tenant: &str) -> String {
        format!("{}:t:{}", self.ns, tenant)
    }
    /// The change counter's key (read by the change feed's periodic check).
    pub fn seq_key(&self) -> String {
        format!("{}:seq", self.ns)
    }
    /// Bumped before each `WAIT` (see `write`).
    fn fence_key(&self) -> String {
        format!("{}:ack", self.ns)
    }

    async fn bounded<T>(
        &self,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        self.bounded_for(self.timeout, fut).await
    }

    async fn bounded_for<T>(
        &self,
        budget: Duration,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(budget, fut).await {
            Err(_) => Err(StoreError::Timeout),
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) if e.is_timeout() => Err(StoreError::Timeout),
            Ok(Err(e)) if e.kind() == redis::ErrorKind::UnexpectedReturnType => {
                Err(StoreError::Corrupt {
                    key: "reply".into(),
                    reason: e.to_string(),
                })
            }
            Ok(Err(e)) if topology::is_not_primary(&e) => {
                // A failover under way: ask the sentinels now rather than at the next check.
                self.conn.target().suspect();
                Err(StoreError::Unavailable(format!(
                    "the Redis node is not the primary (failover?): {e}"
                )))
            }
            Ok(Err(e)) => Err(StoreError::Unavailable(e.to_string())),
        }
    }

    /// Run a management write (an `EVAL`), then, when replicas must confirm it, `WAIT`
    /// in the same pipeline: one connection, so the `WAIT` covers this write even if
    /// the connection is replaced right after. The write connection is idle between
    /// management calls, so a Redis restart or failover shows on it first: a write that
    /// meets a dropped connection is sent once more on the new one (`Retried::Yes`).
    /// Every script is safe to repeat; the caller tells its own earlier success from a
    /// real conflict.
    async fn write<T: redis::FromRedisValue>(
        &self,
        eval: redis::Cmd,
    ) -> Result<(T, Retried), StoreError> {
        let wanted = self.min_replicas_ack;
        let mut pipe = redis::pipe();
        pipe.add_command(eval);
        if wanted > 0 {
            // `WAIT` counts replicas up to this connection's last replicated write. A
            // script that changes nothing (a repeated revoke, a resend finding its own
            // first send) replicates nothing, and from Redis 7.2 `WAIT` would then
            // confirm at once. The fence always replicates, so `WAIT` covers everything
            // written before it, this write's first send included.
            pipe.cmd("INCR").arg(self.fence_key()).ignore();
            let ms = self.ack_timeout.as_millis().max(1) as u64;
            pipe.cmd("WAIT").arg(wanted).arg(ms);
        }
        let budget = self.timeout + self.ack_timeout;
        let send = || async {
            // A connection of its own: a `WAIT` blocks the whole connection, so writes
            // sharing one would queue behind each other's waits.
            let link = self.writes.claim();
            let mut conn = link.get()?;
            let sent = pipe.query_async::<Vec<redis::Value>>(&mut conn);
            Ok::<_, StoreError>(tokio::time::timeout(budget, sent).await)
        };
        let (replies, retried) = match send().await? {
            Ok(Err(e)) if !e.is_timeout() && (e.is_connection_dropped() || e.is_io_error()) => {
                tracing::debug!(error = %e, "Redis write connection dropped; sending the write again");
                (send().await?, Retried::Yes)
            }
            first => (first, Retried::No),
        };
        let mut replies = self
            .bounded_for(budget, async {
                replies.unwrap_or_else(|_| {
                    Err(redis::RedisError::from(std::io::Error::from(
                        std::io::ErrorKind::TimedOut,
                    )))
                })
            })
            .await?
            .into_iter();
        let reply = redis::from_redis_value::<T>(replies.next().unwrap_or(redis::Value::Nil))
            .map_err(|e| StoreError::Corrupt {
                key: "reply".into(),
                reason: e.to_string(),
            })?;
        if wanted > 0 {
            let acked = replies
                .next()
                .and_then(|v| redis::from_redis_value::<u32>(v).ok())
                .unwrap_or(0);
            if acked < wanted {
                let stats = &self.conn.target().stats;
                stats
                    .ack_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(StoreError::Unconfirmed { acked, wanted });
            }
        }
        Ok((reply, retried))
    }
}

impl RedisStore {
    /// One page of every record under the namespace (`SCAN`): the next cursor (0 at the
    /// end), the records read, and how many could not be parsed (logged by key).
    pub async fn scan_records(
        &self,
        cursor: u64,
    ) -> Result<(u64, Vec<KeyRecord>, u64), StoreError> {
        let mut conn = self.conn.get()?;
        let pattern = format!("{}*", self.rec_prefix());
        let scan = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(&pattern)
            .arg("COUNT")
            .arg(200)
            .clone();
        let (next, keys): (u64, Vec<String>) = self.bounded(scan.query_async(&mut conn)).await?;
        let mut pipe = redis::pipe();
        for k in &keys {
            pipe.cmd("HGETALL").arg(k);
        }
        let rows: Vec<Vec<String>> = if keys.is_empty() {
            Vec::new()
        } else {
            self.bounded(pipe.query_async(&mut conn)).await?
        };
        let (mut records, mut unreadable) = (Vec::with_capacity(rows.len()), 0);
        for (row, k) in rows.into_iter().zip(&keys) {
            match parse_record(row) {
                Ok(Some(r)) => records.push(r),
                Ok(None) => {}
                Err(e) => {
                    tracing::error!(error = %e, key = %k.get(..self.rec_prefix().len() + 8).unwrap_or(""), "unreadable record not copied");
                    unreadable += 1;
                }
            }
        }
        Ok((next, records, unreadable))
    }

    /// Is `record` stored as it is (a resent insert finding its own first send)?
    async fn holds(&self, record: &KeyRecord) -> Result<bool, StoreError> {
        Ok(self
            .by_digest(&record.digest)
            .await?
            .is_some_and(|r| r.id == record.id))
    }
}

/// Whether a write was sent a second time (see `RedisStore::write`).
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Retried {
    No,
    Yes,
}

/// `EVAL <script> <keys>`; the caller adds the arguments. Management writes send the
/// text each time (no `NOSCRIPT` to recover from inside a pipeline); Redis caches the
/// compiled script.
fn eval(script: &str, keys: &[String]) -> redis::Cmd {
    let mut cmd = redis::cmd("EVAL");
    cmd.arg(script).arg(keys.len());
    for k in keys {
        cmd.arg(k);
    }
    cmd
}

pub(crate) fn fields(record: &KeyRecord) -> Vec<(&'static str, String)> {
    let mut f = vec![
        ("id", record.id.clone()),
        ("tenant", record.tenant.clone()),
        ("name", record.name.clone()),
        ("type", record.key_type.as_str().into()),
        ("env", record.environment.as_str().into()),
        ("prefix", record.prefix.clone()),
        ("last_four", record.last_four.clone()),
        ("scopes", record.scopes.join(" ")),
        ("created_at", record.created_at.to_string()),
        ("digest", key::hex(&record.digest)),
    ];
    let opt = |v: Option<u64>| v.map(|v| v.to_string());
    for (name, value) in [
        ("last_used_at", opt(record.last_used_at)),
        ("expires_at", opt(record.expires_at)),
        ("revoked_at", opt(record.revoked_at)),
        ("successor_id", record.successor_id.clone()),
    ] {
        if let Some(v) = value {
            f.push((name, v));
        }
    }
    let limits = &record.limits;
    if !limits.ratelimits.is_empty() {
        f.push(("ratelimits", to_json(&limits.ratelimits)));
    }
    if let Some(c) = &limits.credits {
        f.push(("credits", to_json(c)));
    }
    if let Some(b) = &limits.budget {
        f.push(("budget", b.clone()));
    }
    if record.plain_sha256 {
        f.push(("digest_alg", "sha256".into()));
    }
    f
}

/// JSON of a limits field. The types are plain structs of strings and numbers.
fn to_json<T: serde::Serialize>(v: &T) -> String {
    serde_json::to_string(v).expect("limits serialize to JSON")
}

/// The optional record fields a `KeyUpdate` sets, as `(field, value)` pairs for the
/// update scripts (here and in `cluster.rs`); an empty value removes the field.
pub(crate) fn limit_changes(change: &KeyUpdate) -> Vec<(&'static str, String)> {
    let mut out = Vec::new();
    if let Some(r) = &change.ratelimits {
        let value = if r.is_empty() {
            String::new()
        } else {
            to_json(r)
        };
        out.push(("ratelimits", value));
    }
    if let Some(c) = &change.credits {
        out.push(("credits", c.as_ref().map(to_json).unwrap_or_default()));
    }
    out
}

/// Parse an HGETALL reply strictly: a record that fails here is reported, never guessed.
pub(crate) fn parse_record(flat: Vec<String>) -> Result<Option<KeyRecord>, StoreError> {
    if flat.is_empty() {
        return Ok(None);
    }
    let mut map: HashMap<String, String> = HashMap::with_capacity(flat.len() / 2);
    let mut it = flat.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        map.insert(k, v);
    }
    let id = map.get("id").cloned().unwrap_or_default();
    let corrupt = |reason: String| StoreError::Corrupt {
        key: format!("id {id}"),
        reason,
    };
    let mut take = |name: &str| {
        map.remove(name)
            .ok_or_else(|| corrupt(format!("missing field {name}")))
    };
    let num = |name: &str, v: String| {
        v.parse::<u64>()
            .map_err(|_| corrupt(format!("field {name} is not a number")))
    };
    // The reason names the field only: serde's message may quote the stored text.
    let malformed = |name: &str| corrupt(format!("field {name} is malformed"));
    let record = KeyRecord {
        id: take("id")?,
        tenant: take("tenant")?,
        name: take("name")?,
        key_type: KeyType::parse(&take("type")?).ok_or_else(|| corrupt("bad type".into()))?,
        environment: Environment::parse(&take("env")?).ok_or_else(|| corrupt("bad env".into()))?,
        prefix: take("prefix")?,
        last_four: take("last_four")?,
        scopes: take("scopes")?
            .split(' ')
            .filter(|s| !s.is_empty())
            .map(str::to_string)
            .collect(),
        created_at: num("created_at", take("created_at")?)?,
        digest: key::unhex(&take("digest")?).ok_or_else(|| corrupt("bad digest".into()))?,
        last_used_at: map
            .remove("last_used_at")
            .map(|v| num("last_used_at", v))
            .transpose()?,
        expires_at: map
            .remove("expires_at")
            .map(|v| num("expires_at", v))
            .transpose()?,
        revoked_at: map
            .remove("revoked_at")
            .map(|v| num("revoked_at", v))
            .transpose()?,
        successor_id: map.remove("successor_id"),
        limits: KeyLimits {
            ratelimits: map
                .remove("ratelimits")
                .map(|v| {
                    serde_json::from_str::<Vec<RateLimit>>(&v).map_err(|_| malformed("ratelimits"))
                })
                .transpose()?
                .unwrap_or_default(),
            credits: map
                .remove("credits")
                .map(|v| serde_json::from_str::<Credits>(&v).map_err(|_| malformed("credits")))
                .transpose()?,
            budget: map.remove("budget"),
        },
        plain_sha256: match map.remove("digest_alg").as_deref() {
            None => false,
            Some("sha256") => true,
            Some(_) => return Err(malformed("digest_alg")),
        },
    };
    Ok(Some(record))
}

#[async_trait]
impl KeyStore for RedisStore {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let keys = [
            self.rec_key(&record.digest),
            self.id_key(&record.id),
            self.tenant_key(&record.tenant),
            self.seq_key(),
        ];
        let mut cmd = eval(INSERT, &keys);
        cmd.arg(key::hex(&record.digest))
            .arg(order_key(record))
            .arg(self.channel())
            .arg(crate::time::now_ms());
        for (k, v) in fields(record) {
            cmd.arg(k).arg(v);
        }
        let (created, retried): (i64, _) = self.write(cmd).await?;
        if created == 1 || (retried == Retried::Yes && self.holds(record).await?) {
            Ok(())
        } else {
            Err(StoreError::Conflict)
        }
    }

    async fn by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        let key = self.rec_key(digest);
        // `checked`: a connection idle for a second (a worker's own is used only on its
        // misses) is tested first, so an idle cut by Redis or a NAT costs a PING, not a 503.
        let read = |link: &Link| {
            let cmd = redis::cmd("HGETALL").arg(&key).clone();
            let link = link.clone();
            async move {
                let mut conn = link.checked().await.map_err(|e| {
                    redis::RedisError::from((redis::ErrorKind::Io, "no connection", e.to_string()))
                })?;
                cmd.query_async::<Vec<String>>(&mut conn).await
            }
        };
        let flat: Vec<String> = self
            .bounded(async {
                // A read can be sent again: a connection found dropped (a Redis restart,
                // an idle cut) is left to its manager, which reconnects, and the read goes
                // over the shared connection, once more if that one was dropped too.
                let first = self.reader.as_ref().unwrap_or(&self.conn);
                let mut result = read(first).await;
                let again = if self.reader.is_some() { 2 } else { 1 };
                for _ in 0..again {
                    match &result {
                        Err(e)
                            if e.is_io_error()
                                || e.is_connection_dropped()
                                || e.is_connection_refusal() =>
                        {
                            tracing::debug!(error = %e, "Redis connection dropped; reading again");
                            result = read(&self.conn).await;
                        }
                        _ => break,
                    }
                }
                result
            })
            .await?;
        let record = parse_record(flat)?;
        match record {
            Some(r) if !key::ct_eq(&r.digest, digest) => Err(StoreError::Corrupt {
                key: format!("id {}", r.id),
                reason: "digest field does not match its key".into(),
            }),
            other => Ok(other),
        }
    }

    async fn by_id(&self, tenant: &str, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let mut conn = self.conn.get()?;
        let flat: Option<Vec<String>> = self
            .bounded(
                BY_ID
                    .key(self.id_key(id))
                    .arg(self.rec_prefix())
                    .arg(tenant)
                    .invoke_async(&mut conn),
            )
            .await?;
        parse_record(flat.unwrap_or_default())
    }

    async fn list(&self, tenant: &str, page: &PageRequest) -> Result<Page, StoreError> {
        let start = match &page.cursor {
            Some(c) => {
                check_cursor(c)?;
                format!("({c}")
            }
            None => "+".into(),
        };
        let mut conn = self.conn.get()?;
        let rows: Vec<Vec<String>> = self
            .bounded(
                LIST.key(self.tenant_key(tenant))
                    .arg(self.rec_prefix())
                    .arg(self.id_prefix())
                    .arg(start)
                    .arg(page.limit + 1)
                    .invoke_async(&mut conn),
            )
            .await?;
        let more = rows.len() > page.limit;
        let mut items = Vec::with_capacity(rows.len().min(page.limit));
        for row in rows.into_iter().take(page.limit) {
            if let Some(r) = parse_record(row)? {
                items.push(r);
            }
        }
        let next_cursor = if more {
            items.last().map(order_key)
        } else {
            None
        };
        Ok(Page { items, next_cursor })
    }

    async fn revoke(
        &self,
        tenant: &str,
        id: &str,
        at_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let mut cmd = eval(REVOKE, &[self.id_key(id), self.seq_key()]);
        cmd.arg(self.rec_prefix())
            .arg(tenant)
            .arg(at_ms)
            .arg(self.channel());
        let (flat, _): (Option<Vec<String>>, _) = self.write(cmd).await?;
        parse_record(flat.unwrap_or_default())
    }

    async fn touch(&self, uses: &[(Digest, u64)]) -> Result<(), StoreError> {
        if uses.is_empty() {
            return Ok(());
        }
        // Flushed every few seconds: the connection has been idle, and is tested first.
        let mut conn = self.bulk.checked().await?;
        // A round trip may queue behind other writes: allow more than one read's timeout.
        let budget = self.timeout.max(Duration::from_secs(5));
        // And one bound on the whole batch, so a slow Redis cannot keep a flush going for
        // minutes (the rest is dropped, as with any failed flush: last use is
        // informational, and a key's next use queues it again).
        let deadline = tokio::time::Instant::now() + budget * 6;
        for chunk in uses.chunks(TOUCH_CHUNK) {
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Timeout);
            }
            // EVAL (not EVALSHA): no NOSCRIPT round trip to recover from.
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(TOUCH).arg(chunk.len());
            for (digest, _) in chunk {
                cmd.arg(self.rec_key(digest));
            }
            for (_, at) in chunk {
                cmd.arg(*at);
            }
            match tokio::time::timeout(budget, cmd.query_async::<()>(&mut conn)).await {
                Err(_) => return Err(StoreError::Timeout),
                Ok(Err(e)) => return Err(StoreError::Unavailable(e.to_string())),
                Ok(Ok(())) => {}
            }
        }
        Ok(())
    }

    async fn update(
        &self,
        tenant: &str,
        id: &str,
        change: &KeyUpdate,
        now_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let flag = |b: bool| if b { "1" } else { "0" };
        let mut cmd = eval(UPDATE, &[self.id_key(id), self.seq_key()]);
        cmd.arg(self.rec_prefix())
            .arg(tenant)
            .arg(self.channel())
            .arg(now_ms)
            .arg(flag(change.name.is_some()))
            .arg(change.name.as_deref().unwrap_or(""))
            .arg(flag(change.scopes.is_some()))
            .arg(
                change
                    .scopes
                    .as_ref()
                    .map(|s| s.join(" "))
                    .unwrap_or_default(),
            );
        for (field, value) in limit_changes(change) {
            cmd.arg(field).arg(value);
        }
        let (reply, _): (Option<(i64, Vec<String>)>, _) = self.write(cmd).await?;
        match reply {
            None => Ok(None),
            Some((1, record)) => parse_record(record),
            Some((2, _)) => Err(StoreError::Revoked),
            Some((code, _)) => Err(StoreError::Corrupt {
                key: "update".into(),
                reason: format!("unexpected script status {code}"),
            }),
        }
    }

    async fn rotate(
        &self,
        tenant: &str,
        old_id: &str,
        new: &KeyRecord,
        old_revokes_at: u64,
        now_ms: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let keys = [
            self.id_key(old_id),
            self.rec_key(&new.digest),
            self.id_key(&new.id),
            self.tenant_key(&new.tenant),
            self.seq_key(),
        ];
        let mut inv = eval(ROTATE, &keys);
        inv.arg(self.rec_prefix())
            .arg(tenant)
            .arg(self.channel())
            .arg(now_ms)
            .arg(old_revokes_at)
            .arg(key::hex(&new.digest))
            .arg(order_key(new))
            .arg(&new.id);
        for (k, v) in fields(new) {
            inv.arg(k).arg(v);
        }
        let (reply, retried): (Option<(i64, Vec<String>)>, _) = self.write(inv).await?;
        match reply {
            None => Ok(None),
            Some((1, old)) => parse_record(old),
            // The first send did it: the old key's successor is this new key.
            Some((4, _)) if retried == Retried::Yes => match self.by_id(tenant, old_id).await? {
                Some(old) if old.successor_id.as_deref() == Some(new.id.as_str()) => Ok(Some(old)),
                _ => Err(StoreError::AlreadyRotated),
            },
            Some((2, _)) => Err(StoreError::NotRotatable),
            Some((3, _)) => Err(StoreError::Conflict),
            Some((4, _)) => Err(StoreError::AlreadyRotated),
            Some((code, _)) => Err(StoreError::Corrupt {
                key: "rotate".into(),
                reason: format!("unexpected script status {code}"),
            }),
        }
    }

    async fn scan_all(&self, cursor: u64) -> Result<Option<(u64, Vec<KeyRecord>)>, StoreError> {
        let (next, records, _unreadable) = self.scan_records(cursor).await?;
        Ok(Some((next, records)))
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let mut conn = self.conn.get()?;
        let _: String = self
            .bounded(redis::cmd("PING").query_async(&mut conn))
            .await?;
        Ok(())
    }

    fn worker_reader(&self) -> Option<Arc<dyn KeyStore>> {
        Some(Arc::new(self.with_own_reader()))
    }

    fn kind(&self) -> &'static str {
        "redis"
    }

    fn scripts(&self) -> Option<Arc<dyn Scripts>> {
        // A worker's own connection when this is a worker's reader, else the shared read
        // connection: neither ever carries a management write's `WAIT`.
        let link = self.reader.clone().unwrap_or_else(|| self.conn.clone());
        Some(Arc::new(RedisScripts {
            store: self.clone(),
            link,
        }))
    }
}

/// Rate-limit scripts on the current primary (`KeyStore::scripts`).
struct RedisScripts {
    store: RedisStore,
    link: Link,
}

#[async_trait]
impl Scripts for RedisScripts {
    async fn eval(
        &self,
        script: &Script,
        keys: &[String],
        args: &[String],
    ) -> Result<redis::Value, StoreError> {
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(k);
        }
        for a in args {
            invocation.arg(a);
        }
        // Sent once: a script that met a dropped connection may have run, and a counter
        // must not count twice (`checked`: an idle connection is tested first). `EVALSHA`,
        // then on `NOSCRIPT` (a new primary, a restart) `SCRIPT LOAD` and `EVALSHA` again.
        self.store
            .bounded(async {
                let mut conn = self.link.checked().await.map_err(|e| {
                    redis::RedisError::from((redis::ErrorKind::Io, "no connection", e.to_string()))
                })?;
                let r = invocation.invoke_async::<redis::Value>(&mut conn).await;
                if let Err(e) = &r {
                    if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
                        // The primary may be gone: ask the sentinels now (`bounded`
                        // does the same for READONLY and MASTERDOWN).
                        self.link.target().suspect();
                    }
                }
                r
            })
            .await
    }

    fn namespace(&self) -> &str {
        &self.store.ns
    }
}

#[cfg(test)]
mod tests {
    use super::RedisSettings;
    use std::time::Duration;

    fn shown(url: &str) -> String {
        RedisSettings::standalone(url, "ns", Duration::from_secs(1)).display_url()
    }

    /// Passwords reach the server as written, whatever they hold; IPv6 hosts work.
    #[test]
    fn node_urls_carry_any_password() {
        for password in ["p%41ss", "50%25off", "a:b@c/d#e?f g", "plain"] {
            let url = RedisSettings::node_url("10.0.0.1:6379", Some(password), false).unwrap();
            let info = redis::IntoConnectionInfo::into_connection_info(url.as_str()).unwrap();
            assert_eq!(info.redis_settings().password(), Some(password), "{url}");
        }
        let v6 = super::topology::host_port("::1", 26379);
        assert_eq!(v6, "[::1]:26379");
        assert!(RedisSettings::node_url(&v6, None, true).is_ok());
    }

    #[test]
    fn display_url_never_shows_the_password() {
        assert_eq!(
            shown("redis://:s3cret@10.0.0.5:6379/0"),
            "redis://:REDACTED@10.0.0.5:6379/0"
        );
        assert_eq!(
            shown("rediss://app:s3cret@redis.internal/2"),
            "rediss://app:REDACTED@redis.internal/2"
        );
        assert_eq!(
            shown("redis://127.0.0.1:7000/0"),
            "redis://127.0.0.1:7000/0"
        );
        assert!(!shown("redis://:s3cret@[::1").contains("s3cret"));
    }
}
