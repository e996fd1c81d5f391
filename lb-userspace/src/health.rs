//! Backend health checking: a pure per-backend state machine ([`HealthState`]), one probe per
//! protocol ([`probe`]), and a scheduler ([`Checker`]) that runs the probes on their intervals
//! and reports only state changes, so the reconciler touches the maps when something changed.

use std::collections::HashMap;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConfig, DigitallySignedStruct, SignatureScheme};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::MissedTickBehavior;
use tokio_rustls::TlsConnector;

use crate::config::{HealthCheck, HttpProbe, Probe, UdpProbe};
use crate::metrics::Histogram;

// ---------------------------------------------------------------------------------------------
// The state machine
// ---------------------------------------------------------------------------------------------

/// A change of a backend's health, returned by [`HealthState::record`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    /// The backend was up and failed `fall` checks in a row.
    Down,
    /// The backend was down and passed `rise` checks in a row.
    Up,
}

/// The health of one (VIP, backend) pair, driven by check results alone (no I/O, no clock of
/// its own: callers pass the time in, so tests control it).
///
/// A new state starts **up**. When the agent restarts or a backend is added, the first verdict
/// takes `fall` failed checks (several seconds); starting down would drop every flow to a
/// healthy pool until `rise` checks passed, which is a self-inflicted outage on every restart.
/// Starting up risks sending new flows to a dead backend for the same few seconds, which is
/// the lesser harm: the flows would have failed anyway.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthState {
    up: bool,
    rise: u32,
    fall: u32,
    successes: u32,
    failures: u32,
    last_transition: Option<Instant>,
}

impl HealthState {
    /// A state that is up (see the type's documentation for why), with no results recorded.
    /// `rise` and `fall` below 1 count as 1: zero consecutive results cannot mean anything.
    pub fn new(rise: u8, fall: u8) -> Self {
        HealthState {
            up: true,
            rise: u32::from(rise.max(1)),
            fall: u32::from(fall.max(1)),
            successes: 0,
            failures: 0,
            last_transition: None,
        }
    }

    /// A state that is down, with no results recorded: for a backend a previous agent had
    /// marked down in the maps it left pinned, so a restart does not bring a dead backend back
    /// for `fall` checks. It rejoins after `rise` passed checks like any down backend.
    pub fn down(rise: u8, fall: u8) -> Self {
        HealthState {
            up: false,
            ..Self::new(rise, fall)
        }
    }

    /// The same state and streaks with new thresholds, for a reload that changed `rise` or
    /// `fall`. A streak already at or past a new threshold takes effect at the next result,
    /// not immediately, so a reload alone never changes a backend's state.
    pub fn with_thresholds(mut self, rise: u8, fall: u8) -> Self {
        self.rise = u32::from(rise.max(1));
        self.fall = u32::from(fall.max(1));
        self
    }

    /// Records one check result at `now`. Returns the transition when this result changes
    /// the state, and `None` otherwise (including every result that confirms the state).
    pub fn record(&mut self, ok: bool, now: Instant) -> Option<Transition> {
        // One streak is always zero: a result breaks the opposite streak, so "rise successes
        // in a row" really means in a row and alternating results never flap.
        if ok {
            self.successes = self.successes.saturating_add(1);
            self.failures = 0;
        } else {
            self.failures = self.failures.saturating_add(1);
            self.successes = 0;
        }
        let transition = match (self.up, ok) {
            (true, false) if self.failures >= self.fall => Transition::Down,
            (false, true) if self.successes >= self.rise => Transition::Up,
            _ => return None,
        };
        self.up = transition == Transition::Up;
        self.last_transition = Some(now);
        Some(transition)
    }

    /// Whether the backend counts as healthy.
    pub fn is_up(&self) -> bool {
        self.up
    }

    /// Consecutive passed checks up to the latest result (0 when the latest failed).
    pub fn successes(&self) -> u32 {
        self.successes
    }

    /// Consecutive failed checks up to the latest result (0 when the latest passed).
    pub fn failures(&self) -> u32 {
        self.failures
    }

    /// Passed checks in a row that bring a down backend up.
    pub fn rise(&self) -> u32 {
        self.rise
    }

    /// Failed checks in a row that take an up backend down.
    pub fn fall(&self) -> u32 {
        self.fall
    }

    /// When the state last changed; `None` while it is still the initial, optimistic "up".
    pub fn last_transition(&self) -> Option<Instant> {
        self.last_transition
    }
}

// ---------------------------------------------------------------------------------------------
// Probes
// ---------------------------------------------------------------------------------------------

/// The outcome of one check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeResult {
    /// Whether the check passed.
    pub ok: bool,
    /// Time from the start of the check to its verdict (for a timeout, about the timeout).
    pub latency: Duration,
    /// Why the check failed, e.g. `"connect refused"`, `"timeout after 1s"`,
    /// `"status 503, expected 200"`; `"ok"` when it passed.
    pub detail: String,
}

