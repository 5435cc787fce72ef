//! The limits of one call inside the VM: the per-call budget shared with the interrupt and
//! the host functions, the thread CPU clock, and the reasons a limit gives.

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Instant;

use mlua::VmState;

use super::convert::{Exceeded, Meter};
use crate::config::AppLimits;

/// Why a call was stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub(super) enum Limit {
    None = 0,
    Time = 1,
    Instructions = 2,
    Emits = 3,
    Memory = 4,
    Document = 5,
    OutputBytes = 6,
    OutputValues = 7,
}

impl Limit {
    fn from_u8(v: u8) -> Self {
        match v {
            1 => Self::Time,
            2 => Self::Instructions,
            3 => Self::Emits,
            4 => Self::Memory,
            5 => Self::Document,
            6 => Self::OutputBytes,
            7 => Self::OutputValues,
            _ => Self::None,
        }
    }

    pub(super) fn of(e: Exceeded) -> Self {
        match e {
            Exceeded::Document => Self::Document,
            Exceeded::Bytes => Self::OutputBytes,
            Exceeded::Values => Self::OutputValues,
        }
    }
}

/// Values one call may output: a Luau value takes at least 16 bytes of VM memory.
fn output_values(limits: &AppLimits) -> usize {
    limits.memory_bytes / 16
}

/// The output budget of one call.
pub(super) fn meter(limits: &AppLimits) -> Meter {
    Meter::new(
        limits.max_doc_bytes,
        limits.memory_bytes,
        output_values(limits),
    )
}

/// Per-call budget shared with the interrupt callback and the host functions. Once `hit` is
/// set it stays set until the next call is armed: the limit cannot be caught.
///
/// The time limit counts the CPU time of the thread running the call, so a call that waits
/// for a core on a busy machine (other tenants' apps, the database) is not failed for it.
/// The wall clock, cheap to read, says when the CPU clock (a system call) is worth reading;
/// a wall-clock backstop of [`WALL_BACKSTOP`] times the limit (at least 1 s) still ends a
/// call that somehow stops using CPU without returning. A batch of calls reads the CPU
/// clock at their start through a [`CpuClock`], so a call may run up to [`CPU_REREAD`] past
/// its limit, never less than its limit.
pub(super) struct Budget {
    /// When the CPU clock is read next (wall ns since `epoch`).
    soft_deadline_ns: AtomicU64,
    /// When the call ends whatever its CPU time (wall ns since `epoch`).
    hard_deadline_ns: AtomicU64,
    /// The thread's CPU time when the call was armed.
    cpu_start_ns: AtomicU64,
    time_ns: AtomicU64,
    ticks_left: AtomicU64,
    hit: AtomicU8,
    epoch: Instant,
}

/// The wall-clock backstop, as a multiple of the time limit.
const WALL_BACKSTOP: u64 = 20;

/// CPU time the calling thread has used, in ns.
fn thread_cpu_ns() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::ThreadCPUTime);
    (t.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(t.tv_nsec as u64)
}

/// The CPU time of the thread running a batch of calls, read once a millisecond rather than
/// at each call (reading it is a system call, a tenth of a short call's cost): between two
/// readings, the thread cannot have used more CPU than the wall time that passed.
pub(super) struct CpuClock {
    read_ns: u64,
    read_at: Instant,
}

/// How long a CPU-time reading is used before the clock is read again: what a call may run
/// past its time limit at most.
const CPU_REREAD: std::time::Duration = std::time::Duration::from_millis(1);

impl CpuClock {
    /// The clock of the calling thread: use it on this thread only.
    pub(super) fn of_this_thread() -> Self {
        Self {
            read_ns: thread_cpu_ns(),
            read_at: Instant::now(),
        }
    }

    /// The thread's CPU time now, or at most [`CPU_REREAD`] more than it.
    pub(super) fn now_at_most(&mut self) -> u64 {
        let since = self.read_at.elapsed();
        if since <= CPU_REREAD {
            return self.read_ns.saturating_add(since.as_nanos() as u64);
        }
        *self = Self::of_this_thread();
        self.read_ns
    }
}

impl Budget {
    pub(super) fn new(limits: &AppLimits) -> Self {
        let b = Self {
            soft_deadline_ns: AtomicU64::new(0),
            hard_deadline_ns: AtomicU64::new(0),
            cpu_start_ns: AtomicU64::new(0),
            time_ns: AtomicU64::new(0),
            ticks_left: AtomicU64::new(0),
            hit: AtomicU8::new(0),
            epoch: Instant::now(),
        };
        b.arm(limits);
        b
    }

    pub(super) fn arm(&self, limits: &AppLimits) {
        self.arm_at(limits, thread_cpu_ns());
    }

