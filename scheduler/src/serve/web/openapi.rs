//! The OpenAPI 3 document of the HTTP API (`GET /api/v1/openapi.json`), rendered from the
//! route table ([`super::routes::routes`]) with the wire types' schemars schemas as
//! components.

use schemars::generate::SchemaSettings;
use serde_json::{json, Map, Value};

use super::auth::Access;
use super::routes::{error_schema, routes, Answer};

/// The document.
pub fn document() -> Value {
    let mut generator = SchemaSettings::openapi3().into_generator();
    let error = Value::from(error_schema(&mut generator));
    let mut paths = Map::new();
    for r in routes() {
        let mut parameters: Vec<Value> = path_params(r.path)
            .map(|name| {
                json!({
                    "name": name, "in": "path", "required": true,
                    "schema": {"type": "string"},
                })
            })
            .collect();
        parameters.extend(r.query.iter().map(|p| {
            json!({
                "name": p.name, "in": "query", "required": p.required,
                "description": p.description, "schema": {"type": p.kind},
            })
        }));
        let success = match r.answer {
            Answer::Json(schema) => json!({
                "description": "OK",
                "content": {"application/json": {"schema": Value::from(schema(&mut generator))}},
            }),
            Answer::EventStream => json!({
                "description": "Server-sent events",
                "content": {"text/event-stream": {"schema": {"type": "string"}}},
            }),
        };
        let mut responses = Map::new();
        responses.insert("200".into(), success);
        let failure = |description: &str| {
            json!({
                "description": description,
                "content": {"application/json": {"schema": error.clone()}},
            })
        };
        responses.insert(
            "400".into(),
            failure("Bad request (the message names the problem, `field` the parameter)"),
        );
        if r.access != Access::Public {
            responses.insert("401".into(), failure("Missing or wrong bearer token"));
        }
        if r.access == Access::Write {
            responses.insert("403".into(), failure("A read-only token used for a write"));
        }
        responses.insert("default".into(), failure("Error"));
        let mut op = json!({
            "operationId": r.id,
            "summary": r.summary,
            "parameters": parameters,
            "responses": responses,
            "x-krest-access": r.access.as_str(),
        });
        op["security"] = match r.access {
            Access::Public => json!([]),
            _ => json!([{"bearer": []}, {"session": []}]),
        };
        if let Some(body) = r.body {
            op["requestBody"] = json!({
                "required": r.body_required,
                "content": {"application/json": {"schema": Value::from(body(&mut generator))}},
            });
        }
        let item = paths
            .entry(r.path.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
        item[r.method.as_str()] = op;
    }
    let schemas: Map<String, Value> = generator.take_definitions(true).into_iter().collect();
    json!({
        "openapi": "3.0.3",
        "info": {
            "title": "Krest HTTP API",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Jobs, runs, workers and cluster of a Krest scheduler. Every node serves it on its --http address; it answers through the same service layer as the NATS API (krest.api.*). Writes need the node's --api-token as a bearer token; reads its --api-token or --api-read-token (or nothing with --api-anonymous-read).",
        },
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer"},
                "session": {"type": "apiKey", "in": "cookie", "name": "krest_session"},
            },
        },
    })
}

/// The `{name}` segments of `path`.
pub fn path_params(path: &str) -> impl Iterator<Item = &str> {
    path.split('/')
        .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_document_lists_every_route_with_resolvable_schemas() {
        let doc = document();
        let routes = routes();
        let paths = doc["paths"].as_object().unwrap();
        let documented: usize = paths.values().map(|p| p.as_object().unwrap().len()).sum();
        assert_eq!(documented, routes.len());
        for r in &routes {
            assert!(
                paths[r.path][r.method.as_str()].is_object(),
                "{} {}",
                r.method.as_str(),
                r.path
            );
        }
        // Every $ref points at a component.
        let text = doc.to_string();
        let schemas = doc["components"]["schemas"].as_object().unwrap();
        for part in text.split("\"$ref\":\"#/components/schemas/").skip(1) {
            let name = part.split('"').next().unwrap();
            assert!(schemas.contains_key(name), "missing component {name}");
        }
        assert!(schemas.contains_key("HttpError"));
        assert!(schemas.contains_key("JobView"));
    }
}
