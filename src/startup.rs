//! Assembly: connect the store, migrate, wire the services, serve, and shut
//! down in order (stop taking calls → drain → flush usage and audit → close).

use std::{future::Future, net::SocketAddr, sync::Arc};

use anyhow::Context as _;
use tokio::{net::TcpListener, sync::watch, task::JoinHandle};
use tokio_stream::{StreamExt as _, wrappers::TcpListenerStream};
use tonic::transport::Server;
use tonic_health::{ServingStatus, server::HealthReporter};
use tower::ServiceBuilder;

use crate::{
    api::{
        self,
        auth::AdminAuth,
        key_admin::KeyAdminService,
        key_verify::KeyVerifyService,
        pb::{key_admin_server::KeyAdminServer, key_verify_server::KeyVerifyServer},
    },
    audit::writer::{self, AuditQueue, AuditWriter},
    cache::VerifyCache,
    config::{Secrets, Settings},
    service::{
        Deps,
        admin::{KeyChangeListener, KeyManager},
        hash_pool::HashPool,
        verify::Verifier,
    },
    store::{Store, StoreOptions},
    usage::UsageTracker,
};

/// Names under which grpc.health.v1 reports; "" is the whole server.
const HEALTH_SERVICES: [&str; 3] = ["", "keywarden.v1.KeyVerify", "keywarden.v1.KeyAdmin"];

/// A built, bound, not yet serving keywarden.
pub struct Application {
    settings: Settings,
    listener: TcpListener,
    store: Store,
    usage: Arc<UsageTracker>,
    audit: AuditQueue,
    audit_writer: AuditWriter,
    pool: HashPool,
    cache: Option<Arc<VerifyCache>>,
    admin: KeyAdminService,
    verify: KeyVerifyService,
    auth: AdminAuth,
}

