//! datasets-prep integration tests: the real binary on fixtures in each source's on-disk layout
//! and on real data; one test crate, one module per theme.

mod bad_input;
mod damage;
mod fixtures;
mod pickles;
mod real_data;
mod sources;
