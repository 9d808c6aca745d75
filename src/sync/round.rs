//! One sync round: make the local registry hold every repository, tag and manifest of every
//! peer, copying only what is missing.
//!
//! Order is what keeps an interrupted round harmless: a manifest is pushed only after its
//! blobs (image) or child manifests (index) exist locally, so a reader of the local registry
//! never finds a manifest it cannot pull. Work left undone is found again by the next round,
//! because the tag still differs.
//!
//! A tag that points at different digests here and on a peer is settled by
//! [`peer_wins`], from the digest both sides last agreed on for that tag ([`Agreements`],
//! kept across restarts with `--state-file`):
//!
//! - the local tag moved away from the agreed digest and the peer's did not: it was pushed
//!   here more recently; it is kept, and the peer copies it in its own round;
//! - the peer's tag moved and the local one did not: the peer's digest is copied;
//! - no agreed digest (new replicas, the same new tag pushed to two replicas before they
//!   synced, a lost memory), or both moved: the lexicographically greater digest string wins.
//!   Every replica applies the same rule to the same two digests, so rounds that run at the
//!   same moment on two replicas converge instead of swapping their digests;
//! - a tag missing locally is always copied.
//!
//! The memory is each replica's own. If only replica A remembers agreeing with B on a tag
//! (B's state file was lost, or B runs without one and restarted, or the tag was pushed to
//! both and B has not run a round since), and the tag is then pushed to A with a digest
//! smaller than B's, A keeps it by memory and B keeps its own by the tie-break: the two differ
//! until the tag is pushed to B or deleted from one of them.
//!
//! At most one digest is written to a local tag per round; a peer holding yet another digest
//! is compared again in the next round, against what was written.
//!
//! Local tags are HEADed only when needed: a peer tag at the digest the local tag was last
//! seen at (HEADed, written by a round, or reported by a push notification) is taken as
//! agreed without asking the local registry. A tag deleted locally behind the syncer's back
//! is noticed in the next round that HEADs every local tag, one in [`FULL_CHECK_EVERY`].
//! A restarted syncer (and every `sync --once`) starts from the state file: while its last
//! such full check is younger than [`FULL_CHECK_EVERY`] round intervals, the digests agreed
//! with every peer are taken as last seen locally, and the first round HEADs only the rest;
//! otherwise, or without a state file, the first round HEADs every local tag.
//!
//! At the end of a round the memory forgets tags that exist neither locally nor on the peer
//! (as far as the round could list the peer), and is written back when it changed.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use oci_spec::image::Digest;
use tokio::sync::OnceCell;

use super::state::{AgreementKey, Agreements, PeerListing};
use crate::oci::verify::VerifiedStream;
use crate::oci::{
    Manifest, OciError, Reference, Registry, UploadStart, dependencies, valid_repository, valid_tag,
};

/// What one round did, per peer and in total.
#[derive(Debug, Clone, Default)]
pub struct RoundReport {
    pub peers: Vec<PeerReport>,
    /// The local registry could not be reached: the round did not start.
    pub local_error: Option<String>,
    /// Distinct repositories seen on the peers.
    pub repositories: usize,
    /// Tags examined, summed over peers.
    pub tags: usize,
    /// Tags pointed at a new manifest locally.
    pub tags_copied: u64,
    /// Manifests pushed locally (tagged ones and the children of indexes).
    pub manifests_copied: u64,
    /// Blobs uploaded to the local registry.
    pub blobs_copied: u64,
    /// Blobs made present by a cross-repository mount, without transferring them.
    pub blobs_mounted: u64,
    pub bytes_copied: u64,
    /// Blob downloads from peers (including failed attempts).
    pub blob_gets: u64,
    /// `tags/list` pages fetched from peers.
    pub tag_lists: u64,
    /// Manifest HEADs sent to peers.
    pub peer_manifest_heads: u64,
    /// Manifest HEADs sent to the local registry.
    pub local_manifest_heads: u64,
    /// The state file could not be written (the next round tries again).
    pub state_error: Option<String>,
    pub duration: Duration,
}

/// The part of a round that concerns one peer.
#[derive(Debug, Clone, Default)]
pub struct PeerReport {
    pub name: String,
    pub repositories: usize,
    pub tags: usize,
    /// One message per failure (after retries); each names registry, repository, reference.
    pub errors: Vec<String>,
}

impl RoundReport {
    /// The local registry answered and no peer failed.
    pub fn is_success(&self) -> bool {
        self.local_error.is_none() && self.peers.iter().all(|p| p.errors.is_empty())
    }