/// Why a probe failed, before it becomes [`ProbeResult::detail`].
#[derive(Debug)]
enum Failure {
    Connect(io::Error),
    Io(&'static str, io::Error),
    Status { got: u16, expected: u16 },
    BadStatusLine(String),
    Reply { got: String, expected: String },
    Tls(String),
}

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                f.write_str("connect refused")
            }
            Failure::Connect(err) => write!(f, "connect failed: {err}"),
            // A connected UDP socket reports the ICMP port-unreachable as a refused receive.
            Failure::Io(what, err) if err.kind() == io::ErrorKind::ConnectionRefused => {
                write!(f, "{what} refused (port unreachable)")
            }
            Failure::Io(what, err) => write!(f, "{what} failed: {err}"),
            Failure::Status { got, expected } => write!(f, "status {got}, expected {expected}"),
            Failure::BadStatusLine(why) => write!(f, "bad HTTP response: {why}"),
            Failure::Reply { got, expected } => write!(f, "reply {got:?}, expected {expected:?}"),
            Failure::Tls(why) => f.write_str(why),
        }
    }
}

/// Runs `check` once against `target` (on `check.port`), the whole check bounded by
/// `check.timeout`. Never returns an error: every failure is a failed [`ProbeResult`] whose
/// detail says why.
pub async fn probe(target: IpAddr, check: &HealthCheck) -> ProbeResult {
    let addr = SocketAddr::new(target, check.port);
    let start = Instant::now();
    let outcome = tokio::time::timeout(check.timeout, async {
        match &check.probe {
            Probe::Tcp => probe_tcp(addr).await,
            Probe::Http(http) => probe_http(addr, http).await,
            Probe::Https(http) => probe_https(addr, http).await,
            Probe::Udp(udp) => probe_udp(addr, udp).await,
        }
    })
    .await;
    let latency = start.elapsed();
    let (ok, detail) = match outcome {
        Ok(Ok(())) => (true, "ok".to_owned()),
        Ok(Err(failure)) => (false, failure.to_string()),
        Err(_elapsed) => (false, format!("timeout after {:?}", check.timeout)),
    };
    ProbeResult {
        ok,
        latency,
        detail,
    }
}

async fn probe_tcp(addr: SocketAddr) -> Result<(), Failure> {
    TcpStream::connect(addr).await.map_err(Failure::Connect)?;
    Ok(())
}

/// Longest status line read; a real one is under 40 bytes, so anything longer is not HTTP.
const MAX_STATUS_LINE: usize = 512;

async fn probe_http(addr: SocketAddr, http: &HttpProbe) -> Result<(), Failure> {
    let stream = TcpStream::connect(addr).await.map_err(Failure::Connect)?;
    http_exchange(stream, addr, 80, http).await
}

async fn probe_https(addr: SocketAddr, http: &HttpProbe) -> Result<(), Failure> {
    let config = tls_config().map_err(|err| Failure::Tls(err.clone()))?;
    let stream = TcpStream::connect(addr).await.map_err(Failure::Connect)?;
    // An IP-address server name: rustls sends no SNI for it, which is what a check against
    // an address (not a name) should do.
    let name = ServerName::from(addr.ip());
    let stream = TlsConnector::from(config)
        .connect(name, stream)
        .await
        .map_err(|err| Failure::Tls(format!("TLS handshake failed: {err}")))?;
    http_exchange(stream, addr, 443, http).await
}

/// Sends the check's request on an open connection and compares the response's status.
async fn http_exchange<S>(
    mut stream: S,
    addr: SocketAddr,
    default_port: u16,
    http: &HttpProbe,
) -> Result<(), Failure>
where
    S: AsyncRead + AsyncWrite + Unpin,
{
    stream
        .write_all(http_request(addr, default_port, &http.path).as_bytes())
        .await
        .map_err(|err| Failure::Io("send", err))?;
    stream
        .flush()
        .await
        .map_err(|err| Failure::Io("send", err))?;
    let line = read_status_line(&mut stream).await?;
    let got = parse_status_line(&line).map_err(Failure::BadStatusLine)?;
    if got == http.expected_status {
        Ok(())
    } else {
        Err(Failure::Status {
            got,
            expected: http.expected_status,
        })
    }
}

/// The TLS client configuration of https checks, built once.
///
/// It accepts **any** server certificate (expired, self-signed, for another name): backends
/// usually serve certificates for the public name, not for their own address, and often
/// self-signed ones, so verifying would fail healthy backends. A health check sends no secret
/// and trusts nothing it reads beyond one status code, so an impostor can at worst make a
/// backend look healthy, which anyone on that path could do to plain HTTP as well. Handshake
/// signatures are still checked, so the peer must hold the key of the certificate it shows.
fn tls_config() -> Result<Arc<ClientConfig>, &'static String> {
    static CONFIG: OnceLock<Result<Arc<ClientConfig>, String>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let config = ClientConfig::builder_with_provider(Arc::clone(&provider))
                .with_safe_default_protocol_versions()
                .map_err(|err| format!("TLS set-up failed: {err}"))?
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate(provider)))
                .with_no_client_auth();
            Ok(Arc::new(config))
        })
        .as_ref()
        .map(Arc::clone)
}