    /// Arms the budget for a call starting when the thread's CPU time is `cpu_start_ns` (or
    /// less: the call is then given the difference on top of its limit).
    pub(super) fn arm_at(&self, limits: &AppLimits, cpu_start_ns: u64) {
        let now = self.epoch.elapsed().as_nanos() as u64;
        let time_ns = limits.time_ms.saturating_mul(1_000_000);
        let backstop = time_ns.saturating_mul(WALL_BACKSTOP).max(1_000_000_000);
        self.time_ns.store(time_ns, Ordering::Relaxed);
        self.soft_deadline_ns
            .store(now.saturating_add(time_ns), Ordering::Relaxed);
        self.hard_deadline_ns
            .store(now.saturating_add(backstop), Ordering::Relaxed);
        self.cpu_start_ns.store(cpu_start_ns, Ordering::Relaxed);
        self.ticks_left
            .store(limits.instructions, Ordering::Relaxed);
        self.hit.store(Limit::None as u8, Ordering::Relaxed);
    }

    /// Whether the call has used up its time: its CPU time, read only once as much wall time
    /// has passed (a call cannot use more CPU than wall time), or the wall-clock backstop.
    fn out_of_time(&self) -> bool {
        let now = self.epoch.elapsed().as_nanos() as u64;
        if now <= self.soft_deadline_ns.load(Ordering::Relaxed) {
            return false;
        }
        if now > self.hard_deadline_ns.load(Ordering::Relaxed) {
            return true;
        }
        let used = thread_cpu_ns().saturating_sub(self.cpu_start_ns.load(Ordering::Relaxed));
        let limit = self.time_ns.load(Ordering::Relaxed);
        if used >= limit {
            return true;
        }
        // Not before the rest of the budget could have been used.
        self.soft_deadline_ns
            .store(now.saturating_add(limit - used), Ordering::Relaxed);
        false
    }

    pub(super) fn hit(&self) -> Limit {
        Limit::from_u8(self.hit.load(Ordering::Relaxed))
    }

    /// Records that `l` was hit; the first limit hit is the one reported.
    pub(super) fn trip(&self, l: Limit) {
        let _ = self.hit.compare_exchange(
            Limit::None as u8,
            l as u8,
            Ordering::Relaxed,
            Ordering::Relaxed,
        );
    }

    /// Fails once any limit was hit during this call.
    pub(super) fn check_hit(&self) -> mlua::Result<()> {
        match self.hit() {
            Limit::None => Ok(()),
            l => Err(mlua::Error::runtime(format!("{l:?} limit exceeded"))),
        }
    }

    /// For host loops that run without interrupts: a limit already hit, or the time limit.
    pub(super) fn check(&self) -> mlua::Result<()> {
        self.check_hit()?;
        if self.out_of_time() {
            self.trip(Limit::Time);
            return self.check_hit();
        }
        Ok(())
    }

    /// The interrupt: every function call and loop iteration, and every step of a pattern
    /// match. The clock is read every time: one step of a C built-in can take milliseconds.
    pub(super) fn interrupt(&self) -> mlua::Result<VmState> {
        self.check_hit()?;
        let left = self.ticks_left.load(Ordering::Relaxed);
        if left == 0 {
            self.trip(Limit::Instructions);
            return self.check_hit().map(|()| VmState::Continue);
        }
        self.ticks_left.store(left - 1, Ordering::Relaxed);
        self.check().map(|()| VmState::Continue)
    }
}

pub(super) fn root(e: &mlua::Error) -> &mlua::Error {
    let mut root = e;
    while let mlua::Error::CallbackError { cause, .. } = root {
        root = cause;
    }
    root
}

pub(super) fn is_memory(e: &mlua::Error) -> bool {
    matches!(root(e), mlua::Error::MemoryError(_))
}

/// The reason for the ingestion log when `hit` stopped a call.
pub(super) fn limit_reason(hit: Limit, limits: &AppLimits) -> String {
    match hit {
        Limit::Time => format!("app exceeded {} ms time limit", limits.time_ms),
        Limit::Instructions => format!("app exceeded {} instruction budget", limits.instructions),
        Limit::Emits => format!("app exceeded {} emitted documents limit", limits.max_emits),
        Limit::Memory => format!("app exceeded {} bytes memory limit", limits.memory_bytes),
        Limit::Document => format!(
            "app output exceeds {} bytes document limit",
            limits.max_doc_bytes
        ),
        Limit::OutputBytes => format!(
            "app output exceeds {} bytes memory limit (the JSON of all documents of one call)",
            limits.memory_bytes
        ),
        Limit::OutputValues => format!(
            "app output exceeds {} bytes memory limit (more than {} values in one call)",
            limits.memory_bytes,
            output_values(limits)
        ),
        Limit::None => "app stopped".into(),
    }
}
