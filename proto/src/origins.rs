//! Operator-registered origins. fogcdn only ever fetches URLs under one of these prefixes, so neither the
//! tracker nor a volunteer's node can be turned into an open proxy.

use serde::{Deserialize, Serialize};

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
            list.push(p);
        }
        Ok(Self(list))
    }

    /// True when `url` lies under a registered prefix. Rejects URLs whose path tries to climb out of the
    /// prefix with `..` segments and URLs with userinfo (`http://origin@evil/`).
    pub fn allows(&self, url: &str) -> bool {
        let Some(after_scheme) = url.split_once("://").map(|(_, r)| r) else { return false };
        let authority = after_scheme.split(['/', '?', '#']).next().unwrap_or("");
        if authority.contains('@') || url.split(['?', '#']).next().unwrap_or("").contains("/../") {
            return false;
        }
        self.0.iter().any(|p| url.starts_with(p.as_str()))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn prefixes(&self) -> &[String] {
        &self.0
    }
}

#[cfg(test)]
mod tests {
    use super::OriginList;

    #[test]
    fn prefix_rules() {
        let o = OriginList::new(["http://a.example".to_string(), "https://b.example/vod/".to_string()]).expect("valid");
        assert!(o.allows("http://a.example/x.mp4"));
        assert!(!o.allows("http://a.example.evil.net/x"));
        assert!(o.allows("https://b.example/vod/1.ts"));
        assert!(!o.allows("https://b.example/private/1.ts"));
        assert!(!o.allows("https://b.example/vod/../private/1.ts"));
        assert!(!o.allows("http://a.example@evil.net/"));
        assert!(OriginList::new(["ftp://x".to_string()]).is_err());
    }
}
