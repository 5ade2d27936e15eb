//! Fault injection: runs `scripts/faults.sh` (udpring serve and udpring load in two network
//! namespaces, nftables dropping 5% and 20% of UDP datagrams in each direction) in a short
//! configuration: 2,000 requests per case, 500 ms idle timeout, three session modes (about
//! 15 s in all).
//!
//! Needs root, `ip` and `nft`. Without them the test prints `skipped: <reason>` and passes,
//! except under `CI=true`, where a missing prerequisite fails it. Stress: `make stress`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn missing_prerequisite() -> Option<String> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Some("not root (needs network namespaces and nftables)".into());
    }
    for tool in ["ip", "nft"] {
        if !have(tool) {
            return Some(format!(
                "`{tool}` not found (apt-get install iproute2 nftables)"
            ));
        }
    }
    None
}

#[test]
#[ignore = "stress: make stress"]
fn loss_in_namespaces_is_retransmitted_and_sessions_close() {
    if let Some(reason) = missing_prerequisite() {
        crate::common::skip_or_fail(&reason);
        return;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/faults.sh");
    let mut child = Command::new("bash")
        .arg(&script)
        .args(["5", "20"])
        .env("UDPRING", env!("CARGO_BIN_EXE_udpring"))
        .env("REQUESTS", "2000")
        .env("IDLE_MS", "500")
        .env("PORT", "9701")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("run scripts/faults.sh");
    // Bounded: the script normally takes ~15 s; its EXIT trap removes the namespaces even
    // when it is stopped with SIGTERM.
    let finished = crate::common::wait_until(Duration::from_secs(90), || {
        child.try_wait().expect("wait for faults.sh").is_some()
    });
    if !finished {
        // SAFETY: kill with a valid signal on our own child's PID.
        unsafe {
            libc::kill(child.id() as libc::pid_t, libc::SIGTERM);
        }
    }
    let out = child.wait_with_output().expect("faults.sh output");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    eprintln!("{stderr}");
    assert!(
        out.status.success(),
        "scripts/faults.sh failed ({}):\n{stdout}\n{stderr}",
        out.status
    );
    assert!(stdout.contains("all checks passed"), "{stdout}");
}
