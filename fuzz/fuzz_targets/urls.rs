//! URL forms: `canonical_url` (what the tracker checks against the registered origins and keys manifests
//! by, and nodes check fills with) is idempotent and leaves nothing an origin server could resolve
//! differently: no dot segments, no encoded slashes, no userinfo, no fragment. The player proxy's path
//! scheme maps an origin URL to a proxy path and back to the same object.
#![no_main]

use fog_client::proxy::{origin_url, proxy_path};
use fog_proto::origins::{canonical_url, OriginList};
use libfuzzer_sys::fuzz_target;
use url::Url;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    canonical(&text);
    prefix(&text);
    proxy_paths(&text);
});

fn canonical(text: &str) {
    let Ok(c) = canonical_url(text) else { return };
    assert_eq!(canonical_url(&c).as_ref(), Ok(&c), "canonical form of {text:?} is not canonical");
    let url = Url::parse(&c).expect("a canonical URL parses");
    assert_eq!(url.as_str(), c);
    assert!(matches!(url.scheme(), "http" | "https"));
    assert!(url.host_str().is_some_and(|h| !h.is_empty()));
    assert!(url.username().is_empty() && url.password().is_none() && url.fragment().is_none());
    for segment in url.path().split('/') {
        let s = segment.to_ascii_lowercase().replace("%2e", ".");
        assert!(s != "." && s != "..", "dot segment {segment:?} left in {c:?}");
        assert!(!s.contains("%2f") && !s.contains("%5c"), "encoded slash left in {c:?}");
    }
}

/// A registered prefix is canonical and lies under itself; what it allows is canonical under it.
fn prefix(text: &str) {
    let Ok(list) = OriginList::new([text.to_string()]) else { return };
    let p = &list.prefixes()[0];
    assert_eq!(canonical_url(p).as_ref(), Ok(p));
    assert!(list.allows(p), "prefix {p:?} does not allow itself");
    let child = format!("{p}x/y?z");
    if list.allows(&child) {
        assert!(canonical_url(&child).is_ok_and(|c| c.starts_with(p.as_str())));
    }
}

fn proxy_paths(text: &str) {
    // A proxy path → origin URL → proxy path → the same origin URL.
    if let Ok(origin) = origin_url(text) {
        let path = proxy_path(&origin).unwrap_or_else(|e| panic!("{origin:?} from {text:?} has no proxy path: {e}"));
        assert_eq!(origin_url(&path).as_ref(), Ok(&origin), "{text:?} → {origin:?} → {path:?}");
    }
    // An origin URL → proxy path → the same object.
    if let Ok(path) = proxy_path(text) {
        assert!(path.starts_with("/http/") || path.starts_with("/https/"));
        let origin = origin_url(&path).unwrap_or_else(|e| panic!("{text:?} → {path:?}, refused: {e}"));
        if !text.contains(['\\', '\t', '\n', '\r']) {
            if let (Ok(a), Ok(b)) = (Url::parse(text), Url::parse(&origin)) {
                assert_eq!(a.as_str(), b.as_str(), "{text:?} → {path:?} → {origin:?}");
            }
        }
    }
}
