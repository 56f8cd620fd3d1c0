//! S1: a cold sequential read of a 1 GiB file through a mount of a volume
//! in S3, against a raw client that fetches the same segment objects with
//! parallel ranged GETs.
//!
//! The server is the Garage that `scripts/s3-servers.sh` starts: the
//! workload reads its `CHALK_GARAGE_*` settings and works under a fresh key
//! prefix, which it deletes at the end. It runs only when named on the
//! command line, because it needs that server.

use std::ffi::OsStr;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{bail, ensure, Context};
use aws_sdk_s3::config::{Credentials, Region};
use aws_sdk_s3::Client;
use tokio::sync::Semaphore;

use crate::{is_mounted, read_file, Bench, Group, MountGuard, System, Unit, Workload, READ_BUFFER_BYTES, VOLUME};

/// Size of the file read.
const FILE_BYTES: u64 = 1 << 30;
/// GETs in flight and bytes per GET of the raw client: the defaults of the
/// engine's readahead threads (`CacheConfig::fetch_threads`) and largest
/// ranged GET (`CacheConfig::request_max_bytes`), so both sides get the
/// same concurrency.
const RAW_CONCURRENCY: usize = 16;
const RAW_PART_BYTES: u64 = 8 << 20;
/// Name of the file in the volume.
const REMOTE_FILE: &str = "big.bin";

/// The Garage server of `scripts/s3-servers.sh`.
struct Garage {
    endpoint: String,
    region: String,
    bucket: String,
    access_key_id: String,
    secret_access_key: String,
}

impl Garage {
    fn from_env() -> anyhow::Result<Garage> {
        let var = |name: &str| {
            std::env::var(name).with_context(|| {
                format!(
                    "{name} is not set; S1 needs the Garage server: run `scripts/s3-servers.sh start` and \
                     `eval \"$(scripts/s3-servers.sh env)\"` first"
                )
            })
        };
        Ok(Garage {
            endpoint: var("CHALK_GARAGE_ENDPOINT")?,
            region: var("CHALK_GARAGE_REGION")?,
            bucket: var("CHALK_GARAGE_BUCKET")?,
            access_key_id: var("CHALK_GARAGE_ACCESS_KEY_ID")?,
            secret_access_key: var("CHALK_GARAGE_SECRET_ACCESS_KEY")?,
        })
    }

    /// Environment of a `chalk` process that uses the store `s3://bucket/prefix`.
    fn chalk_env(&self, prefix: &str) -> Vec<(&'static str, String)> {
        vec![
            ("CHALK_STORE", format!("s3://{}/{prefix}", self.bucket)),
            ("AWS_ENDPOINT_URL", self.endpoint.clone()),
            ("AWS_REGION", self.region.clone()),
            ("AWS_ACCESS_KEY_ID", self.access_key_id.clone()),
            ("AWS_SECRET_ACCESS_KEY", self.secret_access_key.clone()),
            ("AWS_EC2_METADATA_DISABLED", "true".into()),
        ]
    }

    fn client(&self) -> Client {
        let credentials = Credentials::new(&self.access_key_id, &self.secret_access_key, None, None, "chalk-bench");
        let config = aws_sdk_s3::config::Builder::new()
            .behavior_version(aws_sdk_s3::config::BehaviorVersion::latest())
            .endpoint_url(&self.endpoint)
            .region(Region::new(self.region.clone()))
            .credentials_provider(credentials)
            .force_path_style(true)
            .build();
        Client::from_conf(config)
    }
}

/// State set by `prepare`.
struct Prepared {
    garage: Garage,
    /// Key prefix of the store in the bucket, without a trailing `/`.
    prefix: String,
    version: String,
    /// Keys and sizes of the segment objects that hold the file.
    segments: Vec<(String, u64)>,
    runtime: tokio::runtime::Runtime,
    client: Client,
}

/// S1: see the module documentation.
#[derive(Default)]
pub struct ColdS3Read {
    prepared: Option<Prepared>,
    runs: u32,
}

