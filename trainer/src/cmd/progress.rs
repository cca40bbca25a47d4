//! Progress for long work: an indicatif bar on a terminal, plain lines (every tenth of the
//! work) when stderr is a file or a pipe, so logs stay readable.

use indicatif::{ProgressBar, ProgressStyle};
use std::io::IsTerminal;

pub struct Progress {
    bar: Option<ProgressBar>,
    what: String,
    len: u64,
    done: u64,
    plain_every: u64,
    /// Plain mode prints the caller's message alone (it already says where the work is).
    own_lines: bool,
}

impl Progress {
    pub fn new(len: u64, what: &str) -> Progress {
        let bar = std::io::stderr().is_terminal().then(|| {
            let b = ProgressBar::new(len);
            b.set_style(
                ProgressStyle::with_template(
                    "{prefix} [{bar:30}] {pos}/{len} {elapsed_precise} (eta {eta}) {msg}",
                )
                // cannot fail: the template is a constant that parses.
                .expect("a valid template")
                .progress_chars("=> "),
            );
            b.set_prefix(what.to_string());
            b
        });
        Progress {
            bar,
            what: what.to_string(),
            len,
            done: 0,
            plain_every: (len / 10).max(1),
            own_lines: false,
        }
    }

    /// Without a terminal, print a line for every unit rather than every tenth.
    pub fn every_step(mut self) -> Progress {
        self.plain_every = 1;
        self.own_lines = true;
        self
    }

    /// Work already done before (a resumed run).
    pub fn set_position(&mut self, done: u64) {
        self.done = done;
        if let Some(b) = &self.bar {
            b.set_position(done);
        }
    }

    /// One more unit done; `msg` is shown beside the bar (or on the plain line).
    pub fn inc(&mut self, msg: &str) {
        self.done += 1;
        match &self.bar {
            Some(b) => {
                b.set_message(msg.to_string());
                b.inc(1);
            }
            None => {
                if self.own_lines {
                    eprintln!("{msg}");
                } else if self.done.is_multiple_of(self.plain_every) || self.done == self.len {
                    eprintln!("{} {}/{} {msg}", self.what, self.done, self.len);
                }
            }
        }
    }

    /// A line printed above the bar (or as is).
    pub fn println(&self, line: &str) {
        match &self.bar {
            Some(b) => b.println(line),
            None => eprintln!("{line}"),
        }
    }

    pub fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}
