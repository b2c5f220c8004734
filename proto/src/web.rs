//! Web origins the operator lets embed the fog (issue #14): pages served from one of these sites may resolve
//! at the tracker (CORS) and open WebTransport sessions to nodes (the `Origin` header of the session's
//! CONNECT). Anything else a browser sends is refused by both, so a page on another site cannot spend
//! volunteers' bandwidth.
//!
//! An origin is compared in its serialised form (RFC 6454, as browsers send it in `Origin`): scheme, host
//! lower-cased, port only if not the scheme's default, nothing else.

use serde::{Deserialize, Serialize};

/// Web origins one list may hold: each one travels to every node in each heartbeat answer.
pub const MAX_WEB_ORIGINS: usize = 64;
/// Longest web origin accepted (a host name is at most 253 bytes).
pub const MAX_WEB_ORIGIN_LEN: usize = 300;

/// Why a web origin was not accepted.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WebOriginError {
    #[error("web origin {0:?} is not an origin: write scheme://host[:port], e.g. https://player.example.com")]
    Malformed(String),
    #[error("web origin {0:?}: only https (or http for a development host) pages can embed the fog")]
    Scheme(String),
    #[error("web origin {origin:?} has a {part}; an origin is only scheme://host[:port]")]
    NotJustOrigin { origin: String, part: &'static str },
    #[error("web origin list too long: at most {MAX_WEB_ORIGINS} origins of at most {MAX_WEB_ORIGIN_LEN} bytes")]
    TooMany,
}

/// `text` as browsers serialise an origin: `https://player.example.com`, `http://localhost:8080`.
pub fn serialized_origin(text: &str) -> Result<String, WebOriginError> {
    if text.len() > MAX_WEB_ORIGIN_LEN {
        return Err(WebOriginError::TooMany);
    }
    let malformed = || WebOriginError::Malformed(text.to_string());
    let url = url::Url::parse(text).map_err(|_| malformed())?;
    if !matches!(url.scheme(), "http" | "https") {
        return Err(WebOriginError::Scheme(text.to_string()));
    }
    let not_just = |part| WebOriginError::NotJustOrigin { origin: text.to_string(), part };
    if !url.username().is_empty() || url.password().is_some() {
        return Err(not_just("user name or password"));
    }
    // `Url` turns an empty path into `/`: only that may be present.
    if url.path() != "/" {
        return Err(not_just("path"));
    }
    if url.query().is_some() {
        return Err(not_just("query"));
    }
    if url.fragment().is_some() {
        return Err(not_just("fragment"));
    }
    match url.origin() {
        origin @ url::Origin::Tuple(..) => Ok(origin.ascii_serialization()),
        url::Origin::Opaque(_) => Err(malformed()),
    }
}

/// The web origins pages may embed the fog from; empty lets no page in.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct WebOrigins(Vec<String>);

impl WebOrigins {
    /// Each origin in its serialised form, duplicates dropped.
    pub fn new<I: IntoIterator<Item = String>>(origins: I) -> Result<Self, WebOriginError> {
        let mut list: Vec<String> = Vec::new();
        for origin in origins {
            let origin = serialized_origin(&origin)?;
            if !list.contains(&origin) {
                list.push(origin);
            }
            if list.len() > MAX_WEB_ORIGINS {
                return Err(WebOriginError::TooMany);
            }
        }
        Ok(Self(list))
    }

    /// Whether a request whose `Origin` header is `header` comes from a registered site. Browsers send the
    /// serialised form, so the comparison is exact; `null` (sandboxed frames, files) never matches.
    pub fn allows(&self, header: &str) -> bool {
        self.0.iter().any(|o| o == header)
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    pub fn as_slice(&self) -> &[String] {
        &self.0
    }
}

impl TryFrom<Vec<String>> for WebOrigins {
    type Error = WebOriginError;
    fn try_from(list: Vec<String>) -> Result<Self, Self::Error> {
        if list.len() > MAX_WEB_ORIGINS {
            return Err(WebOriginError::TooMany);
        }
        Self::new(list)
    }
}

impl From<WebOrigins> for Vec<String> {
    fn from(origins: WebOrigins) -> Self {
        origins.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_compared_as_browsers_serialise_them() {
        let list = WebOrigins::new([
            "HTTPS://Player.Example.com".to_string(),
            "https://player.example.com:443/".to_string(),
            "http://localhost:8080".to_string(),
        ])
        .expect("valid");
        assert_eq!(list.as_slice(), ["https://player.example.com", "http://localhost:8080"]);
        assert!(list.allows("https://player.example.com"));
        assert!(list.allows("http://localhost:8080"));
        assert!(!list.allows("http://player.example.com"), "another scheme is another origin");
        assert!(!list.allows("https://player.example.com.evil.net"));
        assert!(!list.allows("https://player.example.com:8443"));
        assert!(!list.allows("null"));
    }

    #[test]
    fn anything_but_an_origin_is_refused_with_the_reason() {
        let one = |o: &str| WebOrigins::new([o.to_string()]);
        assert!(matches!(one("https://a.example/player"), Err(WebOriginError::NotJustOrigin { part: "path", .. })));
        assert!(matches!(one("https://a.example//"), Err(WebOriginError::NotJustOrigin { part: "path", .. })));
        assert!(matches!(one("https://a.example/?x"), Err(WebOriginError::NotJustOrigin { part: "query", .. })));
        assert!(matches!(one("https://u@a.example"), Err(WebOriginError::NotJustOrigin { .. })));
        assert!(matches!(one("ftp://a.example"), Err(WebOriginError::Scheme(_))));
        assert!(matches!(one("player.example.com"), Err(WebOriginError::Malformed(_))));
        let too_many: Vec<String> = (0..=MAX_WEB_ORIGINS).map(|i| format!("https://s{i}.example")).collect();
        assert_eq!(WebOrigins::new(too_many.clone()), Err(WebOriginError::TooMany));
        let json = serde_json::to_string(&too_many).expect("json");
        assert!(serde_json::from_str::<WebOrigins>(&json).is_err(), "a list from the network is bounded");
        let ok: WebOrigins = serde_json::from_str(r#"["https://A.example"]"#).expect("valid");
        assert_eq!(serde_json::to_string(&ok).expect("json"), r#"["https://a.example"]"#);
    }
}
