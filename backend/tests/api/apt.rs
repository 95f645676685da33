//! corral's apt repository at `/apt/`: its files served without a token,
//! nothing outside it; and, when `scripts/package.sh` has built the real
//! packages, a real `apt-get` that updates from the server and fetches
//! them, and the packages holding what a node needs.

use std::path::{Path, PathBuf};
use std::process::Command;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::helpers::*;

/// A repository directory with a secret beside it (what traversal would
/// reach).
fn fake_repo() -> (tempfile::TempDir, PathBuf) {
    let root = tempfile::tempdir().expect("tmp");
    let repo = root.path().join("repo");
    std::fs::create_dir(&repo).expect("repo dir");
    std::fs::write(repo.join("Release"), "Origin: corral\n").expect("Release");
    std::fs::write(repo.join("Packages"), "Package: corral-agent\n").expect("Packages");
    std::fs::write(repo.join("Packages.gz"), b"\x1f\x8b fake").expect("Packages.gz");
    std::fs::write(
        repo.join("corral-agent_0.1.0-1_amd64.deb"),
        vec![7u8; 200_000],
    )
    .expect("deb");
    std::fs::write(root.path().join("secret.txt"), "top secret").expect("secret");
    (root, repo)
}

async fn app_with_repo(dir: Option<PathBuf>) -> TestApp {
    spawn_with(Backend::Sqlite, |config| config.apt_dir = dir).await
}

/// One request exactly as written (HTTP clients tidy `..` and `%2e%2e`
/// away before sending): the status and body.
async fn raw_get(url: &str, path: &str) -> (u16, String) {
    let addr = url.strip_prefix("http://").expect("http url");
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("connect");
    stream
        .write_all(
            format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").as_bytes(),
        )
        .await
        .expect("send");
    let mut response = Vec::new();
    stream.read_to_end(&mut response).await.expect("read");
    let text = String::from_utf8_lossy(&response).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("no status line in {text:?}"));
    (status, text)
}

#[tokio::test]
async fn the_apt_repository_is_served_without_a_token() {
    let (_root, repo) = fake_repo();
    let app = app_with_repo(Some(repo.clone())).await;
    let http = reqwest::Client::new();
    let get = |path: &str| http.get(format!("{}{path}", app.url)).send();

    let res = get("/apt/Release").await.expect("get");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "text/plain; charset=utf-8");
    let modified = res.headers()["last-modified"].clone();
    assert_eq!(res.text().await.expect("body"), "Origin: corral\n");

    // `deb ... ./` makes apt ask for ./Packages.gz.
    let res = get("/apt/./Packages.gz").await.expect("get");
    assert_eq!(res.status(), 200);
    assert_eq!(res.headers()["content-type"], "application/gzip");
    assert_eq!(res.bytes().await.expect("body").as_ref(), b"\x1f\x8b fake");

    let res = get("/apt/corral-agent_0.1.0-1_amd64.deb")
        .await
        .expect("get");
    assert_eq!(res.status(), 200);
    assert_eq!(
        res.headers()["content-type"],
        "application/vnd.debian.binary-package"
    );
    assert_eq!(res.headers()["content-length"], "200000");
    assert_eq!(
        res.bytes().await.expect("body").as_ref(),
        vec![7u8; 200_000]
    );

    // apt revalidates its indexes with If-Modified-Since.
    let res = http
        .get(format!("{}/apt/Release", app.url))
        .header("if-modified-since", modified)
        .send()
        .await
        .expect("get");
    assert_eq!(res.status(), 304);

    let res = get("/apt/").await.expect("get");
    assert_eq!(res.status(), 200);
    let hint = res.text().await.expect("body");
    assert!(
        hint.contains(&format!("deb [trusted=yes] {}/apt/ ./", app.url)),
        "{hint}"
    );

    let body = assert_error(
        get("/apt/nope_1.0_amd64.deb").await.expect("get"),
        404,
        "not_found",
    )
    .await;
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("nope_1.0_amd64.deb")
    );
    let res = http
        .post(format!("{}/apt/Release", app.url))
        .send()
        .await
        .expect("post");
    assert_error(res, 405, "method_not_allowed").await;
}