    pub fn error_count(&self) -> usize {
        usize::from(self.local_error.is_some())
            + self.peers.iter().map(|p| p.errors.len()).sum::<usize>()
    }

    pub fn failed_peers(&self) -> Vec<&str> {
        self.peers
            .iter()
            .filter(|p| !p.errors.is_empty())
            .map(|p| p.name.as_str())
            .collect()
    }
}

/// What [`Syncer::push_out`] did with a tag and a peer.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PushOutcome {
    /// The peer held the digest already.
    #[default]
    Present,
    /// The digest was copied and the peer's tag points at it.
    Copied,
    /// The peer's tag points at another digest that wins by the conflict rules.
    PeerKept,
}

impl PushOutcome {
    pub fn as_str(self) -> &'static str {
        match self {
            PushOutcome::Present => "present",
            PushOutcome::Copied => "copied",
            PushOutcome::PeerKept => "peer_kept",
        }
    }
}

/// What one [`Syncer::push_out`] moved.
#[derive(Debug, Clone, Default)]
pub struct PushReport {
    pub outcome: PushOutcome,
    pub manifests_copied: u64,
    pub blobs_copied: u64,
    pub blobs_mounted: u64,
    pub bytes_copied: u64,
}

/// Keeps a local registry a superset of its peers, round after round.
pub struct Syncer {
    local: Arc<Registry>,
    peers: Vec<Arc<Registry>>,
    concurrency: usize,
    attempts: u32,
    backoff: Duration,
    /// Per (peer URL, repository, tag): the digest both sides last agreed on (see the
    /// module documentation).
    agreed: Agreements,
    /// The local digest of each tag as last seen (HEAD, own write, push notification), kept
    /// across rounds: a peer tag found at that digest needs no local HEAD. Only a "nothing to
    /// do" answer is taken from it; any difference is checked against the local registry.
    /// Emptied every [`FULL_CHECK_EVERY`] rounds, so that a tag deleted locally behind the
    /// syncer's back is copied again within that many rounds.
    local_seen: Mutex<HashMap<(String, String), Digest>>,
    rounds: AtomicU64,
    /// How long a full check recorded in the state file is trusted by a fresh process.
    full_check_age: Duration,
}

/// Rounds between two in which every local tag is HEADed again (see `Syncer::local_seen`).
pub const FULL_CHECK_EVERY: u64 = 10;

/// The sidecar's default round interval, for [`Syncer::with_round_interval`]'s default.
const DEFAULT_ROUND_INTERVAL: Duration = Duration::from_secs(120);

impl Syncer {
    pub fn new(
        local: Arc<Registry>,
        peers: Vec<Arc<Registry>>,
        concurrency: usize,
        attempts: u32,
        backoff: Duration,
    ) -> Self {
        Syncer {
            local,
            peers,
            concurrency: concurrency.max(1),
            attempts: attempts.max(1),
            backoff,
            agreed: Agreements::in_memory(),
            local_seen: Mutex::default(),
            rounds: AtomicU64::new(0),
            full_check_age: DEFAULT_ROUND_INTERVAL * FULL_CHECK_EVERY as u32,
        }
    }

    /// The time between rounds: a full check recorded in the state file less than
    /// [`FULL_CHECK_EVERY`] intervals ago spares a fresh process the local HEADs.
    pub fn with_round_interval(mut self, interval: Duration) -> Self {
        self.full_check_age = interval.saturating_mul(FULL_CHECK_EVERY as u32);
        self
    }

    /// Keeps the memory of agreed digests in `path`: loaded now (a missing, unreadable or
    /// corrupt file is an empty memory, the last two logged), written after every round that
    /// changed it.
    pub fn with_state_file(mut self, path: &Path) -> Self {
        self.agreed = Agreements::from_file(path);
        self
    }

    /// The memory of agreed digests.
    pub fn agreements(&self) -> &Agreements {
        &self.agreed
    }

    pub fn local(&self) -> &Registry {
        &self.local
    }

    pub fn peers(&self) -> &[Arc<Registry>] {
        &self.peers
    }

