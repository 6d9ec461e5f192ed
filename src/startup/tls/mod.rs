//! The transport: TCP listeners, optionally TLS (1.2 and 1.3, ring), with
//! certificate, key and client CA re-read when their files change.
//!
//! A reload swaps the configuration that *new* handshakes use; established
//! connections keep the session they negotiated, so rotation drops nothing.
//! Files that do not load leave the previous configuration in place (logged
//! and counted), so a half-written Secret never takes the service down.
//!
//! Connections are bounded ([`ConnLimits`]): in number per listener and per
//! client address, in the time a new one may take to send its first bytes
//! (TLS handshake and HTTP/2 preface), and in how long one may stay open
//! with no call in flight. Otherwise idle sockets that never speak would
//! hold every slot, and new callers would wait past their deadlines.

use std::{
    collections::HashMap,
    future::Future,
    io,
    net::{IpAddr, SocketAddr},
    pin::Pin,
    sync::{Arc, Mutex},
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    net::{TcpListener, TcpStream},
    sync::{OwnedSemaphorePermit, Semaphore, mpsc},
    time::{Instant, Sleep},
};
use tokio_rustls::{TlsAcceptor, server::TlsStream};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use crate::{
    api::peer::{ActiveStreams, PeerInfo, identity_of},
    metrics::Metrics,
};

/// The HTTP/2 client preface's length: until this much has arrived, a
/// connection is still in its handshake.
const PREFACE_LEN: u64 = 24;
/// Pause after a failed `accept` (e.g. out of file descriptors), so the loop
/// does not spin while the condition lasts.
const ACCEPT_BACKOFF: Duration = Duration::from_millis(50);

mod source;

pub use source::{Audience, TlsError, TlsSource, provider};

/// One accepted connection, plaintext or TLS, with its peer. It holds one
/// of the listener's connection slots, and one of its address's, until it
/// closes.
pub struct Conn {
    io: Io,
    peer: PeerInfo,
    deadline: Deadline,
    _slot: OwnedSemaphorePermit,
    _address: Option<AddressSlot>,
}

/// What bounds a listener's connections.
#[derive(Debug, Clone, Copy)]
pub struct ConnLimits {
    /// Open at once, handshakes included.
    pub max_connections: usize,
    /// Open at once from one client address; 0: no cap.
    pub per_address: usize,
    /// From accept to the end of the TLS handshake and the HTTP/2 preface.
    pub handshake_timeout: Duration,
    /// With no call in flight; `None`: no limit.
    pub idle_timeout: Option<Duration>,
}

/// When a connection is closed for silence: until the preface has arrived,
/// the handshake timeout from accept; afterwards, the idle timeout from
/// the end of its last call. Checked only when a read would wait, and the
/// timer is moved only when it fires, so a busy connection pays one
/// counter update per read.
struct Deadline {
    limits: ConnLimits,
    preface_read: u64,
    streams: Arc<ActiveStreams>,
    timer: Pin<Box<Sleep>>,
}

impl Deadline {
    fn new(limits: ConnLimits, accepted: Instant, streams: Arc<ActiveStreams>) -> Self {
        let timer = Box::pin(tokio::time::sleep_until(accepted + limits.handshake_timeout));
        Self { limits, preface_read: 0, streams, timer }
    }

    fn read(&mut self, n: usize) {
        if self.preface_read < PREFACE_LEN {
            self.preface_read += n as u64;
        }
    }

    /// Registers the timer with `cx`; an error once the connection is due
    /// to close.
    fn poll_expired(&mut self, cx: &mut Context<'_>) -> Option<io::Error> {
        loop {
            if self.timer.as_mut().poll(cx).is_pending() {
                return None;
            }
            if self.preface_read < PREFACE_LEN {
                return Some(io::Error::new(
                    io::ErrorKind::TimedOut,
                    "no HTTP/2 preface within the handshake timeout",
                ));
            }
            let now = Instant::now();
            let next = match (self.limits.idle_timeout, self.streams.idle_since()) {
                // Nothing closes it: look again in a while.
                (None, _) => now + Duration::from_secs(3_600),
                (Some(idle), None) => now + idle,
                (Some(idle), Some(since)) => {
                    let due = Instant::from_std(since) + idle;
                    if due <= now {
                        return Some(io::Error::new(io::ErrorKind::TimedOut, "idle connection closed"));
                    }
                    due
                }
            };
            self.timer.as_mut().reset(next);
        }
    }
}

/// Connections open per client address, bounded by a cap.
#[derive(Debug)]
struct AddressSlots {
    open: Mutex<HashMap<IpAddr, usize>>,
    cap: usize,
}

impl AddressSlots {
    /// A slot for `ip`, or `None` when it holds the cap already.
    fn take(self: &Arc<Self>, ip: IpAddr) -> Option<AddressSlot> {
        let mut open = self.open.lock().unwrap_or_else(|e| e.into_inner());
        let count = open.entry(ip).or_insert(0);
        if *count >= self.cap {
            return None;
        }
        *count += 1;
        Some(AddressSlot { slots: Arc::clone(self), ip })
    }
}

/// One connection's place in its address's count.
struct AddressSlot {
    slots: Arc<AddressSlots>,
    ip: IpAddr,
}

impl Drop for AddressSlot {
    fn drop(&mut self) {
        let mut open = self.slots.open.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(count) = open.get_mut(&self.ip) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.ip);
            }
        }
    }
}

enum Io {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl Connected for Conn {
    type ConnectInfo = PeerInfo;

