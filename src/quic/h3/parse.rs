//! HTTP/3 framing and message checks, apart from any connection: a request stream's frames
//! into a field section (RFC 9114 section 7), a control stream's frames (SETTINGS first), and
//! a field section into an [`http::Request`] (section 4.3.1). Pure functions of their input,
//! so the unit tests below feed them every split and every malformed case.

use http::{header, Method, Request};

use super::frame::{self, code};
use super::qpack;

/// The largest frame kept whole on a control stream (SETTINGS, GOAWAY and the like are a few
/// bytes; this bounds what a peer can make us hold).
const MAX_CONTROL_FRAME: u64 = 16 * 1024;

/// Headers HTTP/3 forbids (RFC 9114 section 4.2): never sent, malformed when received.
pub(super) fn connection_specific(name: &header::HeaderName) -> bool {
    matches!(
        name.as_str(),
        "connection" | "keep-alive" | "proxy-connection" | "transfer-encoding" | "upgrade"
    )
}

#[derive(Debug, PartialEq, Eq)]
pub(super) enum H3Error {
    Stream(u32),
    Connection(u32, &'static str),
}

/// A request stream's frames as they arrive: a partial frame kept, DATA and unknown frames
/// discarded as they pass, the HEADERS frame gathered whole.
#[derive(Debug, Default)]
pub(super) struct RequestFrames {
    /// Unparsed frame bytes (a partial frame header, or a HEADERS frame being gathered).
    buf: Vec<u8>,
    /// Payload bytes of the current frame still to discard (DATA, unknown frames).
    skip: u64,
    /// The request's HEADERS came (and the request went to the service).
    pub headed: bool,
}

impl RequestFrames {
    /// Parses the frames of the stream from `data` onward; the request's field section when
    /// its HEADERS frame is complete.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<Option<qpack::Fields>, H3Error> {
        let mut fields = None;
        loop {
            if self.skip > 0 {
                let n = (self.skip.min(data.len() as u64)) as usize;
                self.skip -= n as u64;
                data = &data[n..];
                if self.skip > 0 {
                    return Ok(fields);
                }
            }
            self.buf.extend_from_slice(data);
            data = &[];
            let Some(h) = frame::header(&self.buf) else {
                if self.buf.len() > 16 {
                    return Err(H3Error::Stream(code::FRAME_ERROR));
                }
                return Ok(fields);
            };
            match h.kind {
                frame::HEADERS => {
                    if h.len > qpack::MAX_FIELD_SECTION as u64 {
                        return Err(H3Error::Stream(code::EXCESSIVE_LOAD));
                    }
                    let end = h.header_len + h.len as usize;
                    if self.buf.len() < end {
                        return Ok(fields);
                    }
                    if !self.headed {
                        self.headed = true;
                        let section = qpack::decode(&self.buf[h.header_len..end]).map_err(|e| {
                            H3Error::Stream(match e {
                                qpack::QpackError::Malformed => code::QPACK_DECOMPRESSION_FAILED,
                                qpack::QpackError::TooLarge => code::EXCESSIVE_LOAD,
                            })
                        })?;
                        fields = Some(section);
                    }
                    // A second HEADERS is the trailers: nothing a GET needs.
                    self.buf.drain(..end);
                }
                frame::DATA if !self.headed => {
                    return Err(H3Error::Connection(
                        code::FRAME_UNEXPECTED,
                        "DATA before HEADERS",
                    ));
                }
                kind if kind == frame::SETTINGS
                    || kind == frame::GOAWAY
                    || kind == frame::MAX_PUSH_ID
                    || kind == frame::CANCEL_PUSH
                    || kind == frame::PUSH_PROMISE
                    || frame::reserved_http2(kind) =>
                {
                    return Err(H3Error::Connection(
                        code::FRAME_UNEXPECTED,
                        "a control frame on a request stream",
                    ));
                }
                _ => {
                    // DATA of the request body, or an unknown frame: discarded, what has not
                    // come yet as it comes.
                    let have = (self.buf.len() - h.header_len) as u64;
                    let take = have.min(h.len) as usize;
                    self.buf.drain(..h.header_len + take);
                    self.skip = h.len - take as u64;
                    if self.skip > 0 {
                        return Ok(fields);
                    }
                }
            }
            if self.buf.is_empty() && data.is_empty() {
                return Ok(fields);
            }
        }
    }
}

