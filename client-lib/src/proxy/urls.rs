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
    let ok = !host.is_empty()
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

/// Rewrites one URI found in a playlist at `playlist` (an origin URL) so that it resolves through the
/// proxy: absolute and protocol-relative URIs become proxy paths, root-relative ones get the playlist's
/// `/<scheme>/<host>` prefix, and relative ones are left alone (they already resolve through the proxy).
pub(super) fn rewrite_uri(uri: &str, playlist: &str) -> String {
    let (scheme, rest) = playlist.split_once("://").unwrap_or(("http", playlist));
    let host = rest.split('/').next().unwrap_or("");
    let rewritten = if uri.contains("://") {
        proxy_path(uri).ok()
    } else if let Some(net) = uri.strip_prefix("//") {
        proxy_path(&format!("{scheme}://{net}")).ok()
    } else if uri.starts_with('/') {
        Some(format!("/{scheme}/{host}{uri}"))
    } else {
        None
    };
    // Data URIs, other schemes and relative URIs pass through untouched.
    rewritten.unwrap_or_else(|| uri.to_string())
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
}
