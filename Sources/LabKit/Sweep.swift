#if canImport(Glibc)
import Glibc
#endif
/// Sweeps: a parameter given several values expands into one run per value (per point of
/// the product when several parameters are swept). Each point is a full run with its own
/// repetitions; the result records where it sits in the sweep (`RunResult.sweep`), so
/// `report` can draw a metric against the swept parameter.
///
/// Syntax, the same in scenario files and after `--set NAME=`:
///   a list:        1024,4096,16384        (TOML: pages = [1024, 4096, 16384])
///   a geometric range:  64M..4G x2        (×2 from 64M up to at most 4G; also "*2")
///   an arithmetic range: 100..1000 +300   (100, 400, 700, 1000)
///   an integer range:   1..4              (step 1)
public enum Sweep {
    /// The most points one parameter may expand to, and one file or command line in all.
    public static let maxPoints = 1000

    /// True when `text` is sweep syntax rather than one value.
    public static func isSweep(_ text: String) -> Bool {
        text.contains(",") || text.contains("..")
    }

    /// Expands sweep text into checked values of `spec`.
    public static func values(_ text: String, for spec: ParameterSpec) throws(UsageError) -> [ParamValue] {
        let t = text.trimmingCharacters(in: " ")
        if t.contains("..") { return try range(t, for: spec) }
        let parts = t.split(separator: ",", omittingEmptySubsequences: false).map { String($0).trimmingCharacters(in: " ") }
        if parts.contains(where: \.isEmpty) { throw UsageError("parameter '\(spec.name)': '\(text)' has an empty item; a list is written 1024,4096,16384") }
        var out: [ParamValue] = []
        for p in parts { out.append(try spec.parse(p)) }
        return try distinct(out, spec)
    }

    /// Checks a list from a scenario file (TOML array) against `spec`.
    public static func values(_ list: [ParamValue], for spec: ParameterSpec) throws(UsageError) -> [ParamValue] {
        if list.isEmpty { throw UsageError("parameter '\(spec.name)': an empty list sweeps nothing") }
        var out: [ParamValue] = []
        for v in list { out.append(try spec.accept(v)) }
        return try distinct(out, spec)
    }

    private static func distinct(_ values: [ParamValue], _ spec: ParameterSpec) throws(UsageError) -> [ParamValue] {
        if values.isEmpty { throw UsageError("parameter '\(spec.name)': the sweep has no value") }
        if values.count > maxPoints { throw UsageError("parameter '\(spec.name)': \(values.count) values; a sweep may have at most \(maxPoints)") }
        var seen = Set<ParamValue>()
        for v in values where !seen.insert(v).inserted {
            throw UsageError("parameter '\(spec.name)': the value \(v) appears twice in the sweep")
        }
        return values
    }

