//! A QUIC relay on udpring's application API: one publisher's stream fanned out to many
//! subscribers, on one worker and across workers. A custom [`App`] to start from.
//!
//! The protocol (ALPN `relay`): a client opens a bidirectional stream and sends a line.
//! - `SUB\n`: the server opens a unidirectional stream of its own to the subscriber, answers
//!   `OK <worker>\n` on the bidirectional one, and from then on sends on the unidirectional
//!   stream every byte any publisher sends, finishing it when the publisher finishes.
//! - `PUB\n` and then the payload: every chunk read is posted, as `Bytes` (shared, not
//!   copied), to each subscriber's [`Remote`]; the subscriber's own worker writes it, with
//!   backpressure (what a stream does not take now waits for `on_writable`). When the
//!   publisher finishes, the server answers `DONE <subscribers>\n`.
//!
//! A subscriber on the publisher's worker and one on another worker are reached the same way,
//! through the thread-safe handle; the hub counts which was which.
//!
//! It starts a server on a free loopback port (one worker, then two), connects quinn clients
//! (subscribers first, then a publisher), checks that every subscriber got every byte, and
//! exits 0 (`tests/it/quic_relay.rs` runs it too).
//!
//! cargo run --example quic_relay

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use quinn::crypto::rustls::QuicClientConfig;
use rustls::pki_types::CertificateDer;
use udpring::quic::{
    App, CloseReason, Connection, Decision, Identity, NewConnection, Quic, QuicConfig, Recv,
    Remote, StreamId, TransportConfig,
};
use udpring::{Server, ServerConfig, SessionMode};

const ALPN: &[u8] = b"relay";
/// Bytes a subscriber may have waiting before it is dropped as too slow.
const MAX_QUEUED: usize = 16 << 20;
/// The application error code a too-slow subscriber is closed with.
const TOO_SLOW: u64 = 1;
/// Longest command line.
const MAX_LINE: usize = 64;

/// What a publisher sends a subscriber's connection.
enum Msg {
    Data(Bytes),
    End,
}

struct Subscriber {
    worker: usize,
    remote: Remote<Msg>,
}

/// What the workers share: the subscribers, and how the publisher reached them.
#[derive(Default)]
struct Hub {
    subscribers: Mutex<Vec<Subscriber>>,
    /// Chunks posted to a subscriber on the publisher's worker, and on another one.
    same_worker: AtomicU64,
    cross_worker: AtomicU64,
}

impl Hub {
    /// Posts `make()` to every subscriber; a closed one is forgotten. Returns how many took it.
    fn fan_out(&self, from_worker: usize, make: impl Fn() -> Msg) -> usize {
        let mut subscribers = self.subscribers.lock();
        subscribers.retain(|s| match s.remote.post(make()) {
            Ok(()) => {
                let counter = if s.worker == from_worker {
                    &self.same_worker
                } else {
                    &self.cross_worker
                };
                counter.fetch_add(1, Ordering::Relaxed);
                true
            }
            // Its connection closed: the message (shared bytes) comes back and is dropped.
            Err(_) => false,
        });
        subscribers.len()
    }
}

/// One connection's role, decided by its first line.
enum Role {
    /// Reading the command line on `ctl`.
    Undecided {
        ctl: StreamId,
        line: Vec<u8>,
    },
    Publisher {
        ctl: StreamId,
    },
    Subscriber(Outbound),
    /// Nothing more to do on this connection.
    Idle,
}

/// A subscriber's stream and what waits to be written on it.
struct Outbound {
    stream: StreamId,
    queue: VecDeque<Bytes>,
    queued: usize,
    end: bool,
}

