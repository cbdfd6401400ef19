//! Opt-in: runs the independent PyTorch reference checks (export/tests/test_reference_loop.py,
//! test_timestep_sampling.py against musubi-tuner's sampling code and the bf16 rounding
//! test) against this build's `flowstep` binary, when FLOWSTEP_PYTHON
//! names the pinned environment's python. scripts/mutants.sh sets it, so that mutants of the
//! training loop face the reference; scripts/test.sh runs the same files under pytest, so
//! without the variable this test only says that it did nothing.

use std::path::Path;

#[test]
fn pytorch_reference_checks() {
    let Some(python) = std::env::var_os("FLOWSTEP_PYTHON") else {
        eprintln!("FLOWSTEP_PYTHON not set: skipped (scripts/test.sh runs these under pytest)");
        return;
    };
    let export = Path::new(env!("CARGO_MANIFEST_DIR")).join("export");
    let out = std::process::Command::new(python)
        .args(["-m", "pytest", "-q", "-x", "tests/test_reference_loop.py", "tests/test_timestep_sampling.py", "tests/test_lora_alpha_and_files.py::test_bf16_rounding_of_ties"])
        .current_dir(&export)
        .env("FLOWSTEP_BIN", env!("CARGO_BIN_EXE_flowstep"))
        .output()
        .unwrap_or_else(|e| panic!("cannot run pytest: {e}"));
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "pytest failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
}
