#!/usr/bin/env python3
"""Instructions per proxied request, counted by callgrind (repeatable on a shared, noisy
machine, unlike req/s): keygate with one worker in front of an nginx upstream, a memory
store, the load bench's 50 auth routes and one key. Two runs of different lengths, so
start-up and shutdown cancel out: (I_long - I_short) / (N_long - N_short).

    benches/load/callgrind.py --binary target/dist/keygate [--mode auth|noauth]

Needs valgrind and nginx. Uses only keygate config fields every version since issue 6
understands, so two binaries (before and after a change) can be compared.
"""
import argparse
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import loadbench as lb  # noqa: E402

PATH = "/api/v1/items/42"


def config(proxy, admin, upstream, mode, access_log=False, limited=False):
    routes = lb.auth_routes() if mode == "auth" else '  - { name: all, path: "/**", auth: none }'
    if limited:
        # The load bench's keygate-auth-limited: a per-key limit no run reaches (local mode).
        routes = "\n".join(
            r[:-2] + ", rate_limits: [{ name: per-key, limit: 1000000000, window: 1s }] }"
            if "auth: none" not in r else r
            for r in routes.split("\n"))
    return f"""proxy:
  listen: 127.0.0.1:{proxy}
  upstream: http://127.0.0.1:{upstream}
  access_log: {"true" if access_log else "false"}
  workers: 1
admin:
  listen: 127.0.0.1:{admin}
  root_token_env: KEYGATE_ROOT_TOKEN
store:
  memory: {{}}
cache: {{ ttl: 1h, negative_ttl: 2s }}
routes:
{routes}
unmatched: deny
"""


def create_key(admin):
    body = json.dumps({"label": "cg", "scopes": ["items:read", "api:use"]}).encode()
    s = socket.create_connection(("127.0.0.1", admin))
    s.sendall(b"POST /v1/keys HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
              b"Authorization: Bearer " + lb.ROOT_TOKEN.encode() +
              b"\r\nContent-Type: application/json\r\nContent-Length: " +
              str(len(body)).encode() + b"\r\n\r\n" + body)
    out = b""
    while True:
        d = s.recv(65536)
        if not d:
            break
        out += d
    return json.loads(out.split(b"\r\n\r\n", 1)[1])["key"]


def read_response(s, buf):
    while b"\r\n\r\n" not in buf:
        d = s.recv(65536)
        if not d:
            raise RuntimeError("closed mid-head")
        buf += d
    head, rest = buf.split(b"\r\n\r\n", 1)
    m = re.search(rb"(?i)content-length: *(\d+)", head)
    n = int(m.group(1)) if m else 0
    while len(rest) < n:
        rest += s.recv(65536)
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(head.decode(errors="replace"))
    return rest[n:]


def drive(port, key, n, conns=4):
    socks = [socket.create_connection(("127.0.0.1", port)) for _ in range(conns)]
    req = (f"GET {PATH} HTTP/1.1\r\nHost: kg\r\n" +
           (f"Authorization: Bearer {key}\r\n" if key else "") + "\r\n").encode()
    bufs = [b""] * conns
    for i in range(n):
        j = i % conns
        socks[j].sendall(req)
        bufs[j] = read_response(socks[j], bufs[j])
    for s in socks:
        s.close()


def one_run(a, workdir, up_port, n, tag):
    proxy, admin = lb.free_port(), lb.free_port()
    cfg = workdir / f"kg-{tag}.yaml"
    cfg.write_text(config(proxy, admin, up_port, a.mode, a.access_log, a.limited))
    out = workdir / f"callgrind-{tag}.out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("KEYGATE_")}
    # With --access-log, logging as shipped (level info); else errors only.
    env.update(KEYGATE_ROOT_TOKEN=lb.ROOT_TOKEN, KEYGATE_LOG="info" if a.access_log else "error")
    p = subprocess.Popen(["valgrind", "--tool=callgrind", f"--callgrind-out-file={out}",
                          a.binary, "serve", "--config", str(cfg)], env=env,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lb.wait_for(lambda: lb.http_get(admin, "/readyz", timeout=5)[0] == 200, "keygate", 120)
    key = create_key(admin) if a.mode == "auth" else None
    drive(proxy, key, 200, a.conns)  # warm-up: connections, cache, allocator
    drive(proxy, key, n, a.conns)
    p.terminate()
    p.wait(120)
    text = out.read_text(errors="replace")
    m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    return int(m.group(1))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--binary", required=True)
    ap.add_argument("--mode", choices=["auth", "noauth"], default="auth")
    ap.add_argument("--access-log", action="store_true",
                    help="access log on and KEYGATE_LOG=info (as shipped); stderr to /dev/null")
    ap.add_argument("--limited", action="store_true",
                    help="a per-key rate limit on every keyed route (local mode, never reached)")
    ap.add_argument("--short", type=int, default=1000)
    ap.add_argument("--long", type=int, default=4000)
    ap.add_argument("--conns", type=int, default=4,
                    help="keep-alive connections, used one request at a time (default 4)")
    ap.add_argument("--keep", metavar="DIR",
                    help="copy the callgrind output files here (for callgrind_annotate)")
    a = ap.parse_args()
    procs = None
    with tempfile.TemporaryDirectory() as d:
        workdir = Path(d)
        procs = lb.Procs(workdir)
        try:
            up = lb.free_port()
            lb.start_nginx(procs, workdir, "upstream", "nginx-upstream.conf.in", PORT=up,
                           WORKERS=1)
            short = one_run(a, workdir, up, a.short, "short")
            long = one_run(a, workdir, up, a.long, "long")
            if a.keep:
                Path(a.keep).mkdir(parents=True, exist_ok=True)
                for tag in ("short", "long"):
                    shutil.copy(workdir / f"callgrind-{tag}.out",
                                Path(a.keep) / f"callgrind-{a.mode}-{tag}.out")
        finally:
            procs.stop_all()
    per = (long - short) / (a.long - a.short)
    print(f"{a.mode}{' limited' if a.limited else ''}: {per:,.0f} instructions per request "
          f"({a.binary}; {short:,} for {a.short}, {long:,} for {a.long})")


if __name__ == "__main__":
    main()
