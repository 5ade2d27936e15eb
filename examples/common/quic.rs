//! Shared plumbing for the QUIC benchmark's clients and baseline servers (benchmarks only):
//! the client's TLS and endpoint, and the transport limits both baseline servers share with
//! udpring's QUIC service. Included with `#[path]` by the QUIC examples.
#![allow(dead_code)] // each example uses a subset

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::CertificateDer;

/// A client endpoint on an ephemeral port of 127.0.0.1 that trusts `cert` and offers `alpn`.
pub fn client_endpoint(
    cert: &CertificateDer<'static>,
    alpn: &[u8],
) -> std::io::Result<quinn::Endpoint> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert.clone()).map_err(std::io::Error::other)?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(std::io::Error::other)?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    let crypto = QuicClientConfig::try_from(tls).map_err(std::io::Error::other)?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal"))?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(crypto)));
    Ok(endpoint)
}

/// The transport limits of udpring's QUIC service (30 s idle timeout, `bidi` concurrent
/// bidirectional and `uni` unidirectional streams from the peer), for a baseline server.
pub fn baseline_transport(bidi: u32, uni: u32) -> Arc<quinn::TransportConfig> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            Duration::from_secs(30)
                .try_into()
                .expect("30 s is a valid idle timeout"),
        ))
        .max_concurrent_bidi_streams(bidi.into())
        .max_concurrent_uni_streams(uni.into());
    Arc::new(transport)
}
