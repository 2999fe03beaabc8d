//! Polls the futures that are rarely ready only when one of them has woken the task.
//!
//! A connection's loop waits on its I/O and, beside it, on things that almost never happen:
//! the forced end of a drain, a ban, a reload, its idle timer. Polling a cancellation
//! future locks its token and its `Notify` each time (two mutexes), and a relayed message
//! goes round the loop about six times: in the relay benchmark that polling was a tenth of
//! the gateway's user-space instructions per message (callgrind). [`WakeGate`] gives those
//! futures their own waker, which notes that one of them woke before it wakes the task;
//! until then the loop skips them. Nothing is missed: a future is only ever ready after it
//! wakes its waker, and a gated future that was last polled with the gate's waker keeps it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Wake, Waker};

use atomic_waker::AtomicWaker;

/// The waker handed to the gated futures: it notes the wake, then wakes the task.
#[derive(Default)]
struct Signal {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for Signal {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// One task's set of rarely-ready futures (see the module documentation).
pub struct WakeGate {
    signal: Arc<Signal>,
    /// The [`Signal`] as a waker, made once: futures compare wakers before replacing the
    /// one they hold, and the same waker compares equal without a clone.
    waker: Waker,
}

impl Default for WakeGate {
    fn default() -> Self {
        Self::new()
    }
}

impl WakeGate {
    /// A gate whose futures are polled at the first [`WakeGate::woken`]: they must be polled
    /// once to register the gate's waker.
    pub fn new() -> Self {
        let signal = Arc::new(Signal {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        let waker = Waker::from(signal.clone());
        WakeGate { signal, waker }
    }

    /// Registers the task to be woken through the gate, and says whether the gated futures
    /// must be polled now (with [`WakeGate::context`]): one of them woke, or the gate was
    /// re-armed. Each true must be followed by polling every gated future until one is ready,
    /// or by [`WakeGate::rearm`].
    pub fn woken(&self, cx: &Context<'_>) -> bool {
        // Registered before the flag is read: a wake in between sets the flag and wakes the
        // task again, so it is seen at the latest on the next poll.
        self.signal.task.register(cx.waker());
        self.signal.woken.swap(false, Ordering::AcqRel)
    }

    /// The context to poll the gated futures with.
    pub fn context(&self) -> Context<'_> {
        Context::from_waker(&self.waker)
    }

    /// Makes the next [`WakeGate::woken`] true: after a gated future was ready (the others
    /// may be ready too, unpolled), or was replaced or reset and must register again.
    pub fn rearm(&self) {
        self.signal.woken.store(true, Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::future::Future;
    use std::pin::pin;
    use std::sync::atomic::AtomicUsize;
    use std::task::Poll;

    /// Counts the task's wakes.
    #[derive(Default)]
    struct CountingWaker(AtomicUsize);

    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    #[test]
    fn gated_futures_are_polled_first_then_only_after_they_wake() {
        let task = Arc::new(CountingWaker::default());
        let task_waker = Waker::from(task.clone());
        let cx = Context::from_waker(&task_waker);
        let gate = WakeGate::new();
        let notify = tokio::sync::Notify::new();
        let mut notified = pin!(notify.notified());

        assert!(
            gate.woken(&cx),
            "the first poll registers the gated futures"
        );
        assert!(notified.as_mut().poll(&mut gate.context()).is_pending());
        assert!(
            !gate.woken(&cx),
            "nothing woke: the gated futures are skipped"
        );
        assert!(!gate.woken(&cx));
        assert_eq!(task.0.load(Ordering::SeqCst), 0);

        notify.notify_waiters();
        assert_eq!(task.0.load(Ordering::SeqCst), 1, "the task is woken");
        assert!(gate.woken(&cx), "and polls the gated futures");
        assert_eq!(notified.as_mut().poll(&mut gate.context()), Poll::Ready(()));
    }

    #[test]
    fn rearm_makes_the_next_poll_go_through() {
        let task_waker = Waker::from(Arc::new(CountingWaker::default()));
        let cx = Context::from_waker(&task_waker);
        let gate = WakeGate::new();
        assert!(gate.woken(&cx));
        assert!(!gate.woken(&cx));
        gate.rearm();
        assert!(gate.woken(&cx));
        assert!(!gate.woken(&cx));
    }

    #[tokio::test]
    async fn a_gated_timer_wakes_the_task() {
        let gate = WakeGate::new();
        let mut sleep = pin!(tokio::time::sleep(std::time::Duration::from_millis(10)));
        let fired = std::future::poll_fn(|cx| {
            if gate.woken(cx) && sleep.as_mut().poll(&mut gate.context()).is_ready() {
                return Poll::Ready(true);
            }
            Poll::Pending
        });
        assert!(fired.await, "the timer fired through the gate");
    }
}
