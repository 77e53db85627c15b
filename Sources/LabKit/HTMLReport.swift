import Foundation

/// `memlab report`: one self-contained HTML page (inline CSS and SVG; one small inline script
/// that only records page errors and counts the drawn charts) from result documents. Charts
/// are chosen from the data, for any scenario:
///
/// - `chart-timeseries`: every recorded time series (runs of one scenario:variant overlaid);
/// - `chart-sweep`: each metric against the swept parameter (a recorded sweep, or runs of one
///   scenario:variant that differ in exactly one numeric parameter), median with min–max;
/// - `chart-latency`: each recorded latency distribution as a CDF, one line per run (or, for
///   a run with no recorded distribution, the percentile metrics tagged with its name);
/// - `chart-tradeoff`: `downtime` (and `bytes_transferred`) against `total_time`, a point per run;
/// - `chart-bars`: medians per variant of a scenario, and a run's time metrics side by side;
/// - `chart-across`: the same run in several result files, per metric.
public struct HTMLReport {
    public struct Input {
        public var name: String
        public var document: ResultDocument
        public init(name: String, document: ResultDocument) {
            self.name = name
            self.document = document
        }
    }

    let inputs: [Input]
    let generatedAt: String
    private var chartCount = 0

    public init(_ inputs: [Input], generatedAt: String = isoTimestamp()) {
        self.inputs = inputs
        self.generatedAt = generatedAt
    }

    public static func render(_ inputs: [Input], generatedAt: String = isoTimestamp()) -> String {
        var r = HTMLReport(inputs, generatedAt: generatedAt)
        return r.page()
    }

    mutating func nextID(_ kind: String) -> String {
        chartCount += 1
        return "chart-\(chartCount)-\(kind)"
    }

    mutating func page() -> String {
        var body = ""
        body += "<header><h1>memlab report</h1><p class=\"meta\">generated \(htmlEscape(generatedAt)) from \(inputs.count) result file\(inputs.count == 1 ? "" : "s")</p></header>\n"
        body += "<nav><ol>"
        for (i, input) in inputs.enumerated() {
            let runs = input.document.runs.map { "\($0.scenario):\($0.variant)" }
            let kinds = uniqued(runs)
            body += "<li><a href=\"#result-\(i + 1)\">\(htmlEscape(input.name))</a> — \(htmlEscape(kinds.joined(separator: ", ")))</li>"
        }
        body += "</ol></nav>\n"
        for (i, input) in inputs.enumerated() { body += section(input, index: i + 1) }
        if inputs.count > 1 { body += acrossFiles() }
        body += "<footer><div id=\"page-errors\" class=\"errors\"></div><p>memlab result schema \(htmlEscape(ResultDocument.schemaName)); medians with min–max whiskers; units as recorded.</p></footer>\n"
        return """
        <!DOCTYPE html>
        <html lang="en">
        <head>
        <meta charset="utf-8">
        <meta name="viewport" content="width=device-width, initial-scale=1">
        <title>memlab report</title>
        <style>\(Self.css)</style>
        <script>\(Self.script)</script>
        </head>
        <body data-errors="0">
        \(body)</body>
        </html>

        """
    }

    // MARK: one result file

    mutating func section(_ input: Input, index: Int) -> String {
        let doc = input.document
        var s = "<section class=\"result\" id=\"result-\(index)\"><h2>\(htmlEscape(input.name))</h2>\n"
        s += "<p class=\"meta\">started \(htmlEscape(doc.startedAt)) · \(htmlEscape(doc.tool.name)) \(htmlEscape(doc.tool.version))</p>\n"
        let previous = index >= 2 ? inputs[index - 2].document.host : nil
        s += hostTable(doc.host, open: previous != doc.host)
        // Charts that span runs first: sweeps, variants.
        var group = ""
        for g in sweepGroups(doc.runs) { group += sweepCharts(g) }
        group += tradeoffCharts(doc.runs)
        group += variantBars(doc.runs)
        group += latencyCharts(doc.runs.filter { $0.status == .ok && $0.sweep == nil }, title: nil)
        if !group.isEmpty { s += "<div class=\"charts group-charts\">\(group)</div>\n" }
        for (k, run) in doc.runs.enumerated() { s += runSection(run, id: "run-\(index)-\(k + 1)", among: doc.runs) }
        return s + "</section>\n"
    }

