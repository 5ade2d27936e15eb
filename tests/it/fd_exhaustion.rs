//! Descriptor exhaustion in `connected` mode recovers without a restart: while descriptors are
//! short, new peers are served without a socket of their own (counted); once idle sessions have
//! closed, new peers get their own sockets again. Runs alone in a process of its own
//! (`common::alone`), because it lowers the process's RLIMIT_NOFILE. Stress: `make stress`.

use std::net::UdpSocket;
use std::sync::Arc;
use std::time::Duration;

use crate::common::*;
use parking_lot::Mutex;
use udpring::{Datagram, Reply, ServerConfig, SessionHandler, SessionInfo, SessionMode};

struct Recorder(Arc<Mutex<Vec<bool>>>);
impl SessionHandler for Recorder {
    type State = ();
    fn session_open(&mut self, info: &SessionInfo) {
        self.0.lock().push(info.own_socket);
    }
    fn session_datagram(&mut self, _: &mut (), d: &Datagram<'_>, r: &mut Reply<'_>) {
        let _ = r.send(d.payload);
    }
}

fn set_nofile(soft: u64) {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a live, initialised rlimit.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim), 0);
        lim.rlim_cur = soft.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_NOFILE, &lim), 0);
    }
}

#[test]
#[ignore = "stress: make stress"]
fn descriptor_exhaustion_degrades_and_recovers() {
    if !alone(
        module_path!(),
        "descriptor_exhaustion_degrades_and_recovers",
    ) {
        return;
    }
    if !kernel_supports_udpring() {
        return;
    }
    let opened = Arc::new(Mutex::new(Vec::new()));
    let o2 = opened.clone();
    let server = start(
        ServerConfig {
            sessions: SessionMode::Connected,
            // Long enough that no session idles out (giving a descriptor back) while the
            // 100 clients are being served.
            idle_timeout: Duration::from_secs(1),
            ..config("127.0.0.1:0", 1)
        },
        move |_| Recorder(o2.clone()),
    );
    let to = server.local_addr();
    let clients: Vec<UdpSocket> = (0..100).map(|_| client_for(to)).collect();
    let mut original = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit with a live rlimit.
    unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut original) };
    // Room for 20 more descriptors: 20 sessions get sockets, 80 do not.
    set_nofile(open_fds() as u64 + 20);
    for (i, c) in clients.iter().enumerate() {
        let (reply, _) = round_trip(c, to, format!("client {i}").as_bytes())
            .unwrap_or_else(|| panic!("client {i} not served while descriptors are short"));
        assert_eq!(reply, format!("client {i}").as_bytes());
    }
    // Counters are published once per loop turn, maybe after the last reply left.
    assert!(
        wait_until(WAIT, || server.total_counters().sessions_opened == 100),
        "{}",
        server.total_counters().summary()
    );
    let c = server.total_counters();
    assert!(c.fd_exhausted >= 70, "{}", c.summary());
    drop(clients);
    // The sessions idle out and give their descriptors back; new peers get sockets again.
    assert!(
        wait_until(WAIT, || server.total_counters().sessions_open == 0),
        "{}",
        server.total_counters().summary()
    );
    let before = server.total_counters().fd_exhausted;
    opened.lock().clear();
    let fresh: Vec<UdpSocket> = (0..10).map(|_| client_for(to)).collect();
    for c in &fresh {
        round_trip(c, to, b"after recovery").expect("served");
    }
    assert!(
        wait_until(WAIT, || server.total_counters().sessions_opened == 110),
        "{}",
        server.total_counters().summary()
    );
    assert_eq!(server.total_counters().fd_exhausted, before);
    assert_eq!(opened.lock().iter().filter(|own| **own).count(), 10);
    set_nofile(original.rlim_cur);
    server.shutdown().expect("shutdown");
}
