/// Plain-text renderings of a result document: a table for the terminal and CSV for
/// spreadsheets. Both are built from the document, never from live values.
public enum ResultTable {
    public static func render(_ doc: ResultDocument) -> String {
        var out = ""
        for run in doc.runs {
            out += "\n\(run.scenario):\(run.variant)  status: \(run.status.rawValue)"
            if run.repetitions > 0 { out += "  repetitions: \(run.repetitions)" }
            if run.warmup > 0 { out += " (+\(run.warmup) warm-up)" }
            out += "\n"
            if let reason = run.reason { out += "  reason: \(reason)\n" }
            let params = run.params.values.keys.sorted().map { "\($0)=\(run.params.values[$0]!)" }
            if !params.isEmpty { out += "  params: \(params.joined(separator: " "))\n" }
            if !run.metrics.isEmpty {
                var rows = [["metric", "unit", "median", "mean", "stddev", "min", "max", "95% CI"]]
                for m in run.metrics {
                    let s = m.summary
                    let ci = s.ci95.map { "[\(formatNumber($0[0])), \(formatNumber($0[1]))]" } ?? "-"
                    rows.append([m.name, m.unit.rawValue, formatNumber(s.median), formatNumber(s.mean),
                                 formatNumber(s.stddev), formatNumber(s.min), formatNumber(s.max), ci])
                }
                out += grid(rows, indent: "  ")
            }
            let failedChecks = run.checks.filter { !$0.agrees }
            if !run.checks.isEmpty {
                let names = Set(run.checks.map(\.name))
                for name in names.sorted() {
                    let cs = run.checks.filter { $0.name == name }
                    let bad = cs.filter { !$0.agrees }
                    let exp = cs.map { formatNumber($0.expected) }
                    let obs = cs.map { formatNumber($0.observed) }
                    out += "  check \(name): expected \(Set(exp).sorted().joined(separator: "/")), kernel says \(obs.joined(separator: ", ")) (tolerance \(cs[0].tolerance)) — "
                    out += bad.isEmpty ? "agrees\n" : "DISAGREES in \(bad.count) of \(cs.count) repetitions\n"
                }
            }
            _ = failedChecks
            if !run.settings.changed.isEmpty {
                out += "  settings borrowed: " + run.settings.changed.keys.sorted().map {
                    "\($0.split(separator: "/").suffix(2).joined(separator: "/"))=\(run.settings.changed[$0]!.to)"
                }.joined(separator: " ") + (run.settings.restored ? " (restored)" : " (NOT restored)") + "\n"
            }
            for note in run.notes { out += "  note: \(note)\n" }
        }
        return out
    }

    static func grid(_ rows: [[String]], indent: String) -> String {
        let widths = (0..<rows[0].count).map { c in rows.map { $0[c].count }.max() ?? 0 }
        return rows.map { row in
            indent + row.enumerated().map { c, cell in
                c == 0 ? cell.padding(widths[c]) : cell.leftPadding(widths[c])
            }.joined(separator: "  ")
        }.joined(separator: "\n") + "\n"
    }

    /// One line per (run, metric): the summary and the raw samples.
    public static func csv(_ doc: ResultDocument) -> String {
        var lines = ["scenario,variant,status,params,metric,unit,better,repetitions,median,mean,stddev,min,max,ci95_low,ci95_high,samples"]
        for run in doc.runs {
            let params = run.params.values.keys.sorted().map { "\($0)=\(run.params.values[$0]!)" }.joined(separator: ";")
            if run.metrics.isEmpty {
                lines.append([run.scenario, run.variant, run.status.rawValue, params, "", "", "", "0", "", "", "", "", "", "", "", ""].map(csvField).joined(separator: ","))
            }
            for m in run.metrics {
                let s = m.summary
                let fields = [run.scenario, run.variant, run.status.rawValue, params, m.name, m.unit.rawValue, m.better.rawValue,
                              String(m.samples.count), "\(s.median)", "\(s.mean)", "\(s.stddev)", "\(s.min)", "\(s.max)",
                              s.ci95.map { "\($0[0])" } ?? "", s.ci95.map { "\($0[1])" } ?? "",
                              m.samples.map { "\($0)" }.joined(separator: " ")]
                lines.append(fields.map(csvField).joined(separator: ","))
            }
        }
        return lines.joined(separator: "\n") + "\n"
    }

    static func csvField(_ s: String) -> String {
        s.contains(",") || s.contains("\"") || s.contains("\n") ? "\"" + s.replacingAll("\"", with: "\"\"") + "\"" : s
    }
}

extension String {
    func padding(_ width: Int) -> String { count >= width ? self : self + String(repeating: " ", count: width - count) }
    func leftPadding(_ width: Int) -> String { count >= width ? self : String(repeating: " ", count: width - count) + self }
    func replacingAll(_ a: String, with b: String) -> String {
        split(separator: Character(a), omittingEmptySubsequences: false).joined(separator: b)
    }
}
