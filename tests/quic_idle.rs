//! QUIC connections that go silent are closed by the server's idle timeout and drained:
//! connection state freed, descriptors back to their baseline. Alone in its test binary, so
//! no other test opens descriptors meanwhile.
#![cfg(feature = "quic")]

mod common;

use std::time::{Duration, Instant};

use udpring::quic::ALPN_ECHO;

use common::quic::*;
use common::*;

#[test]
fn idle_connections_close_and_resources_return_to_baseline() {
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
    let conns: Vec<quinn::Connection> = block_on(&rt, async {
        let mut conns = Vec::new();
        for n in 0..10 {
            let conn = endpoint
                .connect(addr, "localhost")
                .expect("connect")
                .await
                .expect("handshake");
            echo_once(&conn, n, 5000).await;
            conns.push(conn);
        }
        conns
    });
    assert_eq!(server.stats().accepted, 10);
    // Silent clients: the server's idle timeout (300 ms) closes, then drains, every one.
    let started = Instant::now();
    assert!(
        wait_until(WAIT, || server.stats().drained == 10),
        "drained: {:?}",
        server.stats()
    );
    assert!(started.elapsed() >= Duration::from_millis(250));
    assert_eq!(open_fds(), fds, "no descriptor per connection, none left");
    let timers = server.server.total_counters().handler_timers;
    assert!(timers > 0, "quinn's timers ran on the handler timer");
    drop(conns);
}
