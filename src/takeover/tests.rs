use std::os::fd::{AsFd, RawFd};

use socket2::Protocol;

use super::*;

/// A descriptor survives the trip: the received one is the same socket file.
#[test]
fn a_descriptor_crosses_a_seqpacket_pair() {
    let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
    let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    send(&a, b"socket 0", Some(udp.as_raw_fd())).unwrap();
    let mut buf = [0u8; 16];
    let (n, fd) = recv(&b, &mut buf).unwrap();
    assert_eq!(&buf[..n], b"socket 0");
    let got = Socket::from(fd.expect("a descriptor"));
    assert_eq!(
        got.local_addr().unwrap().as_socket(),
        Some(udp.local_addr().unwrap())
    );
    send(&a, b"go", None).unwrap();
    assert!(recv(&b, &mut buf).unwrap().1.is_none());
}

fn reuseport_udp(addr: &str) -> Socket {
    let addr: SocketAddr = addr.parse().unwrap();
    let s = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).unwrap();
    s.set_reuse_port(true).unwrap();
    s.bind(&addr.into()).unwrap();
    s
}

fn local(s: &Socket) -> SocketAddr {
    s.local_addr().unwrap().as_socket().unwrap()
}

#[test]
fn a_bound_reuseport_udp_socket_is_accepted() {
    let s = reuseport_udp("127.0.0.1:0");
    assert_eq!(check_offered_socket(s.as_fd(), local(&s)), Ok(()));
}

#[test]
fn a_tcp_socket_on_the_address_is_refused() {
    let udp = reuseport_udp("127.0.0.1:0");
    let addr = local(&udp);
    let tcp = Socket::new(Domain::IPV4, Type::STREAM, Some(Protocol::TCP)).unwrap();
    tcp.set_reuse_port(true).unwrap();
    tcp.bind(&addr.into()).unwrap();
    let why = check_offered_socket(tcp.as_fd(), addr).unwrap_err();
    assert!(why.contains("not a datagram socket"), "{why}");
}

#[test]
fn a_udp_socket_bound_elsewhere_is_refused() {
    let wanted = reuseport_udp("127.0.0.1:0");
    let other = reuseport_udp("127.0.0.1:0");
    let why = check_offered_socket(other.as_fd(), local(&wanted)).unwrap_err();
    assert!(
        why.contains(&format!("bound to {}", local(&other))),
        "{why}"
    );
    // Unbound: no port at all.
    let unbound = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).unwrap();
    unbound.set_reuse_port(true).unwrap();
    assert!(check_offered_socket(unbound.as_fd(), local(&wanted)).is_err());
}

#[test]
fn a_udp_socket_without_reuseport_is_refused() {
    let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let why = check_offered_socket(plain.as_fd(), plain.local_addr().unwrap()).unwrap_err();
    assert!(why.contains("without SO_REUSEPORT"), "{why}");
}

#[test]
fn a_socket_of_the_other_family_is_refused() {
    let v4 = reuseport_udp("127.0.0.1:0");
    let Ok(v6) = Socket::new(Domain::IPV6, Type::DGRAM, Some(Protocol::UDP)) else {
        eprintln!("skipped: no IPv6 sockets here");
        return;
    };
    let why = check_offered_socket(v6.as_fd(), local(&v4)).unwrap_err();
    assert!(why.contains("domain"), "{why}");
}

/// The line a refusal of this process's own peer (a socket pair) starts with.
fn refused_prefix() -> String {
    // SAFETY: getpid(2) and geteuid(2) take no arguments and cannot fail.
    let (pid, uid) = unsafe { (libc::getpid(), libc::geteuid()) };
    format!("takeover refused: peer pid {pid} uid {uid} ")
}

/// Messages to send, each with its descriptor, if any.
type Messages = Vec<(Vec<u8>, Option<OwnedFd>)>;

/// Plays the offering side on `peer`: reads the hello, then sends `messages`.
fn offer(peer: Socket, messages: Messages) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, _) = recv(&peer, &mut buf).unwrap();
        assert_eq!(&buf[..n], HELLO);
        for (payload, fd) in messages {
            send(&peer, &payload, fd.as_ref().map(|f| f.as_raw_fd())).unwrap();
        }
        // Held until the other side has read everything and closed.
        let _ = recv(&peer, &mut buf);
    })
}

#[test]
fn a_huge_count_is_refused_before_anything_is_sized() {
    for count in [
        "18446744073709551615",
        "1000000000000",
        "1025",
        "0",
        "-1",
        "many",
    ] {
        let (new, old) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        let peer = offer(old, vec![(format!("sockets {count}").into_bytes(), None)]);
        let e = receive_offer(new, "127.0.0.1:1".parse().unwrap())
            .err()
            .expect("refused");
        peer.join().unwrap();
        let line = e.to_string();
        assert!(line.starts_with(&refused_prefix()), "{line}");
        assert!(line.contains(count), "{line}");
        assert!(!line.contains('\n'), "one line: {line}");
    }
}

