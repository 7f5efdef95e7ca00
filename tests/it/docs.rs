//! docs/pipeline.md says what to type: every command of its `sh` blocks is run here as
//! written, against a running registry (`registry.example.com` is the test's, over plain
//! HTTP), and where the page shows output, the output is compared. A command this test
//! does not know fails it: a new command in the docs must be run here or skipped with a
//! reason.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::common::*;
use crate::docker_cli::{Docker, busybox_context};

/// One command of the page, and the output it shows (after `$ cmd`).
struct Step {
    line: String,
    shown: Vec<String>,
}

/// The commands of the page's ```sh blocks: continuation lines joined, comments dropped.
fn steps(page: &str) -> Vec<Step> {
    let mut out: Vec<Step> = Vec::new();
    let mut in_sh = false;
    let mut pending = String::new();
    let mut prompt_block = false;
    for raw in page.lines() {
        if let Some(fence) = raw.strip_prefix("```") {
            in_sh = !in_sh && fence.trim() == "sh";
            prompt_block = false;
            continue;
        }
        if !in_sh {
            continue;
        }
        let line = raw.trim_end();
        if let Some(cmd) = line.strip_prefix("$ ") {
            prompt_block = true;
            out.push(Step {
                line: cmd.to_owned(),
                shown: Vec::new(),
            });
            continue;
        }
        if prompt_block {
            // Output of the `$` command above it.
            if let Some(last) = out.last_mut() {
                last.shown.push(line.to_owned());
            }
            continue;
        }
        let code = line.split(" #").next().unwrap_or("").trim_end();
        if code.trim_start().starts_with('#') || code.trim().is_empty() {
            continue;
        }
        if let Some(head) = code.strip_suffix('\\') {
            pending.push_str(head);
            continue;
        }
        pending.push_str(code);
        out.push(Step {
            line: std::mem::take(&mut pending).trim().to_owned(),
            shown: Vec::new(),
        });
    }
    out
}

struct Shell {
    dir: PathBuf,
    env: Vec<(String, String)>,
}

impl Shell {
    /// Runs `line` with bash in the test's directory: (success, stdout, stderr).
    fn run(&self, line: &str, stdin: Option<&str>) -> (bool, String, String) {
        let bin = Path::new(env!("CARGO_BIN_EXE_wharf")).parent().unwrap();
        let mut c = Command::new("bash");
        c.arg("-c")
            .arg(line)
            .current_dir(&self.dir)
            .env_remove("WHARF_CONFIG")
            .env(
                "PATH",
                format!("{}:{}", bin.display(), std::env::var("PATH").unwrap()),
            );
        for (k, v) in &self.env {
            c.env(k, v);
        }
        let out = match stdin {
            Some(input) => output_with_stdin(&mut c, input),
            None => c.output().unwrap(),
        };
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    fn ok(&self, line: &str, stdin: Option<&str>) -> String {
        let (ok, out, err) = self.run(line, stdin);
        assert!(ok, "`{line}` failed: {err}{out}");
        out
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_command_of_the_pipeline_guide_runs_as_written() {
    require_tool("curl", "apt-get install -y curl");
    require_tool("jq", "apt-get install -y jq");
    let reg = TestRegistry::start();
    let host = reg.host().to_owned();
    let page =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/pipeline.md"))
            .unwrap();
    let page = page
        .replace("https://registry.example.com", &format!("http://{host}"))
        .replace("registry.example.com", &host);
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir_all(dir.path().join("api")).unwrap();
    busybox_context(&dir.path().join("api"), "docs api");
    let d = Docker::new();
    let mut sh = Shell {
        dir: dir.path().to_owned(),
        env: vec![
            ("WHARF_DATA".into(), reg.data.display().to_string()),
            ("DOCKER_CONFIG".into(), d.config_dir().display().to_string()),
        ],
    };
    let steps = steps(&page);
    assert!(steps.len() >= 20, "{} commands found", steps.len());
    let mut password = String::new();
    let mut ran = 0;
    for step in &steps {
        let line = step.line.as_str();
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            ["wharf", "serve", ..] => {
                // The test runs its own server; the flags shown must be wharf's.
                let help = sh.ok("wharf serve --help", None);
                for flag in words.iter().filter(|w| w.starts_with("--")) {
                    assert!(help.contains(flag), "wharf serve has no {flag}");
                }
            }
            ["wharf", "user", "add", ..] => {
                password = sh.ok(line, None).trim().to_owned();
                assert!(password.len() >= 16, "{password}");
                sh.env.push(("TOKEN".into(), password.clone()));
                sh.env.push(("WHARF_USERNAME".into(), "alice".into()));
                sh.env.push(("WHARF_PASSWORD".into(), password.clone()));
            }
            ["wharf", "token", "create", ..] => {
                let t = sh.ok(line, None);
                assert!(t.trim().starts_with("wharf_"), "{t}");
            }
            ["wharf", "grant" | "policy", ..] => {
                sh.ok(line, None);
            }
            ["docker", "login", _, "-u", user] => {
                // The page types the password at the prompt; the test gives it on stdin.
                sh.ok(&format!("{line} --password-stdin"), Some(&password));
                assert_eq!(*user, "alice");
            }
            ["docker", "build" | "push", ..] => {
                sh.ok(line, None);
                if words[1] == "push" {
                    // What the later steps of the page start from: releases on the tags
                    // they name, made as CI would make them.
                    for tag in ["staging", "1.0.0"] {
                        sh.ok(
                            &format!("wharf promote {host}/team/api:test {host}/team/api:{tag}"),
                            None,
                        );
                    }
                }
            }
            ["curl", "-fsSL", ..] => {
                sh.ok(line, None);
                // The registry serves its own executable: here, the test binary it runs in.
                let got = std::fs::metadata(dir.path().join("wharf")).unwrap();
                let me = std::fs::metadata(std::env::current_exe().unwrap()).unwrap();
                assert_eq!(got.len(), me.len());
                use std::os::unix::fs::PermissionsExt;
                assert!(got.permissions().mode() & 0o100 != 0, "not executable");
            }
            ["curl", "-s", "-u", ..] => {
                let out = sh.ok(&format!("set -o pipefail; {line}"), None);
                assert!(out.contains("\"test\""), "{line}: {out}");
            }
            ["wharf", "tags", "--ref", ..] => {
                let out = sh.ok(line, None);
                let got: Vec<&str> = out.lines().collect();
                assert_eq!(got, step.shown, "{line}");
            }
            ["wharf", "tags", "list", ..] => {
                let out = sh.ok(line, None);
                let header = out.lines().next().unwrap_or("");
                assert_eq!(
                    header.split_whitespace().collect::<Vec<_>>(),
                    step.shown[0].split_whitespace().collect::<Vec<_>>(),
                    "{out}"
                );
                assert!(
                    out.contains("\nprod ") || out.contains("\nstaging "),
                    "{out}"
                );
            }
            ["wharf", "promote", ..] => {
                let out = sh.ok(line, None);
                if let Some(first) = step.shown.first() {
                    let want = first.split(" sha256:").next().unwrap();
                    assert!(out.starts_with(want), "{line}: {out}");
                    assert!(
                        out.contains(" moved to sha256:") || out.contains(" already"),
                        "{out}"
                    );
                }
            }
            ["git", ..] => {
                // Needs a GitHub repository and its CI; examples.rs runs the workflows'
                // steps that compute the tags these pushes give.
                continue;
            }
            ["docker", "compose", ..] => {
                // Needs compose v2 and the app's images; examples.rs resolves the same
                // files with each environment file, and the agent tests run compose.
                continue;
            }
            ["wharf", "deploy", ..] => {
                // Needs a running agent: the agent tests run each of these.
                let help = sh.ok("wharf deploy rollback --help", None);
                for flag in words.iter().filter(|w| w.starts_with("--")) {
                    assert!(help.contains(flag), "wharf deploy rollback has no {flag}");
                }
                continue;
            }
            _ => panic!("docs/pipeline.md has a command this test does not run: {line}"),
        }
        ran += 1;
    }
    assert!(ran >= 15, "ran {ran}");
    let _ = Command::new("docker")
        .args(["rmi", &format!("{host}/team/api:test")])
        .output();
}

/// The fenced block of `lang` in `page` that contains `marker`.
fn block<'a>(page: &'a str, lang: &str, marker: &str) -> &'a str {
    let open = format!("```{lang}\n");
    page.split(&open)
        .skip(1)
        .map(|rest| rest.split("\n```").next().unwrap())
        .find(|b| b.contains(marker))
        .unwrap_or_else(|| panic!("no ```{lang} block with {marker:?}"))
}

