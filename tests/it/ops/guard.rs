//! The instance guard: a second instance refuses, naming the owner.

use std::net::SocketAddr;

use crate::common::*;
use crate::ops::process::*;

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
