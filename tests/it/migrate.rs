//! `keygate migrate` copies a standalone dataset into a Redis Cluster, and keygate then
//! serves those keys from the cluster: live ones pass, revoked ones stay revoked, all are
//! listed, and a revoke on one replica reaches another through the sharded channels.

use crate::support::{assert_error, eventually, spawn_app, Redis, Store};
use crate::support_cluster::Cluster;
use keygate::store::cluster::{ClusterSettings, ClusterStore};
use keygate::store::redis::{RedisSettings, RedisStore};
use keygate::store::KeyStore;
use std::process::Command;
use std::time::Duration;

const PATH: &str = "/users/1";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standalone_dataset_moves_to_a_cluster_and_keeps_working() {
    let redis = Redis::start();
    let old = spawn_app(Store::Redis(&redis)).await;
    let mut keys = Vec::new();
    for _ in 0..6 {
        keys.push(old.create_key(&["users:read"]).await);
    }
    assert_eq!(old.revoke(&keys[0].id).await.status().as_u16(), 200);
    old.stop().await;
    // And one with its own rate limits, credits and budget, written by the store.
    let source = RedisStore::connect(&RedisSettings::standalone(
        &redis.url,
        "kgtest",
        Duration::from_secs(1),
    ))
    .unwrap();
    let mut limited = crate::contract::record("limited", keygate::time::now_ms());
    limited.limits = crate::contract::some_limits();
    source.insert(&limited).await.unwrap();

    let cluster = tokio::task::spawn_blocking(Cluster::start).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("cluster.yaml");
    std::fs::write(
        &config,
        format!(
            "proxy: {{ listen: 127.0.0.1:0, upstream: http://127.0.0.1:9 }}\n\
             admin: {{ listen: 127.0.0.1:0 }}\n\
             store:\n  redis: {{ cluster: {{ nodes: {:?} }}, namespace: kgtest, timeout: 1s }}\n",
            cluster.seeds()
        ),
    )
    .unwrap();
    let migrate = || {
        let out = Command::new(env!("CARGO_BIN_EXE_keygate"))
            .args(["migrate", "--from", &redis.url, "--config"])
            .arg(&config)
            .output()
            .expect("run keygate migrate");
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "migrate failed: {stdout}\n{stderr}");
        assert!(!stdout.contains(&keys[1].key) && !stderr.contains(&keys[1].key));
        stdout
    };
    // Right after `--cluster create` the replicas may still be syncing: writes that are
    // not confirmed yet fail alone and a rerun copies them.
    let mut summary = String::new();
    let copied = eventually(Duration::from_secs(20), || {
        summary = migrate();
        let done = summary.contains(" 0 failed");
        async move { done }
    })
    .await;
    assert!(copied, "{summary}");
    let again = migrate();
    assert!(
        again.contains("0 copied, 7 already there, 0 failed"),
        "{again}"
    );

    let a = spawn_app(Store::Cluster(&cluster)).await;
    let b = spawn_app(Store::Cluster(&cluster)).await;
    assert_error(a.get_with(PATH, &keys[0].key).await, 403, "revoked_key").await;
    for k in &keys[1..] {
        assert_eq!(a.get_with(PATH, &k.key).await.status(), 200);
        assert_eq!(
            b.get_with(PATH, &k.key).await.status(),
            200,
            "cached on b now"
        );
    }
    let listed: serde_json::Value = a
        .http
        .get(a.admin_url("/v1/api-keys?limit=100"))
        .bearer_auth(crate::support::ROOT)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = listed["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|k| k["id"].as_str())
        .collect();
    // HelloJohn's list leaves revoked keys out; GET still shows the revoked one.
    for k in &keys[1..] {
        assert!(ids.contains(&k.id.as_str()), "{} not listed: {ids:?}", k.id);
    }
    let revoked: serde_json::Value = a
        .http
        .get(a.admin_url(&format!("/v1/api-keys/{}", keys[0].id)))
        .bearer_auth(crate::support::ROOT)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert!(!revoked["revoked_at"].is_null(), "{revoked}");

    // A revoke written by another process (a store of its own, no cache shared with the
    // apps) reaches their caches through the bucket's sharded channel.
    let other = ClusterStore::connect(&ClusterSettings {
        nodes: cluster.seeds(),
        namespace: "kgtest".into(),
        timeout: Duration::from_secs(1),
        min_replicas_ack: 1,
        ack_timeout: Duration::from_millis(500),
        ca_file: None,
    })
    .unwrap();
    // Both apps follow the feed, and answer the key from their caches.
    for app in [&a, &b] {
        for _ in 0..2 {
            assert_eq!(app.get_with(PATH, &keys[1].key).await.status(), 200);
        }
        let metrics = app
            .http
            .get(app.admin_url("/metrics"))
            .send()
            .await
            .unwrap()
            .text()
            .await
            .unwrap();
        assert!(metrics.contains("keygate_pubsub_connected 1"), "{metrics}");
        assert!(
            !metrics.contains("keygate_cache_hits_total 0\n"),
            "{metrics}"
        );
    }
    assert_eq!(
        other.by_digest(&limited.digest).await.unwrap().as_ref(),
        Some(&limited),
        "the limits were not carried over"
    );
    let digest = keygate::key::sha256(keys[1].key.as_bytes());
    let record = other.by_digest(&digest).await.unwrap().expect("migrated");
    let now = keygate::time::now_ms();
    let ok = eventually(Duration::from_secs(10), || async {
        other.revoke(&record.tenant, &record.id, now).await.is_ok()
    })
    .await;
    assert!(ok, "the revoke was never confirmed");
    let refused = eventually(Duration::from_secs(5), || async {
        a.get_with(PATH, &keys[1].key).await.status().as_u16() == 403
    })
    .await;
    assert!(refused, "a still accepts a revoked key");
    let refused = eventually(Duration::from_secs(5), || async {
        b.get_with(PATH, &keys[1].key).await.status().as_u16() == 403
    })
    .await;
    assert!(refused, "b still accepts a revoked key");
}
