//! Capture scheduling, without IO: a snapshotter runs at most one capture of its replica
//! at a time; requests that arrive meanwhile share the next capture (coalescing), and
//! the number of callers waiting is bounded.

/// What to do after a capture request.
#[derive(Debug, PartialEq, Eq)]
pub enum Requested<W> {
    /// Start a capture now.
    Start,
    /// A capture will run after the current one; the caller waits for it.
    Queued,
    /// Too many callers wait already: answer this one "busy".
    Full(W),
}

#[derive(Debug)]
pub struct CaptureQueue<W> {
    running: bool,
    current: Vec<W>,
    next: Vec<W>,
    again: bool,
    waiters_max: usize,
}

impl<W> CaptureQueue<W> {
    pub fn new(waiters_max: usize) -> CaptureQueue<W> {
        CaptureQueue {
            running: false,
            current: Vec::new(),
            next: Vec::new(),
            again: false,
            waiters_max,
        }
    }

    pub fn is_running(&self) -> bool {
        self.running
    }

    /// A capture is requested; `waiter` (if any) wants its result.
    pub fn request(&mut self, waiter: Option<W>) -> Requested<W> {
        if let Some(waiter) = waiter {
            if self.current.len() + self.next.len() >= self.waiters_max {
                return Requested::Full(waiter);
            }
            if self.running {
                self.next.push(waiter);
            } else {
                self.current.push(waiter);
            }
        }
        if self.running {
            self.again = true;
            Requested::Queued
        } else {
            self.running = true;
            Requested::Start
        }
    }

    /// The running capture finished: returns who to answer and whether to start another.
    pub fn finished(&mut self) -> (Vec<W>, bool) {
        let answered = std::mem::take(&mut self.current);
        if self.again {
            self.again = false;
            self.current = std::mem::take(&mut self.next);
            (answered, true)
        } else {
            self.running = false;
            (answered, false)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_during_a_capture_share_the_next_one() {
        let mut queue = CaptureQueue::new(3);
        assert_eq!(queue.request(Some(1)), Requested::Start);
        assert_eq!(queue.request(Some(2)), Requested::Queued);
        assert_eq!(queue.request(None), Requested::Queued);
        assert_eq!(queue.request(Some(3)), Requested::Queued);
        assert_eq!(queue.request(Some(4)), Requested::Full(4));
        assert_eq!(queue.finished(), (vec![1], true));
        assert!(queue.is_running());
        assert_eq!(queue.finished(), (vec![2, 3], false));
        assert!(!queue.is_running());
        assert_eq!(queue.request(None), Requested::Start);
        assert_eq!(queue.finished(), (vec![], false));
    }
}