/// Parses a control stream's frames in `buf`, keeping an incomplete one.
pub(super) fn control_frames(
    buf: &mut Vec<u8>,
    settings: &mut bool,
) -> Result<(), (u32, &'static str)> {
    loop {
        let Some(h) = frame::header(buf) else {
            if buf.len() > 16 {
                return Err((code::FRAME_ERROR, "bad frame header"));
            }
            return Ok(());
        };
        if h.len > MAX_CONTROL_FRAME {
            return Err((code::EXCESSIVE_LOAD, "control frame too large"));
        }
        let end = h.header_len + h.len as usize;
        if buf.len() < end {
            return Ok(());
        }
        let payload = &buf[h.header_len..end];
        match h.kind {
            frame::SETTINGS if !*settings => {
                frame::check_settings(payload).map_err(|e| (e, "bad SETTINGS"))?;
                *settings = true;
            }
            _ if !*settings => {
                return Err((
                    code::MISSING_SETTINGS,
                    "control stream without SETTINGS first",
                ))
            }
            frame::SETTINGS | frame::DATA | frame::HEADERS | frame::PUSH_PROMISE => {
                return Err((
                    code::FRAME_UNEXPECTED,
                    "frame not allowed on the control stream",
                ));
            }
            kind if frame::reserved_http2(kind) => {
                return Err((code::FRAME_UNEXPECTED, "HTTP/2 frame on the control stream"));
            }
            // GOAWAY, MAX_PUSH_ID, CANCEL_PUSH (nothing is pushed), unknown: nothing to do.
            _ => {}
        }
        buf.drain(..end);
    }
}

