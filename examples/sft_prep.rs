//! Time to draw one SFT step's inputs (noise, x_t, target) for a real Wan latent
//! ([16, 21, 60, 104]: 81 frames at 480×832), on all cores and on one.
//!
//! cargo run --release --example sft_prep

use std::time::Instant;

use flowstep::sft::{SftConfig, SftSampler};

fn main() -> flowstep::Result<()> {
    let n = 16 * 21 * 60 * 104;
    let x0: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) / 48.0).collect();
    let (mut x_t, mut target) = (vec![0.0f32; n], vec![0.0f32; n]);
    let sampler = SftSampler::new(SftConfig::default(), 0)?;
    for (label, threads) in [("all cores", 0usize), ("1 thread", 1)] {
        let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().map_err(|e| flowstep::Error::Config(e.to_string()))?;
        let mut times = Vec::new();
        pool.install(|| -> flowstep::Result<()> {
            for step in 0..12 {
                let t = Instant::now();
                sampler.prepare_into(step, &x0, &mut x_t, &mut target)?;
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
            Ok(())
        })?;
        times.sort_by(f64::total_cmp);
        println!("[16, 21, 60, 104] ({n} values), {label} ({} threads): median {:.1} ms, min {:.1} ms",
            pool.current_num_threads(), times[times.len() / 2], times[0]);
    }
    Ok(())
}
