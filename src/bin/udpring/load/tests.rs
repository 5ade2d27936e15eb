//! Unit tests of the load generator's argument checks and request accounting.

use super::*;

/// An echo thread on loopback (a main and another socket), stopped when the returned
/// flag is set. `answer` gets each request, its source and whether it came to the main
/// socket, and returns the socket to reply from (0 main, 1 other; `None` drops it).
fn echo_thread<F>(
    mut answer: F,
) -> (
    SocketAddr,
    std::sync::Arc<std::sync::atomic::AtomicBool>,
    std::thread::JoinHandle<()>,
)
where
    F: FnMut(&[u8], SocketAddr, bool) -> Option<usize> + Send + 'static,
{
    let main = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
    let other = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
    main.set_nonblocking(true).expect("non-blocking");
    other.set_nonblocking(true).expect("non-blocking");
    let target = main.local_addr().expect("bound socket has an address");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let h = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            let mut idle = true;
            for (on_main, s) in [(true, &main), (false, &other)] {
                if let Ok((n, from)) = s.recv_from(&mut buf) {
                    idle = false;
                    match answer(&buf[..n], from, on_main) {
                        Some(0) => drop(main.send_to(&buf[..n], from)),
                        Some(_) => drop(other.send_to(&buf[..n], from)),
                        None => {}
                    }
                }
            }
            if idle {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    });
    (target, stop, h)
}

fn test_args(target: SocketAddr) -> LoadArgs {
    LoadArgs {
        target,
        clients: 4,
        window: 2,
        size: 32,
        duration: Duration::from_millis(300),
        requests: None,
        rate: None,
        proto: Proto::Echo,
        timeout: Duration::from_millis(20),
        retries: 6,
        json: true,
        quiet: true,
        warmup: Duration::ZERO,
        max_timeout: Some(Duration::from_millis(40)),
        settle: false,
        follow_reply_port: false,
        gso: None,
    }
}

/// --settle: the first copy of every request is dropped, yet every request is answered
/// and none is left outstanding.
#[test]
fn settle_answers_every_request_despite_loss() {
    let mut seen = std::collections::HashSet::new();
    let (target, stop, h) = echo_thread(move |req, from, _| {
        let key = (req[..12].to_vec(), from);
        seen.insert(key).then_some(()).map_or(Some(0), |()| None)
    });
    let args = LoadArgs {
        requests: Some(200),
        settle: true,
        ..test_args(target)
    };
    let r = run(&args).expect("load run");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    h.join().expect("echo thread");
    assert_eq!(r.sent, 200, "{r}");
    assert_eq!(r.answered, 200, "{r}");
    assert_eq!((r.given_up, r.outstanding), (0, 0), "{r}");
    assert!(r.retransmitted >= 200, "{r}");
}

/// --gso: trains reach a plain socket as single datagrams (the kernel segments them);
/// with the first copy of every request dropped, the single resends still settle every
/// request exactly once.
#[test]
fn gso_trains_and_single_resends_settle_every_request() {
    let mut seen = std::collections::HashSet::new();
    let (target, stop, h) = echo_thread(move |req, from, _| {
        let key = (req[..12].to_vec(), from);
        seen.insert(key).then_some(()).map_or(Some(0), |()| None)
    });
    let args = LoadArgs {
        requests: Some(300),
        settle: true,
        window: 21,
        gso: Some(8),
        ..test_args(target)
    };
    let r = run(&args).expect("load run");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    h.join().expect("echo thread");
    assert_eq!((r.sent, r.answered), (300, 300), "{r}");
    assert_eq!((r.given_up, r.outstanding), (0, 0), "{r}");
    assert!(r.retransmitted >= 300, "{r}");
}

/// --follow-reply-port: the server answers the first request of a client from its main
/// port's sibling and expects everything after it there (like port-per-client).
#[test]
fn follow_reply_port_switches_to_the_reply_source() {
    let mut switched = std::collections::HashSet::new();
    let mut wrong = 0u64;
    let wrong_seen = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
    let w2 = wrong_seen.clone();
    // Requests on the main port from a peer already answered from the other port are
    // counted as wrong (but still answered, from the other port).
    let (target, stop, h) = echo_thread(move |_req, from, on_main| {
        if on_main && !switched.insert(from) {
            wrong += 1;
            w2.store(wrong, std::sync::atomic::Ordering::Relaxed);
        }
        Some(1)
    });
    let args = LoadArgs {
        requests: Some(400),
        settle: true,
        follow_reply_port: true,
        window: 1,
        ..test_args(target)
    };
    let r = run(&args).expect("load run");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    h.join().expect("echo thread");
    assert_eq!((r.answered, r.given_up, r.outstanding), (400, 0, 0), "{r}");
    // With window 1 each client sends a new request to the main port only once; resends
    // (none expected on an idle loopback) also go there.
    let wrong = wrong_seen.load(std::sync::atomic::Ordering::Relaxed);
    assert!(
        wrong <= r.retransmitted,
        "{wrong} requests to the main port; {r}"
    );
}

/// End to end against an in-process echo thread on loopback (bounded: 300 ms).
#[test]
fn closed_loop_against_echo_thread() {
    let server = std::net::UdpSocket::bind("127.0.0.1:0").expect("bind loopback");
    server
        .set_read_timeout(Some(Duration::from_millis(50)))
        .expect("set timeout");
    let target = server.local_addr().expect("bound socket has an address");
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let stop2 = stop.clone();
    let h = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while !stop2.load(std::sync::atomic::Ordering::Relaxed) {
            if let Ok((n, from)) = server.recv_from(&mut buf) {
                let _ = server.send_to(&buf[..n], from);
            }
        }
    });
    let args = LoadArgs {
        proto: Proto::Sockperf,
        timeout: Duration::from_millis(100),
        retries: 2,
        max_timeout: None,
        ..test_args(target)
    };
    let r = run(&args).expect("load run");
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    h.join().expect("echo thread");
    assert!(r.answered > 0, "{r}");
    assert!(r.invariant_ok(), "{r}");
}
