#!/usr/bin/env python3
"""udpring's AF_XDP path (`serve --xdp`) against its ring path and the lean recvmmsg loop, over
a veth pair between two network namespaces (issue 17 part 2). Python 3.11, stdlib only; root.

The server runs in one namespace pinned to CPU 0, the generator (`udpring load`, sockperf
requests) in the other pinned to CPU 1. Rounds are interleaved (every server once per round);
ratios are taken inside each round against recvmmsg of the same round, then the median over
rounds is reported.

Two CPU figures per answered datagram, because on a veth the kernel's receive work does not
run where a NIC's would: the sender's veth_xmit runs the peer's receive path (XDP, or the
IP/UDP stack up to the socket queue) in the sender's own softirq. So:
  server ns  the server process's own CPU (utime + stime) ÷ answered
  total ns   every CPU's busy time (/proc/stat: all but idle and iowait) ÷ answered: the
             generator's work is the same for every server, so differences are the server's,
             wherever the kernel charged them
Copy mode (a veth has no zero-copy) also charges the frame copies to these figures.

Outputs: target/bench/xdp.md and xdp.json, the command first. Run by `make bench-xdp` after
`cargo build --release --bins --examples`.
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import os
import shlex
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # noqa: E402  (the shared process helpers and the generator's report)

REPO = bench.REPO
SERVER_NS = "urxb-s"
CLIENT_NS = "urxb-c"
SERVER_IP = "10.79.0.1"
CLIENT_IP = "10.79.0.2"
SERVERS = ("udpring-xdp", "udpring", "recvmmsg")
REFERENCE = "recvmmsg"
SHAPES = {
    "64x8": ("64 clients × 8 in flight, 64 B", ["--clients", "64", "--window", "8"]),
    "64x1": ("64 clients × 1 in flight, 64 B", ["--clients", "64", "--window", "1"]),
}


def sh(cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    return subprocess.run(["sh", "-c", cmd], capture_output=True, text=True, check=check)


def tx_checksum(dev: str, on: bool) -> None:
    """`ethtool -K DEV tx on|off` without ethtool (ETHTOOL_STXCSUM through SIOCETHTOOL), in the
    calling process's namespace."""
    val = ctypes.create_string_buffer(struct.pack("II", 0x17, int(on)), 8)
    ifr = struct.pack("16sP", dev.encode(), ctypes.addressof(val)) + b"\0" * 16
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        fcntl.ioctl(s.fileno(), 0x8946, ifr)


def up() -> None:
    down()
    sh(
        f"""set -e
        ip netns add {SERVER_NS}; ip netns add {CLIENT_NS}
        ip link add s0 numrxqueues 1 numtxqueues 1 netns {SERVER_NS} type veth peer name c0 numrxqueues 1 numtxqueues 1 netns {CLIENT_NS}
        ip -n {SERVER_NS} addr add {SERVER_IP}/24 dev s0; ip -n {CLIENT_NS} addr add {CLIENT_IP}/24 dev c0
        ip -n {SERVER_NS} link set s0 up; ip -n {CLIENT_NS} link set c0 up
        ip -n {SERVER_NS} link set lo up; ip -n {CLIENT_NS} link set lo up"""
    )
    sh(f"ip netns exec {CLIENT_NS} {shlex.quote(sys.executable)} {shlex.quote(__file__)} --tx-checksum-off c0")


def down() -> None:
    sh(f"ip netns del {SERVER_NS} 2>/dev/null; ip netns del {CLIENT_NS} 2>/dev/null", check=False)


def busy_ticks() -> int:
    """Busy clock ticks of all CPUs (the aggregate line of /proc/stat less idle and iowait)."""
    f = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(f) - f[3] - f[4]


def server_cmd(args, name: str, port: int) -> list[str]:
    base = ["ip", "netns", "exec", SERVER_NS, "taskset", "-c", "0"]
    bind = f"{SERVER_IP}:{port}"
    serve = [args.udpring, "serve", "--workers", "1", "--app", "sockperf", "--stats-interval", "0", "--bind", bind]
    if name == "udpring-xdp":
        return [*base, *serve, "--xdp", "s0"]
    if name == "udpring":
        return [*base, *serve]
    return [*base, str(Path(args.examples) / "baseline_recvmmsg"), "--bind", bind, "--max-size", "64"]


def gen_cmd(args, port: int, flags: list[str]) -> list[str]:
    return [
        "ip", "netns", "exec", CLIENT_NS, "taskset", "-c", "1",
        args.udpring, "load", "--target", f"{SERVER_IP}:{port}", "--proto", "sockperf", "--size", "64",
        *flags, "--duration", f"{args.secs}s", "--warmup", f"{args.warmup}s", "--json", "--quiet",
    ]


def answered_probe(port: int, proc: subprocess.Popen) -> str | None:
    """A probe from the client namespace (the helper re-executes this script there)."""
    r = subprocess.run(
        ["ip", "netns", "exec", CLIENT_NS, sys.executable, __file__, "--probe", f"{SERVER_IP}:{port}"],
        capture_output=True, text=True,
    )
    if proc.poll() is not None:
        return f"exited with status {proc.returncode}"
    return None if r.returncode == 0 else r.stdout.strip() or "no answer"