    func hostTable(_ h: ResultDocument.Host, open: Bool) -> String {
        var rows: [(String, String)] = [
            ("kernel", h.kernel), ("arch", h.arch), ("cpu", h.cpuModel), ("cpus", String(h.cpus)),
            ("memory", SVGChart.axisText(Double(h.memoryBytes), "bytes") + " (\(h.memoryBytes) bytes)"), ("numa nodes", String(h.numaNodes)),
            ("page size", "\(h.pageSize) bytes"), ("virtualized", h.virtualized ? "yes" : "no"),
            ("KSM", h.features.ksm ? "yes" : "no"), ("THP", h.features.thp),
            ("hugetlb sizes", h.features.hugetlbSizes.map { formatBytes($0) }.joined(separator: ", ")),
            ("userfaultfd", h.features.userfaultfd ? "yes" : "no"), ("zswap", h.features.zswap ? "yes" : "no"),
            ("swap", SVGChart.axisText(Double(h.features.swapBytes), "bytes")),
        ]
        if let g = h.guest {
            rows += [
                ("ran in", "a QEMU guest under \(g.accelerator.uppercased())\(g.accelerator == "tcg" ? " (emulated CPU: timings comparable only with TCG runs)" : "")"),
                ("guest kernel file", g.kernelPath), ("guest topology", "\(g.cpus) CPUs, \(g.memoryMiB) MiB, \(g.numaNodes) node(s), cgroup \(g.cgroup)"),
                ("guest boot", "\(formatNumber(g.bootS)) s"), ("machine under it", "Linux \(g.hypervisorKernel), \(g.qemu)"),
            ]
            if let a = g.append { rows.append(("guest kernel parameters", a)) }
            if let n = g.panickedBoots { rows.append(("boots that panicked", "\(n), before the guest's runner started (one is booted again; see the runs' notes)")) }
        }
        return "<details class=\"host\"\(open ? " open" : "")><summary>host\(open ? "" : " (as above)")</summary><table class=\"host-table\">" + rows.map { "<tr><th>\(htmlEscape($0.0))</th><td>\(htmlEscape($0.1))</td></tr>" }.joined() + "</table></details>\n"
    }

    mutating func runSection(_ run: RunResult, id: String, among runs: [RunResult]) -> String {
        var s = "<section class=\"run status-\(run.status.rawValue)\" id=\"\(id)\"><h3>\(htmlEscape(run.scenario)):\(htmlEscape(run.variant)) <span class=\"status\">\(run.status.rawValue)</span></h3>\n"
        var meta = "repetitions \(run.repetitions)"
        if run.warmup > 0 { meta += " (+\(run.warmup) warm-up)" }
        meta += " · \(formatNumber(run.durationS)) s"
        if let sw = run.sweep {
            meta += " · sweep point \(sw.point)/\(sw.points) over " + sw.parameters.map(\.parameter).joined(separator: " × ")
        }
        if let cpus = run.placement.cpus { meta += " · cpus \(cpus.map(String.init).joined(separator: ","))" }
        if let node = run.placement.node { meta += " · node \(node)" }
        s += "<p class=\"meta\">\(htmlEscape(meta))</p>\n"
        if let reason = run.reason { s += "<p class=\"reason\">\(htmlEscape(reason))</p>\n" }
        let params = run.params.values.keys.sorted().map { "<code>\(htmlEscape($0))=\(htmlEscape(run.params.values[$0]!.description))</code>" }
        if !params.isEmpty { s += "<p class=\"params\">\(params.joined(separator: " "))</p>\n" }
        if !run.settings.changed.isEmpty {
            s += "<table class=\"settings\"><tr><th>setting borrowed</th><th>from</th><th>to</th></tr>"
            for k in run.settings.changed.keys.sorted() {
                let c = run.settings.changed[k]!
                s += "<tr><td><code>\(htmlEscape(k))</code></td><td>\(htmlEscape(c.from))</td><td>\(htmlEscape(c.to))</td></tr>"
            }
            s += "<tr><td colspan=\"3\" class=\"\(run.settings.restored ? "ok" : "bad")\">\(run.settings.restored ? "restored: every setting read back with its original value" : "NOT restored")</td></tr></table>\n"
        }
        if !run.metrics.isEmpty {
            s += "<table class=\"metrics\"><tr><th>metric</th><th>unit</th><th>better</th><th>median</th><th>mean</th><th>stddev</th><th>min</th><th>max</th><th>95% CI of mean</th><th>n</th></tr>"
            for m in run.metrics {
                let x = m.summary
                let ci = x.ci95.map { "[\(formatNumber($0[0])), \(formatNumber($0[1]))]" } ?? "–"
                s += "<tr><td>\(htmlEscape(m.name))</td><td>\(htmlEscape(m.unit.rawValue))</td><td>\(m.better.rawValue)</td>"
                s += [x.median, x.mean, x.stddev, x.min, x.max].map { "<td class=\"num\">\(formatNumber($0))</td>" }.joined()
                s += "<td class=\"num\">\(htmlEscape(ci))</td><td class=\"num\">\(m.samples.count)</td></tr>"
            }
            s += "</table>\n"
        }
        if !run.checks.isEmpty {
            s += "<table class=\"checks\"><tr><th>check</th><th>expected</th><th>kernel says</th><th>tolerance</th><th>verdict</th></tr>"
            for name in uniqued(run.checks.map(\.name)) {
                let cs = run.checks.filter { $0.name == name }
                let bad = cs.filter { !$0.agrees }.count
                s += "<tr><td>\(htmlEscape(name))</td><td class=\"num\">\(htmlEscape(Array(Set(cs.map { formatNumber($0.expected) })).sorted().joined(separator: "/")))</td>"
                s += "<td class=\"num\">\(htmlEscape(cs.map { formatNumber($0.observed) }.joined(separator: ", ")))</td><td>\(htmlEscape(cs[0].tolerance))</td>"
                s += bad == 0 ? "<td class=\"ok\">agrees</td></tr>" : "<td class=\"bad\">disagrees in \(bad) of \(cs.count)</td></tr>"
            }
            s += "</table>\n"
        }
        for n in run.notes { s += "<p class=\"note\">note: \(htmlEscape(n))</p>\n" }
        var charts = ""
        // Time series of this run, unless the run's group already overlays them.
        let sameKind = runs.filter { $0.scenario == run.scenario && $0.variant == run.variant && $0.status == .ok }
        if sameKind.count == 1 || run.sweep == nil && sameKind.filter({ $0.sweep == nil }).count == 1 {
            for ts in run.timeseries { charts += timeseriesChart(ts.name, unit: ts.unit, series: [(run.scenario + ":" + run.variant, ts)]) }
        }
        charts += timeBars(run)
        if !charts.isEmpty { s += "<div class=\"charts\">\(charts)</div>\n" }
        return s + "</section>\n"
    }

