//! When a job fires: a cron expression, a fixed rate (`every`), or one instant (`at`).
//!
//! Every variant answers the same three questions the engine asks — the next fire after an
//! instant, the latest fire at or before one, and the fires in a range — so catch-up and
//! misfire handling work the same for all of them.

use std::time::Duration;

use chrono::{DateTime, Utc};

use crate::cron::CronSchedule;
use crate::text::echo;

/// Parses a point in time: an RFC 3339 time (`2026-12-03T08:00:00Z`) or a period back from
/// `now` (`90m`, `1h`, `2d`: any [`parse_duration`] syntax). A period longer than history
/// gives the earliest representable time.
pub fn parse_time_or_ago(s: &str, now: DateTime<Utc>) -> Result<DateTime<Utc>, String> {
    if let Ok(d) = parse_duration(s) {
        return Ok(chrono::Duration::from_std(d)
            .ok()
            .and_then(|d| now.checked_sub_signed(d))
            .unwrap_or(DateTime::<Utc>::MIN_UTC));
    }
    DateTime::parse_from_rfc3339(s.trim())
        .map(|t| t.with_timezone(&Utc))
        .map_err(|_| {
            format!(
                "`{}` is neither an RFC 3339 time (2026-12-03T08:00:00Z) nor a period back from now (1h, 30m)",
                echo(s)
            )
        })
}

/// Parses `500ms`, `30s`, `5m`, `2h`, `1d`, combinations such as `1h30m`, or a bare number
/// of seconds.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let text = s.trim();
    let bad = || {
        format!(
            "`{}` is not a duration: use e.g. 500ms, 30s, 5m, 1h30m or 1d",
            echo(s)
        )
    };
    if text.is_empty() {
        return Err(bad());
    }
    if let Ok(n) = text.parse::<f64>() {
        return finite(n, s);
    }
    let mut total = 0.0;
    let mut rest = text;
    while !rest.is_empty() {
        let split = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let (num, tail) = rest.split_at(split);
        let unit_len = tail
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(tail.len());
        let (unit, next) = tail.split_at(unit_len);
        let n: f64 = num.parse().map_err(|_| bad())?;
        total += match unit {
            "ms" => n / 1000.0,
            "s" => n,
            "m" => n * 60.0,
            "h" => n * 3600.0,
            "d" => n * 86400.0,
            _ => {
                return Err(format!(
                    "`{}` has an unknown unit `{}`: use ms, s, m, h or d",
                    echo(s),
                    echo(unit)
                ))
            }
        };
        rest = next;
    }
    finite(total, s)
}

fn finite(secs: f64, s: &str) -> Result<Duration, String> {
    if secs.is_finite() && (0.0..1e12).contains(&secs) {
        Ok(Duration::from_secs_f64(secs))
    } else {
        Err(format!("`{}` is not a valid duration", echo(s)))
    }
}

/// A job's schedule.
#[derive(Debug, Clone)]
pub enum Schedule {
    /// A cron expression in a time zone (boxed: a parsed expression is large).
    Cron(Box<CronSchedule>),
    /// Every `period`, counted from `start` (the job's creation): `start + k × period`, k ≥ 1.
    Every {
        /// The origin of the fire times.
        start: DateTime<Utc>,
        /// The period, in milliseconds (at least 1000).
        period_ms: i64,
    },
    /// Once, at this instant.
    At(DateTime<Utc>),
}

fn ms(t: DateTime<Utc>) -> i64 {
    t.timestamp_millis()
}

fn from_ms(v: i64) -> Option<DateTime<Utc>> {
    DateTime::<Utc>::from_timestamp_millis(v)
}

