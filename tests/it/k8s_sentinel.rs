//! The `k8s/sentinel/` example agrees with keygate and with itself: its keygate.yaml is a
//! config keygate accepts, in Sentinel mode with `min_replicas_ack: 1`; the sentinel nodes
//! it names are the pods of the sentinel StatefulSet under its headless Service, on the
//! sentinels' port; the master name and quorum match the sentinels' config; the passwords
//! reach keygate from the Secret; the copies of the base's objects (`k8s/`) stay equal to
//! them; every pod is non-root with limits, probes and a PodDisruptionBudget. When
//! `kubectl` is installed, `kubectl kustomize k8s/sentinel` must render the same objects.

use keygate::config::{Config, StoreConfig};
use keygate::store::redis::Mode;
use serde::Deserialize;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::process::Command;

const NAMESPACE: &str = "keygate-sentinel";
const BASE_NAMESPACE: &str = "keygate-demo";

fn dir(sub: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(sub)
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Every `*.yaml` of a directory except the kustomization.
fn manifest_files(d: &Path) -> BTreeSet<String> {
    std::fs::read_dir(d)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect()
}

fn documents(text: &str) -> Vec<Value> {
    serde_norway::Deserializer::from_str(text)
        .map(|doc| Value::deserialize(doc).unwrap())
        .filter(|v| !v.is_null())
        .collect()
}

/// Every object of every manifest of a directory.
fn objects(d: &Path) -> Vec<Value> {
    manifest_files(d)
        .iter()
        .flat_map(|f| documents(&read(&d.join(f))))
        .collect()
}

fn find<'a>(objects: &'a [Value], kind: &str, name: &str) -> &'a Value {
    objects
        .iter()
        .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
        .unwrap_or_else(|| panic!("no {kind} {name}"))
}

fn array(v: &Value) -> &[Value] {
    v.as_array().map(Vec::as_slice).unwrap_or(&[])
}

fn labels(v: &Value) -> BTreeMap<String, String> {
    v.as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_string()))
                .collect()
        })
        .unwrap_or_default()
}

fn selects(selector: &Value, pod_labels: &Value) -> bool {
    let (selector, pod_labels) = (labels(selector), labels(pod_labels));
    !selector.is_empty() && selector.iter().all(|(k, v)| pod_labels.get(k) == Some(v))
}

fn container<'a>(pod_spec: &'a Value, name: &str) -> &'a Value {
    array(&pod_spec["containers"])
        .iter()
        .find(|c| c["name"] == name)
        .unwrap_or_else(|| panic!("no container {name}"))
}

/// A container's port by name or number.
fn container_port(c: &Value, port: &Value) -> u64 {
    match port {
        Value::Number(n) => n.as_u64().unwrap(),
        Value::String(name) => array(&c["ports"])
            .iter()
            .find(|p| p["name"] == name.as_str())
            .and_then(|p| p["containerPort"].as_u64())
            .unwrap_or_else(|| panic!("no container port {name}")),
        other => panic!("bad port {other}"),
    }
}

/// The variables a container gets from Secrets: name -> (secret, key).
fn secret_env(c: &Value) -> BTreeMap<String, (String, String)> {
    array(&c["env"])
        .iter()
        .filter_map(|e| {
            let r = &e["valueFrom"]["secretKeyRef"];
            Some((
                e["name"].as_str()?.to_string(),
                (
                    r["name"].as_str()?.to_string(),
                    r["key"].as_str()?.to_string(),
                ),
            ))
        })
        .collect()
}

/// A ConfigMap's script or config text.
fn config_text<'a>(objects: &'a [Value], configmap: &str, key: &str) -> &'a str {
    find(objects, "ConfigMap", configmap)["data"][key]
        .as_str()
        .unwrap_or_else(|| panic!("ConfigMap {configmap} has no {key}"))
}

fn keygate_yaml(objects: &[Value]) -> &str {
    config_text(objects, "keygate-config", "keygate.yaml")
}

