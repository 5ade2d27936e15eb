//! Handler timers and the sends a transport stack produces, end to end: `on_timer` is called
//! at the instant `next_timer` asks for (one timeout SQE, brought forward when the handler
//! moves its deadline earlier), a ready-made GSO train leaves as the same datagrams, ECN
//! codepoints are reported on receive and set on send, and shutdown drains an armed timer.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use parking_lot::Mutex;
use udpring::{Datagram, Handler, Reply, SendError, SendOptions, ServerConfig};

use crate::common::*;

/// On each datagram: remembers its peer and ECN mark and asks to be called back after the
/// delay the datagram names (ms, big-endian u16). On the timer: records when it was due and
/// when it was called, and sends the peer a ready-made train of three segments "<ecn>aaa",
/// "bbbb", "cc" marked ECT(0).
struct Delayed {
    peer: Option<(SocketAddr, u8)>,
    due: Option<Instant>,
    /// (due, called at) for every `on_timer` call, read by the test.
    calls: Arc<Mutex<Vec<(Instant, Instant)>>>,
}

impl Delayed {
    fn new(calls: Arc<Mutex<Vec<(Instant, Instant)>>>) -> Delayed {
        Delayed {
            peer: None,
            due: None,
            calls,
        }
    }
}

/// The payload that asks `Delayed` for a timer `ms` from now.
fn delay(ms: u16) -> [u8; 2] {
    ms.to_be_bytes()
}

impl Handler for Delayed {
    fn on_datagram(&mut self, d: &Datagram<'_>, _reply: &mut Reply<'_>) {
        let ms = d
            .payload
            .get(..2)
            .map_or(0, |b| u16::from_be_bytes([b[0], b[1]]));
        self.peer = Some((d.peer, d.ecn));
        let due = Instant::now() + Duration::from_millis(u64::from(ms));
        // Earliest wins: a later datagram with a shorter delay brings the timer forward.
        self.due = Some(self.due.map_or(due, |d| d.min(due)));
    }

    fn next_timer(&mut self) -> Option<Instant> {
        self.due
    }

    fn on_timer(&mut self, now: Instant, reply: &mut Reply<'_>) {
        // Recorded, not asserted here: a panic would end the worker, not this test.
        if let Some(due) = self.due.take() {
            self.calls.lock().push((due, now));
        }
        let Some((peer, ecn)) = self.peer else { return };
        let options = SendOptions {
            segment_size: Some(4),
            ecn: 2,
            ..SendOptions::default()
        };
        let _ = reply.send_to_with(peer, options, |buf| {
            buf[..10].copy_from_slice(b"0aaabbbbcc");
            buf[0] = b'0' + ecn;
            10
        });
    }
}

fn set_int(sock: &UdpSocket, level: i32, name: i32, value: i32) {
    // SAFETY: the option value points at a live local int of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            sock.as_raw_fd(),
            level,
            name,
            (&value as *const i32).cast(),
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    assert_eq!(rc, 0, "setsockopt {level}/{name}");
}

/// Receives one datagram with its ECN codepoint (the socket has IP_RECVTOS on).
fn recv_with_ecn(sock: &UdpSocket, limit: Duration) -> Option<(Vec<u8>, u8)> {
    sock.set_read_timeout(Some(limit)).ok()?;
    let mut buf = [0u8; 2048];
    let mut control = [0u64; 16];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: msghdr is plain data; every pointer set below points at a live local.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: `msg` points at live buffers of the lengths it declares.
    let n = unsafe { libc::recvmsg(sock.as_raw_fd(), &mut msg, 0) };
    if n < 0 {
        return None;
    }
    let mut ecn = 0;
    // SAFETY: the kernel wrote `msg_controllen` bytes of well-formed control messages into
    // `control`, which `msg` still describes; CMSG_FIRSTHDR/NXTHDR stay inside them.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_TOS {
                ecn = *libc::CMSG_DATA(c) & 0b11;
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    Some((buf[..n as usize].to_vec(), ecn))
}

