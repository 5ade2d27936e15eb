//! The HTTP/3 library entry point: a [`Service`] takes an [`http::Request`] and answers with
//! an [`http::Response`] whose [`Body`] is streamed out under flow control. Work that may
//! block (the file system, a database) runs on the server's blocking pool
//! ([`Handled::Blocking`]); a body that must be produced piece by piece ([`BodySource`], a
//! `File` for one) is read there too, one chunk at a time, so the worker never waits.
//!
//! [`FileService`] is the built-in one: GET and HEAD of the files under a root.

use std::fs::File;
use std::io::{self, Read};
use std::net::SocketAddr;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use http::{header, Method, Request, Response, StatusCode};

use crate::quic::apps::files::{self, OpenFailure};

/// What a [`Service`] is told besides the request.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo {
    /// The request arrived as 0-RTT early data: replayable (RFC 9001 section 9.2, RFC 8470).
    /// Such requests reach a service only with a safe method (GET or HEAD); others are
    /// answered 425 (Too Early) before the service sees them.
    pub early_data: bool,
    /// The client's address.
    pub remote: SocketAddr,
    /// The worker that owns the connection.
    pub worker: usize,
}

/// A [`Service`]'s answer to one request.
pub enum Handled {
    /// The response, now.
    Respond(Response<Body>),
    /// Work that may block: run on the server's blocking pool (a few threads shared by the
    /// workers), whose response then goes out on the worker. While the pool's queue is
    /// full the request is answered 503 (Service Unavailable) instead, and counted.
    Blocking(Box<dyn FnOnce() -> Response<Body> + Send>),
}

/// A response body.
pub enum Body {
    /// No body (also what a HEAD response sends, whatever its body).
    Empty,
    /// All of it, in memory.
    Bytes(Bytes),
    /// Read piece by piece on the blocking pool, as the peer takes it.
    Stream(Box<dyn BodySource>),
}

impl From<Bytes> for Body {
    fn from(bytes: Bytes) -> Body {
        Body::Bytes(bytes)
    }
}

impl From<&'static str> for Body {
    fn from(text: &'static str) -> Body {
        Body::Bytes(Bytes::from_static(text.as_bytes()))
    }
}

/// A body produced piece by piece, on the blocking pool (never on a worker).
pub trait BodySource: Send + 'static {
    /// The next piece, at most `max` bytes; `None` at the end. An error ends the response
    /// with a stream reset (H3_INTERNAL_ERROR): the client sees it was cut short.
    fn next_chunk(&mut self, max: usize) -> io::Result<Option<Bytes>>;

    /// Whether the body is known to be over (`next_chunk` would say `None`): the response
    /// then ends without another trip to the pool. The default does not know.
    fn at_end(&self) -> bool {
        false
    }
}

impl BodySource for File {
    fn next_chunk(&mut self, max: usize) -> io::Result<Option<Bytes>> {
        let mut buf = Vec::with_capacity(max);
        // `read_to_end` reads into the spare capacity (nothing is zeroed first); `take`
        // stops it at `max`.
        let n = Read::take(&mut *self, max as u64).read_to_end(&mut buf)?;
        Ok((n > 0).then(|| Bytes::from(buf)))
    }
}

/// A file of known length: read in pieces no larger than what is left, and ended without a
/// read once it is all sent (one pool job fewer than a read that finds the end).
struct FileBody {
    file: File,
    left: u64,
}

impl BodySource for FileBody {
    fn at_end(&self) -> bool {
        self.left == 0
    }

    fn next_chunk(&mut self, max: usize) -> io::Result<Option<Bytes>> {
        if self.left == 0 {
            return Ok(None);
        }
        let want = self.left.min(max as u64) as usize;
        match self.file.next_chunk(want)? {
            Some(piece) => {
                self.left -= piece.len() as u64;
                Ok(Some(piece))
            }
            // Shorter than its length at open (truncated since): the body would be short.
            None => Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "the file is shorter than its content-length",
            )),
        }
    }
}

/// An HTTP/3 service: one value per worker (made by the factory given to
/// [`crate::quic::Quic::h3_handler`]), called on the worker's thread for each request.
pub trait Service: 'static {
    /// Answers `request` (its body, if any, is not read: a request's DATA is discarded).
    /// Return quickly: anything that may block goes in [`Handled::Blocking`].
    fn call(&mut self, request: Request<()>, info: &RequestInfo) -> Handled;
}

/// GET and HEAD of the files under a root: status, `content-length`, `content-type` by
/// extension; 404 for a missing file or a path outside the root (`..`, a symbolic link out);
/// 405 with `allow` for other methods. Opening and reading happen on the blocking pool, so a
/// cold-cache read (or a FIFO that never opens) stalls no other request.
#[derive(Debug, Clone)]
pub struct FileService {
    root: Option<Root>,
}

