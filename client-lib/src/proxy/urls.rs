//! The proxy's URL scheme: `http://PROXY/<scheme>/<host[:port]>/<path>?<query>` stands for
//! `<scheme>://<host[:port]>/<path>?<query>`. Because the origin's path structure is kept, relative URIs
//! inside playlists resolve through the proxy unchanged.

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlError {
    #[error("proxy paths look like /http/HOST[:PORT]/PATH or /https/HOST[:PORT]/PATH, not {0:?}")]
    Shape(String),
    #[error("only http and https origins can be proxied, not {0:?}")]
    Scheme(String),
    #[error("{0:?} is not a valid host")]
    Host(String),
}

fn check_host(host: &str) -> Result<(), UrlError> {
    // "." and ".." would be dot segments of the proxy path, which players resolve away.
    let ok = !host.is_empty()
        && host != "."
        && host != ".."
        && host.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':' | '[' | ']' | '_'));
    if ok {
        Ok(())
    } else {
        Err(UrlError::Host(host.to_string()))
    }
}

/// The origin URL a proxy path stands for.
pub fn origin_url(path_and_query: &str) -> Result<String, UrlError> {
    let rest = path_and_query.strip_prefix('/').ok_or_else(|| UrlError::Shape(path_and_query.into()))?;
    let mut parts = rest.splitn(3, '/');
    let (Some(scheme), Some(host)) = (parts.next(), parts.next()) else {
        return Err(UrlError::Shape(path_and_query.into()));
    };
    if scheme != "http" && scheme != "https" {
        return Err(UrlError::Scheme(scheme.into()));
    }
    check_host(host)?;
    let path = parts.next().unwrap_or("");
    Ok(format!("{scheme}://{host}/{path}"))
}

/// The root-relative proxy path for an absolute origin URL (`http://h/p` → `/http/h/p`).
pub fn proxy_path(origin: &str) -> Result<String, UrlError> {
    let (scheme, rest) = origin.split_once("://").ok_or_else(|| UrlError::Shape(origin.into()))?;
    if scheme != "http" && scheme != "https" {
        return Err(UrlError::Scheme(scheme.into()));
    }
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let host = host.split(['?', '#']).next().unwrap_or(host);
    check_host(host)?;
    let path = if rest.len() > host.len() && !rest[host.len()..].starts_with('/') {
        // "http://h?x" → "/http/h/?x"
        format!("/{}", &rest[host.len()..])
    } else {
        format!("/{path}")
    };
    Ok(format!("/{scheme}/{host}{path}"))
}

/// The full proxied URL for `origin` on a proxy at `proxy_authority` (e.g. `127.0.0.1:7780`).
pub fn proxied_url(origin: &str, proxy_authority: &str) -> Result<String, UrlError> {
    Ok(format!("http://{proxy_authority}{}", proxy_path(origin)?))
}

/// Rewrites one URI found in a playlist at `playlist` (an origin URL) so that the player fetches, through
/// the proxy, the object the playlist names: absolute, protocol-relative and root-relative URIs become the
/// proxy path of the URL they resolve to, and relative ones are left alone when, resolved by the player
/// against the playlist's proxy URL, they already lead there (the usual `seg1.ts`). Those that would not —
/// dot segments climbing above the origin's root, backslashes, leading control characters — get the proxy
/// path too. Data URIs and other schemes pass through untouched; a URL whose host the proxy cannot carry is
/// written out absolute.
pub(super) fn rewrite_uri(uri: &str, playlist: &str) -> String {
    let Ok(base) = reqwest::Url::parse(playlist) else { return uri.to_string() };
    let Ok(mut meant) = base.join(uri) else { return uri.to_string() };
    if !matches!(meant.scheme(), "http" | "https") {
        return uri.to_string();
    }
    // A host the proxy path cannot carry: the player fetches it without the proxy, and must get what the
    // playlist meant (a page served over http reads "http:x" as relative to itself, not to the origin).
    let Ok(path) = proxy_path(meant.as_str()) else { return meant.into() };
    meant.set_fragment(None);
    // It joined the playlist's URL but does not parse alone: a relative reference.
    let relative = reqwest::Url::parse(uri).is_err();
    if relative && through_proxy(uri, &base).is_some_and(|fetched| fetched == meant) {
        return uri.to_string();
    }
    path
}

