import Histogram

/// A value's unit, as docs/results-format.md names them.
public enum MetricUnit: String, Sendable, Codable {
    case s, ns, bytes, pages, count, ratio, percent
    case bytesPerSecond = "bytes/s"
    case pagesPerSecond = "pages/s"
    /// Independent operations per second (GUPS-style random updates).
    case updatesPerSecond = "updates/s"
}

public enum Better: String, Sendable, Codable {
    case lower, higher, none
}

/// One metric value from one repetition.
public struct MetricValue: Sendable, Codable, Equatable {
    public let name: String
    public let unit: MetricUnit
    public let better: Better
    public let value: Double
    /// A percentile of a latency distribution: its name and the percentile (see `Metric`).
    public var distribution: String? = nil
    public var percentile: Double? = nil
}

/// A counter recorded over time by the sampler.
public struct TimeSeries: Sendable, Codable, Equatable {
    public let name: String
    public let unit: MetricUnit
    public let intervalS: Double
    public var t: [Double]
    public var values: [Double]

    public init(name: String, unit: MetricUnit, intervalS: Double, t: [Double], values: [Double]) {
        self.name = name
        self.unit = unit
        self.intervalS = intervalS
        self.t = t
        self.values = values
    }

    enum CodingKeys: String, CodingKey {
        case name, unit, t, values
        case intervalS = "interval_s"
    }

    /// The samples whose time and value are finite numbers.
    func finite() -> TimeSeries {
        let keep = t.indices.filter { $0 < values.count && t[$0].isFinite && values[$0].isFinite }
        return TimeSeries(name: name, unit: unit, intervalS: intervalS.isFinite ? intervalS : 0, t: keep.map { t[$0] }, values: keep.map { values[$0] })
    }
}

/// A latency distribution of one repetition: the value at each of a fixed grid of percentiles,
/// read from a histogram of every event (HdrHistogram, 3 significant digits). What the
/// report draws as a CDF; the `<name>_p50/_p99/_max` metrics come from the same histogram.
public struct Distribution: Sendable, Codable, Equatable {
    /// The percentiles every distribution is read at (0 = min, 100 = max).
    public static let grid: [Double] = [0, 1, 5, 10, 20, 30, 40, 50, 60, 70, 80, 90, 95, 98, 99, 99.5, 99.9, 99.99, 100]

    public let name: String
    public let unit: MetricUnit
    /// The measured repetition it came from (1-based), filled in by the runner.
    public var repetition: Int?
    /// Events recorded.
    public let count: Int
    public let percentiles: [Double]
    public let values: [Double]

    public init(name: String, unit: MetricUnit, repetition: Int? = nil, count: Int, percentiles: [Double], values: [Double]) {
        self.name = name
        self.unit = unit
        self.repetition = repetition
        self.count = count
        self.percentiles = percentiles
        self.values = values
    }

    public init(name: String, unit: MetricUnit, histogram h: Histogram<UInt64>) {
        self.init(name: name, unit: unit, count: Int(h.totalCount), percentiles: Self.grid, values: Self.grid.map { p in
            p == 0 ? Double(h.min) : p == 100 ? Double(h.max) : Double(h.valueAtPercentile(p))
        })
    }
}

/// A physical check: what the scenario set up (expected) against what the kernel reports
/// (observed). A disagreement is reported, never hidden or corrected.
public struct CheckValue: Sendable, Codable, Equatable {
    public let name: String
    /// The measured repetition it came from (1-based), filled in by the runner.
    public var repetition: Int?
    public let expected: Double
    public let observed: Double
    public let tolerance: String
    public let agrees: Bool
}

/// What one repetition (one child process) produced.
public struct RepetitionOutput: Sendable, Codable {
    public var status: RunStatus = .ok
    public var reason: String?
    public var metrics: [MetricValue] = []
    public var timeseries: [TimeSeries] = []
    public var distributions: [Distribution] = []
    public var checks: [CheckValue] = []
    public var notes: [String] = []
    public init() {}
}

/// Collects a repetition's measurements inside the child process.
public final class RunContext {
    public let variant: String
    public let params: Params
    public let repetition: Int
    public let isWarmup: Bool
    public private(set) var output = RepetitionOutput()

    public init(variant: String, params: Params, repetition: Int, isWarmup: Bool) {
        self.variant = variant
        self.params = params
        self.repetition = repetition
        self.isWarmup = isWarmup
    }

    public func record(_ name: String, _ value: Double, _ unit: MetricUnit, better: Better) {
        output.metrics.append(MetricValue(name: name, unit: unit, better: better, value: value))
    }

    public func record(_ series: TimeSeries) { output.timeseries.append(series) }

    /// A latency distribution in one call: the metrics `<name>_p50`, `_p99` (`_p999` for 99.9,
    /// `_max` for 100, `_min` for 0) at `percentiles`, each tagged with the distribution and
    /// its percentile (what the report groups by), and the distribution of every event (the
    /// report's CDF; not recorded when the histogram is empty: no event, no distribution).
    public func recordLatency(_ name: String, _ histogram: Histogram<UInt64>, percentiles: [Double] = [50, 99, 100],
                              unit: MetricUnit = .ns, better: Better = .lower) {
        let h = histogram
        recordPercentiles(name, percentiles.map { p in
            (p, p == 0 ? Double(h.min) : p == 100 ? Double(h.max) : Double(h.valueAtPercentile(p)))
        }, unit: unit, better: better)
        guard histogram.totalCount > 0 else { return }
        output.distributions.append(Distribution(name: name, unit: unit, histogram: histogram))
    }

    /// Percentiles of a distribution measured without an HdrHistogram (so no CDF is recorded):
    /// `<name>_p50` etc., tagged like `recordLatency`'s.
    public func recordPercentiles(_ name: String, _ values: [(percentile: Double, value: Double)], unit: MetricUnit = .ns, better: Better = .lower) {
        for (p, v) in values {
            output.metrics.append(MetricValue(name: "\(name)_\(Self.percentileSuffix(p))", unit: unit, better: better, value: v,
                                              distribution: name, percentile: p))
        }
    }

    /// p50, p99, p999 (99.9), p9999 (99.99), max (100), min (0).
    static func percentileSuffix(_ p: Double) -> String {
        if p >= 100 { return "max" }
        if p <= 0 { return "min" }
        if p == p.rounded() { return "p\(Int(p))" }
        // 99.9 -> p999, 2.5 -> p025: two digits before the point, as `p50` has.
        let digits = String("\(p)".filter { $0 != "." })
        return "p" + (p < 10 ? "0" : "") + digits
    }

    /// Records a check; `tolerance` is absolute (in the check's own unit).
    @discardableResult
    public func check(_ name: String, expected: Double, observed: Double, tolerance: Double, describe: String) -> Bool {
        let agrees = abs(expected - observed) <= tolerance
        output.checks.append(CheckValue(name: name, repetition: nil, expected: expected, observed: observed, tolerance: describe, agrees: agrees))
        return agrees
    }

    /// Records a check that passes when `observed` lies in `accepted`.
    @discardableResult
    public func check(_ name: String, expected: Double, observed: Double, accepted: ClosedRange<Double>, describe: String) -> Bool {
        let agrees = accepted.contains(observed)
        output.checks.append(CheckValue(name: name, repetition: nil, expected: expected, observed: observed, tolerance: describe, agrees: agrees))
        return agrees
    }

    public func note(_ text: String) { output.notes.append(text) }
}
