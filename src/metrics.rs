//! Every metric name and label set, in one place (SPEC section 5), and the security-event
//! log.
//!
//! The rest of the crate reports events through these functions and never names a metric
//! itself, so label values can only come from the closed enums of [`crate::error`] and
//! friends: never an address, a token or an identity. Every series is described (HELP and
//! TYPE lines) and registered at zero by [`install`], so dashboards and alerts see it before
//! the first event.

use std::net::IpAddr;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

use metrics::{
    counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram, Histogram,
    Unit,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::{
    AuthMethod, CloseReason, ClusterOp, RejectReason, SecurityEvent, UpstreamError, Verb,
};

pub const CONNECTIONS_ACCEPTED: &str = "portcullis_connections_accepted_total";
pub const CONNECTIONS_REJECTED: &str = "portcullis_connections_rejected_total";
pub const CONNECTIONS_ACTIVE: &str = "portcullis_connections_active";
pub const CONNECTIONS_CLOSED: &str = "portcullis_connections_closed_total";
pub const HANDSHAKE_DURATION: &str = "portcullis_tls_handshake_duration_seconds";
pub const HANDSHAKES: &str = "portcullis_tls_handshakes_total";
pub const SECURITY_EVENTS: &str = "portcullis_security_events_total";
pub const AUTH: &str = "portcullis_auth_total";
pub const COMMAND_DURATION: &str = "portcullis_command_duration_seconds";
pub const COMMANDS: &str = "portcullis_commands_total";
pub const FRAMES: &str = "portcullis_frames_total";
pub const BYTES: &str = "portcullis_bytes_total";
pub const LIMITER_KEYS: &str = "portcullis_limiter_keys";
pub const CERT_NOT_AFTER: &str = "portcullis_cert_not_after_timestamp_seconds";
pub const CONFIG_RELOADS: &str = "portcullis_config_reloads_total";
pub const BUILD_INFO: &str = "portcullis_build_info";
pub const UPSTREAM_CONNECT_DURATION: &str = "portcullis_upstream_connect_duration_seconds";
pub const UPSTREAM_CONNECTIONS_ACTIVE: &str = "portcullis_upstream_connections_active";
pub const UPSTREAM_ERRORS: &str = "portcullis_upstream_errors_total";
pub const UPSTREAM_SERVER_UP: &str = "portcullis_upstream_server_up";
pub const UPSTREAM_MESSAGES: &str = "portcullis_upstream_messages_total";
pub const UPSTREAM_BYTES: &str = "portcullis_upstream_bytes_total";
pub const CLUSTER_UP: &str = "portcullis_cluster_up";
pub const CLUSTER_SYNC_DURATION: &str = "portcullis_cluster_sync_duration_seconds";
pub const CLUSTER_ERRORS: &str = "portcullis_cluster_errors_total";
pub const ACCEPT_DURATION: &str = "portcullis_accept_duration_seconds";

/// How many keys each limiter holds: the `portcullis_limiter_keys` gauge.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LimiterKeys {
    pub connection_rate: usize,
    pub concurrency: usize,
    pub auth_failures: usize,
    pub bans: usize,
}

/// Handshakes take from ~100 µs (resumed, loopback) to the 10 s default timeout.
const HANDSHAKE_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];
/// Built-in commands take microseconds; an upstream command may take up to a second.
const COMMAND_BUCKETS: &[f64] = &[
    0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01,
    0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// Upstream connects take ~100 µs on a private network, up to `connect_timeout` (2 s).
const CONNECT_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
];
/// A sync is one round trip to a nearby Redis (~100 µs) up to its 1 s timeout.
const CLUSTER_SYNC_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
];
/// The accept loop decides a connection from local state in about a microsecond; a wait on
/// anything (a lock, the network) would show in the upper buckets.
const ACCEPT_BUCKETS: &[f64] = &[
    0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.001, 0.01,
];
/// At most this many log lines per second per kind (a security-event kind, or one line of
/// code in a library); the rest are summed up in one "suppressed" line (SPEC 9).
pub(crate) const LOG_LINES_PER_SECOND: u32 = 10;

/// The result of a TLS handshake, as labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HandshakeResult {
    Ok,
    Failed,
    Timeout,
}

