#!/usr/bin/env python3
"""How much server CPU does udpring spend per answered datagram, and how many datagrams does it
answer, against the best loops a user could write instead? (Python 3.11, stdlib only.)

Run by `make bench` after `cargo build --release --bins --examples`. Builds nothing itself.

Servers: udpring (default and opt-in configurations, and optionally another build as
udpring-before), the lean recvmmsg loop (the REFERENCE for every ratio: blocking socket,
recvmmsg(MSG_WAITFORONE) into buffers sized to the run, one sendmmsg per batch), the older
epoll recvmmsg loop (recvmmsg-epoll), quinn-udp (recvmmsg + GRO + GSO + ECN on tokio),
recvfrom (one datagram per epoll wake-up), tokio and sockperf server. Every server gets
identical generator settings (sockperf-format requests; echo servers echo them back).

Load shapes (one table and one SVG each; the key figure is server CPU per answered datagram):
  64x1       64 clients x 1 in flight, 64 B              (headline: --rounds, default 5)
  64x8       64 x 8, 64 B                                 (headline)
  64x8-1200  64 x 8, 1,200 B
  rate20k    open loop, 20,000 req/s over 64 clients: p50/p99 and CPU per datagram
  8x64       8 x 64 (deep pipelines)
  gso16      64 x 16, clients send 16-datagram GSO trains (headline; skipped when
             `udpring load --help` has no --gso)
  sessions   udpring --sessions connected vs none (and the other modes) at 1,000 and
             10,000 clients x 1 in flight
Servers are pinned to CPU 0, the generator to CPU 1. Rounds are interleaved (every server
once per round, A B C ..., A B C ...); other shapes run in the first --rounds-other rounds.
Ratios are taken inside each round against the reference of the same round, then the median
over rounds is reported.

Outputs under target/bench/: results.md (the command first), results.json, one SVG per shape
(shape-KEY.svg, sessions.svg), logs/; a dated section appended to kernel-notes/benchmarks.md
(--no-notes for smoke runs).
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
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
# `--udpring-before PATH` adds the row udpring-before: the default configuration from another
# build, for before/after comparisons inside one run.
BEFORE = "udpring-before"
# udpring-batch and udpring-poll are udpring with its opt-in --batch-wait (fewer wake-ups, more
# latency) and --busy-poll (no sleeps after bursts, a busy core); separate rows so the default
# configuration is never flattered by them.
ALL_SERVERS = (
    "udpring", BEFORE, "udpring-batch", "udpring-poll", "recvmmsg", "recvmmsg-epoll",
    "gro-gso", "quinn-udp", "recvfrom", "tokio", "sockperf",
)
REFERENCE = "recvmmsg"
# row -> (example binary, whether it takes --max-size)
BASELINES = {
    "recvmmsg": ("baseline_recvmmsg", True),
    "recvmmsg-epoll": ("baseline_recvmmsg_epoll", False),
    # The C loop's technique in Rust (issue 17): UDP_GRO receive, per-peer UDP_SEGMENT trains
    # over iovecs into the receive buffers, recvmmsg/sendmmsg, no io_uring.
    "gro-gso": ("baseline_gro_gso", False),
    "quinn-udp": ("baseline_quinn_udp", True),
    "recvfrom": ("baseline_recvfrom", False),
    "tokio": ("baseline_tokio", False),
}
CLK_TCK = os.sysconf("SC_CLK_TCK")


@dataclass(frozen=True)
class Shape:
    key: str
    title: str
    size: int
    flags: tuple[str, ...]
    latency: bool = False  # open loop: p50/p99 are the figures, beside CPU per datagram
    headline: bool = False  # measured in every round (--rounds), not only --rounds-other
    needs: str = ""  # a `udpring load` option the shape needs; skipped without it


def all_shapes(rate: int) -> list[Shape]:
    return [
        Shape("64x1", "64 clients × 1 in flight, 64 B", 64, ("--clients", "64", "--window", "1"), headline=True),
        Shape("64x8", "64 clients × 8 in flight, 64 B", 64, ("--clients", "64", "--window", "8"), headline=True),
        Shape("64x8-1200", "64 clients × 8 in flight, 1,200 B", 1200, ("--clients", "64", "--window", "8")),
        Shape(
            f"rate{rate // 1000}k" if rate % 1000 == 0 else f"rate{rate}",
            f"open loop {rate:,} req/s, 64 clients, 64 B",
            64,
            ("--clients", "64", "--rate", str(rate)),
            latency=True,
        ),
        Shape("8x64", "8 clients × 64 in flight, 64 B", 64, ("--clients", "8", "--window", "64")),
        Shape(
            "gso16",
            "64 clients × 16 in flight sent as 16-datagram GSO trains, 64 B",
            64,
            ("--clients", "64", "--window", "16", "--gso", "16"),
            headline=True,
            needs="--gso",
        ),
    ]


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


def pinning() -> bool:
    return shutil.which("taskset") is not None and (os.cpu_count() or 1) >= 2


# --------------------------------------------------------------------------- configuration


def max_size(shapes: list[Shape]) -> int:
    """Receive buffer size for the baselines that take --max-size: the largest payload the run
    sends, rounded up to a power of two (1,200 -> 2,048)."""
    largest = max([s.size for s in shapes] + [64])
    return 1 << (largest - 1).bit_length()


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
    for name, (example, sized) in BASELINES.items():
        exe = Path(args.examples) / example
        extra = ["--max-size", str(args.max_size)] if sized else []
        if exe.is_file():
            out[name] = (lambda e, x: lambda p: taskset(0, [str(e), "--bind", f"127.0.0.1:{p}", *x], pin))(exe, extra)
        else:
            out[name] = f"skipped: {exe} not found"
    sp = shutil.which("sockperf")
    if sp:
        out["sockperf"] = lambda p: taskset(0, [sp, "server", "-i", "127.0.0.1", "-p", str(p)], pin)
    else:
        out["sockperf"] = "skipped: sockperf not on PATH"
    return {k: out[k] for k in ALL_SERVERS if k in args.servers}


def secs_of(args, shape: Shape) -> float:
    return args.lat_secs if shape.latency else args.sat_secs


def gen_command(args, pin: bool, port: int | str, shape: Shape) -> list[str]:
    cmd = [
        args.load_bin, "load", "--target", f"127.0.0.1:{port}", "--proto", "sockperf",
        "--size", str(shape.size), *shape.flags,
        "--duration", f"{secs_of(args, shape)}s", "--warmup", f"{args.warmup}s", "--json", "--quiet",
    ]
    return taskset(1, cmd, pin)


def rounds_of(args, shape: Shape) -> int:
    return args.rounds if shape.headline else min(args.rounds, args.rounds_other)


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


def describe(r: dict) -> str:
    return (
        f"{r['throughput']:>10.0f}/s srv {r.get('server_ns', float('nan')):>7.0f} ns "
        f"p50 {r['p50_us']:>6} µs p99 {r['p99_us']:>7} µs loss {r['loss_pct']:.3f}% "
        f"answered {r['answered']:,} gen {r['gen_cpu_pct']:.0f}%"
        + ("" if r.get("invariant_ok", True) else " INVARIANT BROKEN")
    )


def run_all(args, shapes: list[Shape]) -> tuple[dict, dict, list[str]]:
    """results[server][shape key] -> per-round dicts (each with its "round")."""
    pin = pinning()
    if not pin:
        log("note: no pinning (taskset missing or fewer than 2 CPUs)")
    servers = server_commands(args, pin)
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
            commands.append(f"{name:14} server:    {shlex.join(how('PORT'))}")
    for sh in shapes:
        commands.append(f"{sh.key:14} generator: {shlex.join(gen_command(args, pin, 'PORT', sh))}")

    for rnd in range(1, args.rounds + 1):
        todo = [sh for sh in shapes if rnd <= rounds_of(args, sh)]
        for name, how in servers.items():
            if name in failures:
                continue
            port = free_port()
            logf = open(logdir / f"{name}-round{rnd}.log", "w")
            try:
                proc = subprocess.Popen(how(port), stdout=logf, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
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
                for sh in todo:
                    r = measure(gen_command(args, pin, port, sh), proc.pid, args.warmup, secs_of(args, sh))
                    if "error" not in r and proc.poll() is not None:
                        r["error"] = f"server exited (status {proc.returncode}) during the run"
                    r["round"] = rnd
                    results[name].setdefault(sh.key, []).append(r)
                    if "error" in r:
                        log(f"round {rnd} {name:14} {sh.key:9} ERROR {r['error']}")
                        if proc.poll() is not None:
                            failures[name] = f"failed: {r['error']} (see {logf.name})"
                            break
                    else:
                        log(f"round {rnd} {name:14} {sh.key:9} {describe(r)}")
            finally:
                stop(proc)
                logf.close()
    return results, failures, commands


SESSION_MODES = ("none", "connected", "shared", "port-per-client")


def session_commands(args, pin: bool, mode: str, clients: int, port: int | str) -> tuple[list[str], list[str]]:
    server = taskset(
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
    return server, taskset(1, gen, pin)


def session_point(args, pin: bool, mode: str, clients: int) -> dict:
    """One udpring server in `mode`, one generator run with `clients` clients; fresh server per
    point so every run starts with an empty session table."""
    port = free_port()
    server_cmd, gen_cmd = session_commands(args, pin, mode, clients, port)
    proc = subprocess.Popen(server_cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    try:
        why = probe(port, proc)
        if why:
            return {"error": why}
        return measure(gen_cmd, proc.pid, args.warmup, args.session_secs)
    finally:
        stop(proc)


def run_sessions(args) -> dict:
    """results[mode][clients] -> per-round dicts, rounds interleaved over modes."""
    pin = pinning()
    results: dict = {m: {} for m in args.session_modes}
    for rnd in range(1, args.rounds_sessions + 1):
        for clients in args.session_clients:
            for mode in args.session_modes:
                r = session_point(args, pin, mode, clients)
                r["round"] = rnd
                results[mode].setdefault(str(clients), []).append(r)
                if "error" in r:
                    log(f"sessions round {rnd} {mode:15} {clients:>6} clients ERROR {r['error']}")
                else:
                    log(f"sessions round {rnd} {mode:15} {clients:>6} clients {describe(r)}")
    return results


# --------------------------------------------------------------------------- summary

FIELDS = ("throughput", "server_ns", "p50_us", "p99_us", "loss_pct", "gen_cpu_pct")


def ok_rows(rows: list[dict]) -> list[dict]:
    return [r for r in rows if "error" not in r]


def median(rows: list[dict], field: str) -> float | None:
    vals = [r[field] for r in ok_rows(rows) if r.get(field) is not None]
    return statistics.median(vals) if vals else None


def round_ratio(rows: list[dict], ref_rows: list[dict], field: str) -> float | None:
    """Median over rounds of (value ÷ the reference's value in the same round)."""
    ref = {r["round"]: r.get(field) for r in ok_rows(ref_rows)}
    vals = [
        r[field] / ref[r["round"]]
        for r in ok_rows(rows)
        if r.get(field) is not None and ref.get(r["round"])
    ]
    return statistics.median(vals) if vals else None


def summarize(results: dict, reference: str) -> dict:
    """summary[row][shape key] = medians over rounds, per-round ratios to `reference` (ratio_*),
    the number of rounds and the spread of answered/s."""
    out: dict = {}
    for row, per in results.items():
        out[row] = {}
        for key, rows in per.items():
            ref_rows = results.get(reference, {}).get(key, [])
            s = {f: median(rows, f) for f in FIELDS}
            for f in ("throughput", "server_ns", "p50_us", "p99_us"):
                s["ratio_" + f] = round_ratio(rows, ref_rows, f)
            ok = [r["throughput"] for r in ok_rows(rows)]
            s["rounds"] = len(ok)
            s["spread_pct"] = (max(ok) - min(ok)) * 100 / s["throughput"] if len(ok) > 1 and s["throughput"] else None
            s["invariant_ok"] = all(r.get("invariant_ok", True) for r in ok_rows(rows))
            out[row][key] = s
    return out


# --------------------------------------------------------------------------- tables


def fmt(v: float | None, digits: int = 0) -> str:
    if v is None:
        return "—"
    return f"{v:,.{digits}f}"


def fmt_ratio(v: float | None) -> str:
    return "—" if v is None else f"{v:.2f}×"


def shape_markdown(sh: Shape, summary: dict, servers: list[str], failures: dict, skipped: str, args) -> str:
    n = rounds_of(args, sh)
    head = (
        f"**{sh.title}** (`{' '.join(sh.flags)}`; {'open loop, latency from the scheduled send time' if sh.latency else 'closed loop'}; "
        f"median of {n} round{'s' if n != 1 else ''}, {secs_of(args, sh):g} s each; ratios: median of per-round ratios to `{REFERENCE}`)"
    )
    if skipped:
        return f"{head}\n\n{skipped}\n"
    if sh.latency:
        cols = "| server | server CPU ns/answer | vs recvmmsg | p50 µs | vs recvmmsg | p99 µs | vs recvmmsg | loss % | generator CPU % |"
    else:
        cols = "| server | server CPU ns/answer | vs recvmmsg | answered/s | vs recvmmsg | spread | loss % | generator CPU % |"
    lines = [head, "", cols, "|---|" + "--:|" * (cols.count("|") - 2)]
    for srv in servers:
        s = summary.get(srv, {}).get(sh.key)
        name = f"**{srv}** (reference)" if srv == REFERENCE else srv
        if not s or s["throughput"] is None:
            lines.append(f"| {name} | {failures.get(srv, 'no data')} |" + " |" * (cols.count("|") - 3))
            continue
        warn = "" if s["invariant_ok"] else " (generator invariant broken)"
        ns = f"{fmt(s['server_ns'])} | {fmt_ratio(s['ratio_server_ns'])}"
        tail = f"{fmt(s['loss_pct'], 3)} | {fmt(s['gen_cpu_pct'])}{warn} |"
        if sh.latency:
            lines.append(
                f"| {name} | {ns} | {fmt(s['p50_us'])} | {fmt_ratio(s['ratio_p50_us'])} | "
                f"{fmt(s['p99_us'])} | {fmt_ratio(s['ratio_p99_us'])} | {tail}"
            )
        else:
            lines.append(
                f"| {name} | {ns} | {fmt(s['throughput'])} | {fmt_ratio(s['ratio_throughput'])} | "
                f"{fmt(s['spread_pct'], 1) + '%' if s['spread_pct'] is not None else '—'} | {tail}"
            )
    return "\n".join(lines) + "\n"


def sessions_markdown(summary: dict, args) -> str:
    lines = [
        f"**Session modes** (udpring, 1 worker, 64-byte sockperf requests, closed loop: N clients × 1 "
        f"in flight (1 client: × 64); fresh server per point; median of {args.rounds_sessions} "
        f"round{'s' if args.rounds_sessions != 1 else ''}, {args.session_secs:g} s each; ratios: median of per-round ratios to "
        "`--sessions none` at the same N)",
        "",
        "| mode | clients | server CPU ns/answer | vs none | answered/s | vs none | p99 µs | loss % | generator CPU % |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for clients in args.session_clients:
        for mode in args.session_modes:
            s = summary.get(mode, {}).get(str(clients))
            if not s or s["throughput"] is None:
                lines.append(f"| {mode} | {clients:,} | failed | | | | | | |")
                continue
            lines.append(
                f"| {mode} | {clients:,} | {fmt(s['server_ns'])} | {fmt_ratio(s['ratio_server_ns'])} | "
                f"{fmt(s['throughput'])} | {fmt_ratio(s['ratio_throughput'])} | {fmt(s['p99_us'])} | "
                f"{fmt(s['loss_pct'], 3)} | {fmt(s['gen_cpu_pct'])} |"
            )
    return "\n".join(lines) + "\n"


def session_command_lines(args) -> list[str]:
    pin = pinning()
    out = []
    for clients in args.session_clients:
        for mode in args.session_modes:
            srv, gen = session_commands(args, pin, mode, clients, "PORT")
            out.append(f"sessions {mode}, {clients} clients: server:    {shlex.join(srv)}")
            out.append(f"sessions {mode}, {clients} clients: generator: {shlex.join(gen)}")
    return out


# --------------------------------------------------------------------------- charts

PALETTE = {
    "udpring": "#d62728",
    BEFORE: "#8c564b",
    "udpring-batch": "#ff9896",
    "udpring-poll": "#ff7f0e",
    "recvmmsg": "#1f77b4",
    "recvmmsg-epoll": "#aec7e8",
    "quinn-udp": "#17becf",
    "recvfrom": "#7f7f7f",
    "tokio": "#2ca02c",
    "sockperf": "#9467bd",
    "none": "#1f77b4",
    "connected": "#d62728",
    "shared": "#2ca02c",
    "port-per-client": "#ff7f0e",
}


def esc(s: str) -> str:
    return s.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def compact(v: float) -> str:
    if v >= 1e6:
        return f"{v / 1e6:.2f}M"
    if v >= 1e4:
        return f"{v / 1e3:.0f}k"
    return f"{v:,.0f}"


@dataclass
class Panel:
    title: str
    values: dict[str, float | None]
    ratios: dict[str, float | None]


def svg_panels(title: str, subtitle: str, rows: list[str], panels: list[Panel], reference: str, note: str = "") -> str:
    """Horizontal bar chart: one row per server (its name is the row label, so no legend is
    needed whatever the number of rows), one panel per figure, each bar labelled with its
    value and its ratio to the reference row."""
    # Row labels are right-aligned in a column as wide as the longest (about 7 px a character).
    label_w = max(130, 7 * max([len(r) for r in rows] + [0]) + 20)
    panel_w, gap, row_h, top, bottom = 290, 24, 22, 78, 34
    text_w = 100  # room right of the longest bar for "123k (1.00×)"
    width = label_w + len(panels) * panel_w + (len(panels) - 1) * gap + 16
    height = top + len(rows) * row_h + bottom
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-family="sans-serif" font-size="12">',
        f'<rect width="{width}" height="{height}" fill="white"/>',
        f'<text x="8" y="20" font-size="15" font-weight="bold">{esc(title)}</text>',
        f'<text x="8" y="38" fill="#444">{esc(subtitle)}</text>',
    ]
    for ri, row in enumerate(rows):
        y = top + ri * row_h
        weight = ' font-weight="bold"' if row == reference else ""
        if ri % 2 == 0:
            out.append(f'<rect x="0" y="{y}" width="{width}" height="{row_h}" fill="#f4f4f4"/>')
        out.append(f'<text x="{label_w - 8}" y="{y + 15}" text-anchor="end"{weight}>{esc(row)}</text>')
    for pi, p in enumerate(panels):
        x0 = label_w + pi * (panel_w + gap)
        vals = [v for v in p.values.values() if v is not None and v > 0]
        vmax = max(vals) if vals else 1.0
        bar_max = panel_w - text_w
        out.append(f'<text x="{x0}" y="{top - 10}" font-weight="bold">{esc(p.title)}</text>')
        out.append(
            f'<line x1="{x0}" y1="{top - 4}" x2="{x0}" y2="{top + len(rows) * row_h}" stroke="#888"/>'
        )
        for ri, row in enumerate(rows):
            y = top + ri * row_h
            v = p.values.get(row)
            if v is None:
                out.append(f'<text x="{x0 + 6}" y="{y + 15}" fill="#999">n/a</text>')
                continue
            w = max(1.0, bar_max * v / vmax)
            r = p.ratios.get(row)
            label = compact(v) + (f" ({r:.2f}×)" if r is not None else "")
            out.append(
                f'<rect x="{x0}" y="{y + 4}" width="{w:.1f}" height="{row_h - 8}" fill="{PALETTE.get(row, "#444")}">'
                f"<title>{esc(row)}: {v:,.1f}</title></rect>"
            )
            out.append(f'<text x="{x0 + w + 4:.1f}" y="{y + 15}" font-size="11">{esc(label)}</text>')
    out.append(
        f'<text x="8" y="{height - 12}" fill="#444" font-size="11">'
        f"{esc(note or f'(×) = median over rounds of the ratio to {reference} in the same round')}</text>"
    )
    out.append("</svg>")
    return "\n".join(out) + "\n"


def shape_svg(sh: Shape, summary: dict, servers: list[str], args) -> str:
    get = lambda srv, f: summary.get(srv, {}).get(sh.key, {}).get(f)  # noqa: E731
    rows = [s for s in servers if get(s, "throughput") is not None]

    def panel(title: str, field: str) -> Panel:
        return Panel(title, {s: get(s, field) for s in rows}, {s: get(s, "ratio_" + field) for s in rows})

    panels = [panel("server CPU ns per answer (lower is better)", "server_ns")]
    if sh.latency:
        panels += [panel("p50 µs (lower is better)", "p50_us"), panel("p99 µs (lower is better)", "p99_us")]
    else:
        panels.append(panel("answered/s (higher is better)", "throughput"))
    n = rounds_of(args, sh)
    sub = f"udpring load {' '.join(sh.flags)} --size {sh.size}; server on CPU 0, generator on CPU 1; median of {n} round{'s' if n != 1 else ''}"
    return svg_panels(sh.title, sub, rows, panels, REFERENCE)


def sessions_svg(summary: dict, args) -> str:
    rows, stats = [], {}
    for clients in args.session_clients:
        for mode in args.session_modes:
            s = summary.get(mode, {}).get(str(clients))
            if not s or s["throughput"] is None:
                continue
            row = f"{mode} {clients:,}"
            rows.append(row)
            stats[row] = s
            PALETTE.setdefault(row, PALETTE.get(mode, "#444"))

    def panel(title: str, field: str) -> Panel:
        return Panel(title, {r: stats[r][field] for r in rows}, {r: stats[r]["ratio_" + field] for r in rows})

    panels = [
        panel("server CPU ns per answer (lower is better)", "server_ns"),
        panel("answered/s (higher is better)", "throughput"),
    ]
    return svg_panels(
        "udpring session modes, N clients × 1 in flight" + (" (1 client: × 64)" if 1 in args.session_clients else "") + ", 64 B",
        f"udpring serve --sessions MODE; row = mode and N; server on CPU 0, generator on CPU 1; "
        f"median of {args.rounds_sessions} round{'s' if args.rounds_sessions != 1 else ''}",
        rows,
        panels,
        "",
        note="(×) = median over rounds of the ratio to --sessions none at the same N in the same round",
    )


# --------------------------------------------------------------------------- main


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


def estimate_s(args, shapes: list[Shape]) -> float:
    per_server = sum(rounds_of(args, sh) * (secs_of(args, sh) + args.warmup + 0.4) for sh in shapes)
    total = len(args.servers) * (per_server + args.rounds * 0.5)
    total += args.rounds_sessions * len(args.session_modes) * len(args.session_clients) * (args.session_secs + args.warmup + 1.5)
    return total


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
    ap.add_argument("--shapes", default="", help="comma-separated subset of the shape keys (default: all; see above)")
    ap.add_argument("--sizes", default="", help="only the shapes with these payload sizes, e.g. 64 (default: all)")
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the headline shapes (default %(default)s)")
    ap.add_argument("--rounds-other", type=int, default=3, help="rounds of the other shapes (default %(default)s)")
    ap.add_argument("--sat-secs", type=float, default=3.0, help="measured seconds per closed-loop point")
    ap.add_argument("--lat-secs", type=float, default=3.0, help="measured seconds per open-loop point")
    ap.add_argument("--warmup", type=float, default=1.0, help="warm-up seconds per point (not counted)")
    ap.add_argument("--rate", type=int, default=20000, help="rate of the open-loop shape (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 1 round, 1 s points, 0.3 s warm-up")
    ap.add_argument("--session-modes", default=",".join(SESSION_MODES), help="session modes (empty: skip the session matrix)")
    ap.add_argument("--session-clients", default="1000,10000", help="client counts of the session matrix (default %(default)s)")
    ap.add_argument("--session-secs", type=float, default=3.0, help="seconds per session-matrix point")
    ap.add_argument("--rounds-sessions", type=int, default=3, help="rounds of the session matrix (default %(default)s)")
    ap.add_argument("--out", default=str(tdir / "bench"), help="output directory (default %(default)s)")
    ap.add_argument("--notes", default=str(REPO / "kernel-notes" / "benchmarks.md"), help="notes file to append to")
    ap.add_argument("--no-notes", action="store_true", help="do not append to the notes file")
    args = ap.parse_args()
    if args.quick:
        args.rounds, args.rounds_other, args.sat_secs, args.lat_secs, args.warmup = 1, 1, 1.0, 1.0, 0.3
        args.rounds_sessions, args.session_secs = 1, 1.0
    args.session_modes = [m.strip() for m in args.session_modes.split(",") if m.strip()]
    args.session_clients = [int(c) for c in args.session_clients.split(",") if c.strip()]
    args.servers = [s.strip() for s in args.servers.split(",") if s.strip()]
    if args.udpring_before and BEFORE not in args.servers:
        args.servers.insert(1, BEFORE)
    if args.rounds < 1 or args.rounds_other < 1:
        ap.error("--rounds and --rounds-other must be at least 1")
    bad = [s for s in args.servers if s not in ALL_SERVERS]
    if bad:
        ap.error(f"unknown servers {bad}; choose from {ALL_SERVERS}")
    bad = [m for m in args.session_modes if m not in SESSION_MODES]
    if bad:
        ap.error(f"unknown session modes {bad}; choose from {SESSION_MODES}")
    shapes = all_shapes(args.rate)
    if args.shapes:
        want = [k.strip() for k in args.shapes.split(",") if k.strip()]
        bad = [k for k in want if k not in {sh.key for sh in shapes}]
        if bad:
            ap.error(f"unknown shapes {bad}; choose from {[sh.key for sh in shapes]}")
        shapes = [sh for sh in shapes if sh.key in want]
    if args.sizes:
        sizes = {int(s) for s in args.sizes.split(",") if s.strip()}
        shapes = [sh for sh in shapes if sh.size in sizes]
    # The session matrix needs the `none` mode as its reference.
    if args.session_modes and "none" not in args.session_modes:
        args.session_modes.insert(0, "none")

    if args.load_bin is None:
        args.load_bin = args.udpring
    if not (Path(args.load_bin).is_file() and os.access(args.load_bin, os.X_OK)):
        log(f"error: generator binary {args.load_bin} not found; build with `cargo build --release --bins`")
        return 2
    chk = subprocess.run([args.load_bin, "load", "--help"], capture_output=True, text=True, timeout=10)
    if chk.returncode != 0:
        log(f"error: `{args.load_bin} load --help` failed; is `udpring load` wired up? (--load-bin to override)")
        return 2
    skipped = {
        sh.key: f"Skipped: `{args.load_bin} load --help` lists no `{sh.needs}` (build a generator that has it)."
        for sh in shapes
        if sh.needs and not re.search(rf"(^|\s){re.escape(sh.needs)}\b", chk.stdout)
    }
    for key, why in skipped.items():
        log(f"{key}: {why}")
    run_shapes = [sh for sh in shapes if sh.key not in skipped]
    args.max_size = max_size(run_shapes)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now()
    cmdline = shlex.join([sys.executable, *sys.argv])
    log(f"Command: {cmdline}")
    log(
        f"bench: {len(args.servers)} servers × {len(run_shapes)} shapes (rounds: {args.rounds} of the headline "
        f"shapes, {min(args.rounds, args.rounds_other)} of the others)"
        f"{' + session matrix' if args.session_modes and args.session_clients else ''}, "
        f"~{estimate_s(args, run_shapes) / 60:.1f} min"
    )

    results, failures, commands = run_all(args, run_shapes) if run_shapes else ({}, {}, [])
    want_sessions = args.session_modes and args.session_clients
    session_results = run_sessions(args) if want_sessions and "udpring" not in failures else {}
    summary = summarize(results, REFERENCE)
    # Keyed by client count, so each mode is compared with `none` at the same N.
    session_summary = summarize(session_results, "none") if session_results else {}
    servers = [s for s in ALL_SERVERS if s in args.servers]

    sections, svgs = [], {}
    for sh in shapes:
        sections.append(shape_markdown(sh, summary, servers, failures, skipped.get(sh.key, ""), args))
        if sh.key not in skipped:
            svgs[f"shape-{sh.key}.svg"] = shape_svg(sh, summary, servers, args)
    if session_summary:
        sections.append(sessions_markdown(session_summary, args))
        svgs["sessions.svg"] = sessions_svg(session_summary, args)
    fails = {k: v for k, v in failures.items() if k in servers}
    if fails:
        sections.append("Servers not measured or failed: " + "; ".join(f"{k}: {v}" for k, v in fails.items()) + "\n")
    sections.append(
        "Server CPU = utime+stime of the server process (/proc/PID/stat) over the measured "
        "interval ÷ answered requests: the figure to trust, since one generator core is roughly "
        "matched to one server core. Generator CPU = the generator's own getrusage, % of one core; "
        "near 100% means the generator, not the server, may be the limit. Spread = "
        "(max−min)/median of answered/s across rounds.\n"
    )
    table = "\n".join(sections)
    if session_results:
        commands += session_command_lines(args)
    info = machine_info()

    pictures = "\n".join(f"![{name}]({name})" for name in svgs)
    (out / "results.md").write_text(
        f"# udpring benchmark, {started:%Y-%m-%d %H:%M}\n\n"
        f"Command: `{cmdline}`\n\nKernel {info['kernel']}, {info['nproc']} CPUs, {info['cpu']}.\n\n"
        f"{table}\n{pictures}\n\n"
        "Commands (PORT is a fresh port per server start):\n\n```\n" + "\n".join(commands) + "\n```\n"
    )
    for name, text in svgs.items():
        (out / name).write_text(text)
    (out / "results.json").write_text(
        json.dumps(
            {"machine": info, "command": cmdline, "rounds": results, "summary": summary,
             "sessions": session_results, "session_summary": session_summary,
             "skipped": skipped, "failures": failures},
            indent=1,
        )
    )

    print(f"Command: {cmdline}\n")
    print(table)
    print("Commands used (PORT = fresh port per server start):")
    for c in commands:
        print("  " + c)
    print(f"\nwrote {out / 'results.md'}, " + ", ".join(str(out / n) for n in svgs))

    if not args.no_notes:
        notes = Path(args.notes)
        notes.parent.mkdir(parents=True, exist_ok=True)
        new = not notes.exists()
        with notes.open("a") as f:
            if new:
                f.write("# Benchmark log\n\nAppended by `scripts/bench.py` (`make bench`).\n")
            f.write(
                f"\n## {started:%Y-%m-%d %H:%M}{' (quick smoke run)' if args.quick else ''}\n\n"
                f"- command: `{cmdline}`\n- kernel: `{info['kernel']}`, nproc: {info['nproc']}, CPU: {info['cpu']}\n\n"
                f"{table}\n<details><summary>commands</summary>\n\n```\n"
                + "\n".join(commands)
                + "\n```\n</details>\n"
            )
        print(f"appended to {notes}")
    measured = [s for s in args.servers if s not in failures]
    return 0 if measured else 1


if __name__ == "__main__":
    sys.exit(main())
