//! systemd socket activation, with `systemd-socket-activate`.

use std::net::{SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::common::*;
use crate::process::*;

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
