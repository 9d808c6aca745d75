//! Wall-clock time, injected so that lease expiry and renewal windows can be tested without
//! waiting for them.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

/// A source of the current time.
pub trait Clock: Send + Sync + 'static {
    fn now(&self) -> SystemTime;
}

/// The system's clock.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// A clock that moves only when told to.
#[derive(Debug, Clone)]
pub struct ManualClock(Arc<Mutex<SystemTime>>);

impl ManualClock {
    pub fn new(start: SystemTime) -> ManualClock {
        ManualClock(Arc::new(Mutex::new(start)))
    }

    /// Moves every copy of this clock forward.
    pub fn advance(&self, by: Duration) {
        let mut now = self.0.lock().unwrap_or_else(|e| e.into_inner());
        *now += by;
    }
}

impl Clock for ManualClock {
    fn now(&self) -> SystemTime {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A time as Kubernetes writes it (`metav1.Time`, whole seconds).
pub fn to_k8s_time(time: SystemTime) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::Time {
    let seconds = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
        k8s_openapi::jiff::Timestamp::from_second(seconds).unwrap_or_default(),
    )
}

/// A time as a Lease records it (`metav1.MicroTime`).
pub fn to_micro_time(
    time: SystemTime,
) -> k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime {
    let micros = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0);
    k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
        k8s_openapi::jiff::Timestamp::from_microsecond(micros).unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn manual_clock_moves_every_copy() {
        let clock = ManualClock::new(SystemTime::UNIX_EPOCH);
        let copy = clock.clone();
        clock.advance(Duration::from_secs(90));
        assert_eq!(copy.now(), SystemTime::UNIX_EPOCH + Duration::from_secs(90));
        assert_eq!(
            to_k8s_time(copy.now()).0.to_string(),
            "1970-01-01T00:01:30Z"
        );
    }
}
