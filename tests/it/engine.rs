//! Loopback tests of the engine through the library API.

use std::collections::HashMap;
use std::net::UdpSocket;
use std::time::{Duration, Instant};

use crate::common::*;
use udpring::apps::{Echo, Sockperf};
use udpring::{Datagram, Handler, Reply, ServerConfig};

#[test]
fn echo_round_trip_ipv4_and_ipv6_at_every_size() {
    if !kernel_supports_udpring() {
        return;
    }
    for bind in ["127.0.0.1:0", "[::1]:0"] {
        let server = start(config(bind, 1), |_| Echo);
        let to = target(server.local_addr());
        let client = client_for(to);
        for size in [0usize, 1, 1472, 65_507] {
            let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
            let (reply, from) = round_trip(&client, to, &payload)
                .unwrap_or_else(|| panic!("no echo of {size} bytes on {bind}"));
            assert_eq!(reply, payload, "{size} bytes on {bind}");
            assert_eq!(from, to);
        }
        let finals = server.shutdown().expect("clean shutdown");
        let total: u64 = finals.iter().map(|c| c.tx_datagrams).sum();
        assert_eq!(total, 4);
    }
}

#[test]
fn dual_stack_wildcard_serves_both_families_and_replies_from_the_asked_address() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = start(config("[::]:0", 1), |_| Echo);
    let port = server.local_addr().port();
    // 127.0.0.2 is a second local address on loopback: the reply must come from it, not
    // from 127.0.0.1, or a multi-homed host's clients would drop it.
    for dst in ["127.0.0.1", "127.0.0.2", "::1"] {
        let to = format!(
            "{}:{port}",
            if dst.contains(':') {
                format!("[{dst}]")
            } else {
                dst.to_string()
            }
        )
        .parse()
        .expect("address");
        let client = client_for(to);
        let (reply, from) = round_trip(&client, to, b"where from?").expect("reply");
        assert_eq!(reply, b"where from?");
        assert_eq!(
            from, to,
            "reply to a datagram sent to {to} came from {from}"
        );
    }
    // An IPv4 wildcard socket does the same with IP_PKTINFO.
    let server4 = start(config("0.0.0.0:0", 1), |_| Echo);
    let to: std::net::SocketAddr = format!("127.0.0.3:{}", server4.local_addr().port())
        .parse()
        .expect("address");
    let client = client_for(to);
    let (_, from) = round_trip(&client, to, b"x").expect("reply");
    assert_eq!(from, to);
    server.shutdown().expect("shutdown");
    server4.shutdown().expect("shutdown");
}

#[test]
fn two_hundred_clients_each_get_exactly_their_own_replies() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = start(config("127.0.0.1:0", 2), |_| Echo);
    let to = server.local_addr();
    let clients: Vec<UdpSocket> = (0..200).map(|_| client_for(to)).collect();
    const PER_CLIENT: u32 = 5;
    for round in 0..PER_CLIENT {
        for (id, c) in clients.iter().enumerate() {
            let msg = format!("client {id} msg {round}");
            c.send_to(msg.as_bytes(), to).expect("send");
        }
    }
    // 1,000 datagrams in flight at once: the server's receive queue may overflow (its buffer
    // is 4 MiB only with CAP_NET_ADMIN), so each one must be handled or counted as a kernel
    // drop, and every handled one answered.
    let sent = 200 * u64::from(PER_CLIENT);
    assert!(
        wait_until(WAIT, || {
            let c = server.total_counters();
            arrived(&c) == sent && c.tx_datagrams == c.rx_datagrams
        }),
        "sent {sent}, not all handled or dropped and answered: {}",
        server.total_counters().summary()
    );
    let handled = server.total_counters().rx_datagrams;
    let replies = collect_replies(&clients, handled as usize, WAIT);
    let mut received = 0;
    for (id, got) in replies.iter().enumerate() {
        let mut texts: Vec<String> = got
            .iter()
            .map(|(bytes, from)| {
                assert_eq!(*from, to, "client {id}: reply from the server's address");
                String::from_utf8_lossy(bytes).into_owned()
            })
            .collect();
        let n = texts.len();
        texts.sort();
        texts.dedup();
        assert_eq!(texts.len(), n, "client {id} got a reply twice: {got:?}");
        for t in &texts {
            assert!(
                t.starts_with(&format!("client {id} msg ")),
                "client {id} got another client's reply {t:?}"
            );
        }
        received += n as u64;
    }
    assert_eq!(received, handled, "every handled datagram answered once");
    // Nothing extra arrives later: a fixed wait, because it checks that nothing happens.
    let extra = collect_replies(&clients, 1, Duration::from_millis(50));
    assert!(extra.iter().all(Vec::is_empty), "stray replies: {extra:?}");
    let total = sum(&server.shutdown().expect("shutdown"));
    assert_eq!(total.rx_datagrams + total.kernel_drops, sent);
}

