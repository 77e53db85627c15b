#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
@testable import LabKit
import LinuxMM

/// Input that used to trap (SIGILL), hang or allocate without bound, now refused with a
/// reason — each case is one reproduced before the fix (issue 11).
@Suite struct InputHardeningTests {
    let fake = SweepTests.Fake()
    func spec(_ name: String) -> ParameterSpec { fake.parameters.first { $0.name == name }! }

    @Test(arguments: ["-", "-1", "1-", "-1-2", "0-9223372036854775807", "9223372036854775808", "0,,1", "1e3", "+1", "3-1", "0x1", ""])
    func cpuListsThatAreNotListsAreRefused(_ text: String) {
        #expect(throws: CPUList.ParseError.self) { try CPUList.parse(text) }
    }

    @Test func cpuListsParse() throws {
        #expect(try CPUList.parse("0") == [0])
        #expect(try CPUList.parse("0,2-3") == [0, 2, 3])
        #expect(try CPUList.parse("0-3,2") == [0, 1, 2, 3])
        #expect(try CPUList.parse("0-1\n") == [0, 1])       // as /sys/devices/system/cpu/online reads
        #expect(try CPUList.parse("007") == [7])
        #expect(try CPUList.parse("8191") == [8191])
        #expect(throws: CPUList.ParseError.self) { try CPUList.parse("8192") }
    }

    /// Bounds near Int.max used to trap converting a Double back to Int.
    @Test(arguments: ["1..9223372036854775807", "9223372036854775000..9223372036854775807", "1..9223372036854775807 x2",
                      "1..9223372036854775807 +1", "4611686018427387904..9223372036854775807 x1.5", "-9223372036854775808..9223372036854775807",
                      "1..9223372036854775807 +9223372036854775807", "1..2 x1e308", "1..2 xinf", "1..2 +0"])
    func sweepBoundsNearIntMaxAreRefusedOrBounded(_ text: String) {
        // No trap: either a bounded list or a UsageError.
        if let vs = try? Sweep.values(text, for: spec("pages")) { #expect(vs.count <= Sweep.maxPoints) }
    }

    @Test func integerSweepsStayExactNearTheirBounds() throws {
        let big = ParameterSpec("n", .int(0...Int.max), default: .int(0), help: "")
        #expect(try Sweep.values("9223372036854775805..9223372036854775807", for: big)
                == [.int(9_223_372_036_854_775_805), .int(9_223_372_036_854_775_806), .int(Int.max)])
        #expect(try Sweep.values("1..9223372036854775807 x4611686018427387904", for: big) == [.int(1), .int(4_611_686_018_427_387_904)])
        #expect(throws: UsageError.self) { try Sweep.values("0..9223372036854775807", for: big) }
        // Found by the toml fuzz target: Double(LO) rounded up past Int.max, so the sweep had
        // no point at all and the plan was silently empty.
        #expect(try Sweep.values("9223372036854775806..9223372036854775807 x1.5", for: big) == [.int(9_223_372_036_854_775_806)])
    }

    @Test func doubleSweepsWithExtremeBoundsAreRefused() throws {
        #expect(throws: UsageError.self) { try Sweep.values("0..1 +1e-300", for: spec("ratio")) }
        let wide = ParameterSpec("x", .double(-Double.greatestFiniteMagnitude...Double.greatestFiniteMagnitude), default: .double(0), help: "")
        #expect(throws: UsageError.self) { try Sweep.values("-1.7e308..1.7e308 +1", for: wide) }
        #expect(try Sweep.values("1e307..1.7e308 x10", for: wide).count == 2)
    }

