/// /proc/meminfo. Values with a "kB" unit are converted to bytes; unit-less fields
/// (HugePages_Total, HugePages_Free, …) are counts.
public struct MemInfo: Sendable, Equatable {
    public let fields: [String: UInt64]

    public init(text: String) {
        var fields: [String: UInt64] = [:]
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let name = String(line[..<colon])
            let rest = line[line.index(after: colon)...].split(separator: " ")
            guard let first = rest.first, let number = UInt64(first) else { continue }
            let isKB = rest.count > 1 && rest[1] == "kB"
            // Text from a guest is hostile input too: a kB value past 2^54 would overflow.
            if isKB {
                let (bytes, overflow) = number.multipliedReportingOverflow(by: 1024)
                if !overflow { fields[name] = bytes }
            } else {
                fields[name] = number
            }
        }
        self.fields = fields
    }

    public static func current() throws(SystemError) -> MemInfo {
        MemInfo(text: try ProcFile.read("/proc/meminfo"))
    }

    public subscript(_ name: String) -> UInt64? { fields[name] }

    public var memTotal: UInt64 { fields["MemTotal"] ?? 0 }
    public var memAvailable: UInt64 { fields["MemAvailable"] ?? 0 }
    public var swapTotal: UInt64 { fields["SwapTotal"] ?? 0 }
    public var commitLimit: UInt64 { fields["CommitLimit"] ?? 0 }
    public var committedAS: UInt64 { fields["Committed_AS"] ?? 0 }
}

/// /proc/vmstat: one "name value" pair a line.
public struct VMStat: Sendable, Equatable {
    public let counters: [String: UInt64]

    public init(text: String) {
        var counters: [String: UInt64] = [:]
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ")
            if parts.count == 2, let value = UInt64(parts[1]) { counters[String(parts[0])] = value }
        }
        self.counters = counters
    }

    public static func current() throws(SystemError) -> VMStat {
        VMStat(text: try ProcFile.read("/proc/vmstat"))
    }

    public subscript(_ name: String) -> UInt64? { counters[name] }
}

/// /proc/PID/smaps_rollup: the sums over all mappings of a process, in bytes.
public struct SmapsRollup: Sendable, Equatable {
    public let fields: [String: UInt64]

    public init(text: String) {
        var fields: [String: UInt64] = [:]
        for line in text.split(separator: "\n") {
            guard let colon = line.firstIndex(of: ":") else { continue }
            let name = String(line[..<colon])
            let rest = line[line.index(after: colon)...].split(separator: " ")
            // The header line ("00400000-... [rollup]") has no "name: number kB" shape.
            guard rest.count == 2, rest[1] == "kB", let kb = UInt64(rest[0]) else { continue }
            fields[name] = kb * 1024
        }
        self.fields = fields
    }

    public static func read(pid: Int32? = nil) throws(SystemError) -> SmapsRollup {
        SmapsRollup(text: try ProcFile.read("/proc/\(pid.map(String.init) ?? "self")/smaps_rollup"))
    }

    public subscript(_ name: String) -> UInt64? { fields[name] }
    public var rss: UInt64 { fields["Rss"] ?? 0 }
    public var anonHugePages: UInt64 { fields["AnonHugePages"] ?? 0 }
}

/// /proc/PID/ksm_stat (6.1+; fields added over time): this process's own KSM figures,
/// which unlike the global counters are not shared with anything else on the machine.
public struct KSMStat: Sendable, Equatable {
    public var rmapItems: Int64 = 0
    /// Pages of this process mapped to the shared zero page by KSM (use_zero_pages=1).
    public var zeroPages: Int64 = 0
    /// Pages of this process that are mapped to a KSM page.
    public var mergingPages: Int64 = 0
    /// The kernel's own estimate of bytes saved for this process (may be negative).
    public var processProfit: Int64 = 0
    public var mergeAny: Bool = false
    public var mergeable: Bool = false
    /// Whether the kernel reports ksm_merging_pages per process (6.4+; 6.1 has only
    /// ksm_rmap_items): without it, a region's merged pages come from pagemap + kpageflags.
    public var hasMergingPages = false
    /// ksm_process_profit (6.6+).
    public var hasProcessProfit = false

    public init() {}

    public init(text: String) {
        for line in text.split(separator: "\n") {
            let parts = line.split(whereSeparator: { $0 == " " || $0 == ":" })
            guard parts.count >= 2 else { continue }
            let value = parts[1]
            switch parts[0] {
            case "ksm_rmap_items": rmapItems = Int64(value) ?? 0
            case "ksm_zero_pages": zeroPages = Int64(value) ?? 0
            case "ksm_merging_pages": mergingPages = Int64(value) ?? 0; hasMergingPages = true
            case "ksm_process_profit": processProfit = Int64(value) ?? 0; hasProcessProfit = true
            case "ksm_merge_any": mergeAny = value == "yes"
            case "ksm_mergeable": mergeable = value == "yes"
            default: break
            }
        }
    }

    public static func read(pid: Int32? = nil) throws(SystemError) -> KSMStat {
        KSMStat(text: try ProcFile.read("/proc/\(pid.map(String.init) ?? "self")/ksm_stat"))
    }
}

/// /proc/PID/stat: the fields memlab needs (CPU time of a task, e.g. ksmd, and its start time
/// for telling a live process from a reused pid). The command name is in parentheses and may
/// itself contain spaces and parentheses, so fields are counted from the last ')'.
public struct ProcStat: Sendable, Equatable {
    public let pid: Int32
    public let comm: String
    public let state: Character
    /// User and system CPU time in clock ticks (sysconf(_SC_CLK_TCK)).
    public let utimeTicks: UInt64
    public let stimeTicks: UInt64
    /// Start time after boot, in clock ticks.
    public let startTimeTicks: UInt64

    public init?(text: String) {
        guard let open = text.firstIndex(of: "("), let close = text.lastIndex(of: ")") else { return nil }
        guard let pid = Int32(text[..<open].trimmingWhitespace()) else { return nil }
        let rest = text[text.index(after: close)...].split(separator: " ")
        // rest[0] is field 3 (state); field n is rest[n - 3].
        guard rest.count >= 20, let state = rest[0].first,
              let utime = UInt64(rest[14 - 3]), let stime = UInt64(rest[15 - 3]),
              let start = UInt64(rest[22 - 3]) else { return nil }
        self.pid = pid
        self.comm = String(text[text.index(after: open)..<close])
        self.state = state
        self.utimeTicks = utime
        self.stimeTicks = stime
        self.startTimeTicks = start
    }

    public static func read(pid: Int32) throws(SystemError) -> ProcStat {
        let path = "/proc/\(pid)/stat"
        guard let stat = ProcStat(text: try ProcFile.read(path)) else {
            throw SystemError(errno: 22, call: "parse", path: path)
        }
        return stat
    }

    public var cpuSeconds: Double {
        Double(utimeTicks + stimeTicks) / Double(Clock.ticksPerSecond)
    }
}
