#!/usr/bin/env python3
"""Soak: udpring serve under client churn in every session mode, bounded in time.

Usage: scripts/soak.py [DURATION_S] [--udpring PATH] [--port PORT]
       (default 600 s; `make soak` runs it, CI runs it with 60)

The duration is split evenly among the modes none, shared, connected, port-per-client. For
each mode a server is started on 127.0.0.1 with --idle-timeout 500ms and clients churn:
back-to-back `udpring load` runs of about one second (each run opens new sockets, so every
run's sessions open, then close on idle while the next run's open); the wave size cycles
through 200, 50, 400 clients. port-per-client runs use `load --follow-reply-port`.

Checks per mode:
  * memory and descriptors: the server's VmRSS and descriptor count are sampled after the
    warm-up (20% of the mode's time, then a pause past the idle timeout so its sessions are
    closed) and at the end (after the same pause). End RSS may exceed warm-up RSS by at most
    10% + 4 MiB: by the end of the warm-up every wave size has been seen, so the session table,
    the reply pool and malloc's arenas are at their high-water mark; what remains is page-level
    noise of the allocator (freed memory stays resident in glibc's per-thread arenas and is
    reused, not returned), which the 4 MiB floor absorbs for a server whose RSS is a few MiB,
    and 10% for a larger one. A leak of one session socket or state per client (10,000s of
    sessions over a soak) exceeds it. The end descriptor count must equal the count right
    after start-up (every per-client socket closed) and not exceed the warm-up count.
  * every datagram accounted for: the server's final counters (after SIGTERM) against the
    clients' totals: rx == requests the clients sent (sent + retransmitted) and tx == replies
    the clients received (answered + stray). On loopback nothing may be missing; if the kernel
    dropped datagrams (UDP RcvbufErrors), the difference is reported with it and still fails.
Exit status 0 when every check passed, 1 otherwise, 2 on a usage or start-up error.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODES = ["none", "shared", "connected", "port-per-client"]
IDLE_S = 0.5
WAVES = [200, 50, 400]
LOAD_S = 1.0
RSS_SLACK_KB = 4 * 1024
RSS_SLACK_FRAC = 0.10


def default_binary() -> str:
    env = os.environ.get("UDPRING")
    if env:
        return env
    root = Path(__file__).resolve().parent.parent
    target = Path(os.environ.get("CARGO_TARGET_DIR", root / "target"))
    return str(target / "release" / "udpring")


def rss_kb(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def udp_snmp() -> dict[str, int]:
    with open("/proc/net/snmp") as f:
        rows = [line.split() for line in f if line.startswith("Udp:")]
    return dict(zip(rows[0][1:], map(int, rows[1][1:])))


def parse_kv(line: str) -> dict[str, int]:
    return {k: int(v) for k, v in re.findall(r"\b(\w+)=(\d+)", line)}


class Server:
    def __init__(self, binary: str, port: int, mode: str, workdir: str):
        self.out_path = os.path.join(workdir, f"serve-{mode}.out")
        self.err_path = os.path.join(workdir, f"serve-{mode}.err")
        self.out = open(self.out_path, "w+")
        self.err = open(self.err_path, "w")
        self.proc = subprocess.Popen(
            [binary, "serve", "--bind", f"127.0.0.1:{port}", "--sessions", mode,
             "--idle-timeout", f"{int(IDLE_S * 1000)}ms", "--stats-interval", "0"],
            stdout=self.out, stderr=self.err)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if "udpring listening on" in Path(self.out_path).read_text():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.kill()
        raise RuntimeError(f"server did not start: {Path(self.err_path).read_text()[-500:]}")

    def stop(self) -> dict[str, int]:
        """SIGTERM, wait (bounded), return the final counters."""
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            raise RuntimeError("server did not exit within 10 s of SIGTERM")
        if rc != 0:
            raise RuntimeError(f"server exited {rc}")
        final = [l for l in Path(self.out_path).read_text().splitlines()
                 if l.startswith("udpring final")]
        if not final:
            raise RuntimeError("no final counters line")
        return parse_kv(final[-1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def load_run(binary: str, port: int, mode: str, clients: int) -> dict:
    cmd = [binary, "load", "--target", f"127.0.0.1:{port}", "--clients", str(clients),
           "--window", "2", "--duration", f"{LOAD_S}s", "--timeout", "1s", "--retries", "3",
           "--settle", "--json", "--quiet"]
    if mode == "port-per-client":
        cmd.append("--follow-reply-port")
    # Bounded: 1 s of sending + at most 15 s of settling (1+2+4+8 s of timeouts).
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    if p.returncode != 0:
        raise RuntimeError(f"load exited {p.returncode}: {p.stderr[-500:]}")
    return json.loads(p.stdout)


def soak_mode(binary: str, port: int, mode: str, seconds: float, workdir: str) -> tuple[bool, dict]:
    server = Server(binary, port, mode, workdir)
    pid = server.proc.pid
    try:
        base_fds = fds(pid)
        snmp0 = udp_snmp()
        totals = {"runs": 0, "clients": 0, "sent": 0, "retransmitted": 0, "answered": 0,
                  "stray": 0, "given_up": 0, "outstanding": 0}
        start = time.monotonic()
        warm_end = start + 0.2 * seconds
        end = start + seconds - IDLE_S - 0.5
        warm = None
        wave = 0
        while True:
            now = time.monotonic()
            if warm is None and now >= warm_end:
                time.sleep(IDLE_S + 0.5)  # past the idle timeout: the warm-up's sessions close
                warm = (rss_kb(pid), fds(pid))
                continue
            if now >= end:
                break
            clients = WAVES[wave % len(WAVES)]
            wave += 1
            r = load_run(binary, port, mode, clients)
            totals["runs"] += 1
            totals["clients"] += clients
            for k in ("sent", "retransmitted", "answered", "stray", "given_up", "outstanding"):
                totals[k] += r[k]
        if warm is None:
            time.sleep(IDLE_S + 0.5)
            warm = (rss_kb(pid), fds(pid))
        time.sleep(IDLE_S + 0.5)
        end_rss, end_fds = rss_kb(pid), fds(pid)
        final = server.stop()
    finally:
        server.kill()
    snmp1 = udp_snmp()
    kernel_drops = snmp1.get("RcvbufErrors", 0) - snmp0.get("RcvbufErrors", 0)

    client_sent = totals["sent"] + totals["retransmitted"]
    client_recv = totals["answered"] + totals["stray"]
    ok = True
    problems = []
    rss_limit = warm[0] * (1 + RSS_SLACK_FRAC) + RSS_SLACK_KB
    if end_rss > rss_limit:
        problems.append(f"RSS {end_rss} kB > {rss_limit:.0f} kB (warm-up {warm[0]} kB + 10% + 4 MiB)")
    if end_fds != base_fds or end_fds > warm[1]:
        problems.append(f"descriptors {end_fds} at the end, {base_fds} at start, {warm[1]} after warm-up")
    if final.get("rx", -1) != client_sent:
        problems.append(f"server rx {final.get('rx')} != client sent {client_sent}"
                        f" (kernel UDP RcvbufErrors during the mode: {kernel_drops})")
    if final.get("tx", -1) != client_recv:
        problems.append(f"server tx {final.get('tx')} != client received {client_recv}")
    if totals["given_up"] or totals["outstanding"]:
        problems.append(f"given up {totals['given_up']}, outstanding {totals['outstanding']}")
    if mode != "none":
        opened = final.get("opened", 0)
        closed = final.get("closed_idle", 0) + final.get("closed_by_handler", 0)
        # opened can be a little below the client count: a new client socket may get the
        # source port of a previous run's client whose session is still open (same peer).
        if opened == 0 or closed != opened or final.get("closed_shutdown", 0):
            problems.append(f"sessions: opened {opened} for {totals['clients']} clients,"
                            f" closed_idle {final.get('closed_idle')},"
                            f" closed_shutdown {final.get('closed_shutdown')}")
    for p in problems:
        print(f"FAIL [{mode}]: {p}", file=sys.stderr)
        ok = False
    row = dict(mode=mode, runs=totals["runs"], clients=totals["clients"],
               warm_rss=warm[0], end_rss=end_rss, base_fds=base_fds, warm_fds=warm[1],
               end_fds=end_fds, client_sent=client_sent, rx=final.get("rx"),
               client_recv=client_recv, tx=final.get("tx"),
               opened=final.get("opened", 0), closed_idle=final.get("closed_idle", 0),
               retrans=totals["retransmitted"])
    return ok, row


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("duration", nargs="?", type=float, default=600.0, help="total seconds (default 600)")
    ap.add_argument("--udpring", default=default_binary(), help="udpring binary (env UDPRING)")
    ap.add_argument("--port", type=int, default=9710)
    ap.add_argument("--modes", default=",".join(MODES))
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    if not os.access(args.udpring, os.X_OK):
        print(f"soak.py: no udpring binary at {args.udpring} (cargo build --release)", file=sys.stderr)
        return 2
    per_mode = args.duration / len(modes)
    if per_mode < 4:
        print("soak.py: at least 4 s per mode", file=sys.stderr)
        return 2
    print(f"soak: {args.duration:.0f} s, {per_mode:.0f} s per mode, idle timeout {IDLE_S}s, "
          f"waves of {WAVES} clients, {LOAD_S}s load runs", flush=True)
    rows, all_ok = [], True
    with tempfile.TemporaryDirectory(prefix="udpring-soak.") as workdir:
        for mode in modes:
            try:
                ok, row = soak_mode(args.udpring, args.port, mode, per_mode, workdir)
            except (RuntimeError, subprocess.TimeoutExpired, OSError, ValueError) as e:
                print(f"FAIL [{mode}]: {e}", file=sys.stderr)
                all_ok = False
                continue
            all_ok &= ok
            rows.append(row)
            print(f"  {mode}: done ({row['runs']} load runs, {row['clients']} clients)", flush=True)
    hdr = ("mode", "runs", "clients", "opened", "closed_idle", "warm_rss_kB", "end_rss_kB",
           "base_fd", "warm_fd", "end_fd", "client_sent", "srv_rx", "client_recv", "srv_tx", "retrans")
    print(("{:<16}" + " {:>11}" * (len(hdr) - 1)).format(*hdr))
    for r in rows:
        print(("{:<16}" + " {:>11}" * (len(hdr) - 1)).format(
            r["mode"], r["runs"], r["clients"], r["opened"], r["closed_idle"], r["warm_rss"],
            r["end_rss"], r["base_fds"], r["warm_fds"], r["end_fds"], r["client_sent"], r["rx"],
            r["client_recv"], r["tx"], r["retrans"]))
    print("soak: all checks passed" if all_ok else "soak: FAILED")
    return 0 if all_ok else 1


if __name__ == "__main__":
    sys.exit(main())
