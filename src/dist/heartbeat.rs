//! Where every rank is, so that a collective timeout can name the rank that did not arrive.
//!
//! A collective that never completes says only that *some* rank is missing. To say which, each
//! rank's watchdog thread reports, a few times a second and over a plain TCP connection to
//! rank 0 (beside MPI/NCCL, so it works while they are stuck), how many collectives it has
//! entered, whether it is inside one, and what it was for (epoch, step, phase). Rank 0 keeps the
//! table and sends it back with every report, so any rank that times out can tell which ranks
//! have not reached its collective and what each was last doing. A rank whose process hangs
//! keeps reporting (the thread is its own); one that died closes its connection.
//!
//! The side channel is best effort: if it cannot be set up, the job runs and a timeout says so.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::Communicator;

/// What one rank says about itself.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Report {
    /// Collectives entered so far (the one in progress included).
    pub seq: u64,
    pub inside: bool,
    /// Milliseconds since the last collective returned (or since start).
    pub idle_ms: u64,
    /// The collective's kind and what it was for, as the watchdog names them.
    pub operation: String,
    pub context: String,
}

impl Report {
    fn encode(&self, rank: usize) -> String {
        let clean = |s: &str| s.replace(['\t', '\n'], " ");
        format!(
            "{rank}\t{}\t{}\t{}\t{}\t{}",
            self.seq,
            u8::from(self.inside),
            self.idle_ms,
            clean(&self.operation),
            clean(&self.context)
        )
    }

    fn decode(line: &str) -> Option<(usize, Report)> {
        let mut f = line.trim_end_matches('\n').splitn(6, '\t');
        let rank = f.next()?.parse().ok()?;
        let report = Report {
            seq: f.next()?.parse().ok()?,
            inside: f.next()? == "1",
            idle_ms: f.next()?.parse().ok()?,
            operation: f.next()?.to_string(),
            context: f.next().unwrap_or("").to_string(),
        };
        Some((rank, report))
    }
}

/// A report, when it came, and whether the rank's connection has closed since.
type Seen = (Report, Instant, bool);
/// Every rank's latest [`Seen`], by rank.
type Table = Mutex<Vec<Option<Seen>>>;

/// A rank's entry in the table: its report and when it came.
#[derive(Clone, Debug)]
struct Entry {
    report: Report,
    age: Duration,
    /// Its connection to rank 0 closed (the process ended).
    gone: bool,
}

/// This rank's view of every rank.
#[derive(Debug)]
pub struct Heartbeats {
    rank: usize,
    table: Arc<Table>,
    /// Whether the side channel came up (else the diagnosis says so).
    pub connected: bool,
    stop: Arc<AtomicBool>,
}

/// How often a rank reports.
const TICK: Duration = Duration::from_millis(250);

impl Heartbeats {
    /// Sets up the side channel (collective: every rank calls it once, right after joining).
    /// `own` is read for this rank's report on every tick.
    pub fn start(
        comm: &dyn Communicator,
        own: Arc<dyn Fn() -> Report + Send + Sync>,
    ) -> Heartbeats {
        let (rank, size) = (comm.rank(), comm.size());
        let table = Arc::new(Mutex::new(vec![None; size]));
        let stop = Arc::new(AtomicBool::new(false));
        let listener = (rank == 0)
            .then(|| TcpListener::bind(("0.0.0.0", 0)).ok())
            .flatten();
        let mut address = match &listener {
            Some(l) => advertised(l).into_bytes(),
            None => Vec::new(),
        };
        let connected = comm.broadcast_bytes(&mut address, 0).is_ok() && !address.is_empty();
        let hb = Heartbeats {
            rank,
            table: Arc::clone(&table),
            connected,
            stop: Arc::clone(&stop),
        };
        if !connected {
            tracing::debug!("no heartbeat channel; a collective timeout cannot name the late rank");
            return hb;
        }
        match listener {
            Some(l) => serve(l, table, own, stop),
            None => {
                let text = String::from_utf8_lossy(&address).into_owned();
                report_to(text, rank, table, own, stop);
            }
        }
        hb
    }

    /// A sentence naming the ranks that have not entered collective `seq`, and what each was
    /// last doing; `None` when every rank's report has it there (or none is known).
    pub fn late_ranks(&self, seq: u64) -> String {
        if !self.connected {
            return "(no heartbeat channel to tell which rank is late)".into();
        }
        let table = match self.table.lock() {
            Ok(t) => t
                .iter()
                .map(|e| {
                    e.as_ref().map(|(r, at, gone)| Entry {
                        report: r.clone(),
                        age: at.elapsed(),
                        gone: *gone,
                    })
                })
                .collect::<Vec<_>>(),
            Err(_) => return "(heartbeat table unavailable)".into(),
        };
        describe_late(&table, self.rank, seq)
    }
}

