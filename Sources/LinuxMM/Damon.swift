#if canImport(Glibc)
import Glibc
#endif

/// DAMON's sysfs admin interface (Documentation/admin-guide/mm/damon/usage.rst):
/// /sys/kernel/mm/damon/admin/kdamonds/{nr_kdamonds, N/{state,pid,contexts/…}}. A kdamond is
/// a kernel thread and a machine-wide resource: memlab adds one only where none is configured
/// (writing nr_kdamonds rebuilds every kdamond directory, and fails with EBUSY while any runs),
/// through LabKit's settings guard, which journals it first and turns it off and removes it
/// afterwards (also after a crash).
public enum Damon {
    public static let admin = "/sys/kernel/mm/damon/admin"
    public static let kdamonds = "\(admin)/kdamonds"
    public static let nrKdamonds = "\(kdamonds)/nr_kdamonds"

    public static var isAvailable: Bool { ProcFile.exists(nrKdamonds) }

    /// One kdamond as the admin interface shows it.
    public struct KdamondState: Sendable, Equatable {
        public var index: Int
        public var state: String
        public var pid: Int32?
        public var operations: [String]
    }

    /// The configured kdamonds (index, state on/off, pid, each context's operations).
    public static func configured() -> [KdamondState] {
        guard let n = Int((ProcFile.readIfPresent(nrKdamonds) ?? "").trimmingWhitespace()), n > 0 else { return [] }
        return (0..<n).map { i in
            let dir = "\(kdamonds)/\(i)"
            let state = (ProcFile.readIfPresent("\(dir)/state") ?? "?").trimmingWhitespace()
            let pid = Int32((ProcFile.readIfPresent("\(dir)/pid") ?? "").trimmingWhitespace()).flatMap { $0 > 0 ? $0 : nil }
            let contexts = Int((ProcFile.readIfPresent("\(dir)/contexts/nr_contexts") ?? "0").trimmingWhitespace()) ?? 0
            let ops = (0..<contexts).compactMap { ProcFile.readIfPresent("\(dir)/contexts/\($0)/operations")?.trimmingWhitespace() }
            return KdamondState(index: i, state: state, pid: pid, operations: ops)
        }
    }

    /// The operation sets this kernel offers ("vaddr", "fvaddr", "paddr"): a context's
    /// avail_operations where one exists, else the kernel's symbols (CONFIG_DAMON_VADDR builds
    /// damon_va_*, CONFIG_DAMON_PADDR damon_pa_*). Empty when neither can be read.
    public static func availableOperations() -> [String] {
        for k in configured() {
            let file = "\(kdamonds)/\(k.index)/contexts/0/avail_operations"
            if let text = ProcFile.readIfPresent(file) { return words(text) }
        }
        return operations(kallsyms: ProcFile.readIfPresent("/proc/kallsyms") ?? "")
    }

