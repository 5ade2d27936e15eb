//! Ready-made handlers: what `udpring serve --app echo|discard|sockperf` runs, for serving
//! as is, for benchmarks, and as a first handler to measure a custom one against.

pub mod sockperf;

use crate::handler::{Datagram, Handler, Reply};

/// RFC 862 echo: every datagram goes back to its sender unchanged.
#[derive(Debug, Default, Clone, Copy)]
pub struct Echo;

impl Handler for Echo {
    #[inline]
    fn on_datagram(&mut self, datagram: &Datagram<'_>, reply: &mut Reply<'_>) {
        // A failed send is already counted by `Reply`; UDP peers retransmit.
        let _ = reply.send(datagram.payload);
    }
}

/// RFC 863 discard: reads and drops.
#[derive(Debug, Default, Clone, Copy)]
pub struct Discard;

impl Handler for Discard {
    #[inline]
    fn on_datagram(&mut self, _datagram: &Datagram<'_>, _reply: &mut Reply<'_>) {}
}

/// Answers the `sockperf` tool: a request whose header carries the PONG-request flag is sent
/// back whole with the CLIENT flag cleared; other well-formed messages are only counted as
/// received; datagrams too short for a header are counted as bad input.
#[derive(Debug, Default, Clone, Copy)]
pub struct Sockperf;

impl Handler for Sockperf {
    #[inline]
    fn on_datagram(&mut self, datagram: &Datagram<'_>, reply: &mut Reply<'_>) {
        let payload = datagram.payload;
        let header = match sockperf::Header::parse(payload) {
            Ok(h) => h,
            Err(_) => {
                reply.count_bad_input();
                return;
            }
        };
        // sockperf sets the length field to the datagram's size; a header that says
        // otherwise is not from sockperf (or was cut or padded on the way): bad input.
        if header.length as usize != payload.len() {
            reply.count_bad_input();
            return;
        }
        if !header.wants_reply() {
            return;
        }
        let _ = reply.send_with(|buf| {
            if buf.len() < payload.len() {
                return payload.len();
            }
            buf[..payload.len()].copy_from_slice(payload);
            sockperf::mark_as_reply(&mut buf[..payload.len()]);
            payload.len()
        });
    }
}

#[cfg(test)]
mod tests {
    use std::net::SocketAddr;
    use std::time::Instant;

    use super::*;
    use crate::harness::Harness;
    use crate::send_pool::SendOptions;

    fn datagram(payload: &[u8]) -> Datagram<'_> {
        Datagram::new("192.0.2.1:4000".parse().unwrap(), payload)
    }

    fn replies<H: Handler>(h: &mut H, harness: &mut Harness, payload: &[u8]) -> Vec<Vec<u8>> {
        let mut out = Vec::new();
        harness.deliver(h, &datagram(payload), |peer, bytes| {
            assert_eq!(peer, "192.0.2.1:4000".parse().unwrap());
            out.push(bytes.to_vec());
        });
        out
    }

    #[test]
    fn echo_and_discard() {
        let mut harness = Harness::new(1500, 4);
        assert_eq!(
            replies(&mut Echo, &mut harness, b"abc"),
            vec![b"abc".to_vec()]
        );
        assert_eq!(
            replies(&mut Echo, &mut harness, b""),
            vec![Vec::<u8>::new()]
        );
        assert!(replies(&mut Discard, &mut harness, b"abc").is_empty());
    }

    /// A handler that answers later: the datagram sets a deadline, the timer sends.
    struct Later {
        due: Option<(Instant, SocketAddr)>,
    }

    impl Handler for Later {
        fn on_datagram(&mut self, d: &Datagram<'_>, _reply: &mut Reply<'_>) {
            let delay = std::time::Duration::from_millis(u64::from(d.payload[0]));
            self.due = Some((Instant::now() + delay, d.peer));
        }

        fn next_timer(&mut self) -> Option<Instant> {
            self.due.map(|(at, _)| at)
        }

        fn on_timer(&mut self, now: Instant, reply: &mut Reply<'_>) {
            let Some((at, peer)) = self.due.take() else {
                return;
            };
            assert!(at <= now);
            let options = SendOptions {
                segment_size: Some(2),
                ..SendOptions::default()
            };
            let _ = reply.send_to_with(peer, options, |buf| {
                buf[..3].copy_from_slice(b"abc");
                3
            });
        }
    }

    #[test]
    fn the_harness_drives_timers_on_a_virtual_clock() {
        let mut harness = Harness::new(1500, 4);
        let mut later = Later { due: None };
        harness.deliver(&mut later, &datagram(&[30]), |_, _| panic!("no reply yet"));
        let due = Handler::next_timer(&mut later).expect("a deadline");
        let mut out = Vec::new();
        harness.fire_timer(&mut later, due, |peer, bytes| {
            out.push((peer, bytes.to_vec()))
        });
        // The harness's pool has no GSO: a ready-made train comes out as its datagrams, as
        // the peer receives them.
        let peer: SocketAddr = "192.0.2.1:4000".parse().unwrap();
        assert_eq!(out, vec![(peer, b"ab".to_vec()), (peer, b"c".to_vec())]);
        assert_eq!(Handler::next_timer(&mut later), None);
    }

    #[test]
    fn echo_of_an_overlong_datagram_is_dropped_and_counted() {
        let mut harness = Harness::new(4, 4);
        assert!(replies(&mut Echo, &mut harness, b"too long").is_empty());
        assert_eq!(harness.counters().send_dropped, 1);
    }

    #[test]
    fn sockperf_replies_only_to_pong_requests() {
        let mut harness = Harness::new(1500, 4);
        let mut msg = vec![0u8; 20];
        sockperf::Header {
            sequence: 9,
            flags: sockperf::FLAG_CLIENT | sockperf::FLAG_PONG_REQUEST,
            length: 20,
        }
        .write(&mut msg);
        let out = replies(&mut Sockperf, &mut harness, &msg);
        assert_eq!(out.len(), 1);
        assert_eq!(
            sockperf::Header::parse(&out[0]).unwrap().flags,
            sockperf::FLAG_PONG_REQUEST
        );
        msg[9] = sockperf::FLAG_CLIENT as u8;
        assert!(replies(&mut Sockperf, &mut harness, &msg).is_empty());
        assert!(replies(&mut Sockperf, &mut harness, b"tiny").is_empty());
        assert_eq!(harness.counters().bad_input, 1);
        // A length field that lies about the datagram's size: counted, not answered.
        msg[9] = (sockperf::FLAG_CLIENT | sockperf::FLAG_PONG_REQUEST) as u8;
        msg[13] = 99;
        assert!(replies(&mut Sockperf, &mut harness, &msg).is_empty());
        assert_eq!(harness.counters().bad_input, 2);
    }
}
