import Foundation
import LabKit
import LinuxMM

/// A recorded access trace (`workload=trace`, `trace_file`; written by `record_trace`).
///
/// Plain text, one access per line, in order:
///
///     # memlab trace v1          (lines starting with '#' and blank lines are ignored)
///     17                         page index 17 (decimal)
///     @0x12000 w                 byte offset into the region (decimal or 0x hex): page 18, a write
///     19 r                       an explicit read
///
/// An access without `r`/`w` reads or writes by `write_ratio`. With `threads` = N, line i goes
/// to thread i mod N (so a trace recorded with N threads replays the same per-thread order).
enum TraceFile {
    struct Access: Sendable {
        static let unspecified: UInt8 = 0, read: UInt8 = 1, write: UInt8 = 2
        var page: Int32
        var mode: UInt8
    }

    /// Parses `path`; every access must lie inside a region of `pages` pages.
    static func load(_ path: String, pages: Int) throws(UsageError) -> [Access] {
        guard let data = FileManager.default.contents(atPath: path) else {
            throw UsageError("trace_file '\(path)': cannot be read (\(String(cString: strerror(errno))))")
        }
        guard let text = String(data: data, encoding: .utf8) else { throw UsageError("trace_file '\(path)': not UTF-8 text") }
        var out: [Access] = []
        var lineNo = 0
        for raw in text.split(separator: "\n", omittingEmptySubsequences: false) {
            lineNo += 1
            let line = raw.trimmingCharacters(in: .whitespaces)
            if line.isEmpty || line.hasPrefix("#") { continue }
            let fields = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            func bad(_ why: String) -> UsageError { UsageError("trace_file '\(path)' line \(lineNo): '\(line)' \(why); expected '<page>' or '@<byte offset>', optionally followed by r or w") }
            guard fields.count <= 2 else { throw bad("has more than two fields") }
            var f = String(fields[0])
            let isOffset = f.hasPrefix("@")
            if isOffset { f.removeFirst() }
            let value: Int?
            if f.hasPrefix("0x") || f.hasPrefix("0X") { value = Int(f.dropFirst(2), radix: 16) } else { value = Int(f) }
            guard let v = value, v >= 0 else { throw bad("is not a non-negative number") }
            let page = isOffset ? v / System.pageSize : v
            guard page < pages else { throw bad("lies outside the region (page \(page); size has \(pages) pages)") }
            var mode = Access.unspecified
            if fields.count == 2 {
                switch fields[1] {
                case "r", "R": mode = Access.read
                case "w", "W": mode = Access.write
                default: throw bad("has '\(fields[1])' where r or w belongs")
                }
            }
            out.append(Access(page: Int32(page), mode: mode))
        }
        if out.isEmpty { throw UsageError("trace_file '\(path)': holds no accesses") }
        return out
    }

    /// Writes the order `traces` access pages in (op i of every thread, then op i+1…), with
    /// each access's r/w, so that replaying it with the same `threads` repeats the workload.
    static func write(_ traces: AccessTraces, to path: String, note: String) throws {
        var s = "# memlab trace v1: one access per line, <page index> r|w; line i runs on thread i mod threads\n# \(note)\n"
        s.reserveCapacity(traces.threads * traces.opsPerThread * 8)
        for i in 0..<traces.opsPerThread {
            for t in 0..<traces.threads {
                let e = traces.ops[t * traces.opsPerThread + i]
                s += "\(e & AccessTraces.pageMask) \(e & AccessTraces.writeBit != 0 ? "w" : "r")\n"
            }
        }
        try s.write(toFile: path, atomically: true, encoding: .utf8)
    }
}
