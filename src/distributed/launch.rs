//! How this process was started, read from the launcher's environment: mpirun/mpiexec/srun
//! (MPI finds the ranks itself), torchrun (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR,
//! MASTER_PORT and its TCPStore), or neither. Launches whose processes would each train a
//! separate copy are refused here.

use std::time::{Duration, Instant};

use super::Store;
use crate::error::{Error, Result};

/// How long ranks wait for each other at the store before giving up.
const RENDEZVOUS_TIMEOUT: Duration = Duration::from_secs(300);

#[derive(Debug, Clone, PartialEq)]
pub enum Launch {
    /// One process.
    Alone,
    /// Started by an MPI launcher; `stated_size` is the world size its environment states
    /// (`stated_by` names the variable), checked against MPI's own.
    Mpi { stated_size: Option<usize>, stated_by: &'static str },
    /// Started by torchrun (or anything that sets its variables).
    Torchrun { rank: usize, world_size: usize, local_rank: usize, master_addr: String, master_port: u16 },
}

impl Launch {
    /// Reads the launch from the environment.
    pub fn from_env() -> Result<Self> {
        Self::from_vars(|name| std::env::var(name).ok())
    }

    /// The same from any variable source (tests).
    pub fn from_vars(var: impl Fn(&str) -> Option<String>) -> Result<Self> {
        let number = |name: &'static str| -> Result<Option<usize>> {
            var(name).map(|v| v.trim().parse::<usize>().map_err(|_| Error::Distributed(format!("{name}={v:?} is not a number")))).transpose()
        };
        let world_size = number("WORLD_SIZE")?;
        // MPICH's Hydra and SLURM's PMI set PMI_SIZE; Open MPI sets OMPI_COMM_WORLD_SIZE; PMIx launchers PMIX_RANK.
        for stated_by in ["PMI_SIZE", "OMPI_COMM_WORLD_SIZE"] {
            if let Some(size) = number(stated_by)? {
                if let Some(w) = world_size
                    && w != size
                {
                    return Err(Error::Distributed(format!("WORLD_SIZE={w} disagrees with the MPI launcher's {stated_by}={size}; unset WORLD_SIZE or launch {w} ranks")));
                }
                return Ok(if size > 1 { Launch::Mpi { stated_size: Some(size), stated_by } } else { Launch::Alone });
            }
        }
        if var("PMIX_RANK").is_some() {
            return Ok(Launch::Mpi { stated_size: world_size, stated_by: "WORLD_SIZE" });
        }
        if let Some(tasks) = number("SLURM_NTASKS")?.filter(|&n| n > 1)
            && var("SLURM_PROCID").is_some()
            && world_size.is_none()
        {
            return Err(Error::Distributed(format!(
                "srun started {tasks} tasks without an MPI environment (no PMI_SIZE), so each would train its own copy; run srun --mpi=pmi2 (or the MPI plugin of your cluster)"
            )));
        }
        let Some(world_size) = world_size.filter(|&w| w > 1) else { return Ok(Launch::Alone) };
        let required = |name: &'static str| {
            var(name).ok_or_else(|| Error::Distributed(format!("WORLD_SIZE={world_size} but {name} is not set: launch with torchrun (or mpirun), which sets it")))
        };
        let rank = required("RANK")?;
        let rank = rank.trim().parse::<usize>().ok().filter(|&r| r < world_size).ok_or_else(|| Error::Distributed(format!("RANK={rank:?} is not a rank of WORLD_SIZE={world_size}")))?;
        let local_rank = number("LOCAL_RANK")?.unwrap_or(0);
        let master_addr = required("MASTER_ADDR")?;
        let port = required("MASTER_PORT")?;
        let master_port = port.trim().parse::<u16>().map_err(|_| Error::Distributed(format!("MASTER_PORT={port:?} is not a port number")))?;
        Ok(Launch::Torchrun { rank, world_size, local_rank, master_addr, master_port })
    }

    /// The GPU this rank uses: LOCAL_RANK under torchrun, MPI's local rank variables under
    /// mpirun/srun, 0 alone.
    pub fn local_rank(&self) -> usize {
        match self {
            Launch::Torchrun { local_rank, .. } => *local_rank,
            Launch::Mpi { .. } => ["MPI_LOCALRANKID", "OMPI_COMM_WORLD_LOCAL_RANK", "SLURM_LOCALID", "LOCAL_RANK"]
                .iter()
                .find_map(|name| std::env::var(name).ok().and_then(|v| v.trim().parse().ok()))
                .unwrap_or(0),
            Launch::Alone => 0,
        }
    }
}

