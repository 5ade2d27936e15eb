//! Ethernet frames of UDP over IPv4 and IPv6, read and written in place: what the AF_XDP path
//! takes from the receive ring and puts on the transmit ring. Every length in a frame is
//! checked against the frame before it is used, and both checksums are verified: a frame the
//! kernel's UDP stack would drop is counted and never answered.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// An Ethernet header without a VLAN tag.
pub const ETH_LEN: usize = 14;
/// An IPv4 header without options.
pub const IPV4_LEN: usize = 20;
/// An IPv6 header.
pub const IPV6_LEN: usize = 40;
/// A UDP header.
pub const UDP_LEN: usize = 8;
const ETHERTYPE_IPV4: u16 = 0x0800;
const ETHERTYPE_IPV6: u16 = 0x86dd;
const PROTO_UDP: u8 = 17;

/// A UDP datagram found in a frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Udp {
    /// The sender's MAC address (where the reply goes).
    pub peer_mac: [u8; 6],
    /// The MAC address it was sent to (the reply's source).
    pub local_mac: [u8; 6],
    /// Its source address and port.
    pub peer: SocketAddr,
    /// Its destination address and port.
    pub local: SocketAddr,
    /// Where the payload starts in the frame.
    pub payload_at: usize,
    /// The payload's length (the UDP length less its header).
    pub payload_len: usize,
    /// The ECN codepoint of the IP header.
    pub ecn: u8,
}

/// Why a frame is not a datagram to answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// Not UDP over IPv4/IPv6 without options or fragments (the program passes those to the
    /// kernel, so one here means the program and the parser disagree).
    NotUdp,
    /// A header cut short, a length field that does not fit the frame or contradicts another.
    Malformed,
    /// The IPv4 header checksum or the UDP checksum is wrong (or absent over IPv6).
    BadChecksum,
}

fn be16(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Ones'-complement sum of `bytes` (odd length padded with a zero byte) added to `sum`.
fn sum(mut acc: u32, bytes: &[u8]) -> u32 {
    let mut chunks = bytes.chunks_exact(2);
    for c in &mut chunks {
        acc += u32::from(u16::from_be_bytes([c[0], c[1]]));
    }
    if let [last] = chunks.remainder() {
        acc += u32::from(*last) << 8;
    }
    acc
}

fn fold(mut acc: u32) -> u16 {
    while acc > 0xffff {
        acc = (acc & 0xffff) + (acc >> 16);
    }
    acc as u16
}

/// The Internet checksum of `bytes` (RFC 1071).
pub fn checksum(bytes: &[u8]) -> u16 {
    !fold(sum(0, bytes))
}

/// The UDP checksum over the pseudo-header of `src`/`dst` and `udp` (header and payload, its
/// checksum field as it is). A segment whose checksum field is right sums to 0.
fn udp_sum(src: &IpAddr, dst: &IpAddr, udp: &[u8]) -> u16 {
    let mut acc = 0u32;
    match (src, dst) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            acc = sum(acc, &s.octets());
            acc = sum(acc, &d.octets());
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            acc = sum(acc, &s.octets());
            acc = sum(acc, &d.octets());
        }
        _ => unreachable!("one family per header"),
    }
    acc += u32::from(PROTO_UDP);
    acc += udp.len() as u32;
    !fold(sum(acc, udp))
}

