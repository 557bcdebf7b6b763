# numbersvc: `make run` serves on the sandbox, `make test` runs every check.
# Each target installs what it needs, so both work on a fresh clone.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# `make run LISTEN=HOST:PORT` still works; unset, the server's own setting (NUMBERSVC_LISTEN,
# default 127.0.0.1:50051) decides, so the environment is not overridden.
LISTEN ?=
PROTO_SRC := protos/numbersvc/v1/number_groups.proto
GEN_DIR := numbersvc/v1
GEN_FILES := number_groups_pb2.py number_groups_pb2.pyi number_groups_pb2_grpc.py number_groups_pb2_grpc.pyi
BUF := node_modules/.bin/buf

.PHONY: help run sandbox test pytest postgres faults soak lint ruff mypy buf-lint proto check-proto fmt readme docs clean

help:  ## List the targets.
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/'

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.dev: pyproject.toml $(VENV)/.runtime
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

node_modules/.installed: package.json package-lock.json
	npm ci --no-audit --no-fund --loglevel=error
	touch $@

run: $(VENV)/.runtime  ## Serve: on the sandbox without Plivo credentials; NUMBERSVC_* settings apply.
	$(BIN)/numbersvc serve $(if $(LISTEN),--listen $(LISTEN))

sandbox: $(VENV)/.runtime  ## Run the Plivo-compatible sandbox alone.
	$(BIN)/numbersvc sandbox

test: check-proto lint buf-breaking pytest  ## Everything CI runs: stubs, lint, buf lint, buf breaking, tests.

# Four workers on two cores: most of the suite waits on real servers, processes and sockets
# (serially 12 min of wall time for 4.5 min of CPU); pytest-xdist overlaps those waits.
PYTEST_WORKERS ?= 4
pytest: $(VENV)/.dev  ## The test suite (PYTEST_WORKERS=4 processes; 1 runs it serially).
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS)

