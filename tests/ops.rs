//! Operations (issue 11), with real `udpring` processes: the instance guard, restarts that
//! hand the listening sockets over (`--takeover`) under load, systemd socket activation
//! (`systemd-socket-activate`), and CPU steering (`--steer cpu`). The long variants are
//! `#[ignore = "stress: make stress"]`.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

fn udpring() -> Command {
    Command::new(env!("CARGO_BIN_EXE_udpring"))
}

/// A running `udpring serve`, its stdout after the `listening` line and its stderr read by
/// threads (so it never blocks on a full pipe).
struct Proc {
    child: Child,
    addr: SocketAddr,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

/// What a finished `udpring serve` left.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Spawns `cmd` (a `udpring serve`) and waits for its `udpring listening on ADDR` line.
fn spawn_serving(mut cmd: Command) -> Proc {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("udpring starts");
    let stderr = drain(child.stderr.take().expect("stderr piped"));
    let mut lines = BufReader::new(child.stdout.take().expect("stdout piped"));
    let mut line = String::new();
    // The read ends when the server prints the line or exits (EOF): no unbounded wait.
    lines.read_line(&mut line).expect("listening line");
    let Some(addr) = line.trim().strip_prefix("udpring listening on ") else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "no listening line: {line:?}\n{}",
            stderr.join().unwrap_or_default()
        );
    };
    Proc {
        addr: addr.parse().expect("address"),
        child,
        stdout: drain(lines),
        stderr,
    }
}

