//! Where the Redis primary is. `Target` holds the current primary (a fixed server, or
//! the one the sentinels name) with a generation number; connections built on it are
//! rebuilt when the generation moves. `follow_sentinels` keeps it current: it asks the
//! sentinels, checks the answer with `ROLE`, and listens for `+switch-master` (the redis
//! crate's own Sentinel client does not follow a failover, redis-rs issue 1438).

use super::StoreError;
use arc_swap::{ArcSwap, ArcSwapOption};
use redis::aio::ConnectionManager;
use redis::aio::ConnectionManagerConfig;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{watch, Notify};

/// What the store has seen of its topology, read by the metrics at each scrape.
#[derive(Default, Debug)]
pub struct StoreStats {
    /// Times keygate moved its connections to another primary.
    pub primary_changes: AtomicU64,
    /// `+switch-master` announcements received from the sentinels.
    pub failovers: AtomicU64,
    /// Management writes answered `replication_unconfirmed`.
    pub ack_failures: AtomicU64,
    /// Cluster: a node's connection lost or a bucket's slot moved (seen by the feed).
    pub topology_changes: AtomicU64,
    /// The primary now in use (`host:port`), when one is known.
    pub primary: ArcSwapOption<String>,
}

/// One server to talk to.
pub struct Node {
    /// `host:port`: safe for logs and metric labels.
    pub addr: String,
    pub client: redis::Client,
}

struct Current {
    generation: u64,
    node: Option<Arc<Node>>,
}

/// The current primary; `None` while none is known (keygate then reports unready).
pub struct Target {
    current: ArcSwap<Current>,
    /// Bumped with every change of primary: the change feed resubscribes on it.
    changed: watch::Sender<u64>,
    /// "Look again now": a node answered READONLY or MASTERDOWN.
    suspect: Notify,
    pub stats: Arc<StoreStats>,
}

impl Target {
    pub fn new(node: Option<Node>) -> Arc<Target> {
        let stats = Arc::new(StoreStats::default());
        stats
            .primary
            .store(node.as_ref().map(|n| Arc::new(n.addr.clone())));
        Arc::new(Target {
            current: ArcSwap::from_pointee(Current {
                generation: 0,
                node: node.map(Arc::new),
            }),
            changed: watch::Sender::new(0),
            suspect: Notify::new(),
            stats,
        })
    }

    pub fn node(&self) -> Option<Arc<Node>> {
        self.current.load().node.clone()
    }

    /// Watch for primary changes (the generation).
    pub fn subscribe(&self) -> watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// A reply said this node is not (or no longer) the primary.
    pub fn suspect(&self) {
        self.suspect.notify_one();
    }

    fn set(&self, node: Option<Node>) {
        let generation = self.current.load().generation + 1;
        self.stats
            .primary
            .store(node.as_ref().map(|n| Arc::new(n.addr.clone())));
        self.current.store(Arc::new(Current {
            generation,
            node: node.map(Arc::new),
        }));
        self.changed.send_replace(generation);
    }
}

/// A connection to the target's current primary, rebuilt (lazily) when it changes.
/// Clones share the connection.
#[derive(Clone)]
pub struct Link {
    target: Arc<Target>,
    config: ConnectionManagerConfig,
    conn: Arc<ArcSwapOption<(u64, ConnectionManager)>>,
    /// When `checked` last handed the connection out (`time::mono_ms`; 0: never).
    last_used_ms: Arc<AtomicU64>,
}

/// Idle this long, a connection is pinged before a command that is sent only once.
const IDLE_CHECK_MS: u64 = 1_000;
/// At most this long for that `PING` (a dead peer's silence): then the command is sent.
const PING_TIMEOUT: Duration = Duration::from_secs(1);

impl Link {
    pub fn new(target: Arc<Target>, config: ConnectionManagerConfig) -> Link {
        Link {
            target,
            config,
            conn: Arc::new(ArcSwapOption::empty()),
            last_used_ms: Arc::new(AtomicU64::new(0)),
        }
    }