/// Reads the UDP datagram in `frame`, checking every length and both checksums.
pub fn parse(frame: &[u8]) -> Result<Udp, Refused> {
    if frame.len() < ETH_LEN {
        return Err(Refused::Malformed);
    }
    let mut peer_mac = [0u8; 6];
    let mut local_mac = [0u8; 6];
    local_mac.copy_from_slice(&frame[0..6]);
    peer_mac.copy_from_slice(&frame[6..12]);
    let ip = &frame[ETH_LEN..];
    let (src, dst, ecn, udp_at, ip_payload) = match be16(frame, 12) {
        ETHERTYPE_IPV4 => {
            if ip.len() < IPV4_LEN {
                return Err(Refused::Malformed);
            }
            if ip[0] != 0x45 || be16(ip, 6) & 0x3fff != 0 || ip[9] != PROTO_UDP {
                return Err(Refused::NotUdp);
            }
            let total = usize::from(be16(ip, 2));
            if total < IPV4_LEN + UDP_LEN || total > ip.len() {
                return Err(Refused::Malformed);
            }
            if checksum(&ip[..IPV4_LEN]) != 0 {
                return Err(Refused::BadChecksum);
            }
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            (
                IpAddr::V4(src),
                IpAddr::V4(dst),
                ip[1] & 3,
                ETH_LEN + IPV4_LEN,
                total - IPV4_LEN,
            )
        }
        ETHERTYPE_IPV6 => {
            if ip.len() < IPV6_LEN {
                return Err(Refused::Malformed);
            }
            if ip[0] >> 4 != 6 || ip[6] != PROTO_UDP {
                return Err(Refused::NotUdp);
            }
            let payload = usize::from(be16(ip, 4));
            if payload < UDP_LEN || IPV6_LEN + payload > ip.len() {
                return Err(Refused::Malformed);
            }
            let mut s = [0u8; 16];
            let mut d = [0u8; 16];
            s.copy_from_slice(&ip[8..24]);
            d.copy_from_slice(&ip[24..40]);
            let tclass = (ip[0] << 4) | (ip[1] >> 4);
            (
                IpAddr::V6(Ipv6Addr::from(s)),
                IpAddr::V6(Ipv6Addr::from(d)),
                tclass & 3,
                ETH_LEN + IPV6_LEN,
                payload,
            )
        }
        _ => return Err(Refused::NotUdp),
    };
    let udp = &frame[udp_at..udp_at + ip_payload];
    let udp_len = usize::from(be16(udp, 4));
    // The kernel drops a UDP length past the IP payload and trims an IP payload longer than
    // the UDP length; here both must agree exactly (a padded IP payload is not a client's).
    if udp_len != ip_payload {
        return Err(Refused::Malformed);
    }
    let field = be16(udp, 6);
    let checked = match (field, &src) {
        (0, IpAddr::V4(_)) => true,
        (0, IpAddr::V6(_)) => false,
        _ => udp_sum(&src, &dst, udp) == 0,
    };
    if !checked {
        return Err(Refused::BadChecksum);
    }
    Ok(Udp {
        peer_mac,
        local_mac,
        peer: SocketAddr::new(src, be16(udp, 0)),
        local: SocketAddr::new(dst, be16(udp, 2)),
        payload_at: udp_at + UDP_LEN,
        payload_len: udp_len - UDP_LEN,
        ecn,
    })
}

/// The headers' length before a payload from `local` (the family decides).
pub fn header_len(local: &SocketAddr) -> usize {
    ETH_LEN
        + UDP_LEN
        + match local {
            SocketAddr::V4(_) => IPV4_LEN,
            SocketAddr::V6(_) => IPV6_LEN,
        }
}

/// Where a frame goes: MAC addresses and the UDP 4-tuple.
#[derive(Debug, Clone, Copy)]
pub struct Route {
    /// This interface's MAC address.
    pub src_mac: [u8; 6],
    /// The peer's (or its next hop's) MAC address.
    pub dst_mac: [u8; 6],
    /// The reply's source address and port.
    pub src: SocketAddr,
    /// The peer's address and port.
    pub dst: SocketAddr,
    /// The ECN codepoint to set.
    pub ecn: u8,
}

