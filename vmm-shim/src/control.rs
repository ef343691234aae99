//! The running shim's operator socket (`POOL/.NAME.vmm-shim.sock`, mode
//! 0600): one JSON request per connection, one JSON reply, both a single
//! line. `vmm-shim save|list|restore|stop NAME` are its clients.
//!
//! Requests: `{"op":"save","snapshot":"s1"}` (`snapshot` optional),
//! `{"op":"list"}`, `{"op":"restore","snapshot":"s1"}`, `{"op":"stop"}`.
//! Replies: `{"ok":true, …}` with the operation's figures, or
//! `{"ok":false,"error":"why"}`.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::sync::mpsc::Sender;

use crate::controller::Msg;

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum OpRequest {
    Save {
        #[serde(default)]
        snapshot: Option<String>,
    },
    List,
    Restore {
        snapshot: String,
    },
    Stop,
    /// Move the running VM with its LUN to the gateway whose migration
    /// listener is `to` (`HOST:PORT`).
    Migrate {
        to: String,
        #[serde(default)]
        target_pool: Option<String>,
        #[serde(default)]
        downtime_ms: Option<u64>,
    },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct OpReply {
    pub ok: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(flatten)]
    pub data: serde_json::Map<String, serde_json::Value>,
}

impl OpReply {
    pub fn ok(v: serde_json::Value) -> OpReply {
        OpReply {
            ok: true,
            error: None,
            data: match v {
                serde_json::Value::Object(m) => m,
                _ => serde_json::Map::new(),
            },
        }
    }

    pub fn err(e: String) -> OpReply {
        OpReply {
            ok: false,
            error: Some(e),
            data: serde_json::Map::new(),
        }
    }
}

/// Bind the socket (replacing a stale one, never a live one's).
pub fn bind(path: &Path) -> Result<UnixListener, String> {
    if UnixStream::connect(path).is_ok() {
        return Err(format!(
            "{}: another vmm-shim already runs this VM",
            path.display()
        ));
    }
    let _ = std::fs::remove_file(path);
    let l = UnixListener::bind(path).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|e| format!("{}: {e}", path.display()))?;
    Ok(l)
}

/// Serve the socket on a thread, forwarding each request to the controller.
pub fn serve(l: UnixListener, tx: Sender<Msg>) {
    std::thread::Builder::new()
        .name("operator".into())
        .spawn(move || {
            for s in l.incoming() {
                let Ok(s) = s else { continue };
                let tx = tx.clone();
                std::thread::spawn(move || handle(s, tx));
            }
        })
        .expect("operator thread");
}

fn handle(s: UnixStream, tx: Sender<Msg>) {
    let mut line = String::new();
    let Ok(r) = s.try_clone() else { return };
    if BufReader::new(r).read_line(&mut line).is_err() {
        return;
    }
    let reply = match serde_json::from_str::<OpRequest>(line.trim()) {
        Err(e) => OpReply::err(format!("bad request: {e}")),
        Ok(op) => {
            let (rtx, rrx) = std::sync::mpsc::channel();
            let (ack_tx, ack_rx) = std::sync::mpsc::channel();
            if tx.send(Msg::Operator(op, rtx, ack_rx)).is_err() {
                OpReply::err("the VM is shutting down".into())
            } else {
                let r = rrx
                    .recv()
                    .unwrap_or_else(|_| OpReply::err("the VM stopped before answering".into()));
                write_reply(&s, &r);
                // The controller may be waiting to exit until this is out.
                let _ = ack_tx.send(());
                return;
            }
        }
    };
    write_reply(&s, &reply);
}

fn write_reply(s: &UnixStream, reply: &OpReply) {
    let mut s = s;
    let mut out = serde_json::to_string(reply).expect("reply serialises");
    out.push('\n');
    let _ = s.write_all(out.as_bytes());
}

/// Send one request to the shim running VM `name`.
pub fn call(socket: &PathBuf, op: &OpRequest) -> Result<OpReply, String> {
    let mut s = UnixStream::connect(socket).map_err(|e| {
        format!(
            "no vmm-shim is running this VM ({}: {e}); start it with vmm-shim run",
            socket.display()
        )
    })?;
    let mut line = serde_json::to_string(op).expect("request serialises");
    line.push('\n');
    s.write_all(line.as_bytes())
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    let mut reply = String::new();
    BufReader::new(s)
        .read_line(&mut reply)
        .map_err(|e| format!("{}: {e}", socket.display()))?;
    serde_json::from_str(reply.trim())
        .map_err(|e| format!("{}: unexpected reply {reply:?}: {e}", socket.display()))
}