/// The certificate verifier of https checks: see [`tls_config`] for why it accepts any.
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The request an HTTP check sends. `Connection: close` lets the backend free the connection
/// as soon as it has answered; the port is in `Host` unless it is the scheme's default
/// (`default_port`), as RFC 9110 asks, so virtual hosts keyed on it route the check like real
/// traffic.
fn http_request(addr: SocketAddr, default_port: u16, path: &str) -> String {
    let host = match addr.ip() {
        IpAddr::V4(ip) => ip.to_string(),
        IpAddr::V6(ip) => format!("[{ip}]"),
    };
    let host = if addr.port() == default_port {
        host
    } else {
        format!("{host}:{}", addr.port())
    };
    format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: xlb-health-check\r\n\
         Accept: */*\r\nConnection: close\r\n\r\n"
    )
}

/// Reads up to the end of the first line; the rest of the response does not matter.
async fn read_status_line<S: AsyncRead + Unpin>(stream: &mut S) -> Result<String, Failure> {
    let mut buf = Vec::with_capacity(128);
    let mut chunk = [0u8; 256];
    loop {
        if let Some(end) = buf.iter().position(|&b| b == b'\n') {
            buf.truncate(end);
            break;
        }
        if buf.len() > MAX_STATUS_LINE {
            return Err(Failure::BadStatusLine(format!(
                "no line end in the first {MAX_STATUS_LINE} bytes"
            )));
        }
        let n = stream
            .read(&mut chunk)
            .await
            .map_err(|err| Failure::Io("receive", err))?;
        if n == 0 {
            if buf.is_empty() {
                return Err(Failure::BadStatusLine(
                    "connection closed before a response".to_owned(),
                ));
            }
            break;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
    if buf.last() == Some(&b'\r') {
        buf.pop();
    }
    Ok(String::from_utf8_lossy(&buf).into_owned())
}

/// The status code of an HTTP/1.x status line (`HTTP/1.1 200 OK`, without the line end), or
/// why it is not one. The reason phrase is optional and ignored, as RFC 9112 allows.
fn parse_status_line(line: &str) -> Result<u16, String> {
    let bad = || format!("status line {:?}", truncate(line, 64));
    let rest = line.strip_prefix("HTTP/1.").ok_or_else(bad)?;
    let mut parts = rest.splitn(3, ' ');
    let minor = parts.next().unwrap_or_default();
    let code = parts.next().ok_or_else(bad)?;
    if minor.len() != 1 || !minor.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let code: u16 = code.parse().map_err(|_| bad())?;
    if !(100..=599).contains(&code) {
        return Err(bad());
    }
    Ok(code)
}

/// Largest reply datagram accepted; bigger ones are truncated, which is fine for a match.
const MAX_UDP_REPLY: usize = 65_536;

async fn probe_udp(addr: SocketAddr, udp: &UdpProbe) -> Result<(), Failure> {
    let local: SocketAddr = match addr {
        SocketAddr::V4(_) => (Ipv4Addr::UNSPECIFIED, 0).into(),
        SocketAddr::V6(_) => (Ipv6Addr::UNSPECIFIED, 0).into(),
    };
    let socket = UdpSocket::bind(local)
        .await
        .map_err(|err| Failure::Io("bind", err))?;
    // Connecting filters out datagrams from anyone but the backend and turns an ICMP port
    // unreachable into an error, so a closed port fails fast instead of timing out.
    socket.connect(addr).await.map_err(Failure::Connect)?;
    socket
        .send(udp.send.as_bytes())
        .await
        .map_err(|err| Failure::Io("send", err))?;
    let mut buf = vec![0u8; MAX_UDP_REPLY];
    let n = socket
        .recv(&mut buf)
        .await
        .map_err(|err| Failure::Io("receive", err))?;
    check_udp_reply(&buf[..n], &udp.expect)
}

/// Whether a reply matches: it must contain `expect` (config: "text the reply must contain"),
/// and any reply counts when `expect` is empty.
fn check_udp_reply(reply: &[u8], expect: &str) -> Result<(), Failure> {
    let found = expect.is_empty()
        || reply
            .windows(expect.len())
            .any(|window| window == expect.as_bytes());
    if found {
        Ok(())
    } else {
        Err(Failure::Reply {
            got: truncate(&String::from_utf8_lossy(reply), 64).to_owned(),
            expected: expect.to_owned(),
        })
    }
}

/// At most `max` bytes of `s`, cut at a character boundary, so details stay one short line.
fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

// ---------------------------------------------------------------------------------------------
// The scheduler
// ---------------------------------------------------------------------------------------------

/// Which (VIP, backend) a check is for: indices into [`crate::config::Config::vips`] and that
/// VIP's `backends`. Indices move when the file changes, so the caller maps old ids to new
/// ones before handing states to [`Checker::spawn_with_states`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TargetId {
    /// Index of the VIP.
    pub vip: usize,
    /// Index of the backend within the VIP.
    pub backend: usize,
}

/// One backend to check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// Which (VIP, backend) this is.
    pub id: TargetId,
    /// The backend's address; the port comes from the check.
    pub address: IpAddr,
    /// How to check it.
    pub check: HealthCheck,
}

/// A backend's health changed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthEvent {
    /// Which (VIP, backend).
    pub id: TargetId,
    /// The new state: `true` when it came up, `false` when it went down.
    pub up: bool,
    /// The detail of the check that decided it (why it failed, or `"ok"`).
    pub detail: String,
    /// When the check that decided it finished.
    pub at: Instant,
}

/// The durations of one target's checks, one histogram per result: a passed check measures
/// the backend's responsiveness, a failed one mostly the failure mode (an instant refusal or a
/// full timeout), and mixing them would blur both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckDurations {
    /// Checks that passed.
    pub ok: Histogram,
    /// Checks that failed (timeouts included).
    pub fail: Histogram,
}

impl Default for CheckDurations {
    fn default() -> Self {
        CheckDurations {
            ok: Histogram::health_check(),
            fail: Histogram::health_check(),
        }
    }
}

impl CheckDurations {
    /// Records one check's duration under its result.
    pub fn record(&mut self, ok: bool, duration: Duration) {
        if ok {
            self.ok.observe(duration);
        } else {
            self.fail.observe(duration);
        }
    }
}

/// What a target carries from one checker to the next across a reload: its state, so a reload
/// neither revives a dead backend nor fails a live one, and its histograms, so a reload does
/// not reset counters that Prometheus expects to only grow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetHistory {
    /// The state machine.
    pub state: HealthState,
    /// The durations of its checks so far.
    pub durations: CheckDurations,
}

impl From<HealthState> for TargetHistory {
    /// A state with no checks measured yet (e.g. read back from pinned maps after a restart).
    fn from(state: HealthState) -> Self {
        TargetHistory {
            state,
            durations: CheckDurations::default(),
        }
    }
}

/// What the scheduler knows about one target, for metrics and the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TargetStatus {
    /// The state machine.
    pub state: HealthState,
    /// Latency of the latest check; `None` before the first finished.
    pub last_latency: Option<Duration>,
    /// Whether the latest check passed; `None` before the first finished.
    pub last_ok: Option<bool>,
    /// Detail of the latest check; empty before the first finished.
    pub last_detail: String,
    /// Durations of every check, by result (carried over reloads).
    pub durations: CheckDurations,
}

type Statuses = Arc<Mutex<HashMap<TargetId, TargetStatus>>>;
type ProbeFuture = Pin<Box<dyn Future<Output = ProbeResult> + Send>>;
type Prober = Arc<dyn Fn(IpAddr, HealthCheck) -> ProbeFuture + Send + Sync>;

/// Runs every target's check on its interval and sends a [`HealthEvent`] for each change of
/// state (not for each check). It has no state of its own: [`Checker::spawn`] returns the
/// [`CheckerHandle`] that owns the tasks.
///
/// A reload replaces the checker: stop the old handle, which returns the states and histograms,
/// and pass them to [`Checker::spawn_with_states`], so backends present before and after keep
/// their state and histograms and only new ones start optimistically up. Because new targets start up and no event is sent
/// for that, the receiver treats every target as up until it hears otherwise.
#[derive(Debug)]
pub struct Checker;

impl Checker {
    /// Starts checking `targets`, every one starting up, sending changes to `tx`.
    pub fn spawn(targets: Vec<Target>, tx: mpsc::Sender<HealthEvent>) -> CheckerHandle {
        Self::spawn_with_states(targets, HashMap::new(), tx)
    }

    /// As [`Checker::spawn`], but targets whose id is in `previous` continue from that state
    /// (with the new check's `rise` and `fall`) and histograms; the others start up, unmeasured.
    pub fn spawn_with_states(
        targets: Vec<Target>,
        previous: HashMap<TargetId, TargetHistory>,
        tx: mpsc::Sender<HealthEvent>,
    ) -> CheckerHandle {
        let prober: Prober = Arc::new(|address, check| {
            Box::pin(async move { probe(address, &check).await }) as ProbeFuture
        });
        spawn_with_prober(targets, previous, tx, prober)
    }
}

/// The running checks. Dropping it stops them too, so a forgotten handle cannot leave probes
/// running against an old configuration.
#[derive(Debug)]
pub struct CheckerHandle {
    tasks: Vec<JoinHandle<()>>,
    statuses: Statuses,
}

impl CheckerHandle {
    /// A copy of every target's status.
    pub fn snapshot(&self) -> HashMap<TargetId, TargetStatus> {
        lock(&self.statuses).clone()
    }

    /// Every target's latest check latency, for metrics; targets not checked yet are absent.
    pub fn latencies(&self) -> HashMap<TargetId, Duration> {
        lock(&self.statuses)
            .iter()
            .filter_map(|(id, status)| Some((*id, status.last_latency?)))
            .collect()
    }

    /// Every target's check-duration histograms, for metrics.
    pub fn durations(&self) -> HashMap<TargetId, CheckDurations> {
        lock(&self.statuses)
            .iter()
            .map(|(id, status)| (*id, status.durations.clone()))
            .collect()
    }

    /// Every target's state machine.
    pub fn states(&self) -> HashMap<TargetId, HealthState> {
        lock(&self.statuses)
            .iter()
            .map(|(id, status)| (*id, status.state.clone()))
            .collect()
    }

    /// Stops every check (aborting one in flight, which is then not recorded) and returns the
    /// states and histograms, for [`Checker::spawn_with_states`].
    pub fn stop(mut self) -> HashMap<TargetId, TargetHistory> {
        self.abort();
        lock(&self.statuses)
            .iter()
            .map(|(id, status)| {
                let history = TargetHistory {
                    state: status.state.clone(),
                    durations: status.durations.clone(),
                };
                (*id, history)
            })
            .collect()
    }

    fn abort(&mut self) {
        for task in self.tasks.drain(..) {
            task.abort();
        }
    }
}

impl Drop for CheckerHandle {
    fn drop(&mut self) {
        self.abort();
    }
}

/// Locks the statuses, carrying on after a panic elsewhere: every update is a whole-value
/// write, so a poisoned map is still consistent.
fn lock(statuses: &Statuses) -> MutexGuard<'_, HashMap<TargetId, TargetStatus>> {
    statuses
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The scheduler with the probe as a parameter, so tests can drive it without sockets.
fn spawn_with_prober(
    targets: Vec<Target>,
    mut previous: HashMap<TargetId, TargetHistory>,
    tx: mpsc::Sender<HealthEvent>,
    prober: Prober,
) -> CheckerHandle {
    let statuses: Statuses = Arc::new(Mutex::new(HashMap::new()));
    let count = u32::try_from(targets.len()).unwrap_or(u32::MAX).max(1);
    let start = tokio::time::Instant::now();
    let mut tasks = Vec::with_capacity(targets.len());
    for (index, target) in targets.into_iter().enumerate() {
        let (state, durations) = match previous.remove(&target.id) {
            Some(history) => (
                history
                    .state
                    .with_thresholds(target.check.rise, target.check.fall),
                history.durations,
            ),
            None => (
                HealthState::new(target.check.rise, target.check.fall),
                CheckDurations::default(),
            ),
        };
        lock(&statuses).insert(
            target.id,
            TargetStatus {
                state,
                last_latency: None,
                last_ok: None,
                last_detail: String::new(),
                durations,
            },
        );
        // Spread the first checks evenly over one interval so a large pool does not open
        // hundreds of connections in the same millisecond after every start or reload.
        let index = u32::try_from(index).unwrap_or(u32::MAX);
        let offset = target.check.interval / count * index;
        tasks.push(tokio::spawn(run_target(
            target,
            start + offset,
            Arc::clone(&statuses),
            tx.clone(),
            Arc::clone(&prober),
        )));
    }
    CheckerHandle { tasks, statuses }
}

async fn run_target(
    target: Target,
    first: tokio::time::Instant,
    statuses: Statuses,
    tx: mpsc::Sender<HealthEvent>,
    prober: Prober,
) {
    let mut ticks = tokio::time::interval_at(first, target.check.interval);
    // A check slower than the interval delays the next one rather than firing a burst.
    ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        ticks.tick().await;
        let result = prober(target.address, target.check.clone()).await;
        let now = Instant::now();
        let transition = {
            let mut statuses = lock(&statuses);
            let Some(status) = statuses.get_mut(&target.id) else {
                return;
            };
            status.last_latency = Some(result.latency);
            status.last_ok = Some(result.ok);
            status.last_detail.clone_from(&result.detail);
            status.durations.record(result.ok, result.latency);
            status.state.record(result.ok, now)
        };
        if let Some(transition) = transition {
            let event = HealthEvent {
                id: target.id,
                up: transition == Transition::Up,
                detail: result.detail,
                at: now,
            };
            if tx.send(event).await.is_err() {
                // Nobody listens any more: the agent is shutting down.
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn results(state: &mut HealthState, oks: &[bool], now: Instant) -> Vec<Option<Transition>> {
        oks.iter().map(|&ok| state.record(ok, now)).collect()
    }

    #[test]
    fn starts_up_with_no_streaks_and_no_transition() {
        let state = HealthState::new(2, 3);
        assert!(state.is_up());
        assert_eq!((state.successes(), state.failures()), (0, 0));
        assert_eq!((state.rise(), state.fall()), (2, 3));
        assert_eq!(state.last_transition(), None);
    }

    #[test]
    fn goes_down_after_fall_consecutive_failures_only() {
        let t0 = Instant::now();
        let mut state = HealthState::new(2, 3);
        assert_eq!(results(&mut state, &[false, false], t0), [None, None]);
        assert!(state.is_up());
        assert_eq!(state.failures(), 2);
        let t1 = t0 + Duration::from_secs(6);
        assert_eq!(state.record(false, t1), Some(Transition::Down));
        assert!(!state.is_up());
        assert_eq!(state.last_transition(), Some(t1));
        // Further failures confirm, they do not transition again.
        assert_eq!(state.record(false, t1 + Duration::from_secs(2)), None);
        assert_eq!(state.failures(), 4);
        assert_eq!(state.last_transition(), Some(t1));
    }

    #[test]
    fn comes_up_after_rise_consecutive_successes_only() {
        let t0 = Instant::now();
        let mut state = HealthState::new(2, 1);
        assert_eq!(state.record(false, t0), Some(Transition::Down));
        let t1 = t0 + Duration::from_secs(2);
        assert_eq!(state.record(true, t1), None);
        assert!(!state.is_up());
        assert_eq!(state.successes(), 1);
        let t2 = t1 + Duration::from_secs(2);
        assert_eq!(state.record(true, t2), Some(Transition::Up));
        assert!(state.is_up());
        assert_eq!(state.last_transition(), Some(t2));
        assert_eq!(state.record(true, t2), None);
    }

    #[test]
    fn success_while_up_resets_the_failure_streak() {
        let now = Instant::now();
        let mut state = HealthState::new(2, 3);
        let got = results(&mut state, &[false, false, true, false, false], now);
        assert_eq!(got, [None; 5]);
        assert!(state.is_up());
        assert_eq!(state.failures(), 2);
        assert_eq!(state.record(false, now), Some(Transition::Down));
    }

    #[test]
    fn failure_while_down_resets_the_success_streak() {
        let now = Instant::now();
        let mut state = HealthState::new(3, 1);
        assert_eq!(state.record(false, now), Some(Transition::Down));
        let got = results(&mut state, &[true, true, false, true, true], now);
        assert_eq!(got, [None; 5]);
        assert!(!state.is_up());
        assert_eq!(state.successes(), 2);
        assert_eq!(state.record(true, now), Some(Transition::Up));
    }

    #[test]
    fn rise_and_fall_of_one_follow_every_result() {
        let now = Instant::now();
        let mut state = HealthState::new(1, 1);
        let got = results(&mut state, &[true, false, false, true, true, false], now);
        use Transition::{Down, Up};
        assert_eq!(got, [None, Some(Down), None, Some(Up), None, Some(Down)]);
    }

    #[test]
    fn alternating_results_never_flap_with_thresholds_of_two() {
        let now = Instant::now();
        let mut up = HealthState::new(2, 2);
        let pattern: Vec<bool> = (0..100).map(|i| i % 2 == 0).collect();
        assert!(results(&mut up, &pattern, now).iter().all(Option::is_none));
        assert!(up.is_up());

        let mut down = HealthState::new(2, 2);
        results(&mut down, &[false, false], now);
        assert!(!down.is_up());
        assert!(
            results(&mut down, &pattern, now)
                .iter()
                .all(Option::is_none)
        );
        assert!(!down.is_up());
    }

    #[test]
    fn zero_thresholds_count_as_one() {
        let now = Instant::now();
        let mut state = HealthState::new(0, 0);
        assert_eq!((state.rise(), state.fall()), (1, 1));
        assert_eq!(state.record(false, now), Some(Transition::Down));
        assert_eq!(state.record(true, now), Some(Transition::Up));
    }

    #[test]
    fn new_thresholds_keep_state_and_streaks_and_apply_at_the_next_result() {
        let now = Instant::now();
        let mut state = HealthState::new(2, 5);
        results(&mut state, &[false, false, false], now);
        let mut state = state.with_thresholds(2, 2);
        assert!(state.is_up(), "a reload alone must not change the state");
        assert_eq!(state.failures(), 3);
        assert_eq!(state.record(false, now), Some(Transition::Down));
    }

    #[test]
    fn status_lines() {
        assert_eq!(parse_status_line("HTTP/1.1 200 OK"), Ok(200));
        assert_eq!(
            parse_status_line("HTTP/1.0 503 Service Unavailable"),
            Ok(503)
        );
        assert_eq!(parse_status_line("HTTP/1.1 204"), Ok(204));
        assert_eq!(parse_status_line("HTTP/1.1 404 "), Ok(404));
        for bad in [
            "",
            "HTTP/1.1",
            "HTTP/1.1 ",
            "HTTP/1.1 20 OK",
            "HTTP/1.1 2000 OK",
            "HTTP/1.1 abc OK",
            "HTTP/1.1 099 Low",
            "HTTP/1.1 600 High",
            "HTTP/1.1  200 OK",
            "HTTP/2 200",
            "HTTP/1.x 200 OK",
            "http/1.1 200 OK",
            "SSH-2.0-OpenSSH_9.6",
            "\u{16}\u{3}\u{1}",
        ] {
            let err = parse_status_line(bad).expect_err(bad);
            assert!(err.starts_with("status line"), "{bad:?}: {err}");
        }
    }

    #[test]
    fn requests_name_the_host_and_close_the_connection() {
        let v4: SocketAddr = "10.0.0.5:80".parse().unwrap();
        let req = http_request(v4, 80, "/healthz");
        assert!(req.starts_with("GET /healthz HTTP/1.1\r\n"), "{req}");
        assert!(req.contains("\r\nHost: 10.0.0.5\r\n"), "{req}");
        assert!(req.contains("\r\nConnection: close\r\n"), "{req}");
        assert!(req.ends_with("\r\n\r\n"), "{req}");

        let v6: SocketAddr = "[2001:db8::7]:8080".parse().unwrap();
        let req = http_request(v6, 80, "/");
        assert!(req.contains("\r\nHost: [2001:db8::7]:8080\r\n"), "{req}");
        let tls: SocketAddr = "10.0.0.5:443".parse().unwrap();
        assert!(http_request(tls, 443, "/").contains("\r\nHost: 10.0.0.5\r\n"));
        assert!(http_request(tls, 80, "/").contains("\r\nHost: 10.0.0.5:443\r\n"));
    }

    /// Runs one HTTP exchange against a scripted server on an in-memory pipe (no sockets) and
    /// returns the request the server saw and the verdict.
    async fn exchange(
        response: &'static [u8],
        expected_status: u16,
    ) -> (String, Result<(), String>) {
        let (client, mut server) = tokio::io::duplex(4096);
        let server = tokio::spawn(async move {
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.ends_with(b"\r\n\r\n") {
                let n = server.read(&mut buf).await.unwrap();
                assert_ne!(n, 0, "client closed before the end of its request");
                request.extend_from_slice(&buf[..n]);
            }
            // Answer in two writes to exercise a status line split across reads.
            let (first, rest) = response.split_at(response.len().min(6));
            server.write_all(first).await.unwrap();
            server.flush().await.unwrap();
            tokio::task::yield_now().await;
            server.write_all(rest).await.unwrap();
            String::from_utf8(request).unwrap()
        });
        let addr: SocketAddr = "192.0.2.1:8080".parse().unwrap();
        let http = HttpProbe {
            path: "/healthz".to_owned(),
            expected_status,
        };
        let verdict = http_exchange(client, addr, 80, &http)
            .await
            .map_err(|failure| failure.to_string());
        (server.await.unwrap(), verdict)
    }

    #[tokio::test]
    async fn http_exchange_compares_the_status() {
        let (request, verdict) =
            exchange(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n", 200).await;
        assert_eq!(verdict, Ok(()));
        assert!(request.starts_with("GET /healthz HTTP/1.1\r\nHost: 192.0.2.1:8080\r\n"));

        let (_, verdict) = exchange(b"HTTP/1.0 503 Service Unavailable\r\n\r\n", 200).await;
        assert_eq!(verdict.unwrap_err(), "status 503, expected 200");

        let (_, verdict) = exchange(b"SSH-2.0-OpenSSH_9.6\r\n", 200).await;
        assert_eq!(
            verdict.unwrap_err(),
            r#"bad HTTP response: status line "SSH-2.0-OpenSSH_9.6""#
        );

        let (_, verdict) = exchange(b"", 200).await;
        assert_eq!(
            verdict.unwrap_err(),
            "bad HTTP response: connection closed before a response"
        );

        // A status line without its line end before the close still counts.
        let (_, verdict) = exchange(b"HTTP/1.1 204", 204).await;
        assert_eq!(verdict, Ok(()));
    }

    #[test]
    fn tls_config_builds() {
        let config = tls_config().expect("the ring provider supports the default versions");
        assert!(Arc::ptr_eq(&config, &tls_config().unwrap()), "built once");
    }

    #[test]
    fn udp_replies_match_by_containment_and_empty_expect_takes_any() {
        assert!(check_udp_reply(b"pong", "pong").is_ok());
        assert!(check_udp_reply(b"+PONG pong\n", "pong").is_ok());
        assert!(check_udp_reply(b"", "").is_ok());
        assert!(check_udp_reply(b"anything", "").is_ok());
        let err = check_udp_reply(b"x", "pong").unwrap_err().to_string();
        assert_eq!(err, r#"reply "x", expected "pong""#);
        let err = check_udp_reply(b"po", "pong").unwrap_err().to_string();
        assert_eq!(err, r#"reply "po", expected "pong""#);
    }

    #[test]
    fn failure_details() {
        let refused = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(Failure::Connect(refused).to_string(), "connect refused");
        let status = Failure::Status {
            got: 503,
            expected: 200,
        };
        assert_eq!(status.to_string(), "status 503, expected 200");
        let unreachable = io::Error::from(io::ErrorKind::ConnectionRefused);
        assert_eq!(
            Failure::Io("receive", unreachable).to_string(),
            "receive refused (port unreachable)"
        );
    }

    #[test]
    fn truncation_keeps_characters_whole() {
        assert_eq!(truncate("abc", 5), "abc");
        assert_eq!(truncate("abcdef", 3), "abc");
        assert_eq!(truncate("aé", 2), "a");
    }

    // The scheduler, driven by a scripted probe (no sockets) on a current-thread runtime.

    fn check(interval_ms: u64, rise: u8, fall: u8) -> HealthCheck {
        HealthCheck {
            probe: Probe::Tcp,
            port: 80,
            interval: Duration::from_millis(interval_ms),
            timeout: Duration::from_millis(interval_ms / 2),
            rise,
            fall,
        }
    }

    fn target(vip: usize, backend: usize, last_octet: u8, check: HealthCheck) -> Target {
        Target {
            id: TargetId { vip, backend },
            address: IpAddr::V4(Ipv4Addr::new(192, 0, 2, last_octet)),
            check,
        }
    }

    /// A probe whose verdict for each address is whatever the test last set.
    fn scripted(verdicts: Arc<Mutex<HashMap<IpAddr, bool>>>) -> Prober {
        Arc::new(move |address, _check| {
            let ok = verdicts
                .lock()
                .unwrap()
                .get(&address)
                .copied()
                .unwrap_or(true);
            Box::pin(async move {
                ProbeResult {
                    ok,
                    latency: Duration::from_millis(3),
                    detail: if ok { "ok" } else { "connect refused" }.to_owned(),
                }
            }) as ProbeFuture
        })
    }

    async fn next_event(rx: &mut mpsc::Receiver<HealthEvent>) -> HealthEvent {
        tokio::time::timeout(Duration::from_secs(5), rx.recv())
            .await
            .expect("no health event within 5 s")
            .expect("checker closed the channel")
    }

    #[tokio::test]
    async fn scheduler_reports_transitions_only_and_keeps_states_across_reload() {
        let verdicts = Arc::new(Mutex::new(HashMap::new()));
        let a = target(0, 0, 1, check(10, 2, 2));
        let b = target(0, 1, 2, check(10, 2, 2));
        verdicts.lock().unwrap().insert(b.address, false);
        let (tx, mut rx) = mpsc::channel(16);
        let handle = spawn_with_prober(
            vec![a.clone(), b.clone()],
            HashMap::new(),
            tx.clone(),
            scripted(Arc::clone(&verdicts)),
        );

        let event = next_event(&mut rx).await;
        assert_eq!((event.id, event.up), (b.id, false));
        assert_eq!(event.detail, "connect refused");
        // More failed checks of b and passed checks of a send nothing.
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert!(rx.try_recv().is_err(), "only transitions are reported");
        let latencies = handle.latencies();
        assert_eq!(latencies.get(&a.id), Some(&Duration::from_millis(3)));
        assert_eq!(latencies.get(&b.id), Some(&Duration::from_millis(3)));
        let snapshot = handle.snapshot();
        assert_eq!(snapshot[&b.id].last_ok, Some(false));
        assert!(snapshot[&a.id].state.is_up());
        // Every check is measured, under its own result.
        let durations = handle.durations();
        let (a_ok, b_fail) = (durations[&a.id].ok.count(), durations[&b.id].fail.count());
        assert!(a_ok >= 2, "a checked {a_ok} times");
        assert!(b_fail >= 2, "b failed {b_fail} times (fall is 2)");
        assert_eq!(durations[&a.id].fail.count(), 0);
        assert_eq!(durations[&b.id].ok.count(), 0);
        assert_eq!(
            durations[&b.id].fail.sum(),
            Duration::from_millis(3) * b_fail as u32
        );

        // Reload: b is kept (still down), c is new (starts up, no event).
        let histories = handle.stop();
        assert!(!histories[&b.id].state.is_up());
        let b_fail = histories[&b.id].durations.fail.count();
        let c = target(1, 0, 3, check(10, 1, 1));
        let handle = spawn_with_prober(
            vec![b.clone(), c.clone()],
            histories,
            tx,
            scripted(Arc::clone(&verdicts)),
        );
        assert!(!handle.states()[&b.id].is_up());
        assert!(handle.states()[&c.id].is_up());
        // b's histograms come along as they were; c starts empty and a (gone) is dropped.
        let durations = handle.durations();
        assert_eq!(durations[&b.id].fail.count(), b_fail);
        assert_eq!(durations[&c.id], CheckDurations::default());
        assert!(!durations.contains_key(&a.id));
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(
            rx.try_recv().is_err(),
            "a kept down state is not re-reported"
        );
        assert!(
            handle.durations()[&b.id].fail.count() > b_fail,
            "kept counting"
        );

        verdicts.lock().unwrap().insert(b.address, true);
        let event = next_event(&mut rx).await;
        assert_eq!((event.id, event.up), (b.id, true));
        assert_eq!(event.detail, "ok");
        assert!(handle.durations()[&b.id].ok.count() >= 2, "rise is 2");
        drop(handle);
    }

    #[tokio::test]
    async fn stop_ends_the_checks() {
        let verdicts = Arc::new(Mutex::new(HashMap::new()));
        let a = target(0, 0, 1, check(10, 1, 1));
        let (tx, mut rx) = mpsc::channel(16);
        let handle = spawn_with_prober(vec![a.clone()], HashMap::new(), tx, scripted(verdicts));
        handle.stop();
        // With every task aborted, every sender is gone and the channel closes.
        let closed = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await;
        assert_eq!(closed.expect("channel still open after stop"), None);
    }
}