impl Schedule {
    /// The first fire time strictly after `t`.
    pub fn next_after(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Cron(c) => c.next_after(t),
            Schedule::Every { start, period_ms } => {
                let elapsed = ms(t) - ms(*start);
                let k = if elapsed < *period_ms {
                    1
                } else {
                    elapsed.div_euclid(*period_ms) + 1
                };
                from_ms(ms(*start).checked_add(k.checked_mul(*period_ms)?)?)
            }
            Schedule::At(at) => (*at > t).then_some(*at),
        }
    }

    /// The latest fire time at or before `t`.
    pub fn prev_at_or_before(&self, t: DateTime<Utc>) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Cron(c) => c.prev_at_or_before(t),
            Schedule::Every { start, period_ms } => {
                let elapsed = ms(t) - ms(*start);
                if elapsed < *period_ms {
                    return None;
                }
                from_ms(ms(*start) + elapsed.div_euclid(*period_ms) * period_ms)
            }
            Schedule::At(at) => (*at <= t).then_some(*at),
        }
    }

    /// Fire times in `(after, until]`, oldest first, at most `limit` of them.
    pub fn fires_between(
        &self,
        after: DateTime<Utc>,
        until: DateTime<Utc>,
        limit: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut out = Vec::new();
        let mut t = after;
        while out.len() < limit {
            match self.next_after(t) {
                Some(next) if next <= until => {
                    out.push(next);
                    t = next;
                }
                _ => break,
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(s: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(s).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("30s").unwrap(), Duration::from_secs(30));
        assert_eq!(parse_duration("1h30m").unwrap(), Duration::from_secs(5400));
        assert_eq!(parse_duration("1d").unwrap(), Duration::from_secs(86400));
        assert_eq!(parse_duration("7").unwrap(), Duration::from_secs(7));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        for bad in ["", "x", "3 days", "5w", "-1s", "s", "1e400"] {
            assert!(parse_duration(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn every_counts_from_its_start() {
        let s = Schedule::Every {
            start: t("2026-01-01T00:00:00.250Z"),
            period_ms: 30_000,
        };
        assert_eq!(
            s.next_after(t("2026-01-01T00:00:00Z")).unwrap(),
            t("2026-01-01T00:00:30.250Z")
        );
        assert_eq!(
            s.next_after(t("2026-01-01T00:00:30.250Z")).unwrap(),
            t("2026-01-01T00:01:00.250Z")
        );
        assert_eq!(
            s.prev_at_or_before(t("2026-01-01T00:01:10Z")).unwrap(),
            t("2026-01-01T00:01:00.250Z")
        );
        assert_eq!(s.prev_at_or_before(t("2026-01-01T00:00:10Z")), None);
        assert_eq!(
            s.fires_between(t("2026-01-01T00:00:00Z"), t("2026-01-01T00:02:00Z"), 10)
                .len(),
            3
        );
    }

    #[test]
    fn at_fires_once() {
        let s = Schedule::At(t("2026-06-01T12:00:00Z"));
        assert_eq!(
            s.next_after(t("2026-06-01T11:00:00Z")),
            Some(t("2026-06-01T12:00:00Z"))
        );
        assert_eq!(s.next_after(t("2026-06-01T12:00:00Z")), None);
        assert_eq!(
            s.fires_between(t("2026-01-01T00:00:00Z"), t("2027-01-01T00:00:00Z"), 10),
            [t("2026-06-01T12:00:00Z")]
        );
        assert_eq!(s.prev_at_or_before(t("2026-06-01T11:59:59Z")), None);
    }
}

#[cfg(test)]
mod time_or_ago_tests {
    use super::*;

    #[test]
    fn times_and_periods_back() {
        let now: DateTime<Utc> = "2026-12-03T08:00:00Z".parse().unwrap();
        assert_eq!(
            parse_time_or_ago("1h30m", now).unwrap(),
            "2026-12-03T06:30:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        assert_eq!(
            parse_time_or_ago("2026-12-01T10:00:00+02:00", now).unwrap(),
            "2026-12-01T08:00:00Z".parse::<DateTime<Utc>>().unwrap()
        );
        let e = parse_time_or_ago("last tuesday", now).unwrap_err();
        assert!(e.contains("neither an RFC 3339 time"), "{e}");
    }
}
