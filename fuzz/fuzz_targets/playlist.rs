//! The player proxy's playlist handling, on any text an origin may send (as the proxy decodes it, lossy
//! UTF-8) and a playlist URL as the HTTP client reports it: HLS rewriting keeps every line and every byte
//! outside the URIs it rewrites; DASH rewriting adds no markup; every rewritten URI is a proxy
//! path that stands for the object the playlist named; the segment list has only durations the proxy can
//! turn into deadlines, and absolute URLs.
#![no_main]

use std::time::Duration;

use fog_client::proxy::{hls_segments, origin_url, rewrite_dash, rewrite_hls};
use fog_fuzz::split_values;
use libfuzzer_sys::fuzz_target;
use url::Url;

/// Playlist URLs as `reqwest` reports them after redirects (serialised `url::Url`s).
const BASES: [&str; 8] = [
    "http://o.example/vod/index.m3u8",
    "https://cdn.example:8443/live/master.m3u8?token=abc",
    "http://127.0.0.1:8080/a/b/c.mpd",
    "http://[::1]:81/dash/manifest.mpd",
    "https://o.example/",
    "http://o.example/dir/sub/?q=1",
    "https://xn--bcher-kva.example/v/p.m3u8",
    "http://o.example:81/v/a%20b/index.m3u8",
];

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let base = BASES[usize::from(pick) % BASES.len()];
    let text = String::from_utf8_lossy(rest);
    hls(&text, base);
    dash(&text, base);
    segments(&text, base);
});

fn hls(text: &str, base: &str) {
    let out = rewrite_hls(text, base);
    let (before, after): (Vec<&str>, Vec<&str>) = (text.lines().collect(), out.lines().collect());
    assert_eq!(before.len(), after.len(), "rewriting changed the number of lines");
    for (a, b) in before.iter().zip(&after) {
        let trimmed = a.trim();
        if trimmed.is_empty() {
            assert!(b.trim().is_empty());
        } else if trimmed.starts_with('#') {
            // A tag: only its URI="…" values change. (A last line without a newline may end in "\r", which
            // becomes the "\r\n" that ends it once the rewrite adds "\n".)
            let a = a.strip_suffix('\r').unwrap_or(a);
            let (old, old_rest) = split_values(a, "URI=\"", "\"");
            let (new, new_rest) = split_values(b, "URI=\"", "\"");
            assert_eq!(old_rest, new_rest, "rewriting changed a tag outside its URIs");
            assert_eq!(old.len(), new.len());
            for (o, n) in old.iter().zip(&new) {
                check_uri(o, n, base);
            }
        } else {
            check_uri(trimmed, b, base);
        }
    }
}

fn dash(text: &str, base: &str) {
    let out = rewrite_dash(text, base);
    // URIs come out percent-encoded where the player would encode them anyway: markup may go, never come.
    for c in ['"', '\'', '<', '>', '&', '='] {
        let count = |s: &str| s.matches(c).count();
        assert!(count(&out) <= count(text), "rewriting added {c:?}");
    }
}

/// Where the player's requests go: the proxy, serving the playlist at its proxy path.
const PROXY: &str = "http://127.0.0.1:7780/";

/// `new` (what the proxy wrote where the origin's playlist had `old`) is `old` or a proxy path; when the
/// player follows it to the proxy (resolving it against the playlist's proxy URL, dot segments and all),
/// the proxy fetches the object the playlist named.
fn check_uri(old: &str, new: &str, base: &str) {
    let (Ok(base_url), Ok(proxy)) = (Url::parse(base), Url::parse(PROXY)) else { return };
    let meant = base_url.join(old.trim());
    if old != new {
        // A proxy path, or (for a host no proxy path can carry) the absolute URL the playlist meant.
        let absolute = meant.as_ref().is_ok_and(|m| Url::parse(new).as_ref() == Ok(m));
        assert!(
            new.starts_with("/http/") || new.starts_with("/https/") || absolute,
            "{old:?} became {new:?}, neither a proxy path nor what the playlist meant"
        );
    }
    let Ok(mut meant) = meant else { return };
    if !matches!(meant.scheme(), "http" | "https") {
        return;
    }
    let page = proxy.join(&fog_client::proxy::proxy_path(base).expect("the playlist has a proxy path")).expect("joins");
    let Ok(request) = page.join(new) else { return };
    if request.origin() != page.origin() {
        return; // Left alone, the player fetches it without the proxy.
    }
    let path = format!("{}{}", request.path(), request.query().map(|q| format!("?{q}")).unwrap_or_default());
    let origin = origin_url(&path).unwrap_or_else(|e| {
        panic!("{old:?} became {new:?}; the player asks for {path:?}, which the proxy refuses: {e}")
    });
    let fetched = Url::parse(&origin).unwrap_or_else(|e| panic!("{old:?}: the proxy would fetch {origin:?}: {e}"));
    meant.set_fragment(None);
    assert_eq!(fetched.as_str(), meant.as_str(), "{old:?} became {new:?}: the proxy fetches another object");
}

fn segments(text: &str, base: &str) {
    let segs = hls_segments(text, base);
    let uri_lines = text.lines().map(str::trim).filter(|l| !l.is_empty() && !l.starts_with('#')).count();
    assert!(segs.len() <= uri_lines);
    let mut total = Duration::ZERO;
    for s in &segs {
        // The proxy turns durations into deadlines and sums them over the prefetch window.
        let d = Duration::try_from_secs_f64(s.duration)
            .unwrap_or_else(|e| panic!("segment duration {} is no Duration: {e}", s.duration));
        total = total.checked_add(d).expect("the segment durations of one playlist add up");
        assert!(s.url.contains("://"), "segment URL {:?} is not absolute", s.url);
    }
}
