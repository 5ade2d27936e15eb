//! The QUIC application API against the quinn client: an app that logs every callback sees
//! admission (refuse, Retry, refusal by ALPN with the SNI known), server-initiated streams,
//! reads and backpressured writes, resets and stops, datagrams, its own timer, messages from
//! another thread through a `Remote` (given back once the connection has closed), the
//! close with its reason (the peer's, and the app's own), a resumed connection's 0-RTT
//! (`Established`, `Connection::is_early_data`), a connection's RTT, window and losses
//! (`Connection::stats`), and the NewReno and BBR controllers of `TransportConfig`.
#![cfg(feature = "quic")]

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use udpring::quic::{
    Admission, App, CloseReason, Congestion, Connection, Decision, Established, Identity,
    IncomingInfo, NewConnection, PostRefusal, Quic, QuicConfig, Recv, Remote, StreamId,
    TransportConfig,
};
use udpring::Server;

use crate::common::quic::{block_on, client, pattern, resuming_client, runtime};
use crate::common::{kernel_supports_udpring, WAIT};

/// The response to a request `big` or `stop`.
const BIG: usize = 4 << 20;

/// What the test and the apps of all workers share.
#[derive(Default)]
struct Shared {
    events: Mutex<Vec<String>>,
    remotes: Mutex<Vec<Remote<Msg>>>,
    refuse_incoming: AtomicBool,
    retry: AtomicBool,
}

impl Shared {
    fn log(&self, event: String) {
        self.events.lock().push(event);
    }

    /// Waits (bounded) until an event starting with `prefix` was logged; returns it.
    fn wait_for(&self, prefix: &str) -> String {
        let deadline = Instant::now() + WAIT;
        loop {
            if let Some(e) = self.events.lock().iter().find(|e| e.starts_with(prefix)) {
                return e.clone();
            }
            assert!(
                Instant::now() < deadline,
                "no {prefix:?} in {:?}",
                self.events.lock()
            );
            std::thread::sleep(Duration::from_millis(5));
        }
    }

    fn has(&self, prefix: &str) -> bool {
        self.events.lock().iter().any(|e| e.starts_with(prefix))
    }
}

/// A message from another thread: said on a new unidirectional stream.
#[derive(Debug, PartialEq, Eq)]
struct Msg(Vec<u8>);

/// One stream's request so far, and the response still to write.
#[derive(Default)]
struct Request {
    got: Vec<u8>,
    out: Vec<u8>,
    sent: usize,
}

#[derive(Default)]
struct ProbeConn {
    requests: Vec<(StreamId, Request)>,
}

impl ProbeConn {
    fn request(&mut self, id: StreamId) -> &mut Request {
        let at = match self.requests.iter().position(|(s, _)| *s == id) {
            Some(at) => at,
            None => {
                self.requests.push((id, Request::default()));
                self.requests.len() - 1
            }
        };
        &mut self.requests[at].1
    }
}

struct Probe {
    shared: Arc<Shared>,
}

impl Probe {
    /// Writes what fits of `id`'s response; finishes it when all is taken.
    fn push(&self, conn: &mut Connection<'_, Msg>, state: &mut ProbeConn, id: StreamId) {
        let request = state.request(id);
        if request.out.is_empty() || request.sent == request.out.len() {
            return;
        }
        match conn.write(id, &request.out[request.sent..]) {
            Ok(n) => {
                request.sent += n;
                if request.sent == request.out.len() {
                    let _ = conn.finish(id);
                }
            }
            Err(e) => self.shared.log(format!("write error {e}")),
        }
    }
}

/// Says `text` on a new unidirectional stream of the server's.
fn say(conn: &mut Connection<'_, Msg>, text: &[u8]) {
    if let Some(id) = conn.open_uni() {
        let _ = conn.write(id, text);
        let _ = conn.finish(id);
    }
}

impl App for Probe {
    type Conn = ProbeConn;
    type Message = Msg;

    fn on_incoming(&mut self, incoming: &IncomingInfo) -> Admission {
        self.shared
            .log(format!("incoming validated={}", incoming.validated));
        if self.shared.refuse_incoming.load(Ordering::Relaxed) {
            Admission::Refuse
        } else if self.shared.retry.load(Ordering::Relaxed) && !incoming.validated {
            Admission::Retry
        } else {
            Admission::Accept
        }
    }

    fn on_new_connection(
        &mut self,
        _conn: &mut Connection<'_, Msg>,
        info: &NewConnection<'_>,
    ) -> Decision<ProbeConn> {
        let alpn = String::from_utf8_lossy(info.alpn).into_owned();
        self.shared.log(format!("new {alpn} sni={:?}", info.sni));
        if info.alpn == b"refuse" {
            Decision::Refuse(77)
        } else {
            Decision::Accept(ProbeConn::default())
        }
    }