impl HandshakeResult {
    fn as_str(self) -> &'static str {
        match self {
            HandshakeResult::Ok => "ok",
            HandshakeResult::Failed => "failed",
            HandshakeResult::Timeout => "timeout",
        }
    }
}

/// Installs the Prometheus recorder (once per process; later calls return the same
/// handle), describes every metric and registers every series at zero.
pub fn install() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Full(HANDSHAKE_DURATION.into()), HANDSHAKE_BUCKETS)
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(COMMAND_DURATION.into()),
                        COMMAND_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(UPSTREAM_CONNECT_DURATION.into()),
                        CONNECT_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(
                        Matcher::Full(CLUSTER_SYNC_DURATION.into()),
                        CLUSTER_SYNC_BUCKETS,
                    )
                })
                .and_then(|b| {
                    b.set_buckets_for_metric(Matcher::Full(ACCEPT_DURATION.into()), ACCEPT_BUCKETS)
                })
                .expect("bucket lists are constant and non-empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics will be empty");
            }
            describe();
            register_at_zero();
            process().describe();
            process().collect();
            handle
        })
        .clone()
}

fn describe() {
    describe_counter!(
        CONNECTIONS_ACCEPTED,
        "TCP connections accepted, refused ones included"
    );
    describe_counter!(
        CONNECTIONS_REJECTED,
        "Connections refused before TLS, by reason"
    );
    describe_gauge!(CONNECTIONS_ACTIVE, "Connections currently open");
    describe_histogram!(
        ACCEPT_DURATION,
        Unit::Seconds,
        "Time the accept loop spends on one accepted connection: admission decision and hand-off to its task"
    );
    describe_counter!(CONNECTIONS_CLOSED, "Admitted connections closed, by reason");
    describe_histogram!(
        HANDSHAKE_DURATION,
        Unit::Seconds,
        "TLS handshake duration, first byte included"
    );
    describe_counter!(HANDSHAKES, "TLS handshakes by result and protocol version");
    describe_counter!(SECURITY_EVENTS, "Refusals and signs of abuse, by kind");
    describe_counter!(AUTH, "Authentication attempts by method and result");
    describe_histogram!(
        COMMAND_DURATION,
        Unit::Seconds,
        "Command service time, by command"
    );
    describe_counter!(COMMANDS, "Commands served, by command and result");
    describe_counter!(
        FRAMES,
        "Messages (frames or lines) received (in) and sent (out)"
    );
    describe_counter!(
        BYTES,
        Unit::Bytes,
        "Plaintext message bytes received (in) and sent (out)"
    );
    describe_gauge!(LIMITER_KEYS, "Keys held by each per-client limiter");
    describe_gauge!(
        CERT_NOT_AFTER,
        Unit::Seconds,
        "notAfter of the serving certificate, Unix time"
    );
    describe_counter!(
        CONFIG_RELOADS,
        "Configuration reloads (file, environment, certificates, tokens) by result"
    );
    describe_gauge!(
        BUILD_INFO,
        "Always 1; the labels say which build runs: version, rustls version, source commit"
    );
    describe_histogram!(
        UPSTREAM_CONNECT_DURATION,
        Unit::Seconds,
        "Upstream connect duration, by result"
    );
    describe_gauge!(
        UPSTREAM_CONNECTIONS_ACTIVE,
        "Relayed upstream connections open"
    );
    describe_counter!(UPSTREAM_ERRORS, "Upstream failures, by reason");
    describe_gauge!(
        UPSTREAM_SERVER_UP,
        "1 while the configured upstream server is up (rise/fall of its checks)"
    );
    describe_counter!(
        UPSTREAM_MESSAGES,
        "Messages relayed to and from the upstream"
    );
    describe_counter!(
        UPSTREAM_BYTES,
        Unit::Bytes,
        "Bytes relayed to and from the upstream (payloads; raw bytes in stream mode)"
    );
}