    /// `get`, for a connection that may have sat idle (a worker's reads on misses, a
    /// rate-limit script, which must not be sent twice, a periodic flush). One idle for a
    /// second or more is pinged first: Redis' `timeout`, a NAT or a restart may have
    /// closed it meanwhile, and the command would fail on it although Redis is up. A failed `PING` makes the manager
    /// reconnect, and the command then goes over the new connection. Call it within the
    /// caller's time bound.
    pub async fn checked(&self) -> Result<ConnectionManager, StoreError> {
        let mut conn = self.get()?;
        let now = crate::time::mono_ms().max(1);
        let last = self.last_used_ms.swap(now, Ordering::Relaxed);
        if now.saturating_sub(last) >= IDLE_CHECK_MS {
            let cmd = redis::cmd("PING");
            let ping = cmd.query_async::<()>(&mut conn);
            if let Ok(Err(e)) = tokio::time::timeout(PING_TIMEOUT, ping).await {
                tracing::debug!(error = %e, "idle Redis connection was closed; reconnecting");
            }
        }
        Ok(conn)
    }

    /// Another connection to the same target (a proxy worker's own).
    pub fn sibling(&self) -> Link {
        Link::new(self.target.clone(), self.config.clone())
    }

    pub fn target(&self) -> &Arc<Target> {
        &self.target
    }

    /// The connection to use now.
    pub fn get(&self) -> Result<ConnectionManager, StoreError> {
        let current = self.target.current.load();
        if let Some(c) = self.conn.load().as_ref() {
            if c.0 == current.generation {
                return Ok(c.1.clone());
            }
        }
        let node = current
            .node
            .as_ref()
            .ok_or_else(|| StoreError::Unavailable("no Redis primary is known".into()))?;
        let conn =
            ConnectionManager::new_lazy_with_config(node.client.clone(), self.config.clone())
                .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        // Two callers racing here each build one; the loser's is dropped unused.
        self.conn
            .store(Some(Arc::new((current.generation, conn.clone()))));
        Ok(conn)
    }
}

/// A few connections, each used by one caller at a time (management writes: a `WAIT`
/// blocks its connection). When all are busy a caller gets a connection of its own for
/// that one use. Lock-free: a flag per connection.
pub struct Pool {
    links: Vec<(AtomicBool, Link)>,
}

/// Connections kept open in a `Pool`.
const POOLED: usize = 4;

impl Pool {
    pub fn new(first: Link) -> Pool {
        let mut links = vec![(AtomicBool::new(false), first.sibling())];
        links.extend((1..POOLED).map(|_| (AtomicBool::new(false), first.sibling())));
        Pool { links }
    }

    /// A connection nobody else is using until the guard drops.
    pub fn claim(&self) -> Claimed<'_> {
        for (busy, link) in &self.links {
            if busy
                .compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed)
                .is_ok()
            {
                return Claimed {
                    link: link.clone(),
                    busy: Some(busy),
                };
            }
        }
        Claimed {
            link: self.links[0].1.sibling(),
            busy: None,
        }
    }
}

pub struct Claimed<'a> {
    link: Link,
    busy: Option<&'a AtomicBool>,
}

impl std::ops::Deref for Claimed<'_> {
    type Target = Link;
    fn deref(&self) -> &Link {
        &self.link
    }
}

impl Drop for Claimed<'_> {
    fn drop(&mut self) {
        if let Some(busy) = self.busy {
            busy.store(false, Ordering::Release);
        }
    }
}

