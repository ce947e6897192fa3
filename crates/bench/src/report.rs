//! Plain-text tables (Markdown pipe tables, so the output pastes into the README as is).

use std::time::Duration;

/// Microseconds with one decimal.
pub fn us(d: Duration) -> String {
    format!("{:.1}", d.as_secs_f64() * 1e6)
}

/// Milliseconds with two decimals.
pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1e3)
}

/// Mebibytes with one decimal.
pub fn mib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1024.0 * 1024.0))
}

/// `value` and its ratio to `base`: `"12.3 (1.05x)"`.
pub fn with_ratio(text: String, value: f64, base: f64) -> String {
    if base > 0.0 && value.is_finite() {
        format!("{text} ({:.2}x)", value / base)
    } else {
        text
    }
}

/// A Markdown table with a header row; columns padded to line up in a terminal too.
pub fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.chars().count());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<w$}", w = widths.get(i).copied().unwrap_or(0)))
            .collect();
        format!("| {} |\n", padded.join(" | "))
    };
    let mut out = line(header.iter().map(|h| (*h).to_owned()).collect());
    out.push_str(&line(widths.iter().map(|w| "-".repeat(*w)).collect()));
    for row in rows {
        out.push_str(&line(row.clone()));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tables_line_up_and_ratios_read_right() {
        let t = table(
            &["a", "bee"],
            &[vec!["1".into(), "2".into()], vec!["333".into(), "4".into()]],
        );
        assert_eq!(
            t,
            "| a   | bee |\n| --- | --- |\n| 1   | 2   |\n| 333 | 4   |\n"
        );
        assert_eq!(with_ratio("2.0".into(), 2.0, 1.0), "2.0 (2.00x)");
        assert_eq!(with_ratio("2.0".into(), 2.0, 0.0), "2.0");
        assert_eq!(us(Duration::from_nanos(12_345)), "12.3");
        assert_eq!(mib(3 * 1024 * 1024 / 2), "1.5");
    }
}