#[test]
fn busy_polling_serves_the_same() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = start(
        ServerConfig {
            busy_poll: Some(Duration::from_micros(50)),
            ..config("127.0.0.1:0", 2)
        },
        |_| Echo,
    );
    let to = server.local_addr();
    let clients: Vec<UdpSocket> = (0..50).map(|_| client_for(to)).collect();
    // At most 50 small datagrams are in flight (each round waits for its replies), a small
    // fraction of any receive buffer: none can be dropped, so the count is exact.
    for round in 0..20u8 {
        for c in &clients {
            c.send_to(&[round; 32], to).expect("send");
        }
        let mut buf = [0u8; 64];
        for c in &clients {
            let (n, _) = recv_within(c, &mut buf, WAIT).expect("reply");
            assert_eq!(&buf[..n], &[round; 32]);
        }
    }
    let c = server.shutdown().expect("shutdown");
    assert_eq!(c.iter().map(|c| c.tx_datagrams).sum::<u64>(), 1000);
}

#[test]
fn many_source_ports_reach_every_worker() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = start(config("127.0.0.1:0", 2), |_| Echo);
    let to = server.local_addr();
    // One request in flight at a time, so none can be dropped: every source port counts.
    for i in 0..256 {
        let client = client_for(to);
        round_trip(&client, to, b"hi").unwrap_or_else(|| panic!("client {i}: no reply"));
    }
    let per_worker: Vec<u64> = server
        .shutdown()
        .expect("shutdown")
        .iter()
        .map(|c| c.rx_datagrams)
        .collect();
    assert_eq!(per_worker.iter().sum::<u64>(), 256);
    assert!(
        per_worker.iter().all(|&n| n > 0),
        "SO_REUSEPORT should spread 256 source ports over both workers: {per_worker:?}"
    );
}

#[test]
fn buffer_ring_exhaustion_is_counted_and_service_resumes() {
    if !kernel_supports_udpring() {
        return;
    }
    // Four buffers and a discard handler that is slow enough for datagrams to pile up: the
    // kernel runs out of buffers (ENOBUFS) long before the burst ends.
    struct Slow;
    impl Handler for Slow {
        fn on_datagram(&mut self, d: &Datagram<'_>, reply: &mut Reply<'_>) {
            if d.payload == b"ping" {
                let _ = reply.send(b"pong");
            } else {
                std::thread::sleep(Duration::from_micros(50));
            }
        }
    }
    let server = start(
        ServerConfig {
            buffers: 4,
            ..config("127.0.0.1:0", 1)
        },
        |_| Slow,
    );
    let to = server.local_addr();
    let senders: Vec<UdpSocket> = (0..20).map(|_| client_for(to)).collect();
    for _ in 0..100 {
        for s in &senders {
            s.send_to(&[0u8; 32], to).expect("send");
        }
    }
    // The burst overruns the socket's receive queue as well: what the kernel dropped is
    // counted in kernel_drops.
    assert!(
        wait_until(WAIT, || arrived(&server.total_counters()) == 2000),
        "every datagram of the burst is handled or counted as a kernel drop: {}",
        server.total_counters().summary()
    );
    let c = server.total_counters();
    assert!(
        c.enobufs > 0,
        "burst should exhaust 4 buffers: {}",
        c.summary()
    );
    assert!(
        c.rearms >= c.enobufs,
        "each ENOBUFS is followed by a re-arm"
    );
    // Service resumes: fresh round trips work.
    let client = client_for(to);
    for _ in 0..10 {
        let (reply, _) = round_trip(&client, to, b"ping").expect("service resumed");
        assert_eq!(reply, b"pong");
    }
    server.shutdown().expect("shutdown");
}

