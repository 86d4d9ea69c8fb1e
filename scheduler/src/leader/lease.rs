//! Leader election through a KV lease.
//!
//! The lease is the key `leader` in the `krest-leader` bucket, whose max age is the lease TTL.
//! A standby acquires it with `create` (fails while another node holds it); the leader renews it
//! with a revision-checked `update` every `renew_every`. The revision at acquisition is the
//! node's *epoch*, a fencing token stamped on every message it publishes as leader (work
//! messages, `dispatched` and `skipped` events; recorded with each run).
//!
//! A leader may dispatch only while its lease is *valid*: by its own monotonic clock, until
//! `TTL - margin` after it sent the last renewal (or acquisition) that succeeded. The key cannot
//! expire before then — the server stored that write after it was sent, and the key lives `TTL`
//! from the write — and no other node can create it while it exists, so validity never outlasts
//! the lease. A node frozen (SIGSTOP, a long GC-like stall) past its lease finds on waking that
//! it is no longer valid, before the server has even expired the key.
//!
//! A renewal that goes unanswered within its timeout (`max(renew_every, 500 ms)`, and never past
//! the validity deadline) or fails in a way that does not say the lease is gone does *not* end
//! leadership: the leader keeps dispatching on the validity it has (which that renewal did not
//! extend) and tries again at once — a quarter of `renew_every` later after an error that came
//! back at once. An attempt that timed out is not abandoned: it is waited for beside the next
//! one, and whichever succeeds first renews the lease (from when that attempt started). Such a
//! renewal may still have been applied (a timeout), so the next attempt first reads the key: if it still names this node with this epoch, the renewal goes on from
//! the revision read; if it names another node or another epoch of this one, is not a lease, or
//! is gone (deleted, expired), the node steps down at once. A renewal refused because the key
//! changed ("wrong last sequence": a timed-out renewal of ours that landed, or another writer)
//! reads it the same way in the same attempt. If no renewal succeeds before the validity
//! deadline, the node steps down at the deadline. So a slow or briefly frozen NATS server
//! (shorter than `TTL - margin` less the age of the last renewal) no longer moves leadership,
//! and dispatching never relies on anything but a renewal that succeeded.
//!
//! Expiry by max age produces no watch event, so standbys poll; a clean release does (a delete
//! marker), and standbys also watch the key for it, so a handover takes a round trip rather than
//! up to a polling period.
//!
//! A node campaigns only once it could lead: until its job table is loaded
//! ([`Election::campaign_when`], the jobs bucket read to its end) it does not try to take the
//! lease, so a node restarted seconds before — still reading a large bucket — does not win an
//! election and then leave every job unfired while it loads. A leader is never asked to step
//! down for it (its table stays loaded), and a lone node that is loading takes the lease as soon
//! as it is loaded.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::kv;
use chrono::{DateTime, Utc};
use krest_schemas::names::LEADER_KEY;
use krest_schemas::LeaderLease;
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// This node's role.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Not holding the lease.
    Standby,
    /// Holding the lease acquired at revision `epoch`.
    Leader {
        /// Fencing epoch.
        epoch: u64,
    },
}

/// Until when (by the monotonic clock) this node may act as leader of which epoch.
#[derive(Clone, Debug, Default)]
struct Validity(Arc<Mutex<Option<(u64, Instant)>>>);

impl Validity {
    fn epoch(&self) -> Option<u64> {
        let guard = self.0.lock().ok()?;
        match *guard {
            Some((epoch, until)) if Instant::now() < until => Some(epoch),
            _ => None,
        }
    }

    /// Until when `epoch` is valid, if it is now.
    fn until(&self, epoch: u64) -> Option<Instant> {
        let guard = self.0.lock().ok()?;
        match *guard {
            Some((e, until)) if e == epoch && Instant::now() < until => Some(until),
            _ => None,
        }
    }

    fn set(&self, v: Option<(u64, Instant)>) {
        if let Ok(mut g) = self.0.lock() {
            *g = v;
        }
    }
}

