//! The report as one self-contained HTML page: the configurations table (sortable), every
//! chart inline as SVG, each trial with its status and resolved configuration, the sweep
//! file as run and the code version. Nothing is fetched: no scripts, styles or fonts from
//! elsewhere, so the file can be mailed, archived or opened offline.

use super::Report;

/// What the page shows besides the report itself.
pub struct Page<'a> {
    pub report: &'a Report,
    /// Where the results came from (the DB path).
    pub source: &'a str,
    /// The sweep file's path and text as the DB recorded them.
    pub sweep_file: &'a str,
    pub sweep_text: &'a str,
    pub code_version: &'a str,
    /// When the page was written (UTC).
    pub generated: &'a str,
    /// (title, SVG text) of every chart drawn.
    pub charts: &'a [(String, String)],
    /// Seconds between reloads while a sweep runs (`--watch`); none once it has finished.
    pub refresh: Option<u64>,
}

/// Text for HTML element content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

const STYLE: &str = "
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2rem auto;
       max-width: 1400px; padding: 0 1rem; color: #1a1a1a; }
h1 { font-size: 1.6rem; margin-bottom: 0.2rem; }
h2 { font-size: 1.2rem; margin-top: 2rem; border-bottom: 1px solid #ddd; }
.meta { color: #555; font-size: 0.9rem; }
table { border-collapse: collapse; font-size: 0.85rem; margin: 0.5rem 0; }
th, td { padding: 0.25rem 0.6rem; border-bottom: 1px solid #e4e4e4; text-align: right;
         white-space: nowrap; }
th { background: #f4f4f4; position: sticky; top: 0; }
th.text, td.text { text-align: left; }
table.sortable th { cursor: pointer; user-select: none; }
table.sortable th[data-dir=asc]::after { content: ' \\25B2'; }
table.sortable th[data-dir=desc]::after { content: ' \\25BC'; }
tr:hover td { background: #fafaf0; }
.scroll { overflow-x: auto; }
pre { background: #f7f7f7; padding: 0.6rem; overflow-x: auto; font-size: 0.8rem; }
figure { margin: 1rem 0; }
figure svg { max-width: 100%; height: auto; }
figcaption { color: #555; font-size: 0.85rem; }
.status-done { color: #176317; } .status-diverged { color: #a15c00; }
.status-failed { color: #b00020; } .status-running { color: #1f4fa0; }
details summary { cursor: pointer; color: #1f4fa0; }
";

/// Clicking a header sorts the table's rows by that column: numbers numerically (the
/// leading number of a cell such as `4.1380` or `0.271 ±0.012`), anything else as text.
const SORT_SCRIPT: &str = "
document.querySelectorAll('table.sortable').forEach(function (table) {
  var heads = table.tHead.rows[0].cells;
  Array.prototype.forEach.call(heads, function (th, i) {
    th.addEventListener('click', function () {
      var dir = th.getAttribute('data-dir') === 'asc' ? 'desc' : 'asc';
      Array.prototype.forEach.call(heads, function (h) { h.removeAttribute('data-dir'); });
      th.setAttribute('data-dir', dir);
      var body = table.tBodies[0];
      var rows = Array.prototype.slice.call(body.rows);
      var key = function (row) {
        var t = row.cells[i].textContent.trim();
        var n = parseFloat(t.replace(/,/g, ''));
        return isNaN(n) ? t : n;
      };
      rows.sort(function (a, b) {
        var x = key(a), y = key(b), c;
        if (typeof x === 'number' && typeof y === 'number') { c = x - y; }
        else { c = String(x).localeCompare(String(y)); }
        return dir === 'asc' ? c : -c;
      });
      rows.forEach(function (r) { body.appendChild(r); });
    });
  });
});
";

fn table(header: &[String], rows: &[Vec<String>], text_cols: usize, class: &str) -> String {
    let align = |i: usize| {
        if i < text_cols || i + 1 == header.len() {
            " class=\"text\""
        } else {
            ""
        }
    };
    let mut s = format!("<div class=\"scroll\"><table class=\"{class}\">\n<thead><tr>");
    for (i, h) in header.iter().enumerate() {
        s += &format!("<th{}>{}</th>", align(i), escape(h));
    }
    s += "</tr></thead>\n<tbody>\n";
    for r in rows {
        s += "<tr>";
        for (i, c) in r.iter().enumerate() {
            s += &format!("<td{}>{}</td>", align(i), escape(c));
        }
        s += "</tr>\n";
    }
    s += "</tbody></table></div>\n";
    s
}

/// The trials, one row each, with their resolved configuration folded under the id.
fn trials(report: &Report) -> String {
    let mut s = String::from(
        "<div class=\"scroll\"><table class=\"sortable\">\n<thead><tr>\
         <th class=\"text\">trial</th><th class=\"text\">configuration</th><th>seed</th>\
         <th class=\"text\">status</th><th>val/bpb</th><th>params</th><th>time (s)</th>\
         <th class=\"text\">device</th><th class=\"text\">error</th></tr></thead>\n<tbody>\n",
    );
    for row in &report.rows {
        for t in &row.trials {
            let r = &t.row;
            let status = r.status.as_str();
            s += &format!(
                "<tr><td class=\"text\"><details><summary>{id}</summary><pre>{config}</pre>\
                 </details></td><td class=\"text\">{name}</td><td>{seed}</td>\
                 <td class=\"text status-{status}\">{status}</td><td>{bpb}</td><td>{params}</td>\
                 <td>{wall}</td><td class=\"text\">{device}</td><td class=\"text\">{error}</td>\
                 </tr>\n",
                id = escape(&r.id),
                config = escape(r.config.trim_end()),
                name = escape(if row.name.is_empty() { "-" } else { &row.name }),
                seed = r.seed,
                bpb = t.final_bpb.map_or("-".into(), |v| format!("{v:.4}")),
                params = r.n_params.map_or("-".into(), |n| n.to_string()),
                wall = r.wall_s.map_or("-".into(), |w| format!("{w:.1}")),
                device = escape(r.device.as_deref().unwrap_or("-")),
                error = escape(r.error.as_deref().unwrap_or("")),
            );
        }
    }
    s += "</tbody></table></div>\n";
    s
}

/// The whole page.
pub fn render(p: &Page) -> String {
    let r = p.report;
    let mut s =
        String::from("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n");
    s += "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n";
    if let Some(secs) = p.refresh {
        s += &format!("<meta http-equiv=\"refresh\" content=\"{secs}\">\n");
    }
    s += &format!("<title>sweep {}</title>\n", escape(&r.sweep));
    s += &format!("<style>{STYLE}</style>\n</head>\n<body>\n");
    s += &format!("<h1>sweep {}</h1>\n", escape(&r.sweep));
    s += &format!("<p>{}</p>\n", escape(&r.headline(p.source)));
    s += &format!(
        "<p class=\"meta\">Written {} by sweep {}{}.</p>\n",
        escape(p.generated),
        escape(p.code_version),
        match p.refresh {
            Some(secs) => format!("; the sweep is running and this page reloads every {secs} s"),
            None => String::new(),
        }
    );

    s += "<h2>Configurations</h2>\n";
    if let Some(b) = &r.baseline {
        s += &format!(
            "<p>Each configuration against the baseline <code>{}</code> on {} (Δ, its 95% CI \
             and Welch's p over seeds). Click a column to sort.</p>\n",
            escape(b),
            escape(&r.metric)
        );
    } else {
        s += "<p>Click a column to sort.</p>\n";
    }
    let (header, rows, text_cols) = r.table();
    s += &table(&header, &rows, text_cols, "sortable");
    s += &format!("<pre>{}</pre>\n", escape(r.notes().trim_end()));

    if !p.charts.is_empty() {
        s += "<h2>Charts</h2>\n";
        for (title, svg) in p.charts {
            s += &format!(
                "<figure>\n{}\n<figcaption>{}</figcaption>\n</figure>\n",
                svg.trim(),
                escape(title)
            );
        }
    }

    s += "<h2>Trials</h2>\n<p>Open a trial id for its fully resolved configuration.</p>\n";
    s += &trials(r);

    s += &format!(
        "<h2>Sweep file</h2>\n<p class=\"meta\">{}, as run</p>\n<pre>{}</pre>\n",
        escape(p.sweep_file),
        escape(p.sweep_text.trim_end())
    );
    s += &format!("<script>{SORT_SCRIPT}</script>\n</body>\n</html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_is_escaped_for_element_content_and_attributes() {
        assert_eq!(
            escape("a < b && c > \"d\" 'e'"),
            "a &lt; b &amp;&amp; c &gt; &quot;d&quot; &#39;e&#39;"
        );
    }
}
