//! The deployment files agree with each other and with the platform: the Kubernetes manifests
//! (deploy/kubernetes) pass the Kubernetes and KEDA schemas, offline, and name the image,
//! port, probes, staging directory, user and settings that the Dockerfile, docker-compose.yml
//! and the config define. Needs no server.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use mysimbdp::Component;
use mysimbdp::config::Settings;
use serde::Deserialize;
use serde_yaml_ng::Value;

/// The Python that runs deploy/kubernetes/validate.py, with its requirements.txt installed
/// (`.ci/run` makes one).
const PYTHON_VAR: &str = "MYSIMBDP_DEPLOY_PYTHON";
/// In the pods' environment for the process, not the config: the log filter.
const NOT_SETTINGS: &[&str] = &["RUST_LOG"];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn yaml_docs(path: &Path) -> Vec<Value> {
    serde_yaml_ng::Deserializer::from_str(&read(path))
        .map(|d| Value::deserialize(d).unwrap_or_else(|e| panic!("{}: {e}", path.display())))
        .filter(|v| !v.is_null())
        .collect()
}

fn s(v: &Value) -> &str {
    v.as_str().unwrap_or_else(|| panic!("not a string: {v:?}"))
}

/// What the Dockerfile defines: instructions with their continuation lines joined.
struct Dockerfile {
    instructions: Vec<(String, String)>,
}

impl Dockerfile {
    fn load() -> Self {
        let text = read(&repo().join("Dockerfile"));
        let mut instructions = Vec::new();
        let mut current = String::new();
        for line in text.lines() {
            let line = line.trim();
            if line.starts_with('#') || (line.is_empty() && current.is_empty()) {
                continue;
            }
            if let Some(cont) = line.strip_suffix('\\') {
                current.push_str(cont);
                current.push(' ');
                continue;
            }
            current.push_str(line);
            if let Some((op, rest)) = current.trim().split_once(' ') {
                instructions.push((op.to_ascii_uppercase(), rest.trim().to_owned()));
            }
            current.clear();
        }
        Self { instructions }
    }

    fn all(&self, op: &str) -> impl Iterator<Item = &str> {
        self.instructions
            .iter()
            .filter(move |(o, _)| o == op)
            .map(|(_, rest)| rest.as_str())
    }

    fn one(&self, op: &str) -> &str {
        let all: Vec<_> = self.all(op).collect();
        assert_eq!(all.len(), 1, "the Dockerfile has {} {op}", all.len());
        all[0]
    }