impl Workload for ColdS3Read {
    fn id(&self) -> &'static str {
        "S1"
    }

    fn description(&self) -> &'static str {
        "Cold sequential read of a 1 GiB file (incompressible bytes, put with `chalk volume put`) from a volume in \
         loopback Garage. chalk-s3-cold: each repetition starts a fresh CHALK_HOME (empty memory and disk caches), \
         mounts the version (`chalk volume mount --version ID --daemon`) and times reading the file like `cat`, \
         without mount and unmount. Baseline s3-ranged-get: an aws-sdk-s3 client reads the same segment objects \
         with 8 MiB ranged GETs, 16 in flight, into memory. The ratio is the raw client's time divided by the \
         mount's time."
    }

    fn unit(&self) -> Unit {
        Unit::Seconds
    }

    fn systems(&self) -> &'static [System] {
        &[System::S3RangedGet, System::ChalkColdS3]
    }

    fn group(&self) -> Group {
        Group::S3
    }

    fn prepare(&mut self, bench: &Bench) -> anyhow::Result<()> {
        let garage = Garage::from_env()?;
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_nanos();
        let prefix = format!("bench-s1-{nanos:x}");
        let env = garage.chalk_env(&prefix);
        let home = bench.work.join("s1-put-home");
        fs::create_dir(&home).with_context(|| format!("failed to create {}", home.display()))?;

        let source = bench.work.join("s1-source.bin");
        write_incompressible(&source, FILE_BYTES)?;
        bench.chalk.run_with_env(&home, [OsStr::new("volume"), "create".as_ref(), VOLUME.as_ref()], &env)?;
        eprintln!("S1: putting {} bytes into s3://{}/{prefix}", FILE_BYTES, garage.bucket);
        bench.chalk.run_with_env(
            &home,
            [OsStr::new("volume"), "put".as_ref(), VOLUME.as_ref(), source.as_os_str(), REMOTE_FILE.as_ref()],
            &env,
        )?;
        fs::remove_file(&source).with_context(|| format!("failed to remove {}", source.display()))?;
        let versions = bench
            .chalk
            .run_with_env(&home, [OsStr::new("volume"), "versions".as_ref(), VOLUME.as_ref(), "--json".as_ref()], &env)?;
        let versions: serde_json::Value = serde_json::from_str(&versions).context("`chalk volume versions --json` printed invalid JSON")?;
        let version = versions
            .as_array()
            .and_then(|list| list.last())
            .and_then(|v| v["id"].as_str())
            .context("`chalk volume versions --json` printed no version")?
            .to_owned();
        fs::remove_dir_all(&home).with_context(|| format!("failed to remove {}", home.display()))?;

        let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
        let client = garage.client();
        let segments_prefix = format!("{prefix}/volumes/{VOLUME}/segments/");
        let segments = runtime.block_on(list_objects(&client, &garage.bucket, &segments_prefix))?;
        let total: u64 = segments.iter().map(|(_, size)| size).sum();
        ensure!(total >= FILE_BYTES, "the segments under {segments_prefix} hold {total} bytes, less than the file");
        eprintln!("S1: version {version} is stored in {} segment objects, {total} bytes", segments.len());
        self.prepared = Some(Prepared { garage, prefix, version, segments, runtime, client });
        Ok(())
    }

    fn measure(&mut self, system: System, bench: &Bench) -> anyhow::Result<f64> {
        let prepared = self.prepared.as_ref().context("S1 was measured before it was prepared")?;
        match system {
            System::S3RangedGet => {
                let start = Instant::now();
                let bytes = prepared.runtime.block_on(ranged_get_all(&prepared.client, &prepared.garage.bucket, &prepared.segments))?;
                let seconds = start.elapsed().as_secs_f64();
                let expected: u64 = prepared.segments.iter().map(|(_, size)| size).sum();
                ensure!(bytes == expected, "the raw client read {bytes} bytes, expected {expected}");
                Ok(seconds)
            }
            System::ChalkColdS3 => {
                self.runs += 1;
                let home = bench.work.join(format!("s1-home-{}", self.runs));
                let mount_point = bench.work.join(format!("s1-mnt-{}", self.runs));
                let seconds = time_cold_read(bench, prepared, &home, &mount_point);
                fs::remove_dir_all(&home).with_context(|| format!("failed to remove {}", home.display()))?;
                fs::remove_dir(&mount_point).with_context(|| format!("failed to remove {}", mount_point.display()))?;
                seconds
            }
            _ => bail!("S1 does not measure {}", system.as_str()),
        }
    }

    fn finish(&mut self, _bench: &Bench) -> anyhow::Result<()> {
        let Some(prepared) = self.prepared.take() else { return Ok(()) };
        let prefix = format!("{}/", prepared.prefix);
        let (client, bucket) = (&prepared.client, &prepared.garage.bucket);
        prepared.runtime.block_on(async {
            for (key, _) in list_objects(client, bucket, &prefix).await? {
                client.delete_object().bucket(bucket).key(&key).send().await.with_context(|| format!("failed to delete {key}"))?;
            }
            anyhow::Ok(())
        })
    }
}