    fn on_established(
        &mut self,
        conn: &mut Connection<'_, Msg>,
        _: &mut ProbeConn,
        info: &Established,
    ) {
        self.shared.log(format!(
            "established resumed={} 0rtt={}",
            info.resumed, info.accepted_0rtt
        ));
        // `None` when the client's close came in the same turn as its handshake's end (the
        // connection is closed by now): `on_closed` follows.
        if let Some(id) = conn.open_bi() {
            assert!(!id.is_client_initiated() && id.is_bidi());
            assert_eq!(conn.write(id, b"hello").unwrap(), 5);
            conn.finish(id).unwrap();
        }
        conn.set_timer(Some(conn.now() + Duration::from_millis(20)));
        self.shared.remotes.lock().push(conn.remote());
    }

    fn on_readable(&mut self, conn: &mut Connection<'_, Msg>, state: &mut ProbeConn, id: StreamId) {
        let mut buf = [0u8; 1000];
        loop {
            match conn.read(id, &mut buf) {
                Ok(Recv::Data(n)) => state.request(id).got.extend_from_slice(&buf[..n]),
                Ok(Recv::Blocked) => return,
                Ok(Recv::Finished) => break,
                Err(e) => {
                    self.shared.log(format!("read error {e}"));
                    return;
                }
            }
        }
        let early = conn.is_early_data();
        let request = state.request(id);
        self.shared.log(format!(
            "read {} {}{}",
            id,
            String::from_utf8_lossy(&request.got),
            if early { " early" } else { "" }
        ));
        if request.got == b"stats" {
            let stats = conn.stats();
            self.shared.log(format!(
                "stats rtt_us={} cwnd={} sent={} lost={} mtu={}",
                stats.rtt.as_micros(),
                stats.cwnd,
                stats.sent_packets,
                stats.lost_packets,
                stats.mtu
            ));
        }
        if request.got == b"close" {
            conn.close(99, b"asked to");
            return;
        }
        request.out = match request.got.as_slice() {
            b"big" | b"stop" => pattern(1, BIG),
            other => other.iter().rev().copied().collect(),
        };
        if !id.is_client_initiated() || !id.is_bidi() {
            return;
        }
        self.push(conn, state, id);
    }

    fn on_writable(&mut self, conn: &mut Connection<'_, Msg>, state: &mut ProbeConn, id: StreamId) {
        if !self.shared.has("writable") {
            self.shared.log("writable".into());
        }
        self.push(conn, state, id);
    }

    fn on_finished(&mut self, _: &mut Connection<'_, Msg>, _: &mut ProbeConn, id: StreamId) {
        self.shared.log(format!("finished {id}"));
    }

    fn on_reset(
        &mut self,
        _: &mut Connection<'_, Msg>,
        _: &mut ProbeConn,
        id: StreamId,
        code: u64,
    ) {
        self.shared.log(format!("reset {id} {code}"));
    }

    fn on_stopped(
        &mut self,
        conn: &mut Connection<'_, Msg>,
        _: &mut ProbeConn,
        id: StreamId,
        code: u64,
    ) {
        self.shared.log(format!("stopped {id} {code}"));
        conn.reset(id, code).unwrap();
    }

    fn on_datagram(&mut self, conn: &mut Connection<'_, Msg>, _: &mut ProbeConn, datagram: Bytes) {
        self.shared
            .log(format!("datagram {}", String::from_utf8_lossy(&datagram)));
        let back: Vec<u8> = datagram.iter().rev().copied().collect();
        conn.send_datagram(back.into()).unwrap();
    }

    fn on_timer(&mut self, conn: &mut Connection<'_, Msg>, _: &mut ProbeConn, _: Instant) {
        self.shared.log("timer".into());
        say(conn, b"timer");
    }

    fn on_message(&mut self, conn: &mut Connection<'_, Msg>, _: &mut ProbeConn, message: Msg) {
        if conn.is_closed() {
            self.shared.log("late message".into());
            return;
        }
        self.shared.log("message".into());
        say(conn, &message.0);
    }

    fn on_closed(&mut self, _: ProbeConn, reason: &CloseReason) {
        self.shared.log(format!("closed {reason:?}"));
    }
}

struct ProbeServer {
    server: Server,
    quic: Arc<Quic>,
    shared: Arc<Shared>,
    cert: rustls::pki_types::CertificateDer<'static>,
}

