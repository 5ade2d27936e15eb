//! `examples/quic_relay.rs` runs as a test: a custom app on the QUIC application API fans a
//! publisher's stream out to subscribers on one worker and across two (through `Remote`),
//! and every subscriber gets every byte.
#![cfg(feature = "quic")]

use crate::common::kernel_supports_udpring;

#[path = "../../examples/quic_relay.rs"]
mod relay_example;

#[test]
fn relay_example_fans_out_on_one_worker_and_across_workers() {
    if !kernel_supports_udpring() {
        return;
    }
    relay_example::main().expect("examples/quic_relay.rs");
}
