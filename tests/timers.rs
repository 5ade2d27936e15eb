//! Handler timers and the sends a transport stack produces, end to end: `on_timer` is called
//! at the instant `next_timer` asks for (one timeout SQE, brought forward when the handler
//! moves its deadline earlier), a ready-made GSO train leaves as the same datagrams, ECN
//! codepoints are reported on receive and set on send, and shutdown drains an armed timer.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use udpring::{Datagram, Handler, Reply, SendOptions, ServerConfig};

use common::*;

/// On each datagram: remembers its peer and ECN mark and asks to be called back after the
/// delay the datagram names (ms, one byte). On the timer: sends the peer a ready-made train
/// of three segments "<ecn>aaa", "bbbb", "cc" marked ECT(0).
struct Delayed {
    peer: Option<(SocketAddr, u8)>,
    due: Option<Instant>,
    fired: Arc<AtomicU64>,
}

impl Handler for Delayed {
    fn on_datagram(&mut self, d: &Datagram<'_>, _reply: &mut Reply<'_>) {
        let delay = Duration::from_millis(u64::from(d.payload.first().copied().unwrap_or(0)));
        self.peer = Some((d.peer, d.ecn));
        let due = Instant::now() + delay;
        // Earliest wins: a later datagram with a shorter delay brings the timer forward.
        self.due = Some(self.due.map_or(due, |d| d.min(due)));
    }

    fn next_timer(&mut self) -> Option<Instant> {
        self.due
    }

    fn on_timer(&mut self, now: Instant, reply: &mut Reply<'_>) {
        assert!(self.due.is_some_and(|d| d <= now), "never called early");
        self.due = None;
        self.fired.fetch_add(1, Ordering::Relaxed);
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

#[test]
fn the_timer_fires_at_the_deadline_and_sends_a_marked_train() {
    if !kernel_supports_udpring() {
        return;
    }
    let fired = Arc::new(AtomicU64::new(0));
    let counter = fired.clone();
    let config = ServerConfig {
        ecn: true,
        ..config("127.0.0.1:0", 1)
    };
    let server = start(config, move |_| Delayed {
        peer: None,
        due: None,
        fired: counter.clone(),
    });
    let client = client_for(server.local_addr());
    set_int(&client, libc::IPPROTO_IP, libc::IP_RECVTOS, 1);
    // ECT(1) on what the client sends: the handler sees it.
    set_int(&client, libc::IPPROTO_IP, libc::IP_TOS, 1);

    // Ask for 200 ms, then for 60 ms: the armed timeout is brought forward.
    let sent = Instant::now();
    client.send_to(&[200], server.local_addr()).unwrap();
    std::thread::sleep(Duration::from_millis(5)); // two turns, so the first arms alone
    client.send_to(&[60], server.local_addr()).unwrap();
    let mut got = Vec::new();
    for _ in 0..3 {
        got.push(recv_with_ecn(&client, WAIT).expect("a segment of the train"));
    }
    let elapsed = sent.elapsed();
    assert!(
        elapsed >= Duration::from_millis(60) && elapsed < Duration::from_millis(190),
        "the earlier deadline was met: {elapsed:?}"
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
    assert_eq!(fired.load(Ordering::Relaxed), 1);
    // The send's completion is counted (and published) a turn after the client may have read.
    assert!(wait_until(WAIT, || server.total_counters().tx_datagrams == 3));
    let stats = server.total_counters();
    assert_eq!(stats.handler_timers, 1);
    assert_eq!(stats.gso_trains, 1);
}

#[test]
fn shutdown_drains_an_armed_timer() {
    if !kernel_supports_udpring() {
        return;
    }
    let fired = Arc::new(AtomicU64::new(0));
    let counter = fired.clone();
    let server = start(config("127.0.0.1:0", 1), move |_| Delayed {
        peer: None,
        due: None,
        fired: counter.clone(),
    });
    let client = client_for(server.local_addr());
    client.send_to(&[250], server.local_addr()).unwrap();
    assert!(wait_until(WAIT, || server.total_counters().rx_datagrams == 1));
    let started = Instant::now();
    let finals = server.shutdown().expect("clean shutdown");
    assert!(
        started.elapsed() < Duration::from_millis(800),
        "no timeout wait"
    );
    assert_eq!(fired.load(Ordering::Relaxed), 0);
    assert_eq!(finals[0].handler_timers, 0);
}