    /// Runs one round over every peer concurrently; a failing peer does not stop the others.
    pub async fn round(&self) -> RoundReport {
        let started = Instant::now();
        // Without the local registry every peer would seem to fail; say what is wrong.
        if let Err(err) = self.local.ping().await {
            return RoundReport {
                local_error: Some(err.to_string()),
                duration: started.elapsed(),
                ..RoundReport::default()
            };
        }
        let started_at = SystemTime::now();
        let round_no = self.rounds.fetch_add(1, Ordering::Relaxed);
        let full_check = if round_no == 0 {
            !self.trust_state(started_at)
        } else {
            round_no % FULL_CHECK_EVERY == 0
        };
        if full_check {
            lock(&self.local_seen).clear();
        }
        let before = self.request_totals();
        let round = Round {
            syncer: self,
            dst: &self.local,
            state: RoundState::default(),
        };
        let peer_reports =
            futures::future::join_all(self.peers.iter().map(|peer| round.sync_peer(peer))).await;
        round.forget_vanished_tags().await;
        if full_check && peer_reports.iter().all(|p| p.errors.is_empty()) {
            self.agreed.mark_local_checked(started_at);
        }
        let state_error = self.agreed.save_if_changed().await.err();
        if let Some(error) = &state_error {
            tracing::warn!(error = %error, "cannot write the sync state file; trying again after the next round");
        }
        let after = self.request_totals();
        let s = &round.state;
        RoundReport {
            local_error: None,
            repositories: lock(&s.repositories).len(),
            tags: peer_reports.iter().map(|p| p.tags).sum(),
            peers: peer_reports,
            tags_copied: s.tags_copied.load(Ordering::Relaxed),
            manifests_copied: s.manifests_copied.load(Ordering::Relaxed),
            blobs_copied: s.blobs_copied.load(Ordering::Relaxed),
            blobs_mounted: s.blobs_mounted.load(Ordering::Relaxed),
            bytes_copied: s.bytes_copied.load(Ordering::Relaxed),
            blob_gets: after.0 - before.0,
            tag_lists: after.1 - before.1,
            peer_manifest_heads: after.2 - before.2,
            local_manifest_heads: after.3 - before.3,
            state_error,
            duration: started.elapsed(),
        }
    }

    /// Copies the local `repo:tag`, which holds `digest`, to `peer` now, as the peer's own
    /// round would copy it from here: children and blobs first, the tag last. One HEAD when
    /// the peer has it already. A peer tag that differs is replaced only when the rules of
    /// [`peer_wins`] keep the local digest; otherwise the rounds settle it. Records the
    /// agreement once the peer holds the digest, so that the next round does not take the
    /// peer's older digest back.
    pub async fn push_out(
        &self,
        peer: &Registry,
        repo: &str,
        tag: &str,
        digest: &Digest,
    ) -> Result<PushReport, OciError> {
        // Before the peer's tag, as in a round (see `Round::sync_tag`).
        let memory = self.agreed.get(peer.name(), repo, tag);
        let peer_digest = match peer.head_manifest(repo, tag).await? {
            None => None,
            Some(head) => Some(match head.digest {
                Some(d) => d,
                None => peer.get_manifest(repo, tag).await?.digest,
            }),
        };
        let mut report = PushReport::default();
        match &peer_digest {
            Some(d) if d == digest => {
                self.agreed.record(peer.name(), repo, tag, digest);
                report.outcome = PushOutcome::Present;
                return Ok(report);
            }
            Some(d) if peer_wins(memory.as_ref(), digest, d) => {
                report.outcome = PushOutcome::PeerKept;
                return Ok(report);
            }
            _ => {}
        }
        let round = Round {
            syncer: self,
            dst: peer,
            state: RoundState::default(),
        };
        let manifest = self.local.get_manifest(repo, digest.as_ref()).await?;
        round
            .ensure_dependencies(&self.local, repo, &manifest)
            .await?;
        peer.put_manifest(repo, tag, &manifest).await?;
        self.agreed.record(peer.name(), repo, tag, digest);
        let s = &round.state;
        report.outcome = PushOutcome::Copied;
        report.manifests_copied = s.manifests_copied.load(Ordering::Relaxed) + 1;
        report.blobs_copied = s.blobs_copied.load(Ordering::Relaxed);
        report.blobs_mounted = s.blobs_mounted.load(Ordering::Relaxed);
        report.bytes_copied = s.bytes_copied.load(Ordering::Relaxed);
        Ok(report)
    }

