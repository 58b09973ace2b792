//! Build progress, printed like BuildKit's: plain (`#3 [stage-0 2/3] RUN ...`, one line per
//! event, for logs and tests) or tty (a live line per running step with its elapsed time
//! and last output lines, collapsing to `=> [stage-0 2/3] RUN ...  1.2s` when it ends).

use std::collections::{HashMap, VecDeque};
use std::io::Write;
use std::sync::Mutex;
use std::time::Duration;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle};

#[derive(Clone, Debug)]
pub enum ProgressEvent {
    Started {
        description: String,
    },
    Cached {
        description: String,
    },
    Output {
        description: String,
        line: String,
    },
    Done {
        description: String,
        seconds: f64,
    },
    Failed {
        description: String,
        message: String,
    },
    Info {
        message: String,
    },
}

pub trait Progress: Sync {
    fn event(&self, event: ProgressEvent);
}

/// So that a display chosen at run time (`Box<dyn Progress>`) goes wherever one is wanted.
impl<P: Progress + ?Sized> Progress for Box<P> {
    fn event(&self, event: ProgressEvent) {
        (**self).event(event)
    }
}

/// Writes numbered vertices to stderr, as `--progress=plain` does.
pub struct PlainProgress {
    state: Mutex<(usize, HashMap<String, usize>)>,
    quiet: bool,
}

impl PlainProgress {
    pub fn new(quiet: bool) -> Self {
        PlainProgress {
            state: Mutex::new((0, HashMap::new())),
            quiet,
        }
    }

    fn id(&self, description: &str) -> (usize, bool) {
        let Ok(mut st) = self.state.lock() else {
            return (0, false);
        };
        if let Some(id) = st.1.get(description) {
            return (*id, false);
        }
        st.0 += 1;
        let id = st.0;
        st.1.insert(description.to_string(), id);
        (id, true)
    }
}

impl Progress for PlainProgress {
    fn event(&self, event: ProgressEvent) {
        if self.quiet {
            if let ProgressEvent::Failed { .. } = event {
            } else {
                return;
            }
        }
        let mut err = std::io::stderr().lock();
        let header = |d: &str, err: &mut dyn Write| {
            let (id, new) = self.id(d);
            if new {
                let _ = writeln!(err, "#{id} {d}");
            }
            id
        };
        match event {
            ProgressEvent::Started { description } => {
                header(&description, &mut err);
            }
            ProgressEvent::Cached { description } => {
                let id = header(&description, &mut err);
                let _ = writeln!(err, "#{id} CACHED");
            }
            ProgressEvent::Output { description, line } => {
                let id = header(&description, &mut err);
                let _ = writeln!(err, "#{id} {line}");
            }
            ProgressEvent::Done {
                description,
                seconds,
            } => {
                let id = header(&description, &mut err);
                let _ = writeln!(err, "#{id} DONE {seconds:.1}s");
            }
            ProgressEvent::Failed {
                description,
                message,
            } => {
                let id = header(&description, &mut err);
                let _ = writeln!(err, "#{id} ERROR: {message}");
            }
            ProgressEvent::Info { message } => {
                let _ = writeln!(err, "{message}");
            }
        }
    }
}

/// How many output lines of a running step the tty display keeps under it.
const TAIL_LINES: usize = 6;

struct Vertex {
    bar: ProgressBar,
    log: Option<ProgressBar>,
    tail: VecDeque<String>,
}

/// The live display of `--progress=tty`: one spinner line per running step with its
/// elapsed time and, under it, the step's last output lines; a finished step collapses to
/// one `=> ...` line above the running ones. On a stream that is not a terminal the live
/// part is not drawn and only the collapsed lines are printed.
pub struct TtyProgress {
    multi: MultiProgress,
    vertices: Mutex<HashMap<String, Vertex>>,
    running_style: ProgressStyle,
    log_style: ProgressStyle,
}

impl Default for TtyProgress {
    fn default() -> Self {
        Self::new()
    }
}

