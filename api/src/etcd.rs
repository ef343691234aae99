//! etcd as lungate's gateways use it (docs/scale-out.md): a small client
//! of etcd's v3 HTTP/JSON gateway (grpc-gateway: POST `/v3/...` with JSON
//! bodies, keys and values base64; the handful of calls needed do not
//! justify a gRPC stack), and the key names. The gateway's coordinator
//! and `lunctl` (which looks a LUN's owner up) share both.

use std::path::Path;
use std::time::Duration;

use base64::engine::general_purpose::STANDARD as B64;
use base64::Engine as _;
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// How long one etcd call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(5);
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd {addr}: {op}: {source}")]
    Io {
        addr: String,
        op: String,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd {addr}: {op}: {why}")]
    Reply {
        addr: String,
        op: String,
        why: String,
    },
}

/// A client of etcd's v3 JSON gateway at `HOST:PORT`.
#[derive(Debug, Clone)]
pub struct Etcd {
    addr: String,
}

fn b64(s: &str) -> String {
    B64.encode(s.as_bytes())
}

fn unb64(v: &Value) -> Option<String> {
    B64.decode(v.as_str()?)
        .ok()
        .and_then(|b| String::from_utf8(b).ok())
}

/// An int64 of a JSON reply (grpc-gateway writes them as strings).
fn int(v: &Value) -> Option<i64> {
    v.as_i64().or_else(|| v.as_str()?.parse().ok())
}

/// Decode an HTTP/1.1 `Transfer-Encoding: chunked` body.
fn dechunk(mut b: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    loop {
        let eol = b.windows(2).position(|w| w == b"\r\n")?;
        let size = std::str::from_utf8(&b[..eol]).ok()?;
        let size = usize::from_str_radix(size.split(';').next()?.trim(), 16).ok()?;
        b = &b[eol + 2..];
        if size == 0 {
            return Some(out);
        }
        out.extend_from_slice(b.get(..size)?);
        b = b.get(size + 2..)?;
    }
}

impl Etcd {
    pub fn new(addr: &str) -> Etcd {
        Etcd { addr: addr.into() }
    }

