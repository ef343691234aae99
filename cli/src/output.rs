//! What a command prints on stdout, for people or (`--json`) for programs.
//!
//! The JSON contract, the same for every command:
//!
//! * a **read** command (inspect, list, scan, ...) prints one JSON document;
//! * a command that **changes** something prints newline-delimited JSON:
//!   zero or more `progress` events ([`crate::progress`]) and, last, one
//!   `result` object: `{"type":"result","op":"flatten","exit_code":0,...}`;
//! * any command that **fails** prints, with `--json`, one `error` object
//!   as its last line: `{"type":"error","op":"flatten","exit_code":3,
//!   "exit":"busy","error":"..."}` (the message also goes to stderr, and
//!   the process exits with that code).
//!
//! A consumer reads lines until one has `type` `result` or `error`.

use std::io::Write;
use std::sync::{Arc, Mutex};

use serde::Serialize;
use serde_json::{Map, Value};

use crate::exit::Exit;
use crate::progress::Reporter;

/// Parse the command line of `program` with clap. A bad command line
/// exits 2 as clap does; with `--json` among the arguments it also prints
/// the `error` event (`"exit": "usage"`), so a program reading the output
/// sees every failure the same way. `--help` and `--version` print and
/// exit 0.
pub fn parse_args<P: clap::Parser>(program: &'static str) -> P {
    match P::try_parse() {
        Ok(p) => p,
        Err(e) => {
            let args: Vec<String> = std::env::args().skip(1).collect();
            if e.use_stderr() && args.iter().any(|a| a == "--json") {
                let _ = e.print();
                let op = args.iter().find(|a| !a.starts_with('-')).map_or("", |a| a);
                let text = e.render().to_string();
                let msg = text.trim().strip_prefix("error: ").unwrap_or(text.trim());
                let out = Output::new(program, true);
                out.event(&Event::Error {
                    op,
                    exit_code: Exit::Usage.code(),
                    exit: Exit::Usage.name(),
                    error: msg,
                });
                std::process::exit(i32::from(Exit::Usage.code()));
            }
            e.exit()
        }
    }
}

/// People or programs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    Human,
    Json,
}

/// One line of NDJSON output.
#[derive(Debug, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Event<'a> {
    /// How far the operation is: `done` of `total` `unit`s of `phase`
    /// (`total` is null while the amount is unknown, e.g. while a gateway
    /// runs the operation).
    Progress {
        op: &'a str,
        phase: &'a str,
        done: u64,
        total: Option<u64>,
        unit: &'a str,
        elapsed_ms: u64,
    },
    /// The operation succeeded; the fields say what it did.
    Result {
        op: &'a str,
        exit_code: u8,
        #[serde(flatten)]
        fields: &'a Map<String, Value>,
    },
    /// The operation failed.
    Error {
        op: &'a str,
        exit_code: u8,
        exit: &'a str,
        error: &'a str,
    },
}

pub(crate) type Sink = Arc<Mutex<Box<dyn Write + Send>>>;

/// Where a command's answer goes (stdout, or a buffer in tests).
#[derive(Clone)]
pub struct Output {
    format: Format,
    program: &'static str,
    sink: Sink,
    /// Whether stderr is a terminal (progress bars are drawn only there).
    terminal: bool,
}

impl Output {
    /// Output of `program` (used as the prefix of error messages) on stdout.
    pub fn new(program: &'static str, json: bool) -> Output {
        use std::io::IsTerminal;
        Output {
            format: if json { Format::Json } else { Format::Human },
            program,
            sink: Arc::new(Mutex::new(Box::new(std::io::stdout()))),
            terminal: std::io::stderr().is_terminal(),
        }
    }

    /// Output into `w` (tests), with progress bars never drawn.
    pub fn to_writer(program: &'static str, format: Format, w: Box<dyn Write + Send>) -> Output {
        Output {
            format,
            program,
            sink: Arc::new(Mutex::new(w)),
            terminal: false,
        }
    }

    pub fn format(&self) -> Format {
        self.format
    }

    pub fn is_json(&self) -> bool {
        self.format == Format::Json
    }

    /// Write `text` as is. Errors (a closed pipe: `lunctl scan | head`)
    /// are ignored: the reader has gone, there is no one left to tell.
    pub(crate) fn put(&self, text: &str) {
        let mut w = self.sink.lock().unwrap_or_else(|e| e.into_inner());
        let _ = w.write_all(text.as_bytes());
        let _ = w.flush();
    }

