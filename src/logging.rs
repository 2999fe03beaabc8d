//! The rate limit on log lines a peer can cause (SPEC 9), including the libraries' own:
//! rustls warns once per ClientHello that carries an IP address as SNI, so a scanner could
//! otherwise write to the log as fast as it can connect.
//!
//! [`LineLimit`] is a `tracing` layer that admits at most
//! [`LOG_LINES_PER_SECOND`](crate::metrics::LOG_LINES_PER_SECOND) lines per second per
//! *kind*, a kind being one line of code (target, file and line, recovered from `log`
//! records too); the rest are counted and summed up by [`flush_suppressed`] in one WARN line
//! per kind once its second is over. The security-event log (`portcullis::metrics`) keeps
//! its own per-event-kind budget and passes through untouched.

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::{Mutex, PoisonError};
use std::time::Instant;

use tracing::{Event, Metadata, Subscriber};
use tracing_log::NormalizeEvent;
use tracing_subscriber::layer::{Context, Layer};

use crate::metrics::LineWindow;

/// Kinds tracked one by one; lines of further kinds share one budget (kinds are lines of
/// code, so this is never reached in practice, but the map stays bounded regardless).
const MAX_KINDS: usize = 1024;
/// The shared kind beyond [`MAX_KINDS`].
const OTHER_KIND: u64 = u64::MAX;

/// The layer: put it between the level filter and the formatter.
#[derive(Debug, Clone, Copy, Default)]
pub struct LineLimit;

impl<S: Subscriber> Layer<S> for LineLimit {
    fn event_enabled(&self, event: &Event<'_>, _ctx: Context<'_, S>) -> bool {
        let normalized = event.normalized_metadata();
        let metadata = normalized.as_ref().unwrap_or_else(|| event.metadata());
        if has_own_budget(metadata.target()) {
            return true;
        }
        // No line may be written from here (this runs inside the dispatcher): held-back
        // counts are reported by `flush_suppressed`.
        LINES.admit(metadata, Instant::now())
    }
}

/// Writes one "suppressed" line per kind whose second is over and that held lines back;
/// called every second.
pub fn flush_suppressed() {
    for (kind, suppressed) in LINES.take_expired(Instant::now()) {
        tracing::warn!(kind, suppressed, "log lines suppressed (log rate limit)");
    }
}

/// Lines that are limited already: the security-event log has a budget per event kind, and
/// this module's own summaries are at most one per kind per second.
fn has_own_budget(target: &str) -> bool {
    target == "portcullis::metrics" || target == module_path!()
}

static LINES: Lines = Lines {
    kinds: Mutex::new(BTreeMap::new()),
};

/// The windows of every kind seen, by a hash of the kind.
struct Lines {
    kinds: Mutex<BTreeMap<u64, Kind>>,
}

struct Kind {
    /// `target file:line`, for the summary line.
    name: String,
    window: LineWindow,
    /// Lines held back by windows that ended at an admitted line, not yet reported.
    unreported: u64,
}

impl Lines {
    fn admit(&self, metadata: &Metadata<'_>, now: Instant) -> bool {
        let mut kinds = self.kinds.lock().unwrap_or_else(PoisonError::into_inner);
        let mut key = kind_key(metadata);
        if !kinds.contains_key(&key) && kinds.len() >= MAX_KINDS {
            key = OTHER_KIND;
        }
        let kind = kinds.entry(key).or_insert_with(|| Kind {
            name: kind_name(metadata, key),
            window: LineWindow::new(),
            unreported: 0,
        });
        let (admitted, held_back) = kind.window.admit(now);
        kind.unreported += held_back;
        admitted
    }

    /// The kinds with lines to report, and how many; their counts are reset.
    fn take_expired(&self, now: Instant) -> Vec<(String, u64)> {
        let mut kinds = self.kinds.lock().unwrap_or_else(PoisonError::into_inner);
        kinds
            .values_mut()
            .filter_map(|kind| {
                let suppressed =
                    std::mem::take(&mut kind.unreported) + kind.window.take_expired(now);
                (suppressed > 0).then(|| (kind.name.clone(), suppressed))
            })
            .collect()
    }
}

/// One line of code: level, target, file and line, hashed (no allocation per event; a
/// collision would only merge two budgets), never [`OTHER_KIND`].
fn kind_key(metadata: &Metadata<'_>) -> u64 {
    let mut hasher = std::hash::DefaultHasher::new();
    metadata.level().as_str().hash(&mut hasher);
    metadata.target().hash(&mut hasher);
    metadata.file().hash(&mut hasher);
    metadata.line().hash(&mut hasher);
    hasher.finish() >> 1
}

fn kind_name(metadata: &Metadata<'_>, key: u64) -> String {
    if key == OTHER_KIND {
        return "other".to_string();
    }
    format!(
        "{} {}:{}",
        metadata.target(),
        metadata.file().unwrap_or("?"),
        metadata.line().unwrap_or(0)
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn ten_lines_per_second_per_line_of_code_then_one_summary() {
        let lines = Lines {
            kinds: Mutex::new(BTreeMap::new()),
        };
        // Two lines of code, as a `log` record's metadata describes them.
        let a: &'static Metadata<'static> = Box::leak(Box::new(Metadata::new(
            "a",
            "rustls::msgs::handshake",
            tracing::Level::WARN,
            Some("handshake.rs"),
            Some(349),
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
            tracing::metadata::Kind::EVENT,
        )));
        let b = Box::leak(Box::new(Metadata::new(
            "b",
            "rustls::msgs::handshake",
            tracing::Level::WARN,
            Some("handshake.rs"),
            Some(356),
            None,
            tracing::field::FieldSet::new(&[], tracing::callsite::Identifier(&CALLSITE)),
            tracing::metadata::Kind::EVENT,
        )));
        let t0 = Instant::now();
        let admitted = (0..1000).filter(|_| lines.admit(a, t0)).count();
        assert_eq!(admitted, crate::metrics::LOG_LINES_PER_SECOND as usize);
        assert!(
            lines.admit(b, t0),
            "another line of code has its own budget"
        );
        assert!(lines.take_expired(t0).is_empty(), "the second is not over");
        let later = t0 + Duration::from_millis(1001);
        let summary = lines.take_expired(later);
        assert_eq!(
            summary,
            [("rustls::msgs::handshake handshake.rs:349".to_string(), 990)]
        );
        assert!(lines.admit(a, later), "a new second, a new budget");
    }

    struct NoCallsite;
    impl tracing::callsite::Callsite for NoCallsite {
        fn set_interest(&self, _: tracing::subscriber::Interest) {}
        fn metadata(&self) -> &Metadata<'_> {
            unreachable!("not registered")
        }
    }
    static CALLSITE: NoCallsite = NoCallsite;
}
