//! TLS on the proxy listener: HTTPS with ALPN h2 and http/1.1 (self-signed certificates
//! made in the test with rcgen), `X-Forwarded-Proto: https`, the certificate reloaded when
//! its files change, and bad certificate files refused at load.

use crate::support::*;
use keygate::config::Config;
use serde_json::Value;
use std::path::Path;
use std::time::Duration;

fn make_cert(dir: &Path, tag: &str) -> (String, String, reqwest::Certificate) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let cert_pem = ck.cert.pem();
    let key_pem = ck.key_pair.serialize_pem();
    let cert = dir.join(format!("{tag}.crt"));
    let key = dir.join(format!("{tag}.key"));
    std::fs::write(&cert, &cert_pem).unwrap();
    std::fs::write(&key, &key_pem).unwrap();
    (
        cert.display().to_string(),
        key.display().to_string(),
        reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap(),
    )
}

fn tls_config(cert: &str, key: &str) -> String {
    TEST_CONFIG.replace(
        "  upstream: {upstream}\n",
        &format!("  upstream: {{upstream}}\n  tls: {{ cert: \"{cert}\", key: \"{key}\" }}\n"),
    )
}

fn client(root: reqwest::Certificate, proxy: std::net::SocketAddr) -> reqwest::Client {
    reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root)
        .resolve("localhost", proxy)
        .build()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_with_alpn_and_certificate_reload() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, root1) = make_cert(dir.path(), "live");
    let app = spawn_app_with(&tls_config(&cert, &key), Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    let url = format!("https://localhost:{}/users/1", app.proxy.port());

    let https = client(root1.clone(), app.proxy);
    let resp = https.get(&url).bearer_auth(&k.key).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(
        resp.version(),
        reqwest::Version::HTTP_2,
        "ALPN should pick h2"
    );
    let echo: Value = resp.json().await.unwrap();
    assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https", "{echo}");
    assert_eq!(
        echo["headers"]["x-keygate-key-id"][0],
        k.id.as_str(),
        "{echo}"
    );

    let h1 = reqwest::Client::builder()
        .no_proxy()
        .tls_built_in_root_certs(false)
        .add_root_certificate(root1.clone())
        .resolve("localhost", app.proxy)
        .http1_only()
        .build()
        .unwrap();
    let resp = h1.get(&url).bearer_auth(&k.key).send().await.unwrap();
    assert_eq!(
        (resp.status().as_u16(), resp.version()),
        (200, reqwest::Version::HTTP_11)
    );
    // Refusals are the same JSON over TLS.
    assert_error(https.get(&url).send().await.unwrap(), 401, "missing_key").await;
    // Plain HTTP on the TLS port gets nothing useful.
    assert!(reqwest::Client::new()
        .get(format!("http://{}/users/1", app.proxy))
        .bearer_auth(&k.key)
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true));

    // Replace the files with a new certificate: new connections get it.
    let (cert2, key2, root2) = make_cert(dir.path(), "next");
    std::fs::copy(&key2, &key).unwrap();
    std::fs::copy(&cert2, &cert).unwrap();
    let reloaded = eventually(Duration::from_secs(5), || async {
        client(root2.clone(), app.proxy)
            .get(&url)
            .bearer_auth(&k.key)
            .send()
            .await
            .is_ok_and(|r| r.status() == 200)
    })
    .await;
    assert!(reloaded, "the new certificate was never served");
    // A broken pair is refused and the current certificate kept.
    std::fs::write(&key, "not a key").unwrap();
    tokio::time::sleep(Duration::from_millis(400)).await;
    let resp = client(root2, app.proxy)
        .get(&url)
        .bearer_auth(&k.key)
        .send()
        .await;
    assert_eq!(
        resp.unwrap().status(),
        200,
        "a broken key file replaced the certificate"
    );
}

#[test]
fn bad_certificate_files_are_refused_at_load() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, _key, _) = make_cert(dir.path(), "a");
    let (_cert2, key2, _) = make_cert(dir.path(), "b");
    let text = tls_config(&cert, &key2)
        .replace("{upstream}", "http://127.0.0.1:1")
        .replace("{store}", "memory: {}");
    let e = Config::from_yaml(&text, "tls.yaml", &[("X", "Y")]).unwrap_err();
    assert_eq!(e.field, "proxy.tls", "{e}");
    assert!(e.message.contains("do not match"), "{e}");
    let text = tls_config(&cert, "/nonexistent/key.pem")
        .replace("{upstream}", "http://127.0.0.1:1")
        .replace("{store}", "memory: {}");
    let e = Config::from_yaml(&text, "tls.yaml", &[("X", "Y")]).unwrap_err();
    assert!(e.message.contains("/nonexistent/key.pem"), "{e}");
}

