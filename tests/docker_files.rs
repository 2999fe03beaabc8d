//! The deployment files in `docker/`, checked without a container engine: the compose file
//! mounts what the Dockerfile expects, the image holds no config or certificates and runs
//! as non-root, HAProxy and promtool accept their configurations, and the replicas' config
//! passes `portcullis check-config` with generated certificates.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn docker_dir() -> PathBuf {
    root().join("docker")
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn show(out: &Output) -> String {
    format!(
        "status {}\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// One Dockerfile instruction: keyword (upper case) and its arguments, continuation lines
/// joined and comments dropped.
#[derive(Debug)]
struct Instruction {
    keyword: String,
    args: String,
}

/// The Dockerfile's stages, each a list of instructions starting with its `FROM`.
fn dockerfile_stages() -> Vec<Vec<Instruction>> {
    let text = read(&docker_dir().join("Dockerfile"));
    let mut stages: Vec<Vec<Instruction>> = Vec::new();
    let mut pending = String::new();
    for line in text.lines() {
        let trimmed = line.trim();
        if trimmed.starts_with('#') || (trimmed.is_empty() && pending.is_empty()) {
            continue;
        }
        if let Some(head) = trimmed.strip_suffix('\\') {
            pending.push_str(head);
            pending.push(' ');
            continue;
        }
        pending.push_str(trimmed);
        let full = std::mem::take(&mut pending);
        let (keyword, args) = full.split_once(char::is_whitespace).unwrap_or((&full, ""));
        let instruction = Instruction {
            keyword: keyword.to_ascii_uppercase(),
            args: args.trim().to_string(),
        };
        if instruction.keyword == "FROM" {
            stages.push(Vec::new());
        }
        stages
            .last_mut()
            .expect("the Dockerfile starts with FROM")
            .push(instruction);
    }
    assert!(pending.is_empty(), "dangling line continuation");
    stages
}

/// The strings of a JSON-array (exec form) instruction argument such as
/// `["serve", "--config", "/etc/x.toml"]`.
fn exec_form(args: &str) -> Vec<String> {
    let inner = args
        .trim()
        .strip_prefix('[')
        .and_then(|s| s.strip_suffix(']'))
        .unwrap_or_else(|| panic!("not exec form: {args}"));
    inner
        .split(',')
        .map(|s| s.trim().trim_matches('"').to_string())
        .collect()
}

/// The compose file's services, each as its raw lines (indentation kept), by name.
fn compose_services() -> BTreeMap<String, Vec<String>> {
    let text = read(&docker_dir().join("compose.yaml"));
    let mut services = BTreeMap::new();
    let mut in_services = false;
    let mut current: Option<String> = None;
    for line in text.lines() {
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        let indent = line.len() - line.trim_start().len();
        if indent == 0 {
            in_services = line.trim_end() == "services:";
            current = None;
            continue;
        }
        if !in_services {
            continue;
        }
        if indent == 2 {
            let name = line.trim().trim_end_matches(':').to_string();
            services.insert(name.clone(), Vec::new());
            current = Some(name);
        } else if let Some(name) = &current {
            services.get_mut(name).unwrap().push(line.to_string());
        }
    }
    services
}

/// A service's bind mounts as (source, target), from its `- SRC:TARGET[:ro]` lines.
fn mounts(service: &[String]) -> Vec<(String, String)> {
    service
        .iter()
        .filter_map(|l| l.trim().strip_prefix("- "))
        .map(|v| v.trim_matches('"'))
        .filter(|v| v.contains(":/"))
        .map(|v| {
            let mut parts = v.split(':');
            let source = parts.next().unwrap().to_string();
            let target = parts.next().unwrap().to_string();
            (source, target)
        })
        .collect()
}

/// The value of `key:` in a service, if any line has it.
fn value(service: &[String], key: &str) -> Option<String> {
    service.iter().find_map(|l| {
        l.trim()
            .strip_prefix(key)
            .and_then(|rest| rest.strip_prefix(':'))
            .map(|v| v.trim().trim_matches('"').to_string())
    })
}

fn seconds(duration: &str) -> u64 {
    duration
        .strip_suffix('s')
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("expected whole seconds such as \"5s\": {duration}"))
}

/// The string value of `key` in `[section]` of docker/portcullis.toml.
fn toml_string(section: &str, key: &str) -> String {
    let header = format!("[{section}]");
    let mut in_section = false;
    for line in read(&docker_dir().join("portcullis.toml")).lines() {
        let line = line.split('#').next().unwrap().trim();
        if line.starts_with('[') {
            in_section = line == header;
        } else if let Some((k, v)) = line.split_once('=') {
            if in_section && k.trim() == key {
                return v.trim().trim_matches('"').to_string();
            }
        }
    }
    panic!("docker/portcullis.toml has no {section}.{key}")
}

/// The port of `[admin] listen` in docker/portcullis.toml.
fn admin_port() -> String {
    let listen = toml_string("admin", "listen");
    listen.rsplit(':').next().unwrap().to_string()
}

/// The replicas: the services built from docker/Dockerfile.
fn replicas(services: &BTreeMap<String, Vec<String>>) -> Vec<(&String, &Vec<String>)> {
    let replicas: Vec<_> = services
        .iter()
        .filter(|(_, lines)| value(lines, "dockerfile").as_deref() == Some("docker/Dockerfile"))
        .collect();
    assert!(replicas.len() >= 2, "expected two replicas: {services:?}");
    replicas
}

fn config_path_in_cmd() -> String {
    let stages = dockerfile_stages();
    let runtime = stages.last().unwrap();
    let cmd = runtime
        .iter()
        .find(|i| i.keyword == "CMD")
        .expect("the runtime stage has a CMD");
    let argv = exec_form(&cmd.args);
    let at = argv
        .iter()
        .position(|a| a == "--config")
        .expect("CMD passes --config");
    argv[at + 1].clone()
}

#[test]
fn compose_mounts_the_files_in_docker_and_they_exist() {
    let services = compose_services();
    for (service, file, target) in [
        (
            "haproxy",
            "./haproxy.cfg",
            "/usr/local/etc/haproxy/haproxy.cfg",
        ),
        (
            "prometheus",
            "./prometheus.yml",
            "/etc/prometheus/prometheus.yml",
        ),
    ] {
        let lines = services
            .get(service)
            .unwrap_or_else(|| panic!("no service {service}"));
        assert!(
            mounts(lines).contains(&(file.to_string(), target.to_string())),
            "{service} mounts {file} at {target}: {:?}",
            mounts(lines)
        );
        assert!(docker_dir().join(file).is_file(), "docker/{file} exists");
    }
    for (name, lines) in replicas(&services) {
        let m = mounts(lines);
        assert!(
            m.iter().any(|(source, _)| source == "./portcullis.toml"),
            "{name} mounts ./portcullis.toml: {m:?}"
        );
        assert!(
            value(lines, "ports").is_none(),
            "{name} publishes no port: only HAProxy is reachable from outside"
        );
    }
    assert!(docker_dir().join("portcullis.toml").is_file());
}

#[test]
fn replicas_mount_the_config_where_the_image_cmd_reads_it() {
    let config = config_path_in_cmd();
    assert_eq!(config, "/etc/portcullis/portcullis.toml");
    let config_dir = Path::new(&config).parent().unwrap().to_str().unwrap();
    let certs_target = format!("{config_dir}/certs");
    let services = compose_services();
    for (name, lines) in replicas(&services) {
        let m = mounts(lines);
        assert!(
            m.contains(&("./portcullis.toml".to_string(), config.clone())),
            "{name} mounts ./portcullis.toml at {config}: {m:?}"
        );
        // tls.cert = "certs/server.pem" resolves against the config file's folder.
        assert!(
            m.iter().any(|(_, target)| *target == certs_target),
            "{name} mounts the certificates at {certs_target}: {m:?}"
        );
        assert_eq!(value(lines, "image").as_deref(), Some("portcullis:latest"));
        assert_eq!(value(lines, "context").as_deref(), Some(".."));
    }
    assert!(toml_string("tls", "cert").starts_with("certs/"));
    assert!(toml_string("tls", "key").starts_with("certs/"));
}

#[test]
fn stop_grace_period_outlasts_shutdown_delay_and_drain() {
    let delay = seconds(&toml_string("server", "shutdown_delay"));
    let drain = seconds(&toml_string("server", "drain_timeout"));
    let services = compose_services();
    for (name, lines) in replicas(&services) {
        let grace = seconds(
            &value(lines, "stop_grace_period")
                .unwrap_or_else(|| panic!("{name} sets stop_grace_period")),
        );
        assert!(
            grace > delay + drain,
            "{name}: stop_grace_period {grace}s <= shutdown_delay {delay}s + drain_timeout {drain}s"
        );
    }
}

/// Each replica may open the descriptors its configuration needs (SPEC 9): Docker's default
/// soft limit (1024 on many hosts) is far below max_connections.
#[test]
fn replicas_raise_the_open_file_limit_to_what_their_config_needs() {
    let config = portcullis::config::Config::load(
        Some(&docker_dir().join("portcullis.toml")),
        std::iter::empty(),
        &Default::default(),
    )
    .expect("docker/portcullis.toml loads");
    let needed = portcullis::descriptors::descriptors_needed(&config);
    let services = compose_services();
    for (name, lines) in replicas(&services) {
        assert!(
            lines.iter().any(|l| l.trim() == "nofile:"),
            "{name} sets ulimits: nofile"
        );
        for key in ["soft", "hard"] {
            let limit: u64 = value(lines, key)
                .and_then(|v| v.parse().ok())
                .unwrap_or_else(|| panic!("{name} sets the {key} nofile limit"));
            assert!(
                limit >= needed,
                "{name}: {key} nofile limit {limit} < the {needed} descriptors its config needs"
            );
        }
    }
}

#[test]
fn dockerfile_runtime_is_non_root_with_healthcheck_and_ports() {
    let stages = dockerfile_stages();
    assert!(stages.len() >= 2, "multi-stage build");
    let runtime = stages.last().unwrap();
    let user = runtime
        .iter()
        .rev()
        .find(|i| i.keyword == "USER")
        .expect("the runtime stage sets USER");
    let uid = user.args.split(':').next().unwrap();
    assert!(
        uid != "root" && uid != "0",
        "runtime USER is not root: {}",
        user.args
    );

    let exposed: Vec<&str> = runtime
        .iter()
        .filter(|i| i.keyword == "EXPOSE")
        .flat_map(|i| i.args.split_whitespace())
        .collect();
    for port in ["8443", "9464"] {
        assert!(exposed.contains(&port), "EXPOSE {port}: {exposed:?}");
    }

    let health = runtime
        .iter()
        .find(|i| i.keyword == "HEALTHCHECK")
        .expect("the runtime stage has a HEALTHCHECK");
    let cmd = health.args.split_once("CMD").expect("HEALTHCHECK CMD").1;
    // No hard-coded URL: `portcullis healthcheck` reads admin.listen from the config in
    // its working directory and PORTCULLIS_ADMIN_LISTEN, so moving the port keeps the
    // container healthy (tests/process.rs runs it that way).
    let argv = exec_form(cmd);
    assert_eq!(argv, ["/usr/local/bin/portcullis", "healthcheck"]);
    let workdir = runtime
        .iter()
        .rev()
        .find(|i| i.keyword == "WORKDIR")
        .expect("the runtime stage sets WORKDIR");
    let config = config_path_in_cmd();
    assert_eq!(
        Path::new(&workdir.args),
        Path::new(&config).parent().unwrap(),
        "the healthcheck finds the config as ./portcullis.toml"
    );
    assert!(config.ends_with("/portcullis.toml"));

    let entrypoint = runtime
        .iter()
        .find(|i| i.keyword == "ENTRYPOINT")
        .expect("ENTRYPOINT");
    assert_eq!(exec_form(&entrypoint.args), ["/usr/local/bin/portcullis"]);
}

#[test]
fn dockerfile_builds_locked_and_copies_no_config_or_certs() {
    let stages = dockerfile_stages();
    let builds: Vec<&Instruction> = stages
        .iter()
        .flatten()
        .filter(|i| i.keyword == "RUN" && i.args.contains("cargo build"))
        .collect();
    assert!(!builds.is_empty(), "the builder runs cargo build");
    for build in &builds {
        for command in build.args.split("&&") {
            if command.contains("cargo build") {
                assert!(
                    command.contains("--release") && command.contains("--locked"),
                    "cargo build --release --locked: {command}"
                );
            }
        }
    }

    for instruction in stages.iter().flatten() {
        if !matches!(instruction.keyword.as_str(), "COPY" | "ADD") {
            continue;
        }
        let words: Vec<&str> = instruction
            .args
            .split_whitespace()
            .filter(|w| !w.starts_with("--"))
            .collect();
        let from_stage = instruction.args.contains("--from=");
        for word in &words {
            assert!(
                !word.contains("portcullis.toml")
                    && !word.contains("certs")
                    && !word.ends_with(".pem")
                    && !word.ends_with(".key"),
                "the image never holds config or certificates: {} {}",
                instruction.keyword,
                instruction.args
            );
        }
        // The build context is the repository root: every source copied from it exists.
        if !from_stage {
            for source in &words[..words.len() - 1] {
                assert!(
                    root().join(source).exists(),
                    "COPY source {source} exists in the build context (the repository root)"
                );
            }
        }
    }

    let ignore = read(&root().join(".dockerignore"));
    let patterns: Vec<&str> = ignore
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|l| l.trim_start_matches('/').trim_end_matches('/'))
        .collect();
    for pattern in ["target", "certs/*", "portcullis.toml", ".git"] {
        assert!(
            patterns.contains(&pattern),
            ".dockerignore has {pattern}: {patterns:?}"
        );
    }
}