    /// Records that `peer` agrees on `repo:tag` when it holds `digest`, which the local tag
    /// holds; says whether it does. Never writes to a registry.
    pub async fn learn(
        &self,
        peer: &Registry,
        repo: &str,
        tag: &str,
        digest: &Digest,
    ) -> Result<bool, OciError> {
        let held = match peer.head_manifest(repo, tag).await {
            Ok(Some(head)) => head.digest.as_ref() == Some(digest),
            Ok(None) => false,
            Err(err) => {
                tracing::debug!(peer = peer.name(), repo, tag, error = %err, "cannot check a peer's tag");
                return Err(err);
            }
        };
        if held {
            self.agreed.record(peer.name(), repo, tag, digest);
        }
        Ok(held)
    }

    /// Notes that the local `repo:tag` now holds `digest` (a push notification said so).
    pub fn saw_local(&self, repo: &str, tag: &str, digest: &Digest) {
        lock(&self.local_seen).insert((repo.to_string(), tag.to_string()), digest.clone());
    }

    /// Before the first round: takes the digests agreed with every peer as last seen locally
    /// when the state file's last full check is recent; says whether it did. What a push
    /// notification reported already is newer and kept.
    fn trust_state(&self, now: SystemTime) -> bool {
        let recent = self
            .agreed
            .local_checked()
            .and_then(|at| now.duration_since(at).ok())
            .is_some_and(|age| age < self.full_check_age);
        if !recent {
            return false;
        }
        let known = self.agreed.local_digests();
        tracing::debug!(
            tags = known.len(),
            "trusting the state file for the local tags"
        );
        let mut seen = lock(&self.local_seen);
        for (key, digest) in known {
            seen.entry(key).or_insert(digest);
        }
        true
    }

    fn seen_local(&self, repo: &str, tag: &str) -> Option<Digest> {
        lock(&self.local_seen)
            .get(&(repo.to_string(), tag.to_string()))
            .cloned()
    }

    fn request_totals(&self) -> (u64, u64, u64, u64) {
        let load = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut t = (0, 0, 0, load(&self.local.stats.manifest_heads));
        for p in &self.peers {
            t.0 += load(&p.stats.blob_gets);
            t.1 += load(&p.stats.tag_lists);
            t.2 += load(&p.stats.manifest_heads);
        }
        t
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // Nothing here can be left half-updated by a panic; keep going with the data.
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Whether a tag that differs between a peer and the local registry takes the peer's digest,
/// given the digest both last agreed on (see the module documentation). The same answer on
/// both replicas: called there with `local` and `peer` swapped, it says the opposite.
pub fn peer_wins(agreed: Option<&Digest>, local: &Digest, peer: &Digest) -> bool {
    match agreed {
        // The local tag moved since: pushed here more recently.
        Some(agreed) if agreed == peer => false,
        // The peer's tag moved since.
        Some(agreed) if agreed == local => true,
        // No memory, or both moved: a choice both sides make alike.
        _ => peer.as_ref() > local.as_ref(),
    }
}

/// A once-per-round piece of work shared by every task that needs it: the first runs it,
/// the others wait for its result; a failure leaves it to be tried again.
type Shared<K, V> = Mutex<HashMap<K, Arc<OnceCell<V>>>>;

fn shared<K: Hash + Eq + Clone, V>(map: &Shared<K, V>, key: &K) -> Arc<OnceCell<V>> {
    lock(map).entry(key.clone()).or_default().clone()
}

/// What the local registry is known to hold during one round.
#[derive(Default)]
struct RoundState {
    repositories: Mutex<HashSet<String>>,
    /// Local digest of each (repository, tag), HEADed once for all peers.
    local_tags: Shared<(String, String), Option<Digest>>,
    /// The digest written to each local tag this round: two peers with the same content do
    /// not copy it twice, and two with different content do not both overwrite the tag.
    tag_copies: Shared<(String, String), Digest>,
    /// What each peer listed this round, by peer name; absent when its catalog failed.
    listings: Mutex<HashMap<String, PeerListing>>,
    /// Manifests by digest known present locally, per repository.
    manifests: Shared<(String, Digest), ()>,
    /// Blobs made present locally, per repository, each by one task: Distribution 2.8's
    /// filesystem driver rewrites a blob's link in place, so two mounts of one blob into one
    /// repository at once can make a manifest push that reads the link between them fail
    /// (`MANIFEST_BLOB_UNKNOWN`).
    blobs_present: Shared<(String, Digest), ()>,
    /// A local repository holding each blob: the source of cross-repository mounts.
    blob_home: Mutex<HashMap<Digest, String>>,
    /// Blob transfers in progress, by digest, resolving to the repository received into.
    blob_copies: Shared<Digest, String>,
    tags_copied: AtomicU64,
    manifests_copied: AtomicU64,
    blobs_copied: AtomicU64,
    blobs_mounted: AtomicU64,
    bytes_copied: AtomicU64,
}

/// The copy work of a round, into `dst`: the local registry in a sync round, a peer when a
/// tag pushed here is pushed out at once ([`Syncer::push_out`]). The methods call `dst`
/// "local" and their source "peer", as a round sees them.
struct Round<'a> {
    syncer: &'a Syncer,
    dst: &'a Registry,
    state: RoundState,
}

impl Round<'_> {
    fn local(&self) -> &Registry {
        self.dst
    }