    // MARK: chart choices

    mutating func timeseriesChart(_ name: String, unit: MetricUnit, series: [(String, TimeSeries)]) -> String {
        let id = nextID("timeseries")
        let ss = series.map { label, ts in
            SVGChart.Series(name: label, points: zip(ts.t, ts.values).map { SVGChart.Point(x: $0, y: $1) })
        }
        let interval = series.first.map { formatNumber($0.1.intervalS) } ?? "?"
        return SVGChart.line(id: id, kind: "timeseries", title: "\(name) over time",
                             x: .init(label: "time", unit: "s"), y: .init(label: name, unit: unit.rawValue),
                             series: ss, caption: "\(name), sampled every \(interval) s (first measured repetition)", steps: false)
    }

    /// A run's time-valued metrics (not percentiles), side by side.
    mutating func timeBars(_ run: RunResult) -> String {
        guard run.status == .ok else { return "" }
        let percentileNames = Set(Self.percentileGroups(run).values.flatMap { $0.map(\.metric.name) })
        var out = ""
        for unit in [MetricUnit.ns, .s] {
            let ms = run.metrics.filter { $0.unit == unit && !percentileNames.contains($0.name) }
            guard ms.count >= 2 else { continue }
            out += SVGChart.bars(id: nextID("bars"), kind: "bars", title: "\(run.scenario):\(run.variant) — \(unit == .ns ? "latencies" : "times")",
                                 y: .init(label: "median", unit: unit.rawValue),
                                 bars: ms.map { .init(label: $0.name, value: $0.summary.median, low: $0.summary.min, high: $0.summary.max) },
                                 caption: "median of \(run.repetitions) repetition(s); whiskers: min–max")
        }
        return out
    }

    struct SweepGroup {
        var scenario: String
        var variant: String
        var axis: String
        var others: [String]
        var runs: [RunResult]
        var recorded: Bool
    }

    /// Recorded sweeps, then runs of one scenario:variant that differ in one numeric parameter.
    func sweepGroups(_ runs: [RunResult]) -> [SweepGroup] {
        var groups: [SweepGroup] = []
        var byGroup: [Int: [RunResult]] = [:]
        var order: [Int] = []
        for r in runs where r.status == .ok {
            guard let sw = r.sweep else { continue }
            if byGroup[sw.group] == nil { order.append(sw.group) }
            byGroup[sw.group, default: []].append(r)
        }
        for g in order {
            let rs = byGroup[g]!
            let sw = rs[0].sweep!
            groups.append(SweepGroup(scenario: rs[0].scenario, variant: rs[0].variant, axis: sw.parameters[0].parameter,
                                     others: sw.parameters.dropFirst().map(\.parameter), runs: rs, recorded: true))
        }
        // Implicit: the same scenario:variant run at several values of one numeric parameter.
        var kinds: [String] = []
        var byKind: [String: [RunResult]] = [:]
        for r in runs where r.status == .ok && r.sweep == nil {
            let k = "\(r.scenario):\(r.variant)"
            if byKind[k] == nil { kinds.append(k) }
            byKind[k, default: []].append(r)
        }
        for k in kinds {
            let rs = byKind[k]!
            guard rs.count >= 2 else { continue }
            let differing = Self.distinguishing(rs)
            guard differing.count == 1, let p = differing.first,
                  rs.allSatisfy({ Self.numeric($0.params[p]) != nil }) else { continue }
            groups.append(SweepGroup(scenario: rs[0].scenario, variant: rs[0].variant, axis: p, others: [], runs: rs, recorded: false))
        }
        return groups
    }