fn haproxy_check(vars: &[(&str, &str)]) {
    let cfg = docker_dir().join("haproxy.cfg");
    let out = Command::new("haproxy")
        .arg("-c")
        .arg("-f")
        .arg(&cfg)
        .envs(vars.iter().copied())
        .output()
        .expect("haproxy is installed (.ci/run installs it)");
    assert!(out.status.success(), "haproxy -c {vars:?}: {}", show(&out));
}

#[test]
fn haproxy_accepts_the_config_on_loopback() {
    haproxy_check(&[
        ("HAPROXY_BIND", "127.0.0.1:18443"),
        ("PORTCULLIS1_ADDR", "127.0.0.1:18444"),
        ("PORTCULLIS1_ADMIN_PORT", "19464"),
        ("PORTCULLIS2_ADDR", "127.0.0.1:18445"),
        ("PORTCULLIS2_ADMIN_PORT", "19465"),
    ]);
}

#[test]
fn haproxy_accepts_the_config_with_the_compose_environment() {
    // The values compose passes; the replicas' names do not resolve here, which the
    // config tolerates (init-addr none: such a server is down until its name resolves).
    let services = compose_services();
    let haproxy = &services["haproxy"];
    let text = read(&docker_dir().join("haproxy.cfg"));
    let mut vars = Vec::new();
    for var in [
        "HAPROXY_BIND",
        "PORTCULLIS1_ADDR",
        "PORTCULLIS1_ADMIN_PORT",
        "PORTCULLIS2_ADDR",
        "PORTCULLIS2_ADMIN_PORT",
    ] {
        assert!(
            text.contains(&format!("\"${{{var}}}\"")),
            "haproxy.cfg uses {var}"
        );
        let v = value(haproxy, var).unwrap_or_else(|| panic!("compose sets {var} for haproxy"));
        vars.push((var, v));
    }
    // Health checks go to the replicas' admin listener, which must listen beyond loopback.
    for (var, v) in &vars {
        if var.ends_with("_ADMIN_PORT") {
            assert_eq!(*v, admin_port(), "{var} is the replicas' admin port");
        }
    }
    let admin = toml_string("admin", "listen");
    assert!(
        !admin.starts_with("127.") && !admin.starts_with("[::1]"),
        "admin.listen reaches beyond loopback: {admin}"
    );
    let vars: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (*k, v.as_str())).collect();
    haproxy_check(&vars);
}

