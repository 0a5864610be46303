//! The report: figures formatted, rows with their baseline, ratio and target, the markdown
//! table, and its copy into `BENCHMARKS.md`.

use super::*;

pub(crate) fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 * p) as usize).min(sorted.len() - 1);
    sorted[i]
}

pub(crate) fn us(d: Duration) -> String {
    format!("{:.0} µs", d.as_secs_f64() * 1e6)
}

pub(crate) fn ms(d: Duration) -> String {
    if d >= Duration::from_secs(1) {
        format!("{:.2} s", d.as_secs_f64())
    } else {
        format!("{:.1} ms", d.as_secs_f64() * 1e3)
    }
}

pub(crate) fn rate(r: f64) -> String {
    if r >= 1e6 {
        format!("{:.2} M/s", r / 1e6)
    } else {
        format!("{:.1} k/s", r / 1e3)
    }
}

pub(crate) fn ratio(x: f64) -> String {
    format!("{x:.2}×")
}

#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Verdict {
    Pass,
    Miss,
    Info,
}

pub(crate) struct Row {
    pub(crate) figure: String,
    pub(crate) value: String,
    pub(crate) baseline: String,
    pub(crate) ratio: String,
    pub(crate) target: String,
    pub(crate) verdict: Verdict,
    pub(crate) notes: String,
}

impl Row {
    pub(crate) fn new(figure: impl Into<String>) -> Self {
        Row {
            figure: figure.into(),
            value: String::new(),
            baseline: "—".into(),
            ratio: "—".into(),
            target: "—".into(),
            verdict: Verdict::Info,
            notes: String::new(),
        }
    }
    pub(crate) fn value(mut self, v: impl Into<String>) -> Self {
        self.value = v.into();
        self
    }
    pub(crate) fn baseline(mut self, v: impl Into<String>) -> Self {
        self.baseline = v.into();
        self
    }
    pub(crate) fn ratio(mut self, v: impl Into<String>) -> Self {
        self.ratio = v.into();
        self
    }
    pub(crate) fn target(mut self, t: impl Into<String>, pass: bool) -> Self {
        self.target = t.into();
        self.verdict = if pass { Verdict::Pass } else { Verdict::Miss };
        self
    }
    pub(crate) fn notes(mut self, n: impl Into<String>) -> Self {
        self.notes = n.into();
        self
    }
}

pub(crate) fn render(rows: &[Row]) -> String {
    let mut s = String::new();
    s.push_str("| figure | cets | baseline (same run) | ratio | target | result | notes |\n");
    s.push_str("|---|---|---|---|---|---|---|\n");
    for r in rows {
        let verdict = match r.verdict {
            Verdict::Pass => "pass",
            Verdict::Miss => "**miss**",
            Verdict::Info => "",
        };
        let _ = writeln!(
            s,
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.figure, r.value, r.baseline, r.ratio, r.target, verdict, r.notes
        );
    }
    s
}

/// Replaces the block between the report markers of `BENCHMARKS.md` with `report`.
pub(crate) fn write_doc(report: &str) {
    const BEGIN: &str = "<!-- bench-report:begin -->";
    const END: &str = "<!-- bench-report:end -->";
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("BENCHMARKS.md");
    let doc = match std::fs::read_to_string(&path) {
        Ok(doc) => doc,
        Err(e) => return eprintln!("[cets bench] cannot read {}: {e}", path.display()),
    };
    let (Some(b), Some(e)) = (doc.find(BEGIN), doc.find(END)) else {
        return eprintln!("[cets bench] no report markers in {}", path.display());
    };
    if e < b {
        return eprintln!(
            "[cets bench] report markers out of order in {}",
            path.display()
        );
    }
    let new = format!("{}{BEGIN}\n{}\n{}", &doc[..b], report.trim_end(), &doc[e..]);
    match std::fs::write(&path, new) {
        Ok(()) => eprintln!("[cets bench] latest table written to {}", path.display()),
        Err(e) => eprintln!("[cets bench] cannot write {}: {e}", path.display()),
    }
}
