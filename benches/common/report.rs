//! `benches/results.md` holds one section per benchmark, each from its `# Benchmark: NAME`
//! heading to the next `# ` heading; a benchmark replaces its own and keeps the others.
//! `benches/results.json` holds the same figures, one top-level key per section (the same
//! NAME): the command, the machine, when it finished, every row of the section's tables, and
//! each goal as a ratio with its aim and whether it was met.

#![allow(dead_code)] // each bench uses its own share

use serde_json::{json, Map, Value};
use std::collections::BTreeMap;
use std::path::Path;

/// Replaces (or appends) the section whose heading starts with `# Benchmark: {name}`.
pub fn save_section(name: &str, report: &str) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results.md");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    let heading = format!("# Benchmark: {name}");
    let mut sections: Vec<String> = Vec::new();
    let mut replaced = false;
    for line in old.lines() {
        if line.starts_with("# ") || sections.is_empty() {
            sections.push(String::new());
        }
        let current = sections.last_mut().expect("one section at least");
        current.push_str(line);
        current.push('\n');
    }
    for section in sections.iter_mut() {
        if section.starts_with(&heading) {
            *section = report.to_string();
            replaced = true;
        }
    }
    if !replaced {
        sections.push(report.to_string());
    }
    let text: Vec<&str> = sections
        .iter()
        .map(|s| s.trim_end())
        .filter(|s| !s.is_empty())
        .collect();
    std::fs::write(&path, text.join("\n\n") + "\n").expect("write benches/results.md");
}

/// The command that ran the bench: the bench's own settings (`knobs`) that were set in the
/// environment, then `cargo bench --bench {bench}`.
pub fn command(bench: &str, knobs: &[&str]) -> String {
    let mut words: Vec<String> = knobs
        .iter()
        .filter_map(|k| {
            std::env::var(k)
                .ok()
                .map(|v| format!("{k}={}", shell_word(&v)))
        })
        .collect();
    words.push(format!("cargo bench --bench {bench}"));
    words.join(" ")
}

/// `value` as one shell word: as it is when that is safe, else in single quotes.
fn shell_word(value: &str) -> String {
    let plain = |c: char| c.is_ascii_alphanumeric() || "_-.,/:=@+%".contains(c);
    if !value.is_empty() && value.chars().all(plain) {
        value.to_string()
    } else {
        format!("'{}'", value.replace('\'', r"'\''"))
    }
}

/// What the bench ran on, read from `/proc` (a reading that fails is left out).
pub struct Machine {
    pub cores: usize,
    /// `/proc/cpuinfo`'s first "model name".
    pub cpu: Option<String>,
    /// `/proc/meminfo`'s MemTotal.
    pub memory_kib: Option<u64>,
    /// `/proc/sys/kernel/osrelease`.
    pub kernel: Option<String>,
    /// The mount point and file system type of the directory the bench writes into (only the
    /// type is reported: no machine's paths in the results).
    pub mount: Option<(String, String)>,
}

impl Machine {
    /// This machine, with `dir` the directory the bench writes its files into.
    pub fn of(dir: &Path) -> Machine {
        let read = |path: &str| std::fs::read_to_string(path).ok();
        let cpu = read("/proc/cpuinfo").and_then(|text| {
            text.lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(key, _)| key.trim() == "model name")
                .map(|(_, v)| v.split_whitespace().collect::<Vec<_>>().join(" "))
        });
        let memory_kib = read("/proc/meminfo").and_then(|text| {
            text.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        });
        let kernel = read("/proc/sys/kernel/osrelease").map(|v| v.trim().to_string());
        let dir = std::fs::canonicalize(dir).unwrap_or_else(|_| dir.to_path_buf());
        let mount = read("/proc/self/mounts").and_then(|text| mount_of(&dir, &text));
        Machine {
            cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu,
            memory_kib,
            kernel,
            mount,
        }
    }

    pub fn json(&self) -> Value {
        json!({
            "cores": self.cores,
            "cpu": self.cpu,
            "memory_mib": self.memory_kib.map(|k| k / 1024),
            "kernel": self.kernel,
            "file_system": self.mount.as_ref().map(|m| &m.1),
            "description": self.to_string(),
        })
    }
}

