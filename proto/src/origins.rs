//! Operator-registered origins. fogcdn only ever fetches URLs under one of these prefixes, so neither the
//! tracker nor a volunteer's node can be turned into an open proxy.

use serde::{Deserialize, Serialize};

/// The one form of a URL fogcdn checks against the origins, fetches and keys manifests by: parsed as the
/// HTTP client (and a browser) parses it — dot segments, percent-encoded dots, backslashes, tabs and
/// newlines resolved, the host lower-cased, a default port dropped — http(s) only, without userinfo or
/// fragment. Encoded slashes and backslashes in the path are refused: origin servers that decode them
/// before normalising would climb out of a prefix.
pub fn canonical_url(text: &str) -> Result<String, String> {
    let mut url = url::Url::parse(text).map_err(|e| format!("{text:?} is not a URL: {e}"))?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(format!("{text:?}: only http and https URLs are served"));
    }
    if url.host_str().is_none_or(str::is_empty) {
        return Err(format!("{text:?} has no host"));
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(format!("{text:?} carries a user name or password; fogcdn never forwards credentials"));
    }
    let path = url.path().to_ascii_lowercase();
    if path.contains("%2f") || path.contains("%5c") {
        return Err(format!("{text:?} has an encoded slash or backslash in its path"));
    }
    url.set_fragment(None);
    Ok(url.into())
}

/// URL prefixes of registered origins, e.g. `https://videos.example.com/vod/`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct OriginList(Vec<String>);

impl OriginList {
    /// Normalises each prefix: it must be an absolute http(s) URL; a bare host gets a trailing `/` so that
    /// `http://a.example` cannot match `http://a.example.evil.net/`.
    pub fn new<I: IntoIterator<Item = String>>(prefixes: I) -> Result<Self, String> {
        let mut list = Vec::new();
        for p in prefixes {
            let Some(rest) = p.strip_prefix("http://").or_else(|| p.strip_prefix("https://")) else {
                return Err(format!("origin {p:?} must start with http:// or https://"));
            };
            if rest.is_empty() || rest.starts_with('/') {
                return Err(format!("origin {p:?} has no host"));
            }
            let p = if rest.contains('/') { p } else { format!("{p}/") };
            list.push(canonical_url(&p)?);
        }
        Ok(Self(list))
    }

    /// True when `url`, in its [canonical form](canonical_url), lies under a registered prefix. The check
    /// is made on the URL as the HTTP client will fetch it, so dot segments (plain or percent-encoded),
    /// backslashes, tabs and userinfo cannot climb out of a prefix.
    pub fn allows(&self, url: &str) -> bool {
        canonical_url(url).is_ok_and(|url| self.0.iter().any(|p| url.starts_with(p.as_str())))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn prefixes(&self) -> &[String] {
        &self.0
    }

    /// Adds `other`'s prefixes that this list lacks.
    pub fn extend(&mut self, other: &OriginList) {
        for p in &other.0 {
            if !self.0.contains(p) {
                self.0.push(p.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::OriginList;

    #[test]
    fn ipv6_origins_compare_as_addresses() {
        let o = OriginList::new(["http://[2001:DB8:0:0::1]:8080/vod/".to_string()]).expect("valid");
        assert_eq!(o.prefixes(), ["http://[2001:db8::1]:8080/vod/"]);
        assert!(o.allows("http://[2001:db8::1]:8080/vod/a.ts"));
        assert!(o.allows("http://[2001:0db8:0000::0001]:8080/vod/a.ts"), "another spelling of the address");
        assert!(!o.allows("http://[2001:db8::2]:8080/vod/a.ts"));
        assert!(!o.allows("http://[2001:db8::1]:8081/vod/a.ts"));
        assert!(!o.allows("http://[::ffff:192.0.2.1]:8080/vod/a.ts"));
    }

    #[test]
    fn prefix_rules() {
        let o = OriginList::new(["http://a.example".to_string(), "https://b.example/vod/".to_string()]).expect("valid");
        assert!(o.allows("http://a.example/x.mp4"));
        assert!(!o.allows("http://a.example.evil.net/x"));
        assert!(o.allows("https://b.example/vod/1.ts"));
        assert!(!o.allows("https://b.example/private/1.ts"));
        assert!(!o.allows("https://b.example/vod/../private/1.ts"));
        assert!(!o.allows("http://a.example@evil.net/"));
        // Escapes the HTTP client would resolve after a string comparison.
        for escape in [
            "https://b.example/vod/%2e%2e/private/1.ts",
            "https://b.example/vod/%2E%2e/private/1.ts",
            "https://b.example/vod/.%2e/private/1.ts",
            "https://b.example/vod\\..\\private/1.ts",
            "https://b.example/vod/\t../private/1.ts",
            "https://b.example/vod/..%2fprivate/1.ts",
            "https://b.example/vod/..%5Cprivate/1.ts",
            "https://user:pw@b.example/vod/1.ts",
        ] {
            assert!(!o.allows(escape), "{escape} escaped the prefix");
        }
        assert!(o.allows("HTTPS://B.EXAMPLE:443/vod/./a/../1.ts#frag"));
        assert_eq!(
            super::canonical_url("HTTPS://B.EXAMPLE:443/vod/./a/../1.ts?q=1#frag").expect("valid"),
            "https://b.example/vod/1.ts?q=1"
        );
        assert!(OriginList::new(["ftp://x".to_string()]).is_err());
    }
}