/// A timer asked for in 60 s, then brought forward to 60 ms by a second datagram: it fires
/// once, never before its deadline (the handler is called at or after the instant it asked
/// for, and the train reaches the client no sooner than 60 ms after the second datagram left),
/// and within [`WAIT`] of it, far before the 60 s the first datagram asked for: only the
/// earlier deadline can explain the train.
#[test]
fn the_timer_fires_at_the_deadline_and_sends_a_marked_train() {
    if !kernel_supports_udpring() {
        return;
    }
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c2 = calls.clone();
    let config = ServerConfig {
        ecn: true,
        ..config("127.0.0.1:0", 1)
    };
    let server = start(config, move |_| Delayed::new(c2.clone()));
    let client = client_for(server.local_addr());
    set_int(&client, libc::IPPROTO_IP, libc::IP_RECVTOS, 1);
    // ECT(1) on what the client sends: the handler sees it.
    set_int(&client, libc::IPPROTO_IP, libc::IP_TOS, 1);

    client
        .send_to(&delay(60_000), server.local_addr())
        .expect("send");
    // The counters are published at the end of the turn that handled the datagram, and that
    // turn armed the 60 s timeout: the next datagram finds it armed.
    assert!(
        wait_until(WAIT, || server.total_counters().rx_datagrams == 1),
        "the first datagram was handled: {}",
        server.total_counters().summary()
    );
    let asked = Instant::now();
    client
        .send_to(&delay(60), server.local_addr())
        .expect("send");
    let mut got = Vec::new();
    for i in 0..3 {
        let segment = recv_with_ecn(&client, WAIT).unwrap_or_else(|| {
            panic!(
                "segment {i} of the train within {WAIT:?} of a 60 ms timer: {}",
                server.total_counters().summary()
            )
        });
        got.push(segment);
    }
    let elapsed = asked.elapsed();
    assert!(
        elapsed >= Duration::from_millis(60),
        "the train left before the 60 ms deadline: {elapsed:?}"
    );
    assert_eq!(
        got,
        vec![
            (b"1aaa".to_vec(), 2),
            (b"bbbb".to_vec(), 2),
            (b"cc".to_vec(), 2)
        ],
        "one ready-made train, the same datagrams, ECT(0) on each; ECT(1) was seen"
    );
    // The send's completion is counted (and published) a turn after the client may have read.
    assert!(
        wait_until(WAIT, || server.total_counters().tx_datagrams == 3),
        "{}",
        server.total_counters().summary()
    );
    let finals = sum(&server.shutdown().expect("clean shutdown"));
    let calls = calls.lock();
    assert_eq!(calls.len(), 1, "one call for one deadline: {calls:?}");
    let (due, called) = calls[0];
    assert!(called >= due, "called {:?} early", due - called);
    assert!(
        due >= asked + Duration::from_millis(60),
        "the earlier deadline is the one met"
    );
    assert_eq!(finals.handler_timers, 1, "{}", finals.summary());
    assert_eq!(finals.gso_trains, 1, "{}", finals.summary());
    assert_eq!(finals.tx_datagrams, 3, "{}", finals.summary());
}

/// A timer armed for 60 s, and a drain deadline of 60 s: shutdown cancels the timeout and
/// ends within [`WAIT`], without calling the handler's timer. Waiting for either the timer or
/// the drain deadline would take a minute.
#[test]
fn shutdown_drains_an_armed_timer() {
    if !kernel_supports_udpring() {
        return;
    }
    let calls = Arc::new(Mutex::new(Vec::new()));
    let c2 = calls.clone();
    let server = start(
        ServerConfig {
            shutdown_timeout: Duration::from_secs(60),
            ..config("127.0.0.1:0", 1)
        },
        move |_| Delayed::new(c2.clone()),
    );
    let client = client_for(server.local_addr());
    client
        .send_to(&delay(60_000), server.local_addr())
        .expect("send");
    // Published at the end of the turn that armed the timeout.
    assert!(wait_until(WAIT, || server.total_counters().rx_datagrams == 1));
    let started = Instant::now();
    let finals = server.shutdown().expect("clean shutdown");
    let took = started.elapsed();
    assert!(
        took < WAIT,
        "shutdown waited on the armed timer or its own deadline: {took:?}"
    );
    assert!(calls.lock().is_empty(), "on_timer during shutdown");
    assert_eq!(finals[0].handler_timers, 0);
}

/// A datagram "timer" asks for the timer at once; the timer sends twice through its `Reply`,
/// which has no datagram to answer (recording what each send returned). Every other datagram
/// is answered three times (all an unvalidated peer may have), which the worker sends as one
/// GSO train.
struct Unaddressed {
    due: Option<Instant>,
    told: Arc<Mutex<Vec<Result<(), SendError>>>>,
}