/// Mounts the version on a fresh local root and times reading the file once.
fn time_cold_read(bench: &Bench, prepared: &Prepared, home: &Path, mount_point: &Path) -> anyhow::Result<f64> {
    fs::create_dir(home).with_context(|| format!("failed to create {}", home.display()))?;
    fs::create_dir(mount_point).with_context(|| format!("failed to create {}", mount_point.display()))?;
    let env = prepared.garage.chalk_env(&prepared.prefix);
    let guard = MountGuard { dir: mount_point.to_owned() };
    bench.chalk.run_with_env(
        home,
        [
            OsStr::new("volume"),
            "mount".as_ref(),
            VOLUME.as_ref(),
            mount_point.as_os_str(),
            "--version".as_ref(),
            prepared.version.as_ref(),
            "--daemon".as_ref(),
        ],
        &env,
    )?;
    ensure!(is_mounted(mount_point)?, "`chalk volume mount` succeeded but {} is not a mount point", mount_point.display());

    let mut buffer = vec![0u8; READ_BUFFER_BYTES];
    let path: PathBuf = mount_point.join(REMOTE_FILE);
    let start = Instant::now();
    let bytes = read_file(&path, &mut buffer)?;
    let seconds = start.elapsed().as_secs_f64();
    ensure!(bytes == FILE_BYTES, "reading {} returned {bytes} bytes, expected {FILE_BYTES}", path.display());

    bench.chalk.run_with_env(home, [OsStr::new("volume"), "unmount".as_ref(), mount_point.as_os_str()], &env)?;
    drop(guard);
    Ok(seconds)
}

/// Writes `len` bytes that no compressor shrinks (xorshift64 output).
fn write_incompressible(path: &Path, len: u64) -> anyhow::Result<()> {
    let mut file = std::io::BufWriter::with_capacity(
        1 << 20,
        fs::File::create(path).with_context(|| format!("failed to create {}", path.display()))?,
    );
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut chunk = vec![0u8; 1 << 20];
    let mut written = 0;
    while written < len {
        for word in chunk.chunks_exact_mut(8) {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            word.copy_from_slice(&state.to_le_bytes());
        }
        let n = chunk.len().min((len - written) as usize);
        file.write_all(&chunk[..n]).with_context(|| format!("failed to write {}", path.display()))?;
        written += n as u64;
    }
    file.flush().with_context(|| format!("failed to write {}", path.display()))?;
    Ok(())
}

/// Keys and sizes of every object under `prefix`.
async fn list_objects(client: &Client, bucket: &str, prefix: &str) -> anyhow::Result<Vec<(String, u64)>> {
    let mut out = Vec::new();
    let mut pages = client.list_objects_v2().bucket(bucket).prefix(prefix).into_paginator().send();
    while let Some(page) = pages.next().await {
        let page = page.with_context(|| format!("failed to list {prefix} in bucket {bucket}"))?;
        for object in page.contents() {
            if let Some(key) = object.key() {
                out.push((key.to_owned(), object.size().unwrap_or(0).max(0) as u64));
            }
        }
    }
    Ok(out)
}

/// Reads every object whole with ranged GETs of [`RAW_PART_BYTES`],
/// [`RAW_CONCURRENCY`] at a time, and returns the bytes read.
async fn ranged_get_all(client: &Client, bucket: &str, objects: &[(String, u64)]) -> anyhow::Result<u64> {
    let permits = Arc::new(Semaphore::new(RAW_CONCURRENCY));
    let mut tasks = tokio::task::JoinSet::new();
    for (key, size) in objects {
        let mut offset = 0;
        while offset < *size {
            let last = (offset + RAW_PART_BYTES).min(*size) - 1;
            let (client, bucket, key, permits) = (client.clone(), bucket.to_owned(), key.clone(), permits.clone());
            tasks.spawn(async move {
                let _permit = permits.acquire_owned().await?;
                let output = client
                    .get_object()
                    .bucket(&bucket)
                    .key(&key)
                    .range(format!("bytes={offset}-{last}"))
                    .send()
                    .await
                    .with_context(|| format!("GET {key} bytes {offset}-{last} failed"))?;
                let body = output.body.collect().await.with_context(|| format!("reading {key} failed"))?;
                anyhow::Ok(body.into_bytes().len() as u64)
            });
            offset = last + 1;
        }
    }
    let mut bytes = 0;
    while let Some(result) = tasks.join_next().await {
        bytes += result??;
    }
    Ok(bytes)
}
