#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// `memlab compare`: each metric of a candidate run against the same metric of the matching
/// baseline run.
///
/// - ratio: median(candidate) / median(baseline).
/// - 95% interval: Welch's t on the logarithms of the samples, i.e. the interval of the ratio
///   of geometric means (scale-free, suited to positive metrics; on a handful of samples the
///   geometric and median ratios agree closely). Metrics with a sample <= 0 are tested on the
///   raw values and get no ratio interval.
/// - significance: that same Welch test, two-sided, alpha 0.05. Mann–Whitney U (exact when
///   there are no ties) is reported beside it as a distribution-free cross-check; with 3
///   repetitions a side it can never reach 0.05 (its smallest two-sided p is 0.1), which is
///   why Welch decides.
/// - within noise: p >= 0.05 (equivalently, the interval contains 1).
public enum Comparison {
    public static let schemaName = "memlab.compare/1"
    public static let alpha = 0.05

    public enum Verdict: String, Codable, Sendable {
        /// Significant, and in the direction the metric's `better` prefers.
        case better
        /// Significant, against the metric's `better`.
        case worse
        /// Significant, for a metric without a better direction.
        case changed
        case withinNoise = "within_noise"
        /// A timing measured on different CPUs by kind (an emulated TCG CPU against a real
        /// one): the numbers are shown, never called better or worse.
        case otherClock = "other_clock"
        /// Fewer than 2 samples on a side: no test.
        case untested
    }

    public struct MetricResult: Codable, Sendable, Equatable {
        public var name: String
        public var unit: MetricUnit
        public var better: Better
        public var baselineMedian: Double
        public var candidateMedian: Double
        public var baselineSamples: Int
        public var candidateSamples: Int
        /// median(candidate) / median(baseline); nil when the baseline median is 0.
        public var ratio: Double?
        /// exp(mean log candidate - mean log baseline): the ratio the interval belongs to.
        public var geometricRatio: Double?
        public var ci95: [Double]?
        /// "log" (Welch's t on log samples) or "linear" (on raw samples: some sample <= 0).
        public var scale: String
        public var welchP: Double?
        public var welchDF: Double?
        public var mannWhitneyP: Double?
        public var mannWhitneyExact: Bool?
        public var significant: Bool
        public var verdict: Verdict

        enum CodingKeys: String, CodingKey {
            case name, unit, better, ratio, scale, significant, verdict
            case baselineMedian = "baseline_median"
            case candidateMedian = "candidate_median"
            case baselineSamples = "baseline_n"
            case candidateSamples = "candidate_n"
            case geometricRatio = "geometric_ratio"
            case ci95 = "ratio_ci95"
            case welchP = "welch_p"
            case welchDF = "welch_df"
            case mannWhitneyP = "mann_whitney_p"
            case mannWhitneyExact = "mann_whitney_exact"
        }

        public func encode(to encoder: Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(name, forKey: .name)
            try c.encode(unit, forKey: .unit)
            try c.encode(better, forKey: .better)
            // Extreme samples (near ±1.7e308) make ratios and statistics overflow: a value
            // that is not a finite number is written as null, never as invalid JSON.
            func finite(_ v: Double?) -> Double? { v.flatMap { $0.isFinite ? $0 : nil } }
            try c.encode(finite(baselineMedian), forKey: .baselineMedian)
            try c.encode(finite(candidateMedian), forKey: .candidateMedian)
            try c.encode(baselineSamples, forKey: .baselineSamples)
            try c.encode(candidateSamples, forKey: .candidateSamples)
            try c.encode(finite(ratio), forKey: .ratio)
            try c.encode(finite(geometricRatio), forKey: .geometricRatio)
            try c.encode(ci95.flatMap { $0.allSatisfy(\.isFinite) ? $0 : nil }, forKey: .ci95)
            try c.encode(scale, forKey: .scale)
            try c.encode(finite(welchP), forKey: .welchP)
            try c.encode(finite(welchDF), forKey: .welchDF)
            try c.encode(finite(mannWhitneyP), forKey: .mannWhitneyP)
            try c.encode(mannWhitneyExact, forKey: .mannWhitneyExact)
            try c.encode(significant, forKey: .significant)
            try c.encode(verdict, forKey: .verdict)
        }
    }

