//! `--gso N`: clients that batch like QUIC stacks do. Requests leave as UDP GSO trains (one
//! message with a `UDP_SEGMENT` control message, gso_size = the request size, up to N requests
//! back to back) and replies are read with `UDP_GRO` on, so one receive may carry several
//! replies. This file holds the pure parts: how requests are cut into trains, how a coalesced
//! receive is split back into datagrams, the limits, and the errors when the kernel refuses.

use std::io;

use udpring::kernel::wire::MAX_GSO_SEGMENTS;

/// Most bytes one GSO train may carry: the largest UDP/IPv4 payload (the kernel checks the
/// train's total length against it in `udp_send_skb`).
pub(super) const MAX_TRAIN_BYTES: usize = 65_507;

/// Room for one coalesced receive: a GRO buffer is one IP packet's worth of UDP payload.
pub(super) const GRO_RECV_LEN: usize = u16::MAX as usize;

/// Checks `--gso N` against `--size`: at most [`MAX_GSO_SEGMENTS`] requests and
/// [`MAX_TRAIN_BYTES`] bytes per train.
pub(super) fn check(per_train: usize, size: usize) -> Result<(), String> {
    if per_train == 0 || per_train > MAX_GSO_SEGMENTS {
        return Err(format!(
            "--gso {per_train} out of range (1..={MAX_GSO_SEGMENTS} datagrams per train)"
        ));
    }
    let bytes = per_train.saturating_mul(size);
    if bytes > MAX_TRAIN_BYTES {
        return Err(format!(
            "--gso {per_train} with --size {size} makes {bytes}-byte trains; a UDP GSO train \
             carries at most {MAX_TRAIN_BYTES} bytes (lower --gso or --size)"
        ));
    }
    Ok(())
}

/// Requests per chunk handed to one `sendmmsg`: the most whole trains that fit in `batch`
/// requests, so a window is cut into full trains and only its last train is shorter.
pub(super) fn chunk_len(per_train: usize, batch: usize) -> usize {
    (batch / per_train.max(1)).max(1) * per_train.max(1)
}

/// Requests in each train when `n` requests leave in trains of `per_train`: full trains, then
/// one shorter train for the remainder.
pub(super) fn train_lens(n: usize, per_train: usize) -> impl Iterator<Item = usize> {
    let per_train = per_train.max(1);
    (0..n.div_ceil(per_train)).map(move |t| per_train.min(n - t * per_train))
}

/// Splits one received buffer into its datagrams: segments of `segment_len` bytes, the last
/// one possibly shorter, when the kernel coalesced it (the `UDP_GRO` control message); the
/// whole buffer otherwise. An empty buffer is one empty datagram.
pub(super) fn split_gro(buf: &[u8], segment_len: Option<u16>) -> impl Iterator<Item = &[u8]> {
    let step = match segment_len {
        Some(s) if s > 0 && !buf.is_empty() => usize::from(s),
        _ => buf.len().max(1),
    };
    // `chunks` yields nothing for an empty slice; an empty datagram still is one.
    let empty = buf.is_empty().then_some(buf);
    buf.chunks(step).chain(empty)
}

/// The one-line error when the first train is refused: EIO and EINVAL are how a kernel (or a
/// route) without UDP GSO answers `UDP_SEGMENT` (`udp_send_skb`), and EMSGSIZE comes back
/// when a segment does not fit the route's MTU (a GSO segment is never fragmented, where a
/// plain datagram of that size would be); anything else is returned as it is.
pub(super) fn refused(e: io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(libc::EMSGSIZE) => io::Error::other(format!(
            "--gso: the kernel refused a UDP GSO train (UDP_SEGMENT): {e}; each segment \
             (--size plus the IP and UDP headers) must fit the route's MTU, since GSO \
             segments are not fragmented: lower --size or leave out --gso"
        )),
        Some(libc::EIO) => io::Error::other(format!(
            "--gso: the kernel refused a UDP GSO train (UDP_SEGMENT): {e}; UDP GSO needs \
             Linux 4.18+ and a route whose device offloads UDP checksums"
        )),
        Some(libc::EINVAL) => io::Error::other(format!(
            "--gso: the kernel refused a UDP GSO train (UDP_SEGMENT): {e}; UDP GSO needs \
             Linux 4.18+, and --size plus the IP and UDP headers must fit the route's MTU"
        )),
        _ => e,
    }
}

/// Whether a failed send of the first train means the kernel refuses UDP GSO.
pub(super) fn is_refusal(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(libc::EIO | libc::EINVAL | libc::EMSGSIZE)
    )
}

