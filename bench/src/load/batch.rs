//! The batch load: upload every file, ingest each, then follow them to `done` or `failed`.

use std::sync::Arc;
use std::time::{Duration, Instant};

use mysimbdp::model::FileState;
use tokio::sync::watch;

use super::{PathRun, SILENCE, TenantCtx, bounded, limit, short};
use crate::accounting::{FileOutcome, hist};
use crate::dataset::GroupFiles;
use crate::progress::Progress;

/// Where a phase's batch drivers wait until each has uploaded its files: the drivers yet to
/// arrive. A driver that ends without arriving (it panicked) is counted as arrived when its
/// [`Arrival`] is dropped, so the others do not wait for it.
pub struct UploadGate(Arc<watch::Sender<usize>>);

impl UploadGate {
    /// A gate for `drivers` drivers, each given one [`Arrival`].
    pub fn new(drivers: usize) -> Self {
        Self(Arc::new(watch::channel(drivers).0))
    }

    pub fn arrival(&self) -> Arrival {
        Arrival(Some(self.0.clone()))
    }
}

/// One driver's place at an [`UploadGate`].
pub struct Arrival(Option<Arc<watch::Sender<usize>>>);

impl Arrival {
    /// Arrives, then waits for the others, until `deadline` at most.
    async fn wait(mut self, deadline: Instant) {
        let Some(gate) = self.0.take() else {
            return;
        };
        let mut others = gate.subscribe();
        gate.send_modify(|n| *n = n.saturating_sub(1));
        let _ = tokio::time::timeout_at(deadline.into(), others.wait_for(|n| *n == 0)).await;
    }
}

impl Drop for Arrival {
    fn drop(&mut self) {
        if let Some(gate) = self.0.take() {
            gate.send_modify(|n| *n = n.saturating_sub(1));
        }
    }
}

