//! Each server endpoint's receive loop on a thread of its own.
//!
//! quinn drives an endpoint with one task that reads its UDP socket and hands every datagram
//! to the task of its connection. On the server's shared runtime that task waits its turn
//! behind every runnable connection task, and it gives its turn back after 50 µs of reading.
//! With ten thousand connections that wait outgrew the socket's buffer: datagrams were
//! dropped by the kernel, streams stalled on retransmissions, answers came late, clients gave
//! their connections up and reconnected (each a new TLS handshake, more work), and the
//! connections they left were refused at `max_connections` until they timed out: a storm the
//! server did not recover from (`BENCHMARKS.md`, 10,000 connections).
//!
//! Here the endpoint's driver is the only task of a current-thread runtime on its own thread
//! (`quic-endpoint`), so it is polled as soon as its socket is readable, and the socket is
//! registered with that runtime's reactor. Connection tasks and their timers stay on the
//! caller's runtime: the crypto and the streams still share its workers, only the draining of
//! the socket no longer queues behind them.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::Error;

/// A [`quinn::Runtime`] for one endpoint: the first task spawned (quinn spawns the endpoint
/// driver first, when the endpoint is made, and only connection drivers after it) runs on a
/// thread of its own; everything else on the runtime it was made in.
#[derive(Debug)]
pub struct EndpointThread {
    io: tokio::runtime::Handle,
    main: tokio::runtime::Handle,
    driver_spawned: AtomicBool,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
}

impl EndpointThread {
    /// Starts the thread. Must be called inside a tokio runtime (the one connections run on).
    pub fn start(name: &str) -> Result<Arc<Self>, Error> {
        let main = tokio::runtime::Handle::try_current()
            .map_err(|_| Error::Config("the QUIC server must be bound inside a tokio runtime".into()))?;
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(|e| Error::Config(format!("starting the {name} thread: {e}")))?;
        let io = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                let _ = rt.block_on(stopped);
                // Whatever is left (a driver whose endpoint is gone) is dropped with the runtime.
                drop(rt);
            })
            .map_err(|e| Error::Config(format!("starting the {name} thread: {e}")))?;
        Ok(Arc::new(Self { io, main, driver_spawned: AtomicBool::new(false), stop: Some(stop) }))
    }
}

impl Drop for EndpointThread {
    fn drop(&mut self) {
        // The last holder is the endpoint's driver (or a connection outliving it): its thread
        // has nothing left to run.
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

impl quinn::Runtime for EndpointThread {
    fn new_timer(&self, i: std::time::Instant) -> Pin<Box<dyn quinn::AsyncTimer>> {
        quinn::TokioRuntime.new_timer(i)
    }

    fn spawn(&self, future: Pin<Box<dyn Future<Output = ()> + Send>>) {
        if self.driver_spawned.swap(true, Ordering::AcqRel) {
            self.main.spawn(future);
        } else {
            self.io.spawn(future);
        }
    }

    fn wrap_udp_socket(&self, socket: std::net::UdpSocket) -> std::io::Result<Arc<dyn quinn::AsyncUdpSocket>> {
        // Readiness of the socket is then seen by the endpoint thread's own reactor.
        let _in_io = self.io.enter();
        quinn::TokioRuntime.wrap_udp_socket(socket)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Guards the assumption [`EndpointThread`] rests on: quinn spawns an endpoint's driver
    /// when the endpoint is made, before anything else, so it lands on the endpoint thread and
    /// nothing of it on the caller's runtime. A quinn that spawned lazily, or something else
    /// first, would put the socket's reader back behind the connections and fail here.
    #[tokio::test]
    async fn the_endpoint_driver_runs_on_the_endpoint_thread() {
        let rt = EndpointThread::start("quic-test").unwrap(); // ok: test code
        let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap(); // ok: test code
        let caller = tokio::runtime::Handle::current();
        let before = caller.metrics().num_alive_tasks();
        let endpoint = quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, rt.clone()).unwrap(); // ok: test code
        assert_eq!(rt.io.metrics().num_alive_tasks(), 1, "the driver is the endpoint thread's one task");
        assert_eq!(caller.metrics().num_alive_tasks(), before, "nothing of the endpoint on the caller's runtime");
        assert!(rt.driver_spawned.load(Ordering::Acquire));
        endpoint.close(0u32.into(), b"done");
        drop(endpoint);
    }
}
