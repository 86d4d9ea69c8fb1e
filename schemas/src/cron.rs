//! Cron expressions: Quartz syntax (with seconds, `?`, `L`, `W`, `#`, names, optional year) and
//! classic 5-field cron, evaluated in an IANA time zone.
//!
//! Which dialect applies is decided by the number of fields:
//! - 6 or 7 fields: Quartz (`sec min hour day-of-month month day-of-week [year]`), day-of-week
//!   numbered 1 = Sunday … 7 = Saturday, `0/5` style steps allowed;
//! - 5 fields: Unix cron (`min hour day-of-month month day-of-week`), day-of-week 0 = Sunday;
//! - `@yearly`, `@monthly`, `@weekly`, `@daily`, `@hourly` nicknames.
//!
//! Around daylight-saving changes a fire time that falls into a skipped hour runs once at the
//! first valid instant after it, and one in a repeated hour runs once (croner's behaviour).

use std::collections::HashMap;
use std::sync::{Arc, LazyLock, Mutex};

use chrono::{DateTime, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds};
use croner::Cron;

use crate::text::{echo, shorten_quoted};

/// A cron expression that failed to parse, with the reason.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid cron expression `{}`: {}", echo(expr), shorten_quoted(reason))]
pub struct CronError {
    /// The expression as given.
    pub expr: String,
    /// Why it is invalid.
    pub reason: String,
}

/// Checks `expr` in `tz` as [`CronSchedule::new`] does, without keeping the parse.
///
/// Parsing costs ~25 µs (croner builds a bitmap of years), and a set of job definitions
/// usually shares a few expressions, so each thread remembers the next fire time of the
/// expressions it found valid: while that time is still ahead the expression still fires,
/// and no new parse is needed. Validating 100,000 definitions that share 60 expressions costs
/// 60 parses per thread instead of 100,000.
pub fn check(expr: &str, tz: Tz) -> Result<(), CronError> {
    use std::cell::RefCell;
    /// Expressions remembered per thread at most (then forgotten all at once).
    const REMEMBERED: usize = 4096;
    thread_local! {
        static VALID: RefCell<HashMap<Tz, HashMap<String, DateTime<Utc>>>> =
            RefCell::new(HashMap::new());
    }
    let now = Utc::now();
    let known = VALID.with(|v| {
        v.borrow()
            .get(&tz)
            .and_then(|m| m.get(expr))
            .is_some_and(|next| *next > now)
    });
    if known {
        return Ok(());
    }
    let next = CronSchedule::parse(expr, tz)?.first_after(expr, now)?;
    VALID.with(|v| {
        let mut v = v.borrow_mut();
        if v.values().map(HashMap::len).sum::<usize>() >= REMEMBERED {
            v.clear();
        }
        v.entry(tz).or_default().insert(expr.to_string(), next);
    });
    Ok(())
}

/// A valid cron expression bound to a time zone.
///
/// It holds the expression, not its parse: croner keeps ~5 KiB per parsed expression (a bitmap
/// of years), which made 100,000 distinct expressions cost ~600 MiB. Parses live in a cache
/// shared by the process ([`PARSES_KEPT`] at most, the least recently used forgotten first), so
/// a leader with any number of distinct expressions holds a bounded amount of them, and
/// re-parses (~25 µs) only expressions it has not evaluated for a while.
#[derive(Debug, Clone)]
pub struct CronSchedule {
    expr: Arc<str>,
    tz: Tz,
}

/// Most parsed expressions kept by the process (~5 KiB each).
pub const PARSES_KEPT: usize = 4096;

/// Parsed expressions by text, with when each was last used.
#[derive(Default)]
struct Parses {
    map: HashMap<Arc<str>, (Arc<Cron>, u64)>,
    clock: u64,
}

static PARSES: LazyLock<Mutex<Parses>> = LazyLock::new(Mutex::default);

