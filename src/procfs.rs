//! A process's resident memory and CPU time, read from `/proc` (Linux). `/metricsz` reads
//! its own; the benchmark tool and the tests read the server's.

/// Which process: this one, or another on the same machine.
#[derive(Clone, Copy, Debug)]
pub enum Process {
    Current,
    Pid(u32),
}

impl Process {
    fn path(self, file: &str) -> String {
        match self {
            Process::Current => format!("/proc/self/{file}"),
            Process::Pid(pid) => format!("/proc/{pid}/{file}"),
        }
    }
}

/// Resident memory (`VmRSS`), in bytes.
pub fn rss_bytes(process: Process) -> Option<u64> {
    let status = std::fs::read_to_string(process.path("status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
}

/// User plus system CPU time of all its threads, in microseconds.
pub fn cpu_micros(process: Process) -> Option<u64> {
    let stat = std::fs::read_to_string(process.path("stat")).ok()?;
    // The fields after the command name, which may hold spaces, follow its closing ')'.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    // USER_HZ is 100 on every Linux architecture.
    Some((utime + stime) * 10_000)
}

/// Open file descriptors.
pub fn open_fds(process: Process) -> Option<usize> {
    Some(std::fs::read_dir(process.path("fd")).ok()?.count())
}

/// The soft open-file limit, as `/proc` shows it (a number, or `unlimited`).
pub fn max_fds(process: Process) -> Option<String> {
    let limits = std::fs::read_to_string(process.path("limits")).ok()?;
    limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .and_then(|l| l.split_whitespace().nth(3))
        .map(str::to_owned)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let rss = rss_bytes(Process::Current).expect("VmRSS");
        assert!(rss > 1024 * 1024, "{rss}");
        let pid = std::process::id();
        assert!(cpu_micros(Process::Pid(pid)).is_some());
        assert!(open_fds(Process::Current).is_some_and(|n| n >= 3));
        assert!(max_fds(Process::Current).is_some());
        assert!(rss_bytes(Process::Pid(u32::MAX)).is_none());
    }
}
