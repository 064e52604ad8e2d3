//! Test harness for Redis Cluster: `Cluster::start()` runs 6 private redis-server nodes
//! (3 primaries, 1 replica each; free ports, bus ports given explicitly, each node in its
//! own temp dir, no persistence), joins them with `redis-cli --cluster create`, and waits
//! until every node says `cluster_state:ok` with all 16384 slots covered and every
//! replica in sync. Helpers: seed URLs, which primary serves a slot, SIGKILL a primary
//! and wait for its replica's promotion, restart a killed node (it rejoins as a replica),
//! move slots with `redis-cli --cluster reshard`, command counts summed over the nodes.
//! Everything is killed on drop.
#![allow(dead_code)]

use crate::support::free_port;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub struct Node {
    pub port: u16,
    bus_port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

impl Node {
    fn start() -> Node {
        let mut n = Node {
            port: free_port(),
            bus_port: free_port(),
            dir: tempfile::tempdir().expect("temp dir"),
            child: None,
        };
        n.launch();
        n
    }

    fn launch(&mut self) {
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string()])
            .args(["--cluster-port", &self.bus_port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .arg("--dir")
            .arg(self.dir.path())
            .args(["--cluster-enabled", "yes"])
            .args(["--cluster-config-file", "nodes.conf"])
            .args(["--cluster-node-timeout", "1000"])
            .args(["--save", ""])
            .args(["--appendonly", "no"])
            .args(["--daemonize", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server (apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.try_cmd::<String>(&["PING"]).is_err() {
            assert!(
                Instant::now() < deadline,
                "node {} did not start",
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn alive(&self) -> bool {
        self.child.is_some()
    }

    pub fn addr(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    fn conn(&self) -> redis::RedisResult<redis::Connection> {
        redis::Client::open(self.url())?.get_connection_with_timeout(Duration::from_secs(2))
    }

    /// One command to this node alone (no redirection).
    pub fn try_cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> redis::RedisResult<T> {
        let mut c = self.conn()?;
        let mut cmd = redis::cmd(args[0]);
        for a in &args[1..] {
            cmd.arg(*a);
        }
        cmd.query(&mut c)
    }

    pub fn cmd<T: redis::FromRedisValue>(&self, args: &[&str]) -> T {
        self.try_cmd(args)
            .unwrap_or_else(|e| panic!("{:?} on node {}: {e}", args, self.port))
    }

    pub fn id(&self) -> String {
        self.cmd(&["CLUSTER", "MYID"])
    }

    fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
pub struct NodeView {
    pub id: String,
    pub port: u16,
    pub master: bool,
    pub failed: bool,
    /// A replica's primary (its node id).
    pub replica_of: Option<String>,
    /// Slot ranges served (inclusive).
    pub slots: Vec<(u16, u16)>,
}

pub struct Cluster {
    pub nodes: Vec<Node>,
}

impl Cluster {
    pub fn start() -> Cluster {
        let nodes: Vec<Node> = (0..6).map(|_| Node::start()).collect();
        let cluster = Cluster { nodes };
        let mut create = Command::new("redis-cli");
        create.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            create.arg(n.addr());
        }
        let out = create
            .args(["--cluster-replicas", "1", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create failed: {}",
            String::from_utf8_lossy(&out.stdout)
        );
        cluster.wait_healthy(Duration::from_secs(20));
        cluster
    }

    pub fn seeds(&self) -> Vec<String> {
        self.nodes.iter().map(Node::url).collect()
    }

    fn live(&self) -> impl Iterator<Item = &Node> {
        self.nodes.iter().filter(|n| n.alive())
    }

    /// The cluster as a live node sees it.
    pub fn view(&self) -> Vec<NodeView> {
        let node = self.live().next().expect("a live node");
        let text: String = node.cmd(&["CLUSTER", "NODES"]);
        parse_nodes(&text)
    }

    fn healthy(&self) -> bool {
        for n in self.live() {
            let Ok(info) = n.try_cmd::<String>(&["CLUSTER", "INFO"]) else {
                return false;
            };
            if !info.contains("cluster_state:ok") || !info.contains("cluster_slots_ok:16384") {
                return false;
            }
            let Ok(repl) = n.try_cmd::<String>(&["INFO", "replication"]) else {
                return false;
            };
            if repl.contains("role:slave") && !repl.contains("master_link_status:up") {
                return false;
            }
            if let Ok(text) = n.try_cmd::<String>(&["CLUSTER", "NODES"]) {
                let view = parse_nodes(&text);
                let live_ports: Vec<u16> = self.live().map(|n| n.port).collect();
                // Every node agrees that the live ones are not failing and dead ones
                // serve nothing.
                for v in &view {
                    let alive = live_ports.contains(&v.port);
                    if alive == v.failed || (!alive && !v.slots.is_empty()) {
                        return false;
                    }
                }
                let covered: u32 = view
                    .iter()
                    .filter(|v| v.master && !v.failed)
                    .flat_map(|v| v.slots.iter())
                    .map(|(a, b)| u32::from(b - a) + 1)
                    .sum();
                if covered != 16384 {
                    return false;
                }
            } else {
                return false;
            }
        }
        true
    }

    pub fn wait_healthy(&self, within: Duration) {
        let deadline = Instant::now() + within;
        while !self.healthy() {
            assert!(
                Instant::now() < deadline,
                "the cluster did not become healthy in {within:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Index (into `nodes`) of the primary serving `slot`.
    pub fn primary_for_slot(&self, slot: u16) -> usize {
        let view = self.view();
        let v = view
            .iter()
            .find(|v| v.master && !v.failed && v.slots.iter().any(|&(a, b)| a <= slot && slot <= b))
            .unwrap_or_else(|| panic!("no primary serves slot {slot}: {view:?}"));
        self.index_of(v.port)
    }

    pub fn index_of(&self, port: u16) -> usize {
        self.nodes
            .iter()
            .position(|n| n.port == port)
            .expect("a node of ours")
    }

    /// Primaries, as indexes into `nodes`.
    pub fn primaries(&self) -> Vec<usize> {
        self.view()
            .iter()
            .filter(|v| v.master && !v.failed && !v.slots.is_empty())
            .map(|v| self.index_of(v.port))
            .collect()
    }

    /// SIGKILL node `i` (no wait).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// SIGKILL primary `i` and wait until a replica took over its slots and the cluster
    /// is ok again. Returns how long that took.
    pub fn kill_primary(&mut self, i: usize) -> Duration {
        let started = Instant::now();
        self.kill(i);
        self.wait_healthy(Duration::from_secs(30));
        started.elapsed()
    }

    /// Cut primary `i` off from its replica (SIGSTOP the replica, then drop its link on the
    /// primary), so that writes from now on reach the primary alone. Returns the replica's
    /// index, for `resume`.
    pub fn cut_replication(&self, i: usize) -> usize {
        let id = self.nodes[i].id();
        let view = self.view();
        let replica = view
            .iter()
            .find(|v| v.replica_of.as_deref() == Some(id.as_str()) && !v.failed)
            .map(|v| self.index_of(v.port))
            .expect("the primary has a replica");
        self.signal(replica, "-STOP");
        let _: i64 = self.nodes[i].cmd(&["CLIENT", "KILL", "TYPE", "replica"]);
        replica
    }

    /// SIGCONT a node stopped by `cut_replication`.
    pub fn resume(&self, i: usize) {
        self.signal(i, "-CONT");
    }

    fn signal(&self, i: usize, signal: &str) {
        let pid = self.nodes[i].child.as_ref().expect("a live node").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success());
    }

    /// Start a killed node again (same port, same nodes.conf): it rejoins the cluster, as a
    /// replica of whoever took over its slots. Waits until the cluster is healthy.
    pub fn restart(&mut self, i: usize) {
        self.nodes[i].launch();
        self.wait_healthy(Duration::from_secs(30));
    }

    /// Move `count` slots from primary `from` to primary `to` with
    /// `redis-cli --cluster reshard` (it takes the source's lowest slots).
    /// Keys move one `MIGRATE` at a time (`--cluster-pipeline 1`), so a slot is half-moved
    /// for a while (ASK redirections).
    pub fn reshard(&self, from: usize, to: usize, count: u32) {
        let (from_id, to_id) = (self.nodes[from].id(), self.nodes[to].id());
        let out = Command::new("redis-cli")
            .args(["--cluster", "reshard", &self.nodes[to].addr()])
            .args(["--cluster-from", &from_id, "--cluster-to", &to_id])
            .args(["--cluster-slots", &count.to_string(), "--cluster-yes"])
            .args(["--cluster-pipeline", "1"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster reshard");
        assert!(
            out.status.success(),
            "reshard failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// Move one slot from primary `from` to primary `to` by hand, one key per `MIGRATE`
    /// with `pause` between keys, so the slot stays half-moved (reads of moved keys are
    /// answered ASK) for a while.
    pub fn move_slot(&self, slot: u16, from: usize, to: usize, pause: Duration) {
        let (src, dst) = (&self.nodes[from], &self.nodes[to]);
        let (src_id, dst_id) = (src.id(), dst.id());
        let slot = slot.to_string();
        let _: () = dst.cmd(&["CLUSTER", "SETSLOT", &slot, "IMPORTING", &src_id]);
        let _: () = src.cmd(&["CLUSTER", "SETSLOT", &slot, "MIGRATING", &dst_id]);
        loop {
            let keys: Vec<String> = src.cmd(&["CLUSTER", "GETKEYSINSLOT", &slot, "1"]);
            let Some(key) = keys.first() else { break };
            let port = dst.port.to_string();
            let _: () = src.cmd(&["MIGRATE", "127.0.0.1", &port, key, "0", "5000"]);
            std::thread::sleep(pause);
        }
        let _: () = dst.cmd(&["CLUSTER", "SETSLOT", &slot, "NODE", &dst_id]);
        let _: () = src.cmd(&["CLUSTER", "SETSLOT", &slot, "NODE", &dst_id]);
        for i in self.primaries() {
            if i != from && i != to {
                let _: () = self.nodes[i].cmd(&["CLUSTER", "SETSLOT", &slot, "NODE", &dst_id]);
            }
        }
    }

    /// Times `command` (lowercase) ran, summed over live nodes.
    pub fn calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{command}:calls=");
        self.live()
            .map(|n| {
                let info: String = n.cmd(&["INFO", "commandstats"]);
                info.lines()
                    .find_map(|l| l.strip_prefix(&prefix))
                    .and_then(|rest| rest.split(',').next())
                    .and_then(|c| c.parse::<u64>().ok())
                    .unwrap_or(0)
            })
            .sum()
    }

    /// Every key on every live primary.
    pub fn all_keys(&self) -> Vec<String> {
        let primaries = self.primaries();
        primaries
            .into_iter()
            .flat_map(|i| self.nodes[i].cmd::<Vec<String>>(&["KEYS", "*"]))
            .collect()
    }

    /// A connection that follows the cluster's routing (for writing test data directly).
    pub fn client(&self) -> redis::cluster::ClusterConnection {
        redis::cluster::ClusterClient::new(self.live().map(Node::url).collect::<Vec<_>>())
            .expect("cluster client")
            .get_connection()
            .expect("cluster connection")
    }
}

/// The hash slot of a key (CRC16/XMODEM of its hash tag, mod 16384), as Redis computes it.
pub fn slot(key: &str) -> u16 {
    let b = key.as_bytes();
    let hashed = match b.iter().position(|&c| c == b'{') {
        Some(open) => match b[open + 1..].iter().position(|&c| c == b'}') {
            Some(len) if len > 0 => &b[open + 1..open + 1 + len],
            _ => b,
        },
        None => b,
    };
    let mut crc: u16 = 0;
    for &byte in hashed {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc % 16384
}

fn parse_nodes(text: &str) -> Vec<NodeView> {
    text.lines()
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 8 {
                return None;
            }
            let port = f[1].split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags = f[2];
            let slots = f[8..]
                .iter()
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|a| (a, a)),
                })
                .collect();
            Some(NodeView {
                id: f[0].to_string(),
                port,
                master: flags.contains("master"),
                failed: flags.contains("fail") && !flags.contains("fail?")
                    || flags.contains("noaddr"),
                replica_of: (f[3] != "-").then(|| f[3].to_string()),
                slots,
            })
        })
        .collect()
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
    }
}
