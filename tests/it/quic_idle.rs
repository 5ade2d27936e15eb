//! QUIC connections that go silent are closed by the server's idle timeout and drained:
//! connection state freed, descriptors back to their baseline. Runs alone in a process of its own
//! (`common::alone`), so no other test opens descriptors meanwhile.
#![cfg(feature = "quic")]

use std::time::{Duration, Instant};

use udpring::quic::ALPN_ECHO;

use crate::common::quic::*;
use crate::common::*;

#[test]
fn idle_connections_close_and_resources_return_to_baseline() {
    if !alone(
        module_path!(),
        "idle_connections_close_and_resources_return_to_baseline",
    ) {
        return;
    }
    if !kernel_supports_udpring() {
        return;
    }
    let server = QuicServer::start(1, false, Duration::from_millis(300), None);
    let rt = runtime();
    let endpoint = {
        let _guard = rt.enter();
        client(&server.cert, ALPN_ECHO)
    };
    let fds = open_fds();
    let addr = server.addr();
    // `last_echo`: taken before the last connection's echo, so before the last datagram the
    // server gets from it. However slowly the loop runs (earlier connections may idle out
    // during it), that connection cannot close sooner than its idle timeout after this.
    let (conns, last_echo): (Vec<quinn::Connection>, Instant) = block_on(&rt, async {
        let mut conns = Vec::new();
        let mut last_echo = Instant::now();
        for n in 0..10 {
            let conn = endpoint
                .connect(addr, "localhost")
                .expect("connect")
                .await
                .expect("handshake");
            last_echo = Instant::now();
            echo_once(&conn, n, 5000).await;
            conns.push(conn);
        }
        (conns, last_echo)
    });
    assert_eq!(server.stats().accepted, 10);
    // Silent clients: the server's idle timeout (300 ms) closes, then drains, every one.
    assert!(
        wait_until(WAIT, || server.stats().drained == 10),
        "drained: {:?}",
        server.stats()
    );
    let quiet_for = last_echo.elapsed();
    assert!(
        quiet_for >= Duration::from_millis(300),
        "the last connection closed {quiet_for:?} after its echo began, within its idle timeout"
    );
    assert_eq!(open_fds(), fds, "no descriptor per connection, none left");
    let timers = server.server.total_counters().handler_timers;
    assert!(timers > 0, "quinn's timers ran on the handler timer");
    drop(conns);
}