/// The origin URL the proxy fetches when a player that loaded `playlist` through the proxy follows `uri`,
/// if that request reaches the proxy at all.
fn through_proxy(uri: &str, playlist: &reqwest::Url) -> Option<reqwest::Url> {
    let page = reqwest::Url::parse("http://proxy.invalid/").ok()?.join(&proxy_path(playlist.as_str()).ok()?).ok()?;
    let request = page.join(uri).ok()?;
    if request.origin() != page.origin() {
        return None;
    }
    let path = match request.query() {
        Some(query) => format!("{}?{query}", request.path()),
        None => request.path().to_string(),
    };
    reqwest::Url::parse(&origin_url(&path).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        for u in ["http://127.0.0.1:8080/a/b.m3u8", "https://cdn.example/v/seg_1.ts?tok=1&x=2", "http://h/"] {
            let p = proxy_path(u).expect("proxy path");
            assert_eq!(origin_url(&p).expect("origin"), u, "{p}");
        }
        assert_eq!(proxied_url("http://h:1/x", "127.0.0.1:7780").expect("url"), "http://127.0.0.1:7780/http/h:1/x");
    }

    #[test]
    fn rejects_bad_paths() {
        assert!(matches!(origin_url("/ftp/h/x"), Err(UrlError::Scheme(_))));
        assert!(matches!(origin_url("/http"), Err(UrlError::Shape(_))));
        assert!(matches!(origin_url("/http/user@evil/x"), Err(UrlError::Host(_))));
        assert!(matches!(origin_url("/http//x"), Err(UrlError::Host(_))));
    }

    #[test]
    fn playlist_uris() {
        let pl = "https://o.example:8443/vod/master.m3u8";
        assert_eq!(rewrite_uri("low/index.m3u8", pl), "low/index.m3u8");
        assert_eq!(rewrite_uri("/other/a.ts", pl), "/https/o.example:8443/other/a.ts");
        assert_eq!(rewrite_uri("http://b.example/x.ts", pl), "/http/b.example/x.ts");
        assert_eq!(rewrite_uri("//c.example/y.ts", pl), "/https/c.example/y.ts");
        assert_eq!(rewrite_uri("data:text/plain,hi", pl), "data:text/plain,hi");
    }

    /// Found by `fuzz/fuzz_targets/playlist.rs`: the player resolves these against the playlist's proxy
    /// URL, where they climbed out of `/<scheme>/<host>` (another host, or a path the proxy refuses) or
    /// reached another path than the playlist named.
    #[test]
    fn uris_the_player_would_resolve_elsewhere() {
        let pl = "https://o.example:8443/vod/master.m3u8";
        assert_eq!(rewrite_uri("../../../x.ts", pl), "/https/o.example:8443/x.ts");
        assert_eq!(rewrite_uri("../../evil.example/x.ts", pl), "/https/o.example:8443/evil.example/x.ts");
        assert_eq!(rewrite_uri("\u{0}/x.ts", pl), "/https/o.example:8443/x.ts");
        assert_eq!(rewrite_uri("\\\\evil.example/x.ts", pl), "/https/evil.example/x.ts");
        assert_eq!(rewrite_uri("/a/../../b.ts", pl), "/https/o.example:8443/b.ts");
        assert_eq!(rewrite_uri("http://b.example/a/../../c.ts", pl), "/http/b.example/c.ts");
        assert_eq!(rewrite_uri("../low/index.m3u8", pl), "../low/index.m3u8");
        assert_eq!(rewrite_uri("//./x.ts", pl), "https://./x.ts");
        assert_eq!(rewrite_uri("http:*/x.ts", pl), "http://*/x.ts");
        assert!(matches!(proxy_path("http://../x"), Err(UrlError::Host(_))));
    }
}
