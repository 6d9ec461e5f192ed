//! The one place where service errors become gRPC statuses. Internal causes
//! are logged here and replaced by a generic message on the wire.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt};

use crate::service::ServiceError;

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Self {
        match e {
            ServiceError::Invalid(violations) => {
                // Input is quoted through `keys::excerpt` where it is
                // checked; this bound is the backstop, so that no violation
                // (and no message) can carry a request's bulk back out.
                let violations: Vec<_> = violations
                    .into_iter()
                    .map(|v| {
                        crate::service::FieldViolation::new(cut(&v.field, 128), cut(&v.description, 256))
                    })
                    .collect();
                let message = ServiceError::Invalid(violations.clone()).to_string();
                let details = ErrorDetails::with_bad_request(
                    violations
                        .into_iter()
                        .map(|v| FieldViolation::new(v.field, v.description))
                        .collect::<Vec<_>>(),
                );
                Status::with_error_details(Code::InvalidArgument, message, details)
            }
            ServiceError::NotFound(what) => Status::not_found(format!("{what} not found")),
            ServiceError::Unauthenticated(m) => Status::unauthenticated(m),
            ServiceError::PermissionDenied(m) => Status::permission_denied(m),
            ServiceError::FailedPrecondition(m) => Status::failed_precondition(m),
            ServiceError::Unavailable(m) | ServiceError::Busy(m) => {
                tracing::warn!(reason = %m, "answering UNAVAILABLE");
                Status::unavailable(m)
            }
            ServiceError::Overloaded(m) => Status::resource_exhausted(m),
            ServiceError::Internal(cause) => {
                tracing::error!(error = %cause, "internal error");
                Status::internal("internal error")
            }
        }
    }
}

/// At most `max` bytes of `s`, cut at a character boundary and marked.
fn cut(s: &str, max: usize) -> String {
    if s.len() <= max {
        return s.to_owned();
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}…", &s[..end])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn invalid_arguments_name_their_fields_in_bad_request_details() {
        let status = Status::from(ServiceError::invalid("scopes", "unknown scope \"x:y\""));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert!(status.message().contains("scopes"));
        let bad = status.get_details_bad_request().unwrap();
        assert_eq!(bad.field_violations[0].field, "scopes");
    }

    #[test]
    fn internal_causes_stay_inside() {
        let status = Status::from(ServiceError::Internal("db password is hunter2".into()));
        assert_eq!(status.code(), Code::Internal);
        assert!(!status.message().contains("hunter2"));
    }
}