    mutating func sweepCharts(_ g: SweepGroup) -> String {
        var out = ""
        let names = uniqued(g.runs.flatMap { $0.metrics.map(\.name) })
        let xsAll = g.runs.compactMap { Self.numeric($0.params[g.axis]) }
        let numericAxis = xsAll.count == g.runs.count
        // Series: one per combination of the other swept parameters.
        func seriesKey(_ r: RunResult) -> String {
            g.others.map { Self.parameterLabel(r, $0) }.joined(separator: " ")
        }
        let keys = uniqued(g.runs.map(seriesKey))
        let xUnit = Self.parameterUnit(g.axis, in: g.runs)
        let distinct = Array(Set(xsAll)).sorted()
        let xLog = numericAxis && distinct.count >= 3 && (distinct.first ?? 0) > 0 && distinct.last! / distinct.first! >= 16
        let how = g.recorded ? "sweep" : "runs differing only in \(g.axis)"
        // Time series of every point, overlaid, once per series name.
        let tsNames = uniqued(g.runs.flatMap { $0.timeseries.map(\.name) })
        for name in tsNames {
            let members = g.runs.compactMap { r -> (String, TimeSeries)? in
                guard let ts = r.timeseries.first(where: { $0.name == name }) else { return nil }
                let label = ([g.axis] + g.others).map { Self.parameterLabel(r, $0) }.joined(separator: " ")
                return (label, ts)
            }
            if let unit = members.first?.1.unit { out += timeseriesChart(name, unit: unit, series: members) }
        }
        for name in names {
            let withMetric = g.runs.filter { $0.metric(name) != nil }
            guard withMetric.count >= 2, let unit = withMetric.first?.metric(name)?.unit else { continue }
            let title = "\(g.scenario):\(g.variant) — \(name) against \(g.axis)"
            if numericAxis {
                let series = keys.map { key in
                    SVGChart.Series(name: key.isEmpty ? name : key, points: withMetric.filter { seriesKey($0) == key }.compactMap { r in
                        guard let m = r.metric(name), let x = Self.numeric(r.params[g.axis]) else { return nil }
                        return SVGChart.Point(x: x, y: m.summary.median, low: m.summary.min, high: m.summary.max)
                    })
                }.filter { !$0.points.isEmpty }
                let ys = series.flatMap { $0.points.map(\.y) }
                let yLog = ys.allSatisfy { $0 > 0 } && (ys.max() ?? 1) / (ys.min() ?? 1) >= 100
                out += SVGChart.line(id: nextID("sweep"), kind: "sweep", title: title,
                                     x: .init(label: g.axis, unit: xUnit, log: xLog, ticks: distinct.count <= 10 ? distinct : nil),
                                     y: .init(label: name, unit: unit.rawValue, log: yLog), series: series,
                                     caption: "\(how): median per point, whiskers min–max of the repetitions")
            } else {
                out += SVGChart.bars(id: nextID("sweep"), kind: "sweep", title: title, y: .init(label: name, unit: unit.rawValue),
                                     bars: withMetric.map { r in
                                         let m = r.metric(name)!
                                         return .init(label: "\(Self.parameterLabel(r, g.axis)) \(seriesKey(r))",
                                                      value: m.summary.median, low: m.summary.min, high: m.summary.max)
                                     }, caption: "\(how): median, whiskers min–max")
            }
        }
        out += latencyCharts(g.runs, title: "\(g.scenario):\(g.variant) by \(([g.axis] + g.others).joined(separator: ", "))")
        return out
    }

    /// Bars per variant: runs of one scenario (outside sweeps) with at least two variants.
    mutating func variantBars(_ runs: [RunResult]) -> String {
        var out = ""
        let ok = runs.filter { $0.status == .ok && $0.sweep == nil }
        let scenarios = uniqued(ok.map(\.scenario))
        for s in scenarios {
            let rs = ok.filter { $0.scenario == s }
            guard Set(rs.map(\.variant)).count >= 2 else { continue }
            let names = uniqued(rs.flatMap { $0.metrics.map(\.name) })
            for name in names {
                // Labelled by what differs among the runs in this chart, not in the whole file.
                let members = rs.filter { $0.metric(name) != nil }
                guard members.count >= 2, let unit = members[0].metric(name)?.unit else { continue }
                let labels = Self.labels(members)
                out += SVGChart.bars(id: nextID("bars"), kind: "bars", title: "\(s) — \(name) per variant", y: .init(label: name, unit: unit.rawValue),
                                     bars: members.indices.map { i in
                                         let m = members[i].metric(name)!
                                         return .init(label: labels[i], value: m.summary.median, low: m.summary.min, high: m.summary.max)
                                     }, caption: "median per run, whiskers min–max")
            }
        }
        return out
    }