/// Prints a failing process's error line, and under a launcher of several processes (or one
/// whose launch was refused) lets the launcher pass it on before the process ends. One write,
/// so that the launcher cannot split the line (a test saw it cut at "error: rank 1 of ");
/// then a pause: MPICH's Hydra forwards output asynchronously, and a rank that printed and
/// ended at once could lose the line, or under load take Hydra's mpiexec down with SIGPIPE,
/// nothing printed (11 of 200 launches of two ranks that printed and exited; none of 200 with
/// this pause).
pub fn report_failure(message: &str) {
    use std::io::Write;
    let _ = std::io::stderr().write_all(format!("error: {message}\n").as_bytes());
    if !matches!(Launch::from_env(), Ok(Launch::Alone)) {
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// A key of this torchrun run and restart, so that a restarted group never reads the last
/// group's values.
pub(super) fn store_key(name: &str) -> String {
    let run = std::env::var("TORCHELASTIC_RUN_ID").unwrap_or_default();
    let restart = std::env::var("TORCHELASTIC_RESTART_COUNT").unwrap_or_default();
    format!("flowstep/{run}/{restart}/{name}")
}

/// Connects to the store and waits until all `world_size` ranks have counted themselves in;
/// more ranks than that is a WORLD_SIZE set differently across them.
pub(super) fn rendezvous(host: &str, port: u16, rank: usize, world_size: usize) -> Result<Store> {
    let mut store = Store::connect(host, port, RENDEZVOUS_TIMEOUT)?;
    let key = store_key("joined");
    let deadline = Instant::now() + RENDEZVOUS_TIMEOUT;
    let mut joined = store.add(&key, 1)?;
    loop {
        if joined > world_size as i64 {
            return Err(Error::Distributed(format!("rank {rank}: {joined} ranks joined at {host}:{port}, more than WORLD_SIZE={world_size}")));
        }
        if joined == world_size as i64 {
            return Ok(store);
        }
        if Instant::now() >= deadline {
            return Err(Error::Distributed(format!("rank {rank}: only {joined} of WORLD_SIZE={world_size} ranks joined at {host}:{port} within {} s", RENDEZVOUS_TIMEOUT.as_secs())));
        }
        std::thread::sleep(Duration::from_millis(20));
        joined = store.add(&key, 0)?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(vars: &[(&str, &str)]) -> Result<Launch> {
        Launch::from_vars(|name| vars.iter().find(|(k, _)| *k == name).map(|(_, v)| v.to_string()))
    }

    fn refused(vars: &[(&str, &str)], expect: &str) {
        match launch(vars) {
            Err(e) => assert!(e.to_string().contains(expect), "{e}"),
            Ok(l) => panic!("{vars:?} was accepted as {l:?}"),
        }
    }

    #[test]
    fn launches_read_from_the_environment() {
        assert_eq!(launch(&[]).ok(), Some(Launch::Alone));
        assert_eq!(launch(&[("PMI_SIZE", "1"), ("PMI_RANK", "0")]).ok(), Some(Launch::Alone));
        assert_eq!(launch(&[("PMI_SIZE", "4"), ("PMI_RANK", "2")]).ok(), Some(Launch::Mpi { stated_size: Some(4), stated_by: "PMI_SIZE" }));
        assert_eq!(launch(&[("OMPI_COMM_WORLD_SIZE", "2"), ("WORLD_SIZE", "2")]).ok(), Some(Launch::Mpi { stated_size: Some(2), stated_by: "OMPI_COMM_WORLD_SIZE" }));
        let torchrun = [("WORLD_SIZE", "2"), ("RANK", "1"), ("LOCAL_RANK", "1"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "29500")];
        assert_eq!(launch(&torchrun).ok(), Some(Launch::Torchrun { rank: 1, world_size: 2, local_rank: 1, master_addr: "h".into(), master_port: 29500 }));
        // torchrun with one process is a plain run.
        assert_eq!(launch(&[("WORLD_SIZE", "1"), ("RANK", "0")]).ok(), Some(Launch::Alone));
    }

    /// Each launch that would train separate copies, or cannot be joined, is one line naming
    /// the variable (removing any one check accepts its launch here).
    #[test]
    fn launches_that_would_train_copies_are_refused() {
        refused(&[("PMI_SIZE", "2"), ("WORLD_SIZE", "3")], "WORLD_SIZE=3 disagrees with the MPI launcher's PMI_SIZE=2");
        refused(&[("SLURM_NTASKS", "4"), ("SLURM_PROCID", "0")], "srun started 4 tasks without an MPI environment");
        refused(&[("WORLD_SIZE", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")], "RANK is not set");
        refused(&[("WORLD_SIZE", "2"), ("RANK", "2"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "1")], "RANK=\"2\" is not a rank of WORLD_SIZE=2");
        refused(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_PORT", "1")], "MASTER_ADDR is not set");
        refused(&[("WORLD_SIZE", "2"), ("RANK", "0"), ("MASTER_ADDR", "h"), ("MASTER_PORT", "x")], "MASTER_PORT=\"x\" is not a port number");
        refused(&[("WORLD_SIZE", "two")], "WORLD_SIZE=\"two\" is not a number");
    }
}
