//! The owner's weekly upload schedule (`--schedule`), in the node's local time zone.
//!
//! Grammar (case-insensitive; spaces around the punctuation are allowed):
//!
//! ```text
//! schedule = rule { ";" rule }              empty rules are skipped, so a trailing ";" is fine
//! rule     = days [ range ] mode            or: days mode [ range ]
//! days     = item { "," item }
//! item     = day [ "-" day ] | "daily" | "weekdays" | "weekends"      fri-mon wraps over the weekend
//! day      = mon | tue | wed | thu | fri | sat | sun                  (or the full English name)
//! range    = time "-" time                  no range: the whole day; an end at or before the start
//!                                           ends the next day (22:00-06:00); 24:00 is the end of a day
//! time     = HH ":" MM [ ":" SS ]
//! mode     = "unlimited" | "off" | SIZE "/s"                          SIZE as for --upload-limit (2MiB)
//! ```
//!
//! e.g. `mon-fri 00:00-07:00 unlimited; mon-fri 07:00-23:00 2MiB/s; sat,sun 12:00-14:00 off`. Where rules
//! overlap the later one wins, so a broad rule followed by exceptions reads naturally. Outside every rule
//! the node's `--upload-limit` applies (no cap without one). Seconds are optional in times: they let a
//! window start at an exact moment (the integration tests start one a few seconds ahead).
//!
//! The parsed schedule is a list of week segments (pure, unit-tested); [`LocalTime`] maps the wall clock
//! onto the week and a segment boundary back onto real time, through the system time zone (so a
//! daylight-saving change moves the boundaries with the owner's clock).

use std::time::Duration;

use fog_proto::api::UploadMode;
use jiff::tz::TimeZone;
use jiff::{SignedDuration, ZonedDateTime};

const DAY: u32 = 86_400;
pub const WEEK: u32 = 7 * DAY;
/// Most rules in a schedule, and its longest text: an owner's week needs a handful.
pub const MAX_RULES: usize = 64;
pub const MAX_TEXT: usize = 4096;
/// Highest rate a window may set: the upload limiter counts bytes per second in a u32.
const MAX_RATE: u64 = u32::MAX as u64;

const DAY_NAMES: [(&str, &str); 7] = [
    ("mon", "monday"),
    ("tue", "tuesday"),
    ("wed", "wednesday"),
    ("thu", "thursday"),
    ("fri", "friday"),
    ("sat", "saturday"),
    ("sun", "sunday"),
];

/// Why a schedule did not parse: where (1-based character), what was expected there and what was found.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--schedule, at character {position}: expected {expected}, found {found}")]
pub struct ScheduleError {
    pub position: usize,
    pub expected: String,
    pub found: String,
}

/// A parsed schedule: the week cut into segments, each with the mode its window sets (`None`: no window,
/// the default applies). Sorted by start; the first starts at second 0 of Monday; neighbours differ.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Schedule {
    segments: Vec<(u32, Option<UploadMode>)>,
    /// As the owner wrote it.
    text: String,
}

/// What the schedule says at one moment of the week, with the default filled in. Offsets are seconds of
/// the week's civil time from that moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WeekPlan {
    pub now: UploadMode,
    /// Whether a window of the schedule is in force (rather than the default).
    pub in_window: bool,
    /// The next change of mode: after how many seconds, and to what.
    pub next: Option<(u32, UploadMode)>,
    /// When the next off window starts (not while off).
    pub off_in: Option<u32>,
}

impl Schedule {
    pub fn parse(text: &str) -> Result<Self, ScheduleError> {
        if text.len() > MAX_TEXT {
            return Err(ScheduleError {
                position: MAX_TEXT + 1,
                expected: format!("at most {MAX_TEXT} characters"),
                found: format!("{} characters", text.len()),
            });
        }
        let rules = Parser { tokens: lex(text)?, at: 0, end: text.chars().count() + 1 }.schedule()?;
        Ok(Self { segments: Self::compile(&rules), text: text.trim().to_string() })
    }

    pub fn text(&self) -> &str {
        &self.text
    }

