//! QUIC resumption across `--takeover`: the old process hands its TLS sessions over with its
//! sockets, so a client holding the old process's ticket resumes, with 0-RTT, against the new
//! one.

use std::net::SocketAddr;

use udpring::quic::{Identity, ALPN_ECHO};

use crate::common::quic::resuming_client;
use crate::common::*;
use crate::ops::process::*;

async fn echo(conn: &quinn::Connection, data: &[u8]) {
    let (mut send, mut recv) = conn.open_bi().await.expect("open");
    send.write_all(data).await.expect("write");
    send.finish().expect("finish");
    let back = recv.read_to_end(data.len() + 1).await.expect("read");
    assert_eq!(back, data, "exact bytes");
}

/// Every wait of the test is bounded: a bug cannot hang the suite.
fn bounded(rt: &tokio::runtime::Runtime, f: impl std::future::Future<Output = ()>) {
    rt.block_on(async { tokio::time::timeout(WAIT * 4, f).await.expect("bounded") })
}

/// A counter of the `udpring quic ...` line.
fn quic_counter(f: &Finished, name: &str) -> u64 {
    let line = f
        .stdout
        .lines()
        .find(|l| l.starts_with("udpring quic "))
        .unwrap_or_else(|| panic!("no quic line:\n{}\n{}", f.stdout, f.stderr));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .map_or_else(
            || panic!("{name} missing: {line}"),
            |v| v.parse().expect("counter"),
        )
}

