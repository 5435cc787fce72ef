//! CPU-bound stages of ingestion, measured per record: parsing (CSV, NDJSON), a tenant
//! app's `map` and `ingest`, and preparing a bulk write (BSON encoding, ids, log entries).

use std::hint::black_box;
use std::path::PathBuf;

use criterion::{BatchSize, Criterion, Throughput, criterion_group, criterion_main};
use mysimbdp::apps::{AppHandle, compile};
use mysimbdp::batch::parse;
use mysimbdp::config::{AppLimits, Format};
use mysimbdp::coredms::{buckets, log_entries, log_values, prepare};
use mysimbdp::logs::{Source, Status};
use mysimbdp::model::{AppKind, BulkWrite, InputRef};
use mysimbdp::pipeline::{Input, transform};
use mysimbdp::tenants::TenantName;
use mysimbdp_bench::schema::AppChoice;

// The allocator the platform's binaries run with (jemalloc): what the stages cost there.
#[global_allocator]
static ALLOCATOR: mysimbdp::memory::Allocator = mysimbdp::memory::Allocator;

fn dataset() -> Vec<u8> {
    let p =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scenarios/data/water-quality-10k.csv");
    std::fs::read(p).expect("the water-quality dataset is in scenarios/data")
}

fn records(csv: &[u8]) -> Vec<serde_json::Value> {
    let mut src = parse::open(Format::Csv, std::io::Cursor::new(csv.to_vec()));
    std::iter::from_fn(|| src.next_record())
        .filter_map(|r| r.ok()?.value.ok())
        .collect()
}

const MAP_APP: &str = r#"
function map(r)
    local v = tonumber(r.result)
    return { site = r["sample.samplingPoint.notation"], determinand = r["determinand.label"],
             value = v, unit = r["determinand.unit.label"], at = r["sample.sampleDateTime"] }
end"#;

const INGEST_APP: &str = r#"
function ingest(tenant, name, data)
    for _, row in ipairs(parse_csv(data)) do
        emit({ site = row["sample.samplingPoint.notation"], value = tonumber(row.result) })
    end
end"#;

fn handle(src: &str) -> AppHandle {
    let limits = AppLimits {
        time_ms: 60_000,
        instructions: u64::MAX / 2,
        ..AppLimits::default()
    };
    let c = compile(src, &limits).expect("bench app compiles");
    AppHandle::new(
        TenantName::parse("bench").expect("valid"),
        AppKind::Batch,
        1,
        c,
        limits,
    )
}

fn parsing(c: &mut Criterion) {
    let csv = dataset();
    let recs = records(&csv);
    let n = recs.len() as u64;
    let ndjson: Vec<u8> = recs
        .iter()
        .flat_map(|r| {
            let mut l = serde_json::to_vec(r).expect("json");
            l.push(b'\n');
            l
        })
        .collect();
    let mut g = c.benchmark_group("parse");
    g.throughput(Throughput::Elements(n));
    g.bench_function("csv water-quality (per file)", |b| {
        b.iter(|| {
            let mut src = parse::open(Format::Csv, std::io::Cursor::new(black_box(csv.clone())));
            std::iter::from_fn(|| src.next_record()).count()
        })
    });
    g.bench_function("ndjson water-quality (per file)", |b| {
        b.iter(|| {
            let mut src = parse::open(
                Format::Ndjson,
                std::io::Cursor::new(black_box(ndjson.clone())),
            );
            std::iter::from_fn(|| src.next_record()).count()
        })
    });
    g.finish();
}

fn apps(c: &mut Criterion) {
    let csv = dataset();
    let recs = records(&csv);
    let map = handle(MAP_APP);
    let mut g = c.benchmark_group("app");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("map per record (x1000)", |b| {
        b.iter(|| map.map_records("wq.csv", black_box(&recs[..1000])))
    });
    // What the scenarios' `map` app costs: all 17 fields back out, and two more.
    let copy = handle(AppChoice::Map.source().unwrap_or_default());
    g.bench_function("map copying every field per record (x1000)", |b| {
        b.iter(|| copy.map_records("wq.csv", black_box(&recs[..1000])))
    });
    let ingest = handle(INGEST_APP);
    let head: String = String::from_utf8_lossy(&csv)
        .lines()
        .take(1001)
        .collect::<Vec<_>>()
        .join("\n");
    g.bench_function("ingest payload of 1000 records", |b| {
        b.iter(|| ingest.ingest("wq.csv", black_box(&head)))
    });
    g.finish();
    // What a quiet tenant's next message pays once its idle VMs were dropped
    // (`platform.idle_vm_ms`): a VM built from the bytecode, then one map.
    let mut g = c.benchmark_group("app cold");
    g.throughput(Throughput::Elements(1));
    g.bench_function("map one record on a VM built for it", |b| {
        b.iter(|| {
            map.drop_idle_vms(std::time::Duration::ZERO);
            map.map_records("wq.csv", black_box(&recs[..1]))
        })
    });
    g.finish();
}

fn bulk(c: &mut Criterion) {
    let recs = records(&dataset());
    let inputs: Vec<Input> = recs[..1000]
        .iter()
        .enumerate()
        .map(|(i, r)| Input {
            origin: "0123456789abcdef".into(),
            index: i as u64,
            input: InputRef::Record {
                job: "0123456789abcdef0123456789abcdef".into(),
                record: i as u64,
                line: Some(i as u64 + 2),
            },
            bytes: 360,
            started_us: 0,
            data_name: "wq.csv".into(),
            value: Ok(r.clone()),
        })
        .collect();
    let t = transform(None, "wq", 1 << 20, &inputs);
    let write = BulkWrite {
        tenant: TenantName::parse("bench").expect("valid"),
        source: Source::Batch,
        data_name: "wq.csv".into(),
        app_version: None,
        docs: t.docs,
        unstored: vec![],
        origin: Some("bench".into()),
        replay: false,
    };
    let statuses = vec![Status::Success; write.docs.len()];
    let reasons = vec![None; write.docs.len()];
    let mut g = c.benchmark_group("bulk write");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("prepare 1000 documents (BSON, ids)", |b| {
        b.iter(|| prepare(black_box(&write)))
    });
    g.bench_function("log entries for 1000 documents", |b| {
        b.iter(|| log_entries(black_box(&write), &statuses, &reasons))
    });
    // What the log of one bulk costs before it is sent: its entries, in buckets, packed.
    let entries = log_values(&write, &statuses, &reasons);
    g.bench_function("log buckets of 1000 entries (packed)", |b| {
        b.iter(|| buckets::buckets("bench", "0123456789abcdef", black_box(&entries), ""))
    });
    g.bench_function("transform 1000 records without app (ids, sizes)", |b| {
        b.iter_batched(
            || inputs.clone(),
            |i| transform(None, "wq", 1 << 20, &i),
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

criterion_group!(benches, parsing, apps, bulk);
criterion_main!(benches);
