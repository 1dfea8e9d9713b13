//! The C ABI from C: `tests/c/capi_test.c` compiled with the system C compiler (`cc`,
//! or `$CC`) against `src/capi/streamalloc.h` and a `libstreamalloc.so` this test builds
//! (the `capi/` member), then run on the simulated device. Skipped, saying so, when no C
//! compiler is found.

use std::path::{Path, PathBuf};
use std::process::Command;

fn compiler() -> Option<String> {
    let cc = std::env::var("CC").unwrap_or_else(|_| "cc".to_string());
    Command::new(&cc).arg("--version").output().ok().filter(|o| o.status.success()).map(|_| cc)
}

/// Builds `libstreamalloc.so` (the `capi/` member's cdylib, simulated backend only: no
/// default features) into this test's own target directory and returns its directory.
/// `cargo test` does not build the cdylib (it is no dependency of a test), and a copy
/// left in the shared target directory by an earlier `cargo build` may be stale; a
/// directory of our own also keeps clear of the lock of the `cargo test` that runs us.
fn library_dir() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let target = Path::new(env!("CARGO_TARGET_TMPDIR")).join("capi-lib");
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".to_string());
    let out = Command::new(&cargo)
        .args(["build", "--quiet", "-p", "streamalloc-capi", "--no-default-features"])
        .arg("--manifest-path")
        .arg(root.join("Cargo.toml"))
        .arg("--target-dir")
        .arg(&target)
        .output()
        .expect("running cargo to build libstreamalloc.so");
    assert!(
        out.status.success(),
        "building libstreamalloc.so failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let dir = target.join("debug");
    assert!(dir.join("libstreamalloc.so").exists(), "no libstreamalloc.so in {}", dir.display());
    dir
}

#[test]
fn c_program_on_the_simulated_device() {
    let Some(cc) = compiler() else {
        eprintln!("SKIPPED c_program_on_the_simulated_device: no C compiler (cc or $CC)");
        return;
    };
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let lib = library_dir();
    let exe = Path::new(env!("CARGO_TARGET_TMPDIR")).join("capi_test");
    let out = Command::new(&cc)
        .args(["-std=c11", "-Wall", "-Wextra", "-Werror", "-pthread"])
        .arg("-I")
        .arg(root.join("src/capi"))
        .arg(root.join("tests/c/capi_test.c"))
        .arg("-L")
        .arg(&lib)
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .args(["-lstreamalloc", "-o"])
        .arg(&exe)
        .output()
        .expect("running the C compiler");
    assert!(
        out.status.success(),
        "{cc} failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // cargo's LD_LIBRARY_PATH may name an older copy of the library first: only ours.
    let run = Command::new(&exe)
        .env("LD_LIBRARY_PATH", &lib)
        .env("STREAMALLOC_BACKEND", "sim")
        .env("STREAMALLOC_SIM_DEVICES", "2")
        .env("STREAMALLOC_SIM_CAPACITY", (256u64 << 20).to_string())
        .env("STREAMALLOC_CONF", "cache:on,max_cache_mb:64")
        .output()
        .expect("running the C test program");
    let stdout = String::from_utf8_lossy(&run.stdout);
    let stderr = String::from_utf8_lossy(&run.stderr);
    assert!(run.status.success(), "C test failed ({}):\n{stdout}{stderr}", run.status);
    assert!(stdout.contains(", 0 failed"), "{stdout}");
    println!("{stdout}");
}