# The PostgreSQL ledger's tests start a throwaway server (tests/pg.py) from Debian's binaries,
# /usr/lib/postgresql/<version>/bin (the newest version there), or initdb on the PATH. As root
# (CI on a fresh machine) the package is installed when missing; otherwise those tests skip,
# except under CI (CI=true or 1, as tests/ci.py reads it), where they fail.
PG_INITDB = $(firstword $(shell ls -d /usr/lib/postgresql/*/bin/initdb 2>/dev/null | sort -V -r) $(shell command -v initdb))
postgres:  ## Install Debian's postgresql package when no server binaries are found (as root).
	@if [ -n "$(PG_INITDB)" ]; then \
	  echo "PostgreSQL server: $(PG_INITDB)"; \
	elif [ "$$(id -u)" = 0 ]; then \
	  echo "installing Debian's postgresql package (server binaries for the tests)"; \
	  apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql \
	    >/dev/null && \
	  ls -d /usr/lib/postgresql/*/bin/initdb; \
	else \
	  echo "no PostgreSQL server binaries: sudo apt-get install postgresql, or its tests skip"; \
	fi

# The PostgreSQL tests need the server binaries, so `make pytest` installs them first.
pytest: postgres

faults: $(VENV)/.dev postgres  ## Print the fault matrix: every upstream and store fault x every RPC, ok/FAIL.
	$(BIN)/python -m tests.faultmatrix

soak: $(VENV)/.dev  ## Soak a server process for 60 s: streams, List/Get, errors, latency, RSS.
	$(BIN)/python -m bench.soak --seconds 60

# `bench` is also a directory: without .PHONY, make would call the target up to date.
.PHONY: bench bench-quick bench-transports
bench: $(VENV)/.dev  ## Benchmarks vs their baselines, one run, as ratios (docs/performance.md).
	$(BIN)/python -m bench.bench

bench-quick: $(VENV)/.dev  ## The benchmarks with fewer iterations (under 2 minutes).
	$(BIN)/python -m bench.bench --quick

bench-transports: $(VENV)/.dev  ## The upstream HTTP stacks as clients, side by side (about 90 s).
	$(BIN)/python -m bench.transports

lint: ruff mypy buf-lint  ## ruff, mypy and buf lint.

ruff: $(VENV)/.dev
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

mypy: $(VENV)/.dev
	$(BIN)/mypy

buf-lint: node_modules/.installed  ## buf lint (STANDARD, COMMENTS) on protos/.
	$(BUF) lint

fmt: $(VENV)/.dev  ## Format and fix what ruff can.
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Generates into OUT (default: the package). The plugins come from the venv.
OUT ?= .
proto: $(VENV)/.dev  ## Regenerate the Python stubs from protos/.
	PATH="$(CURDIR)/$(BIN):$$PATH" $(BIN)/python -m grpc_tools.protoc -I protos \
	  --python_out=$(OUT) --grpc_python_out=$(OUT) \
	  --mypy_out=quiet:$(OUT) --mypy_grpc_out=quiet:$(OUT) \
	  $(PROTO_SRC)

check-proto: $(VENV)/.dev  ## Fail when the committed stubs differ from protos/.
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(MAKE) --no-print-directory -s proto OUT=$$tmp && \
	  for f in $(GEN_FILES); do \
	    cmp -s "$$tmp/$(GEN_DIR)/$$f" "$(GEN_DIR)/$$f" || \
	      { echo "$(GEN_DIR)/$$f is stale: run 'make proto'"; exit 1; }; \
	  done && echo "stubs match protos/"

readme: $(VENV)/.dev  ## Regenerate the docs' tables: errors (docs/contract.md), settings (docs/configuration.md).
	$(BIN)/python tools/readme_tables.py

docs: readme  ## The same as `make readme`.

# Cross-language contract: buf breaking against the released image, Node stubs, and the
# polyglot tests (tests/polyglot) that run a Node.js client against a real server.
RELEASED_IMAGE := protos/released/v1.binpb
.PHONY: release-proto buf-breaking gen-node

# Refuses to overwrite the released image with a breaking change: break on purpose only in
# a new package (numbersvc.v2) with its own image.
release-proto: node_modules/.installed  ## Record protos/ as the released contract (after a release).
	@if [ -f $(RELEASED_IMAGE) ]; then $(BUF) breaking --against $(RELEASED_IMAGE); fi
	@mkdir -p $(dir $(RELEASED_IMAGE))
	$(BUF) build --exclude-source-info -o $(RELEASED_IMAGE)

buf-breaking: node_modules/.installed  ## buf breaking (FILE rules) of protos/ against the released image.
	$(BUF) breaking --against $(RELEASED_IMAGE)

gen-node: node_modules/.installed  ## Generate Node.js (protobuf-es) code into clients/node/gen/.
	$(BUF) generate

# The polyglot tests need node_modules, so `make pytest` installs it first.
pytest: node_modules/.installed

clean:  ## Remove the virtual environment and caches.
	rm -rf $(VENV) node_modules .pytest_cache .mypy_cache .ruff_cache .hypothesis

# promtool for tests/deploy/test_observability.py (alert rules, their unit tests, dashboard
# queries): the one on PATH, else the binary taken from Debian's `prometheus` package into the
# venv. Only the .deb is fetched and unpacked: installing the package would pull 11 packages of
# web assets and enable a Prometheus daemon. As root (CI), apt's lists are refreshed first.
PROMTOOL := $(or $(shell command -v promtool 2>/dev/null),$(BIN)/promtool)
.PHONY: promtool
promtool: $(PROMTOOL)  ## promtool, from Debian's prometheus package when it is missing.

$(BIN)/promtool:
	@command -v apt-get >/dev/null || { echo "no promtool and no apt-get: install Prometheus' promtool"; exit 1; }
	@tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && chmod 755 "$$tmp" && \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq; fi && \
	  (cd "$$tmp" && apt-get download -qq -o APT::Sandbox::User=root prometheus && dpkg-deb -x prometheus_*.deb root) && \
	  install -D -m 0755 "$$tmp/root/usr/bin/promtool" $@ && $@ --version | head -1

pytest: $(PROMTOOL)

# Go and Java clients (clients/go, clients/java), built from stubs generated from protos/
# (never committed) and run against a real server by tests/polyglot. Each is rebuilt only when
# its sources or the protos change, so `make test` builds them once. A missing toolchain fails
# under CI (UNDER_CI below); elsewhere it is reported and the client's tests skip.
GO_CLIENT := clients/go/build/bin/numbersvc-check
JAVA_CLIENT := clients/java/target/numbersvc-check.jar
CLIENT_PROTOS := $(wildcard protos/numbersvc/*/*.proto)
MVN ?= mvn -q -B
.PHONY: clients clients-go clients-java

clients: clients-go clients-java  ## Build the Go and Java clients from protos/ (tests/polyglot runs them).

# A shell condition, true under CI: `CI` is `true` or `1` in any case, as tests/ci.py reads it
# (tests/unit/test_ci.py holds the two equal).
UNDER_CI = case "$$(printf '%s' "$${CI-}" | tr -d '[:space:]' | tr '[:upper:]' '[:lower:]')" in true|1) ;; *) false ;; esac

# $(call build_with,TOOLS,FILE): make FILE when every tool is on PATH and FILE is stale.
build_with = @missing=; for tool in $(1); do command -v $$tool >/dev/null || missing="$$missing $$tool"; done; \
	if [ -z "$$missing" ]; then $(MAKE) --no-print-directory -q $(2) || $(MAKE) --no-print-directory $(2); \
	elif $(UNDER_CI); then echo "not on PATH:$$missing: cannot build $(2)" >&2; exit 1; \
	else echo "not on PATH:$$missing: $(2) is not built (its tests skip)"; fi

clients-go:
	$(call build_with,go,$(GO_CLIENT))

clients-java:
	$(call build_with,mvn java,$(JAVA_CLIENT))

# The recipes below are docs/clients.md's commands as written (tests/polyglot holds them equal).
# protoc-gen-go and protoc-gen-go-grpc at the versions go.mod's `tool` lines pin, driven by buf.
$(GO_CLIENT): node_modules/.installed $(CLIENT_PROTOS) clients/go/buf.gen.yaml clients/go/go.mod clients/go/go.sum $(wildcard clients/go/*.go)
	(cd clients/go && GOBIN="$$PWD/build/bin" go install tool)
	$(BUF) generate --template clients/go/buf.gen.yaml --path protos/numbersvc
	(cd clients/go && go vet ./... && go build -o build/bin/numbersvc-check .)

# protoc and protoc-gen-grpc-java come from Maven Central through the protobuf Maven plugin.
# touch: Maven leaves an unchanged jar's time alone, which make would take for stale.
$(JAVA_CLIENT): $(CLIENT_PROTOS) clients/java/pom.xml $(shell find clients/java/src -type f 2>/dev/null)
	(cd clients/java && $(MVN) package)
	touch $@

# The polyglot tests run the clients, so `make pytest` builds them first.
pytest: clients

.PHONY: clean-clients
clean-clients:  ## Remove the Go and Java clients' generated code and builds.
	rm -rf clients/go/gen clients/go/build clients/java/target
clean: clean-clients
