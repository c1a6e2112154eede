# outpost: demo, tests and local services.
# `make test` is what CI runs (via .ci/run); `make demo` runs the HuleEdu pipeline demo.
SHELL := /bin/bash

# Where the demo and the integration tests find their services; override
# on the command line or in the environment.
export OUTPOST_DATABASE_URL ?= postgres://postgres@127.0.0.1:5432/test
export OUTPOST_REDIS_URL ?= redis://127.0.0.1:6379
export OUTPOST_BROKERS ?= 127.0.0.1:9092

.PHONY: all demo bench test services broker-stop

all: test

## services: install (if needed) and start PostgreSQL, Redis and the tansu broker; install
## Prometheus (the tests start their own server)
services:
	bash scripts/services.sh

## demo: start the services and run the HuleEdu batch pipeline on them (instant vs baseline)
demo: services
	cargo run --release -p outpost-cli --bin outpost -- demo

## bench: the full benchmark (release build; minutes): raw limits and Outpost side by side
bench: services
	cargo run --release -p outpost-cli --bin outpost -- bench --plans

## test: formatting, clippy, the Prometheus rules and the whole test suite against live services
## (it includes `outpost bench --quick --json`, crates/outpost-cli/tests/bench.rs)
test: services
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings
	promtool check rules deploy/prometheus/alerts.yml
	promtool test rules deploy/prometheus/alerts.test.yml
	promtool check config deploy/prometheus/prometheus.yml
	OUTPOST_TANSU_BIN="$${OUTPOST_TANSU_BIN:-$$(cat .tools/tansu-bin)}" cargo test --workspace

## broker-stop: kill the tansu broker on 127.0.0.1:9092 started by `make services`
broker-stop:
	bash scripts/kafka-stop.sh 9092