    /// The migration trade-off: where runs of one scenario report both `downtime` and
    /// `total_time`, one point per run (median, whiskers min–max of the downtime), so the
    /// price of a short stop (a long migration) and of a short migration (a long stop) shows
    /// at a glance. Also `bytes_transferred` against `total_time` when present.
    mutating func tradeoffCharts(_ runs: [RunResult]) -> String {
        var out = ""
        let ok = runs.filter { $0.status == .ok }
        for s in uniqued(ok.map(\.scenario)) {
            let rs = ok.filter { $0.scenario == s && $0.metric("total_time") != nil }
            guard rs.count >= 2 else { continue }
            for yName in ["downtime", "bytes_transferred"] {
                let members = rs.filter { $0.metric(yName) != nil }
                guard members.count >= 2, let x = members[0].metric("total_time"), let y = members[0].metric(yName) else { continue }
                let labels = Self.labels(members)
                let series = members.indices.map { i -> SVGChart.Series in
                    let t = members[i].metric("total_time")!.summary, m = members[i].metric(yName)!.summary
                    return .init(name: labels[i], points: [SVGChart.Point(x: t.median, y: m.median, low: m.min, high: m.max)])
                }
                let ys = series.map { $0.points[0].y }
                let yLog = ys.allSatisfy { $0 > 0 } && (ys.max() ?? 1) / (ys.min() ?? 1) >= 20
                out += SVGChart.line(id: nextID("tradeoff"), kind: "tradeoff", title: "\(s) — \(yName) against total_time",
                                     x: .init(label: "total_time", unit: x.unit.rawValue), y: .init(label: yName, unit: y.unit.rawValue, log: yLog),
                                     series: series, caption: "one point per run: median, whiskers min–max of \(yName); lower left is better on both")
            }
        }
        return out
    }

    /// Latency distributions as percentile curves, one per run: the recorded distribution, or
    /// else the run's percentile metrics of that distribution.
    mutating func latencyCharts(_ runs: [RunResult], title: String?) -> String {
        var out = ""
        let ok = runs.filter { $0.status == .ok }
        var bases: [String] = []
        for r in ok {
            for b in Self.distributionCurves(r).keys.sorted() where !bases.contains(b) { bases.append(b) }
            for b in Self.percentileGroups(r).keys.sorted() where !bases.contains(b) { bases.append(b) }
        }
        for base in bases {
            var series: [SVGChart.Series] = []
            var unit = "ns"
            var full = false
            let members = ok.filter { Self.distributionCurves($0)[base] != nil || (Self.percentileGroups($0)[base]?.count ?? 0) >= 2 }
            let labels = Self.labels(members)
            for (i, r) in members.enumerated() {
                // The full distribution where the run recorded one; else its percentile metrics.
                if let curve = Self.distributionCurves(r)[base] {
                    unit = curve.unit.rawValue
                    full = true
                    series.append(.init(name: labels[i], points: zip(curve.values, curve.percentiles).map { x, y in
                        SVGChart.Point(x: x, y: y, low: nil, high: nil)
                    }))
                    continue
                }
                guard let percentiles = Self.percentileGroups(r)[base], percentiles.count >= 2 else { continue }
                unit = percentiles[0].metric.unit.rawValue
                series.append(.init(name: labels[i], points: percentiles.map { m in
                    SVGChart.Point(x: m.metric.summary.median, y: m.percentile, low: nil, high: nil)
                }))
            }
            guard !series.isEmpty else { continue }
            let xs = series.flatMap { $0.points.map(\.x) }
            let xLog = xs.allSatisfy { $0 > 0 } && (xs.max() ?? 1) / (xs.min() ?? 1) >= 20
            out += SVGChart.line(id: nextID("latency"), kind: "latency", title: "\(base) distribution" + (title.map { " — \($0)" } ?? ""),
                                 x: .init(label: base, unit: unit, log: xLog), y: .init(label: "percentile", unit: "%", ticks: [0, 25, 50, 75, 90, 100]),
                                 series: series, caption: full
                                    ? "CDF of every event: value at each percentile, median over repetitions; 0 = min, 100 = max"
                                    : "percentiles of every event (median over repetitions); 100 = max", steps: true)
        }
        return out
    }

