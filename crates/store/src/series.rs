//! The runtime series: a replica's resource metrics (and its processes' CPU counters),
//! sampled on every capture and kept beside frames rather than in them, so that resource
//! history never forces a new frame.
//!
//! Samples fall into buckets whose width grows with age: one-second buckets for the last
//! hour, one-minute buckets for the last week, one-hour buckets after that. A sample is
//! merged into the one-second bucket of its instant (mean and maximum of CPU and RSS, the
//! latest of the rest); older buckets are folded into the next width by
//! [`Store::downsample_series`], which every new sample runs for a bounded number of keys.
//! So one replica's series holds at most 3 600 + 10 080 keys plus one per hour of its
//! life, however often it is captured.
//!
//! Series keys (`n/<replica>\0<tier><bucket start>`) are not catalog keys: they are
//! observations, not history — not audited, not in the catalog copy, written without
//! waiting for the disk. A sample that is lost loses a point of a chart, never a frame.

use std::ops::Bound;
use std::time::Duration;

use kairos_core::{Hash, Instant};

use crate::keys;
use crate::kv::WriteBatch;
use crate::store::{Result, Store, StoreError};

/// Widths of the three tiers' buckets.
pub const TIER_WIDTHS: [Duration; 3] = [
    Duration::from_secs(1),
    Duration::from_secs(60),
    Duration::from_secs(3_600),
];
/// How long buckets of each tier are kept before being folded into the next tier (the
/// last tier is kept for as long as the replica).
pub const TIER_AGES: [Duration; 2] = [
    Duration::from_secs(3_600),
    Duration::from_secs(7 * 24 * 3_600),
];
/// Times a sample's merge is tried against concurrent writers of its bucket.
const MERGE_ATTEMPTS_MAX: u32 = 8;
/// Keys folded into the next tier by one downsampling pass (a bounded batch).
const DOWNSAMPLE_KEYS_MAX: usize = 512;
/// The most CPU a replica can use, in percent of one core (4 096 cores busy): a stored
/// figure beyond it is damage.
pub const CPU_PERCENT_MAX: f64 = 409_600.0;
/// Processes whose CPU counters a sample keeps (the rest are left out of the next rate).
pub const PROCESS_COUNTERS_MAX: usize = 256;
const SAMPLE_VERSION: u8 = 1;
const FIXED_BYTES: usize = 1 + 32 + 4 + 8 * 9 + 2;
const COUNTER_BYTES: usize = 4 + 8 + 8;

/// One process's CPU counter at a sample, so the next capture's CPU rates start there.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProcessCounter {
    pub pid: u32,
    pub start_time_ns: i64,
    pub cpu_time_ms: u64,
}

/// A bucket of the series: one or more samples merged.
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    /// The tier (0: one second, 1: one minute, 2: one hour).
    pub tier: u8,
    /// The start of the bucket.
    pub at: Instant,
    /// The instant of the latest sample merged into it.
    pub last_at: Instant,
    /// The timeline head when the latest sample was taken: the state the metrics belong to.
    pub frame: Hash,
    /// Samples merged into this bucket.
    pub samples: u32,
    /// Mean and maximum CPU use of the replica's processes, percent of one core.
    pub cpu_percent: f64,
    pub cpu_percent_max: f64,
    /// Mean and maximum resident memory of the replica's processes.
    pub memory_rss_bytes: u64,
    pub memory_rss_bytes_max: u64,
    /// The latest counts.
    pub processes: u64,
    pub files: u64,
    pub disk_allocated_bytes: u64,
    /// The latest processes' CPU counters (tier 0 only; empty in older buckets).
    pub counters: Vec<ProcessCounter>,
}

impl Sample {
    /// One sample taken at `at` with the timeline head `frame`.
    pub fn new(at: Instant, frame: Hash) -> Sample {
        Sample {
            tier: 0,
            at,
            last_at: at,
            frame,
            samples: 1,
            cpu_percent: 0.0,
            cpu_percent_max: 0.0,
            memory_rss_bytes: 0,
            memory_rss_bytes_max: 0,
            processes: 0,
            files: 0,
            disk_allocated_bytes: 0,
            counters: Vec::new(),
        }
    }

    /// The width of this sample's bucket.
    pub fn width(&self) -> Duration {
        TIER_WIDTHS[usize::from(self.tier).min(TIER_WIDTHS.len() - 1)]
    }

