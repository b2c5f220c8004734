//! HLS media playlists, as far as fogcdn reads them: the player proxy learns which segments a player will
//! ask for next, and the tracker follows live playlists to push their new segments. Pure functions of the
//! playlist's text (lossy UTF-8, as an origin may send anything) and the URL it came from.

/// One media segment of an HLS media playlist: its origin URL and duration in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub url: String,
    pub duration: f64,
}

/// Longest segment (or target) duration believed, in seconds.
pub const MAX_SEGMENT_SECS: f64 = 86_400.0;

/// A media playlist: its segments, the longest a segment may be (`#EXT-X-TARGETDURATION`, how often a live
/// playlist is reloaded) and whether it is complete (`#EXT-X-ENDLIST`: nothing will be added).
#[derive(Debug, Clone, PartialEq)]
pub struct MediaPlaylist {
    pub segments: Vec<Segment>,
    pub target_duration: Option<f64>,
    pub ended: bool,
}

impl MediaPlaylist {
    /// Whether segments will still be added: a media playlist without `#EXT-X-ENDLIST`.
    pub fn is_live(&self) -> bool {
        !self.ended
    }
}

/// Why a text is not a media playlist.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum PlaylistError {
    #[error("not an HLS playlist (it does not start with #EXTM3U)")]
    NotHls,
    #[error("a master playlist (it lists variants, not segments)")]
    Master,
}

/// Resolves a (possibly relative) URI against an origin URL.
fn resolve(uri: &str, base: &str) -> String {
    if uri.contains("://") {
        return uri.to_string();
    }
    let (scheme, rest) = base.split_once("://").unwrap_or(("http", base));
    let host = rest.split('/').next().unwrap_or("");
    if let Some(net) = uri.strip_prefix("//") {
        return format!("{scheme}://{net}");
    }
    if uri.starts_with('/') {
        return format!("{scheme}://{host}{uri}");
    }
    let dir = base.split(['?', '#']).next().unwrap_or(base);
    let dir = &dir[..dir.rfind('/').map_or(dir.len(), |i| i + 1)];
    format!("{dir}{uri}")
}

/// A duration in seconds if it is believable: its users turn durations into deadlines and timers
/// (`Duration::from_secs_f64` panics on a negative, NaN or huge one) and add them up.
fn believable(secs: &str) -> Option<f64> {
    secs.trim().parse::<f64>().ok().filter(|d| (0.0..=MAX_SEGMENT_SECS).contains(d))
}

/// The media segments of an HLS media playlist at `playlist` (empty for a master playlist), with byte-range
/// segments left out (they are fetched by range, not whole), and those without a believable duration.
pub fn hls_segments(text: &str, playlist: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    let mut duration = None;
    let mut byterange = false;
    for line in text.lines().map(str::trim) {
        if let Some(d) = line.strip_prefix("#EXTINF:") {
            duration = d.split(',').next().and_then(believable);
        } else if line.starts_with("#EXT-X-BYTERANGE") {
            byterange = true;
        } else if !line.is_empty() && !line.starts_with('#') {
            if let (Some(d), false) = (duration.take(), byterange) {
                segments.push(Segment { url: resolve(line, playlist), duration: d });
            }
            byterange = false;
        }
    }
    segments
}

/// The media playlist `text` fetched from `playlist`, or why it is none.
pub fn media_playlist(text: &str, playlist: &str) -> Result<MediaPlaylist, PlaylistError> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    if lines.next() != Some("#EXTM3U") {
        return Err(PlaylistError::NotHls);
    }
    let (mut target_duration, mut ended) = (None, false);
    for line in lines {
        if line.starts_with("#EXT-X-STREAM-INF") {
            return Err(PlaylistError::Master);
        } else if let Some(d) = line.strip_prefix("#EXT-X-TARGETDURATION:") {
            target_duration = believable(d);
        } else if line == "#EXT-X-ENDLIST" {
            ended = true;
        }
    }
    Ok(MediaPlaylist { segments: hls_segments(text, playlist), target_duration, ended })
}

#[cfg(test)]
mod tests {
    use super::*;

    const PL: &str = "http://o:81/vod/index.m3u8";

    #[test]
    fn segments_resolve_against_the_playlist() {
        let text = "#EXTM3U\n#EXT-X-MAP:URI=\"http://o:81/vod/init.mp4\",BYTERANGE=\"720@0\"\n#EXTINF:4.0,\nseg0.ts\n#EXTINF:4.0,\nhttp://cdn2/seg1.ts\n#EXT-X-KEY:METHOD=AES-128,URI=\"/keys/k1\"\n#EXTINF:2.5,\n/abs/seg2.ts\n#EXTINF:2,\n#EXT-X-BYTERANGE:100@0\nranged.ts\n";
        assert_eq!(
            hls_segments(text, PL),
            vec![
                Segment { url: "http://o:81/vod/seg0.ts".into(), duration: 4.0 },
                Segment { url: "http://cdn2/seg1.ts".into(), duration: 4.0 },
                Segment { url: "http://o:81/abs/seg2.ts".into(), duration: 2.5 },
            ]
        );
    }

    /// Found by `fuzz/fuzz_targets/playlist.rs`: these durations made the proxy panic in
    /// `Duration::from_secs_f64` when the player asked for the segment.
    #[test]
    fn unbelievable_durations_are_unknown() {
        let text =
            "#EXTINF:-1,\na.ts\n#EXTINF:NaN,\nb.ts\n#EXTINF:inf,\nc.ts\n#EXTINF:1e400,\nd.ts\n#EXTINF:2,\ne.ts\n";
        assert_eq!(hls_segments(text, PL), vec![Segment { url: "http://o:81/vod/e.ts".into(), duration: 2.0 }]);
    }

    #[test]
    fn live_media_and_master_playlists() {
        let live =
            "#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXT-X-MEDIA-SEQUENCE:7\n#EXTINF:2.0,\ns7.ts\n#EXTINF:2.0,\ns8.ts\n";
        let m = media_playlist(live, PL).expect("media playlist");
        assert!(m.is_live());
        assert_eq!((m.target_duration, m.segments.len()), (Some(2.0), 2));
        assert_eq!(m.segments[1].url, "http://o:81/vod/s8.ts");
        let ended = media_playlist(&format!("{live}#EXT-X-ENDLIST\n"), PL).expect("media playlist");
        assert!(!ended.is_live());
        let master = "#EXTM3U\n#EXT-X-STREAM-INF:BANDWIDTH=800000\nlow/index.m3u8\n";
        assert_eq!(media_playlist(master, PL), Err(PlaylistError::Master));
        assert_eq!(media_playlist("<html>", PL), Err(PlaylistError::NotHls));
        assert_eq!(media_playlist("", PL), Err(PlaylistError::NotHls));
        let wild = media_playlist("#EXTM3U\n#EXT-X-TARGETDURATION:NaN\n", PL).expect("media playlist");
        assert_eq!(wild.target_duration, None);
    }
}
