//! HTTP/3 against an independent client (the `h3` crate on quinn): files by GET and HEAD
//! with their status, length and type; a service of the user's own through the library
//! entry point, with a body streamed from the blocking pool; a read that blocks (a FIFO
//! that nobody opens) stalling no other connection on the worker; 0-RTT answering GET and
//! refusing POST with 425.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes};
use rustls::pki_types::CertificateDer;
use udpring::quic::h3::{Body, BodySource, Handled, RequestInfo, Service};
use udpring::quic::{Identity, Quic, QuicConfig, QuicStats, ALPN_H3};
use udpring::{Server, ServerConfig};

use crate::common::quic::{block_on, client, resuming_client, runtime, QuicServer};
use crate::common::{config, start};

type SendRequest = h3::client::SendRequest<h3_quinn::OpenStreams, Bytes>;

/// One response: status, headers, body.
struct Got {
    status: http::StatusCode,
    headers: http::HeaderMap,
    body: Vec<u8>,
}

/// An HTTP/3 connection on `conn`: the request sender (the connection's driver runs in a
/// task of its own).
async fn h3_on(conn: quinn::Connection) -> SendRequest {
    let (mut driver, send) = h3::client::new(h3_quinn::Connection::new(conn))
        .await
        .expect("h3 connection");
    tokio::spawn(async move {
        let _ = std::future::poll_fn(|cx| driver.poll_close(cx)).await;
    });
    send
}

async fn connect(endpoint: &quinn::Endpoint, addr: SocketAddr) -> SendRequest {
    let conn = endpoint
        .connect(addr, "localhost")
        .expect("connect")
        .await
        .expect("handshake");
    h3_on(conn).await
}

async fn request(
    send: &mut SendRequest,
    method: http::Method,
    addr: SocketAddr,
    path: &str,
) -> Got {
    let uri: http::Uri = format!("https://localhost:{}{path}", addr.port())
        .parse()
        .expect("uri");
    let req = http::Request::builder()
        .method(method)
        .uri(uri)
        .body(())
        .expect("request");
    let mut stream = send.send_request(req).await.expect("send request");
    stream.finish().await.expect("finish");
    let response = stream.recv_response().await.expect("response");
    let mut body = Vec::new();
    while let Some(mut chunk) = stream.recv_data().await.expect("body") {
        while chunk.has_remaining() {
            let piece = chunk.chunk();
            body.extend_from_slice(piece);
            let n = piece.len();
            chunk.advance(n);
        }
    }
    Got {
        status: response.status(),
        headers: response.headers().clone(),
        body,
    }
}

