//! Private pools on the simulated device, checker on.

use super::*;
use crate::sim::{SimDriver, SimOp};
use std::sync::Arc;

const MIB: usize = 1 << 20;

fn setup() -> (Arc<SimDriver>, PrivatePools<Arc<SimDriver>>, Stream) {
    let sim = Arc::new(SimDriver::with_devices(2, 1 << 30));
    let pools = PrivatePools::new(sim.clone(), 2);
    let s = sim.new_stream(0).unwrap();
    (sim, pools, s)
}

fn free_memory(sim: &SimDriver) -> u64 {
    sim.mem_get_info(0).unwrap().free
}

#[test]
fn alloc_free_reuse_by_address_on_the_same_stream() {
    let (sim, pools, s) = setup();
    let id = PoolId(0, 1);
    assert_eq!(pools.create_or_incref(0, id).unwrap(), 1);
    let a = pools.alloc(0, id, MIB, s).unwrap();
    let b = pools.alloc(0, id, MIB, s).unwrap();
    assert_ne!(a, b);
    sim.launch(UsageStream::new(s, 0), &[a, b]).unwrap();
    pools.free(a).unwrap();
    assert_eq!(pools.alloc(0, id, MIB - 100, s).unwrap(), a, "best fit reuses the block");
    // Another stream does not reuse the first stream's free block.
    let other = sim.new_stream(0).unwrap();
    pools.free(b).unwrap();
    let c = pools.alloc(0, id, MIB, other).unwrap();
    assert_ne!(c, b);
    // A block much larger than the request (over twice, and over 1 MiB more) is not
    // used for it.
    let big = pools.alloc(0, id, 4 * MIB, s).unwrap();
    pools.free(big).unwrap();
    let small = pools.alloc(0, id, 4096, s).unwrap();
    assert_ne!(small, big);
    assert_eq!(small, b, "b (1 MiB) is within 1 MiB of the request");
    assert_eq!(sim.call_count(SimOp::MallocSync), 4);
    assert_eq!(sim.call_count(SimOp::MallocAsync), 0);
    let st = pools.stats(0, id).unwrap();
    assert_eq!((st.live_blocks, st.live_bytes), (3, (MIB - 100 + MIB + 4096) as u64));
    sim.assert_clean();
}

#[test]
fn release_returns_memory_to_the_driver() {
    let (sim, pools, s) = setup();
    let start = free_memory(&sim);
    let id = PoolId(0, 2);
    pools.create_or_incref(0, id).unwrap();
    assert_eq!(pools.create_or_incref(0, id).unwrap(), 2);
    let a = pools.alloc(0, id, 3 * MIB, s).unwrap();
    let b = pools.alloc(0, id, MIB, s).unwrap();
    pools.free(a).unwrap();
    assert!(free_memory(&sim) < start);
    assert_eq!(pools.release(0, id).unwrap(), 1);
    assert_eq!(pools.use_count(0, id).unwrap(), 1);
    assert_eq!(pools.release(0, id).unwrap(), 0);
    // The free block went back at once; the live one when it is freed.
    assert_eq!(sim.sync_bytes(0), MIB as u64);
    assert!(matches!(pools.alloc(0, id, 1, s), Err(PoolError::Released { .. })));
    pools.free(b).unwrap();
    assert_eq!(free_memory(&sim), start);
    assert_eq!(sim.sync_bytes(0), 0);
    assert!(!pools.has_blocks());
    assert_eq!(pools.use_count(0, id).unwrap(), 0, "the empty pool is forgotten");
    assert!(matches!(pools.release(0, id), Err(PoolError::UnknownPool { .. })));
    sim.assert_clean();
}