/// `rediss://` to a TLS-only redis-server, trusting a CA file.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rediss_store_with_a_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let ck =
        rcgen::generate_simple_self_signed(vec!["localhost".into(), "127.0.0.1".into()]).unwrap();
    let (cert, key) = (dir.path().join("redis.crt"), dir.path().join("redis.key"));
    std::fs::write(&cert, ck.cert.pem()).unwrap();
    std::fs::write(&key, ck.key_pair.serialize_pem()).unwrap();
    let port = free_port();
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let child = std::process::Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--tls-port", &port.to_string(), "--tls-auth-clients", "no"])
        .arg("--tls-cert-file")
        .arg(&cert)
        .arg("--tls-key-file")
        .arg(&key)
        .arg("--tls-ca-cert-file")
        .arg(&cert)
        .arg("--dir")
        .arg(dir.path())
        .stdout(std::process::Stdio::null())
        .spawn()
        .expect("redis-server");
    let _guard = Kill(child);
    let store = format!(
        "redis: {{ url: \"rediss://127.0.0.1:{port}/0\", namespace: kgtest, timeout: 1s, ca_file: \"{}\" }}",
        cert.display()
    );
    let config = TEST_CONFIG.replace("{store}", &store);
    let app = spawn_app_with(&config, Store::Memory).await;
    let ready = app.becomes_ready().await;
    assert!(ready, "keygate never reached the TLS redis");
    let k = app.create_key(&["users:read"]).await;
    assert_eq!(app.get_with("/users/1", &k.key).await.status(), 200);
    assert_eq!(app.revoke(&k.id).await.status(), 200);
    assert_error(app.get_with("/users/1", &k.key).await, 403, "revoked_key").await;
}

/// An `https://` upstream verified against `upstream_ca` (here: another keygate serving
/// TLS in front of the echo server).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_upstream_with_a_ca_file() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = make_cert(dir.path(), "front");
    let inner = spawn_app_with(&tls_config(&cert, &key), Store::Memory).await;
    let outer_config = TEST_CONFIG.replace(
        "  upstream: {upstream}\n",
        &format!(
            "  upstream: https://localhost:{}\n  upstream_ca: \"{cert}\"\n",
            inner.proxy.port()
        ),
    );
    let outer = spawn_app_with(&outer_config, Store::Memory).await;
    // /public/** is public on both: the request crosses both proxies to the echo server.
    let resp = outer
        .http
        .get(outer.proxy_url("/public/x"))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let echo: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(echo["path"], "/public/x", "{echo}");
    assert_eq!(echo["headers"]["x-forwarded-proto"][0], "https", "{echo}");

    // Without the CA, the upstream's certificate is not trusted: 502, not a plain-text leak.
    let untrusted = TEST_CONFIG.replace(
        "  upstream: {upstream}\n",
        &format!("  upstream: https://localhost:{}\n", inner.proxy.port()),
    );
    let outer2 = spawn_app_with(&untrusted, Store::Memory).await;
    assert_error(
        outer2
            .http
            .get(outer2.proxy_url("/public/x"))
            .send()
            .await
            .unwrap(),
        502,
        "upstream_unavailable",
    )
    .await;
}

/// The admin API over TLS (`admin.tls`): management works over HTTPS, plain HTTP does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn admin_api_over_tls() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, root) = make_cert(dir.path(), "admin");
    let config = TEST_CONFIG.replace(
        "admin:\n  listen: 127.0.0.1:0\n",
        &format!("admin:\n  listen: 127.0.0.1:0\n  tls: {{ cert: \"{cert}\", key: \"{key}\" }}\n"),
    );
    let app = spawn_app_with(&config, Store::Memory).await;
    let https = client(root, app.admin);
    let base = format!("https://localhost:{}", app.admin.port());
    let resp = https.get(format!("{base}/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = https
        .post(format!("{base}/v1/keys"))
        .bearer_auth(ROOT)
        .json(&serde_json::json!({"label": "tls", "scopes": ["users:read"]}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let body: serde_json::Value = resp.json().await.unwrap();
    let key = body["key"].as_str().unwrap();
    assert_eq!(app.get_with("/users/1", key).await.status(), 200);
    // Plain HTTP to the TLS admin port gets no API.
    let plain = app.http.get(app.admin_url("/readyz")).send().await;
    assert!(plain.map(|r| r.status() != 200).unwrap_or(true));
}
