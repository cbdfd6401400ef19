//! Data-parallel training on MPI ranks (MPICH from scripts/setup_mpi.sh) and the torchrun
//! launch path against the pinned torch's own TCPStore. Each test names how it was shown to
//! fail when the code is wrong.
//!
//! Tolerances: W ranks sum their gradients (and loss sums) in an order of MPI's choosing,
//! one process in micro-step order. For W = 2 the two orders are the same sum, `0 + g0 + g1`
//! and `g0 + g1` (float addition commutes), so the results are identical; for W = 4 MPI may
//! add `(g0 + g1) + (g2 + g3)`, which differs from `((g0 + g1) + g2) + g3` by a few float32
//! ulps of the gradient; AdamW's m/√v carries that relative error into the update, so the
//! LoRA after 3 steps at lr 2e-3 may differ by ~1e-6 of the update size: 1e-6 absolute on
//! parameters of size ~1e-2, far below a one-sample change (~1e-3).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::*;
use flowstep::metrics::read_jsonl;

/// The MPICH prefix: $FLOWSTEP_MPI_PREFIX, or the one scripts/setup_mpi.sh installs.
fn mpi_prefix() -> PathBuf {
    if let Ok(p) = std::env::var("FLOWSTEP_MPI_PREFIX") {
        return PathBuf::from(p);
    }
    let out = Command::new(repo().join("scripts/setup_mpi.sh")).output().unwrap_or_else(|e| panic!("scripts/setup_mpi.sh: {e}"));
    assert!(out.status.success(), "scripts/setup_mpi.sh failed: {}", stderr(&out));
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Waits for `child` up to `secs`, killing it (and failing the test) past that.
fn wait_limited(mut child: std::process::Child, secs: u64, what: &str) -> Output {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while child.try_wait().ok().flatten().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!("{what} still running after {secs} s");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap_or_else(|e| panic!("{e}"))
}

fn mpiexec_command(ranks: usize, args: &[&str]) -> Command {
    let prefix = mpi_prefix();
    let mut cmd = Command::new(prefix.join("bin/mpiexec"));
    cmd.args(["-n", &ranks.to_string(), env!("CARGO_BIN_EXE_flowstep")])
        .args(args)
        .env("FLOWSTEP_MPI_LIB", prefix.join("lib/libmpi.so.12"))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    cmd
}

/// `flowstep ARGS` as `ranks` MPI ranks (one thread each: the machine has few cores).
fn mpiexec(ranks: usize, args: &[&str]) -> Output {
    let child = mpiexec_command(ranks, args).spawn().unwrap_or_else(|e| panic!("mpiexec: {e}"));
    wait_limited(child, 180, "mpiexec")
}

fn train_args<'a>(art: &'a Path, data: &'a Path, out: &'a Path, steps: &'a str, extra: &[&'a str]) -> Vec<&'a str> {
    let mut args = vec!["-q", "train", "--artifacts", path_str(art), "--data", path_str(data), "--out", path_str(out), "--steps", steps, "--seed", "5", "--lr", "2e-3", "--threads", "1"];
    args.extend_from_slice(extra);
    args
}

fn single(art: &Path, data: &Path, out: &Path, steps: &str, extra: &[&str]) -> Output {
    flowstep(&train_args(art, data, out, steps, extra))
}

fn ok(r: &Output, what: &str) {
    assert!(r.status.success(), "{what} failed:\n{}", stderr(r));
}

fn losses(out: &Path) -> Vec<f64> {
    read_jsonl(&out.join("metrics.jsonl")).unwrap_or_else(|e| panic!("{e}")).iter().map(|r| r.loss).collect()
}

