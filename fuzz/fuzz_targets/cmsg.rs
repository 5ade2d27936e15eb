//! Control-message walking on arbitrary bytes, and encode-then-walk round trips.
#![no_main]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use libfuzzer_sys::arbitrary::{Arbitrary, Result, Unstructured};
use libfuzzer_sys::fuzz_target;
use udpring::datagram::{
    cmsgs, encode_cmsg, encode_pktinfo, encode_udp_segment, find_ecn, find_gro_segment_size,
    find_pktinfo, CONTROL_LEN, UDP_SEGMENT,
};

fuzz_target!(|data: &[u8]| {
    // 1. The receive side: whatever is in the control area, walking it stays inside it and
    //    terminates (each step advances by at least one header).
    let base = data.as_ptr() as usize;
    let mut steps = 0;
    for (_, _, payload) in cmsgs(data) {
        let start = payload.as_ptr() as usize;
        assert!(start >= base && start + payload.len() <= base + data.len());
        steps += 1;
    }
    assert!(steps <= data.len() / std::mem::size_of::<libc::cmsghdr>());
    let _ = find_pktinfo(data);
    // Callers split a coalesced receive by this size, so it is never 0.
    assert_ne!(find_gro_segment_size(data), Some(0));
    // An ECN codepoint is two bits.
    assert!(find_ecn(data) <= 3);

    // 2. The send side.
    let mut u = Unstructured::new(data);
    let _ = round_trip_messages(&mut u);
    let _ = round_trip_pktinfo(&mut u);
});

/// Arbitrary messages encoded one after another come back from `cmsgs` unchanged, and the
/// encoder refuses exactly the ones that do not fit.
fn round_trip_messages(u: &mut Unstructured<'_>) -> Result<()> {
    let mut out = vec![0u8; u.int_in_range(0..=256)?];
    let mut sent: Vec<(i32, i32, Vec<u8>)> = Vec::new();
    let mut end = u.int_in_range(0..=3)? * std::mem::size_of::<usize>();
    let start = end;
    for _ in 0..u.int_in_range(0..=6)? {
        let level = i32::arbitrary(u)?;
        let kind = i32::arbitrary(u)?;
        let len = u.int_in_range(0..=40)?;
        let payload = u.bytes(len)?.to_vec();
        match encode_cmsg(&mut out, end, level, kind, &payload) {
            Some(next) => {
                assert!(next > end && next <= out.len());
                end = next;
                sent.push((level, kind, payload));
            }
            None => {
                let needed = std::mem::size_of::<libc::cmsghdr>() + payload.len();
                assert!(end + needed.next_multiple_of(std::mem::size_of::<usize>()) > out.len());
                break;
            }
        }
    }
    if start <= out.len() {
        let got: Vec<(i32, i32, Vec<u8>)> = cmsgs(&out[start..end])
            .map(|(l, k, d)| (l, k, d.to_vec()))
            .collect();
        assert_eq!(got, sent);
    }
    Ok(())
}

/// The packet-info message a reply carries names the address it was built from, also with a
/// `UDP_SEGMENT` message after it, as a GSO train has.
fn round_trip_pktinfo(u: &mut Unstructured<'_>) -> Result<()> {
    let local = if bool::arbitrary(u)? {
        IpAddr::V4(Ipv4Addr::from(u32::arbitrary(u)?))
    } else {
        IpAddr::V6(Ipv6Addr::from(u128::arbitrary(u)?))
    };
    // find_pktinfo reports IPv4-mapped IPv6 addresses as IPv4.
    let expected = match local {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(local, IpAddr::V4),
        IpAddr::V4(_) => local,
    };
    let mut out = [0u8; CONTROL_LEN];
    let used = encode_pktinfo(local, &mut out);
    assert!(used > 0 && used <= CONTROL_LEN);
    assert_eq!(find_pktinfo(&out[..used]), Some(expected));

    let segment = u16::arbitrary(u)?;
    // Both messages fit in CONTROL_LEN for either family: the send pool relies on it.
    let end = encode_udp_segment(&mut out, used, segment).expect("pktinfo + UDP_SEGMENT fit");
    let msgs: Vec<_> = cmsgs(&out[..end]).collect();
    assert_eq!(msgs.len(), 2);
    assert_eq!((msgs[1].0, msgs[1].1), (libc::SOL_UDP, UDP_SEGMENT));
    assert_eq!(msgs[1].2, &segment.to_ne_bytes());
    assert_eq!(find_pktinfo(&out[..end]), Some(expected));
    Ok(())
}