    /// How a file is named in charts across files: its kernel when the files ran on different
    /// kernels (the axis of a kernel comparison), else its file name.
    func acrossLabel(_ input: Input) -> String {
        let kernels = Set(inputs.map(\.document.host.kernel))
        guard kernels.count > 1 else { return (input.name as NSString).lastPathComponent }
        let label = Comparison.kernelLabel(input.document.host)
        let same = inputs.filter { Comparison.kernelLabel($0.document.host) == label }.count
        return same > 1 ? "\(label) \((input.name as NSString).lastPathComponent)" : label
    }

    /// The same scenario:variant and parameters in several files: bars per file, per metric;
    /// across kernels also one table, each kernel a column (mmtests' compare-kernels).
    mutating func acrossFiles() -> String {
        var keys: [String] = []
        var found: [String: [(String, RunResult)]] = [:]
        var everyRun: [String: [(String, RunResult)]] = [:]
        for input in inputs {
            for r in input.document.runs {
                let key = "\(r.scenario):\(r.variant) " + r.params.values.keys.sorted().map { "\($0)=\(r.params.values[$0]!)" }.joined(separator: " ")
                let label = acrossLabel(input)
                if !(everyRun[key]?.contains { $0.0 == label } ?? false) { everyRun[key, default: []].append((label, r)) }
                guard r.status == .ok else { continue }
                if found[key] == nil { keys.append(key) }
                if !(found[key]?.contains { $0.0 == label } ?? false) { found[key, default: []].append((label, r)) }
            }
        }
        let acrossKernels = Set(inputs.map(\.document.host.kernel)).count > 1
        var table = ""
        if acrossKernels {
            let columns = uniqued(inputs.map(acrossLabel))
            for key in uniqued(keys + everyRun.keys.sorted()) {
                guard let rs = everyRun[key], rs.count >= 2 else { continue }
                func cell(_ col: String, _ f: (RunResult) -> String) -> String {
                    "<td>\(htmlEscape(rs.first { $0.0 == col }.map { f($0.1) } ?? "—"))</td>"
                }
                table += "<h3>\(htmlEscape(key))</h3><table class=\"kernels\"><tr><th></th>" + columns.map { "<th>\(htmlEscape($0))</th>" }.joined() + "</tr>"
                table += "<tr><th>status</th>" + columns.map { c in cell(c) { $0.status.rawValue + ($0.status == .ok ? "" : ": " + ($0.reason ?? "")) } }.joined() + "</tr>"
                for name in uniqued(rs.flatMap { $0.1.metrics.map(\.name) }) {
                    let unit = rs.compactMap { $0.1.metric(name)?.unit.rawValue }.first ?? ""
                    table += "<tr><th>\(htmlEscape(name)) (\(htmlEscape(unit)))</th>" + columns.map { c in cell(c) { $0.metric(name).map { formatNumber($0.summary.median) } ?? "—" } }.joined() + "</tr>"
                }
                for check in uniqued(rs.flatMap { $0.1.checks.map(\.name) }) {
                    table += "<tr><th>check \(htmlEscape(check))</th>" + columns.map { c in cell(c) { r in
                        let cs = r.checks.filter { $0.name == check }
                        return cs.isEmpty ? "not made" : cs.allSatisfy(\.agrees) ? "agrees" : "DISAGREES"
                    } }.joined() + "</tr>"
                }
                table += "</table>\n"
            }
        }
        var out = ""
        for key in keys {
            let rs = found[key]!
            guard rs.count >= 2 else { continue }
            let names = uniqued(rs.flatMap { $0.1.metrics.map(\.name) })
            for name in names {
                let ms = rs.compactMap { f, r in r.metric(name).map { (f, $0) } }
                guard ms.count >= 2 else { continue }
                out += SVGChart.bars(id: nextID("across"), kind: "across", title: "\(name) across \(acrossKernels ? "kernels" : "files")", y: .init(label: name, unit: ms[0].1.unit.rawValue),
                                     bars: ms.map { .init(label: $0.0, value: $0.1.summary.median, low: $0.1.summary.min, high: $0.1.summary.max) },
                                     caption: key + " — median per file, whiskers min–max (memlab compare tests the difference)")
            }
        }
        guard !out.isEmpty || !table.isEmpty else { return "" }
        let kernelsSection = table.isEmpty ? "" : "<h2>kernels side by side</h2><p class=\"meta\">medians; a guest's timings are its accelerator's (see each host table)</p>\(table)"
        return "<section class=\"across\" id=\"across-files\">\(kernelsSection)<h2>across \(acrossKernels ? "kernels" : "files")</h2><div class=\"charts\">\(out)</div></section>\n"
    }

    // MARK: helpers

    struct PercentileMember {
        var metric: Metric
        var percentile: Double
    }

