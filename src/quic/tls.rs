//! The server's TLS identity: a certificate chain and key read from PEM files, or a
//! self-signed certificate made at start; and the rustls configuration (TLS 1.3 only, the
//! `ring` provider, the ALPN protocols served).

use std::io;
use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// A certificate chain (leaf first) and its private key.
#[derive(Debug)]
pub struct Identity {
    /// The certificates, leaf first.
    pub chain: Vec<CertificateDer<'static>>,
    /// The leaf's private key.
    pub key: PrivateKeyDer<'static>,
}

impl Clone for Identity {
    fn clone(&self) -> Identity {
        Identity {
            chain: self.chain.clone(),
            key: self.key.clone_key(),
        }
    }
}

/// A self-signed identity with its PEM text, to be written where a client can find it.
pub struct SelfSigned {
    /// The certificate and key, to serve with.
    pub identity: Identity,
    /// The certificate in PEM, for a client's trust store.
    pub cert_pem: String,
    /// The private key in PEM.
    pub key_pem: String,
}

impl Identity {
    /// Reads a PEM certificate chain and a PEM private key (PKCS#8, PKCS#1 or SEC1).
    pub fn from_pem_files(cert: &Path, key: &Path) -> io::Result<Identity> {
        let chain = CertificateDer::pem_file_iter(cert)
            .and_then(|certs| certs.collect::<Result<Vec<_>, _>>())
            .map_err(|e| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("cannot read certificates from {}: {e}", cert.display()),
                )
            })?;
        if chain.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("no certificate in {}", cert.display()),
            ));
        }
        let key = PrivateKeyDer::from_pem_file(key).map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("cannot read a private key from {}: {e}", key.display()),
            )
        })?;
        Ok(Identity { chain, key })
    }

    /// A self-signed certificate for `names` (DNS names or IP addresses, e.g. `localhost`
    /// and the listen addresses), with a fresh ECDSA P-256 key.
    pub fn self_signed(names: &[String]) -> io::Result<SelfSigned> {
        let certified = rcgen::generate_simple_self_signed(names.to_vec())
            .map_err(|e| io::Error::other(format!("cannot make a certificate: {e}")))?;
        let key_der = certified.signing_key.serialize_der();
        Ok(SelfSigned {
            cert_pem: certified.cert.pem(),
            key_pem: certified.signing_key.serialize_pem(),
            identity: Identity {
                chain: vec![certified.cert.der().clone()],
                key: PrivateKeyDer::Pkcs8(key_der.into()),
            },
        })
    }

    /// The SHA-256 fingerprint of the leaf certificate, as colon-separated hex.
    pub fn fingerprint(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, self.chain[0].as_ref());
        digest
            .as_ref()
            .iter()
            .map(|b| format!("{b:02X}"))
            .collect::<Vec<_>>()
            .join(":")
    }
}

/// The rustls server configuration: TLS 1.3 (QUIC requires it), the `ring` provider, no
/// client authentication, the ALPN protocols in order of preference, TLS secrets logged to
/// the file `SSLKEYLOGFILE` names when it is set.
pub fn server_config(identity: &Identity, alpn: &[&[u8]]) -> io::Result<rustls::ServerConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(io::Error::other)?
        .with_no_client_auth()
        .with_single_cert(identity.chain.clone(), identity.key.clone_key())
        .map_err(|e| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("certificate and key do not make a TLS identity: {e}"),
            )
        })?;
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    // The TLS secrets go to the file SSLKEYLOGFILE names (NSS key log format), for Wireshark
    // and the QUIC interop runner; with the variable unset `KeyLogFile` writes nothing.
    config.key_log = Arc::new(rustls::KeyLogFile::new());
    Ok(config)
}

/// Resumption for `config`: tickets are IDs into `cache` (shared by every worker, see
/// [`super::sessions`]), two per handshake (rustls's default: a client may resume twice), and
/// with `early_data` the client may send 0-RTT data on a resumed connection.
/// `max_early_data_size` is `u32::MAX` because QUIC allows only 0 or that (RFC 9001 section
/// 4.6.1; quinn-proto's `QuicServerConfig` docs): QUIC's own flow control bounds early data.
/// 0.5-RTT data (`send_half_rtt_data`) needs no switch here: for QUIC, rustls hands the
/// server its 1-RTT keys with its first flight and quinn-proto sends on them.
pub fn enable_resumption(
    config: &mut rustls::ServerConfig,
    cache: Arc<super::sessions::SessionCache>,
    early_data: bool,
) {
    // The builder's ticketer (none: `NeverProducesTickets`) is kept on purpose: rustls
    // accepts early data only with stateful resumption.
    debug_assert!(!config.ticketer.enabled());
    config.session_storage = cache;
    config.max_early_data_size = if early_data { u32::MAX } else { 0 };
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_self_signed_identity_round_trips_through_pem_files() {
        let made = Identity::self_signed(&["localhost".into(), "127.0.0.1".into()]).unwrap();
        let dir = std::env::temp_dir().join(format!("udpring-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = (dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&cert, &made.cert_pem).unwrap();
        std::fs::write(&key, &made.key_pem).unwrap();
        let read = Identity::from_pem_files(&cert, &key).unwrap();
        assert_eq!(read.chain, made.identity.chain);
        assert_eq!(read.fingerprint(), made.identity.fingerprint());
        assert_eq!(read.fingerprint().len(), 32 * 3 - 1);
        server_config(&read, &[b"echo"]).unwrap();
        assert!(
            Identity::from_pem_files(&key, &key).is_err(),
            "no certificate"
        );
        let _ = std::fs::remove_dir_all(dir);
    }
}
