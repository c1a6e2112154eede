//! One batch run through a started [`Pipeline`]: the client's side (register with BOS,
//! upload through the File Service, optionally pause the broker part-way), what the batch
//! must cause ([`Expected`]), progress lines while it runs, and the [`RunReport`]: total
//! time, per-hop latencies, what was lost or applied twice, which path events took.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chrono::Utc;
use outpost::testkit::TansuBroker;

use crate::bos::BatchRequest;
use crate::corpus::CorpusFile;
use crate::error::{Error, Result};
use crate::events::topic;
use crate::file_service::{self, UploadContext, Validation};
use crate::pipeline::{Pipeline, RunMode};
use crate::timeline::{Timeline, TopicStats};

/// Files a teacher's upload request carries (the File Service takes a request's files
/// together).
const FILES_PER_REQUEST: usize = 32;

/// Upload requests in progress at once.
const REQUESTS_AT_ONCE: usize = 4;

/// A broker outage during a run.
#[derive(Debug, Clone, Copy)]
pub struct Outage<'a> {
    /// The (private) broker the pipeline uses.
    pub broker: &'a TansuBroker,
    /// Pause it once this many essay files are uploaded.
    pub after_files: usize,
    /// For this long.
    pub pause_for: Duration,
}

/// The events one batch must cause, per topic.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Expected {
    counts: BTreeMap<&'static str, usize>,
}

impl Expected {
    /// For a batch of `valid + invalid` essay slots with that many files uploaded, plus
    /// `withdrawn` files added and removed before the batch was ready.
    pub fn new(valid: usize, invalid: usize, withdrawn: usize) -> Self {
        let counts = BTreeMap::from([
            (topic::BATCH_ESSAYS_REGISTERED, 1),
            (topic::BATCH_FILE_ADDED, valid + invalid + withdrawn),
            (topic::BATCH_FILE_REMOVED, withdrawn),
            (topic::ESSAY_CONTENT_PROVISIONED, valid),
            (topic::ESSAY_VALIDATION_FAILED, invalid),
            (topic::ESSAY_SLOT_ASSIGNED, valid),
            (topic::EXCESS_CONTENT_PROVISIONED, 0),
            // ready_for_processing, awaiting_spellcheck, spellchecked_success
            (topic::ESSAY_STATUS, 3 * valid),
            (topic::BATCH_ESSAYS_READY, 1),
            (topic::BATCH_SPELLCHECK_INITIATE_COMMAND, 1),
            (topic::ESSAY_SPELLCHECK_REQUESTED, valid),
            (topic::ESSAY_SPELLCHECK_COMPLETED, valid),
            // one when the phase starts, one per result
            (topic::BATCH_PHASE_PROGRESS, valid + 1),
            (topic::ELS_BATCH_PHASE_OUTCOME, 1),
            (topic::BATCH_PHASE_CONCLUDED, 1),
        ]);
        Self { counts }
    }

    /// Events expected on `topic`.
    pub fn get(&self, topic: &str) -> usize {
        self.counts.get(topic).copied().unwrap_or(0)
    }

    /// Every topic with its expected count.
    pub fn counts(&self) -> &BTreeMap<&'static str, usize> {
        &self.counts
    }

    /// Events expected in all.
    pub fn total(&self) -> usize {
        self.counts.values().sum()
    }

    /// Per topic, how many expected events the timeline has not seen consumed.
    pub fn missing(&self, timeline: &Timeline) -> BTreeMap<String, usize> {
        self.counts
            .iter()
            .map(|(topic, want)| {
                (
                    topic.to_string(),
                    want.saturating_sub(timeline.count(topic)),
                )
            })
            .filter(|(_, missing)| *missing > 0)
            .collect()
    }
}

/// Which path events took (instant mode; the baseline has only the relay).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Paths {
    /// Kafka-first events the File Service stored in its outbox because the broker failed.
    pub kafka_first_fallbacks: usize,
    /// Transactional events produced right after their commit (`None`: no metrics).
    pub eager_hits: Option<u64>,
    /// Transactional events left to the relay after their commit.
    pub eager_misses: Option<u64>,
    /// Events the relays delivered, all services.
    pub relay_deliveries: Option<u64>,
}

/// When the broker was paused and resumed, from the start of the run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutageWindow {
    /// SIGSTOP.
    pub paused_at: Duration,
    /// SIGCONT.
    pub resumed_at: Duration,
}