    /// A run's percentile metrics by distribution, from the tags memlab records on them
    /// (`distribution`, `percentile`). Only a run from a document written before memlab
    /// recorded tags or parameter units is read from its metric names (`legacyPercentileGroups`).
    static func percentileGroups(_ run: RunResult) -> [String: [PercentileMember]] {
        let tagged = run.metrics.filter { $0.distribution != nil && $0.percentile != nil }
        if tagged.isEmpty && run.paramUnits.isEmpty { return legacyPercentileGroups(run.metrics) }
        var groups: [String: [PercentileMember]] = [:]
        for m in tagged { groups[m.distribution!, default: []].append(PercentileMember(metric: m, percentile: m.percentile!)) }
        return groups.mapValues { $0.sorted { $0.percentile < $1.percentile } }
    }

    /// Documents written before metrics carried their distribution: NAME_p50, NAME_p99,
    /// NAME_p999, NAME_max (and NAME_min) grouped by NAME; only groups with at least one pNN member.
    static func legacyPercentileGroups(_ metrics: [Metric]) -> [String: [PercentileMember]] {
        var groups: [String: [PercentileMember]] = [:]
        for m in metrics {
            guard let us = m.name.lastIndex(of: "_") else { continue }
            let base = String(m.name[..<us]), suffix = String(m.name[m.name.index(after: us)...])
            var pct: Double?
            if suffix == "max" { pct = 100 } else if suffix == "min" { pct = 0 }
            else if suffix.hasPrefix("p"), let digits = Int(suffix.dropFirst()), suffix.count >= 2 {
                let d = String(suffix.dropFirst())
                pct = d.count <= 2 ? Double(digits) : Double("\(d.prefix(2)).\(d.dropFirst(2))")
            }
            if let p = pct, p >= 0, p <= 100 { groups[base, default: []].append(PercentileMember(metric: m, percentile: p)) }
        }
        return groups.filter { _, ms in ms.contains { $0.percentile > 0 && $0.percentile < 100 } }
            .mapValues { $0.sorted { $0.percentile < $1.percentile } }
    }

    struct Curve {
        var unit: MetricUnit
        var percentiles: [Double]
        var values: [Double]
    }

    /// A run's recorded distributions by name, each the median over repetitions at every
    /// percentile of the grid (repetitions share the grid).
    static func distributionCurves(_ run: RunResult) -> [String: Curve] {
        var byName: [String: [Distribution]] = [:]
        for d in run.distributions { byName[d.name, default: []].append(d) }
        return byName.compactMapValues { ds in
            let grid = ds[0].percentiles
            let same = ds.filter { $0.percentiles == grid && $0.values.count == grid.count }
            guard !same.isEmpty else { return nil }
            let values = grid.indices.map { k in Statistics.median(same.map { $0.values[k] }) }
            return Curve(unit: ds[0].unit, percentiles: grid, values: values)
        }
    }

    /// Parameters whose values differ among `runs`.
    static func distinguishing(_ runs: [RunResult]) -> [String] {
        let keys = Set(runs.flatMap { $0.params.values.keys }).sorted()
        return keys.filter { k in Set(runs.map { $0.params[k]?.description ?? "" }).count > 1 }
    }

    /// Short labels for the runs one chart compares: the variant where they are of several,
    /// and the parameters that differ among runs of the same scenario:variant — not one that
    /// only differs from variant to variant (tlb's `accesses` against fault's default), which
    /// the variant already names. Where two labels are still alike, the other parameters that
    /// differ are added.
    static func labels(_ runs: [RunResult]) -> [String] {
        func kind(_ r: RunResult) -> String { "\(r.scenario):\(r.variant)" }
        let scenarios = Set(runs.map(\.scenario)).count > 1
        let kinds = Set(runs.map(kind)).count > 1
        var differing: [String: [String]] = [:]
        for k in Set(runs.map(kind)) { differing[k] = distinguishing(runs.filter { kind($0) == k }) }
        var labels = runs.map { r -> String in
            let diff = differing[kind(r)] ?? []
            var parts: [String] = []
            if kinds || diff.isEmpty { parts.append(scenarios ? kind(r) : r.variant) }
            parts += diff.map { parameterLabel(r, $0) }
            return parts.joined(separator: " ")
        }
        if Set(labels).count < labels.count {
            let all = distinguishing(runs)
            labels = runs.indices.map { i in
                let shown = differing[kind(runs[i])] ?? []
                return ([labels[i]] + all.filter { !shown.contains($0) }.map { parameterLabel(runs[i], $0) }).joined(separator: " ")
            }
        }
        return labels
    }