impl Drop for Heartbeats {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Which ranks of `table` have not entered collective `seq`, in words.
fn describe_late(table: &[Option<Entry>], me: usize, seq: u64) -> String {
    let mut late = Vec::new();
    for (rank, entry) in table.iter().enumerate() {
        if rank == me {
            continue;
        }
        match entry {
            None => late.push(format!("rank {rank} never reported (no heartbeat)")),
            Some(e) if e.gone => late.push(format!(
                "rank {rank} has exited (its heartbeat connection closed {:.1} s ago) after \
                 collective #{} ({})",
                e.age.as_secs_f64(),
                e.report.seq,
                doing(&e.report)
            )),
            Some(e) if e.report.seq < seq => {
                let silent = if e.age > 4 * TICK {
                    format!("; no heartbeat for {:.1} s (frozen?)", e.age.as_secs_f64())
                } else {
                    String::new()
                };
                late.push(format!(
                    "rank {rank} did not arrive: its last collective was #{} ({}), which {} \
                     {:.1} s ago{silent}",
                    e.report.seq,
                    doing(&e.report),
                    if e.report.inside {
                        "it entered"
                    } else {
                        "returned"
                    },
                    e.report.idle_ms as f64 / 1000.0
                ));
            }
            Some(_) => {}
        }
    }
    if late.is_empty() {
        "every rank has reached this collective (a rank may be stuck inside the communication \
         library or its network link)"
            .into()
    } else {
        late.join("; ")
    }
}

fn doing(r: &Report) -> String {
    if r.context.is_empty() {
        r.operation.clone()
    } else {
        format!("{}: {}", r.operation, r.context)
    }
}

/// `PORT ADDRESS,ADDRESS,...`: rank 0's port and the IPv4 addresses it can be reached on
/// (loopback last, for single-host jobs).
fn advertised(listener: &TcpListener) -> String {
    let port = listener.local_addr().map(|a| a.port()).unwrap_or(0);
    let mut ips: Vec<IpAddr> = interface_addresses();
    ips.push(IpAddr::from([127, 0, 0, 1]));
    let list: Vec<String> = ips.iter().map(IpAddr::to_string).collect();
    format!("{port} {}", list.join(","))
}

/// The IPv4 addresses of this host's interfaces that are up, loopback excluded.
fn interface_addresses() -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut list: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills a linked list that is read here and freed with freeifaddrs; the
    // pointers are not kept.
    unsafe {
        if libc::getifaddrs(&mut list) != 0 {
            return out;
        }
        let mut cur = list;
        while !cur.is_null() {
            let ifa = &*cur;
            let up = ifa.ifa_flags & libc::IFF_UP as u32 != 0;
            let loopback = ifa.ifa_flags & libc::IFF_LOOPBACK as u32 != 0;
            if up
                && !loopback
                && !ifa.ifa_addr.is_null()
                && i32::from((*ifa.ifa_addr).sa_family) == libc::AF_INET
            {
                let sin = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                out.push(IpAddr::from(
                    u32::from_be(sin.sin_addr.s_addr).to_be_bytes(),
                ));
            }
            cur = ifa.ifa_next;
        }
        libc::freeifaddrs(list);
    }
    out
}

/// Rank 0: takes every rank's reports, answers each with the whole table.
fn serve(
    listener: TcpListener,
    table: Arc<Table>,
    own: Arc<dyn Fn() -> Report + Send + Sync>,
    stop: Arc<AtomicBool>,
) {
    {
        let (table, stop) = (Arc::clone(&table), Arc::clone(&stop));
        spawn("heartbeat-self", move || {
            while !stop.load(Ordering::SeqCst) {
                if let Ok(mut t) = table.lock() {
                    t[0] = Some((own(), Instant::now(), false));
                }
                std::thread::sleep(TICK);
            }
        });
    }
    spawn("heartbeat-listen", move || {
        for stream in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                break;
            }
            let Ok(stream) = stream else { continue };
            let table = Arc::clone(&table);
            spawn("heartbeat-peer", move || serve_peer(stream, &table));
        }
    });
}

fn serve_peer(stream: TcpStream, table: &Table) {
    let Ok(mut writer) = stream.try_clone() else {
        return;
    };
    let mut rank_seen = None;
    for line in BufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        let Some((rank, report)) = Report::decode(&line) else {
            continue;
        };
        let reply = match table.lock() {
            Ok(mut t) if rank < t.len() => {
                rank_seen = Some(rank);
                t[rank] = Some((report, Instant::now(), false));
                encode_table(&t)
            }
            _ => continue,
        };
        if writer.write_all(reply.as_bytes()).is_err() {
            break;
        }
    }
    if let (Some(rank), Ok(mut t)) = (rank_seen, table.lock())
        && let Some(entry) = t[rank].as_mut()
    {
        entry.1 = Instant::now();
        entry.2 = true;
    }
}

