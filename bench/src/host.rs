//! Facts about the machine and its processes that a report records: cores, memory, peak
//! resident memory, load, the commit; and a few random bits for a run's names. Imports
//! nothing of the crate.

use procfs_core::FromRead;
use procfs_core::process::Status;

/// A few random bits for a run's names: the time's nanoseconds and the process id.
pub fn rand_u32() -> u32 {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    (t.subsec_nanos() ^ (t.as_secs() as u32).rotate_left(13)) ^ std::process::id()
}

/// Cores available to this process; 0 where unknown.
pub fn cores() -> usize {
    std::thread::available_parallelism().map_or(0, |n| n.get())
}

/// Physical memory in bytes; 0 where unknown.
pub fn memory_bytes() -> u64 {
    procfs_core::Meminfo::from_file("/proc/meminfo").map_or(0, |m| m.mem_total)
}

/// Peak resident memory (VmHWM) of a process (`None`: this one) in bytes; 0 where unknown
/// (a process that has exited has no figures left).
pub fn peak_rss(pid: Option<u32>) -> u64 {
    let path = match pid {
        Some(p) => format!("/proc/{p}/status"),
        None => "/proc/self/status".into(),
    };
    Status::from_file(path)
        .ok()
        .and_then(|s| s.vmhwm)
        .map_or(0, |kib| kib * 1024)
}

/// Starts a process's peak resident memory (`None`: this one) afresh from what it holds now
/// (`5` written to its `clear_refs`, Linux ≥ 4.0), so a later [`peak_rss`] is the peak since:
/// a load's own, not a warm-up's before it. False where that cannot be done.
pub fn reset_peak_rss(pid: Option<u32>) -> bool {
    let path = match pid {
        Some(p) => format!("/proc/{p}/clear_refs"),
        None => "/proc/self/clear_refs".into(),
    };
    std::fs::write(path, "5").is_ok()
}

/// Resident memory (VmRSS) and threads of a process now; `None` once it has exited.
pub fn rss_and_threads(pid: u32) -> Option<(u64, u64)> {
    let s = Status::from_file(format!("/proc/{pid}/status")).ok()?;
    Some((s.vmrss? * 1024, s.threads))
}

/// The one-minute load average: runnable tasks, of this run and whatever else the machine
/// runs beside it (which throughput on a shared machine depends on); `None` where unknown.
pub fn load_average() -> Option<f64> {
    procfs_core::LoadAverage::from_file("/proc/loadavg")
        .ok()
        .map(|l| f64::from(l.one))
}

/// The checkout's short commit (saying so when the work tree differs from it), or `unknown`.
pub fn commit() -> String {
    let git = |args: &[&str]| {
        std::process::Command::new("git")
            .args(args)
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
    };
    let Some(head) = git(&["rev-parse", "--short", "HEAD"]) else {
        return "unknown".into();
    };
    // Changes not committed: the figures are of code no commit holds.
    match git(&["status", "--porcelain", "--untracked-files=no"]) {
        Some(s) if !s.is_empty() => format!("{head} with uncommitted changes"),
        _ => head,
    }
}

/// `debug` or `release`: the build the figures came from.
pub fn build() -> &'static str {
    if cfg!(debug_assertions) {
        "debug"
    } else {
        "release"
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn this_process_and_machine_have_figures() {
        let rss = peak_rss(None);
        // A test binary holds at least a megabyte and surely less than the machine.
        assert!(rss > 1 << 20, "{rss}");
        assert!(memory_bytes() > rss, "{} vs {rss}", memory_bytes());
        assert_eq!(peak_rss(Some(u32::MAX)), 0, "no such process");
        // Another process, as the runner samples each component's.
        let mut child = std::process::Command::new("sleep")
            .arg("10")
            .spawn()
            .expect("sleep");
        // Once it runs `sleep`: before the exec, its figures are the forked copy's, and the
        // exec starts the peak afresh. Then the resident size first, so the peak read after
        // it is sure to be at least as high.
        let comm = format!("/proc/{}/comm", child.id());
        let until = std::time::Instant::now() + std::time::Duration::from_secs(5);
        while std::fs::read_to_string(&comm).is_ok_and(|c| c.trim() != "sleep")
            && std::time::Instant::now() < until
        {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        let (rss, threads) = rss_and_threads(child.id()).expect("running");
        let other = peak_rss(Some(child.id()));
        assert!(rss > 0 && rss <= other, "{rss} vs peak {other}");
        assert_eq!(threads, 1, "sleep has one thread");
        assert!(
            reset_peak_rss(Some(child.id())),
            "another process's peak can be reset, as each component's is"
        );
        assert!(peak_rss(Some(child.id())) > 0);
        let _ = child.kill();
        let _ = child.wait();
        assert!(other > 0, "{other}");
        assert!(
            load_average().is_some_and(|l| l >= 0.0),
            "Linux has /proc/loadavg"
        );
    }

    #[test]
    fn a_peak_reset_forgets_memory_given_back_before_it() {
        // 256 MiB touched then freed (an allocation this big is its own mapping, given back
        // to the system when dropped): the peak holds it until it is reset.
        let mut held = vec![0u8; 256 << 20];
        for page in held.chunks_mut(4096) {
            page[0] = 1;
        }
        std::hint::black_box(&held);
        let with = peak_rss(None);
        drop(held);
        assert!(with > 256 << 20, "{with}");
        assert!(reset_peak_rss(None), "this process's own peak can be reset");
        let after = peak_rss(None);
        assert!(
            after + (200 << 20) < with,
            "{after} vs {with} before the reset"
        );
        assert!(!reset_peak_rss(Some(u32::MAX)), "no such process");
    }
}
