//! The layout of the server connection IDs udpring issues, and the generator that issues
//! them for one worker (`WorkerCids`, quinn's `ConnectionIdGenerator`).
//!
//! Without a load balancer ([`CidFormat::default`]) a CID is 8 bytes: the worker's index,
//! the process generation, then 6 pseudo-random bytes. With one ([`LbConfig`]), a CID follows
//! the QUIC-LB plaintext format (draft-ietf-quic-load-balancers-19, sections 2 and 5):
//!
//! ```text
//! first octet        server ID            nonce (at least 4 bytes)
//! CR(3) | LEN-1(5)   1..=15 bytes         worker (1) | generation (1) | random (2..=5)
//! ```
//!
//! The generation (0 to 15, `crate::reuseport`) tells the processes serving one address
//! apart across `--takeover`: the reuseport program sends a packet to the process of its
//! CID's generation, so connections of the process taken over from keep reaching it.
//!
//! The config rotation bits (`--quic-lb-config-id`, 0 to 6; 7 is the draft's "unroutable")
//! tell a load balancer which configuration to decode with, the low five bits give the
//! length of the rest (the draft's length self-description), and the server ID
//! (`--quic-server-id`) names the host. A load balancer that reads the server ID at offset 1
//! (Katran's QUIC server-ID mapping, Envoy's QUIC-LB, an nftables map; see
//! `kernel-notes/operations.md`) keeps a connection on its host whatever its address does;
//! udpring's own reuseport program reads the worker just past the server ID
//! ([`CidFormat::worker_offset`]). The total stays within QUIC's 20 bytes: the random part
//! shrinks from 6 to 3 bytes for server IDs of 13 to 15 bytes.

/// Length of the connection IDs issued without a load balancer configuration.
pub const PLAIN_LEN: usize = 8;
/// The longest server ID (QUIC-LB: 1 to 15 bytes).
pub const MAX_SERVER_ID: usize = 15;
/// The highest config rotation codepoint a configuration may use (0b111 is reserved).
pub const MAX_CONFIG_ID: u8 = 6;
/// QUIC's longest connection ID (RFC 9000 section 17.2).
const MAX_CID: usize = 20;
/// Generations a CID can name.
const GENERATIONS: u8 = 16;

/// A QUIC-LB configuration: the config rotation codepoint and this host's server ID.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LbConfig {
    config_id: u8,
    server_id: Vec<u8>,
}

impl LbConfig {
    /// `config_id` 0 to 6, `server_id` 1 to 15 bytes; otherwise an error naming the limit.
    pub fn new(config_id: u8, server_id: Vec<u8>) -> Result<LbConfig, String> {
        if config_id > MAX_CONFIG_ID {
            return Err(format!(
                "QUIC-LB config rotation {config_id}: 0 to {MAX_CONFIG_ID} (7 means unroutable)"
            ));
        }
        if server_id.is_empty() || server_id.len() > MAX_SERVER_ID {
            return Err(format!(
                "QUIC-LB server ID of {} bytes: 1 to {MAX_SERVER_ID} bytes",
                server_id.len()
            ));
        }
        Ok(LbConfig {
            config_id,
            server_id,
        })
    }

    /// The config rotation codepoint.
    pub fn config_id(&self) -> u8 {
        self.config_id
    }

    /// This host's server ID.
    pub fn server_id(&self) -> &[u8] {
        &self.server_id
    }
}

/// How server connection IDs are laid out: today's 8 bytes, or QUIC-LB's plaintext format.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CidFormat {
    lb: Option<LbConfig>,
    generation: u8,
}

impl CidFormat {
    /// QUIC-LB's plaintext format with `lb`.
    pub fn load_balanced(lb: LbConfig) -> CidFormat {
        CidFormat {
            lb: Some(lb),
            generation: 0,
        }
    }

    /// The same layout for CIDs of process generation `generation` (taken modulo
    /// [`crate::reuseport::GENERATIONS`]).
    pub fn with_generation(mut self, generation: u8) -> CidFormat {
        self.generation = generation % GENERATIONS;
        self
    }

    /// The generation the CIDs carry.
    pub fn generation(&self) -> u8 {
        self.generation
    }

    /// The QUIC-LB configuration, if any.
    pub fn lb(&self) -> Option<&LbConfig> {
        self.lb.as_ref()
    }

    /// Length of every CID issued.
    pub fn len(&self) -> usize {
        match &self.lb {
            None => PLAIN_LEN,
            Some(lb) => 1 + lb.server_id.len() + 2 + random_len(lb.server_id.len()),
        }
    }

