//! The gRPC edge. Handlers decode requests into service inputs, call the
//! service, and encode the result; prost types never go further in than this
//! module (and the command-line client, another edge). Service errors become
//! `tonic::Status` in one place, [`status`].

pub mod auth;
pub mod convert;
pub mod key_admin;
pub mod key_verify;
pub mod pb;
pub mod status;
pub mod trace;
