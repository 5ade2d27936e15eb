//! Tests of the `udpring` binary: start-up errors, SIGTERM under load, and the real sockperf
//! client against `--app sockperf`.

mod common;

use std::io::{BufRead, BufReader, Read};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::*;

fn udpring() -> Command {
    Command::new(env!("CARGO_BIN_EXE_udpring"))
}

/// Starts `udpring serve ARGS` on port 0 and returns the child and the address it printed.
fn spawn_server(args: &[&str]) -> (Child, SocketAddr) {
    let mut cmd = udpring();
    cmd.arg("serve").args(["--bind", "127.0.0.1:0"]).args(args);
    let (child, addr, _stdout) = spawn_listening(cmd);
    (child, addr)
}

/// Spawns a command that runs `udpring serve` and reads its first line, `udpring listening
/// on ADDR`. The rest of its stdout is drained by a thread (so the child never blocks on a
/// full pipe), which returns it once the child has closed it.
fn spawn_listening(mut cmd: Command) -> (Child, SocketAddr, JoinHandle<String>) {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("udpring starts");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout piped"));
    let mut line = String::new();
    lines.read_line(&mut line).expect("listening line");
    let addr = line
        .trim()
        .strip_prefix("udpring listening on ")
        .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
        .parse()
        .expect("address");
    let rest = std::thread::spawn(move || {
        let mut rest = String::new();
        let _ = lines.read_to_string(&mut rest);
        rest
    });
    (child, addr, rest)
}

fn wait_exit(child: &mut Child, limit: Duration) -> Option<std::process::ExitStatus> {
    let mut status = None;
    wait_until(limit, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    status
}

#[test]
fn sigterm_with_traffic_in_flight_exits_zero_within_a_second() {
    if !kernel_supports_udpring() {
        return;
    }
    let (mut child, addr) = spawn_server(&["--workers", "2", "--stats-interval", "0"]);
    let stop = Arc::new(AtomicBool::new(false));
    let blasters: Vec<_> = (0..4)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let sock = UdpSocket::bind("127.0.0.1:0").expect("bind");
                sock.set_nonblocking(true).expect("nonblocking");
                let mut buf = [0u8; 64];
                let deadline = Instant::now() + Duration::from_secs(5);
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    let _ = sock.send_to(&[1u8; 64], addr);
                    while sock.recv_from(&mut buf).is_ok() {}
                }
            })
        })
        .collect();
    // Traffic for 300 ms before the signal (a phase, not a count).
    std::thread::sleep(Duration::from_millis(300));
    let sent_at = Instant::now();
    // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = wait_exit(&mut child, Duration::from_secs(5));
    let took = sent_at.elapsed();
    stop.store(true, Ordering::Relaxed);
    for b in blasters {
        b.join().expect("blaster");
    }
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("udpring did not exit within 5 s of SIGTERM");
    });
    assert!(status.success(), "exit status {status:?}");
    assert!(took < Duration::from_millis(1000), "shutdown took {took:?}");
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    let served: u64 = stderr
        .split("final total rx=")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("final counters missing:\n{stderr}"));
    assert!(served > 0, "traffic should have been served:\n{stderr}");
}