    /// `ENV A=1 B=2` (values without spaces, as ours are).
    fn env(&self) -> BTreeMap<String, String> {
        self.all("ENV")
            .flat_map(|rest| rest.split_whitespace())
            .map(|kv| {
                let (k, v) = kv.split_once('=').expect("ENV NAME=value");
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }

    fn stages(&self) -> BTreeSet<String> {
        self.all("FROM")
            .filter_map(|rest| {
                rest.split_once(" AS ")
                    .map(|(_, name)| name.trim().to_owned())
            })
            .collect()
    }

    fn args(&self) -> BTreeSet<String> {
        self.all("ARG")
            .map(|a| a.split('=').next().unwrap_or(a).to_owned())
            .collect()
    }
}

/// The port of `host:port`.
fn port_of(address: &str) -> u16 {
    address
        .rsplit_once(':')
        .and_then(|(_, p)| p.parse().ok())
        .unwrap_or_else(|| panic!("no port in {address}"))
}

/// The ports of a URI's hosts: `scheme://user:pass@h1:1,h2:2/path` → [1, 2].
fn uri_ports(uri: &str) -> Vec<u16> {
    let rest = uri.split_once("://").map_or(uri, |(_, r)| r);
    let hosts = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let hosts = hosts.split(['/', '?']).next().unwrap_or(hosts);
    hosts.split(',').map(port_of).collect()
}

/// `${NAME:-default}` → default; anything else as it is.
fn compose_default(v: &str) -> &str {
    v.strip_prefix("${")
        .and_then(|r| r.strip_suffix('}'))
        .and_then(|r| r.split_once(":-"))
        .map_or(v, |(_, d)| d)
}

/// True when the config reads `name`: setting it alone changes the settings, or is refused
/// (a value of the wrong type). A `MYSIMBDP_` name without `__` that is not one of the short
/// names is ignored by the config, and so caught here.
fn config_reads(name: &str) -> bool {
    let default = serde_json::to_value(Settings::default()).expect("settings serialize");
    let probe = [(name.to_owned(), "probe-value-0123456789".to_owned())];
    match Settings::load_from(None, &probe, &[]) {
        Err(_) => true,
        Ok(s) => serde_json::to_value(s).expect("settings serialize") != default,
    }
}

struct Manifests {
    dir: PathBuf,
    kustomization: Value,
    objects: Vec<Value>,
}

impl Manifests {
    fn load() -> Self {
        let dir = repo().join("deploy/kubernetes");
        let kustomization = yaml_docs(&dir.join("kustomization.yaml")).remove(0);
        let resources: BTreeSet<String> = kustomization["resources"]
            .as_sequence()
            .expect("resources")
            .iter()
            .map(|r| s(r).to_owned())
            .collect();
        let configurations: BTreeSet<String> = kustomization["configurations"]
            .as_sequence()
            .map(|c| c.iter().map(|c| s(c).to_owned()).collect())
            .unwrap_or_default();
        let files: BTreeSet<String> = std::fs::read_dir(&dir)
            .expect("deploy/kubernetes")
            .map(|e| e.expect("entry").file_name().to_string_lossy().into_owned())
            .filter(|n| {
                n.ends_with(".yaml") && n != "kustomization.yaml" && !configurations.contains(n)
            })
            .collect();
        assert_eq!(
            resources, files,
            "every manifest in deploy/kubernetes is a resource of the kustomization, and only those"
        );
        let objects = resources
            .iter()
            .flat_map(|r| yaml_docs(&dir.join(r)))
            .collect();
        Self {
            dir,
            kustomization,
            objects,
        }
    }

    fn of_kind<'a>(&'a self, kind: &'a str) -> impl Iterator<Item = &'a Value> {
        self.objects.iter().filter(move |o| o["kind"] == kind)
    }

    fn named(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name}"))
    }

    /// The environment a container gets: the ConfigMap it takes whole, and each variable it
    /// names from the Secret made from secrets.env (values from secrets.env.example, empty
    /// tokens filled in).
    fn container_env(&self, c: &Value) -> Vec<(String, String)> {
        let from: Vec<(&str, &str)> = c["envFrom"]
            .as_sequence()
            .expect("envFrom")
            .iter()
            .flat_map(|e| e.as_mapping().expect("ref").iter())
            .map(|(kind, r)| (s(kind), s(&r["name"])))
            .collect();
        assert_eq!(from, [("configMapRef", "mysimbdp-settings")]);
        let mut env: Vec<(String, String)> = self.named("ConfigMap", "mysimbdp-settings")["data"]
            .as_mapping()
            .expect("data")
            .iter()
            .map(|(k, v)| (s(k).to_owned(), s(v).to_owned()))
            .collect();
        let secret: BTreeMap<String, String> = self.secret_env().into_iter().collect();
        for e in c["env"].as_sequence().expect("env") {
            let name = s(&e["name"]);
            let r = &e["valueFrom"]["secretKeyRef"];
            assert_eq!(s(&r["name"]), self.secret_name(), "{name}");
            let value = secret
                .get(s(&r["key"]))
                .unwrap_or_else(|| panic!("{name}: no {:?} in secrets.env.example", r["key"]));
            let value = if value.is_empty() {
                "a-token-of-32-characters-000000"
            } else {
                value
            };
            env.push((name.to_owned(), value.to_owned()));
        }
        env
    }

    fn secret_name(&self) -> &str {
        let gens = self.kustomization["secretGenerator"]
            .as_sequence()
            .expect("secretGenerator");
        assert_eq!(gens.len(), 1);
        s(&gens[0]["name"])
    }

    fn secret_env(&self) -> Vec<(String, String)> {
        let generator = &self.kustomization["secretGenerator"][0];
        let envs = generator["envs"].as_sequence().expect("envs");
        assert_eq!(envs.len(), 1);
        let example = self.dir.join(format!("{}.example", s(&envs[0])));
        read(&example)
            .lines()
            .map(str::trim)
            .filter(|l| !l.is_empty() && !l.starts_with('#'))
            .map(|l| {
                let (k, v) = l.split_once('=').expect("NAME=value");
                (k.to_owned(), v.to_owned())
            })
            .collect()
    }
}

#[test]
fn kubernetes_manifests_pass_the_schemas_and_agree_with_the_dockerfile_compose_and_config() {
    let docker = Dockerfile::load();
    let m = Manifests::load();
    let compose = yaml_docs(&repo().join("docker-compose.yml")).remove(0);
    let platform = &compose["services"]["platform"];

    // The image: what the Dockerfile builds, compose names and the kustomization deploys.
    let port: u16 = docker.one("EXPOSE").parse().expect("EXPOSE a port");
    let docker_env = docker.env();
    let staging = docker_env["MYSIMBDP_STAGING_DIR"].as_str();
    assert_eq!(port_of(&docker_env["MYSIMBDP_LISTEN"]), port);
    assert_eq!(docker.one("ENTRYPOINT"), r#"["mysimbdp"]"#);
    let (uid, gid) = docker.one("USER").split_once(':').expect("USER uid:gid");
    let (uid, gid): (i64, i64) = (uid.parse().expect("uid"), gid.parse().expect("gid"));
    let stages = docker.stages();
    assert!(
        stages.contains("prebuilt") && stages.contains("release"),
        "{stages:?}"
    );
    let image = s(&platform["image"]).split(':').next().expect("repository");
    let k_image = &m.kustomization["images"][0];
    assert_eq!(s(&k_image["name"]), image);

    // Compose builds a Dockerfile stage with the Dockerfile's arguments, and runs it as the
    // Dockerfile says.
    let build = &platform["build"];
    assert!(stages.contains(compose_default(s(&build["target"]))));
    for arg in build["args"].as_mapping().expect("build args").keys() {
        assert!(docker.args().contains(s(arg)), "compose passes {arg:?}");
    }
    let c_env = platform["environment"].as_mapping().expect("environment");
    assert_eq!(port_of(s(&c_env["MYSIMBDP_LISTEN"])), port);
    assert_eq!(s(&c_env["MYSIMBDP_STAGING_DIR"]), staging);
    for p in platform["ports"].as_sequence().expect("ports") {
        assert_eq!(port_of(s(p)), port, "compose maps the image's port");
    }
    assert!(
        platform["volumes"]
            .as_sequence()
            .expect("volumes")
            .iter()
            .any(|v| s(v).ends_with(&format!(":{staging}")))
    );
    let check = platform["healthcheck"]["test"]
        .as_sequence()
        .expect("healthcheck");
    assert!(
        check
            .iter()
            .any(|a| a.as_str() == Some(&format!("http://127.0.0.1:{port}/healthz")))
    );

    // Every environment name anywhere is one the config reads, and together they load.
    let container =
        |name: &str| &m.named("Deployment", name)["spec"]["template"]["spec"]["containers"][0];
    let pod_env = m.container_env(container("coredms"));
    let names = pod_env
        .iter()
        .map(|(k, _)| k.as_str())
        .chain(c_env.keys().map(s))
        .chain(docker_env.keys().map(String::as_str));
    for name in names.filter(|n| !NOT_SETTINGS.contains(n)) {
        assert!(config_reads(name), "{name} is not read by the config");
    }
    let settings = Settings::load_from(None, &pod_env, &[])
        .unwrap_or_else(|e| panic!("the pods' settings do not load: {e}"));
    assert!(
        settings.amqp.quorum_queues,
        "the cluster's tenant queues are quorum queues"
    );
    assert!(
        settings.mongodb.uri.contains("replicaSet="),
        "MongoDB is a replica set"
    );
    assert_eq!(settings.mongodb.write_concern, "majority");
    assert_eq!(port_of(&settings.http.listen), port);
    assert_eq!(settings.staging.dir, Path::new(staging));
    let coredms_url = settings
        .http
        .coredms_url
        .strip_prefix("http://")
        .expect("http URL");
    assert_eq!(coredms_url, format!("coredms:{port}"));

    // Three Deployments, one per component, each with its Service and budget.
    let deployments: Vec<&Value> = m.of_kind("Deployment").collect();
    assert_eq!(deployments.len(), 3);
    let claim = m.named("PersistentVolumeClaim", "mysimbdp-staging");
    assert_eq!(
        claim["spec"]["accessModes"],
        Value::from(vec!["ReadWriteMany"])
    );
    for d in deployments {
        let name = s(&d["metadata"]["name"]);
        let component = <Component as clap::ValueEnum>::from_str(name, false)
            .unwrap_or_else(|e| panic!("{name}: {e}"));
        assert_ne!(component, Component::All);
        let spec = &d["spec"];
        assert_eq!(spec["replicas"].as_u64(), Some(3), "{name}");
        let labels = &spec["template"]["metadata"]["labels"];
        assert_eq!(spec["selector"]["matchLabels"], *labels, "{name}");
        let pod = &spec["template"]["spec"];
        let user = &pod["securityContext"];
        assert_eq!(user["runAsUser"].as_i64(), Some(uid), "{name}");
        assert_eq!(user["runAsGroup"].as_i64(), Some(gid), "{name}");
        assert_eq!(
            user["fsGroup"].as_i64(),
            Some(gid),
            "{name}: staging writable"
        );
        let containers = pod["containers"].as_sequence().expect("containers");
        assert_eq!(containers.len(), 1);
        let c = &containers[0];
        assert_eq!(s(&c["image"]), image, "{name}");
        assert_eq!(c["args"], Value::from(vec!["serve", name]));
        assert_eq!(c["ports"][0]["containerPort"].as_u64(), Some(port.into()));
        let port_name = &c["ports"][0]["name"];
        for probe in ["readinessProbe", "livenessProbe"] {
            assert_eq!(c[probe]["httpGet"]["path"], "/healthz", "{name} {probe}");
            assert_eq!(c[probe]["httpGet"]["port"], *port_name, "{name} {probe}");
        }
        for bound in ["requests", "limits"] {
            for what in ["cpu", "memory"] {
                assert!(
                    !c["resources"][bound][what].is_null(),
                    "{name}: no {bound}.{what}"
                );
            }
        }
        assert_eq!(m.container_env(c), pod_env, "{name} has the same settings");
        let mounts = c["volumeMounts"].as_sequence();
        if component == Component::Batch {
            let mount = &mounts.expect("batch mounts staging")[0];
            assert_eq!(s(&mount["mountPath"]), staging);
            let volume = &pod["volumes"][0];
            assert_eq!(volume["name"], mount["name"]);
            assert_eq!(
                volume["persistentVolumeClaim"]["claimName"],
                claim["metadata"]["name"]
            );
        } else {
            assert!(mounts.is_none(), "{name} needs no staging volume");
        }
        let service = m.named("Service", name);
        assert_eq!(service["spec"]["selector"], *labels, "{name} Service");
        assert_eq!(
            service["spec"]["ports"][0]["port"].as_u64(),
            Some(port.into())
        );
        let pdb = m.named("PodDisruptionBudget", name);
        assert_eq!(
            pdb["spec"]["selector"]["matchLabels"], *labels,
            "{name} PDB"
        );
    }

    // The network policy lets the pods reach what their settings name, and be reached.
    let policy = &m.named("NetworkPolicy", "mysimbdp")["spec"];
    let ports = |rules: &Value| -> BTreeSet<u64> {
        rules
            .as_sequence()
            .expect("rules")
            .iter()
            .flat_map(|r| r["ports"].as_sequence().into_iter().flatten())
            .filter(|p| p["protocol"] == "TCP")
            .filter_map(|p| p["port"].as_u64())
            .collect()
    };
    let egress = ports(&policy["egress"]);
    let needed = uri_ports(&settings.mongodb.uri)
        .into_iter()
        .chain(uri_ports(&settings.amqp.uri))
        .chain(uri_ports(&settings.http.coredms_url));
    for p in needed {
        assert!(
            egress.contains(&p.into()),
            "egress to port {p} is not allowed"
        );
    }
    assert!(ports(&policy["ingress"]).contains(&port.into()));
    assert_eq!(
        policy["podSelector"]["matchLabels"]["app.kubernetes.io/name"],
        "mysimbdp"
    );

    // The stream managers scale on the tenant queues, from the Deployment's replicas up.
    let scaled = m.named("ScaledObject", "stream");
    let target = &scaled["spec"]["scaleTargetRef"];
    assert_eq!(
        (s(&target["kind"]), s(&target["name"])),
        ("Deployment", "stream")
    );
    assert_eq!(
        scaled["spec"]["minReplicaCount"],
        m.named("Deployment", "stream")["spec"]["replicas"]
    );
    let trigger = &scaled["spec"]["triggers"][0];
    assert_eq!(s(&trigger["type"]), "rabbitmq");
    let auth = m.named(
        "TriggerAuthentication",
        s(&trigger["authenticationRef"]["name"]),
    );
    let secret_keys: BTreeSet<String> = m.secret_env().into_iter().map(|(k, _)| k).collect();
    for r in auth["spec"]["secretTargetRef"]
        .as_sequence()
        .expect("secretTargetRef")
    {
        assert_eq!(s(&r["name"]), m.secret_name());
        assert!(secret_keys.contains(s(&r["key"])), "{r:?}");
    }
    // kustomize renames the generated Secret (a hash suffix) wherever it knows a reference;
    // KEDA's is taught by the kustomization's configurations.
    let config = yaml_docs(&m.dir.join(s(&m.kustomization["configurations"][0]))).remove(0);
    let renamed = config["nameReference"]
        .as_sequence()
        .expect("nameReference")
        .iter()
        .filter(|r| r["kind"] == "Secret")
        .flat_map(|r| r["fieldSpecs"].as_sequence().into_iter().flatten())
        .any(|f| f["kind"] == "TriggerAuthentication" && f["path"] == "spec/secretTargetRef/name");
    assert!(
        renamed,
        "the TriggerAuthentication's Secret reference is renamed with the Secret"
    );
    assert!(
        settings.platform.namespace.is_empty(),
        "keda.yaml's queue pattern assumes no platform.namespace prefix"
    );

    // The schemas, offline (deploy/kubernetes/validate.py).
    let Some(python) = std::env::var_os(PYTHON_VAR) else {
        let msg = format!(
            "schema validation needs {PYTHON_VAR}: a python with \
             deploy/kubernetes/requirements.txt installed"
        );
        if std::env::var_os("CI").is_some() {
            panic!("{msg} (required in CI)");
        }
        eprintln!("NOT RUN: {msg}; CI runs it");
        return;
    };
    let out = std::process::Command::new(python)
        .arg(m.dir.join("validate.py"))
        .arg(&m.dir)
        .output()
        .expect("runs validate.py");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        stdout.lines().filter(|l| l.starts_with("valid ")).count(),
        m.objects.len() + 1,
        "every object and the generated Secret validated: {stdout}"
    );
}
