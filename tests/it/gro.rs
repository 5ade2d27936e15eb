//! UDP GRO receive and GSO replies end to end: clients that send GSO trains (as QUIC stacks
//! do) are answered datagram for datagram, in order; handlers may take whole trains; a full
//! reply pool pauses inside a train without dropping; a kernel that refuses a train with
//! EINVAL stops trains to that peer, counted, and its replies keep flowing one by one.

use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use udpring::apps::Echo;
use udpring::{Datagram, Handler, Reply, ServerConfig};

use crate::common::*;

/// Sends `datagrams` (all but the last of one size) as one UDP GSO train.
fn send_train(sock: &UdpSocket, to: SocketAddr, datagrams: &[Vec<u8>]) {
    let segment = datagrams[0].len() as u16;
    let payload: Vec<u8> = datagrams.concat();
    let addr = socket2::SockAddr::from(to);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr() as *mut libc::c_void,
        iov_len: payload.len(),
    };
    let mut control = [0u64; 4]; // CMSG_SPACE(2) = 24 bytes, 8-aligned
                                 // SAFETY: msghdr is plain data; every pointer set below points at a live local.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = addr.as_ptr() as *mut libc::c_void;
    msg.msg_namelen = addr.len();
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    // SAFETY: CMSG_SPACE is arithmetic.
    msg.msg_controllen = unsafe { libc::CMSG_SPACE(2) } as usize;
    // SAFETY: the control buffer is CMSG_SPACE(2) bytes long and 8-aligned, so the first
    // header and its 2 data bytes fit.
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_UDP;
        (*c).cmsg_type = libc::UDP_SEGMENT;
        (*c).cmsg_len = libc::CMSG_LEN(2) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<u16>(), segment);
    }
    // SAFETY: `msg` and everything it points at are live locals.
    let sent = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    assert_eq!(
        sent,
        payload.len() as isize,
        "GSO send: {}",
        std::io::Error::last_os_error()
    );
}

/// `count` datagrams of `size` bytes, the last `last` bytes, each filled with its index.
fn train(size: usize, count: usize, last: usize, tag: u8) -> Vec<Vec<u8>> {
    (0..count)
        .map(|i| {
            let len = if i + 1 == count { last } else { size };
            let mut d = vec![i as u8; len];
            if let Some(first) = d.first_mut() {
                *first = tag;
            }
            d
        })
        .collect()
}

fn receive(client: &UdpSocket, n: usize) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut buf = vec![0u8; 70_000];
    while out.len() < n {
        match recv_within(client, &mut buf, WAIT) {
            Ok((len, _)) => out.push(buf[..len].to_vec()),
            Err(e) => panic!("after {} of {n} replies: {e}", out.len()),
        }
    }
    out
}

#[test]
fn gso_trains_are_split_into_the_original_datagrams_and_answered_in_order() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = start(config("127.0.0.1:0", 1), |_| Echo);
    let to = server.local_addr();
    let client = client_for(to);
    let mut expected = 0u64;
    for (k, (size, count, last)) in [
        (1, 10, 1),
        (100, 16, 37),
        (1200, 20, 1),
        (1472, 40, 1000),
        (64, 64, 64),
    ]
    .into_iter()
    .enumerate()
    {
        let datagrams = train(size, count, last, k as u8);
        send_train(&client, to, &datagrams);
        assert_eq!(
            receive(&client, count),
            datagrams,
            "train of {count} x {size}"
        );
        expected += count as u64;
    }
    // Every datagram size a 1500-byte MTU carries, each as a train of three whose last
    // datagram is one byte shorter (or as long, for size 1).
    for size in 1..=1472usize {
        let datagrams = train(size, 3, size.saturating_sub(1).max(1), (size % 251) as u8);
        send_train(&client, to, &datagrams);
        assert_eq!(receive(&client, 3), datagrams, "train of 3 x {size}");
        expected += 3;
    }
    let stats = server.shutdown().expect("shutdown");
    assert_eq!(stats[0].rx_datagrams, expected);
    assert!(
        stats[0].gro_trains > 0,
        "loopback delivers the trains whole to a GRO socket"
    );
    assert!(stats[0].gso_trains > 0, "the replies go back as trains");
}

/// Counts the trains and datagrams it is given whole, and echoes each datagram.
struct WholeTrains {
    trains: Arc<AtomicU64>,
    datagrams: Arc<AtomicU64>,
}

impl Handler for WholeTrains {
    const WHOLE_TRAINS: bool = true;

    fn on_datagram(&mut self, datagram: &Datagram<'_>, reply: &mut Reply<'_>) {
        self.datagrams.fetch_add(1, Ordering::Relaxed);
        let _ = reply.send(datagram.payload);
    }

