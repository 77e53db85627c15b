import Foundation
import Histogram
import Testing
@testable import LabKit

/// `recordLatency`: percentiles and the distribution from one histogram, in one call.
@Suite struct RecordLatencyTests {
    func histogram(_ values: ClosedRange<UInt64>) -> Histogram<UInt64> {
        var h = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        for v in values { _ = h.record(v) }
        return h
    }

    @Test func namesTagsAndDistribution() {
        let ctx = RunContext(variant: "v", params: Params(), repetition: 1, isWarmup: false)
        let h = histogram(1...1000)
        ctx.recordLatency("fault_latency", h, percentiles: [50, 99, 99.9, 100])
        let ms = ctx.output.metrics
        #expect(ms.map(\.name) == ["fault_latency_p50", "fault_latency_p99", "fault_latency_p999", "fault_latency_max"])
        #expect(ms.map(\.value) == [Double(h.valueAtPercentile(50)), Double(h.valueAtPercentile(99)), Double(h.valueAtPercentile(99.9)), Double(h.max)])
        #expect(ms.allSatisfy { $0.distribution == "fault_latency" && $0.unit == .ns && $0.better == .lower })
        #expect(ms.map(\.percentile) == [50, 99, 99.9, 100])
        #expect(ctx.output.distributions.map(\.name) == ["fault_latency"])
        #expect(ctx.output.distributions[0].count == 1000)
    }

    @Test func defaultsAreP50P99Max() {
        let ctx = RunContext(variant: "v", params: Params(), repetition: 1, isWarmup: false)
        ctx.recordLatency("swapin_latency", histogram(5...50))
        #expect(ctx.output.metrics.map(\.name) == ["swapin_latency_p50", "swapin_latency_p99", "swapin_latency_max"])
    }

    @Test func percentilesWithoutAHistogramRecordNoDistribution() {
        let ctx = RunContext(variant: "v", params: Params(), repetition: 1, isWarmup: false)
        ctx.recordPercentiles("swapin_latency", [(50, 10), (99, 20), (100, 30)])
        #expect(ctx.output.metrics.map(\.name) == ["swapin_latency_p50", "swapin_latency_p99", "swapin_latency_max"])
        #expect(ctx.output.metrics.map(\.percentile) == [50, 99, 100])
        #expect(ctx.output.distributions.isEmpty)
    }

    @Test func suffixes() {
        #expect(RunContext.percentileSuffix(50) == "p50")
        #expect(RunContext.percentileSuffix(99.9) == "p999")
        #expect(RunContext.percentileSuffix(99.99) == "p9999")
        #expect(RunContext.percentileSuffix(2.5) == "p025")
        #expect(RunContext.percentileSuffix(5) == "p5")
        #expect(RunContext.percentileSuffix(100) == "max")
        #expect(RunContext.percentileSuffix(0) == "min")
    }

    @Test func tagsAndUnitsSurviveTheDocumentAndOldDocumentsStillLoad() throws {
        let one = Statistics.summarize([5])!
        var run = RunResult(scenario: "s", variant: "v", params: Params(["size": .int(1 << 20)]), placement: Placement(), status: .ok,
                            reason: nil, settings: SettingsRecord(), repetitions: 1, warmup: 0)
        run.metrics = [Metric(name: "x_p99", unit: .ns, better: .lower, samples: [5], summary: one, distribution: "x", percentile: 99),
                       Metric(name: "y", unit: .s, better: .lower, samples: [5], summary: one)]
        run.paramUnits = ["size": "bytes"]
        let doc = ResultDocument(tool: .init(name: "memlab", version: "t"), startedAt: "now",
                                 host: ResultDocument.Host.current(), runs: [run])
        let text = String(decoding: try doc.jsonData(), as: UTF8.self)
        #expect(text.contains("\"param_units\""))
        #expect(text.contains("\"distribution\" : \"x\""))
        let back = try ResultDocument.decode(try doc.jsonData())
        #expect(back.runs[0].paramUnits == ["size": "bytes"])
        #expect(back.runs[0].metrics[0].distribution == "x" && back.runs[0].metrics[0].percentile == 99)
        #expect(back.runs[0].metrics[1].distribution == nil && back.runs[0].metrics[1].percentile == nil)
        // A document written before these fields: no units, no tags.
        var old = try #require(try JSONSerialization.jsonObject(with: try doc.jsonData()) as? [String: Any])
        var runs = try #require(old["runs"] as? [[String: Any]])
        runs[0]["param_units"] = nil
        runs[0]["metrics"] = (runs[0]["metrics"] as? [[String: Any]])?.map { m -> [String: Any] in
            var m = m
            m["distribution"] = nil
            m["percentile"] = nil
            return m
        }
        old["runs"] = runs
        let loaded = try ResultDocument.decode(try JSONSerialization.data(withJSONObject: old))
        #expect(loaded.runs[0].paramUnits.isEmpty)
        #expect(loaded.runs[0].metrics[0].distribution == nil)
    }
}