    /// How far `at` lies from this bucket (0 inside it).
    pub fn distance_ns(&self, at: Instant) -> u64 {
        let end = self.at.0.saturating_add(self.width().as_nanos() as i64);
        if at.0 < self.at.0 {
            self.at.nanos_since(at)
        } else if at.0 >= end {
            at.nanos_since(Instant(end))
        } else {
            0
        }
    }

    /// This sample moved into the bucket of `tier` that holds it.
    fn into_tier(mut self, tier: u8) -> Sample {
        self.tier = tier;
        self.at = bucket_start(self.at, tier);
        if tier > 0 {
            self.counters.clear();
        }
        self
    }

    /// Merges a later (or earlier) sample of the same bucket into this one.
    fn merge(&mut self, other: &Sample) {
        let total = u64::from(self.samples) + u64::from(other.samples);
        let weight = |a: f64, na: u32, b: f64, nb: u32| {
            (a * f64::from(na) + b * f64::from(nb)) / (f64::from(na) + f64::from(nb)).max(1.0)
        };
        self.cpu_percent = weight(
            self.cpu_percent,
            self.samples,
            other.cpu_percent,
            other.samples,
        );
        self.memory_rss_bytes = weight(
            self.memory_rss_bytes as f64,
            self.samples,
            other.memory_rss_bytes as f64,
            other.samples,
        )
        .round() as u64;
        self.cpu_percent_max = self.cpu_percent_max.max(other.cpu_percent_max);
        self.memory_rss_bytes_max = self.memory_rss_bytes_max.max(other.memory_rss_bytes_max);
        if other.last_at >= self.last_at {
            self.last_at = other.last_at;
            self.frame = other.frame;
            self.processes = other.processes;
            self.files = other.files;
            self.disk_allocated_bytes = other.disk_allocated_bytes;
            self.counters.clone_from(&other.counters);
        }
        self.samples = total.min(u64::from(u32::MAX)) as u32;
        if self.tier > 0 {
            self.counters.clear();
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let counters = &self.counters[..self.counters.len().min(PROCESS_COUNTERS_MAX)];
        let mut out = Vec::with_capacity(FIXED_BYTES + counters.len() * COUNTER_BYTES);
        out.push(SAMPLE_VERSION);
        out.extend_from_slice(self.frame.as_bytes());
        out.extend_from_slice(&self.samples.to_le_bytes());
        out.extend_from_slice(&self.last_at.0.to_le_bytes());
        out.extend_from_slice(&self.cpu_percent.to_le_bytes());
        out.extend_from_slice(&self.cpu_percent_max.to_le_bytes());
        out.extend_from_slice(&self.memory_rss_bytes.to_le_bytes());
        out.extend_from_slice(&self.memory_rss_bytes_max.to_le_bytes());
        out.extend_from_slice(&self.processes.to_le_bytes());
        out.extend_from_slice(&self.files.to_le_bytes());
        out.extend_from_slice(&self.disk_allocated_bytes.to_le_bytes());
        out.extend_from_slice(&0u64.to_le_bytes());
        out.extend_from_slice(&(counters.len() as u16).to_le_bytes());
        for counter in counters {
            out.extend_from_slice(&counter.pid.to_le_bytes());
            out.extend_from_slice(&counter.start_time_ns.to_le_bytes());
            out.extend_from_slice(&counter.cpu_time_ms.to_le_bytes());
        }
        out
    }

    /// The sample stored under `key` (which names its replica, tier and bucket).
    pub fn decode(key: &[u8], value: &[u8]) -> std::result::Result<Sample, String> {
        let (tier, at) = parse_key(key).ok_or("the key names no tier and bucket")?;
        if value.len() < FIXED_BYTES {
            return Err(format!(
                "{} bytes, shorter than a sample ({FIXED_BYTES})",
                value.len()
            ));
        }
        if value[0] != SAMPLE_VERSION {
            return Err(format!("unknown sample version {}", value[0]));
        }
        let mut cursor = Cursor {
            bytes: value,
            at: 1,
        };
        let frame = Hash::from_slice(cursor.take(32)).ok_or("no frame id")?;
        let samples = u32::from_le_bytes(cursor.array());
        let last_at = Instant(i64::from_le_bytes(cursor.array()));
        let cpu_percent = f64::from_le_bytes(cursor.array());
        let cpu_percent_max = f64::from_le_bytes(cursor.array());
        let memory_rss_bytes = u64::from_le_bytes(cursor.array());
        let memory_rss_bytes_max = u64::from_le_bytes(cursor.array());
        let processes = u64::from_le_bytes(cursor.array());
        let files = u64::from_le_bytes(cursor.array());
        let disk_allocated_bytes = u64::from_le_bytes(cursor.array());
        let _reserved = u64::from_le_bytes(cursor.array());
        let count = usize::from(u16::from_le_bytes(cursor.array()));
        if value.len() != FIXED_BYTES + count * COUNTER_BYTES || count > PROCESS_COUNTERS_MAX {
            return Err(format!(
                "{} bytes do not hold {count} process counters",
                value.len()
            ));
        }
        let counters = (0..count)
            .map(|_| ProcessCounter {
                pid: u32::from_le_bytes(cursor.array()),
                start_time_ns: i64::from_le_bytes(cursor.array()),
                cpu_time_ms: u64::from_le_bytes(cursor.array()),
            })
            .collect();
        let plausible = |x: f64| x.is_finite() && (0.0..=CPU_PERCENT_MAX).contains(&x);
        if samples == 0 || !plausible(cpu_percent) || !plausible(cpu_percent_max) {
            return Err(format!(
                "a count of zero or a CPU figure that is not a number from 0 to {CPU_PERCENT_MAX} % ({cpu_percent}, max {cpu_percent_max})"
            ));
        }
        if cpu_percent_max + 1e-6 < cpu_percent || memory_rss_bytes_max < memory_rss_bytes {
            return Err("a maximum below its mean".into());
        }
        if bucket_start(at, tier) != at {
            return Err(format!(
                "bucket start {at} is not on a tier-{tier} boundary"
            ));
        }
        Ok(Sample {
            tier,
            at,
            last_at,
            frame,
            samples,
            cpu_percent,
            cpu_percent_max,
            memory_rss_bytes,
            memory_rss_bytes_max,
            processes,
            files,
            disk_allocated_bytes,
            counters,
        })
    }
}

struct Cursor<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl Cursor<'_> {
    fn take(&mut self, len: usize) -> &[u8] {
        let slice = &self.bytes[self.at..self.at + len];
        self.at += len;
        slice
    }

