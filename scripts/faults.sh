#!/usr/bin/env bash
# Fault injection: udpring serve and udpring load in two network namespaces joined by a veth
# pair, with nftables dropping LOSS% of UDP datagrams on input in each namespace (so requests
# and replies each lose LOSS%; this kernel has no netem). For every loss level and session
# mode it checks that
#   * the generator's retransmission gets every request answered (given_up == 0, outstanding
#     == 0: `load --settle` resends until each request is answered or given up),
#   * the generator's counters add up (sent == answered + given_up),
#   * no session leaks: within the idle timeout + 5 s after the load, a stats line (printed
#     every 500 ms) says sessions_open=0, and the final line after SIGTERM has closed_idle ==
#     opened and closed_shutdown == 0,
#   * every datagram is accounted for: received, dropped by the nftables rule, or dropped by
#     the kernel (the namespace's UDP InErrors, e.g. a full receive queue).
#
# Usage: sudo scripts/faults.sh [LOSS_PERCENT...]      (default: 5 20)
# Environment (defaults in brackets):
#   UDPRING      udpring binary [target/release/udpring, or $CARGO_TARGET_DIR/release/udpring]
#   MODES        session modes ["shared connected port-per-client"]
#   REQUESTS     requests per case [20000]     CLIENTS [50]    WINDOW [4]
#   TIMEOUT      first resend timeout [50ms]   MAX_TIMEOUT backoff cap [200ms]
#   RETRIES      resends before giving up [smallest that makes the expected number of
#                give-ups per case < 0.0001 (at most 16), computed below]
#   IDLE_MS      server --idle-timeout in ms [1000]
#   PORT         server port [9700]
#   GSO          1 = let the server join replies into UDP GSO trains [0: --no-gso]. A train
#                crosses the veth as one packet, so nftables drops (and counts) whole trains:
#                the loss is then per train, not per datagram, and the exact datagram
#                accounting on the reply path is skipped.
# Needs root, `ip` and `nft` (nftables is installed with apt-get when missing).
# Exit status: 0 all checks passed, 1 a check failed, 2 cannot run (missing tool, not root).
set -euo pipefail

