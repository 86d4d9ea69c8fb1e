//! The committed JSON Schema files in `schemas/json/` must match the types.
//! Run with `KREST_BLESS=1` to rewrite them after changing a wire type.

use std::path::PathBuf;

#[test]
fn committed_json_schemas_are_current() {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("json");
    let bless = std::env::var_os("KREST_BLESS").is_some();
    let expected = krest_schemas::json_schemas();
    let mut stale = Vec::new();
    for (name, content) in &expected {
        let path = dir.join(name);
        let current = std::fs::read_to_string(&path).unwrap_or_default();
        if current != *content {
            if bless {
                std::fs::create_dir_all(&dir).unwrap();
                std::fs::write(&path, content).unwrap();
            } else {
                stale.push(name.to_string());
            }
        }
    }
    // No file in the directory that the types no longer produce.
    for entry in std::fs::read_dir(&dir).unwrap() {
        let name = entry.unwrap().file_name().to_string_lossy().to_string();
        if !expected.iter().any(|(n, _)| *n == name) {
            if bless {
                std::fs::remove_file(dir.join(&name)).unwrap();
            } else {
                stale.push(format!("{name} (no longer generated)"));
            }
        }
    }
    assert!(
        stale.is_empty(),
        "schemas/json is stale: {stale:?}. Regenerate with `KREST_BLESS=1 cargo test -p krest-schemas --test json_schemas`"
    );
}
