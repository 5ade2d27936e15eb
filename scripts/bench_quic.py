#!/usr/bin/env python3
"""Is udpring --app quic faster than quinn on tokio? Same client, same certificate, same quinn-proto.

`make bench-quic` (release build first). Each round starts each server pinned to CPU 0 with one
worker, runs the same client (examples/quic_load.rs, pinned to CPU 1) against it, and reads the
server's CPU time from /proc/PID/stat around the measured run; the servers alternate inside a
round, and ratios are computed per round, then their medians reported.

Workloads (--workloads picks; all by default):
- small: 64 connections x 8 concurrent streams, 64 B echoed, one stream per request; udpring
  against quinn on tokio (examples/baseline_quinn.rs), client examples/quic_load.rs.
- bulk: one connection downloads a file over hq-interop (256 MiB by default: --bulk-mib);
  same servers and client.
- h3-small: HTTP/3, 64 connections x 8 concurrent GETs of a 64-byte file; udpring (ALPN h3)
  against the h3 crate on h3-quinn on tokio (examples/baseline_h3.rs), client
  examples/h3_load.rs (the h3 crate; every response's status and length checked).
- h3-bulk: HTTP/3, one GET of the bulk file; same servers and client.
The examples need `--features bench-h3` (`make bench-quic` builds them).

Every command is printed before it runs. Results go to target/bench/quic.json.
"""
import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
OUT = ROOT / "target" / "bench" / "quic"
TICK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def taskset(cpu: int, cmd: list, pin: bool) -> list:
    return ["taskset", "-c", str(cpu), *cmd] if pin else cmd


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # utime and stime are fields 14 and 15 of the whole line (11 and 12 after the name).
    return (int(fields[11]) + int(fields[12])) / TICK


def start_server(cmd: list, ready_prefix: str) -> subprocess.Popen:
    log("$ " + " ".join(cmd))
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.time() + 20
    while time.time() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        if line.startswith(ready_prefix):
            return proc
    proc.kill()
    raise RuntimeError(f"server did not start: {' '.join(cmd)}")


