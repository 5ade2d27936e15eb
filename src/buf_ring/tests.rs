use super::*;

/// A ring for the tests below, or `None` (skipped) where io_uring is unavailable.
fn uring() -> Option<Ring> {
    match Ring::new(8, 16) {
        Ok(ring) => Some(ring),
        Err(e) => {
            assert!(std::env::var("CI").as_deref() != Ok("true"), "io_uring: {e}");
            eprintln!("skipped: io_uring unavailable ({e})");
            None
        }
    }
}

#[test]
fn ring_index_wraps_with_the_u16_tail() {
    assert_eq!(ring_index(0, 8), 0);
    assert_eq!(ring_index(7, 8), 7);
    assert_eq!(ring_index(8, 8), 0);
    assert_eq!(ring_index(u16::MAX, 8), 7);
    assert_eq!(ring_index(u16::MAX.wrapping_add(1), 8), 0);
    assert_eq!(ring_index(40_000, 32768), 40_000 - 32768);
}

#[test]
fn stride_avoids_4k_aliasing() {
    assert_eq!(buffer_stride(1), 64);
    assert_eq!(buffer_stride(64), 64);
    assert_eq!(buffer_stride(65), 128);
    assert_eq!(buffer_stride(4096), 4096 + 64);
    assert_eq!(buffer_stride(65_536), 65_536 + 64);
    assert!(buffer_stride(65_507 + 120) >= 65_507 + 120);
}

#[test]
fn take_read_recycle_accounting() {
    let mut ring = BufRing::new(4, 100, 0).unwrap();
    assert_eq!(ring.available(), 4);
    // SAFETY: not registered with any ring: no kernel writes these buffers.
    let (a, b) = unsafe { (ring.take(2, 1000).unwrap(), ring.take(3, 5).unwrap()) };
    assert_eq!(ring.available(), 2);
    assert_eq!(ring.bytes(&a).len(), 100, "clamped to the buffer length");
    assert_eq!(ring.bytes(&b).len(), 5);
    ring.recycle(b);
    ring.recycle(a);
    ring.publish();
    assert_eq!(ring.available(), 4);
    assert_eq!(ring.tail, 6);
    // SAFETY: as above.
    assert!(unsafe { ring.take(4, 1) }.is_none(), "id outside the ring");
    assert_eq!(ring.refused(), 0);
}

/// Issue 14, defect 7: a buffer id reported while it is lent was caught only by a debug
/// assertion; in release a second token for one buffer came out. Now refused everywhere.
#[test]
fn a_buffer_reported_twice_is_refused() {
    let mut ring = BufRing::new(4, 100, 0).unwrap();
    // SAFETY: not registered; the second `take` breaks the contract on purpose.
    let first = unsafe { ring.take(1, 10) }.expect("first report");
    // SAFETY: as above.
    assert!(unsafe { ring.take(1, 10) }.is_none(), "second token refused");
    assert_eq!(ring.available(), 3, "one buffer out, not two");
    assert_eq!(ring.refused(), 1);
    ring.recycle(first);
    assert_eq!((ring.available(), ring.tail), (4, 5));
}

/// Issue 14, defect 7: a second recycle of one buffer id (a duplicate token, which only
/// this test can forge) put the id in the ring twice in release builds.
#[test]
fn a_buffer_recycled_twice_is_refused() {
    let mut ring = BufRing::new(4, 100, 0).unwrap();
    // SAFETY: not registered.
    let buf = unsafe { ring.take(2, 10) }.unwrap();
    let forged = RecvBuf {
        ring: buf.ring,
        bid: buf.bid,
        len: buf.len,
    };
    ring.recycle(buf);
    ring.recycle(forged);
    assert_eq!(ring.tail, 5, "the id went back into the ring once");
    assert_eq!(ring.available(), 4);
    assert_eq!(ring.refused(), 1);
}

/// Issue 14, defect 7: a token named no ring, so another ring read and recycled it (its
/// bounds checks were debug-only). Now it reads as empty and is refused.
#[test]
fn a_token_of_another_ring_is_refused() {
    let mut small = BufRing::new(2, 100, 0).unwrap();
    let mut other = BufRing::new(8, 100, 0).unwrap();
    // SAFETY: neither ring is registered.
    let (ours, theirs) = unsafe { (small.take(1, 50).unwrap(), other.take(5, 50).unwrap()) };
    assert!(small.bytes(&theirs).is_empty(), "id 5 is outside the small ring");
    assert!(other.bytes(&ours).is_empty(), "id 1 is free in the other ring");
    other.recycle(ours);
    assert_eq!((other.available(), other.tail), (7, 8), "not put in the ring");
    small.recycle(theirs);
    assert_eq!((small.available(), small.tail), (1, 2));
    assert_eq!((small.refused(), other.refused()), (1, 1));
}

