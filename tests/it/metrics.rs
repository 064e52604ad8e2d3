//! The live `/metrics` output follows Prometheus conventions (checked here by rule, and by
//! `promtool check metrics` when promtool is installed), and its labels are bounded:
//! route names and fixed codes, never paths, keys or ids.

use crate::support::*;
use std::collections::HashMap;
use std::io::Write;
use std::process::{Command, Stdio};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_prometheus_conventions_and_leak_nothing() {
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    for path in [
        "/users/1",
        "/users/2?x=secret-path",
        "/admin/x",
        "/nope",
        "/healthz",
    ] {
        app.get_with(path, &k.key).await;
    }
    app.get_with("/users/1", "sk_live_not-a-key").await;
    let text = app
        .http
        .get(app.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();

    // Types and help of every family.
    let mut types: HashMap<String, String> = HashMap::new();
    let mut helps = Vec::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            types.insert(name.to_string(), kind.to_string());
        } else if let Some(rest) = line.strip_prefix("# HELP ") {
            helps.push(rest.split_once(' ').unwrap().0.to_string());
        }
    }
    assert!(types.len() >= 10, "too few metric families: {types:?}");
    let valid_name = |n: &str| {
        !n.is_empty()
            && n.starts_with("keygate_")
            && n.bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    };
    for (name, kind) in &types {
        assert!(valid_name(name), "bad metric name {name}");
        assert!(helps.contains(name), "{name} has no HELP");
        match kind.as_str() {
            "counter" => assert!(
                name.ends_with("_total"),
                "counter {name} must end in _total"
            ),
            "histogram" => assert!(
                name.ends_with("_seconds"),
                "histogram {name} must be in seconds"
            ),
            "gauge" => assert!(
                !name.ends_with("_total"),
                "gauge {name} must not end in _total"
            ),
            other => panic!("unexpected type {other} for {name}"),
        }
    }
    for family in [
        "keygate_requests_total",
        "keygate_auth_duration_seconds",
        "keygate_upstream_duration_seconds",
        "keygate_cache_entries",
        "keygate_store_errors_total",
        "keygate_config_reloads_total",
        "keygate_build_info",
        "keygate_cache_hits_total",
        "keygate_cache_misses_total",
    ] {
        assert!(types.contains_key(family), "{family} missing");
    }
    // /users/1 reads the store; /users/2 and /admin/x hit the cache; /nope, /healthz and
    // the malformed key never look a key up.
    assert!(text.contains("keygate_cache_misses_total 1"), "{text}");
    assert!(text.contains("keygate_cache_hits_total 2"), "{text}");
    // The auth histogram spans 1 µs to about 1 s.
    assert!(text.contains(
        "keygate_auth_duration_seconds_bucket{result=\"allowed\",source=\"cache\",le=\"0.000001\"}"
    ));
    assert!(text.contains("keygate_requests_total{result=\"allowed\",route=\"users-read\"}"));
    assert!(
        text.contains("keygate_requests_total{result=\"insufficient_scope\",route=\"admin-area\"}")
    );
    assert!(text.contains("keygate_requests_total{result=\"no_route\",route=\"unmatched\"}"));
    // Nothing request-specific in any label.
    for secret in [
        k.key.as_str(),
        k.id.as_str(),
        "secret-path",
        "/users/",
        "not-a-key",
    ] {
        assert!(!text.contains(secret), "metrics contain {secret:?}");
    }

    // promtool, where installed (Debian package `prometheus`; required under scripts/test).
    if promtool_available() {
        let mut child = Command::new("promtool")
            .args(["check", "metrics"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("promtool starts");
        child
            .stdin
            .take()
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "promtool check metrics: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    } else {
        println!("promtool not installed: checked by the rules above only");
    }
}