#[test]
fn sentinel_config_is_valid_and_names_the_sentinel_pods() {
    let objects = objects(&dir("k8s/sentinel"));
    for o in &objects {
        let ns = if o["kind"] == "Namespace" {
            &o["metadata"]["name"]
        } else {
            &o["metadata"]["namespace"]
        };
        assert_eq!(ns, NAMESPACE, "{} {}", o["kind"], o["metadata"]["name"]);
    }

    // keygate's container and the variables it gets from the Secret.
    let app = find(&objects, "Deployment", "app");
    let keygate = container(&app["spec"]["template"]["spec"], "keygate");
    let from_secret = secret_env(keygate);
    let secret_value = |var: &str| -> String {
        let (secret, key) = from_secret
            .get(var)
            .unwrap_or_else(|| panic!("keygate's container does not get {var} from a Secret"));
        let s = find(&objects, "Secret", secret);
        s["stringData"][key.as_str()]
            .as_str()
            .unwrap_or_else(|| panic!("Secret {secret} has no {key}"))
            .to_string()
    };
    let root = find(&objects, "Secret", "keygate-secrets")["stringData"]["KEYGATE_ROOT_TOKEN"]
        .as_str()
        .unwrap()
        .to_string();

    // The config, with the environment the pod gives it.
    let raw: Value = serde_norway::from_str(keygate_yaml(&objects)).unwrap();
    let sentinel_raw = &raw["store"]["redis"]["sentinel"];
    let password_env = sentinel_raw["password_env"].as_str().unwrap();
    let sentinel_password_env = sentinel_raw["sentinel_password_env"].as_str().unwrap();
    let (password, sentinel_password) = (
        secret_value(password_env),
        secret_value(sentinel_password_env),
    );
    let env = [
        ("KEYGATE_ROOT_TOKEN", root.as_str()),
        (password_env, password.as_str()),
        (sentinel_password_env, sentinel_password.as_str()),
    ];
    let config = Config::from_yaml(keygate_yaml(&objects), "k8s/sentinel configmap", &env)
        .unwrap_or_else(|e| panic!("k8s/sentinel's keygate.yaml is not a valid config: {e}"));
    let StoreConfig::Redis(redis) = &config.fixed.store else {
        panic!("the Redis store");
    };
    let Mode::Sentinel(s) = &redis.mode else {
        panic!("store.redis.sentinel, not {:?}", redis.mode);
    };
    assert_eq!(redis.min_replicas_ack, 1);
    assert_eq!(s.password.as_deref(), Some(password.as_str()));
    assert_eq!(
        s.sentinel_password.as_deref(),
        Some(sentinel_password.as_str())
    );
    assert!(!s.tls);

    // Each node is `<sts>-<i>.<headless svc>.<ns>.svc.cluster.local:<port>`, a pod of the
    // sentinel StatefulSet; together they are all of its pods.
    let mut pods = BTreeSet::new();
    let mut statefulsets = BTreeSet::new();
    for node in &s.nodes {
        let (host, port) = node.rsplit_once(':').unwrap();
        let port: u64 = port.parse().unwrap();
        let parts: Vec<&str> = host.split('.').collect();
        assert_eq!(
            parts[2..],
            [NAMESPACE, "svc", "cluster", "local"],
            "{node}: pod.service.{NAMESPACE}.svc.cluster.local"
        );
        let (pod, svc_name) = (parts[0], parts[1]);
        let svc = find(&objects, "Service", svc_name);
        assert_eq!(svc["spec"]["clusterIP"], "None", "{svc_name} is headless");
        let (sts_name, ordinal) = pod.rsplit_once('-').unwrap();
        let sts = find(&objects, "StatefulSet", sts_name);
        assert_eq!(sts["spec"]["serviceName"], svc_name, "{node}");
        let replicas = sts["spec"]["replicas"].as_u64().unwrap();
        assert!(
            ordinal.parse::<u64>().unwrap() < replicas,
            "{node}: no such pod"
        );
        let template = &sts["spec"]["template"];
        assert!(selects(
            &svc["spec"]["selector"],
            &template["metadata"]["labels"]
        ));
        assert!(selects(
            &sts["spec"]["selector"]["matchLabels"],
            &template["metadata"]["labels"]
        ));
        let sentinel = container(&template["spec"], "sentinel");
        let svc_port = array(&svc["spec"]["ports"])
            .iter()
            .find(|p| p["port"].as_u64() == Some(port))
            .unwrap_or_else(|| panic!("{node}: Service {svc_name} has no port {port}"));
        assert_eq!(
            container_port(sentinel, &svc_port["targetPort"]),
            port,
            "{node}"
        );
        let command: Vec<&str> = array(&sentinel["command"])
            .iter()
            .filter_map(Value::as_str)
            .collect();
        assert!(command.contains(&"--sentinel"), "{command:?}");
        pods.insert(pod.to_string());
        statefulsets.insert((sts_name.to_string(), replicas));
    }
    assert_eq!(statefulsets.len(), 1, "one StatefulSet of sentinels");
    let (sts_name, replicas) = statefulsets.pop_first().unwrap();
    assert_eq!(replicas, 3);
    let all: BTreeSet<String> = (0..replicas).map(|i| format!("{sts_name}-{i}")).collect();
    assert_eq!(pods, all, "keygate lists every sentinel once");

    // The sentinels monitor the master keygate asks for, with a majority quorum, on the
    // data nodes' StatefulSet and port; the data nodes' passwords are the ones keygate
    // uses (same Secret keys).
    let init = config_text(&objects, "sentinel-config", "init.sh");
    let monitor = init
        .lines()
        .find_map(|l| l.trim().strip_prefix("echo \"sentinel monitor "))
        .expect("init.sh writes a monitor line");
    let fields: Vec<&str> = monitor.trim_end_matches('"').split(' ').collect();
    assert_eq!(fields[0], s.master_name, "{monitor}");
    let quorum: u64 = fields[3].parse().unwrap();
    assert!(
        quorum > replicas / 2 && quorum <= replicas,
        "quorum {quorum}"
    );
    for text in [
        init,
        config_text(&objects, "sentinel-config", "monitor.conf"),
    ] {
        for l in text
            .lines()
            .filter(|l| l.contains("sentinel ") && l.contains(" mymaster"))
        {
            assert!(l.contains(&format!(" {} ", s.master_name)), "{l}");
        }
    }
    let redis_sts = find(&objects, "StatefulSet", "redis");
    let redis_svc = redis_sts["spec"]["serviceName"].as_str().unwrap();
    assert_eq!(
        find(&objects, "Service", redis_svc)["spec"]["clusterIP"],
        "None"
    );
    let redis_replicas = redis_sts["spec"]["replicas"].as_u64().unwrap();
    assert!(
        u64::from(redis.min_replicas_ack) < redis_replicas,
        "min_replicas_ack {} needs more than {redis_replicas} data nodes",
        redis.min_replicas_ack
    );
    let redis_container = container(&redis_sts["spec"]["template"]["spec"], "redis");
    assert_eq!(container_port(redis_container, &Value::from("redis")), 6379);
    // `sentinel monitor <name> ${primary} 6379 <quorum>`: the primary the other sentinels
    // name, else a data node saying ROLE master, else redis-0.
    assert_eq!(fields[1..3], ["${primary}", "6379"], "{monitor}");
    let start = config_text(&objects, "redis-config", "start.sh");
    assert!(init.contains(&format!("redis-${{i}}.{redis_svc}.${{domain}}")));
    assert!(init.contains(&format!("primary=\"redis-0.{redis_svc}.${{domain}}\"")));
    assert!(start.contains(&format!("self=\"${{POD_NAME}}.{redis_svc}.${{domain}}\"")));
    assert!(start.contains(&format!("{sts_name}-${{i}}.sentinel-headless.${{domain}}")));
    assert!(start.contains(&format!("get-master-addr-by-name {}", s.master_name)));
    for c in [
        redis_container,
        container(
            &find(&objects, "StatefulSet", &sts_name)["spec"]["template"]["spec"],
            "sentinel",
        ),
    ] {
        let env = secret_env(c);
        assert_eq!(env["REDIS_PASSWORD"], from_secret[password_env]);
        assert_eq!(env["SENTINEL_PASSWORD"], from_secret[sentinel_password_env]);
    }
}

