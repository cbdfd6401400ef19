//! MPI, opened at run time through the MPICH ABI (MPICH, Intel MPI, Cray MPICH, MVAPICH):
//! building needs no MPI headers or compiler wrapper, and a rank uses the MPI library of the
//! launcher that started it. Only the calls data parallelism needs are bound.

use std::ffi::{c_char, c_int, c_void};

use libloading::Library;

use super::symbol;
use crate::error::{Error, Result};

/// Handles and constants of the MPICH ABI (`mpi.h` of MPICH 3.1 and later, unchanged since).
type Comm = c_int;
type Datatype = c_int;
type Op = c_int;
const COMM_WORLD: Comm = 0x4400_0000;
const FLOAT: Datatype = 0x4c00_040a;
const DOUBLE: Datatype = 0x4c00_080b;
const BYTE: Datatype = 0x4c00_010d;
const SUM: Op = 0x5800_0003;
const SUCCESS: c_int = 0;
/// `MPI_IN_PLACE` is `(void *) -1` in this ABI.
const IN_PLACE: *const c_void = usize::MAX as *const c_void;
/// The most elements one call sums: MPI counts are C ints.
const MAX_COUNT: usize = 1 << 30;

/// The library that names itself in `FLOWSTEP_MPI_LIB`, else the MPICH ABI's soname.
pub const DEFAULT_LIBRARY: &str = "libmpi.so.12";

type InitFn = unsafe extern "C" fn(*mut c_int, *mut *mut *mut c_char) -> c_int;
type CommQueryFn = unsafe extern "C" fn(Comm, *mut c_int) -> c_int;
type AllreduceFn = unsafe extern "C" fn(*const c_void, *mut c_void, c_int, Datatype, Op, Comm) -> c_int;
type BcastFn = unsafe extern "C" fn(*mut c_void, c_int, Datatype, c_int, Comm) -> c_int;
type AbortFn = unsafe extern "C" fn(Comm, c_int) -> c_int;
type FinalizeFn = unsafe extern "C" fn() -> c_int;

/// MPI_COMM_WORLD of an initialized MPI; finalized on drop.
pub struct Mpi {
    allreduce: AllreduceFn,
    bcast: BcastFn,
    abort: AbortFn,
    finalize: FinalizeFn,
    pub rank: usize,
    pub size: usize,
    /// Kept open for the function pointers above.
    _library: Library,
}

impl Mpi {
    /// Opens `library`, initializes MPI and reads this process's rank and the world size.
    pub fn init(library: &str) -> Result<Self> {
        let fail = |what: String| Error::Distributed(format!("MPI library {library}: {what}"));
        // SAFETY: loading runs the library's initializers; an MPI library has none that
        // touch this process's state beyond its own.
        let lib = unsafe { Library::new(library) }.map_err(|e| {
            fail(format!("cannot be opened ({e}); install MPICH with scripts/setup_mpi.sh, or set FLOWSTEP_MPI_LIB to an MPICH-ABI libmpi.so.12"))
        })?;
        // SAFETY: Open MPI exports this object; reading its address calls nothing.
        if unsafe { lib.get::<*const c_void>(b"ompi_mpi_comm_world\0") }.is_ok() {
            return Err(fail("is Open MPI, whose ABI flowstep does not bind; use MPICH (scripts/setup_mpi.sh) or another MPICH-ABI MPI (Intel MPI, Cray MPICH, MVAPICH)".into()));
        }
        // SAFETY: each symbol has the C signature of MPI's standard binding in the MPICH ABI
        // that the variable it is read into declares.
        let (init, comm_rank, comm_size, allreduce, bcast, abort, finalize): (InitFn, CommQueryFn, CommQueryFn, AllreduceFn, BcastFn, AbortFn, FinalizeFn) = unsafe {
            (
                symbol(&lib, "MPI_Init")?,
                symbol(&lib, "MPI_Comm_rank")?,
                symbol(&lib, "MPI_Comm_size")?,
                symbol(&lib, "MPI_Allreduce")?,
                symbol(&lib, "MPI_Bcast")?,
                symbol(&lib, "MPI_Abort")?,
                symbol(&lib, "MPI_Finalize")?,
            )
        };
        let (mut rank, mut size) = (0, 0);
        // SAFETY: MPI_Init accepts null argc/argv; the out-pointers are valid ints.
        unsafe {
            check("MPI_Init", init(std::ptr::null_mut(), std::ptr::null_mut()))?;
            check("MPI_Comm_rank", comm_rank(COMM_WORLD, &mut rank))?;
            check("MPI_Comm_size", comm_size(COMM_WORLD, &mut size))?;
        }
        Ok(Self { allreduce, bcast, abort, finalize, rank: rank as usize, size: size as usize, _library: lib })
    }

    /// Sums `values` over every rank, in place.
    pub fn sum_f32(&self, values: &mut [f32]) -> Result<()> {
        for chunk in values.chunks_mut(MAX_COUNT) {
            // SAFETY: the buffer holds chunk.len() floats; MPI_IN_PLACE reads and writes it.
            check("MPI_Allreduce", unsafe { (self.allreduce)(IN_PLACE, chunk.as_mut_ptr().cast(), chunk.len() as c_int, FLOAT, SUM, COMM_WORLD) })?;
        }
        Ok(())
    }

    /// Sums `values` over every rank, in place.
    pub fn sum_f64(&self, values: &mut [f64]) -> Result<()> {
        // SAFETY: as sum_f32; these vectors are a few values long.
        check("MPI_Allreduce", unsafe { (self.allreduce)(IN_PLACE, values.as_mut_ptr().cast(), values.len() as c_int, DOUBLE, SUM, COMM_WORLD) })
    }

    /// Rank 0's `bytes` on every rank.
    pub fn broadcast(&self, bytes: &mut [u8]) -> Result<()> {
        // SAFETY: the buffer holds bytes.len() bytes on every rank.
        check("MPI_Bcast", unsafe { (self.bcast)(bytes.as_mut_ptr().cast(), bytes.len() as c_int, BYTE, 0, COMM_WORLD) })
    }

    /// Ends every rank of the job (the launcher kills the others).
    pub fn abort(&self, code: i32) {
        // SAFETY: valid at any point after MPI_Init.
        unsafe { (self.abort)(COMM_WORLD, code) };
    }
}

impl Drop for Mpi {
    fn drop(&mut self) {
        // SAFETY: every rank reaches this after its last collective.
        unsafe { (self.finalize)() };
    }
}

fn check(call: &str, code: c_int) -> Result<()> {
    if code == SUCCESS { Ok(()) } else { Err(Error::Distributed(format!("{call} failed with MPI error code {code}"))) }
}
