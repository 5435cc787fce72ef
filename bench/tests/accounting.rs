//! A real scenario run against the servers in MONGODB_URI / AMQP_URI: a file that fails to
//! parse at all, an app that breaks on every input, and an attacker group whose failures
//! are expected. The report must account for every input and `--strict` must name exactly
//! the tenants and paths that went wrong.

use std::path::Path;

fn write(dir: &Path, name: &str, bytes: &[u8]) {
    let p = dir.join(name);
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent).expect("dir");
    }
    std::fs::write(p, bytes).expect("write");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_that_fails_whole_shows_as_lost_and_strict_fails() {
    let dir = std::env::temp_dir().join(format!("mysimbdp-bench-acc-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    // A header that is not UTF-8: the platform logs one failure for the file and reads no
    // row of it, yet calls the file `done`.
    let mut bad = b"id,s\xffite,value\n".to_vec();
    for i in 0..30 {
        bad.extend_from_slice(format!("{i},S{i},{i}.5\n").as_bytes());
    }
    write(&dir, "bad.csv", &bad);
    write(
        &dir,
        "apps/fail.luau",
        b"function map(r) error(\"every input breaks this app\") end",
    );
    write(
        &dir,
        "acc.toml",
        br#"
name = "accounting-test"
timeout_s = 90

[platform]
batch_workers = 1

[[tenants.group]]
name = "badfile"
[tenants.group.batch]
files = 1
records_per_file = 30
dataset = "bad.csv"

[[tenants.group]]
name = "broken"
app_source = "apps/fail.luau"
[tenants.group.batch]
files = 1
records_per_file = 20
[tenants.group.stream]
messages = 10
rate = 20
per_request = 5

[[tenants.group]]
name = "attacker"
app_source = "apps/fail.luau"
expect = "failures"
[tenants.group.batch]
files = 1
records_per_file = 20
[tenants.group.stream]
messages = 10
rate = 20
per_request = 5
poison_every = 5
"#,
    );
    let out = dir.join("reports");
    let run = mysimbdp_bench::run(&dir.join("acc.toml"), &out)
        .await
        .expect("the run completes and writes its report");
    let report_path = run.join("report.json");
    let r: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&report_path).expect("report.json")).expect("json");
    assert_eq!(r["schema_version"], 2);
    let account = |tenant: &str, path: &str| -> serde_json::Value {
        r["accounting"]
            .as_array()
            .expect("accounting")
            .iter()
            .find(|a| a["tenant"] == tenant && a["path"] == path)
            .unwrap_or_else(|| panic!("no account for {tenant} {path}: {r:#}"))
            .clone()
    };
    let n = |a: &serde_json::Value, k: &str| a[k].as_i64().unwrap_or(-999);

    let bad = account("badfile-0", "batch");
    assert_eq!(
        (
            n(&bad, "offered"),
            n(&bad, "stored"),
            n(&bad, "failed"),
            n(&bad, "lost")
        ),
        (30, 0, 1, 29),
        "{bad:#}"
    );
    for (path, offered) in [("batch", 20), ("stream", 10)] {
        let a = account("broken-0", path);
        assert_eq!(
            (
                n(&a, "offered"),
                n(&a, "stored"),
                n(&a, "failed"),
                n(&a, "lost")
            ),
            (offered, 0, offered, 0),
            "{a:#}"
        );
        let a = account("attacker-0", path);
        assert_eq!(
            n(&a, "offered") + n(&a, "refused"),
            offered,
            "every input offered or refused at the door: {a:#}"
        );
        assert_eq!(n(&a, "lost"), 0, "{a:#}");
        assert_eq!(n(&a, "stored"), 0, "{a:#}");
    }
    // The headline counts are the groups that expect success; the old fields stay.
    assert_eq!(r["batch"]["accounting"]["offered"], 50, "{:#}", r["batch"]);
    assert_eq!(r["batch"]["accounting"]["lost"], 29);
    assert_eq!(r["batch"]["count"], 0);
    assert_eq!(r["batch"]["failures"], 21);

    let e = format!(
        "{:#}",
        mysimbdp_bench::check(&report_path).expect_err("strict refuses this run")
    );
    let lines: Vec<&str> = e.lines().skip(1).map(str::trim).collect();
    assert_eq!(
        lines.len(),
        3,
        "one line per tenant and path that went wrong: {e}"
    );
    assert!(
        lines[0].starts_with(
            "badfile-0 (badfile) batch: 29 of 30 offered inputs neither stored nor logged as failed"
        ),
        "{e}"
    );
    assert!(
        lines[1].starts_with("broken-0 (broken) batch: 20 failed (e.g. app error:"),
        "{e}"
    );
    assert!(
        lines[2].starts_with("broken-0 (broken) stream: 10 failed"),
        "{e}"
    );
    assert!(!e.contains("attacker"), "its failures are expected: {e}");
    mysimbdp_bench::completed(&report_path).expect("nothing unfinished, no platform error");
    let md = std::fs::read_to_string(run.join("report.md")).expect("report.md");
    assert!(md.contains("## Accounting"), "{md}");
    assert!(
        md.contains("| badfile-0 | success | batch | 30 | 0 | 0 | 1 | 29 |"),
        "{md}"
    );
    let _ = std::fs::remove_dir_all(&dir);
}