impl Outbound {
    /// Writes what the stream takes; finishes it after the end.
    fn pump(&mut self, conn: &mut Connection<'_, Msg>) {
        while !self.queue.is_empty() {
            match conn.write_queue(self.stream, &mut self.queue) {
                Ok(written) => {
                    self.queued -= written.bytes;
                    if written.bytes == 0 {
                        return; // on_writable comes when more fits
                    }
                }
                Err(_) => {
                    // Stopped by the subscriber: nothing more to send it.
                    self.queue.clear();
                    return;
                }
            }
        }
        if self.end {
            let _ = conn.finish(self.stream);
            self.end = false;
        }
    }
}

/// One worker's relay.
struct Relay {
    hub: Arc<Hub>,
}

impl App for Relay {
    type Conn = Role;
    type Message = Msg;

    fn on_new_connection(
        &mut self,
        _: &mut Connection<'_, Msg>,
        info: &NewConnection<'_>,
    ) -> Decision<Role> {
        if info.alpn != ALPN {
            return Decision::Refuse(0x100);
        }
        Decision::Accept(Role::Idle)
    }

    fn on_stream_opened(&mut self, conn: &mut Connection<'_, Msg>, role: &mut Role, id: StreamId) {
        if matches!(role, Role::Idle) && id.is_bidi() {
            *role = Role::Undecided {
                ctl: id,
                line: Vec::new(),
            };
        } else {
            let _ = conn.stop_sending(id, 0);
        }
    }

    fn on_readable(&mut self, conn: &mut Connection<'_, Msg>, role: &mut Role, id: StreamId) {
        if let Role::Undecided { ctl, line } = role {
            if *ctl != id {
                return;
            }
            let ctl = *ctl;
            while !line.contains(&b'\n') && line.len() < MAX_LINE {
                match conn.read_chunk(id, MAX_LINE - line.len()) {
                    Ok(Recv::Data(chunk)) => line.extend_from_slice(&chunk),
                    Ok(Recv::Blocked) => return,
                    Ok(Recv::Finished) | Err(_) => break,
                }
            }
            // The payload may follow the line in the same chunk: only whole lines are read
            // here (a chunk of at most MAX_LINE bytes could hold some payload too).
            let end = line
                .iter()
                .position(|&b| b == b'\n')
                .map_or(line.len(), |i| i + 1);
            let rest = Bytes::copy_from_slice(&line[end..]);
            match &line[..end] {
                b"SUB\n" => {
                    let Some(stream) = conn.open_uni() else {
                        conn.close(2, b"no stream for the subscription");
                        return;
                    };
                    self.hub.subscribers.lock().push(Subscriber {
                        worker: conn.worker(),
                        remote: conn.remote(),
                    });
                    let answer = format!("OK {}\n", conn.worker());
                    let _ = conn.write(ctl, answer.as_bytes());
                    let _ = conn.finish(ctl);
                    *role = Role::Subscriber(Outbound {
                        stream,
                        queue: VecDeque::new(),
                        queued: 0,
                        end: false,
                    });
                }
                b"PUB\n" => {
                    *role = Role::Publisher { ctl };
                    if !rest.is_empty() {
                        let worker = conn.worker();
                        self.hub.fan_out(worker, || Msg::Data(rest.clone()));
                    }
                }
                _ => {
                    conn.close(3, b"expected SUB or PUB");
                    return;
                }
            }
        }
        if let Role::Publisher { ctl } = role {
            let ctl = *ctl;
            let worker = conn.worker();
            loop {
                match conn.read_chunk(ctl, usize::MAX) {
                    Ok(Recv::Data(chunk)) => {
                        self.hub.fan_out(worker, || Msg::Data(chunk.clone()));
                    }
                    Ok(Recv::Blocked) => return,
                    Ok(Recv::Finished) => {
                        let served = self.hub.fan_out(worker, || Msg::End);
                        let answer = format!("DONE {served}\n");
                        let _ = conn.write(ctl, answer.as_bytes());
                        let _ = conn.finish(ctl);
                        *role = Role::Idle;
                        return;
                    }
                    Err(_) => {
                        *role = Role::Idle;
                        return;
                    }
                }
            }
        }
    }

