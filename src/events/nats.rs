//! Delivery to NATS JetStream: subject `keywarden.events.<type>`, header
//! `Nats-Msg-Id` = the event id (so JetStream drops a redelivery within its
//! duplicate window), delivered only when JetStream acknowledges it.

use std::time::Duration;

use async_nats::jetstream::{self, message::PublishMessage, stream};

use crate::config::NatsSettings;

/// Subjects of lifecycle events: `keywarden.events.key.revoked`, ...
pub const SUBJECT_PREFIX: &str = "keywarden.events.";
/// The duplicate window of a stream this service creates: well past a
/// lease's takeover, so a replica that published and died before recording
/// it is de-duplicated when its successor publishes again.
pub const DUPLICATE_WINDOW: Duration = Duration::from_secs(600);

/// A JetStream publisher, connected on first use and again after a failure.
#[derive(Debug)]
pub struct NatsSink {
    settings: NatsSettings,
    context: Option<jetstream::Context>,
}

impl NatsSink {
    pub fn new(settings: NatsSettings) -> Self {
        Self { settings, context: None }
    }

    async fn context(&mut self) -> Result<&jetstream::Context, String> {
        if self.context.is_none() {
            let context = connect(&self.settings).await?;
            self.context = Some(context);
        }
        self.context.as_ref().ok_or_else(|| "not connected".to_owned())
    }

    /// Publishes one event and waits for JetStream's acknowledgement.
    pub async fn publish(&mut self, kind: &str, id: &str, body: &str) -> Result<(), String> {
        let subject = format!("{SUBJECT_PREFIX}{kind}");
        let context = self.context().await?;
        let message = PublishMessage::build().payload(body.to_owned().into()).message_id(id);
        let acked = async { context.send_publish(subject, message).await?.await }.await;
        match acked {
            Ok(_) => Ok(()),
            Err(e) => {
                // Start again from a fresh connection next time.
                self.context = None;
                Err(format!("JetStream publish: {e}"))
            }
        }
    }
}

async fn connect(settings: &NatsSettings) -> Result<jetstream::Context, String> {
    let mut options = async_nats::ConnectOptions::new()
        .name("keywarden")
        .connection_timeout(Duration::from_secs(5))
        .require_tls(settings.require_tls);
    if let Some(file) = &settings.creds_file {
        options = options
            .credentials_file(file)
            .await
            .map_err(|e| format!("events_nats_creds_file {}: {e}", file.display()))?;
    }
    if let Some(token) = &settings.token {
        options = options.token(secrecy::ExposeSecret::expose_secret(token).to_owned());
    }
    if let (Some(user), Some(password)) = (&settings.user, &settings.password) {
        options = options
            .user_and_password(user.clone(), secrecy::ExposeSecret::expose_secret(password).to_owned());
    }
    if let Some(ca) = &settings.tls_ca_file {
        options = options.add_root_certificates(ca.clone());
    }
    if let (Some(cert), Some(key)) = (&settings.tls_cert_file, &settings.tls_key_file) {
        options = options.add_client_certificate(cert.clone(), key.clone());
    }
    let client = options.connect(settings.url.as_str()).await.map_err(|e| format!("NATS connect: {e}"))?;
    let context = jetstream::new(client);
    context
        .get_or_create_stream(stream::Config {
            name: settings.stream.clone(),
            subjects: vec![format!("{SUBJECT_PREFIX}>")],
            duplicate_window: DUPLICATE_WINDOW,
            ..Default::default()
        })
        .await
        .map_err(|e| format!("JetStream stream {}: {e}", settings.stream))?;
    Ok(context)
}