    fn array<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0; N];
        out.copy_from_slice(self.take(N));
        out
    }
}

/// The start of the bucket of `tier` that holds `at`.
pub fn bucket_start(at: Instant, tier: u8) -> Instant {
    let width = TIER_WIDTHS[usize::from(tier).min(TIER_WIDTHS.len() - 1)].as_nanos() as i64;
    // The earliest instants have no bucket start of their own: they belong to the first.
    Instant(at.0.div_euclid(width).saturating_mul(width))
}

fn key(replica: &str, tier: u8, at: Instant) -> Vec<u8> {
    [
        keys::replica_prefix(keys::SERIES, replica).as_slice(),
        &[tier],
        &at.to_sortable_bytes(),
    ]
    .concat()
}

fn tier_prefix(replica: &str, tier: u8) -> Vec<u8> {
    [
        keys::replica_prefix(keys::SERIES, replica).as_slice(),
        &[tier],
    ]
    .concat()
}

/// The tier and bucket start a series key names (after the replica's prefix).
fn parse_key(key: &[u8]) -> Option<(u8, Instant)> {
    let rest = key.strip_prefix(keys::SERIES)?;
    let nul = rest.iter().position(|&b| b == 0)?;
    let rest = &rest[nul + 1..];
    let (&tier, at) = rest.split_first()?;
    if usize::from(tier) >= TIER_WIDTHS.len() {
        return None;
    }
    Some((tier, Instant::from_sortable_bytes(at.try_into().ok()?)))
}

/// How many buckets each tier of a replica's series holds.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize)]
pub struct SeriesCounts {
    pub seconds: u64,
    pub minutes: u64,
    pub hours: u64,
}