#[test]
fn promtool_accepts_the_prometheus_config() {
    let cfg = docker_dir().join("prometheus.yml");
    let out = Command::new("promtool")
        .arg("check")
        .arg("config")
        .arg(&cfg)
        .output()
        .expect("promtool is installed (.ci/run installs the prometheus package)");
    assert!(
        out.status.success(),
        "promtool check config: {}",
        show(&out)
    );
    // Prometheus reaches each replica's admin listener on the compose network.
    let text = read(&cfg);
    let port = admin_port();
    let services = compose_services();
    for (name, _) in replicas(&services) {
        assert!(
            text.contains(&format!("{name}:{port}")),
            "prometheus scrapes {name}:{port}"
        );
    }
}

#[test]
fn replica_config_passes_check_config_with_generated_certs() {
    let tmp = tempfile::tempdir().unwrap();
    let bin = env!("CARGO_BIN_EXE_portcullis");
    // No PORTCULLIS_* override from the environment running the tests.
    let clean = |cmd: &mut Command| {
        for (key, _) in std::env::vars_os() {
            if key.to_string_lossy().starts_with("PORTCULLIS_") {
                cmd.env_remove(key);
            }
        }
    };

    let mut generate = Command::new(bin);
    generate
        .args(["certs", "generate", "--out"])
        .arg(tmp.path().join("certs"))
        .current_dir(tmp.path());
    clean(&mut generate);
    let out = generate.output().unwrap();
    assert!(out.status.success(), "certs generate: {}", show(&out));

    let config = tmp.path().join("portcullis.toml");
    std::fs::copy(docker_dir().join("portcullis.toml"), &config).unwrap();
    let mut check = Command::new(bin);
    check
        .arg("check-config")
        .arg("--config")
        .arg(&config)
        .current_dir(tmp.path());
    clean(&mut check);
    let out = check.output().unwrap();
    assert!(out.status.success(), "check-config: {}", show(&out));
}

