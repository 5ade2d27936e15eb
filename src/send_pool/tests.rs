//! Unit tests of the slot life cycle (see `flush.rs` for the train tests).

use super::test_util::*;
use super::*;
use crate::handler::Reply;
use crate::op::OpKind;
use crate::stats::Stats;

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
    assert_eq!(
        p.complete(ud),
        Some(Completed {
            segments: 1,
            dest: dest("127.0.0.1:5")
        })
    );
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
    assert_eq!(p.complete(ud).map(|done| done.segments), Some(1));
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

/// Flushes what is queued and completes every entry, each with the result `result` picks for
/// its destination and size; returns each completion with what `gso_evidence` made of it, in
/// push order.
fn flush_and_complete(
    p: &mut SendPool,
    mut result: impl FnMut(&Completed) -> i32,
) -> Vec<(Completed, GsoEvidence)> {
    let mut sink = FailingSink {
        room: 128,
        accepted: Vec::new(),
    };
    p.flush(&mut sink).unwrap();
    sink.accepted
        .into_iter()
        .map(|ud| {
            let done = p.complete(ud).expect("a submitted head");
            (done, p.gso_evidence(&done, result(&done)))
        })
        .collect()
}

/// (destination port, segments) of each entry, in push order.
fn shape(done: &[(Completed, GsoEvidence)]) -> Vec<(u16, u16)> {
    done.iter()
        .map(|(d, _)| (d.dest.peer.port(), d.segments))
        .collect()
}

/// Issue 14, defect 7: `complete` freed whatever in-flight slot a `UserData` named with a
/// matching generation, also a member of a GSO train: the member and the rest of the train
/// went back to the free list while the kernel read them, and the head's own completion
/// later walked a chain through reused slots.
#[test]
fn a_completion_naming_a_member_of_a_train_is_refused() {
    let mut p = pool(8, 64);
    for _ in 0..3 {
        queue_bytes(&mut p, "127.0.0.1:5", b"abcd").unwrap();
    }
    let mut sink = FailingSink {
        room: 8,
        accepted: Vec::new(),
    };
    assert_eq!(p.flush(&mut sink).unwrap(), 1);
    let ud = sink.accepted[0];
    let mut members = Vec::new();
    let mut index = p.meta[ud.slot as usize].next;
    while index != NO_SLOT {
        members.push(index);
        index = p.meta[index as usize].next;
    }
    assert_eq!(members.len(), 2);
    for &m in &members {
        let forged = UserData::new(OpKind::Send, p.meta[m as usize].generation, m);
        assert_eq!(p.complete(forged), None, "slot {m} is a member, not a head");
    }
    assert_eq!(
        (p.in_flight(), p.free_slots()),
        (1, 5),
        "the whole train is still the kernel's"
    );
    assert_eq!(p.complete(ud).map(|done| done.segments), Some(3));
    assert_eq!(p.free_slots(), 8);
    free_list_is_a_set(&p);
}

/// Issue 14, defect 2: without GSO a ready-made train is spread over one slot per segment,
/// and a reply over the anti-amplification budget withdrew only the last slot: nine of ten
/// 1,200-byte segments went out while the handler was told `AmplificationLimit`.
#[test]
fn without_gso_a_train_over_the_budget_is_withdrawn_whole() {
    for gso in [false, true] {
        let mut p = SendPool::new(16, 12_000, false, gso).unwrap();
        let mut stats = Stats::default();
        // A 1,200-byte datagram from an unvalidated peer, at the 3x factor.
        let mut budget = 3 * 1200;
        let peer: SocketAddr = "127.0.0.1:5".parse().unwrap();
        let train = SendOptions {
            segment_size: Some(1200),
            ..SendOptions::default()
        };
        {
            let mut reply = budgeted_reply(&mut p, &mut stats, &mut budget);
            let ten = reply.send_to_with(peer, train, |buf| {
                buf[..12_000].fill(0xAA);
                12_000
            });
            assert_eq!(ten, Err(SendError::AmplificationLimit), "gso {gso}");
            assert_eq!(reply.capacity(), 16, "gso {gso}: every slot back");
            // Three segments fit the budget exactly, and are charged whole.
            let three = reply.send_to_with(peer, train, |buf| {
                buf[..3600].fill(0xBB);
                3600
            });
            assert_eq!(three, Ok(()));
        }
        assert_eq!((budget, stats.amplification_limited), (0, 1));
        let mut out = Vec::new();
        // One slot holding the train with GSO, three without; its datagrams either way.
        p.take_queued(|_, bytes| out.push((bytes.len(), bytes[0])));
        assert_eq!(
            out,
            vec![(1200, 0xBB); 3],
            "gso {gso}: only the train within the budget"
        );
    }
}

