//! Log lines that a flood cannot flood.
//!
//! A caller who sends a thousand bad requests must not write a thousand lines into the
//! gateway's log. Each kind of event is logged at most once per [`WINDOW_MS`] per VM; the rest
//! are counted, and the count is logged when the window closes (see [`Logs::flush`]).

use std::collections::BTreeMap;

pub const WINDOW_MS: u64 = 10_000;

#[derive(Debug, Default)]
pub struct Logs {
    windows: BTreeMap<&'static str, Window>,
}

#[derive(Debug, Clone, Copy)]
struct Window {
    started_ms: u64,
    suppressed: u64,
}

impl Logs {
    /// True when an event of `kind` at `now_ms` should be logged; otherwise it is counted.
    pub fn allow(&mut self, kind: &'static str, now_ms: u64) -> bool {
        match self.windows.get_mut(kind) {
            Some(w) if now_ms < w.started_ms.saturating_add(WINDOW_MS) => {
                w.suppressed = w.suppressed.saturating_add(1);
                false
            }
            _ => {
                self.windows.insert(
                    kind,
                    Window {
                        started_ms: now_ms,
                        suppressed: 0,
                    },
                );
                true
            }
        }
    }

    /// The kinds whose window has closed with events left unlogged, and how many; those
    /// windows are forgotten. Called on every tick.
    pub fn flush(&mut self, now_ms: u64) -> Vec<(&'static str, u64)> {
        let mut out = Vec::new();
        self.windows.retain(|kind, w| {
            if now_ms < w.started_ms.saturating_add(WINDOW_MS) {
                return true;
            }
            if w.suppressed > 0 {
                out.push((*kind, w.suppressed));
            }
            false
        });
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_per_kind_per_window_then_a_count() {
        let mut logs = Logs::default();
        assert!(logs.allow("a", 0));
        for t in 1..1000 {
            assert!(!logs.allow("a", t));
        }
        assert!(logs.allow("b", 5), "kinds are independent");
        assert_eq!(logs.flush(WINDOW_MS - 1), vec![]);
        assert_eq!(logs.flush(WINDOW_MS + 5), vec![("a", 999)]);
        assert!(logs.allow("a", WINDOW_MS + 6), "a new window logs again");
        assert_eq!(logs.flush(10 * WINDOW_MS), vec![]);
        assert!(logs.windows.is_empty(), "bounded by the kinds in use");
    }
}
