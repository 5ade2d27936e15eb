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
    let dir = std::env::temp_dir().join(format!("udpring-quic-takeover-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let made = Identity::self_signed(&["localhost".into()]).expect("certificate");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, &made.cert_pem).unwrap();
    std::fs::write(&key_path, &made.key_pem).unwrap();
    let (cert_arg, key_arg) = (
        cert_path.to_str().unwrap().to_string(),
        key_path.to_str().unwrap().to_string(),
    );
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
        resuming_client(&made.identity.chain[0], ALPN_ECHO)
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
        old.stderr.contains("listeners handed over"),
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

/// Issue 15: after `--takeover` the old process's QUIC connections were left undriven, so a
/// client learned of nothing until its idle timeout (30 s here, far past the test's wait).
/// The old process now closes each with CONNECTION_CLOSE before it exits: the client's
/// open connection ends at once, with the server's code and reason, without sending a byte.
#[test]
fn the_old_process_closes_its_quic_connections_after_a_takeover() {
    if !kernel_supports_udpring() {
        return;
    }
    let dir = std::env::temp_dir().join(format!(
        "udpring-quic-takeover-close-{}",
        std::process::id()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let made = Identity::self_signed(&["localhost".into()]).expect("certificate");
    let (cert_path, key_path) = (dir.join("cert.pem"), dir.join("key.pem"));
    std::fs::write(&cert_path, &made.cert_pem).unwrap();
    std::fs::write(&key_path, &made.key_pem).unwrap();
    let (cert_arg, key_arg) = (
        cert_path.to_str().unwrap().to_string(),
        key_path.to_str().unwrap().to_string(),
    );
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
    ];
    let old = serve(&[&["--bind", "127.0.0.1:0"][..], &quic_args[..]].concat());
    let addr: SocketAddr = old.addr;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let endpoint = {
        let _guard = rt.enter();
        resuming_client(&made.identity.chain[0], ALPN_ECHO)
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
