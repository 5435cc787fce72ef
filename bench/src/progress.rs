//! Progress of a scenario run on stderr: one bar per load path (indicatif), redrawn in
//! place on a terminal, and a plain line every ten seconds otherwise (CI logs).

use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{
    MultiProgress, ProgressBar, ProgressDrawTarget, ProgressState, ProgressStyle, TermLike,
};

/// Off a terminal, how often a bar writes its line.
const EVERY: Duration = Duration::from_secs(10);
const RUNNING: &str = "{prefix} [{bar:24}] {percent:>3}% {pos}/{len} {rate} ETA {eta}";
const DONE: &str = "{prefix} [{bar:24}] {percent:>3}% {pos}/{len} {rate} done in {elapsed}";

/// The bars the load drivers advance.
pub struct Progress {
    tracks: Vec<Track>,
}

/// One load path's bar; several drivers, one per tenant, feed it.
pub struct Track {
    name: &'static str,
    bar: ProgressBar,
    /// Off a terminal: the bar's lines.
    plain: Option<Lines>,
    ended: AtomicBool,
}

impl Track {
    /// Adds `n` to the count; the bar shows how long it took once it reaches its total.
    pub fn add(&self, n: u64) {
        if n == 0 {
            return;
        }
        self.bar.inc(n);
        if self.bar.position() >= self.bar.length().unwrap_or(0) {
            self.end(|bar| {
                bar.set_style(style(DONE));
                bar.finish();
            });
        }
    }

    /// Once: the bar's last drawing, and off a terminal its line.
    fn end(&self, last: impl FnOnce(&ProgressBar)) {
        if !self.ended.swap(true, Ordering::Relaxed) {
            last(&self.bar);
            if let Some(l) = &self.plain {
                l.write_last();
            }
        }
    }
}

fn style(template: &str) -> ProgressStyle {
    ProgressStyle::with_template(template)
        .expect("a valid template")
        .progress_chars("#-")
        // Since the start, as `done/elapsed`: indicatif's own `per_sec` is a recent estimate.
        .with_key("rate", |s: &ProgressState, w: &mut dyn std::fmt::Write| {
            let _ = write!(
                w,
                "{:.0}/s",
                s.pos() as f64 / s.elapsed().as_secs_f64().max(1e-3)
            );
        })
}

impl Progress {
    /// One bar per track, each with its total, drawing from now on.
    pub fn new(tracks: &[(&'static str, u64)]) -> Arc<Self> {
        if std::io::stderr().is_terminal() {
            Self::drawn(tracks, None)
        } else {
            Self::drawn(tracks, Some(&|| Box::new(std::io::stderr())))
        }
    }

    /// `plain`: where each bar's plain lines go; `None` for in place on the terminal.
    fn drawn(tracks: &[(&'static str, u64)], plain: Option<&dyn Fn() -> Output>) -> Arc<Self> {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let tracks = tracks
            .iter()
            .map(|&(name, total)| {
                let bar = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::hidden())
                    .with_style(style(RUNNING))
                    .with_prefix(name);
                let plain = plain.map(|out| Lines::new(out()));
                let bar = match &plain {
                    None => multi.add(bar),
                    Some(lines) => {
                        bar.set_draw_target(ProgressDrawTarget::term_like(Box::new(lines.clone())));
                        bar
                    }
                };
                bar.enable_steady_tick(Duration::from_millis(500));
                Track {
                    name,
                    bar,
                    plain,
                    ended: AtomicBool::new(false),
                }
            })
            .collect();
        Arc::new(Self { tracks })
    }

    /// The track called `name`. Panics on a name not given to [`Progress::new`], a bug in
    /// the runner.
    pub fn track(&self, name: &str) -> &Track {
        self.tracks
            .iter()
            .find(|t| t.name == name)
            .unwrap_or_else(|| panic!("no progress track `{name}`"))
    }

    /// Stops drawing; a bar short of its total stays so, with one last line.
    pub fn finish(&self) {
        for t in &self.tracks {
            t.end(ProgressBar::abandon);
        }
    }
}

/// A bar's drawing as plain lines: indicatif draws it as to a terminal (the line, padding,
/// cursor moves); this keeps the line and writes it out every [`EVERY`].
#[derive(Clone)]
struct Lines(Arc<Mutex<Frames>>);

type Output = Box<dyn Write + Send>;

struct Frames {
    out: Output,
    /// What is being drawn, and the last line drawn.
    drawing: String,
    last: String,
    /// `last` has been written out.
    written: bool,
    due: Instant,
}

impl Lines {
    fn new(out: Output) -> Self {
        Self(Arc::new(Mutex::new(Frames {
            out,
            drawing: String::new(),
            last: String::new(),
            written: false,
            due: Instant::now() + EVERY,
        })))
    }

    fn with<T>(&self, f: impl FnOnce(&mut Frames) -> T) -> Option<T> {
        self.0.lock().ok().map(|mut g| f(&mut g))
    }

    /// The last line, unless it is out already.
    fn write_last(&self) {
        self.with(|f| {
            if !f.written {
                f.write();
            }
        });
    }
}

impl Frames {
    fn write(&mut self) {
        self.written = true;
        let _ = writeln!(self.out, "{}", self.last);
        let _ = self.out.flush();
    }
}

impl std::fmt::Debug for Lines {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Lines")
    }
}

impl TermLike for Lines {
    fn width(&self) -> u16 {
        120
    }
    fn move_cursor_up(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_down(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_right(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn move_cursor_left(&self, _: usize) -> std::io::Result<()> {
        Ok(())
    }
    fn write_line(&self, s: &str) -> std::io::Result<()> {
        self.write_str(s)
    }
    fn write_str(&self, s: &str) -> std::io::Result<()> {
        self.with(|f| f.drawing.push_str(s));
        Ok(())
    }
    fn clear_line(&self) -> std::io::Result<()> {
        Ok(())
    }
    fn flush(&self) -> std::io::Result<()> {
        self.with(|f| {
            let line = f.drawing.trim().to_owned();
            f.drawing.clear();
            if !line.is_empty() && line != f.last {
                f.last = line;
                f.written = false;
            }
            let now = Instant::now();
            if now >= f.due {
                f.due = now + EVERY;
                f.write();
            }
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Clone, Default)]
    struct Captured(Arc<Mutex<Vec<u8>>>);

    impl Write for Captured {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("lock").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn off_a_terminal_a_track_writes_a_line_when_done_and_the_rest_at_the_end() {
        let out = Captured::default();
        let text = || String::from_utf8(out.0.lock().expect("lock").clone()).expect("utf-8");
        let to = || -> Output { Box::new(out.clone()) };
        let p = Progress::drawn(&[("batch", 200), ("stream", 10)], Some(&to));
        p.track("batch").add(50);
        p.track("stream").add(4);
        p.track("stream").add(6);
        let done = text();
        assert!(
            done.starts_with("stream [########################] 100% 10/10 "),
            "{done}"
        );
        assert!(done.trim_end().contains(" done in "), "{done}");
        p.track("stream").add(0);
        p.finish();
        let all = text();
        let lines: Vec<&str> = all.lines().collect();
        assert_eq!(lines.len(), 2, "one last line per track: {all}");
        assert!(
            lines[1].starts_with("batch [######------------------]  25% 50/200 "),
            "{all}"
        );
        assert!(lines[1].contains(" ETA "), "{all}");
    }
}