impl std::fmt::Debug for Application {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Application")
            .field("listen", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

/// Handles on a running application, for tests and the benchmark.
#[derive(Debug, Clone)]
pub struct Probes {
    pub store: Store,
    pub pool: HashPool,
    pub audit: AuditQueue,
    pub usage: Arc<UsageTracker>,
    pub cache: Option<Arc<VerifyCache>>,
}

impl Application {
    pub async fn build(settings: Settings) -> anyhow::Result<Self> {
        let secrets = Secrets::resolve(&settings)?;
        let catalogue = Arc::new(settings.catalogue()?);
        let prefix = settings.key_prefix()?;
        if settings.database_url.is_none() {
            crate::config::create_private_dir(&settings.data_dir)
                .with_context(|| format!("creating data directory {}", settings.data_dir.display()))?;
        }
        let options =
            StoreOptions { max_connections: settings.db_max_connections, ..StoreOptions::default() };
        let store = Store::connect(&settings.database_url(), &options).await.with_context(|| {
            format!("connecting to {}", crate::store::redact_url(&settings.database_url()))
        })?;
        if settings.migrate_on_start {
            store.migrate().await.context("applying migrations")?;
        } else {
            store.check_schema().await?;
        }

        let pool =
            HashPool::new(settings.hash_workers(), settings.hash_queue).context("starting scrypt threads")?;
        let usage = UsageTracker::new(store.clone());
        let (audit, audit_writer) = writer::channel(store.clone(), &settings.audit());
        let cache = if settings.cache_enabled {
            Some(Arc::new(VerifyCache::new(&settings.cache()).context("seeding the cache secret")?))
        } else {
            tracing::warn!("verification cache disabled: every Verify runs scrypt");
            None
        };
        let deps = Deps {
            store: store.clone(),
            hasher: secrets.hasher,
            pool: pool.clone(),
            catalogue,
            prefix,
            usage: Arc::clone(&usage),
        };
        let mut listeners: Vec<Arc<dyn KeyChangeListener>> = Vec::new();
        if let Some(cache) = &cache {
            listeners.push(Arc::clone(cache) as Arc<dyn KeyChangeListener>);
        }
        let manager = KeyManager::new(deps.clone(), listeners);
        let verifier = Verifier::new(deps, audit.clone(), cache.clone());
        let listener = TcpListener::bind(settings.listen_addr)
            .await
            .with_context(|| format!("binding {}", settings.listen_addr))?;
        Ok(Self {
            auth: AdminAuth::new(&secrets.admin_tokens),
            admin: KeyAdminService::new(Arc::new(manager)),
            verify: KeyVerifyService::new(Arc::new(verifier)),
            settings,
            listener,
            store,
            usage,
            audit,
            audit_writer,
            pool,
            cache,
        })
    }

    pub fn local_addr(&self) -> SocketAddr {
        self.listener.local_addr().unwrap_or(self.settings.listen_addr)
    }

    pub fn probes(&self) -> Probes {
        Probes {
            store: self.store.clone(),
            pool: self.pool.clone(),
            audit: self.audit.clone(),
            usage: Arc::clone(&self.usage),
            cache: self.cache.clone(),
        }
    }

    /// Serves until `shutdown` resolves, then drains and flushes.
    pub async fn run_until_stopped(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let Self { settings, listener, store, usage, audit_writer, admin, verify, auth, .. } = self;
        let (stop_background, background_stopped) = watch::channel(false);
        let usage_task = tokio::spawn(Arc::clone(&usage).run(
            settings.usage_flush_interval(),
            stopped(background_stopped.clone()),
            settings.flush_timeout(),
        ));
        let audit_task =
            tokio::spawn(audit_writer.run(stopped(background_stopped), settings.flush_timeout()));

        let (health, health_service) = tonic_health::server::health_reporter();
        set_health(&health, ServingStatus::Serving).await;
        // grpcurl 1.8 only speaks v1alpha reflection; newer tools use v1.
        let reflection = || {
            tonic_reflection::server::Builder::configure()
                .register_encoded_file_descriptor_set(api::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_types::pb::FILE_DESCRIPTOR_SET)
        };
        let reflection_v1 = reflection().build_v1().context("building reflection v1")?;
        let reflection_v1alpha = reflection().build_v1alpha().context("building reflection v1alpha")?;

        let stack = ServiceBuilder::new()
            // Outermost: read the caller's W3C trace context before anything
            // runs, so every span and audit row of the call joins its trace.
            .layer(api::trace::TraceContextLayer)
            .into_inner();

        let (draining_tx, mut draining) = watch::channel(false);
        let signal = {
            let health = health.clone();
            async move {
                shutdown.await;
                tracing::info!("shutdown requested: no longer serving, draining in-flight calls");
                set_health(&health, ServingStatus::NotServing).await;
                let _ = draining_tx.send(true);
            }
        };
        // Small writes (one response at a time) must not wait for Nagle.
        let incoming = TcpListenerStream::new(listener).map(|conn| {
            conn.inspect(|stream| {
                let _ = stream.set_nodelay(true);
            })
        });
        let server = Server::builder()
            .layer(stack)
            .add_service(health_service)
            .add_service(reflection_v1)
            .add_service(reflection_v1alpha)
            .add_service(KeyVerifyServer::new(verify))
            .add_service(KeyAdminServer::with_interceptor(admin, auth))
            .serve_with_incoming_shutdown(incoming, signal);
        let grace = settings.shutdown_grace();
        let grace_over = async move {
            let _ = draining.wait_for(|d| *d).await;
            tokio::time::sleep(grace).await;
        };
        tokio::select! {
            served = server => served.context("serving gRPC")?,
            () = grace_over => tracing::warn!(grace_ms = grace.as_millis() as u64, "drain period over; abandoning calls still in flight"),
        }

        tracing::info!("flushing usage counts and audit rows");
        let _ = stop_background.send(true);
        let unwritten_usage = join("usage flusher", usage_task).await;
        let unwritten_audit = join("audit writer", audit_task).await;
        store.close().await;
        if unwritten_usage + unwritten_audit > 0 {
            anyhow::bail!(
                "stopped with {unwritten_audit} audit rows and usage of {unwritten_usage} keys unwritten \
                 (the database stayed unreachable for flush_timeout_ms)"
            );
        }
        tracing::info!("stopped");
        Ok(())
    }
}

async fn set_health(health: &HealthReporter, status: ServingStatus) {
    for service in HEALTH_SERVICES {
        health.set_service_status(service, status).await;
    }
}

async fn stopped(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// Waits for a flusher; returns what it could not write.
async fn join(what: &str, task: JoinHandle<usize>) -> usize {
    match task.await {
        Ok(unwritten) => unwritten,
        Err(e) => {
            tracing::error!(task = what, error = %e, "background task failed");
            1
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = term => {},
    }
}