fn start(workers: usize) -> ProbeServer {
    start_with(workers, Congestion::default())
}

fn start_with(workers: usize, congestion: Congestion) -> ProbeServer {
    let made = Identity::self_signed(&["localhost".into()]).expect("certificate");
    let cert = made.identity.chain[0].clone();
    let quic = Arc::new(
        Quic::new(QuicConfig {
            idle_timeout: Duration::from_secs(30),
            alpn: vec![b"probe".to_vec(), b"refuse".to_vec()],
            transport: TransportConfig {
                max_uni_streams: 4,
                congestion,
                ..TransportConfig::default()
            },
            ..QuicConfig::new(made.identity)
        })
        .expect("quic config"),
    );
    let mut config = crate::common::config("127.0.0.1:0", workers);
    config.buffers = 2048;
    quic.configure(&mut config).expect("engine options");
    let shared = Arc::new(Shared::default());
    let (factory, apps) = (quic.clone(), shared.clone());
    let server = crate::common::start(config, move |worker| {
        factory.app_handler(
            worker,
            Probe {
                shared: apps.clone(),
            },
        )
    });
    ProbeServer {
        server,
        quic,
        shared,
        cert,
    }
}

async fn read_uni(conn: &quinn::Connection) -> Vec<u8> {
    let mut uni = conn.accept_uni().await.expect("a server stream");
    uni.read_to_end(1 << 20).await.expect("read")
}

#[test]
fn an_app_sees_streams_datagrams_timers_and_its_close() {
    if !kernel_supports_udpring() {
        return;
    }
    let s = start(1);
    let rt = runtime();
    let endpoint = rt.block_on(async { client(&s.cert, b"probe") });
    let addr = s.server.local_addr();
    block_on(&rt, async {
        let conn = endpoint
            .connect(addr, "localhost")
            .unwrap()
            .await
            .expect("connect");
        // A stream the server opened, with its bytes.
        let (mut send, mut recv) = conn.accept_bi().await.expect("server stream");
        assert_eq!(recv.read_to_end(64).await.unwrap(), b"hello");
        // The app's timer opened a unidirectional stream.
        assert_eq!(read_uni(&conn).await, b"timer");
        // Our answer on the server's stream is read there, into the app's buffer.
        send.write_all(b"world").await.unwrap();
        send.finish().unwrap();
        // Datagrams both ways.
        conn.send_datagram(Bytes::from_static(b"ping")).unwrap();
        assert_eq!(&conn.read_datagram().await.unwrap()[..], b"gnip");
        // A response larger than the stream window: written as the client reads it.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"big").await.unwrap();
        send.finish().unwrap();
        let back = recv.read_to_end(BIG + 1).await.unwrap();
        assert!(back == pattern(1, BIG), "4 MiB exact");
        // A small request, answered reversed.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"abc").await.unwrap();
        send.finish().unwrap();
        assert_eq!(recv.read_to_end(64).await.unwrap(), b"cba");
        // The connection's recovery figures, after the 4 MiB response.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"stats").await.unwrap();
        send.finish().unwrap();
        assert_eq!(
            recv.read_to_end(64).await.unwrap(),
            b"stats".iter().rev().copied().collect::<Vec<u8>>()
        );
        conn.close(42u32.into(), b"bye");
    });
    let stats = s.shared.wait_for("stats ");
    let field = |name: &str| -> u64 {
        stats
            .split(' ')
            .find_map(|f| f.strip_prefix(name)?.strip_prefix('='))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name} in {stats}"))
    };
    assert!(field("rtt_us") > 0, "{stats}");
    assert!(field("cwnd") >= 2 * 1200, "{stats}");
    // More than 4 MiB left in packets of at most 1,500 bytes.
    assert!(field("sent") > (BIG / 1500) as u64, "{stats}");
    assert!(field("lost") <= field("sent"), "{stats}");
    assert!(field("mtu") >= 1200, "{stats}");
    assert_eq!(
        s.shared.wait_for("established"),
        "established resumed=false 0rtt=false"
    );
    s.shared.wait_for("read 1 world");
    s.shared.wait_for("datagram ping");
    s.shared.wait_for("writable");
    // The server's first stream (id 1): its finish acknowledged.
    s.shared.wait_for("finished 1");
    let closed = s.shared.wait_for("closed");
    assert!(
        closed.contains("PeerApplication { code: 42") && closed.contains("bye"),
        "{closed}"
    );
    let stats = s.quic.stats();
    assert_eq!(stats.accepted, 1, "{}", stats.summary());
    s.server.shutdown().unwrap();
}

