# udpring: build, run, test, lint, probe, bench.
CARGO ?= cargo
BIND ?= 127.0.0.1:9000
ARGS ?=

.PHONY: build run test lint probe bench bench-quick bench-micro bench-quic fmt clean fuzz soak

build:
	$(CARGO) build --release --bins --examples

# Starts the echo server on a loopback address (override with BIND=... ARGS=...).
run: build
	./target/release/udpring serve --bind $(BIND) $(ARGS)

# Unit tests, loopback integration tests, examples, benches built as tests, doc tests:
# under 2 minutes, no root needed.
test:
	$(CARGO) test --all-targets
	$(CARGO) test --doc

# The tests marked #[ignore = "stress: make stress"]: long, root-only or heavy (nftables loss
# injection in network namespaces, a 10,000-peer flood, a 3,000-source spoofed flood,
# descriptor exhaustion). Release build, so the load is real. Those that need root or
# nftables skip locally with a reason and fail under CI=true.
.PHONY: stress
stress:
	$(CARGO) test --release --tests -- --ignored

# The last two keep the library free of the command line: it builds without warnings on its
# own, and none of the CLI's crates is in its dependency tree.
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --lib --no-default-features -- -D warnings
	@deps="$$($(CARGO) tree -e normal --no-default-features --prefix none)" && \
	  if echo "$$deps" | grep -E '^(clap|anyhow|prometheus|tiny_http|hdrhistogram|tracing-subscriber) '; then \
	    echo "lint: the library (--no-default-features) depends on the crates above" >&2; exit 1; \
	  fi

probe: build
	./target/release/udpring probe

fmt:
	$(CARGO) fmt

clean:
	$(CARGO) clean

# The benchmark matrix (about 10 minutes): udpring against recvfrom, recvmmsg, tokio and
# sockperf baselines, interleaved rounds, pinned with taskset. Results under target/bench/.
bench:
	$(CARGO) build --release --bins --examples
	python3 scripts/bench.py
	python3 scripts/bench_quic.py

# udpring --app quic against quinn on tokio (examples/baseline_quinn.rs), the same quinn client
# (examples/quic_load.rs) for both, pinned: CPU 0 server, CPU 1 client. Results in
# target/bench/quic.json. `make bench-quic ARGS=--quick` is a one-round smoke test.
bench-quic:
	$(CARGO) build --release --bins --examples
	python3 scripts/bench_quic.py $(ARGS)

bench-quick:
	$(CARGO) build --release --bins --examples
	python3 scripts/bench.py --quick

# criterion micro-benchmarks of the user-space hot path (user_data, buffer ring, parse, dispatch).
bench-micro:
	$(CARGO) bench --bench hot_path

# Fuzz every parser for SECONDS each (default 60); CI runs 10 s each.
SECONDS ?= 60
fuzz:
	scripts/fuzz.sh $(SECONDS)

# Soak under client churn in every session mode (bounded: SOAK_S seconds, default 600).
SOAK_S ?= 600
soak:
	$(CARGO) build --release --bins
	python3 scripts/soak.py $(SOAK_S)
