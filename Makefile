# udpring: build, run, test, lint, probe, bench.
CARGO ?= cargo
BIND ?= 127.0.0.1:9000
ARGS ?=

.PHONY: build run test lint probe bench bench-quick bench-micro bench-quic fmt clean fuzz soak interop test-h3 bench-scale cluster bench-xdp

build:
	$(CARGO) build --release --bins --examples

# Starts the echo server on a loopback address (override with BIND=... ARGS=...).
run: build
	./target/release/udpring serve --bind $(BIND) $(ARGS)

# Unit tests, loopback integration tests (the examples that serve run there as modules),
# benches built as tests, doc tests: under 2 minutes, no root needed. The other examples
# (baselines and load generators, which have no tests) are not linked here: `make lint`
# compiles every one of them.
# `internals` only adds the hidden modules the micro-benchmark measures (the binary does not
# use them: `make lint` checks it without).
test:
	$(CARGO) test --lib --bins --tests --benches --features internals
	$(CARGO) test --doc --features internals
	$(CARGO) test --lib --no-default-features

# The tests marked #[ignore = "stress: make stress"]: long, root-only or heavy (nftables loss
# injection in network namespaces, a 10,000-peer flood, a 3,000-source spoofed flood,
# descriptor exhaustion, restarts with --takeover at 50,000 requests/s, a thousand connected
# sessions across a takeover). Release build, so the load is real. Those that need root or
# nftables skip locally with a reason and fail under CI=true.
.PHONY: stress
stress:
	$(CARGO) test --release --tests -- --ignored --skip interop:: --skip quic_flood:: --skip turn_cost

# The QUIC handler's measurements (issue 15 item 4), printed, not part of CI (timings on a
# shared machine): a driver turn with 10,000 idle connections, heap against the old scan; an
# Initial flood against an established connection's latency, caps on and off
# (QUIC_FLOOD_RATE=N, default 10,000/s). Figures in kernel-notes/quic.md.
.PHONY: measure-quic
measure-quic:
	$(CARGO) test --release --features internals --lib turn_cost -- --ignored --nocapture
	$(CARGO) test --release --features internals --test it -- quic_flood:: --ignored --nocapture

# The QUIC interop runner's cases (issue 15): interop/run_endpoint.sh with the runner's
# environment against aioquic's client (interop/client.py), every case, about 20 s; make test
# runs the quick ones. Needs aioquic (.ci/run puts it in target/aioquic); rebind-addr needs
# root for its network namespace. The case table is printed (--nocapture).
interop:
	$(CARGO) test --features internals --test it -- --ignored interop:: --nocapture

# The QUIC fleet (issue 16): three udpring hosts, an nftables load balancer routing by the
# QUIC-LB server ID in the connection ID, quinn clients rebinding, a --takeover under load and
# a host stopped, in network namespaces (scripts/cluster.sh; tests/it/fleet.rs, also part of
# `make stress`), with its report. Root, ip and nft; about 5 s. HASH_ONLY=1 drops the
# server-ID rule, to watch the rebinding clients lose their connections without it.
cluster:
	$(CARGO) test --features internals --test it fleet:: -- --ignored --nocapture

# The HTTP/3 tests against the h3 crate's client (tests/it/http3.rs: files, a service of
# one's own, a blocked open stalling nobody, 0-RTT and 425). Out of `make test` for its build
# time (the h3 crate and the futures crates); `make test` runs aioquic's HTTP/3 interop case.
test-h3:
	$(CARGO) test --features internals,bench-h3 --test it http3::

# The last two keep the library free of the command line: it builds without warnings on its
# own, and none of the CLI's crates is in its dependency tree.
lint:
	$(CARGO) fmt --check
	$(CARGO) clippy --all-targets -- -D warnings
	$(CARGO) clippy --bench hot_path --features internals -- -D warnings
	$(CARGO) clippy --lib --no-default-features -- -D warnings
	$(CARGO) clippy --examples --tests --features internals,bench-h3 -- -D warnings
	@deps="$$($(CARGO) tree -e normal --no-default-features --prefix none)" && \
	  if echo "$$deps" | grep -E '^(clap|anyhow|prometheus|hdrhistogram|tracing-subscriber) '; then \
	    echo "lint: the library (--no-default-features) depends on the crates above" >&2; exit 1; \
	  fi

probe: build
	./target/release/udpring probe

fmt:
	$(CARGO) fmt

clean:
	$(CARGO) clean

# The benchmark matrix, about 18 minutes (20 with --udpring-before; the script prints its own
# estimate): udpring against the lean recvmmsg loop (the reference for every ratio),
# recvmmsg-epoll, quinn-udp, recvfrom, tokio and sockperf server over six load shapes, plus
# udpring's session modes; server on CPU 0, generator on CPU 1, interleaved rounds (5 for
# 64x1, 64x8 and GSO trains, 3 for the others). Results and one SVG per shape under
# target/bench/, a dated section appended to kernel-notes/benchmarks.md.
# Extra options: make bench BENCH_ARGS="--udpring-before /path/to/old/udpring".
BENCH_ARGS ?=
bench:
	$(CARGO) build --release --bins --examples
	python3 scripts/bench.py $(BENCH_ARGS)
	python3 scripts/bench_quic.py
	python3 scripts/bench_xdp.py

# The AF_XDP path (issue 17 part 2): udpring --xdp against its ring path and the lean
# recvmmsg loop over a veth pair between two network namespaces, 64 x 8 and 64 x 1, server on
# CPU 0, generator on CPU 1, 3 interleaved rounds (about 2 minutes); server CPU and all CPUs'
# busy time per answer. Root. Table in target/bench/xdp.md.
BENCH_XDP_ARGS ?=
bench-xdp:
	$(CARGO) build --release --bins --examples
	python3 scripts/bench_xdp.py $(BENCH_XDP_ARGS)

# udpring --app quic against quinn on tokio (examples/baseline_quinn.rs), the same quinn client
# (examples/quic_load.rs) for both, pinned: CPU 0 server, CPU 1 client. Results in
# target/bench/quic.json. `make bench-quic BENCH_QUIC_ARGS=--quick` is a one-round smoke test.
BENCH_QUIC_ARGS ?=
bench-quic:
	$(CARGO) build --release --bins --examples --features bench-h3
	python3 scripts/bench_quic.py $(BENCH_QUIC_ARGS)

# Scaling with workers (issue 16): plain UDP and QUIC echo, 64 x 8, at 1 to 16 workers with
# and without --steer cpu, the generators on cores of their own; points that need more CPUs
# than this machine has are skipped, with a line saying so. Table in target/bench/scale.md.
bench-scale:
	$(CARGO) build --release --bins --examples
	python3 scripts/bench_scale.py $(BENCH_SCALE_ARGS)

# Smoke run, about 2 minutes: 1 round, 1 s points; writes target/bench/ but not the notes.
bench-quick:
	$(CARGO) build --release --bins --examples
	python3 scripts/bench.py --quick --no-notes $(BENCH_ARGS)

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
