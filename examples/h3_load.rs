//! The HTTP/3 benchmark's client (`make bench-quic`): the `h3` crate on `h3-quinn` on a
//! current-thread tokio runtime, the same for both servers. Small: `--conns` connections ×
//! `--streams` concurrent GETs of `--get`, for `--secs` seconds; bulk: one connection, one GET.
//! Every response is checked (status 200, body length equal to content-length). Prints one
//! JSON line.
//!
//! `cargo run --release --features bench-h3 --example h3_load -- --addr 127.0.0.1:4433 --cafile cert.pem small --get /64.bin`

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use clap::{Parser, Subcommand};
use quic_common::client_endpoint;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::CertificateDer;

#[path = "common/quic.rs"]
mod quic_common;

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

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
    /// GET --get on --conns connections × --streams concurrent requests for --secs seconds.
    Small {
        #[arg(long)]
        get: String,
        #[arg(long, default_value_t = 64)]
        conns: usize,
        #[arg(long, default_value_t = 8)]
        streams: usize,
        #[arg(long, default_value_t = 5.0)]
        secs: f64,
    },
    /// One connection downloads --get.
    Bulk {
        #[arg(long)]
        get: String,
    },
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let cert = CertificateDer::from_pem_file(&args.cafile).map_err(std::io::Error::other)?;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        match args.mode {
            Mode::Small {
                get,
                conns,
                streams,
                secs,
            } => small(args.addr, &cert, &get, conns, streams, secs).await,
            Mode::Bulk { get } => bulk(args.addr, &cert, &get).await,
        }
    })
}

/// An HTTP/3 connection: the request sender, and the task that drives the connection.
async fn connect(endpoint: &quinn::Endpoint, addr: SocketAddr) -> std::io::Result<SendRequest> {
    let conn = endpoint
        .connect(addr, "localhost")
        .map_err(std::io::Error::other)?
        .await
        .map_err(std::io::Error::other)?;
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    Ok(send)
}

/// One GET: the body's length, or `None` for any failure (status other than 200, a body
/// shorter or longer than its content-length, a stream or connection error).
async fn get(send: &mut SendRequest, uri: &http::Uri) -> Option<u64> {
    let request = http::Request::get(uri.clone()).body(()).ok()?;
    let mut stream = send.send_request(request).await.ok()?;
    stream.finish().await.ok()?;
    let response = stream.recv_response().await.ok()?;
    if response.status() != http::StatusCode::OK {
        return None;
    }
    let expected: u64 = response
        .headers()
        .get("content-length")?
        .to_str()
        .ok()?
        .parse()
        .ok()?;
    let mut bytes = 0u64;
    while let Some(chunk) = stream.recv_data().await.ok()? {
        bytes += chunk.remaining() as u64;
    }
    (bytes == expected).then_some(bytes)
}

fn uri(addr: SocketAddr, path: &str) -> std::io::Result<http::Uri> {
    format!("https://localhost:{}{path}", addr.port())
        .parse()
        .map_err(std::io::Error::other)
}

async fn small(
    addr: SocketAddr,
    cert: &CertificateDer<'static>,
    path: &str,
    conns: usize,
    streams: usize,
    secs: f64,
) -> std::io::Result<()> {
    let uri = uri(addr, path)?;
    // Eight client sockets, so that the connections reach the server from several ports.
    let endpoints: Vec<quinn::Endpoint> = (0..8)
        .map(|_| client_endpoint(cert, b"h3"))
        .collect::<std::io::Result<_>>()?;
    let mut senders = Vec::with_capacity(conns);
    for c in 0..conns {
        senders.push(connect(&endpoints[c % endpoints.len()], addr).await?);
    }
    let done = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let until = started + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for send in &senders {
        for _ in 0..streams {
            let (mut send, done, failed, uri) =
                (send.clone(), done.clone(), failed.clone(), uri.clone());
            tasks.push(tokio::spawn(async move {
                while Instant::now() < until {
                    match get(&mut send, &uri).await {
                        Some(_) => done.fetch_add(1, Ordering::Relaxed),
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
        "{{\"mode\":\"h3-small\",\"requests\":{n},\"failed\":{},\"secs\":{elapsed:.3},\"req_per_s\":{:.0}}}",
        failed.load(Ordering::Relaxed),
        n as f64 / elapsed
    );
    Ok(())
}

async fn bulk(addr: SocketAddr, cert: &CertificateDer<'static>, path: &str) -> std::io::Result<()> {
    let endpoint = client_endpoint(cert, b"h3")?;
    let mut send = connect(&endpoint, addr).await?;
    let started = Instant::now();
    let bytes = get(&mut send, &uri(addr, path)?)
        .await
        .ok_or_else(|| std::io::Error::other(format!("GET {path} failed")))?;
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "{{\"mode\":\"h3-bulk\",\"bytes\":{bytes},\"secs\":{elapsed:.3},\"mbit_per_s\":{:.0}}}",
        bytes as f64 * 8.0 / elapsed / 1e6
    );
    Ok(())
}
