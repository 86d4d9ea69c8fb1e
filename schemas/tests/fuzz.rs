//! Property tests: the definition parser/validator and the cron parser turn any input into a
//! value or a clear error, never a panic; accepted definitions round-trip.

use krest_schemas::cron::parse_time_zone;
use krest_schemas::{parse_job, CronSchedule};
use proptest::prelude::*;
use serde_json::{json, Map, Value};

const FIELDS: [&str; 18] = [
    "appName",
    "jobGroup",
    "jobName",
    "jobType",
    "args",
    "cron",
    "timeZone",
    "loadBalanceType",
    "methodType",
    "path",
    "running",
    "retryTimes",
    "timeoutSecs",
    "id",
    "createTime",
    "description",
    "shardingParams",
    "unknownField",
];

fn any_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(|n| json!(n)),
        any::<f64>()
            .prop_map(|f| serde_json::Number::from_f64(f).map_or(Value::Null, Value::Number)),
        "\\PC{0,20}".prop_map(Value::String),
        prop_oneof![
            Just("SHARDING"),
            Just("NORMAL"),
            Just("WEIGHTROUNDRIBBON"),
            Just("QUEUE"),
            Just("0/5 * * * * ?"),
            Just("* * * * *"),
            Just("[\"1\",\"2\"]"),
            Just("UTC"),
            Just("America/New_York"),
            Just("2022-07-03 16:49:47"),
            Just("a"),
            Just("p/q")
        ]
        .prop_map(|s| Value::String(s.to_string())),
    ];
    leaf.prop_recursive(3, 24, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("\\PC{0,8}", inner, 0..4)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

fn job_like() -> impl Strategy<Value = Value> {
    prop::collection::btree_map(prop::sample::select(FIELDS.to_vec()), any_json(), 0..12).prop_map(
        |m| {
            let mut obj = Map::new();
            for (k, v) in m {
                obj.insert(k.to_string(), v);
            }
            Value::Object(obj)
        },
    )
}

fn cron_like() -> impl Strategy<Value = String> {
    let token = prop_oneof![
        "[0-9]{1,3}",
        Just("*".to_string()),
        Just("?".to_string()),
        Just("L".to_string()),
        "[0-9]{1,2}W",
        "[0-9]#[0-9]",
        "[0-9]{1,2}/[0-9]{1,2}",
        "[0-9]{1,2}-[0-9]{1,2}",
        Just("MON-FRI".to_string()),
        Just("JAN".to_string()),
        "\\PC{0,3}",
    ];
    prop::collection::vec(token, 0..8).prop_map(|parts| parts.join(" "))
}

proptest! {
    // 2000 cases per property in CI; more with PROPTEST_CASES=N.
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(2000),
        ..ProptestConfig::default()
    })]

    #[test]
    fn any_document_parses_or_is_rejected_with_problems(doc in prop_oneof![job_like(), any_json()]) {
        match parse_job(&doc) {
            Ok(spec) => {
                // Accepted definitions are stable: their stored form applies back unchanged.
                let stored = serde_json::to_value(&spec).unwrap();
                prop_assert_eq!(parse_job(&stored).unwrap(), spec);
            }
            Err(e) => {
                prop_assert!(!e.problems.is_empty());
                prop_assert!(e.problems.iter().all(|p| !p.message.is_empty()));
            }
        }
    }

    #[test]
    fn any_cron_expression_parses_or_is_explained(expr in prop_oneof![cron_like(), "\\PC{0,40}"]) {
        let tz = parse_time_zone("America/New_York").unwrap();
        match CronSchedule::new(&expr, tz) {
            Ok(s) => {
                let t = chrono::Utc::now();
                if let Some(next) = s.next_after(t) {
                    prop_assert!(next > t);
                }
            }
            Err(e) => prop_assert!(!e.reason.is_empty()),
        }
    }
}