#[test]
fn a_wrong_socket_is_refused_and_those_before_it_closed() {
    let good = reuseport_udp("127.0.0.1:0");
    let addr = local(&good);
    let elsewhere = reuseport_udp("127.0.0.1:0");
    let (new, old) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
    // The peer's descriptors are closed once sent: the refused side holds the only ones.
    let peer = offer(
        old,
        vec![
            (b"sockets 2".to_vec(), None),
            (b"socket 0".to_vec(), Some(OwnedFd::from(good))),
            (b"socket 1".to_vec(), Some(OwnedFd::from(elsewhere))),
        ],
    );
    let e = receive_offer(new, addr).err().expect("refused");
    peer.join().unwrap();
    let line = e.to_string();
    assert!(line.starts_with(&refused_prefix()), "{line}");
    assert!(
        line.contains("offered as socket 1 a UDP socket bound to"),
        "{line}"
    );
    assert_eq!(e.kind(), io::ErrorKind::InvalidData);
    // Socket 0 was closed with the refusal: a socket without SO_REUSEPORT can bind its
    // address again (EADDRINUSE while any descriptor of it is open).
    std::net::UdpSocket::bind(addr).expect("the accepted-then-refused socket is closed");
}

#[test]
fn a_good_offer_is_received_in_order() {
    let first = reuseport_udp("127.0.0.1:0");
    let addr = local(&first);
    let second = reuseport_udp(&addr.to_string());
    let (new, old) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
    let peer = offer(
        old,
        vec![
            (b"sockets 2".to_vec(), None),
            (b"socket 0".to_vec(), Some(OwnedFd::from(first))),
            (b"socket 1".to_vec(), Some(OwnedFd::from(second))),
            (b"state 3".to_vec(), None),
            (b"abc".to_vec(), None),
        ],
    );
    let mut handover = receive_offer(new, addr).expect("accepted");
    assert_eq!(handover.take_state().as_deref(), Some(&b"abc"[..]));
    let sockets = handover.take_sockets();
    assert_eq!(sockets.len(), 2);
    for s in &sockets {
        assert_eq!(check_offered_socket(s.as_fd(), addr), Ok(()));
    }
    drop(handover);
    peer.join().unwrap();
}

/// Sends one message carrying every descriptor of `fds` (room for up to 64).
fn send_many(socket: &Socket, payload: &[u8], fds: &[RawFd]) {
    #[repr(C, align(8))]
    struct Control([u8; 512]);
    let mut control = Control([0; 512]);
    let mut iov = libc::iovec {
        iov_base: payload.as_ptr().cast_mut().cast(),
        iov_len: payload.len(),
    };
    // SAFETY: msghdr is plain data; the fields used are set below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    let bytes = std::mem::size_of_val(fds) as u32;
    // SAFETY: CMSG_SPACE and CMSG_LEN compute sizes from a number.
    let (space, len) = unsafe { (libc::CMSG_SPACE(bytes) as usize, libc::CMSG_LEN(bytes)) };
    assert!(space <= control.0.len());
    msg.msg_control = control.0.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: `control` is zeroed, aligned for cmsghdr and `space` bytes long, so the
    // first header and `fds.len()` descriptors after it lie inside it.
    unsafe {
        let cmsg = libc::CMSG_FIRSTHDR(&msg);
        (*cmsg).cmsg_level = libc::SOL_SOCKET;
        (*cmsg).cmsg_type = libc::SCM_RIGHTS;
        (*cmsg).cmsg_len = len as usize;
        let data = libc::CMSG_DATA(cmsg).cast::<RawFd>();
        for (i, &fd) in fds.iter().enumerate() {
            std::ptr::write_unaligned(data.add(i), fd);
        }
    }
    // SAFETY: `msg` points at `iov` (at `payload`) and `control`, live for the call.
    assert!(unsafe { libc::sendmsg(socket.as_raw_fd(), &msg, 0) } >= 0);
}

/// Two descriptors in one message, or more than the control buffer holds (MSG_CTRUNC):
/// refused, and every descriptor that arrived is closed.
#[test]
fn a_message_with_several_descriptors_is_refused_and_they_are_closed() {
    for copies in [2, 40] {
        let plain = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = plain.local_addr().unwrap();
        let (a, b) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        send_many(&a, b"socket 0", &vec![plain.as_raw_fd(); copies]);
        drop(plain);
        let mut buf = [0u8; 16];
        let e = recv(&b, &mut buf).expect_err("refused");
        assert_eq!(e.kind(), io::ErrorKind::InvalidData, "{copies}: {e}");
        // Every copy is gone: the address is free for a socket without SO_REUSEPORT.
        std::net::UdpSocket::bind(addr).expect("no copy left open");
    }
}