#[tokio::test]
async fn paths_outside_the_apt_repository_are_refused() {
    let (_root, repo) = fake_repo();
    let app = app_with_repo(Some(repo)).await;
    for path in [
        "/apt/../secret.txt",
        "/apt/./../secret.txt",
        "/apt/%2e%2e/secret.txt",
        "/apt/%2E%2E%2Fsecret.txt",
        "/apt/..%2fsecret.txt",
        "/apt/Release/../../secret.txt",
        "/apt//etc/passwd",
        "/apt/%2fetc%2fpasswd",
        "/apt/../../../../../../etc/passwd",
        "/apt/.hidden",
    ] {
        let (status, response) = raw_get(&app.url, path).await;
        assert!((400..500).contains(&status), "{path}: {status}");
        assert!(!response.contains("top secret"), "{path}: {response}");
        assert!(!response.contains("root:"), "{path}: {response}");
    }
    // The repository itself still answers.
    let (status, response) = raw_get(&app.url, "/apt/Release").await;
    assert_eq!(status, 200, "{response}");
}

#[tokio::test]
async fn without_a_repository_apt_paths_say_how_to_build_one() {
    let app = app_with_repo(None).await;
    let res = reqwest::get(format!("{}/apt/Release", app.url))
        .await
        .expect("get");
    let body = assert_error(res, 404, "not_found").await;
    assert!(
        body["message"]
            .as_str()
            .expect("message")
            .contains("scripts/package.sh"),
        "{body}"
    );
}

/// The repository `scripts/package.sh` built, if it did.
fn built_repo() -> Option<PathBuf> {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"));
    let repo = target.join("debian/repo");
    if repo.join("Release").is_file() {
        Some(repo)
    } else {
        eprintln!(
            "skipped: no apt repository at {} (scripts/package.sh builds it)",
            repo.display()
        );
        None
    }
}

fn have(program: &str) -> bool {
    let found = Command::new(program).arg("--version").output().is_ok();
    if !found {
        eprintln!("skipped: {program} is not installed");
    }
    found
}

fn run(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed:\n{text}");
    text
}

/// The one .deb of `package` in the repository.
fn deb_of(repo: &Path, package: &str) -> PathBuf {
    let prefix = format!("{package}_");
    std::fs::read_dir(repo)
        .expect("repo")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(&prefix) && n.ends_with(".deb"))
        })
        .unwrap_or_else(|| panic!("no {package} package in {}", repo.display()))
}

#[tokio::test]
async fn apt_get_updates_from_the_server_and_fetches_the_packages() {
    let Some(repo) = built_repo() else { return };
    if !have("apt-get") {
        return;
    }
    let app = app_with_repo(Some(repo.clone())).await;
    let tmp = tempfile::tempdir().expect("tmp");
    let dir = |p: &str| {
        let d = tmp.path().join(p);
        std::fs::create_dir_all(&d).expect("dir");
        d
    };
    let sources = dir("etc").join("sources.list");
    std::fs::write(&sources, format!("deb [trusted=yes] {}/apt/ ./\n", app.url))
        .expect("sources.list");
    // apt on its own lists, cache and sources; the machine's dpkg status
    // only, to resolve the dependencies against what is installed.
    dir("state/lists/partial");
    dir("cache/archives/partial");
    let options = [
        format!("Dir::Etc::SourceList={}", sources.display()),
        format!(
            "Dir::Etc::SourceParts={}",
            dir("etc/sources.list.d").display()
        ),
        format!("Dir::State={}", dir("state").display()),
        "Dir::State::status=/var/lib/dpkg/status".to_string(),
        format!("Dir::Cache={}", dir("cache").display()),
        "APT::Sandbox::User=root".to_string(),
        "Debug::NoLocking=1".to_string(),
    ];
    let download = dir("download");
    let cwd = download.clone();
    let apt = move |args: &[&str]| {
        let mut cmd = Command::new("apt-get");
        for o in &options {
            cmd.arg("-o").arg(o);
        }
        cmd.args(args).current_dir(&cwd);
        cmd
    };
    // A blocking apt-get against a server on this runtime: off its thread.
    let update = tokio::task::spawn_blocking(move || {
        let update = run(&mut apt(&["update"]));
        let simulate = run(&mut apt(&[
            "install",
            "--simulate",
            "corral-agent",
            "corral",
            "todomvc",
        ]));
        let download = run(&mut apt(&["download", "corral-agent", "corral", "todomvc"]));
        (update, simulate, download)
    })
    .await
    .expect("apt-get");
    let (update, simulate, _download) = update;
    assert!(!update.contains("Err:"), "{update}");
    for package in ["corral-agent", "corral", "todomvc"] {
        assert!(
            simulate.contains(&format!("Inst {package} "))
                || simulate.contains(&format!("{package} is already the newest")),
            "{simulate}"
        );
        let fetched = deb_of(&download, package);
        assert_eq!(
            std::fs::read(&fetched).expect("fetched"),
            std::fs::read(deb_of(&repo, package)).expect("built"),
            "{package} arrives as built"
        );
    }
}

