import Foundation
import Testing
import Histogram
@testable import LabKit

@Suite struct ResultDocumentTests {
    static let samples: [Double] = [1.5, 2.0, 2.5, 3.0, 3.5]

    static func makeDocument() throws -> ResultDocument {
        let summary = try #require(Statistics.summarize(samples))
        let host = ResultDocument.Host(
            kernel: "6.18.44-fc-v657", arch: "x86_64", cpus: 16, memoryBytes: 24_684_092 * 1024,
            numaNodes: 1, pageSize: 4096, virtualized: true, cpuModel: "Test CPU @ 3.00GHz",
            features: ResultDocument.Features(
                ksm: true, thp: "madvise", hugetlbSizes: [2 << 20, 1 << 30], userfaultfd: true,
                zswap: false, swapBytes: 1_048_572 * 1024))
        let run = RunResult(
            scenario: "ksm", variant: "merge",
            params: Params(["pages": .int(4096), "ratio": .double(0.75), "zero_pages": .bool(false), "mode": .string("madvise")]),
            placement: Placement(cpus: [2, 3], node: nil),
            status: .ok, reason: nil,
            settings: SettingsRecord(changed: ["/sys/kernel/mm/ksm/run": SettingChange(from: "0", to: "1")], restored: true),
            repetitions: 5, warmup: 1,
            metrics: [Metric(name: "merge_time", unit: .s, better: .lower, samples: samples, summary: summary)],
            timeseries: [TimeSeries(name: "pages_sharing", unit: .pages, intervalS: 0.1, t: [0, 0.1, 0.2], values: [0, 512, 4095])],
            checks: [CheckValue(name: "pages_sharing", repetition: 1, expected: 4095, observed: 4095, tolerance: "±0", agrees: true)],
            notes: ["ksmd ran 3 full scans"],
            durationS: 12.25)
        return ResultDocument(tool: .init(name: "memlab", version: "0.1.0"), startedAt: "2026-11-24T21:00:00Z",
                              host: host, runs: [run])
    }

    @Test func roundTrip() throws {
        let original = try Self.makeDocument()
        let decoded = try ResultDocument.decode(try original.jsonData())

        #expect(decoded.schema == "memlab.result/1")
        #expect(decoded.tool == original.tool)
        #expect(decoded.startedAt == "2026-11-24T21:00:00Z")
        #expect(decoded.host == original.host)

        try #require(decoded.runs.count == 1)
        let run = decoded.runs[0]
        #expect(run.scenario == "ksm")
        #expect(run.variant == "merge")
        #expect(run.params == original.runs[0].params)
        #expect(run.params["ratio"] == .double(0.75))
        #expect(run.params["zero_pages"] == .bool(false))
        #expect(run.params["pages"] == .int(4096))
        #expect(run.placement == Placement(cpus: [2, 3], node: nil))
        #expect(run.status == .ok)
        #expect(run.reason == nil)
        #expect(run.settings.changed["/sys/kernel/mm/ksm/run"] == SettingChange(from: "0", to: "1"))
        #expect(run.settings.restored)
        #expect(run.repetitions == 5)
        #expect(run.warmup == 1)
        #expect(run.metrics == original.runs[0].metrics)
        #expect(run.metric("merge_time")?.summary.ci95 == original.runs[0].metrics[0].summary.ci95)
        #expect(run.timeseries == original.runs[0].timeseries)
        #expect(run.checks == original.runs[0].checks)
        #expect(run.notes == ["ksmd ran 3 full scans"])
        #expect(run.durationS == 12.25)
    }

    /// A distribution read from a real histogram: min, percentiles and max are the events'.
    @Test func distributionFromAHistogramRoundTrips() throws {
        var h = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        for v in 1...1000 { _ = h.record(UInt64(v * 100)) }
        let d = Distribution(name: "fault_latency", unit: .ns, histogram: h)
        #expect(d.count == 1000)
        #expect(d.percentiles == Distribution.grid)
        #expect(d.values.first == 100)
        #expect(abs(d.values.last! - 100_000) <= 100)   // 3 significant digits
        let p50 = d.values[Distribution.grid.firstIndex(of: 50)!]
        #expect(abs(p50 - 50_000) <= 100)
        #expect(zip(d.values, d.values.dropFirst()).allSatisfy { $0 <= $1 }, "a CDF never goes down")

        var doc = try Self.makeDocument()
        doc.runs[0].distributions = [d]
        let back = try ResultDocument.decode(try doc.jsonData())
        #expect(back.runs[0].distributions == [d])
        // Absent when there is none (older readers see the documented shape).
        let plain = String(decoding: try Self.makeDocument().jsonData(), as: UTF8.self)
        #expect(!plain.contains("distributions"))
    }

    @Test func jsonTextNamesTheSchema() throws {
        let text = String(decoding: try Self.makeDocument().jsonData(), as: UTF8.self)
        #expect(text.contains("\"schema\" : \"memlab.result/1\""))
        #expect(text.contains("\"/sys/kernel/mm/ksm/run\""))   // slashes not escaped
    }

