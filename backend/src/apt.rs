//! Serves corral's own apt repository at `/apt/`: the `.deb` files of
//! `corral`, `corral-agent` and `todomvc` with their `Packages`,
//! `Packages.gz` and `Release`, in one flat directory (`scripts/package.sh`
//! builds it into `target/debian/repo`). A Debian host joins with
//! `deb [trusted=yes] http://<server>/apt/ ./` and `apt install corral-agent`.
//!
//! No token: apt has no way to send one, and the packages hold no secrets
//! (a node's enrollment secret is what lets it in). Only plain file names directly
//! in that directory are served; anything else is refused before the file
//! system is touched.

use std::path::{Path, PathBuf};
use std::time::SystemTime;

use actix_web::body::SizedStream;
use actix_web::http::header::{self, HttpDate};
use actix_web::{HttpRequest, HttpResponse, web};
use tokio::io::AsyncReadExt;

use crate::error::ApiError;

/// Where the repository is looked for when `--apt-dir` is not given:
/// `<state-dir>/apt`, else `target/debian/repo` under the current directory
/// (where `scripts/package.sh` leaves it), else none.
pub fn default_dir(state_dir: &Path) -> Option<PathBuf> {
    let in_state = state_dir.join("apt");
    if in_state.is_dir() {
        return Some(in_state);
    }
    let built = std::env::current_dir().ok()?.join("target/debian/repo");
    built.is_dir().then_some(built)
}

/// The repository's routes; registered before the UI's catch-all.
pub fn configure(cfg: &mut web::ServiceConfig, dir: Option<PathBuf>) {
    cfg.service(web::redirect("/apt", "/apt/")).service(
        web::resource("/apt/{tail:.*}")
            .app_data(web::Data::new(AptDir(dir)))
            .route(web::get().to(serve))
            .route(web::head().to(serve)),
    );
}

struct AptDir(Option<PathBuf>);

const NOT_SERVED: &str = "this server has no apt repository: `scripts/package.sh` builds one \
     into target/debian/repo; start the server with --apt-dir pointing at it";

async fn serve(req: HttpRequest, dir: web::Data<AptDir>) -> Result<HttpResponse, ApiError> {
    let Some(dir) = &dir.0 else {
        return Err(ApiError::NotFound(NOT_SERVED.into()));
    };
    // The raw path: `%2e%2e` stays as sent and is refused as not plain.
    let tail = req.path().strip_prefix("/apt/").unwrap_or_default();
    if tail.is_empty() {
        return Ok(how_to_add(&req));
    }
    let name = repo_file(tail).ok_or_else(|| {
        ApiError::BadRequest(format!(
            "{} is not a file of the apt repository (plain names only)",
            req.path()
        ))
    })?;
    let path = dir.join(name);
    let missing = || ApiError::NotFound(format!("no such file in the apt repository: {name}"));
    let file = tokio::fs::File::open(&path).await.map_err(|_| missing())?;
    let meta = file.metadata().await.map_err(|_| missing())?;
    if !meta.is_file() {
        return Err(missing());
    }
    let modified = meta.modified().ok();
    if let (Some(modified), Some(since)) = (modified, if_modified_since(&req)) {
        // HTTP dates have whole seconds.
        if unix_secs(modified) <= unix_secs(since) {
            return Ok(HttpResponse::NotModified().finish());
        }
    }
    let mut response = HttpResponse::Ok();
    response.insert_header((header::CONTENT_TYPE, content_type(name)));
    // Packages and Release change with every build: apt revalidates them.
    response.insert_header((header::CACHE_CONTROL, "no-cache"));
    if let Some(modified) = modified {
        response.insert_header((header::LAST_MODIFIED, HttpDate::from(modified)));
    }
    Ok(response.body(SizedStream::new(meta.len(), chunks(file))))
}

/// The file `tail` names, if it is one plain name directly in the
/// repository. `./` segments pass (a flat repository's `deb ... ./` line
/// makes apt ask for `/apt/./Release`); `..`, encoded characters, hidden
/// names, empty segments and subdirectories do not.
fn repo_file(tail: &str) -> Option<&str> {
    let mut name = None;
    for segment in tail.split('/') {
        if segment == "." {
            continue;
        }
        let plain = !segment.is_empty()
            && segment.len() <= 255
            && !segment.starts_with('.')
            && segment.bytes().all(|b| {
                b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-' | b'+' | b'~')
            });
        if !plain || name.is_some() {
            return None;
        }
        name = Some(segment);
    }
    name
}

fn if_modified_since(req: &HttpRequest) -> Option<SystemTime> {
    let value = req
        .headers()
        .get(header::IF_MODIFIED_SINCE)?
        .to_str()
        .ok()?;
    value.parse::<HttpDate>().ok().map(SystemTime::from)
}

fn unix_secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit_once('.').map(|(_, ext)| ext) {
        Some("deb") => "application/vnd.debian.binary-package",
        Some("gz") => "application/gzip",
        Some("xz") => "application/x-xz",
        _ => "text/plain; charset=utf-8",
    }
}

/// The file in 64 KiB pieces, so a large package is never read whole.
fn chunks(
    file: tokio::fs::File,
) -> impl futures_util::Stream<Item = Result<web::Bytes, std::io::Error>> {
    futures_util::stream::try_unfold(file, |mut file| async move {
        let mut buf = vec![0u8; 64 * 1024];
        let n = file.read(&mut buf).await?;
        if n == 0 {
            return Ok(None);
        }
        buf.truncate(n);
        Ok(Some((web::Bytes::from(buf), file)))
    })
}

/// `/apt/` itself: the sources line that adds this repository.
fn how_to_add(req: &HttpRequest) -> HttpResponse {
    let info = req.connection_info();
    let base = format!("{}://{}/apt/", info.scheme(), info.host());
    HttpResponse::Ok()
        .insert_header((header::CONTENT_TYPE, "text/plain; charset=utf-8"))
        .body(format!(
            "corral's apt repository (unsigned: trust the network between here and the node).\n\
             echo 'deb [trusted=yes] {base} ./' > /etc/apt/sources.list.d/corral.list\n\
             apt-get update && apt-get install corral-agent\n"
        ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_names_directly_in_the_repository_are_files() {
        assert_eq!(repo_file("Release"), Some("Release"));
        assert_eq!(repo_file("./Packages.gz"), Some("Packages.gz"));
        assert_eq!(
            repo_file("corral-agent_0.1.0-1_amd64.deb"),
            Some("corral-agent_0.1.0-1_amd64.deb")
        );
        assert_eq!(
            repo_file("./x_1.0+git~1_all.deb"),
            Some("x_1.0+git~1_all.deb")
        );
        for bad in [
            "",
            ".",
            "..",
            "../Cargo.toml",
            "./../secret",
            "a/b",
            "a//b",
            "/etc/passwd",
            "%2e%2e/secret",
            "..%2fsecret",
            ".hidden",
            "a b",
            "é.deb",
        ] {
            assert_eq!(repo_file(bad), None, "{bad}");
        }
    }

    #[test]
    fn packages_and_indexes_have_their_content_types() {
        assert_eq!(
            content_type("corral_0.1.0-1_amd64.deb"),
            "application/vnd.debian.binary-package"
        );
        assert_eq!(content_type("Packages.gz"), "application/gzip");
        assert_eq!(content_type("Release"), "text/plain; charset=utf-8");
    }
}