    /// `name=value`, a size in binary units (size=32M) where the run recorded the parameter's unit.
    static func parameterLabel(_ run: RunResult, _ name: String) -> String {
        guard let v = run.params[name] else { return "\(name)=-" }
        if run.paramUnits[name] == ParameterUnit.bytes.rawValue, case .int(let b) = v { return "\(name)=\(formatBytes(b))" }
        return "\(name)=\(v.description)"
    }

    static func numeric(_ v: ParamValue?) -> Double? {
        switch v {
        case .int(let i)?: return Double(i)
        case .double(let d)?: return d
        default: return nil
        }
    }

    /// The unit of a swept parameter's axis, as the runs recorded it ("" for none).
    static func parameterUnit(_ name: String, in runs: [RunResult]) -> String {
        if let u = runs.lazy.compactMap({ $0.paramUnits[name] }).first { return u == ParameterUnit.none.rawValue ? "" : u }
        return legacyParameterUnit(name)
    }

    /// Documents written before parameters carried units: a guess from the name.
    static func legacyParameterUnit(_ name: String) -> String {
        let n = name.lowercased()
        if n.contains("size") || n.hasSuffix("bytes") || n.hasSuffix("limit") || n.hasSuffix("touch") { return "bytes" }
        if n.hasSuffix("_ms") || n.contains("millisecs") { return "ms" }
        if n.hasSuffix("_us") { return "µs" }
        if n.hasSuffix("_s") { return "s" }
        if n.hasSuffix("ratio") { return "ratio" }
        if n.hasSuffix("percent") { return "%" }
        if n.contains("pages") { return "pages" }
        return "count"
    }

    static let css = """
    body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:0 auto;max-width:1280px;padding:0 18px 40px;color:#222}
    h1{margin:18px 0 4px}h2{border-bottom:2px solid #1f77b4;padding-bottom:3px;margin-top:36px}h3{margin:22px 0 6px}
    .meta{color:#666;margin:2px 0}.status{font-size:12px;padding:1px 6px;border-radius:3px;background:#2ca02c;color:#fff;vertical-align:middle}
    .status-skipped .status{background:#7f7f7f}.status-failed .status{background:#d62728}.reason{background:#fff4e5;border-left:4px solid #ff7f0e;padding:6px 10px}
    table{border-collapse:collapse;margin:8px 0}th,td{border:1px solid #ddd;padding:3px 8px;text-align:left}th{background:#f4f6f8}
    td.num{text-align:right;font-variant-numeric:tabular-nums}.ok{color:#1a7f37}.bad{color:#d62728;font-weight:bold}
    table.kernels{border-collapse:collapse;margin:6px 0 14px}table.kernels th,table.kernels td{padding:2px 10px;border-bottom:1px solid #e3e6ea;text-align:left}
    .host-table th{width:140px}details.host summary{cursor:pointer;color:#555}code{background:#f4f6f8;padding:1px 4px;border-radius:3px}
    .note{color:#7a4b00}.charts{display:flex;flex-wrap:wrap;gap:12px}
    figure.chart{margin:8px 0;border:1px solid #e3e3e3;border-radius:4px;padding:4px;background:#fff}
    figure.chart figcaption{font-size:12px;color:#666;max-width:600px;padding:2px 6px}
    svg.chart-svg{display:block;max-width:100%;height:auto;font-size:11px}svg .chart-title{font-size:13px;font-weight:600}
    svg .axis-label{font-size:12px}svg .tick-label{fill:#444}svg .legend text{font-size:11px}
    .errors:empty{display:none}.errors{background:#fdecea;color:#a00;padding:8px;white-space:pre-wrap}
    nav ol{padding-left:20px}footer{margin-top:40px;color:#777;font-size:12px}
    """

    /// Records page errors into #page-errors and counts the charts that were laid out (a
    /// headless browser's --dump-dom then shows both); the page needs no script otherwise.
    static let script = """
    (function(){var errors=[];function show(){var e=document.getElementById('page-errors');if(e){e.textContent=errors.join('\\n');}if(document.body){document.body.setAttribute('data-errors',String(errors.length));}}
    window.addEventListener('error',function(ev){errors.push(String(ev.message||ev.type)+(ev.filename?' at '+ev.filename+':'+ev.lineno:''));show();},true);
    document.addEventListener('DOMContentLoaded',function(){var svgs=document.querySelectorAll('figure.chart svg');var drawn=0;
    for(var i=0;i<svgs.length;i++){var b=svgs[i].getBBox();if(b.width>0&&b.height>0&&svgs[i].querySelector('path,rect,circle')){drawn++;}}
    document.body.setAttribute('data-charts',String(svgs.length));document.body.setAttribute('data-charts-drawn',String(drawn));show();});})();
    """
}

/// The strings in first-seen order, each once.
func uniqued(_ xs: [String]) -> [String] {
    var seen = Set<String>()
    return xs.filter { seen.insert($0).inserted }
}
