#!/usr/bin/env bash
# A QUIC fleet in network namespaces behind an nftables load balancer (issue 16 item 3):
#
#   client ns (10.0.0.1) -- router ns (10.0.0.2; VIP 10.0.9.9) -+- host1 ns (10.1.1.2)
#                                                               +- host2 ns (10.1.2.2)
#                                                               +- host3 ns (10.1.3.2)
#
# The router DNATs the VIP's UDP port: a short-header QUIC packet (first payload bit 0) to the
# host whose QUIC-LB server ID (1 byte, just past the CID's first octet) its destination CID
# carries; anything else (Initials, other long headers) by a jhash of the 4-tuple. Conntrack
# keeps a flow where its first packet went, so a client that rebinds its port starts a new
# flow whose first packet is a short header: it reaches its host by server ID.
#
#   scripts/cluster.sh up PREFIX PORT     make the namespaces and the rules
#   scripts/cluster.sh down PREFIX        remove them (and end what runs in them)
#
# Namespaces are PREFIX-c, PREFIX-r, PREFIX-h1..3. Needs root, ip and nft. Used by
# tests/it/fleet.rs and `make cluster`.
set -euo pipefail

cmd=${1:?up|down}
prefix=${2:?prefix}
hosts=3

down() {
  for ns in "$prefix-c" "$prefix-r" "$prefix-h1" "$prefix-h2" "$prefix-h3"; do
    if ip netns list | grep -qw "$ns"; then
      # End what still runs there (only processes in our own namespaces).
      for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
      ip netns del "$ns" 2>/dev/null || true
    fi
  done
}

if [ "$cmd" = down ]; then
  down
  exit 0
fi
port=${3:?port}
down
trap 'down' ERR

c="$prefix-c"; r="$prefix-r"
ip netns add "$c"
ip netns add "$r"
ip -n "$r" link set lo up
ip -n "$c" link set lo up
ip link add "$prefix-c0" netns "$c" type veth peer name "$prefix-rc" netns "$r"
ip -n "$c" addr add 10.0.0.1/24 dev "$prefix-c0"
ip -n "$r" addr add 10.0.0.2/24 dev "$prefix-rc"
ip -n "$r" addr add 10.0.9.9/32 dev lo
ip -n "$c" link set "$prefix-c0" up
ip -n "$r" link set "$prefix-rc" up
ip -n "$c" route add default via 10.0.0.2
ip netns exec "$r" sysctl -qw net.ipv4.ip_forward=1
for i in $(seq 1 $hosts); do
  h="$prefix-h$i"
  ip netns add "$h"
  ip -n "$h" link set lo up
  ip link add "$prefix-h${i}0" netns "$h" type veth peer name "$prefix-r$i" netns "$r"
  ip -n "$h" addr add "10.1.$i.2/24" dev "$prefix-h${i}0"
  ip -n "$r" addr add "10.1.$i.1/24" dev "$prefix-r$i"
  ip -n "$h" link set "$prefix-h${i}0" up
  ip -n "$r" link set "$prefix-r$i" up
  ip -n "$h" route add default via "10.1.$i.1"
done

# HASH_ONLY=1 leaves out the server-ID rule (to watch rebinding clients fail without it).
by_id="ip daddr 10.0.9.9 udp dport $port @th,64,1 0 dnat ip to @th,80,8 map @by_server_id"
[ "${HASH_ONLY:-0}" = 1 ] && by_id="# (HASH_ONLY: no server-ID rule)"
ip netns exec "$r" nft -f - <<EOF
table ip quic_lb {
  # QUIC-LB server ID (byte 2 of the UDP payload: first byte, CID first octet, server ID).
  map by_server_id {
    typeof @th,80,8 : ip daddr
    elements = { 0x01 : 10.1.1.2, 0x02 : 10.1.2.2, 0x03 : 10.1.3.2 }
  }
  chain prerouting {
    type nat hook prerouting priority dstnat; policy accept;
    # Short header: the host its connection ID names (no such server ID: the next rule).
    $by_id
    # New connections and everything else: a hash of the 4-tuple.
    ip daddr 10.0.9.9 udp dport $port dnat ip to jhash ip saddr . udp sport mod 3 map { 0 : 10.1.1.2, 1 : 10.1.2.2, 2 : 10.1.3.2 }
  }
}
EOF
echo "cluster $prefix up: VIP 10.0.9.9:$port, hosts 10.1.1.2 10.1.2.2 10.1.3.2"