    /// POST `path` with a JSON body; the JSON reply of a 200.
    pub async fn call(&self, path: &str, body: Value) -> Result<Value, EtcdError> {
        let io = |op: &str| {
            let (addr, op) = (self.addr.clone(), format!("{op} {path}"));
            move |source| EtcdError::Io { addr, op, source }
        };
        let reply = |why: String| EtcdError::Reply {
            addr: self.addr.clone(),
            op: path.into(),
            why,
        };
        let body = body.to_string();
        let req = format!(
            "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
            self.addr,
            body.len()
        );
        let exchange = async {
            let mut s = tokio::net::TcpStream::connect(&self.addr)
                .await
                .map_err(io("connect"))?;
            s.write_all(req.as_bytes()).await.map_err(io("send"))?;
            let mut buf = Vec::new();
            s.read_to_end(&mut buf).await.map_err(io("receive"))?;
            Ok::<_, EtcdError>(buf)
        };
        let buf = tokio::time::timeout(CALL_TIMEOUT, exchange)
            .await
            .map_err(|_| reply(format!("no reply within {CALL_TIMEOUT:?}")))??;
        let split = buf
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .ok_or_else(|| reply("a reply without a header end".into()))?;
        let head = String::from_utf8_lossy(&buf[..split]).to_ascii_lowercase();
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse::<u16>().ok())
            .ok_or_else(|| reply(format!("bad status line in {head:?}")))?;
        let raw = &buf[split + 4..];
        let body = if head.contains("transfer-encoding: chunked") {
            dechunk(raw).ok_or_else(|| reply("bad chunked body".into()))?
        } else {
            raw.to_vec()
        };
        if status != 200 {
            return Err(reply(format!(
                "HTTP {status}: {}",
                String::from_utf8_lossy(&body)
            )));
        }
        // A streaming call (keepalive) writes one JSON object per message.
        let first = body.split(|b| *b == b'\n').next().unwrap_or_default();
        serde_json::from_slice(first).map_err(|e| reply(format!("not JSON ({e})")))
    }

    /// A new lease of `ttl` seconds.
    pub async fn grant(&self, ttl: u64) -> Result<i64, EtcdError> {
        let r = self.call("/v3/lease/grant", json!({"TTL": ttl})).await?;
        int(&r["ID"]).ok_or_else(|| EtcdError::Reply {
            addr: self.addr.clone(),
            op: "lease grant".into(),
            why: format!("no lease ID in {r}"),
        })
    }

    /// Renew `lease`; its remaining TTL (0: it has expired).
    pub async fn keepalive(&self, lease: i64) -> Result<i64, EtcdError> {
        let r = self
            .call("/v3/lease/keepalive", json!({"ID": lease.to_string()}))
            .await?;
        Ok(int(&r["result"]["TTL"]).unwrap_or(0))
    }

    pub async fn revoke(&self, lease: i64) -> Result<(), EtcdError> {
        self.call("/v3/lease/revoke", json!({"ID": lease.to_string()}))
            .await
            .map(drop)
    }

    pub async fn put(&self, key: &str, value: &str, lease: i64) -> Result<(), EtcdError> {
        self.call(
            "/v3/kv/put",
            json!({"key": b64(key), "value": b64(value), "lease": lease.to_string()}),
        )
        .await
        .map(drop)
    }

    pub async fn get(&self, key: &str) -> Result<Option<String>, EtcdError> {
        let r = self.call("/v3/kv/range", json!({"key": b64(key)})).await?;
        Ok(r["kvs"].get(0).and_then(|kv| unb64(&kv["value"])))
    }

    pub async fn delete(&self, key: &str) -> Result<(), EtcdError> {
        self.call("/v3/kv/deleterange", json!({"key": b64(key)}))
            .await
            .map(drop)
    }

    /// Create `key` = `value` under `lease` if the key does not exist, in
    /// one transaction. `Err(holder)`: the value already there.
    pub async fn create(
        &self,
        key: &str,
        value: &str,
        lease: i64,
    ) -> Result<Result<(), Option<String>>, EtcdError> {
        let k = b64(key);
        let r = self
            .call(
                "/v3/kv/txn",
                json!({
                    "compare": [{"key": k, "target": "CREATE", "result": "EQUAL", "create_revision": "0"}],
                    "success": [{"request_put": {"key": k, "value": b64(value), "lease": lease.to_string()}}],
                    "failure": [{"request_range": {"key": k}}],
                }),
            )
            .await?;
        // proto3 JSON leaves out `succeeded` when it is false.
        if r["succeeded"].as_bool() == Some(true) {
            return Ok(Ok(()));
        }
        let holder = r["responses"]
            .get(0)
            .and_then(|x| x["response_range"]["kvs"].get(0))
            .and_then(|kv| unb64(&kv["value"]));
        Ok(Err(holder))
    }

    /// In one transaction, if every key of `keys` still has the value
    /// `expect`: set each to `value` under `lease`, and put every
    /// `(key, value)` of `also` (no lease). `Ok(false)`: some key had
    /// another value (or none), and nothing was written.
    pub async fn swap(
        &self,
        keys: &[String],
        expect: &str,
        value: &str,
        lease: i64,
        also: &[(String, String)],
    ) -> Result<bool, EtcdError> {
        let compare: Vec<Value> = keys
            .iter()
            .map(|k| json!({"key": b64(k), "target": "VALUE", "result": "EQUAL", "value": b64(expect)}))
            .collect();
        let mut success: Vec<Value> = keys
            .iter()
            .map(|k| json!({"request_put": {"key": b64(k), "value": b64(value), "lease": lease.to_string()}}))
            .collect();
        success.extend(
            also.iter()
                .map(|(k, v)| json!({"request_put": {"key": b64(k), "value": b64(v)}})),
        );
        let r = self
            .call(
                "/v3/kv/txn",
                json!({"compare": compare, "success": success}),
            )
            .await?;
        Ok(r["succeeded"].as_bool() == Some(true))
    }
}