/// docs/scale-out.md's configuration is one wharf accepts as written, its compose file
/// is valid to docker-compose, its nginx configuration to nginx, and its `wharf migrate`
/// commands use flags that exist.
#[test]
fn the_scale_out_guide_configurations_are_valid() {
    let page =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/scale-out.md"))
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let toml = dir.path().join("wharf.toml");
    std::fs::write(&toml, block(&page, "toml", "database_url")).unwrap();
    let config = wharf::config::Config::resolve(Default::default(), Some(&toml)).unwrap();
    assert!(config.database_url.is_some());
    assert!(matches!(config.storage, wharf::config::Storage::S3(ref s) if s.path_style));

    require_tool("docker-compose", "apt-get install -y docker-compose");
    let compose = dir.path().join("docker-compose.yml");
    std::fs::write(&compose, block(&page, "yaml", "wharf1")).unwrap();
    run(Command::new("docker-compose")
        .arg("-f")
        .arg(&compose)
        .args(["config", "-q"]));

    require_tool("nginx", "apt-get install -y nginx-light");
    // The upstream names resolve inside compose only, and the certificate is the
    // reader's: both are put in for the check.
    let tls = dir.path().join("tls");
    std::fs::create_dir(&tls).unwrap();
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=x", "-days", "1",
        ])
        .arg("-keyout")
        .arg(tls.join("privkey.pem"))
        .arg("-out")
        .arg(tls.join("fullchain.pem")));
    let nginx = block(&page, "nginx", "upstream wharf")
        .replace("wharf1:", "127.0.0.1:")
        .replace("wharf2:", "127.0.0.2:")
        .replace("wharf3:", "127.0.0.3:")
        .replace("/etc/nginx/tls", tls.to_str().unwrap());
    let conf = dir.path().join("nginx.conf");
    std::fs::write(
        &conf,
        format!(
            "pid {}/nginx.pid;\nerror_log stderr;\n{nginx}",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = Command::new("nginx")
        .arg("-t")
        .arg("-c")
        .arg(&conf)
        .arg("-e")
        .arg("stderr")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "nginx -t: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let help = run(wharf_cmd(dir.path()).args(["migrate", "--help"]));
    for line in block(&page, "sh", "wharf migrate").lines() {
        for flag in line.split_whitespace().filter(|w| w.starts_with("--")) {
            assert!(
                help.contains(flag) || run(wharf_cmd(dir.path()).arg("--help")).contains(flag),
                "wharf migrate has no {flag}"
            );
        }
    }
}