    /// Cuts the week at every rule's edges; each piece takes the mode of the last rule covering it.
    fn compile(rules: &[Rule]) -> Vec<(u32, Option<UploadMode>)> {
        let mut spans: Vec<(u32, u32, usize)> = Vec::new();
        for (i, rule) in rules.iter().enumerate() {
            for day in (0..7u32).filter(|d| rule.days & (1 << d) != 0) {
                let (start, end) = (day * DAY + rule.start, day * DAY + rule.end);
                if end > WEEK {
                    spans.push((start, WEEK, i));
                    spans.push((0, end - WEEK, i));
                } else {
                    spans.push((start, end, i));
                }
            }
        }
        let mut cuts: Vec<u32> = spans.iter().flat_map(|&(s, e, _)| [s, e]).filter(|&t| t < WEEK).collect();
        cuts.push(0);
        cuts.sort_unstable();
        cuts.dedup();
        let mut segments: Vec<(u32, Option<UploadMode>)> = Vec::with_capacity(cuts.len());
        for cut in cuts {
            let rule = spans.iter().filter(|&&(s, e, _)| s <= cut && cut < e).map(|&(_, _, i)| i).max();
            let mode = rule.map(|i| rules[i].mode);
            if segments.last().is_none_or(|&(_, m)| m != mode) {
                segments.push((cut, mode));
            }
        }
        segments
    }

    /// The plan at second `at` of the week (0 = Monday 00:00), the mode outside windows being `default`.
    pub fn plan(&self, at: u32, default: UploadMode) -> WeekPlan {
        let at = at % WEEK;
        let current = self.segments.partition_point(|&(start, _)| start <= at).saturating_sub(1);
        let mode = |i: usize| self.segments[i].1.unwrap_or(default);
        let now = mode(current);
        let (mut next, mut off_in) = (None, None);
        let n = self.segments.len();
        for i in (1..n).map(|k| (current + k) % n) {
            let after = (self.segments[i].0 + WEEK - at) % WEEK;
            if next.is_none() && mode(i) != now {
                next = Some((after, mode(i)));
            }
            if off_in.is_none() && now != UploadMode::Off && mode(i) == UploadMode::Off {
                off_in = Some(after);
            }
        }
        WeekPlan { now, in_window: self.segments[current].1.is_some(), next, off_in }
    }
}

/// One rule: a set of weekdays (bit 0 = Monday) and a daily range in seconds (`end` may pass midnight).
#[derive(Debug, Clone, Copy)]
struct Rule {
    days: u8,
    start: u32,
    end: u32,
    mode: UploadMode,
}

#[derive(Debug, Clone, PartialEq)]
enum Token {
    /// Letters: a day name, a day set or a mode keyword (lowercased).
    Word(String),
    /// A time of day, in seconds (24:00 included).
    Time(u32),
    /// A rate, bytes per second.
    Rate(u64),
    Comma,
    Dash,
    Semicolon,
}

impl Token {
    fn describe(&self) -> String {
        match self {
            Self::Word(w) => format!("{w:?}"),
            Self::Time(t) => format!("the time {:02}:{:02}:{:02}", t / 3600, t / 60 % 60, t % 60),
            Self::Rate(r) => format!("the rate {r} bytes/s"),
            Self::Comma => "\",\"".into(),
            Self::Dash => "\"-\"".into(),
            Self::Semicolon => "\";\"".into(),
        }
    }
}