    /// Whether CIDs are empty (never: QUIC routing needs one).
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Where the worker's index sits in a CID.
    pub fn worker_offset(&self) -> usize {
        match &self.lb {
            None => 0,
            Some(lb) => 1 + lb.server_id.len(),
        }
    }

    /// A CID for `worker`, its other bytes from `random` (at least [`CidFormat::len`] bytes
    /// are read from it, fewer are used).
    pub fn make(&self, worker: u8, random: &[u8]) -> Vec<u8> {
        match &self.lb {
            None => {
                let mut cid = Vec::with_capacity(PLAIN_LEN);
                cid.push(worker);
                cid.push(self.generation);
                cid.extend_from_slice(&random[..PLAIN_LEN - 2]);
                cid
            }
            Some(lb) => {
                let mut nonce = Vec::with_capacity(2 + random_len(lb.server_id.len()));
                nonce.push(worker);
                nonce.push(self.generation);
                nonce.extend_from_slice(&random[..random_len(lb.server_id.len())]);
                encode_plaintext(lb.config_id, &lb.server_id, &nonce)
            }
        }
    }

    /// The worker a CID of this format names; `None` for a CID of another length, another
    /// configuration or another server.
    pub fn worker_of(&self, cid: &[u8]) -> Option<usize> {
        if cid.len() != self.len() {
            return None;
        }
        if let Some(lb) = &self.lb {
            if cid[0] != first_octet(lb.config_id, cid.len())
                || cid[1..1 + lb.server_id.len()] != lb.server_id[..]
            {
                return None;
            }
        }
        cid.get(self.worker_offset()).map(|&b| usize::from(b))
    }

    /// Whether `cid` is one this format issues for `worker`: this server's, this worker's,
    /// this generation's.
    pub fn issued_by(&self, cid: &[u8], worker: u8) -> bool {
        self.worker_of(cid) == Some(usize::from(worker))
            && cid.get(self.worker_offset() + 1) == Some(&self.generation)
    }
}

/// Random bytes after the worker's and the generation's, for a server ID of `sid_len` bytes:
/// 5, fewer where the CID would pass 20 bytes, never fewer than 2 (the nonce, worker and
/// generation included, is then 4: the draft's minimum).
fn random_len(sid_len: usize) -> usize {
    (MAX_CID - 3 - sid_len).clamp(2, 5)
}

/// The first octet: config rotation in the top 3 bits, the length of the rest in the low 5.
fn first_octet(config_id: u8, cid_len: usize) -> u8 {
    (config_id << 5) | ((cid_len - 1) as u8 & 0x1f)
}

/// A QUIC-LB plaintext CID (draft-ietf-quic-load-balancers-19 section 5): first octet,
/// server ID, nonce.
pub fn encode_plaintext(config_id: u8, server_id: &[u8], nonce: &[u8]) -> Vec<u8> {
    let len = 1 + server_id.len() + nonce.len();
    let mut cid = Vec::with_capacity(len);
    cid.push(first_octet(config_id, len));
    cid.extend_from_slice(server_id);
    cid.extend_from_slice(nonce);
    cid
}

/// What a load balancer reads from a plaintext CID: the config rotation, the self-described
/// length (of the bytes after the first), and the server ID of `sid_len` bytes. `None` when
/// the CID is too short for them.
pub fn decode_plaintext(cid: &[u8], sid_len: usize) -> Option<(u8, usize, &[u8])> {
    let first = *cid.first()?;
    let sid = cid.get(1..1 + sid_len)?;
    Some((first >> 5, usize::from(first & 0x1f), sid))
}

/// Connection IDs of the server's [`CidFormat`] that name the worker (see `super::route`); their
/// random bytes are a keyed PRF (SipHash-1-3 under a random key) of a counter: unlinkable to
/// anyone without the key (RFC 9000 section 5.1), and no system call per ID.
pub(super) struct WorkerCids {
    worker: u8,
    format: CidFormat,
    key: [u8; 16],
    issued: u64,
}

impl WorkerCids {
    pub(super) fn new(worker: u8, format: CidFormat) -> WorkerCids {
        let mut key = [0u8; 16];
        if ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key).is_err() {
            // Without the system's randomness TLS fails anyway; the clock keeps the IDs from
            // being predictable across restarts meanwhile.
            let nanos = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos());
            key = nanos.to_ne_bytes();
        }
        WorkerCids {
            worker,
            format,
            key,
            issued: 0,
        }
    }
}

impl quinn_proto::ConnectionIdGenerator for WorkerCids {
    fn generate_cid(&mut self) -> quinn_proto::ConnectionId {
        use std::hash::Hasher;
        let mut hasher = siphasher::sip::SipHasher13::new_with_key(&self.key);
        hasher.write_u64(self.issued);
        self.issued += 1;
        let random = hasher.finish().to_le_bytes();
        quinn_proto::ConnectionId::new(&self.format.make(self.worker, &random))
    }