    /// Three axes of 1000 values: 10^9 points used to be built before the limit was checked.
    @Test(.timeLimit(.minutes(1))) func aHugeProductIsRefusedBeforeItIsBuilt() {
        let axis = SweepAxis(parameter: "pages", values: (1...1000).map { .int($0) })
        let t0 = Clock.nanoseconds()
        #expect(throws: UsageError.self) { try Sweep.pointCount([axis, axis, axis]) }
        #expect(throws: UsageError.self) {
            try Sweep.expand(fake, variant: "v", fixed: [:], axes: [axis, axis, axis], group: 1)
        }
        #expect(Clock.seconds(since: t0) < 1, "the product must be sized, not built")
        #expect(throws: UsageError.self) { try Sweep.pointCount(Array(repeating: axis, count: 7)) }
    }

    /// A factor barely above 1 used to walk ~10^15 steps between two equal rounded points.
    @Test(.timeLimit(.minutes(1))) func geometricSweepsAreCountedBeforeTheyAreWalked() {
        let t0 = Clock.nanoseconds()
        #expect(throws: UsageError.self) { try Sweep.values("1..4 x1.0000000000000002", for: spec("pages")) }
        #expect(throws: UsageError.self) { try Sweep.values("1M..2M x1.0000000001", for: spec("size")) }
        #expect(throws: UsageError.self) { try Sweep.values("0.1..0.2 x1.0000000001", for: spec("ratio")) }
        #expect(Clock.seconds(since: t0) < 1)
    }

    @Test func aParameterGivenTwiceIsRefused() throws {
        #expect(throws: UsageError.self) { try RunPlan.parseSets(["pages=1", "pages=2"]) }
        #expect(try RunPlan.parseSets(["pages=1", "ratio=0.5"]).count == 2)
    }

    @Test func scenarioFilesWithANulOrNotUTF8AreRefused() {
        let text = "scenario = \"ksm\"\nrepeat = 2\n"
        var withNul = Array(text.utf8)
        withNul.insert(0, at: 18)
        withNul += Array("[params]\npages = 99999999999\n".utf8)   // hidden behind the NUL
        #expect(throws: UsageError.self) { try ScenarioFile.parse(bytes: withNul) }
        #expect(throws: UsageError.self) { try ScenarioFile.parse(bytes: Array(text.utf8) + [0xFF, 0xFE]) }
        #expect(throws: UsageError.self) { try ScenarioFile.parse(bytes: Array(repeating: 0x20, count: ScenarioFile.maxBytes + 1)) }
        #expect((try? ScenarioFile.parse(bytes: Array(text.utf8)))?.entries.first?.repeats == 2)
    }
}

/// Result documents from elsewhere: the report and compare refuse what they cannot draw,
/// and draw extreme numbers without hanging.
@Suite struct ReportHardeningTests {
    func document(_ edit: (inout RunResult) -> Void) throws -> ResultDocument {
        var doc = try ResultDocumentTests.makeDocument()
        edit(&doc.runs[0])
        return doc
    }

    func decode(_ doc: ResultDocument) throws -> ResultDocument {
        try ResultDocument.decode(try doc.jsonData())
    }

    @Test func anEmptySweepParameterListIsRefused() throws {
        let doc = try document { $0.sweep = SweepInfo(group: 1, point: 1, points: 1, parameters: []) }
        #expect(throws: UsageError.self) { try decode(doc) }
    }

    @Test func aOneElementCI95IsRefused() throws {
        let doc = try document { r in
            let s = r.metrics[0].summary
            r.metrics[0].summary = Summary(median: s.median, mean: s.mean, stddev: s.stddev, min: s.min, max: s.max, ci95: [1])
        }
        #expect(throws: UsageError.self) { try decode(doc) }
    }

    @Test func mismatchedSeriesAreRefused() throws {
        #expect(throws: UsageError.self) { try decode(try document { $0.timeseries[0].t = [0] }) }
        #expect(throws: UsageError.self) {
            try decode(try document { $0.distributions = [Distribution(name: "x", unit: .ns, count: 1, percentiles: [50], values: [])] })
        }
    }

    /// Values near ±1.7e308 used to make the axis-tick loop run forever.
    @Test(.timeLimit(.minutes(1))) func extremeValuesRenderAndCompare() throws {
        let extreme: [Double] = [-1.7e308, 1.7e308, Double.leastNonzeroMagnitude, -Double.greatestFiniteMagnitude, Double.greatestFiniteMagnitude]
        var docs: [ResultDocument] = []
        for k in 0..<2 {
            let samples = k == 0 ? extreme : extreme.reversed().map { $0 / 2 }
            let summary = try #require(Statistics.summarize(samples))
            #expect([summary.mean, summary.stddev, summary.min, summary.max].allSatisfy { $0.isFinite })
            let doc = try document { r in
                r.metrics = [Metric(name: "x", unit: .bytes, better: .higher, samples: samples, summary: summary)]
                r.timeseries = [TimeSeries(name: "y", unit: .pages, intervalS: 1, t: [0, 1, 2], values: [-1.7e308, 1.7e308, Double.leastNonzeroMagnitude])]
                r.distributions = [Distribution(name: "z", unit: .ns, count: 3, percentiles: [0, 50, 100], values: [Double.leastNonzeroMagnitude, 1, 1.7e308])]
                r.sweep = SweepInfo(group: 1, point: 1, points: 1, parameters: [SweepAxis(parameter: "pages", values: [.int(1)])])
            }
            docs.append(try decode(doc))
        }
        let html = HTMLReport.render(docs.enumerated().map { .init(name: "d\($0.offset).json", document: $0.element) })
        #expect(html.contains("<svg"))
        let report = Comparison.compare(baseline: ("a", docs[0]), candidates: [("b", docs[1])])
        let data = try JSONEncoder().encode(report)
        #expect(try JSONSerialization.jsonObject(with: data) is [String: Any], "compare --json must be valid JSON")
        _ = Comparison.render(report, color: false)
    }

    @Test func axisTicksAreFewWhateverTheData() {
        for (lo, hi) in [(-1.7e308, 1.7e308), (Double.leastNonzeroMagnitude, 1e-300), (0.0, 1e-300), (1.0, 1.0000000000000002), (-1e308, -1e307)] {
            for log in [false, true] {
                let s = SVGChart.Scale(values: [lo, hi], log: log, includeZero: false, plotLow: 0, plotHigh: 100)
                let t = s.ticks()
                #expect(t.count <= 60, "\(lo)...\(hi) log \(log): \(t.count) ticks")
            }
        }
    }
}