fn lora(out: &Path) -> Vec<f32> {
    lora_contents(&out.join("lora.safetensors")).0.into_values().flatten().collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// W = 2 and W = 4 ranks with --grad-accum 1 equal one process with --grad-accum W: the loss
/// of every step and the final LoRA (W = 2 exactly, W = 4 within the tolerance above).
/// Shown to fail (mutations run by hand): with every rank taking the step's first counters
/// (`first + k·W` without `+ rank`), and with the gradient sum left out of sum_over_ranks, the
/// W=2 losses differ.
#[test]
fn ranks_equal_one_process_with_grad_accum_w() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 6, 3);
    for w in [2usize, 4] {
        let one = dir.path().join(format!("one-{w}"));
        ok(&single(&art, &data, &one, "3", &["--grad-accum", &w.to_string()]), "one process");
        let ranks = dir.path().join(format!("ranks-{w}"));
        let r = mpiexec(w, &train_args(&art, &data, &ranks, "3", &["--grad-accum", "1"]));
        ok(&r, "mpiexec");
        let (a, b) = (losses(&one), losses(&ranks));
        assert_eq!(a.len(), 3);
        let norms = |out: &Path| read_jsonl(&out.join("metrics.jsonl")).unwrap_or_default().iter().map(|r| r.grad_norm).collect::<Vec<_>>();
        let diff = max_abs_diff(&lora(&one), &lora(&ranks));
        if w == 2 {
            assert_eq!(a, b, "W=2 losses");
            assert_eq!(norms(&one), norms(&ranks), "W=2 grad norms");
            assert_eq!(diff, 0.0, "W=2 LoRA");
        } else {
            for (x, y) in a.iter().zip(&b) {
                assert!((x - y).abs() <= 1e-9 * x.abs(), "W={w} losses {a:?} vs {b:?}");
            }
            for (x, y) in norms(&one).iter().zip(&norms(&ranks)) {
                assert!((x - y).abs() <= 1e-5 * x.abs(), "W={w} grad norms {x} vs {y}");
            }
            assert!(diff <= 1e-6, "W={w} LoRA differs by {diff}");
        }
        let metrics = read_jsonl(&ranks.join("metrics.jsonl")).unwrap_or_default();
        assert!(metrics.iter().all(|r| r.world_size == w), "metrics lines name the world size");
        let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(ranks.join("summary.json")).unwrap_or_default()).unwrap_or_default();
        assert_eq!(summary["world_size"], w, "summary.json names the world size");
        // Rank 0 alone wrote the files: one metrics line per step, not W.
        assert_eq!(metrics.len(), 3);
    }
}

/// A bad sample on rank 1 is skipped there, and the step averages rank 0's sample alone: the
/// first step equals one process that skips the same sample (data {good, bad}: both runs
/// train step 1 on the good sample's own draws), and the summary counts the skip made on
/// rank 1. Without --skip-bad-samples the bad sample stops every rank, naming rank 1.
/// Shown to fail: with the divisor `G·W` instead of the summed count the grad norm halves;
/// with skipped counts not summed over ranks the summary says 0; with the failing rank
/// returning instead of aborting, rank 0 waits on its collective and mpiexec hangs (180 s).
#[test]
fn skipped_sample_on_one_rank() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 4);
    write_sample(&data.join("sample-001.safetensors"), &[tensor("latents", &[16, 2, 8, 8], vec![f32::NAN; 2048]), tensor("context", &[16, 64], values(1024, 9))]);
    let one = dir.path().join("one");
    ok(&single(&art, &data, &one, "1", &["--skip-bad-samples"]), "one process");
    let ranks = dir.path().join("ranks");
    let r = mpiexec(2, &train_args(&art, &data, &ranks, "1", &["--skip-bad-samples"]));
    ok(&r, "mpiexec");
    assert!(stderr(&r).contains("rank 1: skipping"), "the premise: seed 5 puts the bad sample on rank 1:\n{}", stderr(&r));
    let (a, b) = (read_jsonl(&one.join("metrics.jsonl")).unwrap_or_default(), read_jsonl(&ranks.join("metrics.jsonl")).unwrap_or_default());
    assert_eq!((a[0].loss, a[0].grad_norm), (b[0].loss, b[0].grad_norm));
    assert_eq!(lora(&one), lora(&ranks));
    let summary: serde_json::Value = serde_json::from_slice(&std::fs::read(ranks.join("summary.json")).unwrap_or_default()).unwrap_or_default();
    assert_eq!(summary["skipped_samples"], 1);

    let stop = dir.path().join("stop");
    let started = Instant::now();
    let r = mpiexec(2, &train_args(&art, &data, &stop, "3", &[]));
    assert!(!r.status.success());
    let err = stderr(&r);
    assert!(err.contains("error: rank 1 of 2:") && err.contains("sample-001.safetensors") && !err.contains("panicked"), "{err}");
    assert!(started.elapsed() < Duration::from_secs(60), "the ranks stopped in {:?}", started.elapsed());
}

/// The rank process of `rank` in a run writing to `out` (its environment names the rank).
fn rank_pid(out: &Path, rank: usize) -> Option<u32> {
    let needle = path_str(out);
    std::fs::read_dir("/proc").ok()?.filter_map(|e| e.ok()).find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmdline = std::fs::read(e.path().join("cmdline")).ok()?;
        let environ = std::fs::read(e.path().join("environ")).ok()?;
        let has = |hay: &[u8], s: &str| hay.split(|&b| b == 0).any(|part| part == s.as_bytes());
        (has(&cmdline, needle) && has(&cmdline, "train") && has(&environ, &format!("PMI_RANK={rank}")) && !has(&cmdline, "-n")).then_some(pid)
    })
}

