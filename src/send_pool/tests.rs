//! Unit tests of the slot life cycle (see `flush.rs` for the train tests).

use super::test_util::*;
use super::*;
use crate::op::OpKind;

#[test]
fn complete_checks_generation_and_frees() {
    let mut p = pool(2, 16);
    queue_bytes(&mut p, "127.0.0.1:5", b"x").unwrap();
    let mut sink = FailingSink {
        room: 8,
        accepted: Vec::new(),
    };
    assert_eq!(p.flush(&mut sink).unwrap(), 1);
    let ud = sink.accepted[0];
    assert_eq!(p.in_flight(), 1);
    assert_eq!(p.complete(ud), Some(Completed { segments: 1 }));
    assert_eq!(p.free_slots(), 2);
    // The same completion again is stale: the slot moved to the next generation.
    assert_eq!(p.complete(ud), None);
    assert_eq!(p.complete(UserData::new(OpKind::Send, 0, 99)), None);
    free_list_is_a_set(&p);
}

#[test]
#[should_panic(expected = "released while Free")]
fn releasing_a_free_slot_is_caught() {
    let mut p = pool(2, 16);
    p.release(0);
}

#[test]
fn queue_rejects_overlong_and_wrong_family_and_frees_the_slot() {
    let mut p = pool(1, 8);
    assert_eq!(
        p.queue(dest("[::1]:5"), |_| 0),
        Err(SendError::AddressFamily)
    );
    assert_eq!(p.queue(dest("127.0.0.1:5"), |_| 9), Err(SendError::TooLong));
    assert_eq!(p.free_slots(), 1);
    assert_eq!(queue_bytes(&mut p, "127.0.0.1:5", b"abc"), Ok(3));
    assert_eq!(p.free_slots(), 0);
    assert_eq!(
        queue_bytes(&mut p, "127.0.0.1:5", b"x"),
        Err(SendError::PoolExhausted)
    );
}

#[test]
fn a_slot_reused_for_another_peer_or_a_connected_socket_is_re_encoded() {
    let mut p = pool(1, 16);
    let mut sink = FailingSink {
        room: 8,
        accepted: Vec::new(),
    };
    let mut send = |p: &mut SendPool, d: Dest| {
        p.queue_bytes(d, b"x").unwrap();
        p.flush(&mut sink).unwrap();
        let ud = *sink.accepted.last().unwrap();
        p.complete(ud).unwrap();
        let h = p.headers_mut(0);
        (h.msg.msg_namelen, h.name)
    };
    let (len_a, name_a) = send(&mut p, dest("127.0.0.1:5"));
    assert_eq!(len_a, 16);
    let mut connected = dest("127.0.0.1:5");
    connected.connected = true;
    assert_eq!(send(&mut p, connected).0, 0);
    assert_eq!(send(&mut p, dest("127.0.0.1:5")), (len_a, name_a));
    let (_, name_b) = send(&mut p, dest("127.0.0.1:6"));
    assert_ne!(name_a, name_b);
}

/// Issue 14, defect 7: `complete` freed a slot for a `UserData` of any kind that happened to
/// carry the slot's index and generation; the slot then went back to the free list while the
/// kernel still read it.
#[test]
fn complete_frees_only_what_the_slot_was_submitted_with() {
    let mut p = pool(2, 16);
    queue_bytes(&mut p, "127.0.0.1:5", b"x").unwrap();
    let mut sink = FailingSink {
        room: 8,
        accepted: Vec::new(),
    };
    p.flush(&mut sink).unwrap();
    let ud = sink.accepted[0];
    for kind in [
        OpKind::Recv,
        OpKind::SessionRecv,
        OpKind::Cancel,
        OpKind::Wake,
    ] {
        let foreign = UserData::new(kind, ud.generation, ud.slot);
        assert_eq!(p.complete(foreign), None, "{kind:?} names no send");
    }
    let older = UserData::new(OpKind::Send, ud.generation.wrapping_sub(1), ud.slot);
    assert_eq!(p.complete(older), None, "another generation");
    assert_eq!(
        (p.in_flight(), p.free_slots()),
        (1, 1),
        "still the kernel's"
    );
    assert_eq!(p.complete(ud), Some(Completed { segments: 1 }));
    free_list_is_a_set(&p);
}

/// Issue 14, defect 1: `count * slot_capacity` was not checked; an overflowed product
/// allocated too little and the slots' pointers and slices reached past it.
#[test]
fn sizes_are_checked_before_anything_is_allocated() {
    for (count, capacity) in [
        (2, 1 << 63),
        (usize::MAX, 2),
        (usize::MAX, usize::MAX),
        (MAX_SLOTS + 1, 1),
        (1, MAX_SLOT_CAPACITY + 1),
    ] {
        let err = SendPool::new(count, capacity, false, true)
            .err()
            .expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
        assert!(err.to_string().contains("at most"), "{err}");
    }
    let p = SendPool::new(4, MAX_SLOT_CAPACITY, false, true).expect("the largest slots");
    assert_eq!(p.slot_capacity(), MAX_SLOT_CAPACITY);
    assert!(
        SendPool::new(0, 0, false, false).is_ok(),
        "an empty pool is no danger"
    );
}