/// The dependency layer stubs every bench that Cargo.toml declares, by reading the names
/// from Cargo.toml itself: run that same extraction here and check it finds them all.
#[test]
fn dockerfile_stubs_every_declared_bench() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let dockerfile = std::fs::read_to_string(root.join("docker/Dockerfile")).unwrap();
    assert!(
        dockerfile.contains(r"/^\[\[bench\]\]/"),
        "the stub loop reads [[bench]] names"
    );
    let manifest = std::fs::read_to_string(root.join("Cargo.toml")).unwrap();
    let out = std::process::Command::new("awk")
        .arg(r#"/^\[\[bench\]\]/ { b = 1; next } b && $1 == "name" { gsub(/"/, "", $3); print $3; b = 0 }"#)
        .arg(root.join("Cargo.toml"))
        .output()
        .unwrap();
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect();
    let declared = manifest.matches("[[bench]]").count();
    assert_eq!(
        names.len(),
        declared,
        "stubs {names:?} for {declared} benches"
    );
    for name in names {
        assert!(
            root.join("benches").join(format!("{name}.rs")).exists(),
            "{name}"
        );
    }
}

/// The compose file's own variables (the replicas' user, ...) never start with
/// `PORTCULLIS_`: that prefix belongs to configuration overrides, and a user who exports
/// one of them for compose must not hand the gateway a variable it does not know.
#[test]
fn compose_variables_cannot_be_taken_for_configuration_overrides() {
    let text = read(&docker_dir().join("compose.yaml"));
    let mut interpolated = Vec::new();
    for piece in text.split("${").skip(1) {
        let name: String = piece
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        interpolated.push(name);
    }
    assert!(
        !interpolated.is_empty(),
        "compose interpolates its user ids"
    );
    for name in interpolated {
        assert!(
            !name.starts_with("PORTCULLIS_"),
            "compose variable {name} shares the configuration prefix"
        );
    }
}

