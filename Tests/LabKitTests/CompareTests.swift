import Foundation
import Testing
@testable import LabKit

/// The statistics of `memlab compare` on samples whose answers are known (reference values
/// from scipy.stats: ttest_ind(equal_var=False), mannwhitneyu(method="exact"), t.ppf).
@Suite struct CompareTests {
    func metric(_ samples: [Double], better: Better = .lower, unit: MetricUnit = .s, name: String = "m") -> Metric {
        Metric(name: name, unit: unit, better: better, samples: samples, summary: Statistics.summarize(samples)!)
    }

    @Test func welchMatchesReference() throws {
        let w = try #require(Inference.welch(baseline: [1, 2, 3, 4, 5], candidate: [6, 7, 8, 9, 10]))
        #expect(w.t == 5)
        #expect(abs(w.degreesOfFreedom - 8) < 1e-9)
        #expect(abs(w.p - 0.0010528257933665399) < 1e-9)
        #expect(abs(w.ci95.0 - (5 - 2.306004135204166)) < 1e-6)
    }

    @Test func studentQuantileMatchesReference() {
        #expect(abs(Inference.studentQuantile(0.975, df: 4) - 2.7764451051977987) < 1e-6)
        #expect(abs(Inference.studentQuantile(0.975, df: 2.5) - 3.5746548420036817) < 1e-6)
        #expect(abs(Inference.studentQuantile(0.975, df: 1000) - 1.9623390808264078) < 1e-6)
    }

    @Test func mannWhitneyExact() throws {
        let separated = try #require(Inference.mannWhitney(baseline: [1, 2, 3], candidate: [4, 5, 6]))
        #expect(separated.exact)
        #expect(separated.u == 9)
        #expect(abs(separated.p - 0.1) < 1e-12)
        let mixed = try #require(Inference.mannWhitney(baseline: [1, 3, 5, 7, 9], candidate: [2, 4, 6, 8, 10]))
        #expect(abs(mixed.p - 0.6904761904761905) < 1e-12)
        let five = try #require(Inference.mannWhitney(baseline: [1, 2, 3, 4, 5], candidate: [6, 7, 8, 9, 10]))
        #expect(abs(five.p - 2.0 / 252) < 1e-12)
    }

    /// Ratio of medians, and the interval: exp(Welch's interval on the logs).
    @Test func ratioAndIntervalAreCorrect() throws {
        let r = Comparison.compare(baseline: metric([1, 2, 4]), candidate: metric([2, 4, 8]))
        #expect(r.ratio == 2)
        #expect(abs(r.geometricRatio! - 2) < 1e-12)
        let ci = try #require(r.ci95)
        #expect(abs(ci[0] - 0.4155350463217323) < 1e-6)
        #expect(abs(ci[1] - 9.626143535683772) < 1e-5)
        #expect(abs(r.welchP! - 0.28786413472669037) < 1e-9)
        #expect(r.scale == "log")
        #expect(!r.significant)
        #expect(r.verdict == .withinNoise)
    }

    @Test func equalDistributionsAreNotSignificant() {
        let a = [0.101, 0.097, 0.103, 0.099, 0.100]
        let b = [0.099, 0.102, 0.098, 0.101, 0.100]
        let r = Comparison.compare(baseline: metric(a), candidate: metric(b))
        #expect(!r.significant)
        #expect(r.verdict == .withinNoise)
        #expect(r.ci95![0] < 1 && r.ci95![1] > 1)
        #expect(r.mannWhitneyP! > 0.5)
        // Identical samples, no spread at all: p = 1, ratio exactly 1.
        let same = Comparison.compare(baseline: metric([4096, 4096, 4096]), candidate: metric([4096, 4096, 4096]))
        #expect(same.ratio == 1 && same.welchP == 1 && same.verdict == .withinNoise)
    }

