//! The gRPC edge. Handlers decode requests into service inputs, call the
//! service, and encode the result; prost types never go further in than this
//! module (and the command-line client, another edge). Service errors become
//! `tonic::Status` in one place, [`status`]. Who is calling: [`peer`] (the
//! connection's address and mTLS identity), [`callers`] (who may verify and
//! who may report outcomes) and [`auth`] (KeyAdmin credentials), both
//! layers; [`limits`] bounds each RPC's request size, and [`lifetime`] each
//! call's duration. [`ext_authz`] answers Envoy's
//! Check (gateway mode) with envoy-types' messages, and [`access_log`]
//! takes Envoy's access-log stream onto the audit rows. [`leak_reports`]
//! is the one HTTP route beside them: GitHub's secret-scanning reports.

pub mod access_log;
pub mod auth;
pub mod callers;
pub mod codes;
pub mod convert;
pub mod ext_authz;
pub mod key_admin;
pub mod key_verify;
pub mod leak_reports;
pub mod lifetime;
pub mod limits;
pub mod pb;
pub mod peer;
pub mod status;
pub mod trace;
