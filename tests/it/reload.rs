//! Hot reload: a changed file (written in place, or a ConfigMap-style symlink swap) is
//! applied under load with no failed request; a bad file is refused and the running
//! config stays; SIGHUP reloads the binary.

use crate::support::*;
use keygate::config::Config;
use keygate::App;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

fn config_text(upstream: std::net::SocketAddr, token_file: &Path, read_scope: &str) -> String {
    TEST_CONFIG
        .replace("{upstream}", &format!("http://{upstream}"))
        .replace("{store}", "memory: {}")
        .replace(
            "admin:\n  listen: 127.0.0.1:0",
            &format!(
                "admin:\n  listen: 127.0.0.1:0\n  root_token_file: {}",
                token_file.display()
            ),
        )
        .replace(
            "scopes: [\"users:read\"] }",
            &format!("scopes: [\"{read_scope}\"] }}"),
        )
}

/// Replace the file the way editors and `kubectl cp` do: write a sibling, rename over.
fn replace_file(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

async fn metric(http: &reqwest::Client, admin: std::net::SocketAddr, line_start: &str) -> f64 {
    let text = http
        .get(format!("http://{admin}/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reload_under_load_applies_good_files_and_refuses_bad_ones() {
    let dir = tempfile::tempdir().unwrap();
    let token_file = dir.path().join("root-token");
    std::fs::write(&token_file, ROOT).unwrap();
    let upstream = keygate::dev::spawn_echo_upstream(([127, 0, 0, 1], 0).into())
        .await
        .unwrap();
    let path = dir.path().join("keygate.yaml");
    std::fs::write(&path, config_text(upstream, &token_file, "users:read")).unwrap();
    let app = App::build(Config::load(&path).unwrap())
        .await
        .unwrap()
        .reload_from(path.clone());
    let (proxy, admin) = (app.proxy_addr, app.admin_addr);
    let stop = app.shutdown_handle();
    tokio::spawn(app.run_until_stopped());
    let http = reqwest::Client::builder().no_proxy().build().unwrap();
    let resp = http
        .post(format!("http://{admin}/v1/keys"))
        .bearer_auth(ROOT)
        .json(&serde_json::json!({"label": "r", "scopes": ["users:read"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let key = resp.json::<serde_json::Value>().await.unwrap()["key"]
        .as_str()
        .unwrap()
        .to_string();

    // Load: every answer must be 200 or (after the swap) 403; nothing else, no errors.
    let running = Arc::new(AtomicBool::new(true));
    let (ok, denied, failed) = (
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    );
    let mut load = Vec::new();
    for _ in 0..4 {
        let (http, key, running) = (http.clone(), key.clone(), running.clone());
        let (ok, denied, failed) = (ok.clone(), denied.clone(), failed.clone());
        load.push(tokio::spawn(async move {
            while running.load(Ordering::Relaxed) {
                match http
                    .get(format!("http://{proxy}/users/1"))
                    .bearer_auth(&key)
                    .send()
                    .await
                {
                    Ok(r) if r.status() == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    Ok(r) if r.status() == 403 => denied.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }
    let status = |http: reqwest::Client, key: String| async move {
        http.get(format!("http://{proxy}/users/1"))
            .bearer_auth(&key)
            .send()
            .await
            .unwrap()
            .status()
            .as_u16()
    };
    assert_eq!(status(http.clone(), key.clone()).await, 200);

    // A good change: the route now needs a scope the key lacks.
    replace_file(&path, &config_text(upstream, &token_file, "users:list"));
    assert!(
        eventually(Duration::from_secs(5), || status(http.clone(), key.clone())
            .map_eq(403))
        .await,
        "the reloaded route never applied"
    );
    assert_eq!(
        metric(
            &http,
            admin,
            "keygate_config_reloads_total{result=\"success\"}"
        )
        .await,
        1.0
    );

    // A bad file: refused, the running config stays, the failure is counted.
    replace_file(&path, "proxy: [this is: not valid");
    assert!(
        eventually(Duration::from_secs(5), || async {
            metric(
                &http,
                admin,
                "keygate_config_reloads_total{result=\"failure\"}",
            )
            .await
                >= 1.0
        })
        .await,
        "the bad reload was not counted"
    );
    assert_eq!(
        status(http.clone(), key.clone()).await,
        403,
        "bad file changed the config"
    );

    // A ConfigMap-style update: `..data` symlink swapped to a new directory.
    let v1 = dir.path().join("..v1");
    std::fs::create_dir(&v1).unwrap();
    std::fs::write(
        v1.join("cm.yaml"),
        config_text(upstream, &token_file, "users:read"),
    )
    .unwrap();
    let data = dir.path().join("..data");
    std::os::unix::fs::symlink("..v1", &data).unwrap();
    // `keygate.yaml` becomes a symlink through `..data`, as kubelet lays it out.
    std::fs::remove_file(&path).unwrap();
    std::os::unix::fs::symlink("..data/cm.yaml", &path).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || status(http.clone(), key.clone())
            .map_eq(200))
        .await,
        "the symlinked config never applied"
    );
    let v2 = dir.path().join("..v2");
    std::fs::create_dir(&v2).unwrap();
    std::fs::write(
        v2.join("cm.yaml"),
        config_text(upstream, &token_file, "users:list"),
    )
    .unwrap();
    let tmp_link = dir.path().join("..data_tmp");
    std::os::unix::fs::symlink("..v2", &tmp_link).unwrap();
    std::fs::rename(&tmp_link, &data).unwrap();
    assert!(
        eventually(Duration::from_secs(5), || status(http.clone(), key.clone())
            .map_eq(403))
        .await,
        "the ConfigMap-style swap never applied"
    );

    running.store(false, Ordering::Relaxed);
    for l in load {
        l.await.unwrap();
    }
    let (ok, denied, failed) = (
        ok.load(Ordering::Relaxed),
        denied.load(Ordering::Relaxed),
        failed.load(Ordering::Relaxed),
    );
    println!("under reload: {ok} allowed, {denied} denied, {failed} failed");
    assert!(ok > 0 && denied > 0, "the load did not span the reloads");
    assert_eq!(failed, 0, "requests failed during reloads");
    stop.shutdown();
}

trait StatusExt {
    fn map_eq(self, want: u16) -> impl std::future::Future<Output = bool>;
}

impl<F: std::future::Future<Output = u16>> StatusExt for F {
    async fn map_eq(self, want: u16) -> bool {
        self.await == want
    }
}
