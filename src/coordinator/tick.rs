//! The tick: requests waiting for fetches that other workers run, the gateway's tokens kept
//! fresh, spent records swept, and the tick's own pace.

use super::*;

impl<H: Host> Coordinator<H> {
    /// Resolves requests waiting for fetches other workers run, keeps the gateway's token
    /// fresh, sweeps, and flushes the log summary.
    pub fn tick(&self) {
        let now = self.host.now_ms();
        self.flush_counts();
        self.flush_logs(now);
        self.sweep(now);
        self.poll_waiters();
        self.maintain_keys(now);
        self.maintain_gateway();
        self.adjust_tick();
    }

    /// Requests waiting here for a fetch another worker runs (or ran, or abandoned).
    pub(super) fn poll_waiters(&self) {
        let now = self.host.now_ms();
        let wants: Vec<Want> = self
            .waiting
            .borrow()
            .iter()
            .map(|(k, w)| Want {
                identity: k.clone(),
                subject: w.subject.clone(),
                account: w.account.clone(),
                rule: w.rule.clone(),
            })
            .collect();
        let table = self.table();
        for want in wants {
            let record = table.record(&self.host, &want.identity);
            self.settle(&want.identity, record.as_ref(), now);
            if self.waiting.borrow().contains_key(&want.identity) {
                // Still waiting: start a fetch if nobody (alive) is running one.
                self.start_if_needed(want, record.as_ref());
            }
        }
    }

    /// Platform sources: keep the gateway's tokens fresh before requests need them (one per
    /// account in use), and re-read the subject when it is due (a rotated Kubernetes token file
    /// is picked up this way).
    pub(super) fn maintain_gateway(&self) {
        let Some(config) = self.config() else {
            return;
        };
        let gateways: Vec<Want> = self
            .gateways
            .borrow()
            .iter()
            .map(|(identity, (account, rule))| Want {
                identity: identity.clone(),
                subject: None,
                account: account.clone(),
                rule: rule.clone(),
            })
            .collect();
        let now = self.host.now_ms();
        let mut fresh = None;
        for want in gateways {
            if self.is_active(&want.identity) {
                continue;
            }
            let record = self.table().record(&self.host, &want.identity);
            match lookup(record.as_ref(), now) {
                Lookup::Miss | Lookup::RefreshDue(_) => self.start_if_needed(want, record.as_ref()),
                Lookup::BackingOff(_) | Lookup::ServingWhileBackingOff(_) => {}
                Lookup::Fresh(_) => fresh = fresh.or(Some(want)),
            }
        }
        // The subject is one for every account: re-read it once, under its own lease.
        let (Some(want), Some(source)) = (fresh, self.source.borrow().clone()) else {
            return;
        };
        let due = match shared::read::<SubjectRecord>(&self.host, &cache::subject_key(&source)) {
            Ok(Some((s, _))) => s.due(now),
            _ => true,
        };
        let fetching = self
            .fetches
            .borrow()
            .values()
            .any(|f| matches!(f.step, Step::FetchSubject { .. }));
        if due && !fetching {
            let deadline = now + lifetime::millis(config.lease_duration());
            if let Ok(Acquire::Acquired) =
                lease::try_acquire(&self.host, &source, self.owner, now, deadline)
            {
                self.fetch_subject(&config, want, false);
            }
        }
    }

    /// Per-request identities come and go (a workload's token rotates, a pod leaves). The
    /// table bounds how many records there are; a pass a minute empties the spent ones among a
    /// batch of slots, so the table holds what is alive rather than what once was.
    pub(super) fn sweep(&self, now: u64) {
        if now < self.next_sweep_ms.get() {
            return;
        }
        self.next_sweep_ms.set(now + SWEEP_EVERY_MS);
        let table = self.table();
        let cursor = self.sweep_cursor.get();
        let cleared = table.sweep(&self.host, cursor, SWEEP_BATCH, now);
        self.sweep_cursor
            .set((cursor + SWEEP_BATCH) % table.slots());
        if cleared > 0 {
            log::debug!("openai_wif: cleared {cleared} spent cache records");
        }
    }

    pub(super) fn adjust_tick(&self) {
        let want = if self.waiting.borrow().is_empty() {
            SLOW_TICK
        } else {
            FAST_TICK
        };
        if self.tick.get() != Some(want) {
            self.host.set_tick_period(want);
            self.tick.set(Some(want));
        }
    }

    /// The VM is going away and its callouts with it: give their leases back so another
    /// worker fetches now rather than after the deadline.
    pub fn done(&self) {
        self.flush_counts();
        let fetches = std::mem::take(&mut *self.fetches.borrow_mut());
        for fetch in fetches.into_values() {
            if matches!(fetch.step, Step::FetchSubject { .. }) {
                self.release_source();
            }
            let _ = lease::release(&self.host, &fetch.want.identity, self.owner);
        }
        if self.keys_call.take().is_some() {
            if let Some(Some(crate::checks::Keys::Source(source))) = self
                .config()
                .map(|c| c.expect.as_ref().map(|e| e.keys.clone()))
            {
                let _ = lease::release(&self.host, &IdentityKey::for_keys(&source), self.owner);
            }
        }
    }
}
