//! `Range` headers against objects of any size, as the player proxy parses them: a satisfiable range lies
//! within the object and is not empty, and a plain `bytes=A-B`, `bytes=A-` or `bytes=-N` means what HTTP
//! says it means.
#![no_main]

use fog_client::proxy::parse_range;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if data.len() < 8 {
        return;
    }
    let (size, header) = data.split_at(8);
    let size = u64::from_be_bytes(size.try_into().expect("8 bytes"));
    // Small sizes are the interesting ones; keep the full range reachable through the top bit.
    let size = if size >> 63 == 1 { size } else { size % 4096 };
    let header = String::from_utf8_lossy(header);
    assert_eq!(parse_range(None, size), Ok(None));
    let parsed = parse_range(Some(&header), size);
    if let Ok(Some((start, end))) = parsed {
        assert!(start < end && end <= size, "{header:?} on {size} bytes gave {start}..{end}");
    }
    let Some(spec) = header.trim().strip_prefix("bytes=") else {
        assert_eq!(parsed, Ok(None), "{header:?} is no byte range");
        return;
    };
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    let Some((a, b)) = spec.split_once('-') else { return };
    let expected = match (a, b) {
        (a, "") if digits(a) => a.parse::<u64>().ok().map(|a| (a, size)),
        ("", n) if digits(n) => n.parse::<u64>().ok().map(|n| (size.saturating_sub(n), size)),
        (a, b) if digits(a) && digits(b) => match (a.parse::<u64>(), b.parse::<u64>()) {
            (Ok(a), Ok(b)) => Some((a, b.saturating_add(1).min(size))),
            _ => None,
        },
        _ => return,
    };
    let Some((start, end)) = expected else { return };
    if start < size && start < end {
        assert_eq!(parsed, Ok(Some((start, end))), "{header:?} on {size} bytes");
    } else {
        assert_eq!(parsed, Err(()), "{header:?} on {size} bytes is unsatisfiable");
    }
});
