//! The TodoMVC page as a user of the cluster reaches it: through nginx, with
//! the configuration corral-agent renders (round robin, keep-alive to the
//! upstreams), in front of two webapps that both read from a streaming
//! replica when it has the session's writes. Successive requests of one page
//! land on different webapps, and reads on the replica or the primary.
//!
//! The editing scenarios of the upstream TodoMVC functional suite run 20
//! times in a row. Like that suite's page objects, the test finds the items
//! once and keeps using those elements: a page that replaced its items on a
//! server answer fails here with "stale element reference", as the upstream
//! suite did through nginx about one run in three. After each scenario the
//! page is reloaded and must show the list with the user's last write, also
//! in the rounds where the replica's replay is paused (so a read that
//! ignored the session's position would get an older list).

use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::Context;
use corral_agent::drivers::nginx::{Render, Upstream, render};
use corral_proto::LbPolicy;
use corral_testkit::{Postgres, free_port};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde_json::Value;

use crate::browser::{Browser, CONTROL, Chromedriver, ENTER, ESCAPE, RELEASE_MODIFIERS, until};
use crate::replicas::primary_and_replica;
use crate::support::{Session, TestApp, endpoint, eventually};

/// A real nginx master and its worker, in their own process group (killed
/// together on drop), configured by the agent's renderer.
pub struct Nginx {
    child: Child,
    pub base: String,
    dir: tempfile::TempDir,
}

impl Nginx {
    pub fn start(backends: &[&TestApp]) -> anyhow::Result<Nginx> {
        let dir = tempfile::tempdir()?;
        // The worker runs as nobody when the master is root.
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755))?;
        for sub in ["run", "tmp"] {
            std::fs::create_dir(dir.path().join(sub))?;
        }
        let port = free_port("127.0.0.1")?;
        let upstreams: Vec<Upstream> = backends
            .iter()
            .map(|app| Upstream {
                address: app.addr.ip(),
                port: app.addr.port(),
            })
            .collect();
        let conf = dir.path().join("nginx.conf");
        std::fs::write(
            &conf,
            render(&Render {
                prefix: dir.path(),
                listen: vec![std::net::SocketAddr::from(([127, 0, 0, 1], port))],
                service: "todomvc",
                policy: LbPolicy::RoundRobin,
                upstreams: &upstreams,
                user: None,
                status: None,
            }),
        )?;
        let log = dir.path().join("error.log");
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--", "nginx", "-e"])
            .arg(&log)
            .arg("-p")
            .arg(dir.path())
            .arg("-c")
            .arg(&conf)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(dir.path().join("stderr.log"))?)
            .spawn()
            .context("starting nginx")?;
        Ok(Nginx {
            child,
            base: format!("http://127.0.0.1:{port}"),
            dir,
        })
    }

    /// What nginx said, for a failure message.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = killpg(Pid::from_raw(self.child.id() as i32), Signal::SIGKILL);
        let _ = self.child.wait();
    }
}

/// A primary with a streaming replica, two webapps reading from both, and
/// nginx in front of the webapps.
pub struct Cluster {
    pub replica: Postgres,
    pub nginx: Nginx,
    pub apps: [TestApp; 2],
    _primary: Postgres,
}

impl Cluster {
    /// `list_cache_ms` of web1 and web2, as for `todomvc --list-cache-ms`.
    pub async fn start(list_cache_ms: [&str; 2]) -> anyhow::Result<Cluster> {
        let (primary, replica) = primary_and_replica("todomvc")?;
        let mut apps = Vec::new();
        for (node, list_cache_ms) in ["web1", "web2"].into_iter().zip(list_cache_ms) {
            let app = TestApp::spawn(&[
                "--node-name",
                node,
                "--db-name",
                "todomvc",
                "--db-primary",
                &endpoint(&primary),
                "--db-replica",
                &endpoint(&replica),
                "--list-cache-ms",
                list_cache_ms,
            ])
            .await?;
            app.wait_writable().await?;
            apps.push(app);
        }
        let apps: [TestApp; 2] = apps.try_into().map_err(|_| anyhow::anyhow!("two apps"))?;
        let nginx = Nginx::start(&[&apps[0], &apps[1]])?;
        // Both webapps answer through nginx.
        let s = Session::new(&nginx.base);
        let served_by = std::sync::Mutex::new(std::collections::BTreeSet::new());
        eventually(
            "nginx routes to both webapps",
            Duration::from_secs(30),
            || async {
                let r = s.get("/healthz").await?;
                let mut seen = served_by.lock().unwrap();
                if let Some(node) = r.header("x-served-by") {
                    seen.insert(node.to_string());
                }
                Ok(seen.len() == 2)
            },
        )
        .await
        .with_context(|| format!("nginx: {}", nginx.log()))?;
        Ok(Cluster {
            replica,
            nginx,
            apps,
            _primary: primary,
        })
    }
}