/// A cheap handle to the election's view of leadership.
#[derive(Clone, Debug)]
pub struct Leadership {
    role: watch::Receiver<Role>,
    validity: Validity,
    rounds: Arc<AtomicU64>,
}

impl Leadership {
    /// The current role as last published by the election loop.
    pub fn role(&self) -> Role {
        *self.role.borrow()
    }

    /// `Some(epoch)` if this node holds the lease *now*, by its own clock. Check right before
    /// publishing anything only a leader may publish.
    pub fn valid_epoch(&self) -> Option<u64> {
        self.validity.epoch()
    }

    /// A receiver that sees every role change.
    pub fn watch(&self) -> watch::Receiver<Role> {
        self.role.clone()
    }

    /// How many rounds (renewals, campaigns, or rounds spent waiting for the job table) the
    /// election has finished: a test waits on it to know the election has looked again.
    pub fn rounds(&self) -> u64 {
        self.rounds.load(Ordering::SeqCst)
    }
}

/// Election settings.
#[derive(Debug, Clone)]
pub struct LeaseConfig {
    /// The node's name, written into the lease.
    pub node: String,
    /// Lease time to live (the bucket's max age).
    pub ttl: Duration,
    /// Renewal (and standby polling) period.
    pub renew_every: Duration,
}

impl LeaseConfig {
    /// How long before the TTL a leader considers its lease gone.
    fn margin(&self) -> Duration {
        (self.ttl / 6)
            .max(Duration::from_millis(200))
            .min(self.ttl / 2)
    }
}

/// Runs the election until `stop`; on a clean stop a leader deletes the lease so a standby
/// takes over at once.
pub struct Election {
    kv: kv::Store,
    cfg: LeaseConfig,
    role_tx: watch::Sender<Role>,
    validity: Validity,
    rounds: Arc<AtomicU64>,
    /// True once the node may lead (its job table is loaded); `None`: at once.
    can_lead: Option<watch::Receiver<bool>>,
}

/// Returns once `can_lead` is true (never, if its sender is gone: the node is stopping).
async fn able_to_lead(can_lead: &mut Option<watch::Receiver<bool>>) {
    match can_lead {
        Some(rx) => {
            if rx.wait_for(|v| *v).await.is_err() {
                std::future::pending::<()>().await;
            }
        }
        None => std::future::pending::<()>().await,
    }
}

/// Wakes `released` whenever the lease key is deleted (a leader letting go), until `stop`. A
/// watch that fails or ends is opened again; meanwhile polling still finds the lease free.
async fn watch_releases(
    kv: kv::Store,
    released: Arc<tokio::sync::Notify>,
    stop: CancellationToken,
) {
    use futures_util::StreamExt;
    let mut failures = 0u32;
    while !stop.is_cancelled() {
        match kv.watch(LEADER_KEY).await {
            Ok(mut watch) => loop {
                tokio::select! {
                    entry = watch.next() => match entry {
                        Some(Ok(e)) => {
                            failures = 0;
                            if e.operation != kv::Operation::Put {
                                released.notify_one();
                            }
                        }
                        Some(Err(e)) => {
                            tracing::debug!(error = %e, "lease watch failed; reopening it");
                            break;
                        }
                        None => break,
                    },
                    _ = stop.cancelled() => return,
                }
            },
            Err(e) => tracing::debug!(error = %e, "cannot watch the lease; polling only"),
        }
        failures += 1;
        if !crate::retry::pause(&stop, krest_schemas::Backoff::RECONNECT, failures).await {
            return;
        }
    }
}

/// A renewal attempt, owning what it needs (it may outlive its round).
type Attempt = std::pin::Pin<Box<dyn std::future::Future<Output = Renewal> + Send>>;

/// The lease this node holds.
struct Held {
    /// The revision it was acquired at.
    epoch: u64,
    /// Its revision as last written by this node.
    rev: u64,
    acquired_at: DateTime<Utc>,
    /// The last renewal went unanswered or failed without saying the lease is gone: it may have
    /// been applied (the key is then at a later revision of ours), or the lease may be another
    /// node's now. The next attempt reads the key first.
    unsure: bool,
    /// The last attempt that timed out, and when it started: still waited for beside the next
    /// one, since an answer that comes late is as good (it counts from when it started).
    late: Option<(Instant, Attempt)>,
}

