#!/usr/bin/env python3
"""Soak: subguard behind a real Envoy for a long time, under mixed traffic, reloads and failing
dependencies, sampled all along to show that what it holds stays bounded.

A sidecar runs for weeks in front of every pod. A leak of a few kilobytes per reload, or a
background task left behind by every reload, does not show in a benchmark of seconds; it shows as
a pod restarted by its memory limit after nine days. This harness runs one release subguard for
`--minutes` (30 by default) with everything that allocates and frees on a timeline:

    traffic     wrk through one Envoy (one worker, ext_authz as envoy/subguard-sidecar-tcp.yaml),
                paced to --rate requests/s, one 60-s segment after another, cycling through a fixed
                mix of pre-minted requests (below) far larger than the caches in front of them
    tenant acme   file directory (a generated users file), keys from a jwks_file
    tenant globex HTTP directory (a fixture in this process) behind a cache of 5 000 entries,
                keys from a jwks_uri (another fixture), re-fetched every 5 s
    revocation  a real Redis (Debian's redis-server): a token.revoked event every 100 ms (random
                jti, so the sidecar's revoked set churns; each remembered for two minutes, see
                publisher()), a user.updated every second and a user.deleted every 5 s; 1% of the
                pool's jtis revoked in Redis at the start
    reloads     every 20 s, turn about: the users file replaced (rename over it) with one user
                added or removed, or the config rewritten (globex's cache TTL toggled: its
                directory is rebuilt and takes over the old cache)
    failures    in every 5-minute cycle: the directory answers 500 for 20 s, then hangs past
                subguard's timeout for 15 s; Redis is stopped for 20 s; the JWKS endpoint answers
                503 for 30 s

The request mix (shuffled once; per cycle of the mix):

    acme        --acme-tokens valid RS256 tokens (each with a jti) for subs user-0 .. user-N, of
                which the users file lists 94%: ok, user_not_found, token_revoked
    globex      --globex-tokens tokens for g-0 .. g-M, of which the directory knows 92%
    junk        4%: no token, malformed, expired, wrong audience, bad signature, unknown kid, and
                unknown tenants under 500 different names (metric labels must not grow with them)

The token cache is set to --token-cache entries (20 000 by default), well under the pool, so it
is full and evicting for the whole run. Every 10 s the harness samples subguard's RSS, its file
descriptors and threads; every 60 s it reads subguard's /metrics and the fixtures' counters.

Verdict (exit 1 when one fails; the numbers are in the report either way):

    no check is internal_error, and every answer's reason is one this mix can produce
    RSS: the mean of the last quarter of the run is within max(8 MiB, 10%) of the second quarter's
    file descriptors and threads: the last quarter's maximum within 32 (fds) and 4 (threads) of
    the second quarter's maximum
    JWKS fetches per minute in the last quarter at most 1.5x the second quarter's, plus 2 (a
    reload that left a refresh task behind would add its fetches to every later minute)
    every reload of the run applied (none refused), and the expected number happened

Needs: Debian's `wrk` and `redis-server` (wrk installed with apt-get when missing and running as
root, as scripts/loadbench.py does; redis-server by `make redis-server`), `make venv`, cargo.
Usually `make soak`; directly:

    .venv/bin/python scripts/soak.py [--minutes 30] [--rate 1500] [--output docs/benchmarks.md]

The report goes between the markers `<!-- soak:begin -->` and `<!-- soak:end -->` of --output
(docs/benchmarks.md by default), or is the whole file when it has no markers.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import http.server
import json
import os
import pathlib
import random
import re
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.parse

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import loadbench as lb  # noqa: E402  (the harness's process, port and wrk helpers)

import jwt  # noqa: E402  PyJWT

ROOT = lb.ROOT
KEYS = lb.QUICKSTART / "keys"
WORK = ROOT / "target" / "soak"
RESULTS = ROOT / "docs" / "benchmarks.md"
BEGIN_MARK, END_MARK = "<!-- soak:begin -->", "<!-- soak:end -->"
HOST = lb.HOST
TOKEN_TTL = 8 * 3600
CYCLE = 300  # seconds: the failure schedule repeats this often
SEGMENT = 60  # seconds of one wrk run
SAMPLE = 10  # seconds between process samples

ISSUERS = {
    "acme": {"iss": "https://idp.acme.test/", "kid": "acme-demo-1", "pem": KEYS / "acme.DEMO-ONLY.private.pem"},
    "globex": {"iss": "https://idp.globex.test/", "kid": "globex-demo-1", "pem": KEYS / "globex.DEMO-ONLY.private.pem"},
}
# The reasons this mix can produce; anything else is a finding.
EXPECTED_REASONS = {"ok", "user_not_found", "token_revoked", "directory_unavailable", "missing_token",
                    "malformed_token", "token_expired", "invalid_audience", "invalid_signature", "unknown_key",
                    "unknown_tenant"}


def log(msg: str) -> None:
    print(f"[soak {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# --------------------------------------------------------------------------------------------------
# The request mix


_KEYS: dict = {}


def _load_keys() -> None:
    from cryptography.hazmat.primitives import serialization

    for tenant, i in ISSUERS.items():
        _KEYS[tenant] = serialization.load_pem_private_key(i["pem"].read_bytes(), password=None)


def _token(tenant: str, sub: str, jti: str, now: int, **over) -> str:
    i = ISSUERS[tenant]
    claims = {"iss": i["iss"], "aud": "orders", "sub": sub, "jti": jti, "iat": now - 5, "exp": now + TOKEN_TTL}
    claims.update(over.pop("claims", {}))
    return jwt.encode(claims, _KEYS[tenant], algorithm="RS256", headers={"kid": over.pop("kid", i["kid"])})


def _mint(job: tuple[str, int, int, int, int]) -> list[str]:
    tenant, first, count, subs, now = job
    prefix = "user-" if tenant == "acme" else "g-"
    return [f"{tenant}\t{_token(tenant, f'{prefix}{i % subs}', f'soak-{tenant}-{now}-{i}', now)}"
            for i in range(first, first + count)]


def junk(count: int, now: int, rng: random.Random) -> list[str]:
    """Requests that must be denied, each line `tenant<TAB>token` (an empty token: no header)."""
    _load_keys()
    kinds = [
        lambda i: ("acme", ""),
        lambda i: ("acme", "not.a.jwt"),
        lambda i: ("acme", "eyJhbGciOiJSUzI1NiJ9.e30"),
        lambda i: ("acme", _token("acme", "user-1", f"x-{i}", now, claims={"exp": now - 3600, "iat": now - 7200})),
        lambda i: ("acme", _token("acme", "user-1", f"x-{i}", now, claims={"aud": "elsewhere"})),
        lambda i: ("acme", _token("acme", "user-1", f"x-{i}", now)[:-4] + "AAAA"),
        lambda i: ("globex", _token("globex", "g-1", f"x-{i}", now, kid="rotated-away")),
        lambda i: (f"t{rng.randrange(500)}", _token("acme", "user-1", f"x-{i}", now)),
    ]
    return [f"{t}\t{tok}" for t, tok in (kinds[i % len(kinds)](i) for i in range(count))]


def request_mix(args: argparse.Namespace) -> tuple[pathlib.Path, list[str]]:
    """The shuffled mix in WORK/requests.txt (reused while its tokens stay valid long enough), and
    the jtis to revoke in Redis at the start (1% of the acme pool)."""
    path = WORK / "requests.txt"
    meta_path = WORK / "requests.json"
    keys_hash = hashlib.sha256(b"".join(i["pem"].read_bytes() for i in ISSUERS.values())).hexdigest()
    shape = [args.acme_tokens, args.acme_subs, args.globex_tokens, args.globex_subs, keys_hash]
    now = int(time.time())
    try:
        meta = json.loads(meta_path.read_text())
        if meta["shape"] == shape and meta["exp"] - now > args.minutes * 60 + 3600:
            log(f"reusing the request mix in {path.relative_to(ROOT)}")
            return path, meta["revoke"]
    except (OSError, ValueError, KeyError):
        pass
    started = time.monotonic()
    chunk = 2000
    jobs = [("acme", f, min(chunk, args.acme_tokens - f), args.acme_subs, now) for f in range(0, args.acme_tokens, chunk)]
    jobs += [("globex", f, min(chunk, args.globex_tokens - f), args.globex_subs, now)
             for f in range(0, args.globex_tokens, chunk)]
    lines: list[str] = []
    with concurrent.futures.ProcessPoolExecutor(max_workers=os.cpu_count() or 2, initializer=_load_keys) as pool:
        for minted in pool.map(_mint, jobs):
            lines += minted
    rng = random.Random(7)
    lines += junk(len(lines) // 24, now, rng)  # 4% of the mix
    rng.shuffle(lines)
    path.write_text("\n".join(lines) + "\n")
    revoke = [f"soak-acme-{now}-{i}" for i in range(0, args.acme_tokens, 100)]
    meta_path.write_text(json.dumps({"shape": shape, "exp": now + TOKEN_TTL, "revoke": revoke}))
    log(f"minted {len(lines)} requests in {time.monotonic() - started:.1f}s")
    return path, revoke


# --------------------------------------------------------------------------------------------------
# Fixtures: the user's identity provider (JWKS) and user directory, misbehaving on a schedule


class Clock:
    def __init__(self) -> None:
        self.start = time.monotonic()

    def phase(self) -> float:
        return (time.monotonic() - self.start) % CYCLE

    def elapsed(self) -> float:
        return time.monotonic() - self.start


class Counters:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.values: dict[str, int] = {}

    def add(self, key: str) -> None:
        with self.lock:
            self.values[key] = self.values.get(key, 0) + 1

    def snapshot(self) -> dict[str, int]:
        with self.lock:
            return dict(self.values)


def serve_fixture(port: int, clock: Clock, counters: Counters, globex_subs_known: int) -> http.server.ThreadingHTTPServer:
    jwks = (KEYS / "globex.jwks.json").read_bytes()
    known = re.compile(r"^/tenants/globex/users/g-(\d+)$")

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # Headers and body go out in two writes: with Nagle's algorithm on, the body would wait for
        # the client's delayed ACK (40 ms), a latency of the fixture, not of subguard.
        disable_nagle_algorithm = True

        def log_message(self, *_args) -> None:  # quiet
            pass

        def answer(self, status: int, body: bytes = b"", ctype: str = "application/json") -> None:
            self.send_response(status)
            self.send_header("content-type", ctype)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            phase = clock.phase()
            if self.path == "/jwks.json":
                if 200 <= phase < 230:
                    counters.add("jwks_503")
                    return self.answer(503, b"{}")
                counters.add("jwks_200")
                return self.answer(200, jwks)
            path = urllib.parse.unquote(self.path)
            if 60 <= phase < 80:
                counters.add("dir_500")
                return self.answer(500, b"oops")
            if 80 <= phase < 95:
                counters.add("dir_hang")
                time.sleep(1.0)  # past subguard's timeout_ms
                return self.answer(200, b'{"id":"late"}')
            m = known.match(path)
            if m and int(m.group(1)) < globex_subs_known:
                counters.add("dir_200")
                return self.answer(200, json.dumps({"id": f"G{m.group(1)}", "roles": ["reader"]}).encode())
            counters.add("dir_404")
            return self.answer(404, b"{}")

    class Server(http.server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

        def handle_error(self, request, client_address) -> None:
            if not isinstance(sys.exc_info()[1], ConnectionError):  # a hung answer's client gave up
                super().handle_error(request, client_address)

    server = Server((HOST, port), Handler)
    threading.Thread(target=server.serve_forever, name="fixture", daemon=True).start()
    return server


class Redis:
    """Debian's redis-server on a port, stopped and started on the failure schedule, and a tiny
    RESP client for what the harness publishes."""

    def __init__(self, binary: str, port: int) -> None:
        self.binary, self.port, self.proc = binary, port, None
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen([self.binary, "--port", str(self.port), "--bind", HOST, "--save", "",
                                      "--appendonly", "no", "--dir", str(WORK)],
                                     stdout=(WORK / "redis.log").open("ab"), stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((HOST, self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise lb.SetupError(f"redis-server does not listen on {self.port}")

    def stop(self) -> None:
        with self.lock:
            if self.sock:
                self.sock.close()
                self.sock = None
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=10)
        self.proc = None

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def command(self, *parts: str) -> bool:
        """Sends one command; False when Redis is down (it may be, on purpose)."""
        payload = f"*{len(parts)}\r\n".encode() + b"".join(
            f"${len(p.encode())}\r\n".encode() + p.encode() + b"\r\n" for p in parts)
        with self.lock:
            try:
                if self.sock is None:
                    self.sock = socket.create_connection((HOST, self.port), timeout=1)
                self.sock.sendall(payload)
                reply = self.sock.recv(4096)
                if not reply:
                    raise OSError("closed")
                return not reply.startswith(b"-")
            except OSError:
                if self.sock:
                    self.sock.close()
                self.sock = None
                return False


# --------------------------------------------------------------------------------------------------
# subguard's configuration and its users file


def users_doc(args: argparse.Namespace, flip: bool) -> str:
    users = [{"sub": f"user-{i}", "id": f"u-{i}", "roles": ["reader"]} for i in range(args.acme_users)]
    if flip:  # the reloader turns this user in and out, and changes one user's roles
        users.append({"sub": "flip-user"})
        users[0]["roles"] = ["reader", "writer"]
    return json.dumps({"acme": users}, separators=(",", ":"))


def config_text(args: argparse.Namespace, ports: dict, users: pathlib.Path, ttl: int) -> str:
    return f"""# generated by scripts/soak.py