/// An [`http::Request`] from a request's field section (RFC 9114 section 4.3.1), or `Err`
/// for a malformed one.
pub(super) fn build_request(fields: qpack::Fields) -> Result<Request<()>, ()> {
    let mut method = None;
    let mut scheme = None;
    let mut authority = None;
    let mut path = None;
    let mut builder = Request::builder().version(http::Version::HTTP_3);
    let mut regular = false;
    for (name, value) in fields {
        if let Some(pseudo) = name.strip_prefix(b":") {
            if regular {
                return Err(());
            }
            let slot = match pseudo {
                b"method" => &mut method,
                b"scheme" => &mut scheme,
                b"authority" => &mut authority,
                b"path" => &mut path,
                _ => return Err(()),
            };
            if slot.replace(value).is_some() {
                return Err(());
            }
            continue;
        }
        regular = true;
        if name.iter().any(u8::is_ascii_uppercase) {
            return Err(());
        }
        let name = header::HeaderName::from_bytes(&name).map_err(|_| ())?;
        if connection_specific(&name) || (name == header::TE && value != b"trailers") {
            return Err(());
        }
        let value = header::HeaderValue::from_bytes(&value).map_err(|_| ())?;
        builder = builder.header(name, value);
    }
    let method = Method::from_bytes(&method.ok_or(())?).map_err(|_| ())?;
    let uri = if method == Method::CONNECT {
        if scheme.is_some() || path.is_some() {
            return Err(());
        }
        http::Uri::builder().authority(authority.ok_or(())?).build()
    } else {
        let (Some(scheme), Some(path)) = (scheme, path) else {
            return Err(());
        };
        if path.is_empty() {
            return Err(());
        }
        let mut uri = http::Uri::builder()
            .scheme(scheme.as_slice())
            .path_and_query(path);
        if let Some(authority) = authority {
            uri = uri.authority(authority);
        }
        uri.build()
    }
    .map_err(|_| ())?;
    builder.method(method).uri(uri).body(()).map_err(|_| ())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn section(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut s = Vec::new();
        qpack::encode(fields, &mut s);
        s
    }

    fn headers_frame(fields: &[(&[u8], &[u8])]) -> Vec<u8> {
        let s = section(fields);
        let mut f = Vec::new();
        frame::put_header(&mut f, frame::HEADERS, s.len() as u64);
        f.extend_from_slice(&s);
        f
    }

    const GET: &[(&[u8], &[u8])] = &[
        (b":method", b"GET"),
        (b":scheme", b"https"),
        (b":authority", b"example.com"),
        (b":path", b"/a.txt?x=1"),
        (b"user-agent", b"t"),
    ];

    #[test]
    fn a_request_is_read_across_any_split_and_its_body_discarded() {
        let mut bytes = headers_frame(GET);
        let mut data = Vec::new();
        frame::put_header(&mut data, frame::DATA, 5);
        data.extend_from_slice(b"hello");
        bytes.extend_from_slice(&data);
        // An unknown (greased) frame type after it.
        frame::put_header(&mut bytes, 0x21, 2);
        bytes.extend_from_slice(b"zz");
        for split in 1..bytes.len() {
            let mut stream = RequestFrames::default();
            let mut got = stream.feed(&bytes[..split]).unwrap();
            let more = stream.feed(&bytes[split..]).unwrap();
            assert!(got.is_none() || more.is_none(), "one request only");
            got = got.or(more);
            let request = build_request(got.expect("the request")).unwrap();
            assert_eq!(request.method(), Method::GET);
            assert_eq!(request.uri().path(), "/a.txt");
            assert_eq!(request.uri().query(), Some("x=1"));
            assert_eq!(request.uri().host(), Some("example.com"));
            assert_eq!(request.headers()["user-agent"], "t");
            assert!(stream.buf.is_empty() && stream.skip == 0, "split {split}");
        }
    }

    #[test]
    fn malformed_requests_are_stream_errors_and_misplaced_frames_connection_errors() {
        for bad in [
            // No :path.
            &[
                (b":method".as_slice(), b"GET".as_slice()),
                (b":scheme", b"https"),
            ][..],
            // A pseudo-header after a regular one.
            &[
                (b":method", b"GET"),
                (b"a", b"b"),
                (b":scheme", b"https"),
                (b":path", b"/"),
            ],
            // Twice :method.
            &[
                (b":method", b"GET"),
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":path", b"/"),
            ],
            // An unknown pseudo-header, a response one.
            &[
                (b":method", b"GET"),
                (b":status", b"200"),
                (b":scheme", b"https"),
                (b":path", b"/"),
            ],
            // Connection-specific and uppercase headers.
            &[
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":path", b"/"),
                (b"connection", b"x"),
            ],
            &[
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":path", b"/"),
                (b"Host", b"x"),
            ],
            &[
                (b":method", b"GET"),
                (b":scheme", b"https"),
                (b":path", b"/"),
                (b"te", b"gzip"),
            ],
        ] {
            let mut stream = RequestFrames::default();
            let fields = stream.feed(&headers_frame(bad)).unwrap().unwrap();
            assert!(build_request(fields).is_err(), "{bad:?}");
        }
        // DATA first, SETTINGS or an HTTP/2 frame on a request stream.
        for kind in [frame::DATA, frame::SETTINGS, 0x2] {
            let mut f = Vec::new();
            frame::put_header(&mut f, kind, 0);
            let e = RequestFrames::default().feed(&f).unwrap_err();
            assert_eq!(
                e,
                H3Error::Connection(
                    code::FRAME_UNEXPECTED,
                    match kind {
                        frame::DATA => "DATA before HEADERS",
                        _ => "a control frame on a request stream",
                    }
                )
            );
        }
        // A HEADERS frame above the field section limit, and garbage QPACK.
        let mut f = Vec::new();
        frame::put_header(&mut f, frame::HEADERS, qpack::MAX_FIELD_SECTION as u64 + 1);
        assert_eq!(
            RequestFrames::default().feed(&f),
            Err(H3Error::Stream(code::EXCESSIVE_LOAD))
        );
        let mut f = Vec::new();
        frame::put_header(&mut f, frame::HEADERS, 2);
        f.extend_from_slice(&[0x05, 0x00]);
        assert_eq!(
            RequestFrames::default().feed(&f),
            Err(H3Error::Stream(code::QPACK_DECOMPRESSION_FAILED))
        );
    }

    #[test]
    fn the_control_stream_starts_with_settings() {
        let mut settings_frame = Vec::new();
        frame::server_settings(&mut settings_frame);
        let mut buf = settings_frame.clone();
        let mut goaway = Vec::new();
        frame::put_header(&mut goaway, frame::GOAWAY, 1);
        goaway.push(0);
        buf.extend_from_slice(&goaway[..2]);
        let mut seen = false;
        assert!(control_frames(&mut buf, &mut seen).is_ok());
        assert!(seen);
        buf.extend_from_slice(&goaway[2..]);
        assert!(control_frames(&mut buf, &mut seen).is_ok());
        assert!(buf.is_empty());
        // A second SETTINGS, a HEADERS.
        let mut again = settings_frame.clone();
        assert_eq!(
            control_frames(&mut again, &mut seen).unwrap_err().0,
            code::FRAME_UNEXPECTED
        );
        // Anything before SETTINGS.
        let mut buf = goaway.clone();
        assert_eq!(
            control_frames(&mut buf, &mut false).unwrap_err().0,
            code::MISSING_SETTINGS
        );
    }
}