#[test]
fn oversized_datagrams_are_counted_as_truncated_and_not_echoed() {
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
    // No echo within 200 ms: these check that something does not happen.
    let quiet = Duration::from_millis(200);
    assert_eq!(
        no_reply_within(&client, to, &[7u8; 101], quiet),
        None,
        "101 bytes must not be echoed"
    );
    assert_eq!(no_reply_within(&client, to, &[7u8; 5000], quiet), None);
    // One worker handles its datagrams in order: once this one is answered, the two before
    // it have been counted, so the counts below are exact.
    let (reply, _) = round_trip(&client, to, &[9u8; 100]).expect("100 bytes fit");
    assert_eq!(reply.len(), 100);
    let c = server.shutdown().expect("shutdown");
    assert_eq!(c[0].truncated, 2);
    assert_eq!(c[0].rx_datagrams, 1);
    assert_eq!(c[0].tx_datagrams, 1);
}

#[test]
fn full_send_pool_applies_backpressure_without_dropping() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = start(
        ServerConfig {
            send_slots: 2,
            ..config("127.0.0.1:0", 1)
        },
        |_| Echo,
    );
    let to = server.local_addr();
    let clients: Vec<UdpSocket> = (0..40).map(|_| client_for(to)).collect();
    for round in 0..20u8 {
        for c in &clients {
            c.send_to(&[round; 64], to).expect("send");
        }
    }
    // While the pool is full the worker takes no datagrams, so the socket's receive queue
    // may overflow: the kernel's drops are counted, and every datagram the worker took must
    // be answered (backpressure, not a dropped reply).
    let sent = 800;
    assert!(
        wait_until(WAIT, || {
            let c = server.total_counters();
            arrived(&c) == sent && c.tx_datagrams == c.rx_datagrams
        }),
        "sent {sent}: {}",
        server.total_counters().summary()
    );
    let handled = server.total_counters().rx_datagrams;
    let replies = collect_replies(&clients, handled as usize, WAIT);
    for (i, got) in replies.iter().enumerate() {
        assert!(got.len() <= 20, "client {i}: {} replies to 20", got.len());
        assert!(got
            .iter()
            .all(|(r, _)| r.len() == 64 && r.iter().all(|&b| b == r[0])));
    }
    let received: usize = replies.iter().map(Vec::len).sum();
    assert_eq!(received as u64, handled, "every handled datagram answered");
    let c = server.shutdown().expect("shutdown");
    assert_eq!(c[0].rx_datagrams + c[0].kernel_drops, sent);
    assert_eq!(c[0].tx_datagrams, c[0].rx_datagrams);
    assert_eq!(c[0].send_dropped, 0);
    assert!(
        c[0].backpressure > 0,
        "two slots cannot absorb {} replies: {}",
        c[0].rx_datagrams,
        c[0].summary()
    );
}

#[test]
fn sockperf_handler_answers_pong_requests_and_counts_bad_input() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = start(config("127.0.0.1:0", 1), |_| Sockperf);
    let to = server.local_addr();
    let client = client_for(to);
    let mut msg = vec![0u8; 64];
    udpring::apps::sockperf::Header {
        sequence: 42,
        flags: 3,
        length: 64,
    }
    .write(&mut msg);
    let (reply, _) = round_trip(&client, to, &msg).expect("pong");
    let h = udpring::apps::sockperf::Header::parse(&reply).expect("header");
    assert_eq!((h.sequence, h.flags, h.length), (42, 2, 64));
    assert_eq!(reply.len(), 64);
    // No reply within 200 ms to what follows: these check that something does not happen.
    let quiet = Duration::from_millis(200);
    // No PONG_REQUEST flag: counted as received, no reply.
    msg[9] = 1;
    assert_eq!(no_reply_within(&client, to, &msg, quiet), None);
    // Too short for a header: bad input, no reply, no panic.
    assert_eq!(no_reply_within(&client, to, b"short", quiet), None);
    assert_eq!(no_reply_within(&client, to, b"", quiet), None);
    // Nothing answers the last three, so wait for the counters to show them handled.
    assert!(
        wait_until(WAIT, || server.total_counters().rx_datagrams == 4),
        "{}",
        server.total_counters().summary()
    );
    let c = server.shutdown().expect("shutdown");
    assert_eq!(c[0].bad_input, 2);
    assert_eq!(c[0].rx_datagrams, 4);
    assert_eq!(c[0].tx_datagrams, 1);
}