fn lex(text: &str) -> Result<Vec<(usize, Token)>, ScheduleError> {
    let chars: Vec<char> = text.chars().collect();
    let mut tokens = Vec::new();
    let mut i = 0;
    let error = |i: usize, expected: &str, found: String| ScheduleError {
        position: i + 1,
        expected: expected.to_string(),
        found,
    };
    while i < chars.len() {
        let c = chars[i];
        let start = i;
        match c {
            _ if c.is_whitespace() => i += 1,
            ',' | '-' | ';' => {
                let punct = match c {
                    ',' => Token::Comma,
                    '-' => Token::Dash,
                    _ => Token::Semicolon,
                };
                tokens.push((start, punct));
                i += 1;
            }
            _ if c.is_ascii_alphabetic() => {
                while i < chars.len() && chars[i].is_ascii_alphabetic() {
                    i += 1;
                }
                tokens.push((start, Token::Word(chars[start..i].iter().collect::<String>().to_ascii_lowercase())));
            }
            _ if c.is_ascii_digit() => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || matches!(chars[i], ':' | '/')) {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let token =
                    if word.contains(':') {
                        Token::Time(parse_time(&word).ok_or_else(|| {
                            error(start, "a time of day such as 07:00 or 07:00:30", format!("{word:?}"))
                        })?)
                    } else if let Some(size) = word.strip_suffix("/s") {
                        let rate = fog_proto::size::parse_size(size)
                            .map_err(|e| error(start, "a rate such as 2MiB/s", format!("{word:?} ({e})")))?;
                        if !(1..=MAX_RATE).contains(&rate) {
                            return Err(error(start, "a rate from 1 byte/s to below 4GiB/s", format!("{word:?}")));
                        }
                        Token::Rate(rate)
                    } else {
                        return Err(error(start, "a time (07:00) or a rate (2MiB/s)", format!("{word:?}")));
                    };
                tokens.push((start, token));
            }
            _ => return Err(error(start, "a day, a time range or a mode", format!("{c:?}"))),
        }
    }
    Ok(tokens)
}

/// `HH:MM` or `HH:MM:SS`, up to 24:00 (the end of a day).
fn parse_time(word: &str) -> Option<u32> {
    let parts: Vec<&str> = word.split(':').collect();
    if !(2..=3).contains(&parts.len()) || parts.iter().any(|p| p.len() != 2 || !p.bytes().all(|b| b.is_ascii_digit())) {
        return None;
    }
    let n: Vec<u32> = parts.iter().map(|p| p.parse().unwrap_or(u32::MAX)).collect();
    let (h, m, s) = (n[0], n[1], n.get(2).copied().unwrap_or(0));
    let secs = h * 3600 + m * 60 + s;
    (m < 60 && s < 60 && secs <= DAY).then_some(secs)
}

struct Parser {
    tokens: Vec<(usize, Token)>,
    at: usize,
    /// The position reported for "the end of the schedule".
    end: usize,
}