/// The parse of `expr` (valid: checked when its [`CronSchedule`] was made), from the cache or
/// made now; `None` only if it no longer parses.
fn parsed(expr: &Arc<str>) -> Option<Arc<Cron>> {
    {
        let mut parses = PARSES
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        parses.clock += 1;
        let clock = parses.clock;
        if let Some((cron, used)) = parses.map.get_mut(expr) {
            *used = clock;
            return Some(cron.clone());
        }
    }
    let cron = Arc::new(parse_cron(expr).ok()?);
    let mut parses = PARSES
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if parses.map.len() >= PARSES_KEPT {
        // Forget the older half at once: amortized O(1) per parse.
        let mut used: Vec<u64> = parses.map.values().map(|(_, u)| *u).collect();
        let mid = used.len() / 2;
        let (_, cut, _) = used.select_nth_unstable(mid);
        let cut = *cut;
        parses.map.retain(|_, (_, u)| *u > cut);
    }
    let clock = parses.clock;
    parses.map.insert(expr.clone(), (cron.clone(), clock));
    Some(cron)
}

/// Parses an IANA time zone name such as `UTC` or `America/New_York`.
pub fn parse_time_zone(name: &str) -> Result<Tz, String> {
    name.parse::<Tz>().map_err(|_| {
        format!(
            "unknown time zone `{}`: use an IANA name such as UTC, Europe/Berlin or America/New_York",
            echo(name)
        )
    })
}

fn parse_cron(expr: &str) -> Result<Cron, CronError> {
    let trimmed = expr.trim();
    let fields = trimmed.split_whitespace().count();
    let err = |reason: String| CronError {
        expr: expr.to_string(),
        reason,
    };
    let parser = if trimmed.starts_with('@') {
        CronParser::builder().seconds(Seconds::Optional).build()
    } else {
        match fields {
            5 => CronParser::builder().seconds(Seconds::Disallowed).build(),
            6 | 7 => CronParser::builder()
                .seconds(Seconds::Required)
                .alternative_weekdays(true)
                .sloppy_ranges(true)
                .build(),
            0 => return Err(err("it is empty".into())),
            n => {
                return Err(err(format!(
                    "it has {n} fields; use 6 or 7 (Quartz: sec min hour day-of-month month day-of-week [year]) or 5 (min hour day-of-month month day-of-week)"
                )))
            }
        }
    };
    parser.parse(trimmed).map_err(|e| err(e.to_string()))
}

impl CronSchedule {
    /// Parses `expr` and binds it to `tz`. Fails when the expression is malformed or can never
    /// fire (such as `0 0 0 30 2 ?`, February 30th).
    pub fn new(expr: &str, tz: Tz) -> Result<Self, CronError> {
        let schedule = CronSchedule::parse(expr, tz)?;
        schedule.first_after(expr, Utc::now())?;
        Ok(schedule)
    }

    /// The first fire after `now`: a pattern that matches nothing (or only years gone by)
    /// would make the scheduler search in vain at dispatch time, so it is an error.
    fn first_after(&self, expr: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, CronError> {
        self.next_after(now).ok_or_else(|| CronError {
            expr: expr.to_string(),
            reason: "it never fires (no future date matches all its fields)".into(),
        })
    }

    /// Parses `expr` without checking that it fires in the future: for expressions that were
    /// validated with [`CronSchedule::new`] already (stored job definitions).
    pub fn parse(expr: &str, tz: Tz) -> Result<Self, CronError> {
        let expr: Arc<str> = Arc::from(expr);
        if parsed(&expr).is_none() {
            // Not kept: report why it does not parse.
            parse_cron(&expr)?;
        }
        Ok(CronSchedule { expr, tz })
    }

    /// The first fire time strictly after `t`, or `None` if there is none (years out of range).
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let cron = parsed(&self.expr)?;
        let local = t.with_timezone(&self.tz);
        cron.find_next_occurrence(&local, false)
            .ok()
            .map(|d| d.with_timezone(&Utc))
            // croner works in whole seconds; never return a time that is not after `t`.
            .and_then(|d| {
                if d > t {
                    Some(d)
                } else {
                    cron.find_next_occurrence(&(local + chrono::Duration::seconds(1)), false)
                        .ok()
                        .map(|d| d.with_timezone(&Utc))
                }
            })
    }