/// The etcd key of the RBD LUN at `path` (`rbd:POOL[/NS]/IMAGE[:opts]`):
/// `/lungate/luns/POOL[/NS]/IMAGE`, the same whatever options name it.
pub fn lun_key(path: &Path) -> String {
    format!("/lungate/luns/{}", image_id(path))
}

/// The etcd key naming the librados client of the LUN's last owner.
pub fn fence_key(path: &Path) -> String {
    format!("/lungate/fence/{}", image_id(path))
}

/// `POOL[/NS]/IMAGE` of `rbd:POOL[/NS]/IMAGE[:opts]`.
pub fn image_id(path: &Path) -> String {
    let s = path.to_string_lossy();
    let rest = s.strip_prefix("rbd:").unwrap_or(&s);
    rest.split(':').next().unwrap_or_default().to_string()
}

/// The key under which gateway `name` registers (bound to its lease).
pub fn gateway_key(name: &str) -> String {
    format!("/lungate/gateways/{name}")
}

/// A gateway's registration, the value of its key and of every LUN key
/// it owns.
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub struct Registration {
    pub name: String,
    pub pid: u32,
    /// The host it runs on (its unix sockets are reachable only there).
    #[serde(default)]
    pub host: String,
    /// Its listeners, as it prints them: `listening tcp ADDR`,
    /// `listening unix PATH`, `control unix PATH`, `control tcp ADDR`,
    /// `migration tcp ADDR`.
    #[serde(default)]
    pub listen: Vec<String>,
}

impl Registration {
    /// The path after `control unix `, if it has a control socket.
    pub fn control_socket(&self) -> Option<&Path> {
        self.listen
            .iter()
            .find_map(|l| l.strip_prefix("control unix "))
            .map(Path::new)
    }
}

/// The owner of the RBD LUN at `path` (`rbd:POOL[/NS]/IMAGE[:opts]`), as
/// etcd at `addr` (`HOST:PORT`) has it: `None` when no gateway owns it.
/// For callers without a runtime (lunctl).
pub fn owner_blocking(addr: &str, path: &Path) -> Result<Option<Registration>, EtcdError> {
    let key = lun_key(path);
    let fail = |why: String| EtcdError::Reply {
        addr: addr.into(),
        op: format!("get {key}"),
        why,
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|source| EtcdError::Io {
            addr: addr.into(),
            op: "start a runtime".into(),
            source,
        })?;
    let Some(v) = rt.block_on(Etcd::new(addr).get(&key))? else {
        return Ok(None);
    };
    serde_json::from_str(&v)
        .map(Some)
        .map_err(|e| fail(format!("not a gateway registration ({e}): {v}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lun_keys_ignore_options() {
        assert_eq!(
            lun_key(Path::new("rbd:rbd/ns/vm.lun:conf=/a/b.conf")),
            "/lungate/luns/rbd/ns/vm.lun"
        );
        assert_eq!(lun_key(Path::new("rbd:p/vm.lun")), "/lungate/luns/p/vm.lun");
    }

    #[test]
    fn registrations_name_their_control_socket() {
        let r: Registration = serde_json::from_str(
            r#"{"name":"g","pid":7,"host":"h","listen":["listening tcp 127.0.0.1:1","control unix /run/c.sock"]}"#,
        )
        .unwrap();
        assert_eq!(r.control_socket(), Some(Path::new("/run/c.sock")));
    }

    #[test]
    fn chunked_bodies_decode() {
        assert_eq!(
            dechunk(b"3\r\nabc\r\n2;x=y\r\nde\r\n0\r\n\r\n").as_deref(),
            Some(&b"abcde"[..])
        );
        assert_eq!(dechunk(b"5\r\nab"), None);
    }
}