impl Parser {
    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at).map(|(_, t)| t)
    }

    fn error(&self, expected: &str) -> ScheduleError {
        let (position, found) = match self.tokens.get(self.at) {
            Some((p, t)) => (p + 1, t.describe()),
            None => (self.end, "the end of the schedule".into()),
        };
        ScheduleError { position, expected: expected.to_string(), found }
    }

    fn schedule(mut self) -> Result<Vec<Rule>, ScheduleError> {
        let mut rules = Vec::new();
        while self.peek().is_some() {
            if self.peek() == Some(&Token::Semicolon) {
                self.at += 1;
                continue;
            }
            if rules.len() == MAX_RULES {
                return Err(self.error(&format!("at most {MAX_RULES} rules")));
            }
            rules.push(self.rule()?);
            match self.peek() {
                None | Some(Token::Semicolon) => {}
                Some(_) => return Err(self.error("\";\" between rules")),
            }
        }
        Ok(rules)
    }

    fn rule(&mut self) -> Result<Rule, ScheduleError> {
        let days = self.days()?;
        let (mut range, mut mode) = (None, None);
        loop {
            match self.peek() {
                Some(Token::Time(_)) if range.is_none() => range = Some(self.range()?),
                Some(Token::Rate(r)) if mode.is_none() => {
                    mode = Some(UploadMode::Rate(*r));
                    self.at += 1;
                }
                Some(Token::Word(w)) if mode.is_none() && (w == "off" || w == "unlimited") => {
                    mode = Some(if w == "off" { UploadMode::Off } else { UploadMode::Unlimited });
                    self.at += 1;
                }
                _ => break,
            }
        }
        let Some(mode) = mode else {
            let also = if range.is_none() { "a time range or " } else { "" };
            return Err(self.error(&format!("{also}a mode: unlimited, off or a rate such as 2MiB/s")));
        };
        let (start, end) = range.unwrap_or((0, DAY));
        Ok(Rule { days, start, end, mode })
    }

    /// A day set, as a bit mask.
    fn days(&mut self) -> Result<u8, ScheduleError> {
        let mut mask = 0u8;
        loop {
            let Some(Token::Word(w)) = self.peek().cloned() else {
                return Err(self.error("a day (mon … sun), a day range (mon-fri), daily, weekdays or weekends"));
            };
            let set = match w.as_str() {
                "daily" => 0x7f,
                "weekdays" => 0x1f,
                "weekends" => 0x60,
                _ => {
                    let first = self.day()?;
                    let last = if self.peek() == Some(&Token::Dash) {
                        self.at += 1;
                        self.day()?
                    } else {
                        first
                    };
                    // mon-fri, or fri-mon over the weekend.
                    (0..7)
                        .map(|k| (first + k) % 7)
                        .take(((last + 7 - first) % 7 + 1) as usize)
                        .fold(0, |m, d| m | 1 << d)
                }
            };
            if matches!(w.as_str(), "daily" | "weekdays" | "weekends") {
                self.at += 1;
            }
            mask |= set;
            if self.peek() != Some(&Token::Comma) {
                return Ok(mask);
            }
            self.at += 1;
        }
    }

    fn day(&mut self) -> Result<u32, ScheduleError> {
        let found = match self.peek() {
            Some(Token::Word(w)) => DAY_NAMES.iter().position(|(short, long)| w == short || w == long),
            _ => None,
        };
        let day = found.ok_or_else(|| self.error("a day: mon, tue, wed, thu, fri, sat or sun"))?;
        self.at += 1;
        Ok(day as u32)
    }

    fn range(&mut self) -> Result<(u32, u32), ScheduleError> {
        let Some(Token::Time(start)) = self.peek().cloned() else { return Err(self.error("a time")) };
        if start == DAY {
            return Err(self.error("a start time before 24:00"));
        }
        self.at += 1;
        if self.peek() != Some(&Token::Dash) {
            return Err(self.error("\"-\" and the end time (07:00-09:00)"));
        }
        self.at += 1;
        let Some(Token::Time(end)) = self.peek().cloned() else { return Err(self.error("an end time such as 09:00")) };
        self.at += 1;
        // An end at or before the start is on the next day.
        Ok((start, if end <= start { end + DAY } else { end }))
    }
}

/// The wall clock in the owner's time zone, mapped onto the schedule's week.
#[derive(Debug, Clone)]
pub struct LocalTime {
    tz: TimeZone,
}

impl LocalTime {
    /// The system's time zone (`TZ`, else `/etc/localtime`; UTC if neither can be read, with a warning).
    pub fn system() -> Self {
        let tz = TimeZone::try_system().unwrap_or_else(|e| {
            tracing::warn!(error = %e, "cannot read the system time zone; the schedule and the budget's month use UTC");
            TimeZone::UTC
        });
        Self { tz }
    }

    pub fn with_zone(tz: TimeZone) -> Self {
        Self { tz }
    }

    pub fn now(&self) -> ZonedDateTime {
        ZonedDateTime::new(jiff::Timestamp::now(), self.tz.clone())
    }

    /// The zone's name, for the status page.
    pub fn zone_name(&self) -> String {
        self.tz.iana_name().map_or_else(|| format!("{:?}", self.tz), str::to_string)
    }
}

/// Second of the week (0 = Monday 00:00) of a local time.
pub fn week_second(t: &ZonedDateTime) -> u32 {
    let day = t.weekday().to_monday_zero_offset() as u32;
    day * DAY + t.hour() as u32 * 3600 + t.minute() as u32 * 60 + t.second() as u32
}