listen:
  grpc: "{HOST}:{ports['grpc']}"
  admin: "{HOST}:{ports['admin']}"
tenant:
  header: x-tenant-id
token:
  cache_max_entries: {args.token_cache}
keys:
  refresh_seconds: 5
  min_refetch_seconds: 10
  fetch_timeout_ms: 1000
directory:
  kind: file
  path: "{users}"
tenants:
  acme:
    issuers:
      - issuer: "{ISSUERS['acme']['iss']}"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_file: "{KEYS / 'acme.jwks.json'}"
  globex:
    issuers:
      - issuer: "{ISSUERS['globex']['iss']}"
        audiences: ["orders"]
        algorithms: ["RS256"]
        jwks_uri: "http://{HOST}:{ports['fixture']}/jwks.json"
    directory:
      kind: http
      url: "http://{HOST}:{ports['fixture']}/tenants/{{tenant}}/users/{{sub}}"
      timeout_ms: 200
      breaker: {{failure_threshold: 5, cooldown_ms: 2000}}
      cache: {{ttl_seconds: {ttl}, negative_ttl_seconds: 5, stale_if_error_seconds: 60, max_entries: 5000}}
revocation:
  redis_url: "redis://{HOST}:{ports['redis']}"
  event_hold_seconds: 30
  jti_cache_ms: 1000
  timeout_ms: 100
