//! Coalescing of reads that must be as fresh as their own arrival.
//!
//! A client without the session cookie is read from the primary so that it
//! sees every write committed before its request (it could have written
//! through any webapp). Many such reads at once need not each run a query:
//! a query *started after* a request arrived has a snapshot that holds every
//! write committed before that arrival, so its answer is good for every
//! request that arrived before it started. This is the read batching of
//! linearizable stores (etcd's ReadIndex batches the same way).
//!
//! A [`Coalescer`] keeps one open *flight* that arriving calls join. One run
//! goes at a time; the member that gets to run a flight first closes it (new
//! arrivals then open the next one), and only after that starts the read, so
//! every member arrived before the read began. The other members take its
//! result. With one read in flight, the calls that arrive meanwhile wait for
//! the next one: at most two reads' time, for everyone. When nobody else is
//! reading, a call runs at once, as without coalescing.
//!
//! A run whose caller goes away (its future dropped mid-read) leaves no
//! result; the flight's next member runs it again, still after its arrival.

use std::future::Future;
use std::sync::{Arc, Mutex, OnceLock};

/// Calls that arrive while others are waiting share the next run.
pub struct Coalescer<T> {
    open: Mutex<Option<Arc<OnceLock<T>>>>,
    turn: tokio::sync::Mutex<()>,
}

impl<T: Clone> Default for Coalescer<T> {
    fn default() -> Self {
        Coalescer {
            open: Mutex::new(None),
            turn: tokio::sync::Mutex::new(()),
        }
    }
}

impl<T: Clone> Coalescer<T> {
    /// `read`'s answer, from a run of it that started after this call.
    pub async fn run<F, Fut>(&self, read: F) -> T
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = T>,
    {
        let flight = {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            open.get_or_insert_with(|| Arc::new(OnceLock::new()))
                .clone()
        };
        // The turn is a fair (FIFO) lock: the members of a flight, queued
        // before any member of the next, find their answer first.
        let _turn = self.turn.lock().await;
        if let Some(answer) = flight.get() {
            return answer.clone();
        }
        {
            let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
            if open.as_ref().is_some_and(|o| Arc::ptr_eq(o, &flight)) {
                *open = None;
            }
        }
        let answer = read().await;
        let _ = flight.set(answer.clone());
        answer
    }

    /// How many calls wait in the open flight.
    #[cfg(test)]
    fn waiting(&self) -> usize {
        let open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        open.as_ref().map_or(0, |o| Arc::strong_count(o) - 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::Duration;

    /// A "database": a counter of writes, and reads that note which runs
    /// happened and what they saw.
    #[derive(Default)]
    struct Db {
        writes: AtomicU64,
        runs: AtomicU64,
    }

    impl Db {
        async fn read(&self, gate: &tokio::sync::Notify) -> u64 {
            self.runs.fetch_add(1, Ordering::SeqCst);
            // The snapshot is taken as the read starts.
            let seen = self.writes.load(Ordering::SeqCst);
            gate.notified().await;
            seen
        }
    }

    async fn until(deadline_what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !ok() {
            assert!(
                tokio::time::Instant::now() < deadline,
                "timed out: {deadline_what}"
            );
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
    }

    #[tokio::test]
    async fn calls_arriving_during_a_read_share_the_next_one_and_see_writes_before_them() {
        let db = Arc::new(Db::default());
        let gate = Arc::new(tokio::sync::Notify::new());
        let co = Arc::new(Coalescer::<u64>::default());

        // A first call starts a read at once (nobody else is reading).
        let first = {
            let (db, gate, co) = (db.clone(), gate.clone(), co.clone());
            tokio::spawn(async move { co.run(|| async { db.read(&gate).await }).await })
        };
        until("the first read starts", || {
            db.runs.load(Ordering::SeqCst) == 1
        })
        .await;

        // A write commits after the first read's snapshot, then ten calls
        // arrive: the first read must not answer them.
        db.writes.fetch_add(1, Ordering::SeqCst);
        let later: Vec<_> = (0..10)
            .map(|_| {
                let (db, gate, co) = (db.clone(), gate.clone(), co.clone());
                tokio::spawn(async move { co.run(|| async { db.read(&gate).await }).await })
            })
            .collect();
        until("ten calls wait", || co.waiting() == 10).await;
        gate.notify_one();
        assert_eq!(first.await.unwrap(), 0);

        // One more read serves all ten, and it saw the write.
        until("the second read starts", || {
            db.runs.load(Ordering::SeqCst) == 2
        })
        .await;
        gate.notify_one();
        for call in later {
            assert_eq!(
                call.await.unwrap(),
                1,
                "a call was answered from before its arrival"
            );
        }
        assert_eq!(
            db.runs.load(Ordering::SeqCst),
            2,
            "ten waiting calls took one read"
        );
    }

    #[tokio::test]
    async fn a_call_after_a_read_finished_reads_again() {
        let co = Coalescer::<u64>::default();
        let runs = AtomicU64::new(0);
        let read = || async { runs.fetch_add(1, Ordering::SeqCst) + 1 };
        assert_eq!(co.run(read).await, 1);
        assert_eq!(co.run(read).await, 2);
    }

    #[tokio::test]
    async fn a_dropped_reader_leaves_its_flight_to_the_next_member() {
        let db = Arc::new(Db::default());
        let gate = Arc::new(tokio::sync::Notify::new());
        let co = Arc::new(Coalescer::<u64>::default());
        let running = Arc::new(Mutex::new(None));
        let spawn = |id: usize| {
            let (db, gate, co, running) = (db.clone(), gate.clone(), co.clone(), running.clone());
            tokio::spawn(async move {
                co.run(|| async {
                    *running.lock().unwrap() = Some(id);
                    db.read(&gate).await
                })
                .await
            })
        };
        let first = spawn(0);
        until("the first read starts", || {
            db.runs.load(Ordering::SeqCst) == 1
        })
        .await;
        let mut members = vec![spawn(1), spawn(2)];
        until("two calls wait", || co.waiting() == 2).await;
        gate.notify_one();
        assert_eq!(first.await.unwrap(), 0);
        until("a member runs the second read", || {
            db.runs.load(Ordering::SeqCst) == 2
        })
        .await;

        // The client of that read goes away: the other member runs a read
        // of its own rather than wait for an answer that never comes.
        let runner = running.lock().unwrap().expect("a read is running");
        members.remove(runner - 1).abort();
        db.writes.fetch_add(1, Ordering::SeqCst);
        until("the other member reads again", || {
            db.runs.load(Ordering::SeqCst) == 3
        })
        .await;
        gate.notify_one();
        assert_eq!(members.pop().unwrap().await.unwrap(), 1);
    }
}
