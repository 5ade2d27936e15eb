//! Tests of the `udpring` binary: start-up errors, SIGTERM under load, and the real sockperf
//! client against `--app sockperf`.

use std::io::{BufRead, BufReader, ErrorKind, Read};
use std::net::{SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::common::*;

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

/// The value of `name=N` in a counters line (`rx=`, not `rx_bytes=`).
fn counter(line: &str, name: &str) -> Option<u64> {
    line.split(' ')
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('=')?.parse().ok())
}

/// Replies a blaster may wait for at once: 4 blasters' windows of 64-byte datagrams fit every
/// socket's receive buffer, so neither the server nor a client drops any (a drop would be
/// counted in `kernel_drops`, or show as a reply the server sent and no client got).
const WINDOW: u64 = 32;

/// SIGTERM while clients keep sending: udpring drains (every request it took is answered,
/// nothing is left in flight at its drain deadline) and exits 0, saying why it stopped; the
/// replies it counts are exactly the replies the clients got.
#[test]
fn sigterm_with_traffic_in_flight_drains_and_exits_zero() {
    if !kernel_supports_udpring() {
        return;
    }
    let mut cmd = udpring();
    cmd.arg("serve")
        .args(["--bind", "127.0.0.1:0", "--workers", "2"])
        .args(["--stats-interval", "0"]);
    let (mut child, addr, stdout) = spawn_listening(cmd);
    let exited = Arc::new(AtomicBool::new(false));
    let answered = Arc::new(AtomicU64::new(0));
    let blasters: Vec<_> = (0..4)
        .map(|_| {
            let (exited, answered) = (exited.clone(), answered.clone());
            std::thread::spawn(move || {
                let sock = client_for(addr);
                sock.set_read_timeout(Some(Duration::from_millis(10)))
                    .expect("timeout");
                let (mut sent, mut got) = (0u64, 0u64);
                let mut buf = [0u8; 64];
                // Until udpring has exited: keep WINDOW requests outstanding.
                while !exited.load(Ordering::Acquire) {
                    while sent - got < WINDOW {
                        sock.send_to(&[1u8; 64], addr).expect("send");
                        sent += 1;
                    }
                    match sock.recv_from(&mut buf) {
                        Ok(_) => {
                            got += 1;
                            answered.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(e)
                            if matches!(
                                e.kind(),
                                ErrorKind::WouldBlock
                                    | ErrorKind::TimedOut
                                    | ErrorKind::Interrupted
                            ) => {}
                        Err(e) => panic!("recv: {e}"),
                    }
                }
                // udpring has exited: every reply it sent is queued here already.
                sock.set_nonblocking(true).expect("nonblocking");
                loop {
                    match sock.recv_from(&mut buf) {
                        Ok(_) => got += 1,
                        Err(e) if e.kind() == ErrorKind::Interrupted => {}
                        Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                        Err(e) => panic!("recv: {e}"),
                    }
                }
                got
            })
        })
        .collect();
    // Traffic is flowing (a condition, not a time) when the signal is sent.
    assert!(
        wait_until(WAIT, || answered.load(Ordering::Relaxed) >= 1_000),
        "traffic flows before the signal: {} answered",
        answered.load(Ordering::Relaxed)
    );
    // SAFETY: kill(2) on the PID of a child we spawned and have not reaped.
    let rc = unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    assert_eq!(rc, 0);
    let status = wait_exit(&mut child, WAIT);
    exited.store(true, Ordering::Release);
    let got: u64 = blasters
        .into_iter()
        .map(|b| b.join().expect("blaster"))
        .sum();
    let status = status.unwrap_or_else(|| {
        let _ = child.kill();
        panic!("udpring did not exit within {WAIT:?} of SIGTERM");
    });
    let mut stderr = String::new();
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut stderr)
        .expect("stderr");
    assert!(status.success(), "exit status {status:?}:\n{stderr}");
    assert!(
        stderr.contains("shutting down") && stderr.contains("signal=15"),
        "the log says why it stopped:\n{stderr}"
    );
    assert!(
        !stderr.contains("timed out"),
        "the drain finished before its deadline:\n{stderr}"
    );
    let rest = stdout.join().expect("stdout reader");
    let finals = rest
        .lines()
        .find_map(|l| l.strip_prefix("udpring final "))
        .unwrap_or_else(|| panic!("no final counters on stdout:\n{rest}\n{stderr}"));
    let count =
        |name: &str| counter(finals, name).unwrap_or_else(|| panic!("no {name}= in {finals}"));
    assert_eq!(counter(finals, "kernel_drops").unwrap_or(0), 0, "{finals}");
    assert_eq!(count("send_errors") + count("send_dropped"), 0, "{finals}");
    assert_eq!(
        count("rx"),
        count("tx"),
        "every request taken is answered: {finals}"
    );
    assert_eq!(
        count("tx"),
        got,
        "the replies udpring counts are the replies the clients got: {finals}"
    );
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
    // The instance guard (tests/it/ops/) names the holder: this test process.
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

/// Issue 16: `--stateless-reset-key FILE` is checked before anything starts: a missing file
/// and a key shorter than 32 bytes are one line naming the option, exit 1.
#[test]
fn a_bad_stateless_reset_key_is_one_line_and_exit_1() {
    let dir = std::env::temp_dir().join(format!("udpring-reset-key-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let short = dir.join("short");
    std::fs::write(&short, [1u8; 31]).unwrap();
    for (path, why) in [
        (short.clone(), "31 bytes; a key has 32 to 4096"),
        (dir.join("missing"), "cannot open"),
    ] {
        let out = udpring()
            .args(["serve", "--app", "quic", "--bind", "127.0.0.1:0"])
            .arg("--stateless-reset-key")
            .arg(&path)
            .output()
            .expect("runs");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(
            stderr.contains("--stateless-reset-key") && stderr.contains(why),
            "{stderr}"
        );
    }
    let _ = std::fs::remove_dir_all(dir);
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

/// CPUs in a `Cpus_allowed_list` value such as "0-2,5".
fn cpu_list(list: &str) -> Vec<usize> {
    let mut cpus = Vec::new();
    for part in list.trim().split(',').filter(|p| !p.is_empty()) {
        let (lo, hi) = part.split_once('-').unwrap_or((part, part));
        let (lo, hi): (usize, usize) = (
            lo.parse().expect("cpu number"),
            hi.parse().expect("cpu number"),
        );
        cpus.extend(lo..=hi);
    }
    cpus
}

/// The CPUs a task (`/proc/.../status`) may run on.
fn allowed_cpus_of(status: &std::path::Path) -> Vec<usize> {
    let status = std::fs::read_to_string(status).expect("status");
    let list = status
        .lines()
        .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
        .expect("Cpus_allowed_list");
    cpu_list(list)
}

/// `--pin-cpus`: worker `i` runs on allowed CPU `i` (modulo their number) and nowhere else.
/// With one allowed CPU a pinned worker looks like an unpinned one: what can be checked is
/// (each worker on that CPU, serving); the rest skips locally and fails under `CI=true`.
#[test]
fn pin_cpus_pins_each_worker_to_its_own_cpu() {
    if !kernel_supports_udpring() {
        return;
    }
    let allowed = allowed_cpus_of(std::path::Path::new("/proc/self/status"));
    assert!(!allowed.is_empty(), "this process may run somewhere");
    let (mut child, addr) =
        spawn_server(&["--workers", "2", "--pin-cpus", "--stats-interval", "0"]);
    // Workers pin themselves before they report ready, and udpring prints its address once
    // every worker is ready: the masks are final now.
    let mut workers = Vec::new();
    let tasks = std::fs::read_dir(format!("/proc/{}/task", child.id())).expect("tasks");
    for task in tasks.flatten() {
        let dir = task.path();
        let name = std::fs::read_to_string(dir.join("comm")).unwrap_or_default();
        if let Some(id) = name.trim().strip_prefix("udpring-w") {
            let id: usize = id.parse().expect("worker number");
            workers.push((id, allowed_cpus_of(&dir.join("status"))));
        }
    }
    let client = client_for(addr);
    let echoed = round_trip(&client, addr, b"pinned").map(|(reply, _)| reply);
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = wait_exit(&mut child, WAIT).expect("exits");
    assert!(status.success(), "{status:?}");
    assert_eq!(
        echoed.as_deref(),
        Some(&b"pinned"[..]),
        "pinned workers serve"
    );
    workers.sort();
    let expected: Vec<(usize, Vec<usize>)> = (0..2)
        .map(|id| (id, vec![allowed[id % allowed.len()]]))
        .collect();
    assert_eq!(
        workers, expected,
        "each worker on its own allowed CPU (allowed: {allowed:?})"
    );
    if allowed.len() < 2 {
        skip_or_fail("one allowed CPU: pinned and unpinned workers cannot be told apart");
    }
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

/// Idle connections to the metrics port cost no thread and are closed after
/// `--metrics-timeout`; a scrape among them is answered (issue 14: 50 idle connections held
/// 50 threads).
#[test]
fn idle_metrics_connections_hold_no_thread_and_time_out() {
    if !kernel_supports_udpring() {
        return;
    }
    use std::io::Write;
    use std::net::TcpStream;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port")
        .port();
    let metrics: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
    let (mut child, _addr) = spawn_server(&[
        "--workers",
        "1",
        "--metrics",
        &metrics.to_string(),
        "--metrics-timeout",
        "1s",
    ]);
    let threads = || {
        std::fs::read_dir(format!("/proc/{}/task", child.id()))
            .expect("tasks")
            .count()
    };
    let scrape = || -> String {
        let mut s = TcpStream::connect_timeout(&metrics, WAIT).expect("metrics port");
        s.set_read_timeout(Some(WAIT)).expect("timeout");
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .expect("request");
        let mut body = String::new();
        s.read_to_string(&mut body).expect("response");
        body
    };
    assert!(scrape().starts_with("HTTP/1.0 200"));
    let before = threads();
    let idle: Vec<TcpStream> = (0..60)
        .map(|_| {
            let s = TcpStream::connect_timeout(&metrics, WAIT).expect("connect");
            s.set_read_timeout(Some(WAIT)).expect("timeout");
            s
        })
        .collect();
    // Answered after the 60 (connections are accepted in order), within the read timeout.
    let body = scrape();
    let during = threads();
    assert!(body.starts_with("HTTP/1.0 200"), "{body}");
    assert!(
        during <= before,
        "60 idle connections: {during} threads, {before} before"
    );
    for mut s in idle {
        let mut got = Vec::new();
        s.read_to_end(&mut got)
            .expect("closed by the server within the deadline");
        assert!(got.is_empty(), "closed unanswered");
    }
    let body = scrape();
    // SAFETY: kill(2) on our own child's PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    wait_exit(&mut child, Duration::from_secs(5)).expect("exits");
    assert!(
        body.contains("udpring_metrics_connections_timed_out_total 60\n"),
        "{body}"
    );
}