    private static func range(_ text: String, for spec: ParameterSpec) throws(UsageError) -> [ParamValue] {
        func bad(_ why: String) -> UsageError {
            UsageError("parameter '\(spec.name)': '\(text)' \(why); a range is written LO..HI xFACTOR (geometric), LO..HI +STEP (arithmetic) or LO..HI (integers, step 1), e.g. 64M..4G x2")
        }
        let isInteger: Bool
        switch spec.kind {
        case .int, .size: isInteger = true
        case .double: isInteger = false
        case .bool, .choice, .text: throw bad("is a range, but this parameter is not a number; list its values instead (a,b)")
        }
        guard let dots = text.range(of: "..") else { throw bad("is not a range") }
        let lowText = String(text[..<dots.lowerBound]).trimmingCharacters(in: " ")
        var rest = String(text[dots.upperBound...]).trimmingCharacters(in: " ")
        // The step: the last "x", "*" or "+" that follows the upper bound.
        enum Step { case one, times(Double), plus(String) }
        var step = Step.one
        if let i = rest.lastIndex(where: { $0 == "x" || $0 == "*" || $0 == "+" || $0 == "X" }), i != rest.startIndex {
            let op = rest[i]
            let amount = String(rest[rest.index(after: i)...]).trimmingCharacters(in: " ")
            rest = String(rest[..<i]).trimmingCharacters(in: " ")
            if op == "+" {
                step = .plus(amount)
            } else {
                guard let v = Double(amount), v > 1, v.isFinite else { throw bad("has a factor that is not a number above 1") }
                step = .times(v)
            }
        }
        var out: [ParamValue] = []
        if isInteger {
            // Integer parameters are swept in integer arithmetic: no rounding, and no bound
            // near Int.max can overflow or trap.
            guard let lo = integer(lowText, spec) else { throw bad("has a lower bound that is not a whole number or size") }
            guard let hi = integer(rest, spec) else { throw bad("has an upper bound that is not a whole number or size") }
            guard lo <= hi else { throw bad("runs backwards (lower bound above upper bound)") }
            var points: [Int] = []
            switch step {
            case .one, .plus:
                var by = 1
                if case .plus(let amount) = step {
                    guard let v = integer(amount, spec), v > 0 else { throw bad("has a step that is not a positive whole number or size") }
                    by = v
                }
                // (hi - lo) / by + 1 points, counted before any is made; hi - lo fits a UInt.
                let span = UInt(bitPattern: hi &- lo)
                guard span / UInt(by) < UInt(maxPoints) else { throw bad("expands to more than \(maxPoints) points") }
                var v = lo
                while true {
                    points.append(v)
                    let (next, overflow) = v.addingReportingOverflow(by)
                    if overflow || next > hi { break }
                    v = next
                }
            case .times(let f):
                guard lo > 0 else { throw bad("is geometric but starts at zero or below") }
                try geometricStepsFit(Double(lo), Double(hi), f, bad)
                // The first point is LO itself, exactly (a Double holds integers only to 2^53:
                // near Int.max, Double(LO) rounds up past it).
                points.append(lo)
                var v = Double(lo) * f
                while v <= Double(hi) * (1 + 1e-12) {
                    // A rounded point past Int.max (hi near it) is past the range: it ends it.
                    guard let p = Int(exactly: v.rounded()), p <= hi else { break }
                    if p > points.last! { points.append(p) }
                    if points.count > maxPoints { throw bad("expands to more than \(maxPoints) points") }
                    v *= f
                }
            }
            for p in points { out.append(try spec.accept(.int(p))) }
        } else {
            guard let lo = Double(lowText), lo.isFinite else { throw bad("has a lower bound that is not a number") }
            guard let hi = Double(rest), hi.isFinite else { throw bad("has an upper bound that is not a number") }
            guard lo <= hi else { throw bad("runs backwards (lower bound above upper bound)") }
            var points: [Double] = []
            switch step {
            case .one:
                throw bad("needs a step for a non-integer parameter")
            case .plus(let amount):
                guard let s = Double(amount), s.isFinite, s > 0 else { throw bad("has a step that is not a positive number") }
                // Accumulate by index, not by repeated addition, so 0..1 +0.1 ends at 1. The
                // count is bounded first: a step too small for the bounds is refused at once.
                let count = ((hi - lo) / s).rounded(.down)
                guard count.isFinite, count < Double(maxPoints) else { throw bad("expands to more than \(maxPoints) points") }
                var k = 0.0
                let top = hi + abs(hi) * 1e-12 + 1e-12
                while lo + k * s <= top && points.count <= maxPoints { points.append(lo + k * s); k += 1 }
            case .times(let f):
                guard lo > 0 else { throw bad("is geometric but starts at zero or below") }
                try geometricStepsFit(lo, hi, f, bad)
                var v = lo
                while v <= hi * (1 + 1e-12) && v.isFinite && points.count <= maxPoints { points.append(v); v *= f }
            }
            if points.count > maxPoints { throw bad("expands to more than \(maxPoints) points") }
            for p in points {
                // Keep decimal steps tidy: 0.30000000000000004 -> 0.3 (where that stays finite).
                let tidy = (p * 1e9).rounded() / 1e9
                out.append(try spec.accept(.double(tidy.isFinite ? tidy : p)))
            }
        }
        return try distinct(out, spec)
    }

    /// A geometric range is counted before it is walked: a factor barely above 1 (x1.0000000000000002)
    /// would take ~10^15 steps per unit between equal rounded points.
    private static func geometricStepsFit(_ lo: Double, _ hi: Double, _ f: Double, _ bad: (String) -> UsageError) throws(UsageError) {
        let steps = (log(hi / lo) / log(f)).rounded(.up)
        guard steps.isFinite, steps < Double(maxPoints) else { throw bad("expands to more than \(maxPoints) points") }
    }

    /// A whole number (or a size with K/M/G/T, for size parameters) as an Int, or nil.
    private static func integer(_ text: String, _ spec: ParameterSpec) -> Int? {
        if case .size = spec.kind { return parseSize(text) }
        return Int(text)
    }

    /// The number of points of a sweep over `axes`, computed without overflow and without
    /// building it; a product beyond `maxPoints` is an error.
    public static func pointCount(_ axes: [SweepAxis]) throws(UsageError) -> Int {
        var n = 1
        for a in axes {
            let (m, overflow) = n.multipliedReportingOverflow(by: a.values.count)
            if overflow || m > maxPoints {
                throw UsageError("the sweep over \(axes.map(\.parameter).joined(separator: " × ")) has more than \(maxPoints) points (\(axes.map { String($0.values.count) }.joined(separator: " × ")))")
            }
            n = m
        }
        return n
    }

    /// The points of a sweep over `axes` (in order; the first axis varies slowest), each a
    /// value per swept parameter. No axes: one empty point.
    public static func product(_ axes: [SweepAxis]) -> [[String: ParamValue]] {
        var points: [[String: ParamValue]] = [[:]]
        for axis in axes {
            var next: [[String: ParamValue]] = []
            for p in points {
                for v in axis.values {
                    var q = p
                    q[axis.parameter] = v
                    next.append(q)
                }
            }
            points = next
        }
        return points
    }