/// Short, for the Markdown's "Machine: …." sentence: `2 cores (AMD EPYC), 24 GiB, Linux 6.1,
/// files on ext4`.
impl std::fmt::Display for Machine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} cores", self.cores)?;
        if let Some(cpu) = &self.cpu {
            write!(f, " ({cpu})")?;
        }
        if let Some(kib) = self.memory_kib {
            let gib = kib as f64 / (1 << 20) as f64;
            if gib >= 1.0 {
                write!(f, ", {gib:.0} GiB")?;
            } else {
                write!(f, ", {} MiB", kib / 1024)?;
            }
        }
        if let Some(kernel) = &self.kernel {
            // The major and minor version: `6.1.0-37-cloud-amd64` is `6.1`.
            let short: Vec<&str> = kernel.splitn(3, '.').take(2).collect();
            write!(f, ", Linux {}", short.join("."))?;
        }
        if let Some((_, fs)) = &self.mount {
            write!(f, ", files on {fs}")?;
        }
        Ok(())
    }
}

/// The mount point and file system type holding `path` (absolute), from the text of
/// `/proc/self/mounts`: the longest mount point that is `path` or one of its parents (of
/// mounts on the same point, the last, which hides the others).
fn mount_of(path: &Path, mounts: &str) -> Option<(String, String)> {
    let mut best: Option<(String, String)> = None;
    for line in mounts.lines() {
        let fields: Vec<&str> = line.split_whitespace().collect();
        let [_, point, fs, ..] = fields[..] else {
            continue;
        };
        let point = unescape_mount(point);
        let longer = best.as_ref().is_none_or(|(p, _)| point.len() >= p.len());
        if path.starts_with(&point) && longer {
            best = Some((point, fs.to_string()));
        }
    }
    best
}

