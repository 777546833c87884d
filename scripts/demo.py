#!/usr/bin/env python3
"""subguard quickstart demo, and a smoke test of the whole chain.

Starts subguard with examples/quickstart/config.yaml, an echo application, a stand-in for tenant
initech's HTTP user directory, and a real Envoy configured from envoy/subguard-sidecar-tcp.yaml
(ports and log path rewritten for the demo). Then it mints tokens with PyJWT from the demo keys,
sends a handful of requests through Envoy and prints, for each, the HTTP status, the
`x-subguard-reason` header and Envoy's access-log line. Last it stops initech's directory and shows
what an outage looks like: a user never seen is `directory_unavailable` (503), never
`user_not_found`, and a user seen a moment ago keeps working from subguard's cache.

Exits 0 when every request got the expected answer, 1 otherwise, 2 when the setup failed. Every
process it starts is stopped before it exits. Needs Python 3.11, PyJWT and cryptography (`make venv`).

    .venv/bin/python scripts/demo.py [--subguard target/debug/subguard] [--envoy .venv/bin/envoy] [--hold]
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import http.server
import json
import pathlib
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import jwt  # PyJWT

ROOT = pathlib.Path(__file__).resolve().parent.parent
QUICKSTART = ROOT / "examples" / "quickstart"
KEYS = QUICKSTART / "keys"
ENVOY_TEMPLATE = ROOT / "envoy" / "subguard-sidecar-tcp.yaml"
WORK = ROOT / ".demo"

# subguard's addresses come from examples/quickstart/config.yaml; the rest are the demo's own.
SUBGUARD_GRPC_PORT = 9191
SUBGUARD_ADMIN_PORT = 9192
ENVOY_PORT = 10000
APP_PORT = 10001
ENVOY_ADMIN_PORT = 10002
DIRECTORY_PORT = 10003  # initech's user directory, as examples/quickstart/config.yaml names it

ISSUERS = {
    "acme": ("https://idp.acme.test/", "acme-demo-1"),
    "globex": ("https://idp.globex.test/", "globex-demo-1"),
    "initech": ("https://idp.initech.test/", "initech-demo-1"),
}
# initech's users, as its directory service answers `GET /tenants/initech/users/{sub}`.
INITECH_USERS = {"peter": {"id": "i-1001", "roles": ["staff"]}}
# 2026-05-01T00:00:00Z: before dave's tokens_valid_after (2026-06-01) in users.yaml.
BEFORE_DAVES_LOGOUT = 1777593600


class SetupError(Exception):
    """The demo could not start its processes; not a wrong answer from subguard."""


# --------------------------------------------------------------------------------------------------
# The application behind Envoy: answers every request with the headers it received, as JSON.


class EchoHandler(http.server.BaseHTTPRequestHandler):
    def _echo(self) -> None:
        body = json.dumps({k.lower(): v for k, v in self.headers.items()}).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_HEAD = _echo

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass  # Envoy's access log is the one the demo shows.


class DirectoryHandler(http.server.BaseHTTPRequestHandler):
    """initech's user directory (docs/directories.md): 200 with the user's JSON, or 404."""

    def do_GET(self) -> None:  # noqa: N802 - stdlib name
        prefix = "/tenants/initech/users/"
        user = INITECH_USERS.get(self.path[len(prefix):]) if self.path.startswith(prefix) else None
        body = json.dumps(user).encode() if user is not None else b""
        self.send_response(200 if user is not None else 404)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002 - stdlib signature
        pass


# --------------------------------------------------------------------------------------------------
# Processes


class Processes:
    """Starts processes with their output in .demo/<name>.log and stops all of them on close()."""

    def __init__(self) -> None:
        self.started: list[tuple[str, subprocess.Popen, pathlib.Path]] = []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log_path = WORK / f"{name}.log"
        log = open(log_path, "wb")
        try:
            proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=ROOT)
        finally:
            log.close()
        self.started.append((name, proc, log_path))
        return proc

    def output(self, proc: subprocess.Popen, last_lines: int = 40) -> str:
        for _, p, log_path in self.started:
            if p is proc:
                lines = log_path.read_text(errors="replace").splitlines()
                return "\n".join(lines[-last_lines:])
        return ""

    def close(self) -> None:
        for _, proc, _ in reversed(self.started):
            if proc.poll() is None:
                proc.terminate()
        for name, proc, _ in reversed(self.started):
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                print(f"{name} did not stop after SIGTERM; killing it", file=sys.stderr)
                proc.kill()
                proc.wait()


def ensure_port_free(port: int, what: str) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError as e:
            raise SetupError(f"port {port} ({what}) is already in use: {e}") from None


def http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=1) as resp:
            return resp.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


def wait_ready(procs: Processes, proc: subprocess.Popen, name: str, url: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SetupError(f"{name} exited with status {proc.returncode} before it was ready:\n{procs.output(proc)}")
        last = http_status(url)
        if last == 200:
            return
        time.sleep(0.1)
    raise SetupError(f"{name} not ready after {timeout:.0f}s ({url} answered {last}); its output:\n{procs.output(proc)}")


def envoy_config() -> str:
    """The repository's TCP sidecar config with the demo's ports and access-log path."""
    text = ENVOY_TEMPLATE.read_text()
    # Whole YAML lines only: the file's header comment names the same strings.
    replacements = {
        r"^(\s+)port_value: 8080$": rf"\g<1>port_value: {ENVOY_PORT}",
        r"^(\s+)port_value: 8000$": rf"\g<1>port_value: {APP_PORT}",
        r"^(\s+)port_value: 9191$": rf"\g<1>port_value: {SUBGUARD_GRPC_PORT}",
        r"^(\s+)port_value: 9901$": rf"\g<1>port_value: {ENVOY_ADMIN_PORT}",
        r"^(\s+)path: /dev/stdout$": rf"\g<1>path: {WORK / 'access.log'}",
    }
    for pattern, replacement in replacements.items():
        text, n = re.subn(pattern, replacement, text, flags=re.MULTILINE)
        if n != 1:
            raise SetupError(f"{ENVOY_TEMPLATE}: expected `{pattern}` once, found it {n} times")
    return text


# --------------------------------------------------------------------------------------------------
# Tokens


def mint(tenant: str, sub: str | None, *, iat: int | None = None, ttl: int = 300,
         signing_tenant: str | None = None, **extra: object) -> str:
    """A token from `tenant`'s demo issuer. `signing_tenant` signs it with another tenant's key."""
    issuer, kid = ISSUERS[tenant]
    now = int(time.time())
    iat = now if iat is None else iat
    claims = {"iss": issuer, "aud": "orders", "iat": iat, "exp": now + ttl, **extra}
    if sub is not None:
        claims["sub"] = sub
    key = (KEYS / f"{signing_tenant or tenant}.DEMO-ONLY.private.pem").read_bytes()
    return jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


# --------------------------------------------------------------------------------------------------
# Requests


@dataclasses.dataclass
class Case:
    description: str
    host: str
    token: str | None
    status: int
    reason: str  # "ok" for an allowed request
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    path: str = "/orders"
    # Headers the application must (value) or must not (None) receive on an allowed request.
    upstream: dict[str, str | None] = dataclasses.field(default_factory=dict)
    # Printed above the case: what changed before it was sent.
    heading: str | None = None


@dataclasses.dataclass
class Outcome:
    case: Case
    request_id: str
    status: int
    reason_header: str | None
    retry_after: str | None
    body: bytes
    access_log: str | None = None
    problems: list[str] = dataclasses.field(default_factory=list)


def cases() -> list[Case]:
    now = int(time.time())
    acme = "acme.api.example.com"
    return [
        Case("alice, spoofing x-user-id: root", acme, mint("acme", "alice"), 200, "ok",
             headers={"x-user-id": "root"},
             upstream={"x-tenant-id": "acme", "x-user-id": "u-1001", "x-user-roles": "admin,billing"}),
        Case("bob (no roles), spoofing x-user-roles", acme, mint("acme", "bob"), 200, "ok",
             headers={"x-user-roles": "admin"},
             upstream={"x-tenant-id": "acme", "x-user-id": "bob", "x-user-roles": None}),
        Case("globex u-77 via x-tenant-id header", "localhost", mint("globex", "u-77"), 200, "ok",
             headers={"x-tenant-id": "globex"},
             upstream={"x-tenant-id": "globex", "x-user-id": "u-77"}),
        Case("/healthz bypasses ext_authz", acme, None, 200, "-", path="/healthz"),
        Case("no token", acme, None, 401, "missing_token"),
        Case("mallory: not in the directory", acme, mint("acme", "mallory"), 403, "user_not_found"),
        Case("carol: disabled", acme, mint("acme", "carol"), 403, "user_disabled"),
        Case("dave: token from before his logout", acme, mint("acme", "dave", iat=BEFORE_DAVES_LOGOUT),
             401, "token_revoked"),
        Case("alice: expired 10 min ago", acme, mint("acme", "alice", iat=now - 900, ttl=-600),
             401, "token_expired"),
        Case("globex's token sent to acme", acme, mint("globex", "u-77"), 401, "untrusted_issuer"),
        Case("acme claims signed with globex's key", acme, mint("acme", "alice", signing_tenant="globex"),
             401, "invalid_signature"),
        Case("host acme, x-tenant-id globex", acme, mint("acme", "alice"), 403, "tenant_mismatch",
             headers={"x-tenant-id": "globex"}),
        Case("unknown tenant nope", "nope.api.example.com", mint("acme", "alice"), 404, "unknown_tenant"),
        Case("initech peter, from its HTTP directory", "initech.api.example.com", mint("initech", "peter"),
             200, "ok", upstream={"x-tenant-id": "initech", "x-user-id": "i-1001", "x-user-roles": "staff"}),
        Case("initech milton: directory says 404", "initech.api.example.com", mint("initech", "milton"),
             403, "user_not_found"),
    ]


def outage_cases() -> list[Case]:
    """Sent after initech's directory has stopped: refused connections, as in an outage."""
    initech = "initech.api.example.com"
    return [
        Case("initech samir: never seen, directory down", initech, mint("initech", "samir"),
             503, "directory_unavailable", heading="initech's user directory is stopped:"),
        Case("initech peter: seen before, from the cache", initech, mint("initech", "peter"), 200, "ok",
             upstream={"x-tenant-id": "initech", "x-user-id": "i-1001", "x-user-roles": "staff"}),
    ]