fn temp_root(name: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("udpring-h3-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).expect("root");
    root
}

fn wait_stats(stats: impl Fn() -> QuicStats, cond: impl Fn(&QuicStats) -> bool) -> QuicStats {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let s = stats();
        if cond(&s) || Instant::now() > deadline {
            return s;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

fn big(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 + i / 1021) as u8).collect()
}

#[test]
fn files_by_get_and_head_with_status_length_and_type() {
    let root = temp_root("files");
    std::fs::write(root.join("index.html"), b"<h1>udpring</h1>").unwrap();
    // Several body pieces from the pool, under flow control.
    let large = big(3 * 1024 * 1024 + 17);
    std::fs::write(root.join("large.bin"), &large).unwrap();
    std::fs::create_dir(root.join("dir")).unwrap();
    let server = QuicServer::start(1, false, Duration::from_secs(10), Some(root.clone()));
    let addr = server.addr();
    let rt = runtime();
    block_on(&rt, async {
        let endpoint = client(&server.cert, ALPN_H3);
        let mut send = connect(&endpoint, addr).await;
        use http::Method;

        let got = request(&mut send, Method::GET, addr, "/index.html").await;
        assert_eq!(got.status, 200);
        assert_eq!(got.headers["content-type"], "text/html; charset=utf-8");
        assert_eq!(got.headers["content-length"], "16");
        assert_eq!(got.body, b"<h1>udpring</h1>");

        let got = request(&mut send, Method::GET, addr, "/large.bin").await;
        assert_eq!(got.status, 200);
        assert_eq!(got.headers["content-type"], "application/octet-stream");
        assert_eq!(
            got.headers["content-length"],
            large.len().to_string().as_str()
        );
        assert!(got.body == large, "the large file byte-exact");

        let got = request(&mut send, Method::HEAD, addr, "/large.bin").await;
        assert_eq!(got.status, 200);
        assert_eq!(
            got.headers["content-length"],
            large.len().to_string().as_str()
        );
        assert!(got.body.is_empty(), "HEAD has no body");

        for missing in [
            "/nope.txt",
            "/dir",
            "/../../etc/passwd",
            "/%2e%2e/etc/passwd",
        ] {
            let got = request(&mut send, Method::GET, addr, missing).await;
            assert_eq!(got.status, 404, "{missing}");
        }
        let got = request(&mut send, Method::POST, addr, "/index.html").await;
        assert_eq!(got.status, 405);
        assert_eq!(got.headers["allow"], "GET, HEAD");
        endpoint.close(0u32.into(), b"done");
    });
    let stats = wait_stats(|| server.stats(), |s| s.h3_responses >= 8);
    assert_eq!(stats.h3_requests, 8, "{stats:?}");
    assert_eq!(stats.h3_responses, 8, "{stats:?}");
    assert_eq!(stats.h3_errors, 0, "{stats:?}");
    let _ = std::fs::remove_dir_all(root);
}

/// A body made piece by piece: `pieces` of `len` bytes each, numbered.
struct Counting {
    left: usize,
    len: usize,
}

impl BodySource for Counting {
    fn next_chunk(&mut self, max: usize) -> std::io::Result<Option<Bytes>> {
        if self.left == 0 {
            return Ok(None);
        }
        self.left -= 1;
        let n = self.len.min(max);
        Ok(Some(Bytes::from(vec![(self.left % 251) as u8; n])))
    }
}

/// The user's service: `/gen/N` streams N pieces from the pool, `/slow` answers from the pool
/// after a wait, anything else now, echoing what it was told.
struct Mine;

impl Service for Mine {
    fn call(&mut self, request: http::Request<()>, info: &RequestInfo) -> Handled {
        let path = request.uri().path().to_owned();
        if let Some(n) = path.strip_prefix("/gen/") {
            let pieces: usize = n.parse().unwrap_or(0);
            return Handled::Respond(
                http::Response::builder()
                    .header("x-pieces", pieces)
                    .body(Body::Stream(Box::new(Counting {
                        left: pieces,
                        len: 10_000,
                    })))
                    .unwrap(),
            );
        }
        if path == "/slow" {
            return Handled::Blocking(Box::new(|| {
                std::thread::sleep(Duration::from_millis(50));
                http::Response::new(Body::from("slept"))
            }));
        }
        let text = format!(
            "{} {} early={} worker={} ua={:?}",
            request.method(),
            path,
            info.early_data,
            info.worker,
            request.headers().get("user-agent")
        );
        Handled::Respond(
            http::Response::builder()
                .status(201)
                .body(Body::Bytes(Bytes::from(text)))
                .unwrap(),
        )
    }
}

struct H3Server {
    _server: Server,
    quic: Arc<Quic>,
    cert: CertificateDer<'static>,
    addr: SocketAddr,
}

fn start_service() -> H3Server {
    let made = Identity::self_signed(&["localhost".into()]).expect("certificate");
    let cert = made.identity.chain[0].clone();
    let mut quic_config = QuicConfig::new(made.identity);
    quic_config.alpn = vec![ALPN_H3.to_vec()];
    let quic = Arc::new(Quic::new(quic_config).expect("quic config"));
    let mut engine: ServerConfig = config("127.0.0.1:0", 1);
    quic.configure(&mut engine).expect("engine options");
    let factory = quic.clone();
    let server = start(engine, move |worker| factory.h3_handler(worker, Mine));
    let addr = server.local_addr();
    H3Server {
        _server: server,
        quic,
        cert,
        addr,
    }
}

#[test]
fn a_service_of_ones_own_answers_now_from_the_pool_and_streams_its_body() {
    let server = start_service();
    let addr = server.addr;
    let rt = runtime();
    block_on(&rt, async {
        let endpoint = client(&server.cert, ALPN_H3);
        let mut send = connect(&endpoint, addr).await;
        let got = request(&mut send, http::Method::PUT, addr, "/x?y").await;
        assert_eq!(got.status, 201);
        assert_eq!(
            String::from_utf8(got.body).unwrap(),
            "PUT /x early=false worker=0 ua=None"
        );
        assert_eq!(got.headers["content-length"], "35");

        let got = request(&mut send, http::Method::GET, addr, "/gen/37").await;
        assert_eq!(got.status, 200);
        assert_eq!(got.headers["x-pieces"], "37");
        assert_eq!(got.body.len(), 37 * 10_000);
        for (i, piece) in got.body.chunks(10_000).enumerate() {
            let want = ((36 - i) % 251) as u8;
            assert!(piece.iter().all(|&b| b == want), "piece {i} in order");
        }

        let got = request(&mut send, http::Method::GET, addr, "/slow").await;
        assert_eq!(got.body, b"slept");
        endpoint.close(0u32.into(), b"done");
    });
    let stats = wait_stats(|| server.quic.stats(), |s| s.h3_responses >= 3);
    assert_eq!((stats.h3_requests, stats.h3_responses), (3, 3), "{stats:?}");
}

/// A FIFO under the root: opening it blocks until a writer comes, like a read that waits on
/// a cold disk. One worker; while its request waits, another connection's requests are
/// answered. Then the writer comes and the first request is answered too (404: a FIFO is
/// not a file).
#[test]
fn a_blocked_file_open_stalls_no_other_connection() {
    let root = temp_root("fifo");
    std::fs::write(root.join("small.txt"), b"small").unwrap();
    let fifo = root.join("slow");
    let c = std::ffi::CString::new(fifo.as_os_str().as_encoded_bytes()).unwrap();
    // SAFETY: a NUL-terminated path and a mode.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0, "mkfifo");
    let server = QuicServer::start(1, false, Duration::from_secs(10), Some(root.clone()));
    let addr = server.addr();
    let rt = runtime();
    block_on(&rt, async {
        let endpoint = client(&server.cert, ALPN_H3);
        let mut slow = connect(&endpoint, addr).await;
        let blocked = tokio::spawn(async move {
            let got = request(&mut slow, http::Method::GET, addr, "/slow").await;
            (got.status, slow)
        });
        // The slow request reached the pool (it is counted when its HEADERS are read).
        let deadline = Instant::now() + Duration::from_secs(10);
        while server.stats().h3_requests < 1 {
            assert!(Instant::now() < deadline, "the slow request never arrived");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut other = connect(&endpoint, addr).await;
        for _ in 0..5 {
            let got = tokio::time::timeout(
                Duration::from_secs(5),
                request(&mut other, http::Method::GET, addr, "/small.txt"),
            )
            .await
            .expect("answered while the other request waits on its open");
            assert_eq!(got.body, b"small");
        }
        assert!(!blocked.is_finished(), "the FIFO has no writer yet");
        // The writer: the pool's blocked open returns.
        let writer = std::fs::OpenOptions::new().write(true).open(&fifo).unwrap();
        drop(writer);
        let (status, _slow) = tokio::time::timeout(Duration::from_secs(10), blocked)
            .await
            .expect("answered once the open returned")
            .unwrap();
        assert_eq!(status, 404);
        endpoint.close(0u32.into(), b"done");
    });
    let _ = std::fs::remove_dir_all(root);
}

/// 0-RTT: a resumed client's GET sent as early data is answered; a POST in early data is
/// answered 425 (Too Early) without reaching the service, and counted.
#[test]
fn early_data_gets_get_answered_and_post_refused_with_425() {
    let root = temp_root("early");
    std::fs::write(root.join("a.txt"), b"early").unwrap();
    let server = QuicServer::start(1, false, Duration::from_secs(10), Some(root.clone()));
    let addr = server.addr();
    // One thread: the request is queued before the first flight leaves, so it goes as 0-RTT.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let endpoint = {
        let _guard = rt.enter();
        resuming_client(&server.cert, ALPN_H3)
    };
    block_on(&rt, async {
        let conn = endpoint
            .connect(addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        let mut send = h3_on(conn.clone()).await;
        let got = request(&mut send, http::Method::GET, addr, "/a.txt").await;
        assert_eq!(got.body, b"early");
        conn.close(0u32.into(), b"done");
    });
    // The ticket came with the first connection (before its response: the server sends it
    // right after the handshake).
    let (get, post, accepted) = block_on(&rt, async {
        let connecting = endpoint.connect(addr, "localhost").expect("connect");
        let Ok((conn, accepted)) = connecting.into_0rtt() else {
            panic!("the client holds a ticket that allows 0-RTT");
        };
        let send = h3_on(conn.clone()).await;
        let (mut a, mut b) = (send.clone(), send.clone());
        let (get, post) = tokio::join!(
            request(&mut a, http::Method::GET, addr, "/a.txt"),
            request(&mut b, http::Method::POST, addr, "/a.txt"),
        );
        let accepted = accepted.await;
        conn.close(0u32.into(), b"done");
        (get, post, accepted)
    });
    assert!(accepted, "the server accepted 0-RTT");
    assert_eq!(get.status, 200);
    assert_eq!(get.body, b"early");
    assert_eq!(post.status, 425, "an unsafe method in early data");
    // Counted when the server's side of the handshake completes (the client's Finished).
    let stats = wait_stats(|| server.stats(), |s| s.early_data_accepted >= 1);
    assert!(stats.early_data_accepted >= 1, "{stats:?}");
    assert_eq!(stats.h3_too_early, 1, "{stats:?}");
    let _ = std::fs::remove_dir_all(root);
}
