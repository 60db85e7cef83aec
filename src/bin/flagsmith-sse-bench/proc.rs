//! The servers' resident memory and CPU time, summed over several processes.

use flagsmith_sse::procfs::{self, Process};

/// Sum of resident memory over the given processes, in bytes.
pub fn rss_bytes(pids: &[u32]) -> Option<u64> {
    sum(pids, |pid| procfs::rss_bytes(Process::Pid(pid)))
}

/// Sum of user and system CPU time over the given processes (all threads), in µs.
pub fn cpu_micros(pids: &[u32]) -> Option<u64> {
    sum(pids, |pid| procfs::cpu_micros(Process::Pid(pid)))
}

/// `None` when there are no processes or one of them cannot be read.
fn sum(pids: &[u32], read: impl Fn(u32) -> Option<u64>) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    pids.iter().map(|pid| read(*pid)).sum()
}