    @Test func jsonKeysFollowTheContract() throws {
        let data = try Self.makeDocument().jsonData()
        let root = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        #expect(root["schema"] as? String == "memlab.result/1")
        let tool = try #require(root["tool"] as? [String: Any])
        #expect(tool["name"] as? String == "memlab")
        #expect(tool["version"] as? String == "0.1.0")
        #expect(root["started_at"] as? String == "2026-11-24T21:00:00Z")

        let host = try #require(root["host"] as? [String: Any])
        #expect(host["kernel"] as? String == "6.18.44-fc-v657")
        #expect((host["memory_bytes"] as? NSNumber)?.uint64Value == 24_684_092 * 1024)
        #expect((host["numa_nodes"] as? NSNumber)?.intValue == 1)
        #expect((host["page_size"] as? NSNumber)?.intValue == 4096)
        #expect(host["cpu_model"] as? String == "Test CPU @ 3.00GHz")
        let features = try #require(host["features"] as? [String: Any])
        let sizes = try #require(features["hugetlb_sizes"] as? [Any])
        #expect(sizes.compactMap { ($0 as? NSNumber)?.intValue } == [2 << 20, 1 << 30])
        #expect((features["swap_bytes"] as? NSNumber)?.uint64Value == 1_048_572 * 1024)
        #expect(features["thp"] as? String == "madvise")

        let runs = try #require(root["runs"] as? [Any])
        try #require(runs.count == 1)
        let run = try #require(runs[0] as? [String: Any])
        for key in ["scenario", "variant", "params", "placement", "status", "reason", "settings",
                    "repetitions", "warmup", "metrics", "timeseries", "checks", "notes", "duration_s"] {
            #expect(run[key] != nil, "runs[0] has no key \(key)")
        }
        #expect(run["scenario"] as? String == "ksm")
        #expect(run["variant"] as? String == "merge")
        #expect(run["status"] as? String == "ok")
        // An ok run carries an explicit null reason, not a missing key.
        #expect(run["reason"] is NSNull)
        let params = try #require(run["params"] as? [String: Any])
        #expect((params["pages"] as? NSNumber)?.intValue == 4096)
        #expect(params["mode"] as? String == "madvise")
        let placement = try #require(run["placement"] as? [String: Any])
        #expect(placement["node"] is NSNull)
        #expect((placement["cpus"] as? [Any])?.count == 2)
        let settings = try #require(run["settings"] as? [String: Any])
        let changed = try #require(settings["changed"] as? [String: Any])
        let ksmRun = try #require(changed["/sys/kernel/mm/ksm/run"] as? [String: Any])
        #expect(ksmRun["from"] as? String == "0")
        #expect(ksmRun["to"] as? String == "1")
        #expect((settings["restored"] as? NSNumber)?.boolValue == true)
        #expect((run["repetitions"] as? NSNumber)?.intValue == 5)

        let metrics = try #require(run["metrics"] as? [Any])
        let metric = try #require(metrics.first as? [String: Any])
        #expect(metric["name"] as? String == "merge_time")
        #expect(metric["unit"] as? String == "s")
        #expect(metric["better"] as? String == "lower")
        let summary = try #require(metric["summary"] as? [String: Any])
        let ci = try #require(summary["ci95"] as? [Any])
        #expect(ci.count == 2)
        #expect((summary["median"] as? NSNumber)?.doubleValue == 2.5)

        let series = try #require((run["timeseries"] as? [Any])?.first as? [String: Any])
        #expect((series["interval_s"] as? NSNumber)?.doubleValue == 0.1)
        #expect(series["unit"] as? String == "pages")
        let check = try #require((run["checks"] as? [Any])?.first as? [String: Any])
        #expect((check["agrees"] as? NSNumber)?.boolValue == true)
        #expect((run["duration_s"] as? NSNumber)?.doubleValue == 12.25)
    }

    @Test func singleRepetitionHasExplicitNullCI() throws {
        var doc = try Self.makeDocument()
        let one = try #require(Statistics.summarize([4.0]))
        doc.runs[0].metrics = [Metric(name: "t", unit: .s, better: .lower, samples: [4.0], summary: one)]
        let data = try doc.jsonData()
        let root = try #require(try JSONSerialization.jsonObject(with: data) as? [String: Any])
        let run = try #require((root["runs"] as? [Any])?.first as? [String: Any])
        let metric = try #require((run["metrics"] as? [Any])?.first as? [String: Any])
        let summary = try #require(metric["summary"] as? [String: Any])
        #expect(summary["ci95"] is NSNull)
        #expect(try ResultDocument.decode(data).runs[0].metrics[0].summary.ci95 == nil)
    }

    @Test func skippedRunKeepsItsReason() throws {
        var doc = try Self.makeDocument()
        doc.runs[0].status = .skipped
        doc.runs[0].reason = "KSM is not available"
        let decoded = try ResultDocument.decode(try doc.jsonData())
        #expect(decoded.runs[0].status == .skipped)
        #expect(decoded.runs[0].reason == "KSM is not available")
    }

    @Test func wholeNumberDoubleParamStillReadsAsANumber() throws {
        // JSON has one number type: a double parameter of 1.0 is written as 1 and may come
        // back as .int(1); a Double parameter must still read it.
        var doc = try Self.makeDocument()
        doc.runs[0].params = Params(["ratio": .double(1.0), "pages": .int(3)])
        let decoded = try ResultDocument.decode(try doc.jsonData())
        let ratio = Parameter<Double>("ratio", 0...1, default: 0.5, unit: .ratio, help: "")
        #expect(try ratio.decode(try #require(decoded.runs[0].params["ratio"])) == 1.0)
        #expect(decoded.runs[0].params["pages"] == .int(3))
        #expect(decoded.runs[0].params["ratio"]?.description == "1")
    }

    @Test func decodeRejectsAnotherSchema() throws {
        var doc = try Self.makeDocument()
        doc.schema = "memlab.result/2"
        let data = try doc.jsonData()
        #expect(throws: UsageError.self) { try ResultDocument.decode(data) }
        do {
            _ = try ResultDocument.decode(data)
        } catch let error as UsageError {
            #expect(error.message.contains("memlab.result/2"))
        }
    }

    @Test func decodeRejectsNonResultJSON() {
        #expect(throws: (any Error).self) { try ResultDocument.decode(Data("{\"schema\": 1}".utf8)) }
        #expect(throws: (any Error).self) { try ResultDocument.decode(Data("not json".utf8)) }
    }
}
