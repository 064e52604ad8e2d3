//! The `k8s/` manifests agree with keygate: the ConfigMap's keygate.yaml is a valid config,
//! container ports, probes, the config mount, Services, NetworkPolicies and the Prometheus
//! scrape settings match it; the kustomization lists every manifest; the Grafana dashboard
//! and the alert rules use only metric names, labels and label values a running keygate
//! exports (and the rules pass `promtool check rules` and `promtool test rules`; skipped
//! where promtool is missing, except under scripts/test, which requires it).

use crate::support::*;
use keygate::config::{Config, StoreConfig};
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const NAMESPACE: &str = "keygate-demo";

fn k8s_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("k8s")
}

fn read(name: &str) -> String {
    let path = k8s_dir().join(name);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// One object of a manifest file.
struct Object {
    file: String,
    value: Value,
}

impl Object {
    fn kind(&self) -> &str {
        self.value["kind"].as_str().unwrap_or("")
    }
    fn name(&self) -> &str {
        self.value["metadata"]["name"].as_str().unwrap_or("")
    }
}

/// Every `*.yaml` in k8s/ except the kustomization.
fn manifest_files() -> BTreeSet<String> {
    std::fs::read_dir(k8s_dir())
        .expect("k8s/ exists")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| (n.ends_with(".yaml") || n.ends_with(".yml")) && n != "kustomization.yaml")
        .collect()
}

/// Every document of every manifest (multi-document YAML).
fn objects() -> Vec<Object> {
    let mut all = Vec::new();
    for file in manifest_files() {
        let text = read(&file);
        for doc in serde_norway::Deserializer::from_str(&text) {
            let value = Value::deserialize(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
            if value.is_null() {
                continue;
            }
            assert!(
                value["apiVersion"].is_string() && value["kind"].is_string(),
                "{file}: a document without apiVersion/kind"
            );
            all.push(Object {
                file: file.clone(),
                value,
            });
        }
    }
    assert!(!all.is_empty(), "no manifests in k8s/");
    all
}

fn find<'a>(objects: &'a [Object], kind: &str, name: &str) -> &'a Value {
    &objects
        .iter()
        .find(|o| o.kind() == kind && o.name() == name)
        .unwrap_or_else(|| panic!("no {kind} {name} in k8s/"))
        .value
}

fn of_kind<'a>(objects: &'a [Object], kind: &'a str) -> impl Iterator<Item = &'a Object> + 'a {
    objects.iter().filter(move |o| o.kind() == kind)
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn str_map(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

/// `selector` (a map of labels) selects `labels`.
fn selects(selector: &Value, labels: &Value) -> bool {
    let (selector, labels) = (str_map(selector), str_map(labels));
    !selector.is_empty() && selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// The ConfigMap holding keygate.yaml, its name, and the validated config.
struct Keygate {
    configmap: String,
    file_key: String,
    raw: Value,
    config: Config,
}

fn keygate_config(objects: &[Object]) -> Keygate {
    let mut found = Vec::new();
    for o in of_kind(objects, "ConfigMap") {
        for (key, text) in o.value["data"].as_object().into_iter().flatten() {
            if key.ends_with(".yaml") && text.as_str().unwrap_or("").contains("proxy:") {
                found.push((o.name().to_string(), key.clone(), text.as_str().unwrap()));
            }
        }
    }
    assert_eq!(
        found.len(),
        1,
        "exactly one ConfigMap entry holds keygate's config"
    );
    let (configmap, file_key, text) = found.pop().unwrap();
    let config = Config::from_yaml(
        text,
        "k8s configmap",
        &[("KEYGATE_ROOT_TOKEN", "0123456789abcdef0123")],
    )
    .unwrap_or_else(|e| panic!("the ConfigMap's {file_key} is not a valid config: {e}"));
    let raw: Value = serde_norway::from_str(text).unwrap();
    Keygate {
        configmap,
        file_key,
        raw,
        config,
    }
}

/// The Deployment's pod spec, its labels, and the keygate and app containers.
struct Pod<'a> {
    spec: &'a Value,
    labels: &'a Value,
    annotations: &'a Value,
    keygate: &'a Value,
    app: &'a Value,
}

fn app_pod(objects: &[Object]) -> Pod<'_> {
    let deployments: Vec<&Object> = of_kind(objects, "Deployment")
        .filter(|d| {
            array(&d.value["spec"]["template"]["spec"]["containers"])
                .iter()
                .any(|c| c["name"] == "keygate")
        })
        .collect();
    assert_eq!(
        deployments.len(),
        1,
        "one Deployment with a keygate sidecar"
    );
    let template = &deployments[0].value["spec"]["template"];
    let spec = &template["spec"];
    let containers = array(&spec["containers"]);
    assert_eq!(containers.len(), 2, "the app and keygate");
    let keygate = containers.iter().find(|c| c["name"] == "keygate").unwrap();
    let app = containers.iter().find(|c| c["name"] != "keygate").unwrap();
    assert!(
        selects(
            &deployments[0].value["spec"]["selector"]["matchLabels"],
            &template["metadata"]["labels"]
        ),
        "the Deployment's selector matches its pods"
    );
    Pod {
        spec,
        labels: &template["metadata"]["labels"],
        annotations: &template["metadata"]["annotations"],
        keygate,
        app,
    }
}

