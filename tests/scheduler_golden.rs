//! The Rust scheduler against DiffSynth-Studio's own `FlowMatchScheduler("Wan")`, and against
//! its own committed table.
//!
//! `tests/golden/schedule_*.csv` are written by `python -m flowstep_export.reference.schedule_goldens`
//! (DiffSynth 2.1.12, torch float32 linspace, on an AMD EPYC with AVX2);
//! `export/tests/test_schedule_reference.py` checks they are still what DiffSynth computes on
//! the machine running the tests, within the spread PyTorch's CPU kernels allow.
//!
//! Sigmas and timesteps must be bit-identical to that golden (flowstep follows torch's
//! fused-multiply-add linspace, as its AVX2/AVX-512 kernels compute it). Weights must agree
//! within 1e-6 relative, or within 3.2e-7 absolute: torch's vectorised expf is 1 ulp off the
//! correctly rounded exp(-2z²) at ~1% of entries (6e-8 at y ≈ 0.6-1), and
//! `w = (y - min y)·1000/Σ` multiplies that by 1000/189.5 = 5.3, which for small weights is
//! more than 1e-6 relative.
//!
//! flowstep's own table is one fixed table on every CPU (IEEE arithmetic, a software fma,
//! libm's exp and a sequential f64 sum; nothing depends on the instruction set or on
//! threads), so it is also compared bit for bit with `tests/golden/flowstep_schedule_*.csv`.
//! A deliberate change to the table regenerates those files, and says so in the commit:
//!   for each case: flowstep schedule --csv --steps N --shift S --denoising-strength D \
//!       > tests/golden/flowstep_schedule_nN_shiftS_dD.csv

use std::path::Path;

use flowstep::scheduler::FlowMatchScheduler;

struct Row {
    sigma: f64,
    timestep: f64,
    weight: f64,
}

fn read_golden(name: &str) -> Vec<Row> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut lines = text.lines();
    assert_eq!(lines.next(), Some("index,sigma,timestep,weight"));
    lines
        .map(|line| {
            let v: Vec<f64> = line.split(',').map(|x| x.parse().unwrap_or(f64::NAN)).collect();
            Row { sigma: v[1], timestep: v[2], weight: v[3] }
        })
        .collect()
}

fn assert_weight(i: usize, got: f32, want: f64) {
    let err = (got as f64 - want).abs();
    assert!(err <= (1e-6 * want.abs()).max(3.2e-7), "weight[{i}]: got {got}, DiffSynth {want}");
}

fn check(name: &str, steps: usize, shift: f32, strength: f64) {
    let golden = read_golden(name);
    let s = FlowMatchScheduler::training(steps, strength, shift);
    assert_eq!(s.len(), golden.len());
    let weights = s.weights.clone().unwrap_or_default();
    for (i, row) in golden.iter().enumerate() {
        assert_eq!(s.sigmas[i] as f64, row.sigma, "sigma[{i}]");
        assert_eq!(s.timesteps[i] as f64, row.timestep, "timestep[{i}]");
        assert_weight(i, weights[i], row.weight);
    }
    check_own_table(&format!("flowstep_{name}"), &s);
}

/// Bit-for-bit against flowstep's own committed table (`flowstep schedule --csv` prints each
/// float32 in the shortest form that parses back to the same float32).
fn check_own_table(name: &str, s: &FlowMatchScheduler) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden").join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let rows: Vec<Vec<f32>> =
        text.lines().skip(1).map(|line| line.split(',').map(|x| x.parse().unwrap_or(f32::NAN)).collect()).collect();
    assert_eq!(rows.len(), s.len(), "{name}");
    let weights = s.weights.clone().unwrap_or_default();
    for (i, row) in rows.iter().enumerate() {
        let got = [i as f32, s.sigmas[i], s.timesteps[i], weights[i]];
        assert_eq!(row.iter().map(|v| v.to_bits()).collect::<Vec<_>>(), got.map(f32::to_bits), "{name} row {i}");
    }
}

#[test]
fn n1000_shift5() {
    check("schedule_n1000_shift5_d1.csv", 1000, 5.0, 1.0);
}

#[test]
fn n50_shift5() {
    check("schedule_n50_shift5_d1.csv", 50, 5.0, 1.0);
}

#[test]
fn n1000_shift3() {
    check("schedule_n1000_shift3_d1.csv", 1000, 3.0, 1.0);
}

#[test]
fn n30_denoising_strength_07() {
    check("schedule_n30_shift5_d0.7.csv", 30, 5.0, 0.7);
}
