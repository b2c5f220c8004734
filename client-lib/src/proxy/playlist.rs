//! Playlists are mutable and pass through from the origin; the proxy only rewrites the URIs in them so
//! that players fetch every referenced object through the proxy. HLS (master and media playlists, tag
//! attributes such as `EXT-X-MAP:URI`) and DASH MPDs (`BaseURL`, `SegmentTemplate`, `SegmentURL`) are
//! handled. The media playlist's segment list (`fog_proto::hls`, which the tracker reads too) also tells the
//! proxy what the player will ask for next.

pub use fog_proto::hls::{hls_segments, Segment};

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