/// A container's ports by name.
fn named_ports(container: &Value) -> BTreeMap<String, u64> {
    array(&container["ports"])
        .iter()
        .map(|p| {
            (
                p["name"].as_str().unwrap_or("").to_string(),
                p["containerPort"]
                    .as_u64()
                    .expect("containerPort is a number"),
            )
        })
        .collect()
}

/// A Service targetPort / probe port (a number or a container port name) as a number.
fn resolve_port(port: &Value, pod: &Pod) -> u64 {
    match port {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(name) => array(&pod.spec["containers"])
            .iter()
            .find_map(|c| named_ports(c).get(name).copied())
            .unwrap_or_else(|| panic!("no container port named {name}")),
        other => panic!("bad port {other}"),
    }
}

/// The host:port the app container's args say it listens on.
fn app_listen(app: &Value) -> (String, u16) {
    let args: Vec<&str> = array(&app["args"])
        .iter()
        .chain(array(&app["command"]))
        .filter_map(Value::as_str)
        .collect();
    for (i, arg) in args.iter().enumerate() {
        // `-listen=127.0.0.1:3000`, `--bind 127.0.0.1:3000`, ...
        let value = match arg.split_once('=') {
            Some((_, v)) => v,
            None if arg.starts_with('-') => args.get(i + 1).copied().unwrap_or(""),
            None => continue,
        };
        if let Some((host, port)) = value.rsplit_once(':') {
            if let Ok(port) = port.parse() {
                return (host.to_string(), port);
            }
        }
    }
    panic!("the app container's args name no host:port to listen on: {args:?}");
}

