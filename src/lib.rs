//! cosine-train: train image classifiers from scratch on small datasets with cosine loss (Barz &
//! Denzler, WACV 2020) and the usual alternatives, on one CPU or many GPU nodes.
//!
//! Modules from the bottom up; each imports only modules listed before it (see
//! `docs/ARCHITECTURE.md`):
//! * [`runtime`]: device, signals, allocator, autocast, fault injection; [`choice`]: words for
//!   enum values; [`tensors`]: helpers over a model's variables.
//! * [`model`], [`objective`], [`optim`], [`schedule`]: the math of one network.
//! * [`data`]: epoch order, augmentation, loader threads; [`dist`]: communicators and joining a
//!   job; [`embedding`]: class embeddings and hierarchies.
//! * [`config`]: the typed run configuration, presets and defaults; [`network`]: the model a
//!   configuration describes.
//! * [`run_dir`]: the files of a run directory, as types.
//! * [`train`]: the [`train::Trainer`] and its parts; [`report`]: comparing runs.
//! * [`commands`]: the command line (clap stops here); `main.rs` only calls it.

pub mod choice;
pub mod commands;
pub mod config;
pub mod data;
pub mod dist;
pub mod embedding;
pub mod libtorch_shim;
pub mod model;
pub mod network;
pub mod objective;
pub mod optim;
pub mod report;
pub mod run_dir;
pub mod runtime;
pub mod schedule;
pub mod tensors;
pub mod train;
