//! Idle sessions close on their timeout SQE and the process's descriptors return to their
//! baseline. Alone in its own test binary: counting `/proc/self/fd` while other tests open
//! sockets in the same process would be meaningless.

mod common;

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use parking_lot::Mutex;
use udpring::{
    CloseReason, Datagram, Reply, ServerConfig, SessionHandler, SessionInfo, SessionMode,
};

fn open_fds() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .map(|d| d.count())
        .unwrap_or(0)
}

fn session_config(mode: SessionMode, workers: usize) -> ServerConfig {
    ServerConfig {
        sessions: mode,
        ..config("127.0.0.1:0", workers)
    }
}

#[test]
fn idle_sessions_close_and_descriptors_return_to_baseline() {
    if !kernel_supports_udpring() {
        return;
    }
    for mode in [SessionMode::Connected, SessionMode::PortPerClient] {
        let closes = Arc::new(Mutex::new(Vec::new()));
        struct Recorder(Arc<Mutex<Vec<CloseReason>>>);
        impl SessionHandler for Recorder {
            type State = ();
            fn session_open(&mut self, _: &SessionInfo) {}
            fn session_datagram(&mut self, _: &mut (), d: &Datagram<'_>, r: &mut Reply<'_>) {
                let _ = r.send(d.payload);
            }
            fn session_close(&mut self, _: (), _: &SessionInfo, reason: CloseReason) {
                self.0.lock().push(reason);
            }
        }
        let c2 = closes.clone();
        let server = start(
            ServerConfig {
                idle_timeout: Duration::from_millis(200),
                ..session_config(mode, 1)
            },
            move |_| Recorder(c2.clone()),
        );
        let to = server.local_addr();
        let baseline = open_fds();
        {
            let clients: Vec<UdpSocket> = (0..100).map(|_| client_for(to)).collect();
            let mut buf = [0u8; 16];
            for c in &clients {
                round_trip(c, to, b"hi").expect("reply");
            }
            let _ = &mut buf;
            // 100 client sockets here and 100 per-client sockets in the server.
            assert!(
                open_fds() >= baseline + 200,
                "{mode:?}: per-client sockets exist"
            );
        }
        assert!(
            eventually(|| open_fds() <= baseline),
            "{mode:?}: descriptors back to {baseline}, now {}",
            open_fds()
        );
        let c = server.total_counters();
        assert_eq!(c.closed_idle, 100, "{mode:?}: {}", c.summary());
        assert_eq!(c.sessions_open, 0);
        assert!(closes.lock().iter().all(|r| *r == CloseReason::Idle));
        server.shutdown().expect("shutdown");
    }
}
