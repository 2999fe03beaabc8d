//! portcullis: a hardened, internet-facing TLS gateway.
//!
//! # Connection lifecycle
//!
//! The modules follow one connection, in order:
//!
//! 1. [`server`] binds and accepts; the accept loop never dies, and shutdown drains
//!    connections up to a deadline ([`shutdown`] turns signals into cancellation).
//! 2. [`proxy_protocol`] reads a trusted load balancer's PROXY header to learn the real
//!    client address; [`admission`] then decides, before any TLS work and at the cost of an
//!    accept and a close, whether that client may connect at all: the one place a
//!    connection is admitted.
//! 3. [`tls`] holds the rustls configuration (hot-swappable; its session-ticket keys, which
//!    outlive reloads, in [`tickets`]); [`handshake`] runs the handshake under a timeout, and [`session`] tells the story of the connection itself.
//! 4. [`codec`] splits the byte stream into binary frames or text lines, refusing any
//!    message over its cap before buffering it.
//! 5. [`auth`] turns a client certificate or a token into a principal; [`command`] serves
//!    the requests behind the NOAUTH gate, or, when `[upstream] servers` are configured,
//!    [`upstream`] relays the authenticated connection to the operator's own service (the
//!    choice is [`gateway::Service`]).
//! 6. [`metrics`] names every metric and writes the rate-limited security log ([`logging`]
//!    holds every other line a peer can cause, libraries' included, to the same limit);
//!    [`admin`] serves `/metrics`, `/healthz` and `/readyz`, and [`admin_bans`] the
//!    operator's ban endpoints (the list itself is [`bans`]); [`error`] holds the closed
//!    sets that become labels.
//!
//! [`gateway`] is the state every connection shares (it imports nothing above it) and
//! applies a reloaded configuration whole, waking open connections to check themselves
//! against it; [`cluster`] shares limits, bans and ticket keys with other replicas through
//! Redis; [`config`] is the typed configuration, [`deadline`] computes deadlines that
//! cannot overflow, [`wake_gate`] keeps a connection's loop from polling what is rarely
//! ready (shutdown, bans, reloads, timers) at every message, [`descriptors`] raises the
//! open-file limit at start and keeps the descriptor that refuses a connection when it
//! runs out, [`reload`] triggers reloads (SIGHUP, polling), and [`bootstrap`] is the
//! development set-up.

pub mod admin;
pub mod admin_bans;
pub mod admission;
pub mod auth;
pub mod bans;
pub mod bootstrap;
pub mod cluster;
pub mod codec;
pub mod command;
pub mod config;
pub mod deadline;
pub mod descriptors;
pub mod error;
pub mod gateway;
pub mod handshake;
pub mod logging;
pub mod metrics;
pub mod proxy_protocol;
pub mod reload;
pub mod server;
pub mod session;
pub mod shutdown;
pub mod tickets;
pub mod tls;
pub mod upstream;
pub mod wake_gate;