def stop(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def servers(args, pin: bool, cert: Path, key: Path, root: Path) -> dict:
    udpring = [str(RELEASE / "udpring"), "serve", "--app", "quic", "--workers", "1",
               "--cert", str(cert), "--key", str(key), "--root", str(root)]
    quinn = [str(RELEASE / "examples" / "baseline_quinn"), "--cert", str(cert), "--key", str(key),
             "--root", str(root)]
    h3 = [str(RELEASE / "examples" / "baseline_h3"), "--cert", str(cert), "--key", str(key),
          "--root", str(root)]
    return {
        "udpring": (lambda port: taskset(0, [*udpring, "--bind", f"127.0.0.1:{port}"], pin),
                    "udpring listening on "),
        "quinn": (lambda port: taskset(0, [*quinn, "--bind", f"127.0.0.1:{port}"], pin),
                  "baseline_quinn listening on "),
        "h3": (lambda port: taskset(0, [*h3, "--bind", f"127.0.0.1:{port}"], pin),
               "baseline_h3 listening on "),
    }


# Each workload: the baseline server it is compared with.
BASELINE = {"small": "quinn", "bulk": "quinn", "h3-small": "h3", "h3-bulk": "h3"}


def client(args, pin: bool, port: int, cert: Path, workload: str) -> list:
    program = "h3_load" if workload.startswith("h3-") else "quic_load"
    base = [str(RELEASE / "examples" / program), "--addr", f"127.0.0.1:{port}",
            "--cafile", str(cert)]
    if workload == "small":
        cmd = [*base, "small", "--conns", str(args.conns), "--streams", str(args.streams),
               "--size", str(args.size), "--secs", str(args.secs)]
    elif workload == "h3-small":
        cmd = [*base, "small", "--get", "/small.bin", "--conns", str(args.conns),
               "--streams", str(args.streams), "--secs", str(args.secs)]
    else:
        cmd = [*base, "bulk", "--get", "/bulk.bin"]
    return taskset(1, cmd, pin)


def measure(args, pin, name, make_cmd, ready, cert, workload) -> dict:
    port = free_port()
    server = start_server(make_cmd(port), ready)
    try:
        cmd = client(args, pin, port, cert, workload)
        log("$ " + " ".join(cmd))
        before = cpu_seconds(server.pid)
        started = time.time()
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        wall = time.time() - started
        cpu = cpu_seconds(server.pid) - before
    finally:
        stop(server)
    if out.returncode != 0:
        raise RuntimeError(f"client failed: {out.stderr.strip()}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result.update(server=name, server_cpu_s=cpu, wall_s=wall)
    if "requests" in result:
        if result["failed"]:
            raise RuntimeError(f"{name} {workload}: {result['failed']} requests failed")
        result["cpu_us_per_request"] = cpu * 1e6 / max(result["requests"], 1)
        result["req_per_cpu_s"] = result["requests"] / max(cpu, 1e-9)
    else:
        # Throughput per server core: bytes per CPU-second of the server.
        result["mbit_per_cpu_s"] = result["bytes"] * 8 / 1e6 / max(cpu, 1e-9)
    log(f"  {name} {workload}: {json.dumps(result)}")
    return result


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--secs", type=float, default=5.0)
    p.add_argument("--conns", type=int, default=64)
    p.add_argument("--streams", type=int, default=8)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--bulk-mib", type=int, default=256)
    p.add_argument("--workloads", default="small,bulk,h3-small,h3-bulk",
                   help="comma-separated: small, bulk, h3-small, h3-bulk")
    p.add_argument("--quick", action="store_true", help="one short round (a smoke test)")
    args = p.parse_args()
    workloads = [w for w in args.workloads.split(",") if w]
    for w in workloads:
        if w not in BASELINE:
            p.error(f"unknown workload {w!r} (small, bulk, h3-small, h3-bulk)")
    if args.quick:
        args.rounds, args.secs, args.bulk_mib = 1, 1.0, 16
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if not pin:
        log("note: no pinning (taskset missing or fewer than 2 CPUs)")
    OUT.mkdir(parents=True, exist_ok=True)
    cert, key = OUT / "cert.pem", OUT / "key.pem"
    make_cert = [str(RELEASE / "examples" / "quic_load"), "make-cert", "--dir", str(OUT)]
    log("$ " + " ".join(make_cert))
    subprocess.run(make_cert, check=True)
    root = OUT / "root"
    root.mkdir(exist_ok=True)
    (root / "small.bin").write_bytes(os.urandom(args.size))
    bulk = root / "bulk.bin"
    if not bulk.exists() or bulk.stat().st_size != args.bulk_mib << 20:
        with open(bulk, "wb") as f:
            for _ in range(args.bulk_mib):
                f.write(os.urandom(1 << 20))
    table = servers(args, pin, cert, key, root)
    rounds = []
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}")
        row = {}
        ratios = {}
        for workload in workloads:
            base = BASELINE[workload]
            # Alternate which server goes first, round by round.
            order = ["udpring", base] if r % 2 == 0 else [base, "udpring"]
            for name in order:
                make_cmd, ready = table[name]
                row[(name, workload)] = measure(args, pin, name, make_cmd, ready, cert, workload)
            u, b = row[("udpring", workload)], row[(base, workload)]
            if "requests" in u:
                ratios[f"{workload}_req_per_s"] = u["req_per_s"] / max(b["req_per_s"], 1e-9)
                ratios[f"{workload}_req_per_server_cpu_s"] = (
                    u["req_per_cpu_s"] / max(b["req_per_cpu_s"], 1e-9))
                ratios[f"{workload}_cpu_per_request"] = (
                    u["cpu_us_per_request"] / max(b["cpu_us_per_request"], 1e-9))
            else:
                ratios[f"{workload}_mbit_per_s"] = u["mbit_per_s"] / max(b["mbit_per_s"], 1e-9)
                ratios[f"{workload}_server_cpu"] = u["server_cpu_s"] / max(b["server_cpu_s"], 1e-9)
                ratios[f"{workload}_mbit_per_cpu_s"] = (
                    u["mbit_per_cpu_s"] / max(b["mbit_per_cpu_s"], 1e-9))
        print(f"round {r + 1}: udpring / baseline (quinn for small and bulk, h3 for h3-*): " +
              ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()), flush=True)
        rounds.append({"ratios": ratios,
                       "runs": [dict(v) for v in row.values()]})
    medians = {k: statistics.median(r["ratios"][k] for r in rounds) for k in rounds[0]["ratios"]}
    print("medians, udpring / baseline, per-round ratios (goals, server CPU counted: "
          "small req/s per server CPU-second >= 2 against quinn; h3-small req/s per server "
          "CPU-second >= 2 against h3 + h3-quinn; bulk throughput >= 1.5 at server CPU <= 0.7):")
    for k, v in medians.items():
        print(f"  {k}: {v:.2f}")
    print("command: " + " ".join([sys.argv[0], *sys.argv[1:]]))
    (OUT.parent / "quic.json").write_text(json.dumps(
        {"args": vars(args), "pinned": pin, "rounds": rounds, "medians": medians}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
