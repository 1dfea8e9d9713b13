//! The stream caches' spin lock, model-checked: mutual exclusion, and what one holder
//! wrote is seen by the next (the lock's Acquire pairs with the unlock's Release; a
//! weaker ordering is a causality violation on the guarded cell).

use crate::spin::SpinLock;
use loom::sync::Arc;
use loom::thread;

#[test]
fn loom_spin_lock_excludes_and_publishes() {
    loom::model(|| {
        let lock = Arc::new(SpinLock::new((0u64, Vec::<u64>::new())));
        let workers: Vec<_> = (1..=2u64)
            .map(|id| {
                let lock = lock.clone();
                thread::spawn(move || {
                    let mut g = lock.lock();
                    // A read-modify-write split in two: lost if two holders overlap.
                    let seen = g.0;
                    g.1.push(id);
                    g.0 = seen + 1;
                })
            })
            .collect();
        for w in workers {
            w.join().unwrap();
        }
        let g = lock.lock();
        assert_eq!(g.0, 2, "an update was lost");
        assert_eq!(g.1.len(), 2);
    });
}

#[test]
fn loom_spin_lock_holder_sees_the_previous_holders_list() {
    // The free list's shape: one thread pushes a block and unlocks; another takes it.
    // The taker must see the pushed value whole, or nothing.
    loom::model(|| {
        let lock = Arc::new(SpinLock::new(Vec::<u64>::new()));
        let l2 = lock.clone();
        let putter = thread::spawn(move || l2.lock().push(42));
        let taken = lock.lock().pop();
        putter.join().unwrap();
        let left = lock.lock().pop();
        assert_eq!(taken.or(left), Some(42), "the block was lost");
        assert!(taken.is_none() || left.is_none(), "the block was taken twice");
    });
}
