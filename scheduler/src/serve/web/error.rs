//! The HTTP API's errors: one JSON shape ([`HttpError`]) with the service layer's codes and
//! messages, and an HTTP status chosen from the code.

use axum::http::header::{HeaderName, CONTENT_TYPE};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use krest_schemas::api::{ApiError, ErrorCode};
use krest_schemas::web::{HttpError, HttpErrorDetail};

/// An error answer (boxed: errors are the rare path, results stay small).
#[derive(Debug)]
pub struct WebError(Box<Inner>);

#[derive(Debug)]
struct Inner {
    status: StatusCode,
    detail: HttpErrorDetail,
    header: Option<(HeaderName, HeaderValue)>,
}

impl WebError {
    /// An error with `status`, `code` and `message`.
    pub fn new(status: StatusCode, code: ErrorCode, message: impl Into<String>) -> WebError {
        WebError(Box::new(Inner {
            status,
            detail: HttpErrorDetail {
                code,
                message: message.into(),
                field: None,
                invalid: Vec::new(),
            },
            header: None,
        }))
    }

    /// A 400 about request field `field`.
    pub fn bad_field(field: &str, message: impl Into<String>) -> WebError {
        WebError::new(StatusCode::BAD_REQUEST, ErrorCode::BadRequest, message).field(field)
    }

    /// Names the request field at fault.
    pub fn field(mut self, field: &str) -> WebError {
        self.0.detail.field = Some(field.to_string());
        self
    }

    /// Adds a response header.
    pub fn with_header(mut self, name: HeaderName, value: HeaderValue) -> WebError {
        self.0.header = Some((name, value));
        self
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.0.status
    }

    /// The header added by [`WebError::with_header`], if it is `name`.
    #[cfg(test)]
    pub fn header(&self, name: HeaderName) -> Option<&HeaderValue> {
        self.0
            .header
            .as_ref()
            .filter(|(n, _)| *n == name)
            .map(|(_, v)| v)
    }
}

/// The HTTP status of a service-layer error code.
pub fn status_of(code: ErrorCode) -> StatusCode {
    match code {
        ErrorCode::BadRequest => StatusCode::BAD_REQUEST,
        ErrorCode::InvalidJob => StatusCode::UNPROCESSABLE_ENTITY,
        ErrorCode::NotFound => StatusCode::NOT_FOUND,
        ErrorCode::Ambiguous => StatusCode::CONFLICT,
        ErrorCode::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        ErrorCode::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
        ErrorCode::Unauthorized => StatusCode::UNAUTHORIZED,
        ErrorCode::Forbidden => StatusCode::FORBIDDEN,
    }
}

impl From<ApiError> for WebError {
    fn from(e: ApiError) -> Self {
        // A single invalid definition names its field, as the CLI shows it.
        let field = match e.invalid.as_slice() {
            [doc] => match doc.problems.as_slice() {
                [p] if !p.field.is_empty() => Some(p.field.clone()),
                _ => None,
            },
            _ => None,
        };
        WebError(Box::new(Inner {
            status: status_of(e.code),
            detail: HttpErrorDetail {
                code: e.code,
                message: e.message,
                field,
                invalid: e.invalid,
            },
            header: None,
        }))
    }
}

impl IntoResponse for WebError {
    fn into_response(self) -> Response {
        let this = *self.0;
        if this.status.is_server_error() {
            tracing::warn!(error = %this.detail.message, "HTTP API request failed");
        }
        let body = serde_json::to_vec(&HttpError { error: this.detail })
            .unwrap_or_else(|_| br#"{"error":{"code":"internal","message":"?"}}"#.to_vec());
        let mut response = (
            this.status,
            [(CONTENT_TYPE, HeaderValue::from_static("application/json"))],
            body,
        )
            .into_response();
        if let Some((name, value)) = this.header {
            response.headers_mut().insert(name, value);
        }
        response
    }
}
