//! Which WAL position may be acknowledged: transactions in stream (commit) order, each with
//! the count of its events not yet acked by the broker. The slot's confirmed position only
//! ever moves to the end of a transaction all of whose events, and all earlier ones', were
//! acknowledged, so a restart resumes at the first transaction not wholly delivered.

use std::collections::VecDeque;

/// A transaction's place in the queue.
pub(crate) type TxnId = u64;

#[derive(Debug)]
struct Txn {
    /// The commit's end LSN, once the commit was read.
    end_lsn: Option<u64>,
    outstanding: usize,
}

/// The ordered acknowledgement queue.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    txns: VecDeque<Txn>,
    first: TxnId,
    acked: u64,
}

impl Progress {
    /// A transaction's `Begin` was read.
    pub(crate) fn begin(&mut self) -> TxnId {
        self.txns.push_back(Txn {
            end_lsn: None,
            outstanding: 0,
        });
        self.first + self.txns.len() as u64 - 1
    }

    /// One more of `txn`'s events is in flight.
    pub(crate) fn sent(&mut self, txn: TxnId) {
        self.get(txn).outstanding += 1;
    }

    /// `txn`'s `Commit` was read; returns a newly acknowledgeable LSN, if any.
    pub(crate) fn commit(&mut self, txn: TxnId, end_lsn: u64) -> Option<u64> {
        self.get(txn).end_lsn = Some(end_lsn);
        self.advance()
    }

    /// One of `txn`'s events was acked by the broker (or dead-lettered); returns a newly
    /// acknowledgeable LSN, if any.
    pub(crate) fn done(&mut self, txn: TxnId) -> Option<u64> {
        let t = self.get(txn);
        t.outstanding = t.outstanding.checked_sub(1).expect("an event is done once");
        self.advance()
    }

    /// Nothing read is waiting for the broker, and no transaction is half read.
    pub(crate) fn is_idle(&self) -> bool {
        self.txns.is_empty()
    }

    /// The highest LSN acknowledged so far.
    pub(crate) fn acked(&self) -> u64 {
        self.acked
    }

    fn get(&mut self, txn: TxnId) -> &mut Txn {
        let i = usize::try_from(txn - self.first).expect("queue index");
        &mut self.txns[i]
    }

    fn advance(&mut self) -> Option<u64> {
        let before = self.acked;
        while let Some(front) = self.txns.front() {
            match front.end_lsn {
                Some(end) if front.outstanding == 0 => {
                    self.acked = self.acked.max(end);
                    self.txns.pop_front();
                    self.first += 1;
                }
                _ => break,
            }
        }
        (self.acked > before).then_some(self.acked)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_lsn_is_acknowledged_only_when_it_and_everything_before_it_is_delivered() {
        let mut p = Progress::default();
        let a = p.begin();
        p.sent(a);
        p.sent(a);
        assert_eq!(p.commit(a, 100), None, "two events of a still in flight");
        let b = p.begin();
        p.sent(b);
        assert_eq!(p.commit(b, 200), None);
        assert_eq!(p.done(b), None, "b is delivered but a is not");
        assert_eq!(p.done(a), None);
        assert_eq!(p.done(a), Some(200), "a and b both complete");
        assert!(p.is_idle());
        let c = p.begin();
        p.sent(c);
        assert_eq!(p.done(c), None, "the commit was not read yet");
        assert!(!p.is_idle());
        assert_eq!(p.commit(c, 300), Some(300));
        let empty = p.begin();
        assert_eq!(p.commit(empty, 400), Some(400), "no events of ours");
        assert_eq!(p.acked(), 400);
    }
}
