//! Idle sessions close on their timeout SQE and the process's descriptors return to their
//! baseline. Runs alone in a process of its own (`common::alone`): counting `/proc/self/fd`
//! while other tests open sockets in the same process would be meaningless.

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use parking_lot::Mutex;
use udpring::session::CloseReason;
use udpring::{Datagram, Reply, ServerConfig, SessionHandler, SessionInfo, SessionMode};

#[test]
fn idle_sessions_close_and_descriptors_return_to_baseline() {
    if !alone(
        module_path!(),
        "idle_sessions_close_and_descriptors_return_to_baseline",
    ) {
        return;
    }
    if !kernel_supports_udpring() {
        return;
    }
    for mode in [SessionMode::Connected, SessionMode::PortPerClient] {
        // Whether each session got a socket of its own, and why each closed.
        let opens = Arc::new(Mutex::new(Vec::new()));
        let closes = Arc::new(Mutex::new(Vec::new()));
        struct Recorder {
            opens: Arc<Mutex<Vec<bool>>>,
            closes: Arc<Mutex<Vec<CloseReason>>>,
        }
        impl SessionHandler for Recorder {
            type State = ();
            fn session_open(&mut self, info: &SessionInfo) {
                self.opens.lock().push(info.own_socket);
            }
            fn session_datagram(&mut self, _: &mut (), d: &Datagram<'_>, r: &mut Reply<'_>) {
                let _ = r.send(d.payload);
            }
            fn session_close(&mut self, _: (), _: &SessionInfo, reason: CloseReason) {
                self.closes.lock().push(reason);
            }
        }
        let (o2, c2) = (opens.clone(), closes.clone());
        let server = start(
            ServerConfig {
                idle_timeout: Duration::from_millis(200),
                ..session_config(mode, 1)
            },
            move |_| Recorder {
                opens: o2.clone(),
                closes: c2.clone(),
            },
        );
        let to = server.local_addr();
        let baseline = open_fds();
        {
            let clients: Vec<UdpSocket> = (0..100).map(|_| client_for(to)).collect();
            for (i, c) in clients.iter().enumerate() {
                round_trip(c, to, b"hi").unwrap_or_else(|| panic!("{mode:?}: client {i}"));
            }
        }
        // Every session had a socket of its own (whether some have already idled out
        // depends on scheduling, so the descriptors are counted only once all have closed).
        let opens = opens.lock().clone();
        assert_eq!(opens.len(), 100, "{mode:?}");
        assert!(opens.iter().all(|own| *own), "{mode:?}: per-client sockets");
        assert!(
            wait_until(WAIT, || open_fds() <= baseline),
            "{mode:?}: descriptors back to {baseline}, now {}",
            open_fds()
        );
        assert!(
            wait_until(WAIT, || server.total_counters().closed_idle == 100),
            "{mode:?}: {}",
            server.total_counters().summary()
        );
        let c = server.total_counters();
        assert_eq!(c.sessions_open, 0, "{mode:?}: {}", c.summary());
        let closes = closes.lock();
        assert_eq!(closes.len(), 100, "{mode:?}");
        assert!(closes.iter().all(|r| *r == CloseReason::Idle), "{mode:?}");
        server.shutdown().expect("shutdown");
    }
}