impl TtyProgress {
    pub fn new() -> Self {
        let running_style = ProgressStyle::with_template("{spinner:.blue} {msg} {secs:.dim}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner())
            .with_key(
                "secs",
                |state: &ProgressState, w: &mut dyn std::fmt::Write| {
                    let _ = write!(w, "{:.1}s", state.elapsed().as_secs_f64());
                },
            );
        let log_style = ProgressStyle::with_template("{msg:.dim}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner());
        TtyProgress {
            multi: MultiProgress::with_draw_target(ProgressDrawTarget::stderr()),
            vertices: Mutex::new(HashMap::new()),
            running_style,
            log_style,
        }
    }

    /// Prints a line above the live display (or plainly when there is none).
    fn line(&self, text: &str) {
        if self.multi.is_hidden() || self.multi.println(text).is_err() {
            eprintln!("{text}");
        }
    }

    /// Removes a step's live lines and returns its last output lines.
    fn finish(&self, description: &str) -> Vec<String> {
        let Some(v) = self
            .vertices
            .lock()
            .ok()
            .and_then(|mut m| m.remove(description))
        else {
            return Vec::new();
        };
        if let Some(log) = v.log {
            log.finish_and_clear();
            self.multi.remove(&log);
        }
        v.bar.finish_and_clear();
        self.multi.remove(&v.bar);
        v.tail.into_iter().collect()
    }
}

impl Progress for TtyProgress {
    fn event(&self, event: ProgressEvent) {
        match event {
            ProgressEvent::Started { description } => {
                let bar = self.multi.add(
                    ProgressBar::new_spinner()
                        .with_style(self.running_style.clone())
                        .with_message(description.clone()),
                );
                bar.enable_steady_tick(Duration::from_millis(100));
                if let Ok(mut m) = self.vertices.lock() {
                    m.insert(
                        description,
                        Vertex {
                            bar,
                            log: None,
                            tail: VecDeque::new(),
                        },
                    );
                }
            }
            ProgressEvent::Output { description, line } => {
                let Ok(mut m) = self.vertices.lock() else {
                    return;
                };
                let Some(v) = m.get_mut(&description) else {
                    return;
                };
                v.tail.push_back(line);
                while v.tail.len() > TAIL_LINES {
                    v.tail.pop_front();
                }
                let text = v
                    .tail
                    .iter()
                    .map(|l| format!("  > {l}"))
                    .collect::<Vec<_>>()
                    .join("\n");
                let log = v.log.get_or_insert_with(|| {
                    self.multi.insert_after(
                        &v.bar,
                        ProgressBar::new_spinner().with_style(self.log_style.clone()),
                    )
                });
                log.set_message(text);
            }
            ProgressEvent::Cached { description } => {
                self.finish(&description);
                self.line(&format!("=> CACHED {description}"));
            }
            ProgressEvent::Done {
                description,
                seconds,
            } => {
                self.finish(&description);
                self.line(&format!("=> {description}  {seconds:.1}s"));
            }
            ProgressEvent::Failed {
                description,
                message,
            } => {
                let tail = self.finish(&description);
                self.line(&format!("=> ERROR {description}"));
                for l in tail {
                    self.line(&format!("  > {l}"));
                }
                self.line(&format!("  {message}"));
            }
            ProgressEvent::Info { message } => self.line(&message),
        }
    }
}

impl Drop for TtyProgress {
    fn drop(&mut self) {
        // Steps still shown (an interrupted build) leave no half-drawn lines behind.
        if let Ok(mut m) = self.vertices.lock() {
            for (_, v) in m.drain() {
                if let Some(log) = v.log {
                    log.finish_and_clear();
                }
                v.bar.finish_and_clear();
            }
        }
        let _ = self.multi.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tty_progress_tracks_running_steps_and_their_last_lines() {
        let p = TtyProgress::new();
        p.multi.set_draw_target(ProgressDrawTarget::hidden());
        let d = "[stage-0 2/3] RUN make".to_string();
        p.event(ProgressEvent::Started {
            description: d.clone(),
        });
        for i in 0..10 {
            p.event(ProgressEvent::Output {
                description: d.clone(),
                line: format!("line {i}"),
            });
        }
        {
            let m = p.vertices.lock().unwrap();
            let v = &m[&d];
            assert_eq!(v.tail.len(), TAIL_LINES);
            assert_eq!(v.tail.back().map(String::as_str), Some("line 9"));
            assert_eq!(v.tail.front().map(String::as_str), Some("line 4"));
            assert!(v.log.is_some());
        }
        p.event(ProgressEvent::Done {
            description: d.clone(),
            seconds: 1.25,
        });
        assert!(p.vertices.lock().unwrap().is_empty());
    }
}
