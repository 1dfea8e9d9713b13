//! The delegation lane's request slot and doorbell, model-checked.
//!
//! Property 1: a requester gets the result of its own call, whether the delegate is
//! awake or asleep when the call is published (no lost wake-up: loom reports a deadlock
//! if a sleeping delegate or requester is never woken), and the slot's cells are never
//! accessed by both at once (loom's `UnsafeCell` checks).
//! Property 2: two requesters that share one slot each get their own result.

use crate::lane::slot::{Doorbell, Slot};
use loom::sync::Arc;
use loom::thread;

/// A delegate serving `calls` requests from `slot` (doubling them), sleeping on `bell`
/// when there is nothing to do.
fn delegate(
    slot: Arc<Slot<u64, u64>>,
    bell: Arc<Doorbell>,
    calls: usize,
) -> thread::JoinHandle<()> {
    thread::spawn(move || {
        let mut served = 0;
        while served < calls {
            bell.sleep(|| slot.pending());
            if let Some(q) = slot.take() {
                slot.complete(q * 2);
                served += 1;
            }
        }
    })
}

/// A requester's whole call: claim (waiting while the slot is another's), publish, ring,
/// wait.
fn call(slot: &Slot<u64, u64>, bell: &Doorbell, delegate: &thread::Thread, q: u64) -> u64 {
    while !slot.try_claim() {
        thread::yield_now();
    }
    slot.publish(q);
    bell.ring(|| delegate.unpark());
    slot.wait()
}

#[test]
fn loom_lane_call_gets_its_result() {
    loom::model(|| {
        let slot = Arc::new(Slot::new());
        let bell = Arc::new(Doorbell::new());
        let server = delegate(slot.clone(), bell.clone(), 1);
        let me = server.thread().clone();
        assert_eq!(call(&slot, &bell, &me, 21), 42);
        server.join().unwrap();
    });
}

#[test]
fn loom_lane_shared_slot_answers_each_requester() {
    loom::model(|| {
        let slot = Arc::new(Slot::new());
        let bell = Arc::new(Doorbell::new());
        let server = delegate(slot.clone(), bell.clone(), 2);
        let me = server.thread().clone();
        let other = {
            let (slot, bell, me) = (slot.clone(), bell.clone(), me.clone());
            thread::spawn(move || assert_eq!(call(&slot, &bell, &me, 5), 10))
        };
        assert_eq!(call(&slot, &bell, &me, 7), 14);
        other.join().unwrap();
        server.join().unwrap();
    });
}