const ONE: &str = "buy some cheese";
const TWO: &str = "feed the cat";
const THREE: &str = "book a doctors appointment";
const SAUSAGES: &str = "buy some sausages";

/// The "Editing" section of the upstream TodoMVC suite; each starts from
/// three items with the second one being edited.
#[derive(Clone, Copy, Debug)]
enum Scenario {
    HidesOtherControls,
    SavesOnEnter,
    SavesOnBlur,
    TrimsText,
    RemovesOnEmptyText,
    CancelsOnEscape,
}

const SCENARIOS: [Scenario; 6] = [
    Scenario::HidesOtherControls,
    Scenario::SavesOnEnter,
    Scenario::SavesOnBlur,
    Scenario::TrimsText,
    Scenario::RemovesOnEmptyText,
    Scenario::CancelsOnEscape,
];

/// Selects the whole field, then types.
fn replacing(text: &str) -> String {
    format!("{CONTROL}a{RELEASE_MODIFIERS}{text}")
}

/// Clears the list with the page's own request (so the browser's session
/// position covers it, as after any write of the user's) and reloads.
async fn start_empty(b: &Browser, base: &str) -> anyhow::Result<()> {
    let status = b
        .script_async(
            "const done = arguments[arguments.length - 1];
             fetch('todos', {method: 'DELETE', credentials: 'same-origin'})
               .then(r => done(r.status), e => done(String(e)));",
        )
        .await?;
    anyhow::ensure!(status == 204, "clearing the list answered {status}");
    b.goto(&format!("{base}/")).await?;
    until(b, "the empty list loaded", |s| s.count == "0 items left").await?;
    Ok(())
}

/// Whether the page has changes it has not heard back about.
async fn saving(b: &Browser) -> anyhow::Result<bool> {
    let v: Value = b
        .script("return document.querySelector('.todo-list').getAttribute('aria-busy') === 'true'")
        .await?;
    Ok(v == true)
}

