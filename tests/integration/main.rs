//! Integration tests: the real binaries, real libtorch, real `mpirun`. One test crate (every
//! test binary links libtorch, which is slow to link and large), one module per theme.

mod architecture;
mod cli;
mod cluster;
mod compat;
mod distributed;
mod embeddings;
mod launch;
mod library;
mod libtorch_cpu;
mod model;
mod mpi;
mod predict;
mod report;
mod resume;
mod setup;
mod subsets;
mod sweep;
mod training;
mod util;
