//! The work queue: each key (a Cluster) is worked on by at most one task at a time, at most
//! `concurrency` keys at once, a key queued twice runs once, and a failing key waits an
//! exponentially growing time without holding up the others.
//!
//! One task owns all of the queue's state; callers send it commands.

use std::collections::{HashMap, HashSet, VecDeque};
use std::future::Future;
use std::hash::Hash;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio::task::{JoinHandle, JoinSet};
use tokio::time::Instant;
use tokio_util::time::{DelayQueue, delay_queue};

/// What one run of a key asks for next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Done; run again after this long (the resync, or sooner when something is due).
    After(Duration),
    /// Done; run again only when the key is added again.
    Idle,
    /// Failed; retry with this key's backoff.
    Retry,
}

#[derive(Debug, Clone)]
pub struct QueueConfig {
    /// Keys worked on at once.
    pub concurrency: usize,
    /// First retry delay of a failing key; doubled on each further failure.
    pub backoff_base: Duration,
    pub backoff_max: Duration,
}

impl Default for QueueConfig {
    fn default() -> Self {
        QueueConfig {
            concurrency: 16,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(300),
        }
    }
}

impl QueueConfig {
    /// Delay before the `failures`-th retry (1-based).
    pub fn backoff(&self, failures: u32) -> Duration {
        let factor = 2u32.saturating_pow(failures.saturating_sub(1).min(20));
        self.backoff_base
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

type Work<K> = Arc<dyn Fn(K) -> Pin<Box<dyn Future<Output = Next> + Send>> + Send + Sync>;

enum Command<K> {
    Add(K),
    AddAfter(K, Duration),
    Forget(K),
}

/// A handle to a running queue. Dropping every handle stops it.
#[derive(Clone)]
pub struct WorkQueue<K> {
    commands: mpsc::UnboundedSender<Command<K>>,
}

impl<K> WorkQueue<K>
where
    K: Clone + Eq + Hash + Send + Sync + std::fmt::Debug + 'static,
{
    /// Starts the queue's task. Keys run only while `active` is true (the leader); when it
    /// turns false, runs in progress are cancelled and their keys wait for the next time.
    pub fn start<F, Fut>(
        config: QueueConfig,
        active: watch::Receiver<bool>,
        work: F,
    ) -> (WorkQueue<K>, JoinHandle<()>)
    where
        F: Fn(K) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Next> + Send + 'static,
    {
        let (commands, receiver) = mpsc::unbounded_channel();
        let work: Work<K> = Arc::new(move |key| Box::pin(work(key)));
        let state = State::new(config, work);
        let task = tokio::spawn(state.run(receiver, active));
        (WorkQueue { commands }, task)
    }

    /// Queues a key to run as soon as a worker is free; a key already queued stays queued
    /// once, and a key running now runs once more afterwards.
    pub fn add(&self, key: K) {
        let _ = self.commands.send(Command::Add(key));
    }

    /// Queues a key to run after `delay`, unless it is due sooner anyway.
    pub fn add_after(&self, key: K, delay: Duration) {
        let _ = self.commands.send(Command::AddAfter(key, delay));
    }

    /// Drops every trace of a key (its Cluster is gone); a run in progress finishes but is
    /// not followed by another.
    pub fn forget(&self, key: K) {
        let _ = self.commands.send(Command::Forget(key));
    }
}

struct State<K> {
    config: QueueConfig,
    work: Work<K>,
    ready: VecDeque<K>,
    queued: HashSet<K>,
    running: HashMap<tokio::task::Id, K>,
    running_keys: HashSet<K>,
    /// Added while running: runs again when the current run ends.
    dirty: HashSet<K>,
    /// Forgotten while running.
    forgotten: HashSet<K>,
    timers: DelayQueue<K>,
    timer_of: HashMap<K, (delay_queue::Key, Instant)>,
    failures: HashMap<K, u32>,
    tasks: JoinSet<(K, Next)>,
}

impl<K> State<K>
where
    K: Clone + Eq + Hash + Send + Sync + std::fmt::Debug + 'static,
{
    fn new(config: QueueConfig, work: Work<K>) -> State<K> {
        State {
            config,
            work,
            ready: VecDeque::new(),
            queued: HashSet::new(),
            running: HashMap::new(),
            running_keys: HashSet::new(),
            dirty: HashSet::new(),
            forgotten: HashSet::new(),
            timers: DelayQueue::new(),
            timer_of: HashMap::new(),
            failures: HashMap::new(),
            tasks: JoinSet::new(),
        }
    }

    async fn run(
        mut self,
        mut commands: mpsc::UnboundedReceiver<Command<K>>,
        mut active: watch::Receiver<bool>,
    ) {
        let mut leading = *active.borrow_and_update();
        let mut active_open = true;
        loop {
            if leading {
                self.dispatch();
            }
            tokio::select! {
                command = commands.recv() => match command {
                    Some(Command::Add(key)) => self.add(key),
                    Some(Command::AddAfter(key, delay)) => self.add_after(key, delay),
                    Some(Command::Forget(key)) => self.forget(key),
                    None => break,
                },
                Some(expired) = self.timers.next(), if !self.timers.is_empty() => {
                    let key = expired.into_inner();
                    self.timer_of.remove(&key);
                    self.add(key);
                }
                Some(done) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    match done {
                        Ok((id, (key, next))) => self.finished(id, key, next),
                        Err(e) => {
                            // Cancelled on losing leadership (requeued there) or panicked.
                            if let Some(key) = self.running.remove(&e.id()) {
                                self.running_keys.remove(&key);
                                if e.is_panic() {
                                    tracing::error!(?key, "reconcile panicked");
                                    self.finished_keyless(key, Next::Retry);
                                }
                            }
                        }
                    }
                }
                changed = active.changed(), if active_open => {
                    if changed.is_err() {
                        active_open = false;
                        leading = false;
                    } else {
                        leading = *active.borrow_and_update();
                    }
                    if !leading {
                        self.cancel_running();
                    }
                }
            }
        }
        self.tasks.abort_all();
    }

    fn dispatch(&mut self) {
        while self.running.len() < self.config.concurrency.max(1) {
            let Some(key) = self.ready.pop_front() else {
                break;
            };
            self.queued.remove(&key);
            let work = self.work.clone();
            let run_key = key.clone();
            let handle = self.tasks.spawn(async move {
                let next = work(run_key.clone()).await;
                (run_key, next)
            });
            self.running.insert(handle.id(), key.clone());
            self.running_keys.insert(key);
        }
    }

    fn add(&mut self, key: K) {
        if self.running_keys.contains(&key) {
            self.dirty.insert(key);
            return;
        }
        if let Some((timer, _)) = self.timer_of.remove(&key) {
            self.timers.remove(&timer);
        }
        if self.queued.insert(key.clone()) {
            self.ready.push_back(key);
        }
    }

    fn add_after(&mut self, key: K, delay: Duration) {
        if delay.is_zero() {
            return self.add(key);
        }
        if self.queued.contains(&key) || self.dirty.contains(&key) {
            return;
        }
        let due = Instant::now() + delay;
        match self.timer_of.get(&key) {
            Some((_, existing)) if *existing <= due => {}
            Some((timer, _)) => {
                let timer = *timer;
                self.timers.reset_at(&timer, due);
                self.timer_of.insert(key, (timer, due));
            }
            None => {
                let timer = self.timers.insert_at(key.clone(), due);
                self.timer_of.insert(key, (timer, due));
            }
        }
    }

    fn forget(&mut self, key: K) {
        if self.queued.remove(&key) {
            self.ready.retain(|k| *k != key);
        }
        if let Some((timer, _)) = self.timer_of.remove(&key) {
            self.timers.remove(&timer);
        }
        self.dirty.remove(&key);
        self.failures.remove(&key);
        if self.running_keys.contains(&key) {
            self.forgotten.insert(key);
        }
    }

    fn finished(&mut self, id: tokio::task::Id, key: K, next: Next) {
        self.running.remove(&id);
        self.running_keys.remove(&key);
        self.finished_keyless(key, next);
    }

    fn finished_keyless(&mut self, key: K, next: Next) {
        if self.forgotten.remove(&key) {
            return;
        }
        match next {
            Next::After(delay) => {
                self.failures.remove(&key);
                self.add_after(key.clone(), delay);
            }
            Next::Idle => {
                self.failures.remove(&key);
            }
            Next::Retry => {
                let failures = self.failures.entry(key.clone()).or_insert(0);
                *failures += 1;
                let delay = self.config.backoff(*failures);
                self.add_after(key.clone(), delay);
            }
        }
        if self.dirty.remove(&key) {
            self.add(key);
        }
    }

    /// Leadership lost: what runs now stops, and runs again on the next leadership.
    fn cancel_running(&mut self) {
        self.tasks.abort_all();
        let keys: Vec<K> = self.running.drain().map(|(_, k)| k).collect();
        self.running_keys.clear();
        for key in keys {
            self.dirty.remove(&key);
            if !self.forgotten.remove(&key) {
                self.add(key);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;
    use std::sync::atomic::{AtomicUsize, Ordering};

    /// Records runs: (key, start time) and the most keys running at once.
    #[derive(Clone, Default)]
    struct Recorder {
        runs: Arc<Mutex<Vec<(u32, Duration)>>>,
        running: Arc<AtomicUsize>,
        most: Arc<AtomicUsize>,
        per_key: Arc<Mutex<HashMap<u32, usize>>>,
        overlap: Arc<AtomicUsize>,
    }

    impl Recorder {
        fn runs_of(&self, key: u32) -> Vec<Duration> {
            let runs = self.runs.lock().unwrap();
            runs.iter()
                .filter(|(k, _)| *k == key)
                .map(|(_, t)| *t)
                .collect()
        }
    }

    fn start_queue(
        config: QueueConfig,
        active: watch::Receiver<bool>,
        recorder: Recorder,
        decide: impl Fn(u32) -> Next + Send + Sync + 'static,
        work_time: Duration,
    ) -> WorkQueue<u32> {
        let origin = Instant::now();
        let decide = Arc::new(decide);
        let (queue, _task) = WorkQueue::start(config, active, move |key: u32| {
            let recorder = recorder.clone();
            let decide = decide.clone();
            async move {
                recorder.runs.lock().unwrap().push((key, origin.elapsed()));
                {
                    let mut per_key = recorder.per_key.lock().unwrap();
                    let n = per_key.entry(key).or_insert(0);
                    *n += 1;
                    if *n > 1 {
                        recorder.overlap.fetch_add(1, Ordering::SeqCst);
                    }
                }
                let now = recorder.running.fetch_add(1, Ordering::SeqCst) + 1;
                recorder.most.fetch_max(now, Ordering::SeqCst);
                tokio::time::sleep(work_time).await;
                recorder.running.fetch_sub(1, Ordering::SeqCst);
                *recorder.per_key.lock().unwrap().get_mut(&key).unwrap() -= 1;
                decide(key)
            }
        });
        queue
    }

    async fn settle(d: Duration) {
        tokio::time::sleep(d).await;
    }

    #[tokio::test(start_paused = true)]
    async fn a_key_queued_many_times_runs_once_and_never_twice_at_once() {
        let (_tx, rx) = watch::channel(true);
        let recorder = Recorder::default();
        let queue = start_queue(
            QueueConfig::default(),
            rx,
            recorder.clone(),
            |_| Next::Idle,
            Duration::from_millis(100),
        );
        for _ in 0..5 {
            queue.add(1);
        }
        settle(Duration::from_millis(50)).await;
        // Added while running: one more run after this one, not five.
        for _ in 0..5 {
            queue.add(1);
        }
        settle(Duration::from_secs(1)).await;
        assert_eq!(recorder.runs_of(1).len(), 2);
        assert_eq!(recorder.overlap.load(Ordering::SeqCst), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn concurrency_is_bounded() {
        let (_tx, rx) = watch::channel(true);
        let recorder = Recorder::default();
        let config = QueueConfig {
            concurrency: 4,
            ..QueueConfig::default()
        };
        let queue = start_queue(
            config,
            rx,
            recorder.clone(),
            |_| Next::Idle,
            Duration::from_millis(10),
        );
        for key in 0..40 {
            queue.add(key);
        }
        settle(Duration::from_secs(1)).await;
        assert_eq!(recorder.runs.lock().unwrap().len(), 40);
        assert_eq!(recorder.most.load(Ordering::SeqCst), 4);
    }

    #[tokio::test(start_paused = true)]
    async fn a_failing_key_backs_off_without_slowing_the_others() {
        let (_tx, rx) = watch::channel(true);
        let recorder = Recorder::default();
        let config = QueueConfig {
            concurrency: 2,
            backoff_base: Duration::from_secs(1),
            backoff_max: Duration::from_secs(4),
        };
        let queue = start_queue(
            config,
            rx,
            recorder.clone(),
            |key| {
                if key == 0 {
                    Next::Retry
                } else {
                    Next::After(Duration::from_secs(3))
                }
            },
            Duration::ZERO,
        );
        queue.add(0);
        queue.add(1);
        settle(Duration::from_millis(12_500)).await;
        let failing: Vec<u64> = recorder.runs_of(0).iter().map(|d| d.as_secs()).collect();
        // 0, +1, +2, +4 (capped), +4.
        assert_eq!(failing, vec![0, 1, 3, 7, 11]);
        let healthy: Vec<u64> = recorder.runs_of(1).iter().map(|d| d.as_secs()).collect();
        assert_eq!(healthy, vec![0, 3, 6, 9, 12]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_earlier_request_wins_over_a_later_timer_and_forget_stops_a_key() {
        let (_tx, rx) = watch::channel(true);
        let recorder = Recorder::default();
        let queue = start_queue(
            QueueConfig::default(),
            rx,
            recorder.clone(),
            |_| Next::After(Duration::from_secs(600)),
            Duration::ZERO,
        );
        queue.add(7);
        settle(Duration::from_secs(1)).await;
        queue.add_after(7, Duration::from_secs(5));
        settle(Duration::from_secs(10)).await;
        let runs: Vec<u64> = recorder.runs_of(7).iter().map(|d| d.as_secs()).collect();
        assert_eq!(runs, vec![0, 6]);
        queue.forget(7);
        settle(Duration::from_secs(1200)).await;
        assert_eq!(recorder.runs_of(7).len(), 2);
    }

    #[tokio::test(start_paused = true)]
    async fn only_the_leader_runs_keys() {
        let (tx, rx) = watch::channel(false);
        let recorder = Recorder::default();
        let queue = start_queue(
            QueueConfig::default(),
            rx,
            recorder.clone(),
            |_| Next::Idle,
            Duration::from_secs(10),
        );
        queue.add(1);
        queue.add(2);
        settle(Duration::from_secs(5)).await;
        assert!(recorder.runs.lock().unwrap().is_empty());
        tx.send(true).unwrap();
        settle(Duration::from_secs(1)).await;
        assert_eq!(recorder.runs.lock().unwrap().len(), 2);
        // Losing leadership cancels the runs; they run again on the next leadership.
        tx.send(false).unwrap();
        settle(Duration::from_secs(30)).await;
        assert_eq!(recorder.runs.lock().unwrap().len(), 2);
        tx.send(true).unwrap();
        settle(Duration::from_secs(1)).await;
        assert_eq!(recorder.runs.lock().unwrap().len(), 4);
    }
}
