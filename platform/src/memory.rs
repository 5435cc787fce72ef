//! The allocator of the platform's processes: jemalloc, with its background thread purging
//! freed pages back to the system (after its decay time, 10 s by default).
//!
//! With glibc's allocator, memory once used stayed resident: the VMs of quiet apps were
//! dropped but their pages kept in per-thread heaps, so a stream process that had run a
//! thousand tenants' apps stayed at its peak. The binaries (`mysimbdp`, the workbench's
//! `scenario`) install it:
//!
//! ```ignore
//! #[global_allocator]
//! static ALLOCATOR: mysimbdp::memory::Allocator = mysimbdp::memory::Allocator;
//! ```
//!
//! and call [`return_freed_memory`] first thing in `main`.

pub use tikv_jemallocator::Jemalloc as Allocator;

/// Starts jemalloc's background purging, so that a quiet process gives freed pages back
/// without waiting for its next allocations. Harmless where jemalloc is not the global
/// allocator (tests): it then configures an allocator nothing uses.
pub fn return_freed_memory() {
    if let Err(e) = tikv_jemalloc_ctl::background_thread::write(true) {
        tracing::warn!("jemalloc background purging not started: {e}");
    }
}
