//! The README says what the program does: its dev hint and `s_client` transcript are what
//! the built binary and the real `openssl` print, its command table lists every command,
//! its excerpts of `docker/` are line for line from those files, and every configuration
//! variable it names is one the gateway knows.

mod support;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use portcullis::config::{Config, FlagOverrides};
use support::*;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn readme() -> String {
    std::fs::read_to_string(root().join("README.md")).expect("README.md")
}

/// The fenced code blocks of the README: (info string, lines).
fn blocks(text: &str) -> Vec<(String, Vec<String>)> {
    let mut out = Vec::new();
    let mut current: Option<(String, Vec<String>)> = None;
    for line in text.lines() {
        match (line.strip_prefix("```"), current.take()) {
            (Some(_), Some(block)) => out.push(block),
            (Some(info), None) => current = Some((info.trim().to_string(), Vec::new())),
            (None, Some((info, mut lines))) => {
                lines.push(line.to_string());
                current = Some((info, lines));
            }
            (None, None) => {}
        }
    }
    out
}

/// The block whose first line is `first`.
fn block_starting(first: &str) -> Vec<String> {
    blocks(&readme())
        .into_iter()
        .map(|(_, lines)| lines)
        .find(|lines| lines.first().map(String::as_str) == Some(first))
        .unwrap_or_else(|| panic!("no README block starts with {first:?}"))
}

/// The dev token shown in the README's transcripts.
fn readme_token(hint: &[String]) -> String {
    hint.iter()
        .find_map(|l| l.strip_prefix("dev token:"))
        .map(|t| t.trim().to_string())
        .expect("the README's hint shows a dev token")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_dev_hint_and_the_s_client_session_are_what_the_programs_print() {
    let hint = block_starting("$ cargo run --release");
    let session =
        block_starting("$ openssl s_client -connect 127.0.0.1:8443 -CAfile certs/ca.pem -quiet");
    let shown_token = readme_token(&hint);

    // The hint, as the real binary prints it on a fresh directory.
    let dir = tempfile::tempdir().unwrap();
    let args = ["--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0"];
    let gateway = Process::spawn(dir.path(), &args);
    let printed = gateway.stdout_with("then type:");
    let token = readme_token(&printed.lines().map(str::to_string).collect::<Vec<_>>());
    let port = gateway.addr.port().to_string();
    let printed = printed
        .replace(&token, &shown_token)
        .replace(&format!("127.0.0.1:{port}"), "127.0.0.1:8443");
    let shown: Vec<&str> = hint[1..].iter().map(String::as_str).collect();
    assert_eq!(printed.lines().collect::<Vec<_>>(), shown);

    // The session: what the README shows typed is typed, the rest must come back.
    let typed: Vec<&String> = session[1..]
        .iter()
        .filter(|l| {
            ["PING", "AUTH ", "ECHO ", "WHOAMI", "QUIT"]
                .iter()
                .any(|c| l.starts_with(c))
        })
        .collect();
    let replies: Vec<&String> = session[1..]
        .iter()
        .filter(|l| l.starts_with("OK ") || l.starts_with("ERR "))
        .collect();
    let openssl_lines: Vec<&String> = session[1..]
        .iter()
        .filter(|l| !typed.contains(l) && !replies.contains(l))
        .collect();
    let input: String = typed
        .iter()
        .map(|l| format!("{}\n", l.replace(&shown_token, &token)))
        .collect();
    let ca = dir.path().join("certs/ca.pem");
    let out = openssl_session(&format!("127.0.0.1:{port}"), &ca, &input);
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stdout.lines().collect::<Vec<_>>(), replies, "{stderr}");
    assert_eq!(stderr.lines().collect::<Vec<_>>(), openssl_lines);
}

fn openssl_session(connect: &str, ca: &Path, input: &str) -> std::process::Output {
    use std::io::Write;
    let mut child = Command::new("openssl")
        .args(["s_client", "-connect", connect, "-CAfile"])
        .arg(ca)
        .arg("-quiet")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl is installed (.ci/run installs it)");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || tx.send(child.wait_with_output()));
    rx.recv_timeout(Duration::from_secs(20))
        .expect("s_client finished")
        .unwrap()
}

#[test]
fn the_command_table_lists_every_command() {
    let out = Command::new(env!("CARGO_BIN_EXE_portcullis"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&out.stdout);
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .and_then(|rest| rest.split("\n\n").next())
        .expect("a Commands: section")
        .lines()
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.contains(&"healthcheck"), "{help}");
    let readme = readme();
    for command in commands {
        assert!(
            readme.contains(&format!("| `portcullis {command}"))
                || readme.contains(&format!("| `portcullis [{command}]")),
            "the README's command table lacks {command}"
        );
    }
}

