//! The QUIC benchmark's client (`make bench-quic`): quinn on a current-thread tokio runtime,
//! the same for both servers. Small requests: `--conns` connections × `--streams` concurrent
//! streams, each request one stream carrying `--size` bytes to be echoed; bulk: one
//! connection, `GET --get` over hq-interop. Prints one JSON line.
//!
//! `cargo run --release --example quic_load -- --addr 127.0.0.1:4433 --cafile cert.pem small`
//! `cargo run --release --example quic_load -- make-cert --dir target/bench/quic`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use quic_common::client_endpoint;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;
use udpring::quic::{Identity, ALPN_ECHO, ALPN_HQ};

#[path = "common/quic.rs"]
mod quic_common;

#[derive(Parser, Debug)]
struct Args {
    #[arg(long, default_value = "127.0.0.1:4433")]
    addr: SocketAddr,
    /// The server's certificate (PEM).
    #[arg(long, default_value = "cert.pem")]
    cafile: PathBuf,
    #[command(subcommand)]
    mode: Mode,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Echo requests of --size bytes, one stream each, for --secs seconds.
    Small {
        #[arg(long, default_value_t = 64)]
        conns: usize,
        #[arg(long, default_value_t = 8)]
        streams: usize,
        #[arg(long, default_value_t = 64)]
        size: usize,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
    },
    /// One connection downloads PATH over hq-interop.
    Bulk {
        #[arg(long)]
        get: String,
    },
    /// Writes cert.pem and key.pem (self-signed for localhost and 127.0.0.1) into --dir.
    MakeCert {
        #[arg(long)]
        dir: PathBuf,
    },
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    if let Mode::MakeCert { dir } = &args.mode {
        let made = Identity::self_signed(&["localhost".into(), "127.0.0.1".into()])?;
        std::fs::create_dir_all(dir)?;
        std::fs::write(dir.join("cert.pem"), made.cert_pem)?;
        std::fs::write(dir.join("key.pem"), made.key_pem)?;
        return Ok(());
    }
    let cert = CertificateDer::from_pem_file(&args.cafile).map_err(std::io::Error::other)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match args.mode {
            Mode::Small {
                conns,
                streams,
                size,
                secs,
            } => small(args.addr, &cert, conns, streams, size, secs).await,
            Mode::Bulk { get } => bulk(args.addr, &cert, &get).await,
            Mode::MakeCert { .. } => Ok(()),
        }
    })
}

async fn small(
    addr: SocketAddr,
    cert: &CertificateDer<'static>,
    conns: usize,
    streams: usize,
    size: usize,
    secs: f64,
) -> std::io::Result<()> {
    // Eight client sockets, so that the connections reach the server from several ports.
    let endpoints: Vec<quinn::Endpoint> = (0..8)
        .map(|_| client_endpoint(cert, ALPN_ECHO))
        .collect::<std::io::Result<_>>()?;
    let mut connections = Vec::with_capacity(conns);
    for c in 0..conns {
        let conn = endpoints[c % endpoints.len()]
            .connect(addr, "localhost")
            .map_err(std::io::Error::other)?
            .await
            .map_err(std::io::Error::other)?;
        connections.push(conn);
    }
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    let request = Arc::new(vec![0x5au8; size]);
    for conn in &connections {
        for _ in 0..streams {
            let (conn, done, failed, request) =
                (conn.clone(), done.clone(), failed.clone(), request.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    match request_once(&conn, &request).await {
                        Some(()) => done.fetch_add(1, Ordering::Relaxed),
                        None => failed.fetch_add(1, Ordering::Relaxed),
                    };
                }
            }));
        }
    }
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let n = done.load(Ordering::Relaxed);
    println!(
        "{{\"mode\":\"small\",\"requests\":{n},\"failed\":{},\"secs\":{elapsed:.3},\"req_per_s\":{:.0}}}",
        failed.load(Ordering::Relaxed),
        n as f64 / elapsed
    );
    Ok(())
}

async fn request_once(conn: &quinn::Connection, request: &[u8]) -> Option<()> {
    let (mut send, mut recv) = conn.open_bi().await.ok()?;
    send.write_all(request).await.ok()?;
    send.finish().ok()?;
    let back = recv.read_to_end(request.len() + 1).await.ok()?;
    (back.len() == request.len()).then_some(())
}

async fn bulk(addr: SocketAddr, cert: &CertificateDer<'static>, path: &str) -> std::io::Result<()> {
    let endpoint = client_endpoint(cert, ALPN_HQ)?;
    let conn = endpoint
        .connect(addr, "localhost")
        .map_err(std::io::Error::other)?
        .await
        .map_err(std::io::Error::other)?;
    let started = Instant::now();
    let (mut send, mut recv) = conn.open_bi().await.map_err(std::io::Error::other)?;
    send.write_all(format!("GET {path}\r\n").as_bytes())
        .await
        .map_err(std::io::Error::other)?;
    send.finish().map_err(std::io::Error::other)?;
    let mut bytes = 0u64;
    while let Some(chunk) = recv
        .read_chunk(usize::MAX, true)
        .await
        .map_err(std::io::Error::other)?
    {
        bytes += chunk.bytes.len() as u64;
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{{\"mode\":\"bulk\",\"bytes\":{bytes},\"secs\":{elapsed:.3},\"mbit_per_s\":{:.0}}}",
        bytes as f64 * 8.0 / elapsed / 1e6
    );
    conn.close(0u32.into(), b"done");
    Ok(())
}