impl Handler for Unaddressed {
    fn on_datagram(&mut self, d: &Datagram<'_>, reply: &mut Reply<'_>) {
        if d.payload == b"timer" {
            self.due = Some(Instant::now());
            return;
        }
        for _ in 0..3 {
            let _ = reply.send(d.payload);
        }
    }

    fn next_timer(&mut self) -> Option<Instant> {
        self.due
    }

    fn on_timer(&mut self, _now: Instant, reply: &mut Reply<'_>) {
        self.due = None;
        let told = [reply.send(b"to nobody"), reply.send(b"to nobody")];
        self.told.lock().extend(told);
    }
}

/// Issue 14, defect 3: `send` from a timer went to `0.0.0.0:0`; the two sends formed a train,
/// the kernel said EINVAL, and the worker switched GSO off for good, for every peer.
#[test]
fn sends_with_no_destination_are_refused_and_gso_stays_on() {
    if !kernel_supports_udpring() {
        return;
    }
    let told = Arc::new(Mutex::new(Vec::new()));
    let record = told.clone();
    let server = start(config("127.0.0.1:0", 1), move |_| Unaddressed {
        due: None,
        told: record.clone(),
    });
    let client = client_for(server.local_addr());
    client.send_to(b"timer", server.local_addr()).unwrap();
    // The timer's two sends are done with: refused (send_dropped) or, before the fix, sent
    // and refused by the kernel (send_errors).
    assert!(
        wait_until(WAIT, || {
            let c = server.total_counters();
            told.lock().len() == 2 && c.send_dropped + c.send_errors >= 2
        }),
        "{}",
        server.total_counters().summary()
    );
    client.send_to(b"ping", server.local_addr()).unwrap();
    let mut buf = [0u8; 64];
    for i in 0..3 {
        let (n, _) = recv_within(&client, &mut buf, WAIT)
            .unwrap_or_else(|e| panic!("answer {i}: {e}: {}", server.total_counters().summary()));
        assert_eq!(&buf[..n], b"ping", "answer {i}");
    }
    // The completion is counted (and published) a turn after the client may have read.
    assert!(
        wait_until(WAIT, || server.total_counters().tx_datagrams == 3),
        "{}",
        server.total_counters().summary()
    );
    let c = server.shutdown().expect("shutdown")[0];
    assert_eq!(
        c.gso_trains,
        1,
        "the three answers went as one train: {}",
        c.summary()
    );
    assert_eq!((c.gso_refused, c.send_errors), (0, 0), "{}", c.summary());
    assert_eq!(c.send_dropped, 2, "{}", c.summary());
    assert_eq!(
        *told.lock(),
        vec![Err(SendError::NoDestination); 2],
        "the handler was told"
    );
}

/// A handler that wants its timer from the start, before any datagram: counts its calls.
struct DueAtStart {
    due: Option<Instant>,
    fired: Arc<AtomicU64>,
}

impl Handler for DueAtStart {
    fn on_datagram(&mut self, _d: &Datagram<'_>, _reply: &mut Reply<'_>) {}

    fn next_timer(&mut self) -> Option<Instant> {
        self.due
    }

    fn on_timer(&mut self, _now: Instant, _reply: &mut Reply<'_>) {
        self.due = None;
        self.fired.fetch_add(1, Ordering::Relaxed);
    }
}

/// A deadline the handler has at start is honoured with no traffic at all (it used to wait
/// for the first completion: the loop blocked before it ever asked `next_timer`).
#[test]
fn a_timer_wanted_at_start_fires_without_any_traffic() {
    if !kernel_supports_udpring() {
        return;
    }
    let fired = Arc::new(AtomicU64::new(0));
    let counter = fired.clone();
    let server = start(config("127.0.0.1:0", 1), move |_| DueAtStart {
        due: Some(Instant::now() + Duration::from_millis(20)),
        fired: counter.clone(),
    });
    assert!(
        wait_until(WAIT, || fired.load(Ordering::Relaxed) == 1),
        "the timer never fired: {}",
        server.total_counters().summary()
    );
    let finals = server.shutdown().expect("clean shutdown");
    assert_eq!(finals[0].handler_timers, 1);
    assert_eq!(finals[0].rx_datagrams, 0);
}