fn serve(args: &[&str]) -> Proc {
    let mut cmd = udpring();
    cmd.arg("serve").args(args);
    spawn_serving(cmd)
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit` for the process to exit on its own.
    fn finish(mut self, limit: Duration) -> Finished {
        let mut status = None;
        wait_until(limit, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        let Some(status) = status else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "udpring pid {} did not exit within {limit:?}:\n{}",
                self.child.id(),
                self.stderr.join().unwrap_or_default()
            );
        };
        Finished {
            status,
            stdout: self.stdout.join().unwrap_or_default(),
            stderr: self.stderr.join().unwrap_or_default(),
        }
    }

    /// SIGTERM, then [`Proc::finish`].
    fn term(self) -> Finished {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        self.finish(WAIT)
    }
}

/// A counter from the `udpring final rx=... opened=...` line.
fn final_counter(f: &Finished, name: &str) -> u64 {
    let line = f
        .stdout
        .lines()
        .find(|l| l.starts_with("udpring final "))
        .unwrap_or_else(|| panic!("no final line:\n{}\n{}", f.stdout, f.stderr));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .map_or(0, |v| v.parse().expect("counter"))
}

fn assert_exit_0(f: &Finished, who: &str) {
    assert!(f.status.success(), "{who}: {:?}\n{}", f.status, f.stderr);
}

/// A field of the `udpring load --json` report.
fn json_u64(json: &str, key: &str) -> u64 {
    let at = json
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("{key} missing in {json}"));
    json[at + key.len() + 3..]
        .split([',', '}'])
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} unreadable in {json}"))
}

// ---------------------------------------------------------------------------------------
// The instance guard

#[test]
fn a_second_instance_is_refused_and_the_first_serves_on_undisturbed() {
    if !kernel_supports_udpring() {
        return;
    }
    let first = serve(&["--bind", "127.0.0.1:0", "--workers", "2"]);
    let addr = first.addr;
    for bind in [addr.to_string(), format!("0.0.0.0:{}", addr.port())] {
        let out = udpring()
            .args(["serve", "--bind", &bind, "--workers", "2"])
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert_eq!(
            stderr.trim_end(),
            format!(
                "udpring: udp {bind} is already served by pid {} (udpring); stop it or start with --takeover",
                first.pid()
            ),
            "exactly one line naming the owner"
        );
    }
    // Every datagram sent after the failed starts reaches the first instance, none a second
    // one: one request in flight at a time, so none can be dropped for lack of room.
    let client = client_for(addr);
    let sent = 300u64;
    for i in 0..sent {
        let payload = i.to_le_bytes();
        let (reply, _) = round_trip(&client, addr, &payload).expect("answered");
        assert_eq!(reply, payload);
    }
    let f = first.term();
    assert_exit_0(&f, "first instance");
    assert_eq!(final_counter(&f, "rx"), sent, "{}", f.stderr);
}

#[test]
fn a_foreign_reuseport_socket_on_the_address_is_named() {
    if !kernel_supports_udpring() {
        return;
    }
    // Not a udpring: a SO_REUSEPORT socket of this test process, which a second udpring
    // would otherwise have joined silently.
    let holder = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::DGRAM, None).unwrap();
    holder.set_reuse_port(true).unwrap();
    holder
        .bind(&"127.0.0.1:0".parse::<SocketAddr>().unwrap().into())
        .unwrap();
    let addr = holder.local_addr().unwrap().as_socket().unwrap();
    let out = udpring()
        .args(["serve", "--bind", &addr.to_string(), "--workers", "1"])
        .output()
        .expect("runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains(&format!("already served by pid {} (", std::process::id())),
        "{stderr}"
    );
}

// ---------------------------------------------------------------------------------------
// Restarts with --takeover

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

// ---------------------------------------------------------------------------------------
// systemd socket activation

#[test]
fn socket_activation_serves_the_passed_socket_and_binds_none() {
    if !kernel_supports_udpring() {
        return;
    }
    if Command::new("systemd-socket-activate")
        .arg("--version")
        .output()
        .is_err()
    {
        skip_or_fail("systemd-socket-activate is not installed (Debian package systemd)");
        return;
    }
    // A free port: bound and released (the activator binds it next).
    let port = UdpSocket::bind("127.0.0.1:0")
        .and_then(|s| s.local_addr())
        .expect("free port")
        .port();
    let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let mut activator = Command::new("systemd-socket-activate")
        .args(["--datagram", "-l", &addr.to_string(), "--fdname=udpring"])
        .arg(env!("CARGO_BIN_EXE_udpring"))
        .args(["serve", "--workers", "4"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("systemd-socket-activate starts");
    let stderr = drain(activator.stderr.take().expect("stderr"));
    let stdout = drain(activator.stdout.take().expect("stdout"));
    // The activator listens first and starts udpring on the first datagram, which waits in
    // the socket's queue and is the first one answered.
    let client = client_for(addr);
    let mut answered = false;
    wait_until(WAIT, || {
        answered = round_trip_within(&client, addr, b"wake up", Duration::from_millis(200))
            .is_some_and(|(r, _)| r == b"wake up");
        answered
    });
    let sockets_on_port = std::fs::read_to_string("/proc/net/udp")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.split_whitespace()
                .nth(1)
                .is_some_and(|a| a.ends_with(&format!(":{port:04X}")))
        })
        .count();
    // SAFETY: kill(2) on the pid of a child we spawned and have not reaped (the activator
    // execs udpring in place, so this is udpring).
    unsafe { libc::kill(activator.id() as i32, libc::SIGTERM) };
    let mut status = None;
    wait_until(WAIT, || {
        status = activator.try_wait().expect("try_wait");
        status.is_some()
    });
    if status.is_none() {
        let _ = activator.kill();
        let _ = activator.wait();
    }
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    assert!(
        answered,
        "no answer through the activated socket:\n{stderr}"
    );
    assert!(status.is_some_and(|s| s.success()), "{status:?}\n{stderr}");
    assert!(
        stderr.contains("sockets=socket-activated: udpring") && stderr.contains("workers=1"),
        "the log says it was socket-activated, one worker per passed socket:\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("udpring listening on {addr}")),
        "{stdout}"
    );
    assert_eq!(sockets_on_port, 1, "udpring bound no socket of its own");
}

// ---------------------------------------------------------------------------------------
// CPU steering

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET takes a CPU below CPU_SETSIZE (from the
    // allowed list); sched_setaffinity reads the live local set of the size passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills the live local of the size
    // passed; CPU_ISSET reads it for CPUs below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

#[test]
fn steer_cpu_serves_each_client_on_the_worker_pinned_to_its_cpu() {
    if !kernel_supports_udpring() {
        return;
    }
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        skip_or_fail("--steer cpu needs at least 2 CPUs to show anything");
        return;
    }
    let server = start(
        udpring::ServerConfig {
            pin_cpus: true,
            steer: udpring::Steer::Cpu,
            ..config("127.0.0.1:0", cpus.len())
        },
        |_| udpring::Echo,
    );
    let addr = server.local_addr();
    let per_client = 200u64;
    // Worker i is pinned to cpus[i] and is group index i; a client on CPU c is received on
    // CPU c (loopback runs the receive path on the sender's CPU).
    for (worker, &cpu) in cpus.iter().enumerate().take(2).rev() {
        let before = server.worker_counters();
        std::thread::spawn(move || {
            pin_to(cpu);
            // Several source ports: the kernel's hash alone would spread them over workers.
            let clients: Vec<UdpSocket> = (0..8).map(|_| client_for(addr)).collect();
            for i in 0..per_client {
                let client = &clients[i as usize % clients.len()];
                assert!(
                    round_trip(client, addr, &i.to_le_bytes()).is_some(),
                    "answered"
                );
            }
        })
        .join()
        .expect("client thread");
        let after = server.worker_counters();
        let got: Vec<u64> = after
            .iter()
            .zip(&before)
            .map(|(a, b)| a.rx_datagrams - b.rx_datagrams)
            .collect();
        assert_eq!(
            got[worker], per_client,
            "client on CPU {cpu}: per-worker datagrams {got:?}"
        );
    }
    server.shutdown().expect("shutdown");
}

#[test]
fn steer_cpu_without_pinning_is_refused() {
    let out = udpring()
        .args(["serve", "--bind", "127.0.0.1:0", "--steer", "cpu"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--steer cpu needs --pin-cpus"));
}

/// The `per_worker_rx=[a, b, ...]` of a `final total` log line.
fn per_worker_rx(f: &Finished) -> Vec<u64> {
    let list = f
        .stderr
        .split("per_worker_rx=[")
        .last()
        .and_then(|s| s.split(']').next())
        .unwrap_or_else(|| panic!("no per_worker_rx:\n{}", f.stderr));
    list.split(", ")
        .map(|n| n.parse().expect("count"))
        .collect()
}

/// Sends `count` requests from 16 sockets on a thread pinned to `cpu`, each answered.
fn requests_from_cpu(addr: SocketAddr, cpu: usize, count: u64) {
    std::thread::spawn(move || {
        pin_to(cpu);
        let clients: Vec<UdpSocket> = (0..16).map(|_| client_for(addr)).collect();
        for i in 0..count {
            let client = &clients[i as usize % clients.len()];
            assert!(round_trip(client, addr, &i.to_le_bytes()).is_some());
        }
    })
    .join()
    .expect("client thread");
}

/// The program belongs to the socket group, which a takeover hands over: a successor with
/// `--steer cpu` attaches its own; one without it removes the predecessor's.
#[test]
fn steering_follows_the_takeover() {
    if !kernel_supports_udpring() {
        return;
    }
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        skip_or_fail("--steer cpu needs at least 2 CPUs to show anything");
        return;
    }
    let workers = cpus.len().to_string();
    let steered = ["--workers", &workers, "--pin-cpus", "--steer", "cpu"];
    let first = serve(&[&["--bind", "127.0.0.1:0"], &steered[..]].concat());
    let addr = first.addr;
    let takeover = |extra: &[&str]| {
        let mut cmd = udpring();
        cmd.args(["serve", "--bind", &addr.to_string(), "--takeover"])
            .args(extra);
        spawn_serving(cmd)
    };
    let second = takeover(&steered);
    assert_exit_0(&first.finish(WAIT), "first");
    requests_from_cpu(addr, cpus[1], 100);
    let third = takeover(&["--workers", &workers]);
    let f2 = second.finish(WAIT);
    assert_exit_0(&f2, "second");
    let rx = per_worker_rx(&f2);
    assert_eq!(
        rx[1], 100,
        "steered to the worker on CPU {}: {rx:?}",
        cpus[1]
    );
    requests_from_cpu(addr, cpus[1], 100);
    let f3 = third.term();
    assert_exit_0(&f3, "third");
    let rx = per_worker_rx(&f3);
    // 16 source ports hashed over the workers: all on one worker has odds of 2 in 65,536.
    assert!(
        rx.iter().filter(|&&n| n > 0).count() > 1,
        "without --steer the kernel's hash spreads the sockets: {rx:?}"
    );
}