    fn on_writable(&mut self, conn: &mut Connection<'_, Msg>, role: &mut Role, _: StreamId) {
        if let Role::Subscriber(out) = role {
            out.pump(conn);
        }
    }

    fn on_message(&mut self, conn: &mut Connection<'_, Msg>, role: &mut Role, message: Msg) {
        let Role::Subscriber(out) = role else {
            return;
        };
        if conn.is_closed() {
            return; // posted just before the subscriber left: its bytes are dropped
        }
        match message {
            Msg::Data(bytes) => {
                out.queued += bytes.len();
                out.queue.push_back(bytes);
            }
            Msg::End => out.end = true,
        }
        if out.queued > MAX_QUEUED {
            conn.close(TOO_SLOW, b"subscriber too slow");
            return;
        }
        out.pump(conn);
    }

    fn on_closed(&mut self, role: Role, _reason: &CloseReason) {
        if let Role::Subscriber(_) = role {
            // Forgotten at once rather than at the next post's refusal (its `Remote` says
            // closed from now on).
            self.hub
                .subscribers
                .lock()
                .retain(|s| !s.remote.is_closed());
        }
    }
}

fn fail(what: String) -> std::io::Error {
    std::io::Error::other(what)
}

/// Deterministic payload bytes (corruption or reordering is caught).
fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + i / 251) as u8).collect()
}

fn client(cert: &CertificateDer<'static>) -> std::io::Result<quinn::Endpoint> {
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(cert.clone())
        .map_err(|e| fail(format!("root: {e}")))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut tls = rustls::ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| fail(format!("tls: {e}")))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    tls.alpn_protocols = vec![ALPN.to_vec()];
    let tls = QuicClientConfig::try_from(tls).map_err(|e| fail(format!("quic tls: {e}")))?;
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().expect("literal"))?;
    endpoint.set_default_client_config(quinn::ClientConfig::new(Arc::new(tls)));
    Ok(endpoint)
}

/// A subscriber: its endpoint (a port of its own, so the kernel's reuseport hash may pick
/// any worker), its connection, its worker, and the task reading what is relayed to it.
struct Sub {
    worker: usize,
    _endpoint: quinn::Endpoint,
    _conn: quinn::Connection,
    received: tokio::task::JoinHandle<Result<Vec<u8>, String>>,
}

async fn subscribe(
    cert: &CertificateDer<'static>,
    addr: std::net::SocketAddr,
) -> Result<Sub, String> {
    let endpoint = client(cert).map_err(|e| e.to_string())?;
    let conn = endpoint
        .connect(addr, "localhost")
        .map_err(|e| e.to_string())?
        .await
        .map_err(|e| e.to_string())?;
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    send.write_all(b"SUB\n").await.map_err(|e| e.to_string())?;
    send.finish().map_err(|e| e.to_string())?;
    let answer = recv.read_to_end(64).await.map_err(|e| e.to_string())?;
    let answer = String::from_utf8_lossy(&answer).into_owned();
    let worker = answer
        .strip_prefix("OK ")
        .and_then(|w| w.trim().parse().ok())
        .ok_or(format!("subscription answered {answer:?}"))?;
    let relayed = conn.clone();
    let received = tokio::spawn(async move {
        let mut stream = relayed.accept_uni().await.map_err(|e| e.to_string())?;
        stream
            .read_to_end(64 << 20)
            .await
            .map_err(|e| e.to_string())
    });
    Ok(Sub {
        worker,
        _endpoint: endpoint,
        _conn: conn,
        received,
    })
}

