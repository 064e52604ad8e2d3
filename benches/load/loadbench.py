#!/usr/bin/env python3
"""keygate side-by-side load bench (issue 6). Started by `scripts/loadbench`, which installs
the tools and builds keygate and benches/passthrough.rs first; this file only orchestrates
(Python standard library).

Everything listens on 127.0.0.1, on free ports, with state in a temporary directory:

  upstream          nginx `return 200 "ok\\n"` (its own instance); every target fronts it
  upstream-direct   wrk straight at the upstream: the ceiling
  bare-hyper        benches/passthrough.rs: bare hyper 1.x pass-through in keygate's
                    architecture (thread per CPU, one upstream connection per client
                    connection): the physical limit of keygate's stack (--passthrough PATH)
  bare-hyper-pooled the same binary with --pooled: the textbook hyper proxy (multi-thread
                    runtime, hyper-util pooled client)
  keygate-noauth    keygate, one route `/**` with `auth: none` (memory store): keygate's
                    forwarding path without key verification and scope check
  keygate-auth      keygate, Redis store, 50 routes, 10,000 keys made with POST /v1/keys,
                    each request carrying a random one of them (warm cache, scope check);
                    logging as shipped: access log on, level info, stderr to a file
  keygate-auth-nolog keygate-auth's setup with `proxy.access_log: false`
  keygate-auth-limited keygate-auth with a per-key rate limit on every route (`local`
                    mode, default settings, never reached)
  keygate-auth-exact the same limit in `rate_limits.mode: exact` (one Redis script per
                    request)
  keygate-auth-1w   keygate-auth's setup with `proxy.workers: 1` (opt-in: --one-worker)
  nginx             plain reverse proxy, upstream keepalive, access_log off
  haproxy           plain reverse proxy, http-reuse always (when installed)

Phases: (1) warm hot path, targets interleaved over rounds, medians, then keygate-auth
and keygate-auth-limited in back-to-back pairs (`--pair-rounds`); (2) cold path on a
fresh keygate (every request a key it has never seen: one Redis HGETALL each); (3) memory:
the same keygate filled with every generated key, RSS before/after.
"""

import argparse
import datetime
import hashlib
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
ALPHABET = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz"
ROOT_TOKEN = "kgroot_loadbench_" + uuid.uuid4().hex
BENCH_PATH = "/api/v1/items/42"
NAMESPACE = "kgbench"
KEY_SCOPES = ["items:read", "api:use", "svc03:read"]


def log(msg):
    print(f"[loadbench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------- processes


class Procs:
    """Every process this bench starts, stopped in reverse order (by pid, never by name)."""

    def __init__(self, workdir):
        self.workdir = workdir
        self.items = []

    def start(self, name, argv, env=None, cwd=None):
        out = open(self.workdir / f"{name}.log", "ab")
        p = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd,
                             start_new_session=True)
        out.close()
        self.items.append((name, p))
        return p

    def stop(self, p, sig=signal.SIGTERM, timeout=10):
        if p.poll() is None:
            try:
                p.send_signal(sig)
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.items = [(n, q) for (n, q) in self.items if q is not p]

    def stop_all(self):
        for _, p in reversed(list(self.items)):
            # nginx: SIGTERM is a fast shutdown of master and workers.
            self.stop(p, timeout=5)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(check, what, timeout=30, proc=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what}: process exited with {proc.returncode}")
        try:
            if check():
                return
        except (OSError, subprocess.CalledProcessError, http.client.HTTPException):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{what}: not ready after {timeout}s")


def http_get(port, path, headers=None, timeout=5):
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        c.request("GET", path, headers=headers or {})
        r = c.getresponse()
        return r.status, r.read()
    finally:
        c.close()


def cache_misses(admin_ports):
    """keygate_cache_misses_total summed over the keygates on these admin ports."""
    total = 0
    for port in admin_ports:
        _, body = http_get(port, "/metrics")
        m = re.search(rb"^keygate_cache_misses_total (\S+)", body, re.M)
        if m is None:
            raise RuntimeError(f"keygate on admin :{port} exports no keygate_cache_misses_total")
        total += int(float(m.group(1)))
    return total


def cpu_ticks(pids):
    """utime + stime (clock ticks) summed over pids; all threads of each process."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of proc(5)
    return total


def sys_ticks(pids):
    """stime (clock ticks) summed over pids: the kernel's share of cpu_ticks."""
    total = 0
    for pid in pids:
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            continue
        total += int(stat[stat.rindex(")") + 2:].split()[12])
    return total


def children(pid):
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            kids += [int(x) for x in (task / "children").read_text().split()]
        except OSError:
            pass
    if kids:
        return kids
    for d in Path("/proc").iterdir():  # fallback without CONFIG_PROC_CHILDREN
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
                if int(stat[stat.rindex(")") + 2:].split()[1]) == pid:
                    kids.append(int(d.name))
            except (OSError, ValueError):
                pass
    return kids


