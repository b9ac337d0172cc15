# evgate: the commands a user and CI need.
#
#   make run     the demo on the embedded broker (etc/evgate.ini), port 8080
#   make test    everything the tests need, then the whole trial suite
#   make bench   the benchmarks of bench/ (see docs/benchmarks.md)

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
TESTS  ?= tests

.PHONY: venv run test unit system-deps services services-down check lint bench clean

venv: $(STAMP)

$(STAMP): setup.cfg setup.py
	@echo "== creating the virtualenv in $(VENV) and installing evgate with its test dependencies"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip wheel
	$(BIN)/pip install --quiet --editable '.[test,dev]' --config-settings editable_mode=compat
	@touch $@

run: venv
	$(BIN)/twistd --nodaemon --pidfile= evgate --config etc/evgate.ini

check: venv
	$(BIN)/twistd --nodaemon --pidfile= evgate --check --config etc/evgate.ini

system-deps:
	scripts/install-system-deps

services: system-deps
	scripts/dev-services up

services-down:
	scripts/dev-services down

# The whole suite, against real Kafka, Mosquitto and Redis started here.
test: venv services
	$(BIN)/python scripts/run-tests $(TESTS)

# Only the tests that need no broker.
unit: venv
	$(BIN)/python scripts/run-tests --unit

lint: venv
	$(BIN)/ruff check evgate tests twisted bench
	$(BIN)/mypy evgate

bench: venv services
	bench/run-all

clean:
	rm -rf $(VENV) _trial_temp* build *.egg-info twisted/plugins/dropin.cache