/// How a renewal attempt ended (short of its timeout).
#[derive(Debug)]
enum Renewal {
    /// Renewed: the new revision.
    Renewed(u64),
    /// The lease is not this node's any more (why).
    Lost(String),
    /// It failed without saying whether the lease is still ours (the error).
    Unsure(String),
}

/// When the election looks next.
#[derive(Debug)]
enum Next {
    /// At the next tick of `renew_every`.
    Tick,
    /// This long from now (a renewal to retry).
    Retry(Duration),
}

/// The lease value `node` writes for `epoch`.
fn lease_value(node: &str, epoch: u64, acquired_at: DateTime<Utc>) -> bytes::Bytes {
    let lease = LeaderLease {
        node: node.to_string(),
        epoch,
        acquired_at,
        renewed_at: Utc::now(),
    };
    serde_json::to_vec(&lease).unwrap_or_default().into()
}

/// One renewal attempt of `node`'s lease of `epoch`, last written at `rev`. With `check` (the
/// last attempt left it unsure), and after a refusal because the key changed, it reads the key
/// first and goes on only from a revision that still holds this node's lease of this epoch.
async fn renew(
    kv: kv::Store,
    node: String,
    epoch: u64,
    mut rev: u64,
    acquired_at: DateTime<Utc>,
    mut check: bool,
) -> Renewal {
    // A refusal after a read that found the lease ours means it changed again in between (a
    // late renewal of ours landing): read once more, then leave it to the next attempt.
    for _ in 0..3 {
        if check {
            let entry = match kv.entry(LEADER_KEY).await {
                Ok(entry) => entry,
                Err(e) => return Renewal::Unsure(format!("cannot read the lease: {e}")),
            };
            match holds(&node, epoch, put_value(entry.as_ref())) {
                Ok(r) => {
                    if r != rev {
                        tracing::info!(
                            epoch,
                            "a lease renewal that went unanswered had been applied; renewing from it"
                        );
                    }
                    rev = r;
                }
                Err(why) => return Renewal::Lost(why),
            }
        }
        match kv
            .update(LEADER_KEY, lease_value(&node, epoch, acquired_at), rev)
            .await
        {
            Ok(new_rev) => return Renewal::Renewed(new_rev),
            Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => check = true,
            Err(e) => return Renewal::Unsure(e.to_string()),
        }
    }
    Renewal::Unsure("the lease kept changing while it was renewed".to_string())
}

/// The first answer of `fresh` (an attempt started at `sent`) and of `late` (an earlier attempt
/// that timed out, still in flight): a success of either — with when its attempt started —, or
/// else what `fresh` says. `late` is kept while it has not answered.
async fn first_answer(
    sent: Instant,
    fresh: &mut Attempt,
    late: &mut Option<(Instant, Attempt)>,
) -> (Instant, Renewal) {
    if let Some((late_sent, mut late_attempt)) = late.take() {
        tokio::select! {
            r = &mut late_attempt => {
                if matches!(r, Renewal::Renewed(_)) {
                    tracing::info!("a lease renewal that timed out succeeded after all");
                    return (late_sent, r);
                }
            }
            r = &mut *fresh => {
                *late = Some((late_sent, late_attempt));
                return (sent, r);
            }
        }
    }
    (sent, fresh.await)
}

/// The value and revision of a lease key's entry as read; `None` if it was deleted or purged.
fn put_value(entry: Option<&kv::Entry>) -> Option<(&[u8], u64)> {
    entry
        .filter(|e| e.operation == kv::Operation::Put)
        .map(|e| (e.value.as_ref(), e.revision))
}

