//! A yes-or-no that one task sets and others wait on: the peer's stop and pause (a button, a
//! hidden tab, a low battery, a signal). Training reads it between steps; code that waits (a
//! paused round, a back-off, the page forwarding to its training worker) wakes the moment it
//! changes instead of polling it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures::FutureExt;
use tokio::sync::Notify;
use web_time::Instant;

use crate::platform;

#[derive(Debug, Default)]
pub struct Flag {
    value: AtomicBool,
    changed: Notify,
}

impl Flag {
    pub fn new(value: bool) -> Self {
        Self {
            value: AtomicBool::new(value),
            changed: Notify::new(),
        }
    }

    pub fn get(&self) -> bool {
        self.value.load(Ordering::SeqCst)
    }

    /// Sets it, waking whoever waits for a change.
    pub fn set(&self, value: bool) {
        if self.value.swap(value, Ordering::SeqCst) != value {
            self.changed.notify_waiters();
        }
    }

    /// Resolves once the flag is `value`: at once when it already is.
    pub async fn becomes(&self, value: bool) {
        loop {
            // Created before the check, so a change between the two still wakes it.
            let notified = self.changed.notified();
            if self.get() == value {
                return;
            }
            notified.await;
        }
    }

    /// Sleeps for `delay`, or less when the flag is set first; whether it is set.
    pub async fn sleep_unless_set(&self, delay: Duration) -> bool {
        let set = self.becomes(true).fuse();
        let slept = platform::sleep(delay).fuse();
        futures::pin_mut!(set, slept);
        futures::select! {
            () = set => {},
            () = slept => {},
        }
        self.get()
    }
}

/// While `pause` is set, waits until it is cleared, `stop` is set or `until` passes (`None`: no
/// deadline).
pub async fn while_paused(pause: &Flag, stop: &Flag, until: Option<Instant>) {
    if !pause.get() || stop.get() {
        return;
    }
    let resumed = pause.becomes(false).fuse();
    let stopped = stop.becomes(true).fuse();
    let deadline = async {
        match until {
            Some(until) => platform::sleep(until.saturating_duration_since(Instant::now())).await,
            None => std::future::pending().await,
        }
    }
    .fuse();
    futures::pin_mut!(resumed, stopped, deadline);
    futures::select! {
        () = resumed => {},
        () = stopped => {},
        () = deadline => {},
    }
}

#[cfg(all(test, not(target_arch = "wasm32")))]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[tokio::test]
    async fn a_waiter_wakes_when_the_flag_changes_not_at_a_poll() {
        let flag = Arc::new(Flag::default());
        let waiter = tokio::spawn({
            let flag = flag.clone();
            async move { flag.becomes(true).await }
        });
        tokio::task::yield_now().await;
        assert!(!waiter.is_finished());
        let set = Instant::now();
        flag.set(true);
        waiter.await.expect("the waiter ends");
        assert!(set.elapsed() < Duration::from_millis(50));
        // Already set: at once.
        flag.becomes(true).await;
    }

    /// `while_paused` with no deadline, on a task of its own.
    fn paused_wait(pause: &Arc<Flag>, stop: &Arc<Flag>) -> tokio::task::JoinHandle<()> {
        let (pause, stop) = (pause.clone(), stop.clone());
        tokio::spawn(async move { while_paused(&pause, &stop, None).await })
    }

    #[tokio::test]
    async fn a_paused_wait_ends_on_resume_stop_or_deadline() {
        let (pause, stop) = (Arc::new(Flag::new(true)), Arc::new(Flag::default()));
        let soon = Instant::now() + Duration::from_millis(30);
        while_paused(&pause, &stop, Some(soon)).await;
        assert!(Instant::now() >= soon, "the deadline ends the wait");
        let waiter = paused_wait(&pause, &stop);
        tokio::task::yield_now().await;
        stop.set(true);
        waiter.await.expect("a stop ends the wait");
        stop.set(false);
        let waiter = paused_wait(&pause, &stop);
        tokio::task::yield_now().await;
        pause.set(false);
        waiter.await.expect("a resume ends the wait");
        assert!(!stop.sleep_unless_set(Duration::from_millis(1)).await);
    }
}
