//! Just enough HTTP/1.1 for a proxy: find where a message ends, keep its bytes as they came.

use std::io;

use bytes::Bytes;
use http::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncRead, AsyncReadExt};

const MAX_HEADERS: usize = 100;

/// One message, its raw bytes and what the proxy needs to know about it.
#[derive(Debug, Clone)]
pub(crate) struct Message {
    /// Exactly the bytes received.
    pub raw: Vec<u8>,
    /// Request method (requests only).
    pub method: String,
    /// Request target (requests only).
    pub path: String,
    /// Response status (responses only).
    pub status: u16,
    pub headers: HeaderMap,
    /// The body, de-chunked.
    pub body: Bytes,
    /// The sender asked to close the connection after this message.
    pub close: bool,
}

enum Framing {
    Length(usize),
    Chunked,
    UntilClose,
}

/// Reads one request. `Ok(None)` when the peer closed before sending a byte of it.
pub(crate) async fn read_request<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
) -> io::Result<Option<Message>> {
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut req = httparse::Request::new(&mut headers);
            if let httparse::Status::Complete(head_len) = req.parse(buf).map_err(invalid)? {
                let method = req.method.unwrap_or_default().to_owned();
                let path = req.path.unwrap_or_default().to_owned();
                let map = header_map(req.headers)?;
                let framing = framing(&map).unwrap_or(Framing::Length(0));
                let mut message = read_body(stream, buf, head_len, map, framing).await?;
                message.method = method;
                message.path = path;
                return Ok(Some(message));
            }
        }
        if fill(stream, buf).await? == 0 {
            return if buf.is_empty() { Ok(None) } else { Err(io::ErrorKind::UnexpectedEof.into()) };
        }
    }
}

/// Reads one response to a request made with `method`.
pub(crate) async fn read_response<S: AsyncRead + Unpin>(stream: &mut S, method: &str) -> io::Result<Message> {
    let mut buf = Vec::new();
    loop {
        if !buf.is_empty() {
            let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
            let mut res = httparse::Response::new(&mut headers);
            if let httparse::Status::Complete(head_len) = res.parse(&buf).map_err(invalid)? {
                let status = res.code.unwrap_or_default();
                let map = header_map(res.headers)?;
                let bodiless = method == "HEAD" || status < 200 || status == 204 || status == 304;
                let framing = if bodiless { Framing::Length(0) } else { framing(&map).unwrap_or(Framing::UntilClose) };
                let mut message = read_body(stream, &mut buf, head_len, map, framing).await?;
                message.status = status;
                return Ok(message);
            }
        }
        if fill(stream, &mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
}

fn invalid(e: httparse::Error) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e)
}

async fn fill<S: AsyncRead + Unpin>(stream: &mut S, buf: &mut Vec<u8>) -> io::Result<usize> {
    let mut chunk = [0u8; 8192];
    let n = stream.read(&mut chunk).await?;
    buf.extend_from_slice(&chunk[..n]);
    Ok(n)
}

