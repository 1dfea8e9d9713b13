//! The capture epoch and its grace period, model-checked.
//!
//! Property 1 (begin): a section that decided "no capture" never issues its driver
//! free after `begin_capture` has returned.
//! Property 2 (end): when `end_capture`'s grace period is over, every section that
//! decided "capture" has remembered its free stream, so the join sees it.
//! Both with readers on shared counters and on counters they hold alone.

use crate::epoch::EpochGate;
use loom::sync::Arc;
use loom::sync::atomic::{AtomicBool, AtomicUsize, Ordering::SeqCst};
use loom::thread;

#[test]
fn loom_begin_capture_waits_for_uncaptured_frees() {
    loom::model(|| {
        let gate = Arc::new(EpochGate::new());
        let capture_begun = Arc::new(AtomicBool::new(false));
        let reader = {
            let (gate, capture_begun) = (gate.clone(), capture_begun.clone());
            thread::spawn(move || {
                let section = gate.enter();
                if !section.capturing() {
                    // The "uncaptured driver free": must not land inside the capture.
                    assert!(!capture_begun.load(SeqCst), "uncaptured free after capture began");
                }
            })
        };
        gate.transition(|underway| if underway { Err(()) } else { Ok(()) }, || {}, || {}).unwrap();
        capture_begun.store(true, SeqCst);
        reader.join().unwrap();
    });
}

/// Property 1 for a reader on a counter it holds alone (`sync::thread_slot` gives loom
/// threads with an even id one): announced with a store, left with a plain store.
#[test]
fn loom_begin_capture_waits_for_sections_on_owned_counters() {
    loom::model(|| {
        let gate = Arc::new(EpochGate::new());
        let capture_begun = Arc::new(AtomicBool::new(false));
        // Thread 1 does nothing: the reader is thread 2, which holds its counter.
        thread::spawn(|| {}).join().unwrap();
        let reader = {
            let (gate, capture_begun) = (gate.clone(), capture_begun.clone());
            thread::spawn(move || {
                assert!(crate::sync::thread_slot(4).is_some(), "thread 2 holds a counter");
                let section = gate.enter();
                if !section.capturing() {
                    assert!(!capture_begun.load(SeqCst), "uncaptured free after capture began");
                }
            })
        };
        gate.transition(|underway| if underway { Err(()) } else { Ok(()) }, || {}, || {}).unwrap();
        capture_begun.store(true, SeqCst);
        reader.join().unwrap();
    });
}

#[test]
fn loom_end_capture_sees_every_free_stream() {
    loom::model(|| {
        let gate = Arc::new(EpochGate::new());
        gate.transition(|_| Ok::<(), ()>(()), || {}, || {}).unwrap(); // capture underway
        let remembered = Arc::new(AtomicUsize::new(0));
        let saw_capture = Arc::new(AtomicUsize::new(0));
        let readers: Vec<_> = (0..2)
            .map(|_| {
                let (gate, remembered, saw) =
                    (gate.clone(), remembered.clone(), saw_capture.clone());
                thread::spawn(move || {
                    let section = gate.enter();
                    if section.capturing() {
                        saw.fetch_add(1, SeqCst);
                        remembered.fetch_add(1, SeqCst); // remember the free stream
                    }
                })
            })
            .collect();
        let joined = gate
            .transition(
                |underway| if underway { Ok(()) } else { Err(()) },
                || {},
                || remembered.load(SeqCst),
            )
            .unwrap();
        for r in readers {
            r.join().unwrap();
        }
        // Everything that decided "capture" was seen by the join; nothing came later.
        assert_eq!(joined, saw_capture.load(SeqCst));
        assert_eq!(joined, remembered.load(SeqCst));
    });
}