    /// Compares two metrics' samples (the statistics; no names needed).
    public static func compare(baseline a: Metric, candidate b: Metric) -> MetricResult {
        let ma = a.summary.median, mb = b.summary.median
        let positive = (a.samples + b.samples).allSatisfy { $0 > 0 }
        let scale = positive ? "log" : "linear"
        let welch = positive
            ? Inference.welch(baseline: a.samples.map(log), candidate: b.samples.map(log))
            : Inference.welch(baseline: a.samples, candidate: b.samples)
        let mw = Inference.mannWhitney(baseline: a.samples, candidate: b.samples)
        var result = MetricResult(name: b.name, unit: b.unit, better: b.better, baselineMedian: ma, candidateMedian: mb,
                                  baselineSamples: a.samples.count, candidateSamples: b.samples.count,
                                  ratio: ma != 0 ? mb / ma : nil, geometricRatio: nil, ci95: nil,
                                  scale: scale, welchP: welch?.p, welchDF: welch.map { $0.degreesOfFreedom.isFinite ? $0.degreesOfFreedom : 0 },
                                  mannWhitneyP: mw?.p, mannWhitneyExact: mw?.exact, significant: false, verdict: .untested)
        if positive {
            let la = a.samples.map(log).reduce(0, +) / Double(a.samples.count)
            let lb = b.samples.map(log).reduce(0, +) / Double(b.samples.count)
            result.geometricRatio = exp(lb - la)
            if let w = welch { result.ci95 = [exp(w.ci95.0), exp(w.ci95.1)] }
        }
        guard let w = welch else { return result }
        result.significant = w.p < alpha
        if !result.significant {
            result.verdict = .withinNoise
        } else {
            let up = w.difference > 0
            switch b.better {
            case .none: result.verdict = .changed
            case .higher: result.verdict = up ? .better : .worse
            case .lower: result.verdict = up ? .worse : .better
            }
        }
        return result
    }

    /// One candidate run against its baseline run.
    public struct RunPair: Codable, Sendable {
        public var scenario: String
        public var variant: String
        public var params: Params
        public var baselineScenario: String
        public var baselineVariant: String
        public var baselineParams: Params
        /// What differs between the two runs besides the measurements (scenario, parameters).
        public var warnings: [String]
        public var metrics: [MetricResult]
        /// Metrics only one side measured.
        public var onlyInBaseline: [String]
        public var onlyInCandidate: [String]
        /// Each check either side made: whether it agreed there (nil: that side did not make it).
        /// The same kernel must give the same verdicts on a host and in a guest.
        public var checks: [CheckPair] = []

        enum CodingKeys: String, CodingKey {
            case scenario, variant, params, warnings, metrics, checks
            case baselineScenario = "baseline_scenario"
            case baselineVariant = "baseline_variant"
            case baselineParams = "baseline_params"
            case onlyInBaseline = "only_in_baseline"
            case onlyInCandidate = "only_in_candidate"
        }
    }

    /// A physics check on both sides: agreed in every repetition (true), disagreed in one
    /// (false), or not made there (nil).
    public struct CheckPair: Codable, Sendable, Equatable {
        public var name: String
        public var baseline: Bool?
        public var candidate: Bool?
    }

    public struct FileComparison: Codable, Sendable {
        public var baseline: String
        public var candidate: String
        /// "kernel" when the two documents ran on different kernels (a host and a guest, or two
        /// guests): the comparison is then across kernels, labelled by them.
        public var axis: String?
        public var baselineLabel: String
        public var candidateLabel: String
        /// Host differences (kernel, CPUs, memory, features): allowed, but flagged.
        public var warnings: [String]
        public var pairs: [RunPair]
        /// Candidate runs with no baseline run to compare with, and why.
        public var unmatched: [String]
    }

    public struct Report: Codable, Sendable {
        public var schema = Comparison.schemaName
        public var method: [String: String] = [
            "ratio": "median(candidate) / median(baseline)",
            "ratio_ci95": "95% interval of the ratio of geometric means: Welch's t on log samples (linear scale: none)",
            "test": "Welch's t-test, two-sided, on log samples (raw samples when any is <= 0); significant when p < 0.05",
            "cross_check": "Mann-Whitney U, two-sided (exact without ties, normal approximation with ties)",
        ]
        public var comparisons: [FileComparison]
    }