/// Issue 14, defect 3: a `Reply` with no datagram to answer (timers, shutdown) took `send` to
/// `0.0.0.0:0`; two of them formed a train, the kernel said EINVAL, and the worker turned
/// GSO off for good. Now refused before a slot is taken, counted as `send_dropped`.
#[test]
fn a_reply_with_no_destination_is_refused_before_the_kernel_sees_it() {
    let mut p = pool(4, 64);
    let mut stats = Stats::default();
    {
        let mut reply = Reply::unaddressed(&mut p, &mut stats, 3);
        assert_eq!(reply.send(b"a"), Err(SendError::NoDestination));
        assert_eq!(reply.send(b"b"), Err(SendError::NoDestination));
        let fill = |buf: &mut [u8]| {
            buf[0] = 1;
            1
        };
        assert_eq!(reply.send_with(fill), Err(SendError::NoDestination));
        for peer in [
            "0.0.0.0:0",
            "127.0.0.1:0",
            "0.0.0.0:5",
            "[::]:5",
            "[::ffff:0.0.0.0]:5",
        ] {
            let peer: SocketAddr = peer.parse().unwrap();
            assert_eq!(
                reply.send_to(peer, b"c"),
                Err(SendError::NoDestination),
                "{peer}"
            );
            let options = SendOptions {
                segment_size: Some(1),
                ..SendOptions::default()
            };
            assert_eq!(
                reply.send_to_with(peer, options, fill),
                Err(SendError::NoDestination),
                "{peer}"
            );
        }
        assert_eq!(reply.capacity(), 4, "no slot taken");
        // An explicit destination still goes.
        assert_eq!(reply.send_to("127.0.0.1:5".parse().unwrap(), b"ok"), Ok(()));
    }
    assert_eq!(stats.send_dropped, 13);
    let done = flush_and_complete(&mut p, |_| 2);
    assert_eq!(
        shape(&done),
        vec![(5, 1)],
        "the kernel saw only the addressed reply"
    );
    assert!(p.gso());
}

/// Issue 14, defect 3: an EINVAL to a train (which a destination of its own can earn) turned
/// GSO off for every peer. Now trains stop to that destination only, and resume once a
/// datagram to it goes through.
#[test]
fn einval_stops_trains_to_that_destination_only_until_a_lone_datagram_confirms() {
    let mut p = pool(32, 64);
    let (a, b) = (dest("127.0.0.1:5"), dest("127.0.0.1:6"));
    let queue = |p: &mut SendPool, d: Dest, n: usize| {
        for _ in 0..n {
            p.queue_bytes(d, b"abcd").unwrap();
        }
    };
    let ok = |d: &Completed| 4 * i32::from(d.segments);
    queue(&mut p, a, 3);
    queue(&mut p, b, 3);
    let done = flush_and_complete(&mut p, |d| if d.dest == a { -libc::EINVAL } else { ok(d) });
    assert_eq!(shape(&done), vec![(5, 3), (6, 3)]);
    assert_eq!(done[0].1, GsoEvidence::DestinationHeld);
    assert_eq!(done[1].1, GsoEvidence::Nothing);
    assert!(p.gso(), "GSO stays on for everyone");

    // A is held: its replies, and a ready-made train to it, go one by one; B still trains.
    queue(&mut p, a, 2);
    queue(&mut p, b, 3);
    let ready_made = SendOptions {
        segment_size: Some(4),
        ..SendOptions::default()
    };
    p.queue_with(a, ready_made, |buf| {
        buf[..10].copy_from_slice(b"aaaabbbbcc");
        10
    })
    .unwrap();
    let mut first = true;
    let done = flush_and_complete(&mut p, |d| {
        // A's first lone datagram fails too: a lone datagram's error says nothing.
        if d.dest == a && std::mem::take(&mut first) {
            -libc::EINVAL
        } else {
            ok(d)
        }
    });
    assert_eq!(
        shape(&done),
        vec![(5, 1), (5, 1), (6, 3), (5, 1), (5, 1), (5, 1)]
    );
    let evidence: Vec<GsoEvidence> = done.iter().map(|(_, e)| *e).collect();
    assert_eq!(
        evidence,
        vec![
            GsoEvidence::Nothing,
            GsoEvidence::DestinationConfirmed,
            GsoEvidence::Nothing,
            GsoEvidence::Nothing,
            GsoEvidence::Nothing,
            GsoEvidence::Nothing,
        ]
    );

    // Confirmed: trains to A again.
    queue(&mut p, a, 3);
    let done = flush_and_complete(&mut p, ok);
    assert_eq!(shape(&done), vec![(5, 3)]);
    assert_eq!(p.free_slots(), 32);
    free_list_is_a_set(&p);
}