    async fn sync_peer(&self, peer: &Registry) -> PeerReport {
        let mut report = PeerReport {
            name: peer.name().to_string(),
            ..PeerReport::default()
        };
        let repos = match peer.catalog().await {
            Ok(repos) => repos,
            Err(err) => {
                tracing::warn!(peer = peer.name(), error = %err, "cannot list the peer's repositories");
                report.errors.push(err.to_string());
                return report;
            }
        };
        lock(&self.state.listings).insert(peer.name().to_string(), PeerListing::default());
        let concurrency = self.syncer.concurrency;
        let mut results = futures::stream::iter(repos)
            .map(|repo| self.sync_repository(peer, repo))
            .buffer_unordered(concurrency);
        while let Some((tags, errors)) = results.next().await {
            report.repositories += 1;
            report.tags += tags;
            report.errors.extend(errors);
        }
        report
    }

    fn listed(&self, peer: &Registry, update: impl FnOnce(&mut PeerListing)) {
        if let Some(listing) = lock(&self.state.listings).get_mut(peer.name()) {
            update(listing);
        }
    }

    async fn sync_repository(&self, peer: &Registry, repo: String) -> (usize, Vec<String>) {
        if !valid_repository(&repo) {
            let msg = format!("registry {}: invalid repository name {repo:?}", peer.name());
            tracing::warn!(peer = peer.name(), "{msg}");
            return (0, vec![msg]);
        }
        lock(&self.state.repositories).insert(repo.clone());
        let tags = match peer.tags(&repo).await {
            Ok(tags) => tags,
            Err(err) => {
                tracing::warn!(peer = peer.name(), repo, error = %err, "cannot list tags");
                self.listed(peer, |l| {
                    l.unlisted.insert(repo.clone());
                });
                return (0, vec![err.to_string()]);
            }
        };
        self.listed(peer, |l| {
            l.tags
                .extend(tags.iter().map(|tag| (repo.clone(), tag.clone())));
        });
        let count = tags.len();
        let errors: Vec<String> = futures::stream::iter(tags)
            .map(|tag| {
                let repo = &repo;
                async move {
                    if !valid_tag(&tag) {
                        return Err(format!(
                            "registry {}: {repo}: invalid tag {tag:?}",
                            peer.name()
                        ));
                    }
                    self.sync_tag(peer, repo, &tag).await.map_err(|err| {
                        tracing::warn!(peer = peer.name(), repo, tag, error = %err, "tag not synced");
                        format!("{repo}:{tag}: {err}")
                    })
                }
            })
            .buffer_unordered(self.syncer.concurrency)
            .filter_map(|r| async move { r.err() })
            .collect()
            .await;
        (count, errors)
    }

    async fn local_tag(&self, repo: &str, tag: &str) -> Result<Option<Digest>, OciError> {
        let cell = shared(&self.state.local_tags, &(repo.to_string(), tag.to_string()));
        let digest = cell
            .get_or_try_init(|| async {
                let digest = match self.local().head_manifest(repo, tag).await? {
                    None => None,
                    Some(head) => match head.digest {
                        Some(d) => Some(d),
                        // A registry that does not say: ask for the bytes.
                        None => Some(self.local().get_manifest(repo, tag).await?.digest),
                    },
                };
                let key = (repo.to_string(), tag.to_string());
                let mut seen = lock(&self.syncer.local_seen);
                match &digest {
                    Some(d) => seen.insert(key, d.clone()),
                    None => seen.remove(&key),
                };
                Ok::<_, OciError>(digest)
            })
            .await?;
        Ok(digest.clone())
    }