    /// Compares every candidate document against the baseline document.
    public static func compare(baseline: (name: String, doc: ResultDocument),
                               candidates: [(name: String, doc: ResultDocument)]) -> Report {
        Report(comparisons: candidates.map { compareFiles(baseline, $0) })
    }

    static func label(_ r: RunResult) -> String { "\(r.scenario):\(r.variant)" }

    static func compareFiles(_ base: (name: String, doc: ResultDocument), _ cand: (name: String, doc: ResultDocument)) -> FileComparison {
        let kernels = base.doc.host.kernel != cand.doc.host.kernel
        var out = FileComparison(baseline: base.name, candidate: cand.name, axis: kernels ? "kernel" : nil,
                                 baselineLabel: kernels ? kernelLabel(base.doc.host) : "baseline",
                                 candidateLabel: kernels ? kernelLabel(cand.doc.host) : "candidate",
                                 warnings: hostDifferences(base.doc.host, cand.doc.host), pairs: [], unmatched: [])
        let baseRuns = base.doc.runs.filter { $0.status == .ok }
        let candRuns = cand.doc.runs
        var used = Set<Int>()
        var matches = [Int?](repeating: nil, count: candRuns.count)
        // First the runs with the same scenario, variant and parameters; then, for the rest, the
        // first unused run of the same scenario:variant; else, when each file holds one run, that run.
        for (ci, c) in candRuns.enumerated() where c.status == .ok {
            if let m = baseRuns.indices.first(where: { !used.contains($0) && baseRuns[$0].scenario == c.scenario && baseRuns[$0].variant == c.variant && baseRuns[$0].params == c.params }) {
                matches[ci] = m
                used.insert(m)
            }
        }
        for (ci, c) in candRuns.enumerated() where c.status == .ok && matches[ci] == nil {
            var m = baseRuns.indices.first { !used.contains($0) && baseRuns[$0].scenario == c.scenario && baseRuns[$0].variant == c.variant }
            if m == nil && baseRuns.count == 1 && candRuns.count == 1 && !used.contains(0) { m = 0 }
            if let m { matches[ci] = m; used.insert(m) }
        }
        for (ci, c) in candRuns.enumerated() {
            guard c.status == .ok else {
                out.unmatched.append("\(label(c))\(kernels ? " on \(out.candidateLabel)" : ""): \(c.status.rawValue)\(c.reason.map { " (\($0))" } ?? "")")
                continue
            }
            guard let m = matches[ci] else {
                out.unmatched.append("\(label(c)) \(describe(c.params)): no run of \(label(c)) left to pair with in \(base.name)")
                continue
            }
            var p = pair(baseRuns[m], c)
            if clocks(base.doc.host) != clocks(cand.doc.host) {
                for k in p.metrics.indices where isTiming(p.metrics[k].unit) { p.metrics[k].verdict = .otherClock }
            }
            out.pairs.append(p)
        }
        // Across kernels a run one kernel cannot do (skipped, with why) is itself a finding.
        if kernels {
            for b in base.doc.runs where b.status != .ok {
                out.unmatched.append("\(label(b)) on \(out.baselineLabel): \(b.status.rawValue)\(b.reason.map { " (\($0))" } ?? "")")
            }
        }
        return out
    }

    static func pair(_ a: RunResult, _ b: RunResult) -> RunPair {
        var warnings: [String] = []
        if a.scenario != b.scenario || a.variant != b.variant {
            warnings.append("different scenarios: \(label(a)) against \(label(b))")
        }
        let keys = Set(a.params.values.keys).union(b.params.values.keys).sorted()
        let diffs = keys.filter { a.params[$0] != b.params[$0] }.map { "\($0) \(a.params[$0]?.description ?? "-") -> \(b.params[$0]?.description ?? "-")" }
        if !diffs.isEmpty { warnings.append("different parameters: " + diffs.joined(separator: ", ")) }
        if a.placement != b.placement { warnings.append("different placement (cpus/node)") }
        var metrics: [MetricResult] = []
        for mb in b.metrics {
            guard let ma = a.metric(mb.name) else { continue }
            if ma.unit != mb.unit { warnings.append("\(mb.name): units differ (\(ma.unit.rawValue) vs \(mb.unit.rawValue)); not compared"); continue }
            metrics.append(compare(baseline: ma, candidate: mb))
        }
        return RunPair(scenario: b.scenario, variant: b.variant, params: b.params,
                       baselineScenario: a.scenario, baselineVariant: a.variant, baselineParams: a.params,
                       warnings: warnings, metrics: metrics,
                       onlyInBaseline: a.metrics.map(\.name).filter { b.metric($0) == nil },
                       onlyInCandidate: b.metrics.map(\.name).filter { a.metric($0) == nil },
                       checks: checkPairs(a, b))
    }