/// Killing rank 1 mid-run stops rank 0 within a bounded time (MPI's launcher ends the job,
/// naming the rank), the last checkpoint stays intact, and the run resumes from it with
/// another world size. MPICH's launcher does the stopping (a SIGKILLed rank can print
/// nothing); this test guards that it stays so, and that the checkpoint and resume work.
#[test]
fn killed_rank_stops_all_and_the_run_resumes() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 4, 5);
    let out = dir.path().join("out");
    let child = mpiexec_command(2, &train_args(&art, &data, &out, "100000", &["--save-every", "2"])).spawn().unwrap_or_else(|e| panic!("{e}"));
    let deadline = Instant::now() + Duration::from_secs(120);
    while !out.join("checkpoints/step-000004").is_dir() {
        assert!(Instant::now() < deadline, "no checkpoint of step 4 after 120 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let pid = rank_pid(&out, 1).unwrap_or_else(|| panic!("rank 1 not found"));
    let killed_at = Instant::now();
    assert!(Command::new("kill").args(["-9", &pid.to_string()]).status().is_ok_and(|s| s.success()));
    let r = wait_limited(child, 60, "mpiexec after rank 1 was killed");
    assert!(!r.status.success());
    assert!(killed_at.elapsed() < Duration::from_secs(30), "rank 0 stopped {:?} after rank 1 died", killed_at.elapsed());
    let err = String::from_utf8_lossy(&[r.stdout.as_slice(), r.stderr.as_slice()].concat()).into_owned();
    // MPICH's launcher reports the process it lost (a SIGKILLed rank prints nothing); the PID it
    // names is its own child's, which need not be the one found for rank 1 here.
    assert!(err.contains("BAD TERMINATION") && err.contains("EXIT CODE: 9"), "the launcher reports the killed rank:\n{err}");
    let (newest, _) = flowstep::checkpoint::list(&out).unwrap_or_default().last().cloned().unwrap_or_else(|| panic!("no checkpoint"));
    let resumed = single(&art, &data, &out, &(newest + 2).to_string(), &["--resume", "--grad-accum", "2"]);
    ok(&resumed, "resume with one process");
    assert_eq!(read_jsonl(&out.join("metrics.jsonl")).unwrap_or_default().len() as u64, newest + 2);
}

/// A run of 2 ranks resumed by 1 process with --grad-accum 2 (the same samples per step)
/// continues exactly: the LoRA equals an uninterrupted one-process run. Resuming with another
/// number of samples per step is refused in one line that says what would continue it.
/// Shown to fail: with `grad-accum` recorded per rank (not × ranks), the resume is refused.
#[test]
fn resume_with_another_world_size() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 4, 6);
    let whole = dir.path().join("whole");
    ok(&single(&art, &data, &whole, "4", &["--grad-accum", "2"]), "one process");
    let out = dir.path().join("out");
    ok(&mpiexec(2, &train_args(&art, &data, &out, "4", &["--stop-after", "2"])), "2 ranks");
    let refused = single(&art, &data, &out, "4", &["--resume"]);
    assert_error(&refused, &["2 samples per step", "2 rank(s) × --grad-accum 1", "--grad-accum 2 with 1 ranks"]);
    let r = single(&art, &data, &out, "4", &["--resume", "--grad-accum", "2"]);
    ok(&r, "resume");
    assert_eq!(lora(&whole), lora(&out));
    assert_eq!(losses(&whole), losses(&out));
}

/// Launches that would train separate copies are refused in one line: WORLD_SIZE that
/// disagrees with the MPI launcher's, and torchrun ranks on the CPU (which meet through
/// torchrun's own TCPStore first). Shown to fail: without the device check the torchrun ranks
/// train as two separate processes (the second fails on OUT's lock); the environment checks
/// are mutated in src/distributed/launch.rs's unit tests.
#[test]
fn refused_launches() {
    let dir = tempdir();
    let art = tiny_artifacts();
    let data = dir.path().join("data");
    tiny_dataset(&data, 2, 7);
    let out = dir.path().join("out");
    let mut cmd = mpiexec_command(2, &train_args(&art, &data, &out, "1", &[]));
    cmd.env("WORLD_SIZE", "3");
    let r = wait_limited(cmd.spawn().unwrap_or_else(|e| panic!("{e}")), 60, "mpiexec");
    assert!(!r.status.success());
    assert!(stderr(&r).contains("WORLD_SIZE=3 disagrees with the MPI launcher's PMI_SIZE=2"), "{}: {}{}", r.status, String::from_utf8_lossy(&r.stdout), stderr(&r));
    assert_untouched(&out);

    let venv = Command::new(repo().join("scripts/setup_python.sh")).output().unwrap_or_else(|e| panic!("{e}"));
    let torchrun = PathBuf::from(String::from_utf8_lossy(&venv.stdout).trim()).join("bin/torchrun");
    let mut cmd = Command::new(torchrun);
    cmd.args(["--standalone", "--nproc-per-node", "2", "--no-python", env!("CARGO_BIN_EXE_flowstep")])
        .args(train_args(&art, &data, &out, "1", &[]))
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let r = wait_limited(cmd.spawn().unwrap_or_else(|e| panic!("{e}")), 120, "torchrun");
    assert!(!r.status.success());
    let err = stderr(&r);
    assert_eq!(err.matches("error: torchrun started 2 ranks (they met at its store").count(), 2, "{err}");
    assert!(err.contains("mpirun -n 2"), "{err}");
    assert_untouched(&out);
}