/// Whether the lease's current value (`Some((value, revision))`; `None`: deleted or expired)
/// is `node`'s lease of `epoch`: its revision if so, why not otherwise. A lease just acquired
/// holds epoch 0 until its first renewal; its revision is then the epoch.
fn holds(node: &str, epoch: u64, current: Option<(&[u8], u64)>) -> Result<u64, String> {
    let Some((value, revision)) = current else {
        return Err("the lease is gone (deleted or expired)".to_string());
    };
    match serde_json::from_slice::<LeaderLease>(value) {
        Ok(lease) => {
            let its_epoch = if lease.epoch == 0 {
                revision
            } else {
                lease.epoch
            };
            if lease.node == node && its_epoch == epoch {
                Ok(revision)
            } else {
                Err(format!(
                    "the lease is held by {} (epoch {its_epoch})",
                    lease.node
                ))
            }
        }
        Err(_) => Err("the lease key holds something that is not a lease".to_string()),
    }
}

impl Election {
    /// Creates the election and the handle to observe it.
    pub fn new(kv: kv::Store, cfg: LeaseConfig) -> (Election, Leadership) {
        let (role_tx, role) = watch::channel(Role::Standby);
        let validity = Validity::default();
        let rounds = Arc::new(AtomicU64::new(0));
        (
            Election {
                kv,
                cfg,
                role_tx,
                validity: validity.clone(),
                rounds: rounds.clone(),
                can_lead: None,
            },
            Leadership {
                role,
                validity,
                rounds,
            },
        )
    }

    /// Campaigns for the lease only while `can_lead` is true (the node's job table is
    /// loaded: [`crate::jobs::JobTable::loaded`]), and at once when it turns true. Renewing a
    /// lease held does not look at it.
    pub fn campaign_when(mut self, can_lead: watch::Receiver<bool>) -> Election {
        self.can_lead = Some(can_lead);
        self
    }

    fn may_campaign(&self) -> bool {
        self.can_lead.as_ref().is_none_or(|rx| *rx.borrow())
    }

    fn set(&self, role: Role, valid: Option<(u64, Instant)>) {
        self.validity.set(valid);
        self.role_tx.send_if_modified(|r| {
            if *r != role {
                *r = role;
                true
            } else {
                false
            }
        });
    }

    fn lease_value(&self, epoch: u64, acquired_at: DateTime<Utc>) -> bytes::Bytes {
        lease_value(&self.cfg.node, epoch, acquired_at)
    }