#[test]
fn allocation_during_a_capture_is_not_a_graph_allocation() {
    let (sim, pools, s) = setup();
    let us = UsageStream::new(s, 0);
    let id = PoolId(3, 0);
    pools.begin_allocate_to(0, id, s, None).unwrap();
    sim.begin_capture(us).unwrap();
    let ctx = pools.route(0, s).expect("routed to the pool");
    let a = pools.alloc(0, ctx.id(), MIB, s).unwrap();
    sim.launch(us, &[a]).unwrap();
    // Freed during the capture: reusable at once within it.
    pools.free(a).unwrap();
    assert_eq!(pools.alloc(0, id, MIB, s).unwrap(), a);
    let graph = sim.end_capture(us).unwrap();
    pools.end_allocate_to(0, id).unwrap();
    assert_eq!(graph.allocations, 0, "no graph memory node");
    assert_eq!(sim.call_count(SimOp::MallocAsync), 0);
    assert_eq!(sim.call_count(SimOp::MallocSync), 1);
    // The address outlives the capture: the graph's output stays live in the pool.
    assert!(pools.check_live(0, id, &[a]).unwrap());
    assert_eq!(pools.route(0, s).map(|c| c.id()), None);
    pools.free(a).unwrap();
    pools.release(0, id).unwrap();
    assert_eq!(sim.sync_bytes(0), 0);
    sim.assert_clean();
}

#[test]
fn no_driver_free_while_a_capture_runs() {
    let (sim, pools, s) = setup();
    let us = UsageStream::new(s, 0);
    let (graph_pool, other) = (PoolId(4, 0), PoolId(0, 4));
    pools.create_or_incref(0, other).unwrap();
    let x = pools.alloc(0, other, MIB, s).unwrap();
    pools.free(x).unwrap();
    pools.begin_allocate_to(0, graph_pool, s, None).unwrap();
    sim.begin_capture(us).unwrap();
    // Another pool released during the capture keeps its memory...
    assert_eq!(pools.release(0, other).unwrap(), 0);
    pools.empty_cache().unwrap();
    assert_eq!(sim.sync_bytes(0), MIB as u64);
    sim.end_capture(us).unwrap();
    pools.end_allocate_to(0, graph_pool).unwrap();
    // ...until the capture is over.
    pools.empty_cache().unwrap();
    assert_eq!(sim.sync_bytes(0), 0);
    assert_eq!(sim.call_count(SimOp::FreeSync), 1);
    pools.release(0, graph_pool).unwrap();
    sim.assert_clean();
}

#[test]
fn checkpoint_and_restore_at_the_same_addresses() {
    let (sim, pools, s) = setup();
    let id = PoolId(0, 5);
    pools.create_or_incref(0, id).unwrap();
    let a = pools.alloc(0, id, MIB, s).unwrap();
    let b = pools.alloc(0, id, 2 * MIB, s).unwrap();
    let cp = pools.checkpoint(0, id).unwrap();
    assert_eq!(cp.blocks.len(), 2);
    assert_eq!(
        cp.blocks[0],
        CheckpointBlock { ptr: a.min(b), size: if a < b { MIB } else { 2 * MIB }, stream: s }
    );
    // After the checkpoint: a dies, c is born.
    pools.free(a).unwrap();
    let c = pools.alloc(0, id, 4 * MIB, s).unwrap();
    assert!(pools.check_live(0, id, &[b, c]).unwrap());
    let delta = pools.restore(&cp).unwrap();
    let mut freed: Vec<DevicePtr> = delta.freed.iter().map(|b| b.ptr).collect();
    freed.sort();
    let mut want = vec![b, c];
    want.sort();
    assert_eq!(freed, want);
    let mut allocd: Vec<DevicePtr> = delta.allocated.iter().map(|b| b.ptr).collect();
    allocd.sort();
    let mut want = vec![a, b];
    want.sort();
    assert_eq!(allocd, want);
    assert!(pools.check_live(0, id, &[a, b]).unwrap());
    assert!(!pools.check_live(0, id, &[a]).unwrap());
    assert!(!pools.check_live(0, id, &[a, b, c]).unwrap());
    assert!(!pools.check_live(0, id, &[a, c]).unwrap());
    // c's block is free again and reused by address.
    assert_eq!(pools.alloc(0, id, 4 * MIB, s).unwrap(), c);
    assert_eq!(pools.stats(0, id).unwrap().live_bytes, (7 * MIB) as u64);
    for p in [a, b, c] {
        pools.free(p).unwrap();
    }
    pools.release(0, id).unwrap();
    assert_eq!(sim.sync_bytes(0), 0);
    sim.assert_clean();
}

