//! systemd socket activation, with `systemd-socket-activate`.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use crate::ops::process::*;

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
    // udpring's own sockets on the port (the activator execs udpring in place, so its pid is
    // udpring's): another test may bind the released port too, which is not udpring's doing.
    let inodes: std::collections::HashSet<String> =
        std::fs::read_dir(format!("/proc/{}/fd", activator.id()))
            .map(|dir| {
                dir.filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
                    .filter_map(|l| {
                        let l = l.to_string_lossy().into_owned();
                        Some(l.strip_prefix("socket:[")?.strip_suffix(']')?.to_string())
                    })
                    .collect()
            })
            .unwrap_or_default();
    let sockets_on_port = std::fs::read_to_string("/proc/net/udp")
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            let fields: Vec<&str> = l.split_whitespace().collect();
            fields
                .get(1)
                .is_some_and(|a| a.ends_with(&format!(":{port:04X}")))
                && fields.get(9).is_some_and(|inode| inodes.contains(*inode))
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

/// What a child process (this test binary, re-run with one test) checks about
/// `listen_fds`, which takes the passed descriptors once per process: so each case needs a
/// process of its own, with sockets on descriptors 3 and 4 as systemd passes them.
const CHILD_CASE: &str = "UDPRING_LISTEN_FDS_CASE";

/// Runs [`listen_fds_child`] in a fresh process with two UDP sockets as descriptors 3 and 4.
fn run_listen_fds_case(case: &str) {
    use std::os::fd::AsRawFd;
    use std::os::unix::process::CommandExt;

    let sockets: Vec<UdpSocket> = (0..2)
        .map(|_| UdpSocket::bind("127.0.0.1:0").expect("bind"))
        .collect();
    // Moved out of the way first (high numbers, close-on-exec), so that placing one on 3
    // cannot overwrite the other.
    let high: Vec<i32> = sockets
        .iter()
        // SAFETY: F_DUPFD_CLOEXEC duplicates a descriptor these sockets own.
        .map(|s| unsafe { libc::fcntl(s.as_raw_fd(), libc::F_DUPFD_CLOEXEC, 100) })
        .collect();
    assert!(high.iter().all(|&fd| fd >= 100));
    let mut cmd = Command::new(std::env::current_exe().expect("this test binary"));
    // The child test's name below the crate root (`ops::activation::listen_fds_child`).
    let child_test = format!(
        "{}::listen_fds_child",
        module_path!().split_once("::").map_or("", |(_, m)| m)
    );
    cmd.args([child_test.as_str(), "--exact", "--nocapture"])
        .args(["--test-threads", "1"])
        .env(CHILD_CASE, case)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let (a, b) = (high[0], high[1]);
    // SAFETY: between fork and exec the closure calls only dup2(2), which is
    // async-signal-safe, on descriptors open in the parent (`a`, `b`).
    unsafe {
        cmd.pre_exec(move || {
            if libc::dup2(a, 3) != 3 || libc::dup2(b, 4) != 4 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let mut child = cmd.spawn().expect("child starts");
    for fd in high {
        // SAFETY: closes the duplicates made above, which nothing else owns.
        unsafe { libc::close(fd) };
    }
    let stdout = drain(child.stdout.take().expect("stdout"));
    let stderr = drain(child.stderr.take().expect("stderr"));
    let mut status = None;
    wait_until(WAIT, || {
        status = child.try_wait().expect("try_wait");
        status.is_some()
    });
    if status.is_none() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let (stdout, stderr) = (
        stdout.join().unwrap_or_default(),
        stderr.join().unwrap_or_default(),
    );
    assert!(
        status.is_some_and(|s| s.success()),
        "case {case}: {status:?}\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains(&format!("listen_fds case {case} checked")),
        "the child ran the case:\n{stdout}\n{stderr}"
    );
}

/// A second call takes nothing and closes nothing: after the first owner closed 3 and 4 and
/// the number 3 went to a new file, a second call (even with the variables set again) leaves
/// that file open.
#[test]
fn listen_fds_takes_the_descriptors_once() {
    run_listen_fds_case("twice");
}

/// A descriptor missing in the range is an error that takes nothing: the ones before it stay
/// open, and a later call takes nothing either.
#[test]
fn listen_fds_error_closes_nothing() {
    run_listen_fds_case("missing");
}

fn is_open(fd: i32) -> bool {
    // SAFETY: fcntl(F_GETFD) only inspects the descriptor number.
    unsafe { libc::fcntl(fd, libc::F_GETFD) != -1 }
}

/// The child's side of [`run_listen_fds_case`]; does nothing in an ordinary test run.
#[test]
fn listen_fds_child() {
    let Ok(case) = std::env::var(CHILD_CASE) else {
        return;
    };
    use udpring::ops::activation::listen_fds;
    assert!(
        is_open(3) && is_open(4),
        "the parent placed sockets on 3 and 4"
    );
    let pid = std::process::id().to_string();
    // This process runs this one test on one thread: nothing else reads the environment.
    std::env::set_var("LISTEN_PID", &pid);
    match case.as_str() {
        "twice" => {
            std::env::set_var("LISTEN_FDS", "2");
            std::env::set_var("LISTEN_FDNAMES", "first:second");
            let passed = listen_fds().expect("first call").expect("activated");
            assert_eq!(passed.fds.len(), 2);
            assert_eq!(passed.names, ["first", "second"]);
            for var in ["LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"] {
                assert!(std::env::var_os(var).is_none(), "{var} unset");
            }
            drop(passed);
            assert!(!is_open(3) && !is_open(4), "the owner closed them");
            let file = std::fs::File::open("/dev/null").expect("open");
            use std::os::fd::AsRawFd;
            let reused = file.as_raw_fd();
            assert_eq!(reused, 3, "the lowest free number");
            std::env::set_var("LISTEN_PID", &pid);
            std::env::set_var("LISTEN_FDS", "2");
            assert!(
                matches!(listen_fds(), Ok(None)),
                "the second call takes nothing"
            );
            assert!(is_open(reused), "and closes nothing");
            file.metadata().expect("the file is still this process's");
        }
        "missing" => {
            let missing = (5..).find(|&fd| !is_open(fd)).expect("a closed number");
            std::env::set_var("LISTEN_FDS", (missing - 3 + 1).to_string());
            let e = listen_fds().expect_err("a descriptor is not open");
            assert!(
                e.to_string()
                    .contains(&format!("descriptor {missing} is not open")),
                "{e}"
            );
            assert!(is_open(3) && is_open(4), "the error closed nothing");
            std::env::set_var("LISTEN_PID", &pid);
            std::env::set_var("LISTEN_FDS", "2");
            assert!(matches!(listen_fds(), Ok(None)), "nothing is taken later");
            assert!(is_open(3) && is_open(4));
        }
        other => panic!("unknown case {other}"),
    }
    println!("listen_fds case {case} checked");
}
