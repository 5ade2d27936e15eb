//! The QUIC tests' server and quinn client (tokio), with every wait bounded.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::CertificateDer;
use udpring::quic::{Identity, Quic, QuicConfig, QuicStats};
use udpring::{Server, ServerConfig};

use super::{config, start};

/// A running QUIC server and what a client needs to trust it.
pub struct QuicServer {
    pub server: Server,
    pub quic: Arc<Quic>,
    pub cert: CertificateDer<'static>,
}

impl QuicServer {
    pub fn start(
        workers: usize,
        validate_peers: bool,
        idle: Duration,
        root: Option<PathBuf>,
    ) -> Self {
        Self::start_with(workers, validate_peers, idle, root, |_| {})
    }

    /// As `start`, with `tweak` applied to the engine's options last.
    pub fn start_with(
        workers: usize,
        validate_peers: bool,
        idle: Duration,
        root: Option<PathBuf>,
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        Self::start_configured(
            workers,
            |q| {
                q.validate_peers = validate_peers;
                q.idle_timeout = idle;
                q.root = root;
            },
            tweak,
        )
    }

    /// A server whose QUIC options are `QuicConfig::new`'s with `quic` applied, and whose
    /// engine options are the tests' with `tweak` applied last.
    pub fn start_configured(
        workers: usize,
        quic: impl FnOnce(&mut QuicConfig),
        tweak: impl FnOnce(&mut ServerConfig),
    ) -> Self {
        let made = Identity::self_signed(&["localhost".into()]).expect("certificate");
        let cert = made.identity.chain[0].clone();
        let mut quic_config = QuicConfig::new(made.identity);
        quic(&mut quic_config);
        let quic = Arc::new(Quic::new(quic_config).expect("quic config"));
        let mut config = ServerConfig {
            buffers: 2048,
            ..config("127.0.0.1:0", workers)
        };
        quic.configure(&mut config).expect("engine options");
        tweak(&mut config);
        let factory = quic.clone();
        let server = start(config, move |worker| factory.handler(worker));
        QuicServer { server, quic, cert }
    }

    pub fn addr(&self) -> SocketAddr {
        self.server.local_addr()
    }

    pub fn stats(&self) -> QuicStats {
        self.quic.stats()
    }
}

pub fn client(cert: &CertificateDer<'static>, alpn: &[u8]) -> quinn::Endpoint {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("client");
    endpoint.set_default_client_config(client_config(cert, alpn));
    endpoint
}

/// The tests' client TLS: TLS 1.3 trusting `cert` only, ALPN `alpn`.
pub fn client_tls(cert: &CertificateDer<'static>, alpn: &[u8]) -> rustls::ClientConfig {
    client_tls_trusting(std::slice::from_ref(cert), alpn)
}

/// [`client_tls`] trusting each of `certs`.
pub fn client_tls_trusting(certs: &[CertificateDer<'static>], alpn: &[u8]) -> rustls::ClientConfig {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certs {
        roots.add(cert.clone()).expect("root");
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .expect("tls 1.3")
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![alpn.to_vec()];
    tls
}

/// The tests' client configuration: [`client_tls`], 20 s idle.
pub fn client_config(cert: &CertificateDer<'static>, alpn: &[u8]) -> quinn::ClientConfig {
    quic_client_config(client_tls(cert, alpn))
}

/// A quinn client configuration on `tls`, 20 s idle.
pub fn quic_client_config(tls: rustls::ClientConfig) -> quinn::ClientConfig {
    let mut transport = quinn::TransportConfig::default();
    transport.max_idle_timeout(Some(Duration::from_secs(20).try_into().expect("idle")));
    let mut config =
        quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).expect("quic tls")));
    config.transport_config(Arc::new(transport));
    config
}

/// A client configuration for ALPN `alpn` that keeps the tickets it gets and sends early
/// data with them (rustls's `enable_early_data`). Every endpoint given it shares its ticket
/// store.
pub fn resuming_client_config(cert: &CertificateDer<'static>, alpn: &[u8]) -> quinn::ClientConfig {
    let mut tls = client_tls(cert, alpn);
    tls.enable_early_data = true;
    quinn::ClientConfig::new(Arc::new(QuicClientConfig::try_from(tls).expect("quic tls")))
}

/// A client endpoint on 127.0.0.1 with [`resuming_client_config`].
pub fn resuming_client(cert: &CertificateDer<'static>, alpn: &[u8]) -> quinn::Endpoint {
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).expect("client");
    endpoint.set_default_client_config(resuming_client_config(cert, alpn));
    endpoint
}

pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime")
}

/// Every test's async part runs under this bound: a bug cannot hang the suite.
pub const LIMIT: Duration = Duration::from_secs(60);

pub fn block_on<T>(rt: &tokio::runtime::Runtime, f: impl std::future::Future<Output = T>) -> T {
    rt.block_on(async { tokio::time::timeout(LIMIT, f).await.expect("bounded") })
}

/// Deterministic bytes for stream `n` (so corruption or reordering is caught).
pub fn pattern(n: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + n * 7 + i / 251) as u8).collect()
}

pub async fn echo_once(conn: &quinn::Connection, n: usize, len: usize) {
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    let data = pattern(n, len);
    let writer = async {
        send.write_all(&data).await.expect("write");
        send.finish().expect("finish");
    };
    let reader = async { recv.read_to_end(len + 1).await.expect("read") };
    let ((), back) = tokio::join!(writer, reader);
    assert_eq!(back.len(), len, "stream {n}: length");
    assert!(back == data, "stream {n}: exact bytes");
}
