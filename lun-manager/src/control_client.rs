//! A small synchronous client for a gateway's control API (HTTP/1.1 + JSON
//! over a unix socket, see docs/control-api.md): what `lunctl` uses when a
//! gateway holds the LUN it was asked to change.
//!
//! Each call opens one connection and runs hyper on a current-thread tokio
//! runtime the client owns; callers see plain blocking functions. Error
//! responses (`{"error": "..."}` with a 4xx/5xx status) become
//! [`Error::Status`] carrying the gateway's message.

use std::path::{Path, PathBuf};

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    #[error("control socket {socket}: {source}")]
    Connect {
        socket: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("control socket {socket}: {method} {path}: {why}")]
    Http {
        socket: PathBuf,
        method: String,
        path: String,
        why: String,
    },
    /// The gateway answered with an error status.
    #[error("gateway refused {method} {path} (HTTP {status}): {message}")]
    Status {
        method: String,
        path: String,
        status: u16,
        message: String,
    },
    #[error("gateway answered {method} {path} with unexpected JSON: {why}")]
    Json {
        method: String,
        path: String,
        why: String,
    },
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

/// A response with a success status.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub body: Vec<u8>,
}

pub struct Client {
    socket: PathBuf,
    rt: tokio::runtime::Runtime,
}