impl Store {
    /// Adds a sample to a replica's series (merged into its one-second bucket), then folds
    /// a bounded number of aged buckets into the next tier. Not durable on its own: the
    /// next durable write carries it.
    pub fn record_sample(&self, replica: &str, sample: &Sample) -> Result<()> {
        let mut sample = sample.clone().into_tier(0);
        // What decoding would call damage is never written: figures out of range are
        // clamped, maxima are at least their means, a sample counts at least once.
        let clamp = |x: f64| {
            if x.is_finite() {
                x.clamp(0.0, CPU_PERCENT_MAX)
            } else {
                0.0
            }
        };
        sample.cpu_percent = clamp(sample.cpu_percent);
        sample.cpu_percent_max = clamp(sample.cpu_percent_max).max(sample.cpu_percent);
        sample.memory_rss_bytes_max = sample.memory_rss_bytes_max.max(sample.memory_rss_bytes);
        sample.samples = sample.samples.max(1);
        sample.counters.truncate(PROCESS_COUNTERS_MAX);
        let now = sample.last_at;
        // Two writers merging into one second's bucket at once: the loser merges again.
        let mut attempts = 0;
        while !self.merge_into_buckets(replica, vec![sample.clone()], &[])? {
            attempts += 1;
            if attempts == MERGE_ATTEMPTS_MAX {
                return Err(crate::kv::KvError::Conflict {
                    key: key(replica, 0, sample.at),
                }
                .into());
            }
        }
        self.downsample_series(replica, now)?;
        Ok(())
    }

    /// Folds buckets older than their tier's age (relative to `now`) into the next tier,
    /// at most `DOWNSAMPLE_KEYS_MAX` keys per tier and call; returns how many were folded.
    pub fn downsample_series(&self, replica: &str, now: Instant) -> Result<usize> {
        let mut folded = 0;
        for (tier, age) in TIER_AGES.iter().enumerate() {
            let tier = tier as u8;
            let prefix = tier_prefix(replica, tier);
            let cutoff = key(
                replica,
                tier,
                bucket_start(now.saturating_sub(*age), tier + 1),
            );
            let aged = self.reader()?.snapshot().scan(
                Bound::Included(prefix.as_slice()),
                Bound::Excluded(cutoff.as_slice()),
                DOWNSAMPLE_KEYS_MAX,
                false,
            )?;
            let mut samples = Vec::with_capacity(aged.len());
            let mut sources = Vec::with_capacity(aged.len());
            for (key, value) in aged {
                // A damaged bucket stays where it is, for verify to name and repair to
                // drop; the buckets after it still fold (else the series would grow
                // without bound until the repair).
                let Ok(sample) = Sample::decode(&key, &value) else {
                    continue;
                };
                samples.push(sample.into_tier(tier + 1));
                sources.push((key, value));
            }
            if sources.is_empty() {
                continue;
            }
            // A source merged into meanwhile (a clock gone back, a second writer) makes the
            // batch conflict: nothing is lost, the next sample folds again.
            if self.merge_into_buckets(replica, samples, &sources)? {
                folded += sources.len();
            }
        }
        Ok(folded)
    }

    /// Merges `samples` into their buckets and deletes `sources` (the buckets they were
    /// folded from, with the values read) in one batch, guarded by checks on every bucket
    /// read; `false` when one of them changed meanwhile (nothing was written).
    fn merge_into_buckets(
        &self,
        replica: &str,
        samples: Vec<Sample>,
        sources: &[(Vec<u8>, Vec<u8>)],
    ) -> Result<bool> {
        let reader = self.reader()?;
        let mut merged: Vec<(Vec<u8>, Option<Vec<u8>>, Sample)> = Vec::new();
        for sample in samples {
            let bucket = key(replica, sample.tier, sample.at);
            if let Some((_, _, into)) = merged.iter_mut().find(|(key, _, _)| *key == bucket) {
                into.merge(&sample);
                continue;
            }
            let previous = reader.get(&bucket)?;
            let sample = match &previous {
                Some(value) => {
                    let mut stored = decode_stored(&bucket, value)?;
                    stored.merge(&sample);
                    stored
                }
                None => sample,
            };
            merged.push((bucket, previous, sample));
        }
        let mut batch = WriteBatch::deferred();
        for (key, value) in sources {
            batch.check(key.clone(), Some(value.clone()))?;
            batch.delete(key.clone())?;
        }
        for (bucket, previous, sample) in merged {
            batch.check(bucket.clone(), previous)?;
            batch.put(bucket, sample.encode())?;
        }
        match self.kv().commit(batch) {
            Ok(()) => Ok(true),
            Err(crate::kv::KvError::Conflict { .. }) => Ok(false),
            Err(error) => Err(error.into()),
        }
    }