    static func checkPairs(_ a: RunResult, _ b: RunResult) -> [CheckPair] {
        func verdicts(_ r: RunResult) -> [String: Bool] {
            var v: [String: Bool] = [:]
            for c in r.checks { v[c.name] = (v[c.name] ?? true) && c.agrees }
            return v
        }
        let va = verdicts(a), vb = verdicts(b)
        return Set(va.keys).union(vb.keys).sorted().map { CheckPair(name: $0, baseline: va[$0], candidate: vb[$0]) }
    }

    /// What a document's timings were measured on: a real CPU (a host, a KVM guest) or TCG's.
    static func clocks(_ h: ResultDocument.Host) -> String { h.guest?.accelerator == "tcg" ? "tcg" : "cpu" }

    /// Units a CPU's speed sets: times and rates.
    static func isTiming(_ u: MetricUnit) -> Bool {
        switch u {
        case .s, .ns, .bytesPerSecond, .pagesPerSecond, .updatesPerSecond: return true
        case .bytes, .pages, .count, .ratio, .percent: return false
        }
    }

    /// "6.1.0-57-amd64 (guest, tcg)" or "6.18.44 (host)": a document's kernel and how it ran.
    public static func kernelLabel(_ h: ResultDocument.Host) -> String {
        // Kernel parameters may run to 1 KiB: a column header takes their first 48 characters.
        if let g = h.guest { return "\(h.kernel) (guest, \(g.accelerator)\(g.append.map { ", " + ($0.count > 48 ? String($0.prefix(48)) + "…" : $0) } ?? ""))" }
        return "\(h.kernel) (host)"
    }

    static func hostDifferences(_ a: ResultDocument.Host, _ b: ResultDocument.Host) -> [String] {
        var d: [String] = []
        func check(_ what: String, _ x: String, _ y: String) { if x != y { d.append("different hosts: \(what) \(x) vs \(y)") } }
        check("kernel", a.kernel, b.kernel)
        check("arch", a.arch, b.arch)
        check("cpu model", a.cpuModel, b.cpuModel)
        check("cpus", String(a.cpus), String(b.cpus))
        check("memory", formatBytes(Int(clamping: a.memoryBytes)), formatBytes(Int(clamping: b.memoryBytes)))
        check("numa nodes", String(a.numaNodes), String(b.numaNodes))
        check("page size", String(a.pageSize), String(b.pageSize))
        check("virtualized", String(a.virtualized), String(b.virtualized))
        check("THP", a.features.thp, b.features.thp)
        check("swap", formatBytes(Int(clamping: a.features.swapBytes)), formatBytes(Int(clamping: b.features.swapBytes)))
        check("zswap", String(a.features.zswap), String(b.features.zswap))
        check("guest kernel parameters", a.guest?.append ?? "none", b.guest?.append ?? "none")
        return d
    }

    static func describe(_ p: Params) -> String {
        p.values.keys.sorted().map { "\($0)=\(p.values[$0]!)" }.joined(separator: " ")
    }

    // MARK: text