fn register_at_zero() {
    counter!(CONNECTIONS_ACCEPTED).absolute(0);
    let _ = accept_duration();
    gauge!(CONNECTIONS_ACTIVE).set(0.0);
    for reason in RejectReason::ALL {
        counter!(CONNECTIONS_REJECTED, "reason" => reason.as_str()).absolute(0);
    }
    for reason in CloseReason::ALL {
        counter!(CONNECTIONS_CLOSED, "reason" => reason.as_str()).absolute(0);
    }
    for result in [
        HandshakeResult::Ok,
        HandshakeResult::Failed,
        HandshakeResult::Timeout,
    ] {
        let versions: &[&str] = match result {
            HandshakeResult::Ok => &["TLSv1_2", "TLSv1_3"],
            _ => &["none"],
        };
        for version in versions {
            counter!(HANDSHAKES, "result" => result.as_str(), "version" => *version).absolute(0);
        }
    }
    let _ = histogram!(HANDSHAKE_DURATION);
    for event in SecurityEvent::all() {
        counter!(SECURITY_EVENTS, "kind" => event.as_str()).absolute(0);
    }
    for method in [AuthMethod::Token, AuthMethod::Mtls] {
        for result in ["ok", "failed"] {
            counter!(AUTH, "method" => method.as_str(), "result" => result).absolute(0);
        }
    }
    for verb in Verb::KNOWN.into_iter().chain([Verb::Unknown]) {
        let _ = histogram!(COMMAND_DURATION, "command" => verb.as_str());
        for result in ["ok", "error"] {
            counter!(COMMANDS, "command" => verb.as_str(), "result" => result).absolute(0);
        }
    }
    for direction in ["in", "out"] {
        counter!(FRAMES, "direction" => direction).absolute(0);
        counter!(BYTES, "direction" => direction).absolute(0);
    }
    limiter_keys(LimiterKeys {
        connection_rate: 0,
        concurrency: 0,
        auth_failures: 0,
        bans: 0,
    });
    for result in ["ok", "failed"] {
        counter!(CONFIG_RELOADS, "result" => result).absolute(0);
    }
    // BUILD_* come from build.rs: the rustls version in Cargo.lock, the git commit.
    gauge!(
        BUILD_INFO,
        "version" => env!("CARGO_PKG_VERSION"),
        "rustls" => env!("BUILD_RUSTLS_VERSION"),
        "commit" => env!("BUILD_COMMIT"),
    )
    .set(1.0);
    for result in [
        ConnectResult::Ok,
        ConnectResult::Failed,
        ConnectResult::Timeout,
    ] {
        let _ = histogram!(UPSTREAM_CONNECT_DURATION, "result" => result.as_str());
    }
    gauge!(UPSTREAM_CONNECTIONS_ACTIVE).set(0.0);
    for reason in UpstreamError::ALL {
        counter!(UPSTREAM_ERRORS, "reason" => reason.as_str()).absolute(0);
    }
    for direction in [
        UpstreamDirection::ToUpstream,
        UpstreamDirection::FromUpstream,
    ] {
        counter!(UPSTREAM_MESSAGES, "direction" => direction.as_str()).absolute(0);
        counter!(UPSTREAM_BYTES, "direction" => direction.as_str()).absolute(0);
    }
}

/// The result of an upstream connect, as labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectResult {
    Ok,
    Failed,
    Timeout,
}

impl ConnectResult {
    fn as_str(self) -> &'static str {
        match self {
            ConnectResult::Ok => "ok",
            ConnectResult::Failed => "failed",
            ConnectResult::Timeout => "timeout",
        }
    }
}

/// Which way relayed traffic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamDirection {
    ToUpstream,
    FromUpstream,
}

impl UpstreamDirection {
    fn as_str(self) -> &'static str {
        match self {
            UpstreamDirection::ToUpstream => "to_upstream",
            UpstreamDirection::FromUpstream => "from_upstream",
        }
    }
}

/// The accept loop's timer, taken once: a handle records without looking the series up.
pub fn accept_duration() -> Histogram {
    histogram!(ACCEPT_DURATION)
}

/// An upstream connect ended.
pub fn upstream_connect(result: ConnectResult, took: Duration) {
    histogram!(UPSTREAM_CONNECT_DURATION, "result" => result.as_str()).record(took.as_secs_f64());
}