/// `/proc/self/mounts` writes a space, tab, newline and backslash as `\040`, `\011`, `\012`,
/// `\134`.
fn unescape_mount(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes.get(i + 1..i + 4).and_then(|d| {
            let d = std::str::from_utf8(d).ok()?;
            u8::from_str_radix(d, 8).ok()
        });
        match (bytes[i], octal) {
            (b'\\', Some(byte)) => {
                out.push(byte);
                i += 4;
            }
            (byte, _) => {
                out.push(byte);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A figure the bench holds against an aim: a ratio to a baseline of the same run (or, where
/// the goal is a bound, the figure itself, with its unit).
pub struct Goal {
    pub goal: String,
    pub ratio: f64,
    pub at_least: bool,
    pub aim: f64,
    pub unit: Option<&'static str>,
}

impl Goal {
    /// `ratio` should be `aim` or more.
    pub fn at_least(goal: impl Into<String>, ratio: f64, aim: f64) -> Goal {
        Goal {
            goal: goal.into(),
            ratio,
            at_least: true,
            aim,
            unit: None,
        }
    }

    /// `ratio` should be `aim` or less.
    pub fn at_most(goal: impl Into<String>, ratio: f64, aim: f64) -> Goal {
        Goal {
            at_least: false,
            ..Goal::at_least(goal, ratio, aim)
        }
    }

    /// The figure is no ratio but a quantity in `unit`.
    pub fn in_unit(self, unit: &'static str) -> Goal {
        Goal {
            unit: Some(unit),
            ..self
        }
    }

    pub fn met(&self) -> bool {
        match self.at_least {
            true => self.ratio >= self.aim,
            false => self.ratio <= self.aim,
        }
    }

    pub fn json(&self) -> Value {
        let mut goal = json!({
            "goal": self.goal,
            // Not a finite number (a zero baseline) is written as null, and not met.
            "ratio": self.ratio,
            "aim": format!("{} {}", if self.at_least { ">=" } else { "<=" }, self.aim),
            "met": self.met(),
        });
        if let Some(unit) = self.unit {
            goal["unit"] = json!(unit);
        }
        goal
    }
}

/// Every row of the Markdown tables in `markdown`, each an object from its table's column
/// names to its cells (see `cell_value`); `table` numbers the section's tables from 1.
pub fn table_rows(markdown: &str) -> Vec<Value> {
    let cells = |line: &str| -> Vec<String> {
        let inner = line.trim().trim_start_matches('|').trim_end_matches('|');
        inner.split('|').map(|c| c.trim().to_string()).collect()
    };
    let is_rule = |line: &str| {
        let line = line.trim();
        line.starts_with("|-") && line.chars().all(|c| "|-: ".contains(c))
    };
    let lines: Vec<&str> = markdown.lines().collect();
    let mut rows = Vec::new();
    let mut table = 0;
    let mut i = 0;
    while i + 1 < lines.len() {
        if !(lines[i].trim_start().starts_with('|') && is_rule(lines[i + 1])) {
            i += 1;
            continue;
        }
        table += 1;
        let columns = cells(lines[i]);
        i += 2;
        while i < lines.len() && lines[i].trim_start().starts_with('|') {
            let mut row = Map::new();
            row.insert("table".into(), json!(table));
            for (column, cell) in columns.iter().zip(cells(lines[i])) {
                row.insert(column.clone(), cell_value(&cell));
            }
            rows.push(Value::Object(row));
            i += 1;
        }
    }
    rows
}

/// A cell: null for "-", a number, a list of numbers for cells such as "11.5, 17.4, 19.5" or
/// "1.3 / 0.6" (the column's name says what each is), else the text.
fn cell_value(cell: &str) -> Value {
    if cell == "-" {
        return Value::Null;
    }
    if let Some(n) = number(cell) {
        return n;
    }
    for separator in [", ", " / "] {
        if cell.contains(separator) {
            let parts: Option<Vec<Value>> = cell.split(separator).map(number).collect();
            if let Some(parts) = parts {
                return Value::Array(parts);
            }
        }
    }
    json!(cell)
}

/// `text` as a JSON number (an integer where it is one), if it is a finite number.
fn number(text: &str) -> Option<Value> {
    // Rust also reads "inf" and "NaN": those are no numbers here.
    if text.is_empty()
        || !text
            .bytes()
            .all(|b| b.is_ascii_digit() || b"+-.eE".contains(&b))
    {
        return None;
    }
    if let Ok(n) = text.parse::<i64>() {
        return Some(json!(n));
    }
    text.parse::<f64>()
        .ok()
        .filter(|n| n.is_finite())
        .map(|n| json!(n))
}

/// Now, in UTC, as RFC 3339 (`2025-01-31T12:00:00Z`), and in seconds since the epoch.
pub fn now_utc() -> (String, u64) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    // Days to a civil date (Howard Hinnant's algorithm).
    let (days, rest) = ((secs / 86_400) as i64, secs % 86_400);
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    let text = format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rest / 3_600,
        rest / 60 % 60,
        rest % 60
    );
    (text, secs)
}

/// Replaces (or adds) the key `name` of `benches/results.json`, keeping the others: the
/// command, the machine, when it finished, every row of the tables in `markdown` (the
/// section given to `save_section`), the goals, and `figures` (what the section gives outside
/// its tables, or null). Written pretty, keys sorted.
pub fn save_json(
    name: &str,
    markdown: &str,
    command: &str,
    machine: &Machine,
    goals: &[Goal],
    figures: Value,
) {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("benches/results.json");
    let mut all: BTreeMap<String, Value> = match std::fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str(&text).unwrap_or_else(|e| {
            eprintln!("benches/results.json is no JSON object ({e}): written anew");
            BTreeMap::new()
        }),
        Err(_) => BTreeMap::new(),
    };
    let (finished, finished_unix) = now_utc();
    let mut section = json!({
        "command": command,
        "machine": machine.json(),
        "finished": finished,
        "finished_unix": finished_unix,
        "rows": table_rows(markdown),
        "goals": goals.iter().map(Goal::json).collect::<Vec<_>>(),
    });
    if !figures.is_null() {
        section["figures"] = figures;
    }
    all.insert(name.to_string(), section);
    let text = serde_json::to_string_pretty(&all).expect("results as JSON");
    std::fs::write(&path, text + "\n").expect("write benches/results.json");
}
