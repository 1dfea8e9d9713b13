//! Replays every input kept in `fuzz/corpus/` through the fuzz targets' interpreter, in
//! plain `cargo test`: `fuzz/corpus/ops` (and `c_abi`, same format) through
//! `run_differential`, `fuzz/corpus/faults` through `run_faults`. Inputs are decoded the
//! way `libfuzzer-sys` decodes them, so a file the fuzzer saved (a finding, a corpus
//! entry) replays exactly.
//!
//! `FUZZ_REPLAY=<file> cargo test --test fuzz_corpus replay_one -- --nocapture` replays
//! one file (an `ops` input, or a `faults` input when its path contains "faults") and
//! prints the decoded operations.

use std::path::{Path, PathBuf};
use streamalloc::fuzzing::{
    CAbiOp, FaultsInput, Op, decode, run_c_abi, run_differential, run_faults,
};

fn corpus(target: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus").join(target);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .map(|rd| rd.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_file()).collect())
        .unwrap_or_default();
    files.sort();
    files
}

/// `Ok(false)`: the file does not decode (the target would skip it too).
fn replay_ops(path: &Path) -> Result<bool, String> {
    let data = std::fs::read(path).map_err(|e| e.to_string())?;
    match decode::<Vec<Op>>(&data) {
        Some(ops) => run_differential(&ops).map(|()| true),
        None => Ok(false),
    }
}

fn replay_c_abi(path: &Path) -> Result<bool, String> {
    let data = std::fs::read(path).map_err(|e| e.to_string())?;
    match decode::<Vec<CAbiOp>>(&data) {
        Some(ops) => run_c_abi(&ops).map(|()| true),
        None => Ok(false),
    }
}

fn replay_faults(path: &Path) -> Result<bool, String> {
    let data = std::fs::read(path).map_err(|e| e.to_string())?;
    match decode::<FaultsInput>(&data) {
        Some(input) => run_faults(&input.ops, &input.faults).map(|()| true),
        None => Ok(false),
    }
}

fn replay_all(target: &str, replay: fn(&Path) -> Result<bool, String>) {
    let files = corpus(target);
    assert!(!files.is_empty(), "fuzz/corpus/{target} is empty");
    let mut decoded = 0;
    let mut failures = Vec::new();
    for f in &files {
        match replay(f) {
            Ok(d) => decoded += d as usize,
            Err(e) => failures.push(format!("{}: {e}", f.display())),
        }
    }
    assert!(decoded * 2 > files.len(), "{target}: only {decoded} of {} decode", files.len());
    assert!(
        failures.is_empty(),
        "{} of {} failed:\n{}",
        failures.len(),
        files.len(),
        failures.join("\n")
    );
}

#[test]
fn ops_corpus_replays_clean() {
    replay_all("ops", replay_ops);
}

#[test]
fn faults_corpus_replays_clean() {
    replay_all("faults", replay_faults);
}

#[test]
fn c_abi_corpus_replays_clean() {
    replay_all("c_abi", replay_c_abi);
}

#[test]
fn replay_one() {
    let Ok(path) = std::env::var("FUZZ_REPLAY") else { return };
    let path = PathBuf::from(path);
    let data = std::fs::read(&path).unwrap();
    let r = if path.to_string_lossy().contains("c_abi") {
        println!("{:#?}", decode::<Vec<CAbiOp>>(&data));
        replay_c_abi(&path)
    } else if path.to_string_lossy().contains("faults") {
        let input = decode::<FaultsInput>(&data);
        println!("{input:#?}");
        replay_faults(&path)
    } else {
        let ops = decode::<Vec<Op>>(&data);
        println!("{ops:#?}");
        replay_ops(&path)
    };
    if let Err(e) = r {
        panic!("{e}");
    }
}