/// The value of a list key such as `trusted = ["a", "b"]` in `[section]` of
/// docker/portcullis.toml.
fn toml_list(section: &str, key: &str) -> Vec<String> {
    toml_string(section, key)
        .trim_start_matches(['[', '"'])
        .trim_end_matches([']', '"'])
        .split(',')
        .map(|v| v.trim().trim_matches('"').to_string())
        .collect()
}

/// The replicas believe PROXY headers from HAProxy's pinned address only, and that address
/// lies in the compose network's pinned subnet.
#[test]
fn replicas_trust_only_the_balancer_for_proxy_headers() {
    let text = read(&docker_dir().join("compose.yaml"));
    let subnet: ipnet::Ipv4Net = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("- subnet:"))
        .expect("compose pins the network's subnet")
        .trim()
        .parse()
        .unwrap();
    let services = compose_services();
    let haproxy: std::net::Ipv4Addr = value(&services["haproxy"], "ipv4_address")
        .expect("compose pins HAProxy's address")
        .parse()
        .unwrap();
    assert!(subnet.contains(&haproxy), "{haproxy} in {subnet}");
    // Other containers get addresses from ip_range only, so HAProxy's is never taken first.
    let dynamic: ipnet::Ipv4Net = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("ip_range:"))
        .expect("compose confines dynamic addresses to an ip_range")
        .trim()
        .parse()
        .unwrap();
    assert!(subnet.contains(&dynamic) && !dynamic.contains(&haproxy));
    let trusted = toml_list("proxy_protocol", "trusted");
    assert_eq!(trusted, [format!("{haproxy}/32")]);
}

