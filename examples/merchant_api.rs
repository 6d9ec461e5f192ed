//! A merchant-facing invoice API that verifies keywarden keys with
//! `keywarden-client`'s tower layer (docs/client.md).
//!
//! ```text
//! cargo run --release -- serve                       # keywarden, on 127.0.0.1:50051
//! cargo run --example merchant_api                   # this service, on 127.0.0.1:8080
//! curl -H "authorization: Bearer sntr_…" -d '{"amount_cents": 1200}' http://127.0.0.1:8080/invoices
//! ```
//!
//! `KEYWARDEN_VERIFY_URL` and `LISTEN_ADDR` override the two addresses.
//! Handlers never see the key: they take the grant keywarden gave
//! (`Extension<Grant>`), and the layer reports each answer's status to the
//! request's audit row.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{Arc, Mutex, PoisonError},
};

use axum::{
    Extension, Json, Router,
    extract::State,
    http::{Method, StatusCode},
    routing::get,
};
use keywarden_client::{Client, Grant, Requirement, VerifyLayer};
use serde_json::{Value, json};

/// What each route needs: the service's half of the contract. Anything
/// else is refused before keywarden is asked.
pub fn requirement(method: &Method, path: &str) -> Requirement {
    match (method.as_str(), path) {
        ("POST", "/invoices") => Requirement::scope("invoice:write"),
        ("GET", "/invoices") => Requirement::scope("invoice:read"),
        ("GET", "/whoami") => Requirement::AnyValidKey,
        _ => Requirement::NoRoute,
    }
}

/// Invoices by merchant, in memory.
#[derive(Clone, Default)]
pub struct Invoices(Arc<Mutex<HashMap<String, Vec<Value>>>>);

/// The service: its routes behind the keywarden layer.
pub fn app(keywarden: Client, invoices: Invoices) -> Router {
    Router::new()
        .route("/invoices", get(list_invoices).post(create_invoice))
        .route("/whoami", get(whoami))
        .with_state(invoices)
        .layer(VerifyLayer::new(keywarden, requirement))
}

async fn create_invoice(
    State(invoices): State<Invoices>,
    Extension(grant): Extension<Grant>,
    Json(body): Json<Value>,
) -> (StatusCode, Json<Value>) {
    let Some(amount) = body["amount_cents"].as_i64().filter(|a| *a > 0) else {
        let error = json!({ "error": "amount_cents must be a positive integer" });
        return (StatusCode::UNPROCESSABLE_ENTITY, Json(error));
    };
    let mut all = invoices.0.lock().unwrap_or_else(PoisonError::into_inner);
    let mine = all.entry(grant.merchant_id.clone()).or_default();
    let invoice = json!({
        "id": format!("inv_{}", mine.len() + 1),
        "merchant_id": grant.merchant_id,
        "amount_cents": amount,
        "created_by_key": grant.key_id,
        "audit_id": grant.audit_id,
    });
    mine.push(invoice.clone());
    (StatusCode::CREATED, Json(invoice))
}

async fn list_invoices(State(invoices): State<Invoices>, Extension(grant): Extension<Grant>) -> Json<Value> {
    let all = invoices.0.lock().unwrap_or_else(PoisonError::into_inner);
    Json(json!({ "invoices": all.get(&grant.merchant_id).cloned().unwrap_or_default() }))
}

async fn whoami(Extension(grant): Extension<Grant>) -> Json<Value> {
    Json(json!({
        "merchant_id": grant.merchant_id,
        "key_id": grant.key_id,
        "key_name": grant.key_name,
        "scopes": grant.scopes,
        "audit_id": grant.audit_id,
        "metadata": grant.metadata,
    }))
}

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let verify_url =
        std::env::var("KEYWARDEN_VERIFY_URL").unwrap_or_else(|_| "http://127.0.0.1:50051".into());
    let listen = std::env::var("LISTEN_ADDR").unwrap_or_else(|_| "127.0.0.1:8080".into());
    let keywarden =
        Client::builder(tonic::transport::Endpoint::from_shared(verify_url.clone())?).connect_lazy();
    let listener = tokio::net::TcpListener::bind(&listen).await?;
    println!("merchant API on http://{listen}, verifying keys at {verify_url}");
    // The peer address is what IP-limited keys are judged on.
    let service =
        app(keywarden.clone(), Invoices::default()).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, service)
        .with_graceful_shutdown(async {
            let _ = tokio::signal::ctrl_c().await;
        })
        .await?;
    // The last answers' statuses reach their audit rows before exit.
    keywarden.flush().await;
    Ok(())
}