    pub(crate) fn event(&self, e: &Event<'_>) {
        let mut line = serde_json::to_string(e).expect("events serialise");
        line.push('\n');
        self.put(&line);
    }

    /// A read command's answer: `value` as one pretty-printed JSON document
    /// with `--json`, else `human()`.
    pub fn document<T: Serialize + ?Sized>(&self, value: &T, human: impl FnOnce() -> String) {
        match self.format {
            Format::Json => {
                let mut s = serde_json::to_string_pretty(value).expect("documents serialise");
                s.push('\n');
                self.put(&s);
            }
            Format::Human => self.put(&human()),
        }
    }

    /// A changing command's answer: the `result` event (its `fields` must
    /// serialise to a JSON object) with `--json`, else `human()`.
    pub fn result<T: Serialize + ?Sized>(
        &self,
        op: &str,
        fields: &T,
        human: impl FnOnce() -> String,
    ) {
        match self.format {
            Format::Json => {
                let fields = match serde_json::to_value(fields).expect("results serialise") {
                    Value::Object(m) => m,
                    other => Map::from_iter([("value".to_string(), other)]),
                };
                self.event(&Event::Result {
                    op,
                    exit_code: Exit::Ok.code(),
                    fields: &fields,
                });
            }
            Format::Human => self.put(&human()),
        }
    }

    /// Report a failure: `PROGRAM: error: MESSAGE` on stderr, and with
    /// `--json` the `error` event on stdout. Returns `exit` for `main`.
    pub fn error(&self, op: &str, exit: Exit, message: &str) -> Exit {
        eprintln!("{}: error: {message}", self.program);
        if self.is_json() {
            self.event(&Event::Error {
                op,
                exit_code: exit.code(),
                exit: exit.name(),
                error: message,
            });
        }
        exit
    }

    /// The progress reporter of operation `op` (a bar on a terminal,
    /// `progress` events with `--json`, nothing otherwise).
    pub fn progress(&self, op: &'static str) -> Reporter {
        Reporter::new(self.clone(), op, self.terminal)
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A writer whose bytes the test can read back.
    #[derive(Clone, Default)]
    pub(crate) struct Buf(pub Arc<Mutex<Vec<u8>>>);

    impl Write for Buf {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Buf {
        pub(crate) fn lines(&self) -> Vec<Value> {
            String::from_utf8(self.0.lock().unwrap().clone())
                .unwrap()
                .lines()
                .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l:?}: {e}")))
                .collect()
        }
    }

    #[test]
    fn a_result_is_one_json_line_with_its_fields_beside_type_and_op() {
        let b = Buf::default();
        let o = Output::to_writer("t", Format::Json, Box::new(b.clone()));
        o.result(
            "snapshot",
            &serde_json::json!({"lun": "web", "snapshot": "s1"}),
            || unreachable!(),
        );
        let l = b.lines();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0]["type"], "result");
        assert_eq!(l[0]["op"], "snapshot");
        assert_eq!(l[0]["exit_code"], 0);
        assert_eq!(l[0]["lun"], "web");
        assert_eq!(l[0]["snapshot"], "s1");
    }

    #[test]
    fn an_error_event_carries_the_exit_code_and_its_name() {
        let b = Buf::default();
        let o = Output::to_writer("t", Format::Json, Box::new(b.clone()));
        assert_eq!(o.error("flatten", Exit::Busy, "held"), Exit::Busy);
        let l = b.lines();
        assert_eq!(l[0]["type"], "error");
        assert_eq!(l[0]["exit_code"], 3);
        assert_eq!(l[0]["exit"], "busy");
        assert_eq!(l[0]["error"], "held");
    }

    #[test]
    fn human_output_is_the_text_and_a_document_is_pretty_json() {
        let b = Buf::default();
        let o = Output::to_writer("t", Format::Human, Box::new(b.clone()));
        o.result("x", &serde_json::json!({}), || "done\n".into());
        o.document(&[1, 2], || "one two\n".into());
        assert_eq!(
            String::from_utf8(b.0.lock().unwrap().clone()).unwrap(),
            "done\none two\n"
        );
        let b = Buf::default();
        let o = Output::to_writer("t", Format::Json, Box::new(b.clone()));
        o.document(&serde_json::json!({"a": 1}), || unreachable!());
        let text = String::from_utf8(b.0.lock().unwrap().clone()).unwrap();
        assert_eq!(text, "{\n  \"a\": 1\n}\n");
    }
}