#[test]
fn configmap_is_a_valid_config_that_the_pod_agrees_with() {
    let objects = objects();
    let kg = keygate_config(&objects);
    let config = &kg.config;
    let pod = app_pod(&objects);
    let proxy_port = u64::from(config.fixed.proxy_listen.port());
    let admin_port = u64::from(config.fixed.admin_listen.port());

    // Everything in the demo namespace.
    let ns = find(&objects, "Namespace", NAMESPACE);
    assert_eq!(ns["metadata"]["name"], NAMESPACE);
    for o in &objects {
        if !matches!(o.kind(), "Namespace") {
            assert_eq!(
                o.value["metadata"]["namespace"],
                NAMESPACE,
                "{}: {} {} outside {NAMESPACE}",
                o.file,
                o.kind(),
                o.name()
            );
        }
    }

    // Ports: the keygate container declares exactly the config's listeners. Both listen on
    // every interface (the kubelet probes the admin port from the node).
    let ports = named_ports(pod.keygate);
    assert_eq!(
        ports.get("proxy"),
        Some(&proxy_port),
        "proxy port: {ports:?}"
    );
    assert_eq!(
        ports.get("admin"),
        Some(&admin_port),
        "admin port: {ports:?}"
    );
    assert_eq!(ports.len(), 2, "{ports:?}");
    assert!(config.fixed.proxy_listen.ip().is_unspecified());
    assert!(config.fixed.admin_listen.ip().is_unspecified());
    assert_ne!(proxy_port, admin_port);

    // Probes: readiness GET /readyz, liveness GET /healthz, both on the admin port.
    for (probe, path) in [("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")] {
        let get = &pod.keygate[probe]["httpGet"];
        assert_eq!(get["path"], path, "{probe}");
        assert_eq!(resolve_port(&get["port"], &pod), admin_port, "{probe} port");
        assert!(
            get["scheme"].is_null() || get["scheme"] == "HTTP",
            "{probe}: the admin port is plain HTTP"
        );
    }

    // The ConfigMap is mounted where `--config` points, as a directory (no subPath, so
    // ConfigMap updates reach the file and are hot-reloaded).
    let args: Vec<&str> = array(&pod.keygate["args"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(args.first(), Some(&"serve"), "{args:?}");
    let config_path = args
        .iter()
        .position(|a| *a == "--config")
        .map(|i| args[i + 1].to_string())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--config=").map(str::to_string))
        })
        .expect("keygate's args have --config");
    let config_path = Path::new(&config_path);
    let dir = config_path.parent().unwrap().to_str().unwrap();
    let file = config_path.file_name().unwrap().to_str().unwrap();
    let mount = array(&pod.keygate["volumeMounts"])
        .iter()
        .find(|m| m["mountPath"] == dir)
        .unwrap_or_else(|| panic!("nothing mounted at {dir}"));
    assert!(
        mount["subPath"].is_null(),
        "a subPath mount is never updated"
    );
    let volume = array(&pod.spec["volumes"])
        .iter()
        .find(|v| v["name"] == mount["name"])
        .expect("the mounted volume exists");
    assert_eq!(volume["configMap"]["name"], kg.configmap.as_str());
    let items = array(&volume["configMap"]["items"]);
    if items.is_empty() {
        assert_eq!(file, kg.file_key, "--config names the ConfigMap's key");
    } else {
        assert!(
            items
                .iter()
                .any(|i| i["key"] == kg.file_key.as_str() && i["path"] == file),
            "the volume's items put {} at {file}",
            kg.file_key
        );
    }

    // The root token comes from a Secret under the variable the config names.
    let token_env = kg.raw["admin"]["root_token_env"]
        .as_str()
        .unwrap_or("KEYGATE_ROOT_TOKEN");
    let secret_names: Vec<&str> = array(&pod.keygate["envFrom"])
        .iter()
        .filter_map(|e| e["secretRef"]["name"].as_str())
        .collect();
    assert!(
        secret_names.iter().any(|name| {
            let secret = find(&objects, "Secret", name);
            let token = secret["stringData"][token_env].as_str().unwrap_or("");
            token.len() >= 16 || secret["data"][token_env].is_string()
        }),
        "no Secret in envFrom carries {token_env}"
    );

    // The app listens on loopback only, on the port the config's upstream names, and
    // declares no container port.
    let (host, port) = app_listen(pod.app);
    assert!(
        host == "127.0.0.1" || host == "localhost",
        "the app must listen on 127.0.0.1 only, not {host}"
    );
    let upstream = &config.fixed.upstream.authority;
    assert_eq!(
        upstream.host(),
        "127.0.0.1",
        "upstream is the app in the pod"
    );
    assert_eq!(
        upstream.port_u16(),
        Some(port),
        "upstream port is the app's"
    );
    let app_port = u64::from(port);
    assert!(
        array(&pod.app["ports"]).is_empty(),
        "the app container exposes no port"
    );
    assert!(app_port != proxy_port && app_port != admin_port);

    // Services selecting the pod: one targets the proxy port; none targets the app's port;
    // nothing but the proxy and admin ports.
    let mut targets = BTreeMap::new();
    for svc in of_kind(&objects, "Service") {
        if !selects(&svc.value["spec"]["selector"], pod.labels) {
            continue;
        }
        for p in array(&svc.value["spec"]["ports"]) {
            let target = resolve_port(&p["targetPort"], &pod);
            assert_ne!(target, app_port, "Service {} reaches the app", svc.name());
            assert!(
                target == proxy_port || target == admin_port,
                "Service {} targets port {target}",
                svc.name()
            );
            targets.insert(svc.name().to_string(), target);
        }
    }
    assert_eq!(targets.get("app"), Some(&proxy_port), "{targets:?}");
    let admin_svc = find(&objects, "Service", "keygate-admin");
    assert_eq!(admin_svc["spec"]["type"], "ClusterIP", "admin stays inside");

    // NetworkPolicies on the app pods open the proxy and admin ports only.
    let mut opened = BTreeSet::new();
    for np in of_kind(&objects, "NetworkPolicy") {
        if !selects(&np.value["spec"]["podSelector"]["matchLabels"], pod.labels) {
            continue;
        }
        for rule in array(&np.value["spec"]["ingress"]) {
            let ports = array(&rule["ports"]);
            assert!(
                !ports.is_empty(),
                "{}: an ingress rule open to all ports",
                np.name()
            );
            for p in ports {
                opened.insert(resolve_port(&p["port"], &pod));
            }
        }
    }
    assert_eq!(opened, BTreeSet::from([proxy_port, admin_port]));

    // Redis: the config's store URL names a Service in front of a persistent StatefulSet.
    let StoreConfig::Redis(redis) = &config.fixed.store else {
        panic!("the k8s config uses the Redis store");
    };
    let keygate::store::redis::Mode::Standalone { url } = &redis.mode else {
        panic!("the k8s example uses one Redis server");
    };
    let authority = url
        .strip_prefix("redis://")
        .unwrap()
        .split('/')
        .next()
        .unwrap();
    let (host, port) = authority.rsplit_once(':').unwrap();
    let port: u64 = port.parse().unwrap();
    let mut parts = host.split('.');
    let (svc_name, svc_ns) = (parts.next().unwrap(), parts.next().unwrap());
    assert_eq!(svc_ns, NAMESPACE);
    let svc = find(&objects, "Service", svc_name);
    let sts = find(&objects, "StatefulSet", "redis");
    let redis_pod = &sts["spec"]["template"];
    assert!(selects(
        &svc["spec"]["selector"],
        &redis_pod["metadata"]["labels"]
    ));
    assert!(array(&svc["spec"]["ports"])
        .iter()
        .any(|p| p["port"].as_u64() == Some(port)));
    let governing = find(
        &objects,
        "Service",
        sts["spec"]["serviceName"].as_str().unwrap(),
    );
    assert_eq!(governing["spec"]["clusterIP"], "None", "headless");
    let container = &redis_pod["spec"]["containers"][0];
    let args: Vec<&str> = array(&container["args"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert!(
        args.windows(2).any(|w| w == ["--appendonly", "yes"]),
        "{args:?}"
    );
    let claims = array(&sts["spec"]["volumeClaimTemplates"]);
    assert_eq!(claims.len(), 1);
    let data = claims[0]["metadata"]["name"].as_str().unwrap();
    assert!(array(&container["volumeMounts"])
        .iter()
        .any(|m| m["name"] == data && m["mountPath"] == "/data"));
    assert!(
        array(&redis_pod["spec"]["volumes"]).is_empty(),
        "the data volume is the claim, not an emptyDir"
    );
}

#[test]
fn prometheus_scrapes_metrics_on_the_admin_port() {
    let objects = objects();
    let kg = keygate_config(&objects);
    let admin_port = kg.config.fixed.admin_listen.port();
    let pod = app_pod(&objects);

    // Annotation-based discovery.
    let annotations = str_map(pod.annotations);
    assert_eq!(annotations["prometheus.io/scrape"], "true");
    assert_eq!(annotations["prometheus.io/port"], admin_port.to_string());
    assert_eq!(annotations["prometheus.io/path"], "/metrics");

    // Prometheus Operator: the ServiceMonitor's endpoint is a Service port that lands on
    // the admin port, path /metrics.
    let monitors: Vec<&Object> = of_kind(&objects, "ServiceMonitor").collect();
    assert_eq!(monitors.len(), 1);
    let sm = &monitors[0].value;
    assert_eq!(sm["apiVersion"], "monitoring.coreos.com/v1");
    let namespaces: Vec<&str> = array(&sm["spec"]["namespaceSelector"]["matchNames"])
        .iter()
        .filter_map(Value::as_str)
        .collect();
    assert_eq!(namespaces, [NAMESPACE]);
    let services: Vec<&Object> = of_kind(&objects, "Service")
        .filter(|s| {
            selects(
                &sm["spec"]["selector"]["matchLabels"],
                &s.value["metadata"]["labels"],
            )
        })
        .collect();
    assert_eq!(services.len(), 1, "the ServiceMonitor selects one Service");
    let svc = &services[0].value;
    assert!(selects(&svc["spec"]["selector"], pod.labels));
    let endpoints = array(&sm["spec"]["endpoints"]);
    assert!(!endpoints.is_empty());
    for e in endpoints {
        assert_eq!(e["path"], "/metrics");
        assert!(e["scheme"].is_null() || e["scheme"] == "http");
        let port = array(&svc["spec"]["ports"])
            .iter()
            .find(|p| p["name"] == e["port"])
            .unwrap_or_else(|| panic!("the Service has no port named {}", e["port"]));
        assert_eq!(
            resolve_port(&port["targetPort"], &pod),
            u64::from(admin_port)
        );
    }
}

#[test]
fn kustomization_lists_every_manifest() {
    let k: Value = serde_norway::from_str(&read("kustomization.yaml")).unwrap();
    assert_eq!(k["kind"], "Kustomization");
    let resources: BTreeSet<String> = array(&k["resources"])
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    for r in &resources {
        assert!(
            k8s_dir().join(r).is_file(),
            "kustomization lists {r}, missing"
        );
    }
    assert_eq!(
        resources,
        manifest_files(),
        "kustomization resources vs the manifest files in k8s/"
    );
    // Generated ConfigMaps: `key=file` or `file`; the dashboard is one of them.
    let mut generated = BTreeSet::new();
    for g in array(&k["configMapGenerator"]) {
        for f in array(&g["files"]) {
            let f = f.as_str().unwrap();
            let file = f.split_once('=').map_or(f, |(_, file)| file);
            assert!(
                k8s_dir().join(file).is_file(),
                "generator file {file} missing"
            );
            generated.insert(file.to_string());
        }
    }
    assert!(
        generated.contains("grafana-dashboard.json"),
        "{generated:?}"
    );
}

/// A label matcher: label, operator, value.
type Matcher = (String, String, String);

/// Metric names and `{label op "value"}` matchers in a PromQL expression.
fn metric_refs(expr: &str) -> Vec<(String, Vec<Matcher>)> {
    let bytes = expr.as_bytes();
    let ident = |b: u8| b.is_ascii_alphanumeric() || b == b'_' || b == b':';
    let mut refs = Vec::new();
    let mut i = 0;
    while let Some(off) = expr[i..].find("keygate_") {
        let start = i + off;
        let mut end = start + "keygate_".len();
        if start > 0 && ident(bytes[start - 1]) {
            i = end;
            continue;
        }
        while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
            end += 1;
        }
        let name = expr[start..end].to_string();
        let mut matchers = Vec::new();
        if bytes.get(end) == Some(&b'{') {
            let close = expr[end..].find('}').expect("unclosed {") + end;
            let mut rest = &expr[end + 1..close];
            loop {
                rest = rest.trim_start_matches([' ', ',', '\n']);
                if rest.is_empty() {
                    break;
                }
                let n = rest
                    .find(|c: char| !c.is_ascii_alphanumeric() && c != '_')
                    .unwrap();
                let label = rest[..n].to_string();
                rest = rest[n..].trim_start();
                let q = rest.find('"').expect("quoted label value");
                let op = rest[..q].trim().to_string();
                let value_end = rest[q + 1..].find('"').expect("closing quote") + q + 1;
                matchers.push((label, op, rest[q + 1..value_end].to_string()));
                rest = &rest[value_end + 1..];
            }
            end = close + 1;
        }
        refs.push((name, matchers));
        i = end;
    }
    refs
}

/// Every `expr` string anywhere in a JSON document.
fn exprs(v: &Value, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, v) in m {
                match (k.as_str(), v) {
                    ("expr", Value::String(s)) => out.push(s.clone()),
                    _ => exprs(v, out),
                }
            }
        }
        Value::Array(a) => a.iter().for_each(|v| exprs(v, out)),
        _ => {}
    }
}

