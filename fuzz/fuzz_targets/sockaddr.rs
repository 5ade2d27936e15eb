//! Socket address decoding and encoding: decode(encode(a)) == a for every address the
//! encoder accepts, and decoding arbitrary bytes is stable under re-encoding.
#![no_main]

use std::net::{Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};

use libfuzzer_sys::arbitrary::{Arbitrary, Unstructured};
use libfuzzer_sys::fuzz_target;
use udpring::datagram::{decode_sockaddr, encode_sockaddr, SOCKADDR_IN6_LEN, SOCKADDR_IN_LEN};

fuzz_target!(|data: &[u8]| {
    // 1. Raw bytes as the kernel would hand them over.
    if let Ok(addr) = decode_sockaddr(data) {
        let family = u16::from_ne_bytes([data[0], data[1]]);
        let from_v6 = i32::from(family) == libc::AF_INET6;
        let mut out = [0u8; 28];
        // Encoding for the socket family the bytes came from always succeeds: a decoded V6
        // address only comes from AF_INET6 bytes.
        let len = encode_sockaddr(addr, from_v6, &mut out)
            .expect("a decoded address fits the family it came from") as usize;
        assert_eq!(decode_sockaddr(&out[..len]), Ok(addr));
        if from_v6 {
            assert_eq!(len, SOCKADDR_IN6_LEN);
            if addr.is_ipv6() {
                // Every byte of a sockaddr_in6 is meaningful, so the encoding is the input.
                assert_eq!(&out[..len], &data[..SOCKADDR_IN6_LEN]);
            }
        } else {
            assert_eq!(len, SOCKADDR_IN_LEN);
            // family, port, address; sin_zero is not read and written as zeros.
            assert_eq!(&out[..8], &data[..8]);
            assert!(out[8..16].iter().all(|&b| b == 0));
        }
    }

    // 2. Structured addresses through encode then decode.
    let mut u = Unstructured::new(data);
    let Ok((addr, socket_is_v6)) = arbitrary_addr(&mut u) else {
        return;
    };
    let mut out = [0u8; 28];
    match encode_sockaddr(addr, socket_is_v6, &mut out) {
        None => assert!(addr.is_ipv6() && !socket_is_v6),
        Some(len) => {
            let decoded = decode_sockaddr(&out[..len as usize]).expect("we just encoded it");
            assert_eq!(decoded, expected(addr));
        }
    }
});

fn arbitrary_addr(
    u: &mut Unstructured<'_>,
) -> libfuzzer_sys::arbitrary::Result<(SocketAddr, bool)> {
    let socket_is_v6 = bool::arbitrary(u)?;
    let addr = if bool::arbitrary(u)? {
        SocketAddr::V4(SocketAddrV4::new(
            u32::arbitrary(u)?.into(),
            u16::arbitrary(u)?,
        ))
    } else {
        // Let the fuzzer reach IPv4-mapped addresses easily: they take a different path.
        let ip = if bool::arbitrary(u)? {
            std::net::Ipv4Addr::from(u32::arbitrary(u)?).to_ipv6_mapped()
        } else {
            Ipv6Addr::from(u128::arbitrary(u)?)
        };
        SocketAddr::V6(SocketAddrV6::new(
            ip,
            u16::arbitrary(u)?,
            u32::arbitrary(u)?,
            u32::arbitrary(u)?,
        ))
    };
    Ok((addr, socket_is_v6))
}

/// What decoding gives back: an IPv4-mapped IPv6 address comes back as plain IPv4, without
/// the flow label and scope, which IPv4 has no room for.
fn expected(addr: SocketAddr) -> SocketAddr {
    match addr {
        SocketAddr::V6(v6) => match v6.ip().to_ipv4_mapped() {
            Some(v4) => SocketAddr::V4(SocketAddrV4::new(v4, v6.port())),
            None => addr,
        },
        SocketAddr::V4(_) => addr,
    }
}
