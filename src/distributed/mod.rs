//! Data-parallel training over W ranks (docs/DESIGN.md §4a): how this
//! process was launched (mpirun/srun, torchrun, or alone), and the collective library that
//! sums gradients and step counts across the ranks: MPI for CPU ranks (mpi.rs), NCCL for
//! CUDA ranks (nccl.rs). Both are opened at run time, so building needs neither.

mod launch;
mod mpi;
mod nccl;
mod store;

pub use launch::{Launch, report_failure};
pub use store::Store;

use libloading::Library;
use ort::value::Tensor;

use crate::error::{Error, Result};
use crate::runtime::Device;

/// This process's place among the ranks, and how they sum.
pub struct Ranks {
    rank: usize,
    world_size: usize,
    engine: Engine,
}

enum Engine {
    Alone,
    Mpi(mpi::Mpi),
    Nccl(nccl::Nccl),
}

impl Ranks {
    /// One process: sums are the values themselves.
    pub fn alone() -> Self {
        Self { rank: 0, world_size: 1, engine: Engine::Alone }
    }

    /// Joins the other ranks of `launch` for training on `device` (a CUDA device's index is
    /// the rank's LOCAL_RANK). Refuses, in one line, launches whose ranks would not sum.
    pub fn join(launch: &Launch, device: Device) -> Result<Self> {
        match launch {
            Launch::Alone => Ok(Self::alone()),
            Launch::Mpi { stated_size, stated_by } => {
                let library = std::env::var("FLOWSTEP_MPI_LIB").unwrap_or_else(|_| mpi::DEFAULT_LIBRARY.into());
                let mpi = mpi::Mpi::init(&library)?;
                let (rank, world_size) = (mpi.rank, mpi.size);
                if let Some(stated) = stated_size
                    && *stated != world_size
                {
                    return Err(unfinalized(mpi, Error::Distributed(format!(
                        "{stated_by} says {stated} ranks but MPI ({library}) sees {world_size}: the launcher and the MPI library are from different MPIs; \
                         the ranks would train separate copies"
                    ))));
                }
                if device.is_gpu() {
                    return Self::nccl_over_mpi(mpi, rank, world_size, device);
                }
                Ok(Self { rank, world_size, engine: Engine::Mpi(mpi) })
            }
            Launch::Torchrun { rank, world_size, master_addr, master_port, .. } => {
                let store = launch::rendezvous(master_addr, *master_port, *rank, *world_size)?;
                if !device.is_gpu() {
                    return Err(Error::Distributed(format!(
                        "torchrun started {world_size} ranks (they met at its store, {master_addr}:{master_port}); torchrun ranks sum gradients with NCCL on CUDA devices, \
                         so for --device cpu start them with mpirun -n {world_size} (MPI)"
                    )));
                }
                Self::nccl_over_store(store, *rank, *world_size, device)
            }
        }
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world_size(&self) -> usize {
        self.world_size
    }

    /// Rank 0 writes the run's files; the others only compute.
    pub fn writes_files(&self) -> bool {
        self.rank == 0
    }

    /// Sums `values` over the ranks, in place (host scalars: counts, loss sums, flags).
    pub fn sum(&mut self, values: &mut [f64]) -> Result<()> {
        match &mut self.engine {
            Engine::Alone => Ok(()),
            Engine::Mpi(mpi) => mpi.sum_f64(values),
            Engine::Nccl(nccl) => nccl.sum_host(values),
        }
    }

    /// Sums a gradient buffer over the ranks, in place where it lives (host or device).
    pub fn sum_gradient(&mut self, gradient: &mut Tensor<f32>) -> Result<()> {
        match &mut self.engine {
            Engine::Alone => Ok(()),
            Engine::Mpi(mpi) => mpi.sum_f32(gradient.extract_tensor_mut().1),
            Engine::Nccl(nccl) => nccl.sum_device(gradient),
        }
    }

    /// After this rank failed: stops every rank (MPI_Abort, or NCCL's abort and an exit that
    /// torchrun answers by stopping the others), so that none waits on a collective forever.
    pub fn abort(self) -> ! {
        match &self.engine {
            Engine::Alone => {}
            Engine::Mpi(mpi) => mpi.abort(1),
            Engine::Nccl(nccl) => nccl.abort(),
        }
        std::process::exit(1)
    }

    fn nccl_over_mpi(mpi: mpi::Mpi, rank: usize, world_size: usize, device: Device) -> Result<Self> {
        let joined = (|| {
            let mut id = if rank == 0 { nccl::Nccl::unique_id()? } else { [0; nccl::UNIQUE_ID_BYTES] };
            mpi.broadcast(&mut id)?;
            nccl::Nccl::init(&id, rank, world_size, device)
        })();
        match joined {
            // MPI stays initialized for the life of the run: its launcher tracks the ranks.
            Ok(nccl) => Ok(Self { rank, world_size, engine: Engine::Nccl(nccl.keeping_mpi(mpi)) }),
            Err(e) => Err(unfinalized(mpi, e)),
        }
    }

    fn nccl_over_store(mut store: Store, rank: usize, world_size: usize, device: Device) -> Result<Self> {
        let key = launch::store_key("nccl-unique-id");
        let id = if rank == 0 {
            let id = nccl::Nccl::unique_id()?;
            store.set(&key, &id)?;
            id
        } else {
            let value = store.get(&key)?;
            value.try_into().map_err(|v: Vec<u8>| Error::Distributed(format!("the store's NCCL unique id has {} bytes, not {}", v.len(), nccl::UNIQUE_ID_BYTES)))?
        };
        let nccl = nccl::Nccl::init(&id, rank, world_size, device)?;
        Ok(Self { rank, world_size, engine: Engine::Nccl(nccl) })
    }
}

/// A failure while joining: MPI is left unfinalized (MPI_Finalize would wait for ranks
/// that wait for this one), so that this rank's exit makes the launcher end them all.
fn unfinalized(mpi: mpi::Mpi, error: Error) -> Error {
    std::mem::forget(mpi);
    error
}

/// The function `name` of `lib` as the pointer type `T`.
///
/// # Safety
/// `T` must be the symbol's C signature.
pub(super) unsafe fn symbol<T: Copy>(lib: &Library, name: &str) -> Result<T> {
    // SAFETY: per this function's contract.
    unsafe { lib.get::<T>(format!("{name}\0").as_bytes()) }.map(|s| *s).map_err(|e| Error::Distributed(format!("no {name}: {e}")))
}
