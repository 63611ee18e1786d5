//! The UDP sockets under every QUIC endpoint, with kernel buffers sized for the traffic.
//!
//! A UDP socket drops whatever arrives while its receive buffer is full, and QUIC reads every
//! drop as congestion: the stream behind the lost packet waits for its retransmission (up to a
//! probe timeout, tens of milliseconds) and the sender's congestion window shrinks. Linux's
//! usual default buffer (208 KiB) holds about 2 ms of a 100 MB/s stream, which QUIC sends in
//! bursts of up to 64 datagrams (GSO), so a reader descheduled for longer than that loses
//! packets: about 4,000 per 20 s at 1.23 M events/s, none with 4 MiB. Endpoints that receive a
//! lot (a server, a subscriber) ask for [`DEFAULT_UDP_BUFFER_BYTES`]. The kernel grants at most
//! `net.core.rmem_max` / `net.core.wmem_max`; a smaller grant is logged once, naming the
//! setting to raise.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use socket2::{Domain, Protocol, Socket, Type};
use tracing::warn;

use crate::Error;

/// Default size asked for each QUIC socket's receive and send buffers, bytes: 4 MiB, about
/// 40 ms of a 100 MB/s stream (the telemetry of a million events per second).
pub const DEFAULT_UDP_BUFFER_BYTES: usize = 4 << 20;

static WARNED: AtomicBool = AtomicBool::new(false);

/// A bound UDP socket with receive and send buffers of (up to) `buffer_bytes` each; 0 keeps the
/// system's defaults. An IPv6 address gets a dual-stack socket where the system allows it.
/// `shared`: the socket joins the others bound to the same address with `SO_REUSEPORT`, and the
/// kernel spreads incoming datagrams over them by the sender's address (Unix only).
pub fn bind(addr: SocketAddr, buffer_bytes: usize, shared: bool) -> Result<std::net::UdpSocket, Error> {
    let bind_err = |e| Error::Bind(addr, e);
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(bind_err)?;
    if shared {
        #[cfg(unix)]
        socket.set_reuse_port(true).map_err(bind_err)?;
        #[cfg(not(unix))]
        return Err(Error::Config("several ingest sockets need SO_REUSEPORT, which only Unix systems have".into()));
    }
    if addr.is_ipv6() {
        // Best effort: some systems refuse dual-stack sockets.
        let _ = socket.set_only_v6(false);
    }
    if buffer_bytes > 0 {
        socket.set_recv_buffer_size(buffer_bytes).map_err(bind_err)?;
        socket.set_send_buffer_size(buffer_bytes).map_err(bind_err)?;
        // Linux reports twice what it grants (the other half is its bookkeeping).
        let recv = socket.recv_buffer_size().map_err(bind_err)?;
        let send = socket.send_buffer_size().map_err(bind_err)?;
        if (recv < buffer_bytes || send < buffer_bytes) && !WARNED.swap(true, Ordering::Relaxed) {
            warn!(
                asked = buffer_bytes,
                receive = recv,
                send,
                "the kernel granted smaller UDP buffers than asked; under load QUIC loses packets and \
                 latency suffers: raise net.core.rmem_max and net.core.wmem_max (sysctl) to at least the \
                 asked size"
            );
        }
    }
    socket.bind(&addr.into()).map_err(bind_err)?;
    Ok(socket.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_asked_for_and_the_socket_is_bound() {
        let socket = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 1 << 20, false).expect("bind"); // ok: test code
        let addr = socket.local_addr().expect("local address"); // ok: test code
        assert_ne!(addr.port(), 0);
        let s = Socket::from(socket);
        // The kernel grants what was asked up to its cap (and reports twice the grant).
        let cap =
            std::fs::read_to_string("/proc/sys/net/core/rmem_max").ok().and_then(|s| s.trim().parse::<usize>().ok());
        let granted = s.recv_buffer_size().expect("receive buffer"); // ok: test code
        if let Some(cap) = cap {
            assert!(granted >= (1 << 20).min(cap), "granted {granted}, cap {cap}");
        }
    }

    #[test]
    fn a_taken_address_is_a_bind_error_naming_it() {
        let first = bind(SocketAddr::from(([127, 0, 0, 1], 0)), 0, false).expect("bind"); // ok: test code
        let addr = first.local_addr().expect("local address"); // ok: test code
        match bind(addr, 0, false) {
            Err(Error::Bind(at, _)) => assert_eq!(at, addr),
            other => panic!("expected a bind error, got {other:?}"),
        }
    }
}