/// The old side's `hand_over` on `old` (one socket, `state`) in a thread; its result.
fn hand_over_thread(
    old: Socket,
    socket: Socket,
    state: Option<StateExport>,
) -> JoinHandle<io::Result<u32>> {
    std::thread::spawn(move || {
        let stop = AtomicBool::new(false);
        hand_over(&old, &[socket], None, &stop, state.as_ref()).map(|(pid, _)| pid)
    })
}

/// Version 2: a state larger than one message arrives byte-exact after the sockets; an
/// empty one arrives empty.
#[test]
fn the_state_crosses_in_chunks_byte_exact() {
    let big: Vec<u8> = (0..100_000u32).map(|i| (i * 7 + i / 300) as u8).collect();
    for state in [big, Vec::new()] {
        let udp = reuseport_udp("127.0.0.1:0");
        let addr = local(&udp);
        let (new, old) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        let sent = state.clone();
        let old_side = hand_over_thread(old, udp, Some(Box::new(move || sent.clone())));
        let mut handover = receive_offer(new, addr).expect("accepted");
        assert_eq!(handover.take_state(), Some(state));
        assert_eq!(handover.take_sockets().len(), 1);
        send(&handover.conn, b"go", None).unwrap();
        assert!(old_side.join().unwrap().is_ok());
    }
}

/// A taker of version 1 gets the sockets and no state; the old process still completes.
#[test]
fn a_version_1_taker_gets_the_sockets_without_state() {
    let udp = reuseport_udp("127.0.0.1:0");
    let addr = local(&udp);
    let (new, old) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
    let old_side = hand_over_thread(old, udp, Some(Box::new(|| b"secret".to_vec())));
    let mut handover = receive_offer_in(new, addr, HELLO_V1)
        .expect("accepted")
        .expect("answered");
    assert_eq!(handover.take_state(), None);
    assert_eq!(handover.take_sockets().len(), 1);
    // Version 1's next message is `go`: no state message is left in between.
    send(&handover.conn, b"go", None).unwrap();
    assert!(old_side.join().unwrap().is_ok());
}

/// A state length beyond MAX_STATE, a message of the wrong size, one with a descriptor:
/// refused in one line, and the sockets received are closed with it.
#[test]
fn a_bad_state_is_refused() {
    let over = format!("state {}", MAX_STATE + 1);
    let cases: Vec<(Messages, String)> = vec![
        (
            vec![(over.clone().into_bytes(), None)],
            format!("offered {} bytes", MAX_STATE + 1),
        ),
        (
            vec![(b"state -1".to_vec(), None)],
            "instead of a state length".into(),
        ),
        (
            vec![(b"state 4".to_vec(), None), (b"abc".to_vec(), None)],
            "of 3 bytes where 4".into(),
        ),
        (
            vec![(b"state 40000".to_vec(), None), (vec![0; 40000], None)],
            "cut short (MSG_TRUNC".into(),
        ),
        (
            vec![
                (b"state 1".to_vec(), None),
                (
                    b"x".to_vec(),
                    Some(OwnedFd::from(reuseport_udp("127.0.0.1:0"))),
                ),
            ],
            "with a descriptor".into(),
        ),
    ];
    for (tail, why) in cases {
        let udp = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let addr = udp.local_addr().unwrap();
        let sock = Socket::from(udp);
        sock.set_reuse_port(true).unwrap();
        let (new, old) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
        let mut messages = vec![
            (b"sockets 1".to_vec(), None),
            (b"socket 0".to_vec(), Some(OwnedFd::from(sock))),
        ];
        messages.extend(tail);
        let peer = offer(old, messages);
        let e = receive_offer(new, addr).err().expect("refused");
        peer.join().unwrap();
        let line = e.to_string();
        assert!(line.starts_with(&refused_prefix()), "{line}");
        assert!(line.contains(&why), "{why}: {line}");
        assert!(!line.contains('\n'), "one line: {line}");
        std::net::UdpSocket::bind(addr).expect("the received socket is closed");
    }
}

