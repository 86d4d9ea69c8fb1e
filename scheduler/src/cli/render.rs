//! Human output: aligned tables, times, JSON. Data goes to stdout.
//!
//! Everything human output prints from job data, run outputs, errors, log lines or parked
//! payloads goes through [`esc`], so control characters and terminal escape sequences show as
//! text instead of acting on the terminal; [`table`] applies it to every cell. JSON output
//! (`-o json`) is printed exact (JSON escapes control characters itself).

use std::borrow::Cow;
use std::fmt::Write as _;

use chrono::{DateTime, Utc};
use krest_schemas::api::JobView;
use krest_schemas::text::is_unsafe;

/// `s` safe for a terminal: control characters (ESC, CR, newlines, DEL, C1) and Unicode
/// direction overrides become visible escapes — `\n`, `\r`, `\t`, else `\u{1b}` — so one
/// value is one line and cannot move the cursor, clear the screen or retitle the window.
pub(crate) fn esc(s: &str) -> Cow<'_, str> {
    if !s.chars().any(is_unsafe) {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            c if is_unsafe(c) => {
                let _ = write!(out, "\\u{{{:x}}}", c as u32);
            }
            c => out.push(c),
        }
    }
    Cow::Owned(out)
}

pub(crate) fn fmt_time(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "-".to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
    )
}

/// Prints rows as an aligned table; every cell goes through [`esc`].
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> std::io::Result<()> {
    let rows: Vec<Vec<String>> = rows
        .into_iter()
        .map(|row| row.iter().map(|c| esc(c).into_owned()).collect())
        .collect();
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<String>| -> std::io::Result<()> {
        let mut s = String::new();
        for (i, (cell, w)) in cells.iter().zip(&widths).enumerate() {
            if i + 1 == cells.len() {
                s.push_str(cell);
            } else {
                s.push_str(&format!("{cell:<w$}  "));
            }
        }
        outln!("{}", s.trim_end());
        Ok(())
    };
    line(headers.iter().map(|h| h.to_string()).collect())?;
    for row in rows {
        line(row)?;
    }
    Ok(())
}

/// Prints `v` as pretty JSON, exactly (no escaping beyond JSON's own).
pub(crate) fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    outln!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

pub(crate) fn job_rows(jobs: &[JobView]) -> Vec<Vec<String>> {
    jobs.iter()
        .map(|j| {
            let s = &j.spec;
            vec![
                j.key.clone(),
                s.app_name.clone(),
                format!("{:?}", s.job_type).to_uppercase(),
                match (&s.cron, &s.every, &s.at) {
                    (Some(c), _, _) => c.clone(),
                    (_, Some(e), _) => format!("every {e}"),
                    (_, _, Some(a)) => format!("at {a}"),
                    _ => "(manual)".into(),
                },
                s.time_zone.clone(),
                s.path.clone(),
                if s.running {
                    "running".into()
                } else {
                    "paused".into()
                },
                j.revision.to_string(),
                fmt_time(j.next_fire_at),
            ]
        })
        .collect()
}

pub(crate) const JOB_HEADERS: [&str; 9] = [
    "JOB",
    "APP",
    "TYPE",
    "SCHEDULE",
    "TZ",
    "PATH",
    "STATE",
    "REV",
    "NEXT FIRE (UTC)",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_escapes_are_shown_not_sent() {
        assert_eq!(esc("plain text é"), "plain text é");
        assert_eq!(esc("a\u{1b}[2Jb"), "a\\u{1b}[2Jb");
        assert_eq!(esc("l1\nl2\r\t"), "l1\\nl2\\r\\t");
        assert_eq!(
            esc("\u{9b}31m \u{7f} \u{202e}"),
            "\\u{9b}31m \\u{7f} \\u{202e}"
        );
        assert_eq!(esc("\u{1b}]0;title\u{7}"), "\\u{1b}]0;title\\u{7}");
    }
}