/// The sentinel's config file is written by the init container into an emptyDir that the
/// sentinel itself mounts (it rewrites the file), from the ConfigMap.
#[test]
fn sentinels_get_a_writable_config_from_the_configmap() {
    let objects = objects(&dir("k8s/sentinel"));
    let sts = find(&objects, "StatefulSet", "sentinel");
    let spec = &sts["spec"]["template"]["spec"];
    let volumes: BTreeMap<&str, &Value> = array(&spec["volumes"])
        .iter()
        .map(|v| (v["name"].as_str().unwrap(), v))
        .collect();
    let init = &array(&spec["initContainers"])[0];
    let sentinel = container(spec, "sentinel");
    let conf = array(&sentinel["command"])
        .iter()
        .filter_map(Value::as_str)
        .find(|a| a.ends_with(".conf"))
        .expect("sentinel starts on a config file");
    let conf_dir = Path::new(conf).parent().unwrap().to_str().unwrap();
    let mount_of = |c: &Value, path: &str| -> String {
        array(&c["volumeMounts"])
            .iter()
            .find(|m| m["mountPath"] == path)
            .unwrap_or_else(|| panic!("{} mounts nothing at {path}", c["name"]))["name"]
            .as_str()
            .unwrap()
            .to_string()
    };
    let live = mount_of(sentinel, conf_dir);
    assert!(
        volumes[live.as_str()]["emptyDir"].is_object(),
        "{live} is an emptyDir"
    );
    assert_eq!(mount_of(init, conf_dir), live);
    let script = config_text(&objects, "sentinel-config", "init.sh");
    assert!(
        script.contains(&format!("> {conf}")),
        "init.sh writes {conf}"
    );
    let source = mount_of(init, "/config");
    assert_eq!(
        volumes[source.as_str()]["configMap"]["name"],
        "sentinel-config"
    );
    for key in ["sentinel.conf", "monitor.conf"] {
        assert!(
            script.contains(&format!("cat /config/{key}")),
            "{key} copied"
        );
        config_text(&objects, "sentinel-config", key);
    }
    // resolve-hostnames comes before the monitor line (sentinel reads it in order).
    let globals = config_text(&objects, "sentinel-config", "sentinel.conf");
    assert!(globals.contains("sentinel resolve-hostnames yes"));
    assert!(globals.contains("sentinel announce-hostnames yes"));
    assert!(!globals.contains("sentinel monitor"));
}