async fn run_scenario(b: &Browser, base: &str, scenario: Scenario) -> anyhow::Result<()> {
    start_empty(b, base).await?;
    for title in [ONE, TWO, THREE] {
        b.type_into(".new-todo", &format!("{title}{ENTER}")).await?;
    }
    until(b, "three items", |s| s.titles() == [ONE, TWO, THREE]).await?;

    // Found once, used to the end, as a Selenium page object does.
    let items = b.find_all(".todo-list li").await?;
    anyhow::ensure!(items.len() == 3, "three items, found {}", items.len());
    let mut labels = Vec::new();
    let mut toggles = Vec::new();
    for li in &items {
        labels.push(b.find_in(li, "label").await?);
        toggles.push(b.find_in(li, ".toggle").await?);
    }

    b.double_click_element(&labels[1]).await?;
    until(b, "edit mode", |s| s.editing).await?;
    let edit = b.find_in(&items[1], ".edit").await?;
    let expected: Vec<(usize, &str)> = match scenario {
        Scenario::HidesOtherControls => {
            assert!(!b.is_displayed(&toggles[1]).await?, "toggle hidden");
            assert!(!b.is_displayed(&labels[1]).await?, "label hidden");
            vec![(0, ONE), (1, TWO), (2, THREE)]
        }
        Scenario::SavesOnEnter => {
            b.keys_to(&edit, &replacing(&format!("{SAUSAGES}{ENTER}")))
                .await?;
            vec![(0, ONE), (1, SAUSAGES), (2, THREE)]
        }
        Scenario::SavesOnBlur => {
            b.keys_to(&edit, &replacing(SAUSAGES)).await?;
            // Clicking another item's toggle takes the focus: blur saves.
            b.click_element(&toggles[0]).await?;
            b.click_element(&toggles[0]).await?;
            vec![(0, ONE), (1, SAUSAGES), (2, THREE)]
        }
        Scenario::TrimsText => {
            b.keys_to(&edit, &replacing(&format!("    {SAUSAGES}  {ENTER}")))
                .await?;
            vec![(0, ONE), (1, SAUSAGES), (2, THREE)]
        }
        Scenario::RemovesOnEmptyText => {
            b.keys_to(&edit, &replacing(&format!("\u{E003}{ENTER}")))
                .await?;
            vec![(0, ONE), (2, THREE)]
        }
        Scenario::CancelsOnEscape => {
            b.keys_to(&edit, &replacing(&format!("foo{ESCAPE}")))
                .await?;
            vec![(0, ONE), (1, TWO), (2, THREE)]
        }
    };
    let titles: Vec<&str> = expected.iter().map(|(_, t)| *t).collect();
    let editing = matches!(scenario, Scenario::HidesOtherControls);
    let shown = until(b, "the edited list", |s| {
        s.titles() == titles && s.editing == editing
    })
    .await?;
    assert!(
        shown.items.iter().all(|(_, completed)| !completed),
        "nothing completed: {shown:?}"
    );

    // Read through the elements found before the edit, once before and
    // once after every answer from the server has arrived.
    for moment in ["before the answers", "after the answers"] {
        if moment == "after the answers" {
            eventually("the page saved", Duration::from_secs(15), || async {
                Ok(!saving(b).await?)
            })
            .await?;
        }
        for &(i, title) in &expected {
            if editing && i == 1 {
                continue; // its label is hidden while editing: no text
            }
            let text = b.text_of(&labels[i]).await.with_context(|| {
                format!("{scenario:?}: item {i} was replaced under the test ({moment})")
            })?;
            assert_eq!(text, title, "{scenario:?}: item {i} ({moment})");
        }
    }

    // A reload shows at least the user's own last write, whichever webapp
    // and database server answer it.
    b.goto(&format!("{base}/")).await?;
    until(b, "the list reloaded", |s| !s.count.is_empty()).await?;
    eventually("the page loaded", Duration::from_secs(15), || async {
        Ok(!saving(b).await?)
    })
    .await?;
    let reloaded = b.shown().await?;
    assert_eq!(
        reloaded.titles(),
        titles,
        "{scenario:?}: the reloaded list is older than the user's own last write"
    );
    assert_eq!(reloaded.status, "", "{scenario:?}: no sync error shown");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn editing_through_nginx_and_two_webapps_twenty_times_in_a_row() -> anyhow::Result<()> {
    // web1 with the list cache as deployed, web2 without: the page's reads
    // alternate between the cache and the replica-or-primary path.
    let cluster = Cluster::start(["250", "0"]).await?;
    let driver = Chromedriver::start().await?;
    let b = driver.session().await?;
    b.goto(&format!("{}/", cluster.nginx.base)).await?;
    let result = async {
        for round in 1..=20 {
            // Every other round with the replica's replay paused: it lags,
            // and only a read that respects the session's position is safe.
            if round % 2 == 0 {
                cluster.replica.pause_replay()?;
            } else {
                cluster.replica.resume_replay()?;
            }
            for scenario in SCENARIOS {
                run_scenario(&b, &cluster.nginx.base, scenario)
                    .await
                    .with_context(|| format!("round {round} of 20, {scenario:?}"))?;
            }
        }
        anyhow::Ok(())
    }
    .await;
    let quit = b.quit().await;
    result?;
    quit?;
    // Through nginx a session's reads do come from the cache and from the
    // replica (checked through the API: the browser does not show headers),
    // so the rounds with replay running used both.
    cluster.replica.resume_replay()?;
    let s = Session::new(&cluster.nginx.base);
    s.add("a write of this session").await?;
    let sources = std::sync::Mutex::new(std::collections::BTreeSet::new());
    eventually(
        "reads through nginx served by the cache and by the replica",
        Duration::from_secs(30),
        || async {
            let r = s.get("/todos").await?;
            let mut sources = sources.lock().unwrap();
            sources.extend(r.read_from().map(str::to_string));
            Ok(sources.contains("cache") && sources.contains("replica"))
        },
    )
    .await
    .with_context(|| format!("seen: {:?}", sources.lock().unwrap()))?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_cache_never_serves_a_list_older_than_the_sessions_position() -> anyhow::Result<()> {
    // Entries live for a minute here: correctness must not rest on expiry.
    let cluster = Cluster::start(["60000", "60000"]).await?;
    let [web1, web2] = &cluster.apps;
    let at = |app: &TestApp| format!("{}/todos", app.base);
    // The replica cannot serve anything written from here on.
    cluster.replica.pause_replay()?;

    // Alice's list through web1 comes from web1's cache once filled.
    let alice = Session::new(&web1.base);
    let first = alice.add("first").await?;
    let first_url = first.json["url"].as_str().context("url")?.to_string();
    let r = alice.get(&at(web1)).await?;
    assert_eq!(r.titles(), ["first"]);
    assert_eq!(r.read_from(), Some("cache"), "a fill serves the reader");
    let r = alice.get(&at(web1)).await?;
    assert_eq!(r.read_from(), Some("cache"));
    // Carol has read that list too, so her position is as old as it.
    let carol = Session::new(&web1.base);
    let r = carol.get(&at(web1)).await?;
    assert_eq!(r.read_from(), Some("primary"), "no cookie, no cache");
    let r = carol.get(&at(web1)).await?;
    assert_eq!(
        (r.titles(), r.read_from()),
        (vec!["first".to_string()], Some("cache"))
    );

    let mut second_url: Option<String> = None;
    for round in 1..=10 {
        // Alice writes through the other webapp: web1's cache does not hear
        // of it and still holds the older list...
        let title = format!("second, version {round}");
        let body = serde_json::json!({ "title": title });
        let r = match &second_url {
            None => alice.post_json(&at(web2), &body).await?,
            Some(url) => alice.patch_json(url, &body).await?,
        };
        assert!(r.status == 200 || r.status == 201, "{}", r.text);
        assert_eq!(r.header("x-served-by"), Some("web2"));
        second_url = r.json["url"].as_str().map(str::to_string);
        let r = carol.get(&at(web1)).await?;
        assert_eq!(r.read_from(), Some("cache"), "round {round}: carol");
        assert!(
            !r.titles().contains(&title),
            "round {round}: web1's cache is older than alice's write: {:?}",
            r.titles()
        );
        // ...but never serves it to Alice, directly or through nginx.
        for url in [at(web1), format!("{}/todos", cluster.nginx.base)] {
            let r = alice.get(&url).await?;
            assert_eq!(r.status, 200, "{}", r.text);
            assert_eq!(
                r.titles(),
                ["first".to_string(), title.clone()],
                "round {round}: alice read an older list at {url} from {:?}",
                r.read_from()
            );
        }
    }
    // A write through web1 itself drops its cache for everyone.
    let r = alice.delete(&first_url).await?;
    assert_eq!(r.status, 204);
    let r = carol.get(&at(web1)).await?;
    assert!(
        !r.titles().contains(&"first".to_string()),
        "{:?}",
        r.titles()
    );
    cluster.replica.resume_replay()?;
    Ok(())
}

/// Clients without the session cookie (curl, the Todo-Backend spec runner)
/// read the whole list from a read that began after their request: many of
/// them at once share reads, but none may miss a write whose answer came
/// back before it asked, whichever webapp took the write. Caches here live
/// a minute, so only a fresh read passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cookieless_readers_see_every_write_answered_before_they_asked() -> anyhow::Result<()> {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

    let cluster = Cluster::start(["60000", "60000"]).await?;
    let [web1, web2] = &cluster.apps;
    let list = format!("{}/todos", web1.base);
    let writes = format!("{}/todos", web2.base);
    const WRITES: usize = 40;
    let acked = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let reads = Arc::new(AtomicUsize::new(0));

    let readers: Vec<_> = (0..12)
        .map(|_| {
            let (list, acked, done, reads) =
                (list.clone(), acked.clone(), done.clone(), reads.clone());
            tokio::spawn(async move {
                while !done.load(Ordering::SeqCst) {
                    // A new client each time: no cookie is ever sent.
                    let client = Session::new(&list);
                    let before = acked.load(Ordering::SeqCst);
                    let r = client.get(&list).await?;
                    anyhow::ensure!(r.status == 200, "{}", r.text);
                    let titles = r.titles();
                    for k in 1..=before {
                        anyhow::ensure!(
                            titles.contains(&format!("write {k}")),
                            "a cookieless read sent after write {before} was answered \
                             misses write {k} (from {:?}): {titles:?}",
                            r.read_from()
                        );
                    }
                    reads.fetch_add(1, Ordering::SeqCst);
                }
                anyhow::Ok(())
            })
        })
        .collect();

    for k in 1..=WRITES {
        let writer = Session::new(&writes);
        let r = writer
            .post_json(
                &writes,
                &serde_json::json!({ "title": format!("write {k}") }),
            )
            .await?;
        assert_eq!(r.status, 201, "{}", r.text);
        acked.store(k, Ordering::SeqCst);
        // The writer's own next read, through the other webapp, at once.
        let r = Session::new(&list).get(&list).await?;
        assert!(
            r.titles().contains(&format!("write {k}")),
            "write {k} missing from the next read: {:?}",
            r.titles()
        );
    }
    done.store(true, Ordering::SeqCst);
    for reader in readers {
        reader.await??;
    }
    assert!(reads.load(Ordering::SeqCst) >= 12, "the readers ran");
    Ok(())
}
