//! The kit a team copies (`examples/`) works as written: the compose file resolves with
//! each environment file under the real `docker-compose`, and the workflows' `wharf tags`
//! steps, run as GitHub would run them, give the pipeline's tags.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

use crate::common::{output_with_stdin, require_tool, run};

fn examples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("examples")
}

/// YAML as JSON, read with Python's yaml module (the machine has it; CI installs it).
fn yaml_text(text: &str) -> Value {
    require_tool("python3", "apt-get install -y python3 python3-yaml");
    let out = output_with_stdin(
        Command::new("python3")
            .arg("-c")
            .arg("import json, sys, yaml; print(json.dumps(yaml.safe_load(sys.stdin)))"),
        text,
    );
    assert!(
        out.status.success(),
        "python3 -c 'import yaml' failed: install python3-yaml"
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

fn yaml(path: &Path) -> Value {
    yaml_text(&std::fs::read_to_string(path).unwrap())
}

#[test]
fn compose_file_names_images_by_registry_namespace_and_tag_per_environment() {
    require_tool("docker-compose", "apt-get install -y docker-compose");
    let dir = examples().join("compose");
    for (env, tag) in [
        (".env.dev", "dev"),
        (".env.staging", "staging"),
        (".env.prod", "prod"),
    ] {
        let out = run(Command::new("docker-compose").current_dir(&dir).args([
            "--env-file",
            env,
            "-f",
            "docker-compose.prod.yml",
            "config",
        ]));
        let config = yaml_text(&out);
        assert_eq!(
            config["services"]["api"]["image"],
            format!("registry.example.com/team/api:{tag}"),
            "{env}"
        );
        assert_eq!(
            config["services"]["web"]["image"],
            format!("registry.example.com/team/web:{tag}"),
            "{env}"
        );
    }
}

/// The `run:` script of the step with `id` in `job`, the expressions filled in.
fn script_of(workflow: &Value, job: &str, id: &str, exprs: &[(&str, &str)]) -> String {
    let steps = workflow["jobs"][job]["steps"].as_array().unwrap();
    let step = steps.iter().find(|s| s["id"] == id).unwrap();
    let mut script = step["run"].as_str().unwrap().to_owned();
    for (expr, value) in exprs {
        script = script.replace(&format!("${{{{ {expr} }}}}"), value);
    }
    assert!(!script.contains("${{"), "unfilled expression in {script}");
    script
}

/// The deploy step of `examples/github-actions/<file>`, run as GitHub would run it
/// against the deploy hook at `url`: its exit status and output.
pub fn run_deploy_step(file: &str, url: &str, token: &str, stack: &str) -> (bool, String) {
    let workflow = yaml(&examples().join("github-actions").join(file));
    let script = script_of(
        &workflow,
        "deploy",
        "deploy",
        &[
            ("secrets.WHARF_DEPLOY_TOKEN", token),
            ("vars.WHARF_DEPLOY_URL", url),
            ("steps.stack.outputs.name", stack),
            ("inputs.environment", stack),
        ],
    );
    let out = Command::new("bash")
        .arg("-e")
        .arg("-c")
        .arg(&script)
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap())
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// Runs the `run:` script of the step with `id` as GitHub would: bash, with the
/// workflow's expressions filled in and the given environment.
fn run_step(workflow: &Value, id: &str, exprs: &[(&str, &str)], env: &[(&str, &str)]) -> String {
    let script = script_of(workflow, "image", id, exprs);
    let dir = tempfile::tempdir().unwrap();
    let output = dir.path().join("output");
    let bin = Path::new(env!("CARGO_BIN_EXE_wharf")).parent().unwrap();
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap());
    let mut c = Command::new("bash");
    c.arg("-e")
        .arg("-c")
        .arg(&script)
        .current_dir(dir.path())
        .env_clear()
        .env("PATH", path)
        .env("GITHUB_OUTPUT", &output)
        .env("GITHUB_ACTIONS", "true");
    for (k, v) in env {
        c.env(k, v);
    }
    run(&mut c);
    std::fs::read_to_string(&output).unwrap()
}

fn tags_of(output: &str) -> Vec<String> {
    let delim = output
        .lines()
        .find_map(|l| l.strip_prefix("tags<<"))
        .unwrap();
    output
        .lines()
        .skip_while(|l| !l.starts_with("tags<<"))
        .skip(1)
        .take_while(|l| *l != delim)
        .map(str::to_owned)
        .collect()
}

#[test]
fn workflows_build_multi_arch_with_registry_cache_and_compute_the_seed_tags() {
    let build = yaml(&examples().join("github-actions/build.yml"));
    let steps = build["jobs"]["image"]["steps"].as_array().unwrap();
    let push = steps
        .iter()
        .find(|s| {
            s["uses"]
                .as_str()
                .is_some_and(|u| u.starts_with("docker/build-push-action"))
        })
        .unwrap();
    assert_eq!(push["with"]["platforms"], "linux/amd64,linux/arm64");
    assert!(
        push["with"]["cache-to"]
            .as_str()
            .unwrap()
            .contains("type=registry")
    );
    assert!(
        push["with"]["cache-to"]
            .as_str()
            .unwrap()
            .contains("mode=max")
    );
    assert!(
        push["with"]["cache-from"]
            .as_str()
            .unwrap()
            .contains(":buildcache")
    );
    assert_eq!(push["with"]["tags"], "${{ steps.meta.outputs.tags }}");
    assert!(
        build["jobs"]["deploy"]["steps"][1]["run"]
            .as_str()
            .unwrap()
            .contains("/hooks/deploy/")
    );

    let gh = |r: &'static str| -> Vec<(&'static str, &'static str)> {
        vec![
            ("GITHUB_REF", r),
            ("GITHUB_SHA", "abc1234def5678abc1234def5678abc1234def56"),
            ("GITHUB_EVENT_NAME", "push"),
            ("REGISTRY", "registry.example.com"),
            ("NAMESPACE", "team"),
        ]
    };
    let service = [("matrix.service", "api")];
    let img = |t: &str| format!("registry.example.com/team/api:{t}");
    for (r, want) in [
        ("refs/heads/main", vec!["latest", "prod", "main-abc1234"]),
        ("refs/heads/staging", vec!["staging", "staging-abc1234"]),
        ("refs/heads/develop", vec!["dev", "develop-abc1234"]),
        ("refs/tags/v1.0.1", vec!["1.0.1", "1.0", "1", "latest"]),
    ] {
        let out = run_step(&build, "meta", &service, &gh(r));
        let want: Vec<String> = want.iter().map(|t| img(t)).collect();
        assert_eq!(tags_of(&out), want, "{r}");
    }

    // The manual workflow: service and environment inputs.
    let manual = yaml(&examples().join("github-actions/manual.yml"));
    // YAML 1.1 reads the key `on` as true.
    let on = manual.get("on").unwrap_or(&manual["true"]);
    let inputs = &on["workflow_dispatch"]["inputs"];
    assert_eq!(
        inputs["service"]["options"],
        serde_json::json!(["api", "web", "both"])
    );
    assert_eq!(
        inputs["environment"]["options"],
        serde_json::json!(["dev", "staging", "prod"])
    );
    assert_eq!(inputs["deploy"]["type"], "boolean");
    let mut env = gh("refs/heads/feature/x");
    env.push(("GITHUB_REF_NAME", "feature/x"));
    env[2] = ("GITHUB_EVENT_NAME", "workflow_dispatch");
    let out = run_step(
        &manual,
        "meta",
        &[("matrix.service", "api"), ("inputs.environment", "staging")],
        &env,
    );
    assert_eq!(tags_of(&out), [img("staging"), img("feature-x-abc1234")]);
    // Run from a git tag, the environment asked for is pushed too (and then deployed).
    let mut env = gh("refs/tags/v1.0.0");
    env.push(("GITHUB_REF_NAME", "v1.0.0"));
    env[2] = ("GITHUB_EVENT_NAME", "workflow_dispatch");
    let out = run_step(
        &manual,
        "meta",
        &[("matrix.service", "api"), ("inputs.environment", "staging")],
        &env,
    );
    assert!(tags_of(&out).contains(&img("staging")), "{out}");
    // The token line of build.yml's header runs as written (with a user that exists).
    let build_text = std::fs::read_to_string(examples().join("github-actions/build.yml")).unwrap();
    let line = build_text
        .lines()
        .find(|l| l.contains("wharf token create"))
        .unwrap();
    let cmd = line.split('`').nth(1).unwrap();
    let reg = crate::common::TestRegistry::start();
    crate::common::add_user(&reg, "ci", "ci-password-123");
    crate::common::wharf_stdin(&reg, &["grant", "ci", "team/*", "push"], "");
    let args: Vec<String> = cmd
        .split_whitespace()
        .skip(1)
        .map(|a| a.trim_matches('\'').to_owned())
        .collect();
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = crate::common::wharf(&reg, &args);
    assert!(out.trim().starts_with("wharf_"), "{out}");
}