    /// The election loop.
    pub async fn run(self, stop: CancellationToken) {
        let mut held: Option<Held> = None;
        let mut tick = tokio::time::interval(self.cfg.renew_every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let released = Arc::new(tokio::sync::Notify::new());
        let watcher = tokio::spawn(watch_releases(
            self.kv.clone(),
            released.clone(),
            stop.child_token(),
        ));
        let mut can_lead = self.can_lead.clone();
        let mut waiting_logged = false;
        loop {
            let may_campaign = self.may_campaign();
            tokio::select! {
                _ = tick.tick() => {}
                // A standby tries at once when the leader lets go,
                _ = released.notified(), if held.is_none() => {}
                // and once its job table is loaded.
                _ = able_to_lead(&mut can_lead), if held.is_none() && !may_campaign => {}
                _ = stop.cancelled() => break,
            }
            let next = self.round(&mut held, &mut waiting_logged).await;
            self.rounds.fetch_add(1, Ordering::SeqCst);
            match next {
                Next::Tick => {}
                Next::Retry(after) => tick.reset_after(after),
            }
        }
        watcher.abort();
        self.set(Role::Standby, None);
        if let Some(h) = held {
            let epoch = h.epoch;
            match tokio::time::timeout(self.cfg.ttl, self.release(h.epoch, h.rev, h.unsure)).await {
                Ok(Ok(())) => tracing::info!(epoch, "released leadership"),
                Ok(Err(e)) => {
                    tracing::warn!(epoch, error = %e, "could not release the lease; it expires by itself")
                }
                Err(_) => tracing::warn!(
                    epoch,
                    "could not release the lease (NATS did not answer); it expires by itself"
                ),
            }
        }
    }

    /// Deletes this node's lease of `epoch` last written at `rev` (at the revision read first if
    /// the last renewal left it `unsure`); leaves the key alone if it is not this node's lease any more.
    async fn release(&self, epoch: u64, mut rev: u64, unsure: bool) -> Result<(), String> {
        if unsure {
            let entry = self.kv.entry(LEADER_KEY).await.map_err(|e| e.to_string())?;
            rev = holds(&self.cfg.node, epoch, put_value(entry.as_ref()))?;
        }
        self.kv
            .delete_expect_revision(LEADER_KEY, Some(rev))
            .await
            .map_err(|e| e.to_string())
    }

    /// How long one attempt (a renewal, a campaign) may take.
    fn attempt_timeout(&self) -> Duration {
        self.cfg.renew_every.max(Duration::from_millis(500))
    }

    fn step_down(&self, held: &mut Option<Held>) {
        *held = None;
        self.set(Role::Standby, None);
    }

    /// One round: renew the lease held, or campaign for it if the node may lead.
    async fn round(&self, held: &mut Option<Held>, waiting_logged: &mut bool) -> Next {
        let sent = Instant::now();
        let timeout = self.attempt_timeout();
        match held {
            Some(h) => {
                let epoch = h.epoch;
                // Our own clock may say the lease is gone already (the process was frozen, or
                // no renewal succeeded in time).
                let Some(valid_until) = self.validity.until(epoch) else {
                    tracing::warn!(
                        epoch,
                        "lease expired before it could be renewed; stepping down"
                    );
                    self.step_down(held);
                    return Next::Tick;
                };
                let mut fresh: Attempt = Box::pin(renew(
                    self.kv.clone(),
                    self.cfg.node.clone(),
                    epoch,
                    h.rev,
                    h.acquired_at,
                    h.unsure,
                ));
                let answer = first_answer(sent, &mut fresh, &mut h.late);
                match tokio::time::timeout_at(valid_until.min(sent + timeout), answer).await {
                    Ok((from, Renewal::Renewed(rev))) => {
                        if h.unsure {
                            tracing::info!(epoch, "lease renewed again");
                        }
                        h.rev = rev;
                        h.unsure = false;
                        h.late = None;
                        self.set(
                            Role::Leader { epoch },
                            Some((epoch, from + self.cfg.ttl - self.cfg.margin())),
                        );
                        Next::Tick
                    }
                    Ok((_, Renewal::Lost(why))) => {
                        tracing::warn!(epoch, "lost leadership: {why}");
                        self.step_down(held);
                        Next::Tick
                    }
                    Ok((_, Renewal::Unsure(error))) => {
                        tracing::warn!(
                            epoch, %error,
                            valid_for = ?valid_until.saturating_duration_since(Instant::now()),
                            "lease renewal failed; still leading, retrying"
                        );
                        h.unsure = true;
                        Next::Retry(self.cfg.renew_every / 4)
                    }
                    Err(_) if Instant::now() >= valid_until => {
                        tracing::warn!(
                            epoch,
                            "lost leadership: no lease renewal succeeded before the lease's validity ended"
                        );
                        self.step_down(held);
                        Next::Tick
                    }
                    Err(_) => {
                        tracing::warn!(
                            epoch,
                            valid_for = ?valid_until.saturating_duration_since(Instant::now()),
                            "lease renewal timed out; still leading, retrying"
                        );
                        h.unsure = true;
                        h.late = Some((sent, fresh));
                        Next::Retry(Duration::ZERO)
                    }
                }
            }
            None if !self.may_campaign() => {
                if !*waiting_logged {
                    *waiting_logged = true;
                    tracing::info!(
                        node = %self.cfg.node,
                        "not campaigning for the lease until the job table is loaded"
                    );
                }
                Next::Tick
            }
            None => {
                match tokio::time::timeout(timeout, self.try_acquire()).await {
                    Ok(Ok(Some((rev, acquired_at)))) => {
                        tracing::info!(node = %self.cfg.node, epoch = rev, "became leader");
                        *held = Some(Held {
                            epoch: rev,
                            rev,
                            acquired_at,
                            unsure: false,
                            late: None,
                        });
                        self.set(
                            Role::Leader { epoch: rev },
                            Some((rev, sent + self.cfg.ttl - self.cfg.margin())),
                        );
                    }
                    Ok(Ok(None)) => {}
                    Ok(Err(e)) => tracing::debug!(error = %e, "lease acquisition failed"),
                    Err(_) => tracing::debug!("lease acquisition timed out"),
                }
                Next::Tick
            }
        }
    }

    /// Creates the lease, or reclaims it when the current value names this node (a renewal
    /// that timed out but was applied). Returns the revision and acquisition time.
    async fn try_acquire(&self) -> Result<Option<(u64, DateTime<Utc>)>, String> {
        let now = Utc::now();
        match self.kv.entry(LEADER_KEY).await.map_err(|e| e.to_string())? {
            Some(entry) if entry.operation == kv::Operation::Put => {
                let ours = serde_json::from_slice::<LeaderLease>(&entry.value)
                    .map(|l| l.node == self.cfg.node)
                    .unwrap_or(false);
                if !ours {
                    return Ok(None);
                }
                match self
                    .kv
                    .update(LEADER_KEY, self.lease_value(0, now), entry.revision)
                    .await
                {
                    Ok(rev) => Ok(Some((rev, now))),
                    Err(_) => Ok(None),
                }
            }
            _ => match self.kv.create(LEADER_KEY, self.lease_value(0, now)).await {
                Ok(rev) => Ok(Some((rev, now))),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(None),
                Err(e) => Err(e.to_string()),
            },
        }
    }
}

/// Reads the current lease and its epoch (the revision it was acquired at; until the first
/// renewal records it, the current revision). A value that is not a lease (written by something
/// other than a node) counts as no leader: it blocks elections only until it expires.
pub async fn current(kv: &kv::Store) -> Result<Option<LeaderLease>, String> {
    match kv.entry(LEADER_KEY).await.map_err(|e| e.to_string())? {
        Some(entry) if entry.operation == kv::Operation::Put => {
            match serde_json::from_slice::<LeaderLease>(&entry.value) {
                Ok(mut lease) => {
                    if lease.epoch == 0 {
                        lease.epoch = entry.revision;
                    }
                    Ok(Some(lease))
                }
                Err(e) => {
                    tracing::warn!(error = %krest_schemas::text::shorten_quoted(&e.to_string()), "the leader key holds something that is not a lease; it expires with the lease TTL");
                    Ok(None)
                }
            }
        }
        _ => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lease(node: &str, epoch: u64) -> Vec<u8> {
        serde_json::to_vec(&LeaderLease {
            node: node.to_string(),
            epoch,
            acquired_at: Utc::now(),
            renewed_at: Utc::now(),
        })
        .unwrap()
    }

    #[test]
    fn a_renewal_goes_on_only_from_this_nodes_lease_of_this_epoch() {
        // Renewed (by a renewal that timed out but landed): ours, at the revision read.
        assert_eq!(holds("a", 7, Some((&lease("a", 7), 9))), Ok(9));
        // Just acquired at 7, never renewed: epoch 0 in the value, the revision is the epoch.
        assert_eq!(holds("a", 7, Some((&lease("a", 0), 7))), Ok(7));
        // Another node's, or this node's of another epoch (reclaimed by a process of the same
        // name), or gone, or not a lease: not ours.
        let not = |r: Result<u64, String>| r.unwrap_err();
        assert!(not(holds("a", 7, Some((&lease("b", 12), 12)))).contains("held by b (epoch 12)"));
        assert!(not(holds("a", 7, Some((&lease("b", 0), 12)))).contains("held by b (epoch 12)"));
        assert!(not(holds("a", 7, Some((&lease("a", 10), 11)))).contains("held by a (epoch 10)"));
        assert!(not(holds("a", 7, Some((&lease("a", 0), 10)))).contains("held by a (epoch 10)"));
        assert!(not(holds("a", 7, None)).contains("gone"));
        assert!(not(holds("a", 7, Some((b"{}", 9)))).contains("not a lease"));
    }
}
