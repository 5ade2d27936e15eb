//! The built-in Echo and Sockperf handlers driven through `udpring::Harness` (no sockets)
//! with arbitrary payloads, peers and slot sizes.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use libfuzzer_sys::arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use udpring::apps::sockperf::{Header, FLAG_CLIENT, HEADER_LEN};
use udpring::apps::{Echo, Sockperf};
use udpring::testing::Harness;
use udpring::Datagram;

fuzz_target!(|data: &[u8]| {
    let _ = run(&mut Unstructured::new(data));
});

fn run(u: &mut Unstructured<'_>) -> Result<()> {
    // Slot sizes around the payload sizes the fuzzer makes, so both "fits" and "too long"
    // are reached.
    let max_len = u.int_in_range(0..=512)?;
    let slots = u.int_in_range(1..=4)?;
    let sockperf = bool::arbitrary(u)?;
    // The harness's pool stands for a dual-stack IPv6 socket: peers of both families can be
    // answered.
    let peer_v6 = u.ratio(1u8, 8)?;
    let peer = if peer_v6 {
        SocketAddr::new(IpAddr::V6(Ipv6Addr::from(u128::arbitrary(u)?)), 1)
    } else {
        SocketAddr::new(
            IpAddr::V4(Ipv4Addr::from(u32::arbitrary(u)?)),
            u16::arbitrary(u)?,
        )
    };
    let local = if bool::arbitrary(u)? {
        Some(IpAddr::V4(Ipv4Addr::from(u32::arbitrary(u)?)))
    } else {
        None
    };
    let payload = u.bytes(u.len())?;
    let datagram = Datagram {
        local,
        ..Datagram::new(peer, payload)
    };

    let mut harness = Harness::new(max_len, slots);
    let mut replies: Vec<(SocketAddr, Vec<u8>)> = Vec::new();
    let mut collect = |to: SocketAddr, bytes: &[u8]| replies.push((to, bytes.to_vec()));
    if sockperf {
        harness.deliver(&mut Sockperf, &datagram, &mut collect);
    } else {
        harness.deliver(&mut Echo, &datagram, &mut collect);
    }
    let counters = *harness.counters();
    assert_eq!(counters.rx_datagrams, 1);
    assert!(replies.len() <= 1);
    for (to, _) in &replies {
        assert_eq!(*to, peer);
    }

    // The reply the handler means to send, if any.
    let intended: Option<Vec<u8>> = if sockperf {
        match Header::parse(payload) {
            Err(_) => {
                assert!(payload.len() < HEADER_LEN);
                assert_eq!(counters.bad_input, 1);
                None
            }
            // A length field that is not the datagram's size is bad input: no reply.
            Ok(h) if h.length as usize != payload.len() => {
                assert_eq!(counters.bad_input, 1);
                None
            }
            Ok(h) if !h.wants_reply() => None,
            Ok(_) => {
                let mut r = payload.to_vec();
                let flags = u16::from_be_bytes([r[8], r[9]]) & !FLAG_CLIENT;
                r[8..10].copy_from_slice(&flags.to_be_bytes());
                Some(r)
            }
        }
    } else {
        Some(payload.to_vec())
    };
    let header_ok = Header::parse(payload)
        .map(|h| h.length as usize == payload.len())
        .unwrap_or(false);
    if !sockperf || header_ok {
        assert_eq!(counters.bad_input, 0);
    }
    // A peer that is no address to send to (unspecified, port 0) is refused before the
    // kernel sees it (`SendError::NoDestination`), and counted.
    let addressable = peer.port() != 0 && !peer.ip().to_canonical().is_unspecified();
    match intended {
        // Sent whole, or dropped and counted: never cut short, never lost silently.
        Some(reply) if reply.len() <= max_len && addressable => {
            assert_eq!(replies.len(), 1);
            assert_eq!(replies[0].1, reply);
            assert_eq!(counters.send_dropped, 0);
        }
        Some(_) => {
            assert!(replies.is_empty());
            assert_eq!(counters.send_dropped, 1);
        }
        None => {
            assert!(replies.is_empty());
            assert_eq!(counters.send_dropped, 0);
        }
    }
    Ok(())
}
