//! Human output: aligned tables, times, JSON. Data goes to stdout.

use chrono::{DateTime, Utc};
use krest_schemas::api::JobView;

pub(crate) fn fmt_time(t: Option<DateTime<Utc>>) -> String {
    t.map_or_else(
        || "-".to_string(),
        |t| t.format("%Y-%m-%d %H:%M:%S%.3f").to_string(),
    )
}

/// Prints rows as an aligned table.
pub(crate) fn table(headers: &[&str], rows: Vec<Vec<String>>) -> std::io::Result<()> {
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