    async fn sync_tag(&self, peer: &Registry, repo: &str, tag: &str) -> Result<(), OciError> {
        let agreed = &self.syncer.agreed;
        // Read before the peer's tag: a tag pushed out to the peer meanwhile
        // (`Syncer::push_out`) is recorded only after the peer holds it, so an agreement
        // read here is never newer than the peer's digest read next. The other order could
        // pair a new agreement with the peer's old digest and revert the local tag.
        let memory = agreed.get(peer.name(), repo, tag);
        // A local tag not seen yet is HEADed at the same time as the peer's: two registries,
        // two queues.
        let seen = self.syncer.seen_local(repo, tag);
        let (head, early_local) = if seen.is_none() {
            let (head, local) =
                futures::join!(peer.head_manifest(repo, tag), self.local_tag(repo, tag));
            (head, Some(local))
        } else {
            (peer.head_manifest(repo, tag).await, None)
        };
        let Some(head) = head? else {
            // Deleted on the peer since the listing.
            return Ok(());
        };
        let peer_digest = match head.digest {
            Some(d) => d,
            None => peer.get_manifest(repo, tag).await?.digest,
        };
        if seen.as_ref() == Some(&peer_digest) {
            agreed.record(peer.name(), repo, tag, &peer_digest);
            return Ok(());
        }
        let local_digest = match early_local {
            Some(local) => local?,
            None => self.local_tag(repo, tag).await?,
        };
        if local_digest.as_ref() == Some(&peer_digest) {
            agreed.record(peer.name(), repo, tag, &peer_digest);
            return Ok(());
        }
        if let Some(local_digest) = &local_digest {
            if !peer_wins(memory.as_ref(), local_digest, &peer_digest) {
                tracing::debug!(
                    peer = peer.name(),
                    repo,
                    tag,
                    local = %local_digest,
                    peer_digest = %peer_digest,
                    agreed = memory.as_ref().map(|d| d.to_string()),
                    "keeping the local tag"
                );
                return Ok(());
            }
        }
        let cell = shared(&self.state.tag_copies, &(repo.to_string(), tag.to_string()));
        let written = cell
            .get_or_try_init(|| async {
                // By digest: the tag may move on the peer meanwhile; this content is fixed.
                let manifest = peer.get_manifest(repo, peer_digest.as_ref()).await?;
                self.ensure_dependencies(peer, repo, &manifest).await?;
                self.local().put_manifest(repo, tag, &manifest).await?;
                self.syncer.saw_local(repo, tag, &peer_digest);
                self.state.tags_copied.fetch_add(1, Ordering::Relaxed);
                self.state.manifests_copied.fetch_add(1, Ordering::Relaxed);
                // The manifest is now present by digest too.
                let _ = shared(
                    &self.state.manifests,
                    &(repo.to_string(), peer_digest.clone()),
                )
                .set(());
                tracing::debug!(peer = peer.name(), repo, tag, digest = %peer_digest, "tag copied");
                Ok::<Digest, OciError>(peer_digest.clone())
            })
            .await?;
        if *written != peer_digest {
            // Another peer's digest was written to this tag this round; the next round
            // compares this peer's with it.
            return Ok(());
        }
        agreed.record(peer.name(), repo, tag, &peer_digest);
        Ok(())
    }

    /// Drops the remembered agreements on tags that exist neither locally nor on their peer
    /// (see [`Agreements::absent_from_peers`]): the memory stays as large as the registries.
    /// A tag whose local presence cannot be checked is kept.
    async fn forget_vanished_tags(&self) {
        let configured: Vec<&str> = self.syncer.peers.iter().map(|p| p.name()).collect();
        let candidates = self
            .syncer
            .agreed
            .absent_from_peers(&configured, &lock(&self.state.listings));
        if candidates.is_empty() {
            return;
        }
        let gone: Vec<AgreementKey> = futures::stream::iter(candidates)
            .map(|key| async move {
                let (_, repo, tag) = &key;
                if !valid_repository(repo) || !valid_tag(tag) {
                    return Some(key);
                }
                // Usually known already: HEADed once this round for every tag a peer listed.
                match self.local_tag(repo, tag).await {
                    Ok(None) => Some(key),
                    Ok(Some(_)) | Err(_) => None,
                }
            })
            .buffer_unordered(self.syncer.concurrency)
            .filter_map(|gone| async move { gone })
            .collect()
            .await;
        self.syncer.agreed.remove(&gone);
    }

