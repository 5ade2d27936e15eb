//! The library examples run as tests: each starts a server on 127.0.0.1:0, talks to it and
//! checks every answer, so `cargo run --example NAME` stays a self-test that CI exercises.

use crate::common::kernel_supports_udpring;

// Each example is compiled here as a module; its `main` is the test body.
#[path = "../../examples/deferred.rs"]
mod deferred;
#[path = "../../examples/dns.rs"]
mod dns;
#[path = "../../examples/sessions.rs"]
mod sessions;

#[test]
fn dns_example_answers_every_query() {
    if !kernel_supports_udpring() {
        return;
    }
    dns::main().expect("examples/dns.rs");
}

#[test]
fn sessions_example_serves_and_closes_each_peer() {
    if !kernel_supports_udpring() {
        return;
    }
    sessions::main().expect("examples/sessions.rs");
}

#[test]
fn deferred_example_answers_from_another_thread() {
    if !kernel_supports_udpring() {
        return;
    }
    deferred::main().expect("examples/deferred.rs");
}
