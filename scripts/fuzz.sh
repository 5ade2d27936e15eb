#!/usr/bin/env bash
# Runs every cargo-fuzz target in fuzz/ for SECONDS each (default 60) and exits non-zero if any
# of them finds a crash (the input is kept in fuzz/artifacts/<target>/).
#
#   scripts/fuzz.sh [SECONDS]        e.g. scripts/fuzz.sh 10 in CI
#
# cargo-fuzz wants nightly for -Zsanitizer=address and the sanitizer-coverage flags; the
# project builds with stable only, so RUSTC_BOOTSTRAP=1 lets stable rustc accept them. The
# corpus grows in fuzz/corpus/<target>/ (not committed) and is reused by later runs.
set -euo pipefail
cd "$(dirname "$0")/../fuzz"

seconds="${1:-60}"
if ! [[ "$seconds" =~ ^[0-9]+$ ]] || [ "$seconds" -eq 0 ]; then
  echo "usage: $0 [SECONDS>0]" >&2
  exit 2
fi

if ! cargo fuzz --version >/dev/null 2>&1; then
  echo "== installing cargo-fuzz"
  cargo install cargo-fuzz --locked
fi

export RUSTC_BOOTSTRAP=1
target_dir=()
if [ -n "${CARGO_TARGET_DIR:-}" ]; then
  # cargo-fuzz looks for the binaries where it built them; say so explicitly.
  target_dir=(--target-dir "$CARGO_TARGET_DIR/fuzz")
fi
# Debug assertions on: integer overflow in a parser is a bug worth a crash report.
build_flags=(--debug-assertions "${target_dir[@]}")

echo "== building fuzz targets"
cargo fuzz build "${build_flags[@]}"

failed=()
for target in $(cargo fuzz list); do
  echo "== $target: ${seconds}s"
  # -timeout: a single input taking over 10 s is a hang, reported like a crash.
  if ! cargo fuzz run "${build_flags[@]}" "$target" -- \
      -max_total_time="$seconds" -timeout=10 -print_final_stats=1; then
    failed+=("$target")
  fi
done

if [ "${#failed[@]}" -ne 0 ]; then
  echo "fuzz: crashes in: ${failed[*]} (inputs in fuzz/artifacts/)" >&2
  exit 1
fi
echo "fuzz: no crash in $(cargo fuzz list | wc -l) targets, ${seconds}s each"
