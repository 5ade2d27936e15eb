//! The QUIC interop runner's endpoint, `interop/run_endpoint.sh`, run the way the runner runs
//! it (`TESTCASE`, certificates in `CERTS`, files in `WWW`, `SSLKEYLOGFILE`, `QLOGDIR`; the
//! paths are environment variables here since there is no Docker) against aioquic's client
//! playing the runner's side of each case (`interop/client.py`). A case the endpoint cannot
//! serve must exit 127 with a reason. The fast cases run in `make test`; every case runs in
//! `make interop` (CI calls it).
#![cfg(feature = "quic")]

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use crate::common::*;

/// The files the client downloads: several sizes, so a transfer needs flow-control updates.
const FILES: [(&str, usize); 3] = [("large", 1 << 20), ("small", 3_000), ("medium", 300_000)];

fn repo() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
}

/// A Python with aioquic: `UDPRING_AIOQUIC_PYTHON`, the CI's venv under target/, or python3.
fn aioquic_python() -> Option<PathBuf> {
    let candidates = [
        std::env::var_os("UDPRING_AIOQUIC_PYTHON").map(PathBuf::from),
        Some(repo().join("target/aioquic/bin/python")),
        Some("python3".into()),
    ];
    candidates.into_iter().flatten().find(|python| {
        Command::new(python)
            .args(["-c", "import aioquic, cryptography"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// What one run needs: certificates as the runner's certs.sh makes them (one with a chain of
/// nine for amplificationlimit), the files to serve, a directory per case.
struct Lab {
    python: PathBuf,
    dir: PathBuf,
}

impl Lab {
    fn new(tag: &str) -> Option<Lab> {
        if !kernel_supports_udpring() {
            return None;
        }
        let Some(python) = aioquic_python() else {
            skip_or_fail(
                "aioquic not installed (pip install aioquic, or set UDPRING_AIOQUIC_PYTHON)",
            );
            return None;
        };
        let dir =
            std::env::temp_dir().join(format!("udpring-interop-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("www")).unwrap();
        for (n, (name, len)) in FILES.iter().enumerate() {
            std::fs::write(
                dir.join("www").join(name),
                crate::common::quic::pattern(n, *len),
            )
            .unwrap();
        }
        let lab = Lab { python, dir };
        for (certs, chain) in [("certs", "1"), ("certs9", "9")] {
            let out = Command::new(&lab.python)
                .arg(repo().join("interop/client.py"))
                .arg("certs")
                .arg(lab.dir.join(certs))
                .args(["--chain", chain])
                .output()
                .expect("python runs");
            assert!(
                out.status.success(),
                "certs: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Some(lab)
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// How a case ended.
#[derive(Debug)]
enum Outcome {
    /// The client's checks passed and the downloads equal the served files.
    Passed,
    /// The endpoint exited 127; its last line says why.
    Unsupported(String),
}

/// The endpoint started for `case`: the script's process (udpring once it `exec`s).
struct Endpoint {
    child: Child,
    addr: String,
}

/// Starts `interop/run_endpoint.sh` for `case` on `bind`; `Err` with the exit status and the
/// script's last stderr line when it exits before listening. `netns` runs it in a new
/// network namespace (`unshare --net`, loopback up).
fn start_endpoint(
    lab: &Lab,
    case: &str,
    bind: &str,
    netns: bool,
) -> Result<Endpoint, (i32, String)> {
    let certs = if case == "amplificationlimit" {
        "certs9"
    } else {
        "certs"
    };
    let script = repo().join("interop/run_endpoint.sh");
    let mut cmd = if netns {
        let mut c = Command::new("unshare");
        c.args([
            "--net",
            "--",
            "bash",
            "-c",
            "ip link set lo up && exec bash \"$0\"",
        ])
        .arg(&script);
        c
    } else {
        let mut c = Command::new("bash");
        c.arg(&script);
        c
    };
    let case_dir = lab.dir.join(case);
    std::fs::create_dir_all(&case_dir).unwrap();
    let stderr = std::fs::File::create(case_dir.join("server.err")).unwrap();
    let mut child = cmd
        .env("UDPRING", env!("CARGO_BIN_EXE_udpring"))
        .env("ROLE", "server")
        .env("TESTCASE", case)
        .env("CERTS", lab.dir.join(certs))
        .env("WWW", lab.dir.join("www"))
        .env("BIND", bind)
        .env("SETUP", case_dir.join("no-setup.sh"))
        .env("SSLKEYLOGFILE", case_dir.join("keys.log"))
        .env("QLOGDIR", case_dir.join("qlog"))
        .env("RUST_LOG", "warn")
        .stdout(Stdio::piped())
        .stderr(stderr)
        .spawn()
        .expect("bash starts");
    let stdout = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout);
        let mut line = String::new();
        while lines.read_line(&mut line).is_ok_and(|n| n > 0) {
            if let Some(addr) = line.trim().strip_prefix("udpring listening on ") {
                let _ = tx.send(Some(addr.to_string()));
                // Keep reading so the server never blocks on a full pipe.
                let mut sink = String::new();
                while lines.read_line(&mut sink).is_ok_and(|n| n > 0) {
                    sink.clear();
                }
                return;
            }
            line.clear();
        }
        let _ = tx.send(None);
    });
    match rx.recv_timeout(Duration::from_secs(30)) {
        Ok(Some(addr)) => Ok(Endpoint { child, addr }),
        Ok(None) => {
            let status = child.wait().expect("wait");
            let err = std::fs::read_to_string(case_dir.join("server.err")).unwrap_or_default();
            let last = err.lines().rfind(|l| l.starts_with("run_endpoint:"));
            Err((
                status.code().unwrap_or(-1),
                last.unwrap_or(&err).to_string(),
            ))
        }
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{case}: the endpoint neither listened nor exited within 30 s");
        }
    }
}

/// Runs `case`: the endpoint, aioquic's client against it (in the endpoint's namespace when
/// `netns`), the downloads compared, the TLS key log and QLOGDIR checked, SIGTERM.
fn run_case(lab: &Lab, case: &str, netns: bool) -> Outcome {
    let bind = if case == "ipv6" {
        "[::1]:0"
    } else {
        "127.0.0.1:0"
    };
    let endpoint = match start_endpoint(lab, case, bind, netns) {
        Ok(e) => e,
        Err((127, reason)) => return Outcome::Unsupported(reason),
        Err((code, reason)) => panic!("{case}: the endpoint exited {code}: {reason}"),
    };
    let case_dir = lab.dir.join(case);
    let downloads = case_dir.join("downloads");
    std::fs::create_dir_all(&downloads).unwrap();
    let mut client = if netns {
        let mut c = Command::new("nsenter");
        c.arg(format!("--net=/proc/{}/ns/net", endpoint.child.id()))
            .arg("--")
            .arg(&lab.python);
        c
    } else {
        Command::new(&lab.python)
    };
    let out = client
        .arg(repo().join("interop/client.py"))
        .arg(case)
        .args(["--addr", &endpoint.addr, "--timeout", "30"])
        .arg("--downloads")
        .arg(&downloads)
        .arg("--www")
        .arg(lab.dir.join("www"))
        .args(FILES.iter().map(|(name, _)| *name))
        .output()
        .expect("python runs");
    let mut child = endpoint.child;
    // SAFETY: kill(2) on our own child's pid, which has not been waited for yet.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().expect("wait");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "{case}: aioquic's checks failed:\n{said}"
    );
    assert!(
        status.success(),
        "{case}: the endpoint exited {status} on SIGTERM"
    );
    for (name, len) in FILES {
        let got = std::fs::read(downloads.join(name)).unwrap_or_default();
        let want = std::fs::read(lab.dir.join("www").join(name)).unwrap();
        assert!(
            got == want,
            "{case}: {name}: {} B downloaded of {len}, not the same bytes",
            got.len()
        );
    }
    let keys = std::fs::read_to_string(case_dir.join("keys.log")).unwrap_or_default();
    for label in [
        "CLIENT_HANDSHAKE_TRAFFIC_SECRET",
        "SERVER_HANDSHAKE_TRAFFIC_SECRET",
        "CLIENT_TRAFFIC_SECRET_0",
        "SERVER_TRAFFIC_SECRET_0",
    ] {
        assert!(
            keys.lines()
                .any(|l| l.starts_with(label) && l.split(' ').count() == 3),
            "{case}: SSLKEYLOGFILE has no {label} line:\n{keys}"
        );
    }
    assert!(case_dir.join("qlog").is_dir(), "{case}: QLOGDIR made");
    Outcome::Passed
}

/// The cases the endpoint may decline, and what its reason must name.
fn declined(case: &str, outcome: &Outcome) {
    match (case, outcome) {
        ("v2", Outcome::Unsupported(why)) => {
            assert!(
                why.contains("quinn-proto"),
                "v2's reason names quinn-proto: {why}"
            )
        }
        ("v2", Outcome::Passed) => panic!("v2 cannot pass: quinn-proto has no QUIC v2"),
        (_, Outcome::Unsupported(why)) => panic!("{case}: exit 127: {why}"),
        (_, Outcome::Passed) => {}
    }
}

/// Whether this process may make network namespaces (root), else why not.
fn netns_possible() -> Result<(), String> {
    // SAFETY: geteuid(2) has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        return Err("rebind-addr runs in a network namespace (unshare --net): needs root".into());
    }
    let ok = Command::new("unshare")
        .args(["--net", "--", "ip", "link", "set", "lo", "up"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if ok {
        Ok(())
    } else {
        Err("rebind-addr: `unshare --net ip link set lo up` failed (util-linux, iproute2)".into())
    }
}

/// The cases quick enough for `make test` (about 3 s): a plain handshake, Retry, 0-RTT,
/// HTTP/3 and v2's 127.
#[test]
fn the_endpoint_serves_the_quick_cases() {
    let Some(lab) = Lab::new("quick") else { return };
    for case in ["handshake", "retry", "zerortt", "http3", "v2"] {
        let outcome = run_case(&lab, case, false);
        eprintln!("interop {case}: {outcome:?}");
        declined(case, &outcome);
    }
}

/// Every case issue 15 lists, one after another (about 15 s with a debug build):
/// rebind-addr in a network namespace, where the client moves between loopback addresses.
#[test]
#[ignore = "interop: make interop"]
fn the_endpoint_serves_every_case() {
    let Some(lab) = Lab::new("all") else { return };
    let mut table = Vec::new();
    for case in [
        "handshake",
        "transfer",
        "retry",
        "resumption",
        "zerortt",
        "http3",
        "multiconnect",
        "chacha20",
        "keyupdate",
        "ecn",
        "amplificationlimit",
        "rebind-port",
        "rebind-addr",
        "ipv6",
        "v2",
    ] {
        if case == "rebind-addr" {
            if let Err(why) = netns_possible() {
                skip_or_fail(&why);
                table.push(format!("| {case} | skipped: {why} |"));
                continue;
            }
        }
        let outcome = run_case(&lab, case, case == "rebind-addr");
        declined(case, &outcome);
        table.push(match outcome {
            Outcome::Passed => format!("| {case} | passed |"),
            Outcome::Unsupported(why) => format!("| {case} | 127: {why} |"),
        });
    }
    eprintln!("| case | result |\n| --- | --- |\n{}", table.join("\n"));
}
