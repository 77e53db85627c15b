import Foundation
import LabKit

/// Result documents as `memlab report` and `memlab compare` read them: `ResultDocument.decode`
/// (with its validation), then everything drawn or computed from a document — the HTML report
/// with its charts and the standalone SVGs cut from it, the terminal table and CSV `run`
/// prints, and the comparison with its text and JSON.
///
/// Input: one JSON document, or two separated by a line `===` (baseline, candidate; with one,
/// it is compared with itself). Accepted: the first document decoded. Broken promises: a
/// document that decodes but does not encode again, or a comparison whose JSON cannot be
/// written (compare --json must never fail on a valid document).
extension FuzzTarget {
    static let report = FuzzTarget(name: "report", maxLen: 1 << 16,
                                   summary: "result documents: ResultDocument.decode + HTMLReport + ResultTable + Comparison") { data in
        let bytes = Array(data)
        let marker = Array("\n===\n".utf8)
        var first = bytes, second: [UInt8]? = nil
        if let at = FuzzTarget.firstIndex(of: marker, in: bytes) {
            first = Array(bytes[..<at])
            second = Array(bytes[(at + marker.count)...])
        }
        guard let a = try? ResultDocument.decode(Data(first)) else { return false }
        let b = second.flatMap { try? ResultDocument.decode(Data($0)) } ?? a
        let html = HTMLReport.render([.init(name: "a.json", document: a), .init(name: "b.json", document: b)], generatedAt: "fuzz")
        _ = StandaloneSVG.charts(in: html)
        _ = ResultTable.render(a)
        _ = ResultTable.csv(a)
        let cmp = Comparison.compare(baseline: ("a.json", a), candidates: [("b.json", b)])
        _ = Comparison.render(cmp, color: true)
        let encoder = JSONEncoder()
        do { _ = try encoder.encode(cmp) } catch { fuzzInvariant(false, "compare --json failed on valid documents: \(error)") }
        do {
            let again = try ResultDocument.decode(try a.jsonData())
            fuzzInvariant(again.runs.count == a.runs.count, "a document did not read back as it was written")
        } catch { fuzzInvariant(false, "a valid document did not encode and decode again: \(error)") }
        return true
    }
}
