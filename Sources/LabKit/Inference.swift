#if canImport(Glibc)
import Glibc
#endif

/// Two-sample inference for small samples (a handful of repetitions per side): Welch's t-test
/// (unequal variances, Welch–Satterthwaite degrees of freedom) and the Mann–Whitney U test
/// (exact distribution without ties, normal approximation with tie correction otherwise).
public enum Inference {
    public struct Welch: Sendable, Equatable {
        /// Difference of means, candidate minus baseline.
        public let difference: Double
        public let standardError: Double
        public let t: Double
        public let degreesOfFreedom: Double
        /// Two-sided p-value.
        public let p: Double
        /// 95% confidence interval of the difference of means.
        public let ci95: (Double, Double)

        public static func == (a: Welch, b: Welch) -> Bool {
            a.difference == b.difference && a.standardError == b.standardError && a.t == b.t
                && a.degreesOfFreedom == b.degreesOfFreedom && a.p == b.p && a.ci95 == b.ci95
        }
    }

    /// Welch's t-test of `candidate` against `baseline`; nil with fewer than 2 samples a side.
    /// When both samples have no spread the test degenerates: equal means give p = 1, different
    /// means p = 0 (the samples are exactly separated), and the interval is the difference.
    public static func welch(baseline a: [Double], candidate b: [Double]) -> Welch? {
        guard a.count >= 2, b.count >= 2 else { return nil }
        let (ma, va) = meanVariance(a), (mb, vb) = meanVariance(b)
        let na = Double(a.count), nb = Double(b.count)
        let qa = va / na, qb = vb / nb
        let se = (qa + qb).squareRoot()
        let d = mb - ma
        if se == 0 || !(se.isFinite) {
            return Welch(difference: d, standardError: 0, t: d == 0 ? 0 : (d > 0 ? .infinity : -.infinity),
                         degreesOfFreedom: na + nb - 2, p: d == 0 ? 1 : 0, ci95: (d, d))
        }
        let df = (qa + qb) * (qa + qb) / (qa * qa / (na - 1) + qb * qb / (nb - 1))
        let t = d / se
        let p = studentTwoSidedP(t: t, df: df)
        let q = studentQuantile(0.975, df: df)
        return Welch(difference: d, standardError: se, t: t, degreesOfFreedom: df, p: p, ci95: (d - q * se, d + q * se))
    }

    public struct MannWhitney: Sendable, Equatable {
        /// U of the candidate: the number of (baseline, candidate) pairs where the candidate is
        /// larger, ties counting one half.
        public let u: Double
        public let p: Double
        /// True when the p-value is exact (no ties, small samples), false for the normal approximation.
        public let exact: Bool
    }

    /// Two-sided Mann–Whitney U test; nil when a side is empty.
    public static func mannWhitney(baseline a: [Double], candidate b: [Double]) -> MannWhitney? {
        guard !a.isEmpty, !b.isEmpty else { return nil }
        let n1 = a.count, n2 = b.count
        // Mid-ranks of the pooled sample.
        let pooled = (a.map { ($0, 0) } + b.map { ($0, 1) }).sorted { $0.0 < $1.0 }
        var ranks = [Double](repeating: 0, count: pooled.count)
        var tieTerm = 0.0
        var i = 0
        while i < pooled.count {
            var j = i
            while j + 1 < pooled.count && pooled[j + 1].0 == pooled[i].0 { j += 1 }
            let r = Double(i + j + 2) / 2
            for k in i...j { ranks[k] = r }
            let t = Double(j - i + 1)
            tieTerm += t * t * t - t
            i = j + 1
        }
        var rankSumB = 0.0
        for (k, x) in pooled.enumerated() where x.1 == 1 { rankSumB += ranks[k] }
        let u = rankSumB - Double(n2 * (n2 + 1)) / 2
        let mean = Double(n1 * n2) / 2
        if tieTerm == 0 && n1 + n2 <= 60 {
            // Exact: count rank arrangements with U at least as far from the mean.
            let dist = uDistribution(n1, n2)
            let total = dist.reduce(0, +)
            let dev = abs(u - mean)
            var tail = 0.0
            for (k, c) in dist.enumerated() where abs(Double(k) - mean) >= dev - 1e-9 { tail += c }
            return MannWhitney(u: u, p: min(1, tail / total), exact: true)
        }
        let n = Double(n1 + n2)
        let variance = Double(n1 * n2) / 12 * ((n + 1) - tieTerm / (n * (n - 1)))
        guard variance > 0 else { return MannWhitney(u: u, p: 1, exact: false) }
        let z = max(0, abs(u - mean) - 0.5) / variance.squareRoot()
        return MannWhitney(u: u, p: min(1, erfc(z / 2.0.squareRoot())), exact: false)
    }

