import Testing
@testable import LabKit

/// What the report draws from typed parameters: labels by what differs, units as recorded,
/// latency grouped by the recorded tags.
@Suite struct ReportLabelTests {
    func run(_ variant: String, _ params: [String: ParamValue], metrics: [String] = ["t"], units: [String: String] = [:]) -> RunResult {
        let one = Statistics.summarize([1])!
        var r = RunResult(scenario: "hugepages", variant: variant, params: Params(params), placement: Placement(), status: .ok,
                          reason: nil, settings: SettingsRecord(), repetitions: 1, warmup: 0)
        r.metrics = metrics.map { Metric(name: $0, unit: .s, better: .lower, samples: [1], summary: one) }
        r.paramUnits = units
        return r
    }

    /// The quick suite's huge-page runs: three fault kinds, two tlb kinds; tlb sets accesses,
    /// fault leaves it at its default.
    var quickRuns: [RunResult] {
        let units = ["kind": "none", "size": "bytes", "accesses": "count"]
        return ["4k", "thp", "hugetlb-2m"].map { run("fault", ["kind": .string($0), "size": .int(32 << 20), "accesses": .int(1_000_000)], units: units) }
            + ["4k", "thp"].map { run("tlb", ["kind": .string($0), "size": .int(64 << 20), "accesses": .int(500_000)], units: units) }
    }

    @Test func runsOfOneVariantAreLabelledByWhatDiffersAmongThem() {
        #expect(HTMLReport.labels(Array(quickRuns.prefix(3))) == ["kind=4k", "kind=thp", "kind=hugetlb-2m"])
    }

    @Test func aParameterThatOnlyDiffersBetweenVariantsIsNotALabel() {
        let labels = HTMLReport.labels(quickRuns)
        #expect(labels == ["fault kind=4k", "fault kind=thp", "fault kind=hugetlb-2m", "tlb kind=4k", "tlb kind=thp"])
        #expect(!labels.joined().contains("accesses"))
        #expect(!labels.joined().contains("size"))
    }

    @Test func variantsAloneWhenNothingElseDiffers() {
        let rs = [run("precopy", ["size": .int(1)]), run("hybrid", ["size": .int(1)])]
        #expect(HTMLReport.labels(rs) == ["precopy", "hybrid"])
    }

    @Test func labelsStayDistinct() {
        // One run per variant each, but two of them alike but for size: the size is added.
        let rs = [run("fault", ["size": .int(1 << 20)], units: ["size": "bytes"]), run("tlb", ["size": .int(1 << 20)], units: ["size": "bytes"]),
                  run("fault", ["size": .int(2 << 20)], units: ["size": "bytes"])]
        #expect(HTMLReport.labels(rs) == ["fault size=1M", "tlb", "fault size=2M"])
    }

    @Test func theQuickSuiteBarsReadByPageKind() {
        let html = HTMLReport.render([.init(name: "quick.json", document: ResultDocument(
            tool: .init(name: "memlab", version: "t"), startedAt: "now", host: ResultDocument.Host.current(), runs: quickRuns))])
        #expect(html.contains("kind=hugetlb-2m"))
        #expect(!html.contains("accesses=1000000 k"))
    }

    @Test func sweepAxisUnitAsRecorded() {
        let rs = [run("fault", ["stride": .int(1)], units: ["stride": "pages"])]
        #expect(HTMLReport.parameterUnit("stride", in: rs) == "pages")
        #expect(HTMLReport.parameterUnit("mode", in: [run("fault", ["mode": .string("a")], units: ["mode": "none"])]) == "")
        // Documents without units: the old guess from the name.
        #expect(HTMLReport.parameterUnit("timeout_s", in: [run("fault", [:])]) == "s")
    }

    @Test func latencyIsGroupedByTagsNotNames() {
        let one = Statistics.summarize([1])!
        var tagged = run("fault", ["kind": .string("thp")], metrics: [], units: ["kind": "none"])
        tagged.metrics = [
            Metric(name: "fault_latency_p50", unit: .ns, better: .lower, samples: [1], summary: one, distribution: "fault_latency", percentile: 50),
            Metric(name: "fault_latency_max", unit: .ns, better: .lower, samples: [1], summary: one, distribution: "fault_latency", percentile: 100),
            Metric(name: "round_trip_p99", unit: .ns, better: .lower, samples: [1], summary: one),
        ]
        let groups = HTMLReport.percentileGroups(tagged)
        #expect(Array(groups.keys) == ["fault_latency"])
        #expect(groups["fault_latency"]?.map(\.percentile) == [50, 100])
        // A document from before the tags: read from the names, as it always was.
        var old = tagged
        old.paramUnits = [:]
        old.metrics = old.metrics.map { var m = $0; m.distribution = nil; m.percentile = nil; return m }
        #expect(Set(HTMLReport.percentileGroups(old).keys) == ["fault_latency", "round_trip"])
    }
}
