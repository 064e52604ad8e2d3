//! Redis Cluster key store. Redis Cluster runs a script only when all the keys it
//! declares (in `KEYS`; none computed in Lua) hash to one slot, so the standalone layout
//! (`redis.rs`: one script writes the record, the id index, the tenant index and the
//! counter) cannot work here. Records are spread over B = 16 buckets instead, and the
//! tenant's index lives in a slot of its own.
//!
//! Layout under namespace `ns`, bucket `b` = the high nibble of the digest's first byte
//! (hex `0`..`f`, computed in Rust, no I/O):
//! - `ns:{ns.b}:k:<digest hex>`   hash: the record (the fields of the standalone record)
//! - `ns:{ns.b}:seq`              the bucket's change counter
//! - `ns:{ns.b}:events`           the bucket's sharded channel (`SPUBLISH`), messages
//!   `<seq> <event> <digest hex> <commit ms>` as in the standalone feed
//! - `ns:{ns.t.<tenant>}:list`    sorted set (scores 0, lexicographic): `<created hex16>:<id>`
//! - `ns:{ns.t.<tenant>}:ids`     hash: id -> `<digest hex> <created ms> <written ms>`
//!
//! Every change to a record is one script on its bucket's slot: the write, `INCR` of the
//! bucket counter and `SPUBLISH` of the change, so the feed (`feed::cluster`) keeps one
//! sequence per bucket. The hot path, `by_digest`, is one `HGETALL` of the record key.
//!
//! The record is the only source of truth for authentication; the tenant slot lists keys
//! and maps ids to digests. The promise: a key that authenticates is listed and revocable.
//! Multi-step writes are ordered so that a crash between steps can only leave a listed
//! entry whose record is missing (never a record that is not listed):
//! - insert: (1) the tenant entry (conflict when the id exists), (2) the record (conflict
//!   when the digest exists: step 1 is undone).
//! - rotate: (1) the new key's tenant entry, (2) its record, (3) on the old record's
//!   bucket, the standalone checks and the link to the successor. When (3) refuses, (2)
//!   and (1) are undone (the record is deleted and a change published, so caches drop
//!   it). Nobody holds the new key's text until rotate returns, so its brief life is
//!   never usable; of concurrent rotations only one passes (3).
//! - revoke and update resolve the digest in the tenant slot, then run one bucket script
//!   (tenant checked inside, as in the standalone scripts).
//!
//! Repair on read: a listed entry whose record is missing and that was written more
//! than `LEFTOVER_AGE` ago (the write time, not the key's creation: a migrated key is
//! old when it is written) is a crash leftover; `by_id` and `list` skip it and remove it
//! (only if the entry is still the same). A younger one is skipped and kept: its create
//! may be in flight.
//!
//! The cluster client retries a request after a dropped connection, so a script may run
//! twice: each step recognises its own earlier run (the record already carries this id;
//! the old key already links to this successor) and answers as if it had just run.
//!
//! Acknowledged means replicated: with `min_replicas_ack > 0` every write step is sent as
//! one pipeline `EVAL` + `WAIT n ms` to the slot's primary, so the `WAIT` counts the
//! replicas that have that step; fewer than wanted is `Unconfirmed` and later steps are
//! not run.
//!
//! The record's fields, the limits fields (`ratelimits`, `credits`, `budget`, absent
//! when empty) included, are the standalone record's (`redis.rs`).
//!
//! `KeyStore::scripts` runs rate-limit scripts over the read connection (never behind
//! a `WAIT`), routed by the first key's slot: every key of one call shares a hash tag.
//!
//! Data connections speak RESP2 (an `HGETALL` reply stays a flat array).

use super::redis::{fields, limit_changes, parse_record};
use super::{
    check_cursor, order_key, KeyRecord, KeyStore, KeyUpdate, Page, PageRequest, Scripts, StoreError,
};
use crate::key::{self, Digest};
use arc_swap::ArcSwapOption;
use async_trait::async_trait;
use redis::cluster::{ClusterClient, ClusterClientBuilder};
use redis::cluster_async::ClusterConnection;
use redis::cluster_routing::{
    MultipleNodeRoutingInfo, ResponsePolicy, Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr,
};
use redis::{RedisError, Value};
use std::collections::BTreeMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

/// A cluster connection, made on first use and replaced (at most once a second) after a
/// call on it timed out or lost its node: seen after a failover, an idle connection's
/// view of the slots can keep leading to the old node for many seconds, while a new one
/// reads the topology afresh.
#[derive(Default)]
struct Renewed {
    conn: ArcSwapOption<ClusterConnection>,
    renewed_ms: AtomicU64,
}

impl Renewed {
    fn get(&self, make: impl FnOnce() -> ClusterConnection) -> ClusterConnection {
        if let Some(c) = self.conn.load_full() {
            return (*c).clone();
        }
        let c = make();
        self.conn.store(Some(Arc::new(c.clone())));
        c
    }

    /// After a failed call: drop the connection unless it is brand new.
    fn failed(&self, e: &StoreError) {
        if !matches!(e, StoreError::Timeout | StoreError::Unavailable(_)) {
            return;
        }
        let now = crate::time::now_ms();
        let last = self.renewed_ms.load(Ordering::Relaxed);
        if now.saturating_sub(last) >= 1000
            && self
                .renewed_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            tracing::debug!("replacing a Redis Cluster connection after a failed call");
            self.conn.store(None);
        }
    }
}

