//! `benches/results.md` holds one section per benchmark, each from its `# Benchmark: NAME`
//! heading to the next `# ` heading; a benchmark replaces its own and keeps the others.

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