/// Issue 14, defect 3: EIO and EINVAL to a train were treated alike, and any error could be
/// taken for GSO's. Now only EIO to a train (the kernel or device cannot segment) turns GSO
/// off, at once; no other error, and no error to a lone datagram, touches it.
#[test]
fn eio_turns_gso_off_at_once_and_other_errors_never() {
    let mut p = pool(32, 64);
    let a = dest("127.0.0.1:5");
    let queue = |p: &mut SendPool, n: usize| {
        for _ in 0..n {
            p.queue_bytes(a, b"abcd").unwrap();
        }
    };
    for errno in [
        libc::ENOBUFS,
        libc::EPERM,
        libc::ECONNREFUSED,
        libc::EMSGSIZE,
        libc::EAGAIN,
        libc::ENETUNREACH,
    ] {
        queue(&mut p, 3);
        let done = flush_and_complete(&mut p, |_| -errno);
        assert_eq!(shape(&done), vec![(5, 3)], "errno {errno}: still a train");
        assert_eq!(done[0].1, GsoEvidence::Nothing, "errno {errno}");
        assert!(p.gso(), "errno {errno}");
    }
    for errno in [libc::EIO, libc::EINVAL] {
        queue(&mut p, 1);
        let done = flush_and_complete(&mut p, |_| -errno);
        assert_eq!(
            done[0].1,
            GsoEvidence::Nothing,
            "errno {errno} to a lone datagram"
        );
    }
    assert!(p.gso());
    // EINVAL to a train: that destination is held, GSO stays on; a datagram that goes
    // through lifts the hold.
    queue(&mut p, 3);
    let done = flush_and_complete(&mut p, |_| -libc::EINVAL);
    assert_eq!(done[0].1, GsoEvidence::DestinationHeld);
    assert!(p.gso(), "EINVAL never turns GSO off");
    queue(&mut p, 1);
    let done = flush_and_complete(&mut p, |_| 4);
    assert_eq!(done[0].1, GsoEvidence::DestinationConfirmed);
    // Two trains in flight when the first EIO comes: GSO goes off once.
    queue(&mut p, 3);
    p.queue_bytes(dest("127.0.0.1:6"), b"abcd").unwrap();
    p.queue_bytes(dest("127.0.0.1:6"), b"abcd").unwrap();
    let done = flush_and_complete(&mut p, |_| -libc::EIO);
    assert_eq!(shape(&done), vec![(5, 3), (6, 2)]);
    assert_eq!(
        (done[0].1, done[1].1),
        (GsoEvidence::Disabled, GsoEvidence::RefusedWhileOff)
    );
    assert!(!p.gso(), "off at once");
    queue(&mut p, 3);
    let done = flush_and_complete(&mut p, |_| 4);
    assert_eq!(shape(&done), vec![(5, 1); 3], "no trains any more");
    assert_eq!(p.free_slots(), 32);
}