    /// The buckets of a replica's series between `from` and `to` (inclusive), oldest
    /// first, at most `limit` of them (the newest are kept when there are more).
    pub fn series(
        &self,
        replica: &str,
        from: Instant,
        to: Instant,
        limit: usize,
    ) -> Result<Vec<Sample>> {
        let reader = self.reader()?;
        let mut out = Vec::new();
        for tier in 0..TIER_WIDTHS.len() as u8 {
            let lower = key(replica, tier, bucket_start(from, tier));
            let upper = key(replica, tier, to);
            for (key, value) in reader.snapshot().scan(
                Bound::Included(lower.as_slice()),
                Bound::Included(upper.as_slice()),
                limit,
                true,
            )? {
                out.push(decode_stored(&key, &value)?);
            }
        }
        out.sort_by_key(|sample| sample.at);
        let excess = out.len().saturating_sub(limit);
        out.drain(..excess);
        Ok(out)
    }

    /// The bucket nearest `at` in any tier, if the replica has a series.
    pub fn sample_nearest(&self, replica: &str, at: Instant) -> Result<Option<Sample>> {
        let reader = self.reader()?;
        let mut best: Option<Sample> = None;
        for tier in 0..TIER_WIDTHS.len() as u8 {
            let prefix = tier_prefix(replica, tier);
            let end = crate::kv::prefix_end(&prefix);
            let here = key(replica, tier, bucket_start(at, tier));
            let before = reader.snapshot().scan(
                Bound::Included(prefix.as_slice()),
                Bound::Included(here.as_slice()),
                1,
                true,
            )?;
            let after = reader.snapshot().scan(
                Bound::Excluded(here.as_slice()),
                end.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
                1,
                false,
            )?;
            for (key, value) in before.into_iter().chain(after) {
                let sample = decode_stored(&key, &value)?;
                let closer = best
                    .as_ref()
                    .is_none_or(|best| sample.distance_ns(at) < best.distance_ns(at));
                if closer {
                    best = Some(sample);
                }
            }
        }
        Ok(best)
    }

    /// The newest one-second bucket of a replica's series.
    pub fn latest_sample(&self, replica: &str) -> Result<Option<Sample>> {
        let prefix = tier_prefix(replica, 0);
        let end = crate::kv::prefix_end(&prefix);
        let found = self.reader()?.snapshot().scan(
            Bound::Included(prefix.as_slice()),
            end.as_deref().map_or(Bound::Unbounded, Bound::Excluded),
            1,
            true,
        )?;
        found
            .into_iter()
            .next()
            .map(|(key, value)| decode_stored(&key, &value))
            .transpose()
    }

    /// How many buckets each tier of a replica's series holds (one scan of its keys).
    pub fn series_counts(&self, replica: &str) -> Result<SeriesCounts> {
        let prefix = keys::replica_prefix(keys::SERIES, replica);
        let mut counts = SeriesCounts::default();
        for (key, _) in self.reader()?.scan_prefix(&prefix)? {
            match parse_key(&key).map(|(tier, _)| tier) {
                Some(0) => counts.seconds += 1,
                Some(1) => counts.minutes += 1,
                _ => counts.hours += 1,
            }
        }
        Ok(counts)
    }
}