    /// Operation sets whose functions are in a /proc/kallsyms text.
    public static func operations(kallsyms text: String) -> [String] {
        var va = false, pa = false
        for line in text.split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count >= 3 else { continue }
            if f[2].hasPrefix("damon_va_") { va = true }
            if f[2].hasPrefix("damon_pa_") { pa = true }
            if va && pa { break }
        }
        return (va ? ["vaddr", "fvaddr"] : []) + (pa ? ["paddr"] : [])
    }

    /// Why memlab cannot drive DAMON vaddr reclaim here (nil when it can).
    public static func unavailableReason(ops: [String]? = nil, configured: [KdamondState]? = nil) -> String? {
        guard isAvailable else {
            return "\(admin) is missing: kernel built without CONFIG_DAMON_SYSFS (DAMON's sysfs admin interface)"
        }
        var why: [String] = []
        let ops = ops ?? availableOperations()
        if !ops.contains("vaddr") {
            why.append("DAMON has no virtual address operations here (available: \(ops.isEmpty ? "none" : ops.joined(separator: " "))): kernel built without CONFIG_DAMON_VADDR")
        }
        let configured = configured ?? Damon.configured()
        if !configured.isEmpty {
            let what = configured.map { "kdamond \($0.index) \($0.state)\($0.pid.map { " (pid \($0))" } ?? "")\($0.operations.isEmpty ? "" : ", " + $0.operations.joined(separator: "/"))" }
            why.append("DAMON already has \(configured.count) kdamond(s) configured (\(what.joined(separator: "; "))), not memlab's: adding one rewrites nr_kdamonds, which rebuilds every kdamond directory (EBUSY while one runs), and memlab does not touch someone else's DAMON setup")
        }
        return why.isEmpty ? nil : why.joined(separator: "; and ")
    }

    static func words(_ text: String) -> [String] {
        text.split(whereSeparator: { $0 == " " || $0 == "\n" || $0 == "\t" }).map(String.init)
    }

    /// A DAMOS scheme's statistics (schemes/N/stats/*), refreshed by writing
    /// `update_schemes_stats` to the kdamond's state.
    public struct SchemeStats: Sendable, Equatable {
        public var nrTried: UInt64 = 0
        public var szTried: UInt64 = 0
        public var nrApplied: UInt64 = 0
        public var szApplied: UInt64 = 0
        public var qtExceeds: UInt64 = 0

        public init() {}

        /// From the stats directory's files, by name ("nr_tried" -> "12\n"). A file missing or
        /// not a number is nil: a kernel that lacks a counter must not read as zero.
        public init?(files: [String: String]) {
            func value(_ name: String) -> UInt64? { files[name].flatMap { UInt64($0.trimmingWhitespace()) } }
            guard let nt = value("nr_tried"), let st = value("sz_tried"), let na = value("nr_applied"), let sa = value("sz_applied") else { return nil }
            nrTried = nt; szTried = st; nrApplied = na; szApplied = sa
            qtExceeds = value("qt_exceeds") ?? 0
        }

        public static func read(statsDirectory dir: String) -> SchemeStats? {
            var files: [String: String] = [:]
            for n in ["nr_tried", "sz_tried", "nr_applied", "sz_applied", "qt_exceeds"] { files[n] = ProcFile.readIfPresent("\(dir)/\(n)") }
            return SchemeStats(files: files)
        }
    }

    /// How memlab configures its kdamond: one context, one target process, one scheme.
    public struct PageoutScheme: Sendable, Equatable {
        public var pid: Int32
        public var sampleUS: Int
        public var aggrUS: Int
        public var updateUS: Int
        public var minRegions: Int = 10
        public var maxRegions: Int = 1000
        /// Regions accessed at most this many times per aggregation interval (0: not at all).
        public var maxAccesses: Int
        /// …for at least this many aggregation intervals.
        public var minAge: Int
        public var minSize: Int = 4096
        /// Quota: at most this many bytes per reset interval (0: none).
        public var quotaBytes: Int = 0
        public var quotaResetMS: Int = 1000

        public init(pid: Int32, sampleUS: Int, aggrUS: Int, updateUS: Int, maxAccesses: Int, minAge: Int) {
            self.pid = pid
            self.sampleUS = sampleUS
            self.aggrUS = aggrUS
            self.updateUS = updateUS
            self.maxAccesses = maxAccesses
            self.minAge = minAge
        }

        /// The writes, relative to the kdamond's directory, in the order the interface needs
        /// them (each nr_* first makes the directories below it).
        public var writes: [(String, String)] {
            [("contexts/nr_contexts", "1"),
             ("contexts/0/operations", "vaddr"),
             ("contexts/0/monitoring_attrs/intervals/sample_us", String(sampleUS)),
             ("contexts/0/monitoring_attrs/intervals/aggr_us", String(aggrUS)),
             ("contexts/0/monitoring_attrs/intervals/update_us", String(updateUS)),
             ("contexts/0/monitoring_attrs/nr_regions/min", String(minRegions)),
             ("contexts/0/monitoring_attrs/nr_regions/max", String(maxRegions)),
             ("contexts/0/targets/nr_targets", "1"),
             ("contexts/0/targets/0/pid_target", String(pid)),
             ("contexts/0/schemes/nr_schemes", "1"),
             ("contexts/0/schemes/0/action", "pageout"),
             ("contexts/0/schemes/0/access_pattern/sz/min", String(minSize)),
             ("contexts/0/schemes/0/access_pattern/sz/max", String(UInt64.max)),
             ("contexts/0/schemes/0/access_pattern/nr_accesses/min", "0"),
             ("contexts/0/schemes/0/access_pattern/nr_accesses/max", String(maxAccesses)),
             ("contexts/0/schemes/0/access_pattern/age/min", String(minAge)),
             ("contexts/0/schemes/0/access_pattern/age/max", String(UInt32.max)),
             ("contexts/0/schemes/0/quotas/bytes", String(quotaBytes)),
             ("contexts/0/schemes/0/quotas/reset_interval_ms", String(quotaResetMS)),
             ("contexts/0/schemes/0/watermarks/metric", "none")]
        }
    }

    /// A kdamond memlab added (through the guard): configure, start, refresh stats, stop.
    public struct Kdamond: Sendable, Equatable {
        public let directory: String
        public init(index: Int) { directory = "\(Damon.kdamonds)/\(index)" }

        public func configure(_ scheme: PageoutScheme) throws(SystemError) {
            for (file, value) in scheme.writes { try ProcFile.write("\(directory)/\(file)", value) }
        }
        public func setState(_ s: String) throws(SystemError) { try ProcFile.write("\(directory)/state", s) }
        public var state: String { (ProcFile.readIfPresent("\(directory)/state") ?? "").trimmingWhitespace() }
        public var pid: Int32? { Int32((ProcFile.readIfPresent("\(directory)/pid") ?? "").trimmingWhitespace()).flatMap { $0 > 0 ? $0 : nil } }
        public var statsDirectory: String { "\(directory)/contexts/0/schemes/0/stats" }

        /// Asks the kdamond to refresh the stats files, then reads them.
        public func schemeStats() throws(SystemError) -> SchemeStats? {
            try setState("update_schemes_stats")
            return SchemeStats.read(statsDirectory: statsDirectory)
        }
    }
}
