//! The C ABI (`include/fog.h`): a player written in C, C++, Swift or Kotlin/JNI embeds the fog proxy, hands
//! its player the proxied URL, tells the proxy its playback state, and reads stats and events.
//!
//! Every function checks its pointers, catches panics (none may cross into C), and reports failure by its
//! return value with the reason in `fog_last_error()`. Strings returned to C are freed with
//! `fog_string_free`.
#![allow(unsafe_code)] // This module is the boundary with C; everything unsafe is here.

use std::cell::RefCell;
use std::ffi::{c_char, c_int, CStr, CString};
use std::net::SocketAddr;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use crate::proxy::{PlaybackState, Proxy, ProxyConfig};
use crate::ClientConfig;
use fog_proto::origins::OriginList;

/// A running embedded proxy. Opaque to C.
#[derive(Debug)]
pub struct FogHandle {
    runtime: tokio::runtime::Runtime,
    proxy: Arc<Proxy>,
    addr: SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

/// Configuration passed to `fog_client_new` as JSON.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FfiConfig {
    /// One URL, several comma-separated, or a list of them (replicas of one cell, failed over in turn).
    tracker: TrackerList,
    #[serde(default = "default_listen")]
    listen: SocketAddr,
    #[serde(default)]
    prefetch_secs: Option<u64>,
    #[serde(default)]
    prefetch_memory: Option<u64>,
    /// Origins relayed besides the tracker's (URL prefixes), as `fog proxy --origin`.
    #[serde(default)]
    origins: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TrackerList {
    One(String),
    Many(Vec<String>),
}

impl TrackerList {
    /// As `--tracker` takes it: comma-separated, checked.
    fn joined(&self) -> Result<String, String> {
        let list = match self {
            Self::One(s) => s.clone(),
            Self::Many(v) => v.join(","),
        };
        fog_net::trackers::parse_list(&list).map_err(|e| format!("tracker: {e}"))?;
        Ok(list)
    }
}

fn default_listen() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 0))
}

thread_local! {
    static LAST_ERROR: RefCell<Option<CString>> = const { RefCell::new(None) };
}

fn set_error(msg: impl Into<String>) {
    let msg = CString::new(msg.into().replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|e| *e.borrow_mut() = Some(msg));
}

fn to_c(s: String) -> *mut c_char {
    CString::new(s.replace('\0', " ")).map_or(std::ptr::null_mut(), CString::into_raw)
}

/// Reads a C string argument, recording an error for NULL or invalid UTF-8.
unsafe fn arg<'a>(p: *const c_char, name: &str) -> Option<&'a str> {
    if p.is_null() {
        set_error(format!("{name} is NULL"));
        return None;
    }
    // SAFETY: the caller promises a NUL-terminated string that outlives this call (see fog.h).
    match unsafe { CStr::from_ptr(p) }.to_str() {
        Ok(s) => Some(s),
        Err(_) => {
            set_error(format!("{name} is not UTF-8"));
            None
        }
    }
}

/// Runs `f`, turning a panic into an error result instead of unwinding into C.
fn guard<T>(fallback: T, f: impl FnOnce() -> T) -> T {
    catch_unwind(AssertUnwindSafe(f)).unwrap_or_else(|_| {
        set_error("internal error (panic) in fogcdn");
        fallback
    })
}

fn start(config_json: &str) -> Result<FogHandle, String> {
    let cfg: FfiConfig = serde_json::from_str(config_json).map_err(|e| format!("bad config JSON: {e}"))?;
    let tracker = cfg.tracker.joined()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("fogcdn")
        .enable_all()
        .build()
        .map_err(|e| format!("cannot start the runtime: {e}"))?;
    let (proxy, addr, listener) = runtime.block_on(async {
        let client = ClientConfig { tracker: Some(tracker), ..Default::default() };
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .map_err(|e| format!("cannot listen on {}: {e}", cfg.listen))?;
        let addr = listener.local_addr().map_err(|e| e.to_string())?;
        let origins = OriginList::new(cfg.origins.clone()).map_err(|e| format!("origins: {e}"))?;
        let mut pcfg = ProxyConfig { origins, ..Default::default() };
        if let Some(s) = cfg.prefetch_secs {
            pcfg.prefetch_window = Duration::from_secs(s);
        }
        if let Some(m) = cfg.prefetch_memory {
            pcfg.prefetch_memory = m;
        }
        let proxy = Proxy::new(client, addr, pcfg).map_err(|e| e.to_string())?;
        Ok::<_, String>((Arc::new(proxy), addr, listener))
    })?;
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    runtime.spawn(proxy.clone().serve(listener, async move {
        let _ = stopped.await;
    }));
    Ok(FogHandle { runtime, proxy, addr, stop: Some(stop) })
}

/// Starts an embedded proxy from a JSON config (`{"tracker": "http://…", "listen": "127.0.0.1:0",
/// "prefetch_secs": 20, "prefetch_memory": 134217728, "origins": ["https://videos.example.com/"]}`; only
/// `tracker` is required; `origins` are relayed besides the tracker's registered ones). `tracker` may name
/// several replicas of one cell, as a list (`["http://a:7700", "http://b:7700"]`) or comma-separated: the
/// proxy sticks to the one that answers and fails over to the next. NULL on failure.
///
/// # Safety
/// `config_json` must be NULL or a NUL-terminated string.
#[no_mangle]
pub unsafe extern "C" fn fog_client_new(config_json: *const c_char) -> *mut FogHandle {
    guard(std::ptr::null_mut(), || {
        // SAFETY: forwarded from the caller's contract.
        let Some(json) = (unsafe { arg(config_json, "config_json") }) else { return std::ptr::null_mut() };
        match start(json) {
            Ok(h) => Box::into_raw(Box::new(h)),
            Err(e) => {
                set_error(e);
                std::ptr::null_mut()
            }
        }
    })
}