def send(case: Case, request_id: str) -> Outcome:
    headers = {"Host": case.host, "x-request-id": request_id, **case.headers}
    if case.token is not None:
        headers["Authorization"] = f"Bearer {case.token}"
    conn = http.client.HTTPConnection("127.0.0.1", ENVOY_PORT, timeout=5)
    try:
        conn.request("GET", case.path, headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        return Outcome(case, request_id, resp.status, resp.getheader("x-subguard-reason"),
                       resp.getheader("retry-after"), body)
    finally:
        conn.close()


def check(outcome: Outcome) -> None:
    """Record in outcome.problems every way the answer differs from the case's expectation."""
    case, problems = outcome.case, outcome.problems
    if outcome.status != case.status:
        # Everything else would follow from the wrong status: one line is enough.
        got = f"status {outcome.status} ({outcome.reason_header or 'no x-subguard-reason'})"
        problems.append(f"{got}, expected {case.status} ({case.reason})")
        return
    if case.status == 200:
        if outcome.reason_header is not None:
            problems.append(f"x-subguard-reason {outcome.reason_header!r} on an allowed request")
        try:
            received = json.loads(outcome.body)
        except ValueError:
            received = {}
            if case.upstream:
                problems.append(f"the application's answer is not JSON: {outcome.body[:120]!r}")
        for name, want in case.upstream.items():
            got = received.get(name)
            if got != want:
                problems.append(f"application got {name}: {got!r}, expected {want!r}")
    else:
        if outcome.reason_header != case.reason:
            problems.append(f"x-subguard-reason {outcome.reason_header!r}, expected {case.reason!r}")
        try:
            body = json.loads(outcome.body)
            if body.get("code") != case.reason:
                problems.append(f"body code {body.get('code')!r}, expected {case.reason!r}")
            if body.get("request_id") != outcome.request_id:
                problems.append(f"body request_id {body.get('request_id')!r}, expected {outcome.request_id!r}")
        except (ValueError, AttributeError):
            problems.append(f"deny body is not a JSON object: {outcome.body[:120]!r}")
        if case.status == 503 and not (outcome.retry_after or "").isdigit():
            problems.append(f"retry-after {outcome.retry_after!r} on a 503, expected seconds")
    if outcome.access_log is None:
        problems.append("no access-log line")
    elif f"reason={case.reason} " not in outcome.access_log:
        problems.append(f"access log lacks reason={case.reason}")


def attach_access_log(outcomes: list[Outcome], log_path: pathlib.Path, timeout: float = 5.0) -> None:
    """Envoy writes its access log in batches: wait until every request's line is there."""
    deadline = time.monotonic() + timeout
    while True:
        lines = log_path.read_text(errors="replace").splitlines() if log_path.exists() else []
        for outcome in outcomes:
            pattern = re.compile(rf"request_id={re.escape(outcome.request_id)}(\s|$)")
            for line in lines:
                if pattern.search(line):
                    outcome.access_log = line
        if all(o.access_log for o in outcomes) or time.monotonic() > deadline:
            return
        time.sleep(0.2)


def show(outcomes: list[Outcome]) -> None:
    width = max(len(o.case.description) for o in outcomes)
    for o in outcomes:
        if o.case.heading:
            print(f"\n{o.case.heading}")
        mark = "ok  " if not o.problems else "FAIL"
        reason = o.reason_header or "-"
        if o.retry_after is not None:
            reason += f" (retry-after: {o.retry_after})"
        print(f"{mark} {o.case.description:<{width}}  {o.status}  {reason}")
        if o.access_log:
            # The start time only makes the line wrap; everything else is as Envoy wrote it.
            line = re.sub(r"^\[[^]]*\] ", "", o.access_log)
            print(f"       {line}")
        for problem in o.problems:
            print(f"       !! {problem}")
    alice = outcomes[0]
    if alice.status == 200:
        try:
            got = json.loads(alice.body)
        except ValueError:
            got = {}
        forwarded = " ".join(f"{h}={got.get(h, '(absent)')}" for h in ("x-tenant-id", "x-user-id", "x-user-roles"))
        print(f"\nthe application received for alice: {forwarded}  (the client had sent x-user-id: root)")


# --------------------------------------------------------------------------------------------------


def run(args: argparse.Namespace) -> int:
    subguard = pathlib.Path(args.subguard)
    envoy = pathlib.Path(args.envoy)
    for path, hint in ((subguard, "run `cargo build` (or `make build`)"), (envoy, "run `make venv`")):
        if not path.exists():
            raise SetupError(f"{path} not found: {hint}")
    for port, what in ((SUBGUARD_GRPC_PORT, "subguard gRPC"), (SUBGUARD_ADMIN_PORT, "subguard admin"),
                       (ENVOY_PORT, "Envoy listener"), (APP_PORT, "echo app"), (ENVOY_ADMIN_PORT, "Envoy admin"),
                       (DIRECTORY_PORT, "initech's directory")):
        ensure_port_free(port, what)

    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    (WORK / "envoy.yaml").write_text(envoy_config())

    procs = Processes()
    app = http.server.ThreadingHTTPServer(("127.0.0.1", APP_PORT), EchoHandler)
    app_thread = threading.Thread(target=app.serve_forever, name="echo-app", daemon=True)
    app_thread.start()
    directory = http.server.ThreadingHTTPServer(("127.0.0.1", DIRECTORY_PORT), DirectoryHandler)
    directory_thread = threading.Thread(target=directory.serve_forever, name="initech-directory", daemon=True)
    directory_thread.start()
    directory_up = True
    try:
        sg = procs.start("subguard", [str(subguard), "serve", "--config", str(QUICKSTART / "config.yaml")])
        wait_ready(procs, sg, "subguard", f"http://127.0.0.1:{SUBGUARD_ADMIN_PORT}/readyz", timeout=20)
        ev = procs.start("envoy", [str(envoy), "-c", str(WORK / "envoy.yaml"), "--disable-hot-restart",
                                   "--log-level", "warn", "--file-flush-interval-msec", "100"])
        wait_ready(procs, ev, "envoy", f"http://127.0.0.1:{ENVOY_ADMIN_PORT}/ready", timeout=20)
        print(f"subguard ready on 127.0.0.1:{SUBGUARD_GRPC_PORT}; Envoy on 127.0.0.1:{ENVOY_PORT} "
              f"-> echo app on 127.0.0.1:{APP_PORT}; logs in {WORK.relative_to(ROOT)}/\n")

        outcomes = [send(case, f"demo-{i:02d}") for i, case in enumerate(cases(), start=1)]
        directory.shutdown()
        directory.server_close()
        directory_up = False
        outcomes += [send(case, f"demo-{i:02d}") for i, case in enumerate(outage_cases(), start=len(outcomes) + 1)]
        attach_access_log(outcomes, WORK / "access.log")
        for outcome in outcomes:
            check(outcome)
        show(outcomes)

        for name, proc in (("subguard", sg), ("envoy", ev)):
            if proc.poll() is not None:
                raise SetupError(f"{name} exited during the demo:\n{procs.output(proc)}")
        if args.hold:
            print(f"\n--hold: subguard, Envoy (127.0.0.1:{ENVOY_PORT}) and the echo app keep running; Ctrl-C stops them")
            try:
                while sg.poll() is None and ev.poll() is None:
                    time.sleep(0.5)
            except KeyboardInterrupt:
                print()
    finally:
        procs.close()
        app.shutdown()
        app.server_close()
        if directory_up:
            directory.shutdown()
            directory.server_close()

    failed = [o for o in outcomes if o.problems]
    # SPEC: on SIGTERM subguard finishes in-flight checks and exits 0.
    if sg.returncode != 0:
        print(f"\nsubguard exited with status {sg.returncode} after SIGTERM, expected 0:\n{procs.output(sg, 10)}")
        return 1
    if failed:
        print(f"\n{len(failed)} of {len(outcomes)} requests did not get the expected answer "
              f"(subguard's log: {WORK.relative_to(ROOT)}/subguard.log)")
        return 1
    print(f"\nall {len(outcomes)} requests got the expected answer")
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description="subguard quickstart demo and smoke test")
    parser.add_argument("--subguard", default=str(ROOT / "target" / "debug" / "subguard"),
                        help="the subguard binary (default: target/debug/subguard)")
    parser.add_argument("--envoy", default=str(ROOT / ".venv" / "bin" / "envoy"),
                        help="the Envoy binary (default: .venv/bin/envoy)")
    parser.add_argument("--hold", action="store_true",
                        help="after the requests, keep everything running until Ctrl-C, to try requests by hand")
    args = parser.parse_args()
    # SIGTERM (a CI timeout, `kill`) unwinds like Ctrl-C, so the processes started are stopped too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        return run(args)
    except SetupError as e:
        print(f"demo setup failed: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
