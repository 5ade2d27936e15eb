//! `udpring load --gso`: clients that send GSO trains and read replies with UDP_GRO, against a
//! real `udpring serve`, count every request and reply exactly as without `--gso`; the
//! option's limits are refused with a clear message; a train the kernel refuses ends the run
//! with one line instead of a silent fallback.

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// Every wait here is bounded by this.
const WAIT: Duration = Duration::from_secs(30);

fn udpring() -> Command {
    Command::new(env!("CARGO_BIN_EXE_udpring"))
}

/// `false` (after saying why) when the kernel lacks what `udpring serve` needs; under
/// `CI=true` a missing feature fails the test instead, as the CI kernel has them all.
fn kernel_supports_udpring() -> bool {
    match udpring::kernel::Features::probe().check_required() {
        Ok(()) => true,
        Err(reason) => {
            assert!(
                std::env::var("CI").map_or(true, |v| v != "true"),
                "CI=true and a required kernel feature is missing: {reason}"
            );
            eprintln!("skipped: {reason}");
            false
        }
    }
}

/// A `udpring serve` child, killed when dropped (also when a test fails).
struct Server {
    child: Child,
    addr: SocketAddr,
}

impl Server {
    fn start(args: &[&str]) -> Server {
        let mut child = udpring()
            .args(["serve", "--bind", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("udpring serve starts");
        let stdout = child.stdout.take().expect("stdout is piped");
        let mut lines = BufReader::new(stdout);
        let mut line = String::new();
        // The server prints this line once it is ready, or exits (EOF) on a start-up error.
        lines.read_line(&mut line).expect("listening line");
        let addr = line
            .trim()
            .strip_prefix("udpring listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"))
            .parse()
            .expect("the listening address parses");
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || {
            let _ = std::io::copy(&mut lines, &mut std::io::sink());
        });
        Server { child, addr }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs `udpring load ARGS` to completion (bounded by [`WAIT`]).
fn load(args: &[&str]) -> Output {
    let mut child = udpring()
        .arg("load")
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("udpring load starts");
    let deadline = Instant::now() + WAIT;
    while child.try_wait().expect("try_wait").is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!("udpring load {args:?} still running after {WAIT:?}");
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    child.wait_with_output().expect("load output")
}

/// The number after `"name":` in the report's JSON object.
fn field(json: &str, name: &str) -> u64 {
    let key = format!("\"{name}\":");
    let start = json
        .find(&key)
        .unwrap_or_else(|| panic!("no {name} in {json}"))
        + key.len();
    let digits: String = json[start..]
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits
        .parse()
        .unwrap_or_else(|_| panic!("{name} is not a count in {json}"))
}

#[test]
fn gso_trains_against_udpring_serve_count_exactly() {
    if !kernel_supports_udpring() {
        return;
    }
    let server = Server::start(&["--workers", "1", "--app", "echo"]);
    let target = server.addr.to_string();
    // A window that is not a multiple of 16 also sends shorter last trains. The long timeout
    // keeps a slow shared machine from resending (a resend's second reply is a stray).
    let out = load(&[
        "--target",
        &target,
        "--gso",
        "16",
        "--clients",
        "4",
        "--window",
        "40",
        "--size",
        "200",
        "--requests",
        "20000",
        "--timeout",
        "2s",
        "--settle",
        "--quiet",
        "--json",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{}\n{stdout}{stderr}", out.status);
    let json = stdout.trim();
    assert_eq!(field(json, "gso"), 16, "{json}");
    assert_eq!(field(json, "sent"), 20_000, "{json}");
    assert_eq!(field(json, "answered"), 20_000, "{json}");
    assert_eq!(field(json, "given_up"), 0, "{json}");
    assert_eq!(field(json, "outstanding"), 0, "{json}");
    assert_eq!(field(json, "send_errors"), 0, "{json}");
    assert_eq!(field(json, "recv_errors"), 0, "{json}");
    // Every reply split out of a coalesced receive matched exactly one request: nothing left
    // over but the second replies of resends, if any.
    assert!(
        field(json, "stray") <= field(json, "retransmitted"),
        "{json}"
    );
    assert!(json.contains("\"invariant_ok\":true"), "{json}");
}

#[test]
fn gso_limits_are_refused_with_a_clear_message() {
    // Nothing is sent: the arguments are checked before any socket opens.
    let target = "127.0.0.1:9";
    let cases: [(&[&str], &str); 3] = [
        (&["--gso", "65"], "65 is not in 1..=64"),
        (&["--gso", "0"], "0 is not in 1..=64"),
        (
            &["--gso", "64", "--size", "1024"],
            "a UDP GSO train carries at most 65507 bytes",
        ),
    ];
    for (args, want) in cases {
        let out = load(&[&["--target", target, "--requests", "1"], args].concat());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} was accepted");
        assert!(stderr.contains(want), "{args:?}: {stderr}");
    }
    let help = udpring()
        .args(["load", "--help"])
        .output()
        .expect("udpring load --help");
    let help = String::from_utf8_lossy(&help.stdout);
    assert!(
        help.contains("--gso <N>") && help.contains("UDP_SEGMENT") && help.contains("UDP_GRO"),
        "{help}"
    );
}

/// Whether `tool` is on the PATH.
fn have(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// In a private network namespace whose loopback MTU is 1,000 bytes, 1,200-byte segments
/// cannot leave (a GSO segment is never fragmented): the first train is refused and the run
/// ends at once with one line naming UDP GSO and the MTU, not with 100% loss.
#[test]
fn a_refused_first_train_ends_the_run_with_one_line() {
    // SAFETY: geteuid has no preconditions and cannot fail.
    let root = unsafe { libc::geteuid() } == 0;
    // Root alone is not enough in some containers: try the namespace once.
    let can_unshare = root
        && have("ip")
        && Command::new("unshare")
            .args(["-n", "true"])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
    if !can_unshare {
        assert!(
            std::env::var("CI").map_or(true, |v| v != "true"),
            "CI=true but this test needs root, unshare -n and ip"
        );
        eprintln!("skipped: needs root, `unshare -n` and `ip` (a private network namespace)");
        return;
    }
    let script = format!(
        "ip link set lo up && ip link set lo mtu 1000 && exec {} load --target 127.0.0.1:9 \
         --gso 4 --size 1200 --requests 100 --quiet",
        env!("CARGO_BIN_EXE_udpring")
    );
    let started = Instant::now();
    let out = Command::new("unshare")
        .args(["-n", "sh", "-c", &script])
        .output()
        .expect("unshare runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.trim().lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("UDP GSO") && stderr.contains("MTU"),
        "{stderr}"
    );
    assert!(out.stdout.is_empty(), "no report after a refusal");
    assert!(started.elapsed() < WAIT);
}
