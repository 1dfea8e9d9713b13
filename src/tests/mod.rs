//! Model checks of the protocol pieces under loom (`--cfg streamalloc_loom`):
//! `RUSTFLAGS="--cfg streamalloc_loom" LOOM_MAX_PREEMPTIONS=2 cargo test --release --lib loom_`

mod loom_budget;
mod loom_cache;
mod loom_epoch;
mod loom_lane;
mod loom_ptr_free;
