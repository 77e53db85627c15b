/// A machine-wide setting in sysfs or procfs (KSM, THP, hugetlb pools, vm sysctls, zswap).
/// Reading gives the *effective* value: for selector files such as THP's
/// "always [madvise] never", the bracketed choice; otherwise the trimmed contents.
/// Writes go through LabKit's settings guard, never directly from a scenario.
public struct Knob: Hashable, Sendable, Codable, CustomStringConvertible {
    public let path: String

    public init(_ path: String) { self.path = path }

    public var description: String { path }
    public var exists: Bool { ProcFile.exists(path) }

    public func read() throws(SystemError) -> String {
        Knob.effectiveValue(of: try ProcFile.read(path))
    }

    public func write(_ value: String) throws(SystemError) {
        try ProcFile.write(path, value)
    }

    /// Knobs that writing this one changes as a side effect. The settings guard journals them
    /// (at their value now) before this one, so a restore — which goes in reverse — gives
    /// them back after it. KSM's advisor_mode resets pages_to_scan on every change (to 100 for
    /// `none`, to advisor_min_pages_to_scan for `scan-time`; mm/ksm.c set_advisor_defaults).
    public var alsoChanges: [Knob] {
        path == KSM.Knobs.advisorMode.path ? [KSM.Knobs.pagesToScan] : []
    }

    /// Writes `value` the way the kernel accepts it. KSM's merge_across_nodes and
    /// max_page_sharing can change only while no page is merged (EBUSY otherwise;
    /// Documentation/admin-guide/mm/ksm.rst): `run` is set to 2 first, which unmerges every
    /// KSM page on the machine, then the knob is written, then `run` gets back the value it
    /// had. Every other knob is a plain write.
    public func apply(_ value: String) throws(SystemError) {
        guard path == KSM.Knobs.mergeAcrossNodes.path || path == KSM.Knobs.maxPageSharing.path else {
            try write(value)
            return
        }
        let run = KSM.Knobs.run
        let before = try run.read()
        if before != "2" { try run.write("2") }
        do { try write(value) } catch {
            if before != "2" { try? run.write(before) }
            throw error
        }
        if before != "2" { try run.write(before) }
    }

    /// "always [madvise] never" -> "madvise"; "100\n" -> "100".
    public static func effectiveValue(of raw: String) -> String {
        let trimmed = raw.trimmingWhitespace()
        if let open = trimmed.firstIndex(of: "["), let close = trimmed[open...].firstIndex(of: "]") {
            return String(trimmed[trimmed.index(after: open)..<close])
        }
        return trimmed
    }

    /// The choices a selector file offers ("always [madvise] never" -> [always, madvise, never]),
    /// empty for a plain value.
    public func choices() -> [String] {
        guard let raw = try? ProcFile.read(path), raw.contains("[") else { return [] }
        return raw.trimmingWhitespace().split(separator: " ").map {
            String($0).replacingBrackets()
        }
    }

    /// The sequence of values to write to bring this knob back to `original`. Almost always
    /// just the value; KSM's `run` is special: going back to 0 after merging first writes 2,
    /// which unmerges every page and empties the stable tree (writing 0 alone would leave
    /// merged pages and `pages_shared` behind).
    public func restoreSequence(to original: String, current: String) -> [String] {
        if path == KSM.Knobs.run.path && original == "0" && current == "1" { return ["2", "0"] }
        return [original]
    }
}

extension StringProtocol {
    func trimmingWhitespace() -> String {
        var s = Substring(self)
        while let c = s.first, c == " " || c == "\n" || c == "\t" || c == "\r" { s.removeFirst() }
        while let c = s.last, c == " " || c == "\n" || c == "\t" || c == "\r" { s.removeLast() }
        return String(s)
    }

    func replacingBrackets() -> String {
        String(self.filter { $0 != "[" && $0 != "]" })
    }
}
