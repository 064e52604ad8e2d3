//! HTTP/2 conformance basics with nghttp2's own clients (Debian `nghttp2-client`, which
//! `scripts/test` installs): `nghttp` for one exchange frame by frame, `h2load` for many
//! streams on few connections. Skipped, and said so, where they are not installed.

use crate::support::{spawn_app, Store};
use std::process::Command;

fn tool(name: &str) -> Option<String> {
    let found = Command::new(name).arg("--version").output().is_ok();
    if !found {
        eprintln!("SKIPPED: {name} is not installed (apt-get install nghttp2-client)");
    }
    found.then(|| name.to_string())
}

fn run(cmd: &mut Command) -> (bool, String) {
    let out = cmd.output().expect("run nghttp2 tool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nghttp_sees_a_clean_http2_exchange() {
    let Some(nghttp) = tool("nghttp") else { return };
    let app = spawn_app(Store::Memory).await;
    let key = app.create_key(&["users:read"]).await;
    let url = app.proxy_url("/users/1");
    let auth = format!("authorization: Bearer {}", key.key);
    let (ok, text) = tokio::task::spawn_blocking(move || {
        run(Command::new(nghttp).args(["-nv", "-H", &auth, &url]))
    })
    .await
    .unwrap();
    assert!(ok, "nghttp failed:\n{text}");
    assert!(text.contains(":status: 200"), "{text}");
    assert!(text.contains("recv SETTINGS frame"), "{text}");
    // keygate's own refusal arrives as a well-formed HTTP/2 response too.
    let url = app.proxy_url("/users/1");
    let (ok, text) =
        tokio::task::spawn_blocking(move || run(Command::new("nghttp").args(["-nv", &url])))
            .await
            .unwrap();
    assert!(ok, "nghttp failed:\n{text}");
    assert!(text.contains(":status: 401"), "{text}");
    assert!(!text.contains("PROTOCOL_ERROR"), "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2load_many_streams_on_few_connections_all_succeed() {
    let Some(h2load) = tool("h2load") else { return };
    let app = spawn_app(Store::Memory).await;
    let key = app.create_key(&["users:read"]).await;
    let url = app.proxy_url("/users/1");
    let auth = format!("authorization: Bearer {}", key.key);
    let (ok, text) = tokio::task::spawn_blocking(move || {
        run(Command::new(h2load).args(["-n", "2000", "-c", "4", "-m", "16", "-H", &auth, &url]))
    })
    .await
    .unwrap();
    assert!(ok, "h2load failed:\n{text}");
    assert!(
        text.contains("2000 succeeded, 0 failed, 0 errored"),
        "not every stream succeeded:\n{text}"
    );
    assert!(text.contains("status codes: 2000 2xx"), "{text}");
}