/// An upstream failure.
pub fn upstream_error(reason: UpstreamError) {
    counter!(UPSTREAM_ERRORS, "reason" => reason.as_str()).increment(1);
}

/// A relayed upstream connection opened (`+1`) or closed (`-1`).
pub fn upstream_connections(delta: f64) {
    gauge!(UPSTREAM_CONNECTIONS_ACTIVE).increment(delta);
}

/// The up/down gauge of one configured server; `server` is the operator's own address
/// string (a closed set fixed by the configuration, never a peer's value).
pub fn upstream_server_gauge(server: &str) -> metrics::Gauge {
    gauge!(UPSTREAM_SERVER_UP, "server" => server.to_string())
}

/// Messages (or, in stream mode, reads) and their bytes relayed one way.
pub fn upstream_traffic(direction: UpstreamDirection, messages: u64, bytes: u64) {
    let handles = &hot().upstream[direction as usize];
    handles.frames.increment(messages);
    handles.bytes.increment(bytes);
}

/// The process metrics in their standard names (`process_cpu_seconds_total`,
/// `process_resident_memory_bytes`, `process_open_fds`, `process_max_fds`,
/// `process_start_time_seconds`, and the virtual-memory and thread gauges), read from
/// `/proc/self` by the `metrics-process` crate.
fn process() -> &'static metrics_process::Collector {
    static COLLECTOR: OnceLock<metrics_process::Collector> = OnceLock::new();
    COLLECTOR.get_or_init(metrics_process::Collector::default)
}

/// Reads the process metrics again; every scrape does, so they are as fresh as the scrape.
/// A few small reads of `/proc/self` (listing `fd/` grows with the open connections): call
/// it off the async workers.
pub fn refresh_process() {
    process().collect();
}

/// A TCP connection was accepted (whether or not it is then refused).
pub fn connection_accepted() {
    counter!(CONNECTIONS_ACCEPTED).increment(1);
}

/// A connection was refused before TLS: counted, and logged as a security event.
pub fn connection_rejected(reason: RejectReason, ip: IpAddr) {
    counter!(CONNECTIONS_REJECTED, "reason" => reason.as_str()).increment(1);
    security_event(
        SecurityEvent::Rejected(reason),
        ip,
        "connection refused before TLS",
    );
}

/// An admitted connection ended.
pub fn connection_closed(reason: CloseReason) {
    counter!(CONNECTIONS_CLOSED, "reason" => reason.as_str()).increment(1);
}

/// The number of connections currently held, set from the exact count kept by admission.
pub fn connections_active(count: usize) {
    gauge!(CONNECTIONS_ACTIVE).set(count as f64);
}

/// A TLS handshake ended; `version` is `TLSv1_2`, `TLSv1_3` or `none`.
pub fn handshake(result: HandshakeResult, version: &'static str, took: Duration) {
    counter!(HANDSHAKES, "result" => result.as_str(), "version" => version).increment(1);
    histogram!(HANDSHAKE_DURATION).record(took.as_secs_f64());
}

/// An authentication attempt.
pub fn auth(method: AuthMethod, ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    counter!(AUTH, "method" => method.as_str(), "result" => result).increment(1);
}

/// One command was served.
pub fn command(verb: Verb, ok: bool, took: Duration) {
    let handles = &hot().commands[verb as usize];
    let counter = if ok { &handles.ok } else { &handles.error };
    counter.increment(1);
    handles.duration.record(took.as_secs_f64());
}

/// Which way traffic goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    In,
    Out,
}

/// Messages and their plaintext bytes received or sent.
pub fn traffic(direction: Direction, messages: u64, bytes: u64) {
    let handles = &hot().traffic[direction as usize];
    handles.frames.increment(messages);
    handles.bytes.increment(bytes);
}

/// Handles of the series updated for every request, looked up once: a `counter!` call
/// hashes its name and labels into the registry each time, which per request adds up.
struct HotHandles {
    commands: Vec<CommandHandles>,
    traffic: [TrafficHandles; 2],
    upstream: [TrafficHandles; 2],
}

struct CommandHandles {
    ok: metrics::Counter,
    error: metrics::Counter,
    duration: metrics::Histogram,
}