    /// Makes every child manifest and blob of `manifest` present locally. Goes on with the
    /// others when one fails, so that the next round has less to do, then reports the first
    /// failure.
    async fn ensure_dependencies(
        &self,
        peer: &Registry,
        repo: &str,
        manifest: &Manifest,
    ) -> Result<(), OciError> {
        let deps = dependencies(&manifest.media_type, &manifest.bytes).map_err(|reason| {
            OciError::Invalid {
                registry: peer.name().to_string(),
                what: format!("manifest {repo}@{}", manifest.digest),
                reason,
            }
        })?;
        let children = futures::future::join_all(
            deps.manifests
                .iter()
                .map(|c| self.ensure_manifest(peer, repo, c)),
        );
        let blobs =
            futures::future::join_all(deps.blobs.iter().map(|b| self.ensure_blob(peer, repo, b)));
        let (children, blobs) = futures::join!(children, blobs);
        children
            .into_iter()
            .chain(blobs)
            .collect::<Result<Vec<()>, _>>()?;
        Ok(())
    }

    /// A child manifest present locally by digest, copied depth-first if missing.
    fn ensure_manifest<'s>(
        &'s self,
        peer: &'s Registry,
        repo: &'s str,
        child: &'s Reference,
    ) -> BoxFuture<'s, Result<(), OciError>> {
        async move {
            let cell = shared(
                &self.state.manifests,
                &(repo.to_string(), child.digest.clone()),
            );
            cell.get_or_try_init(|| async {
                let digest = child.digest.as_ref();
                if self.local().head_manifest(repo, digest).await?.is_some() {
                    return Ok(());
                }
                let manifest = peer.get_manifest(repo, digest).await?;
                self.ensure_dependencies(peer, repo, &manifest).await?;
                self.local().put_manifest(repo, digest, &manifest).await?;
                self.state.manifests_copied.fetch_add(1, Ordering::Relaxed);
                Ok::<(), OciError>(())
            })
            .await?;
            Ok(())
        }
        .boxed()
    }

    /// A blob present in the local repository: already there, mounted from another local
    /// repository, or streamed from the peer.
    async fn ensure_blob(
        &self,
        peer: &Registry,
        repo: &str,
        blob: &Reference,
    ) -> Result<(), OciError> {
        let key = (repo.to_string(), blob.digest.clone());
        let present = shared(&self.state.blobs_present, &key);
        present
            .get_or_try_init(|| async {
                if self.local().blob_exists(repo, &blob.digest).await? {
                    self.blob_is_in(repo, &blob.digest);
                    return Ok(());
                }
                let cell = shared(&self.state.blob_copies, &blob.digest);
                let home = cell
                    .get_or_try_init(|| self.copy_blob(peer, repo, blob))
                    .await?
                    .clone();
                if home != repo {
                    // Another task brought the blob into another repository meanwhile.
                    self.mount_or_copy(peer, repo, blob, &home).await?;
                }
                self.blob_is_in(repo, &blob.digest);
                Ok::<(), OciError>(())
            })
            .await?;
        Ok(())
    }

    fn blob_is_in(&self, repo: &str, digest: &Digest) {
        lock(&self.state.blob_home)
            .entry(digest.clone())
            .or_insert_with(|| repo.to_string());
    }

    /// Brings a blob missing locally into `repo`; resolves to `repo`.
    async fn copy_blob(
        &self,
        peer: &Registry,
        repo: &str,
        blob: &Reference,
    ) -> Result<String, OciError> {
        let home = lock(&self.state.blob_home).get(&blob.digest).cloned();
        match home {
            Some(home) if home != repo => self.mount_or_copy(peer, repo, blob, &home).await?,
            _ => self.upload_blob(peer, repo, blob, None).await?,
        }
        Ok(repo.to_string())
    }

    async fn mount_or_copy(
        &self,
        peer: &Registry,
        repo: &str,
        blob: &Reference,
        from: &str,
    ) -> Result<(), OciError> {
        match self
            .local()
            .start_upload(repo, Some((&blob.digest, from)))
            .await?
        {
            UploadStart::Mounted => {
                self.state.blobs_mounted.fetch_add(1, Ordering::Relaxed);
                Ok(())
            }
            // The registry declined the mount and opened an ordinary upload instead.
            UploadStart::Session(session) => {
                self.upload_blob(peer, repo, blob, Some(session)).await
            }
        }
    }

    /// Streams a blob from the peer into the local repository, retrying the whole transfer
    /// (new download, new upload session) on transient failures.
    async fn upload_blob(
        &self,
        peer: &Registry,
        repo: &str,
        blob: &Reference,
        mut session: Option<reqwest::Url>,
    ) -> Result<(), OciError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let url = match session.take() {
                Some(url) => url,
                None => match self.local().start_upload(repo, None).await? {
                    UploadStart::Session(url) => url,
                    UploadStart::Mounted => return Ok(()),
                },
            };
            match self.transfer(peer, repo, blob, url.clone()).await {
                Ok(bytes) => {
                    self.state.blobs_copied.fetch_add(1, Ordering::Relaxed);
                    self.state.bytes_copied.fetch_add(bytes, Ordering::Relaxed);
                    return Ok(());
                }
                Err(err) => {
                    self.local().cancel_upload(repo, url).await;
                    let switch_to_chunks = matches!(err, OciError::MonolithicRefused { .. });
                    if attempt >= self.syncer.attempts || !(err.is_transient() || switch_to_chunks)
                    {
                        return Err(err);
                    }
                    tracing::debug!(peer = peer.name(), repo, digest = %blob.digest, attempt, error = %err, "blob transfer failed, retrying");
                    if !switch_to_chunks {
                        let delay = self
                            .syncer
                            .backoff
                            .saturating_mul(1 << (attempt - 1).min(10));
                        tokio::time::sleep(delay).await;
                    }
                }
            }
        }
    }

    /// One streamed transfer: peer GET → digest check → local PUT (or PATCH chunks).
    /// Returns the bytes moved.
    async fn transfer(
        &self,
        peer: &Registry,
        repo: &str,
        blob: &Reference,
        session: reqwest::Url,
    ) -> Result<u64, OciError> {
        // Always the remote registry first, then this replica's: every transfer, in a round
        // or pushing out, takes permits in one order and cannot deadlock.
        let (_first, _second) = if std::ptr::eq(peer, &*self.syncer.local) {
            let first = self.local().blob_permit().await;
            (first, peer.blob_permit().await)
        } else {
            let first = peer.blob_permit().await;
            (first, self.local().blob_permit().await)
        };
        let download = peer.get_blob(repo, &blob.digest).await?;
        let what = format!("blob {repo}@{}", blob.digest);
        if let (Some(expected), Some(served)) = (blob.size, download.size) {
            if expected != served {
                return Err(OciError::Invalid {
                    registry: peer.name().to_string(),
                    what,
                    reason: format!("serves {served} bytes, the manifest says {expected}"),
                });
            }
        }
        let size = blob.size.or(download.size);
        let (verified, report) = VerifiedStream::new(download.stream, blob.digest.clone(), size);
        let local = self.local();
        let result = if local.chunked_uploads() {
            local
                .upload_chunked(repo, session, &blob.digest, size, verified)
                .await
        } else {
            local
                .upload_monolithic(
                    repo,
                    session,
                    &blob.digest,
                    size,
                    reqwest::Body::wrap_stream(verified),
                )
                .await
        };
        if let Some((expected, actual)) = report.mismatch() {
            return Err(OciError::DigestMismatch {
                registry: peer.name().to_string(),
                what,
                expected,
                actual,
            });
        }
        result?;
        Ok(report.bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(n: u8) -> Digest {
        format!("sha256:{}", hex::encode([n; 32])).parse().unwrap()
    }

    #[test]
    fn the_side_that_moved_wins_and_otherwise_the_greater_digest() {
        let (d1, d2, d3) = (digest(1), digest(2), digest(3));
        // Agreed on d1; pushed d2 here: kept. Pushed d2 on the peer: copied.
        assert!(!peer_wins(Some(&d1), &d2, &d1));
        assert!(peer_wins(Some(&d1), &d1, &d2));
        // No memory, or both moved: the greater digest, whatever side holds it.
        assert!(peer_wins(None, &d1, &d2));
        assert!(!peer_wins(None, &d2, &d1));
        assert!(peer_wins(Some(&d1), &d2, &d3));
        assert!(!peer_wins(Some(&d1), &d3, &d2));
    }

    #[test]
    fn two_replicas_with_the_same_memory_pick_the_same_digest() {
        let digests: Vec<Digest> = (0..4).map(digest).collect();
        let memories = std::iter::once(None).chain(digests.iter().map(Some));
        for memory in memories {
            for a in &digests {
                for b in digests.iter().filter(|b| *b != a) {
                    // Replica A (holding a) and replica B (holding b): exactly one of them
                    // takes the other's digest.
                    assert_ne!(
                        peer_wins(memory, a, b),
                        peer_wins(memory, b, a),
                        "{a} {b} {memory:?}"
                    );
                }
            }
        }
    }
}