/// family -> (type, label -> values seen), from Prometheus text format.
type Families = BTreeMap<String, (String, BTreeMap<String, BTreeSet<String>>)>;

fn families(text: &str) -> Families {
    let mut families = Families::new();
    for line in text.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let (name, kind) = rest.split_once(' ').unwrap();
            families.insert(name.to_string(), (kind.to_string(), BTreeMap::new()));
        }
    }
    for line in text
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
    {
        let Some((series, labels)) = line.split_once('{') else {
            continue;
        };
        let family = family_of(&families, series).unwrap_or_else(|| panic!("untyped {series}"));
        let labels = &labels[..labels.rfind('}').unwrap()];
        for pair in labels.split("\",").filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once("=\"").unwrap();
            families
                .get_mut(&family)
                .unwrap()
                .1
                .entry(k.to_string())
                .or_default()
                .insert(v.trim_end_matches('"').to_string());
        }
    }
    families
}

/// The family a series name belongs to (`x_bucket`, `x_sum`, `x_count` of a histogram x).
fn family_of(families: &Families, series: &str) -> Option<String> {
    if families.contains_key(series) {
        return Some(series.to_string());
    }
    ["_bucket", "_sum", "_count"].iter().find_map(|suffix| {
        let base = series.strip_suffix(suffix)?;
        matches!(families.get(base), Some((kind, _)) if kind == "histogram" || kind == "summary")
            .then(|| base.to_string())
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_exported_metrics() {
    // The dashboard: a Grafana dashboard over a Prometheus data source variable.
    let dashboard: Value =
        serde_json::from_str(&read("grafana-dashboard.json")).expect("dashboard is JSON");
    assert!(dashboard["schemaVersion"].as_u64().unwrap() >= 36);
    assert!(dashboard["uid"].is_string() && dashboard["title"].is_string());
    let variable = array(&dashboard["templating"]["list"])
        .iter()
        .find(|v| v["type"] == "datasource" && v["query"] == "prometheus")
        .expect("a Prometheus data source variable");
    let ds_uid = format!("${{{}}}", variable["name"].as_str().unwrap());
    let panels: Vec<&Value> = array(&dashboard["panels"])
        .iter()
        .filter(|p| p["type"] != "row")
        .collect();
    assert!(panels.len() >= 8, "{} panels", panels.len());
    let mut ids = BTreeSet::new();
    for p in array(&dashboard["panels"]) {
        assert!(ids.insert(p["id"].as_u64().unwrap()), "duplicate panel id");
        assert!(p["gridPos"]["w"].is_u64() && p["gridPos"]["h"].is_u64());
    }
    for p in &panels {
        assert_eq!(p["datasource"]["uid"], ds_uid.as_str(), "{}", p["title"]);
        let targets = array(&p["targets"]);
        assert!(!targets.is_empty(), "{} has no query", p["title"]);
        for t in targets {
            assert_eq!(t["datasource"]["uid"], ds_uid.as_str(), "{}", p["title"]);
            assert!(t["expr"].is_string() && t["refId"].is_string());
        }
    }
    let mut dashboard_exprs = Vec::new();
    exprs(&dashboard, &mut dashboard_exprs);
    for wanted in [
        "histogram_quantile(0.99, sum by (le, source) (rate(keygate_auth_duration_seconds_bucket[5m])))",
        "histogram_quantile(0.5, sum by (le, source) (rate(keygate_auth_duration_seconds_bucket[5m])))",
        "sum by (result) (rate(keygate_requests_total[5m]))",
        "sum(rate(keygate_auth_duration_seconds_count{source=\"cache\"}[5m])) / sum(rate(keygate_auth_duration_seconds_count[5m]))",
    ] {
        assert!(dashboard_exprs.iter().any(|e| e == wanted), "no panel shows {wanted}");
    }

    // The alert rules.
    let objects = objects();
    let rules = &of_kind(&objects, "PrometheusRule")
        .next()
        .expect("a PrometheusRule")
        .value;
    let mut rule_exprs = Vec::new();
    exprs(&rules["spec"], &mut rule_exprs);
    let alerts: BTreeSet<&str> = array(&rules["spec"]["groups"])
        .iter()
        .flat_map(|g| array(&g["rules"]))
        .filter_map(|r| r["alert"].as_str())
        .collect();
    for a in [
        "KeygateStoreErrors",
        "KeygatePubsubDown",
        "KeygateHighDenialRate",
        "KeygateAuthLatencyHigh",
        "KeygateConfigReloadFailed",
    ] {
        assert!(alerts.contains(a), "alert {a} missing: {alerts:?}");
    }

    // What a running keygate exports.
    let app = spawn_app(Store::Memory).await;
    let k = app.create_key(&["users:read"]).await;
    app.get_with("/users/1", &k.key).await;
    app.get_with("/users/1", &k.key).await;
    let text = app
        .http
        .get(app.admin_url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    app.stop().await;
    let families = families(&text);

    // The example PromQL of the README's Operations section.
    let docs = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README.md"))
        .expect("README.md");
    let doc_exprs: Vec<String> = docs
        .split("```promql\n")
        .skip(1)
        .flat_map(|block| block.split("```").next().unwrap().lines())
        .filter(|line| !line.trim_start().starts_with('#'))
        .map(str::to_string)
        .collect();

    let mut used = BTreeSet::new();
    for (what, exprs) in [
        ("dashboard", &dashboard_exprs),
        ("alert rules", &rule_exprs),
        ("README.md", &doc_exprs),
    ] {
        for expr in exprs.iter() {
            for (name, matchers) in metric_refs(expr) {
                let family = family_of(&families, &name).unwrap_or_else(|| {
                    panic!("{what}: {name} is not exported by keygate (in `{expr}`)")
                });
                let labels = &families[&family].1;
                for (label, op, value) in matchers {
                    let values = labels.get(&label).unwrap_or_else(|| {
                        panic!("{what}: {family} has no label {label} (in `{expr}`)")
                    });
                    // Equality values, and the alternatives of simple `a|b|c` regexes,
                    // are values keygate uses.
                    let simple = value
                        .bytes()
                        .all(|b| b.is_ascii_lowercase() || b == b'_' || b == b'|');
                    let alternatives: Vec<&str> = match op.as_str() {
                        "=" | "!=" => vec![value.as_str()],
                        "=~" | "!~" if simple => value.split('|').collect(),
                        _ => vec![],
                    };
                    for v in alternatives {
                        assert!(
                            values.contains(v),
                            "{what}: {family}{{{label}=\"{v}\"}} never exported; values: {values:?}"
                        );
                    }
                }
                used.insert(family);
            }
        }
    }
    for family in [
        "keygate_requests_total",
        "keygate_auth_duration_seconds",
        "keygate_upstream_duration_seconds",
        "keygate_store_errors_total",
        "keygate_pubsub_connected",
        "keygate_cache_flushes_total",
        "keygate_config_reloads_total",
        "keygate_invalidation_lag_seconds",
    ] {
        assert!(used.contains(family), "{family} is on no panel or alert");
    }
}

#[test]
fn alert_rules_pass_promtool() {
    let objects = objects();
    let rules = &of_kind(&objects, "PrometheusRule")
        .next()
        .expect("a PrometheusRule")
        .value;
    if !promtool_available() {
        println!("promtool not installed: alert rules checked by the other k8s tests only");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The operator object's `spec.groups` is a plain Prometheus rule file's `groups`
    // (promtool knows no PrometheusRule, kubernetes-validate has no schema for it).
    let groups = &rules["spec"]["groups"];
    assert!(
        !array(groups).is_empty(),
        "the PrometheusRule has no groups"
    );
    std::fs::write(
        dir.path().join("rules.yaml"),
        serde_norway::to_string(&serde_json::json!({ "groups": groups })).unwrap(),
    )
    .unwrap();
    // Each alert fires on the data it is meant for (compared through ALERTS, so the
    // annotation texts are free to change).
    std::fs::write(dir.path().join("test.yaml"), RULES_TEST).unwrap();
    for args in [
        ["check", "rules", "rules.yaml"],
        ["test", "rules", "test.yaml"],
    ] {
        let out = Command::new("promtool")
            .args(args)
            .current_dir(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "promtool {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

/// The alert rules documented in README.md are the PrometheusRule's group, so the two
/// cannot drift apart.
#[test]
fn documented_alert_rules_match_the_prometheus_rule() {
    let objects = objects();
    let spec = &of_kind(&objects, "PrometheusRule")
        .next()
        .expect("a PrometheusRule")
        .value["spec"];
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let mut found = 0;
    for doc in ["README.md"] {
        let Ok(text) = std::fs::read_to_string(root.join(doc)) else {
            continue;
        };
        for block in text.split("```yaml\n").skip(1) {
            let block = block.split("```").next().unwrap();
            if !block.contains("KeygatePubsubDown") {
                continue;
            }
            let documented: Value = serde_norway::from_str(block)
                .unwrap_or_else(|e| panic!("{doc}: alert rules block: {e}"));
            assert_eq!(
                &documented, spec,
                "{doc}'s alert rules differ from k8s/prometheus-rules.yaml"
            );
            found += 1;
        }
    }
    assert!(found > 0, "no documented alert rules found");
}

const RULES_TEST: &str = r#"
rule_files: [rules.yaml]
evaluation_interval: 1m
tests:
  - interval: 1m
    input_series:
      - series: 'keygate_pubsub_connected{namespace="ns",pod="p1",job="kg"}'
        values: '1 1 0 0 0 0'
      - series: 'keygate_config_reloads_total{namespace="ns",pod="p1",job="kg",result="failure"}'
        values: '0 0 1 1 1 1'
      - series: 'keygate_config_reloads_total{namespace="ns",pod="p1",job="kg",result="success"}'
        values: '0+1x30'
      - series: 'keygate_store_errors_total{namespace="ns",pod="p1",job="kg",operation="read"}'
        values: '0+60x30'
      - series: 'keygate_requests_total{namespace="ns",pod="p1",job="kg",route="r",result="allowed"}'
        values: '0+600x30'
      - series: 'keygate_requests_total{namespace="ns",pod="p1",job="kg",route="r",result="upstream_timeout"}'
        values: '0+6000x30'
      - series: 'keygate_requests_total{namespace="ns",pod="p1",job="kg",route="r",result="unknown_key"}'
        values: '0+600x30'
      - series: 'keygate_requests_total{namespace="ns2",pod="p2",job="kg",route="r",result="allowed"}'
        values: '0+600x30'
      - series: 'keygate_requests_total{namespace="ns2",pod="p2",job="kg",route="r",result="revoked_key"}'
        values: '0+600x30'
      - series: 'keygate_auth_duration_seconds_bucket{namespace="ns",pod="p1",job="kg",result="allowed",source="store",le="0.032768"}'
        values: '0+10x30'
      - series: 'keygate_auth_duration_seconds_bucket{namespace="ns",pod="p1",job="kg",result="allowed",source="store",le="0.131072"}'
        values: '0+1000x30'
      - series: 'keygate_auth_duration_seconds_bucket{namespace="ns",pod="p1",job="kg",result="allowed",source="store",le="+Inf"}'
        values: '0+1000x30'
      - series: 'keygate_auth_duration_seconds_bucket{namespace="ns2",pod="p2",job="kg",result="allowed",source="cache",le="0.000004"}'
        values: '0+1000x30'
      - series: 'keygate_auth_duration_seconds_bucket{namespace="ns2",pod="p2",job="kg",result="allowed",source="cache",le="+Inf"}'
        values: '0+1000x30'
    promql_expr_test:
      - expr: ALERTS{alertname="KeygatePubsubDown",alertstate="firing"}
        eval_time: 2m
        exp_samples: []
      - expr: ALERTS{alertname="KeygatePubsubDown",alertstate="firing"}
        eval_time: 4m
        exp_samples:
          - labels: 'ALERTS{alertname="KeygatePubsubDown",alertstate="firing",job="kg",namespace="ns",pod="p1",severity="warning"}'
            value: 1
      - expr: ALERTS{alertname="KeygateConfigReloadFailed",alertstate="firing"}
        eval_time: 4m
        exp_samples:
          - labels: 'ALERTS{alertname="KeygateConfigReloadFailed",alertstate="firing",job="kg",namespace="ns",pod="p1",result="failure",severity="warning"}'
            value: 1
      - expr: ALERTS{alertname="KeygateConfigReloadFailed",alertstate="firing"}
        eval_time: 15m
        exp_samples: []
      - expr: ALERTS{alertname="KeygateStoreErrors",alertstate="firing"}
        eval_time: 3m
        exp_samples: []
      - expr: ALERTS{alertname="KeygateStoreErrors",alertstate="firing"}
        eval_time: 12m
        exp_samples:
          - labels: 'ALERTS{alertname="KeygateStoreErrors",alertstate="firing",namespace="ns",operation="read",pod="p1",severity="warning"}'
            value: 1
      - expr: ALERTS{alertname="KeygateHighDenialRate",alertstate="firing"}
        eval_time: 5m
        exp_samples: []
      - expr: ALERTS{alertname="KeygateHighDenialRate",alertstate="firing"}
        eval_time: 20m
        exp_samples:
          - labels: 'ALERTS{alertname="KeygateHighDenialRate",alertstate="firing",job="kg",namespace="ns2",severity="warning"}'
            value: 1
      - expr: ALERTS{alertname="KeygateAuthLatencyHigh",alertstate="firing"}
        eval_time: 20m
        exp_samples:
          - labels: 'ALERTS{alertname="KeygateAuthLatencyHigh",alertstate="firing",job="kg",namespace="ns",severity="warning"}'
            value: 1
"#;