#[test]
fn empty_datagrams_are_echoed_and_multishot_is_rearmed() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = start(config("127.0.0.1:0", 1), |_| Echo);
    let to = server.local_addr();
    let client = client_for(to);
    for _ in 0..5 {
        let (reply, _) = round_trip(&client, to, b"").expect("empty echo");
        assert!(reply.is_empty());
        let (reply, _) = round_trip(&client, to, b"after").expect("echo after empty");
        assert_eq!(reply, b"after");
    }
    server.shutdown().expect("shutdown");
}

#[test]
fn handler_state_is_per_worker_and_sees_each_datagram_once() {
    if !kernel_supports_udpring() {
        return;
    }
    // Counts sequence numbers per peer and answers with how often it saw this one.
    struct Dedup(HashMap<(std::net::SocketAddr, u32), u32>);
    impl Handler for Dedup {
        fn on_datagram(&mut self, d: &Datagram<'_>, reply: &mut Reply<'_>) {
            let seq = u32::from_be_bytes(d.payload[..4].try_into().expect("4 bytes"));
            let n = self.0.entry((d.peer, seq)).or_insert(0);
            *n += 1;
            let _ = reply.send(&n.to_be_bytes());
        }
    }
    let server = start(config("127.0.0.1:0", 2), |_| Dedup(HashMap::new()));
    let to = server.local_addr();
    let client = client_for(to);
    let deadline = Instant::now() + WAIT;
    for seq in 0..500u32 {
        let (reply, _) = round_trip(&client, to, &seq.to_be_bytes()).expect("reply");
        assert_eq!(
            reply,
            1u32.to_be_bytes(),
            "datagram {seq} seen more than once"
        );
        assert!(Instant::now() < deadline);
    }
    server.shutdown().expect("shutdown");
}

/// Replies three times per request, then once shorter: consecutive replies to one peer that
/// the worker joins into a GSO train.
struct Fanout;
impl Handler for Fanout {
    fn on_datagram(&mut self, d: &Datagram<'_>, reply: &mut Reply<'_>) {
        for part in [b"-1", b"-2", b"-3"] {
            let _ = reply.send_with(|buf| {
                let n = d.payload.len();
                buf[..n].copy_from_slice(d.payload);
                buf[n..n + 2].copy_from_slice(part);
                n + 2
            });
        }
        let _ = reply.send(b"end");
    }
}

#[test]
fn gso_trains_arrive_as_separate_datagrams_in_order() {
    if !kernel_supports_udpring() {
        return;
    }
    for gso in [true, false] {
        let server = start(
            ServerConfig {
                gso,
                // Four replies per request is more than 3x what the peer sent.
                amplification_factor: 0,
                ..config("127.0.0.1:0", 1)
            },
            |_| Fanout,
        );
        let to = server.local_addr();
        let client = client_for(to);
        let mut buf = [0u8; 64];
        for i in 0..20 {
            let req = format!("req{i:02}");
            client.send_to(req.as_bytes(), to).expect("send");
            for want in [
                format!("{req}-1"),
                format!("{req}-2"),
                format!("{req}-3"),
                "end".to_string(),
            ] {
                let (n, _) = recv_within(&client, &mut buf, WAIT).expect("reply");
                assert_eq!(&buf[..n], want.as_bytes(), "gso={gso}");
            }
        }
        let c = server.shutdown().expect("shutdown");
        assert_eq!(c[0].tx_datagrams, 80);
        if gso {
            assert_eq!(c[0].gso_trains, 20, "{}", c[0].summary());
        } else {
            assert_eq!(c[0].gso_trains, 0);
        }
    }
}

/// Starting a server must not leave io_uring exit work aimed at the caller's thread: that
/// would make the caller's next blocking call fail with EINTR (the start-up probe's scratch
/// rings used to do this).
#[test]
fn starting_a_server_does_not_interrupt_the_caller() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = start(config("127.0.0.1:0", 1), |_| Echo);
    let idle = UdpSocket::bind("127.0.0.1:0").expect("bind");
    idle.set_read_timeout(Some(Duration::from_millis(150)))
        .expect("timeout");
    let mut buf = [0u8; 8];
    // Nothing is ever sent to `idle`: each call must end by its 150 ms timeout, not by EINTR.
    for _ in 0..3 {
        let err = idle.recv_from(&mut buf).expect_err("nothing to receive");
        assert_ne!(
            err.kind(),
            std::io::ErrorKind::Interrupted,
            "a blocking call in the thread that started the server was interrupted"
        );
    }
    server.shutdown().expect("shutdown");
}
