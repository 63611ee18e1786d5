//! A producer that survives its connection: it keeps every batch until the server answers it,
//! and after a lost connection, a server restart or an answer that takes too long from a
//! server gone silent, it connects again and re-sends every unanswered batch in order. The server's dedup (same producer id and
//! batch sequence number) turns the re-sends of batches it already took into plain
//! acknowledgements, so nothing is lost and nothing is counted twice.
//!
//! ```text
//!  send(seq, frame) ─► bounded queue ─► task: write on the lane, keep in `pending`
//!                                       answer ─► pop `pending` ─► answers channel
//!                                       lane lost / timeout ─► reconnect (backoff) ─► re-send `pending`
//! ```

use std::collections::VecDeque;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use events::wire::Buffer;
use tokio::sync::{Semaphore, mpsc};
use tracing::{debug, warn};

use crate::Error;
use crate::client::{Answer, ClientConfig, IngestClient, Lane};

/// Settings of a [`Producer`].
#[derive(Debug, Clone)]
pub struct ProducerConfig {
    /// The connection.
    pub client: ClientConfig,
    /// An unanswered batch older than this, on a connection that received nothing in the
    /// second half of that time, means the connection is stuck: reconnect and re-send. A
    /// server still sending is waited for up to four times this. Default 10 s, well above a
    /// healthy server's worst group commit.
    pub answer_timeout: Duration,
    /// First wait before reconnecting; doubles up to `max_backoff`. Default 50 ms.
    pub backoff: Duration,
    /// Longest wait between reconnection attempts. Default 2 s.
    pub max_backoff: Duration,
    /// How long one connection attempt (handshake and stream) may take. Default 5 s: a
    /// handshake to a server that is down would otherwise wait out QUIC's idle timeout.
    pub connect_timeout: Duration,
}

impl ProducerConfig {
    /// Defaults around a client configuration.
    pub fn new(client: ClientConfig) -> Self {
        Self {
            client,
            answer_timeout: Duration::from_secs(10),
            backoff: Duration::from_millis(50),
            max_backoff: Duration::from_secs(2),
            connect_timeout: Duration::from_secs(5),
        }
    }
}

struct Frame {
    seq: u64,
    bytes: Buffer,
    sent: Instant,
}

/// What a producer did, returned by [`Producer::finish`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProducerStats {
    /// Connections made (1 without failures).
    pub connections: u64,
    /// Batches written again after a reconnect.
    pub resent: u64,
    /// Batches still unanswered when the producer gave up.
    pub unanswered: u64,
}

/// Sends batches reliably; see the module docs.
#[derive(Debug)]
pub struct Producer {
    tx: mpsc::Sender<Frame>,
    window: Arc<Semaphore>,
    task: tokio::task::JoinHandle<ProducerStats>,
    current: CurrentConnection,
}

/// The connection the producer sends on now, for streams that share it (queue consumers).
type CurrentConnection = Arc<std::sync::Mutex<Option<quinn::Connection>>>;

fn set_current(current: &CurrentConnection, conn: Option<quinn::Connection>) {
    if let Ok(mut c) = current.lock() {
        *c = conn;
    }
}

impl Producer {
    /// Starts a producer for `addr`; answers arrive on the returned channel in send order. The
    /// first connection is made before this returns.
    pub async fn connect(addr: SocketAddr, cfg: ProducerConfig) -> Result<(Self, mpsc::Receiver<Answer>), Error> {
        let window_size = cfg.client.max_inflight_per_lane.max(1);
        let client = IngestClient::connect(addr, &cfg.client).await?;
        let (lane, answers) = client.open_lane().await?;
        let (tx, rx) = mpsc::channel(window_size);
        let (out_tx, out_rx) = mpsc::channel(window_size);
        let window = Arc::new(Semaphore::new(window_size));
        let current: CurrentConnection = Arc::new(std::sync::Mutex::new(Some(client.connection().clone())));
        let worker = Worker {
            current: current.clone(),
            addr,
            cfg,
            conn: Some((client, lane, answers)),
            pending: VecDeque::new(),
            watch: None,
            out: out_tx,
            window: window.clone(),
            stats: ProducerStats { connections: 1, ..ProducerStats::default() },
        };
        let task = tokio::spawn(worker.run(rx));
        Ok((Self { tx, window, task, current }, out_rx))
    }

    /// Consumes a queue on the producer's current connection (a drone gateway takes its
    /// drones' commands on the connection it sends their telemetry on). The consumer ends when
    /// that connection does; call again to consume on the next one.
    pub async fn consume(
        &self,
        queue: events::QueueName,
        keys: events::KeyRange,
        max_unsettled: u16,
    ) -> Result<crate::QueueConsumer, Error> {
        let conn = self.current.lock().ok().and_then(|c| c.clone()).ok_or(Error::Closed)?;
        crate::QueueConsumer::open(&conn, queue, keys, max_unsettled).await
    }

    /// Queues one encoded batch frame (kept, not copied, until answered); waits while `max_inflight_per_lane` batches are
    /// unanswered.
    pub async fn send(&self, seq: u64, bytes: Buffer) -> Result<(), Error> {
        let permit = self.window.acquire().await.map_err(|_| Error::Closed)?;
        permit.forget();
        self.tx.send(Frame { seq, bytes, sent: Instant::now() }).await.map_err(|_| Error::Closed)
    }

    /// Stops taking batches and waits until every sent one is answered, or `deadline` passes.
    pub async fn finish(self, deadline: Duration) -> ProducerStats {
        drop(self.tx);
        let abort = self.task.abort_handle();
        match tokio::time::timeout(deadline, self.task).await {
            Ok(Ok(stats)) => stats,
            _ => {
                abort.abort();
                ProducerStats { unanswered: u64::MAX, ..ProducerStats::default() }
            }
        }
    }
}

