//! Baseline HTTP/3 server for `make bench-quic`: what a Rust user picks today, the `h3` crate
//! on `h3-quinn` on a current-thread tokio runtime, serving GET and HEAD of files under
//! `--root` the way `udpring serve --app quic --root DIR` does over ALPN `h3` (status,
//! content-length, content-type by extension, 404, 405), with the same certificate and the
//! same transport limits.
//!
//! `cargo run --release --features bench-h3 --example baseline_h3 -- --bind 127.0.0.1:4433 --cert cert.pem --key key.pem --root DIR`

use std::net::SocketAddr;
use std::path::{Component, Path, PathBuf};
use std::sync::Arc;

use bytes::{Bytes, BytesMut};
use clap::Parser;
use h3::server::RequestStream;
use http::{Method, Response, StatusCode};
use quinn::crypto::rustls::QuicServerConfig;
use tokio::io::AsyncReadExt;
use udpring::quic::Identity;

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
    /// The files served.
    #[arg(long)]
    root: PathBuf,
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let identity = Identity::from_pem_files(&args.cert, &args.key)?;
    let tls = udpring::quic::tls::server_config(&identity, &[b"h3"])?;
    let crypto = QuicServerConfig::try_from(tls).map_err(std::io::Error::other)?;
    let mut config = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    // The same limits as udpring's QUIC service; HTTP/3 needs three unidirectional streams
    // from each side (control, QPACK encoder and decoder).
    config.transport_config(quic_common::baseline_transport(1000, 3));
    let root: Arc<Path> = Arc::from(args.root.as_path());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let endpoint = quinn::Endpoint::server(config, args.bind)?;
        println!("baseline_h3 listening on {}", endpoint.local_addr()?);
        while let Some(incoming) = endpoint.accept().await {
            let root = root.clone();
            tokio::spawn(async move {
                let Ok(conn) = incoming.await else { return };
                let Ok(mut h3) =
                    h3::server::Connection::<_, Bytes>::new(h3_quinn::Connection::new(conn)).await
                else {
                    return;
                };
                while let Ok(Some(resolver)) = h3.accept().await {
                    let root = root.clone();
                    tokio::spawn(async move {
                        if let Ok((request, stream)) = resolver.resolve_request().await {
                            let _ = serve(request, stream, &root).await;
                        }
                    });
                }
            });
        }
        Ok(())
    })
}

/// The file under `root` that `path` names, or `None` for anything that could leave it.
/// Files up to this size are read whole with their open (as udpring does).
const SMALL_FILE: u64 = 64 * 1024;
/// A larger file's read size (udpring's body piece).
const PIECE: usize = 256 * 1024;

fn resolve(root: &Path, path: &str) -> Option<PathBuf> {
    let relative = Path::new(path.strip_prefix('/')?);
    relative
        .components()
        .all(|c| matches!(c, Component::Normal(_)))
        .then(|| root.join(relative))
}

fn content_type(path: &Path) -> &'static str {
    match path.extension().and_then(|e| e.to_str()) {
        Some("html" | "htm") => "text/html",
        Some("txt") => "text/plain",
        Some("json") => "application/json",
        Some("css") => "text/css",
        Some("js") => "text/javascript",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        _ => "application/octet-stream",
    }
}

async fn serve<S: h3::quic::BidiStream<Bytes>>(
    request: http::Request<()>,
    mut stream: RequestStream<S, Bytes>,
    root: &Path,
) -> Result<(), h3::error::StreamError> {
    let head = request.method() == Method::HEAD;
    if request.method() != Method::GET && !head {
        let response = Response::builder()
            .status(StatusCode::METHOD_NOT_ALLOWED)
            .header("allow", "GET, HEAD")
            .body(())
            .expect("static response");
        stream.send_response(response).await?;
        return stream.finish().await;
    }
    // One blocking trip for the open, the length and (for a small file) the bytes: what a
    // careful user writes, and what udpring's pool does, rather than tokio::fs's trip per
    // call.
    let (root, path) = (root.to_path_buf(), request.uri().path().to_owned());
    let file = tokio::task::spawn_blocking(move || {
        let path = resolve(&root, &path)?;
        let mut file = std::fs::File::open(&path).ok()?;
        let meta = file.metadata().ok()?;
        if !meta.is_file() {
            return None;
        }
        let small = if meta.len() <= SMALL_FILE && !head {
            let mut bytes = Vec::with_capacity(meta.len() as usize);
            std::io::Read::read_to_end(&mut file, &mut bytes).ok()?;
            Some(Bytes::from(bytes))
        } else {
            None
        };
        Some((file, meta.len(), content_type(&path), small))
    })
    .await
    .ok()
    .flatten();
    let Some((file, len, kind, small)) = file else {
        let response = Response::builder()
            .status(StatusCode::NOT_FOUND)
            .body(())
            .expect("static response");
        stream.send_response(response).await?;
        return stream.finish().await;
    };
    let response = Response::builder()
        .status(StatusCode::OK)
        .header("content-length", len)
        .header("content-type", kind)
        .body(())
        .expect("static response");
    stream.send_response(response).await?;
    if let Some(bytes) = small {
        if !bytes.is_empty() {
            stream.send_data(bytes).await?;
        }
    } else if !head {
        let mut file = tokio::fs::File::from_std(file);
        file.set_max_buf_size(PIECE);
        let mut buf = BytesMut::with_capacity(PIECE);
        loop {
            buf.reserve(PIECE);
            match file.read_buf(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(_) => stream.send_data(buf.split().freeze()).await?,
            }
        }
    }
    stream.finish().await
}