    fn validate(&self, cid: &quinn_proto::ConnectionId) -> Result<(), quinn_proto::InvalidCid> {
        if self.format.issued_by(cid, self.worker) {
            Ok(())
        } else {
            Err(quinn_proto::InvalidCid)
        }
    }

    fn cid_len(&self) -> usize {
        self.format.len()
    }

    fn cid_lifetime(&self) -> Option<std::time::Duration> {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    /// draft-ietf-quic-load-balancers-19, appendix "Unencrypted CIDs", its first vector
    /// (config rotation 0, server ID c4605e, nonce 4504cc4f). The draft's second vector
    /// cannot be checked as printed: its nonce `3487d970b` has an odd number of hex digits,
    /// and its CID `20a350d28b4203487d970b` does not carry its server ID `350d28b420` at
    /// offset 1 (a nibble is missing).
    #[test]
    fn the_drafts_unencrypted_test_vector() {
        let cid = encode_plaintext(0, &hex("c4605e"), &hex("4504cc4f"));
        assert_eq!(cid, hex("07c4605e4504cc4f"));
        assert_eq!(decode_plaintext(&cid, 3), Some((0, 7, &hex("c4605e")[..])));
        // The same through the server's own layout: worker 0x45, generation 4, random cc4f.
        let format =
            CidFormat::load_balanced(LbConfig::new(0, hex("c4605e")).unwrap()).with_generation(4);
        let mut random = hex("cc4f");
        random.extend_from_slice(&[0; 8]);
        let made = format.make(0x45, &random);
        assert_eq!(
            &made[..4],
            &hex("0ac4605e")[..],
            "first octet: 11 bytes follow"
        );
        assert_eq!(&made[4..8], &hex("4504cc4f")[..]);
        assert_eq!(format.worker_of(&made), Some(0x45));
        assert!(format.issued_by(&made, 0x45));
        assert!(!format.clone().with_generation(5).issued_by(&made, 0x45));
    }

    #[test]
    fn every_server_id_length_fits_quic_and_names_server_and_worker() {
        let random = [0xabu8; 32];
        for sid_len in 1..=MAX_SERVER_ID {
            for config_id in 0..=MAX_CONFIG_ID {
                let sid: Vec<u8> = (0..sid_len as u8).map(|i| i * 17 + 1).collect();
                let format =
                    CidFormat::load_balanced(LbConfig::new(config_id, sid.clone()).unwrap());
                let cid = format.make(9, &random);
                assert_eq!(cid.len(), format.len());
                assert!(cid.len() <= 20, "sid {sid_len}: {} bytes", cid.len());
                let nonce = cid.len() - 1 - sid_len;
                assert!(nonce >= 4, "sid {sid_len}: nonce {nonce}");
                let (cr, rest, got_sid) = decode_plaintext(&cid, sid_len).unwrap();
                assert_eq!((cr, rest, got_sid), (config_id, cid.len() - 1, &sid[..]));
                assert_eq!(cid[format.worker_offset()], 9);
                assert_eq!(format.worker_of(&cid), Some(9));
                // Another server's or another configuration's CID is not ours.
                let mut other = cid.clone();
                other[1] ^= 1;
                assert_eq!(format.worker_of(&other), None);
                let mut other = cid.clone();
                other[0] ^= 0x20;
                assert_eq!(format.worker_of(&other), None);
                assert_eq!(format.worker_of(&cid[..cid.len() - 1]), None);
            }
        }
    }

    #[test]
    fn the_plain_format_is_worker_generation_random() {
        let format = CidFormat::default().with_generation(2);
        let cid = format.make(3, &[7; 16]);
        assert_eq!(cid, [3, 2, 7, 7, 7, 7, 7, 7]);
        assert_eq!((format.len(), format.worker_offset()), (8, 0));
        assert_eq!(format.worker_of(&cid), Some(3));
        assert!(format.issued_by(&cid, 3));
        assert!(!format.issued_by(&cid, 4));
        assert!(
            !CidFormat::default().issued_by(&cid, 3),
            "another generation's"
        );
    }

    #[test]
    fn configurations_out_of_range_are_refused() {
        assert!(LbConfig::new(7, vec![1]).unwrap_err().contains("0 to 6"));
        assert!(LbConfig::new(0, vec![]).unwrap_err().contains("1 to 15"));
        assert!(LbConfig::new(0, vec![0; 16])
            .unwrap_err()
            .contains("1 to 15"));
    }
}
