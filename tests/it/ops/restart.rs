//! Restarts with `--takeover`: under load, with connected sessions, and one that fails.

use std::net::UdpSocket;
use std::process::Stdio;
use std::time::{Duration, Instant};

use crate::common::*;
use crate::ops::process::*;

/// What a run of restarts under load measured.
struct RestartRun {
    sent: u64,
    answered: u64,
    lost: u64,
    /// From spawning the new process to its `listening` line (it serves from then on).
    takeover_ms: Vec<f64>,
    /// From that line to the old process's exit (0 checked).
    old_exit_ms: Vec<f64>,
    /// Datagrams each process received, first to last.
    received: Vec<u64>,
}

/// `udpring load` at `rate` requests/s with no retransmission (`--retries 0`: a request not
/// answered within 1 s is lost) while the server (`--sessions MODE`) is restarted `restarts`
/// times with `--takeover`, evenly spread over the run.
fn restart_under_load(mode: &str, rate: u32, secs: f64, restarts: usize) -> RestartRun {
    let serve_args = ["--workers", "2", "--sessions", mode];
    let mut current = serve(&[&["--bind", "127.0.0.1:0"], &serve_args[..]].concat());
    let addr = current.addr.to_string();
    let load = udpring()
        .args(["load", "--target", &addr, "--rate", &rate.to_string()])
        .args(["--duration", &format!("{secs}s"), "--clients", "8"])
        .args([
            "--retries",
            "0",
            "--timeout",
            "1s",
            "--settle",
            "--json",
            "--quiet",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("load starts");
    let started = Instant::now();
    let mut run = RestartRun {
        sent: 0,
        answered: 0,
        lost: 0,
        takeover_ms: Vec::new(),
        old_exit_ms: Vec::new(),
        received: Vec::new(),
    };
    for k in 1..=restarts {
        let at = Duration::from_secs_f64(secs * k as f64 / (restarts + 1) as f64);
        std::thread::sleep(at.saturating_sub(started.elapsed()));
        let spawned = Instant::now();
        let mut cmd = udpring();
        cmd.args(["serve", "--bind", &addr, "--takeover"])
            .args(serve_args);
        let next = spawn_serving(cmd);
        let serving = Instant::now();
        run.takeover_ms
            .push(serving.duration_since(spawned).as_secs_f64() * 1e3);
        let old = std::mem::replace(&mut current, next);
        let f = old.finish(WAIT);
        run.old_exit_ms.push(serving.elapsed().as_secs_f64() * 1e3);
        assert_exit_0(&f, "the process taken over from");
        assert!(f.stderr.contains("listeners handed over"), "{}", f.stderr);
        run.received.push(final_counter(&f, "rx"));
    }
    let out = load.wait_with_output().expect("load runs");
    let json = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "load: {json}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let f = current.term();
    assert_exit_0(&f, "the last process");
    run.received.push(final_counter(&f, "rx"));
    run.sent = json_u64(&json, "sent");
    run.answered = json_u64(&json, "answered");
    run.lost = json_u64(&json, "given_up") + json_u64(&json, "outstanding");
    eprintln!(
        "restart under load: --sessions {mode} rate={rate}/s for {secs}s, {restarts} restarts: sent={} answered={} lost={} takeover_ms={:.1?} old_exit_ms={:.1?} received_per_process={:?}",
        run.sent, run.answered, run.lost, run.takeover_ms, run.old_exit_ms, run.received
    );
    run
}

fn assert_nothing_lost(run: &RestartRun) {
    assert!(run.sent > 0);
    assert_eq!(run.lost, 0, "requests lost across restarts");
    assert_eq!(run.answered, run.sent);
    // Each request reached exactly one process (no retransmissions were allowed).
    assert_eq!(run.received.iter().sum::<u64>(), run.sent);
}

#[test]
fn five_restarts_under_load_lose_nothing_in_none_mode() {
    if !kernel_supports_udpring() {
        return;
    }
    let run = restart_under_load("none", 5_000, 3.0, 5);
    assert_nothing_lost(&run);
}

/// `shared` sessions live on the listener: at a takeover the old process answers what it
/// received and closes them; the peers' next datagrams open sessions in the new process.
/// No request is lost, only the session state.
#[test]
fn restarts_in_shared_mode_lose_no_request() {
    if !kernel_supports_udpring() {
        return;
    }
    let run = restart_under_load("shared", 3_000, 2.0, 2);
    assert_nothing_lost(&run);
}

#[test]
#[ignore = "stress: make stress"]
fn five_restarts_at_50k_per_second_lose_nothing() {
    if !kernel_supports_udpring() {
        return;
    }
    let run = restart_under_load("none", 50_000, 10.0, 5);
    assert_nothing_lost(&run);
}

/// `--sessions connected`: `clients` peers with sessions in the first process; after the
/// takeover each of them is still answered for `rounds` rounds, by the first process (its
/// per-client sockets keep receiving their datagrams), while `newcomers` new peers get their
/// sessions in the new process. The first process ends on its own once its sessions idle out.
fn connected_restart(clients: usize, newcomers: usize, rounds: usize) {
    let serve_args = [
        "--workers",
        "2",
        "--sessions",
        "connected",
        "--idle-timeout",
        "700ms",
        "--max-connected",
        "100000",
    ];
    let first = serve(&[&["--bind", "127.0.0.1:0"], &serve_args[..]].concat());
    let addr = first.addr;
    let peers: Vec<UdpSocket> = (0..clients).map(|_| client_for(addr)).collect();
    // One round: every peer sends one datagram; every one must be answered (one datagram in
    // flight per peer, well inside every queue).
    let round = |peers: &[UdpSocket], tag: u8| {
        for (i, p) in peers.iter().enumerate() {
            let mut payload = (i as u64).to_le_bytes().to_vec();
            payload.push(tag);
            p.send_to(&payload, addr).expect("send");
        }
        let got = collect_replies(peers, peers.len(), WAIT);
        for (i, replies) in got.iter().enumerate() {
            assert_eq!(replies.len(), 1, "peer {i} in round {tag}: {replies:?}");
            assert_eq!(replies[0].1, addr, "peer {i}: the reply's source");
        }
    };
    round(&peers, 0);
    let mut cmd = udpring();
    cmd.args(["serve", "--bind", &addr.to_string(), "--takeover"])
        .args(serve_args);
    let second = spawn_serving(cmd);
    let fresh: Vec<UdpSocket> = (0..newcomers).map(|_| client_for(addr)).collect();
    for r in 1..=rounds {
        round(&peers, r as u8);
        round(&fresh, r as u8);
    }
    // Quiet: the first process's sessions idle out and it exits by itself.
    let f1 = first.finish(WAIT);
    assert_exit_0(&f1, "the process taken over from");
    let f2 = second.term();
    assert_exit_0(&f2, "the new process");
    // Every datagram of the established peers reached the first process's state, every
    // newcomer's the second's: had any crossed over, a session would have opened for it.
    assert_eq!(
        final_counter(&f1, "opened"),
        clients as u64,
        "{}",
        f1.stdout
    );
    assert_eq!(final_counter(&f1, "rx"), (clients * (rounds + 1)) as u64);
    assert_eq!(
        final_counter(&f2, "opened"),
        newcomers as u64,
        "{}",
        f2.stdout
    );
    assert_eq!(final_counter(&f2, "rx"), (newcomers * rounds) as u64);
}

#[test]
fn connected_sessions_stay_with_their_process_across_a_takeover() {
    if !kernel_supports_udpring() {
        return;
    }
    connected_restart(300, 30, 3);
}

#[test]
#[ignore = "stress: make stress"]
fn a_thousand_connected_sessions_across_a_takeover() {
    if !kernel_supports_udpring() {
        return;
    }
    connected_restart(1000, 100, 10);
}

/// A takeover that fails after the sockets were passed (the new process cannot start) leaves
/// the old process serving; a later one succeeds.
#[test]
fn a_failed_takeover_leaves_the_old_process_serving() {
    if !kernel_supports_udpring() {
        return;
    }
    let old = serve(&["--bind", "127.0.0.1:0", "--workers", "1"]);
    let addr = old.addr;
    // Invalid options are only checked once the sockets have arrived: the new process
    // exits 1 without saying go.
    let out = udpring()
        .args(["serve", "--bind", &addr.to_string(), "--takeover"])
        .args(["--buffers", "1000"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let client = client_for(addr);
    assert!(round_trip(&client, addr, b"still there").is_some());
    let mut cmd = udpring();
    cmd.args([
        "serve",
        "--bind",
        &addr.to_string(),
        "--takeover",
        "--workers",
        "1",
    ]);
    let new = spawn_serving(cmd);
    let f = old.finish(WAIT);
    assert_exit_0(&f, "old");
    assert!(
        f.stderr
            .contains("takeover did not complete; still serving"),
        "{}",
        f.stderr
    );
    assert!(round_trip(&client, addr, b"new one").is_some());
    assert_exit_0(&new.term(), "new");
}

/// `GET /metrics` on `addr`: the status line and body, or the error.
fn scrape(addr: &str) -> std::io::Result<String> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(addr)?;
    stream.set_read_timeout(Some(WAIT))?;
    stream.write_all(b"GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    Ok(response)
}

/// The metrics port moves too: the old process closes it once told to go, and the new one,
/// already serving, binds it then (a bind failure after `go` must not stop the service).
#[test]
fn the_metrics_endpoint_moves_with_a_takeover() {
    if !kernel_supports_udpring() {
        return;
    }
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .to_string();
    let old = serve(&[
        "--bind",
        "127.0.0.1:0",
        "--workers",
        "1",
        "--metrics",
        &metrics,
    ]);
    let addr = old.addr;
    assert!(scrape(&metrics).is_ok_and(|r| r.starts_with("HTTP/1.0 200")));
    let mut cmd = udpring();
    cmd.args([
        "serve",
        "--bind",
        &addr.to_string(),
        "--takeover",
        "--workers",
        "1",
    ])
    .args(["--metrics", &metrics]);
    let new = spawn_serving(cmd);
    assert_exit_0(&old.finish(WAIT), "old");
    let client = client_for(addr);
    assert!(round_trip(&client, addr, b"counted").is_some());
    let response = scrape(&metrics).expect("the new process serves metrics");
    assert!(response.starts_with("HTTP/1.0 200"), "{response}");
    assert!(
        response.contains("udpring_rx_datagrams_total{worker=\"0\"} 1"),
        "the new process's counters: {response}"
    );
    let f = new.term();
    assert_exit_0(&f, "new");
    assert!(f
        .stderr
        .contains(&format!("metrics on http://{metrics}/metrics")));
}