/// flowstep's store client against torch's TCPStore server: a value set by flowstep reads back
/// in Python and the other way round, and ADD counts. Shown to fail with the keys sent without
/// torch's "/" prefix (flowstep's get of Python's key times out).
#[test]
fn store_client_speaks_torch_tcpstore() {
    let venv = Command::new(repo().join("scripts/setup_python.sh")).output().unwrap_or_else(|e| panic!("{e}"));
    let python = PathBuf::from(String::from_utf8_lossy(&venv.stdout).trim()).join("bin/python");
    let script = r#"
import sys, datetime
from torch.distributed import TCPStore
store = TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False, timeout=datetime.timedelta(seconds=60))
print(store.port, flush=True)
store.set("from-python", b"\x00\x01bytes")
value = store.get("from-rust")
store.set("echo", value)
store.wait(["done"])
"#;
    let mut server = Command::new(python).args(["-c", script]).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("{e}"));
    let mut port = String::new();
    {
        use std::io::BufRead;
        let stdout = server.stdout.as_mut().unwrap_or_else(|| panic!("no stdout"));
        std::io::BufReader::new(stdout).read_line(&mut port).unwrap_or_else(|e| panic!("{e}"));
    }
    let port: u16 = port.trim().parse().unwrap_or_else(|_| panic!("no port from the Python store: {port:?}"));
    let mut store = flowstep::distributed::Store::connect("127.0.0.1", port, Duration::from_secs(30)).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(store.get("from-python").unwrap_or_else(|e| panic!("{e}")), b"\x00\x01bytes");
    store.set("from-rust", &[7, 0, 255]).unwrap_or_else(|e| panic!("{e}"));
    assert_eq!(store.get("echo").unwrap_or_else(|e| panic!("{e}")), [7, 0, 255]);
    assert_eq!(store.add("count", 2).unwrap_or_else(|e| panic!("{e}")), 2);
    assert_eq!(store.add("count", 3).unwrap_or_else(|e| panic!("{e}")), 5);
    store.set("done", b"1").unwrap_or_else(|e| panic!("{e}"));
    let r = wait_limited(server, 30, "the Python store");
    assert!(r.status.success(), "{}", stderr(&r));
}

/// A Wan2.2 pair job (`--expert-artifacts`) on 2 ranks with --grad-accum 1 equals one process
/// with --grad-accum 2: each expert's micro-steps, loss and gradient are summed over the ranks,
/// so the losses, each expert's share of every step and both LoRAs are identical.
#[test]
fn pair_on_ranks_equals_one_process() {
    let dir = tempdir();
    let models = repo().join("models/tiny-a14b");
    let (high, low) = (models.join("high_noise/artifacts"), models.join("low_noise/artifacts"));
    let data = dir.path().join("data");
    tiny_dataset(&data, 3, 2);
    let pair = ["--expert-artifacts", path_str(&low)];
    let one = dir.path().join("one");
    ok(&single(&high, &data, &one, "6", &[&pair[..], &["--grad-accum", "2"]].concat()), "one process");
    let ranks = dir.path().join("ranks");
    ok(&mpiexec(2, &train_args(&high, &data, &ranks, "6", &[&pair[..], &["--grad-accum", "1"]].concat())), "mpiexec");
    let (a, b) = (read_jsonl(&one.join("metrics.jsonl")).unwrap_or_default(), read_jsonl(&ranks.join("metrics.jsonl")).unwrap_or_default());
    assert_eq!(a.len(), 6);
    assert_eq!(b.len(), 6);
    for (x, y) in a.iter().zip(&b) {
        assert_eq!((x.loss, &x.expert, &x.experts, x.grad_norm), (y.loss, &y.expert, &y.experts, y.grad_norm), "step {}", x.step);
        assert_eq!(y.world_size, 2);
    }
    for role in ["high_noise", "low_noise"] {
        let file = format!("lora_{role}.safetensors");
        assert_eq!(lora_contents(&one.join(&file)).0, lora_contents(&ranks.join(&file)).0, "{file}");
    }
}