/// Buckets of records (one hash slot each, by hash tag).
pub const BUCKETS: usize = 16;

/// A listed entry without its record is a crash leftover once its key was created this
/// long ago (before that, its create may still be in flight).
pub const LEFTOVER_AGE: Duration = Duration::from_secs(60);

/// Insert step 1 (and rotate's): the tenant entry. 1 written, 0 the id exists with another
/// value, 2 the same entry exists already (a retried run, a leftover, or a duplicate insert:
/// the caller tells them apart by the record).
const TENANT_ADD: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur then
  if string.sub(cur, 1, #ARGV[2] + 1) == ARGV[2] .. ' ' then return 2 end
  return 0
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2] .. ' ' .. ARGV[4])
redis.call('ZADD', KEYS[2], 0, ARGV[3])
return 1
";

/// Remove a tenant entry if it still is `ARGV[2]` (repair: the value read), or, with
/// ARGV[4] `any_time`, an entry `ARGV[2] <written ms>` (undo: digest and creation).
const TENANT_DEL: &str = r"
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if cur and (cur == ARGV[2] or (ARGV[4] == 'any_time' and string.sub(cur, 1, #ARGV[2] + 1) == ARGV[2] .. ' ')) then
  redis.call('HDEL', KEYS[1], ARGV[1])
  redis.call('ZREM', KEYS[2], ARGV[3])
  return 1
end
return 0
";

/// A page of the tenant's list: member, ids value ('' when missing), member, ...
const LIST: &str = r"
local members = redis.call('ZRANGE', KEYS[2], ARGV[1], '-', 'BYLEX', 'REV', 'LIMIT', 0, tonumber(ARGV[2]))
local out = {}
for i, m in ipairs(members) do
  out[#out + 1] = m
  out[#out + 1] = redis.call('HGET', KEYS[1], string.sub(m, 18)) or ''
end
return out
";

/// Insert step 2: the record. 1 created, 0 the digest is taken, 2 this id's record is
/// there already (this step ran before: a retry after a lost reply).
const CREATE: &str = r"
if redis.call('EXISTS', KEYS[1]) == 1 then
  if redis.call('HGET', KEYS[1], 'id') == ARGV[4] then return 2 end
  return 0
end
redis.call('HSET', KEYS[1], unpack(ARGV, 5))
local seq = redis.call('INCR', KEYS[2])
redis.call('SPUBLISH', ARGV[1], seq .. ' create ' .. ARGV[2] .. ' ' .. ARGV[3])
return 1
";

/// Undo of a rotation's step 2: delete the record if it is still that id's, and publish
/// so that any cache that saw it drops it.
const DROP: &str = r"
if redis.call('HGET', KEYS[1], 'id') == ARGV[1] then
  redis.call('DEL', KEYS[1])
  local seq = redis.call('INCR', KEYS[2])
  redis.call('SPUBLISH', ARGV[2], seq .. ' revoke ' .. ARGV[3] .. ' ' .. ARGV[4])
  return 1
end
return 0
";

/// The record (empty) when not this tenant's key `ARGV[2]`.
const REVOKE: &str = r"
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'id') ~= ARGV[2] then
  return {}
end
local cur = redis.call('HGET', KEYS[1], 'revoked_at')
if not cur or tonumber(cur) > tonumber(ARGV[3]) then
  redis.call('HSET', KEYS[1], 'revoked_at', ARGV[3])
  local seq = redis.call('INCR', KEYS[2])
  redis.call('SPUBLISH', ARGV[4], seq .. ' revoke ' .. ARGV[5] .. ' ' .. ARGV[3])
end
return redis.call('HGETALL', KEYS[1])
";

/// `{status, record}`: 0 not this tenant's key, 1 updated (or already so), 2 revoked at
/// `now` (ARGV[5]), nothing written. An unchanged record is not published. From ARGV[10]:
/// pairs `field, value` of the limits fields that change (an empty value removes it),
/// as in the standalone script.
const UPDATE: &str = r"
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'id') ~= ARGV[2] then
  return {0, {}}
end
local rev = redis.call('HGET', KEYS[1], 'revoked_at')
if rev and tonumber(rev) <= tonumber(ARGV[5]) then return {2, {}} end
local changed = false
if ARGV[6] == '1' and redis.call('HGET', KEYS[1], 'name') ~= ARGV[7] then
  redis.call('HSET', KEYS[1], 'name', ARGV[7])
  changed = true
end
if ARGV[8] == '1' and redis.call('HGET', KEYS[1], 'scopes') ~= ARGV[9] then
  redis.call('HSET', KEYS[1], 'scopes', ARGV[9])
  changed = true
end
for i = 10, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if ARGV[i + 1] == '' then
    if cur then
      redis.call('HDEL', KEYS[1], ARGV[i])
      changed = true
    end
  elseif cur ~= ARGV[i + 1] then
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
    changed = true
  end
end
if changed then
  local seq = redis.call('INCR', KEYS[2])
  redis.call('SPUBLISH', ARGV[3], seq .. ' update ' .. ARGV[4] .. ' ' .. ARGV[5])
end
return {1, redis.call('HGETALL', KEYS[1])}
";

/// Rotate step 3, on the old record: `{status, old record}`: 0 not this tenant's key,
/// 1 rotated (or this very rotation ran already), 2 revoked or expired, 4 it already has
/// another successor.
const ROTATE_OLD: &str = r"
if redis.call('HGET', KEYS[1], 'tenant') ~= ARGV[1] or redis.call('HGET', KEYS[1], 'id') ~= ARGV[2] then
  return {0, {}}
end
local succ = redis.call('HGET', KEYS[1], 'successor_id')
if succ == ARGV[7] then return {1, redis.call('HGETALL', KEYS[1])} end
local now = tonumber(ARGV[5])
local rev = redis.call('HGET', KEYS[1], 'revoked_at')
local exp = redis.call('HGET', KEYS[1], 'expires_at')
if (rev and tonumber(rev) <= now) or (exp and tonumber(exp) <= now) then
  return {2, {}}
end
if succ then return {4, {}} end
if not rev or tonumber(rev) > tonumber(ARGV[6]) then
  redis.call('HSET', KEYS[1], 'revoked_at', ARGV[6])
end
redis.call('HSET', KEYS[1], 'successor_id', ARGV[7])
local seq = redis.call('INCR', KEYS[2])
redis.call('SPUBLISH', ARGV[3], seq .. ' rotate ' .. ARGV[4] .. ' ' .. ARGV[5])
return {1, redis.call('HGETALL', KEYS[1])}
";

/// As the standalone TOUCH: all keys in one bucket.
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

/// Keys per `touch` script call (as in `redis.rs`: short stalls of each shard).
const TOUCH_CHUNK: usize = 32;

/// Connection settings for a Redis Cluster.
#[derive(Clone, Debug)]
pub struct ClusterSettings {
    /// Seed URLs, e.g. `redis://127.0.0.1:7000` (a password may be in the URL).
    pub nodes: Vec<String>,
    pub namespace: String,
    /// Bound on every call (writes get `ack_timeout` on top).
    pub timeout: Duration,
    /// Replicas that must confirm each write step (`WAIT`); 0: no `WAIT`.
    pub min_replicas_ack: u32,
    pub ack_timeout: Duration,
    /// PEM CA certificate(s) trusted for `rediss://` seeds instead of the system store.
    pub ca_file: Option<std::path::PathBuf>,
}

impl ClusterSettings {
    /// The seeds as logs may show them: passwords left out.
    pub fn display_nodes(&self) -> String {
        self.nodes
            .iter()
            .map(|n| match url::Url::parse(n) {
                Ok(mut u) => {
                    if u.password().is_some() {
                        let _ = u.set_password(Some("REDACTED"));
                    }
                    u.to_string()
                }
                Err(_) => "(unparsable URL)".into(),
            })
            .collect::<Vec<_>>()
            .join(",")
    }
}

/// What the change feed needs: where the cluster is and, per bucket, its channel and
/// counter (index = bucket).
#[derive(Clone, Debug)]
pub struct ClusterFeed {
    pub settings: ClusterSettings,
    pub channels: Vec<String>,
    pub seq_keys: Vec<String>,
    /// Where the feed counts the topology changes it sees.
    pub stats: Arc<super::topology::StoreStats>,
}

impl ClusterFeed {
    /// A client builder for the seeds (TLS roots from `ca_file`), with timeouts and quick
    /// retries; the feed adds RESP3 and its push sender.
    pub fn builder(&self) -> Result<ClusterClientBuilder, StoreError> {
        builder(&self.settings)
    }
}

fn builder(s: &ClusterSettings) -> Result<ClusterClientBuilder, StoreError> {
    if s.nodes.is_empty() {
        return Err(StoreError::Unavailable("no cluster seed nodes".into()));
    }
    let mut b = ClusterClientBuilder::new(s.nodes.iter().map(String::as_str))
        .connection_timeout(s.timeout)
        .response_timeout(s.timeout + s.ack_timeout)
        // The client's default first retry waits 1.28 s, longer than a call's budget.
        .min_retry_wait(10)
        .max_retry_wait(250);
    if let Some(ca) = &s.ca_file {
        #[allow(clippy::disallowed_methods, reason = "once, when the client is built")]
        let pem = std::fs::read(ca)
            .map_err(|e| StoreError::Unavailable(format!("{}: {e}", ca.display())))?;
        b = b.certs(redis::TlsCertificates {
            client_tls: None,
            root_cert: Some(pem),
        });
    }
    Ok(b)
}

#[derive(Clone)]
pub struct ClusterStore {
    client: ClusterClient,
    /// Created on first use (it spawns its task on the runtime that first needs it), or
    /// at `connect` when that runs inside a runtime. Connecting happens in the background.
    conn: Arc<Renewed>,
    /// Write steps: a `WAIT` blocks its connection to that node, so key reads (and the
    /// readiness ping) never share one with it.
    writes: Arc<Renewed>,
    settings: ClusterSettings,
    ns: String,
    /// Unconfirmed writes, for the metrics (a cluster has no single primary to report).
    stats: Arc<super::topology::StoreStats>,
}

/// A key's bucket: the high nibble of its digest's first byte.
pub fn bucket_of(d: &Digest) -> usize {
    usize::from(d[0] >> 4)
}

fn bucket_char(b: usize) -> char {
    char::from_digit(b as u32, 16).expect("bucket below 16")
}

/// One step's outcome: the script's reply, after its `WAIT` confirmed it.
type Step = Result<Value, StoreError>;

impl ClusterStore {
    /// Builds the client; connects in the background (never waits for the cluster).
    pub fn connect(s: &ClusterSettings) -> Result<Self, StoreError> {
        if s.namespace.contains(['{', '}']) {
            return Err(StoreError::Unavailable(
                "a cluster namespace must not contain { or }".into(),
            ));
        }
        let client = builder(s)?
            .build()
            .map_err(|e| StoreError::Unavailable(format!("redis cluster client: {e}")))?;
        let store = ClusterStore {
            client,
            conn: Arc::default(),
            writes: Arc::default(),
            settings: s.clone(),
            ns: s.namespace.clone(),
            stats: Arc::default(),
        };
        if tokio::runtime::Handle::try_current().is_ok() {
            store.conn.get(|| store.new_connection());
            store.writes.get(|| store.new_connection());
        }
        Ok(store)
    }

    fn new_connection(&self) -> ClusterConnection {
        let config = redis::cluster::ClusterConfig::new()
            .set_connection_timeout(self.settings.timeout)
            .set_response_timeout(self.settings.timeout + self.settings.ack_timeout);
        self.client.get_pending_async_connection_with_config(config)
    }

    async fn conn(&self) -> ClusterConnection {
        self.conn.get(|| self.new_connection())
    }

    /// What the metrics report of this store.
    pub fn stats(&self) -> Arc<super::topology::StoreStats> {
        self.stats.clone()
    }

    /// Channels and counters of every bucket, for `feed::cluster::follow`.
    pub fn feed_settings(&self) -> ClusterFeed {
        ClusterFeed {
            settings: self.settings.clone(),
            channels: (0..BUCKETS).map(|b| self.channel(b)).collect(),
            seq_keys: (0..BUCKETS).map(|b| self.seq_key(b)).collect(),
            stats: self.stats.clone(),
        }
    }

    fn tag(&self, b: usize) -> String {
        format!("{}:{{{}.{}}}", self.ns, self.ns, bucket_char(b))
    }
    fn rec_key(&self, d: &Digest) -> String {
        format!("{}:k:{}", self.tag(bucket_of(d)), key::hex(d))
    }
    pub fn seq_key(&self, b: usize) -> String {
        format!("{}:seq", self.tag(b))
    }
    pub fn channel(&self, b: usize) -> String {
        format!("{}:events", self.tag(b))
    }
    fn tenant_tag(&self, tenant: &str) -> String {
        format!("{}:{{{}.t.{}}}", self.ns, self.ns, tenant)
    }
    fn list_key(&self, tenant: &str) -> String {
        format!("{}:list", self.tenant_tag(tenant))
    }
    fn ids_key(&self, tenant: &str) -> String {
        format!("{}:ids", self.tenant_tag(tenant))
    }

    /// Bound a read by `timeout`.
    async fn bounded<T>(
        &self,
        fut: impl Future<Output = Result<T, StoreError>>,
    ) -> Result<T, StoreError> {
        match tokio::time::timeout(self.settings.timeout, fut).await {
            Err(_) => Err(StoreError::Timeout),
            Ok(r) => r,
        }
    }

    /// Run one read (routed by its key) and return its raw reply.
    ///
    /// The client follows MOVED and ASK itself, but during a slot migration an ASK can
    /// still come back: it sends `ASKING` and the redirected command as two requests on a
    /// connection other requests share, so another one may take the `ASKING`, and the
    /// retries run out bouncing between the two nodes. Reads only (nothing ran when a
    /// redirection is answered) get two more tries within the time bound.
    async fn query(&self, cmd: redis::Cmd) -> Result<Value, StoreError> {
        let r = self.query_once(cmd).await;
        if let Err(e) = &r {
            self.conn.failed(e);
        }
        r
    }

    async fn query_once(&self, cmd: redis::Cmd) -> Result<Value, StoreError> {
        self.bounded(async {
            let mut conn = self.conn().await;
            let mut tries = 0;
            loop {
                tries += 1;
                match cmd.query_async::<Value>(&mut conn).await {
                    Err(e) if tries < 3 && (e.redirect_node().is_some() || is_try_again(&e)) => {
                        tokio::time::sleep(Duration::from_millis(5)).await;
                    }
                    other => return other.map_err(map_err),
                }
            }
        })
        .await
    }

    /// One write step: `EVAL` of `script` on the primary of `keys[0]`'s slot, followed on
    /// the same connection by `WAIT` when replicas must confirm.
    async fn step(&self, script: &str, keys: &[&str], args: &[&str]) -> Step {
        let wanted = self.settings.min_replicas_ack;
        let mut pipe = redis::pipe();
        pipe.cmd("EVAL")
            .arg(script)
            .arg(keys.len())
            .arg(keys)
            .arg(args);
        let ack_ms = self.settings.ack_timeout.as_millis().max(1) as u64;
        if wanted > 0 {
            // As in `redis.rs`: a write that always replicates, so `WAIT` covers this
            // step even when the script changed nothing (Redis 7.2+). Same slot.
            pipe.cmd("INCR").arg(fence_key(keys[0]));
            pipe.cmd("WAIT").arg(wanted).arg(ack_ms);
        }
        let count = if wanted > 0 { 3 } else { 1 };
        let route = SingleNodeRoutingInfo::SpecificNode(Route::with_key(keys[0], SlotAddr::Master));
        let budget = self.settings.timeout + self.settings.ack_timeout;
        let work = async {
            let mut conn = self.writes.get(|| self.new_connection());
            conn.route_pipeline(pipe, 0, count, route)
                .await
                .map_err(map_err)
        };
        let sent = match tokio::time::timeout(budget, work).await {
            Err(_) => Err(StoreError::Timeout),
            Ok(r) => r,
        };
        if let Err(e) = &sent {
            self.writes.failed(e);
        }
        let mut replies = sent?.into_iter();
        let reply = replies.next().ok_or_else(|| shape("no script reply"))?;
        let reply = server_error(reply)?;
        if wanted > 0 {
            replies.next().map(server_error).transpose()?;
            let acked = match replies.next().map(server_error).transpose()? {
                Some(Value::Int(n)) => u32::try_from(n).unwrap_or(0),
                _ => return Err(shape("WAIT did not answer a number")),
            };
            if acked < wanted {
                self.stats
                    .ack_failures
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(StoreError::Unconfirmed { acked, wanted });
            }
        }
        Ok(reply)
    }

    /// The tenant's entry for `id`: (as stored, digest, created ms, written ms).
    async fn entry(
        &self,
        tenant: &str,
        id: &str,
    ) -> Result<Option<(String, Digest, u64, u64)>, StoreError> {
        let v = self
            .query(redis::cmd("HGET").arg(self.ids_key(tenant)).arg(id).clone())
            .await?;
        match v {
            Value::Nil => Ok(None),
            v => {
                let text = string(v)?;
                let (d, c, w) = parse_entry(&text).ok_or_else(|| StoreError::Corrupt {
                    key: format!("id {id}"),
                    reason: "malformed tenant entry".into(),
                })?;
                Ok(Some((text, d, c, w)))
            }
        }
    }

    async fn read_record(&self, d: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        let v = self
            .query(redis::cmd("HGETALL").arg(self.rec_key(d)).clone())
            .await?;
        let record = parse_record(strings(v)?)?;
        match record {
            Some(r) if !key::ct_eq(&r.digest, d) => Err(StoreError::Corrupt {
                key: format!("id {}", r.id),
                reason: "digest field does not match its key".into(),
            }),
            other => Ok(other),
        }
    }

    /// The record an entry points to, if it is really that tenant's key `id`; a leftover
    /// entry (no such record, written long enough ago) is removed.
    async fn resolve(
        &self,
        tenant: &str,
        id: &str,
        member: &str,
        entry: &str,
        digest: &Digest,
        written: u64,
    ) -> Result<Option<KeyRecord>, StoreError> {
        let record = self.read_record(digest).await?;
        match record {
            Some(r) if r.tenant == tenant && r.id == id => Ok(Some(r)),
            _ => {
                let age = crate::time::now_ms().saturating_sub(written);
                if age > LEFTOVER_AGE.as_millis() as u64 {
                    tracing::info!(key_id = %id, tenant = %tenant, "removing a listed key whose record is missing (an interrupted create)");
                    // Best effort: the entry stays skipped either way.
                    let _ = self
                        .tenant_del(tenant, id, entry, member, Written::Exact)
                        .await;
                }
                Ok(None)
            }
        }
    }

    /// Remove the entry `entry` (`Written::Exact`: the value read) or any entry of
    /// this digest and creation time (`Written::Any`: an undo).
    async fn tenant_del(
        &self,
        tenant: &str,
        id: &str,
        entry: &str,
        member: &str,
        written: Written,
    ) -> Step {
        let (ids, list) = (self.ids_key(tenant), self.list_key(tenant));
        let mode = match written {
            Written::Exact => "exact",
            Written::Any => "any_time",
        };
        self.step(TENANT_DEL, &[&ids, &list], &[id, entry, member, mode])
            .await
    }

    /// Steps 1 and 2 of insert and rotate: the tenant entry, then the record.
    async fn create(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let hex = key::hex(&record.digest);
        // Identified by digest and creation; the write time (for the repair rule) is
        // appended by the script. Imported records carry old creation times.
        let entry = format!("{hex} {}", record.created_at);
        let member = order_key(record);
        let (ids, list) = (self.ids_key(&record.tenant), self.list_key(&record.tenant));
        let written = crate::time::now_ms().to_string();
        let added = int(self
            .step(
                TENANT_ADD,
                &[&ids, &list],
                &[&record.id, &entry, &member, &written],
            )
            .await?)?;
        match added {
            1 => {}
            2 => {
                // The same entry is there: this call's own step 1 retried by the client, a
                // leftover of an interrupted create of this record, or this record inserted
                // before. Only the last one has a record.
                if let Some(r) = self.read_record(&record.digest).await? {
                    if r.id == record.id {
                        return Err(StoreError::Conflict);
                    }
                }
            }
            _ => return Err(StoreError::Conflict),
        }
        let rec = self.rec_key(&record.digest);
        let seq = self.seq_key(bucket_of(&record.digest));
        let channel = self.channel(bucket_of(&record.digest));
        let now = crate::time::now_ms().to_string();
        let mut args: Vec<String> = vec![channel, hex, now, record.id.clone()];
        for (k, v) in fields(record) {
            args.push(k.into());
            args.push(v);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        match int(self.step(CREATE, &[&rec, &seq], &args).await?)? {
            1 | 2 => Ok(()),
            _ => {
                // The digest belongs to another key: this entry must not stay.
                self.tenant_del(&record.tenant, &record.id, &entry, &member, Written::Any)
                    .await?;
                Err(StoreError::Conflict)
            }
        }
    }

    /// Undo `create` (rotate refused): the record first (publishing, so caches drop it),
    /// then the tenant entry.
    async fn uncreate(&self, record: &KeyRecord) -> Result<(), StoreError> {
        let hex = key::hex(&record.digest);
        let b = bucket_of(&record.digest);
        let (rec, seq, channel) = (
            self.rec_key(&record.digest),
            self.seq_key(b),
            self.channel(b),
        );
        let now = crate::time::now_ms().to_string();
        self.step(DROP, &[&rec, &seq], &[&record.id, &channel, &hex, &now])
            .await?;
        let entry = format!("{hex} {}", record.created_at);
        self.tenant_del(
            &record.tenant,
            &record.id,
            &entry,
            &order_key(record),
            Written::Any,
        )
        .await?;
        Ok(())
    }
}

/// The fence counter in `key`'s hash slot: `<ns>:{tag}:ack`.
fn fence_key(key: &str) -> String {
    match key.find('}') {
        Some(end) => format!("{}:ack", &key[..=end]),
        None => format!("{key}:ack"),
    }
}

/// How `tenant_del` matches the entry.
#[derive(Clone, Copy)]
enum Written {
    Exact,
    Any,
}

/// A tenant entry `<digest hex> <created ms> <written ms>`: (digest, created, written).
fn parse_entry(text: &str) -> Option<(Digest, u64, u64)> {
    let mut parts = text.split(' ');
    let digest = key::unhex(parts.next()?)?;
    let created = parts.next()?.parse().ok()?;
    let written = parts.next()?.parse().ok()?;
    parts.next().is_none().then_some((digest, created, written))
}

/// A client error as a store error. Never quotes a reply (it may hold a digest).
fn map_err(e: RedisError) -> StoreError {
    if e.is_timeout() {
        StoreError::Timeout
    } else if e.kind() == redis::ErrorKind::UnexpectedReturnType {
        shape("unexpected reply type")
    } else {
        StoreError::Unavailable(e.to_string())
    }
}

fn is_try_again(e: &RedisError) -> bool {
    e.kind() == redis::ErrorKind::Server(redis::ServerErrorKind::TryAgain)
}

fn shape(reason: &str) -> StoreError {
    StoreError::Corrupt {
        key: "reply".into(),
        reason: reason.into(),
    }
}

/// A server error inside a pipeline reply, as an error.
fn server_error(v: Value) -> Result<Value, StoreError> {
    match v {
        Value::ServerError(e) => Err(StoreError::Unavailable(RedisError::from(e).to_string())),
        v => Ok(v),
    }
}

fn int(v: Value) -> Result<i64, StoreError> {
    match v {
        Value::Int(n) => Ok(n),
        _ => Err(shape("expected a number")),
    }
}

fn string(v: Value) -> Result<String, StoreError> {
    match v {
        Value::BulkString(b) => String::from_utf8(b).map_err(|_| shape("not UTF-8")),
        Value::SimpleString(s) => Ok(s),
        _ => Err(shape("expected a string")),
    }
}

fn strings(v: Value) -> Result<Vec<String>, StoreError> {
    match v {
        Value::Array(items) => items.into_iter().map(string).collect(),
        Value::Nil => Ok(Vec::new()),
        _ => Err(shape("expected an array")),
    }
}

/// `{status, record}` script replies.
fn status_record(v: Value) -> Result<(i64, Vec<String>), StoreError> {
    match v {
        Value::Array(items) => match <[Value; 2]>::try_from(items) {
            Ok([status, record]) => Ok((int(status)?, strings(record)?)),
            Err(_) => Err(shape("expected {status, record}")),
        },
        _ => Err(shape("expected {status, record}")),
    }
}

#[async_trait]
impl KeyStore for ClusterStore {
    async fn insert(&self, record: &KeyRecord) -> Result<(), StoreError> {
        self.create(record).await
    }

    async fn by_digest(&self, digest: &Digest) -> Result<Option<KeyRecord>, StoreError> {
        self.read_record(digest).await
    }

    async fn by_id(&self, tenant: &str, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let Some((entry, digest, created, written)) = self.entry(tenant, id).await? else {
            return Ok(None);
        };
        let member = format!("{created:016x}:{id}");
        self.resolve(tenant, id, &member, &entry, &digest, written)
            .await
    }

    async fn list(&self, tenant: &str, page: &PageRequest) -> Result<Page, StoreError> {
        let start = match &page.cursor {
            Some(c) => {
                check_cursor(c)?;
                format!("({c}")
            }
            None => "+".into(),
        };
        let (ids, list) = (self.ids_key(tenant), self.list_key(tenant));
        let n = (page.limit + 1).to_string();
        let flat = strings(
            self.query(
                redis::cmd("EVAL")
                    .arg(LIST)
                    .arg(2)
                    .arg(&ids)
                    .arg(&list)
                    .arg(&start)
                    .arg(&n)
                    .clone(),
            )
            .await?,
        )?;
        let rows: Vec<(String, String)> = flat
            .chunks_exact(2)
            .map(|p| (p[0].clone(), p[1].clone()))
            .collect();
        let more = rows.len() > page.limit;
        let scanned = &rows[..rows.len().min(page.limit)];
        let reads = scanned.iter().map(|(member, entry)| async move {
            let id = member.get(17..).unwrap_or_default();
            let Some((digest, _, written)) = parse_entry(entry) else {
                return Ok(None);
            };
            self.resolve(tenant, id, member, entry, &digest, written)
                .await
        });
        let mut items = Vec::with_capacity(scanned.len());
        for r in futures_util::future::join_all(reads).await {
            if let Some(r) = r? {
                items.push(r);
            }
        }
        let next_cursor = if more {
            scanned.last().map(|(m, _)| m.clone())
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
        let Some((_, digest, _, _)) = self.entry(tenant, id).await? else {
            return Ok(None);
        };
        let b = bucket_of(&digest);
        let (rec, seq, channel) = (self.rec_key(&digest), self.seq_key(b), self.channel(b));
        let hex = key::hex(&digest);
        let at = at_ms.to_string();
        let reply = self
            .step(REVOKE, &[&rec, &seq], &[tenant, id, &at, &channel, &hex])
            .await?;
        parse_record(strings(reply)?)
    }

    async fn touch(&self, uses: &[(Digest, u64)]) -> Result<(), StoreError> {
        let mut by_bucket: BTreeMap<usize, Vec<(Digest, u64)>> = BTreeMap::new();
        for (d, at) in uses {
            by_bucket.entry(bucket_of(d)).or_default().push((*d, *at));
        }
        // As in redis.rs: more than one read's timeout per round trip, one bound overall.
        let budget = self.settings.timeout.max(Duration::from_secs(5));
        let deadline = tokio::time::Instant::now() + budget * 6;
        let mut conn = self.conn().await;
        for chunk in by_bucket.values().flat_map(|v| v.chunks(TOUCH_CHUNK)) {
            if tokio::time::Instant::now() >= deadline {
                return Err(StoreError::Timeout);
            }
            let mut cmd = redis::cmd("EVAL");
            cmd.arg(TOUCH).arg(chunk.len());
            for (digest, _) in chunk {
                cmd.arg(self.rec_key(digest));
            }
            for (_, at) in chunk {
                cmd.arg(*at);
            }
            match tokio::time::timeout(budget, cmd.query_async::<Value>(&mut conn)).await {
                Err(_) => return Err(StoreError::Timeout),
                Ok(Err(e)) => return Err(map_err(e)),
                Ok(Ok(_)) => {}
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
        let Some((_, digest, _, _)) = self.entry(tenant, id).await? else {
            return Ok(None);
        };
        let b = bucket_of(&digest);
        let (rec, seq, channel) = (self.rec_key(&digest), self.seq_key(b), self.channel(b));
        let hex = key::hex(&digest);
        let now = now_ms.to_string();
        let flag = |b: bool| if b { "1" } else { "0" };
        let scopes = change
            .scopes
            .as_ref()
            .map(|s| s.join(" "))
            .unwrap_or_default();
        let limits = limit_changes(change);
        let mut args = vec![
            tenant,
            id,
            &channel,
            &hex,
            &now,
            flag(change.name.is_some()),
            change.name.as_deref().unwrap_or(""),
            flag(change.scopes.is_some()),
            &scopes,
        ];
        for (field, value) in &limits {
            args.push(field);
            args.push(value);
        }
        match status_record(self.step(UPDATE, &[&rec, &seq], &args).await?)? {
            (0, _) => Ok(None),
            (1, record) => parse_record(record),
            (2, _) => Err(StoreError::Revoked),
            (code, _) => Err(shape(&format!("unexpected script status {code}"))),
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
        let Some((_, old_digest, _, _)) = self.entry(tenant, old_id).await? else {
            return Ok(None);
        };
        if new.tenant != tenant {
            return Err(StoreError::Conflict);
        }
        self.create(new).await?;
        let b = bucket_of(&old_digest);
        let (rec, seq, channel) = (self.rec_key(&old_digest), self.seq_key(b), self.channel(b));
        let hex = key::hex(&old_digest);
        let (now, revokes) = (now_ms.to_string(), old_revokes_at.to_string());
        let args = [tenant, old_id, &channel, &hex, &now, &revokes, &new.id];
        let outcome = match self.step(ROTATE_OLD, &[&rec, &seq], &args).await {
            Ok(reply) => match status_record(reply)? {
                (1, old) => return parse_record(old),
                (0, _) => Ok(None),
                (2, _) => Err(StoreError::NotRotatable),
                (4, _) => Err(StoreError::AlreadyRotated),
                (code, _) => Err(shape(&format!("unexpected script status {code}"))),
            },
            // Written on the primary, not confirmed: the rotation may stand, so the new
            // key stays (the caller may repeat the call).
            Err(e @ StoreError::Unconfirmed { .. }) => return Err(e),
            Err(e) => Err(e),
        };
        // Unknown (a timeout, a lost reply): the old key may link to `new` already, and
        // undoing would leave it pointing at nothing. Undo only when the old record says
        // it does not; when that cannot be read either, keep `new` (listed, revocable,
        // and nobody holds its text).
        if matches!(
            outcome,
            Err(StoreError::Timeout | StoreError::Unavailable(_))
        ) {
            match self.read_record(&old_digest).await {
                Ok(Some(old)) if old.successor_id.as_deref() != Some(new.id.as_str()) => {}
                Ok(None) => {}
                _ => return outcome,
            }
        }
        self.uncreate(new).await?;
        outcome
    }

    async fn ping(&self) -> Result<(), StoreError> {
        let routing = RoutingInfo::MultiNode((
            MultipleNodeRoutingInfo::AllMasters,
            Some(ResponsePolicy::AllSucceeded),
        ));
        let r = self
            .bounded(async {
                let mut conn = self.conn().await;
                conn.route_command(redis::cmd("PING"), routing)
                    .await
                    .map_err(map_err)?;
                Ok(())
            })
            .await;
        if let Err(e) = &r {
            self.conn.failed(e);
        }
        r
    }

    fn kind(&self) -> &'static str {
        "redis-cluster"
    }

    fn scripts(&self) -> Option<Arc<dyn Scripts>> {
        Some(Arc::new(ClusterScripts(self.clone())))
    }
}

/// Rate-limit scripts on the primary of their keys' slot (`KeyStore::scripts`).
struct ClusterScripts(ClusterStore);

#[async_trait]
impl Scripts for ClusterScripts {
    async fn eval(
        &self,
        script: &redis::Script,
        keys: &[String],
        args: &[String],
    ) -> Result<Value, StoreError> {
        let store = &self.0;
        let mut invocation = script.prepare_invoke();
        for k in keys {
            invocation.key(k);
        }
        for a in args {
            invocation.arg(a);
        }
        // Over the read connection (never behind a `WAIT`); the client routes `EVALSHA`
        // by its first key and follows MOVED and ASK, and on `NOSCRIPT` loads the script
        // on every node. A redirection or TRYAGAIN that still comes back (see `query`)
        // means the script did not run, so it is sent again within the time bound; any
        // other failure is not: the script may have run. (The client itself resends a
        // request after a dropped connection, as for every call: see the module doc. A
        // counter may then count that one request twice.)
        let r = store
            .bounded(async {
                let mut conn = store.conn().await;
                let mut tries = 0;
                loop {
                    tries += 1;
                    match invocation.invoke_async::<Value>(&mut conn).await {
                        Err(e)
                            if tries < 3 && (e.redirect_node().is_some() || is_try_again(&e)) =>
                        {
                            tokio::time::sleep(Duration::from_millis(5)).await;
                        }
                        other => return other.map_err(map_err),
                    }
                }
            })
            .await;
        if let Err(e) = &r {
            store.conn.failed(e);
        }
        r
    }

    fn namespace(&self) -> &str {
        &self.0.ns
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn store() -> ClusterStore {
        ClusterStore::connect(&ClusterSettings {
            nodes: vec!["redis://127.0.0.1:1".into()],
            namespace: "ns".into(),
            timeout: Duration::from_millis(100),
            min_replicas_ack: 0,
            ack_timeout: Duration::from_millis(100),
            ca_file: None,
        })
        .unwrap()
    }

    #[test]
    fn keys_of_a_bucket_share_a_hash_tag() {
        let s = store();
        let mut d = [0u8; 32];
        d[0] = 0xa7;
        assert_eq!(bucket_of(&d), 10);
        assert!(s.rec_key(&d).starts_with("ns:{ns.a}:k:a7"));
        assert_eq!(s.seq_key(10), "ns:{ns.a}:seq");
        assert_eq!(s.channel(10), "ns:{ns.a}:events");
        assert_eq!(s.list_key("acme"), "ns:{ns.t.acme}:list");
        assert_eq!(s.ids_key("acme"), "ns:{ns.t.acme}:ids");
        let tag = |k: &str| {
            let open = k.find('{').unwrap();
            k[open..=open + k[open..].find('}').unwrap()].to_string()
        };
        assert_eq!(tag(&s.rec_key(&d)), "{ns.a}");
        assert_eq!(tag(&s.seq_key(10)), "{ns.a}");
        assert_eq!(tag(&s.channel(10)), "{ns.a}");
        assert_eq!(tag(&s.list_key("acme")), "{ns.t.acme}");
        assert_eq!(tag(&s.ids_key("acme")), "{ns.t.acme}");
    }

    #[test]
    fn a_namespace_with_braces_is_refused() {
        let mut settings = store().settings;
        settings.namespace = "a{b}".into();
        assert!(ClusterStore::connect(&settings).is_err());
    }

    #[test]
    fn display_nodes_never_shows_a_password() {
        let mut settings = store().settings;
        settings.nodes = vec![
            "redis://:s3cret@10.0.0.5:7000".into(),
            "redis://h:7001".into(),
        ];
        let shown = settings.display_nodes();
        assert!(!shown.contains("s3cret"), "{shown}");
        assert!(shown.contains("10.0.0.5:7000"));
    }
}