/// Blocks whose first line is `# docker/FILE (excerpt)` hold lines of that file, in order.
#[test]
fn docker_excerpts_are_lines_of_the_real_files() {
    let mut checked = Vec::new();
    for (_, lines) in blocks(&readme()) {
        let Some(file) = lines
            .first()
            .and_then(|l| l.strip_prefix("# "))
            .and_then(|l| l.strip_suffix(" (excerpt)"))
        else {
            continue;
        };
        let text = std::fs::read_to_string(root().join(file))
            .unwrap_or_else(|e| panic!("the README quotes {file}: {e}"));
        let mut real = text.lines();
        for line in lines[1..].iter().filter(|l| !l.trim().is_empty()) {
            assert!(
                real.any(|r| r == line),
                "README's excerpt of {file}: {line:?} is not a line of the file (in this order)"
            );
        }
        checked.push(file.to_string());
    }
    for file in [
        "docker/haproxy.cfg",
        "docker/portcullis.toml",
        "docker/prometheus.yml",
    ] {
        assert!(checked.iter().any(|c| c == file), "no excerpt of {file}");
    }
}

/// Every `PORTCULLIS_<SECTION>_<KEY>` the README names sets a real key.
#[test]
fn configuration_variables_in_the_readme_name_real_keys() {
    let template = toml::Value::try_from(Config::default()).unwrap();
    let sections: Vec<String> = template
        .as_table()
        .unwrap()
        .keys()
        .map(|s| format!("PORTCULLIS_{}_", s.to_uppercase()))
        .collect();
    let readme = readme();
    let mut named = Vec::new();
    for piece in readme.split("PORTCULLIS_").skip(1) {
        let name: String = piece
            .chars()
            .take_while(|c| c.is_ascii_uppercase() || c.is_ascii_digit() || *c == '_')
            .collect();
        let var = format!("PORTCULLIS_{}", name.trim_end_matches('_'));
        if sections.iter().any(|s| var.starts_with(s.as_str())) {
            named.push(var);
        }
    }
    assert!(
        named.iter().any(|v| v.starts_with("PORTCULLIS_LIMITS_")),
        "{named:?}"
    );
    for var in named {
        // The default value of the key, as text, is valid whatever its type.
        let config = Config::load(
            None,
            [(var.clone(), default_text(&template, &var))],
            &FlagOverrides::default(),
        )
        .unwrap_or_else(|e| panic!("{var}: {e}"));
        assert!(
            config.unknown_env.is_empty(),
            "the README names {var}, which sets no key"
        );
    }
}

fn default_text(template: &toml::Value, var: &str) -> String {
    let table = template.as_table().unwrap();
    for (section, keys) in table {
        let prefix = format!("PORTCULLIS_{}_", section.to_uppercase());
        if let Some(key) = var.strip_prefix(&prefix) {
            if let Some(value) = keys.get(key.to_lowercase()) {
                return match value {
                    toml::Value::String(s) => s.clone(),
                    toml::Value::Array(_) => String::new(),
                    other => other.to_string(),
                };
            }
        }
    }
    "x".into()
}

/// The README's example alerts are valid rules (promtool, which .ci/run installs) over
/// series a running gateway exports.
#[test]
fn the_example_alerts_pass_promtool_and_name_real_series() {
    let rules = blocks(&readme())
        .into_iter()
        .map(|(_, lines)| lines)
        .find(|lines| lines.first().map(String::as_str) == Some("groups:"))
        .expect("the README's example alerts")
        .join("\n");
    assert!(
        rules.contains("process_open_fds"),
        "an alert on descriptors: {rules}"
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("alerts.yml");
    std::fs::write(&file, &rules).unwrap();
    let out = Command::new("promtool")
        .args(["check", "rules"])
        .arg(&file)
        .output()
        .expect("promtool is installed (.ci/run installs the prometheus package)");
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let certs = TestCerts::new();
    let gateway = Process::gateway(&certs, "");
    let (_, scrape) = http_get(gateway.admin, "/metrics").expect("scrape");
    let names = rules
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("portcullis_") || w.starts_with("process_"));
    for name in names {
        let series = name.trim_end_matches("_bucket");
        assert!(
            scrape.contains(&format!("\n{series}"))
                || scrape.contains(&format!("# TYPE {series} ")),
            "the README's alerts use {name}, which /metrics does not export"
        );
    }
}