fn decode_stored(key: &[u8], value: &[u8]) -> Result<Sample> {
    Sample::decode(key, value).map_err(|problem| StoreError::BadRecord {
        what: "series sample",
        key: crate::kv::printable(key),
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000_000;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        (dir, store)
    }

    fn sample(at: i64, cpu: f64, rss: u64) -> Sample {
        let mut sample = Sample::new(Instant(at), Hash([7; 32]));
        sample.cpu_percent = cpu;
        sample.cpu_percent_max = cpu;
        sample.memory_rss_bytes = rss;
        sample.memory_rss_bytes_max = rss;
        sample.processes = 2;
        sample.counters = vec![ProcessCounter {
            pid: 10,
            start_time_ns: 5,
            cpu_time_ms: at as u64 / 1_000_000,
        }];
        sample
    }

    #[test]
    fn samples_round_trip_and_damage_is_named() {
        let stored = sample(3 * SECOND, 12.5, 4096).into_tier(0);
        let key = key("web", 0, stored.at);
        let value = stored.encode();
        assert_eq!(Sample::decode(&key, &value).unwrap(), stored);
        assert!(Sample::decode(&key, &value[..value.len() - 1]).is_err());
        let mut version = value.clone();
        version[0] = 9;
        assert!(
            Sample::decode(&key, &version)
                .unwrap_err()
                .contains("version")
        );
        let mut nan = value.clone();
        nan[1 + 32 + 4 + 8..1 + 32 + 4 + 16].copy_from_slice(&f64::NAN.to_le_bytes());
        assert!(Sample::decode(&key, &nan).is_err());
        let off_boundary = self::key("web", 1, Instant(3 * SECOND));
        assert!(Sample::decode(&off_boundary, &value).is_err());
    }

    #[test]
    fn a_sample_that_would_read_as_damage_is_stored_sound() {
        let (_dir, store) = store();
        let mut odd = sample(5 * SECOND, f64::NAN, 4096);
        odd.memory_rss_bytes_max = 0;
        odd.cpu_percent_max = f64::INFINITY;
        odd.samples = 0;
        store.record_sample("web", &odd).unwrap();
        let stored = store.latest_sample("web").unwrap().unwrap();
        assert_eq!((stored.cpu_percent, stored.samples), (0.0, 1));
        assert_eq!(stored.memory_rss_bytes_max, 4096);
        assert!(store.verify().unwrap().ok);
    }

    #[test]
    fn two_writers_at_once_lose_no_sample_while_buckets_fold() {
        let (_dir, store) = store();
        let store = std::sync::Arc::new(store);
        let writers: Vec<_> = (0..2)
            .map(|writer| {
                let store = store.clone();
                std::thread::spawn(move || {
                    // Two hours of samples every 30 s, the second writer half a step later:
                    // the same buckets, and folds of the first hour while both write.
                    for i in 0..240 {
                        let at = i * 30 * SECOND + writer * 15 * SECOND;
                        store.record_sample("web", &sample(at, 1.0, 1)).unwrap();
                    }
                })
            })
            .collect();
        for writer in writers {
            writer.join().unwrap();
        }
        let all = store
            .series("web", Instant(0), Instant(i64::MAX), usize::MAX)
            .unwrap();
        assert_eq!(all.iter().map(|s| u64::from(s.samples)).sum::<u64>(), 480);
        assert!(all.iter().any(|s| s.tier == 1), "the first hour folded");
    }

    #[test]
    fn samples_in_one_second_merge_into_one_bucket() {
        let (_dir, store) = store();
        for (i, cpu) in [10.0, 30.0, 20.0].into_iter().enumerate() {
            let at = 100 * SECOND + i as i64 * 100_000_000;
            store
                .record_sample("web", &sample(at, cpu, 1000 * (i as u64 + 1)))
                .unwrap();
        }
        let counts = store.series_counts("web").unwrap();
        assert_eq!((counts.seconds, counts.minutes, counts.hours), (1, 0, 0));
        let bucket = store.latest_sample("web").unwrap().unwrap();
        assert_eq!(bucket.samples, 3);
        assert!((bucket.cpu_percent - 20.0).abs() < 1e-9);
        assert_eq!(bucket.cpu_percent_max, 30.0);
        assert_eq!(bucket.memory_rss_bytes, 2000);
        assert_eq!(bucket.memory_rss_bytes_max, 3000);
        assert_eq!(bucket.last_at, Instant(100 * SECOND + 200_000_000));
        assert_eq!(bucket.counters.len(), 1);
    }

    #[test]
    fn a_long_series_is_downsampled_and_bounded() {
        let (_dir, store) = store();
        // Ten days of one sample every five minutes, CPU alternating 0 and 10.
        let step = 300 * SECOND;
        let count = 10 * 24 * 12;
        for i in 0..count {
            let cpu = if i % 2 == 0 { 0.0 } else { 10.0 };
            store
                .record_sample("web", &sample(i * step, cpu, 100))
                .unwrap();
        }
        let counts = store.series_counts("web").unwrap();
        // One hour of samples stays in one-second buckets, a week in one-minute buckets,
        // the rest in one-hour buckets.
        assert!(counts.seconds <= 13, "{counts:?}");
        assert!(counts.minutes <= 7 * 24 * 12 + 12, "{counts:?}");
        assert!(
            counts.hours >= 3 * 24 - 2 && counts.hours <= 3 * 24 + 2,
            "{counts:?}"
        );
        let all = store
            .series("web", Instant(0), Instant(i64::MAX), usize::MAX)
            .unwrap();
        assert_eq!(
            all.iter().map(|s| u64::from(s.samples)).sum::<u64>(),
            count as u64,
            "no sample is lost or counted twice"
        );
        let mean = all
            .iter()
            .map(|s| s.cpu_percent * f64::from(s.samples))
            .sum::<f64>()
            / count as f64;
        assert!((mean - 5.0).abs() < 1e-6, "mean {mean}");
        assert!(
            all.iter()
                .filter(|s| s.tier > 0)
                .all(|s| s.counters.is_empty())
        );
        assert!(all.windows(2).all(|w| w[0].at < w[1].at));
    }

    #[test]
    fn a_damaged_bucket_is_left_for_verify_and_the_rest_still_folds() {
        let (_dir, store) = store();
        // A damaged one-second bucket at the start of the series (flipped version byte).
        let mut damaged = sample(0, 1.0, 1).into_tier(0).encode();
        damaged[0] ^= 0xff;
        let damaged_key = key("web", 0, Instant(0));
        let mut batch = WriteBatch::new();
        batch.put(damaged_key.clone(), damaged).unwrap();
        store.kv().commit(batch).unwrap();
        // Two hours of samples every five seconds after it: the last hour (721 buckets)
        // and the damaged one stay in one-second buckets.
        for i in 1..=2 * 720 {
            store
                .record_sample("web", &sample(i * 5 * SECOND, 10.0, 100))
                .unwrap();
        }
        let counts = store.series_counts("web").unwrap();
        assert!(
            counts.seconds <= 722,
            "the damaged bucket blocks no fold: {counts:?}"
        );
        assert!(counts.minutes >= 55, "{counts:?}");
        // It is still there, for verify to name and repair to drop.
        assert!(store.reader().unwrap().get(&damaged_key).unwrap().is_some());
        let report = store.verify().unwrap();
        assert!(
            report
                .problems
                .iter()
                .any(|p| p.contains("runtime series sample")),
            "{:?}",
            report.problems
        );
    }

    #[test]
    fn a_clock_that_goes_back_loses_no_sample_and_keeps_the_series_bounded() {
        let (_dir, store) = store();
        let hour = 3_600 * SECOND;
        // Two hours of samples, the clock back by ninety minutes for an hour, then on.
        let mut times: Vec<i64> = (0..2 * 360).map(|i| i * 10 * SECOND).collect();
        times.extend((0..360).map(|i| 30 * 60 * SECOND + i * 10 * SECOND));
        times.extend((0..360).map(|i| 2 * hour + i * 10 * SECOND));
        for &at in &times {
            store.record_sample("web", &sample(at, 4.0, 10)).unwrap();
        }
        let all = store
            .series("web", Instant(0), Instant(i64::MAX), usize::MAX)
            .unwrap();
        assert_eq!(
            all.iter().map(|s| u64::from(s.samples)).sum::<u64>(),
            times.len() as u64
        );
        let counts = store.series_counts("web").unwrap();
        // The last hour of one-second buckets, and the minute the cutoff falls in.
        assert!(counts.seconds <= 360 + 6, "{counts:?}");
        assert!(all.iter().all(|s| (s.cpu_percent - 4.0).abs() < 1e-9));
    }

    #[test]
    fn the_nearest_bucket_is_found_in_any_tier() {
        let (_dir, store) = store();
        let day = 24 * 3_600 * SECOND;
        for at in [0, 10 * day, 10 * day + 30 * SECOND] {
            store.record_sample("web", &sample(at, 1.0, 1)).unwrap();
        }
        let near = |at: i64| store.sample_nearest("web", Instant(at)).unwrap().unwrap();
        assert_eq!(
            near(10 * day + 31 * SECOND).at,
            Instant(10 * day + 30 * SECOND)
        );
        assert_eq!(near(10 * day - SECOND).at, Instant(10 * day));
        // The first sample is ten days old: folded into its hour.
        let first = near(5 * SECOND);
        assert_eq!((first.tier, first.at), (2, Instant(0)));
        assert_eq!(first.distance_ns(Instant(5 * SECOND)), 0);
        assert!(store.sample_nearest("db", Instant(0)).unwrap().is_none());
    }
}