struct TrafficHandles {
    frames: metrics::Counter,
    bytes: metrics::Counter,
}

/// The hot handles; created on first use, which is after [`install`] (sessions exist only
/// once a server is bound).
fn hot() -> &'static HotHandles {
    static HOT: OnceLock<HotHandles> = OnceLock::new();
    HOT.get_or_init(|| {
        let verbs = Verb::KNOWN.into_iter().chain([Verb::Unknown]);
        let mut commands: Vec<(Verb, CommandHandles)> = verbs
            .map(|verb| {
                let command = verb.as_str();
                let handles = CommandHandles {
                    ok: counter!(COMMANDS, "command" => command, "result" => "ok"),
                    error: counter!(COMMANDS, "command" => command, "result" => "error"),
                    duration: histogram!(COMMAND_DURATION, "command" => command),
                };
                (verb, handles)
            })
            .collect();
        commands.sort_by_key(|(verb, _)| *verb as usize);
        let traffic = |direction: &'static str| TrafficHandles {
            frames: counter!(FRAMES, "direction" => direction),
            bytes: counter!(BYTES, "direction" => direction),
        };
        let upstream = |direction: UpstreamDirection| TrafficHandles {
            frames: counter!(UPSTREAM_MESSAGES, "direction" => direction.as_str()),
            bytes: counter!(UPSTREAM_BYTES, "direction" => direction.as_str()),
        };
        HotHandles {
            commands: commands.into_iter().map(|(_, h)| h).collect(),
            traffic: [traffic("in"), traffic("out")],
            upstream: [
                upstream(UpstreamDirection::ToUpstream),
                upstream(UpstreamDirection::FromUpstream),
            ],
        }
    })
}

/// The per-client limiters' key counts.
pub fn limiter_keys(keys: LimiterKeys) {
    gauge!(LIMITER_KEYS, "limiter" => "connection_rate").set(keys.connection_rate as f64);
    gauge!(LIMITER_KEYS, "limiter" => "concurrency").set(keys.concurrency as f64);
    gauge!(LIMITER_KEYS, "limiter" => "auth_failures").set(keys.auth_failures as f64);
    gauge!(LIMITER_KEYS, "limiter" => "bans").set(keys.bans as f64);
}

/// The serving certificate's notAfter (Unix seconds).
pub fn cert_not_after(timestamp: i64) {
    gauge!(CERT_NOT_AFTER).set(timestamp as f64);
}

/// A configuration reload ended: applied whole, or failed and changed nothing.
pub fn config_reload(ok: bool) {
    let result = if ok { "ok" } else { "failed" };
    counter!(CONFIG_RELOADS, "result" => result).increment(1);
}

/// Cluster mode is on: describes its series and registers them at zero. Standalone, they
/// stay absent (SPEC 8: `portcullis_cluster_up` is absent when standalone).
pub fn cluster_enabled() {
    describe_gauge!(
        CLUSTER_UP,
        "1 while Redis answers, 0 while this replica runs on local state alone"
    );
    describe_histogram!(
        CLUSTER_SYNC_DURATION,
        Unit::Seconds,
        "Time of one sync with Redis (publish counts, fetch shared state)"
    );
    describe_counter!(CLUSTER_ERRORS, "Failed exchanges with Redis, by operation");
    gauge!(CLUSTER_UP).set(0.0);
    let _ = histogram!(CLUSTER_SYNC_DURATION);
    for op in ClusterOp::ALL {
        counter!(CLUSTER_ERRORS, "op" => op.as_str()).absolute(0);
    }
}

/// Whether Redis answers.
pub fn cluster_up(up: bool) {
    gauge!(CLUSTER_UP).set(if up { 1.0 } else { 0.0 });
}

/// One sync with Redis completed.
pub fn cluster_sync(took: Duration) {
    histogram!(CLUSTER_SYNC_DURATION).record(took.as_secs_f64());
}

/// An exchange with Redis failed.
pub fn cluster_error(op: ClusterOp) {
    counter!(CLUSTER_ERRORS, "op" => op.as_str()).increment(1);
}

