//! The process's open-file limit, which bounds how many HTTP/1.1 subscribers (a socket
//! each) one instance can hold.

use std::io;

use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};

/// Descriptors kept free for NATS, probes, queue-change and the process itself when the
/// subscriber cap is automatic.
pub const HEADROOM: u64 = 256;

/// Raises the soft open-file limit to the hard limit: every subscriber is a socket, and the
/// soft limit is often 1,024. Returns (soft before, soft after, hard); `u64::MAX` stands for
/// "unlimited".
pub fn raise_open_file_limit() -> io::Result<(u64, u64, u64)> {
    let limit = getrlimit(Resource::Nofile);
    let (soft, hard) = (
        limit.current.unwrap_or(u64::MAX),
        limit.maximum.unwrap_or(u64::MAX),
    );
    if soft < hard {
        setrlimit(
            Resource::Nofile,
            Rlimit {
                current: limit.maximum,
                maximum: limit.maximum,
            },
        )?;
    }
    Ok((soft, soft.max(hard), hard))
}

/// The automatic cap on HTTP/1.1 subscribers: the soft open-file limit less `HEADROOM`
/// (with this machine's hard limit of 20,000, 19,744 subscribers), and never below 64.
pub fn default_max_subscribers() -> usize {
    let soft = getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX);
    usize::try_from(soft.saturating_sub(HEADROOM))
        .unwrap_or(usize::MAX)
        .max(64)
}

/// `EMFILE` (this process) or `ENFILE` (the system) from `accept`.
pub fn is_out_of_descriptors(err: &io::Error) -> bool {
    let code = err.raw_os_error();
    code == Some(rustix::io::Errno::MFILE.raw_os_error())
        || code == Some(rustix::io::Errno::NFILE.raw_os_error())
}