    /// Expands a scenario's fixed overrides and swept axes into (params, sweep) per point, all
    /// validated before anything runs. `group` names the sweep within the result document.
    public static func expand(_ scenario: any Scenario, variant: String, fixed: [String: ParamValue],
                              axes: [SweepAxis], group: Int) throws(UsageError) -> [(Params, SweepInfo?)] {
        _ = try pointCount(axes)
        let points = product(axes)
        var out: [(Params, SweepInfo?)] = []
        for (i, point) in points.enumerated() {
            var overrides = fixed
            for (k, v) in point { overrides[k] = v }
            let params = try scenario.resolve(variant: variant, overrides: overrides)
            let info = axes.isEmpty ? nil : SweepInfo(group: group, point: i + 1, points: points.count, parameters: axes)
            out.append((params, info))
        }
        return out
    }

    /// Splits `name=text` command-line settings into fixed values and swept axes, for `scenario`.
    /// Keeps the order the axes were given in.
    public static func split(_ settings: [(String, String)], for scenario: any Scenario) throws(UsageError) -> (fixed: [String: ParamValue], axes: [SweepAxis]) {
        var fixed: [String: ParamValue] = [:]
        var axes: [SweepAxis] = []
        for (name, text) in settings {
            let spec = try scenario.parameter(named: name)
            axes.removeAll { $0.parameter == name }
            fixed[name] = nil
            if isSweep(text) {
                let vs = try values(text, for: spec)
                if vs.count == 1 { fixed[name] = vs[0] } else { axes.append(SweepAxis(parameter: name, values: vs)) }
            } else {
                fixed[name] = try spec.parse(text)
            }
        }
        return (fixed, axes)
    }
}

extension Sweep {
    /// Splits a scenario-file entry's parameters into fixed values and swept axes: TOML lists,
    /// and strings in sweep syntax ("64M..4G x2", "madvise,prctl").
    public static func split(_ entry: ScenarioFile.Entry, for scenario: any Scenario) throws(UsageError) -> (fixed: [String: ParamValue], axes: [SweepAxis]) {
        var fixed: [String: ParamValue] = [:]
        var axes: [SweepAxis] = []
        func spec(_ name: String) throws(UsageError) -> ParameterSpec { try scenario.parameter(named: name) }
        for name in entry.params.keys.sorted() {
            let value = entry.params[name]!
            let sp = try spec(name)
            if case .string(let text) = value, isSweep(text) {
                let vs = try values(text, for: sp)
                if vs.count == 1 { fixed[name] = vs[0] } else { axes.append(SweepAxis(parameter: name, values: vs)) }
            } else {
                fixed[name] = try sp.accept(value)
            }
        }
        for axis in entry.sweeps {
            let vs = try values(axis.values, for: try spec(axis.parameter))
            if vs.count == 1 { fixed[axis.parameter] = vs[0] } else { axes.append(SweepAxis(parameter: axis.parameter, values: vs)) }
        }
        return (fixed, axes)
    }

    /// `over` replaces `base` parameter by parameter (a command line over a file).
    public static func merge(_ base: (fixed: [String: ParamValue], axes: [SweepAxis]),
                             over: (fixed: [String: ParamValue], axes: [SweepAxis])) -> (fixed: [String: ParamValue], axes: [SweepAxis]) {
        let names = Set(over.fixed.keys).union(over.axes.map(\.parameter))
        var fixed = base.fixed.filter { !names.contains($0.key) }
        for (k, v) in over.fixed { fixed[k] = v }
        return (fixed, base.axes.filter { !names.contains($0.parameter) } + over.axes)
    }
}

/// One swept parameter and its values, in the order they run.
public struct SweepAxis: Sendable, Codable, Equatable {
    public var parameter: String
    public var values: [ParamValue]
    public init(parameter: String, values: [ParamValue]) {
        self.parameter = parameter
        self.values = values
    }
}

/// Where a run sits in a sweep: `run["sweep"]` in the result document (an additive field:
/// absent for a run that is not part of a sweep).
///
///     "sweep": {"group": 1, "point": 2, "points": 3,
///               "parameters": [{"parameter": "pages", "values": [1024, 4096, 16384]}]}
///
/// Runs of one document with the same `group` belong to one sweep; `point` counts from 1 in
/// run order; the first parameter is the one charts put on the x axis.
public struct SweepInfo: Sendable, Codable, Equatable {
    public var group: Int
    public var point: Int
    public var points: Int
    public var parameters: [SweepAxis]
    public init(group: Int, point: Int, points: Int, parameters: [SweepAxis]) {
        self.group = group
        self.point = point
        self.points = points
        self.parameters = parameters
    }
}