def busy_ticks():
    """Machine-wide user+nice+system clock ticks (/proc/stat), and the total incl. idle."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return f[0] + f[1] + f[2], sum(f[:8])


QUIET_BUDGET = [0.0]  # seconds left for wait_quiet over the whole bench


def wait_quiet(max_wait, threshold=0.15):
    """Wait (up to max_wait s, and within the bench's total budget) until the machine is
    nearly idle: on a shared box other work (a compile, a test run) competing for the
    cores makes every req/s figure lie. Returns the busy fraction of the last 1 s sample."""
    started = time.time()
    deadline = started + min(max_wait, max(QUIET_BUDGET[0], 0))
    try:
        return _wait_quiet(deadline, max_wait, threshold)
    finally:
        QUIET_BUDGET[0] -= max(time.time() - started - 1, 0)


def _wait_quiet(deadline, max_wait, threshold):
    waited = False
    while True:
        b0, t0 = busy_ticks()
        time.sleep(1)
        b1, t1 = busy_ticks()
        frac = (b1 - b0) / max(t1 - t0, 1)
        if frac <= threshold or time.time() >= deadline:
            if waited:
                log(f"machine busy fraction {frac:.0%} after waiting"
                    + (" (gave up waiting)" if frac > threshold else ""))
            return frac
        if not waited:
            log(f"machine busy ({frac:.0%} of all cores) before a run: waiting up to "
                f"{max_wait}s for it to quieten")
            waited = True


def tcp_active_opens():
    """System-wide count of TCP connects (/proc/net/snmp): wrk's own plus any a proxy
    opens to the upstream during a run (a pooled proxy opens none once warm)."""
    lines = [l.split() for l in Path("/proc/net/snmp").read_text().splitlines()
             if l.startswith("Tcp:")]
    return int(lines[1][lines[0].index("ActiveOpens")])


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


# --------------------------------------------------------------------------- redis


class Redis:
    def __init__(self, procs, workdir, name):
        self.dir = workdir / name
        self.dir.mkdir()
        self.port = free_port()
        self.proc = procs.start(name, [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1",
            "--save", "", "--appendonly", "no", "--dir", str(self.dir),
            "--daemonize", "no", "--maxclients", "10000"])
        wait_for(lambda: self.cli("PING").strip() == "PONG", f"{name} on :{self.port}",
                 proc=self.proc)
        EXTRA_OURS.append(self.proc.pid)

    def cli(self, *args, stdin=None):
        r = subprocess.run(["redis-cli", "-p", str(self.port), *args], capture_output=True,
                           stdin=stdin, check=True)
        return r.stdout.decode()

    def commandstats(self):
        """{command: calls} from INFO commandstats."""
        out = {}
        for line in self.cli("INFO", "commandstats").splitlines():
            m = re.match(r"cmdstat_([^:]+):calls=(\d+)", line)
            if m:
                out[m.group(1)] = int(m.group(2))
        return out


def stats_delta(before, after):
    return {k: v - before.get(k, 0) for k, v in after.items() if v - before.get(k, 0) > 0}


# --------------------------------------------------------------------------- configs


def render(template, **values):
    text = (HERE / template).read_text()
    for k, v in values.items():
        text = text.replace(f"@@{k}@@", str(v))
    assert "@@" not in text, f"unfilled placeholder in {template}"
    return text


def auth_routes():
    """50 routes with scopes; the benched GET route sits in the middle of the table,
    behind a write route on the same path (so the method is checked too)."""
    routes = ["  - { name: health, path: /healthz, auth: none }"]
    for i in range(47):
        if i == 24:
            routes.append('  - { name: items-write, methods: [POST, PUT, PATCH, DELETE], '
                          'path: "/api/v1/items/**", scopes: ["items:write", "api:use"] }')
            routes.append('  - { name: items-read, methods: [GET, HEAD], '
                          'path: "/api/v1/items/**", scopes: ["items:read", "api:use"] }')
        method = "[GET, HEAD]" if i % 2 == 0 else "[POST, PUT, PATCH, DELETE]"
        verb = "read" if i % 2 == 0 else "write"
        routes.append(f'  - {{ name: svc{i:02}-{verb}, methods: {method}, '
                      f'path: "/svc{i:02}/**", scopes: ["svc{i:02}:{verb}"] }}')
    assert len(routes) == 50
    return "\n".join(routes)


def keygate_config(proxy_port, admin_port, upstream_port, redis_port=None,
                   last_used_interval=None, workers=None, access_log=True, limits=None):
    if redis_port is None:
        store = "store:\n  memory: {}\n"
        routes = '  - { name: all, path: "/**", auth: none }'
    else:
        store = (f"store:\n  redis:\n    url: redis://127.0.0.1:{redis_port}/0\n"
                 f"    namespace: {NAMESPACE}\n")
        if last_used_interval:
            store += f"  last_used_interval: {last_used_interval}\n"
        routes = auth_routes()
    limits_section = ""
    if limits:
        # A per-key limit no run reaches, on every keyed route.
        routes = "\n".join(
            r[:-2] + ", rate_limits: [{ name: per-key, limit: 1000000000, window: 1s }] }"
            if "auth: none" not in r else r
            for r in routes.split("\n"))
        limits_section = f"rate_limits: {{ mode: {limits} }}\n"
    workers_line = f"  workers: {workers}\n" if workers is not None else ""
    # ttl 1h: the memory fill must not see early entries expire; max_entries above the
    # largest key count so nothing is evicted.
    return f"""# generated by benches/load/loadbench.py
proxy:
  listen: 127.0.0.1:{proxy_port}
  upstream: http://127.0.0.1:{upstream_port}
  access_log: {"true" if access_log else "false"}
{workers_line}admin:
  listen: 127.0.0.1:{admin_port}
  root_token_env: KEYGATE_ROOT_TOKEN
{store}cache: {{ ttl: 1h, negative_ttl: 2s, max_entries: 4000000 }}
routes:
{routes}
unmatched: deny
{limits_section}"""


# --------------------------------------------------------------------------- targets


class Target:
    def __init__(self, name, port, pids, note=""):
        self.name, self.port, self._pids, self.note = name, port, pids, note

    def pids(self):
        return self._pids()


def start_nginx(procs, workdir, name, template, **values):
    d = workdir / name
    d.mkdir()
    conf = d / "nginx.conf"
    conf.write_text(render(template, DIR=d, **values))
    p = procs.start(name, ["nginx", "-c", str(conf), "-p", str(d), "-e", str(d / "error.log")])
    port = values["PORT"]
    wait_for(lambda: socket.create_connection(("127.0.0.1", port), 1).close() or True,
             f"{name} on :{port}", proc=p)
    return p


def start_passthrough(procs, name, binary, port, upstream_port, pooled=False):
    """benches/passthrough.rs: a bare hyper pass-through on 127.0.0.1:port."""
    argv = [str(binary), "--listen", f"127.0.0.1:{port}",
            "--upstream", f"127.0.0.1:{upstream_port}"] + (["--pooled"] if pooled else [])
    env = {k: v for k, v in os.environ.items() if k != "TOKIO_WORKER_THREADS"}
    p = procs.start(name, argv, env=env)
    wait_for(lambda: socket.create_connection(("127.0.0.1", port), 1).close() or True,
             f"{name} on :{port}", proc=p)
    return p


def start_keygate(procs, workdir, name, binary, config_text, admin_port):
    cfg = workdir / f"{name}.yaml"
    cfg.write_text(config_text)
    # The proxy's thread count comes from `proxy.workers` in the config; a stray
    # TOKIO_WORKER_THREADS would still size keygate's main (admin, store) runtime, so it
    # is dropped.
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("KEYGATE_") and k not in ("RUST_LOG", "TOKIO_WORKER_THREADS")}
    env["KEYGATE_ROOT_TOKEN"] = ROOT_TOKEN
    # Logs as shipped (level info, text): keygate's stderr goes to {name}.log.
    p = procs.start(name, [str(binary), "serve", "--config", str(cfg)], env=env)
    wait_for(lambda: http_get(admin_port, "/readyz", timeout=1)[0] == 200,
             f"{name} /readyz", proc=p)
    return p


def create_keys(admin_port, n, path):
    """n keys through the admin API (POST /v1/keys, root token), one keep-alive connection."""
    c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=10)
    body_of = lambda i: json.dumps({"label": f"loadbench-{i}", "scopes": KEY_SCOPES})
    headers = {"Authorization": f"Bearer {ROOT_TOKEN}", "Content-Type": "application/json"}
    keys = []
    for i in range(n):
        c.request("POST", "/v1/keys", body=body_of(i), headers=headers)
        r = c.getresponse()
        data = r.read()
        if r.status != 201:
            raise RuntimeError(f"POST /v1/keys: {r.status} {data[:200]!r}")
        keys.append(json.loads(data)["key"])
    c.close()
    path.write_text("\n".join(keys) + "\n")
    return keys


# --------------------------------------------------------------------------- wrk


def parse_result(text):
    m = re.search(r"^RESULT (.*)$", text, re.M)
    if not m:
        raise RuntimeError(f"no RESULT line from wrk:\n{text}")
    return {k: int(v) for k, v in (kv.split("=") for kv in m.group(1).split())}


def run_wrk(port, script, args, threads, conns, duration, timeout_s=5):
    argv = ["wrk", f"-t{threads}", f"-c{conns}", f"-d{duration}s", "--latency",
            f"--timeout={timeout_s}s", "-s", str(HERE / script),
            f"http://127.0.0.1:{port}", "--", *[str(a) for a in args]]
    ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(argv, capture_output=True, text=True)
    ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise RuntimeError(f"wrk failed ({r.returncode}): {r.stderr}\n{r.stdout}")
    res = parse_result(r.stdout)
    res["wrk_cpu_s"] = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime)
    res["raw"] = r.stdout
    return res


# Processes whose CPU counts as "ours" when estimating other load on the machine (redis).
EXTRA_OURS = []


def measure(target, upstream_pids, script, args, threads, conns, duration):
    pids = target.pids()
    up = upstream_pids()
    ours = [p for p in EXTRA_OURS if p not in pids]
    b0, t0 = busy_ticks()
    x0 = cpu_ticks(ours)
    c0, s0, u0, o0 = cpu_ticks(pids), sys_ticks(pids), cpu_ticks(up), tcp_active_opens()
    res = run_wrk(target.port, script, args, threads, conns, duration)
    c1, s1, u1, o1 = cpu_ticks(pids), sys_ticks(pids), cpu_ticks(up), tcp_active_opens()
    b1, t1 = busy_ticks()
    x1 = cpu_ticks(ours)
    res["connects"] = o1 - o0
    # CPU used by processes that are not part of the bench, as a fraction of all cores.
    foreign = (b1 - b0) - (c1 - c0) - (u1 - u0) - (x1 - x0) - res["wrk_cpu_s"] * CLK_TCK
    res["other_load"] = max(foreign, 0) / max(t1 - t0, 1)
    n = max(res["requests"], 1)
    res["rps"] = res["requests"] / (res["duration_us"] / 1e6)
    res["cpu_us"] = (c1 - c0) / CLK_TCK * 1e6 / n
    res["sys_us"] = (s1 - s0) / CLK_TCK * 1e6 / n
    res["up_cpu_us"] = (u1 - u0) / CLK_TCK * 1e6 / n
    res["wrk_cpu_us"] = res["wrk_cpu_s"] * 1e6 / n
    res["errors"] = sum(res[k] for k in ("status_errors", "connect_errors", "read_errors",
                                         "write_errors", "timeouts"))
    return res


# --------------------------------------------------------------------------- generated keys


def base62_6(n):
    out = bytearray(b"0" * 6)
    for i in range(5, -1, -1):
        out[i] = ALPHABET[n % 62]
        n //= 62
    return bytes(out)


def resp(*args):
    parts = [b"*%d\r\n" % len(args)]
    for a in args:
        parts.append(b"$%d\r\n%s\r\n" % (len(a), a))
    return b"".join(parts)


def generate_keys(n, keys_path, resp_path):
    """n secret live keys in keygate's format (sk_live_ + 40 base62 + 6-char base62 CRC32 of
    prefix+body) and their records in keygate's Redis layout (src/store/redis.rs), digest =
    SHA-256 hex of the key text (no pepper). Written as a redis-cli --pipe stream."""
    prefix = b"sk_live_"
    table = bytes(ALPHABET[b % 62] for b in range(256))  # bias is irrelevant for a bench
    scopes = " ".join(KEY_SCOPES).encode()
    now = int(time.time() * 1000)
    ns = NAMESPACE.encode()
    tenant_key = ns + b":t:default"
    chunk = 20000
    with open(keys_path, "wb") as kf, open(resp_path, "wb") as rf:
        for start in range(0, n, chunk):
            m = min(chunk, n - start)
            bodies = os.urandom(40 * m).translate(table)
            kl, rl = [], []
            for j in range(m):
                i = start + j
                signed = prefix + bodies[40 * j:40 * j + 40]
                key = signed + base62_6(zlib.crc32(signed))
                digest = hashlib.sha256(key).hexdigest().encode()
                kid = str(uuid.UUID(int=(now << 80) | i)).encode()
                created = str(now + i).encode()
                kl.append(key)
                rl.append(resp(b"HSET", ns + b":k:" + digest,
                               b"id", kid, b"tenant", b"default",
                               b"name", b"loadbench-gen-%d" % i, b"type", b"secret",
                               b"env", b"live", b"prefix", signed[:12],
                               b"last_four", key[-4:], b"scopes", scopes,
                               b"created_at", created, b"digest", digest))
                rl.append(resp(b"SET", ns + b":id:" + kid, digest))
                rl.append(resp(b"ZADD", tenant_key, b"0",
                               b"%016x:%s" % (now + i, kid)))
            kf.write(b"\n".join(kl) + b"\n")
            rf.write(b"".join(rl))


# --------------------------------------------------------------------------- report


def fmt_int(x):
    return f"{x:,.0f}"


def median(xs):
    return statistics.median(xs) if xs else float("nan")


def machine_notes():
    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = Path("/proc/meminfo").read_text().splitlines()[0].split()[1]
    def ver(argv, pat=None):
        try:
            r = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            out = (r.stdout + r.stderr).strip().splitlines()
            return out[0] if out else "?"
        except (OSError, subprocess.TimeoutExpired):
            return "not installed"
    try:
        commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "src"],
                               capture_output=True, text=True).stdout.strip()
        commit += " (src/ has uncommitted changes)" if dirty else ""
    except OSError:
        commit = "?"
    return {
        "cpus": os.cpu_count(),
        "affinity": len(os.sched_getaffinity(0)),
        "cpu": cpu,
        "mem_gib": int(mem) / 1024 / 1024,
        "kernel": platform.release(),
        "rustc": ver(["rustc", "--version"]),
        "nginx": ver(["nginx", "-v"]),
        "haproxy": ver(["haproxy", "-v"]),
        "wrk": ver(["wrk", "-v"]).split(" Copyright")[0],
        "redis": ver(["redis-server", "--version"]),
        "commit": commit,
    }


def binary_note(binary):
    t = datetime.datetime.fromtimestamp(Path(binary).stat().st_mtime)
    return f"binary built {t:%Y-%m-%d %H:%M}"


# --------------------------------------------------------------------------- phases


def hot_phase(a, procs, workdir, binary, report):
    up_port = free_port()
    upstream = start_nginx(procs, workdir, "upstream", "nginx-upstream.conf.in",
                           WORKERS=a.upstream_workers, PORT=up_port)
    up_pids = lambda: [upstream.pid] + children(upstream.pid)
    targets = []

    targets.append(Target("upstream-direct", up_port, lambda: [],
                          "wrk straight at the upstream: the ceiling"))

    bh_port = free_port()
    bh = start_passthrough(procs, "bare-hyper", a.passthrough, bh_port, up_port)
    targets.append(Target("bare-hyper", bh_port, lambda: [bh.pid],
                          "bare hyper 1.x pass-through, keygate's architecture (thread per "
                          "CPU, per-connection upstream): the physical limit of our stack"))
    bp_port = free_port()
    bp = start_passthrough(procs, "bare-hyper-pooled", a.passthrough, bp_port, up_port,
                           pooled=True)
    targets.append(Target("bare-hyper-pooled", bp_port, lambda: [bp.pid],
                          "textbook hyper proxy: multi-thread runtime, hyper-util pooled "
                          "client"))

    kn_port, kn_admin = free_port(), free_port()
    kn = start_keygate(procs, workdir, "keygate-noauth", binary,
                       keygate_config(kn_port, kn_admin, up_port), kn_admin)
    targets.append(Target("keygate-noauth", kn_port, lambda: [kn.pid],
                          "one `/**` route, `auth: none`: keygate's forwarding path without "
                          "key verification and scope check"))

    redis = Redis(procs, workdir, "redis-hot")
    ka_port, ka_admin = free_port(), free_port()
    ka = start_keygate(procs, workdir, "keygate-auth", binary,
                       keygate_config(ka_port, ka_admin, up_port, redis.port), ka_admin)
    targets.append(Target("keygate-auth", ka_port, lambda: [ka.pid],
                          f"Redis store, 50 routes, {a.keys:,} keys, random key per request; "
                          "access log on (the default), stderr to a file"))
    kq_port, kq_admin = free_port(), free_port()
    kq = start_keygate(procs, workdir, "keygate-auth-nolog", binary,
                       keygate_config(kq_port, kq_admin, up_port, redis.port,
                                      access_log=False), kq_admin)
    targets.append(Target("keygate-auth-nolog", kq_port, lambda: [kq.pid],
                          "keygate-auth with `proxy.access_log: false`"))
    kl_port, kl_admin = free_port(), free_port()
    kl = start_keygate(procs, workdir, "keygate-auth-limited", binary,
                       keygate_config(kl_port, kl_admin, up_port, redis.port,
                                      limits="local"), kl_admin)
    targets.append(Target("keygate-auth-limited", kl_port, lambda: [kl.pid],
                          "keygate-auth with a per-key rate limit on every route, never "
                          "reached (`local` mode)"))
    ke_port, ke_admin = free_port(), free_port()
    ke = start_keygate(procs, workdir, "keygate-auth-exact", binary,
                       keygate_config(ke_port, ke_admin, up_port, redis.port,
                                      limits="exact"), ke_admin)
    targets.append(Target("keygate-auth-exact", ke_port, lambda: [ke.pid],
                          "the same limit in `exact` mode: one Redis script per request"))
    redis_admins = [ka_admin, kq_admin, kl_admin, ke_admin]
    if a.one_worker:
        k1_port, k1_admin = free_port(), free_port()
        k1 = start_keygate(procs, workdir, "keygate-auth-1w", binary,
                           keygate_config(k1_port, k1_admin, up_port, redis.port,
                                          workers=1), k1_admin)
        targets.append(Target("keygate-auth-1w", k1_port, lambda: [k1.pid],
                              "keygate-auth with `proxy.workers: 1` (one proxy thread)"))
        redis_admins.append(k1_admin)

    if shutil.which("nginx"):
        ng_port = free_port()
        ng = start_nginx(procs, workdir, "nginx", "nginx-proxy.conf.in",
                         WORKERS="auto", PORT=ng_port, UPSTREAM=up_port)
        targets.append(Target("nginx", ng_port, lambda: [ng.pid] + children(ng.pid),
                              "plain reverse proxy, upstream keepalive, access_log off"))
    if shutil.which("haproxy") and not a.no_haproxy:
        hp_port = free_port()
        cfg = workdir / "haproxy.cfg"
        cfg.write_text(render("haproxy.cfg.in", PORT=hp_port, UPSTREAM=up_port))
        hp = procs.start("haproxy", ["haproxy", "-f", str(cfg), "-db"])
        wait_for(lambda: socket.create_connection(("127.0.0.1", hp_port), 1).close() or True,
                 "haproxy", proc=hp)
        targets.append(Target("haproxy", hp_port, lambda: [hp.pid] + children(hp.pid),
                              "plain reverse proxy, http-reuse always, no log"))
    else:
        report["skipped"].append("haproxy (not installed)" if not a.no_haproxy
                                 else "haproxy (--no-haproxy)")

    if a.only:
        names = set(a.only.split(","))
        unknown = names - {t.name for t in targets}
        if unknown:
            raise RuntimeError(f"--only: no target named {', '.join(sorted(unknown))}")
        targets = [t for t in targets if t.name in names]

    keyfile = workdir / "hot-keys.txt"
    t0 = time.time()
    keys = create_keys(ka_admin, a.keys, keyfile)
    log(f"created {len(keys):,} keys through POST /v1/keys in {time.time() - t0:.1f}s")

    # Every target answers 200 with a key; keygate-auth refuses a request without one.
    for t in targets:
        try:
            st, body = http_get(t.port, BENCH_PATH, {"Authorization": f"Bearer {keys[0]}"})
        except (OSError, http.client.HTTPException) as e:
            raise RuntimeError(f"{t.name}: GET {BENCH_PATH} on :{t.port} failed: {e!r} "
                               f"(see {workdir}/{t.name}.log)") from e
        if st != 200:
            raise RuntimeError(f"{t.name}: GET {BENCH_PATH} answered {st} {body[:200]!r}")
    st, _ = http_get(ka_port, BENCH_PATH)
    if st != 401:
        raise RuntimeError(f"keygate-auth without a key answered {st}, expected 401")
    log("smoke: every target answered 200; keygate-auth answers 401 without a key")

    # Warm-up (not recorded): fills keygate's cache with all keys (>> 10 requests per key)
    # and the proxies' upstream connection pools.
    for t in targets:
        # Every key once (walk, then GET /healthz once the keys run out), then random keys.
        for script, args in (("walk_keys.lua", [keyfile, 0, a.threads, BENCH_PATH]),
                             ("random_key.lua", [keyfile, BENCH_PATH])):
            r = measure(t, up_pids, script, args, a.threads, a.conns, a.warmup)
            if r["errors"]:
                raise RuntimeError(f"{t.name}: errors during warm-up:\n{r['raw']}")
            if script == "walk_keys.lua" and r["exhausted_threads"] < a.threads:
                raise RuntimeError(f"{t.name}: warm-up did not reach every key in "
                                   f"{a.warmup}s: raise --warmup")
    log("warm-up done")
    hget0 = redis.commandstats().get("hgetall", 0)
    misses0 = cache_misses(redis_admins)

    results = {t.name: [] for t in targets}
    for rnd in range(a.rounds):
        k = rnd % len(targets)
        order = targets[k:] + targets[:k]  # rotate: no target always runs first or last
        for t in order:
            if a.quiet_wait:
                wait_quiet(a.quiet_wait)
            r = measure(t, up_pids, "random_key.lua", [keyfile, BENCH_PATH],
                        a.threads, a.conns, a.duration)
            if r["errors"]:
                raise RuntimeError(f"{t.name}: non-200 or socket errors:\n{r['raw']}")
            results[t.name].append(r)
            log(f"round {rnd + 1}/{a.rounds} {t.name:16} {r['rps']:>9,.0f} req/s  "
                f"p50 {r['p50_us']:>5} µs  p99 {r['p99_us']:>6} µs  "
                f"cpu {r['cpu_us']:5.1f} µs/req (kernel {r['sys_us']:4.1f})  "
                f"tcp connects {r['connects']}  other load {r['other_load']:.0%}")

    report["pairs"] = limit_pairs(a, targets, up_pids, keyfile)

    if a.perf and shutil.which("perf"):
        report["perfstat"] = {}
        for t in targets:
            if t.name != "upstream-direct":
                report["perfstat"][t.name] = perf_stat(a, t, keyfile)
        report["perf"] = profile(a, next(t for t in targets if t.name == a.perf_target),
                                 keyfile, workdir)

    # Misses during the measured runs, as the keygates count them: 0 means every measured
    # request was a cache hit. Redis' HGETALL count is shown beside it: it also holds the
    # dormant-key passes (`store.dormant_interval`, 5 min by default: each keygate on
    # this Redis reads every record), which are no cache misses.
    report["hot_misses"] = cache_misses(redis_admins) - misses0
    report["hot_hgetall"] = redis.commandstats().get("hgetall", 0) - hget0
    report["targets"] = [(t.name, t.note) for t in targets]
    report["hot"] = results
    return upstream, up_port, up_pids


def limit_pairs(a, targets, up_pids, keyfile):
    """keygate-auth-limited / keygate-auth req/s in back-to-back pairs (order alternating).
    The target is a ratio of two figures a few percent apart, and this shared VM's speed
    drifts by more than that within a minute: a pair run seconds apart sees the same
    machine, which the rounds above (every target between two runs) do not."""
    by_name = {t.name: t for t in targets}
    if not a.pair_rounds or not {"keygate-auth", "keygate-auth-limited"} <= by_name.keys():
        return []
    pair = [by_name["keygate-auth"], by_name["keygate-auth-limited"]]
    ratios = []
    for i in range(a.pair_rounds):
        got = {}
        for t in pair if i % 2 == 0 else pair[::-1]:
            r = measure(t, up_pids, "random_key.lua", [keyfile, BENCH_PATH],
                        a.threads, a.conns, a.pair_duration)
            if r["errors"]:
                raise RuntimeError(f"{t.name}: non-200 or socket errors:\n{r['raw']}")
            got[t.name] = r["rps"]
        ratios.append(got["keygate-auth-limited"] / got["keygate-auth"])
        log(f"pair {i + 1}/{a.pair_rounds} keygate-auth-limited / keygate-auth "
            f"{ratios[-1]:.3f}")
    return ratios


def perf_stat(a, target, keyfile):
    """Syscalls and context switches per request of a target's processes (one extra run)."""
    pids = ",".join(str(p) for p in target.pids())
    st = subprocess.Popen(["perf", "stat", "-x,", "-e",
                           "raw_syscalls:sys_enter,context-switches,page-faults", "-p", pids,
                           "--", "sleep", str(a.duration + 0.2)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    time.sleep(0.1)
    r = run_wrk(target.port, "random_key.lua", [keyfile, BENCH_PATH], a.threads, a.conns,
                a.duration)
    _, err = st.communicate()
    out = {}
    for line in err.splitlines():
        f = line.split(",")
        if len(f) > 2:
            try:
                out[f[2]] = float(f[0]) / max(r["requests"], 1)
            except ValueError:
                pass
    log(f"perf stat {target.name}: {out}")
    return out


def profile(a, target, keyfile, workdir):
    """perf record (no call graphs: the release build has no frame pointers) of keygate
    during one extra run of `--perf-target`; the top symbols."""
    data = workdir / "perf.data"
    rec = subprocess.Popen(["perf", "record", "-F", "1999", "-p", ",".join(map(str, target.pids())),
                            "-o", str(data),
                            "--", "sleep", str(a.duration)],
                           stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(0.3)
    run_wrk(target.port, "random_key.lua", [keyfile, BENCH_PATH], a.threads, a.conns,
            a.duration)
    _, err = rec.communicate()
    if rec.returncode != 0 or not data.exists():
        return f"perf record failed: {err.decode()[-500:]}"
    def report(sort, limit):
        rep = subprocess.run(["perf", "report", "-i", str(data), "--stdio", "--no-children",
                              "--sort", sort, "--percent-limit", limit],
                             capture_output=True, text=True)
        out = []
        for l in rep.stdout.splitlines():
            if l.strip() and not l.startswith("#"):
                out.append(re.sub(r"[\s-]+$", "", l.rstrip()))
        return out
    by_dso = report("dso", "1")
    by_sym = report("dso,symbol", "0.6")[:40]
    text = "by binary:\n" + "\n".join(by_dso) + "\n\ntop symbols:\n" + "\n".join(by_sym)
    (workdir / "perf-top.txt").write_text(text)
    log(f"perf profile of {target.name}:\n" + text)
    return text


def cold_phase(a, procs, workdir, binary, up_port, report):
    # The memory keygate gets --mem-keys keys beyond those the write-behind-off variant
    # uses up first.
    n = a.mem_keys + (a.cold_reserve if a.writebehind_off_variant and not a.last_used_interval
                      else 0)
    keyfile, respfile = workdir / "cold-keys.txt", workdir / "cold-keys.resp"
    t0 = time.time()
    generate_keys(n, keyfile, respfile)
    report["cold_keys"] = n
    log(f"generated {n:,} keys and records in {time.time() - t0:.1f}s")
    redis = Redis(procs, workdir, "redis-cold")
    t0 = time.time()
    with open(respfile, "rb") as f:
        out = redis.cli("--pipe", stdin=f)
    dbsize = int(redis.cli("DBSIZE").strip())
    log(f"loaded into Redis in {time.time() - t0:.1f}s: {out.strip().splitlines()[-1]}; "
        f"DBSIZE {dbsize:,}")
    if dbsize < 2 * n:
        raise RuntimeError(f"expected {2 * n + 1} Redis keys, found {dbsize}")
    respfile.unlink()

    no_up = lambda: []
    offset = 0
    cold = {}

    def cold_run(label, target, threads, conns, duration, delay_ms=0, at=None):
        """`at`: walk the keys from there again (keys an earlier run cached) and leave
        the offset where it is: the same load, all cache hits."""
        nonlocal offset
        if a.quiet_wait:
            wait_quiet(a.quiet_wait)
        s0 = redis.commandstats()
        start = offset if at is None else at
        r = measure(target, no_up, "walk_keys.lua",
                    [keyfile, start, threads, BENCH_PATH, delay_ms],
                    threads, conns, duration)
        s1 = redis.commandstats()
        if r["errors"]:
            log(f"cold {label}: {r['status_errors']} non-2xx answers, "
                f"{r['errors'] - r['status_errors']} socket errors/timeouts (see "
                f"{workdir}/{target.name}.log)")
        if r["exhausted_threads"]:
            raise RuntimeError(f"cold {label}: ran out of keys; use more --mem-keys")
        d = stats_delta(s0, s1)
        r["hgetall_per_req"] = d.get("hgetall", 0) / max(r["requests"], 1)
        # wrk counts completed requests; keys sent also counts the <= conns requests in
        # flight when wrk stopped (keygate read those from Redis too) and the one request
        # wrk's startup check draws without sending.
        r["hgetall_per_key"] = d.get("hgetall", 0) / max(r["keys_sent"] - 1, 1)
        r["redis_cmds"] = d
        r["threads"], r["conns"], r["delay_ms"] = threads, conns, delay_ms
        r["duration"] = duration
        # Each thread took every `threads`-th key: skip past the furthest one used (+1 for
        # the request wrk's startup check draws from thread 0 without sending).
        if at is None:
            offset += threads * (r["max_thread_sent"] + 2)
        cold[label] = r
        log(f"cold {label:10} {r['rps']:>9,.0f} req/s  p50 {r['p50_us']} µs  "
            f"p99 {r['p99_us']} µs  max {r['max_us']} µs  non-2xx {r['status_errors']}  "
            f"cpu {r['cpu_us']:.1f} µs/req  HGETALL per request {r['hgetall_per_req']:.4f}, "
            f"per key sent {r['hgetall_per_key']:.4f}  other load {r['other_load']:.0%}  "
            f"redis: {d}")

    def runs(suffix, target):
        cold_run("saturated" + suffix, target, a.threads, a.conns, a.cold_duration)
        moderate_at = offset
        cold_run("moderate" + suffix, target, 1, a.cold_moderate_conns, a.cold_duration,
                 a.cold_moderate_delay)
        # The same pace over the keys that run just cached (half as long, so the walk
        # cannot run past them): what the rig itself costs at this load (wake-ups of
        # idle CPUs, wrk, upstream), so that the difference is the miss.
        cold_run("moderate, cached keys" + suffix, target, 1, a.cold_moderate_conns,
                 max(1, a.cold_duration // 2), a.cold_moderate_delay, at=moderate_at)

    # First, for comparison, a keygate whose last_used_at write-behind does not run
    # during the bench (store.last_used_interval: 1h): the read path alone.
    if a.writebehind_off_variant and not a.last_used_interval:
        port, admin = free_port(), free_port()
        kb = start_keygate(procs, workdir, "keygate-cold-nowb", binary,
                           keygate_config(port, admin, up_port, redis.port, "1h"), admin)
        runs(" (write-behind off)", Target("keygate-cold-nowb", port, lambda: [kb.pid]))
        procs.stop(kb)

    # Then the keygate as configured by default, which also gets the memory fill.
    port, admin = free_port(), free_port()
    kg = start_keygate(procs, workdir, "keygate-cold", binary,
                       keygate_config(port, admin, up_port, redis.port,
                                      a.last_used_interval), admin)
    target = Target("keygate-cold", port, lambda: [kg.pid])
    stats0 = redis.commandstats()
    rss_fresh = rss_kib(kg.pid)

    # A short hot run on one unused key alone: connection buffers, runtime and allocator
    # warm, one cached entry. "RSS before" is taken after it.
    one = workdir / "one-key.txt"
    with keyfile.open() as f:
        for _ in range(offset + 1):
            line = f.readline()
    one.write_text(line)
    offset += 1
    r = measure(target, no_up, "random_key.lua", [one, BENCH_PATH], a.threads, a.conns,
                min(a.warmup, 2))
    if r["errors"]:
        raise RuntimeError(f"keygate-cold warm-up errors:\n{r['raw']}")
    time.sleep(1)
    rss_before = rss_kib(kg.pid)
    nowb = dict(cold)
    cold.clear()
    runs("", target)
    cold.update(nowb)  # the default configuration's rows first in the table
    report["cold"] = cold

    # Memory: every remaining key once, then RSS.
    if not a.no_memory:
        expected = n - offset
        s0 = redis.commandstats().get("hgetall", 0)
        argv = ["wrk", f"-t{a.threads}", f"-c{a.conns}", "-d900s", "--timeout=5s",
                "-s", str(HERE / "walk_keys.lua"), f"http://127.0.0.1:{port}", "--",
                str(keyfile), str(offset), str(a.threads), BENCH_PATH]
        t0 = time.time()
        w = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        last, last_change = 0, time.time()
        while True:
            time.sleep(0.5)
            done = redis.commandstats().get("hgetall", 0) - s0
            if done != last:
                last, last_change = done, time.time()
            if done >= expected - a.threads - 2 or time.time() - last_change > 5:
                break
            if time.time() - t0 > a.mem_timeout:
                log("memory fill: time limit reached, measuring what is cached")
                break
        w.send_signal(signal.SIGINT)
        out, err = w.communicate(timeout=30)
        fill_s = time.time() - t0
        time.sleep(2)
        stats1 = redis.commandstats()
        reads = stats1.get("hgetall", 0) - stats0.get("hgetall", 0)  # distinct keys read
        rss_after = rss_kib(kg.pid)
        try:
            _, metrics = http_get(admin, "/metrics")
            m = re.search(rb"^keygate_cache_entries (\S+)", metrics, re.M)
            entries_metric = float(m.group(1)) if m else None
        except OSError:
            entries_metric = None
        # A read that timed out (503) leaves no entry: trust the cache's own count when
        # there is one.
        cached = int(entries_metric) if entries_metric else reads
        res = parse_result(out) if "RESULT" in out else {}
        report["memory"] = {
            "generated": n, "cached": cached, "entries_metric": entries_metric,
            "reads": reads,
            "rss_fresh_kib": rss_fresh, "rss_before_kib": rss_before,
            "rss_after_kib": rss_after, "fill_s": fill_s,
            "fill_rps": last / fill_s if fill_s else 0,
            "bytes_per_entry": (rss_after - rss_before) * 1024 / max(cached - 1, 1),
            "status_errors": res.get("status_errors"),
            "redis_used_memory": redis.cli("INFO", "memory").split("used_memory_human:")[1]
                                 .split()[0],
        }
        mm = report["memory"]
        log(f"memory: {cached:,} keys cached ({reads:,} HGETALL), RSS "
            f"{rss_before / 1024:.1f} -> {rss_after / 1024:.1f} MiB, "
            f"{mm['bytes_per_entry']:.0f} bytes/entry; fill {fill_s:.0f}s")
    procs.stop(kg)
    procs.stop(redis.proc)


def pairs_text(pairs, seconds):
    """The back-to-back pairs' ratio (`limit_pairs`): median and quartiles."""
    if not pairs:
        return ""
    q = statistics.quantiles(pairs, n=4) if len(pairs) > 1 else [pairs[0]] * 3
    return (f"; in {len(pairs)} back-to-back pairs of {seconds} s runs: median "
            f"**{median(pairs):.2f}x** (quartiles {q[0]:.2f}x-{q[2]:.2f}x)")


def write_report(a, report, machine, started):
    hot = report.get("hot", {})
    med = {}
    for name, runs in hot.items():
        med[name] = {k: median([r[k] for r in runs])
                     for k in ("rps", "p50_us", "p99_us", "cpu_us", "sys_us", "up_cpu_us",
                          "wrk_cpu_us", "connects", "other_load")}
    lines = []
    mode = "smoke" if a.smoke else ("quick" if a.quick else "full")
    lines.append(f"## Load bench (`scripts/loadbench{' --quick' if a.quick else ''}`), "
                 f"{started:%Y-%m-%d %H:%M} ({mode})")
    lines.append("")
    lines.append(
        f"Machine: {machine['cpus']} CPUs ({machine['affinity']} usable) {machine['cpu']}, "
        f"{machine['mem_gib']:.0f} GiB, Linux {machine['kernel']}; {machine['rustc']}; "
        f"{machine['nginx'].replace('nginx version: ', '')}; "
        f"{machine['haproxy'].split(' - ')[0]}; {machine['wrk']}; "
        f"{machine['redis'].split(' sha=')[0]}; keygate {machine['commit']}, "
        f"{binary_note(a.binary)}.")
    lines.append(
        f"**wrk, the proxy under test and the upstream all share these "
        f"{machine['affinity']} cores** (and Redis for keygate-auth), so req/s is a "
        f"measure of the whole box; the proxy's own CPU µs per request "
        f"(`/proc/PID/stat` utime+stime, summed over nginx's master and workers) is the "
        f"steadier figure.")
    lines.append("")
    if hot:
        lines.append(
            f"wrk `-t{a.threads} -c{a.conns} -d{a.duration}s --latency` over loopback, "
            f"`GET {BENCH_PATH}`; every request, to every target, carries "
            f"`Authorization: Bearer <random one of {a.keys:,} keys>` (same wrk Lua script "
            f"everywhere). Upstream: nginx `return 200 \"ok\\n\"` "
            f"(worker_processes {a.upstream_workers}). {a.rounds} rounds, targets interleaved "
            f"(order rotated each round), medians shown. keygate logs as shipped (access log "
            f"on, level info, stderr to a file) except `keygate-auth-nolog` "
            f"(`proxy.access_log: false`); nginx `access_log off`, HAProxy no log.")
        lines.append("")
        lines.append("| target | req/s | p50 | p99 | proxy CPU µs/req | of which kernel "
                     "| upstream CPU µs/req | wrk CPU µs/req | TCP connects per run "
                     "| other load | req/s per round |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
        for name, _ in report.get("targets", []):
            m = med[name]
            per = ", ".join(fmt_int(r["rps"]) for r in hot[name])
            direct = name == "upstream-direct"
            cpu = "—" if direct else f"**{m['cpu_us']:.1f}**"
            ker = "—" if direct else f"{m['sys_us']:.1f}"
            lines.append(f"| {name} | **{fmt_int(m['rps'])}** | {m['p50_us'] / 1000:.2f} ms "
                         f"| {m['p99_us'] / 1000:.2f} ms | {cpu} | {ker} | {m['up_cpu_us']:.1f} "
                         f"| {m['wrk_cpu_us']:.1f} | {m['connects']:.0f} "
                         f"| {m['other_load']:.0%} | {per} |")
        lines.append("")
        lines.append("Targets:")
        for name, note in report.get("targets", []):
            lines.append(f"- `{name}`: {note}")
        lines.append("")
        if "hot_misses" in report:
            lines.append(f"Cache: {report['hot_misses']} cache misses "
                         f"(`keygate_cache_misses_total`, summed over the Redis-backed keygates) "
                         f"during all measured runs (0 = every measured request was a cache "
                         f"hit; the warm-up requested every key once, then random keys for "
                         f"{a.warmup} s). Redis counted {report['hot_hgetall']} `HGETALL` "
                         f"meanwhile: the misses' reads plus the dormant-key passes "
                         f"(`store.dormant_interval`, 5 min by default, each keygate reading "
                         f"every record once), which serve no request.")
            lines.append("")
        lines.append("Other load: CPU used during the run by processes outside the bench "
                     "(e.g. a compile in another session), as a share of all cores; before each "
                     f"measured run the bench waits up to {a.quiet_wait} s for the machine to be "
                     "idle. Rounds with other load read low on req/s; CPU µs/req is hardly "
                     "affected.")
        lines.append("")
        lines.append(f"TCP connects per run: system-wide connects during a run ({a.conns} are "
                     f"wrk's); about {a.conns} means the proxy reused its upstream connections.")
        lines.append("")
        lines.append("`bare-hyper` is the issue's bare hyper pass-through, built in the bench "
                     "(`benches/passthrough.rs`): hyper 1.x forwarding with keygate's "
                     "architecture (a thread per CPU with its own runtime, connections handed "
                     "to the least busy one; one upstream connection per client connection) and nothing "
                     "else, so keygate-auth / bare-hyper is the cost of everything keygate "
                     "adds. `keygate-noauth` is keygate's own forwarding path with the auth "
                     "decision skipped (it still normalises the path, matches the route, "
                     "strips/sets headers and records metrics), so keygate-auth / "
                     "keygate-noauth isolates the cost of key verification and the scope "
                     "check within keygate.")
        lines.append("")

        def per_round(num, den, key):
            """Median over rounds of num/den within the same round (adjacent runs)."""
            if num not in hot or den not in hot:
                return float("nan")
            return median([x[key] / y[key] for x, y in zip(hot[num], hot[den])])

        ka, ng, kn = med.get("keygate-auth"), med.get("nginx"), med.get("keygate-noauth")
        hp, bh, bp = med.get("haproxy"), med.get("bare-hyper"), med.get("bare-hyper-pooled")
        ratios = []
        kl, ke = med.get("keygate-auth-limited"), med.get("keygate-auth-exact")
        if ka and kl:
            ratios.append(f"keygate-auth-limited / keygate-auth: req/s "
                          f"**{kl['rps'] / ka['rps']:.2f}x** (target >= 0.95), p99 "
                          f"{kl['p99_us'] / ka['p99_us']:.2f}x; per-round median: req/s "
                          f"{per_round('keygate-auth-limited', 'keygate-auth', 'rps'):.2f}x"
                          + pairs_text(report.get("pairs"), a.pair_duration))
        if ka and ke:
            ratios.append(f"keygate-auth-exact / keygate-auth: req/s "
                          f"{ke['rps'] / ka['rps']:.2f}x, p99 {ke['p99_us']:.0f} us vs "
                          f"{ka['p99_us']:.0f} us (+{ke['p99_us'] - ka['p99_us']:.0f} us)")
        if ka and bh:
            ratios.append(f"keygate-auth / bare-hyper: req/s **{ka['rps'] / bh['rps']:.2f}x** "
                          f"(target >= 0.9), p99 **{ka['p99_us'] / bh['p99_us']:.2f}x** "
                          f"(target <= 1.2), CPU/req {ka['cpu_us'] / bh['cpu_us']:.2f}x; "
                          f"per-round median: req/s "
                          f"{per_round('keygate-auth', 'bare-hyper', 'rps'):.2f}x, "
                          f"p99 {per_round('keygate-auth', 'bare-hyper', 'p99_us'):.2f}x, "
                          f"CPU/req {per_round('keygate-auth', 'bare-hyper', 'cpu_us'):.2f}x")
        if ka and bp:
            ratios.append(f"keygate-auth / bare-hyper-pooled: req/s "
                          f"{ka['rps'] / bp['rps']:.2f}x, "
                          f"CPU/req {ka['cpu_us'] / bp['cpu_us']:.2f}x")
        if ka and ng:
            ratios.append(f"keygate-auth / nginx: req/s **{ka['rps'] / ng['rps']:.2f}x** "
                          f"(target >= 1.0), CPU/req **{ka['cpu_us'] / ng['cpu_us']:.2f}x** "
                          f"(target <= 1.0), p99 {ka['p99_us'] / ng['p99_us']:.2f}x; "
                          f"per-round median: req/s "
                          f"{per_round('keygate-auth', 'nginx', 'rps'):.2f}x, CPU/req "
                          f"{per_round('keygate-auth', 'nginx', 'cpu_us'):.2f}x")
        if ka and kn:
            ratios.append(f"keygate-auth / keygate-noauth: req/s "
                          f"{ka['rps'] / kn['rps']:.2f}x, p99 "
                          f"{ka['p99_us'] / kn['p99_us']:.2f}x, "
                          f"CPU/req {ka['cpu_us'] / kn['cpu_us']:.2f}x; "
                          f"per-round median: req/s "
                          f"{per_round('keygate-auth', 'keygate-noauth', 'rps'):.2f}x, "
                          f"p99 {per_round('keygate-auth', 'keygate-noauth', 'p99_us'):.2f}x, "
                          f"CPU/req "
                          f"{per_round('keygate-auth', 'keygate-noauth', 'cpu_us'):.2f}x")
        if ka and hp:
            ratios.append(f"keygate-auth / haproxy: req/s {ka['rps'] / hp['rps']:.2f}x, "
                          f"CPU/req {ka['cpu_us'] / hp['cpu_us']:.2f}x")
        kq = med.get("keygate-auth-nolog")
        if ka and kq:
            ratios.append(f"keygate-auth (access log on) / keygate-auth-nolog: req/s "
                          f"**{ka['rps'] / kq['rps']:.2f}x** (target >= 0.95), "
                          f"CPU/req {ka['cpu_us'] / kq['cpu_us']:.2f}x; per-round median: "
                          f"req/s {per_round('keygate-auth', 'keygate-auth-nolog', 'rps'):.2f}x, "
                          f"CPU/req "
                          f"{per_round('keygate-auth', 'keygate-auth-nolog', 'cpu_us'):.2f}x")
        k1 = med.get("keygate-auth-1w")
        if k1 and ng:
            ratios.append(f"keygate-auth-1w / nginx: req/s {k1['rps'] / ng['rps']:.2f}x, "
                          f"CPU/req {k1['cpu_us'] / ng['cpu_us']:.2f}x; per-round median: "
                          f"req/s {per_round('keygate-auth-1w', 'nginx', 'rps'):.2f}x, "
                          f"CPU/req {per_round('keygate-auth-1w', 'nginx', 'cpu_us'):.2f}x")
        lines.append("Ratios of the medians above, and the median over rounds of the ratio "
                     "within each round (runs minutes apart on a shared VM drift together, "
                     "so the per-round figure is the steadier one):")
        lines += [f"- {r}" for r in ratios]
        lines.append("")

    cold = report.get("cold")
    if cold:
        lines.append(f"### Cold path (every request a key this keygate has never seen)")
        lines.append("")
        lines.append(
            f"A fresh keygate on its own Redis holding {report['cold_keys']:,} generated "
            f"keys "
            f"(written straight into Redis in keygate's layout). wrk walks the key file "
            f"without repeats (walk_keys.lua), so each request is a cache miss: one "
            f"`HGETALL` from Redis, then the cache fill. Redis commands from `INFO "
            f"commandstats` over each run. Rows marked *write-behind off* ran on a "
            f"separate fresh keygate with `store.last_used_interval: 1h`, so that no "
            f"`last_used_at` batch was written during the run; the others use keygate's "
            f"default (10 s)."
            + (f" Here `store.last_used_interval` was {a.last_used_interval}."
               if a.last_used_interval else ""))
        lines.append("")
        lines.append("| load | req/s | p50 | p99 | max | non-2xx | keygate CPU µs/req "
                     "| HGETALL per request | HGETALL per key sent "
                     "| other Redis commands in the run |")
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for label, r in cold.items():
            other = {k: v for k, v in r["redis_cmds"].items() if k not in ("hgetall", "info")}
            other_s = ", ".join(f"{k} {v}" for k, v in sorted(other.items())) or "none"
            pace = (f", {r['delay_ms']} ms pause after each response" if r["delay_ms"]
                    else "")
            lines.append(f"| {label}: wrk -t{r['threads']} -c{r['conns']} -d{r['duration']}s"
                         f"{pace} "
                         f"| {fmt_int(r['rps'])} | {r['p50_us'] / 1000:.2f} ms "
                         f"| {r['p99_us'] / 1000:.2f} ms | {r['max_us'] / 1000:.1f} ms "
                         f"| {r['status_errors']} | {r['cpu_us']:.1f} "
                         f"| {r['hgetall_per_req']:.4f} | {r['hgetall_per_key']:.4f} "
                         f"| {other_s} |")
        lines.append("")
        lines.append("HGETALL per request = HGETALL calls / requests wrk completed; it "
                     "exceeds 1 by the requests still in flight when wrk stopped (<= the "
                     "connection count), which keygate had already read from Redis. HGETALL "
                     "per key sent counts those too: 1.0000 means exactly one Redis round "
                     "trip per uncached key. Other commands: `get` is the change feed's "
                     "once-a-second counter check; `eval` is the `last_used_at` write-behind "
                     "(one Lua script per 32 keys used since the last flush, each doing "
                     "`exists`, `hget`, `hset` per key, one round trip at a time on a "
                     "connection of their own, so each stalls Redis only briefly). The "
                     "*cached keys* rows walk the keys of the moderate run before them "
                     "again at the same pace: every request a cache hit, so the difference "
                     "between the two rows is what a miss adds at that load.")
        lines.append("")
    mem = report.get("memory")
    if mem:
        lines.append("### Memory per cached key")
        lines.append("")
        extrap = "" if mem["cached"] >= 1_000_000 else (
            f" Measured with {mem['cached']:,} keys (not 1,000,000: `--mem-keys` / "
            f"--quick); the 1M figure below is extrapolated linearly.")
        lines.append(
            f"The same keygate, after the cold runs, fed every remaining key once "
            f"(wrk walk, {mem['fill_s']:.0f} s, ~{fmt_int(mem['fill_rps'])} req/s). "
            f"VmRSS after a 2 s hot run on one key (before) and after the fill; entries = "
            f"`keygate_cache_entries` after the fill ({mem['reads']:,} keys were read from "
            f"Redis; {mem['status_errors']} fill requests were not answered 200); "
            f"`cache.max_entries` 4M and `ttl` 1h, so none was evicted or expired." + extrap)
        lines.append("")
        lines.append("| cached keys | RSS before | RSS after | bytes per cached key | "
                     "RSS at 1M keys | Redis HGETALL |")
        lines.append("|---|---|---|---|---|---|")
        at1m = mem["rss_before_kib"] / 1024 + mem["bytes_per_entry"] * 1e6 / 2**20
        lines.append(f"| {mem['cached']:,} | {mem['rss_before_kib'] / 1024:.1f} MiB "
                     f"| {mem['rss_after_kib'] / 1024:.1f} MiB "
                     f"| **{mem['bytes_per_entry']:.0f}** (target <= 300) "
                     f"| {at1m:.0f} MiB | {mem['reads']:,} |")
        lines.append("")
        lines.append(f"(Redis itself held the {report['cold_keys']:,} records in "
                     f"{mem['redis_used_memory']}.)")
        lines.append("")
    if report.get("skipped"):
        lines.append("Skipped: " + "; ".join(report["skipped"]) + ".")
        lines.append("")
    if report.get("perfstat"):
        lines.append("### perf stat: syscalls and context switches per request")
        lines.append("")
        lines.append("| target | syscalls/req | context switches/req | page faults/req |")
        lines.append("|---|---|---|---|")
        for name, st in report["perfstat"].items():
            f = lambda v: "?" if v is None else f"{v:.3f}"
            lines.append(f"| {name} | {f(st.get('raw_syscalls:sys_enter'))} "
                         f"| {f(st.get('context-switches'))} | {f(st.get('page-faults'))} |")
        lines.append("")
    if report.get("perf"):
        lines.append("### perf: where keygate-auth spends its CPU (flat, top symbols)")
        lines.append("")
        lines.append("```")
        lines.append(report["perf"])
        lines.append("```")
        lines.append("")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="~4 min: 3 s runs, 200,000 keys for cold path + memory")
    ap.add_argument("--smoke", action="store_true",
                    help="well under a minute: 1 round of 1 s, 1,000 keys, no waiting for an "
                         "idle machine; checks every target answers 200; writes nothing")
    ap.add_argument("--rounds", type=int)
    ap.add_argument("--duration", type=int, help="seconds per measured run (default 10)")
    ap.add_argument("--warmup", type=int, help="seconds of unrecorded warm-up per target")
    ap.add_argument("--threads", type=int, default=2, help="wrk threads (default 2)")
    ap.add_argument("--conns", type=int, default=64, help="wrk connections (default 64)")
    ap.add_argument("--keys", type=int, help="keys created through the admin API (10,000)")
    ap.add_argument("--mem-keys", type=int,
                    help="generated keys for cold path + memory (default 1,000,000)")
    ap.add_argument("--cold-reserve", type=int,
                    help="extra generated keys for the write-behind-off cold runs "
                         "(default 320,000)")
    ap.add_argument("--mem-timeout", type=int, default=480,
                    help="seconds allowed for the memory fill (default 480)")
    ap.add_argument("--cold-duration", type=int, help="seconds per cold run (default 10)")
    ap.add_argument("--cold-moderate-conns", type=int, default=8,
                    help="connections of the moderate-load cold run (default 8)")
    ap.add_argument("--cold-moderate-delay", type=int, default=4,
                    help="ms each connection pauses after a response in the moderate-load "
                         "cold run (default 4: at most ~2,000 req/s with 8 connections)")
    ap.add_argument("--upstream-workers", default="1",
                    help="nginx worker_processes of the upstream (default 1)")
    ap.add_argument("--one-worker", action="store_true",
                    help="also bench keygate-auth-1w: keygate-auth with `proxy.workers: 1` "
                         "(off by default)")
    ap.add_argument("--no-haproxy", action="store_true")
    ap.add_argument("--quiet-wait", type=int,
                    help="before each measured run wait up to this many seconds for the "
                         "machine to be idle (default 30, --smoke 0; 0: do not wait)")
    ap.add_argument("--quiet-budget", type=int, default=240,
                    help="total seconds the bench may spend waiting for idle (default 240)")
    ap.add_argument("--no-cold", action="store_true", help="skip cold path and memory")
    ap.add_argument("--no-memory", action="store_true", help="skip the memory fill")
    ap.add_argument("--no-hot", action="store_true",
                    help="skip the side-by-side runs (cold path and memory only)")
    ap.add_argument("--no-writebehind-variant", dest="writebehind_off_variant",
                    action="store_false",
                    help="skip the cold runs on a keygate with last_used_interval 1h")
    ap.add_argument("--last-used-interval",
                    help="store.last_used_interval of the cold/memory keygate (default: "
                         "keygate's own, 10s), e.g. 1h to keep the write-behind out of it")
    ap.add_argument("--perf", action="store_true",
                    help="perf-record keygate-auth during one extra run, print top symbols")
    ap.add_argument("--perf-target", default="keygate-auth",
                    help="the target --perf records (default keygate-auth)")
    ap.add_argument("--only", metavar="NAMES",
                    help="measure only these targets (comma-separated names), e.g. "
                         "keygate-auth,keygate-auth-limited for a ratio in more rounds")
    ap.add_argument("--no-write", action="store_true", help="do not append to RESULTS.md")
    ap.add_argument("--results", default=str(ROOT / "benches" / "RESULTS.md"))
    ap.add_argument("--binary", default=str(ROOT / "target" / "dist" / "keygate"))
    ap.add_argument("--passthrough", metavar="PATH",
                    help="executable of benches/passthrough.rs (bare-hyper targets); "
                         "scripts/loadbench builds it and passes it")
    ap.add_argument("--pair-rounds", type=int,
                    help="back-to-back keygate-auth / keygate-auth-limited pairs after the "
                         "rounds, for a steadier ratio (default 40; 20 with --quick; 0 to skip)")
    ap.add_argument("--pair-duration", type=int,
                    help="seconds per run in those pairs (default 3; 1 with --smoke)")
    ap.add_argument("--keep", action="store_true", help="keep the temporary directory")
    a = ap.parse_args()

    if a.smoke:
        # The figures mean nothing here (debug builds, 1 s runs): no waiting for idle.
        defaults = dict(rounds=1, duration=1, warmup=3, keys=1000, mem_keys=30000,
                        cold_duration=1, cold_reserve=20000, quiet_wait=0, pair_rounds=2,
                        pair_duration=1)
        a.no_write = True
        a.no_memory = True
    elif a.quick:
        defaults = dict(rounds=3, duration=3, warmup=2, keys=10000, mem_keys=200000,
                        cold_duration=3, cold_reserve=120000, quiet_wait=30, pair_rounds=20,
                        pair_duration=3)
    else:
        defaults = dict(rounds=3, duration=10, warmup=3, keys=10000, mem_keys=1000000,
                        cold_duration=10, cold_reserve=320000, quiet_wait=30, pair_rounds=40,
                        pair_duration=3)
    for k, v in defaults.items():
        if getattr(a, k) is None:
            setattr(a, k, v)

    binary = Path(a.binary)
    if not binary.exists():
        sys.exit(f"loadbench: {binary} not found: run cargo build --profile dist")
    if not a.no_hot and (not a.passthrough or not Path(a.passthrough).exists()):
        sys.exit(f"loadbench: --passthrough {a.passthrough or 'PATH'} not found: run it through "
                 f"scripts/loadbench (cargo bench --bench passthrough --no-run builds it)")
    for tool in ("wrk", "redis-server", "redis-cli", "nginx"):
        if not shutil.which(tool):
            sys.exit(f"loadbench: {tool} is required (scripts/loadbench installs it)")

    QUIET_BUDGET[0] = a.quiet_budget
    started = datetime.datetime.now()
    workdir = Path(tempfile.mkdtemp(prefix="keygate-loadbench-"))
    os.chmod(workdir, 0o755)  # nginx workers (user nobody) traverse it
    procs = Procs(workdir)
    report = {"skipped": []}
    def on_term(*_):
        raise KeyboardInterrupt()
    signal.signal(signal.SIGTERM, on_term)
    ok = False
    try:
        if a.no_hot:
            up_port = free_port()
            start_nginx(procs, workdir, "upstream", "nginx-upstream.conf.in",
                        WORKERS=a.upstream_workers, PORT=up_port)
        else:
            _, up_port, _ = hot_phase(a, procs, workdir, binary, report)
        for name, p in list(procs.items):
            if name not in ("upstream",):
                procs.stop(p)
        if not a.no_cold:
            cold_phase(a, procs, workdir, binary, up_port, report)
        ok = True
    except KeyboardInterrupt:
        log("interrupted")
    except Exception as e:  # report, clean up, exit non-zero
        log(f"FAILED: {e}")
        log(f"logs in {workdir}")
        a.keep = True
    finally:
        procs.stop_all()
    if not ok:
        sys.exit(1)

    text = write_report(a, report, machine_notes(), started)
    print()
    print(text)
    if a.smoke:
        print("loadbench smoke: OK (every target answered 200)")
    if not a.no_write:
        path = Path(a.results)
        existing = path.read_text() if path.exists() else "# Benchmark results\n"
        path.write_text(existing.rstrip("\n") + "\n\n" + text.rstrip("\n") + "\n")
        log(f"appended to {path}")
    if not a.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    else:
        log(f"kept {workdir}")


if __name__ == "__main__":
    main()