    @Test func clearlySeparatedAreSignificantAndColouredByBetter() {
        let fast = [0.100, 0.102, 0.098], slow = [0.200, 0.205, 0.195]
        let worse = Comparison.compare(baseline: metric(fast, better: .lower), candidate: metric(slow, better: .lower))
        #expect(worse.significant)
        #expect(worse.verdict == .worse)
        #expect(abs(worse.ratio! - 2) < 1e-9)
        #expect(worse.ci95![0] > 1.8 && worse.ci95![1] < 2.2)
        let better = Comparison.compare(baseline: metric(fast, better: .higher), candidate: metric(slow, better: .higher))
        #expect(better.verdict == .better)
        let neutral = Comparison.compare(baseline: metric(fast, better: .none), candidate: metric(slow, better: .none))
        #expect(neutral.verdict == .changed)
        // Constant but different counts: exactly separated.
        let counts = Comparison.compare(baseline: metric([10, 10], better: .none), candidate: metric([12, 12], better: .none))
        #expect(counts.significant && counts.welchP == 0)
    }

    @Test func singleSamplesAreNotTested() {
        let r = Comparison.compare(baseline: metric([1]), candidate: metric([2]))
        #expect(r.verdict == .untested)
        #expect(r.ratio == 2)
        #expect(r.ci95 == nil)
    }

    @Test func nonPositiveSamplesUseTheLinearScale() {
        let r = Comparison.compare(baseline: metric([0, 1, 2]), candidate: metric([10, 11, 12]))
        #expect(r.scale == "linear")
        #expect(r.ci95 == nil)
        #expect(r.ratio == 11)
        #expect(r.significant)
    }

    func doc(kernel: String, runs: [RunResult]) -> ResultDocument {
        let features = ResultDocument.Features(ksm: true, thp: "madvise", hugetlbSizes: [], userfaultfd: true, zswap: false, swapBytes: 0)
        let host = ResultDocument.Host(kernel: kernel, arch: "x86_64", cpus: 2, memoryBytes: 1 << 30, numaNodes: 1, pageSize: 4096,
                                       virtualized: true, cpuModel: "test", features: features)
        return ResultDocument(tool: .init(name: "memlab", version: "test"), startedAt: "2026-01-01T00:00:00Z", host: host, runs: runs)
    }

    func run(_ variant: String, pages: Int, _ samples: [Double]) -> RunResult {
        RunResult(scenario: "ksm", variant: variant, params: Params(["pages": .int(pages)]), placement: Placement(), status: .ok,
                  reason: nil, settings: SettingsRecord(), repetitions: samples.count, warmup: 0,
                  metrics: [metric(samples, name: "merge_time")])
    }

    /// Runs pair by parameters first; differences in host and parameters are flagged, not refused.
    @Test func pairsRunsAndFlagsDifferences() {
        let a = doc(kernel: "6.1", runs: [run("merge", pages: 1024, [1, 1.1, 0.9]), run("merge", pages: 4096, [4, 4.1, 3.9])])
        let b = doc(kernel: "6.18", runs: [run("merge", pages: 4096, [2, 2.1, 1.9]), run("merge", pages: 2048, [3, 3, 3])])
        let report = Comparison.compare(baseline: ("a.json", a), candidates: [("b.json", b)])
        let f = report.comparisons[0]
        #expect(f.warnings.contains { $0.contains("kernel 6.1 vs 6.18") })
        #expect(f.pairs.count == 2)
        #expect(f.pairs[0].warnings.isEmpty)
        #expect(f.pairs[0].metrics[0].baselineMedian == 4)
        #expect(f.pairs[1].warnings.contains { $0.contains("pages 1024 -> 2048") })
        let text = Comparison.render(report, color: false)
        #expect(text.contains("different hosts: kernel 6.1 vs 6.18"))
        #expect(text.contains("better"))
        #expect(!text.contains("\u{1B}["))
        #expect(Comparison.render(report, color: true).contains("\u{1B}[32m"))
        let other = doc(kernel: "6.1", runs: [RunResult(scenario: "thp", variant: "fault", params: Params(), placement: Placement(), status: .ok,
                                                         reason: nil, settings: SettingsRecord(), repetitions: 2, warmup: 0,
                                                         metrics: [metric([1, 2], name: "merge_time")])])
        let single = Comparison.compare(baseline: ("a", doc(kernel: "6.1", runs: [run("merge", pages: 1, [1, 2])])), candidates: [("c", other)])
        #expect(single.comparisons[0].pairs[0].warnings.contains { $0.contains("different scenarios") })
    }
}
