#if canImport(Glibc)
import Glibc
#endif
import Foundation
#if canImport(FoundationXML)
import FoundationXML
#endif
@testable import LabKit
import Testing

let chromiumPath: String? = ["/usr/bin/chromium", "/usr/bin/chromium-browser"].first { FileManager.default.isExecutableFile(atPath: $0) }
let scriptPath: String? = ["/usr/bin/script"].first { FileManager.default.isExecutableFile(atPath: $0) }

/// Runs a program to completion with a deadline; stdout and stderr together.
func runProgram(_ path: String, _ args: [String], seconds: Double = 120, environment: [String: String]? = nil) throws -> (Int32, String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: path)
    p.arguments = args
    if let environment { p.environment = environment }
    let out = Pipe()
    p.standardOutput = out
    p.standardError = out
    try p.run()
    let killer = DispatchWorkItem { if p.isRunning { p.terminate() } }
    DispatchQueue.global().asyncAfter(deadline: .now() + seconds, execute: killer)
    let data = out.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    killer.cancel()
    return (p.terminationStatus, String(decoding: data, as: UTF8.self))
}

/// The experiment workflow end to end with the real binary: sweeps and their result layout,
/// compare, the HTML report in a real browser, and progress. Uses the selftest scenario (no
/// knob is borrowed) and result documents written by the test. Under KernelTests with every
/// other test that starts memlab: each start restores any dead memlab's journal it finds
/// (machine-wide, through the registry), which a guard test running meanwhile must see itself.
extension KernelTests {
@Suite struct Workflow {
    @Test func commandLineSweepMakesOneFullRunPerPoint() throws {
        let dir = TempDir()
        let out = try Memlab.run(["run", "selftest:ok", "--set", "size=1M..4M x2", "--repeat", "2",
                                  "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
        #expect(out.status == 0, "stderr: \(out.stderr)")
        let rs = runs(try loadJSON(dir.file("r.json")))
        #expect(rs.count == 3)
        #expect(rs.map { ($0["params"] as? [String: Any])?["size"] as? Int } == [1 << 20, 2 << 20, 4 << 20])
        for (i, r) in rs.enumerated() {
            #expect(r["repetitions"] as? Int == 2)
            #expect((metric(r, "fill_time")?["samples"] as? [Double])?.count == 2)
            let sweep = try #require(r["sweep"] as? [String: Any])
            #expect(sweep["point"] as? Int == i + 1)
            #expect(sweep["points"] as? Int == 3)
            let axes = try #require(sweep["parameters"] as? [[String: Any]])
            #expect(axes.first?["parameter"] as? String == "size")
            #expect(axes.first?["values"] as? [Int] == [1 << 20, 2 << 20, 4 << 20])
        }
        // Bad sweep syntax is a usage error that runs nothing.
        let bad = try Memlab.run(["run", "selftest:ok", "--set", "size=4M..1M x2", "--json", dir.file("bad.json")], stateDir: dir.path)
        #expect(bad.status == 2)
        #expect(bad.stderr.contains("backwards"))
        #expect(!FileManager.default.fileExists(atPath: dir.file("bad.json")))
    }

    @Test func scenarioFileListSweeps() throws {
        let dir = TempDir()
        try """
        scenario = "selftest"
        variant = "ok"
        repeat = 1
        [params]
        size = ["1M", "2M"]
        """.write(toFile: dir.file("s.toml"), atomically: true, encoding: .utf8)
        let out = try Memlab.run(["run", dir.file("s.toml"), "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
        #expect(out.status == 0, "stderr: \(out.stderr)")
        let rs = runs(try loadJSON(dir.file("r.json")))
        #expect(rs.count == 2)
        #expect(rs.allSatisfy { $0["sweep"] != nil })
    }

    /// A document as another module would write it: a time series, latency percentiles per
    /// policy, two variants, and a sweep — the report must pick a chart for each.
    static func syntheticDocument() -> ResultDocument {
        func m(_ name: String, _ unit: MetricUnit, _ samples: [Double], better: Better = .lower) -> Metric {
            Metric(name: name, unit: unit, better: better, samples: samples, summary: Statistics.summarize(samples)!)
        }
        func run(_ variant: String, _ params: [String: ParamValue], _ metrics: [Metric], series: [TimeSeries] = [], sweep: SweepInfo? = nil) -> RunResult {
            var r = RunResult(scenario: "synthetic", variant: variant, params: Params(params), placement: LabKit.Placement(), status: .ok, reason: nil,
                              settings: SettingsRecord(changed: ["/sys/kernel/mm/ksm/run": SettingChange(from: "0", to: "1")], restored: true),
                              repetitions: 3, warmup: 0, metrics: metrics, timeseries: series)
            r.sweep = sweep
            return r
        }
        let ts = TimeSeries(name: "pages_sharing", unit: .pages, intervalS: 0.05, t: (0..<20).map { Double($0) * 0.05 }, values: (0..<20).map { Double(min($0 * 300, 4000)) })
        let sizes: [ParamValue] = [.int(64 << 20), .int(256 << 20), .int(1 << 30)]
        let axis = [SweepAxis(parameter: "size", values: sizes)]
        var runs = [
            run("merge", ["pages": .int(16384)], [m("merge_time", .s, [0.40, 0.41, 0.39]), m("ksmd_cpu_time", .s, [0.20, 0.21, 0.19])], series: [ts]),
            run("fault", ["policy": .string("always")], [m("fault_latency_p50", .ns, [900, 950, 920]), m("fault_latency_p99", .ns, [4000, 4100, 3900]), m("fault_latency_max", .ns, [20000, 25000, 22000])]),
            run("fault_never", ["policy": .string("never")], [m("fault_latency_p50", .ns, [300, 310, 290]), m("fault_latency_p99", .ns, [1500, 1600, 1400]), m("fault_latency_max", .ns, [9000, 9500, 9900])]),
        ]
        // A full distribution per repetition (as the scenarios record from their histograms).
        var cow = run("cow", [:], [m("cow_fault_latency_p50", .ns, [2000, 2100]), m("cow_fault_latency_max", .ns, [30000, 31000])])
        cow.distributions = (1...2).map { rep in
            Distribution(name: "cow_fault_latency", unit: .ns, repetition: rep, count: 4096, percentiles: Distribution.grid,
                         values: Distribution.grid.map { 1500 + $0 * Double(10 * rep) })
        }
        runs.append(cow)
        // Two migration-like runs: downtime against total time is a trade-off chart.
        runs.append(run("precopy", [:], [m("total_time", .s, [0.8, 0.82]), m("downtime", .s, [0.05, 0.055])]))
        runs.append(run("postcopy", [:], [m("total_time", .s, [0.28, 0.29]), m("downtime", .s, [0.004, 0.006])]))
        for (i, s) in sizes.enumerated() {
            runs.append(run("tlb", ["size": s], [m("access_latency", .ns, [Double(2 + i * 3), Double(2 + i * 3) + 0.2, Double(2 + i * 3) - 0.1])],
                            sweep: SweepInfo(group: 1, point: i + 1, points: 3, parameters: axis)))
        }
        let features = ResultDocument.Features(ksm: true, thp: "madvise", hugetlbSizes: [2 << 20], userfaultfd: true, zswap: true, swapBytes: 0)
        let host = ResultDocument.Host(kernel: "6.18.0-test", arch: "x86_64", cpus: 2, memoryBytes: 8 << 30, numaNodes: 1, pageSize: 4096,
                                       virtualized: true, cpuModel: "test <cpu> & \"quotes\"", features: features)
        return ResultDocument(tool: .init(name: "memlab", version: "test"), startedAt: "2026-01-01T00:00:00Z", host: host, runs: runs)
    }

    @Test func compareFlagsDifferencesAndWritesJSON() throws {
        let dir = TempDir()
        for name in ["a", "b"] {
            let out = try Memlab.run(["run", "selftest:ok", "--set", "size=\(name == "a" ? "4M" : "8M")", "--repeat", "3",
                                      "--json", dir.file("\(name).json"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
        }
        let out = try Memlab.run(["compare", dir.file("a.json"), dir.file("b.json")], stateDir: dir.path)
        #expect(out.status == 0, "stderr: \(out.stderr)")
        #expect(out.stdout.contains("fill_time"))
        #expect(out.stdout.contains("Welch"))
        #expect(out.stdout.contains("different parameters: size 4194304 -> 8388608"))
        #expect(!out.stdout.contains("\u{1B}["), "no colour on a pipe")
        let j = try Memlab.run(["compare", dir.file("a.json"), dir.file("b.json"), "--json", "-"], stateDir: dir.path)
        let object = try #require(try JSONSerialization.jsonObject(with: Data(j.stdout.utf8)) as? [String: Any])
        #expect(object["schema"] as? String == "memlab.compare/1")
        let pair = try #require(((object["comparisons"] as? [[String: Any]])?.first?["pairs"] as? [[String: Any]])?.first)
        let fill = try #require((pair["metrics"] as? [[String: Any]])?.first { $0["name"] as? String == "fill_time" })
        #expect(fill["ratio"] is Double)
        #expect((fill["ratio_ci95"] as? [Double])?.count == 2)
        #expect(fill["welch_p"] is Double)
        #expect(fill["mann_whitney_p"] is Double)
        // A file that is not a result is a usage error.
        try "{}".write(toFile: dir.file("x.json"), atomically: true, encoding: .utf8)
        #expect(try Memlab.run(["compare", dir.file("a.json"), dir.file("x.json")], stateDir: dir.path).status == 2)
    }

    @Test(.enabled(if: chromiumPath != nil, "needs Chromium (Debian package chromium; scripts/deps installs it)"))
    func reportRendersInChromiumWithTheExpectedCharts() throws {
        let dir = TempDir()
        try Self.syntheticDocument().jsonData().write(to: URL(fileURLWithPath: dir.file("synthetic.json")))
        let out = try Memlab.run(["run", "selftest:ok", "--set", "size=1M,4M,16M", "--repeat", "2", "--json", dir.file("sweep.json"), "--quiet"], stateDir: dir.path)
        #expect(out.status == 0, "stderr: \(out.stderr)")
        let rep = try Memlab.run(["report", dir.file("synthetic.json"), dir.file("sweep.json"), "-o", dir.file("report.html")], stateDir: dir.path)
        #expect(rep.status == 0, "stderr: \(rep.stderr)")
        let html = try String(contentsOfFile: dir.file("report.html"), encoding: .utf8)
        // Self-contained: nothing fetched from anywhere.
        let external = html.replacingOccurrences(of: "http://www.w3.org/2000/svg", with: "").contains("http://")
        #expect(!external)
        #expect(!html.contains("https://"))
        #expect(!html.contains("<script src"))
        #expect(!html.contains("<link"))
        #expect(html.contains("test &lt;cpu&gt; &amp; &quot;quotes&quot;"), "text is escaped")

        let chromium = chromiumPath!
        let profile = dir.file("profile")
        let (status, dom) = try runProgram(chromium, ["--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=\(profile)",
                                                      "--dump-dom", "file://\(dir.file("report.html"))"])
        #expect(status == 0, "\(dom.suffix(2000))")
        let body = try #require(dom.range(of: "<body[^>]*>", options: .regularExpression).map { String(dom[$0]) }, "no body in \(dom.prefix(500))")
        func attribute(_ name: String) -> Int? {
            guard let r = body.range(of: "\(name)=\"[0-9]+\"", options: .regularExpression) else { return nil }
            return Int(body[r].split(separator: "\"")[1])
        }
        // The page's own script ran, saw no error, and found every chart laid out with a size.
        let errorText = dom.components(separatedBy: "page-errors").dropFirst().first.map { String($0.prefix(500)) } ?? ""
        #expect(attribute("data-errors") == 0, "page errors: \(errorText)")
        let charts = try #require(attribute("data-charts"))
        #expect(charts >= 6)
        #expect(attribute("data-charts-drawn") == charts)
        for kind in ["chart-timeseries", "chart-sweep", "chart-latency", "chart-bars", "chart-tradeoff"] {
            let found = dom.contains("class=\"chart \(kind)\"")
            #expect(found, "missing \(kind)")
        }
        // Axes carry units.
        for label in ["time (s)", "pages_sharing (pages)", "size (bytes), log scale", "access_latency (ns)", "percentile (%)",
                      "fill_throughput (bytes/s)", "median (s)", "fault_latency_p99 (ns)"] {
            let found = dom.contains(">\(label)<")
            #expect(found, "no axis labelled \(label)")
        }
        // A recorded distribution is drawn whole, as a CDF.
        #expect(dom.contains("cow_fault_latency distribution"))
        #expect(dom.contains("CDF of every event"))
        let svg = dom.contains("<svg class=\"chart-svg\"")
        #expect(svg)

        let (shot, log) = try runProgram(chromium, ["--headless", "--no-sandbox", "--disable-gpu", "--user-data-dir=\(profile)",
                                                    "--window-size=1280,2000", "--screenshot=\(dir.file("report.png"))",
                                                    "file://\(dir.file("report.html"))"])
        #expect(shot == 0, "\(log.suffix(1000))")
        let png = FileManager.default.contents(atPath: dir.file("report.png")) ?? Data()
        #expect(png.count > 10_000)
        #expect(png.starts(with: [0x89, 0x50, 0x4E, 0x47]))
    }

    /// `--svg-dir`: every chart of the page as its own well-formed SVG file, styled, with its title.
    @Test func reportWritesEachChartAsAStandaloneSVG() throws {
        let dir = TempDir()
        try Self.syntheticDocument().jsonData().write(to: URL(fileURLWithPath: dir.file("synthetic.json")))
        let out = try Memlab.run(["report", dir.file("synthetic.json"), "-o", dir.file("r.html"), "--svg-dir", dir.file("svg")], stateDir: dir.path)
        #expect(out.status == 0, "stderr: \(out.stderr)")
        let html = try String(contentsOfFile: dir.file("r.html"), encoding: .utf8)
        let figures = html.components(separatedBy: "<figure class=\"chart ").count - 1
        let files = try FileManager.default.contentsOfDirectory(atPath: dir.file("svg")).filter { $0.hasSuffix(".svg") }
        #expect(figures >= 6)
        #expect(files.count == figures)
        #expect(files.contains { $0.hasSuffix("-latency.svg") })
        for f in files {
            let data = try #require(FileManager.default.contents(atPath: dir.file("svg/\(f)")))
            let parser = XMLParser(data: data)
            #expect(parser.parse(), "\(f) is not well-formed XML: \(String(describing: parser.parserError))")
            let text = String(decoding: data, as: UTF8.self)
            #expect(text.contains("<style>") && text.contains("<title"), "\(f)")
            #expect(text.contains("<path") || text.contains("<rect"), "\(f) draws nothing")
        }
    }

    @Test func reportOfAFileThatIsNotAResultIsAUsageError() throws {
        let dir = TempDir()
        try "not json".write(toFile: dir.file("x.json"), atomically: true, encoding: .utf8)
        let out = try Memlab.run(["report", dir.file("x.json"), "-o", dir.file("r.html")], stateDir: dir.path)
        #expect(out.status == 2)
        #expect(!FileManager.default.fileExists(atPath: dir.file("r.html")))
    }

    /// On a pipe: no progress at all, and the results are whole.
    @Test func noProgressOnAPipe() throws {
        let dir = TempDir()
        let out = try Memlab.run(["run", "selftest:hang", "--set", "deadline_s=1.6", "--repeat", "1", "--json", dir.file("r.json")], stateDir: dir.path)
        #expect(out.status == 1)
        #expect(!out.stderr.contains("\r"))
        #expect(!out.stderr.contains("elapsed"))
        #expect(!out.stdout.contains("\r"))
        #expect(runs(try loadJSON(dir.file("r.json"))).first?["status"] as? String == "failed")
    }

    /// On a terminal (a pty from script(1)): the line names the run, its phase and the time.
    @Test(.enabled(if: scriptPath != nil, "needs script(1) from util-linux for a pseudo-terminal"))
    func progressOnATerminal() throws {
        let dir = TempDir()
        let command = [Memlab.binary, "run", "selftest:hang", "--set", "deadline_s=1.8", "--repeat", "1", "--json", dir.file("r.json")]
            .map { "'\($0)'" }.joined(separator: " ")
        let env = Memlab.environment(stateDir: dir.path)
        let (_, text) = try runProgram(scriptPath!, ["-qec", command, "/dev/null"], environment: env)
        #expect(text.contains("memlab [1/1] selftest:hang"), "\(text.prefix(400))")
        #expect(text.contains("repetition 1/1"))
        #expect(text.contains("s elapsed"))
        #expect(runs(try loadJSON(dir.file("r.json"))).first?["status"] as? String == "failed")
        // --quiet: nothing, even on a terminal.
        let (_, quiet) = try runProgram(scriptPath!, ["-qec", command + " --quiet", "/dev/null"], environment: env)
        #expect(!quiet.contains("elapsed"))
    }
}
}