/// A journal is this process's only if pid *and* start time match: a pid recurs (1 in every
/// container), and a dead run's journal with this process's pid used to be skipped as ours —
/// its knobs then taken as "originals" by the new run.
@Suite struct JournalOwnershipTests {
    @Test func aJournalWithThisPidButAnotherStartIsNotOurs() {
        var j = Journal(ownerPID: getpid(), ownerStart: SettingsGuard.ownStart, command: "this")
        #expect(j.ownedByThisProcess && j.ownerIsAlive)
        j.ownerStart &+= 1
        #expect(!j.ownedByThisProcess, "another process that had this pid")
        #expect(!j.ownerIsAlive, "and it is gone: its journal is to be recovered")
    }

    @Test func statisticsOfTwoHugeSamplesStayFinite() throws {
        let s = try #require(Statistics.summarize([1.7e308, 1.7e308]))
        #expect(s.median == 1.7e308 && s.mean.isFinite)
        let e = try #require(Statistics.summarize([1.5, 2.5]))
        #expect(e.median == 2.0)
    }
}

/// Outputs are checked before a run, written atomically, and saved elsewhere when the write
/// fails — never lost.
@Suite struct ResultOutputTests {
    @Test func badPathsAreRefusedBeforeTheRun() {
        for p in ["", "/tmp", "/tmp/", "/dev/full", "/dev/null", "/proc/nonexistent-dir/x.json"] {
            #expect(throws: UsageError.self, "\(p)") { try ResultOutput.check(p, what: "--json") }
        }
    }

    @Test func atomicWriteReplacesWholeOrNotAtAll() throws {
        let dir = NSTemporaryDirectory() + "memlab-atomic-\(getpid())-\(Clock.nanoseconds())"
        try FileManager.default.createDirectory(atPath: dir, withIntermediateDirectories: true)
        defer { try? FileManager.default.removeItem(atPath: dir) }
        try AtomicFile.write(Array("old".utf8), to: dir + "/r.json")
        try AtomicFile.write(Array("new".utf8), to: dir + "/r.json")
        #expect(try String(contentsOfFile: dir + "/r.json", encoding: .utf8) == "new")
        #expect(ProcFile.list(dir) == ["r.json"], "no temporary file left")
        // A write that cannot happen (the target is a directory) leaves nothing behind.
        try FileManager.default.createDirectory(atPath: dir + "/d", withIntermediateDirectories: true)
        #expect(throws: SystemError.self) { try AtomicFile.write(Array("x".utf8), to: dir + "/d") }
        #expect(ProcFile.list(dir) == ["d", "r.json"])
    }

    @Test func aFailedWriteGoesToAFallback() throws {
        let state = NSTemporaryDirectory() + "memlab-state-\(getpid())-\(Clock.nanoseconds())"
        defer { try? FileManager.default.removeItem(atPath: state) }
        let saved = try #require(ResultOutput.save(Data("{}".utf8), to: "/proc/sys/no-such/r.json", stateDirectory: state))
        #expect(saved.failure != nil)
        #expect(saved.path.hasPrefix(state + "/unsaved/"))
        #expect(try String(contentsOfFile: saved.path, encoding: .utf8) == "{}")
    }
}

/// Scenario files the bundled TOML parser (toml++ 3.4.0) would abort on — found by the `toml`
/// fuzz target — are refused with a line and column instead; valid files that look alike pass.
@Suite struct TOMLPrecheckTests {
    @Test(arguments: ["[\n", "[[[1]]]", "[[=", "[ =", "scenario = \"ksm\"\n[ :\n", "g=[}", "a = [1, [2, }]]", "\u{FEFF}[:", "\u{3000}[:", "[é]"])
    func inputsTheParserWouldAbortOnAreRefused(_ text: String) {
        #expect(throws: UsageError.self) { try ScenarioFile.parse(text) }
    }

    @Test(arguments: ["a = [\n  [1],\n]\n", "[a]\n", "x = '''\n[\n'''\n", "[ \"q\" ]\n", "x = \"[\"\n", "x = [ # [\n 1 ]\n", "[[runs]]\nscenario = \"ksm\"\n", "t = { a = [1, 2] }\n"])
    func lookalikesPassTheCheck(_ text: String) throws {
        try TOMLPrecheck.check(text)
    }
}