/// One run: `workers` workers, subscribers until every worker has one (at least `min_subs`),
/// then a publisher of `len` bytes. Returns the hub's (same-worker, cross-worker) posts.
fn run(workers: usize, min_subs: usize, len: usize) -> std::io::Result<(u64, u64)> {
    let made = Identity::self_signed(&["localhost".into()])?;
    let cert = made.identity.chain[0].clone();
    let quic = Arc::new(Quic::new(QuicConfig {
        idle_timeout: Duration::from_secs(30),
        alpn: vec![ALPN.to_vec()],
        transport: TransportConfig {
            max_bidi_streams: 4,
            max_uni_streams: 0,
            ..TransportConfig::default()
        },
        ..QuicConfig::new(made.identity)
    })?);
    let mut config = ServerConfig {
        bind: "127.0.0.1:0".parse().expect("literal address"),
        workers,
        sessions: SessionMode::None,
        ..ServerConfig::default()
    };
    quic.configure(&mut config)?;
    let hub = Arc::new(Hub::default());
    let (factory, apps_hub) = (quic.clone(), hub.clone());
    let server = Server::start(config, move |worker| {
        factory.app_handler(
            worker,
            Relay {
                hub: apps_hub.clone(),
            },
        )
    })?;
    let addr = server.local_addr();
    println!("relay on {addr} with {workers} worker(s)");

    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let data = payload(len);
    let outcome: Result<(), String> = runtime.block_on(async {
        tokio::time::timeout(Duration::from_secs(60), async {
            let endpoint = client(&cert).map_err(|e| e.to_string())?;
            let mut subs = Vec::new();
            // Reuseport spreads new peers by their address and port: add subscribers, each
            // from a port of its own, until every worker serves one (a bounded number of
            // tries).
            for _ in 0..64 {
                let covered = (0..workers).all(|w| subs.iter().any(|s: &Sub| s.worker == w));
                if covered && subs.len() >= min_subs {
                    break;
                }
                subs.push(subscribe(&cert, addr).await?);
            }
            if !(0..workers).all(|w| subs.iter().any(|s| s.worker == w)) {
                return Err("no subscriber landed on some worker in 64 tries".to_string());
            }
            let publisher = endpoint
                .connect(addr, "localhost")
                .map_err(|e| e.to_string())?
                .await
                .map_err(|e| e.to_string())?;
            let (mut send, mut recv) = publisher.open_bi().await.map_err(|e| e.to_string())?;
            send.write_all(b"PUB\n").await.map_err(|e| e.to_string())?;
            send.write_all(&data).await.map_err(|e| e.to_string())?;
            send.finish().map_err(|e| e.to_string())?;
            let done = recv.read_to_end(64).await.map_err(|e| e.to_string())?;
            let expected = format!("DONE {}\n", subs.len());
            if done != expected.as_bytes() {
                return Err(format!(
                    "publisher answered {:?}",
                    String::from_utf8_lossy(&done)
                ));
            }
            for (n, sub) in subs.into_iter().enumerate() {
                let got = sub.received.await.map_err(|e| e.to_string())??;
                if got != data {
                    return Err(format!(
                        "subscriber {n} (worker {}): {} bytes, not the {} published",
                        sub.worker,
                        got.len(),
                        data.len()
                    ));
                }
                println!(
                    "subscriber {n} on worker {}: {} bytes exact",
                    sub.worker,
                    got.len()
                );
            }
            endpoint.close(0u32.into(), b"done");
            Ok(())
        })
        .await
        .map_err(|_| "the relay did not finish in 60 s".to_string())?
    });
    server.shutdown()?;
    outcome.map_err(fail)?;
    let posts = (
        hub.same_worker.load(Ordering::Relaxed),
        hub.cross_worker.load(Ordering::Relaxed),
    );
    println!(
        "posts: {} on the publisher's worker, {} across workers",
        posts.0, posts.1
    );
    Ok(posts)
}

pub fn main() -> std::io::Result<()> {
    let (same, cross) = run(1, 3, 1 << 20)?;
    if same == 0 || cross != 0 {
        return Err(fail(format!(
            "one worker: {same} same-worker posts, {cross} across"
        )));
    }
    let (_, cross) = run(2, 4, 1 << 20)?;
    if cross == 0 {
        return Err(fail("two workers: no post crossed workers".into()));
    }
    Ok(())
}
