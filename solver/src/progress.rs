//! Build progress, printed like BuildKit's plain progress (`#3 [stage-0 2/3] RUN ...`).

use std::collections::HashMap;
use std::io::Write;
use std::sync::Mutex;

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