/// The one-line error when `setsockopt(UDP_GRO)` fails.
pub(super) fn gro_unavailable(e: &io::Error) -> io::Error {
    io::Error::other(format!(
        "--gso: could not enable UDP GRO (setsockopt SOL_UDP UDP_GRO): {e}; UDP GRO needs \
         Linux 5.0+"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Lays `datagrams` out back to back, as a GSO train (and so a GRO receive) carries them.
    fn train(datagrams: &[Vec<u8>]) -> Vec<u8> {
        datagrams.concat()
    }

    #[test]
    fn trains_cover_the_window_with_a_shorter_last_one() {
        let lens = |n, per| train_lens(n, per).collect::<Vec<_>>();
        assert_eq!(
            lens(8, 16),
            vec![8],
            "a window smaller than N is one short train"
        );
        assert_eq!(lens(32, 16), vec![16, 16]);
        assert_eq!(lens(37, 16), vec![16, 16, 5]);
        assert_eq!(lens(3, 1), vec![1, 1, 1]);
        assert_eq!(lens(0, 16), Vec::<usize>::new());
        for n in 0..300 {
            for per in 1..=64 {
                let l = lens(n, per);
                assert_eq!(l.iter().sum::<usize>(), n);
                assert!(l.iter().all(|&k| (1..=per).contains(&k)));
                // Only the last train may be short.
                assert!(
                    l.iter().rev().skip(1).all(|&k| k == per),
                    "{n} {per}: {l:?}"
                );
            }
        }
    }

    #[test]
    fn chunks_hold_whole_trains() {
        assert_eq!(chunk_len(16, 64), 64);
        assert_eq!(chunk_len(48, 64), 48);
        assert_eq!(chunk_len(64, 64), 64);
        assert_eq!(chunk_len(1, 64), 64);
        assert_eq!(chunk_len(10, 64), 60);
    }

    /// Every request size up to 1472 bytes (the largest UDP/IPv4 payload of a 1500-byte
    /// Ethernet frame), in trains whose last datagram is as long, one shorter, or one byte:
    /// the split gives back exactly the datagrams that went in.
    #[test]
    fn split_gives_back_exactly_the_datagrams_of_a_train() {
        for size in 1..=1472usize {
            for last in [size, size - 1, 1] {
                if last == 0 {
                    continue;
                }
                let full = (MAX_GSO_SEGMENTS - 1).min((MAX_TRAIN_BYTES - last) / size);
                let mut datagrams: Vec<Vec<u8>> =
                    (0..full).map(|i| vec![(i % 251) as u8; size]).collect();
                datagrams.push(vec![0xEE; last]);
                let buf = train(&datagrams);
                assert!(buf.len() <= MAX_TRAIN_BYTES);
                let seg = u16::try_from(size).ok();
                let got: Vec<&[u8]> = split_gro(&buf, seg).collect();
                assert_eq!(got.len(), datagrams.len(), "size {size} last {last}");
                assert!(got.iter().zip(&datagrams).all(|(g, d)| *g == d.as_slice()));
            }
        }
    }

    #[test]
    fn without_the_control_message_a_buffer_is_one_datagram() {
        let buf = vec![7u8; 3000];
        assert_eq!(split_gro(&buf, None).collect::<Vec<_>>(), vec![&buf[..]]);
        assert_eq!(split_gro(&buf, Some(0)).count(), 1);
        // Empty datagrams are datagrams too (they count as strays, never vanish).
        let empty: &[u8] = &[];
        assert_eq!(split_gro(empty, None).collect::<Vec<_>>(), vec![empty]);
        assert_eq!(split_gro(empty, Some(64)).count(), 1);
        // A segment size beyond the buffer: one datagram.
        assert_eq!(split_gro(&buf[..10], Some(64)).count(), 1);
    }

    #[test]
    fn limits_are_checked() {
        assert!(check(16, 64).is_ok());
        assert!(check(64, 1023).is_ok());
        assert!(check(1, 65_507).is_ok());
        assert!(check(0, 64).is_err());
        assert!(check(65, 64).unwrap_err().contains("1..=64"));
        let e = check(64, 1024).unwrap_err();
        assert!(e.contains("65536-byte") && e.contains("65507"), "{e}");
    }

    #[test]
    fn refusals_name_the_feature_and_kernel() {
        for errno in [libc::EIO, libc::EINVAL] {
            let e = io::Error::from_raw_os_error(errno);
            assert!(is_refusal(&e));
            let msg = refused(e).to_string();
            assert!(
                msg.contains("UDP GSO") && msg.contains("Linux 4.18"),
                "{msg}"
            );
            assert!(!msg.contains('\n'));
        }
        let mtu = refused(io::Error::from_raw_os_error(libc::EMSGSIZE)).to_string();
        assert!(mtu.contains("MTU") && !mtu.contains('\n'), "{mtu}");
        let again = io::Error::from_raw_os_error(libc::EAGAIN);
        assert!(!is_refusal(&again));
        let msg = gro_unavailable(&io::Error::from_raw_os_error(libc::ENOPROTOOPT)).to_string();
        assert!(
            msg.contains("UDP GRO") && msg.contains("Linux 5.0"),
            "{msg}"
        );
    }
}