/// Hand-written programs through the same interpreter: the paths the corpus must keep
/// covering (capture with deferred and captured frees, recorded streams, limits, OOM).
#[test]
fn hand_written_programs_run_clean() {
    use streamalloc::fuzzing::{Fault, HandleStep, SizeSel};
    let alloc = |device, size, stream| Op::Alloc { device, size, stream };
    let programs: Vec<Vec<Op>> = vec![
        // Capture: an uncaptured block freed during the capture is deferred; a captured
        // one with a recorded stream is freed on the unifying stream and joined back.
        vec![
            alloc(0, SizeSel::Bench(3), 1),
            Op::Use { slot: 0, stream: 2 },
            Op::BeginCapture { stream: 0 },
            alloc(0, SizeSel::Small(999), 0),
            Op::RecordStream { slot: 1, stream: 2 },
            Op::Free { slot: 0 },
            Op::DoubleFree { slot: 0 },
            Op::Free { slot: 0 },
            Op::BeginCapture { stream: 1 },
            Op::EndCapture,
            Op::EndCapture,
            alloc(1, SizeSel::Small(10), 1),
        ],
        // Limits and out-of-memory.
        vec![
            Op::SetFraction { device: 0, f: 128, special: 0 },
            alloc(0, SizeSel::Large(0), 0),
            alloc(0, SizeSel::Large(60000), 0),
            alloc(0, SizeSel::Huge(3), 0),
            alloc(2, SizeSel::Small(3), 0),
            Op::SetFraction { device: 1, f: 0, special: 11 },
            Op::SetFraction { device: 1, f: 0, special: 10 },
            Op::CacheInfo { device: 0, stream: 1 },
            Op::Stats { device: 0 },
            Op::Stats { device: 1 },
            Op::ResetPeak { device: 0 },
            Op::EmptyCache,
            Op::Free { slot: 0 },
            Op::StickyError { device: 0 },
            alloc(0, SizeSel::Bench(6), 2),
            alloc(0, SizeSel::Bench(6), 2),
            Op::BaseAlloc { slot: 0 },
            Op::FreeNever { addr: 7 },
        ],
        // Cross-stream and cross-device recorded streams, waits and syncs.
        vec![
            alloc(0, SizeSel::Bench(0), 0),
            alloc(1, SizeSel::Bench(1), 2),
            Op::Use { slot: 0, stream: 1 },
            Op::RecordStream { slot: 1, stream: 0 },
            Op::Wait { waiter: 1, on: 4 },
            Op::Free { slot: 0 },
            Op::EnablePeer { accessor: 1, owner: 0 },
            Op::EnablePeer { accessor: 2, owner: 0 },
            Op::Use { slot: 0, stream: 4 },
            Op::Copy { dst: 0, src: 1, stream: 1, count: 100, p2p: true },
            Op::Copy { dst: 1, src: 0, stream: 5, count: 600, p2p: false },
            Op::CopySync { dst: 0, src: 0, count: 7 },
            Op::Sync,
            alloc(0, SizeSel::Bench(0), 1),
            Op::Free { slot: 0 },
            Op::Free { slot: 0 },
        ],
        // Issue 13: unusable streams refused, streams destroyed and replaced, handles
        // mixed with the pointer API.
        vec![
            alloc(0, SizeSel::Bench(2), 1),
            alloc(1, SizeSel::Small(77), 2),
            Op::BadRecord { slot: 0, kind: 0 },
            Op::BadRecord { slot: 1, kind: 2 },
            Op::BadRecord { slot: 0, kind: 3 },
            Op::DestroyStream { stream: 1 }, // device 0, stream 2: unused, destroyed
            Op::DestroyStream { stream: 0 }, // device 0, stream 1: block 0's, kept
            Op::BadRecord { slot: 0, kind: 1 }, // the destroyed stream
            alloc(0, SizeSel::Small(5), 2),  // on the replacement stream
            Op::Use { slot: 2, stream: 2 },
            Op::Handle {
                device: 0,
                size: SizeSel::Bench(1),
                stream: 1,
                steps: vec![
                    HandleStep::Use { stream: 0 },
                    HandleStep::Record { stream: 2 },
                    HandleStep::Use { stream: 1 },
                    HandleStep::PtrRecord { stream: 4 },
                    HandleStep::PtrFree,
                    HandleStep::PtrAllocFree { size: SizeSel::Bench(1) },
                ],
                free: true,
            },
            Op::Handle {
                device: 1,
                size: SizeSel::Small(100),
                stream: 2,
                steps: vec![HandleStep::PtrFree, HandleStep::Use { stream: 0 }],
                free: false,
            },
            Op::Free { slot: 0 },
            Op::DestroyStream { stream: 0 },
            Op::EmptyCache,
        ],
    ];
    for (i, ops) in programs.iter().enumerate() {
        run_differential(ops).unwrap_or_else(|e| panic!("program {i}: {e}"));
        for op in 0..12 {
            for nth in 1..4 {
                let faults = [Fault { op, nth, code: nth }];
                run_faults(ops, &faults)
                    .unwrap_or_else(|e| panic!("program {i} with {faults:?}: {e}"));
            }
        }
    }
}