/// Uploads every file, waits at `uploaded` for the phase's other batch tenants to upload
/// theirs, then asks for each one's ingestion, then follows them until they are `done` or
/// `failed`.
pub async fn drive_batch(
    t: TenantCtx,
    files: Arc<GroupFiles>,
    uploaded: Arrival,
    (started, deadline): (Instant, Instant),
    progress: Arc<Progress>,
) -> PathRun {
    let track = progress.track("batch");
    let mut run = PathRun {
        file_hist: Some(hist()),
        ..PathRun::default()
    };
    // Every file is uploaded before the first is ingested: the tenant's timed span (from its
    // first ingest request to its last input logged) holds none of its uploads, as a
    // loader's reading of its files is not timed. Uploading the next file while the one
    // before was ingested put uploads (HTTP, staging, hashing, their database writes)
    // inside the span. The phase's batch tenants all upload before any asks, so another
    // tenant's uploads do not overlap it either.
    let mut ready: Vec<(usize, String, u64)> = Vec::new();
    for i in 0..files.len() {
        let name = format!("f{i}.csv");
        let inputs = if t.whole_file { 1 } else { files.records[i] };
        if Instant::now() > deadline {
            run.unfinished = Some(format!("the timeout passed before {name} was uploaded"));
            break;
        }
        match bounded(
            limit(deadline),
            t.client.upload_file(&t.name, &name, files.body(i)),
        )
        .await
        {
            Ok(_) => ready.push((i, name, inputs)),
            Err(f) => run.refuse(inputs, &format!("upload of {name}"), f),
        }
    }
    // (index into run.files, when its ingestion was requested, last state, next record)
    let mut pending: Vec<(usize, Instant, String, u64)> = Vec::new();
    uploaded.wait(deadline).await;
    for (i, name, inputs) in ready {
        if Instant::now() > deadline {
            run.unfinished = Some(format!(
                "the timeout passed before {name}'s ingestion was asked for"
            ));
            break;
        }
        let t0 = Instant::now();
        run.started_ms
            .get_or_insert(mysimbdp::model::now_us() / 1000);
        if let Err(f) = bounded(limit(deadline), t.client.ingest(&t.name, &name)).await {
            run.refuse(inputs, &format!("ingest of {name}"), f);
            continue;
        }
        run.offered += inputs;
        pending.push((run.files.len(), t0, "ingesting".into(), 0));
        run.files.push(FileOutcome {
            name,
            origin: files.origins[i].clone(),
            inputs,
            state: "ingesting".into(),
            error: None,
        });
    }
    let mut shown = 0u64;
    let mut finished = 0u64;
    let mut heard = Instant::now();
    while !pending.is_empty() {
        if Instant::now() > deadline {
            let left: Vec<String> = pending
                .iter()
                .map(|(i, _, state, next)| {
                    let f = &run.files[*i];
                    format!(
                        "{} still `{state}` at record {next} of {}",
                        f.name, f.inputs
                    )
                })
                .collect();
            run.unfinished = Some(left.join(", "));
            break;
        }
        let mut still = Vec::new();
        let mut in_flight = 0u64;
        let mut last_error = None;
        // One listing a round for all of the tenant's files: a status read per file every
        // 200 ms (scale: 100 a second) was load on the database the run measures.
        let listed = match bounded(Duration::from_secs(10), t.client.files(&t.name)).await {
            Ok(l) => l
                .files
                .into_iter()
                .map(|f| (f.name.clone(), f))
                .collect::<std::collections::HashMap<_, _>>(),
            Err(e) => {
                last_error = Some(e.to_string());
                Default::default()
            }
        };
        // Heard from only when every file it follows is listed (one missing is as silent).
        if pending
            .iter()
            .all(|p| listed.contains_key(&run.files[p.0].name))
        {
            heard = Instant::now();
        }
        for (i, t0, state, next) in pending {
            match listed.get(&run.files[i].name) {
                Some(f) if matches!(f.state, FileState::Done | FileState::Failed) => {
                    if let Some(h) = &mut run.file_hist {
                        h.saturating_record(t0.elapsed().as_micros() as u64);
                    }
                    run.files[i].error = f.error.clone();
                    run.files[i].state = f.state.as_str().to_owned();
                    finished += run.files[i].inputs;
                }
                Some(f) => {
                    let n = f.next_record;
                    in_flight += n.min(run.files[i].inputs);
                    still.push((i, t0, f.state.as_str().to_owned(), n));
                }
                None => {
                    if last_error.is_none() {
                        last_error = Some(format!("{} is not listed", run.files[i].name));
                    }
                    still.push((i, t0, state, next));
                }
            }
        }
        pending = still;
        let now = finished + in_flight;
        track.add(now.saturating_sub(shown));
        shown = shown.max(now);
        if let Some(e) = last_error
            && heard.elapsed() > SILENCE
        {
            run.unfinished = Some(format!(
                "the batch component has not answered for {} s, {} file(s) left (last: {})",
                SILENCE.as_secs(),
                pending.len(),
                short(&e)
            ));
            break;
        }
        if !pending.is_empty() {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
    run.elapsed = started.elapsed();
    run
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_driver_that_never_arrives_does_not_hold_the_others() {
        let gate = UploadGate::new(3);
        let (a, b, c) = (gate.arrival(), gate.arrival(), gate.arrival());
        let far = Instant::now() + Duration::from_secs(60);
        let first = tokio::spawn(a.wait(far));
        let crashed = tokio::spawn(async move {
            let _place = c;
            panic!("a driver fails while uploading");
        });
        assert!(crashed.await.is_err());
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(!first.is_finished(), "one driver has not arrived yet");
        tokio::time::timeout(Duration::from_secs(5), b.wait(far))
            .await
            .expect("the last to arrive goes on");
        tokio::time::timeout(Duration::from_secs(5), first)
            .await
            .expect("the first goes on")
            .expect("its task");
    }

    #[tokio::test]
    async fn a_wait_for_a_driver_that_never_comes_ends_at_the_deadline() {
        let gate = UploadGate::new(2);
        let (a, _late) = (gate.arrival(), gate.arrival());
        let t0 = Instant::now();
        a.wait(t0 + Duration::from_millis(100)).await;
        assert!(t0.elapsed() >= Duration::from_millis(100));
    }
}