/// One line per known rank (`age_ms` first, then the report), then an empty line.
fn encode_table(t: &[Option<Seen>]) -> String {
    let mut out = String::new();
    for (rank, e) in t.iter().enumerate() {
        if let Some((r, at, gone)) = e {
            out += &format!(
                "{}\t{}\t{}\n",
                at.elapsed().as_millis(),
                u8::from(*gone),
                r.encode(rank)
            );
        }
    }
    out.push('\n');
    out
}

/// Ranks other than 0: report every tick, keep the table rank 0 sends back.
fn report_to(
    address: String,
    rank: usize,
    table: Arc<Table>,
    own: Arc<dyn Fn() -> Report + Send + Sync>,
    stop: Arc<AtomicBool>,
) {
    spawn("heartbeat-report", move || {
        let Some(stream) = connect(&address) else {
            tracing::debug!("heartbeat: cannot reach rank 0 at {address}");
            return;
        };
        let Ok(mut writer) = stream.try_clone() else {
            return;
        };
        let mut reader = BufReader::new(stream);
        while !stop.load(Ordering::SeqCst) {
            let line = own().encode(rank) + "\n";
            if writer.write_all(line.as_bytes()).is_err() {
                mark_rank0_gone(&table);
                return;
            }
            let mut fresh = Vec::new();
            loop {
                let mut l = String::new();
                match reader.read_line(&mut l) {
                    Ok(0) | Err(_) => {
                        mark_rank0_gone(&table);
                        return;
                    }
                    Ok(_) if l == "\n" => break,
                    Ok(_) => fresh.push(l),
                }
            }
            if let Ok(mut t) = table.lock() {
                for l in fresh {
                    let mut parts = l.splitn(3, '\t');
                    let (Some(age), Some(gone), Some(rest)) =
                        (parts.next(), parts.next(), parts.next())
                    else {
                        continue;
                    };
                    let age = Duration::from_millis(age.parse().unwrap_or(0));
                    if let Some((r, report)) = Report::decode(rest)
                        && r < t.len()
                    {
                        let at = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                        t[r] = Some((report, at, gone == "1"));
                    }
                }
            }
            std::thread::sleep(TICK);
        }
    });
}

/// Rank 0's own entry, when its connection is lost (it died, or its host is unreachable).
fn mark_rank0_gone(table: &Table) {
    if let Ok(mut t) = table.lock() {
        match t[0].as_mut() {
            Some(e) => e.2 = true,
            None => t[0] = Some((Report::default(), Instant::now(), true)),
        }
    }
}

fn connect(address: &str) -> Option<TcpStream> {
    let (port, hosts) = address.split_once(' ')?;
    let port: u16 = port.parse().ok()?;
    for host in hosts.split(',') {
        let Ok(ip) = host.parse::<IpAddr>() else {
            continue;
        };
        if let Ok(s) =
            TcpStream::connect_timeout(&SocketAddr::new(ip, port), Duration::from_secs(1))
        {
            let _ = s.set_nodelay(true);
            return Some(s);
        }
    }
    None
}

fn spawn(name: &str, f: impl FnOnce() + Send + 'static) {
    if let Err(e) = std::thread::Builder::new().name(name.into()).spawn(f) {
        tracing::debug!("heartbeat: cannot start {name}: {e}");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(seq: u64, inside: bool, context: &str) -> Option<Entry> {
        Some(Entry {
            report: Report {
                seq,
                inside,
                idle_ms: 3200,
                operation: "all-reduce".into(),
                context: context.into(),
            },
            age: Duration::from_millis(100),
            gone: false,
        })
    }

    #[test]
    fn reports_round_trip_through_their_line() {
        let r = Report {
            seq: 57,
            inside: true,
            idle_ms: 12,
            operation: "all-reduce".into(),
            context: "gradient all-reduce, epoch 2\tstep 5".into(),
        };
        let (rank, back) = Report::decode(&r.encode(3)).unwrap();
        assert_eq!(rank, 3);
        assert_eq!(back.context, "gradient all-reduce, epoch 2 step 5");
        assert_eq!((back.seq, back.inside, back.idle_ms), (57, true, 12));
        assert!(Report::decode("garbage").is_none());
    }

    #[test]
    fn the_late_rank_is_named_with_what_it_last_did() {
        let table = vec![
            entry(12, true, "gradient all-reduce, epoch 1 step 3"),
            entry(11, false, "gradient all-reduce, epoch 1 step 2"),
            entry(12, true, "gradient all-reduce, epoch 1 step 3"),
        ];
        let text = describe_late(&table, 0, 12);
        assert!(
            text.starts_with("rank 1 did not arrive: its last collective was #11 (all-reduce: gradient all-reduce, epoch 1 step 2), which returned 3.2 s ago"),
            "{text}"
        );
        assert!(!text.contains("rank 2"), "{text}");
        let mut gone = table.clone();
        if let Some(e) = gone[2].as_mut() {
            e.gone = true;
        }
        assert!(describe_late(&gone, 0, 12).contains("rank 2 has exited"));
    }
}