/// What one batch run measured.
#[derive(Debug, Clone)]
pub struct RunReport {
    /// The mode.
    pub mode: RunMode,
    /// The batch.
    pub batch_id: String,
    /// Essay files uploaded.
    pub essays: usize,
    /// Partitions of each topic.
    pub partitions: i32,
    /// Of those, valid.
    pub valid: usize,
    /// Of those, rejected by validation.
    pub invalid: usize,
    /// BOS's final state of the batch.
    pub batch_state: Option<String>,
    /// Registration to BOS completing the batch (`None`: it never did).
    pub total: Option<Duration>,
    /// The events the batch had to cause.
    pub expected: Expected,
    /// Expected events consumed.
    pub consumed: usize,
    /// Per topic, expected events never consumed.
    pub missing: BTreeMap<String, usize>,
    /// Expected events never consumed, in all.
    pub lost: usize,
    /// Redeliveries the inboxes recognised and skipped.
    pub duplicates_skipped: usize,
    /// Events whose effect was applied twice.
    pub duplicates_applied: usize,
    /// Per-hop latencies, in the order hops first happened.
    pub hops: Vec<TopicStats>,
    /// Outbox rows still pending after the run, all services.
    pub pending_outbox_rows: i64,
    /// Paths taken.
    pub paths: Paths,
    /// The broker outage, when there was one.
    pub outage: Option<OutageWindow>,
}

impl Pipeline {
    /// Runs one batch: registers `files.len()` slots with BOS, uploads `files` through the
    /// File Service (plus one file added and withdrawn before the batch is ready), and waits
    /// until BOS has completed the batch and every expected event has reached its consumer.
    /// Milestones go to `progress` as they happen (elapsed time, line).
    ///
    /// A batch that does not finish within the timeout is reported (with what is missing),
    /// not an error. One batch per pipeline: what is expected is checked against every
    /// event the pipeline's consumers handled.
    ///
    /// # Errors
    /// When registering or uploading fails, or the outage cannot be staged.
    pub async fn run_batch(
        &self,
        files: &[CorpusFile],
        outage: Option<Outage<'_>>,
        progress: &(dyn Fn(Duration, &str) + Sync),
    ) -> Result<RunReport> {
        let rules = self.file_service().rules();
        let valid = files
            .iter()
            .filter(|f| {
                matches!(
                    file_service::validate(&f.bytes, rules),
                    Validation::Valid(_)
                )
            })
            .count();
        let invalid = files.len() - valid;
        let withdrawn = usize::from(!files.is_empty());
        let expected = Expected::new(valid, invalid, withdrawn);
        let start = Utc::now();
        let started = Instant::now();
        let say = |line: &str| progress(started.elapsed(), line);
        let mut milestones = Milestones::new(&expected, files.len());

        let drive = async {
            let request = BatchRequest {
                expected_essay_count: u32::try_from(files.len()).unwrap_or(u32::MAX),
                course_code: "ENG5".into(),
                essay_instructions: "Write about a day that changed your mind.".into(),
                user_id: "teacher-1".into(),
            };
            let registration = self.bos().register_batch(&request).await?;
            let ctx = UploadContext {
                batch_id: registration.batch_id.clone(),
                user_id: request.user_id.clone(),
                correlation_id: registration.correlation_id,
            };
            // The teacher adds a file by mistake and withdraws it (while the rest upload)
            // before the batch is ready: announced twice, never provisioned.
            let withdraw = async {
                if let Some(first) = files.first() {
                    let name = format!("copy of {}", first.name);
                    let extra = self
                        .file_service()
                        .add_file(&ctx, &name, &first.bytes)
                        .await?;
                    self.file_service().remove_file(&ctx, &extra).await?;
                }
                Ok::<_, Error>(())
            };
            let split = outage.map_or(files.len(), |o| o.after_files.min(files.len()));
            tokio::try_join!(withdraw, self.upload(&ctx, &files[..split]))?;
            let window = match outage {
                None => None,
                Some(o) => {
                    o.broker.pause()?;
                    let paused_at = started.elapsed();
                    say(&format!(
                        "broker paused (SIGSTOP) for {:.0} s",
                        o.pause_for.as_secs_f64()
                    ));
                    let resume = async {
                        tokio::time::sleep(o.pause_for).await;
                        o.broker.resume()?;
                        say("broker resumed (SIGCONT)");
                        Ok::<_, Error>(started.elapsed())
                    };
                    let (uploaded, resumed_at) =
                        tokio::join!(self.upload(&ctx, &files[split..]), resume);
                    uploaded?;
                    Some(OutageWindow {
                        paused_at,
                        resumed_at: resumed_at?,
                    })
                }
            };
            let fallbacks = self.file_service().fallbacks();
            let via = if fallbacks > 0 {
                format!(" ({fallbacks} events through the File Service outbox)")
            } else {
                String::new()
            };
            say(&format!(
                "{} files uploaded, {withdrawn} withdrawn{via}",
                files.len()
            ));
            let deadline = tokio::time::Instant::now() + self.config().timeout;
            let left = || deadline.saturating_duration_since(tokio::time::Instant::now());
            // Timeouts are reported through what is missing, so they are not errors here.
            let _ = self
                .timeline()
                .wait_until(left(), "BOS completing the batch", |t| {
                    t.count(topic::ELS_BATCH_PHASE_OUTCOME) >= 1
                })
                .await;
            let _ = self
                .timeline()
                .wait_until(left(), "every expected event reaching its consumer", |t| {
                    expected.missing(t).is_empty()
                })
                .await;
            Ok::<_, Error>((registration, window))
        };
        let result = {
            let watch = async {
                let mut changes = self.timeline().changes();
                loop {
                    for line in milestones.reached(self.timeline(), started.elapsed()) {
                        say(&line);
                    }
                    let _ =
                        tokio::time::timeout(Duration::from_millis(500), changes.changed()).await;
                }
            };
            tokio::select! {
                result = drive => result,
                () = watch => unreachable!("the progress watch never ends"),
            }
        };
        for line in milestones.reached(self.timeline(), started.elapsed()) {
            say(&line);
        }
        let (registration, outage) = result?;
        let batch_id = registration.batch_id;
        let total = self
            .timeline()
            .hops()
            .iter()
            .find(|h| h.topic == topic::ELS_BATCH_PHASE_OUTCOME && h.handled_at >= start)
            .and_then(|h| (h.handled_at - start).to_std().ok());
        let missing = expected.missing(self.timeline());
        let lost = missing.values().sum();
        let pending_outbox_rows = self.drained(Duration::from_secs(10)).await?;
        Ok(RunReport {
            mode: self.config().mode,
            batch_state: self.bos().batch_state(&batch_id).await?,
            batch_id,
            essays: files.len(),
            partitions: self.config().partitions,
            valid,
            invalid,
            total,
            consumed: expected.total() - lost,
            expected,
            missing,
            lost,
            duplicates_skipped: self.timeline().duplicates_skipped(),
            duplicates_applied: self.timeline().duplicates_applied(),
            hops: self.timeline().stats(start),
            pending_outbox_rows,
            paths: self.paths(),
            outage,
        })
    }