/// The URL a player should open for `origin_url`. Free with `fog_string_free`. NULL on failure.
///
/// # Safety
/// `client` must come from `fog_client_new` and not be freed; `origin_url` NULL or NUL-terminated.
#[no_mangle]
pub unsafe extern "C" fn fog_proxy_url(client: *const FogHandle, origin_url: *const c_char) -> *mut c_char {
    guard(std::ptr::null_mut(), || {
        // SAFETY: the caller passes a live handle from fog_client_new.
        let Some(h) = (unsafe { client.as_ref() }) else {
            set_error("client is NULL");
            return std::ptr::null_mut();
        };
        // SAFETY: forwarded from the caller's contract.
        let Some(url) = (unsafe { arg(origin_url, "origin_url") }) else { return std::ptr::null_mut() };
        match crate::proxy::proxied_url(url, &h.addr.to_string()) {
            Ok(u) => to_c(u),
            Err(e) => {
                set_error(e.to_string());
                std::ptr::null_mut()
            }
        }
    })
}

/// Tells the proxy where playback is: playhead and buffered-ahead seconds, and the state
/// (0 idle, 1 playing, 2 paused, 3 buffering, 4 ended). Returns 0, or -1 on bad arguments.
///
/// # Safety
/// `client` must come from `fog_client_new` and not be freed.
#[no_mangle]
pub unsafe extern "C" fn fog_report_playback(
    client: *const FogHandle,
    position_secs: f64,
    buffer_secs: f64,
    state: c_int,
) -> c_int {
    guard(-1, || {
        // SAFETY: the caller passes a live handle from fog_client_new.
        let Some(h) = (unsafe { client.as_ref() }) else {
            set_error("client is NULL");
            return -1;
        };
        let Some(state) = PlaybackState::from_code(state) else {
            set_error(format!("unknown playback state {state}"));
            return -1;
        };
        if !position_secs.is_finite() || !buffer_secs.is_finite() || buffer_secs < 0.0 {
            set_error("position and buffer must be finite, buffer not negative");
            return -1;
        }
        h.proxy.report_playback(position_secs, buffer_secs, state);
        0
    })
}

/// The proxy's statistics as JSON (as its `/stats` page). Free with `fog_string_free`.
///
/// # Safety
/// `client` must come from `fog_client_new` and not be freed.
#[no_mangle]
pub unsafe extern "C" fn fog_stats_json(client: *const FogHandle) -> *mut c_char {
    guard(std::ptr::null_mut(), || {
        // SAFETY: the caller passes a live handle from fog_client_new.
        let Some(h) = (unsafe { client.as_ref() }) else {
            set_error("client is NULL");
            return std::ptr::null_mut();
        };
        to_c(serde_json::to_string(&h.proxy.snapshot()).unwrap_or_default())
    })
}

/// The next event as JSON (`{"event": "stall" | "fallback" | "passthrough" | "startup", "detail": {…}}`),
/// or NULL when there is none. Free with `fog_string_free`.
///
/// # Safety
/// `client` must come from `fog_client_new` and not be freed.
#[no_mangle]
pub unsafe extern "C" fn fog_poll_event(client: *const FogHandle) -> *mut c_char {
    guard(std::ptr::null_mut(), || {
        // SAFETY: the caller passes a live handle from fog_client_new.
        let Some(h) = (unsafe { client.as_ref() }) else { return std::ptr::null_mut() };
        h.proxy.stats.poll_event().map_or(std::ptr::null_mut(), |e| to_c(e.to_string()))
    })
}

/// Frees a string returned by this library. NULL is ignored.
///
/// # Safety
/// `s` must be NULL or a string from this library, freed once.
#[no_mangle]
pub unsafe extern "C" fn fog_string_free(s: *mut c_char) {
    if !s.is_null() {
        // SAFETY: `s` came from CString::into_raw in this library and is freed once.
        drop(unsafe { CString::from_raw(s) });
    }
}

/// Stops the proxy and frees the client. NULL is ignored.
///
/// # Safety
/// `client` must be NULL or come from `fog_client_new`, and not be used afterwards.
#[no_mangle]
pub unsafe extern "C" fn fog_client_free(client: *mut FogHandle) {
    if client.is_null() {
        return;
    }
    // SAFETY: `client` came from Box::into_raw in fog_client_new and is freed once.
    let mut h = unsafe { Box::from_raw(client) };
    let _ = catch_unwind(AssertUnwindSafe(move || {
        if let Some(stop) = h.stop.take() {
            let _ = stop.send(());
        }
        h.runtime.shutdown_timeout(Duration::from_secs(2));
    }));
}

/// Why the last call on this thread failed, or NULL. Valid until the next failing call on this thread;
/// do not free.
#[no_mangle]
pub extern "C" fn fog_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.borrow().as_ref().map_or(std::ptr::null(), |s| s.as_ptr()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_tracker_is_one_url_several_or_a_list() {
        let joined = |json: &str| serde_json::from_str::<FfiConfig>(json).expect("config").tracker.joined();
        assert_eq!(joined(r#"{"tracker": "http://a:7700"}"#), Ok("http://a:7700".into()));
        assert_eq!(joined(r#"{"tracker": "http://a:7700,http://b:7700"}"#), Ok("http://a:7700,http://b:7700".into()));
        assert_eq!(
            joined(r#"{"tracker": ["http://a:7700", "http://b:7700"]}"#),
            Ok("http://a:7700,http://b:7700".into())
        );
        assert!(joined(r#"{"tracker": []}"#).is_err());
        assert!(joined(r#"{"tracker": "a:7700"}"#).is_err());
    }
}