/// A ticket from the process taken over from resumes with 0-RTT against its successor, whose
/// request came as early data.
#[test]
fn a_client_resumes_with_0rtt_across_a_takeover() {
    if !kernel_supports_udpring() {
        return;
    }
    let (dir, identity, cert_arg, key_arg) = identity_files("quic-takeover");
    let quic_args = [
        "--app",
        "quic",
        "--workers",
        "2",
        "--cert",
        &cert_arg,
        "--key",
        &key_arg,
    ];
    let old = serve(&[&["--bind", "127.0.0.1:0"][..], &quic_args[..]].concat());
    let addr: SocketAddr = old.addr;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let endpoint = {
        let _guard = rt.enter();
        resuming_client(&identity.chain[0], ALPN_ECHO)
    };
    bounded(&rt, async {
        let conn = endpoint
            .connect(addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        echo(&conn, b"before the takeover").await;
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
    });

    let addr_arg = addr.to_string();
    let new = serve(&[&["--bind", &addr_arg, "--takeover"][..], &quic_args[..]].concat());
    let old = old.finish(WAIT);
    assert_exit_0(&old, "the process taken over from");
    assert!(
        old.stderr.contains("listeners handed over")
            || old.stderr.contains("draining the connections of this one"),
        "{}",
        old.stderr
    );
    assert_eq!(quic_counter(&old, "accepted"), 1);

    bounded(&rt, async {
        let connecting = endpoint.connect(addr, "localhost").expect("connect");
        let Ok((conn, accepted)) = connecting.into_0rtt() else {
            panic!("the client holds the old process's ticket, which allows 0-RTT");
        };
        echo(&conn, b"early, to the new process").await;
        assert!(
            accepted.await,
            "the new process accepted the old one's ticket with 0-RTT"
        );
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
    });
    let new = new.term();
    assert_exit_0(&new, "the new process");
    assert!(
        new.stderr.contains("TLS sessions taken over"),
        "{}",
        new.stderr
    );
    assert_eq!(quic_counter(&new, "accepted"), 1);
    assert_eq!(quic_counter(&new, "resumed"), 1);
    assert_eq!(quic_counter(&new, "early_data_accepted"), 1);
    assert_eq!(quic_counter(&new, "early_streams"), 1);
    let _ = std::fs::remove_dir_all(dir);
}

/// A certificate and key written to a directory of the test's own; the CLI arguments naming
/// them.
fn identity_files(name: &str) -> (std::path::PathBuf, Identity, String, String) {
    let dir = std::env::temp_dir().join(format!("udpring-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let made = Identity::self_signed(&["localhost".into()]).expect("certificate");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, &made.cert_pem).unwrap();
    std::fs::write(&key_path, &made.key_pem).unwrap();
    let (cert, key) = (
        cert_path.to_str().unwrap().to_string(),
        key_path.to_str().unwrap().to_string(),
    );
    (dir, made.identity, cert, key)
}

/// Bytes each stream echoes, written in chunks with pauses so that every stream is in flight
/// while the takeover happens.
const STREAM_BYTES: usize = 192 * 1024;
const CHUNK: usize = 12 * 1024;

/// One connection's traffic: two bidirectional streams echoing [`STREAM_BYTES`] each, paced;
/// every byte checked. Any connection error fails the test.
async fn paced_streams(conn: quinn::Connection, seed: usize) -> usize {
    let mut tasks = Vec::new();
    for s in 0..2 {
        let conn = conn.clone();
        tasks.push(tokio::spawn(async move {
            let (mut send, mut recv) = conn.open_bi().await.expect("open a stream");
            let data = crate::common::quic::pattern(seed * 2 + s, STREAM_BYTES);
            let reader = tokio::spawn(async move { recv.read_to_end(STREAM_BYTES + 1).await });
            for chunk in data.chunks(CHUNK) {
                send.write_all(chunk)
                    .await
                    .expect("write: no connection error");
                tokio::time::sleep(std::time::Duration::from_millis(25)).await;
            }
            send.finish().expect("finish");
            let back = reader
                .await
                .expect("reader")
                .expect("read: no connection error");
            assert!(back == data, "stream {seed}/{s}: exact bytes");
            back.len()
        }));
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.expect("stream task");
    }
    total
}

/// Issue 16: QUIC connections with streams in flight across three successive `--takeover`s.
/// Each process's connections keep reaching it after its successor took over (generation
/// routing): no connection error, every stream's bytes exact, no packet misrouted or reset;
/// new connections reach the newest process; each old process exits 0 once its last
/// connection closed.
#[test]
fn quic_streams_in_flight_survive_three_takeovers() {
    if !kernel_supports_udpring() {
        return;
    }
    let (dir, identity, cert, key) = identity_files("quic-generations");
    let quic_args = [
        "--app",
        "quic",
        "--workers",
        "2",
        "--cert",
        &cert,
        "--key",
        &key,
        "--idle-timeout",
        "30s",
        "--drain-timeout",
        "20s",
    ];
    let first = serve(&[&["--bind", "127.0.0.1:0"][..], &quic_args[..]].concat());
    let addr: SocketAddr = first.addr;
    let mut current = Some(first);
    let addr_arg = addr.to_string();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let endpoint = {
        let _guard = rt.enter();
        crate::common::quic::client(&identity.chain[0], ALPN_ECHO)
    };
    const CONNS: usize = 4;
    let started = std::time::Instant::now();
    for takeover in 0..=3 {
        // Connections of this generation, their streams started.
        let conns: Vec<quinn::Connection> = rt.block_on(async {
            tokio::time::timeout(WAIT, async {
                let mut conns = Vec::new();
                for _ in 0..CONNS {
                    conns.push(
                        endpoint
                            .connect(addr, "localhost")
                            .expect("connect")
                            .await
                            .expect("handshake"),
                    );
                }
                conns
            })
            .await
            .expect("bounded")
        });
        let traffic: Vec<_> = conns
            .iter()
            .enumerate()
            .map(|(i, c)| rt.spawn(paced_streams(c.clone(), takeover * CONNS + i)))
            .collect();
        // The streams are under way: a quarter of their bytes out.
        std::thread::sleep(std::time::Duration::from_millis(100));
        let next = (takeover < 3).then(|| {
            let at = std::time::Instant::now();
            let p = serve(&[&["--bind", &addr_arg, "--takeover"][..], &quic_args[..]].concat());
            eprintln!(
                "takeover {}: serving after {:?}",
                takeover + 1,
                at.elapsed()
            );
            p
        });
        let bytes: usize = rt.block_on(async {
            tokio::time::timeout(WAIT * 4, async {
                let mut bytes = 0;
                for t in traffic {
                    bytes += t.await.expect("no connection error, exact bytes");
                }
                // After the streams, one more echo on each: still this generation's.
                for c in &conns {
                    echo(c, b"after the takeover, to the old process").await;
                    c.close(0u32.into(), b"done");
                }
                bytes
            })
            .await
            .expect("bounded")
        });
        assert_eq!(bytes, CONNS * 2 * STREAM_BYTES);
        for c in &conns {
            assert!(
                matches!(
                    c.close_reason(),
                    Some(quinn::ConnectionError::LocallyClosed)
                ),
                "closed by the client alone: {:?}",
                c.close_reason()
            );
        }
        let old = current.take().expect("a process serves");
        let last = next.is_none();
        current = next;
        let finished = if last {
            // The newest process: its clients are done; it ends on SIGTERM.
            old.term()
        } else {
            let f = old.finish(WAIT * 2);
            assert!(
                f.stderr.contains("draining the connections of this one")
                    && f.stderr
                        .contains("every connection of this process has closed"),
                "takeover {}: the old process drained its own:\n{}",
                takeover + 1,
                f.stderr
            );
            // It waited for its connections to close: none was cut short.
            assert_eq!(quic_counter(&f, "closed_at_shutdown"), 0, "{}", f.stdout);
            f
        };
        assert_exit_0(&finished, "a process of the chain");
        assert_eq!(
            quic_counter(&finished, "accepted"),
            CONNS as u64,
            "{}",
            finished.stdout
        );
        assert_eq!(
            quic_counter(&finished, "misrouted"),
            0,
            "{}",
            finished.stdout
        );
        assert_eq!(
            quic_counter(&finished, "stateless_resets"),
            0,
            "{}",
            finished.stdout
        );
        assert_eq!(quic_counter(&finished, "refused"), 0, "{}", finished.stdout);
    }
    eprintln!(
        "3 takeovers, {} connections, {} streams of {} KiB: 0 errors, in {:?}",
        4 * CONNS,
        8 * CONNS,
        STREAM_BYTES / 1024,
        started.elapsed()
    );
    assert!(current.is_none());
    rt.block_on(async { tokio::time::timeout(WAIT, endpoint.wait_idle()).await.ok() });
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 15: after `--takeover` the old process's QUIC connections were left undriven, so a
/// client learned of nothing until its idle timeout (30 s here, far past the test's wait).
/// The old process now closes each with CONNECTION_CLOSE before it exits: the client's
/// open connection ends at once, with the server's code and reason, without sending a byte.
#[test]
fn the_old_process_closes_its_quic_connections_after_a_takeover() {
    if !kernel_supports_udpring() {
        return;
    }
    let (dir, identity, cert_arg, key_arg) = identity_files("quic-takeover-close");
    let quic_args = [
        "--app",
        "quic",
        "--workers",
        "2",
        "--cert",
        &cert_arg,
        "--key",
        &key_arg,
        "--idle-timeout",
        "30s",
        // Where the old process may keep its connections (generation routing), it closes
        // them at once all the same.
        "--drain-timeout",
        "0s",
    ];
    let old = serve(&[&["--bind", "127.0.0.1:0"][..], &quic_args[..]].concat());
    let addr: SocketAddr = old.addr;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let endpoint = {
        let _guard = rt.enter();
        resuming_client(&identity.chain[0], ALPN_ECHO)
    };
    // Three connections, on both workers as the kernel's hash spreads them, each left open.
    let conns: Vec<quinn::Connection> = rt.block_on(async {
        tokio::time::timeout(WAIT * 4, async {
            let mut conns = Vec::new();
            for i in 0..3u8 {
                let conn = endpoint
                    .connect(addr, "localhost")
                    .expect("connect")
                    .await
                    .expect("handshake");
                echo(&conn, &[i; 100]).await;
                conns.push(conn);
            }
            conns
        })
        .await
        .expect("bounded")
    });

    let addr_arg = addr.to_string();
    let new = serve(&[&["--bind", &addr_arg, "--takeover"][..], &quic_args[..]].concat());
    let old = old.finish(WAIT);
    assert_exit_0(&old, "the process taken over from");
    assert_eq!(quic_counter(&old, "accepted"), 3);
    assert_eq!(
        quic_counter(&old, "closed_at_shutdown"),
        3,
        "{}",
        old.stdout
    );

    // The old process is gone; its goodbyes are already queued at the client's socket.
    bounded(&rt, async {
        for conn in &conns {
            match tokio::time::timeout(WAIT, conn.closed()).await {
                Ok(quinn::ConnectionError::ApplicationClosed(close)) => {
                    assert_eq!(close.error_code, 0u32.into());
                    assert_eq!(&close.reason[..], b"server shutting down");
                }
                Ok(other) => panic!("closed otherwise: {other}"),
                Err(_) => panic!("the old process never closed the connection"),
            }
        }
        // The new process serves new connections on the same port.
        let conn = endpoint
            .connect(addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        echo(&conn, b"to the new process").await;
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
    });
    let new = new.term();
    assert_exit_0(&new, "the new process");
    assert_eq!(quic_counter(&new, "accepted"), 1);
    let _ = std::fs::remove_dir_all(dir);
}

/// Issue 16: where the kernel refuses the SK_REUSEPORT program (here: CAP_BPF and
/// CAP_SYS_ADMIN dropped from the bounding set, so the exec'd server lacks them), one line
/// says so at start, QUIC is served with classic BPF routing, and a takeover falls back to
/// handing the sockets over.
#[test]
fn a_refused_reuseport_program_is_one_line_and_the_classic_fallback() {
    if !kernel_supports_udpring() {
        return;
    }
    if std::process::Command::new("setpriv")
        .arg("--version")
        .output()
        .is_err()
    {
        skip_or_fail("setpriv (util-linux) is not installed");
        return;
    }
    let (dir, identity, cert, key) = identity_files("quic-no-bpf");
    let quic_args = [
        "serve",
        "--app",
        "quic",
        "--workers",
        "2",
        "--cert",
        &cert,
        "--key",
        &key,
    ];
    let mut cmd = std::process::Command::new("setpriv");
    cmd.args(["--bounding-set", "-bpf,-sys_admin,-perfmon", "--"])
        .arg(env!("CARGO_BIN_EXE_udpring"))
        .args(quic_args)
        .args(["--bind", "127.0.0.1:0"]);
    let old = spawn_serving(cmd);
    let addr = old.addr;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let endpoint = {
        let _guard = rt.enter();
        crate::common::quic::client(&identity.chain[0], ALPN_ECHO)
    };
    bounded(&rt, async {
        let conn = endpoint
            .connect(addr, "localhost")
            .expect("connect")
            .await
            .expect("handshake");
        echo(&conn, b"routed by classic BPF").await;
        conn.close(0u32.into(), b"done");
        endpoint.wait_idle().await;
    });
    let addr_arg = addr.to_string();
    let mut args = quic_args.to_vec();
    args.extend(["--bind", &addr_arg, "--takeover"]);
    let new = serve(&args[1..]);
    let old = old.finish(WAIT);
    assert_exit_0(&old, "the process taken over from");
    let refused: Vec<&str> = old
        .stderr
        .lines()
        .filter(|l| l.contains("refused the SK_REUSEPORT eBPF program"))
        .collect();
    assert_eq!(refused.len(), 1, "one line:\n{}", old.stderr);
    assert!(
        refused[0].contains("CAP_BPF") && refused[0].contains("classic BPF"),
        "{}",
        refused[0]
    );
    assert!(
        old.stderr.contains("listeners handed over"),
        "sockets handed over, as before generations:\n{}",
        old.stderr
    );
    let new = new.term();
    assert_exit_0(&new, "the new process");
    let _ = std::fs::remove_dir_all(dir);
}