/// `host:port`, with IPv6 hosts in brackets (`[::1]:6379`).
pub fn host_port(host: &str, port: u16) -> String {
    if host.contains(':') && !host.starts_with('[') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

/// Is this error a node saying it is not the primary (any more)?
pub fn is_not_primary(e: &redis::RedisError) -> bool {
    use redis::{ErrorKind, ServerErrorKind};
    matches!(
        e.kind(),
        ErrorKind::Server(ServerErrorKind::ReadOnly | ServerErrorKind::MasterDown)
    )
}

/// A client for the server at `host:port`.
pub type ClientFor = Arc<dyn Fn(&str) -> Result<redis::Client, String> + Send + Sync>;

/// How to reach the sentinels and the nodes they name.
#[derive(Clone)]
pub struct SentinelWatch {
    pub master_name: String,
    /// The sentinels, `host:port`.
    pub sentinels: Vec<String>,
    /// A client for a node at `host:port` (credentials and TLS as configured).
    pub node_client: ClientFor,
    pub sentinel_client: ClientFor,
    /// Bound on each question to a sentinel or node.
    pub timeout: Duration,
}

/// How often the primary is checked even when no sentinel announced a change.
const RECHECK: Duration = Duration::from_secs(5);

/// Keep `target` on the primary the sentinels name, until `shutdown`.
pub async fn follow_sentinels(
    watch: SentinelWatch,
    target: Arc<Target>,
    mut shutdown: watch::Receiver<bool>,
) {
    let mut announcements = Announcements::default();
    let mut announced = None;
    let mut quiet = Quiet::default();
    loop {
        locate_once(&watch, &target, announced.take(), &mut quiet).await;
        if announcements.stream.is_none() {
            announcements.connect(&watch).await;
        }
        tokio::select! {
            switched = announcements.next(&watch.master_name) => {
                if let Some(addr) = switched {
                    target.stats.failovers.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(master = %watch.master_name, primary = %addr, "a sentinel announced a failover");
                    announced = Some(addr);
                }
            }
            _ = target.suspect.notified() => {
                // A flood of READONLY replies must not become a flood of questions.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            _ = tokio::time::sleep(RECHECK) => {}
            _ = shutdown.changed() => return,
        }
    }
}

/// Ask the sentinels for the primary (the node a `+switch-master` just announced first,
/// since the other sentinels may not have heard yet) and move `target` if it changed. A
/// node is used only once it says `ROLE` master.
async fn locate_once(
    watch: &SentinelWatch,
    target: &Target,
    announced: Option<String>,
    quiet: &mut Quiet,
) {
    let mut why = Vec::new();
    let found = match announced {
        Some(addr) => checked(watch, addr).await.map_err(|e| why.push(e)).ok(),
        None => None,
    };
    let found = match found {
        Some(node) => Some(node),
        None => ask_sentinels(watch, &mut why).await,
    };
    let current = target.node();
    match (found, current) {
        (Some(found), Some(cur)) if found.addr == cur.addr => {}
        (Some(found), cur) => {
            if target.current.load().generation == 0 {
                tracing::info!(primary = %found.addr, "the sentinels name the Redis primary");
            } else {
                let was = cur.map_or_else(|| "none".to_string(), |n| n.addr.clone());
                tracing::warn!(primary = %found.addr, was = %was, "Redis primary changed; moving every connection");
                target.stats.primary_changes.fetch_add(1, Ordering::Relaxed);
            }
            target.set(Some(found));
        }
        (None, Some(cur)) => {
            // No sentinel names a usable primary: keep the current one while it still
            // says it is the primary, else report none (not ready) rather than write to
            // a replica.
            quiet.warn(&why);
            match role(&cur.client, watch.timeout).await.as_deref() {
                // No answer (a slow node, a blip) is not a demotion: keep it.
                Ok("master") | Err(_) => {}
                Ok(other) => {
                    tracing::warn!(was = %cur.addr, role = other, "the Redis primary was demoted and no sentinel names another; no primary is known");
                    target.set(None);
                }
            }
        }
        (None, None) => quiet.warn(&why),
    }
}

async fn ask_sentinels(watch: &SentinelWatch, why: &mut Vec<String>) -> Option<Node> {
    for sentinel in &watch.sentinels {
        let client = match (watch.sentinel_client)(sentinel) {
            Ok(c) => c,
            Err(e) => {
                why.push(format!("sentinel {sentinel}: {e}"));
                continue;
            }
        };
        let ask = async {
            let mut conn = client.get_multiplexed_async_connection().await?;
            redis::cmd("SENTINEL")
                .arg("get-master-addr-by-name")
                .arg(&watch.master_name)
                .query_async::<Option<(String, u16)>>(&mut conn)
                .await
        };
        let addr = match tokio::time::timeout(watch.timeout, ask).await {
            Ok(Ok(Some((host, port)))) => host_port(&host, port),
            Ok(Ok(None)) => {
                why.push(format!(
                    "sentinel {sentinel} does not know master {}",
                    watch.master_name
                ));
                continue;
            }
            Ok(Err(e)) => {
                why.push(format!("sentinel {sentinel}: {e}"));
                continue;
            }
            Err(_) => {
                why.push(format!(
                    "sentinel {sentinel}: no answer in {:?}",
                    watch.timeout
                ));
                continue;
            }
        };
        match checked(watch, addr).await {
            Ok(node) => return Some(node),
            Err(e) => why.push(e),
        }
    }
    None
}

/// The node at `addr`, if it says it is a primary.
async fn checked(watch: &SentinelWatch, addr: String) -> Result<Node, String> {
    let client = (watch.node_client)(&addr).map_err(|e| format!("node {addr}: {e}"))?;
    match role(&client, watch.timeout).await {
        Ok(r) if r == "master" => Ok(Node { addr, client }),
        Ok(r) => Err(format!("node {addr} is named primary but says {r}")),
        Err(e) => Err(format!("node {addr}: {e}")),
    }
}

/// The node's `ROLE` (`master`, `slave`, ...), or why it did not say.
async fn role(client: &redis::Client, timeout: Duration) -> Result<String, String> {
    let ask = async {
        let mut conn = client.get_multiplexed_async_connection().await?;
        let reply: Vec<redis::Value> = redis::cmd("ROLE").query_async(&mut conn).await?;
        let first = reply.into_iter().next().unwrap_or(redis::Value::Nil);
        Ok::<_, redis::RedisError>(redis::from_redis_value::<String>(first)?)
    };
    match tokio::time::timeout(timeout, ask).await {
        Ok(Ok(r)) => Ok(r),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer in {timeout:?}")),
    }
}

/// Why no primary was found, logged at most every `QUIET` (a wrong password or name
/// would otherwise be silent, or a line per second).
#[derive(Default)]
struct Quiet {
    last: Option<tokio::time::Instant>,
}

const QUIET: Duration = Duration::from_secs(10);

impl Quiet {
    fn warn(&mut self, why: &[String]) {
        let now = tokio::time::Instant::now();
        if why.is_empty() || self.last.is_some_and(|t| now < t + QUIET) {
            return;
        }
        self.last = Some(now);
        tracing::warn!(reasons = %why.join("; "), "no sentinel names a usable Redis primary");
    }
}

/// `+switch-master` messages from one sentinel at a time.
#[derive(Default)]
struct Announcements {
    stream: Option<futures_util::stream::BoxStream<'static, redis::Msg>>,
    /// Which sentinel to try next.
    next: usize,
}

impl Announcements {
    async fn connect(&mut self, watch: &SentinelWatch) {
        for _ in 0..watch.sentinels.len() {
            let sentinel = &watch.sentinels[self.next % watch.sentinels.len()];
            self.next += 1;
            let Ok(client) = (watch.sentinel_client)(sentinel) else {
                continue;
            };
            let sub = async {
                let mut pubsub = client.get_async_pubsub().await?;
                pubsub.subscribe("+switch-master").await?;
                Ok::<_, redis::RedisError>(pubsub)
            };
            if let Ok(Ok(pubsub)) = tokio::time::timeout(watch.timeout, sub).await {
                use futures_util::StreamExt;
                self.stream = Some(pubsub.into_on_message().boxed());
                return;
            }
        }
    }

    /// Wait for an announcement about `master`: the new primary's `host:port`; the
    /// subscription ended (or none could be made): `None` after a short pause, so the
    /// caller looks again.
    async fn next(&mut self, master: &str) -> Option<String> {
        use futures_util::StreamExt;
        let Some(stream) = self.stream.as_mut() else {
            tokio::time::sleep(Duration::from_millis(500)).await;
            return None;
        };
        loop {
            let Some(msg) = stream.next().await else {
                // A sentinel that drops the subscription at once must not make this a
                // loop of connections.
                self.stream = None;
                tokio::time::sleep(Duration::from_millis(500)).await;
                return None;
            };
            // `<master name> <old ip> <old port> <new ip> <new port>`
            let payload: String = msg.get_payload().unwrap_or_default();
            let parts: Vec<&str> = payload.split(' ').collect();
            if let [name, _, _, ip, port] = parts[..] {
                if let (true, Ok(port)) = (name == master, port.parse::<u16>()) {
                    return Some(host_port(ip, port));
                }
            }
        }
    }
}