    /// Counts of U = 0...n1*n2 over all C(n1+n2, n1) arrangements (as Doubles: no overflow).
    static func uDistribution(_ n1: Int, _ n2: Int) -> [Double] {
        // f[i][j][u]: arrangements of i baseline and j candidate values with statistic u.
        var f = [[[Double]]](repeating: [[Double]](repeating: [], count: n2 + 1), count: n1 + 1)
        for i in 0...n1 {
            for j in 0...n2 {
                var row = [Double](repeating: 0, count: i * j + 1)
                if i == 0 || j == 0 {
                    row[0] = 1
                } else {
                    // The largest value is a candidate (beats all i baseline values) or a baseline one.
                    for (u, c) in f[i][j - 1].enumerated() { row[u + i] += c }
                    for (u, c) in f[i - 1][j].enumerated() { row[u] += c }
                }
                f[i][j] = row
            }
        }
        return f[n1][n2]
    }

    static func meanVariance(_ x: [Double]) -> (Double, Double) {
        let m = x.reduce(0, +) / Double(x.count)
        let v = x.count > 1 ? x.reduce(0) { $0 + ($1 - m) * ($1 - m) } / Double(x.count - 1) : 0
        return (m, v)
    }

    // MARK: Student's t distribution

    /// Two-sided p-value P(|T| >= |t|) for Student's t with `df` (real) degrees of freedom.
    public static func studentTwoSidedP(t: Double, df: Double) -> Double {
        if t.isInfinite { return 0 }
        return regularizedIncompleteBeta(df / (df + t * t), df / 2, 0.5)
    }

    /// The p-quantile of Student's t with `df` degrees of freedom (p in (0.5, 1)).
    public static func studentQuantile(_ p: Double, df: Double) -> Double {
        let tail = 2 * (1 - p)
        var lo = 0.0, hi = 1.0
        while studentTwoSidedP(t: hi, df: df) > tail { hi *= 2; if hi > 1e12 { break } }
        for _ in 0..<200 {
            let mid = (lo + hi) / 2
            if studentTwoSidedP(t: mid, df: df) > tail { lo = mid } else { hi = mid }
            if hi - lo < 1e-12 * max(1, hi) { break }
        }
        return (lo + hi) / 2
    }

    /// I_x(a, b), the regularized incomplete beta function (continued fraction, as in
    /// Numerical Recipes' betai/betacf).
    public static func regularizedIncompleteBeta(_ x: Double, _ a: Double, _ b: Double) -> Double {
        if x <= 0 { return 0 }
        if x >= 1 { return 1 }
        let lnFront = lgamma(a + b) - lgamma(a) - lgamma(b) + a * log(x) + b * log(1 - x)
        if x < (a + 1) / (a + b + 2) {
            return exp(lnFront) * betaContinuedFraction(x, a, b) / a
        }
        return 1 - exp(lnFront) * betaContinuedFraction(1 - x, b, a) / b
    }

    static func betaContinuedFraction(_ x: Double, _ a: Double, _ b: Double) -> Double {
        let tiny = 1e-300, eps = 1e-15
        let qab = a + b, qap = a + 1, qam = a - 1
        var c = 1.0
        var d = 1 - qab * x / qap
        if abs(d) < tiny { d = tiny }
        d = 1 / d
        var h = d
        for m in 1...500 {
            let m = Double(m), m2 = 2 * m
            var aa = m * (b - m) * x / ((qam + m2) * (a + m2))
            d = 1 + aa * d; if abs(d) < tiny { d = tiny }
            c = 1 + aa / c; if abs(c) < tiny { c = tiny }
            d = 1 / d
            h *= d * c
            aa = -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))
            d = 1 + aa * d; if abs(d) < tiny { d = tiny }
            c = 1 + aa / c; if abs(c) < tiny { c = tiny }
            d = 1 / d
            let del = d * c
            h *= del
            if abs(del - 1) < eps { break }
        }
        return h
    }
}