/// A replica gets the server certificate, its key and the client CA, nothing more: the CA
/// key and the client key stay on the host.
#[test]
fn replicas_mount_only_what_they_need() {
    let services = compose_services();
    let config = config_path_in_cmd();
    let certs_target = format!("{}/certs", Path::new(&config).parent().unwrap().display());
    let mut volumes = Vec::new();
    for (name, lines) in replicas(&services) {
        let m = mounts(lines);
        for (source, target) in &m {
            assert!(
                !source.contains("certs") || !source.starts_with('.'),
                "{name} mounts a host folder of certificates: {source}:{target}"
            );
        }
        let (volume, _) = m
            .iter()
            .find(|(_, target)| *target == certs_target)
            .expect("the replica mounts its certificates");
        volumes.push(volume.clone());
    }
    volumes.dedup();
    assert_eq!(volumes.len(), 1, "{volumes:?}");
    let filler = &services[&volumes[0]];
    let mut copied: Vec<String> = mounts(filler)
        .into_iter()
        .filter(|(source, _)| source.starts_with("../certs/"))
        .map(|(source, _)| source.trim_start_matches("../certs/").to_string())
        .collect();
    copied.sort();
    assert_eq!(copied, ["ca.pem", "server.key", "server.pem"]);
    for (file, key) in [
        ("ca.pem", "client_ca"),
        ("server.key", "key"),
        ("server.pem", "cert"),
    ] {
        assert_eq!(toml_string("tls", key), format!("certs/{file}"));
    }
}

