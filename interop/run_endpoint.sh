#!/usr/bin/env bash
# The QUIC interop runner's endpoint (github.com/quic-interop/quic-interop-runner): udpring
# as a server. The runner sets ROLE and TESTCASE, mounts /certs (cert.pem, leaf first, and
# priv.key), /www (the files to serve) and /downloads, and points SSLKEYLOGFILE and QLOGDIR
# into its log directory; the server listens on port 443, IPv4 and IPv6. A case this
# endpoint cannot serve exits 127, as the runner asks, with one line saying why.
#
# Outside Docker (tests/it/interop.rs) every path is an environment variable: UDPRING (the
# binary), CERTS, WWW, BIND (or PORT), and SERVER_PARAMS (the runner's own variable for extra
# options, word-split) is appended to the command line. SETUP names the network simulator's
# route set-up script, run when it exists.
set -euo pipefail

UDPRING="${UDPRING:-/usr/local/bin/udpring}"
CERTS="${CERTS:-/certs}"
WWW="${WWW:-/www}"
BIND="${BIND:-[::]:${PORT:-443}}"
SETUP="${SETUP:-/setup.sh}"
ROLE="${ROLE:-server}"
TESTCASE="${TESTCASE:-}"

say() { echo "run_endpoint: $*" >&2; }
unsupported() {
  say "TESTCASE=$TESTCASE: $*"
  exit 127
}

if [ -x "$SETUP" ]; then
  "$SETUP"
fi

if [ "$ROLE" != server ]; then
  unsupported "ROLE=$ROLE: udpring is a server only (implementations_quic.json role \"server\")"
fi

# What the binary serves, from its own help text: HTTP/3 (an `h3` ALPN) and 0-RTT (the
# `--no-0rtt` switch that turns it off) are asked of the binary rather than assumed, so this
# script stays right for the binary it is given.
help="$("$UDPRING" serve --help)"
serves_h3() { grep -Eq '(^|[^[:alnum:]_-])h3([^[:alnum:]_-]|$)' <<<"$help"; }
serves_0rtt() { grep -q -- '--no-0rtt' <<<"$help"; }

args=(serve --app quic --bind "$BIND" --cert "$CERTS/cert.pem" --key "$CERTS/priv.key" --root "$WWW")

# The runner's TESTCASE values for a server (a case's testname(Perspective.SERVER) in
# testcases_quic.py): keyupdate, amplificationlimit, rebind-port, rebind-addr, ipv6 and the
# loss and corruption cases reach the server as `transfer` (or `handshake`, `multiconnect`);
# their names are accepted too, for running a case by hand.
case "$TESTCASE" in
  handshake | transfer | multiconnect | chacha20 | ecn | resumption | \
    keyupdate | amplificationlimit | rebind-port | rebind-addr | ipv6 | \
    longrtt | multiplexing | blackhole | handshakeloss | transferloss | \
    handshakecorruption | transfercorruption)
    # hq-interop on every ALPN the binary offers; ChaCha20 is among rustls's TLS 1.3
    # suites and chosen when the client offers only it; ECN marks are on for QUIC;
    # quinn-proto answers a changed client address with path validation; RFC 9000's 3x
    # limit holds before validation; session tickets are sent.
    ;;
  retry)
    args+=(--validate-peers)
    ;;
  http3)
    serves_h3 || unsupported "$UDPRING offers no h3 ALPN (HTTP/3 is not in this build)"
    ;;
  zerortt)
    serves_0rtt || unsupported "$UDPRING has no 0-RTT (session tickets carry no early data)"
    ;;
  v2)
    unsupported "QUIC v2 (RFC 9369) needs compatible version negotiation, which quinn-proto 0.11 does not implement"
    ;;
  connectionmigration)
    unsupported "udpring offers no preferred_address"
    ;;
  *)
    unsupported "not a case udpring serves"
    ;;
esac

if [ -n "${QLOGDIR:-}" ]; then
  # udpring writes no qlog (quinn-proto's `qlog` feature is not built in); the directory is
  # made so the runner's log collection finds what it expects.
  mkdir -p "$QLOGDIR"
fi
if [ -n "${SSLKEYLOGFILE:-}" ]; then
  say "TLS secrets are written to $SSLKEYLOGFILE (NSS key log format)"
fi

# shellcheck disable=SC2206 # SERVER_PARAMS is a list of options, split on spaces on purpose.
extra=(${SERVER_PARAMS:-})
say "TESTCASE=$TESTCASE: $UDPRING ${args[*]} ${extra[*]}"
exec "$UDPRING" "${args[@]}" "${extra[@]}"