/// `request` against an old process of version 1 (it closes the connection on the `/2`
/// hello, as version 1's `hand_over` did): it asks again in version 1 and gets the
/// sockets, without state.
#[test]
fn request_falls_back_to_version_1() {
    let udp = reuseport_udp("127.0.0.1:0");
    let addr = local(&udp);
    let listener = Socket::new(Domain::UNIX, Type::SEQPACKET, None).unwrap();
    listener.bind(&abstract_addr(addr).unwrap()).unwrap();
    listener.listen(4).unwrap();
    let old = std::thread::spawn(move || {
        let mut hellos = Vec::new();
        loop {
            let (conn, _) = listener.accept().unwrap();
            let mut buf = [0u8; 64];
            let (n, _) = recv(&conn, &mut buf).unwrap();
            hellos.push(buf[..n].to_vec());
            if &buf[..n] != HELLO_V1 {
                continue; // dropped: closed, as version 1 does
            }
            send(&conn, b"sockets 1", None).unwrap();
            send(&conn, b"socket 0", Some(udp.as_raw_fd())).unwrap();
            let (n, _) = recv(&conn, &mut buf).unwrap();
            assert_eq!(&buf[..n], b"go");
            send(&conn, b"done", None).unwrap();
            return hellos;
        }
    });
    let mut handover = request(addr).expect("taken over").expect("offered");
    assert_eq!(handover.take_state(), None, "version 1 has no state");
    assert_eq!(handover.take_sockets().len(), 1);
    handover.complete().expect("done");
    assert_eq!(
        old.join().unwrap(),
        vec![HELLO_V3.to_vec(), HELLO.to_vec(), HELLO_V1.to_vec()]
    );
}

/// Plays a version-3 offering side: reads the hello, then sends `messages`.
fn offer_v3(peer: Socket, messages: Messages) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        let (n, _) = recv(&peer, &mut buf).unwrap();
        assert_eq!(&buf[..n], HELLO_V3);
        for (payload, fd) in messages {
            // The receiver may refuse and close before the last message.
            let _ = send(&peer, &payload, fd.as_ref().map(|f| f.as_raw_fd()));
        }
        // Closing now leaves what was sent readable by the other side.
    })
}

fn receive_v3(messages: Messages) -> io::Result<Option<Handover>> {
    let (new, old) = Socket::pair(Domain::UNIX, Type::SEQPACKET, None).unwrap();
    let peer = offer_v3(old, messages);
    let got = receive_offer_in(new, "127.0.0.1:1".parse().unwrap(), HELLO_V3);
    peer.join().unwrap();
    got
}

/// A routing map is a descriptor another process chose: a socket offered as one, a
/// generation out of range, or no descriptor at all is refused in one line.
#[test]
fn a_routing_map_that_is_not_one_is_refused() {
    let udp = OwnedFd::from(reuseport_udp("127.0.0.1:0"));
    for (messages, says) in [
        (
            vec![(b"generation 2".to_vec(), Some(udp.try_clone().unwrap()))],
            "is not a BPF map",
        ),
        (
            vec![(b"generation 2".to_vec(), None)],
            "without the routing map",
        ),
        (
            vec![(b"generation 16".to_vec(), Some(udp.try_clone().unwrap()))],
            "generation \"16\"",
        ),
    ] {
        let line = receive_v3(messages).err().expect("refused").to_string();
        assert!(line.starts_with(&refused_prefix()), "{line}");
        assert!(line.contains(says), "{says}: {line}");
        assert!(!line.contains('\n'), "one line: {line}");
    }
}

/// A real socket array and a state: the taker gets the next generation and the map.
#[test]
fn a_good_routing_offer_gives_the_next_generation() {
    let map = match crate::ebpf::SocketArray::create(crate::reuseport::MAP_ENTRIES) {
        Ok(m) => m,
        Err(e) => {
            let why = format!("BPF map refused ({e}): needs CAP_BPF");
            assert!(std::env::var("CI").as_deref() != Ok("true"), "{why}");
            eprintln!("skipped: {why}");
            return;
        }
    };
    let fd = map.fd().try_clone().unwrap();
    let mut handover = receive_v3(vec![
        (b"generation 15".to_vec(), Some(fd)),
        (b"state 0".to_vec(), None),
    ])
    .expect("accepted")
    .expect("offered");
    assert_eq!(handover.generation(), Some(0), "15 wraps to 0");
    assert!(handover.routing_map().is_some());
    assert!(handover.take_sockets().is_empty());
    assert_eq!(handover.take_state(), Some(Vec::new()));
    // A map of another size is not the routing map.
    let small = crate::ebpf::SocketArray::create(8).unwrap();
    let line = receive_v3(vec![(
        b"generation 1".to_vec(),
        Some(small.fd().try_clone().unwrap()),
    )])
    .err()
    .expect("refused")
    .to_string();
    assert!(line.contains("8 entries"), "{line}");
}