/// Issue 14, defect 7: refused tokens were only logged (when the worker's `Io` dropped),
/// never counted where the counters are read. Every kind of refusal now reaches
/// `Stats::buffer_tokens_refused`, its export (`fields`) and the summary line.
#[test]
fn refused_tokens_are_counted_in_the_worker_counters() {
    let mut ring = BufRing::new(4, 100, 0).unwrap();
    let mut other = BufRing::new(4, 100, 0).unwrap();
    let mut stats = Stats::default();
    ring.count_refused(&mut stats);
    assert_eq!(stats.buffer_tokens_refused, 0);
    assert!(!stats.summary().to_string().contains("buffer_tokens_refused"));
    // SAFETY: neither ring is registered; the second `take` breaks the contract on purpose.
    let buf = unsafe { ring.take(1, 10) }.unwrap();
    // SAFETY: as above.
    assert!(unsafe { ring.take(1, 10) }.is_none(), "reported twice");
    let forged = RecvBuf {
        ring: buf.ring,
        bid: buf.bid,
        len: buf.len,
    };
    ring.recycle(buf);
    ring.recycle(forged);
    // SAFETY: as above.
    let theirs = unsafe { other.take(2, 10) }.unwrap();
    ring.recycle(theirs);
    ring.count_refused(&mut stats);
    assert_eq!(stats.buffer_tokens_refused, 3, "twice reported, twice recycled, foreign");
    assert!(stats
        .fields()
        .contains(&("buffer_tokens_refused", 3)));
    assert!(
        stats.summary().to_string().contains("buffer_tokens_refused=3"),
        "{}",
        stats.summary()
    );
    // A running total of the ring: counted again, not added twice.
    ring.count_refused(&mut stats);
    assert_eq!(stats.buffer_tokens_refused, 3);
}

/// Issue 14, defect 9: a worker leaving with datagrams in its backlog dropped their
/// tokens, and the drop check panicked (debug builds), replacing the worker's real error
/// with a panic. Dropping a token now keeps its buffer out of the ring, without a panic.
#[test]
fn a_dropped_buffer_stays_out_of_the_ring_without_a_panic() {
    let mut ring = BufRing::new(4, 100, 0).unwrap();
    {
        // SAFETY: not registered.
        let _dropped = unsafe { ring.take(1, 10) }.unwrap();
    }
    assert_eq!(ring.available(), 3, "the buffer is not handed back");
    // SAFETY: as above. The id is still lent: a report of it now is refused.
    assert!(unsafe { ring.take(1, 10) }.is_none());
    // SAFETY: as above.
    let held = unsafe { ring.take(2, 10) }.unwrap();
    // The ring goes first, with a token still out, as when the worker's `Io` drops
    // before its backlog.
    drop(ring);
    {
        let _dropped_later = held;
    }
}

/// Issue 8, finding 2: buffers the kernel may still fill must not be unmapped. Dropped
/// while registered, the ring leaks them; unregistered first, it unmaps them.
#[test]
fn a_registered_ring_is_never_unmapped() {
    let Some(uring) = uring() else { return };
    let mut registered = BufRing::new(4, 4096, 3).unwrap();
    registered.register(&uring).unwrap();
    let (addr, len) = registered.buffers_range();
    let before = UNMAPPED.with(|n| n.get());
    drop(registered);
    assert_eq!(UNMAPPED.with(|n| n.get()), before, "nothing unmapped while registered");
    assert!(BufRing::buffers_mapped_at(addr, len), "leaked, not unmapped");

    let mut unregistered = BufRing::new(4, 4096, 4).unwrap();
    unregistered.register(&uring).unwrap();
    // SAFETY: no request was submitted on `uring`.
    unsafe { unregistered.unregister(&uring) }.unwrap();
    let before = UNMAPPED.with(|n| n.get());
    drop(unregistered);
    let unmapped = UNMAPPED.with(|n| n.get()) - before;
    assert_eq!(unmapped, 2, "ring and buffers unmapped once unregistered");
}

/// Issue 14, defect 7: one `registered` flag for every io_uring, although every worker
/// registers group 0 on its own: unregistering ring A's buffers "from" ring B removed B's
/// group 0 and let A's memory be unmapped while A's kernel ring still used it.
#[test]
fn a_registration_belongs_to_its_own_ring() {
    let (Some(uring_a), Some(uring_b)) = (uring(), uring()) else {
        return;
    };
    let mut a = BufRing::new(4, 4096, 0).unwrap();
    let mut b = BufRing::new(4, 4096, 0).unwrap();
    a.register(&uring_a).unwrap();
    b.register(&uring_b).unwrap();
    assert!(a.register(&uring_b).is_err(), "one registration at a time");
    // SAFETY: no request was submitted on either ring.
    let wrong = unsafe { a.unregister(&uring_b) };
    assert_eq!(
        wrong.map_err(|e| e.kind()).err(),
        Some(io::ErrorKind::InvalidInput),
        "refused: group 0 on ring B is b's"
    );
    // b is still registered with B (its group was not removed by a's mistake).
    // SAFETY: as above.
    unsafe { b.unregister(&uring_b) }.expect("b's group 0 still registered on B");
    // a is still registered with A: dropped now, it must leak, not unmap.
    let (addr, len) = a.buffers_range();
    drop(a);
    assert!(BufRing::buffers_mapped_at(addr, len), "a stays mapped");
    let before = UNMAPPED.with(|n| n.get());
    drop(b);
    assert_eq!(UNMAPPED.with(|n| n.get()) - before, 2, "b unmapped");
}

#[test]
fn rejects_bad_sizes() {
    assert!(BufRing::new(3, 10, 0).is_err());
    assert!(BufRing::new(0, 10, 0).is_err());
    assert!(BufRing::new(4, 0, 0).is_err());
}

/// Issue 14, defect 1: sizes are checked against a stated maximum before any mapping.
#[test]
fn rejects_sizes_past_the_stated_maximum() {
    let err = BufRing::new(MAX_ENTRIES, MAX_BUF_LEN + 1, 0).err().unwrap();
    assert_eq!(err.kind(), io::ErrorKind::InvalidInput);
    assert!(err.to_string().contains("receive buffer length"), "{err}");
    assert!(BufRing::new(MAX_ENTRIES, u32::MAX, 0).is_err());
    assert!(BufRing::new(u16::MAX, 64, 0).is_err());
    assert!(BufRing::new(1, MAX_BUF_LEN, 0).is_ok());
}
