//! The event queue: a min-heap on (time, sequence), so events at the same instant run in the
//! order they were scheduled and a run never depends on heap internals.

use std::cmp::Ordering;
use std::collections::BinaryHeap;

use aimatrix_protocol::time::Millis;

struct Entry<E> {
    at: Millis,
    seq: u64,
    event: E,
}

impl<E> PartialEq for Entry<E> {
    fn eq(&self, other: &Self) -> bool {
        (self.at, self.seq) == (other.at, other.seq)
    }
}
impl<E> Eq for Entry<E> {}
impl<E> PartialOrd for Entry<E> {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl<E> Ord for Entry<E> {
    fn cmp(&self, other: &Self) -> Ordering {
        // Reversed: BinaryHeap is a max-heap and the earliest (time, seq) must come first.
        (other.at, other.seq).cmp(&(self.at, self.seq))
    }
}

/// Events ordered by time, ties broken by scheduling order.
pub(crate) struct EventQueue<E> {
    heap: BinaryHeap<Entry<E>>,
    next_seq: u64,
}

impl<E> EventQueue<E> {
    pub(crate) fn new() -> Self {
        Self { heap: BinaryHeap::new(), next_seq: 0 }
    }

    pub(crate) fn push(&mut self, at: Millis, event: E) {
        self.heap.push(Entry { at, seq: self.next_seq, event });
        self.next_seq += 1;
    }

    /// The earliest event at or before `until`.
    pub(crate) fn pop_until(&mut self, until: Millis) -> Option<(Millis, E)> {
        if self.heap.peek()?.at > until {
            return None;
        }
        self.heap.pop().map(|e| (e.at, e.event))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_instant_events_keep_their_scheduling_order() {
        let mut q = EventQueue::new();
        q.push(5, "b1");
        q.push(3, "a");
        q.push(5, "b2");
        q.push(9, "late");
        let got: Vec<_> = std::iter::from_fn(|| q.pop_until(8)).collect();
        assert_eq!(got, vec![(3, "a"), (5, "b1"), (5, "b2")]);
        assert_eq!(q.pop_until(100), Some((9, "late")));
    }
}