#[test]
fn resets_and_stops_reach_the_app() {
    if !kernel_supports_udpring() {
        return;
    }
    let s = start(1);
    let rt = runtime();
    let endpoint = rt.block_on(async { client(&s.cert, b"probe") });
    let addr = s.server.local_addr();
    block_on(&rt, async {
        let conn = endpoint
            .connect(addr, "localhost")
            .unwrap()
            .await
            .expect("connect");
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(b"partial").await.unwrap();
        send.reset(7u32.into()).unwrap();
        // The reset is seen once the server has the stream: wait for it there.
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"stop").await.unwrap();
        send.finish().unwrap();
        let mut first = [0u8; 1000];
        recv.read_exact(&mut first).await.unwrap();
        recv.stop(9u32.into()).unwrap();
        // Keep the connection until the server has logged both.
        while !(s.shared.has("reset 0 7") && s.shared.has("stopped 4 9")) {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        conn.close(0u32.into(), b"");
    });
    s.shared.wait_for("reset 0 7");
    s.shared.wait_for("stopped 4 9");
    s.server.shutdown().unwrap();
}

#[test]
fn a_remote_posts_from_another_thread_and_gets_its_message_back_after_close() {
    if !kernel_supports_udpring() {
        return;
    }
    let s = start(2);
    let rt = runtime();
    let endpoint = rt.block_on(async { client(&s.cert, b"probe") });
    let addr = s.server.local_addr();
    block_on(&rt, async {
        let conn = endpoint
            .connect(addr, "localhost")
            .unwrap()
            .await
            .expect("connect");
        let remote = loop {
            if let Some(remote) = s.shared.remotes.lock().first() {
                break remote.clone();
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        };
        std::thread::spawn(move || remote.post(Msg(b"from afar".to_vec())))
            .join()
            .unwrap()
            .expect("an open connection takes the post");
        // The timer's stream and the message's, in either order.
        let mut said = vec![read_uni(&conn).await, read_uni(&conn).await];
        said.sort();
        assert_eq!(said, [b"from afar".to_vec(), b"timer".to_vec()]);
        conn.close(5u32.into(), b"done");
    });
    s.shared.wait_for("closed");
    let remote = s.shared.remotes.lock()[0].clone();
    assert!(remote.is_closed(), "closed before on_closed");
    let back = std::thread::spawn(move || remote.post(Msg(b"too late".to_vec())))
        .join()
        .unwrap()
        .expect_err("a closed connection refuses");
    assert_eq!(back.reason, PostRefusal::ConnectionClosed);
    assert_eq!(back.into_message(), Msg(b"too late".to_vec()));
    s.server.shutdown().unwrap();
}

#[test]
fn admission_refuses_retries_and_refuses_by_alpn() {
    if !kernel_supports_udpring() {
        return;
    }
    let s = start(1);
    let rt = runtime();
    let addr = s.server.local_addr();
    // Refused at the Initial: no state, the client is told at once.
    s.shared.refuse_incoming.store(true, Ordering::Relaxed);
    let endpoint = rt.block_on(async { client(&s.cert, b"probe") });
    let refused = block_on(&rt, async {
        endpoint.connect(addr, "localhost").unwrap().await
    });
    assert!(
        matches!(refused, Err(quinn::ConnectionError::ConnectionClosed(_))),
        "{refused:?}"
    );
    assert!(!s.shared.has("new"), "no handshake for a refused peer");
    // Retry first, then the validated peer is accepted.
    s.shared.refuse_incoming.store(false, Ordering::Relaxed);
    s.shared.retry.store(true, Ordering::Relaxed);
    let conn = block_on(&rt, async {
        endpoint.connect(addr, "localhost").unwrap().await
    })
    .expect("accepted after the Retry");
    s.shared.wait_for("incoming validated=true");
    assert_eq!(s.quic.stats().retries, 1, "{}", s.quic.stats().summary());
    conn.close(0u32.into(), b"");
    // Refused by ALPN once the handshake data (with SNI) is known.
    let other = rt.block_on(async { client(&s.cert, b"refuse") });
    let refused = block_on(&rt, async {
        other.connect(addr, "localhost").unwrap().await
    });
    assert!(refused.is_err(), "{refused:?}");
    s.shared.wait_for("new refuse sni=Some(\"localhost\")");
    assert!(
        !s.shared.has("closed Local"),
        "a refused connection has no state to close"
    );
    s.server.shutdown().unwrap();
}

/// The app is told a connection resumed with 0-RTT (`Established`), and that the request it
/// read came as early data (`Connection::is_early_data`); a full handshake says neither.
#[test]
fn established_says_resumed_and_early_data() {
    if !kernel_supports_udpring() {
        return;
    }
    let s = start(1);
    // One thread: the client's driver runs only when the test's task waits, so the request
    // is queued before the first flight leaves and goes out as 0-RTT data.
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let endpoint = {
        let _guard = rt.enter();
        resuming_client(&s.cert, b"probe")
    };
    let addr = s.server.local_addr();
    block_on(&rt, async {
        let conn = endpoint
            .connect(addr, "localhost")
            .unwrap()
            .await
            .expect("connect");
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"full").await.unwrap();
        send.finish().unwrap();
        assert_eq!(recv.read_to_end(64).await.unwrap(), b"lluf");
        conn.close(0u32.into(), b"done");
    });
    s.shared.wait_for("read 0 full");
    assert_eq!(
        s.shared.wait_for("established"),
        "established resumed=false 0rtt=false"
    );
    assert!(
        !s.shared.has("read 0 full early"),
        "{:?}",
        s.shared.events.lock()
    );
    s.shared.events.lock().clear();
    let accepted = block_on(&rt, async {
        let connecting = endpoint.connect(addr, "localhost").expect("connect");
        let Ok((conn, accepted)) = connecting.into_0rtt() else {
            panic!("the client holds a ticket that allows 0-RTT");
        };
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        send.write_all(b"early").await.unwrap();
        send.finish().unwrap();
        assert_eq!(recv.read_to_end(64).await.unwrap(), b"ylrae");
        let accepted = accepted.await;
        conn.close(0u32.into(), b"done");
        accepted
    });
    assert!(accepted, "the server accepted the 0-RTT data");
    assert_eq!(
        s.shared.wait_for("established"),
        "established resumed=true 0rtt=true"
    );
    s.shared.wait_for("read 0 early early");
    let stats = s.quic.stats();
    assert_eq!(
        (
            stats.resumed,
            stats.early_data_accepted,
            stats.early_streams
        ),
        (1, 1, 1),
        "{}",
        stats.summary()
    );
    s.server.shutdown().unwrap();
}