    /// Uploads `files` as a teacher's batch upload arrives: in requests of several files,
    /// a few requests at once, each request's files added, then processed.
    async fn upload(&self, ctx: &UploadContext, files: &[CorpusFile]) -> Result<()> {
        use futures::{StreamExt, TryStreamExt};
        futures::stream::iter(files.chunks(FILES_PER_REQUEST))
            .map(|request| async move {
                let service = self.file_service();
                let added: Vec<(&str, &[u8])> = request
                    .iter()
                    .map(|f| (f.name.as_str(), f.bytes.as_slice()))
                    .collect();
                let uploads = service.add_files(ctx, &added).await?;
                let processed: Vec<(&file_service::Upload, &[u8])> = uploads
                    .iter()
                    .zip(request)
                    .map(|(upload, f)| (upload, f.bytes.as_slice()))
                    .collect();
                service.process_files(ctx, &processed).await?;
                Ok::<_, Error>(())
            })
            .buffer_unordered(REQUESTS_AT_ONCE)
            .try_collect::<()>()
            .await
    }

    /// Waits (up to `timeout`) until no outbox holds a pending row; returns how many are
    /// left. A relay settles a row just after the broker acks it, so a consumer can see an
    /// event a moment before its row is marked published.
    async fn drained(&self, timeout: Duration) -> Result<i64> {
        let deadline = Instant::now() + timeout;
        loop {
            let pending = self.pending_outbox_rows().await?;
            if pending == 0 || Instant::now() >= deadline {
                return Ok(pending);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// One progress line, printed once the consumers have handled what it names.
#[derive(Debug)]
struct Milestone {
    line: String,
    /// Events needed per topic.
    needs: Vec<(&'static str, usize)>,
    reached: bool,
}

impl Milestone {
    fn new(line: impl Into<String>, needs: &[(&'static str, usize)]) -> Self {
        Self {
            line: line.into(),
            needs: needs.to_vec(),
            reached: false,
        }
    }
}

/// The progress lines of a run: each milestone once, when reached; a line about the
/// overall count when nothing new happened for a while.
#[derive(Debug)]
struct Milestones {
    items: Vec<Milestone>,
    expected: usize,
    counted: Vec<&'static str>,
    last_line: Duration,
}

impl Milestones {
    const QUIET: Duration = Duration::from_millis(2500);

    fn new(expected: &Expected, slots: usize) -> Self {
        let get = |t| expected.get(t);
        let (valid, invalid) = (
            get(topic::ESSAY_CONTENT_PROVISIONED),
            get(topic::ESSAY_VALIDATION_FAILED),
        );
        let (added, removed) = (get(topic::BATCH_FILE_ADDED), get(topic::BATCH_FILE_REMOVED));
        let items = vec![
            Milestone::new(
                format!("batch registered: {slots} essay slots"),
                &[(topic::BATCH_ESSAYS_REGISTERED, 1)],
            ),
            Milestone::new(
                format!("{added} files announced added, {removed} removed"),
                &[
                    (topic::BATCH_FILE_ADDED, added),
                    (topic::BATCH_FILE_REMOVED, removed),
                ],
            ),
            Milestone::new(
                format!("{valid} essays provisioned, {invalid} failed validation"),
                &[
                    (topic::ESSAY_CONTENT_PROVISIONED, valid),
                    (topic::ESSAY_VALIDATION_FAILED, invalid),
                ],
            ),
            Milestone::new(
                format!("{valid}/{slots} essays assigned to slots"),
                &[(topic::ESSAY_SLOT_ASSIGNED, valid)],
            ),
            Milestone::new("batch ready (ELS → BOS)", &[(topic::BATCH_ESSAYS_READY, 1)]),
            Milestone::new(
                "spellcheck initiated (BOS → ELS)",
                &[(topic::BATCH_SPELLCHECK_INITIATE_COMMAND, 1)],
            ),
            Milestone::new(
                format!("{valid}/{valid} essays spellchecked"),
                &[(topic::ESSAY_SPELLCHECK_COMPLETED, valid)],
            ),
            Milestone::new(
                "batch completed (phase outcome → BOS)",
                &[(topic::ELS_BATCH_PHASE_OUTCOME, 1)],
            ),
        ];
        Self {
            items,
            expected: expected.total(),
            counted: expected.counts().keys().copied().collect(),
            last_line: Duration::ZERO,
        }
    }

    fn reached(&mut self, timeline: &Timeline, elapsed: Duration) -> Vec<String> {
        let mut lines = Vec::new();
        for m in self.items.iter_mut().filter(|m| !m.reached) {
            if m.needs.iter().all(|(t, n)| timeline.count(t) >= *n) {
                m.reached = true;
                lines.push(m.line.clone());
            }
        }
        if lines.is_empty() && elapsed.saturating_sub(self.last_line) >= Self::QUIET {
            let consumed: usize = self.counted.iter().map(|t| timeline.count(t)).sum();
            lines.push(format!(
                "… {consumed}/{} events consumed so far",
                self.expected
            ));
        }
        if !lines.is_empty() {
            self.last_line = elapsed;
        }
        lines
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_of_25_expects_every_hop() {
        let e = Expected::new(23, 2, 1);
        assert_eq!(e.get(topic::BATCH_FILE_ADDED), 26);
        assert_eq!(e.get(topic::ESSAY_STATUS), 69);
        assert_eq!(e.get(topic::BATCH_PHASE_PROGRESS), 24);
        assert_eq!(e.get(topic::EXCESS_CONTENT_PROVISIONED), 0);
        assert_eq!(e.counts().len(), topic::ALL.len());
        assert_eq!(
            e.total(),
            1 + 26 + 1 + 23 + 2 + 23 + 69 + 1 + 1 + 23 + 23 + 24 + 1 + 1
        );
        assert_eq!(
            e.missing(&Timeline::new()).len(),
            14,
            "all but excess content"
        );
    }
}