/// Real time from `t` until its local clock has moved on by `civil_secs` (more or less than that across a
/// daylight-saving change). At least a second, so a boundary in a skipped hour is never in the past.
pub fn real_time_until(t: &ZonedDateTime, civil_secs: u32) -> Duration {
    let target = t.datetime().checked_add(SignedDuration::from_secs(i64::from(civil_secs)));
    let real = target.and_then(|d| d.to_zoned_datetime(t.time_zone().clone())).map(|z| t.duration_until(&z));
    match real {
        Ok(d) if d.as_secs() >= 1 => Duration::from_secs(d.as_secs() as u64),
        _ => Duration::from_secs(1),
    }
}

/// The local calendar month of `t`, as `YYYY-MM`.
pub fn month_of(t: &ZonedDateTime) -> String {
    format!("{:04}-{:02}", t.year(), t.month())
}

/// Real time from `t` to the start of the next local calendar month.
pub fn until_next_month(t: &ZonedDateTime) -> Duration {
    let first = jiff::civil::date(t.year(), t.month(), 1).checked_add(jiff::Span::new().months(1));
    let start = first.and_then(|d| d.to_zoned_datetime(t.time_zone().clone())).map(|z| t.duration_until(&z));
    start.map_or(Duration::from_secs(1), |d| Duration::from_secs(d.as_secs().max(1) as u64))
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIB: u64 = 1 << 20;

    fn at(day: u32, h: u32, m: u32) -> u32 {
        day * DAY + h * 3600 + m * 60
    }

    #[test]
    fn windows_defaults_and_next_changes() {
        let s = Schedule::parse("mon-fri 00:00-07:00 unlimited; mon-fri 07:00-23:00 2MiB/s; sat,sun 12:00-14:00 off")
            .expect("valid");
        let default = UploadMode::Rate(MIB);
        // Tuesday 06:00: unlimited for another hour, then 2 MiB/s; the next off window is Saturday noon.
        let p = s.plan(at(1, 6, 0), default);
        assert_eq!(p.now, UploadMode::Unlimited);
        assert!(p.in_window);
        assert_eq!(p.next, Some((3600, UploadMode::Rate(2 * MIB))));
        assert_eq!(p.off_in, Some(at(5, 12, 0) - at(1, 6, 0)));
        // Friday 23:30: outside every window, the default (--upload-limit) applies until Saturday noon.
        let p = s.plan(at(4, 23, 30), default);
        assert_eq!((p.now, p.in_window), (default, false));
        assert_eq!(p.next, Some((at(5, 12, 0) - at(4, 23, 30), UploadMode::Off)));
        // Sunday 13:00: off, back to the default at 14:00; no off window is "next" while off.
        let p = s.plan(at(6, 13, 0), default);
        assert_eq!(p.now, UploadMode::Off);
        assert_eq!(p.next, Some((3600, default)));
        assert_eq!(p.off_in, None);
        // Sunday 23:00 to Monday 00:00 wraps the week: the next change is Monday's unlimited.
        let p = s.plan(at(6, 23, 0), default);
        assert_eq!(p.next, Some((3600, UploadMode::Unlimited)));
        // A window equal to the default is no change: from Tuesday 07:00 to Wednesday 00:00 it is 2 MiB/s.
        let p = s.plan(at(1, 6, 0), UploadMode::Rate(2 * MIB));
        assert_eq!(p.next, Some((3600, UploadMode::Rate(2 * MIB))));
        let p = s.plan(at(1, 8, 0), UploadMode::Rate(2 * MIB));
        assert_eq!(p.next, Some((16 * 3600, UploadMode::Unlimited)));
    }

    #[test]
    fn later_rules_win_ranges_wrap_and_seconds_count() {
        let s = Schedule::parse("daily unlimited; weekdays 22:00-06:00 off; wed 23:00:30-24:00 1MiB/s;").expect("ok");
        assert_eq!(s.plan(at(0, 12, 0), UploadMode::Unlimited).next, Some((10 * 3600, UploadMode::Off)));
        // Friday 22:00 to Saturday 06:00 is off (the range wraps into a weekend day).
        assert_eq!(s.plan(at(5, 5, 0), UploadMode::Unlimited).now, UploadMode::Off);
        assert_eq!(s.plan(at(5, 7, 0), UploadMode::Unlimited).now, UploadMode::Unlimited);
        // Wednesday 23:00:30 the later rule takes over from the off window, to midnight, then off again.
        let p = s.plan(at(2, 23, 0), UploadMode::Unlimited);
        assert_eq!((p.now, p.next), (UploadMode::Off, Some((30, UploadMode::Rate(MIB)))));
        let p = s.plan(at(2, 23, 30), UploadMode::Unlimited);
        assert_eq!((p.now, p.next, p.off_in), (UploadMode::Rate(MIB), Some((1800, UploadMode::Off)), Some(1800)));
        // Monday night starts off only on Monday at 22:00 (no weekday rule starts on Sunday).
        assert_eq!(s.plan(at(0, 3, 0), UploadMode::Unlimited).now, UploadMode::Unlimited);
        // Sunday 22:00 to Monday 06:00 wraps the week.
        let s = Schedule::parse("sun 22:00-06:00 off").expect("ok");
        assert_eq!(s.plan(at(0, 3, 0), UploadMode::Unlimited).now, UploadMode::Off);
        assert_eq!(s.plan(at(6, 21, 0), UploadMode::Unlimited).off_in, Some(3600));
        // fri-mon wraps over the weekend; spaces around punctuation and any case are fine.
        let s = Schedule::parse("Fri - Mon , wed OFF").expect("ok");
        let off: Vec<u32> =
            (0..7).filter(|&d| s.plan(at(d, 12, 0), UploadMode::Unlimited).now == UploadMode::Off).collect();
        assert_eq!(off, [0, 2, 4, 5, 6]);
        // No windows at all: the default, never a change.
        let s = Schedule::parse(" ; ").expect("empty is valid");
        assert_eq!(s.plan(at(3, 3, 3), UploadMode::Unlimited).next, None);
    }

    #[test]
    fn errors_say_where_and_what_was_expected() {
        let err = |text: &str| Schedule::parse(text).expect_err(text);
        let e = err("mon-fri 07:00-23:00 2MiB");
        assert_eq!(e.position, 21);
        assert!(e.expected.contains("time (07:00) or a rate"), "{e}");
        let e = err("mon-fry 07:00-09:00 off");
        assert_eq!((e.position, e.found.as_str()), (5, "\"fry\""));
        let e = err("mon 07:00-09:00");
        assert_eq!((e.position, e.found.as_str()), (16, "the end of the schedule"));
        assert!(e.expected.contains("a mode"), "{e}");
        let e = err("mon 25:00-26:00 off");
        assert_eq!(e.position, 5);
        let e = err("mon 07:00 off");
        assert!(e.expected.contains("\"-\""), "{e}");
        let e = err("mon off off");
        assert!(e.expected.contains("\";\" between rules"), "{e}");
        let e = err("07:00-09:00 off");
        assert!(e.expected.contains("a day"), "{e}");
        let e = err("mon 0/s");
        assert!(e.expected.contains("rate"), "{e}");
        assert!(err("mon 07:00-09:00 off # note").to_string().starts_with("--schedule, at character 21: expected"));
        assert!(err(&"daily off;".repeat(MAX_RULES + 1)).expected.contains("at most"));
    }

    #[test]
    fn local_time_follows_daylight_saving() {
        let tz = TimeZone::posix("CET-1CEST,M3.5.0,M10.5.0/3").expect("tz");
        // Saturday 2026-03-28 12:00 in Paris; Sunday 2026-03-29 02:00 the clocks go forward an hour.
        let t = jiff::civil::date(2026, 3, 28).at(12, 0, 0, 0).to_zoned_datetime(tz).expect("zoned");
        assert_eq!(week_second(&t), at(5, 12, 0));
        // Sunday 12:00 is 24 civil hours later but only 23 real ones.
        assert_eq!(real_time_until(&t, DAY), Duration::from_secs(23 * 3600));
        assert_eq!(month_of(&t), "2026-03");
        assert_eq!(until_next_month(&t), Duration::from_secs((3 * 24 + 12 - 1) * 3600));
    }
}
