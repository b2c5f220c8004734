//! A viewer's player, as HLS and DASH players in browsers behave (hls.js, dash.js): it fetches one chunk at a
//! time, in order, the next as soon as the previous has arrived while less than its buffer target is
//! buffered, and otherwise once playback has drained the buffer to the target.
//!
//! - **Startup** is the time from pressing play until playback starts: once the first `startup_secs` of media
//!   (by default one second: "the first playable second") have arrived. The client hands a chunk to the
//!   player only once it has verified all of it, so media arrives a whole chunk at a time: with 2 s chunks
//!   playback starts when the first chunk has arrived — as hls.js and dash.js do, which start playing on the
//!   first appended segment.
//! - **Stalls**: once playing, a chunk that arrives after the buffered media ran out stalls playback from
//!   that moment until it arrives; playback resumes at once (hls.js does; players that wait to rebuffer
//!   several seconds first stall fewer times but longer). A chunk that takes `f` seconds to arrive while `b`
//!   seconds are buffered stalls `max(0, f − b)`.
//! - **Watch time** is the time from the start of playback to its end: the media played plus the stalls
//!   (startup excluded, as in the industry's rebuffering ratio). Rebuffer ratio = stalled / watch time.
//!
//! All times are simulated seconds.

/// One viewing session's playback state.
#[derive(Debug, Clone)]
pub struct Player {
    chunk_secs: f64,
    target_secs: f64,
    startup_secs: f64,
    pressed_at: f64,
    /// Media received so far, seconds.
    media: f64,
    /// When the received media will have played out (the buffer runs dry), once playback has started.
    dry_at: Option<f64>,
}

/// What one arriving chunk did to playback.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Arrival {
    /// Playback started with this chunk, this long after play was pressed.
    pub startup: Option<f64>,
    /// Seconds playback stood still waiting for this chunk.
    pub stall: f64,
    /// Seconds this chunk adds to the watch time: its media plus its stall (zero until playback starts,
    /// when the media received during startup counts at once).
    pub watch: f64,
}

impl Player {
    /// A player whose viewer pressed play at `pressed_at`; `buffer_secs` is its buffer target, `startup_secs`
    /// the media it needs before it starts playing (no more than the session has).
    pub fn new(pressed_at: f64, chunk_secs: f64, buffer_secs: f64, startup_secs: f64) -> Self {
        Self { chunk_secs, target_secs: buffer_secs, startup_secs, pressed_at, media: 0.0, dry_at: None }
    }

    /// The next chunk arrived (whole and verified) at `at`.
    pub fn arrived(&mut self, at: f64) -> Arrival {
        self.media += self.chunk_secs;
        match self.dry_at {
            Some(dry_at) => {
                let stall = (at - dry_at).max(0.0);
                self.dry_at = Some(dry_at.max(at) + self.chunk_secs);
                Arrival { startup: None, stall, watch: self.chunk_secs + stall }
            }
            None if self.media + 1e-9 >= self.startup_secs => {
                self.dry_at = Some(at + self.media);
                Arrival { startup: Some(at - self.pressed_at), stall: 0.0, watch: self.media }
            }
            None => Arrival { startup: None, stall: 0.0, watch: 0.0 },
        }
    }

    /// Whether no chunk has arrived yet.
    pub fn is_new(&self) -> bool {
        self.media == 0.0
    }

    /// Seconds of media buffered ahead of the playhead at `t` (all received media before playback starts).
    pub fn buffered(&self, t: f64) -> f64 {
        self.dry_at.map_or(self.media, |dry_at| (dry_at - t).max(0.0))
    }

    /// When the player asks for its next chunk, the previous one having arrived at `at`: at once while less
    /// than the target is buffered, else when playback has drained the buffer to the target.
    pub fn next_request(&self, at: f64) -> f64 {
        let over = self.buffered(at) - self.target_secs;
        if over < 0.0 {
            at
        } else {
            at + over
        }
    }

    /// When the media received so far will have played out, once playback has started.
    pub fn playback_end(&self) -> Option<f64> {
        self.dry_at
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// 2 s chunks, a 10 s buffer, playback starts on the first second.
    fn player(pressed_at: f64) -> Player {
        Player::new(pressed_at, 2.0, 10.0, 1.0)
    }

    #[test]
    fn startup_is_the_first_chunks_arrival_and_startup_media_counts_as_watched() {
        let mut p = player(5.0);
        let a = p.arrived(5.7);
        assert_eq!(a.startup, Some(0.7000000000000002));
        assert_eq!((a.stall, a.watch), (0.0, 2.0));
        assert_eq!(p.playback_end(), Some(7.7));
    }

    #[test]
    fn a_startup_of_several_chunks_waits_for_all_of_them() {
        let mut p = Player::new(0.0, 2.0, 10.0, 5.0);
        assert_eq!(p.arrived(1.0), Arrival { startup: None, stall: 0.0, watch: 0.0 });
        assert_eq!(p.buffered(1.5), 2.0, "nothing plays before startup");
        assert_eq!(p.arrived(2.0).startup, None);
        let third = p.arrived(3.0);
        assert_eq!((third.startup, third.watch), (Some(3.0), 6.0));
        assert_eq!(p.playback_end(), Some(9.0));
    }

    #[test]
    fn a_late_chunk_stalls_by_its_fetch_time_minus_what_was_buffered() {
        for (fetch, buffered) in [(0.5, 2.0), (3.0, 2.0), (7.5, 4.0), (4.0, 4.0)] {
            let mut p = player(0.0);
            p.arrived(0.0);
            // Build up `buffered` seconds at t = 0 (chunks arriving at once).
            while p.buffered(0.0) < buffered {
                p.arrived(0.0);
            }
            assert_eq!(p.buffered(0.0), buffered);
            let a = p.arrived(fetch);
            let stall = (fetch - buffered).max(0.0);
            assert!((a.stall - stall).abs() < 1e-9, "fetch {fetch} s with {buffered} s buffered stalled {}", a.stall);
            assert!((a.watch - (2.0 + stall)).abs() < 1e-9);
            assert_eq!(p.playback_end().map(|end| (end - (buffered.max(fetch) + 2.0)).abs() < 1e-9), Some(true));
        }
    }

    #[test]
    fn requests_follow_arrivals_below_the_target_and_wait_above_it() {
        let mut p = player(0.0);
        let mut t = 0.0;
        // Each chunk takes 0.5 s: the buffer grows by 1.5 s per chunk until it exceeds the 10 s target.
        for _ in 0..6 {
            t += 0.5;
            p.arrived(t);
            assert_eq!(p.next_request(t), t);
        }
        t += 0.5;
        p.arrived(t);
        // 7 chunks = 14 s received at t = 3.5, played from 0.5: 11 s buffered, 1 s above the target.
        assert!((p.buffered(t) - 11.0).abs() < 1e-9);
        assert!((p.next_request(t) - (t + 1.0)).abs() < 1e-9);
    }

    #[test]
    fn stalls_accumulate_into_the_watch_time() {
        let mut p = player(0.0);
        let mut watch = p.arrived(1.0).watch; // plays 1..3
        let late = p.arrived(4.0); // ran dry at 3: a 1 s stall, plays 4..6
        watch += late.watch;
        watch += p.arrived(5.0).watch; // in time: plays 6..8
        assert_eq!(late.stall, 1.0);
        assert_eq!(watch, 7.0);
        assert_eq!(p.playback_end(), Some(8.0));
        assert_eq!(
            Some(watch),
            p.playback_end().map(|end| end - 1.0),
            "watch time runs from playback start to its end"
        );
    }
}