/// What the connection had received when a late batch began to be watched.
#[derive(Debug, Clone, Copy)]
struct Watch {
    seq: u64,
    received: u64,
    since: Instant,
}

struct Worker {
    current: CurrentConnection,
    addr: SocketAddr,
    cfg: ProducerConfig,
    conn: Option<(IngestClient, Lane, mpsc::Receiver<Answer>)>,
    pending: VecDeque<Frame>,
    /// The oldest pending batch, watched for signs of life once it is late.
    watch: Option<Watch>,
    out: mpsc::Sender<Answer>,
    window: Arc<Semaphore>,
    stats: ProducerStats,
}

impl Worker {
    async fn run(mut self, mut rx: mpsc::Receiver<Frame>) -> ProducerStats {
        let mut input_open = true;
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        loop {
            if !input_open && self.pending.is_empty() {
                break;
            }
            if self.conn.is_none() {
                self.reconnect().await;
                continue;
            }
            let Some((_, lane, answers)) = self.conn.as_mut() else { continue };
            // Answers first: an answer already here is never taken for a timeout, however long
            // this task waited to run.
            tokio::select! {
                biased;
                answer = answers.recv() => match answer {
                    Some(answer) => self.answered(answer).await,
                    None => self.drop_connection("answer stream ended"),
                },
                frame = rx.recv(), if input_open => match frame {
                    Some(mut frame) => {
                        frame.sent = Instant::now();
                        let ok = lane.send(&frame.bytes).await.is_ok();
                        self.pending.push_back(frame);
                        if !ok {
                            self.drop_connection("write failed");
                        }
                    }
                    None => input_open = false,
                },
                _ = tick.tick() => self.check_answer_time(),
            }
        }
        if let Some((client, lane, _)) = self.conn.take() {
            lane.finish();
            client.close().await;
        }
        self.stats.unanswered = self.pending.len() as u64;
        self.stats
    }

    async fn answered(&mut self, answer: Answer) {
        let Some(front) = self.pending.front() else {
            warn!(batch_seq = answer.batch_seq, "answer for no pending batch");
            return;
        };
        if front.seq != answer.batch_seq {
            warn!(expected = front.seq, got = answer.batch_seq, "answer out of order; reconnecting");
            self.drop_connection("answer out of order");
            return;
        }
        if let Err(e) = &answer.result
            && e.is_retryable()
        {
            // The batch was fine; the server could not take it now. Try again elsewhere/later.
            debug!(error = %e, "retryable refusal; reconnecting");
            self.drop_connection("server refused for now");
            return;
        }
        self.pending.pop_front();
        self.window.add_permits(1);
        let _ = self.out.send(answer).await;
    }

    /// Gives the connection up when its oldest batch has gone unanswered for `answer_timeout`
    /// and the server has sent nothing at all in the second half of that time. A server that
    /// is sending (acknowledging packets, answering keep-alives) is alive and working through
    /// a backlog: reconnecting would re-send every pending batch and add a TLS handshake to
    /// its load, the reconnect storm of a fleet facing a busy server. It is waited for, up to
    /// four timeouts; a server gone silent, or one that stays alive without answering that
    /// long, is left.
    fn check_answer_time(&mut self) {
        let (Some(front), Some((client, ..))) = (self.pending.front(), &self.conn) else {
            self.watch = None;
            return;
        };
        let waited = front.sent.elapsed();
        let timeout = self.cfg.answer_timeout;
        if waited < timeout / 2 {
            self.watch = None;
            return;
        }
        let received = client.connection().stats().udp_rx.datagrams;
        match self.watch {
            Some(w) if w.seq == front.seq => {
                if w.since.elapsed() < timeout / 2 {
                    return;
                }
                if received > w.received && waited < timeout * 4 {
                    debug!(
                        seq = front.seq,
                        waited_ms = waited.as_millis() as u64,
                        "answer late from a live server; waiting"
                    );
                    self.watch = Some(Watch { seq: front.seq, received, since: Instant::now() });
                } else {
                    self.watch = None;
                    self.drop_connection("answer timed out");
                }
            }
            _ => self.watch = Some(Watch { seq: front.seq, received, since: Instant::now() }),
        }
    }

    fn drop_connection(&mut self, why: &str) {
        set_current(&self.current, None);
        if let Some((client, _, _)) = self.conn.take() {
            warn!(addr = %self.addr, why, pending = self.pending.len(), "ingest connection lost; will reconnect and re-send");
            client.connection().close(quinn::VarInt::from_u32(0), b"reconnecting");
        }
    }

    async fn reconnect(&mut self) {
        let mut backoff = self.cfg.backoff;
        loop {
            let attempt = async {
                let client = IngestClient::connect(self.addr, &self.cfg.client).await?;
                let (lane, answers) = client.open_lane().await?;
                Ok::<_, Error>((client, lane, answers))
            };
            match tokio::time::timeout(self.cfg.connect_timeout, attempt).await {
                Ok(Ok((client, mut lane, answers))) => {
                    let mut ok = true;
                    for frame in &mut self.pending {
                        frame.sent = Instant::now();
                        if lane.send(&frame.bytes).await.is_err() {
                            ok = false;
                            break;
                        }
                        self.stats.resent += 1;
                    }
                    if ok {
                        set_current(&self.current, Some(client.connection().clone()));
                        self.stats.connections += 1;
                        self.conn = Some((client, lane, answers));
                        return;
                    }
                }
                Ok(Err(e)) => debug!(error = %e, "reconnecting failed"),
                Err(_) => debug!("reconnecting timed out"),
            }
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(self.cfg.max_backoff);
        }
    }
}