    /// The latest fire time at or before `t`, or `None` if there is none.
    pub fn prev_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        let cron = parsed(&self.expr)?;
        let local = t.with_timezone(&self.tz);
        cron.find_previous_occurrence(&local, true)
            .ok()
            .map(|d| d.with_timezone(&Utc))
            .filter(|d| *d <= t)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedule::Schedule;
    use chrono::TimeZone;

    #[test]
    fn parses_are_kept_within_a_bound_and_made_again_when_needed() {
        let t = Utc.with_ymd_and_hms(2026, 12, 3, 0, 0, 0).unwrap();
        let schedules: Vec<(usize, CronSchedule)> = (0..PARSES_KEPT + 1000)
            .map(|i| {
                let expr = format!("{} {} {} * * ?", i % 60, (i / 60) % 60, (i / 3600) % 24);
                (i, CronSchedule::parse(&expr, Tz::UTC).unwrap())
            })
            .collect();
        let expected = |i: usize| {
            t + chrono::Duration::seconds(
                ((i / 3600) % 24 * 3600 + (i / 60) % 60 * 60 + i % 60) as i64,
            )
        };
        for (i, s) in &schedules {
            if *i > 0 {
                assert_eq!(s.next_after(t), Some(expected(*i)), "{i}");
            }
        }
        let kept = PARSES.lock().unwrap().map.len();
        assert!(kept <= PARSES_KEPT, "{kept} parses kept");
        // The first ones were forgotten long ago: evaluated again, they are parsed again.
        assert_eq!(schedules[1].1.next_after(t), Some(expected(1)));
        assert!(std::mem::size_of::<CronSchedule>() <= 32);
    }

