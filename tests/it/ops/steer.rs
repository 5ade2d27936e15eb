//! CPU steering (`--steer cpu`), also across a takeover.

use std::net::{SocketAddr, UdpSocket};

use crate::common::*;
use crate::ops::process::*;

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET takes a CPU below CPU_SETSIZE (from the
    // allowed list); sched_setaffinity reads the live local set of the size passed.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        assert_eq!(
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set),
            0
        );
    }
}

fn allowed_cpus() -> Vec<usize> {
    // SAFETY: cpu_set_t is plain data; sched_getaffinity fills the live local of the size
    // passed; CPU_ISSET reads it for CPUs below CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        assert_eq!(
            libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut set),
            0
        );
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

#[test]
fn steer_cpu_serves_each_client_on_the_worker_pinned_to_its_cpu() {
    if !kernel_supports_udpring() {
        return;
    }
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        skip_or_fail("--steer cpu needs at least 2 CPUs to show anything");
        return;
    }
    let server = start(
        udpring::ServerConfig {
            pin_cpus: true,
            steer: udpring::config::Steer::Cpu,
            ..config("127.0.0.1:0", cpus.len())
        },
        |_| udpring::apps::Echo,
    );
    let addr = server.local_addr();
    let per_client = 200u64;
    // Worker i is pinned to cpus[i] and is group index i; a client on CPU c is received on
    // CPU c (loopback runs the receive path on the sender's CPU).
    for (worker, &cpu) in cpus.iter().enumerate().take(2).rev() {
        let before = server.worker_counters();
        std::thread::spawn(move || {
            pin_to(cpu);
            // Several source ports: the kernel's hash alone would spread them over workers.
            let clients: Vec<UdpSocket> = (0..8).map(|_| client_for(addr)).collect();
            for i in 0..per_client {
                let client = &clients[i as usize % clients.len()];
                assert!(
                    round_trip(client, addr, &i.to_le_bytes()).is_some(),
                    "answered"
                );
            }
        })
        .join()
        .expect("client thread");
        let after = server.worker_counters();
        let got: Vec<u64> = after
            .iter()
            .zip(&before)
            .map(|(a, b)| a.rx_datagrams - b.rx_datagrams)
            .collect();
        assert_eq!(
            got[worker], per_client,
            "client on CPU {cpu}: per-worker datagrams {got:?}"
        );
    }
    server.shutdown().expect("shutdown");
}

#[test]
fn steer_cpu_without_pinning_is_refused() {
    let out = udpring()
        .args(["serve", "--bind", "127.0.0.1:0", "--steer", "cpu"])
        .output()
        .expect("runs");
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("--steer cpu needs --pin-cpus"));
}

/// The `per_worker_rx=[a, b, ...]` of a `final total` log line.
fn per_worker_rx(f: &Finished) -> Vec<u64> {
    let list = f
        .stderr
        .split("per_worker_rx=[")
        .last()
        .and_then(|s| s.split(']').next())
        .unwrap_or_else(|| panic!("no per_worker_rx:\n{}", f.stderr));
    list.split(", ")
        .map(|n| n.parse().expect("count"))
        .collect()
}

/// Sends `count` requests from 16 sockets on a thread pinned to `cpu`, each answered.
fn requests_from_cpu(addr: SocketAddr, cpu: usize, count: u64) {
    std::thread::spawn(move || {
        pin_to(cpu);
        let clients: Vec<UdpSocket> = (0..16).map(|_| client_for(addr)).collect();
        for i in 0..count {
            let client = &clients[i as usize % clients.len()];
            assert!(round_trip(client, addr, &i.to_le_bytes()).is_some());
        }
    })
    .join()
    .expect("client thread");
}

/// The program belongs to the socket group, which a takeover hands over: a successor with
/// `--steer cpu` attaches its own; one without it removes the predecessor's.
#[test]
fn steering_follows_the_takeover() {
    if !kernel_supports_udpring() {
        return;
    }
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        skip_or_fail("--steer cpu needs at least 2 CPUs to show anything");
        return;
    }
    let workers = cpus.len().to_string();
    let steered = ["--workers", &workers, "--pin-cpus", "--steer", "cpu"];
    let first = serve(&[&["--bind", "127.0.0.1:0"], &steered[..]].concat());
    let addr = first.addr;
    let takeover = |extra: &[&str]| {
        let mut cmd = udpring();
        cmd.args(["serve", "--bind", &addr.to_string(), "--takeover"])
            .args(extra);
        spawn_serving(cmd)
    };
    let second = takeover(&steered);
    assert_exit_0(&first.finish(WAIT), "first");
    requests_from_cpu(addr, cpus[1], 100);
    let third = takeover(&["--workers", &workers]);
    let f2 = second.finish(WAIT);
    assert_exit_0(&f2, "second");
    let rx = per_worker_rx(&f2);
    assert_eq!(
        rx[1], 100,
        "steered to the worker on CPU {}: {rx:?}",
        cpus[1]
    );
    requests_from_cpu(addr, cpus[1], 100);
    let f3 = third.term();
    assert_exit_0(&f3, "third");
    let rx = per_worker_rx(&f3);
    // 16 source ports hashed over the workers: all on one worker has odds of 2 in 65,536.
    assert!(
        rx.iter().filter(|&&n| n > 0).count() > 1,
        "without --steer the kernel's hash spreads the sockets: {rx:?}"
    );
}
