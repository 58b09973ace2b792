//! How busy a running step is, for the default parallelism bound ([`Bound::BusySteps`]).
//!
//! The scheduler gives every step it starts a [`StepActivity`]. A worker that can measure
//! the step's CPU time (the real worker: the sandbox's cgroup) hands it a meter; every
//! [`SAMPLE_EVERY`] the scheduler reads the meter of each running step, and a step that
//! used less than [`IDLE_SHARE`] of one core over the window since the previous reading
//! counts as idle (and [`FIRST_VERDICT`] after starting steps while others wait for a slot,
//! so a sleeping step frees its slot within ~60 ms). Tests' fake workers say idle or busy
//! directly. A step without a meter
//! (file ops, pulls, a sandbox without cgroups) is busy unless its worker says otherwise.
//!
//! [`Bound::BusySteps`]: crate::Bound::BusySteps

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often the scheduler reads the running steps' meters.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(100);
/// A step using less than this share of one core over a window is idle.
pub const IDLE_SHARE: f64 = 0.25;
/// Readings closer together than this are too noisy to judge by: keep the last verdict.
const MIN_WINDOW: Duration = Duration::from_millis(50);
/// When steps wait for a slot, the scheduler reads a step this soon after starting it
/// (a little more than [`MIN_WINDOW`] after its meter is set), not at the next
/// [`SAMPLE_EVERY`] tick.
pub const FIRST_VERDICT: Duration = Duration::from_millis(60);

type ReadCpu = Box<dyn Fn() -> Option<Duration> + Send + Sync>;

struct Meter {
    read: ReadCpu,
    /// The previous reading: when, and the cumulative CPU time then.
    last: Option<(Instant, Duration)>,
}

/// Whether one running step currently holds a slot of the default bound.
#[derive(Default)]
pub struct StepActivity {
    idle: AtomicBool,
    meter: Mutex<Option<Meter>>,
}

impl StepActivity {
    /// Gives the step a meter: `read` returns the CPU time the step has used since the
    /// meter was made (`None` when it cannot be read, which keeps the last verdict; at the
    /// start, when nothing ran yet, that counts as zero). The first window starts now.
    pub fn set_meter(&self, read: impl Fn() -> Option<Duration> + Send + Sync + 'static) {
        let last = Some((Instant::now(), read().unwrap_or_default()));
        let mut meter = self.meter.lock().unwrap_or_else(|p| p.into_inner());
        *meter = Some(Meter {
            read: Box::new(read),
            last,
        });
    }

    /// Removes the meter and counts the step as busy again: what follows the measured part
    /// (committing the result) is work.
    pub fn clear_meter(&self) {
        let mut meter = self.meter.lock().unwrap_or_else(|p| p.into_inner());
        *meter = None;
        self.idle.store(false, Ordering::SeqCst);
    }

    /// Says directly whether the step is idle (a worker without a meter; tests' fakes).
    /// A meter's next verdict overrides it.
    pub fn set_idle(&self, idle: bool) {
        self.idle.store(idle, Ordering::SeqCst);
    }

    pub fn is_idle(&self) -> bool {
        self.idle.load(Ordering::SeqCst)
    }

    /// Reads the meter, if any, and judges the window since the previous reading.
    pub(crate) fn sample(&self, now: Instant) {
        let mut guard = self.meter.lock().unwrap_or_else(|p| p.into_inner());
        let Some(meter) = guard.as_mut() else {
            return;
        };
        let Some(used) = (meter.read)() else {
            return;
        };
        if let Some((then, before)) = meter.last {
            let window = now.saturating_duration_since(then);
            if window < MIN_WINDOW {
                return;
            }
            let cpu = used.saturating_sub(before);
            self.idle.store(
                cpu.as_secs_f64() < IDLE_SHARE * window.as_secs_f64(),
                Ordering::SeqCst,
            );
        }
        meter.last = Some((now, used));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::AtomicU64;
    use std::sync::Arc;

    /// A meter whose CPU time the test sets, and a clock the test moves.
    fn metered() -> (StepActivity, Arc<AtomicU64>) {
        let usec = Arc::new(AtomicU64::new(0));
        let a = StepActivity::default();
        let reading = usec.clone();
        a.set_meter(move || Some(Duration::from_micros(reading.load(Ordering::SeqCst))));
        (a, usec)
    }

    #[test]
    fn a_step_is_idle_below_a_quarter_core_and_busy_again_above() {
        let (a, usec) = metered();
        let t0 = Instant::now();
        assert!(!a.is_idle(), "a new step is busy until measured");
        // 10 ms of CPU in 100 ms: idle.
        usec.store(10_000, Ordering::SeqCst);
        a.sample(t0 + Duration::from_millis(100));
        assert!(a.is_idle());
        // 80 ms more in the next 100 ms: busy again.
        usec.store(90_000, Ordering::SeqCst);
        a.sample(t0 + Duration::from_millis(200));
        assert!(!a.is_idle());
        // A reading only 10 ms later is too short a window to change the verdict.
        a.sample(t0 + Duration::from_millis(210));
        assert!(!a.is_idle());
        a.clear_meter();
        a.sample(t0 + Duration::from_millis(400));
        assert!(!a.is_idle());
    }

    #[test]
    fn a_meter_unreadable_at_the_start_counts_from_zero() {
        // The real meter reads nothing until the step's first process exists.
        let usec = Arc::new(AtomicU64::new(u64::MAX));
        let a = StepActivity::default();
        let reading = usec.clone();
        a.set_meter(move || {
            let v = reading.load(Ordering::SeqCst);
            (v != u64::MAX).then(|| Duration::from_micros(v))
        });
        usec.store(5_000, Ordering::SeqCst);
        a.sample(Instant::now() + Duration::from_millis(100));
        assert!(a.is_idle(), "5 ms of CPU since the start is idle");
    }

    #[test]
    fn without_a_meter_only_the_worker_decides() {
        let a = StepActivity::default();
        a.sample(Instant::now());
        assert!(!a.is_idle());
        a.set_idle(true);
        a.sample(Instant::now() + Duration::from_secs(1));
        assert!(a.is_idle());
    }
}