    fn connect_info(&self) -> PeerInfo {
        self.peer.clone()
    }
}

impl AsyncRead for Conn {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        let before = buf.filled().len();
        let polled = match &mut this.io {
            Io::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        };
        match polled {
            Poll::Ready(Ok(())) => {
                this.deadline.read(buf.filled().len() - before);
                Poll::Ready(Ok(()))
            }
            Poll::Pending => match this.deadline.poll_expired(cx) {
                Some(expired) => Poll::Ready(Err(expired)),
                None => Poll::Pending,
            },
            failed => failed,
        }
    }
}

impl AsyncWrite for Conn {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.io {
            Io::Plain(s) => s.is_write_vectored(),
            Io::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_flush(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().io {
            Io::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Io::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Connections accepted on `listener`, handshaken with `tls` when given.
/// Handshakes run concurrently, off the accept loop, so a slow or hostile
/// client cannot hold up others. At most `limits.max_connections` are open
/// at once, handshakes included: past that, new clients wait in the
/// kernel's backlog rather than cost memory here; and at most
/// `limits.per_address` from one address, past which a new one is closed
/// at once (counted). A connection is accepted only when the server can
/// take it at once, and accepting stops (the listener closes) as soon as
/// `stop` resolves (the drain starts): a client connecting then is refused
/// and tries another replica, rather than being accepted and then reset
/// when the process exits.
pub fn incoming(
    listener: TcpListener,
    tls: Option<(Arc<TlsSource>, Audience)>,
    limits: ConnLimits,
    metrics: Arc<Metrics>,
    stop: impl Future<Output = ()> + Send + 'static,
) -> ReceiverStream<io::Result<Conn>> {
    let (tx, rx) = mpsc::channel::<io::Result<Conn>>(1);
    let open = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let addresses = (limits.per_address > 0)
        .then(|| Arc::new(AddressSlots { open: Mutex::default(), cap: limits.per_address }));
    tokio::spawn(async move {
        tokio::pin!(stop);
        loop {
            let room = tokio::select! {
                () = &mut stop => return,
                permit = Arc::clone(&open).acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return,
                },
            };
            // Plaintext: hold a slot before accepting, so that a connection
            // is only accepted when the server takes it at once. (TLS
            // connections take their slot after the handshake.)
            let slot = match &tls {
                None => tokio::select! {
                    () = &mut stop => return,
                    permit = tx.clone().reserve_owned() => match permit {
                        Ok(p) => Slot::Plain(p),
                        Err(_) => return,
                    },
                },
                Some((tls, audience)) => Slot::AfterHandshake(Arc::clone(tls), *audience),
            };
            let (stream, addr, address) = loop {
                let accepted = tokio::select! {
                    () = &mut stop => return,
                    () = tx.closed() => return,
                    accepted = listener.accept() => accepted,
                };
                let (stream, addr) = match accepted {
                    Ok(a) => a,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed; retrying");
                        tokio::time::sleep(ACCEPT_BACKOFF).await;
                        continue;
                    }
                };
                let address = match &addresses {
                    None => None,
                    Some(slots) => match slots.take(addr.ip()) {
                        Some(taken) => Some(taken),
                        // Closed at once: this address holds its share.
                        None => {
                            metrics.connections_refused_per_address.inc();
                            drop(stream);
                            continue;
                        }
                    },
                };
                break (stream, addr, address);
            };
            let accepted_at = Instant::now();
            // Small writes (one response at a time) must not wait for Nagle.
            let _ = stream.set_nodelay(true);
            let streams = Arc::new(ActiveStreams::new(accepted_at.into_std()));
            let deadline = Deadline::new(limits, accepted_at, Arc::clone(&streams));
            match slot {
                Slot::Plain(permit) => {
                    let peer = PeerInfo { addr: Some(addr), identity: None, streams: Some(streams) };
                    permit.send(Ok(Conn {
                        io: Io::Plain(stream),
                        peer,
                        deadline,
                        _slot: room,
                        _address: address,
                    }));
                }
                Slot::AfterHandshake(tls, audience) => {
                    // The configuration current now, after any reload.
                    let acceptor = tls.acceptor(audience);
                    let tx = tx.clone();
                    let metrics = Arc::clone(&metrics);
                    tokio::spawn(async move {
                        let opened = Opened { addr, room, address, deadline, streams };
                        match handshake(acceptor, stream, opened, limits.handshake_timeout).await {
                            Ok(conn) => {
                                let _ = tx.send(Ok(conn)).await;
                            }
                            Err(e) => {
                                metrics.tls_handshake_failures.inc();
                                tracing::debug!(peer = %addr, error = %e, "TLS handshake failed");
                            }
                        }
                    });
                }
            }
        }
    });
    ReceiverStream::new(rx)
}

/// Where an accepted connection goes: into the slot held for it
/// (plaintext), or through a TLS handshake that then waits for one.
enum Slot {
    Plain(mpsc::OwnedPermit<io::Result<Conn>>),
    AfterHandshake(Arc<TlsSource>, Audience),
}

/// What a connection holds from its accept on.
struct Opened {
    addr: SocketAddr,
    room: OwnedSemaphorePermit,
    address: Option<AddressSlot>,
    deadline: Deadline,
    streams: Arc<ActiveStreams>,
}

async fn handshake(
    acceptor: TlsAcceptor,
    stream: TcpStream,
    opened: Opened,
    timeout: Duration,
) -> io::Result<Conn> {
    let tls = tokio::time::timeout(timeout, acceptor.accept(stream))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "handshake timed out"))??;
    let identity = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| identity_of(leaf.as_ref()));
    let Opened { addr, room, address, deadline, streams } = opened;
    let peer = PeerInfo { addr: Some(addr), identity, streams: Some(streams) };
    Ok(Conn { io: Io::Tls(Box::new(tls)), peer, deadline, _slot: room, _address: address })
}