/// The app closes a connection itself with a code and reason: the client gets both, and the
/// app's `on_closed` says it closed it.
#[test]
fn the_app_closes_a_connection_with_its_code_and_reason() {
    if !kernel_supports_udpring() {
        return;
    }
    let s = start(1);
    let rt = runtime();
    let endpoint = rt.block_on(async { client(&s.cert, b"probe") });
    let addr = s.server.local_addr();
    let error = block_on(&rt, async {
        let conn = endpoint
            .connect(addr, "localhost")
            .unwrap()
            .await
            .expect("connect");
        let (mut send, _recv) = conn.open_bi().await.unwrap();
        send.write_all(b"close").await.unwrap();
        send.finish().unwrap();
        conn.closed().await
    });
    match error {
        quinn::ConnectionError::ApplicationClosed(close) => {
            assert_eq!(close.error_code, 99u32.into());
            assert_eq!(&close.reason[..], b"asked to");
        }
        other => panic!("closed by the app, not {other:?}"),
    }
    assert_eq!(
        s.shared.wait_for("closed"),
        "closed Local { code: 99 }",
        "{:?}",
        s.shared.events.lock()
    );
    s.server.shutdown().unwrap();
}

/// Each congestion controller `TransportConfig` offers carries a response larger than the
/// stream window, byte-exact, and the server's connection reports its window.
#[test]
fn newreno_and_bbr_carry_a_large_response() {
    if !kernel_supports_udpring() {
        return;
    }
    for congestion in [Congestion::NewReno, Congestion::Bbr] {
        let s = start_with(1, congestion);
        let rt = runtime();
        let endpoint = rt.block_on(async { client(&s.cert, b"probe") });
        let addr = s.server.local_addr();
        block_on(&rt, async {
            let conn = endpoint
                .connect(addr, "localhost")
                .unwrap()
                .await
                .expect("connect");
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(b"big").await.unwrap();
            send.finish().unwrap();
            let back = recv.read_to_end(BIG + 1).await.unwrap();
            assert!(back == pattern(1, BIG), "{congestion:?}: 4 MiB exact");
            let (mut send, mut recv) = conn.open_bi().await.unwrap();
            send.write_all(b"stats").await.unwrap();
            send.finish().unwrap();
            recv.read_to_end(64).await.unwrap();
            conn.close(0u32.into(), b"done");
        });
        let stats = s.shared.wait_for("stats ");
        assert!(!stats.contains("cwnd=0 "), "{congestion:?}: {stats}");
        s.server.shutdown().unwrap();
    }
}