    fn on_train(&mut self, train: &Datagram<'_>, segment_size: usize, reply: &mut Reply<'_>) {
        self.trains.fetch_add(1, Ordering::Relaxed);
        assert_eq!(segment_size, 500);
        for payload in train.payload.chunks(segment_size) {
            let _ = reply.send(payload);
        }
    }
}

#[test]
fn a_handler_can_take_whole_trains() {
    if !kernel_supports_udpring() {
        return;
    }
    let trains = Arc::new(AtomicU64::new(0));
    let datagrams = Arc::new(AtomicU64::new(0));
    let (t, d) = (trains.clone(), datagrams.clone());
    let server = start(config("127.0.0.1:0", 1), move |_| WholeTrains {
        trains: t.clone(),
        datagrams: d.clone(),
    });
    let to = server.local_addr();
    let client = client_for(to);
    let datagrams_sent = train(500, 8, 100, 9);
    send_train(&client, to, &datagrams_sent);
    assert_eq!(receive(&client, 8), datagrams_sent);
    assert_eq!(trains.load(Ordering::Relaxed), 1);
    assert_eq!(datagrams.load(Ordering::Relaxed), 0, "never split for it");
    server.shutdown().expect("shutdown");
}

#[test]
fn a_full_reply_pool_pauses_inside_a_train_and_drops_nothing() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = start(
        ServerConfig {
            send_slots: 4,
            // One reply per slot: the pool runs out four datagrams into each train.
            gso: false,
            ..config("127.0.0.1:0", 1)
        },
        |_| Echo,
    );
    let to = server.local_addr();
    let client = client_for(to);
    for round in 0..5u8 {
        let datagrams = train(200, 32, 200, round);
        send_train(&client, to, &datagrams);
        assert_eq!(receive(&client, 32), datagrams, "round {round}");
    }
    let stats = server.shutdown().expect("shutdown");
    assert_eq!(stats[0].send_dropped, 0, "{}", stats[0].summary());
    assert_eq!(stats[0].tx_datagrams, 160);
    assert!(stats[0].backpressure > 0, "the pool did run out");
}

#[test]
fn datagrams_longer_than_max_datagram_inside_a_train_are_counted_truncated() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = start(
        ServerConfig {
            max_datagram: 100,
            ..config("127.0.0.1:0", 1)
        },
        |_| Echo,
    );
    let to = server.local_addr();
    let client = client_for(to);
    send_train(&client, to, &train(300, 4, 300, 1));
    let ok = b"fits".to_vec();
    client.send_to(&ok, to).expect("send");
    assert_eq!(receive(&client, 1), vec![ok], "only the datagram that fits");
    assert!(wait_until(WAIT, || server.total_counters().truncated == 4));
    server.shutdown().expect("shutdown");
}

/// The server's listening socket in this process, found by its address.
fn socket_bound_to(addr: SocketAddr) -> i32 {
    for fd in 3..4096 {
        let Ok(local) = socket2::SockRef::from(&unsafe_borrow(fd)).local_addr() else {
            continue;
        };
        if local.as_socket() == Some(addr) {
            return fd;
        }
    }
    panic!("no socket bound to {addr}");
}

/// A borrowed descriptor for `SockRef` (never closed by us).
fn unsafe_borrow(fd: i32) -> std::os::fd::BorrowedFd<'static> {
    // SAFETY: only used for getsockname/setsockopt on descriptors this process holds open
    // for the whole test; a closed number makes those calls fail, nothing more.
    unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) }
}

#[test]
fn a_kernel_that_refuses_a_train_holds_trains_to_that_peer_counted_and_replies_keep_flowing() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = start(config("127.0.0.1:0", 1), |_| Echo);
    let to = server.local_addr();
    // SO_NO_CHECK (no UDP checksums) makes the kernel refuse every GSO train with EINVAL
    // (`udp_send_skb`), the answer a destination of its own can also earn (a route MTU
    // smaller than the segment): trains to that peer stop, GSO stays on for the others.
    let fd = socket_bound_to(to);
    let one: libc::c_int = 1;
    // SAFETY: `one` is a live local of the length passed.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_NO_CHECK,
            (&one as *const libc::c_int).cast(),
            4,
        )
    };
    assert_eq!(rc, 0);
    let client = client_for(to);
    // The first train's replies are refused (counted as send errors)...
    send_train(&client, to, &train(100, 8, 100, 1));
    assert!(wait_until(WAIT, || server.total_counters().gso_refused == 1));
    // ... after which every reply to that peer goes out on its own (the first one through
    // lets trains to it resume).
    let datagrams = train(100, 8, 100, 2);
    send_train(&client, to, &datagrams);
    assert_eq!(receive(&client, 8), datagrams);
    let stats = server.shutdown().expect("shutdown");
    assert_eq!(stats[0].gso_refused, 1);
    assert_eq!(stats[0].send_errors, 8, "the refused train's datagrams");
    assert_eq!(stats[0].tx_datagrams, 8);
}