/// `dpkg-deb --field`, `--contents` and the control files of `deb`.
fn inspect(deb: &Path) -> (String, String, tempfile::TempDir) {
    let fields = run(Command::new("dpkg-deb").arg("--field").arg(deb));
    let contents = run(Command::new("dpkg-deb").arg("--contents").arg(deb));
    let control = tempfile::tempdir().expect("tmp");
    run(Command::new("dpkg-deb")
        .arg("--control")
        .arg(deb)
        .arg(control.path()));
    (fields, contents, control)
}

#[test]
fn the_packages_hold_what_a_node_needs() {
    let Some(repo) = built_repo() else { return };
    if !have("dpkg-deb") {
        return;
    }
    let (fields, contents, control) = inspect(&deb_of(&repo, "corral-agent"));
    assert!(fields.contains("Package: corral-agent\n"), "{fields}");
    assert!(fields.contains("util-linux"), "{fields}");
    assert!(
        fields.contains("Recommends: consul, nginx-light | nginx, postgresql-15, todomvc"),
        "{fields}"
    );
    for path in [
        "./usr/bin/corral-agent",
        "./etc/corral/agent.conf",
        "./usr/lib/systemd/system/corral-agent.service",
        // VirtualBox guests' first boot (enabled in the base VM only).
        "./usr/lib/corral/corral-vbox-firstboot",
        "./usr/lib/corral/corral-vbox-firstboot.service",
    ] {
        assert!(contents.contains(path), "{path} in\n{contents}");
    }
    let conffiles = std::fs::read_to_string(control.path().join("conffiles")).expect("conffiles");
    assert!(conffiles.contains("/etc/corral/agent.conf"), "{conffiles}");
    let postinst = std::fs::read_to_string(control.path().join("postinst")).expect("postinst");
    assert!(
        postinst.contains("deb-systemd-helper") && postinst.contains("corral-agent.service"),
        "{postinst}"
    );
    assert!(
        !postinst.contains("corral-vbox-firstboot"),
        "the first-boot unit is not enabled on install: {postinst}"
    );

    let (fields, contents, _) = inspect(&deb_of(&repo, "corral"));
    assert!(fields.contains("Package: corral\n"), "{fields}");
    assert!(contents.contains("./usr/bin/corral"), "{contents}");
    assert!(
        !contents.contains(".service"),
        "corral starts nothing: {contents}"
    );
    let (fields, contents, _) = inspect(&deb_of(&repo, "todomvc"));
    assert!(fields.contains("Package: todomvc\n"), "{fields}");
    assert!(contents.contains("./usr/bin/todomvc"), "{contents}");

    // Unpacked together the programs run, and the agent's unit and
    // config file are what the unit expects.
    let root = tempfile::tempdir().expect("root");
    for package in ["corral", "corral-agent", "todomvc"] {
        run(Command::new("dpkg-deb")
            .arg("--extract")
            .arg(deb_of(&repo, package))
            .arg(root.path()));
    }
    for program in ["corral", "corral-agent", "todomvc"] {
        let version = run(Command::new(root.path().join("usr/bin").join(program)).arg("--version"));
        assert!(version.contains(program), "{version}");
    }
    let unit = std::fs::read_to_string(
        root.path()
            .join("usr/lib/systemd/system/corral-agent.service"),
    )
    .expect("unit");
    assert!(unit.contains("ExecStart=/usr/bin/corral-agent run --config /etc/corral/agent.conf"));
    assert!(unit.contains("KillMode=process"));
    // The unit's ExecCondition skips the agent while the shipped config
    // (comments only) is all there is, and lets it start once a setting is.
    let condition = unit
        .lines()
        .find_map(|l| l.strip_prefix("ExecCondition=/bin/sh -c '"))
        .and_then(|c| c.strip_suffix('\''))
        .expect("ExecCondition=/bin/sh -c '...'");
    let conf = root.path().join("etc/corral/agent.conf");
    let configured = |conf: &Path| {
        Command::new("sh")
            .arg("-c")
            .arg(condition.replace("/etc/corral/agent.conf", &conf.display().to_string()))
            .status()
            .expect("sh")
            .success()
    };
    assert!(
        !configured(&conf),
        "the shipped agent.conf counts as configured"
    );
    let mut text = std::fs::read_to_string(&conf).expect("conf");
    text.push_str("server = http://192.168.11.5:7000\n");
    std::fs::write(&conf, text).expect("write conf");
    assert!(configured(&conf), "a setting in agent.conf does not count");
}
