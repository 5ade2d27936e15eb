//! Deferred replies racing shutdown: every `SessionHandle::send` that returns `Ok` is either
//! queued for the kernel or counted by the worker; none vanishes (issue 8, finding 5).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use parking_lot::Mutex;
use udpring::{
    Datagram, Reply, ServerConfig, SessionHandle, SessionHandler, SessionInfo, SessionMode,
};

use crate::common::*;

/// Keeps a handle to every session it sees.
struct Keep {
    handles: Arc<Mutex<Vec<SessionHandle>>>,
}

impl SessionHandler for Keep {
    type State = ();
    fn session_open(&mut self, _: &SessionInfo) {}
    fn session_datagram(&mut self, _: &mut (), _: &Datagram<'_>, reply: &mut Reply<'_>) {
        if let Some(handle) = reply.session_handle() {
            self.handles.lock().push(handle);
        }
    }
}

#[test]
fn deferred_replies_posted_during_shutdown_are_sent_or_refused() {
    if !kernel_supports_udpring() {
        return;
    }
    for round in 0..5 {
        let handles: Arc<Mutex<Vec<SessionHandle>>> = Arc::default();
        let h2 = handles.clone();
        let server = start(
            ServerConfig {
                // No anti-amplification budget: every deferred reply may be sent.
                amplification_factor: 0,
                sessions: SessionMode::Shared,
                ..config("127.0.0.1:0", 1)
            },
            move |_| Keep {
                handles: h2.clone(),
            },
        );
        let to = server.local_addr();
        let client = client_for(to);
        client.send_to(b"open", to).expect("send");
        assert!(
            wait_until(WAIT, || !handles.lock().is_empty()),
            "session opened"
        );
        let handle = handles.lock()[0].clone();
        let stop = Arc::new(AtomicBool::new(false));
        let posters: Vec<_> = (0..3)
            .map(|_| {
                let handle = handle.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut accepted, mut refused) = (0u64, 0u64);
                    // Keeps posting across the whole shutdown, and a little after it.
                    while !stop.load(Ordering::Acquire) {
                        match handle.send(b"late") {
                            Ok(()) => accepted += 1,
                            Err(_) => refused += 1,
                        }
                    }
                    (accepted, refused)
                })
            })
            .collect();
        // Let some replies through before shutting down in the middle of the stream.
        assert!(wait_until(WAIT, || server.total_counters().deferred_sent > 100));
        let stats = server.shutdown().expect("shutdown");
        stop.store(true, Ordering::Release);
        let (accepted, refused) = posters
            .into_iter()
            .map(|t| t.join().expect("poster"))
            .fold((0, 0), |(a, r), (x, y)| (a + x, r + y));
        let s = &stats[0];
        assert_eq!(
            s.deferred_sent + s.deferred_dropped + s.send_dropped,
            accepted,
            "round {round}: every accepted deferred reply is queued or counted ({})",
            s.summary()
        );
        assert!(refused > 0, "posts after the stop are refused");
    }
}

/// Echoes after a short busy wait, so that datagrams pile up in the worker's backlog.
struct SlowEcho;

impl udpring::Handler for SlowEcho {
    fn on_datagram(&mut self, datagram: &Datagram<'_>, reply: &mut Reply<'_>) {
        let until = std::time::Instant::now() + std::time::Duration::from_micros(20);
        while std::time::Instant::now() < until {
            std::hint::spin_loop();
        }
        let _ = reply.send(datagram.payload);
    }
}

/// Shutdown answers every datagram the worker had already received (those waiting in its
/// backlog when the signal came included) before it closes the sessions and exits.
#[test]
fn shutdown_answers_everything_already_received() {
    if !kernel_supports_udpring() {
        return;
    }
    for mode in [SessionMode::None, SessionMode::Shared] {
        let server = start(
            ServerConfig {
                sessions: mode,
                ..config("127.0.0.1:0", 1)
            },
            |_| SlowEcho,
        );
        let to = server.local_addr();
        let client = client_for(to);
        for i in 0..2_000u32 {
            client.send_to(&i.to_be_bytes(), to).expect("send");
        }
        // Shut down while the worker is still working through them.
        assert!(wait_until(WAIT, || server.total_counters().rx_datagrams > 50));
        let stats = server.shutdown().expect("shutdown");
        let s = &stats[0];
        assert!(s.rx_datagrams > 0);
        assert_eq!(
            s.tx_datagrams + s.send_errors + s.send_dropped,
            s.rx_datagrams,
            "{mode:?}: every datagram handed over was answered ({})",
            s.summary()
        );
    }
}
