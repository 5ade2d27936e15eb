//! Baseline QUIC server for `make bench-quic`: the `quinn` crate on a current-thread tokio
//! runtime serving what `udpring serve --app quic` serves (ALPN `echo`, ALPN `hq-interop`
//! from --root), with the same certificate and the same transport limits, so that the two
//! servers differ only in what runs below quinn-proto.
//!
//! `cargo run --release --example baseline_quinn -- --bind 127.0.0.1:4433 --cert cert.pem --key key.pem`

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use clap::Parser;
use quinn::crypto::rustls::QuicServerConfig;
use udpring::quic::{Identity, ALPN_ECHO, ALPN_HQ};

#[path = "common/quic.rs"]
mod quic_common;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:4433")]
    bind: SocketAddr,
    /// Certificate chain (PEM).
    #[arg(long)]
    cert: PathBuf,
    /// Private key (PEM).
    #[arg(long)]
    key: PathBuf,
    /// Files served over hq-interop.
    #[arg(long)]
    root: Option<PathBuf>,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let identity = Identity::from_pem_files(&args.cert, &args.key)?;
    let tls = udpring::quic::tls::server_config(&identity, &[ALPN_ECHO, ALPN_HQ])?;
    let crypto = QuicServerConfig::try_from(tls).map_err(std::io::Error::other)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // The same limits as udpring's QUIC service (`udpring::quic::Quic::new`).
    config.transport_config(quic_common::baseline_transport(1000, 0));
    let root: Option<Arc<Path>> = args.root.map(|r| Arc::from(r.as_path()));
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let endpoint = quinn::Endpoint::server(config, args.bind)?;
        println!("baseline_quinn listening on {}", endpoint.local_addr()?);
        while let Some(incoming) = endpoint.accept().await {
            let root = root.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let alpn = conn
                    .handshake_data()
                    .and_then(|d| d.downcast::<quinn::crypto::rustls::HandshakeData>().ok())
                    .and_then(|d| d.protocol);
                let hq = alpn.as_deref() == Some(ALPN_HQ);
                while let Ok((send, recv)) = conn.accept_bi().await {
                    let root = root.clone();
                    tokio::spawn(async move {
                        if hq {
                            let _ = serve_hq(send, recv, root.as_deref()).await;
                        } else {
                            let _ = echo(send, recv).await;
                        }
                    });
                }
            });
        }
        Ok(())
    })
}

async fn echo(mut send: quinn::SendStream, mut recv: quinn::RecvStream) -> Option<()> {
    while let Some(chunk) = recv.read_chunk(usize::MAX, true).await.ok()? {
        send.write_chunk(chunk.bytes).await.ok()?;
    }
    send.finish().ok()
}

async fn serve_hq(
    mut send: quinn::SendStream,
    mut recv: quinn::RecvStream,
    root: Option<&Path>,
) -> Option<()> {
    let request = recv.read_to_end(4096).await.ok()?;
    let line = request.split(|&b| b == b'\n').next()?;
    let path = std::str::from_utf8(line)
        .ok()?
        .trim()
        .strip_prefix("GET /")?;
    let file = root
        .filter(|_| !path.split('/').any(|p| p == ".."))
        .map(|r| r.join(path))
        .and_then(|p| std::fs::File::open(p).ok());
    let Some(mut file) = file else {
        send.write_all(b"404 not found\n").await.ok()?;
        return send.finish().ok();
    };
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        let n = std::io::Read::read(&mut file, &mut chunk).ok()?;
        if n == 0 {
            break;
        }
        send.write_all(&chunk[..n]).await.ok()?;
    }
    send.finish().ok()
}