LOSSES=("$@")
[ ${#LOSSES[@]} -gt 0 ] || LOSSES=(5 20)
here="$(cd "$(dirname "$0")/.." && pwd)"
UDPRING="${UDPRING:-${CARGO_TARGET_DIR:-$here/target}/release/udpring}"
MODES="${MODES:-shared connected port-per-client}"
REQUESTS="${REQUESTS:-20000}"
CLIENTS="${CLIENTS:-50}"
WINDOW="${WINDOW:-4}"
TIMEOUT="${TIMEOUT:-50ms}"
MAX_TIMEOUT="${MAX_TIMEOUT:-200ms}"
IDLE_MS="${IDLE_MS:-1000}"
PORT="${PORT:-9700}"
GSO="${GSO:-0}"
gso_flag=(--no-gso)
[ "$GSO" = 1 ] && gso_flag=()

die() { echo "faults.sh: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || die "needs root (network namespaces, nftables)"
command -v ip >/dev/null 2>&1 || die "needs ip (iproute2)"
if ! command -v nft >/dev/null 2>&1; then
  echo "faults.sh: nft missing, installing nftables" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nftables) >&2 \
    || die "cannot install nftables"
fi
command -v nft >/dev/null 2>&1 || die "needs nft (nftables)"
[ -x "$UDPRING" ] || die "no udpring binary at $UDPRING (cargo build --release, or set UDPRING)"
for l in "${LOSSES[@]}"; do
  [[ "$l" =~ ^[0-9]+$ ]] && [ "$l" -lt 100 ] || die "loss must be an integer percent 0..99: $l"
done

# Names carry the PID so concurrent runs do not collide (interface names: at most 15 chars).
SRV="udpring-srv-$$"
CLI="udpring-cli-$$"
VS="urs$$"
VC="urc$$"
SRV_IP=10.77.0.1
CLI_IP=10.77.0.2
work="$(mktemp -d /tmp/udpring-faults.XXXXXX)"
server_pid=""
load_pid=""

cleanup() {
  set +e
  for p in "$load_pid" "$server_pid"; do
    if [ -n "$p" ] && kill -0 "$p" 2>/dev/null; then
      kill -KILL "$p" 2>/dev/null
      wait "$p" 2>/dev/null
    fi
  done
  ip netns del "$SRV" 2>/dev/null
  ip netns del "$CLI" 2>/dev/null
  [ -n "${KEEP:-}" ] && echo "kept $work" >&2 || rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# --- namespaces, veth, addresses (only inside the namespaces) ---
ip netns add "$SRV"
ip netns add "$CLI"
ip -n "$SRV" link set lo up
ip -n "$CLI" link set lo up
ip -n "$SRV" link add "$VS" type veth peer name "$VC" netns "$CLI"
ip -n "$SRV" addr add "$SRV_IP/24" dev "$VS"
ip -n "$CLI" addr add "$CLI_IP/24" dev "$VC"
ip -n "$SRV" link set "$VS" up
ip -n "$CLI" link set "$VC" up

# One table per namespace; the rule is replaced for each loss level.
for ns in "$SRV" "$CLI"; do
  ip netns exec "$ns" nft -f - <<'EOF'
table inet udpring_faults {
  chain input {
    type filter hook input priority filter; policy accept;
  }
}
EOF
done
set_loss() {
  local ns
  for ns in "$SRV" "$CLI"; do
    ip netns exec "$ns" nft flush chain inet udpring_faults input
    if [ "$1" -gt 0 ]; then
      if [ "$ns" = "$SRV" ]; then set -- "$1" "$VS"; else set -- "$1" "$VC"; fi
      # Only on the veth: loopback inside the namespace stays lossless (udpring's start-up
      # probe receives a datagram over lo and refuses to start when it is lost).
      ip netns exec "$ns" nft add rule inet udpring_faults input iifname "$2" \
        meta l4proto udp numgen random mod 100 "<" "$1" counter drop
    fi
  done
}
dropped() { # datagrams the rule dropped in namespace $1
  ip netns exec "$1" nft list chain inet udpring_faults input \
    | grep -o 'packets [0-9]*' | awk '{s += $2} END {print s + 0}'
}

# Resends: with loss L in each direction a try fails with q = 1 - (1 - L)^2; a request is
# given up after RETRIES+1 failed tries, so expected give-ups per case = REQUESTS *
# q^(RETRIES+1). Take the smallest RETRIES (at most 16, the generator's limit) that keeps it
# under 0.0001: over six cases a bound of 0.01 each made about one run in twenty fail on a
# legitimate give-up. Extra resends cost nothing unless a request keeps being lost.
retries_for() {
  awk -v n="$REQUESTS" -v l="$1" 'BEGIN {
    q = 1 - (1 - l / 100) ^ 2
    for (r = 0; r <= 16; r++) if (n * q ^ (r + 1) < 0.0001) break
    if (r > 16) r = 16
    printf "%d %.2g\n", r, n * q ^ (r + 1)
  }'
}

# The kernel's UDP counters in namespace $1: "InDatagrams NoPorts InErrors RcvbufErrors".
udp_snmp() {
  ip netns exec "$1" awk '/^Udp:/ { if (!h) { for (i = 1; i <= NF; i++) n[$i] = i; h = 1 }
    else print $n["InDatagrams"], $n["NoPorts"], $n["InErrors"], $n["RcvbufErrors"] }' /proc/net/snmp
}
snmp_delta() { # before after -> "NoPorts=.. InErrors=.. RcvbufErrors=.."
  local -a a=($1) b=($2)
  echo "NoPorts=$((b[1] - a[1])) InErrors=$((b[2] - a[2])) RcvbufErrors=$((b[3] - a[3]))"
}
json_field() { grep -o "\"$1\":[0-9.a-z]*" "$2" | head -1 | cut -d: -f2; }
# The value of KEY=N in a line (empty when the line has none, e.g. no stats line yet).
kv() { grep -o "\b$1=[0-9]*" <<<"$2" | tail -1 | cut -d= -f2 || true; }

idle_s="$(awk -v m="$IDLE_MS" 'BEGIN { printf "%.3f", m / 1000 }')"
# How long to wait for every session to close on idle after the load: its timeout + 5 s.
close_polls=$(( (IDLE_MS + 5000) / 100 ))
failures=0
rows=()
fail() { echo "FAIL [$case]: $*" >&2; failures=$((failures + 1)); }

for loss in "${LOSSES[@]}"; do
  set_loss "$loss"
  read -r retries expected <<<"$(retries_for "$loss")"
  retries="${RETRIES:-$retries}"
  for mode in $MODES; do
    case="$mode loss=$loss%"
    out="$work/srv-$mode-$loss.out"
    err="$work/srv-$mode-$loss.err"
    ljson="$work/load-$mode-$loss.json"
    lerr="$work/load-$mode-$loss.err"
    drop_srv0="$(dropped "$SRV")"
    drop_cli0="$(dropped "$CLI")"
    snmp_srv0="$(udp_snmp "$SRV")"
    snmp_cli0="$(udp_snmp "$CLI")"
    failures0=$failures
    ip netns exec "$SRV" "$UDPRING" serve --bind "$SRV_IP:$PORT" --sessions "$mode" \
      --idle-timeout "${IDLE_MS}ms" --workers 1 --stats-interval 500ms "${gso_flag[@]}" >"$out" 2>"$err" &
    server_pid=$!
    for _ in $(seq 50); do
      grep -q "udpring listening on" "$out" 2>/dev/null && break
      kill -0 "$server_pid" 2>/dev/null || break
      sleep 0.1
    done
    if ! grep -q "udpring listening on" "$out"; then
      fail "server did not start: $(tail -3 "$err")"
      kill -KILL "$server_pid" 2>/dev/null || true
      wait "$server_pid" 2>/dev/null || true
      server_pid=""
      continue
    fi
    follow=()
    [ "$mode" = port-per-client ] && follow=(--follow-reply-port)
    load_rc=0
    # Bounded: --requests plus --settle ends within the give-up time after the last request.
    timeout 300 ip netns exec "$CLI" "$UDPRING" load --target "$SRV_IP:$PORT" \
      --clients "$CLIENTS" --window "$WINDOW" --requests "$REQUESTS" --timeout "$TIMEOUT" \
      --max-timeout "$MAX_TIMEOUT" --retries "$retries" --settle --json --quiet \
      "${follow[@]}" >"$ljson" 2>"$lerr" &
    load_pid=$!
    wait "$load_pid" || load_rc=$?
    load_pid=""
    [ "$load_rc" = 0 ] || fail "load exited $load_rc: $(tail -3 "$lerr")"
    sent="$(json_field sent "$ljson")"
    answered="$(json_field answered "$ljson")"
    retrans="$(json_field retransmitted "$ljson")"
    given_up="$(json_field given_up "$ljson")"
    outstanding="$(json_field outstanding "$ljson")"
    stray="$(json_field stray "$ljson")"
    if [ -z "$sent" ]; then
      fail "no JSON report from load"
      sent=0 answered=0 retrans=0 given_up=0 outstanding=0 stray=0
    fi
    [ "$sent" = "$REQUESTS" ] || fail "sent $sent != requests $REQUESTS"
    [ "$given_up" = 0 ] || fail "given_up $given_up (expected per case: $expected)"
    [ "$outstanding" = 0 ] || fail "outstanding $outstanding after settling"
    [ "$sent" = "$((answered + given_up))" ] || fail "sent $sent != answered $answered + given_up $given_up"
    if [ "$loss" -gt 0 ] && [ "$retrans" = 0 ]; then fail "no retransmissions at $loss% loss"; fi

    # Every session must close on idle: poll the stats lines printed after the load ended
    # until one says sessions_open=0, for at most the idle timeout + 5 s.
    stats_at_end="$(grep -c 'stats rx=' "$err" || true)"
    last_stats="" open_before=""
    for _ in $(seq "$close_polls"); do
      last_stats="$(grep 'stats rx=' "$err" | tail -n +"$((stats_at_end + 1))" | tail -1 || true)"
      open_before="$(kv sessions_open "$last_stats")"
      [ "${open_before:-x}" = 0 ] && break
      sleep 0.1
    done
    kill -TERM "$server_pid"
    srv_rc=0
    for _ in $(seq 50); do kill -0 "$server_pid" 2>/dev/null || break; sleep 0.1; done
    if kill -0 "$server_pid" 2>/dev/null; then
      fail "server still running 5 s after SIGTERM"
      kill -KILL "$server_pid" 2>/dev/null || true
    fi
    wait "$server_pid" || srv_rc=$?
    server_pid=""
    [ "$srv_rc" = 0 ] || fail "server exited $srv_rc"
    final="$(grep '^udpring final' "$out" || true)"
    rx="$(kv rx "$final")"
    tx="$(kv tx "$final")"
    opened="$(kv opened "$final")"
    closed_idle="$(kv closed_idle "$final")"
    closed_shutdown="$(kv closed_shutdown "$final")"
    open_final="$(kv sessions_open "$final")"
    if [ -z "$opened" ]; then
      fail "no session counters in the final line: $final"
      opened=0 closed_idle=0 closed_shutdown=0 open_final=0
    fi
    [ "${open_before:-x}" = 0 ] || fail "sessions_open=${open_before:-?} $((close_polls / 10))s after the load (last stats line since: ${last_stats:-none})"
    [ "$opened" -ge 1 ] || fail "no session opened"
    [ "$closed_idle" = "$opened" ] || fail "closed_idle $closed_idle != opened $opened"
    [ "$closed_shutdown" = 0 ] || fail "closed_shutdown $closed_shutdown (sessions left open past the idle timeout)"
    [ "$open_final" = 0 ] || fail "final sessions_open $open_final"
    drop_srv=$(( $(dropped "$SRV") - drop_srv0 ))
    drop_cli=$(( $(dropped "$CLI") - drop_cli0 ))
    # Kernel drops past the rule (full receive queues): each namespace's UDP InErrors.
    read -r _ _ inerr_srv1 _ <<<"$(udp_snmp "$SRV")"
    read -r _ _ inerr_cli1 _ <<<"$(udp_snmp "$CLI")"
    read -r _ _ inerr_srv0 _ <<<"$snmp_srv0"
    read -r _ _ inerr_cli0 _ <<<"$snmp_cli0"
    kdrop_srv=$((inerr_srv1 - inerr_srv0))
    kdrop_cli=$((inerr_cli1 - inerr_cli0))
    # Datagrams: the client sent sent+retransmitted; the server received those the rule and
    # its kernel let through, answered each, and the client got those its rule and kernel
    # let through (answered + stray duplicates). Nothing else may be missing.
    [ "$rx" = "$((sent + retrans - drop_srv - kdrop_srv))" ] || fail "server rx $rx != client sent $((sent + retrans)) - dropped by the rule $drop_srv - by the kernel $kdrop_srv"
    [ "$tx" = "$rx" ] || fail "server tx $tx != rx $rx (echo)"
    if [ "$GSO" != 1 ]; then
      [ "$((answered + stray))" = "$((tx - drop_cli - kdrop_cli))" ] || fail "client received $((answered + stray)) != server tx $tx - dropped by the rule $drop_cli - by the kernel $kdrop_cli"
    fi
    if [ "$failures" != "$failures0" ]; then
      echo "  [$case] kernel UDP counters: server ns $(snmp_delta "$snmp_srv0" "$(udp_snmp "$SRV")"), client ns $(snmp_delta "$snmp_cli0" "$(udp_snmp "$CLI")")" >&2
      echo "  [$case] server: $final" >&2
      echo "  [$case] load: $(cat "$ljson")" >&2
    fi
    rows+=("$(printf '%-16s %5s %9s %9s %9s %8s %7s %8s %8s %9s %9s' "$mode" "$loss" "$sent" \
      "$answered" "$retrans" "$given_up" "$retries" "$drop_srv" "$drop_cli" "$opened" "$closed_idle")")
  done
done

printf '%-16s %5s %9s %9s %9s %8s %7s %8s %8s %9s %9s\n' mode loss% requests answered \
  retransmit given_up retries drop_srv drop_cli opened closed_idle
printf '%s\n' "${rows[@]}"
echo "clients $CLIENTS window $WINDOW timeout $TIMEOUT (cap $MAX_TIMEOUT) idle ${idle_s}s"
if [ "$failures" -gt 0 ]; then
  echo "faults.sh: $failures check(s) failed" >&2
  exit 1
fi
echo "faults.sh: all checks passed"