/// A refusal or sign of abuse: counted by kind, and logged as one WARN line with the client
/// key, at most [`LOG_LINES_PER_SECOND`] per kind; the lines held back are summed up in
/// one line when the second is over (see [`flush_security_log`]).
pub fn security_event(event: SecurityEvent, ip: IpAddr, reason: &'static str) {
    counter!(SECURITY_EVENTS, "kind" => event.as_str()).increment(1);
    if EVENT_LOG.admit(event, Instant::now()) {
        tracing::warn!(kind = event.as_str(), client = %ip, reason, "security event");
    }
}

/// Writes the "suppressed" lines of windows that are over; called every second.
pub fn flush_security_log() {
    EVENT_LOG.flush(Instant::now());
}

static EVENT_LOG: EventLog = EventLog::new();

/// Per-kind one-second windows of security-event log lines.
struct EventLog {
    windows: [Mutex<LineWindow>; SecurityEvent::COUNT],
}

impl EventLog {
    const fn new() -> Self {
        #[allow(clippy::declare_interior_mutable_const)] // a template, copied into each slot
        const EMPTY: Mutex<LineWindow> = Mutex::new(LineWindow::new());
        EventLog {
            windows: [EMPTY; SecurityEvent::COUNT],
        }
    }

    /// True when this event's line may be written.
    fn admit(&self, event: SecurityEvent, now: Instant) -> bool {
        let Ok(mut window) = self.windows[event.index()].lock() else {
            return false;
        };
        let (admitted, held_back) = window.admit(now);
        report_suppressed(event, held_back);
        admitted
    }

    fn flush(&self, now: Instant) {
        for event in SecurityEvent::all() {
            let Ok(mut window) = self.windows[event.index()].lock() else {
                continue;
            };
            report_suppressed(event, window.take_expired(now));
        }
    }
}

/// One kind of log line's one-second window: at most [`LOG_LINES_PER_SECOND`] lines are
/// written, the rest only counted, to be summed up in one line when the window is over.
/// The security-event log and the limit on library lines ([`crate::logging`]) share it.
#[derive(Debug, Clone, Copy)]
pub(crate) struct LineWindow {
    started: Option<Instant>,
    logged: u32,
    suppressed: u64,
}

impl LineWindow {
    pub(crate) const fn new() -> Self {
        LineWindow {
            started: None,
            logged: 0,
            suppressed: 0,
        }
    }

    /// Whether a line may be written at `now`, and how many lines the window that ended
    /// before it held back (0 when none ended): the caller reports those.
    pub(crate) fn admit(&mut self, now: Instant) -> (bool, u64) {
        let mut held_back = 0;
        if self
            .started
            .is_none_or(|s| now.saturating_duration_since(s) >= Duration::from_secs(1))
        {
            held_back = self.suppressed;
            *self = LineWindow {
                started: Some(now),
                logged: 0,
                suppressed: 0,
            };
        }
        if self.logged < LOG_LINES_PER_SECOND {
            self.logged += 1;
            (true, held_back)
        } else {
            self.suppressed += 1;
            (false, held_back)
        }
    }

    /// The lines held back by a window that is over at `now` (which then closes), else 0.
    pub(crate) fn take_expired(&mut self, now: Instant) -> u64 {
        match self.started {
            Some(s) if now.saturating_duration_since(s) >= Duration::from_secs(1) => {
                let held_back = self.suppressed;
                *self = LineWindow::new();
                held_back
            }
            _ => 0,
        }
    }
}

fn report_suppressed(event: SecurityEvent, suppressed: u64) {
    if suppressed > 0 {
        tracing::warn!(
            kind = event.as_str(),
            suppressed,
            "security events suppressed (log rate limit)"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_log_admits_ten_per_second_per_kind() {
        let log = EventLog::new();
        let t0 = Instant::now();
        let admitted = (0..1000)
            .filter(|_| log.admit(SecurityEvent::AuthFailed, t0))
            .count();
        assert_eq!(admitted, LOG_LINES_PER_SECOND as usize);
        assert!(
            log.admit(SecurityEvent::OversizeLine, t0),
            "kinds are limited separately"
        );
        let later = t0 + Duration::from_millis(1001);
        assert!(
            log.admit(SecurityEvent::AuthFailed, later),
            "a new second, a new budget"
        );
    }
}