"""


def replace(path: pathlib.Path, text: str) -> None:
    """Write-then-rename, as a careful deploy (or a ConfigMap's symlink swap) does."""
    tmp = path.with_name(path.name + ".new")
    tmp.write_text(text)
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------------
# Sampling


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def hist_quantile(now: dict[str, float], before: dict[str, float], q: float) -> str:
    """The upper bound of the histogram bucket holding quantile `q` of what was observed between two
    scrapes of subguard_check_duration_seconds_bucket, as milliseconds."""
    buckets = sorted(((float("inf") if lb.label(k, "le") == "+Inf" else float(lb.label(k, "le")), v - before.get(k, 0))
                      for k, v in now.items()), key=lambda b: b[0])
    total = buckets[-1][1] if buckets else 0
    for le, count in buckets:
        if total and count >= q * total:
            return "> 1000" if le == float("inf") else f"≤ {le * 1000:g}"
    return "–"


class Sampler(threading.Thread):
    def __init__(self, pid: int, envoy_pid: int) -> None:
        super().__init__(name="sampler", daemon=True)
        self.pid, self.envoy_pid = pid, envoy_pid
        self.samples: list[dict] = []
        self.stopping = threading.Event()
        self.clock = time.monotonic()

    def run(self) -> None:
        while not self.stopping.wait(0 if not self.samples else SAMPLE):
            try:
                st = lb.proc_status(self.pid)
                self.samples.append({"t": time.monotonic() - self.clock, "rss": st["VmRSS"], "hwm": st["VmHWM"],
                                     "fds": fd_count(self.pid), "threads": st["Threads"],
                                     "cpu": lb.cpu_seconds(self.pid),
                                     "envoy_rss": lb.proc_status(self.envoy_pid)["VmRSS"]})
            except (OSError, KeyError):
                return  # the process is gone: main notices


# --------------------------------------------------------------------------------------------------
# The run


# LUA_PACE's delay() paces to args[1] requests/s; its init is replaced by one that also reads the mix.
LUA = lb.LUA_REPORT + lb.LUA_PACE + r"""
local reqs = {}
local n = 0
-- args: rate (req/s), requests file, where in the mix to start
function init(args)
  interval_ms = 1000 / tonumber(args[1])
  for line in io.lines(args[2]) do
    local tenant, token = line:match("^([^\t]*)\t(.*)$")
    local headers = {["x-tenant-id"] = tenant}
    if token ~= "" then headers["Authorization"] = "Bearer " .. token end
    reqs[#reqs + 1] = wrk.format(nil, nil, headers)
  end
  n = tonumber(args[3]) % #reqs
end
function request()
  n = n + 1
  if n > #reqs then n = 1; wrapped = wrapped + 1 end
  return reqs[n]
end
"""


def envoy_config(ports: dict) -> dict:
    """One listener through ext_authz to subguard, as the harness's sg_tcp."""
    return {
        "admin": {"address": lb.tcp_address(ports["envoy_admin"])},
        "static_resources": {
            "listeners": [lb.direct_listener("soak", ports["envoy"], [lb.ext_authz_filter("subguard")])],
            "clusters": [lb.grpc_cluster("subguard", lb.tcp_address(ports["grpc"]))],
        },
    }


def chaos(clock: Clock, redis: Redis, stop: threading.Event, events: list[str]) -> None:
    """Stops Redis for 20 s of every cycle (phase 150..170)."""
    while not stop.wait(0.5):
        down = 150 <= clock.phase() < 170
        if down and redis.running():
            redis.stop()
            events.append(f"{clock.elapsed():.0f}s redis stopped")
        elif not down and not redis.running():
            redis.start()
            events.append(f"{clock.elapsed():.0f}s redis started")


def publisher(clock: Clock, redis: Redis, stop: threading.Event, counters: Counters, args: argparse.Namespace) -> None:
    rng = random.Random(11)
    tick = 0
    while not stop.wait(0.1):
        tick += 1
        now = int(time.time())
        # A revoked jti is remembered until its exp plus an hour (docs/revocation.md): with the
        # exp of a fresh token the set would grow for the first hour, by design, and hide a leak.
        # These tokens "expired" 58 minutes ago, so each is remembered for two minutes.
        events = [{"type": "token.revoked", "jti": f"churn-{tick}-{rng.randrange(1 << 30)}",
                   "exp": now - 3600 + 120}]
        if tick % 10 == 0:
            events.append({"type": "user.updated", "tenant": "globex", "sub": f"g-{rng.randrange(args.globex_subs)}"})
        if tick % 50 == 0:
            events.append({"type": "user.deleted", "tenant": "acme", "sub": f"user-{rng.randrange(args.acme_subs)}"})
        for e in events:
            ok = redis.command("PUBLISH", "subguard:events", json.dumps(e, separators=(",", ":")))
            counters.add("published" if ok else "publish_failed")


def reloader(clock: Clock, stop: threading.Event, args: argparse.Namespace, config: pathlib.Path,
             users: pathlib.Path, ports: dict, counters: Counters) -> None:
    turn = 0
    while not stop.wait(20):
        turn += 1
        if turn % 2:
            replace(users, users_doc(args, flip=turn % 4 == 1))
            counters.add("reload_users")
        else:
            replace(config, config_text(args, ports, users, ttl=20 + turn % 4 // 2))
            counters.add("reload_config")


def free_ports(count: int) -> list[int]:
    socks = []
    try:
        for _ in range(count):
            s = socket.socket()
            s.bind((HOST, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def wrk_segment(envoy_port: int, script: pathlib.Path, requests: pathlib.Path, rate: int, offset: int,
                connections: int) -> dict:
    argv = ["wrk", "-t", "1", "-c", str(connections), "-d", f"{SEGMENT}s", "--timeout", "2s", "-s", str(script),
            f"http://{HOST}:{envoy_port}/orders", "--", str(rate), str(requests), str(offset)]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=SEGMENT + 120, cwd=WORK)
    line = next((l for l in out.stdout.splitlines() if l.startswith("LOADBENCH ")), None)
    if out.returncode != 0 or line is None:
        raise lb.SetupError(f"wrk failed ({out.returncode}): {out.stdout[-2000:]}{out.stderr[-2000:]}")
    return json.loads(line.removeprefix("LOADBENCH "))


def mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else 0.0


def main_run(args: argparse.Namespace) -> int:
    envoy = pathlib.Path(args.envoy)
    if not envoy.exists():
        raise lb.SetupError(f"{envoy} not found: run `make venv`")
    redis_bin = os.environ.get("SUBGUARD_REDIS_SERVER") or shutil.which("redis-server")
    if not redis_bin:
        raise lb.SetupError("redis-server not found: run `make redis-server` (Debian's package) or set SUBGUARD_REDIS_SERVER")
    lb.ensure_wrk(not args.no_install)
    if not args.no_build:
        lb.run([args.cargo, "build", "--release"], cwd=ROOT)
    binary = ROOT / "target" / "release" / "subguard"
    if not binary.exists():
        raise lb.SetupError(f"{binary} not found (cargo build --release)")
    WORK.mkdir(parents=True, exist_ok=True)
    lb.WORK = WORK  # lb.Processes writes its logs there
    for stale in WORK.glob("*.log"):
        stale.unlink()
    requests, revoke = request_mix(args)
    names = ["grpc", "admin", "envoy", "envoy_admin", "fixture", "redis"]
    ports = dict(zip(names, free_ports(len(names))))
    users = WORK / "users.json"
    config = WORK / "subguard.yaml"
    replace(users, users_doc(args, flip=False))
    replace(config, config_text(args, ports, users, ttl=20))
    (WORK / "envoy.json").write_text(json.dumps(envoy_config(ports), indent=1))
    script = WORK / "soak.lua"
    script.write_text("-- generated by scripts/soak.py\n" + LUA)
    load_before = " ".join(f"{x:.2f}" for x in os.getloadavg())

    clock = Clock()
    counters = Counters()
    fixture = serve_fixture(ports["fixture"], clock, counters, globex_subs_known=args.globex_subs * 92 // 100)
    redis = Redis(redis_bin, ports["redis"])
    redis.start()
    for jti in revoke:  # as `subguard revoke` stores them: <key_prefix>revoked:<jti>, expiring
        redis.command("SET", f"subguard:revoked:{jti}", "1", "EX", str(TOKEN_TTL))
    procs = lb.Processes()
    stop = threading.Event()
    chaos_events: list[str] = []
    segments: list[dict] = []
    minutes: list[dict] = []
    try:
        procs.start("subguard", [str(binary), "serve", "--config", str(config)], env={"SUBGUARD_LOG": "warn"})
        ready = lb.wait_ready(procs, "subguard", ports["admin"], "/readyz")
        log(f"subguard ready in {ready * 1000:.0f} ms (pid {procs.started['subguard'].pid})")
        procs.start("envoy", [str(envoy), "-c", str(WORK / "envoy.json"), "--concurrency", "1",
                              "--log-level", "warn", "--base-id", str(ports["envoy"] % 60000)])
        lb.wait_ready(procs, "envoy", ports["envoy_admin"], "/ready")
        clock.start = time.monotonic()  # the failure schedule starts with the load
        sampler = Sampler(procs.started["subguard"].pid, procs.started["envoy"].pid)
        sampler.start()
        threads_ = [threading.Thread(target=chaos, args=(clock, redis, stop, chaos_events), daemon=True),
                    threading.Thread(target=publisher, args=(clock, redis, stop, counters, args), daemon=True),
                    threading.Thread(target=reloader, args=(clock, stop, args, config, users, ports, counters),
                                     daemon=True)]
        for t in threads_:
            t.start()
        offset = 0
        total_segments = max(1, round(args.minutes * 60 / SEGMENT))
        for seg in range(total_segments):
            if procs.started["subguard"].poll() is not None:
                raise lb.SetupError(f"subguard exited:\n{procs.tail('subguard')}")
            data = wrk_segment(ports["envoy"], script, requests, args.rate, offset, args.connections)
            offset += data["requests"]
            snap = lb.scrape_metrics(ports["admin"])
            fx = counters.snapshot()
            segments.append(data)
            minutes.append({"minute": seg + 1, "wrk": data, "metrics": snap, "fixture": fx,
                            "sample": sampler.samples[-1] if sampler.samples else {}})
            s = minutes[-1]["sample"]
            log(f"minute {seg + 1}/{total_segments}: {data['requests'] / SEGMENT:.0f} req/s, p99 "
                f"{data['latency_us']['p99'] / 1000:.1f} ms, errors {sum(data['errors'].values()) - data['errors']['status']}, "
                f"RSS {s.get('rss', 0) / 1024:.1f} MiB, fds {s.get('fds')}, threads {s.get('threads')}")
        stop.set()
        sampler.stopping.set()
        sampler.join(timeout=15)
        final_metrics = lb.scrape_metrics(ports["admin"])
        final_fixture = counters.snapshot()
        text, failures = report(args, minutes, sampler.samples, final_metrics, final_fixture, chaos_events,
                                load_before, ready)
    finally:
        stop.set()
        procs.close()
        redis.stop()
        fixture.shutdown()
    (WORK / "samples.json").write_text(json.dumps({"samples": sampler.samples, "minutes": minutes}))
    print(text)
    lb.write_report(pathlib.Path(args.output), text, (BEGIN_MARK, END_MARK))
    log(f"report written to {args.output}")
    for f in failures:
        log(f"FAILED: {f}")
    return 1 if failures else 0


def report(args: argparse.Namespace, minutes: list[dict], samples: list[dict], final: dict, fixture: dict,
           chaos_events: list[str], load_before: str, ready: float) -> tuple[str, list[str]]:
    failures: list[str] = []
    lines: list[str] = []
    w = lines.append
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "src"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    total = len(samples)
    q = max(1, total // 4)
    second, last = samples[q:2 * q], samples[-q:]
    rss2, rss4 = mean([s["rss"] for s in second]) / 1024, mean([s["rss"] for s in last]) / 1024
    fds2, fds4 = max(s["fds"] for s in second), max(s["fds"] for s in last)
    th2, th4 = max(s["threads"] for s in second), max(s["threads"] for s in last)
    low2, low4 = min(s["rss"] for s in second) / 1024, min(s["rss"] for s in last) / 1024
    high2, high4 = max(s["rss"] for s in second) / 1024, max(s["rss"] for s in last) / 1024

    checks = lb.by_label(final.get("subguard_checks", {}), "reason")
    total_checks = sum(checks.values())
    reloads = lb.by_label(final.get("subguard_config_reloads", {}), "outcome")
    expected_reloads = fixture.get("reload_users", 0) + fixture.get("reload_config", 0)

    # JWKS fetches per minute, from the fixture's counters at each minute's end.
    fetched = [m["fixture"].get("jwks_200", 0) + m["fixture"].get("jwks_503", 0) for m in minutes]
    per_minute = [b - a for a, b in zip([0] + fetched, fetched)]
    mq = max(1, len(per_minute) // 4)
    jwks2, jwks4 = mean(per_minute[mq:2 * mq]), mean(per_minute[-mq:])

    if checks.get("internal_error", 0):
        failures.append(f"{checks['internal_error']:.0f} checks were internal_error")
    unexpected = {r: v for r, v in checks.items() if r not in EXPECTED_REASONS and v}
    if unexpected:
        failures.append(f"reasons this mix cannot produce: {unexpected}")
    if rss4 - rss2 > max(8.0, rss2 * 0.10):
        failures.append(f"RSS grew from {rss2:.1f} MiB (second quarter) to {rss4:.1f} MiB (last quarter)")
    if fds4 > fds2 + 32:
        failures.append(f"file descriptors grew from {fds2} to {fds4}")
    if th4 > th2 + 4:
        failures.append(f"threads grew from {th2} to {th4}")
    if jwks4 > jwks2 * 1.5 + 2:
        failures.append(f"JWKS fetches per minute grew from {jwks2:.1f} to {jwks4:.1f}")
    if reloads.get("error", 0):
        failures.append(f"{reloads['error']:.0f} reloads refused")
    applied = reloads.get("ok", 0)
    if applied < expected_reloads * 0.9:
        failures.append(f"{applied:.0f} reloads applied of {expected_reloads} made")
    wrk_errors = sum(sum(m["wrk"]["errors"].values()) - m["wrk"]["errors"]["status"] for m in minutes)

    w("# Soak: memory and resources over time")
    w("")
    w(f"Run of `scripts/soak.py` at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {commit}"
      + (" (uncommitted changes in src/)" if dirty else "") + f"; load average before: {load_before}.")
    w(f"Command: `.venv/bin/python scripts/soak.py --minutes {args.minutes} --rate {args.rate}` "
      f"(token cache {args.token_cache} entries; {args.acme_tokens} acme and {args.globex_tokens} globex tokens "
      f"in the mix; {args.acme_users} users in the users file). subguard was ready in {ready * 1000:.0f} ms.")
    w("")
    w("**Verdict: " + ("bounded** — every check below passed." if not failures else "FAILED** — " + "; ".join(failures)))
    w("")
    w("| what | second quarter | last quarter | |")
    w("|---|---|---|---|")
    w(f"| RSS, mean | {rss2:.1f} MiB | {rss4:.1f} MiB | |")
    w(f"| RSS, lowest sample | {low2:.1f} MiB | {low4:.1f} MiB | between reloads: what stays |")
    w(f"| RSS, highest sample | {high2:.1f} MiB | {high4:.1f} MiB | during a reload, old and new users file both held |")
    w(f"| RSS, peak (VmHWM at the end) | | {samples[-1]['hwm'] / 1024:.1f} MiB | |")
    w(f"| file descriptors, max | {fds2} | {fds4} | |")
    w(f"| threads, max | {th2} | {th4} | |")
    w(f"| JWKS fetches per minute | {jwks2:.1f} | {jwks4:.1f} | refresh every 5 s, plus unknown-kid re-fetches |")
    cpu = (samples[-1]["cpu"] - samples[0]["cpu"]) / max(1, total_checks) * 1e6
    w(f"| Envoy RSS, mean | {mean([s['envoy_rss'] for s in second]) / 1024:.1f} MiB | "
      f"{mean([s['envoy_rss'] for s in last]) / 1024:.1f} MiB | |")
    w("")
    w(f"{total_checks:.0f} checks ({cpu:.0f} µs of subguard CPU each on average); wrk socket errors and timeouts: "
      f"{wrk_errors}. Reloads: {expected_reloads} made, outcomes {json.dumps({k: int(v) for k, v in reloads.items()})}. "
      f"Failures injected: {len(chaos_events)} Redis stops and starts, and the fixtures' own schedule "
      f"(directory: {fixture.get('dir_500', 0)} answers 500, {fixture.get('dir_hang', 0)} hung; JWKS: "
      f"{fixture.get('jwks_503', 0)} answers 503). Events published: {fixture.get('published', 0)} "
      f"({fixture.get('publish_failed', 0)} while Redis was down).")
    w("")
    w("| reason | checks | share |")
    w("|---|---:|---:|")
    for reason, v in sorted(checks.items(), key=lambda kv: -kv[1]):
        w(f"| {reason or '(none)'} | {v:.0f} | {v / total_checks * 100:.2f}% |")
    w("")
    w("Per minute (wrk segments of 60 s, latency through Envoy; subguard's p99 is its own decision time, the upper "
      "bound of the `subguard_check_duration_seconds` bucket that holds it; RSS, descriptors and threads sampled at "
      "the minute's end):")
    w("")
    w("| minute | req/s | p50 ms | p99 ms | subguard's p99 ms | RSS MiB | fds | threads | token cache hit % | directory lookups |")
    w("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    prev_tc: dict[str, float] = {}
    prev_dir = 0.0
    prev_hist: dict[str, float] = {}
    for m in minutes:
        hist = m["metrics"].get("subguard_check_duration_seconds_bucket", {})
        own_p99 = hist_quantile(hist, prev_hist, 0.99)
        prev_hist = hist
        tc = lb.by_label(m["metrics"].get("subguard_token_cache_lookups", {}), "outcome")
        d_tc = {k: v - prev_tc.get(k, 0) for k, v in tc.items()}
        prev_tc = tc
        hits = d_tc.get("hit", 0)
        looked = sum(d_tc.values())
        dirs = sum(m["metrics"].get("subguard_directory_lookups", {}).values())
        s = m["sample"]
        w(f"| {m['minute']} | {m['wrk']['requests'] / SEGMENT:.0f} | {m['wrk']['latency_us']['p50'] / 1000:.2f} | "
          f"{m['wrk']['latency_us']['p99'] / 1000:.2f} | {own_p99} | {s.get('rss', 0) / 1024:.1f} | {s.get('fds', '')} | "
          f"{s.get('threads', '')} | {hits / looked * 100 if looked else 0:.0f} | {dirs - prev_dir:.0f} |")
        prev_dir = dirs
    w("")
    return "\n".join(lines) + "\n", failures


def main() -> int:
    p = argparse.ArgumentParser(description="soak: subguard's memory and resources over a long mixed run (make soak)")
    p.add_argument("--minutes", type=int, default=30, help="length of the run (30)")
    p.add_argument("--rate", type=int, default=1500, help="requests/s through Envoy (1500)")
    p.add_argument("--connections", type=int, default=16, help="wrk connections (16)")
    p.add_argument("--token-cache", type=int, default=20_000, help="token.cache_max_entries (20000)")
    p.add_argument("--acme-tokens", type=int, default=48_000, help="acme tokens in the mix (48000)")
    p.add_argument("--acme-subs", type=int, default=40_000, help="distinct acme subs they name (40000)")
    p.add_argument("--acme-users", type=int, default=37_600, help="users in the users file: 94%% of the subs (37600)")
    p.add_argument("--globex-tokens", type=int, default=16_000, help="globex tokens in the mix (16000)")
    p.add_argument("--globex-subs", type=int, default=12_000, help="distinct globex subs; the directory knows 92%% (12000)")
    p.add_argument("--envoy", default=str(ROOT / ".venv" / "bin" / "envoy"))
    p.add_argument("--cargo", default=os.environ.get("CARGO", "cargo"))
    p.add_argument("--no-build", action="store_true", help="use target/release/subguard as it is")
    p.add_argument("--no-install", action="store_true", help="never apt-get install wrk")
    p.add_argument("--output", default=str(RESULTS),
                   help="markdown report: between the soak markers of this file, or the whole file (docs/benchmarks.md)")
    args = p.parse_args()
    if args.minutes < 4:
        p.error("--minutes must be at least 4 (the verdict compares quarters of the run)")
    return lb.run_main("soak", main_run, args)


if __name__ == "__main__":
    sys.exit(main())
