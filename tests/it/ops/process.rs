//! Running `udpring serve` as a child process and reading what it reports.

use std::io::{BufRead, BufReader, Read};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::common::*;

pub fn udpring() -> Command {
    Command::new(env!("CARGO_BIN_EXE_udpring"))
}

/// A running `udpring serve`, its stdout after the `listening` line and its stderr read by
/// threads (so it never blocks on a full pipe).
pub struct Proc {
    pub child: Child,
    pub addr: SocketAddr,
    stdout: JoinHandle<String>,
    stderr: JoinHandle<String>,
}

/// What a finished `udpring serve` left.
pub struct Finished {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

pub fn drain(mut r: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut s = String::new();
        let _ = r.read_to_string(&mut s);
        s
    })
}

/// Spawns `cmd` (a `udpring serve`) and waits for its `udpring listening on ADDR` line.
pub fn spawn_serving(mut cmd: Command) -> Proc {
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("udpring starts");
    let stderr = drain(child.stderr.take().expect("stderr piped"));
    let mut lines = BufReader::new(child.stdout.take().expect("stdout piped"));
    let mut line = String::new();
    // The read ends when the server prints the line or exits (EOF): no unbounded wait.
    lines.read_line(&mut line).expect("listening line");
    let Some(addr) = line.trim().strip_prefix("udpring listening on ") else {
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "no listening line: {line:?}\n{}",
            stderr.join().unwrap_or_default()
        );
    };
    Proc {
        addr: addr.parse().expect("address"),
        child,
        stdout: drain(lines),
        stderr,
    }
}

pub fn serve(args: &[&str]) -> Proc {
    let mut cmd = udpring();
    cmd.arg("serve").args(args);
    spawn_serving(cmd)
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `limit` for the process to exit on its own.
    pub fn finish(mut self, limit: Duration) -> Finished {
        let mut status = None;
        wait_until(limit, || {
            status = self.child.try_wait().expect("try_wait");
            status.is_some()
        });
        let Some(status) = status else {
            let _ = self.child.kill();
            let _ = self.child.wait();
            panic!(
                "udpring pid {} did not exit within {limit:?}:\n{}",
                self.child.id(),
                self.stderr.join().unwrap_or_default()
            );
        };
        Finished {
            status,
            stdout: self.stdout.join().unwrap_or_default(),
            stderr: self.stderr.join().unwrap_or_default(),
        }
    }

    /// SIGTERM, then [`Proc::finish`].
    pub fn term(self) -> Finished {
        // SAFETY: kill(2) on the pid of a child we spawned and have not reaped.
        let rc = unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        assert_eq!(rc, 0);
        self.finish(WAIT)
    }
}

/// A counter from the `udpring final rx=... opened=...` line.
pub fn final_counter(f: &Finished, name: &str) -> u64 {
    let line = f
        .stdout
        .lines()
        .find(|l| l.starts_with("udpring final "))
        .unwrap_or_else(|| panic!("no final line:\n{}\n{}", f.stdout, f.stderr));
    line.split_whitespace()
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")))
        .map_or(0, |v| v.parse().expect("counter"))
}

pub fn assert_exit_0(f: &Finished, who: &str) {
    assert!(f.status.success(), "{who}: {:?}\n{}", f.status, f.stderr);
}

/// A field of the `udpring load --json` report.
pub fn json_u64(json: &str, key: &str) -> u64 {
    let at = json
        .find(&format!("\"{key}\":"))
        .unwrap_or_else(|| panic!("{key} missing in {json}"));
    json[at + key.len() + 3..]
        .split([',', '}'])
        .next()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("{key} unreadable in {json}"))
}
