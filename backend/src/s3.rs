//! The offsite copy's bucket: an S3-compatible object store the server
//! copies adm1's backup store into. Requests are signed by `rusty-s3`
//! (sans-IO, SigV4 presigned URLs) and sent with the server's own
//! `reqwest`; objects carry the file's SHA-256 as metadata
//! (`x-amz-meta-sha256`, hex) and as `x-amz-checksum-sha256`, so the store
//! itself refuses bytes that do not match.

use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine;
use futures_util::StreamExt;
use rusty_s3::{Bucket as S3BucketName, Credentials, S3Action, UrlStyle};

/// Presigned URLs live this long: enough for a large base backup upload.
const URL_TTL: Duration = Duration::from_secs(3600);
/// Small calls (HEAD, list, delete) give up after this long.
const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// The metadata key of the hex SHA-256 (`x-amz-meta-sha256`).
pub const SHA256_META: &str = "x-amz-meta-sha256";

/// Where the offsite copy goes (`corral serve --s3-*`). The credentials
/// come from the environment or a 0600 file, never from argv.
#[derive(Clone)]
pub struct S3Config {
    pub endpoint: String,
    pub bucket: String,
    pub region: String,
    /// Prepended to every key, e.g. `corral/`; one prefix per cluster.
    pub prefix: String,
    pub access_key: String,
    pub secret_key: String,
    /// Extra trusted CA (PEM) for an `https` endpoint, besides the system's.
    pub ca_file: Option<PathBuf>,
}

impl std::fmt::Debug for S3Config {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Config")
            .field("endpoint", &self.endpoint)
            .field("bucket", &self.bucket)
            .field("region", &self.region)
            .field("prefix", &self.prefix)
            .field("access_key", &self.access_key)
            .field("secret_key", &"<redacted>")
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum S3Error {
    #[error("bad S3 settings: {0}")]
    Config(String),
    #[error("S3 endpoint {endpoint} unreachable: {cause}")]
    Unreachable { endpoint: String, cause: String },
    #[error("bucket {bucket} does not exist at {endpoint}")]
    NoSuchBucket { bucket: String, endpoint: String },
    #[error("S3 refused the credentials for bucket {bucket} (HTTP {status})")]
    Denied { bucket: String, status: u16 },
    #[error("S3 {op} {key}: HTTP {status}: {body}")]
    Status {
        op: &'static str,
        key: String,
        status: u16,
        body: String,
    },
    #[error("S3 {op} {key}: {cause}")]
    Broken {
        op: &'static str,
        key: String,
        cause: String,
    },
    /// The local side of a copy: the database or the backup store.
    #[error("{0}")]
    Local(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
}

/// Reads the access key and secret from a credentials file: `KEY = VALUE`
/// lines (`access_key_id`/`secret_access_key`, with or without the `aws_`
/// prefix, so an AWS `credentials` file's default profile works). The file
/// must not be readable by group or others.
pub fn credentials_from_file(path: &Path) -> Result<(String, String), S3Error> {
    use std::os::unix::fs::PermissionsExt;
    let meta = std::fs::metadata(path).map_err(|source| S3Error::Io {
        what: format!("reading {}", path.display()),
        source,
    })?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(S3Error::Config(format!(
            "{} has mode {mode:o}: S3 credentials must be readable by their owner only (chmod 600)",
            path.display()
        )));
    }
    let text = std::fs::read_to_string(path).map_err(|source| S3Error::Io {
        what: format!("reading {}", path.display()),
        source,
    })?;
    parse_credentials(&text).ok_or_else(|| {
        S3Error::Config(format!(
            "{} needs `access_key_id = ...` and `secret_access_key = ...` lines",
            path.display()
        ))
    })
}

fn parse_credentials(text: &str) -> Option<(String, String)> {
    let mut key = None;
    let mut secret = None;
    for line in text.lines() {
        let Some((name, value)) = line.split_once('=') else {
            continue;
        };
        let value = value.trim().to_string();
        match name.trim().trim_start_matches("aws_") {
            "access_key_id" if !value.is_empty() => key = Some(value),
            "secret_access_key" if !value.is_empty() => secret = Some(value),
            _ => {}
        }
    }
    Some((key?, secret?))
}

/// An object as listed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed {
    /// The key without the configured prefix.
    pub name: String,
    pub size: u64,
}