/// Pods: non-root, read-only root, no capabilities, resources and probes, spread by
/// anti-affinity, and a PodDisruptionBudget over each workload.
#[test]
fn pods_are_hardened_spread_and_budgeted() {
    let objects = objects(&dir("k8s/sentinel"));
    let workloads: Vec<&Value> = objects
        .iter()
        .filter(|o| o["kind"] == "StatefulSet" || o["kind"] == "Deployment")
        .collect();
    assert_eq!(workloads.len(), 3, "app, redis, sentinel");
    for w in workloads {
        let name = w["metadata"]["name"].as_str().unwrap();
        let template = &w["spec"]["template"];
        let spec = &template["spec"];
        assert_eq!(spec["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(spec["automountServiceAccountToken"], false, "{name}");
        let containers = array(&spec["containers"])
            .iter()
            .chain(array(&spec["initContainers"]));
        for c in containers {
            let what = format!("{name}/{}", c["name"]);
            let sc = &c["securityContext"];
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{what}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{what}");
            assert_eq!(
                sc["capabilities"]["drop"],
                serde_json::json!(["ALL"]),
                "{what}"
            );
            for r in ["requests", "limits"] {
                assert!(c["resources"][r]["cpu"].is_string(), "{what} {r}");
                assert!(c["resources"][r]["memory"].is_string(), "{what} {r}");
            }
        }
        // Probes on keygate, the data nodes and the sentinels (the demo app has none, as
        // in the base).
        for c in array(&spec["containers"])
            .iter()
            .filter(|c| c["name"] != "app")
        {
            assert!(c["readinessProbe"].is_object(), "{name}/{}", c["name"]);
            assert!(c["livenessProbe"].is_object(), "{name}/{}", c["name"]);
        }
        let anti = array(
            &spec["affinity"]["podAntiAffinity"]["preferredDuringSchedulingIgnoredDuringExecution"],
        );
        assert!(
            anti.iter().any(|t| {
                t["podAffinityTerm"]["topologyKey"] == "kubernetes.io/hostname"
                    && selects(
                        &t["podAffinityTerm"]["labelSelector"]["matchLabels"],
                        &template["metadata"]["labels"],
                    )
            }),
            "{name}: pods kept apart"
        );
        let budgets = objects
            .iter()
            .filter(|o| o["kind"] == "PodDisruptionBudget")
            .filter(|p| {
                selects(
                    &p["spec"]["selector"]["matchLabels"],
                    &template["metadata"]["labels"],
                )
            })
            .count();
        assert_eq!(budgets, 1, "{name}: one PodDisruptionBudget");
    }
    // The data nodes keep the base's persistence.
    let redis = find(&objects, "StatefulSet", "redis");
    let conf = config_text(&objects, "redis-config", "redis.conf");
    for line in ["appendonly yes", "maxmemory-policy noeviction", "dir /data"] {
        assert!(conf.lines().any(|l| l == line), "redis.conf: {line}");
    }
    assert_eq!(array(&redis["spec"]["volumeClaimTemplates"]).len(), 1);
}

/// Remove what the Sentinel example changes on purpose, so the rest can be compared with
/// the base.
fn without(mut v: Value, pointers: &[&str]) -> Value {
    for p in pointers {
        let (parent, key) = p.rsplit_once('/').unwrap();
        if let Some(obj) = v.pointer_mut(parent).and_then(Value::as_object_mut) {
            obj.remove(key);
        }
    }
    v
}

fn renamespaced(v: &Value) -> Value {
    serde_json::from_str(
        &serde_json::to_string(v)
            .unwrap()
            .replace(BASE_NAMESPACE, NAMESPACE),
    )
    .unwrap()
}

#[test]
fn copies_of_the_base_stay_equal_to_it() {
    let base = objects(&dir("k8s"));
    let ours = objects(&dir("k8s/sentinel"));
    // keygate.yaml: equal outside `store`.
    let strip_store = |text: &str| without(serde_norway::from_str(text).unwrap(), &["/store"]);
    assert_eq!(
        strip_store(keygate_yaml(&ours)),
        strip_store(keygate_yaml(&base)),
        "k8s/sentinel/configmap.yaml's keygate.yaml differs from k8s/configmap.yaml outside store"
    );
    // The Deployment: equal but for the Redis passwords and the anti-affinity.
    let strip = |d: &Value| {
        let mut d = without(renamespaced(d), &["/spec/template/spec/affinity"]);
        for c in d["spec"]["template"]["spec"]["containers"]
            .as_array_mut()
            .unwrap()
        {
            if let Some(env) = c["env"].as_array_mut() {
                env.retain(|e| {
                    !matches!(
                        e["name"].as_str(),
                        Some("REDIS_PASSWORD" | "SENTINEL_PASSWORD")
                    )
                });
            }
        }
        d
    };
    assert_eq!(
        strip(find(&ours, "Deployment", "app")),
        strip(find(&base, "Deployment", "app")),
        "k8s/sentinel/deployment.yaml differs from k8s/deployment.yaml"
    );
    for (kind, name) in [
        ("Service", "app"),
        ("Service", "keygate-admin"),
        ("NetworkPolicy", "app-ingress"),
        ("Secret", "keygate-secrets"),
    ] {
        assert_eq!(
            find(&ours, kind, name),
            &renamespaced(find(&base, kind, name)),
            "{kind} {name} differs from the base's"
        );
    }
    // The data nodes: the base's pod settings.
    let (r, b) = (
        &find(&ours, "StatefulSet", "redis")["spec"]["template"]["spec"],
        &find(&base, "StatefulSet", "redis")["spec"]["template"]["spec"],
    );
    assert_eq!(r["securityContext"], b["securityContext"]);
    let (rc, bc) = (container(r, "redis"), container(b, "redis"));
    for field in [
        "image",
        "resources",
        "securityContext",
        "livenessProbe",
        "ports",
    ] {
        assert_eq!(rc[field], bc[field], "redis container {field}");
    }
}

#[test]
fn kustomization_lists_every_manifest_and_renders() {
    let d = dir("k8s/sentinel");
    let k: Value = serde_norway::from_str(&read(&d.join("kustomization.yaml"))).unwrap();
    assert_eq!(k["kind"], "Kustomization");
    let resources: BTreeSet<String> = array(&k["resources"])
        .iter()
        .map(|r| r.as_str().unwrap().to_string())
        .collect();
    assert_eq!(resources, manifest_files(&d));
    let Ok(out) = Command::new("kubectl").args(["kustomize"]).arg(&d).output() else {
        println!("kubectl not installed: k8s/sentinel not rendered with kustomize");
        return;
    };
    assert!(
        out.status.success(),
        "kubectl kustomize k8s/sentinel: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let rendered = documents(&String::from_utf8(out.stdout).unwrap());
    let key = |o: &Value| format!("{}/{}", o["kind"], o["metadata"]["name"]);
    let (mut a, mut b): (Vec<Value>, Vec<Value>) = (rendered, objects(&d));
    a.sort_by_key(key);
    b.sort_by_key(key);
    assert_eq!(a, b, "kustomize renders the manifests unchanged");
}
