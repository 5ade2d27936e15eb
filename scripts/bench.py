#!/usr/bin/env python3
"""UDP echo benchmark: udpring vs. baseline servers (Python 3.11, stdlib only).

Run by `make bench` after `cargo build --release --examples --bins`. Builds nothing itself.

Every server gets identical generator settings (sockperf-format requests; echo servers echo
them back). Servers are pinned to CPU 0, the generator to CPU 1. Rounds are interleaved
(A B C D E, A B C D E, ...) and each figure is the median over rounds; every figure is also
given as a ratio to the recvmmsg baseline of the same run.

Outputs: target/bench/results.md, results.json, throughput.svg, latency.svg, and a dated
section appended to kernel-notes/benchmarks.md.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import platform
import re
import shlex
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BASELINES = ("recvfrom", "recvmmsg", "tokio")
# udpring-batch and udpring-poll are udpring with its opt-in --batch-wait (fewer wake-ups, more
# latency) and --busy-poll (no sleeps after bursts, a busy core); separate rows so the default
# configuration is never flattered by them.
# `--udpring-before PATH` adds the row udpring-before: the default configuration from another
# build, for before/after comparisons inside one run.
BEFORE = "udpring-before"
ALL_SERVERS = ("udpring", BEFORE, "udpring-batch", "udpring-poll", "recvfrom", "recvmmsg", "tokio", "sockperf")
REFERENCE = "recvmmsg"
CLK_TCK = os.sysconf("SC_CLK_TCK")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


def taskset(cpu: int, cmd: list[str], pin: bool) -> list[str]:
    return ["taskset", "-c", str(cpu), *cmd] if pin else cmd


def free_port() -> int:
    """A port that was free a moment ago (fresh for every server start)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu_ticks(pid: int) -> int | None:
    """utime + stime (fields 14 and 15 of /proc/PID/stat) in clock ticks."""
    try:
        data = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may contain spaces; fields after it start at ')'.
    rest = data[data.rindex(")") + 2 :].split()
    # rest[0] is field 3, so field N is rest[N - 3].
    return int(rest[14 - 3]) + int(rest[15 - 3])


