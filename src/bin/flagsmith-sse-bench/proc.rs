//! The server's resident memory and CPU time, from /proc (Linux, same machine).

/// Sum of VmRSS over the given processes, in bytes.
pub fn rss_bytes(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    let mut total = 0;
    for pid in pids {
        let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()
            .ok()?;
        total += kib * 1024;
    }
    Some(total)
}

/// Sum of user and system CPU time over the given processes (all threads), in µs.
pub fn cpu_micros(pids: &[u32]) -> Option<u64> {
    if pids.is_empty() {
        return None;
    }
    // USER_HZ is 100 on every Linux architecture we run on.
    let ticks = 100u64;
    let mut total = 0;
    for pid in pids {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        // Fields after the command name, which may contain spaces, close with ')'.
        let after = stat.rsplit_once(')')?.1;
        let fields: Vec<&str> = after.split_whitespace().collect();
        let utime: u64 = fields.get(11)?.parse().ok()?;
        let stime: u64 = fields.get(12)?.parse().ok()?;
        total += (utime + stime) * 1_000_000 / ticks;
    }
    Some(total)
}