/// Writes the headers for a payload of `payload_len` bytes already at
/// `frame[header_len(src)..]`, and returns the frame's length. `None` when the families of
/// the two addresses differ or the payload does not fit an IP datagram.
pub fn write_headers(frame: &mut [u8], route: &Route, payload_len: usize) -> Option<usize> {
    let hdr = header_len(&route.src);
    let total = hdr + payload_len;
    if total > frame.len() {
        return None;
    }
    frame[0..6].copy_from_slice(&route.dst_mac);
    frame[6..12].copy_from_slice(&route.src_mac);
    let udp_len = UDP_LEN + payload_len;
    let udp_at = match (route.src.ip(), route.dst.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let ip_len = u16::try_from(IPV4_LEN + udp_len).ok()?;
            frame[12..14].copy_from_slice(&ETHERTYPE_IPV4.to_be_bytes());
            let ip = &mut frame[ETH_LEN..ETH_LEN + IPV4_LEN];
            ip[0] = 0x45;
            ip[1] = route.ecn & 3;
            ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
            ip[4..6].copy_from_slice(&[0, 0]);
            // Don't fragment, as the ring path's sockets (`IP_PMTUDISC_PROBE` aside).
            ip[6..8].copy_from_slice(&0x4000u16.to_be_bytes());
            ip[8] = 64;
            ip[9] = PROTO_UDP;
            ip[10..12].copy_from_slice(&[0, 0]);
            ip[12..16].copy_from_slice(&s.octets());
            ip[16..20].copy_from_slice(&d.octets());
            let c = checksum(ip);
            ip[10..12].copy_from_slice(&c.to_be_bytes());
            ETH_LEN + IPV4_LEN
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let payload = u16::try_from(udp_len).ok()?;
            frame[12..14].copy_from_slice(&ETHERTYPE_IPV6.to_be_bytes());
            let ip = &mut frame[ETH_LEN..ETH_LEN + IPV6_LEN];
            let ecn = route.ecn & 3;
            ip[0..4].copy_from_slice(&[0x60, ecn << 4, 0, 0]);
            ip[4..6].copy_from_slice(&payload.to_be_bytes());
            ip[6] = PROTO_UDP;
            ip[7] = 64;
            ip[8..24].copy_from_slice(&s.octets());
            ip[24..40].copy_from_slice(&d.octets());
            ETH_LEN + IPV6_LEN
        }
        _ => return None,
    };
    let udp_len16 = u16::try_from(udp_len).ok()?;
    let udp = &mut frame[udp_at..total];
    udp[0..2].copy_from_slice(&route.src.port().to_be_bytes());
    udp[2..4].copy_from_slice(&route.dst.port().to_be_bytes());
    udp[4..6].copy_from_slice(&udp_len16.to_be_bytes());
    udp[6..8].copy_from_slice(&[0, 0]);
    let mut c = udp_sum(&route.src.ip(), &route.dst.ip(), udp);
    if c == 0 {
        // 0 means "no checksum" (and is not allowed over IPv6): its complement stands in.
        c = 0xffff;
    }
    udp[6..8].copy_from_slice(&c.to_be_bytes());
    Some(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: [u8; 6] = [2, 0, 0, 0, 0, 1];
    const B: [u8; 6] = [2, 0, 0, 0, 0, 2];

    fn frame(src: SocketAddr, dst: SocketAddr, payload: &[u8]) -> Vec<u8> {
        let hdr = header_len(&src);
        let mut f = vec![0u8; hdr + payload.len()];
        f[hdr..].copy_from_slice(payload);
        let route = Route {
            src_mac: A,
            dst_mac: B,
            src,
            dst,
            ecn: 2,
        };
        let n = write_headers(&mut f, &route, payload.len()).unwrap();
        assert_eq!(n, f.len());
        f
    }

    fn addrs(v6: bool) -> (SocketAddr, SocketAddr) {
        if v6 {
            (
                "[fd00::1]:4000".parse().unwrap(),
                "[fd00::2]:9000".parse().unwrap(),
            )
        } else {
            (
                "10.0.0.1:4000".parse().unwrap(),
                "10.0.0.2:9000".parse().unwrap(),
            )
        }
    }

    #[test]
    fn a_written_frame_reads_back_exactly_for_every_size() {
        for v6 in [false, true] {
            let (src, dst) = addrs(v6);
            for len in [0usize, 1, 2, 7, 100, 1471, 1472] {
                let payload: Vec<u8> = (0..len).map(|i| (i * 7 + len) as u8).collect();
                let f = frame(src, dst, &payload);
                let udp = parse(&f).expect("parses");
                assert_eq!((udp.peer, udp.local), (src, dst));
                assert_eq!((udp.peer_mac, udp.local_mac), (A, B));
                assert_eq!(udp.ecn, 2);
                assert_eq!(&f[udp.payload_at..][..udp.payload_len], &payload[..]);
            }
        }
    }

    /// The IPv4 header of the worked example in Wikipedia's "IPv4 header checksum"
    /// (192.168.0.1 to 192.168.0.199), whose checksum is 0xb861.
    #[test]
    fn the_checksum_matches_a_worked_example() {
        let mut header = [
            0x45, 0x00, 0x00, 0x73, 0x00, 0x00, 0x40, 0x00, 0x40, 0x11, 0x00, 0x00, 0xc0, 0xa8,
            0x00, 0x01, 0xc0, 0xa8, 0x00, 0xc7,
        ];
        assert_eq!(checksum(&header), 0xb861);
        header[10..12].copy_from_slice(&[0xb8, 0x61]);
        assert_eq!(checksum(&header), 0);
    }

    #[test]
    fn bad_lengths_and_checksums_are_refused() {
        for v6 in [false, true] {
            let (src, dst) = addrs(v6);
            let good = frame(src, dst, b"hello world");
            let ip_len_at = if v6 { ETH_LEN + 4 } else { ETH_LEN + 2 };
            let udp_at = header_len(&src) - UDP_LEN;
            // Every cut short of the whole frame.
            for cut in 0..good.len() {
                assert!(parse(&good[..cut]).is_err(), "v6 {v6} cut {cut}");
            }
            // An IP length past the frame.
            let mut f = good.clone();
            let l = be16(&f, ip_len_at) + 1;
            f[ip_len_at..ip_len_at + 2].copy_from_slice(&l.to_be_bytes());
            assert!(parse(&f).is_err());
            // A UDP length that disagrees with the IP length, both ways.
            for delta in [-1i32, 1] {
                let mut f = good.clone();
                let l = (i32::from(be16(&f, udp_at + 4)) + delta) as u16;
                f[udp_at + 4..udp_at + 6].copy_from_slice(&l.to_be_bytes());
                assert_eq!(parse(&f), Err(Refused::Malformed));
            }
            // A UDP length under the header.
            let mut f = good.clone();
            f[udp_at + 4..udp_at + 6].copy_from_slice(&3u16.to_be_bytes());
            assert_eq!(parse(&f), Err(Refused::Malformed));
            // A flipped payload bit.
            let mut f = good.clone();
            *f.last_mut().unwrap() ^= 1;
            assert_eq!(parse(&f), Err(Refused::BadChecksum));
            // No UDP checksum: allowed over IPv4 only.
            let mut f = good.clone();
            f[udp_at + 6..udp_at + 8].copy_from_slice(&[0, 0]);
            assert_eq!(parse(&f).is_ok(), !v6);
        }
        // A bad IPv4 header checksum, IP options, a fragment, another protocol.
        let (src, dst) = addrs(false);
        let good = frame(src, dst, b"x");
        let mut f = good.clone();
        f[ETH_LEN + 8] = 1; // TTL, under the header checksum
        assert_eq!(parse(&f), Err(Refused::BadChecksum));
        let mut f = good.clone();
        f[ETH_LEN] = 0x46;
        assert_eq!(parse(&f), Err(Refused::NotUdp));
        let mut f = good.clone();
        f[ETH_LEN + 6] |= 0x20; // more fragments
        assert_eq!(parse(&f), Err(Refused::NotUdp));
        let mut f = good.clone();
        f[ETH_LEN + 9] = 6;
        assert_eq!(parse(&f), Err(Refused::NotUdp));
        let mut f = good;
        f[12] = 0x08;
        f[13] = 0x06; // ARP
        assert_eq!(parse(&f), Err(Refused::NotUdp));
    }
}
