#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Foundation
import LabKit

/// Reads result documents named on the command line: files, or directories (every *.json in
/// them that is a memlab result; others are passed over with a note).
enum ResultFiles {
    static func load(_ paths: [String]) throws -> [HTMLReport.Input] {
        var out: [HTMLReport.Input] = []
        for path in paths {
            var isDir: ObjCBool = false
            guard FileManager.default.fileExists(atPath: path, isDirectory: &isDir) else {
                throw UsageError("no such file or directory: \(path)")
            }
            if isDir.boolValue {
                let names = ((try? FileManager.default.contentsOfDirectory(atPath: path)) ?? []).filter { $0.hasSuffix(".json") }.sorted()
                for n in names {
                    let p = (path as NSString).appendingPathComponent(n)
                    do { out.append(try loadOne(p)) } catch { writeStderr("memlab: note: passing over \(p): \(error)\n") }
                }
            } else {
                out.append(try loadOne(path))
            }
        }
        if out.isEmpty { throw UsageError("no memlab result documents in \(paths.joined(separator: ", "))") }
        return out
    }

    static func loadOne(_ path: String) throws(UsageError) -> HTMLReport.Input {
        guard let data = FileManager.default.contents(atPath: path) else { throw UsageError("cannot read \(path)") }
        do {
            return HTMLReport.Input(name: path, document: try ResultDocument.decode(data))
        } catch let e as UsageError {
            throw UsageError("\(path): \(e.message)")
        } catch {
            throw UsageError("\(path): not a memlab result document (\(Self.describe(error)))")
        }
    }

    static func describe(_ error: Error) -> String {
        switch error {
        case DecodingError.keyNotFound(let key, let ctx):
            return "missing '\(key.stringValue)'" + (ctx.codingPath.isEmpty ? "" : " in " + ctx.codingPath.map(\.stringValue).joined(separator: "."))
        case DecodingError.typeMismatch(_, let ctx), DecodingError.valueNotFound(_, let ctx):
            return "wrong type at " + ctx.codingPath.map(\.stringValue).joined(separator: ".")
        case DecodingError.dataCorrupted(let ctx):
            return ctx.debugDescription
        default:
            return "\(error)"
        }
    }
}

struct Compare: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Compare result documents: every metric of B (C, ...) against baseline A.",
        discussion: """
        Runs are paired by scenario, variant and parameters (else the same scenario:variant; results of \
        different scenarios, parameters or hosts are compared but flagged). For each metric measured on \
        both sides: the ratio of medians (candidate / baseline), a 95% confidence interval of the ratio \
        and the p-value of Welch's t-test on the logarithms of the samples (Mann-Whitney U is in --json \
        as a cross-check). "~ within noise" marks p >= 0.05. On a terminal, better is green and worse \
        red according to each metric's `better`; NO_COLOR or a pipe gives plain text.

        Examples:
          memlab compare results/before.json results/after.json
          memlab compare base.json thp-always.json thp-never.json --json cmp.json
        """)

    @Argument(help: "Result documents: the first is the baseline.")
    var files: [String]

    @Option(help: ArgumentHelp("Write the comparison as JSON (schema memlab.compare/1) to this file, or - for stdout.", valueName: "file"))
    var json: String?

    func run() throws {
        guard files.count >= 2 else { throw UsageError("compare needs at least two result documents: BASELINE CANDIDATE [CANDIDATE ...]") }
        if let json, json != "-" { try Session.checkWritable(json, what: "--json", acceptDevice: true) }
        let docs = try files.map { (f) throws(UsageError) in try ResultFiles.loadOne(f) }
        let report = Comparison.compare(baseline: (docs[0].name, docs[0].document),
                                        candidates: docs.dropFirst().map { ($0.name, $0.document) })
        if let json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            let data = try encoder.encode(report)
            if json == "-" { print(String(decoding: data, as: UTF8.self)); return }
            try Session.write(data, to: json)
        }
        let color = isatty(1) == 1 && ProcessInfo.processInfo.environment["NO_COLOR"] == nil
            && ProcessInfo.processInfo.environment["TERM"] != "dumb"
        print(Comparison.render(report, color: color), terminator: "")
    }
}

struct Report: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Write one self-contained HTML report (inline SVG charts) from result documents.",
        discussion: """
        Charts follow the data: time series (e.g. KSM pages_sharing while merging), each metric against a \
        swept parameter, latency percentiles as distributions, bars per variant, and the same run across \
        files. The page needs no network.

        Examples:
          memlab report results/*.json -o report.html
          memlab report results/ -o results/report.html
          memlab report lab.json -o lab.html --svg-dir figures     (each chart also as figures/chart-N-KIND.svg)
        """)

    @Argument(help: "Result documents, or directories holding them.")
    var results: [String]

    @Option(name: [.short, .customLong("output")], help: ArgumentHelp("The HTML file to write.", valueName: "file"))
    var output = "report.html"

    @Option(help: ArgumentHelp("Also write every chart as a standalone SVG file into this directory (for handouts).", valueName: "dir"))
    var svgDir: String?

    @Flag(help: "Do not print the report's path.")
    var quiet = false

    func run() throws {
        try Session.checkWritable(output, what: "--output", acceptDevice: true)
        let inputs = try ResultFiles.load(results)
        let html = HTMLReport.render(inputs)
        try Session.write(Data(html.utf8), to: output)
        if !quiet { print("report: \(output)") }
        if let svgDir {
            let charts = StandaloneSVG.charts(in: html)
            for c in charts {
                let path = (svgDir as NSString).appendingPathComponent("\(c.id).svg")
                try Session.write(Data(c.svg.utf8), to: path)
                if !quiet { print("chart:  \(path)  \(c.title)") }
            }
        }
    }
}
