//! cosine-train: train image classifiers from scratch on small datasets with cosine loss (Barz &
//! Denzler, WACV 2020) and the usual alternatives, on one CPU or many GPU nodes.
//!
//! The binary (`src/main.rs`) only parses the command line and dispatches to the modules here.

pub mod bench_loader;
pub mod bench_step;
pub mod check_dist;
pub mod checkpoint;
pub mod cli;
pub mod config;
pub mod data;
pub mod dist;
pub mod doctor;
pub mod embedding;
pub mod eval_run;
pub mod hierarchy;
pub mod job;
pub mod model;
pub mod objective;
pub mod optim;
pub mod report;
pub mod runtime;
pub mod schedule;
pub mod tensors;
pub mod train;