/// One bucket, ready to use.
pub struct S3Bucket {
    bucket: S3BucketName,
    credentials: Credentials,
    prefix: String,
    endpoint: String,
    http: reqwest::Client,
    /// Files larger than this go up in parts of this size.
    part_size: u64,
}

/// The size of a multipart upload's parts, and the largest file sent in
/// one PUT: S3 takes at most 5 GiB in one PUT and 10,000 parts, so files up
/// to 640 GiB go up, and a failed part is retried alone.
pub const PART_SIZE: u64 = 64 << 20;
/// S3's smallest part (all but the last).
pub const MIN_PART_SIZE: u64 = 5 << 20;
/// S3's most parts in one upload.
const MAX_PARTS: u64 = 10_000;

impl std::fmt::Debug for S3Bucket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "S3Bucket({} at {})", self.bucket.name(), self.endpoint)
    }
}

impl S3Bucket {
    /// Checks the settings (no network): an endpoint that is not an
    /// `http(s)` URL with a host, an empty bucket or region, is refused.
    pub fn new(config: &S3Config) -> Result<Self, S3Error> {
        let url: reqwest::Url = config
            .endpoint
            .parse()
            .map_err(|e| S3Error::Config(format!("--s3-endpoint {:?}: {e}", config.endpoint)))?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(S3Error::Config(format!(
                "--s3-endpoint {:?}: give an http:// or https:// URL with a host",
                config.endpoint
            )));
        }
        let valid_bucket = (3..=63).contains(&config.bucket.len())
            && config
                .bucket
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.');
        if !valid_bucket {
            return Err(S3Error::Config(format!(
                "--s3-bucket {:?}: 3-63 lower-case letters, digits, '-' and '.'",
                config.bucket
            )));
        }
        if config.region.is_empty() {
            return Err(S3Error::Config("--s3-region is empty".into()));
        }
        if config.access_key.is_empty() || config.secret_key.is_empty() {
            return Err(S3Error::Config(
                "the S3 access key or secret is empty".into(),
            ));
        }
        let bucket = S3BucketName::new(
            url.clone(),
            UrlStyle::Path,
            config.bucket.clone(),
            config.region.clone(),
        )
        .map_err(|e| S3Error::Config(format!("--s3-endpoint {}: {e:?}", config.endpoint)))?;
        let mut builder = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(5))
            .read_timeout(Duration::from_secs(60));
        if url.scheme() == "https" {
            builder = builder.use_rustls_tls();
            for file in system_ca_files().iter().chain(config.ca_file.as_ref()) {
                let pem = std::fs::read(file).map_err(|source| S3Error::Io {
                    what: format!("reading CA file {}", file.display()),
                    source,
                })?;
                for cert in reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| {
                    S3Error::Config(format!("{} holds no PEM certificates: {e}", file.display()))
                })? {
                    builder = builder.add_root_certificate(cert);
                }
            }
        }
        let http = builder
            .build()
            .map_err(|e| S3Error::Config(format!("HTTP client: {e}")))?;
        let mut prefix = config.prefix.trim_start_matches('/').to_string();
        if !prefix.is_empty() && !prefix.ends_with('/') {
            prefix.push('/');
        }
        Ok(Self {
            bucket,
            credentials: Credentials::new(config.access_key.clone(), config.secret_key.clone()),
            prefix,
            endpoint: config.endpoint.clone(),
            http,
            part_size: PART_SIZE,
        })
    }

    /// The same bucket with parts of `bytes` (at least [`MIN_PART_SIZE`]):
    /// files larger than that go up in parts.
    pub fn with_part_size(mut self, bytes: u64) -> Self {
        self.part_size = bytes.max(MIN_PART_SIZE);
        self
    }

    pub fn name(&self) -> &str {
        self.bucket.name()
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    fn key(&self, name: &str) -> String {
        format!("{}{name}", self.prefix)
    }

    /// The URL is left out: a presigned one carries the access key id and
    /// a signature that stays valid for an hour, and this text ends up in
    /// events and logs.
    fn unreachable(&self, e: reqwest::Error) -> S3Error {
        S3Error::Unreachable {
            endpoint: self.endpoint.clone(),
            cause: error_chain(&e.without_url()),
        }
    }

    async fn status_error(&self, op: &'static str, key: &str, res: reqwest::Response) -> S3Error {
        let status = res.status().as_u16();
        let body: String = res
            .text()
            .await
            .unwrap_or_default()
            .chars()
            .take(300)
            .collect();
        if body.contains("NoSuchBucket") {
            return S3Error::NoSuchBucket {
                bucket: self.bucket.name().to_string(),
                endpoint: self.endpoint.clone(),
            };
        }
        if status == 403 || body.contains("InvalidAccessKeyId") {
            return S3Error::Denied {
                bucket: self.bucket.name().to_string(),
                status,
            };
        }
        S3Error::Status {
            op,
            key: key.to_string(),
            status,
            body,
        }
    }

    /// Sends `request` (for `op` on `key`): the response, `None` for a 404
    /// (no such object), the cause otherwise.
    async fn found(
        &self,
        op: &'static str,
        key: &str,
        request: reqwest::RequestBuilder,
    ) -> Result<Option<reqwest::Response>, S3Error> {
        let res = request.send().await.map_err(|e| self.unreachable(e))?;
        if res.status().as_u16() == 404 {
            return Ok(None);
        }
        if !res.status().is_success() {
            return Err(self.status_error(op, key, res).await);
        }
        Ok(Some(res))
    }

    /// Whether the bucket is there and these credentials may use it.
    pub async fn check(&self) -> Result<(), S3Error> {
        let url = self
            .bucket
            .head_bucket(Some(&self.credentials))
            .sign(URL_TTL);
        let res = self
            .http
            .head(url)
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        match res.status().as_u16() {
            200..=299 => Ok(()),
            404 => Err(S3Error::NoSuchBucket {
                bucket: self.bucket.name().to_string(),
                endpoint: self.endpoint.clone(),
            }),
            _ => Err(self.status_error("HEAD bucket", "", res).await),
        }
    }

    /// Uploads the file at `path` as `name`, streamed, with its SHA-256.
    #[tracing::instrument(skip(self, path), fields(bucket = %self.bucket.name()))]
    pub async fn put_file(&self, name: &str, path: &Path, sha256: &str) -> Result<u64, S3Error> {
        let key = self.key(name);
        let file = tokio::fs::File::open(path)
            .await
            .map_err(|source| S3Error::Io {
                what: format!("opening {}", path.display()),
                source,
            })?;
        let size = file
            .metadata()
            .await
            .map_err(|source| S3Error::Io {
                what: format!("reading {}", path.display()),
                source,
            })?
            .len();
        let checksum = hex::decode(sha256)
            .map(|b| base64::engine::general_purpose::STANDARD.encode(b))
            .map_err(|e| S3Error::Config(format!("{sha256:?} is not hex: {e}")))?;
        if size > self.part_size {
            drop(file);
            return self.put_in_parts(&key, path, size, sha256).await;
        }
        let mut action = self.bucket.put_object(Some(&self.credentials), &key);
        action
            .headers_mut()
            .insert("x-amz-checksum-sha256", checksum.clone());
        action.headers_mut().insert(SHA256_META, sha256.to_string());
        let url = action.sign(URL_TTL);
        let body = reqwest::Body::wrap_stream(crate::backup_store::file_stream(file));
        let res = self
            .http
            .put(url)
            .header("content-length", size)
            .header("x-amz-checksum-sha256", checksum)
            .header(SHA256_META, sha256)
            .body(body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !res.status().is_success() {
            return Err(self.status_error("PUT", &key, res).await);
        }
        Ok(size)
    }

    /// A multipart upload of the file at `path` (`size` bytes) as `key`:
    /// created with the SHA-256 in its metadata, each part streamed from
    /// its place in the file (tried up to three times), then completed; on
    /// a failure the upload is aborted, so no parts are left to pay for.
    async fn put_in_parts(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        sha256: &str,
    ) -> Result<u64, S3Error> {
        // Parts grow past the configured size if the file needs more than
        // S3's 10,000 of them.
        let part_size = self.part_size.max(size.div_ceil(MAX_PARTS));
        let mut create = self
            .bucket
            .create_multipart_upload(Some(&self.credentials), key);
        create.headers_mut().insert(SHA256_META, sha256.to_string());
        let url = create.sign(URL_TTL);
        let res = self
            .http
            .post(url)
            .header(SHA256_META, sha256)
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !res.status().is_success() {
            return Err(self.status_error("CreateMultipartUpload", key, res).await);
        }
        let text = res.text().await.map_err(|e| self.unreachable(e))?;
        let created =
            rusty_s3::actions::CreateMultipartUpload::parse_response(&text).map_err(|e| {
                S3Error::Broken {
                    op: "CreateMultipartUpload",
                    key: key.to_string(),
                    cause: format!("an answer that is not an upload: {e}"),
                }
            })?;
        let upload_id = created.upload_id().to_string();
        let outcome = self
            .upload_parts_and_complete(key, path, size, part_size, &upload_id)
            .await;
        if outcome.is_err() {
            let url = self
                .bucket
                .abort_multipart_upload(Some(&self.credentials), key, &upload_id)
                .sign(URL_TTL);
            if let Err(e) = self.http.delete(url).timeout(CALL_TIMEOUT).send().await {
                tracing::warn!(key, error = %e, "aborting a failed multipart upload failed");
            }
        }
        outcome.map(|()| size)
    }

    async fn upload_parts_and_complete(
        &self,
        key: &str,
        path: &Path,
        size: u64,
        part_size: u64,
        upload_id: &str,
    ) -> Result<(), S3Error> {
        let mut etags = Vec::new();
        let mut offset = 0u64;
        while offset < size {
            let len = part_size.min(size - offset);
            let number = u16::try_from(etags.len() + 1).map_err(|_| S3Error::Broken {
                op: "UploadPart",
                key: key.to_string(),
                cause: "more parts than S3 takes".into(),
            })?;
            let mut last = None;
            for attempt in 1..=3u64 {
                match self
                    .upload_part(key, path, offset, len, number, upload_id)
                    .await
                {
                    Ok(etag) => {
                        last = Some(Ok(etag));
                        break;
                    }
                    Err(e) => {
                        tracing::warn!(key, part = number, attempt, error = %e, "a part failed");
                        last = Some(Err(e));
                        tokio::time::sleep(Duration::from_millis(500 * attempt)).await;
                    }
                }
            }
            match last {
                Some(Ok(etag)) => etags.push(etag),
                Some(Err(e)) => return Err(e),
                None => unreachable!("three attempts were made"),
            }
            offset += len;
        }
        let complete = self.bucket.complete_multipart_upload(
            Some(&self.credentials),
            key,
            upload_id,
            etags.iter().map(String::as_str),
        );
        let url = complete.sign(URL_TTL);
        let body = complete.body();
        let res = self
            .http
            .post(url)
            .body(body)
            .timeout(CALL_TIMEOUT)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !res.status().is_success() {
            return Err(self.status_error("CompleteMultipartUpload", key, res).await);
        }
        // S3 may answer 200 and still fail: the body says which.
        let text = res.text().await.map_err(|e| self.unreachable(e))?;
        rusty_s3::actions::CompleteMultipartUploadResponse::parse(&text).map_err(|e| {
            S3Error::Broken {
                op: "CompleteMultipartUpload",
                key: key.to_string(),
                cause: format!(
                    "not completed: {e}: {}",
                    text.chars().take(300).collect::<String>()
                ),
            }
        })?;
        Ok(())
    }

    /// Streams bytes `offset..offset+len` of the file as part `number`;
    /// its ETag.
    async fn upload_part(
        &self,
        key: &str,
        path: &Path,
        offset: u64,
        len: u64,
        number: u16,
        upload_id: &str,
    ) -> Result<String, S3Error> {
        use tokio::io::{AsyncReadExt, AsyncSeekExt};
        let io = |what: &str, source| S3Error::Io {
            what: format!("{what} {}", path.display()),
            source,
        };
        let mut file = tokio::fs::File::open(path)
            .await
            .map_err(|e| io("opening", e))?;
        file.seek(std::io::SeekFrom::Start(offset))
            .await
            .map_err(|e| io("seeking in", e))?;
        let url = self
            .bucket
            .upload_part(Some(&self.credentials), key, number, upload_id)
            .sign(URL_TTL);
        let body = reqwest::Body::wrap_stream(crate::backup_store::file_stream(file.take(len)));
        let res = self
            .http
            .put(url)
            .header("content-length", len)
            .body(body)
            .send()
            .await
            .map_err(|e| self.unreachable(e))?;
        if !res.status().is_success() {
            return Err(self.status_error("UploadPart", key, res).await);
        }
        res.headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
            .ok_or_else(|| S3Error::Broken {
                op: "UploadPart",
                key: key.to_string(),
                cause: "the answer has no ETag".into(),
            })
    }

    /// `HEAD` of the object; `None` when there is no such object.
    async fn head_object(&self, name: &str) -> Result<Option<reqwest::Response>, S3Error> {
        let key = self.key(name);
        let url = self
            .bucket
            .head_object(Some(&self.credentials), &key)
            .sign(URL_TTL);
        let request = self.http.head(url).timeout(CALL_TIMEOUT);
        self.found("HEAD", &key, request).await
    }

    /// The object's ETag, if it exists: `"<md5>-<parts>"` for one that went
    /// up in parts.
    pub async fn etag(&self, name: &str) -> Result<Option<String>, S3Error> {
        let Some(res) = self.head_object(name).await? else {
            return Ok(None);
        };
        Ok(res
            .headers()
            .get("etag")
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim_matches('"').to_string()))
    }

    /// The object's size and SHA-256 (from its metadata), if it exists.
    pub async fn head(&self, name: &str) -> Result<Option<(u64, Option<String>)>, S3Error> {
        let Some(res) = self.head_object(name).await? else {
            return Ok(None);
        };
        let size = res
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let sha = res
            .headers()
            .get(SHA256_META)
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        Ok(Some((size, sha)))
    }

    /// Downloads `name`: its SHA-256 (from its metadata) and its bytes as
    /// a stream; `None` when there is no such object.
    pub async fn get(
        &self,
        name: &str,
    ) -> Result<
        Option<(
            String,
            impl futures_util::Stream<Item = Result<actix_web::web::Bytes, reqwest::Error>> + Unpin,
        )>,
        S3Error,
    > {
        let key = self.key(name);
        let url = self
            .bucket
            .get_object(Some(&self.credentials), &key)
            .sign(URL_TTL);
        let Some(res) = self.found("GET", &key, self.http.get(url)).await? else {
            return Ok(None);
        };
        let sha = res
            .headers()
            .get(SHA256_META)
            .and_then(|v| v.to_str().ok())
            .filter(|s| crate::backup_store::is_sha256(s))
            .map(str::to_ascii_lowercase)
            .ok_or_else(|| S3Error::Broken {
                op: "GET",
                key: key.clone(),
                cause: format!("the object has no {SHA256_META} to check it against"),
            })?;
        Ok(Some((sha, res.bytes_stream().boxed())))
    }

    /// Every object under `under` (a name prefix, without the configured
    /// prefix), sorted by name.
    pub async fn list(&self, under: &str) -> Result<Vec<Listed>, S3Error> {
        let full = self.key(under);
        let mut out = Vec::new();
        let mut token: Option<String> = None;
        loop {
            let mut action = self.bucket.list_objects_v2(Some(&self.credentials));
            action.with_prefix(full.as_str());
            if let Some(t) = &token {
                action.with_continuation_token(t.as_str());
            }
            let url = action.sign(URL_TTL);
            let res = self
                .http
                .get(url)
                .timeout(CALL_TIMEOUT)
                .send()
                .await
                .map_err(|e| self.unreachable(e))?;
            if !res.status().is_success() {
                return Err(self.status_error("LIST", &full, res).await);
            }
            let text = res.text().await.map_err(|e| self.unreachable(e))?;
            let page = rusty_s3::actions::ListObjectsV2::parse_response(&text).map_err(|e| {
                S3Error::Broken {
                    op: "LIST",
                    key: full.clone(),
                    cause: format!("unreadable answer: {e}"),
                }
            })?;
            for object in page.contents {
                if let Some(name) = object.key.strip_prefix(&self.prefix) {
                    out.push(Listed {
                        name: name.to_string(),
                        size: object.size.unwrap_or(0),
                    });
                }
            }
            match page.next_continuation_token {
                Some(t) => token = Some(t),
                None => break,
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    /// Deletes `name`; deleting what is not there is fine.
    pub async fn delete(&self, name: &str) -> Result<(), S3Error> {
        let key = self.key(name);
        let url = self
            .bucket
            .delete_object(Some(&self.credentials), &key)
            .sign(URL_TTL);
        let request = self.http.delete(url).timeout(CALL_TIMEOUT);
        self.found("DELETE", &key, request).await?;
        Ok(())
    }
}

/// The system's CA bundle (`SSL_CERT_FILE`, else Debian's path), if any.
fn system_ca_files() -> Vec<PathBuf> {
    let path = std::env::var_os("SSL_CERT_FILE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/etc/ssl/certs/ca-certificates.crt"));
    if path.is_file() {
        vec![path]
    } else {
        Vec::new()
    }
}

/// The error and its causes in one line ("connection refused" is deep in
/// reqwest's chain).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(endpoint: &str, bucket: &str) -> S3Config {
        S3Config {
            endpoint: endpoint.into(),
            bucket: bucket.into(),
            region: "us-east-1".into(),
            prefix: "corral".into(),
            access_key: "key".into(),
            secret_key: "secret".into(),
            ca_file: None,
        }
    }

    #[test]
    fn bad_endpoints_and_buckets_are_refused_with_the_setting_named() {
        for endpoint in ["", "ftp://host", "not a url", "http://"] {
            let err = S3Bucket::new(&config(endpoint, "backups")).expect_err(endpoint);
            assert!(err.to_string().contains("--s3-endpoint"), "{err}");
        }
        for bucket in ["", "ab", "Has_Upper", "a/b"] {
            let err = S3Bucket::new(&config("http://127.0.0.1:9", bucket)).expect_err(bucket);
            assert!(err.to_string().contains("--s3-bucket"), "{err}");
        }
        let bucket = S3Bucket::new(&config("http://127.0.0.1:9", "backups")).expect("valid");
        assert_eq!(bucket.prefix(), "corral/");
    }

    #[test]
    fn credentials_files_take_plain_or_aws_names_and_the_secret_never_prints() {
        let text = "[default]\naws_access_key_id = AKIA1\naws_secret_access_key = s3cr3t\n";
        assert_eq!(
            parse_credentials(text),
            Some(("AKIA1".into(), "s3cr3t".into()))
        );
        assert_eq!(parse_credentials("access_key_id=a\n"), None);
        let mut c = config("http://h", "backups");
        c.secret_key = "s3cr3t".into();
        assert!(!format!("{c:?}").contains("s3cr3t"));
    }

    #[test]
    fn a_credentials_file_readable_by_others_is_refused() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("s3");
        std::fs::write(&path, "access_key_id = a\nsecret_access_key = b\n").expect("write");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        let err = credentials_from_file(&path).expect_err("0644");
        assert!(err.to_string().contains("chmod 600"), "{err}");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).expect("chmod");
        assert_eq!(
            credentials_from_file(&path).expect("0600"),
            ("a".into(), "b".into())
        );
    }
}