def probe(port: int, proc: subprocess.Popen, deadline_s: float = 5.0) -> str | None:
    """Sends sockperf-format requests until one is answered. Returns None or an error."""
    msg = struct.pack(">QHI", 1, 3, 64) + b"\0" * 50
    end = time.monotonic() + deadline_s
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(0.1)
        # Unconnected: a port-per-client server answers from a new port.
        while time.monotonic() < end:
            if proc.poll() is not None:
                return f"exited with status {proc.returncode} before answering"
            try:
                s.sendto(msg, ("127.0.0.1", port))
                reply = s.recv(2048)
                if len(reply) >= 8 and reply[:8] == msg[:8]:
                    return None
            except (TimeoutError, socket.timeout, ConnectionRefusedError):
                pass
    return f"no answer to a probe within {deadline_s:.0f} s"


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM by PID, SIGKILL after 2 s."""
    if proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=2)
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=5)
    except ProcessLookupError:
        pass


# --------------------------------------------------------------------------- configuration


def server_commands(args, pin: bool) -> dict[str, object]:
    """name -> function(port) -> argv, or a string explaining why the server is skipped."""
    out: dict[str, object] = {}
    udpring = Path(args.udpring)
    if udpring.is_file() and os.access(udpring, os.X_OK):
        base = [str(udpring), "serve", "--workers", "1", "--app", "sockperf", "--stats-interval", "0"]
        out["udpring"] = lambda p: taskset(0, [*base, "--bind", f"127.0.0.1:{p}"], pin)
        out["udpring-batch"] = lambda p: taskset(
            0, [*base, "--bind", f"127.0.0.1:{p}", "--batch-wait", "20us"], pin
        )
        # Opt-in busy polling: keeps the server core busy after bursts; its own row.
        out["udpring-poll"] = lambda p: taskset(
            0, [*base, "--bind", f"127.0.0.1:{p}", "--busy-poll", "50us"], pin
        )
    else:
        out["udpring"] = f"skipped: {udpring} not found (build it first)"
        out["udpring-batch"] = out["udpring"]
        out["udpring-poll"] = out["udpring"]
    if args.udpring_before:
        before = [args.udpring_before, "serve", "--workers", "1", "--app", "sockperf", "--stats-interval", "0"]
        out[BEFORE] = lambda p: taskset(0, [*before, "--bind", f"127.0.0.1:{p}"], pin)
    else:
        out[BEFORE] = "skipped: no --udpring-before"
    for name in BASELINES:
        exe = Path(args.examples) / f"baseline_{name}"
        if exe.is_file():
            out[name] = (lambda e: lambda p: taskset(0, [str(e), "--bind", f"127.0.0.1:{p}"], pin))(exe)
        else:
            out[name] = f"skipped: {exe} not found"
    sp = shutil.which("sockperf")
    if sp:
        out["sockperf"] = lambda p: taskset(0, [sp, "server", "-i", "127.0.0.1", "-p", str(p)], pin)
    else:
        out["sockperf"] = "skipped: sockperf not on PATH"
    return {k: out[k] for k in ALL_SERVERS if k in args.servers}


def points(args) -> list[dict]:
    """The measurement matrix: saturation and fixed-rate latency for each payload size."""
    pts = []
    for size in args.sizes:
        pts.append({"kind": "sat", "size": size, "flags": ["--clients", "64", "--window", "8"]})
        pts.append(
            {"kind": "lat", "size": size, "flags": ["--clients", "64", "--rate", str(args.rate)]}
        )
    return pts


def gen_command(args, pin: bool, port: int | str, pt: dict) -> list[str]:
    secs = args.sat_secs if pt["kind"] == "sat" else args.lat_secs
    cmd = [
        args.load_bin, "load", "--target", f"127.0.0.1:{port}", "--proto", "sockperf",
        "--size", str(pt["size"]), *pt["flags"],
        "--duration", f"{secs}s", "--warmup", f"{args.warmup}s", "--json", "--quiet",
    ]
    return taskset(1, cmd, pin)


# --------------------------------------------------------------------------- measurement


def measure(cmd: list[str], server_pid: int, warmup: float, secs: float) -> dict:
    """Runs one generator command and measures the server's CPU over the generator's measured
    interval (from the end of its warm-up to its exit)."""
    gen = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(warmup)
    t0 = proc_cpu_ticks(server_pid)
    try:
        out, err = gen.communicate(timeout=warmup + secs + 30)
    except subprocess.TimeoutExpired:
        os.kill(gen.pid, signal.SIGKILL)
        gen.communicate()
        return {"error": "generator timed out"}
    t1 = proc_cpu_ticks(server_pid)
    line = out.strip().splitlines()[-1] if out.strip() else ""
    try:
        rep = json.loads(line)
    except json.JSONDecodeError:
        return {"error": f"generator failed (rc {gen.returncode}): {err.strip()[-300:]}"}
    res = {
        "throughput": rep["throughput"],
        "p50_us": rep["p50_us"],
        "p99_us": rep["p99_us"],
        "loss_pct": rep["loss_pct"],
        "gen_cpu_pct": rep["cpu_pct"],
        "answered": rep["answered"],
        "retransmitted": rep["retransmitted"],
        "invariant_ok": rep["invariant_ok"],
    }
    if t0 is not None and t1 is not None and rep["answered"] > 0:
        res["server_ns"] = (t1 - t0) / CLK_TCK * 1e9 / rep["answered"]
    return res


def run_point(args, pin: bool, server: subprocess.Popen, port: int, pt: dict) -> dict:
    secs = args.sat_secs if pt["kind"] == "sat" else args.lat_secs
    res = measure(gen_command(args, pin, port, pt), server.pid, args.warmup, secs)
    if "error" not in res and server.poll() is not None:
        res["error"] = f"server exited (status {server.returncode}) during the run"
    return res


def run_all(args) -> tuple[dict, dict, list[str]]:
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    if not pin:
        log("note: no pinning (taskset missing or fewer than 2 CPUs)")
    servers = server_commands(args, pin)
    pts = points(args)
    # results[server][point_key] -> list of per-round dicts; failures[server] -> message
    results: dict[str, dict[str, list[dict]]] = {s: {} for s in servers}
    failures: dict[str, str] = {}
    commands: list[str] = []
    logdir = Path(args.out) / "logs"
    logdir.mkdir(parents=True, exist_ok=True)

    for name, how in servers.items():
        if isinstance(how, str):
            failures[name] = how
            log(f"{name}: {how}")
        else:
            commands.append(f"{name:9} server:    {shlex.join(how('PORT'))}")
    for pt in pts:
        commands.append(f"{pt['kind']}-{pt['size']:<5} generator: {shlex.join(gen_command(args, pin, 'PORT', pt))}")

    for rnd in range(1, args.rounds + 1):
        for name, how in servers.items():
            if name in failures:
                continue
            port = free_port()
            cmd = how(port)
            logf = open(logdir / f"{name}-round{rnd}.log", "w")
            try:
                proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
            except OSError as e:
                failures[name] = f"failed to start: {e}"
                logf.close()
                log(f"{name}: {failures[name]}")
                continue
            try:
                why = probe(port, proc)
                if why:
                    failures[name] = f"failed: {why} (see {logf.name})"
                    log(f"{name}: {failures[name]}")
                    continue
                for pt in pts:
                    key = f"{pt['kind']}-{pt['size']}"
                    r = run_point(args, pin, proc, port, pt)
                    results[name].setdefault(key, []).append(r)
                    if "error" in r:
                        log(f"round {rnd} {name:9} {key:9} ERROR {r['error']}")
                        if proc.poll() is not None:
                            failures[name] = f"failed: {r['error']} (see {logf.name})"
                            break
                    else:
                        log(
                            f"round {rnd} {name:9} {key:9} {r['throughput']:>10.0f}/s "
                            f"p50 {r['p50_us']:>6} µs p99 {r['p99_us']:>7} µs "
                            f"loss {r['loss_pct']:.3f}% srv {r.get('server_ns', float('nan')):>7.0f} ns "
                            f"gen {r['gen_cpu_pct']:.0f}%"
                        )
            finally:
                stop(proc)
                logf.close()
    return results, failures, commands


SESSION_MODES = ("none", "shared", "connected", "port-per-client")


def session_point(args, pin: bool, mode: str, clients: int) -> dict:
    """One udpring server in `mode`, one generator run with `clients` clients; fresh server per
    point so every run starts with an empty session table."""
    port = free_port()
    server_cmd = taskset(
        0,
        [
            args.udpring, "serve", "--bind", f"127.0.0.1:{port}", "--workers", "1",
            "--app", "sockperf", "--stats-interval", "0", "--sessions", mode,
            "--idle-timeout", "60s", "--max-sessions", "100000", "--max-connected", "20000",
        ],
        pin,
    )
    window = "64" if clients == 1 else "1"
    gen = [
        args.load_bin, "load", "--target", f"127.0.0.1:{port}", "--proto", "sockperf", "--size", "64",
        "--clients", str(clients), "--window", window, "--duration", f"{args.session_secs}s",
        "--warmup", f"{args.warmup}s", "--json", "--quiet",
    ]
    if mode == "port-per-client":
        gen.append("--follow-reply-port")
    gen_cmd = taskset(1, gen, pin)
    proc = subprocess.Popen(server_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        why = probe(port, proc)
        if why:
            return {"error": why, "server_cmd": shlex.join(server_cmd), "gen_cmd": shlex.join(gen_cmd)}
        res = measure(gen_cmd, proc.pid, args.warmup, args.session_secs)
        res["server_cmd"] = shlex.join(server_cmd)
        res["gen_cmd"] = shlex.join(gen_cmd)
        return res
    finally:
        stop(proc)


def run_sessions(args) -> dict:
    """results[mode][clients] -> list of per-round dicts, rounds interleaved over modes."""
    pin = shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2
    results: dict = {m: {} for m in args.session_modes}
    for rnd in range(1, args.rounds_sessions + 1):
        for clients in args.session_clients:
            for mode in args.session_modes:
                r = session_point(args, pin, mode, clients)
                results[mode].setdefault(str(clients), []).append(r)
                if "error" in r:
                    log(f"sessions round {rnd} {mode:15} {clients:>6} clients ERROR {r['error']}")
                else:
                    log(
                        f"sessions round {rnd} {mode:15} {clients:>6} clients {r['throughput']:>10.0f}/s "
                        f"p99 {r['p99_us']:>7} µs srv {r.get('server_ns', float('nan')):>7.0f} ns gen {r['gen_cpu_pct']:.0f}%"
                    )
    return results


def sessions_markdown(results: dict, args) -> str:
    lines = [
        f"**Session modes** (udpring, 1 worker, 64-byte sockperf requests, closed loop: 1 client × 64 "
        f"in flight, else N clients × 1 in flight; fresh server per point; median of "
        f"{args.rounds_sessions} rounds, {args.session_secs:g} s each; ratio to `--sessions none` at the same N)",
        "",
        "| mode | clients | answered/s | vs none | server CPU ns/answer | vs none | p99 µs | loss % | generator CPU % |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for clients in args.session_clients:
        base = results.get("none", {}).get(str(clients), [])
        base_thr = median(base, "throughput")
        base_ns = median(base, "server_ns")
        for mode in args.session_modes:
            rows = results.get(mode, {}).get(str(clients), [])
            if not [r for r in rows if "error" not in r]:
                err = next((r["error"] for r in rows if "error" in r), "no data")
                lines.append(f"| {mode} | {clients:,} | failed: {err} | | | | | | |")
                continue
            thr, ns = median(rows, "throughput"), median(rows, "server_ns")
            lines.append(
                f"| {mode} | {clients:,} | {fmt(thr)} | {ratio(thr, base_thr)} | {fmt(ns)} | {ratio(ns, base_ns)} | "
                f"{fmt(median(rows, 'p99_us'))} | {fmt(median(rows, 'loss_pct'), 3)} | {fmt(median(rows, 'gen_cpu_pct'))} |"
            )
    cmds = sorted({r["server_cmd"] for m in results.values() for rows in m.values() for r in rows if "server_cmd" in r})
    gens = sorted({r["gen_cmd"] for m in results.values() for rows in m.values() for r in rows if "gen_cmd" in r})
    lines += ["", "Session-matrix commands (PORT differs per run):", "", "```"]
    lines += [re.sub(r"127\.0\.0\.1:\d+", "127.0.0.1:PORT", c) for c in sorted(set(cmds + gens))]
    lines += ["```", ""]
    # Deduplicate after the port substitution.
    out, seen = [], set()
    for l in lines:
        if l.startswith(("taskset", "/")) and l in seen:
            continue
        seen.add(l)
        out.append(l)
    return "\n".join(out) + "\n"


# --------------------------------------------------------------------------- reporting


def median(rows: list[dict], field: str) -> float | None:
    vals = [r[field] for r in rows if "error" not in r and r.get(field) is not None]
    return statistics.median(vals) if vals else None


def summarize(results: dict, args) -> dict:
    """summary[server][point_key][field] = median over rounds (+ 'spread' for throughput)."""
    fields = ("throughput", "p50_us", "p99_us", "loss_pct", "gen_cpu_pct", "server_ns")
    out: dict = {}
    for srv, per in results.items():
        out[srv] = {}
        for key, rows in per.items():
            s = {f: median(rows, f) for f in fields}
            ok = [r["throughput"] for r in rows if "error" not in r]
            s["rounds"] = len(ok)
            s["spread_pct"] = (max(ok) - min(ok)) * 100 / s["throughput"] if len(ok) > 1 and s["throughput"] else None
            out[srv][key] = s
    return out


def fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "—"
    return f"{v:,.{digits}f}"


def ratio(v: float | None, ref: float | None) -> str:
    if v is None or ref is None or ref == 0:
        return "—"
    return f"{v / ref:.2f}×"


def markdown(summary: dict, failures: dict, args) -> str:
    lines: list[str] = []
    servers = [s for s in ALL_SERVERS if s in args.servers]
    ref = summary.get(REFERENCE, {})
    for size in args.sizes:
        k = f"sat-{size}"
        lines += [
            f"**Saturation, {size}-byte payload** (64 clients × 8 in flight, closed loop; "
            f"median of {args.rounds} rounds, {args.sat_secs:g} s each)",
            "",
            "| server | answered/s | vs recvmmsg | spread | server CPU ns/answer | vs recvmmsg | loss % | generator CPU % |",
            "|---|--:|--:|--:|--:|--:|--:|--:|",
        ]
        r = ref.get(k, {})
        for srv in servers:
            s = summary.get(srv, {}).get(k)
            if not s or s["throughput"] is None:
                lines.append(f"| {srv} | {failures.get(srv, 'no data')} | | | | | | |")
                continue
            lines.append(
                f"| {srv} | {fmt(s['throughput'])} | {ratio(s['throughput'], r.get('throughput'))} | "
                f"{fmt(s['spread_pct'], 1)}% | {fmt(s['server_ns'])} | {ratio(s['server_ns'], r.get('server_ns'))} | "
                f"{fmt(s['loss_pct'], 3)} | {fmt(s['gen_cpu_pct'])} |"
            )
        lines.append("")
        k = f"lat-{size}"
        lines += [
            f"**Latency at {args.rate:,} req/s, {size}-byte payload** (64 clients, open loop, latency "
            f"from the scheduled send time; median of {args.rounds} rounds, {args.lat_secs:g} s each)",
            "",
            "| server | p50 µs | vs recvmmsg | p99 µs | vs recvmmsg | server CPU ns/answer | vs recvmmsg | loss % | generator CPU % |",
            "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
        ]
        r = ref.get(k, {})
        for srv in servers:
            s = summary.get(srv, {}).get(k)
            if not s or s["p50_us"] is None:
                lines.append(f"| {srv} | {failures.get(srv, 'no data')} | | | | | | | |")
                continue
            lines.append(
                f"| {srv} | {fmt(s['p50_us'])} | {ratio(s['p50_us'], r.get('p50_us'))} | "
                f"{fmt(s['p99_us'])} | {ratio(s['p99_us'], r.get('p99_us'))} | "
                f"{fmt(s['server_ns'])} | {ratio(s['server_ns'], r.get('server_ns'))} | "
                f"{fmt(s['loss_pct'], 3)} | {fmt(s['gen_cpu_pct'])} |"
            )
        lines.append("")
    fails = {k: v for k, v in failures.items() if k in servers}
    if fails:
        lines.append("Servers not measured or failed: " + "; ".join(f"{k}: {v}" for k, v in fails.items()))
        lines.append("")
    lines.append(
        "Server CPU = utime+stime of the server process (/proc/PID/stat) over the measured "
        "interval ÷ answered requests. Generator CPU = the generator's own getrusage, % of one "
        "core; near 100% means the generator, not the server, may be the limit. Spread = "
        "(max−min)/median of answered/s across rounds."
    )
    return "\n".join(lines) + "\n"


PALETTE = {
    "udpring": "#d62728",
    "udpring-batch": "#ff9896",
    BEFORE: "#8c564b",
    "udpring-poll": "#ff7f0e",
    "recvfrom": "#7f7f7f",
    "recvmmsg": "#1f77b4",
    "tokio": "#2ca02c",
    "sockperf": "#9467bd",
}


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def svg_bars(
    title: str, unit: str, groups: list[tuple[str, dict[str, float | None]]], servers: list[str], log: bool = False
) -> str:
    """Grouped vertical bar chart. groups = [(group label, {server: value})]; `log` = log10 y axis."""
    w_bar, gap, pad_l, pad_r, pad_t, pad_b, h_plot = 34, 30, 90, 20, 60, 70, 320
    n = len(servers)
    group_w = n * w_bar + gap
    width = pad_l + len(groups) * group_w + pad_r
    width = max(width, 520)
    height = pad_t + h_plot + pad_b
    vals_all = [v for _, g in groups for v in g.values() if v is not None and v > 0]
    vmax = max(vals_all or [1.0])
    if log:
        lo = 10 ** math.floor(math.log10(min(vals_all or [1.0])))
        hi = 10 ** math.ceil(math.log10(vmax * 1.0001))
        hi = max(hi, lo * 10)
        span = math.log10(hi) - math.log10(lo)
        ticks = [lo * 10**i for i in range(round(span) + 1)]

        def y(v: float) -> float:
            v = max(v, lo)
            return pad_t + h_plot - (math.log10(v) - math.log10(lo)) / span * h_plot

        base = lo
    else:
        # Nice axis maximum.
        mag = 10 ** max(0, len(str(int(vmax))) - 1)
        top = next((m * mag for m in (1, 1.2, 1.5, 2, 2.5, 3, 4, 5, 6, 8, 10) if m * mag >= vmax), vmax)
        ticks = [top * i / 5 for i in range(6)]

        def y(v: float) -> float:
            return pad_t + h_plot - (v / top) * h_plot

        base = 0.0
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="{width / 2}" y="22" text-anchor="middle" font-size="15" font-weight="bold">{esc(title)}</text>',
    ]
    for v in ticks:
        yy = y(v)
        out.append(f'<line x1="{pad_l}" y1="{yy:.1f}" x2="{width - pad_r}" y2="{yy:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{pad_l - 6}" y="{yy + 4:.1f}" text-anchor="end">{v:,.0f}</text>')
    out.append(
        f'<text x="16" y="{pad_t + h_plot / 2}" transform="rotate(-90 16 {pad_t + h_plot / 2})" '
        f'text-anchor="middle">{esc(unit)}{" (log scale)" if log else ""}</text>'
    )
    for gi, (label, vals) in enumerate(groups):
        x0 = pad_l + gap / 2 + gi * group_w
        for si, srv in enumerate(servers):
            v = vals.get(srv)
            x = x0 + si * w_bar
            if v is None:
                out.append(f'<text x="{x + w_bar / 2}" y="{y(base) - 4}" text-anchor="middle" fill="#999">n/a</text>')
                continue
            out.append(
                f'<rect x="{x + 2}" y="{y(v):.1f}" width="{w_bar - 4}" height="{y(base) - y(v):.1f}" '
                f'fill="{PALETTE.get(srv, "#444")}"><title>{esc(srv)}: {v:,.0f} {esc(unit)}</title></rect>'
            )
            short = f"{v / 1000:.0f}k" if v >= 10000 else f"{v:,.0f}"
            out.append(f'<text x="{x + w_bar / 2}" y="{y(v) - 4:.1f}" text-anchor="middle" font-size="10">{short}</text>')
        out.append(
            f'<text x="{x0 + n * w_bar / 2}" y="{pad_t + h_plot + 18}" text-anchor="middle">{esc(label)}</text>'
        )
    out.append(f'<line x1="{pad_l}" y1="{y(base)}" x2="{width - pad_r}" y2="{y(base)}" stroke="black"/>')
    lx = pad_l
    for srv in servers:
        ly = height - 24
        out.append(f'<rect x="{lx}" y="{ly - 10}" width="12" height="12" fill="{PALETTE.get(srv, "#444")}"/>')
        out.append(f'<text x="{lx + 16}" y="{ly}">{esc(srv)}</text>')
        lx += 16 + 8 * len(srv) + 18
    out.append("</svg>")
    return "\n".join(out) + "\n"


def charts(summary: dict, args) -> tuple[str, str]:
    servers = [s for s in ALL_SERVERS if s in args.servers]
    get = lambda srv, key, f: summary.get(srv, {}).get(key, {}).get(f)  # noqa: E731
    thr = [(f"{size} B payload", {s: get(s, f"sat-{size}", "throughput") for s in servers}) for size in args.sizes]
    lat = []
    for size in args.sizes:
        lat.append((f"p50, {size} B", {s: get(s, f"lat-{size}", "p50_us") for s in servers}))
        lat.append((f"p99, {size} B", {s: get(s, f"lat-{size}", "p99_us") for s in servers}))
    return (
        svg_bars("Saturation throughput (64 clients × 8 in flight), higher is better", "answered/s", thr, servers),
        svg_bars(f"Latency at {args.rate:,} req/s (open loop), lower is better", "µs", lat, servers, log=True),
    )


def machine_info() -> dict:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"kernel": platform.release(), "nproc": os.cpu_count(), "cpu": model}


def main() -> int:
    tdir = Path(os.environ.get("CARGO_TARGET_DIR", REPO / "target"))
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--udpring", default=str(tdir / "release" / "udpring"), help="udpring binary (server)")
    ap.add_argument(
        "--load-bin",
        default=None,
        help="binary whose `load` subcommand is the generator (default: the --udpring binary)",
    )
    ap.add_argument("--udpring-before", default="", help="another udpring build, run as the row udpring-before (regression checks)")
    ap.add_argument("--examples", default=str(tdir / "release" / "examples"), help="directory of baseline_* examples")
    ap.add_argument("--servers", default=",".join(s for s in ALL_SERVERS if s != BEFORE), help="comma-separated subset of %(default)s")
    ap.add_argument("--sizes", default="64,1200", help="payload sizes in bytes (default %(default)s)")
    ap.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default %(default)s)")
    ap.add_argument("--sat-secs", type=float, default=4.0, help="seconds per saturation point")
    ap.add_argument("--lat-secs", type=float, default=4.0, help="seconds per latency point")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per point (not counted)")
    ap.add_argument("--rate", type=int, default=20000, help="open-loop rate for the latency points")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 s points, 0.3 s warm-up")
    ap.add_argument("--session-modes", default=",".join(SESSION_MODES), help="session modes for the session matrix (empty: skip it)")
    ap.add_argument("--session-clients", default="1,1000,10000", help="client counts for the session matrix")
    ap.add_argument("--session-secs", type=float, default=3.0, help="seconds per session-matrix point")
    ap.add_argument("--rounds-sessions", type=int, default=2, help="rounds of the session matrix")
    ap.add_argument("--out", default=str(tdir / "bench"), help="output directory (default %(default)s)")
    ap.add_argument("--notes", default=str(REPO / "kernel-notes" / "benchmarks.md"), help="notes file to append to")
    ap.add_argument("--no-notes", action="store_true", help="do not append to the notes file")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.sat_secs, args.lat_secs, args.warmup = 1, 1.0, 1.0, 0.3
        args.rounds_sessions, args.session_secs = 1, 1.0
    args.session_modes = [m.strip() for m in args.session_modes.split(",") if m.strip()]
    args.session_clients = [int(c) for c in args.session_clients.split(",") if c.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if args.udpring_before and BEFORE not in args.servers:
        args.servers.insert(1, BEFORE)
    args.sizes = [int(s) for s in args.sizes.split(",")]
    if args.rounds < 1:
        ap.error("--rounds must be at least 1")
    bad = [s for s in args.servers if s not in ALL_SERVERS]
    if bad:
        ap.error(f"unknown servers {bad}; choose from {ALL_SERVERS}")

    if args.load_bin is None:
        args.load_bin = args.udpring
    if not (Path(args.load_bin).is_file() and os.access(args.load_bin, os.X_OK)):
        log(f"error: generator binary {args.load_bin} not found; build with `cargo build --release --bins`")
        return 2
    chk = subprocess.run([args.load_bin, "load", "--help"], capture_output=True, timeout=10)
    if chk.returncode != 0:
        log(f"error: `{args.load_bin} load --help` failed; is `udpring load` wired up? (--load-bin to override)")
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now()
    n_pts = len(args.sizes) * 2
    est = args.rounds * len(args.servers) * (len(args.sizes) * (args.sat_secs + args.lat_secs + 2 * args.warmup))
    est += args.rounds_sessions * len(args.session_modes) * len(args.session_clients) * (args.session_secs + args.warmup + 1)
    log(f"bench: {len(args.servers)} servers × {n_pts} points × {args.rounds} rounds, ~{est / 60:.1f} min")

    results, failures, commands = run_all(args)
    session_results = run_sessions(args) if args.session_modes and "udpring" not in failures else {}
    summary = summarize(results, args)
    table = markdown(summary, failures, args)
    if session_results:
        table += "\n" + sessions_markdown(session_results, args)
    thr_svg, lat_svg = charts(summary, args)
    info = machine_info()
    cmdline = shlex.join([sys.executable, *sys.argv])

    (out / "results.md").write_text(
        f"# udpring benchmark, {started:%Y-%m-%d %H:%M}\n\n"
        f"Kernel {info['kernel']}, {info['nproc']} CPUs, {info['cpu']}. Command: `{cmdline}`\n\n"
        f"{table}\n![throughput](throughput.svg)\n![latency](latency.svg)\n\n"
        "Commands (PORT is a fresh port per server start):\n\n```\n" + "\n".join(commands) + "\n```\n"
    )
    (out / "throughput.svg").write_text(thr_svg)
    (out / "latency.svg").write_text(lat_svg)
    (out / "results.json").write_text(
        json.dumps(
            {"machine": info, "command": cmdline, "rounds": results, "summary": summary,
             "sessions": session_results, "failures": failures},
            indent=1,
        )
    )

    print(table)
    print("Commands used (PORT = fresh port per server start):")
    for c in commands:
        print("  " + c)
    print(f"\nwrote {out / 'results.md'}, {out / 'throughput.svg'}, {out / 'latency.svg'}")

    if not args.no_notes:
        notes = Path(args.notes)
        notes.parent.mkdir(parents=True, exist_ok=True)
        new = not notes.exists()
        with notes.open("a") as f:
            if new:
                f.write("# Benchmark log\n\nAppended by `scripts/bench.py` (`make bench`).\n")
            f.write(
                f"\n## {started:%Y-%m-%d %H:%M}{' (quick smoke run)' if args.quick else ''}\n\n"
                f"- kernel: `{info['kernel']}`, nproc: {info['nproc']}, CPU: {info['cpu']}\n"
                f"- command: `{cmdline}`\n\n{table}\n<details><summary>commands</summary>\n\n```\n"
                + "\n".join(commands)
                + "\n```\n</details>\n"
            )
        print(f"appended to {notes}")
    measured = [s for s in args.servers if s not in failures]
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