#[test]
fn bad_inputs_are_refused_and_the_books_stay() {
    let (sim, pools, s) = setup();
    let id = PoolId(0, 6);
    assert!(matches!(
        pools.create_or_incref(7, id),
        Err(PoolError::InvalidDevice { device: 7, .. })
    ));
    assert_eq!(pools.create_or_incref(0, PoolId(0, 0)), Err(PoolError::DefaultPool));
    assert!(matches!(pools.alloc(0, id, 64, s), Err(PoolError::UnknownPool { .. })));
    pools.create_or_incref(0, id).unwrap();
    let a = pools.alloc(0, id, 64, s).unwrap();
    let before = pools.stats(0, id).unwrap();
    // A pointer no pool has; a double free; a checkpoint of a block that is not there.
    assert_eq!(
        pools.free(DevicePtr::from_raw(0x1234)),
        Err(PoolError::UnknownPointer { ptr: DevicePtr::from_raw(0x1234) })
    );
    let mut cp = pools.checkpoint(0, id).unwrap();
    cp.blocks.push(CheckpointBlock { ptr: DevicePtr::from_raw(0x1234), size: 1, stream: s });
    assert!(matches!(pools.restore(&cp), Err(PoolError::BadCheckpoint { .. })));
    cp.blocks.pop();
    cp.blocks[0].size = 1 << 20;
    assert!(matches!(pools.restore(&cp), Err(PoolError::BadCheckpoint { .. })));
    // Wrong device for the pool: device 1 has no pool of this id.
    assert!(matches!(pools.checkpoint(1, id), Err(PoolError::UnknownPool { device: 1, .. })));
    assert!(matches!(pools.check_live(1, id, &[a]), Err(PoolError::UnknownPool { .. })));
    assert_eq!(
        pools.end_allocate_to(0, id).unwrap_err(),
        PoolError::NotAllocatingTo { device: 0, id }
    );
    pools.begin_allocate_to(0, id, s, None).unwrap();
    assert_eq!(
        pools.begin_allocate_to(0, id, s, None).unwrap_err(),
        PoolError::AlreadyAllocatingTo { device: 0, id }
    );
    assert_eq!(pools.use_count(0, id).unwrap(), 2, "the refused begin added no user");
    pools.end_allocate_to(0, id).unwrap();
    pools.release(0, id).unwrap();
    assert_eq!(pools.stats(0, id).unwrap().live_blocks, before.live_blocks);
    assert!(pools.check_live(0, id, &[a]).unwrap());
    pools.free(a).unwrap();
    assert_eq!(pools.free(a), Err(PoolError::DoubleFree { ptr: a }));
    // An injected driver failure: nothing is handed out, nothing is kept.
    sim.fail_always(SimOp::MallocSync, crate::error::CUDA_ERROR_OUT_OF_MEMORY);
    assert!(matches!(pools.alloc(0, id, 1 << 29, s), Err(PoolError::OutOfMemory { .. })));
    sim.clear_faults();
    assert_eq!(pools.stats(0, id).unwrap().live_blocks, 0);
    pools.release(0, id).unwrap();
    assert_eq!(sim.sync_bytes(0), 0);
    sim.assert_clean();
}

