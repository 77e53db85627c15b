/// Summary statistics of a metric's samples (one per repetition).
public struct Summary: Sendable, Codable, Equatable {
    public let median: Double
    public let mean: Double
    /// Sample standard deviation (n - 1); 0 for a single sample.
    public let stddev: Double
    public let min: Double
    public let max: Double
    /// 95% confidence interval of the mean (Student's t); nil with fewer than 2 samples,
    /// since one sample says nothing about spread.
    public let ci95: [Double]?

    public init(median: Double, mean: Double, stddev: Double, min: Double, max: Double, ci95: [Double]?) {
        self.median = median
        self.mean = mean
        self.stddev = stddev
        self.min = min
        self.max = max
        self.ci95 = ci95
    }

    public init(from decoder: Decoder) throws {
        let c = try decoder.container(keyedBy: CodingKeys.self)
        median = try c.decode(Double.self, forKey: .median)
        mean = try c.decode(Double.self, forKey: .mean)
        stddev = try c.decode(Double.self, forKey: .stddev)
        min = try c.decode(Double.self, forKey: .min)
        max = try c.decode(Double.self, forKey: .max)
        ci95 = try c.decodeIfPresent([Double].self, forKey: .ci95)
    }

    public func encode(to encoder: Encoder) throws {
        var c = encoder.container(keyedBy: CodingKeys.self)
        try c.encode(median, forKey: .median)
        try c.encode(mean, forKey: .mean)
        try c.encode(stddev, forKey: .stddev)
        try c.encode(min, forKey: .min)
        try c.encode(max, forKey: .max)
        try c.encode(ci95, forKey: .ci95)   // explicit null when absent
    }

    enum CodingKeys: String, CodingKey { case median, mean, stddev, min, max, ci95 }
}

public enum Statistics {
    /// The median (mean of the middle two for an even count); 0 for no samples.
    public static func median(_ samples: [Double]) -> Double {
        summarize(samples)?.median ?? 0
    }

    public static func summarize(_ samples: [Double]) -> Summary? {
        guard !samples.isEmpty else { return nil }
        let sorted = samples.sorted()
        let n = sorted.count
        // Halves first: (a + b) / 2 overflows for two samples near 1.8e308; this is the same
        // value otherwise (halving is exact).
        let median = n % 2 == 1 ? sorted[n / 2] : sorted[n / 2 - 1] / 2 + sorted[n / 2] / 2
        // Scaled by the largest magnitude, so samples near ±1.7e308 neither overflow the sum nor
        // the squares; a spread beyond what a Double holds is clamped to the largest one.
        let scale = max(abs(sorted[0]), abs(sorted[n - 1]), .leastNormalMagnitude)
        var mean = samples.reduce(0, +) / Double(n)
        if !mean.isFinite { mean = samples.reduce(0) { $0 + $1 / scale } / Double(n) * scale }
        guard n > 1 else {
            return Summary(median: median, mean: mean, stddev: 0, min: sorted[0], max: sorted[0], ci95: nil)
        }
        var sd = (samples.reduce(0) { $0 + ($1 - mean) * ($1 - mean) } / Double(n - 1)).squareRoot()
        if !sd.isFinite {
            sd = (samples.reduce(0) { $0 + ($1 / scale - mean / scale) * ($1 / scale - mean / scale) } / Double(n - 1)).squareRoot() * scale
        }
        let stddev = clamp(sd)
        let half = clamp(tQuantile975(degreesOfFreedom: n - 1) * stddev / Double(n).squareRoot())
        return Summary(median: median, mean: mean, stddev: stddev, min: sorted[0], max: sorted[n - 1],
                       ci95: [clamp(mean - half), clamp(mean + half)])
    }

    static func clamp(_ v: Double) -> Double {
        v.isNaN ? 0 : min(max(v, -.greatestFiniteMagnitude), .greatestFiniteMagnitude)
    }

    /// Two-sided 95% quantile of Student's t (t_{0.975, df}); exact table to 30, then the
    /// normal approximation's 1.96 refined by the usual 1/df correction.
    public static func tQuantile975(degreesOfFreedom df: Int) -> Double {
        let table: [Double] = [12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228,
                               2.201, 2.179, 2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086,
                               2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042]
        precondition(df >= 1)
        if df <= table.count { return table[df - 1] }
        return 1.960 + 2.4 / Double(df)
    }
}
