//! The sockperf wire header (14 bytes, big-endian): `u64` sequence number, `u16` flags,
//! `u32` message length. A client sets CLIENT (1); it sets PONG_REQUEST (2) on the messages
//! it wants answered; warm-up messages also carry WARMUP (4).

/// Header length in bytes.
pub const HEADER_LEN: usize = 14;
/// Set by the client on every message it sends.
pub const FLAG_CLIENT: u16 = 1;
/// The client wants this message echoed.
pub const FLAG_PONG_REQUEST: u16 = 2;
/// A warm-up message (not measured by the client).
pub const FLAG_WARMUP: u16 = 4;

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// The client's sequence number, echoed back unchanged.
    pub sequence: u64,
    /// `FLAG_CLIENT`, `FLAG_PONG_REQUEST`, `FLAG_WARMUP`.
    pub flags: u16,
    /// The whole message's length in bytes, header included.
    pub length: u32,
}

/// Why a datagram is not a sockperf message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Shorter than the 14-byte header.
    Short,
}

impl Header {
    /// Reads the header at the start of `bytes`; the rest of the message is not looked at.
    pub fn parse(bytes: &[u8]) -> Result<Header, HeaderError> {
        if bytes.len() < HEADER_LEN {
            return Err(HeaderError::Short);
        }
        let mut seq = [0u8; 8];
        seq.copy_from_slice(&bytes[..8]);
        Ok(Header {
            sequence: u64::from_be_bytes(seq),
            flags: u16::from_be_bytes([bytes[8], bytes[9]]),
            length: u32::from_be_bytes([bytes[10], bytes[11], bytes[12], bytes[13]]),
        })
    }

    /// The client asked for this message to be answered (`FLAG_PONG_REQUEST`).
    pub fn wants_reply(&self) -> bool {
        self.flags & FLAG_PONG_REQUEST != 0
    }

    /// Writes the header into the first [`HEADER_LEN`] bytes of `out`.
    ///
    /// # Panics
    /// When `out` is shorter than [`HEADER_LEN`].
    pub fn write(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.sequence.to_be_bytes());
        out[8..10].copy_from_slice(&self.flags.to_be_bytes());
        out[10..14].copy_from_slice(&self.length.to_be_bytes());
    }
}

/// Turns a request (already copied into `msg`) into its reply: CLIENT cleared, rest unchanged.
/// `msg` must hold at least a header; shorter input is left alone.
pub fn mark_as_reply(msg: &mut [u8]) {
    if msg.len() < HEADER_LEN {
        return;
    }
    let flags = u16::from_be_bytes([msg[8], msg[9]]) & !FLAG_CLIENT;
    msg[8..10].copy_from_slice(&flags.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_documented_layout() {
        // seq 7, flags CLIENT|PONG_REQUEST, length 14
        let bytes = [0, 0, 0, 0, 0, 0, 0, 7, 0, 3, 0, 0, 0, 14];
        let h = Header::parse(&bytes).unwrap();
        assert_eq!(
            h,
            Header {
                sequence: 7,
                flags: 3,
                length: 14
            }
        );
        assert!(h.wants_reply());
        let mut out = [0u8; 14];
        h.write(&mut out);
        assert_eq!(out, bytes);
    }

    #[test]
    fn reply_clears_only_the_client_flag() {
        let mut msg = [0, 0, 0, 0, 0, 0, 1, 0, 0, 7, 0, 0, 0, 16, 0xaa, 0xbb];
        mark_as_reply(&mut msg);
        assert_eq!(&msg[8..10], &[0, 6]);
        assert_eq!(&msg[..8], &[0, 0, 0, 0, 0, 0, 1, 0]);
        assert_eq!(&msg[14..], &[0xaa, 0xbb]);
    }

    #[test]
    fn short_input_is_an_error_not_a_panic() {
        for n in 0..HEADER_LEN {
            assert_eq!(Header::parse(&vec![0xff; n]), Err(HeaderError::Short));
            let mut v = vec![0xff; n];
            mark_as_reply(&mut v);
            assert!(v.iter().all(|&b| b == 0xff));
        }
    }

    #[test]
    fn no_reply_without_pong_request() {
        let mut bytes = [0u8; 14];
        Header {
            sequence: 1,
            flags: FLAG_CLIENT | FLAG_WARMUP,
            length: 14,
        }
        .write(&mut bytes);
        assert!(!Header::parse(&bytes).unwrap().wants_reply());
    }
}
