//! A QUIC fleet behind a load balancer that exists (issue 16 item 3): three udpring hosts, a
//! router and a client, each in a network namespace of its own (`scripts/cluster.sh`). The
//! router is nftables: short-header packets go to the host whose QUIC-LB server ID their
//! destination connection ID carries, everything else by a jhash of the 4-tuple.
//!
//! quinn clients (each connection on an endpoint of its own) stream through the VIP; a third
//! of them rebind their port mid-transfer and must keep their host; host 2 is restarted with
//! `--takeover` under that load and no connection fails; then host 3 is stopped and only its
//! clients see their connections end, at once (CONNECTION_CLOSE), while the others still
//! echo. Which host holds a connection is read from the certificate it presented (each host
//! has its own).
//!
//! Needs root, `ip` and `nft`; skips with the reason locally, fails under `CI=true`. Stress:
//! `make stress`; `make cluster` runs it alone with its report.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::{Duration, Instant};

use udpring::quic::{Identity, ALPN_ECHO};

use crate::common::quic::pattern;
use crate::common::*;
use crate::ops::process::*;

const PORT: u16 = 4433;
const VIP: &str = "10.0.9.9:4433";
const HOSTS: usize = 3;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .output()
        .is_ok_and(|o| o.status.success())
}

/// The namespaces, removed (with what runs in them) when dropped.
struct Cluster {
    prefix: String,
}

impl Cluster {
    fn up() -> Cluster {
        let prefix = format!("urf{}", std::process::id() % 100_000);
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");
        let out = Command::new("bash")
            .args([script, "up", &prefix, &PORT.to_string()])
            .output()
            .expect("scripts/cluster.sh");
        assert!(
            out.status.success(),
            "cluster up: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Cluster { prefix }
    }

    fn ns(&self, what: &str) -> String {
        format!("{}-{what}", self.prefix)
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");
        let _ = Command::new("bash")
            .args([script, "down", &self.prefix])
            .output();
    }
}

/// One host's files: its own certificate, the fleet's reset key.
struct HostFiles {
    identity: Identity,
    cert: String,
    key: String,
}

fn host_args<'a>(i: usize, files: &'a HostFiles, reset_key: &'a str, ip: &'a str) -> Vec<String> {
    vec![
        "serve".into(),
        "--app".into(),
        "quic".into(),
        "--bind".into(),
        ip.into(),
        "--workers".into(),
        "1".into(),
        "--quic-server-id".into(),
        format!("{i:02x}"),
        "--stateless-reset-key".into(),
        reset_key.into(),
        "--cert".into(),
        files.cert.clone(),
        "--key".into(),
        files.key.clone(),
        "--idle-timeout".into(),
        "30s".into(),
        "--drain-timeout".into(),
        "20s".into(),
    ]
}

fn start_host(cluster: &Cluster, i: usize, args: &[String], takeover: bool) -> Proc {
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &cluster.ns(&format!("h{i}"))])
        .arg(env!("CARGO_BIN_EXE_udpring"))
        .args(args);
    if takeover {
        cmd.arg("--takeover");
    }
    spawn_serving(cmd)
}

fn client_config(hosts: &[HostFiles]) -> quinn::ClientConfig {
    let certs: Vec<_> = hosts.iter().map(|h| h.identity.chain[0].clone()).collect();
    crate::common::quic::quic_client_config(crate::common::quic::client_tls_trusting(
        &certs, ALPN_ECHO,
    ))
}

/// The host (0-based) whose certificate `conn` was given.
fn host_of(conn: &quinn::Connection, hosts: &[HostFiles]) -> usize {
    let identity = conn.peer_identity().expect("peer identity");
    let chain = identity
        .downcast::<Vec<rustls::pki_types::CertificateDer<'static>>>()
        .expect("a certificate chain");
    hosts
        .iter()
        .position(|h| h.identity.chain[0] == chain[0])
        .expect("one of the fleet's certificates")
}

struct Client {
    endpoint: quinn::Endpoint,
    conn: quinn::Connection,
    host: usize,
}

const STREAM_BYTES: usize = 256 * 1024;
const CHUNK: usize = 8 * 1024;

/// Two streams echoing [`STREAM_BYTES`] each, paced over about 1.5 s; the endpoint rebinds
/// twice on the way when `rebind` (its socket made by `rebinder` in the client namespace).
async fn transfer(
    client: &Client,
    seed: usize,
    rebind: Option<&std::sync::mpsc::Sender<std::sync::mpsc::Sender<UdpSocket>>>,
) -> Result<usize, String> {
    let mut tasks = Vec::new();
    for s in 0..2 {
        let conn = client.conn.clone();
        tasks.push(tokio::spawn(async move {
            let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
            let data = pattern(seed * 2 + s, STREAM_BYTES);
            let reader = tokio::spawn(async move { recv.read_to_end(STREAM_BYTES + 1).await });
            for chunk in data.chunks(CHUNK) {
                send.write_all(chunk).await.map_err(|e| e.to_string())?;
                tokio::time::sleep(Duration::from_millis(45)).await;
            }
            send.finish().map_err(|e| e.to_string())?;
            let back = reader
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())?;
            if back != data {
                return Err(format!("stream {seed}/{s}: bytes differ"));
            }
            Ok::<usize, String>(back.len())
        }));
    }
    if let Some(rebinder) = rebind {
        for _ in 0..2 {
            tokio::time::sleep(Duration::from_millis(400)).await;
            let (tx, rx) = std::sync::mpsc::channel();
            rebinder.send(tx).map_err(|e| e.to_string())?;
            let socket = rx.recv().map_err(|e| e.to_string())?;
            client.endpoint.rebind(socket).map_err(|e| e.to_string())?;
        }
    }
    let mut total = 0;
    for t in tasks {
        total += t.await.map_err(|e| e.to_string())??;
    }
    Ok(total)
}