#[test]
fn filters_route_by_stream_newest_context_first() {
    let (sim, pools, s) = setup();
    let t = sim.new_stream(0).unwrap();
    assert!(!pools.routing());
    let (p1, p2) = (PoolId(0, 7), PoolId(0, 8));
    pools.begin_allocate_to(0, p1, s, None).unwrap();
    pools.begin_allocate_to(0, p2, s, Some(Box::new(move |x| x == t))).unwrap();
    assert!(pools.routing());
    assert_eq!(pools.route(0, t).map(|c| c.id()), Some(p2));
    assert_eq!(pools.route(0, s).map(|c| c.id()), Some(p1));
    assert_eq!(pools.route(1, s).map(|c| c.id()), None, "another device");
    pools.end_allocate_to(0, p1).unwrap();
    assert_eq!(pools.route(0, s).map(|c| c.id()), None);
    pools.end_allocate_to(0, p2).unwrap();
    assert!(!pools.routing());
    pools.release(0, p1).unwrap();
    pools.release(0, p2).unwrap();
}

#[test]
fn recorded_streams_are_waited_for_before_reuse() {
    let (sim, pools, s) = setup();
    let other = sim.new_usage_stream(0).unwrap();
    let id = PoolId(0, 9);
    pools.create_or_incref(0, id).unwrap();
    let a = pools.alloc(0, id, MIB, s).unwrap();
    sim.launch(other, &[a]).unwrap();
    pools.record_stream(a, other).unwrap();
    pools.free(a).unwrap();
    // The reuse on s is ordered after other's kernel: the checker stays quiet.
    assert_eq!(pools.alloc(0, id, MIB, s).unwrap(), a);
    sim.launch(UsageStream::new(s, 0), &[a]).unwrap();
    assert!(sim.happens_before(other, UsageStream::new(s, 0)));
    // Freed during a capture with a recorded stream: held back, not reused in it.
    let us = UsageStream::new(s, 0);
    pools.record_stream(a, other).unwrap();
    sim.begin_capture(us).unwrap();
    pools.free(a).unwrap();
    let b = pools.alloc(0, id, MIB, s).unwrap();
    assert_ne!(a, b);
    pools.free(b).unwrap();
    sim.end_capture(us).unwrap();
    // Outside the capture it is waited for and reused.
    let c = pools.alloc(0, id, MIB, s).unwrap();
    assert!(c == a || c == b);
    // Held back again (freed in a capture), then the pool is released: every block goes
    // back to the driver, the held one too.
    pools.record_stream(c, other).unwrap();
    sim.begin_capture(us).unwrap();
    pools.free(c).unwrap();
    sim.end_capture(us).unwrap();
    pools.release(0, id).unwrap();
    assert_eq!(pools.use_count(0, id).unwrap(), 0, "the pool is forgotten");
    assert_eq!(sim.sync_bytes(0), 0);
    sim.assert_clean();
}

#[test]
fn threads_share_a_pool_and_every_byte_comes_back() {
    let (sim, pools, _) = setup();
    let pools = Arc::new(pools);
    let start = free_memory(&sim);
    let id = PoolId(0, 10);
    pools.create_or_incref(0, id).unwrap();
    let workers: Vec<_> = (0..4)
        .map(|t| {
            let (sim, pools) = (sim.clone(), pools.clone());
            std::thread::spawn(move || {
                let s = sim.new_stream(0).unwrap();
                let mut live = Vec::new();
                for i in 0..200usize {
                    let size = 512 * (1 + (i * 7 + t) % 13);
                    live.push(pools.alloc(0, id, size, s).unwrap());
                    if i % 3 == 2 {
                        let p = live.swap_remove((i * 5) % live.len());
                        pools.free(p).unwrap();
                    }
                    if i % 50 == 0 {
                        let cp = pools.checkpoint(0, id).unwrap();
                        assert!(cp.blocks.iter().all(|b| b.size > 0));
                    }
                }
                for p in live {
                    pools.free(p).unwrap();
                }
            })
        })
        .collect();
    for w in workers {
        w.join().unwrap();
    }
    let st = pools.stats(0, id).unwrap();
    assert_eq!((st.live_blocks, st.live_bytes), (0, 0));
    assert!(pools.check_live(0, id, &[]).unwrap());
    assert_eq!(pools.release(0, id).unwrap(), 0);
    assert_eq!(free_memory(&sim), start);
    assert!(!pools.has_blocks());
    sim.assert_clean();
}
