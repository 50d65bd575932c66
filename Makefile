# Dovecote: `make serve` and `make test` are all a fresh machine needs.
PYTHON ?= python3
VENV   ?= .venv
BIN     = $(VENV)/bin
STAMP   = $(VENV)/.installed
DEVSTAMP= $(VENV)/.installed-dev
PYTEST_ARGS ?=

.PHONY: serve test test-fast test-lowest lint install dev deploy-tools interop-node postgres browser console-screenshots bench chaos ha ha-tools clean acapy veramo interop

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e .
	touch $(STAMP)

$(DEVSTAMP): $(STAMP) pyproject.toml
	PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/pip install -q -e '.[dev,deploy,bench]'
	touch $(DEVSTAMP)

install: $(STAMP)
dev: $(DEVSTAMP)

## Start Dovecote on SQLite at 127.0.0.1:8080 (data in ./data).
serve: $(STAMP)
	$(BIN)/dovecote serve

## Tools the deploy tests need (promtool from Debian's prometheus package, nginx).
deploy-tools: .venv-tools/.installed
	bash scripts/install-promtool.sh
	bash scripts/install-nginx.sh

# kubernetes-validate's jsonschema conflicts with the interop client's pins: own venv.
.venv-tools/.installed:
	$(PYTHON) -m venv .venv-tools
	.venv-tools/bin/pip install -q 'kubernetes-validate>=1.31' 'jsonschema>=4.18'
	touch $@

## didcomm-rust (npm didcomm-node) for tests/interop, from tests/interop/node/package-lock.json.
interop-node:
	bash scripts/install-interop-node.sh

## A PostgreSQL server for the tests: the local one if it answers, else a throwaway cluster.
postgres:
	bash scripts/ensure-postgres.sh

## Debian's chromium for the console's browser tests (Playwright drives it; no download).
browser:
	bash scripts/install-chromium.sh

## Every test: unit, store (SQLite and PostgreSQL), integration, interop, chaos, deploy, console.
test: $(DEVSTAMP) deploy-tools interop-node postgres browser
	. ./.test-env 2>/dev/null; PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 $(BIN)/python -m pytest -q -rs --durations=30 -p no:cacheprovider $(PYTEST_ARGS); \
	  rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

## The in-process tier only (tests/fast: the real app, a SQLite file, no server process);
## under 60 s. `make test` runs it too.
# Without the schemathesis/hypothesis plugins (tests/fast uses neither): half the start-up.
test-fast: $(DEVSTAMP)
	$(BIN)/python -m pytest -q -p no:cacheprovider -p no:schemathesis -p no:hypothesispytest \
	  --durations=5 tests/fast $(PYTEST_ARGS); \
	  rc=$$?; if [ $$rc -eq 5 ]; then echo "no tests ran" >&2; exit 1; fi; exit $$rc

## Re-take the console screenshots in docs/console/ (shown by docs/console.md).
console-screenshots: $(DEVSTAMP) postgres browser
	. ./.test-env 2>/dev/null; PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 DOVECOTE_UPDATE_SCREENSHOTS=1 \
	  $(BIN)/python -m pytest -q -p no:cacheprovider tests/console/test_browser.py

## The unit, integration, client and interop tests on the lowest dependency versions that
## pyproject.toml allows (own venv .venv-lowest, `uv pip install --resolution lowest-direct`).
test-lowest: deploy-tools interop-node postgres
	PYTHON=$(PYTHON) bash scripts/test-lowest.sh $(PYTEST_ARGS)

lint: $(DEVSTAMP)
	$(BIN)/ruff check src tests bench examples scripts
	$(BIN)/ruff format --check src tests bench examples scripts
	$(BIN)/mypy

clean:
	rm -rf $(VENV) .venv-tools .venv-ha .venv-lowest .test-env tests/interop/node/node_modules \
	  bench/peer/veramo/node_modules

## Benchmarks into bench/results/: BENCH_PROFILE=quick (default, ~10 min) or full (soak, 1M).
bench: $(DEVSTAMP) postgres
	-sh bench/peer/install-acapy.sh  # the v1 comparison peer (own venv); a failure only skips it
	-sh bench/peer/install-veramo.sh # the v2 comparison peer (npm ci); a failure only skips it
	. ./.test-env 2>/dev/null; $(BIN)/python -m bench.run --profile $${BENCH_PROFILE:-quick}

## Chaos suite: every fault-injection scenario under load (make test runs the fast ones).
chaos: $(DEVSTAMP) deploy-tools postgres
	. ./.test-env 2>/dev/null; DOVECOTE_CHAOS=all $(BIN)/python -m pytest -q -s \
	  -p no:cacheprovider tests/chaos $(PYTEST_ARGS)

## ACA-Py 0.12 in its own venv (bench/peer/.venv-acapy): the v1 interop peer and bench peer.
acapy:
	sh bench/peer/install-acapy.sh

## Veramo 7 (npm, bench/peer/veramo/node_modules): the DIDComm v2 bench peer.
veramo:
	sh bench/peer/install-veramo.sh

## DIDComm v1 interop with ACA-Py agents (mediation, forwards, SIGKILL); CI runs it.
interop: $(DEVSTAMP) acapy postgres
	. ./.test-env 2>/dev/null; DOVECOTE_INTEROP_ACAPY=1 $(BIN)/python -m pytest -q -rs \
	  --durations=10 -p no:cacheprovider tests/interop/test_acapy_mediation.py $(PYTEST_ARGS)

## What `make ha` needs: etcd and HAProxy (Debian packages), Patroni 4 in .venv-ha.
ha-tools:
	bash scripts/install-ha.sh

## High availability: a real 3-node Patroni + etcd cluster on loopback (and one in network
## namespaces), failover scenarios under load from two instances (tests/ha, ~5 min).
ha: $(DEVSTAMP) ha-tools postgres
	DOVECOTE_HA=1 $(BIN)/python -m pytest -q -s -rs --durations=0 -p no:cacheprovider \
	  tests/ha $(PYTEST_ARGS)
