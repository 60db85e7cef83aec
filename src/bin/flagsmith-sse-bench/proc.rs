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

/// Memory the kernel holds in TCP socket buffers, machine-wide (`/proc/net/sockstat`, in
/// pages of 4 KiB): on loopback that is both the server's and the clients' sockets.
pub fn tcp_buffer_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/net/sockstat").ok()?;
    let line = text.lines().find(|l| l.starts_with("TCP:"))?;
    let mut fields = line.split_whitespace();
    let pages: u64 = fields
        .by_ref()
        .skip_while(|f| *f != "mem")
        .nth(1)?
        .parse()
        .ok()?;
    Some(pages * 4096)
}

/// Memory in the kernel's slab caches for TCP sockets and their inodes, machine-wide
/// (`/proc/slabinfo`, readable by root): the socket objects themselves, which
/// `/proc/net/sockstat` (buffers only) leaves out. On loopback: both ends.
pub fn tcp_slab_bytes() -> Option<u64> {
    let text = std::fs::read_to_string("/proc/slabinfo").ok()?;
    let mut total = 0;
    for line in text.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        if matches!(fields.first(), Some(&"TCP" | &"sock_inode_cache")) {
            let active: u64 = fields.get(1)?.parse().ok()?;
            let size: u64 = fields.get(3)?.parse().ok()?;
            total += active * size;
        }
    }
    Some(total)
}