    /// The comparison as text; `color` adds ANSI colours (green better, red worse, bold changed).
    public static func render(_ report: Report, color: Bool) -> String {
        func paint(_ s: String, _ code: String) -> String { color ? "\u{1B}[\(code)m\(s)\u{1B}[0m" : s }
        var out = ""
        for f in report.comparisons {
            out += "baseline:  \(f.baseline)\ncandidate: \(f.candidate)\n"
            if f.axis == "kernel" {
                out += "axis:      kernel — \(f.baselineLabel) → \(f.candidateLabel)\n"
            }
            for w in f.warnings { out += paint("note: \(w) (compared anyway)", "33") + "\n" }
            for p in f.pairs {
                out += "\n\(p.scenario):\(p.variant)"
                if p.baselineScenario != p.scenario || p.baselineVariant != p.variant { out += " vs \(p.baselineScenario):\(p.baselineVariant)" }
                let ps = describe(p.params)
                out += ps.isEmpty ? "\n" : "  \(ps)\n"
                for w in p.warnings { out += "  " + paint("note: \(w) (compared anyway)", "33") + "\n" }
                if p.metrics.isEmpty { out += "  no metric measured by both\n"; continue }
                var rows = [["metric", "unit", "better", f.baselineLabel, f.candidateLabel, "ratio", "geo. ratio [95% CI]", "p (Welch)", "n", ""]]
                var paints: [String?] = [nil]
                for m in p.metrics {
                    // The interval belongs to the ratio of geometric means, so it is printed
                    // beside that estimate, never beside the median ratio alone.
                    let ci = m.ci95.map { ci in "\(m.geometricRatio.map(fmt) ?? "-") [\(fmt(ci[0])), \(fmt(ci[1]))]" } ?? "-"
                    let mark: String
                    var code: String?
                    switch m.verdict {
                    case .better: mark = "better"; code = "32"
                    case .worse: mark = "worse"; code = "31"
                    case .changed: mark = "changed"; code = "1"
                    case .withinNoise: mark = "~ within noise"
                    case .untested: mark = "? n<2, not tested"
                    case .otherClock: mark = "timing under another CPU (TCG vs real): not judged"
                    }
                    rows.append([m.name, m.unit.rawValue, m.better.rawValue, formatNumber(m.baselineMedian), formatNumber(m.candidateMedian),
                                 m.ratio.map(fmt) ?? "-", ci, m.welchP.map(formatP) ?? "-",
                                 "\(m.baselineSamples)/\(m.candidateSamples)", mark])
                    paints.append(code)
                }
                let widths = (0..<rows[0].count).map { c in rows.map { $0[c].count }.max() ?? 0 }
                for (r, row) in rows.enumerated() {
                    var line = "  " + row.enumerated().map { c, cell in
                        c <= 2 || c == row.count - 1 ? cell.padding(widths[c]) : cell.leftPadding(widths[c])
                    }.joined(separator: "  ")
                    while line.hasSuffix(" ") { line.removeLast() }
                    out += (paints[r].map { paint(line, $0) } ?? line) + "\n"
                }
                if !p.onlyInBaseline.isEmpty { out += "  only in \(f.baselineLabel): \(p.onlyInBaseline.joined(separator: ", "))\n" }
                if !p.onlyInCandidate.isEmpty { out += "  only in \(f.candidateLabel): \(p.onlyInCandidate.joined(separator: ", "))\n" }
                let differing = p.checks.filter { $0.baseline != $0.candidate }
                if !p.checks.isEmpty {
                    func v(_ x: Bool?) -> String { x.map { $0 ? "agrees" : "DISAGREES" } ?? "not made" }
                    if differing.isEmpty {
                        out += "  checks: the same \(p.checks.count) verdict\(p.checks.count == 1 ? "" : "s") on both sides (\(p.checks.allSatisfy { $0.baseline == true } ? "all agree" : "see each document"))\n"
                    } else {
                        out += "  checks that differ:\n"
                        for c in differing { out += "    \(c.name): \(v(c.baseline)) | \(v(c.candidate))\n" }
                    }
                }
            }
            for u in f.unmatched { out += "  not compared: \(u)\n" }
            out += "\n"
        }
        out += "ratio = candidate median / baseline median; geo. ratio = ratio of geometric means, with its 95% CI and p "
        out += "from Welch's t-test on log samples; "
        out += "~ = within noise (p >= 0.05).\n"
        return out
    }

    static func fmt(_ v: Double) -> String {
        if v.isNaN || v.isInfinite { return String(describing: v) }
        let a = abs(v)
        if a >= 100 || a < 0.01 { return formatNumber(v) }
        return String(format: "%.3f", v)
    }

    static func formatP(_ p: Double) -> String {
        if p < 0.001 { return "<0.001" }
        return String(format: "%.3f", p)
    }
}