/// Issue 14, defect 3 follow-up: where lone datagrams go through but trains never do (a
/// socket with `SO_NO_CHECK`, a path that drops GSO), a confirmation lifts the hold once; the
/// next refusal holds the destination for good, so it loses two trains, not one per
/// confirmation.
#[test]
fn a_destination_refused_again_after_a_confirmation_stays_held() {
    let mut p = pool(32, 64);
    let a = dest("127.0.0.1:5");
    let queue = |p: &mut SendPool, n: usize| {
        for _ in 0..n {
            p.queue_bytes(a, b"abcd").unwrap();
        }
    };
    // Trains refused, lone datagrams through.
    let kernel = |d: &Completed| {
        if d.segments > 1 {
            -libc::EINVAL
        } else {
            4
        }
    };
    let evidence = |done: &[(Completed, GsoEvidence)]| -> Vec<GsoEvidence> {
        done.iter().map(|(_, e)| *e).collect()
    };
    queue(&mut p, 3);
    let done = flush_and_complete(&mut p, kernel);
    assert_eq!(shape(&done), vec![(5, 3)]);
    assert_eq!(evidence(&done), vec![GsoEvidence::DestinationHeld]);
    queue(&mut p, 2);
    let done = flush_and_complete(&mut p, kernel);
    assert_eq!(shape(&done), vec![(5, 1), (5, 1)]);
    assert_eq!(
        evidence(&done),
        vec![GsoEvidence::DestinationConfirmed, GsoEvidence::Nothing]
    );
    // Tried again once, refused again: held from now on, whatever goes through.
    queue(&mut p, 3);
    let done = flush_and_complete(&mut p, kernel);
    assert_eq!(shape(&done), vec![(5, 3)]);
    assert_eq!(evidence(&done), vec![GsoEvidence::DestinationHeld]);
    for _ in 0..3 {
        queue(&mut p, 3);
        let done = flush_and_complete(&mut p, kernel);
        assert_eq!(shape(&done), vec![(5, 1), (5, 1), (5, 1)], "held for good");
        assert!(evidence(&done).iter().all(|e| *e == GsoEvidence::Nothing));
    }
    assert!(p.gso(), "GSO stays on for everyone else");
    assert_eq!(p.free_slots(), 32);
}

/// Issue 15: a transport stack asked for as many datagrams as a slot holds even where each
/// datagram of its train takes a slot of its own (GSO off, or the destination held), and the
/// pool then refused the train. `train_room` says how many fit now, for either case.
#[test]
fn train_room_counts_slots_where_trains_cannot_go() {
    let mut p = pool(8, 6000);
    let (a, b) = (dest("127.0.0.1:5"), dest("127.0.0.1:6"));
    assert_eq!(p.train_room(&a, 1500), 4, "GSO on: a slot's worth");
    assert_eq!(p.train_room(&a, 10), 64, "never more than a train may have");
    // EINVAL to a train to A: A is held, B is not.
    p.queue_bytes(a, b"abcd").unwrap();
    p.queue_bytes(a, b"abcd").unwrap();
    let done = flush_and_complete(&mut p, |_| -libc::EINVAL);
    assert_eq!(done[0].1, GsoEvidence::DestinationHeld);
    p.queue_bytes(b, b"abcd").unwrap();
    p.queue_bytes(b, b"abcd").unwrap();
    p.queue_bytes(b, b"abcd").unwrap();
    assert_eq!(
        p.train_room(&a, 1000),
        5,
        "held: a slot per datagram, five free"
    );
    assert_eq!(
        p.train_room(&a, 1500),
        4,
        "and never more than one slot holds"
    );
    assert_eq!(p.train_room(&b, 1500), 4, "B still trains");
    // What `train_room` allows is queued whole, and nothing more fits.
    let room = p.train_room(&a, 1000);
    let train = SendOptions {
        segment_size: Some(1000),
        ..SendOptions::default()
    };
    p.queue_with(a, train, |_| room * 1000)
        .expect("a train of train_room datagrams fits");
    assert_eq!(p.free_slots(), 0);
    assert_eq!(p.train_room(&a, 1000), 0);
    assert_eq!(p.train_room(&b, 1000), 0, "no slot, no room");
    p.cancel_all();
    p.disable_gso();
    assert_eq!(
        p.train_room(&b, 1000),
        6,
        "GSO off: a slot per datagram, and what one holds"
    );
    assert_eq!(p.train_room(&b, 1500), 4);
}