#[test]
#[ignore = "stress: make stress"]
fn a_fleet_behind_nftables_keeps_connections_across_rebinds_and_a_takeover() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        skip_or_fail("not root (needs network namespaces and nftables)");
        return;
    }
    for tool in ["ip", "nft"] {
        if !have(tool) {
            skip_or_fail(&format!(
                "`{tool}` not found (apt-get install iproute2 nftables)"
            ));
            return;
        }
    }
    if !kernel_supports_udpring() {
        return;
    }
    let dir = std::env::temp_dir().join(format!("udpring-fleet-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let reset_key = dir.join("reset.key");
    std::fs::write(&reset_key, [0x5au8; 32]).unwrap();
    std::fs::set_permissions(
        &reset_key,
        std::os::unix::fs::PermissionsExt::from_mode(0o600),
    )
    .unwrap();
    let reset_key = reset_key.to_str().unwrap().to_string();
    let files: Vec<HostFiles> = (1..=HOSTS)
        .map(|i| {
            let made = Identity::self_signed(&["localhost".into()]).expect("certificate");
            let (cert, key) = (dir.join(format!("h{i}.pem")), dir.join(format!("h{i}.key")));
            std::fs::write(&cert, &made.cert_pem).unwrap();
            std::fs::write(&key, &made.key_pem).unwrap();
            HostFiles {
                identity: made.identity,
                cert: cert.to_str().unwrap().into(),
                key: key.to_str().unwrap().into(),
            }
        })
        .collect();
    let cluster = Cluster::up();
    let ips: Vec<String> = (1..=HOSTS).map(|i| format!("10.1.{i}.2:{PORT}")).collect();
    let args: Vec<Vec<String>> = (1..=HOSTS)
        .map(|i| host_args(i, &files[i - 1], &reset_key, &ips[i - 1]))
        .collect();
    let mut hosts: Vec<Option<Proc>> = (1..=HOSTS)
        .map(|i| Some(start_host(&cluster, i, &args[i - 1], false)))
        .collect();

    // The client side runs in a thread of its own inside the client namespace; a second
    // thread there makes the sockets rebinds need (the runtime's threads are elsewhere).
    let client_ns = cluster.ns("c");
    let (rebind_tx, rebind_rx) = std::sync::mpsc::channel::<std::sync::mpsc::Sender<UdpSocket>>();
    let rebinder = {
        let ns = client_ns.clone();
        std::thread::spawn(move || {
            enter_netns(&ns);
            for reply in rebind_rx {
                let _ = reply.send(UdpSocket::bind("10.0.0.1:0").expect("a new port"));
            }
        })
    };
    let (to_main, from_client) = std::sync::mpsc::channel::<&'static str>();
    let (to_client, from_main) = std::sync::mpsc::channel::<()>();
    let config = client_config(&files);
    let vip: SocketAddr = VIP.parse().unwrap();
    let hosts_files = &files;
    let report = std::thread::scope(|scope| {
        let client = scope.spawn(move || {
            enter_netns(&client_ns);
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                tokio::time::timeout(Duration::from_secs(60), async {
                    // Connections until every host has at least three (the hash decides).
                    let mut clients: Vec<Client> = Vec::new();
                    let mut per_host = [0usize; HOSTS];
                    while per_host.iter().any(|&n| n < 3) {
                        assert!(clients.len() < 60, "the hash never reached every host: {per_host:?}");
                        let mut endpoint =
                            quinn::Endpoint::client("10.0.0.1:0".parse().unwrap()).expect("client");
                        endpoint.set_default_client_config(config.clone());
                        let conn = endpoint
                            .connect(vip, "localhost")
                            .expect("connect")
                            .await
                            .expect("handshake through the load balancer");
                        let host = host_of(&conn, hosts_files);
                        per_host[host] += 1;
                        clients.push(Client { endpoint, conn, host });
                    }
                    let mut report = format!(
                        "{} connections: {:?} per host; every third rebinds twice mid-transfer\n",
                        clients.len(),
                        per_host
                    );
                    // Traffic on all of them; host 2 restarted 300 ms in.
                    let started = Instant::now();
                    let results = {
                        let transfers = clients.iter().enumerate().map(|(i, c)| {
                            transfer(c, i, (i % 3 == 0).then_some(&rebind_tx))
                        });
                        let all = futures_join_all(transfers);
                        let restart = async {
                            tokio::time::sleep(Duration::from_millis(300)).await;
                            to_main.send("restart host 2").unwrap();
                            let _ = tokio::task::spawn_blocking(move || from_main.recv()).await;
                        };
                        let (results, ()) = tokio::join!(all, restart);
                        results
                    };
                    let failed: Vec<String> = results
                        .iter()
                        .enumerate()
                        .filter_map(|(i, r)| r.as_ref().err().map(|e| format!("conn {i}: {e}")))
                        .collect();
                    assert!(failed.is_empty(), "connection errors: {failed:?}");
                    let bytes: usize = results.iter().map(|r| *r.as_ref().unwrap()).sum();
                    assert_eq!(bytes, clients.len() * 2 * STREAM_BYTES);
                    report += &format!(
                        "{} streams, {} KiB each, exact, 0 connection errors, {} rebinds, one --takeover of host 2, in {:?}\n",
                        clients.len() * 2,
                        STREAM_BYTES / 1024,
                        2 * clients.len().div_ceil(3),
                        started.elapsed()
                    );
                    for c in &clients {
                        assert_eq!(host_of(&c.conn, hosts_files), c.host);
                    }
                    // Host 3 stops: its clients learn at once; everyone else still echoes.
                    to_main.send("stop host 3").unwrap();
                    let stopped = Instant::now();
                    for c in clients.iter().filter(|c| c.host == 2) {
                        match tokio::time::timeout(Duration::from_secs(3), c.conn.closed()).await {
                            Ok(quinn::ConnectionError::ApplicationClosed(_)) => {}
                            Ok(other) => panic!("host 3's client closed otherwise: {other}"),
                            Err(_) => panic!("host 3's client was not told within 3 s"),
                        }
                    }
                    report += &format!(
                        "host 3 stopped: its {} clients closed within {:?}\n",
                        per_host[2],
                        stopped.elapsed()
                    );
                    for (i, c) in clients.iter().enumerate().filter(|(_, c)| c.host != 2) {
                        crate::common::quic::echo_once(&c.conn, 1000 + i, 4096).await;
                        assert!(c.conn.close_reason().is_none(), "conn {i} still open");
                    }
                    report += &format!(
                        "hosts 1 and 2: all {} connections still echo\n",
                        per_host[0] + per_host[1]
                    );
                    for c in &clients {
                        c.conn.close(0u32.into(), b"done");
                    }
                    for c in &clients {
                        c.endpoint.wait_idle().await;
                    }
                    to_main.send("done").unwrap();
                    report
                })
                .await
                .expect("the fleet test finished in time")
            })
        });
        let mut old_host2 = None;
        for step in from_client {
            match step {
                "restart host 2" => {
                    let at = Instant::now();
                    let new = start_host(&cluster, 2, &args[1], true);
                    eprintln!(
                        "host 2 restarted with --takeover: serving after {:?}",
                        at.elapsed()
                    );
                    old_host2 = hosts[1].replace(new);
                    let _ = to_client.send(());
                }
                "stop host 3" => {
                    let f = hosts[2].take().expect("host 3").term();
                    assert_exit_0(&f, "host 3");
                }
                _ => break,
            }
        }
        let report = client.join().expect("client thread");
        let old = old_host2.expect("host 2 restarted").finish(WAIT * 2);
        assert_exit_0(&old, "host 2 before its takeover");
        assert!(
            old.stderr
                .contains("every connection of this process has closed"),
            "{}",
            old.stderr
        );
        (report, old)
    });
    let (report, old) = report;
    let _ = rebinder.join();
    let mut misrouted = quic_counter(&old, "misrouted");
    let mut resets = quic_counter(&old, "stateless_resets");
    for (i, h) in hosts.iter_mut().enumerate() {
        if let Some(p) = h.take() {
            let f = p.term();
            assert_exit_0(&f, &format!("host {}", i + 1));
            misrouted += quic_counter(&f, "misrouted");
            resets += quic_counter(&f, "stateless_resets");
        }
    }
    assert_eq!((misrouted, resets), (0, 0), "every packet reached its host");
    println!("{report}");
    drop(cluster);
    let _ = std::fs::remove_dir_all(dir);
}

/// A counter of the `udpring quic ...` line.
fn quic_counter(f: &Finished, name: &str) -> u64 {
    f.stdout
        .lines()
        .find(|l| l.starts_with("udpring quic "))
        .and_then(|l| {
            l.split_whitespace()
                .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{name} missing:\n{}", f.stdout))
}

/// Runs the futures concurrently and collects their outputs in order.
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let mut pinned: Vec<std::pin::Pin<Box<F>>> = futures.map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = pinned.iter().map(|_| None).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, f) in pinned.iter_mut().enumerate() {
            if out[i].is_none() {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => out[i] = Some(v),
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    out.into_iter().map(|o| o.expect("ready")).collect()
}
