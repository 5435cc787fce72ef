//! The allocator of the platform's processes: jemalloc, with its background thread purging
//! freed pages back to the system once they have been unused for [`DECAY_MS`] (jemalloc's
//! default is 10 s: a burst's memory, freed, stayed resident that long).
//!
//! With glibc's allocator, memory once used stayed resident: the VMs of quiet apps were
//! dropped but their pages kept in per-thread heaps, so a stream process that had run a
//! thousand tenants' apps stayed at its peak. The binaries (`mysimbdp`, the workbench's
//! `scenario`) install it and call [`return_freed_memory`] first thing in `main`:
//!
//! ```
//! #[global_allocator]
//! static ALLOCATOR: mysimbdp::memory::Allocator = mysimbdp::memory::Allocator;
//!
//! fn main() {
//!     mysimbdp::memory::return_freed_memory();
//! }
//! ```

pub use tikv_jemallocator::Jemalloc as Allocator;

/// How long freed pages stay resident for reuse before they go back: long enough to serve
/// the next bulk or batch from them, short enough that a burst (a thousand tenants' app
/// VMs, a large bulk) does not stay in the process's size for seconds after it ended.
pub const DECAY_MS: isize = 1_000;

/// Starts jemalloc's background purging, so that a quiet process gives freed pages back
/// without waiting for its next allocations, after [`DECAY_MS`]. Harmless where jemalloc is
/// not the global allocator (tests): it then configures an allocator nothing uses.
pub fn return_freed_memory() {
    use tikv_jemalloc_ctl::{Access, AsName};
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!("jemalloc background purging not started: {e}");
    }
    // The default for arenas made from now on, then each one made already (those not yet
    // made refuse the write: nothing to do for them).
    if let Err(e) = b"arenas.dirty_decay_ms\0".name().write(DECAY_MS) {
        tracing::warn!("jemalloc decay time not set: {e}");
    }
    let arenas = tikv_jemalloc_ctl::arenas::narenas::read().unwrap_or(0);
    for i in 0..arenas {
        let name = format!("arena.{i}.dirty_decay_ms\0");
        let _ = name.as_bytes().name().write(DECAY_MS);
    }
}

#[cfg(test)]
mod tests {
    use tikv_jemalloc_ctl::{Access, AsName};

    #[test]
    fn freed_memory_goes_back_after_the_decay_time_in_the_background() {
        super::return_freed_memory();
        assert!(tikv_jemalloc_ctl::background_thread::read().expect("background_thread"));
        let default: isize = b"arenas.dirty_decay_ms\0"
            .name()
            .read()
            .expect("arenas.dirty_decay_ms");
        assert_eq!(default, super::DECAY_MS);
        let first: isize = b"arena.0.dirty_decay_ms\0"
            .name()
            .read()
            .expect("arena.0.dirty_decay_ms");
        assert_eq!(first, super::DECAY_MS, "an arena made before the call too");
    }
}