/// The served directory: its canonical path and, for `openat2`, a descriptor.
#[derive(Debug, Clone)]
struct Root {
    path: Arc<Path>,
    dir: Option<Arc<OwnedFd>>,
}

impl FileService {
    /// Serves the files under `root` (every request is 404 without one). `root` should be
    /// canonical: [`crate::quic::Quic`] canonicalizes `--root` once at start.
    pub fn new(root: Option<Arc<Path>>) -> FileService {
        FileService {
            root: root.map(|path| Root {
                dir: files::root_dir(&path).ok().map(Arc::new),
                path,
            }),
        }
    }
}

impl Service for FileService {
    fn call(&mut self, request: Request<()>, _info: &RequestInfo) -> Handled {
        let head = match *request.method() {
            Method::GET => false,
            Method::HEAD => true,
            _ => {
                return Handled::Respond(
                    Response::builder()
                        .status(StatusCode::METHOD_NOT_ALLOWED)
                        .header(header::ALLOW, "GET, HEAD")
                        .header(header::CONTENT_LENGTH, 0)
                        .body(Body::Empty)
                        .expect("a valid response"),
                )
            }
        };
        let Some(root) = self.root.clone() else {
            return Handled::Respond(not_found());
        };
        let path = request.uri().path();
        // A file whose path and bytes are cached is answered here, on the worker, without
        // a trip to the pool; anything that would wait goes there.
        let file = match root.dir.as_deref().map(|dir| files::open_cached(dir, path)) {
            Some(Err(_)) => return Handled::Respond(not_found()),
            Some(Ok(Some(file))) => match respond_file(file, path, head, true) {
                Ok(response) => return Handled::Respond(response),
                Err(file) => file,
            },
            Some(Ok(None)) | None => None,
        };
        let path = path.to_owned();
        Handled::Blocking(Box::new(move || match file {
            Some(file) => respond_file(file, &path, head, false).unwrap_or_else(|_| not_found()),
            None => serve_file(&root, &path, head),
        }))
    }
}

/// Files up to this size are read whole with their open (one pool job per request).
const SMALL_FILE: u64 = 64 * 1024;

/// The response for `path` under `root` (on the blocking pool: resolving, opening and
/// `fstat` may all wait on the disk).
fn serve_file(root: &Root, path: &str, head: bool) -> Response<Body> {
    let opened = match &root.dir {
        Some(dir) => files::open_beneath(dir, path),
        None => Err(OpenFailure::Unsupported),
    };
    let file = match opened {
        Ok(file) => file,
        Err(OpenFailure::Refused(_)) => return not_found(),
        // By path, checked against the canonical root (a kernel before 5.6).
        Err(OpenFailure::Unsupported | OpenFailure::WouldBlock) => {
            let Ok(real) = files::resolve(&root.path, path) else {
                return not_found();
            };
            let Ok(file) = File::open(real) else {
                return not_found();
            };
            file
        }
    };
    respond_file(file, path, head, false).unwrap_or_else(|_| not_found())
}

/// The response for an opened `file` (`path` gives its type). With `cached_only` (on the
/// worker), `Err` hands back a regular file whose small body is not in the page cache, and
/// `Err(None)` anything that is not a regular file: the pool looks at those. Without it,
/// `Err` means a 404.
fn respond_file(
    file: File,
    path: &str,
    head: bool,
    cached_only: bool,
) -> Result<Response<Body>, Option<File>> {
    // fstat of an open descriptor: its inode is in memory.
    let Ok(meta) = file.metadata() else {
        return Err(None);
    };
    if !meta.is_file() {
        // A FIFO, a device, a directory: a 404, decided on the pool (a FIFO opened there
        // waits for its writer, and waits only there).
        return Err(None);
    }
    let len = meta.len();
    let body = if head {
        Body::Empty
    } else if len <= SMALL_FILE {
        // Read with the open: a small file costs one trip at most, not two.
        let bytes = if cached_only {
            match files::read_cached(&file, len as usize) {
                Some(bytes) => bytes,
                None => return Err(Some(file)),
            }
        } else {
            let mut body = FileBody { file, left: len };
            match body.next_chunk(len as usize) {
                Ok(piece) => piece.map(Vec::from).unwrap_or_default(),
                Err(_) => return Ok(status_only(StatusCode::INTERNAL_SERVER_ERROR)),
            }
        };
        Body::Bytes(Bytes::from(bytes))
    } else {
        Body::Stream(Box::new(FileBody { file, left: len }))
    };
    Ok(Response::builder()
        .status(StatusCode::OK)
        .header(
            header::CONTENT_TYPE,
            content_type(Path::new(path.split(['?', '#']).next().unwrap_or(""))),
        )
        .header(header::CONTENT_LENGTH, len)
        .body(body)
        .expect("a valid response"))
}