fn header_map(headers: &[httparse::Header<'_>]) -> io::Result<HeaderMap> {
    let mut map = HeaderMap::new();
    for h in headers {
        let name =
            HeaderName::from_bytes(h.name.as_bytes()).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        let value = HeaderValue::from_bytes(h.value).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
        map.append(name, value);
    }
    Ok(map)
}

fn framing(headers: &HeaderMap) -> Option<Framing> {
    let chunked = headers
        .get_all(http::header::TRANSFER_ENCODING)
        .iter()
        .any(|v| v.to_str().is_ok_and(|s| s.to_ascii_lowercase().contains("chunked")));
    if chunked {
        return Some(Framing::Chunked);
    }
    let length = headers.get(http::header::CONTENT_LENGTH)?.to_str().ok()?.trim().parse().ok()?;
    Some(Framing::Length(length))
}

async fn read_body<S: AsyncRead + Unpin>(
    stream: &mut S,
    buf: &mut Vec<u8>,
    head_len: usize,
    headers: HeaderMap,
    framing: Framing,
) -> io::Result<Message> {
    let (total, body) = loop {
        let available = &buf[head_len..];
        let done = match framing {
            Framing::Length(n) => {
                (available.len() >= n).then(|| (head_len + n, Bytes::copy_from_slice(&available[..n])))
            }
            Framing::Chunked => dechunk(available).map(|(len, body)| (head_len + len, body)),
            Framing::UntilClose => None,
        };
        if let Some(done) = done {
            break done;
        }
        if fill(stream, buf).await? == 0 {
            match framing {
                Framing::UntilClose => break (buf.len(), Bytes::copy_from_slice(&buf[head_len..])),
                _ => return Err(io::ErrorKind::UnexpectedEof.into()),
            }
        }
    };
    let close = headers
        .get(http::header::CONNECTION)
        .is_some_and(|v| v.to_str().is_ok_and(|s| s.eq_ignore_ascii_case("close")))
        || matches!(framing, Framing::UntilClose);
    let raw: Vec<u8> = buf.drain(..total).collect();
    Ok(Message { raw, method: String::new(), path: String::new(), status: 0, headers, body, close })
}

/// If `data` starts with a complete chunked body, its length in bytes and its content.
fn dechunk(data: &[u8]) -> Option<(usize, Bytes)> {
    let mut pos = 0;
    let mut body = Vec::new();
    loop {
        let line_end = pos + data[pos..].windows(2).position(|w| w == b"\r\n")?;
        let size_text = std::str::from_utf8(&data[pos..line_end]).ok()?;
        let size = usize::from_str_radix(size_text.split(';').next()?.trim(), 16).ok()?;
        pos = line_end + 2;
        if size == 0 {
            // Trailers, then an empty line.
            loop {
                let end = pos + data[pos..].windows(2).position(|w| w == b"\r\n")?;
                if end == pos {
                    return Some((pos + 2, Bytes::from(body)));
                }
                pos = end + 2;
            }
        }
        if data.len() < pos + size + 2 {
            return None;
        }
        body.extend_from_slice(&data[pos..pos + size]);
        pos += size + 2;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dechunks_complete_bodies_only() {
        let body = b"4\r\nWiki\r\n5;ext=1\r\npedia\r\n0\r\n\r\n";
        assert_eq!(dechunk(body), Some((body.len(), Bytes::from_static(b"Wikipedia"))));
        assert_eq!(dechunk(&body[..body.len() - 1]), None);
        assert_eq!(dechunk(b"4\r\nWi"), None);
    }

    #[tokio::test]
    async fn reads_pipelined_requests_and_keeps_bytes() {
        let wire =
            b"POST /cvms HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n\r\n{}GET /cvms HTTP/1.1\r\nhost: x\r\n\r\n"
                .to_vec();
        let mut stream = &wire[..];
        let mut buf = Vec::new();
        let first = read_request(&mut stream, &mut buf).await.unwrap().unwrap();
        assert_eq!((first.method.as_str(), first.path.as_str(), &first.body[..]), ("POST", "/cvms", &b"{}"[..]));
        assert!(first.raw.ends_with(b"\r\n\r\n{}"));
        let second = read_request(&mut stream, &mut buf).await.unwrap().unwrap();
        assert_eq!(second.method, "GET");
        assert!(read_request(&mut stream, &mut buf).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn reads_responses_by_length_and_until_close() {
        let wire = b"HTTP/1.1 201 Created\r\ncontent-length: 3\r\n\r\nabc".to_vec();
        let message = read_response(&mut &wire[..], "POST").await.unwrap();
        assert_eq!((message.status, &message.body[..]), (201, &b"abc"[..]));
        let wire = b"HTTP/1.1 200 OK\r\n\r\nuntil close".to_vec();
        let message = read_response(&mut &wire[..], "GET").await.unwrap();
        assert_eq!(&message.body[..], b"until close");
        assert!(message.close);
        let wire = b"HTTP/1.1 204 No Content\r\n\r\n".to_vec();
        assert_eq!(read_response(&mut &wire[..], "DELETE").await.unwrap().status, 204);
    }
}