impl Client {
    pub fn new(socket: &Path) -> Result<Client> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .build()
            .map_err(|source| Error::Connect {
                socket: socket.to_path_buf(),
                source,
            })?;
        Ok(Client {
            socket: socket.to_path_buf(),
            rt,
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Send one request; `Err(Status)` for a 4xx/5xx answer.
    pub fn request(
        &self,
        method: Method,
        path: &str,
        content_type: &str,
        body: Vec<u8>,
    ) -> Result<Response> {
        let http = |why: String| Error::Http {
            socket: self.socket.clone(),
            method: method.to_string(),
            path: path.to_string(),
            why,
        };
        let (status, bytes) = self.rt.block_on(async {
            let stream = tokio::net::UnixStream::connect(&self.socket)
                .await
                .map_err(|source| Error::Connect {
                    socket: self.socket.clone(),
                    source,
                })?;
            let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
                .await
                .map_err(|e| http(e.to_string()))?;
            let conn = tokio::spawn(conn);
            let mut req = Request::builder()
                .method(method.clone())
                .uri(path)
                .header(hyper::header::HOST, "lungate");
            if !body.is_empty() {
                req = req.header(hyper::header::CONTENT_TYPE, content_type);
            }
            let req = req
                .body(Full::new(Bytes::from(body)))
                .map_err(|e| http(e.to_string()))?;
            let resp = sender
                .send_request(req)
                .await
                .map_err(|e| http(e.to_string()))?;
            let status = resp.status().as_u16();
            let bytes = resp
                .into_body()
                .collect()
                .await
                .map_err(|e| http(e.to_string()))?
                .to_bytes();
            drop(sender);
            let _ = conn.await;
            Ok::<_, Error>((status, bytes))
        })?;
        if status >= 400 {
            let message = serde_json::from_slice::<serde_json::Value>(&bytes)
                .ok()
                .and_then(|v| v["error"].as_str().map(str::to_string))
                .unwrap_or_else(|| String::from_utf8_lossy(&bytes).trim().to_string());
            return Err(Error::Status {
                method: method.to_string(),
                path: path.to_string(),
                status,
                message,
            });
        }
        Ok(Response {
            status,
            body: bytes.to_vec(),
        })
    }

    fn json<T: DeserializeOwned>(&self, method: Method, path: &str, body: Vec<u8>) -> Result<T> {
        let r = self.request(method.clone(), path, "application/json", body)?;
        let b = if r.body.is_empty() {
            b"null"
        } else {
            &r.body[..]
        };
        serde_json::from_slice(b).map_err(|e| Error::Json {
            method: method.to_string(),
            path: path.to_string(),
            why: e.to_string(),
        })
    }

    pub fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(Method::GET, path, Vec::new())
    }

    pub fn post<T: DeserializeOwned>(&self, path: &str, body: &serde_json::Value) -> Result<T> {
        self.json(
            Method::POST,
            path,
            serde_json::to_vec(body).expect("json serialises"),
        )
    }

    pub fn delete<T: DeserializeOwned>(&self, path: &str) -> Result<T> {
        self.json(Method::DELETE, path, Vec::new())
    }

    /// GET raw bytes (a diff file).
    pub fn get_bytes(&self, path: &str) -> Result<Vec<u8>> {
        Ok(self
            .request(Method::GET, path, "application/json", Vec::new())?
            .body)
    }

    /// POST raw bytes (a diff file to apply).
    pub fn post_bytes<T: DeserializeOwned>(&self, path: &str, body: Vec<u8>) -> Result<T> {
        let r = self.request(Method::POST, path, "application/octet-stream", body)?;
        let b = if r.body.is_empty() {
            b"null"
        } else {
            &r.body[..]
        };
        serde_json::from_slice(b).map_err(|e| Error::Json {
            method: "POST".into(),
            path: path.to_string(),
            why: e.to_string(),
        })
    }
}

/// Percent-encode one path segment or query value (LUN and snapshot names
/// may hold any character but control characters).
pub fn encode(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                o.push(b as char)
            }
            _ => o.push_str(&format!("%{b:02X}")),
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Read, Write};
    use std::os::unix::net::UnixListener;

    /// Serve `n` requests: echo method, path and body length as JSON, or a
    /// 404 error body for paths under /missing.
    fn server(sock: &Path, n: usize) -> std::thread::JoinHandle<()> {
        let l = UnixListener::bind(sock).unwrap();
        std::thread::spawn(move || {
            for _ in 0..n {
                let (s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s.try_clone().unwrap());
                let mut line = String::new();
                r.read_line(&mut line).unwrap();
                let mut parts = line.split_whitespace();
                let method = parts.next().unwrap().to_string();
                let path = parts.next().unwrap().to_string();
                let mut len = 0usize;
                loop {
                    let mut h = String::new();
                    r.read_line(&mut h).unwrap();
                    if h == "\r\n" {
                        break;
                    }
                    if let Some((k, v)) = h.split_once(':') {
                        if k.eq_ignore_ascii_case("content-length") {
                            len = v.trim().parse().unwrap();
                        }
                    }
                }
                let mut body = vec![0u8; len];
                r.read_exact(&mut body).unwrap();
                let (status, out) = if path.starts_with("/missing") {
                    (
                        "404 Not Found",
                        r#"{"error":"no snapshot named \"x\""}"#.to_string(),
                    )
                } else {
                    (
                        "200 OK",
                        serde_json::json!({"method": method, "path": path, "len": len, "first": body.first()})
                            .to_string(),
                    )
                };
                let mut s = s;
                write!(
                    s,
                    "HTTP/1.1 {status}\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{out}",
                    out.len()
                )
                .unwrap();
            }
        })
    }

    #[test]
    fn requests_and_error_bodies_round_trip_over_a_unix_socket() {
        let d = tempfile::tempdir().unwrap();
        let sock = d.path().join("ctl.sock");
        let t = server(&sock, 5);
        let c = Client::new(&sock).unwrap();
        let v: serde_json::Value = c.get("/v1/luns/web/snapshots").unwrap();
        assert_eq!(v["method"], "GET");
        assert_eq!(v["path"], "/v1/luns/web/snapshots");
        let v: serde_json::Value = c
            .post("/v1/luns/web/snapshots", &serde_json::json!({"name": "s1"}))
            .unwrap();
        assert_eq!(v["method"], "POST");
        assert_eq!(v["len"], r#"{"name":"s1"}"#.len());
        let v: serde_json::Value = c.delete("/v1/luns/web/snapshots/s1").unwrap();
        assert_eq!(v["method"], "DELETE");
        let v: serde_json::Value = c
            .post_bytes("/v1/luns/web/apply-diff", vec![7u8; 100_000])
            .unwrap();
        assert_eq!(
            (v["len"].as_u64(), v["first"].as_u64()),
            (Some(100_000), Some(7))
        );
        let e = c.get::<serde_json::Value>("/missing").unwrap_err();
        match &e {
            Error::Status {
                status, message, ..
            } => assert_eq!(
                (*status, message.as_str()),
                (404, "no snapshot named \"x\"")
            ),
            other => panic!("{other}"),
        }
        t.join().unwrap();
        // Nobody listening: a clear connect error naming the socket.
        let e = c.get::<serde_json::Value>("/v1/luns").unwrap_err();
        assert!(e.to_string().contains("ctl.sock"), "{e}");
    }

    #[test]
    fn names_are_percent_encoded() {
        assert_eq!(encode("snap 1/x"), "snap%201%2Fx");
        assert_eq!(encode("a-b_c.d~"), "a-b_c.d~");
    }
}
