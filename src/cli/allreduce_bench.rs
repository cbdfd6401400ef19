//! `flowstep allreduce-bench` (hidden): times the gradient all-reduce of data-parallel
//! training, started as the ranks of a training run would be (mpirun, torchrun), on a buffer
//! of a LoRA gradient's size on the training device (BENCHMARKS.md, scripts/gpu_data_parallel.sh).

use std::process::ExitCode;
use std::time::Instant;

use flowstep::distributed::{Launch, Ranks};
use flowstep::executor::DeviceMemory;
use flowstep::runtime::Device;

use super::{DeviceArgs, Globals};

#[derive(Debug, clap::Args)]
pub struct Args {
    /// Buffer size in MiB of float32 (the Wan2.1 1.3B rank-32 LoRA: 167; 14B: 586).
    #[arg(long, default_value_t = 167.0)]
    pub mib: f64,

    /// Timed all-reduces, after one untimed.
    #[arg(long, default_value_t = 5)]
    pub repeat: usize,

    #[command(flatten)]
    pub device: DeviceArgs,
}

pub fn run(args: Args, globals: &Globals) -> anyhow::Result<ExitCode> {
    anyhow::ensure!(args.mib.is_finite() && args.mib > 0.0 && args.mib < 65536.0, "--mib must be in (0, 65536), got {}", args.mib);
    anyhow::ensure!(args.repeat >= 1, "--repeat must be at least 1");
    let launch = Launch::from_env()?;
    let mut device_args = args.device;
    if let Device::Cuda(_) = device_args.device {
        device_args.device = Device::Cuda(launch.local_rank() as i32);
    }
    let session = super::init_runtime(globals, &device_args)?;
    let mut ranks = Ranks::join(&launch, session.device)?;
    let values = (args.mib * (1 << 20) as f64 / 4.0) as usize;
    let memory = DeviceMemory::new(session.device);
    let mut buffer = memory.tensor(&[values], &vec![1.0f32; values])?;
    ranks.sum_gradient(&mut buffer)?;
    let mut seconds = Vec::with_capacity(args.repeat);
    for _ in 0..args.repeat {
        let t = Instant::now();
        ranks.sum_gradient(&mut buffer)?;
        seconds.push(t.elapsed().as_secs_f64());
    }
    // Every element went through 1 + repeat sums of W ones' worth of values.
    let expected = (ranks.world_size() as f64).powi(1 + args.repeat as i32) as f32;
    let got = memory.read(&buffer)?;
    anyhow::ensure!(got.iter().all(|&v| v == expected), "all-reduce result {} where {expected} was expected", got[0]);
    if ranks.writes_files() {
        seconds.sort_by(f64::total_cmp);
        let median = seconds[seconds.len() / 2];
        println!(
            "{{\"ranks\": {}, \"device\": \"{}\", \"mib\": {}, \"median_seconds\": {median:.6}, \"min_seconds\": {:.6}, \"gb_per_second\": {:.3}}}",
            ranks.world_size(),
            session.device,
            args.mib,
            seconds[0],
            args.mib * (1 << 20) as f64 / median / 1e9
        );
    }
    Ok(ExitCode::SUCCESS)
}