    fn utc(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    fn next_n(expr: &str, tz: &str, from: &str, n: usize) -> Vec<String> {
        let s = CronSchedule::new(expr, parse_time_zone(tz).unwrap()).unwrap();
        let mut t = utc(from);
        (0..n)
            .map(|_| {
                t = s.next_after(t).unwrap();
                t.to_rfc3339()
            })
            .collect()
    }

    #[test]
    fn seed_expression_every_five_seconds() {
        assert_eq!(
            next_n("0/5 * * * * ?", "UTC", "2026-01-01T00:00:03Z", 3),
            [
                "2026-01-01T00:00:05+00:00",
                "2026-01-01T00:00:10+00:00",
                "2026-01-01T00:00:15+00:00"
            ]
        );
    }

    #[test]
    fn sub_second_start_is_strictly_after() {
        let s = CronSchedule::new("* * * * * ?", Tz::UTC).unwrap();
        let t = utc("2026-01-01T00:00:00.500Z");
        assert_eq!(s.next_after(t).unwrap(), utc("2026-01-01T00:00:01Z"));
        let t = utc("2026-01-01T00:00:01Z");
        assert_eq!(s.next_after(t).unwrap(), utc("2026-01-01T00:00:02Z"));
    }

    #[test]
    fn quartz_specials() {
        // Last day of month.
        assert_eq!(
            next_n("0 15 10 L * ?", "UTC", "2026-02-01T00:00:00Z", 2),
            ["2026-02-28T10:15:00+00:00", "2026-03-31T10:15:00+00:00"]
        );
        // Third Friday (Quartz numbering: 6 = Friday).
        assert_eq!(
            next_n("0 15 10 ? * 6#3", "UTC", "2026-01-01T00:00:00Z", 1),
            ["2026-01-16T10:15:00+00:00"]
        );
        // Nearest weekday to the 1st: 2026-02-01 is a Sunday -> Monday the 2nd.
        assert_eq!(
            next_n("0 0 12 1W * ?", "UTC", "2026-01-15T00:00:00Z", 1),
            ["2026-02-02T12:00:00+00:00"]
        );
        // Names.
        assert_eq!(
            next_n("0 0 12 ? * MON-FRI", "UTC", "2026-01-02T13:00:00Z", 2),
            ["2026-01-05T12:00:00+00:00", "2026-01-06T12:00:00+00:00"]
        );
        // Quartz day-of-week 2 = Monday.
        assert_eq!(
            next_n("0 0 9 ? * 2", "UTC", "2026-01-01T00:00:00Z", 1),
            ["2026-01-05T09:00:00+00:00"]
        );
    }

    #[test]
    fn five_field_is_unix_cron() {
        assert_eq!(
            next_n("*/5 * * * *", "UTC", "2026-01-01T00:01:00Z", 2),
            ["2026-01-01T00:05:00+00:00", "2026-01-01T00:10:00+00:00"]
        );
        // Unix day-of-week 1 = Monday.
        assert_eq!(
            next_n("0 9 * * 1", "UTC", "2026-01-01T00:00:00Z", 1),
            ["2026-01-05T09:00:00+00:00"]
        );
        assert_eq!(
            next_n("@hourly", "UTC", "2026-01-01T00:30:00Z", 1),
            ["2026-01-01T01:00:00+00:00"]
        );
    }

    #[test]
    fn time_zone_is_honoured() {
        // 09:00 in Shanghai is 01:00 UTC.
        assert_eq!(
            next_n("0 0 9 * * ?", "Asia/Shanghai", "2026-01-01T02:00:00Z", 1),
            ["2026-01-02T01:00:00+00:00"]
        );
    }

    #[test]
    fn dst_spring_forward_runs_once() {
        // 2026-03-08: New York skips 02:00-03:00. A 02:30 job runs once that day, at 03:00 EDT.
        let s = CronSchedule::new("0 30 2 * * ?", parse_time_zone("America/New_York").unwrap())
            .unwrap();
        let fires = Schedule::Cron(Box::new(s)).fires_between(
            utc("2026-03-07T12:00:00Z"),
            utc("2026-03-09T12:00:00Z"),
            10,
        );
        let ny = parse_time_zone("America/New_York").unwrap();
        let local: Vec<String> = fires
            .iter()
            .map(|t| t.with_timezone(&ny).format("%F %T %Z").to_string())
            .collect();
        assert_eq!(
            local,
            ["2026-03-08 03:00:00 EDT", "2026-03-09 02:30:00 EDT"],
            "fires: {fires:?}"
        );
    }

    #[test]
    fn dst_fall_back_runs_once() {
        // 2026-11-01: New York repeats 01:00-02:00. A 01:30 job runs once that day.
        let s = CronSchedule::new("0 30 1 * * ?", parse_time_zone("America/New_York").unwrap())
            .unwrap();
        let fires = Schedule::Cron(Box::new(s)).fires_between(
            utc("2026-10-31T12:00:00Z"),
            utc("2026-11-02T12:00:00Z"),
            10,
        );
        assert_eq!(fires.len(), 2, "fires: {fires:?}");
    }

    #[test]
    fn rejects_bad_expressions_with_reasons() {
        for (expr, needle) in [
            ("", "empty"),
            ("* * *", "3 fields"),
            ("61 * * * * ?", "cron"),
            ("0 0 0 30 2 ?", "never fires"),
            ("0 0 25 * * ?", "cron"),
            ("a b c d e f", "cron"),
        ] {
            let err = CronSchedule::new(expr, Tz::UTC).unwrap_err();
            let msg = err.to_string();
            assert!(
                msg.contains(needle) || msg.contains("invalid"),
                "{expr}: {msg}"
            );
            assert_eq!(err.expr, expr);
        }
    }

    #[test]
    fn previous_fire() {
        let s = CronSchedule::new("0/5 * * * * ?", Tz::UTC).unwrap();
        assert_eq!(
            s.prev_at_or_before(utc("2026-01-01T00:00:07.300Z"))
                .unwrap(),
            utc("2026-01-01T00:00:05Z")
        );
        assert_eq!(
            s.prev_at_or_before(utc("2026-01-01T00:00:10Z")).unwrap(),
            utc("2026-01-01T00:00:10Z")
        );
    }

    #[test]
    fn fires_between_is_bounded() {
        let s = Schedule::Cron(Box::new(CronSchedule::new("* * * * * ?", Tz::UTC).unwrap()));
        let t0 = Utc.with_ymd_and_hms(2026, 1, 1, 0, 0, 0).unwrap();
        let fires = s.fires_between(t0, t0 + chrono::Duration::seconds(10), 100);
        assert_eq!(fires.len(), 10);
        assert_eq!(
            s.fires_between(t0, t0 + chrono::Duration::seconds(10), 3)
                .len(),
            3
        );
    }
}