/// The Docker path as written (issue 11): `certs generate` as the operator (keys 0600,
/// theirs), then compose's replica-certs step, then a replica running as the image's user
/// 65532 loads the key. The step's shell command is run here natively, on the same files,
/// with its /in and /out folders mapped to temporary ones. Runs as root, as CI does (.ci/run
/// installs packages with apt-get): only root can hand files to another user.
#[test]
fn compose_certificate_step_lets_the_image_user_read_the_key() {
    use std::os::unix::fs::PermissionsExt;
    use std::os::unix::process::CommandExt;
    const IMAGE_USER: u32 = 65532;
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let host_certs = tmp.path().join("certs");
    let etc = tmp.path().join("etc");
    let volume = etc.join("certs");
    std::fs::create_dir_all(&volume).unwrap();
    let bin = env!("CARGO_BIN_EXE_portcullis");
    let out = Command::new(bin)
        .args(["certs", "generate", "--out"])
        .arg(&host_certs)
        .output()
        .unwrap();
    assert!(out.status.success(), "certs generate: {}", show(&out));
    std::fs::copy(
        docker_dir().join("portcullis.toml"),
        etc.join("portcullis.toml"),
    )
    .unwrap();

    let as_image_user = |args: &[&str], certs: &Path| {
        std::fs::set_permissions(&etc, std::fs::Permissions::from_mode(0o755)).unwrap();
        let mut cmd = Command::new(bin);
        cmd.args(args)
            .arg(etc.join("portcullis.toml"))
            .env("PORTCULLIS_TLS_CERT", certs.join("server.pem"))
            .env("PORTCULLIS_TLS_KEY", certs.join("server.key"))
            .env("PORTCULLIS_TLS_CLIENT_CA", certs.join("ca.pem"));
        // SAFETY: setgid/setuid are async-signal-safe and change only the child.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setgid(IMAGE_USER) != 0 || libc::setuid(IMAGE_USER) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        cmd.output()
            .expect("run as the image user (the test runs as root)")
    };
    // The finding: the image's user cannot read the generated key as it is.
    std::fs::set_permissions(&host_certs, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = as_image_user(&["check-config", "--config"], &host_certs);
    assert!(
        !out.status.success() && show(&out).contains("Permission denied"),
        "the host's 0600 key is unreadable to uid 65532: {}",
        show(&out)
    );

    // compose's step, with /in/ and /out/ mapped onto the temporary folders.
    let services = compose_services();
    let step = value(&services["replica-certs"], "command").expect("replica-certs command");
    let argv = exec_form(&step);
    assert_eq!(argv[..2], ["sh", "-c"]);
    let script = argv[2]
        .replace("/in/", &format!("{}/", host_certs.display()))
        .replace("/out/", &format!("{}/", volume.display()));
    let out = Command::new("sh")
        .args(["-c", &script])
        .env_remove("REPLICA_UID")
        .env_remove("REPLICA_GID")
        .output()
        .unwrap();
    assert!(out.status.success(), "{script}: {}", show(&out));
    let names: Vec<_> = std::fs::read_dir(&volume)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 3, "only what a replica needs: {names:?}");
    let out = as_image_user(&["check-config", "--config"], &volume);
    assert!(
        out.status.success(),
        "the image user loads the copied key: {}",
        show(&out)
    );
}

/// Cluster mode: a `redis` service without persistence, both replicas started after it and
/// pointed at it by docker/portcullis.toml.
#[test]
fn compose_runs_redis_for_cluster_mode_without_persistence() {
    let services = compose_services();
    let redis = services.get("redis").expect("a redis service");
    let command = value(redis, "command").expect("redis has a command");
    assert!(
        command.contains("\"--save\", \"\"") && command.contains("\"--appendonly\", \"no\""),
        "no persistence: {command}"
    );
    assert!(value(redis, "ports").is_none(), "redis publishes no port");
    for (name, lines) in replicas(&services) {
        assert!(
            lines.iter().any(|l| l.trim() == "redis:"),
            "{name} depends on redis: {lines:?}"
        );
    }
    assert_eq!(toml_string("cluster", "redis"), "redis://redis:6379/0");
}

/// Both replicas relay to the compose `upstream` service, which builds and runs the example
/// upstream as non-root on the port the replicas name.
#[test]
fn replicas_relay_to_the_example_upstream_service() {
    let services = compose_services();
    let upstream = services.get("upstream").expect("an upstream service");
    let dockerfile = value(upstream, "dockerfile").expect("built from a Dockerfile");
    let text = read(&root().join(&dockerfile));
    assert!(
        text.contains("--locked --example upstream_echo"),
        "{dockerfile} builds examples/upstream_echo.rs"
    );
    assert!(
        text.contains("USER 65532:65532"),
        "{dockerfile} runs as non-root"
    );
    let port = text
        .lines()
        .find_map(|l| l.strip_prefix("CMD [\"0.0.0.0:"))
        .and_then(|rest| rest.split('"').next())
        .expect("CMD names the listening address");
    for (name, replica) in replicas(&services) {
        assert_eq!(
            value(replica, "PORTCULLIS_UPSTREAM_SERVERS").as_deref(),
            Some(format!("upstream:{port}").as_str()),
            "{name} relays to the upstream service"
        );
        assert!(
            replica.iter().any(|l| l.trim() == "upstream:"),
            "{name} starts after the upstream service"
        );
    }
}
