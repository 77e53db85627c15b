#if canImport(Glibc)
import Glibc
#endif

/// A memory cgroup memlab made for a child (named memlab-*): its limit, its counters, and
/// the file a process writes its pid into to join. v1 (memory.limit_in_bytes,
/// memory.oom_control) and v2 (memory.max, memory.events) differ only in file names here.
public struct MemoryCgroup: Sendable, Equatable {
    public let path: String
    public let version: Int

    public init(path: String, version: Int) {
        self.path = path
        self.version = version
    }

    /// Where a memory cgroup named `name` would live on this machine (v2 preferred when its
    /// memory controller is available, else v1); nil without a memory controller.
    public static func location(name: String) -> MemoryCgroup? {
        let mounts = MemoryCgroupMount.detect()
        if let v2 = mounts.first(where: { if case .v2 = $0 { return true } else { return false } }) {
            return MemoryCgroup(path: "\(v2.root)/\(name)", version: 2)
        }
        if let v1 = mounts.first {
            return MemoryCgroup(path: "\(v1.root)/\(name)", version: 1)
        }
        return nil
    }

    public var procsFile: String { "\(path)/cgroup.procs" }

    public func setLimit(bytes: Int) throws(SystemError) {
        if version == 2 {
            try ProcFile.write("\(path)/memory.max", String(bytes))
            // No swap escape hatch: the limit is the limit.
            if ProcFile.exists("\(path)/memory.swap.max") { try? ProcFile.write("\(path)/memory.swap.max", "0") }
        } else {
            try ProcFile.write("\(path)/memory.limit_in_bytes", String(bytes))
        }
    }

    /// Moves the calling process into this cgroup.
    public func joinSelf() throws(SystemError) {
        try ProcFile.write(procsFile, String(getpid()))
    }

    /// How many times the OOM killer killed a task in this cgroup.
    public func oomKills() -> Int64 {
        let file = version == 2 ? "\(path)/memory.events" : "\(path)/memory.oom_control"
        return (try? CounterFile(path: file, key: "oom_kill").read()) ?? 0
    }

    /// Peak usage in bytes (v1 max_usage_in_bytes, v2 memory.peak where present).
    public func peakUsage() -> Int64? {
        let file = version == 2 ? "\(path)/memory.peak" : "\(path)/memory.max_usage_in_bytes"
        return try? CounterFile(path: file).read()
    }

    /// Times the limit was hit (v1 failcnt, v2 memory.events "max").
    public func limitHits() -> Int64? {
        if version == 2 { return try? CounterFile(path: "\(path)/memory.events", key: "max").read() }
        return try? CounterFile(path: "\(path)/memory.failcnt").read()
    }
}
