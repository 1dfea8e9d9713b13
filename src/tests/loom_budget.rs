//! The used-byte reservation against the limit, model-checked: never over the limit,
//! never a lost byte, whatever the interleaving with a limit change.

use crate::budget::Budget;
use loom::sync::Arc;
use loom::thread;

#[test]
fn loom_reservations_never_exceed_limit_or_lose_bytes() {
    loom::model(|| {
        let budget = Arc::new(Budget::new());
        budget.set_limit(100);
        let workers: Vec<_> = [60u64, 50]
            .into_iter()
            .map(|size| {
                let budget = budget.clone();
                thread::spawn(move || {
                    let got = budget.reserve(size).is_ok();
                    if got {
                        assert!(budget.used() <= 100, "over the limit");
                        budget.release(size);
                    }
                    got
                })
            })
            .collect();
        let granted: Vec<bool> = workers.into_iter().map(|w| w.join().unwrap()).collect();
        assert!(granted.iter().any(|&g| g), "one of them fits");
        assert_eq!(budget.used(), 0, "bytes lost");
    });
}

#[test]
fn loom_limit_change_races_reservation() {
    loom::model(|| {
        let budget = Arc::new(Budget::new());
        let b2 = budget.clone();
        let setter = thread::spawn(move || b2.set_limit(40));
        let ok = budget.reserve(50).is_ok();
        setter.join().unwrap();
        // Either the reservation came first (and stays, above the new limit, as in the
        // seed) or it saw the new limit and was refused; the books are exact either way.
        assert_eq!(budget.used(), if ok { 50 } else { 0 });
        if ok {
            budget.release(50);
        }
        assert_eq!(budget.used(), 0);
        assert!(budget.reserve(41).is_err());
        assert!(budget.reserve(40).is_ok());
    });
}

#[test]
fn loom_exact_claim_is_not_refused_by_credit_another_thread_regrabs() {
    // Issue 13 item 4: the exact path drains every stripe's credit and claims; another
    // thread churning small allocations may re-take a credit chunk between the drain
    // and the claim. The request fits the live bytes at every moment (the churner never
    // holds more than 10 live bytes), so it must never be refused.
    use crate::budget::CREDIT_CHUNK;
    loom::model(|| {
        let limit = 2 * CREDIT_CHUNK;
        let budget = Arc::new(Budget::new());
        budget.set_limit(limit);
        let b2 = budget.clone();
        let churner = thread::spawn(move || {
            for _ in 0..2 {
                b2.reserve(10).expect("10 bytes always fit beside the big request");
                b2.release(10);
            }
        });
        let big = limit - 10;
        assert_eq!(budget.reserve(big), Ok(()), "a request within the live bytes was refused");
        churner.join().unwrap();
        assert_eq!(budget.used(), big);
        budget.release(big);
        assert_eq!(budget.used(), 0, "bytes lost");
    });
}

#[test]
fn loom_owned_stripe_plain_updates_race_a_drain() {
    // An owned stripe's credit is spent and earned with plain loads and stores; a drain
    // from another thread (a limit change, the exact path) must neither lose nor double
    // any of it. Thread ids: the drainer is 1 (no owned stripe), the owner 2 (owned).
    loom::model(|| {
        let budget = Arc::new(Budget::new());
        let b1 = budget.clone();
        let drainer = thread::spawn(move || b1.drain());
        let b2 = budget.clone();
        let owner = thread::spawn(move || {
            // The first claim takes a chunk (atomic); then a plain earn, spend and earn.
            b2.reserve(10).unwrap();
            b2.release(10);
            b2.reserve(10).unwrap();
            b2.release(10);
        });
        drainer.join().unwrap();
        owner.join().unwrap();
        assert_eq!(budget.used(), 0, "bytes lost");
        // Every claim came back: credit neither lost nor counted twice.
        budget.drain();
        assert_eq!(budget.claims(), 0, "credit lost or duplicated");
    });
}
