//! A chunk being filled (from a peer or the origin), shared by every request that waits for it: its bytes
//! are verified group by group ([`fog_proto::groups`]) and passed on as each group verifies — cut-through
//! at every tier — instead of after the whole chunk has been stored. Without group hashes (an older
//! manifest) the whole chunk verifies at its end, which is store-and-forward again.

use bytes::{Bytes, BytesMut};
use fog_proto::groups::{Gate, Mismatch, Verifier};
use tokio::sync::watch;

/// What a fill has so far: verified pieces, in order, and how it ended.
#[derive(Debug, Clone, Default)]
struct Progress<E> {
    pieces: Vec<Bytes>,
    outcome: Option<Result<(), E>>,
}

/// The shared state of one fill. Followers see every verified piece, whenever they start following.
#[derive(Debug)]
pub struct Filling<E> {
    len: u32,
    progress: watch::Sender<Progress<E>>,
}

impl<E: Clone> Filling<E> {
    pub fn new(len: u32) -> Self {
        Self { len, progress: watch::Sender::new(Progress { pieces: Vec::new(), outcome: None }) }
    }

    pub fn chunk_len(&self) -> u32 {
        self.len
    }

    fn publish(&self, piece: Bytes) {
        self.progress.send_modify(|p| p.pieces.push(piece));
    }

    /// Ends the fill: every follower gets the outcome after the pieces published before it.
    pub fn end(&self, outcome: Result<(), E>) {
        self.progress.send_modify(|p| p.outcome = Some(outcome));
    }

    /// Ends the fill with `error` if nothing ended it yet.
    pub fn end_unless_ended(&self, error: E) {
        self.progress.send_if_modified(|p| {
            let open = p.outcome.is_none();
            if open {
                p.outcome = Some(Err(error));
            }
            open
        });
    }

    pub fn follow(&self) -> Follower<E> {
        Follower { rx: self.progress.subscribe(), next: 0, len: self.len }
    }
}

/// Reads a fill's verified pieces as they come.
#[derive(Debug)]
pub struct Follower<E> {
    rx: watch::Receiver<Progress<E>>,
    next: usize,
    len: u32,
}

/// The next thing a follower learns.
#[derive(Debug)]
pub enum Next<E> {
    Piece(Bytes),
    Done,
    /// The fill failed (`None`: its task ended without saying how, which only a panic does).
    Failed(Option<E>),
}

impl<E: Clone> Follower<E> {
    /// The chunk's length.
    pub fn chunk_len(&self) -> u32 {
        self.len
    }

    /// The next verified piece, or how the fill ended once every piece was read.
    pub async fn next(&mut self) -> Next<E> {
        loop {
            {
                let p = self.rx.borrow_and_update();
                if let Some(piece) = p.pieces.get(self.next) {
                    self.next += 1;
                    return Next::Piece(piece.clone());
                }
                match &p.outcome {
                    Some(Ok(())) => return Next::Done,
                    Some(Err(e)) => return Next::Failed(Some(e.clone())),
                    None => {}
                }
            }
            if self.rx.changed().await.is_err() {
                let p = self.rx.borrow();
                if p.outcome.is_none() && p.pieces.len() <= self.next {
                    return Next::Failed(None);
                }
            }
        }
    }

    /// Waits for the whole chunk (for requests that want a range of it, or a copy to keep).
    pub async fn whole(mut self) -> Result<Bytes, Option<E>> {
        let len = self.len;
        let mut out = BytesMut::with_capacity(len as usize);
        loop {
            match self.next().await {
                Next::Piece(p) => out.extend_from_slice(&p),
                Next::Done if out.len() == len as usize => return Ok(out.freeze()),
                Next::Done => return Err(None),
                Next::Failed(e) => return Err(e),
            }
        }
    }
}

/// Feeds a fill with bytes from one source, verifying them; a source that fails part-way is followed by
/// another from the first unverified byte on.
#[derive(Debug)]
pub struct Feed<'a, E> {
    filling: &'a Filling<E>,
    gate: Gate,
    /// Every verified byte, for the store.
    whole: BytesMut,
}

