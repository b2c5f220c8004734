//! Playlists are mutable and pass through from the origin; the proxy only rewrites the URIs in them so
//! that players fetch every referenced object through the proxy. HLS (master and media playlists, tag
//! attributes such as `EXT-X-MAP:URI`) and DASH MPDs (`BaseURL`, `SegmentTemplate`, `SegmentURL`) are
//! handled. The media playlist's segment list also tells the proxy what the player will ask for next.

use super::urls::rewrite_uri;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Hls,
    Dash,
}

/// The playlist kind of an origin URL, by its path's extension.
pub fn kind_of(url: &str) -> Option<Kind> {
    let path = url.split(['?', '#']).next().unwrap_or(url).to_ascii_lowercase();
    if path.ends_with(".m3u8") || path.ends_with(".m3u") {
        Some(Kind::Hls)
    } else if path.ends_with(".mpd") {
        Some(Kind::Dash)
    } else {
        None
    }
}

pub(super) fn content_type(kind: Kind) -> &'static str {
    match kind {
        Kind::Hls => "application/vnd.apple.mpegurl",
        Kind::Dash => "application/dash+xml",
    }
}

/// Rewrites `URI="…"` attributes inside one HLS tag line.
fn rewrite_hls_attributes(line: &str, playlist: &str) -> String {
    let mut out = String::with_capacity(line.len() + 32);
    let mut rest = line;
    while let Some(pos) = rest.find("URI=\"") {
        let (head, tail) = rest.split_at(pos + 5);
        out.push_str(head);
        let Some(end) = tail.find('"') else {
            out.push_str(tail);
            return out;
        };
        out.push_str(&rewrite_uri(&tail[..end], playlist));
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

pub fn rewrite_hls(text: &str, playlist: &str) -> String {
    let mut out = String::with_capacity(text.len() + 256);
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.is_empty() {
            out.push_str(line);
        } else if trimmed.starts_with('#') {
            out.push_str(&rewrite_hls_attributes(line, playlist));
        } else {
            out.push_str(&rewrite_uri(trimmed, playlist));
        }
        out.push('\n');
    }
    out
}

/// Rewrites URI-valued attributes and `<BaseURL>` contents of an MPD.
pub fn rewrite_dash(xml: &str, mpd: &str) -> String {
    let mut out = xml.to_string();
    for attr in ["media=\"", "initialization=\"", "sourceURL=\"", "href=\""] {
        out = rewrite_between(&out, attr, "\"", mpd);
    }
    rewrite_between(&out, "<BaseURL>", "</BaseURL>", mpd)
}

fn rewrite_between(text: &str, open: &str, close: &str, base: &str) -> String {
    let mut out = String::with_capacity(text.len() + 64);
    let mut rest = text;
    while let Some(pos) = rest.find(open) {
        let (head, tail) = rest.split_at(pos + open.len());
        out.push_str(head);
        let Some(end) = tail.find(close) else {
            out.push_str(tail);
            return out;
        };
        let value = &tail[..end];
        let trimmed = value.trim();
        if trimmed.is_empty() {
            out.push_str(value);
        } else {
            out.push_str(&rewrite_uri(trimmed, base));
        }
        rest = &tail[end..];
    }
    out.push_str(rest);
    out
}

/// One media segment of an HLS media playlist: its origin URL and duration in seconds.
#[derive(Debug, Clone, PartialEq)]
pub struct Segment {
    pub url: String,
    pub duration: f64,
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

/// Longest segment duration believed, in seconds.
const MAX_SEGMENT_SECS: f64 = 86_400.0;

/// The media segments of an HLS media playlist (empty for a master playlist), with byte-range segments
/// left out (they are fetched by range, not prefetched whole), and those without a believable duration.
pub fn hls_segments(text: &str, playlist: &str) -> Vec<Segment> {
    let mut segments = Vec::new();
    let mut duration = None;
    let mut byterange = false;
    for line in text.lines().map(str::trim) {
        if let Some(d) = line.strip_prefix("#EXTINF:") {
            // The proxy turns durations into deadlines (`Duration::from_secs_f64` panics on a negative, NaN
            // or huge one) and adds them up: one outside 0..=a day counts as unknown.
            duration = d
                .split(',')
                .next()
                .and_then(|d| d.trim().parse::<f64>().ok())
                .filter(|d| (0.0..=MAX_SEGMENT_SECS).contains(d));
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

#[cfg(test)]
mod tests {
    use super::*;

    const PL: &str = "http://o:81/vod/index.m3u8";

    #[test]
    fn hls_rewrite_keeps_relative_and_rewrites_absolute() {
        let text = "#EXTM3U\n#EXT-X-MAP:URI=\"http://o:81/vod/init.mp4\",BYTERANGE=\"720@0\"\n#EXTINF:4.0,\nseg0.ts\n#EXTINF:4.0,\nhttp://cdn2/seg1.ts\n#EXT-X-KEY:METHOD=AES-128,URI=\"/keys/k1\"\n#EXTINF:2.5,\n/abs/seg2.ts\n";
        let out = rewrite_hls(text, PL);
        assert!(out.contains("#EXT-X-MAP:URI=\"/http/o:81/vod/init.mp4\",BYTERANGE=\"720@0\""), "{out}");
        assert!(out.contains("\nseg0.ts\n"));
        assert!(out.contains("\n/http/cdn2/seg1.ts\n"));
        assert!(out.contains("URI=\"/http/o:81/keys/k1\""));
        assert!(out.contains("\n/http/o:81/abs/seg2.ts\n"));
        let segs = hls_segments(text, PL);
        assert_eq!(
            segs,
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
    fn dash_rewrite() {
        let mpd = "<MPD><BaseURL>http://o:81/dash/</BaseURL><Period><AdaptationSet><SegmentTemplate media=\"chunk-$Number$.m4s\" initialization=\"http://o:81/dash/init.mp4\"/><SegmentURL media=\"/x/1.m4s\"/></AdaptationSet></Period></MPD>";
        let out = rewrite_dash(mpd, "http://o:81/dash/manifest.mpd");
        assert!(out.contains("<BaseURL>/http/o:81/dash/</BaseURL>"), "{out}");
        assert!(out.contains("media=\"chunk-$Number$.m4s\""));
        assert!(out.contains("initialization=\"/http/o:81/dash/init.mp4\""));
        assert!(out.contains("media=\"/http/o:81/x/1.m4s\""));
    }

    #[test]
    fn kinds() {
        assert_eq!(kind_of("http://o/a/index.m3u8?t=1"), Some(Kind::Hls));
        assert_eq!(kind_of("http://o/a/stream.MPD"), Some(Kind::Dash));
        assert_eq!(kind_of("http://o/a/seg.ts"), None);
    }
}