/// A response of `status` alone, with an empty body.
pub(super) fn status_only(status: StatusCode) -> Response<Body> {
    Response::builder()
        .status(status)
        .header(header::CONTENT_LENGTH, 0)
        .body(Body::Empty)
        .expect("a valid response")
}

fn not_found() -> Response<Body> {
    const TEXT: &str = "404 not found\n";
    Response::builder()
        .status(StatusCode::NOT_FOUND)
        .header(header::CONTENT_TYPE, "text/plain; charset=utf-8")
        .header(header::CONTENT_LENGTH, TEXT.len())
        .body(Body::from(TEXT))
        .expect("a valid response")
}

/// The media type for a file name's extension (`application/octet-stream` for the rest).
pub fn content_type(path: &Path) -> &'static str {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    match ext.as_deref() {
        Some("html" | "htm") => "text/html; charset=utf-8",
        Some("txt") => "text/plain; charset=utf-8",
        Some("css") => "text/css",
        Some("js" | "mjs") => "text/javascript",
        Some("json") => "application/json",
        Some("xml") => "application/xml",
        Some("wasm") => "application/wasm",
        Some("pdf") => "application/pdf",
        Some("png") => "image/png",
        Some("jpg" | "jpeg") => "image/jpeg",
        Some("gif") => "image/gif",
        Some("svg") => "image/svg+xml",
        Some("webp") => "image/webp",
        Some("ico") => "image/x-icon",
        Some("mp4") => "video/mp4",
        Some("webm") => "video/webm",
        Some("mp3") => "audio/mpeg",
        Some("woff2") => "font/woff2",
        _ => "application/octet-stream",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn info() -> RequestInfo {
        RequestInfo {
            early_data: false,
            remote: SocketAddr::from(([127, 0, 0, 1], 1)),
            worker: 0,
        }
    }

    fn run(service: &mut FileService, method: Method, path: &str) -> Response<Body> {
        let request = Request::builder()
            .method(method)
            .uri(path)
            .body(())
            .unwrap();
        match service.call(request, &info()) {
            Handled::Respond(r) => r,
            Handled::Blocking(work) => work(),
        }
    }

    #[test]
    fn files_are_served_with_length_and_type_and_nothing_outside_the_root() {
        let root = std::env::temp_dir().join(format!("udpring-h3-svc-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        std::fs::write(root.join("a.html"), b"<p>hi</p>").unwrap();
        let mut service = FileService::new(Some(Arc::from(root.canonicalize().unwrap())));

        let r = run(&mut service, Method::GET, "/a.html");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "9");
        assert_eq!(
            r.headers()[header::CONTENT_TYPE],
            "text/html; charset=utf-8"
        );
        // Small: read with the open.
        assert!(matches!(r.body(), Body::Bytes(b) if b.as_ref() == b"<p>hi</p>"));
        // Larger: streamed in pieces, ended at its length without a read.
        std::fs::write(root.join("b.bin"), vec![1u8; 100_000]).unwrap();
        let r = run(&mut service, Method::GET, "/b.bin");
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "100000");
        let Body::Stream(mut source) = r.into_body() else {
            panic!("streamed")
        };
        assert_eq!(source.next_chunk(65_536).unwrap().unwrap().len(), 65_536);
        assert_eq!(source.next_chunk(65_536).unwrap().unwrap().len(), 34_464);
        assert!(source.next_chunk(65_536).unwrap().is_none());

        let r = run(&mut service, Method::HEAD, "/a.html");
        assert_eq!(r.status(), StatusCode::OK);
        assert_eq!(r.headers()[header::CONTENT_LENGTH], "9");
        assert!(matches!(r.body(), Body::Empty));

        for missing in ["/nope", "/../etc/passwd", "/"] {
            assert_eq!(
                run(&mut service, Method::GET, missing).status(),
                404,
                "{missing}"
            );
        }
        let r = run(&mut service, Method::POST, "/a.html");
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED);
        assert_eq!(r.headers()[header::ALLOW], "GET, HEAD");
        let _ = std::fs::remove_dir_all(root);
    }

    /// A cached file is answered on the worker (no pool job), a FIFO goes to the pool, and a
    /// file evicted from the page cache is answered whole on whichever side could read it.
    #[test]
    fn only_what_would_wait_goes_to_the_pool() {
        let root = std::env::temp_dir().join(format!("udpring-h3-fast-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let root = root.canonicalize().unwrap();
        std::fs::write(root.join("warm.txt"), b"warm").unwrap();
        let fifo = std::ffi::CString::new(root.join("fifo").into_os_string().into_encoded_bytes())
            .unwrap();
        // SAFETY: a NUL-terminated path and a mode.
        assert_eq!(unsafe { libc::mkfifo(fifo.as_ptr(), 0o600) }, 0);
        let mut service = FileService::new(Some(Arc::from(root.clone())));
        let call = |service: &mut FileService, path: &str| {
            let request = Request::get(path).body(()).unwrap();
            service.call(request, &info())
        };
        // Read once so its path and bytes are cached, then answered at once.
        let _ = std::fs::read(root.join("warm.txt")).unwrap();
        assert!(
            matches!(call(&mut service, "/warm.txt"), Handled::Respond(r) if r.status() == 200)
        );
        // Outside the root: 404, on the worker or (a `..` the cached lookup will not take)
        // on the pool.
        let outside = match call(&mut service, "/../x") {
            Handled::Respond(r) => r,
            Handled::Blocking(work) => work(),
        };
        assert_eq!(outside.status(), 404);
        assert!(matches!(call(&mut service, "/fifo"), Handled::Blocking(_)));

        // Evicted from the page cache (clean pages, POSIX_FADV_DONTNEED). The worker's read
        // (RWF_NOWAIT) cannot wait for the disk: it starts readahead and gives up, and the
        // pool reads the file. A virtio read served from the host's cache can complete
        // before the kernel looks again, and then the worker answers with what is there.
        // Either way the answer is whole, and the worker never waited.
        let cold = root.join("cold.txt");
        std::fs::write(&cold, vec![5u8; 5000]).unwrap();
        let file = File::open(&cold).unwrap();
        file.sync_all().unwrap();
        // SAFETY: statfs(2) with a NUL-terminated path and a zeroed struct to fill.
        let mut fs: libc::statfs = unsafe { std::mem::zeroed() };
        let c_root = std::ffi::CString::new(root.as_os_str().as_encoded_bytes()).unwrap();
        // SAFETY: as above.
        assert_eq!(unsafe { libc::statfs(c_root.as_ptr(), &mut fs) }, 0);
        // tmpfs keeps every page. Elsewhere DONTNEED may leave a page that sits in a per-CPU
        // LRU batch, so it is asked until mincore(2) says the page is out (mincore reads no
        // page in, unlike a RWF_NOWAIT probe, which starts readahead).
        if fs.f_type == libc::TMPFS_MAGIC || !evict(&file, Duration::from_secs(5)) {
            eprintln!("{}: its pages stay cached (tmpfs?)", root.display());
        }
        let response = match call(&mut service, "/cold.txt") {
            Handled::Blocking(work) => work(),
            Handled::Respond(r) => r,
        };
        assert_eq!(response.headers()[header::CONTENT_LENGTH], "5000");
        assert!(
            matches!(response.body(), Body::Bytes(b) if b.len() == 5000 && b.iter().all(|&x| x == 5))
        );
        let _ = std::fs::remove_dir_all(root);
    }

    /// Drops `file`'s first page from the page cache, asking again until mincore(2) says
    /// it is out or `limit` passes.
    fn evict(file: &File, limit: Duration) -> bool {
        use std::os::fd::AsRawFd;
        let deadline = std::time::Instant::now() + limit;
        loop {
            // SAFETY: fadvise(2) on an open descriptor.
            unsafe { libc::posix_fadvise(file.as_raw_fd(), 0, 0, libc::POSIX_FADV_DONTNEED) };
            // SAFETY: a shared read-only mapping of the file's first page, unmapped below.
            let map = unsafe {
                libc::mmap(
                    std::ptr::null_mut(),
                    4096,
                    libc::PROT_READ,
                    libc::MAP_SHARED,
                    file.as_raw_fd(),
                    0,
                )
            };
            assert_ne!(map, libc::MAP_FAILED);
            let mut resident = 0u8;
            // SAFETY: `map` is a mapping of one page; `resident` holds its one entry.
            let ok = unsafe { libc::mincore(map, 4096, &mut resident) } == 0;
            // SAFETY: the mapping made above, used no more.
            unsafe { libc::munmap(map, 4096) };
            if ok && resident & 1 == 0 {
                return true;
            }
            if std::time::Instant::now() > deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    #[test]
    fn a_file_body_is_read_in_pieces_to_its_end() {
        let path = std::env::temp_dir().join(format!("udpring-h3-body-{}", std::process::id()));
        std::fs::write(&path, vec![7u8; 10]).unwrap();
        let mut file = File::open(&path).unwrap();
        assert_eq!(file.next_chunk(4).unwrap().unwrap().len(), 4);
        assert_eq!(file.next_chunk(4).unwrap().unwrap().len(), 4);
        assert_eq!(file.next_chunk(4).unwrap().unwrap().len(), 2);
        assert!(file.next_chunk(4).unwrap().is_none());
        let _ = std::fs::remove_file(path);
    }
}