def one(args, name: str, shape: str, port: int) -> dict:
    proc = subprocess.Popen(server_cmd(args, name, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        err = answered_probe(port, proc)
        if err:
            return {"error": err}
        gen = subprocess.Popen(gen_cmd(args, port, SHAPES[shape][1]), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(args.warmup)
        t0, b0 = bench.proc_cpu_ticks(proc.pid), busy_ticks()
        out, gerr = gen.communicate(timeout=args.warmup + args.secs + 30)
        t1, b1 = bench.proc_cpu_ticks(proc.pid), busy_ticks()
        try:
            rep = json.loads(out.strip().splitlines()[-1])
        except (json.JSONDecodeError, IndexError):
            return {"error": f"generator failed: {gerr.strip()[-300:]}"}
        n = rep["answered"]
        res = {"throughput": rep["throughput"], "answered": n, "loss_pct": rep["loss_pct"], "gen_cpu_pct": rep["cpu_pct"]}
        if n > 0 and t0 is not None and t1 is not None:
            res["server_ns"] = (t1 - t0) / bench.CLK_TCK * 1e9 / n
            res["total_ns"] = (b1 - b0) / bench.CLK_TCK * 1e9 / n
        return res
    finally:
        bench.stop(proc)


def ratio(rows: list[dict], ref: list[dict], field: str) -> float | None:
    vals = [r[field] / q[field] for r, q in zip(rows, ref) if r.get(field) and q.get(field)]
    return statistics.median(vals) if vals else None


def med(rows: list[dict], field: str) -> float | None:
    vals = [r[field] for r in rows if r.get(field) is not None]
    return statistics.median(vals) if vals else None


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--udpring", default=str(REPO / "target/release/udpring"))
    ap.add_argument("--examples", default=str(REPO / "target/release/examples"))
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--secs", type=float, default=4)
    ap.add_argument("--warmup", type=float, default=1)
    ap.add_argument("--shapes", default="64x8,64x1")
    ap.add_argument("--tx-checksum-off", metavar="DEV", help=argparse.SUPPRESS)
    ap.add_argument("--probe", metavar="ADDR", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.tx_checksum_off:
        tx_checksum(args.tx_checksum_off, False)
        return 0
    if args.probe:
        host, port = args.probe.rsplit(":", 1)
        msg = struct.pack(">QHI", 1, 3, 64) + b"\0" * 50
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.settimeout(0.1)
            end = time.monotonic() + 5
            while time.monotonic() < end:
                try:
                    s.sendto(msg, (host, int(port)))
                    if s.recv(2048)[:8] == msg[:8]:
                        return 0
                except OSError:
                    pass
        print("no answer to a probe within 5 s")
        return 1
    if os.geteuid() != 0:
        print("bench_xdp: skipped: needs root (network namespaces, XDP)", file=sys.stderr)
        return 0
    command = shlex.join([sys.executable, *sys.argv])
    shapes = [s for s in args.shapes.split(",") if s]
    up()
    results: dict[str, dict[str, list[dict]]] = {s: {sh_: [] for sh_ in shapes} for s in SERVERS}
    try:
        port = 9100
        for rnd in range(args.rounds):
            for shape in shapes:
                for name in SERVERS:
                    port += 1
                    r = one(args, name, shape, port)
                    r["round"] = rnd
                    results[name][shape].append(r)
                    bench.log(f"round {rnd} {shape:5} {name:12} " + (
                        r["error"] if "error" in r else
                        f"{r['throughput']:>9.0f}/s server {r.get('server_ns', 0):>6.0f} ns total {r.get('total_ns', 0):>6.0f} ns gen {r['gen_cpu_pct']:.0f}%"))
    finally:
        down()
    lines = [
        f"Command: `{command}`", "",
        f"Server: `{shlex.join(server_cmd(args, 'udpring-xdp', 0))}` (and without `--xdp`; recvmmsg: `examples/baseline_recvmmsg`)",
        f"Generator: `{shlex.join(gen_cmd(args, 0, ['...']))}`", "",
        f"Kernel {os.uname().release}; {args.rounds} interleaved rounds, median; ratios per round against recvmmsg.", "",
    ]
    for shape in shapes:
        lines += [f"### {SHAPES[shape][0]}", "",
                  "| server | answered/s | vs recvmmsg | server ns/answer | vs recvmmsg | total ns/answer | vs recvmmsg | loss % |",
                  "|---|---|---|---|---|---|---|---|"]
        ref = results[REFERENCE][shape]
        for name in SERVERS:
            rows = results[name][shape]
            def f(v, d=0):
                return "–" if v is None else f"{v:,.{d}f}"
            lines.append(
                f"| {name} | {f(med(rows, 'throughput'))} | {f(ratio(rows, ref, 'throughput'), 2)} | "
                f"{f(med(rows, 'server_ns'))} | {f(ratio(rows, ref, 'server_ns'), 2)} | "
                f"{f(med(rows, 'total_ns'))} | {f(ratio(rows, ref, 'total_ns'), 2)} | {f(med(rows, 'loss_pct'), 3)} |")
        lines.append("")
    out = REPO / "target/bench"
    out.mkdir(parents=True, exist_ok=True)
    (out / "xdp.md").write_text("\n".join(lines))
    (out / "xdp.json").write_text(json.dumps({"command": command, "results": results}, indent=1))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