impl<'a, E: Clone> Feed<'a, E> {
    pub fn new(filling: &'a Filling<E>, verifier: Verifier) -> Self {
        let len = filling.chunk_len() as usize;
        Self { filling, gate: Gate::new(verifier), whole: BytesMut::with_capacity(len) }
    }

    pub fn chunk_len(&self) -> u32 {
        self.filling.chunk_len()
    }

    /// Takes the next bytes; each group that verifies goes to the followers at once.
    pub fn push(&mut self, piece: &[u8]) -> Result<(), Mismatch> {
        if let Some(ready) = self.gate.push(piece)? {
            self.whole.extend_from_slice(&ready);
            self.filling.publish(ready);
        }
        Ok(())
    }

    /// Bytes verified so far: where the next source must start.
    pub fn verified(&self) -> u32 {
        self.gate.verified()
    }

    pub fn is_done(&self) -> bool {
        self.gate.is_done()
    }

    /// Drops what the failed source sent past the last verified byte.
    pub fn restart(&mut self) {
        self.gate.rewind();
    }

    /// The whole chunk, once done.
    pub fn into_whole(self) -> Bytes {
        self.whole.freeze()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use fog_proto::groups::GroupHashes;
    use fog_proto::ChunkHash;

    fn grouped(chunk: &[u8]) -> Verifier {
        let groups = Some((4096, GroupHashes::of(chunk, 4096)));
        Verifier::new(ChunkHash::of(chunk), chunk.len() as u32, groups).expect("valid")
    }

    #[tokio::test]
    async fn followers_get_every_verified_group_whenever_they_join() {
        let chunk: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8).collect();
        let filling = Filling::<String>::new(10_000);
        let mut early = filling.follow();
        let mut feed = Feed::new(&filling, grouped(&chunk));
        feed.push(&chunk[..5000]).expect("matches");
        // The first group verified and went out; the rest of the second is held back.
        assert!(matches!(early.next().await, Next::Piece(p) if p[..] == chunk[..4096]));
        let late = filling.follow();
        feed.push(&chunk[5000..]).expect("matches");
        assert!(feed.is_done());
        filling.end(Ok(()));
        assert_eq!(late.whole().await.expect("whole"), chunk);
        let mut rest = Vec::new();
        while let Next::Piece(p) = early.next().await {
            rest.extend_from_slice(&p);
        }
        assert_eq!(rest, chunk[4096..]);
        assert_eq!(feed.into_whole(), chunk);
    }

    #[tokio::test]
    async fn a_failure_part_way_keeps_what_verified_and_the_next_source_goes_on_from_there() {
        let chunk: Vec<u8> = (0..10_000u32).map(|i| (i % 13) as u8).collect();
        let filling = Filling::<String>::new(10_000);
        let follower = filling.follow();
        let mut feed = Feed::new(&filling, grouped(&chunk));
        let mut bad = chunk.clone();
        bad[9000] ^= 1;
        feed.push(&bad[..8192]).expect("the first two groups are right");
        assert!(feed.push(&bad[8192..]).is_err());
        feed.restart();
        assert_eq!(feed.verified(), 8192);
        feed.push(&chunk[8192..]).expect("the rest from elsewhere");
        filling.end(Ok(()));
        // What cleans up after a task does not overwrite how it ended.
        filling.end_unless_ended("lost".into());
        assert_eq!(follower.whole().await.expect("whole"), chunk);

        let failed = Filling::<String>::new(10_000);
        let follower = failed.follow();
        failed.end(Err("origin gone".into()));
        assert_eq!(follower.whole().await, Err(Some("origin gone".to_string())));
        let abandoned = Filling::<String>::new(10);
        let follower = abandoned.follow();
        abandoned.end_unless_ended("lost".into());
        assert_eq!(follower.whole().await, Err(Some("lost".to_string())));
        // A filler that vanished without an outcome is a failure too, not a hang.
        let vanished = Filling::<String>::new(10);
        let mut follower = vanished.follow();
        drop(vanished);
        assert!(matches!(follower.next().await, Next::Failed(None)));
    }
}
