#!/usr/bin/env python3
"""How does udpring scale with workers? (`make bench-scale`; Python 3, stdlib only.)

Plain UDP (sockperf requests, 64 clients x 8 in flight, 64 B) and QUIC echo (64 connections
x 8 concurrent streams, 64 B) at 1, 2, 4, 8 and 16 workers, with and without `--steer cpu`.
The server's workers get cores of their own (0..W-1, `--pin-cpus`); the generators get the
next cores, one single-threaded generator process per core (`udpring load`,
`examples/quic_load`), the clients split between them, their results summed. A point needs
W + G cores, with G = max(1, W / 2) generator cores; a point that does not fit on this
machine is skipped and says so. Server CPU comes from /proc/PID/stat around the run.

Reported per point: answered datagrams (or requests) per second, server CPU per datagram,
and throughput against 1 worker of the same steering in the same run (issue 16's goals at 8
workers: >= 7 x for plain UDP, >= 6 x for QUIC). Rounds interleave the points; medians over
rounds. Every command is printed before it runs. Results: target/bench/scale.md and
scale.json. Run it after `cargo build --release --bins --examples`.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_quic  # noqa: E402  (the QUIC benchmark's helpers: start_server, cpu_seconds)

ROOT = Path(__file__).resolve().parent.parent
RELEASE = ROOT / "target" / "release"
OUT = ROOT / "target" / "bench"


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cpus(first: int, count: int) -> str:
    return f"{first}-{first + count - 1}" if count > 1 else str(first)


def generator_cores(workers: int) -> int:
    return max(1, workers // 2)


def split(total: int, parts: int) -> list:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def server_cmd(kind: str, workers: int, steer: bool, port: int, tls: dict) -> list:
    base = [str(RELEASE / "udpring"), "serve", "--workers", str(workers), "--pin-cpus",
            "--bind", f"127.0.0.1:{port}", "--stats-interval", "0"]
    if steer:
        base += ["--steer", "cpu"]
    if kind == "udp":
        base += ["--app", "sockperf"]
    else:
        base += ["--app", "quic", "--cert", str(tls["cert"]), "--key", str(tls["key"])]
    return ["taskset", "-c", cpus(0, workers), *base]


def generator_cmds(kind: str, args, workers: int, port: int, tls: dict) -> list:
    gens = generator_cores(workers)
    cmds = []
    for i, clients in enumerate(split(args.clients, gens)):
        core = str(workers + i)
        if kind == "udp":
            cmd = [str(RELEASE / "udpring"), "load", "--target", f"127.0.0.1:{port}",
                   "--proto", "sockperf", "--clients", str(clients), "--window", str(args.window),
                   "--size", "64", "--duration", f"{args.secs}s", "--warmup", "1s", "--json",
                   "--quiet"]
        else:
            cmd = [str(RELEASE / "examples" / "quic_load"), "--addr", f"127.0.0.1:{port}",
                   "--cafile", str(tls["cert"]), "small", "--conns", str(clients),
                   "--streams", str(args.window), "--size", "64", "--secs", str(args.secs)]
        cmds.append(["taskset", "-c", core, *cmd])
    return cmds


def point(kind: str, args, workers: int, steer: bool, tls: dict) -> dict:
    port = bench_quic.free_port()
    ready = "udpring listening on "
    server = bench_quic.start_server(server_cmd(kind, workers, steer, port, tls), ready)
    try:
        cmds = generator_cmds(kind, args, workers, port, tls)
        for c in cmds:
            log("$ " + " ".join(c))
        started = time.time()
        procs = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for c in cmds]
        if kind == "udp":
            # `udpring load` counts after its 1 s warm-up: so does the server's CPU.
            time.sleep(1.0)
        before = bench_quic.cpu_seconds(server.pid)
        outs = [p.communicate(timeout=args.secs + 60) for p in procs]
        wall = time.time() - started
        cpu = bench_quic.cpu_seconds(server.pid) - before
    finally:
        bench_quic.stop(server)
    answered = 0
    for p, (out, err) in zip(procs, outs):
        if p.returncode != 0 or not out.strip():
            raise RuntimeError(f"generator failed (rc {p.returncode}): {err.strip()[-300:]}")
        rep = json.loads(out.strip().splitlines()[-1])
        if kind == "udp":
            answered += rep["answered"]
        else:
            if rep["failed"]:
                raise RuntimeError(f"{rep['failed']} QUIC requests failed")
            answered += rep["requests"]
    # The UDP generator counts over --secs after its warm-up, quic_load over --secs from its
    # start (handshakes included); the server's CPU is taken over the same span.
    secs = args.secs
    return {"kind": kind, "workers": workers, "steer": steer, "answered": answered,
            "per_s": answered / secs, "server_cpu_s": cpu, "wall_s": wall,
            "ns_per": cpu * 1e9 / max(answered, 1)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", default="1,2,4,8,16")
    p.add_argument("--kinds", default="udp,quic", help="udp, quic")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--secs", type=float, default=5.0)
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--window", type=int, default=8)
    args = p.parse_args()
    ncpu = len(os.sched_getaffinity(0))
    log(f"command: scripts/bench_scale.py {' '.join(sys.argv[1:])}  ({ncpu} CPUs)")
    for exe in [RELEASE / "udpring", RELEASE / "examples" / "quic_load"]:
        if not exe.is_file():
            log(f"{exe} missing: run `cargo build --release --bins --examples` first")
            return 2
    OUT.mkdir(parents=True, exist_ok=True)
    tls = {"cert": bench_quic.OUT / "cert.pem", "key": bench_quic.OUT / "key.pem"}
    bench_quic.OUT.mkdir(parents=True, exist_ok=True)
    make_cert = [str(RELEASE / "examples" / "quic_load"), "make-cert", "--dir", str(bench_quic.OUT)]
    log("$ " + " ".join(make_cert))
    subprocess.run(make_cert, check=True)
    points, skipped = [], []
    for kind in args.kinds.split(","):
        for w in [int(x) for x in args.workers.split(",")]:
            need = w + generator_cores(w)
            for steer in (False, True):
                if need > ncpu:
                    skipped.append(f"{kind} {w} worker(s){' --steer cpu' if steer else ''}: needs "
                                   f"{need} CPUs ({w} workers + {generator_cores(w)} generator), "
                                   f"this machine has {ncpu}")
                else:
                    points.append((kind, w, steer))
    rows = {pt: [] for pt in points}
    for r in range(args.rounds):
        log(f"round {r + 1}/{args.rounds}")
        for pt in points:
            try:
                res = point(pt[0], args, pt[1], pt[2], tls)
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                log(f"  {pt}: {e}")
                continue
            log(f"  {pt}: {res['per_s']:.0f}/s, {res['ns_per']:.0f} ns server CPU each")
            rows[pt].append(res)
    lines = [f"command: `python3 scripts/bench_scale.py {' '.join(sys.argv[1:])}` on {ncpu} CPUs, "
             f"medians of {args.rounds} rounds", "",
             "| load | workers | steer | answered/s | server ns each | x 1 worker |",
             "|---|--:|---|--:|--:|--:|"]
    med = {}
    for pt, rs in rows.items():
        if rs:
            med[pt] = (statistics.median(x["per_s"] for x in rs),
                       statistics.median(x["ns_per"] for x in rs))
    for pt in points:
        if pt not in med:
            lines.append(f"| {pt[0]} | {pt[1]} | {'cpu' if pt[2] else 'none'} | failed | | |")
            continue
        base = med.get((pt[0], 1, pt[2]))
        ratio = f"{med[pt][0] / base[0]:.2f}" if base else "-"
        lines.append(f"| {pt[0]} | {pt[1]} | {'cpu' if pt[2] else 'none'} | {med[pt][0]:.0f} | "
                     f"{med[pt][1]:.0f} | {ratio} |")
    if skipped:
        lines += ["", "Skipped:"] + [f"- {s}" for s in skipped]
    text = "\n".join(lines) + "\n"
    (OUT / "scale.md").write_text(text)
    (OUT / "scale.json").write_text(json.dumps({str(k): v for k, v in rows.items()}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
