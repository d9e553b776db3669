//! Joining the job: the communicator (with its collective watchdog), this rank's device and
//! thread count, and how a failure on one rank ends every rank.

use std::time::Duration;

use super::watchdog::Watched;
use super::{Backend, Communicator, Grouping};
use crate::runtime::device::DeviceChoice;

/// How a process joins its job.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct JobOptions {
    pub backend: Backend,
    /// How long a collective may wait before the whole job is ended; zero waits forever.
    pub collective_timeout: Duration,
}

/// This process's place in its job.
pub struct Job {
    pub comm: Watched,
    pub device: tch::Device,
}

/// A process's place among the groups of a job split by [`Grouping`] (`sweep`).
pub struct Team {
    /// Every rank of the job; `None` when the job is one group (the [`Job`]'s communicator).
    pub world: Option<Box<dyn Communicator>>,
    pub group: usize,
    pub groups: usize,
}

impl Job {
    /// Connects to the job (`--dist`), picks the local rank's device and sets libtorch's thread
    /// count (`threads`, else [`default_threads`]).
    pub fn join(
        options: &JobOptions,
        device: DeviceChoice,
        threads: Option<i32>,
    ) -> anyhow::Result<Job> {
        Ok(Self::join_grouped(options, device, threads, Grouping::WHOLE)?.0)
    }

    /// [`Job::join`] for one group of a job split by `grouping`: the job's communicator is the
    /// group's, and the thread count shares the node's CPUs among all its ranks.
    pub fn join_grouped(
        options: &JobOptions,
        device: DeviceChoice,
        threads: Option<i32>,
        grouping: Grouping,
    ) -> anyhow::Result<(Job, Team)> {
        let c = super::connect_grouped(
            options.backend,
            device,
            grouping,
            options.collective_timeout,
        )?;
        let node = c.world.as_deref().unwrap_or(c.comm.as_ref());
        let threads = threads.unwrap_or_else(|| default_threads(node.local_size()));
        tch::set_num_threads(threads.max(1));
        if node.size() > 1 {
            // A panic is a bug, but on one rank of many it must still end the job at once
            // instead of leaving the others waiting in a collective.
            let abort = node.abort_handle();
            let report = std::panic::take_hook();
            std::panic::set_hook(Box::new(move |info| {
                report(info);
                abort.abort(&format!("cosine-train: internal error: {info}"), 1);
            }));
        }
        let comm = Watched::new(c.comm, options.collective_timeout);
        let team = Team {
            world: c.world,
            group: c.group,
            groups: c.groups,
        };
        Ok((
            Job {
                comm,
                device: c.device,
            },
            team,
        ))
    }

    /// Passes `result` through; in a job of several ranks an error ends the whole job at once
    /// (the other ranks may be waiting in a collective this rank will never join), printing the
    /// message prefixed with this rank.
    pub fn finish<T>(&self, result: anyhow::Result<T>) -> anyhow::Result<T> {
        match result {
            // A preemption stop is agreed by all ranks; each exits by itself.
            Err(e) if e.is::<crate::runtime::signals::Stopped>() => Err(e),
            Err(e) if self.comm.size() > 1 => self.comm.abort(&format!("cosine-train: {e:#}"), 1),
            other => other,
        }
    }
}

/// libtorch threads for one rank: the CPUs it may run on, divided among the ranks of its node
/// when they are not bound to disjoint cores (each sees every CPU of the node).
pub fn default_threads(local_ranks: usize) -> i32 {
    let allowed = std::thread::available_parallelism().map_or(1, |n| n.get());
    let online = online_cpus().unwrap_or(allowed);
    let share = if allowed >= online {
        allowed / local_ranks.max(1)
    } else {
        allowed
    };
    share.max(1) as i32
}

/// Number of CPUs online on this node (Linux), regardless of this process's affinity.
fn online_cpus() -> Option<usize> {
    let text = std::fs::read_to_string("/sys/devices/system/cpu/online").ok()?;
    let mut n = 0;
    for part in text.trim().split(',') {
        n += match part.split_once('-') {
            Some((a, b)) => b.parse::<usize>().ok()? - a.parse::<usize>().ok()? + 1,
            None => 1,
        };
    }
    Some(n)
}
