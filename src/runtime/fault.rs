//! Fault injection for the failure-path tests: `COSINE_FAULT=rank=R,step=S,kind=K` makes rank R,
//! before global training step S (1-based), fail with an error (`kind=error`), hang forever
//! (`kind=hang`), exit at once without a word (`kind=exit`), die by SIGKILL (`kind=kill`),
//! receive SIGTERM as from a scheduler (`kind=signal`), panic like a bug (`kind=panic`) or
//! silently change its copy of the model
//! (`kind=perturb`, like a bit flip; the replica checksums must catch it). `step=0` acts while
//! the rank joins the job, after MPI has started and before the first collective. Not for
//! users; a malformed value is refused so that a typo cannot silently disable a test.

use anyhow::bail;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    Error,
    Hang,
    Exit,
    Kill,
    Signal,
    Panic,
    Perturb,
}

/// The fault to inject, if any.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Fault(Option<(usize, u64, Kind)>);

impl Fault {
    pub const VARIABLE: &'static str = "COSINE_FAULT";

    pub fn from_env() -> anyhow::Result<Self> {
        match std::env::var(Self::VARIABLE) {
            Ok(v) if !v.is_empty() => Self::parse(&v),
            _ => Ok(Fault(None)),
        }
    }

    pub fn parse(value: &str) -> anyhow::Result<Self> {
        let bad = || {
            anyhow::anyhow!(
                "{}={value:?}: expected rank=R,step=S,kind=error|hang|exit|kill|signal|panic|perturb",
                Self::VARIABLE
            )
        };
        let (mut rank, mut step, mut kind) = (None, None, None);
        for part in value.split(',') {
            let (key, v) = part.split_once('=').ok_or_else(bad)?;
            match key.trim() {
                "rank" => rank = Some(v.trim().parse().map_err(|_| bad())?),
                "step" => step = Some(v.trim().parse().map_err(|_| bad())?),
                "kind" => {
                    kind = Some(match v.trim() {
                        "error" => Kind::Error,
                        "hang" => Kind::Hang,
                        "exit" => Kind::Exit,
                        "perturb" => Kind::Perturb,
                        "kill" => Kind::Kill,
                        "signal" => Kind::Signal,
                        "panic" => Kind::Panic,
                        _ => return Err(bad()),
                    })
                }
                _ => return Err(bad()),
            }
        }
        match (rank, step, kind) {
            (Some(r), Some(s), Some(k)) => Ok(Fault(Some((r, s, k)))),
            _ => Err(bad()),
        }
    }

    /// Called by every rank before each training step; `model` is what `perturb` changes.
    pub fn before_step(
        &self,
        rank: usize,
        step: u64,
        model: Option<&tch::Tensor>,
    ) -> anyhow::Result<()> {
        match self.0 {
            Some((r, s, kind)) if r == rank && s == step => match kind {
                Kind::Error => bail!("injected fault ({}) at step {step}", Self::VARIABLE),
                Kind::Hang => loop {
                    std::thread::sleep(std::time::Duration::from_secs(3600));
                },
                Kind::Exit => std::process::exit(9),
                Kind::Kill => {
                    // SAFETY: sends SIGKILL to this process.
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                    unreachable!("SIGKILL cannot be caught")
                }
                Kind::Panic => panic!("injected panic ({}) at step {step}", Self::VARIABLE),
                Kind::Signal => {
                    crate::runtime::signals::raise_term();
                    Ok(())
                }
                Kind::Perturb => {
                    if let Some(t) = model {
                        tch::no_grad(|| {
                            let _ = t.shallow_clone().g_add_scalar_(1e-3);
                        });
                    }
                    Ok(())
                }
            },
            _ => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_refuses_typos() {
        assert_eq!(
            Fault::parse("rank=1,step=3,kind=hang").unwrap(),
            Fault(Some((1, 3, Kind::Hang)))
        );
        for bad in [
            "rank=1,step=3",
            "rank=1,step=x,kind=error",
            "rnk=1,step=3,kind=error",
        ] {
            let err = Fault::parse(bad).unwrap_err().to_string();
            assert!(err.contains("expected rank=R,step=S"), "{err}");
        }
        let f = Fault::parse("rank=1,step=2,kind=error").unwrap();
        assert!(f.before_step(0, 2, None).is_ok() && f.before_step(1, 1, None).is_ok());
        assert!(f.before_step(1, 2, None).is_err());
    }
}