#[test]
fn address_in_use_is_one_clear_line_and_exit_1() {
    if !kernel_supports_udpring() {
        return;
    }
    // A socket without SO_REUSEPORT holds the port.
    let holder = UdpSocket::bind("127.0.0.1:0").expect("bind");
    let addr = holder.local_addr().expect("addr").to_string();
    let out = udpring()
        .args(["serve", "--bind", &addr, "--workers", "1"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    let line = stderr.lines().last().unwrap_or("");
    // The instance guard (tests/ops/) names the holder: this test process.
    assert_eq!(
        line,
        format!(
            "udpring: udp {addr} is already served by pid {} ({}); stop it or start with --takeover",
            std::process::id(),
            std::fs::read_to_string("/proc/self/comm").expect("comm").trim()
        ),
        "{stderr}"
    );
}

#[test]
fn bad_options_are_rejected_with_the_option_named() {
    let out = udpring()
        .args(["serve", "--buffers", "1000"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--buffers must be a power of two"));
    let out = udpring()
        .args(["serve", "--stats-interval", "soon"])
        .output()
        .expect("runs");
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid duration"));
    let out = udpring().args(["serve", "--help"]).output().expect("runs");
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for flag in [
        "--bind",
        "--workers",
        "--app",
        "--max-datagram",
        "--pin-cpus",
    ] {
        assert!(help.contains(flag), "--help lacks {flag}");
    }
}

#[test]
fn probe_reports_every_feature() {
    let out = udpring().arg("probe").output().expect("runs");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.starts_with("kernel: "), "{text}");
    if kernel_supports_udpring() {
        assert!(out.status.success());
        assert!(text.contains("yes multishot IORING_OP_RECVMSG"), "{text}");
        assert!(text.contains("since 6.0"), "{text}");
    }
}

/// Runs a sockperf client mode against `udpring serve --app sockperf` and returns
/// (sent, received) from its "[Total Run]" line.
fn run_sockperf(mode: &str, extra: &[&str]) -> Option<(u64, u64)> {
    if Command::new("sockperf").arg("--version").output().is_err() {
        skip_or_fail("sockperf is not installed (apt-get install sockperf)");
        return None;
    }
    let (mut child, addr) = spawn_server(&["--workers", "1", "--app", "sockperf"]);
    let out = Command::new("timeout")
        .args(["20", "sockperf", mode, "-i", "127.0.0.1"])
        .args(["-p", &addr.port().to_string(), "-t", "1"])
        .args(extra)
        .output()
        .expect("sockperf runs");
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child, Duration::from_secs(5));
    assert!(
        status.map(|s| s.success()).unwrap_or(false),
        "server exit {status:?}"
    );
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    let line = text
        .lines()
        .find(|l| l.contains("[Total Run]"))
        .unwrap_or_else(|| panic!("no [Total Run] line in sockperf output:\n{text}"));
    let field = |name: &str| -> u64 {
        line.split(name)
            .nth(1)
            .and_then(|s| s.split(|c: char| !c.is_ascii_digit()).next())
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("no {name} in {line}"))
    };
    Some((field("SentMessages="), field("ReceivedMessages=")))
}

#[test]
fn sockperf_ping_pong_is_answered() {
    if !kernel_supports_udpring() {
        return;
    }
    if let Some((sent, received)) = run_sockperf("ping-pong", &[]) {
        assert!(sent > 100, "sent {sent}");
        assert!(received > 100, "received {received}");
        // ping-pong waits for each answer; at most the last one can be outstanding.
        assert!(sent - received <= 1, "sent {sent}, received {received}");
    }
}

#[test]
fn sockperf_under_load_is_answered() {
    if !kernel_supports_udpring() {
        return;
    }
    if let Some((sent, received)) = run_sockperf("under-load", &["--mps", "5000"]) {
        assert!(sent > 1000, "sent {sent}");
        // under-load asks for a reply to one message in each 100 by default.
        assert!(
            received * 100 + 200 >= sent,
            "sent {sent}, received {received}"
        );
        assert!(received > 10, "received {received}");
    }
}

/// Stress (runs the binary out of descriptors): `make stress`.
#[test]
#[ignore = "stress: make stress"]
fn descriptor_exhaustion_in_connected_mode_keeps_serving() {
    if !kernel_supports_udpring() {
        return;
    }
    // 64 descriptors: the ring, eventfds and listener take a few; most of 100 clients cannot
    // get a per-client socket and must be served on the shared socket instead.
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(format!(
        "ulimit -n 64 && exec {} serve --bind 127.0.0.1:0 --workers 1 --sessions connected --stats-interval 0",
        env!("CARGO_BIN_EXE_udpring")
    ));
    let (mut child, addr, stdout) = spawn_listening(cmd);
    let clients: Vec<UdpSocket> = (0..100).map(|_| client_for(addr)).collect();
    for (i, c) in clients.iter().enumerate() {
        let (reply, _) = round_trip(c, addr, format!("n{i}").as_bytes())
            .unwrap_or_else(|| panic!("client {i} not served"));
        assert_eq!(reply, format!("n{i}").as_bytes());
    }
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child, Duration::from_secs(5)).expect("exits");
    assert!(status.success());
    let rest = stdout.join().expect("stdout reader");
    let exhausted: u64 = rest
        .split("fd_exhausted=")
        .nth(1)
        .and_then(|s| s.split(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no fd_exhausted in {rest}"));
    assert!(exhausted > 0, "{rest}");
    assert!(rest.contains("opened=100"), "{rest}");
}

#[test]
fn pin_cpus_pins_each_worker_to_its_own_cpu() {
    if !kernel_supports_udpring() {
        return;
    }
    let cpus = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    if cpus < 2 {
        eprintln!("skipped: needs two CPUs");
        return;
    }
    let (mut child, _addr) =
        spawn_server(&["--workers", "2", "--pin-cpus", "--stats-interval", "0"]);
    let mut allowed = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{}/task", child.id())).expect("tasks");
    for task in tasks.flatten() {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if name.trim().starts_with("udpring-w") {
            let status = std::fs::read_to_string(dir.join("status")).unwrap_or_default();
            let cpus = status
                .lines()
                .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
                .map(|v| v.trim().to_string())
                .unwrap_or_default();
            allowed.push(cpus);
        }
    }
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_exit(&mut child, Duration::from_secs(5)).expect("exits");
    allowed.sort();
    assert_eq!(allowed.len(), 2, "two worker threads: {allowed:?}");
    assert!(
        allowed.iter().all(|a| !a.contains(',') && !a.contains('-')),
        "each worker on a single CPU: {allowed:?}"
    );
    assert_ne!(allowed[0], allowed[1], "on different CPUs");
}

#[test]
fn metrics_endpoint_reports_live_counters() {
    if !kernel_supports_udpring() {
        return;
    }
    use std::io::Write;
    // A port that was free a moment ago.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let metrics = format!("127.0.0.1:{port}");
    let (mut child, addr) = spawn_server(&["--workers", "2", "--metrics", &metrics]);
    let client = client_for(addr);
    for i in 0..25u32 {
        round_trip(&client, addr, format!("metrics {i}").as_bytes()).expect("echo");
    }
    let fetch = || -> String {
        let mut s = std::net::TcpStream::connect(&metrics).expect("metrics port");
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .expect("request");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("response");
        body
    };
    let total = |body: &str, name: &str| -> u64 {
        body.lines()
            .filter(|l| l.starts_with(name) && !l.starts_with('#'))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    };
    // Stats are published once per loop turn: poll until the replies show.
    let mut body = String::new();
    let published = wait_until(WAIT, || {
        body = fetch();
        total(&body, "udpring_tx_datagrams_total") >= 25
    });
    assert!(published, "tx never reached 25:\n{body}");
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_exit(&mut child, Duration::from_secs(5)).expect("exits");
    assert!(
        body.starts_with("HTTP/1.0 200") || body.starts_with("HTTP/1.1 200"),
        "{body}"
    );
    assert_eq!(total(&body, "udpring_rx_datagrams_total"), 25, "{body}");
    assert_eq!(total(&body, "udpring_tx_datagrams_total"), 25, "{body}");
    for family in [
        "# TYPE udpring_kernel_drops_total counter",
        "# TYPE udpring_sessions_open gauge",
        "# TYPE udpring_enobufs_total counter",
        "udpring_rx_datagrams_total{worker=\"1\"}",
    ] {
        assert!(body.contains(family), "missing {family}:\n{body}");
    }
}
