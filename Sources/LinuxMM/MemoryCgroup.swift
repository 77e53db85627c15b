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

    /// Sets the memory limit. With `capSwap` (the default) the limit is the limit: swap
    /// cannot stretch it, so touching past it ends in the OOM killer even where swap is on —
    /// v2 memory.swap.max = 0; v1 memory.memsw.limit_in_bytes = the same bytes (memory +
    /// swap, plus one page: see below) where the kernel accounts swap (swapaccount), else memory.swappiness = 0 in the
    /// group, which keeps its limit reclaim from swapping. Without it (zswap, density) the
    /// group may page out to swap as any process would.
    public func setLimit(bytes: Int, capSwap: Bool = true) throws(SystemError) {
        if version == 2 {
            try ProcFile.write("\(path)/memory.max", String(bytes))
            if capSwap, ProcFile.exists("\(path)/memory.swap.max") { try ProcFile.write("\(path)/memory.swap.max", "0") }
        } else {
            try ProcFile.write("\(path)/memory.limit_in_bytes", String(bytes))
            guard capSwap else { return }
            // memsw must not be below limit_in_bytes: set after it. One page above it, so
            // the memory limit is what a charge meets first — counted in memory.failcnt (the
            // kernel checks memsw first, and since 6.13 keeps no failcnt for memsw) — and swap
            // can take at most that one page before memory+swap is full and the OOM killer acts.
            if ProcFile.exists("\(path)/memory.memsw.limit_in_bytes") {
                try ProcFile.write("\(path)/memory.memsw.limit_in_bytes", String(bytes + Int(getpagesize())))
            } else {
                try ProcFile.write("\(path)/memory.swappiness", "0")
            }
        }
    }

    /// How swap is kept out of this group's limit ("memory.memsw.limit_in_bytes", …), for notes.
    public var swapCapDescription: String {
        if version == 2 { return ProcFile.exists("\(path)/memory.swap.max") ? "memory.swap.max=0" : "no memory.swap.max (swap not accounted)" }
        return ProcFile.exists("\(path)/memory.memsw.limit_in_bytes") ? "memory.memsw.limit_in_bytes = limit + 1 page" : "memory.swappiness=0 (no memsw files: swapaccount off)"
    }

    /// cgroup v2: the parent's memory controller must be in its cgroup.subtree_control for a
    /// child to get memory.max. Nil when nothing needs doing (v1, or already enabled); the
    /// subtree_control file to write "+memory" to when it does. Throws when the parent does
    /// not offer memory in cgroup.controllers at all.
    public func parentSubtreeControlNeedingMemory() throws(SystemError) -> String? {
        guard version == 2 else { return nil }
        let parent = path.split(separator: "/", omittingEmptySubsequences: false).dropLast().joined(separator: "/")
        func words(_ f: String) -> [Substring] { (ProcFile.readIfPresent(f) ?? "").split(whereSeparator: { $0 == " " || $0 == "\n" }) }
        guard words("\(parent)/cgroup.controllers").contains("memory") else {
            throw SystemError(errno: ENOTSUP, call: "the memory controller is not in \(parent)/cgroup.controllers (it is not delegated to this cgroup)", path: parent)
        }
        let control = "\(parent)/cgroup.subtree_control"
        return words(control).contains("memory") ? nil : control
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

    /// Times the limit was hit (v1 failcnt, v2 memory.events "max"). On v1 with swap capped
    /// through memsw, a charge refused by the memory+swap limit counts in memory.memsw.failcnt
    /// instead (the kernel tries memsw first and then does not charge memory at all), so both
    /// are summed: each refused charge is in exactly one of them.
    public func limitHits() -> Int64? {
        if version == 2 { return try? CounterFile(path: "\(path)/memory.events", key: "max").read() }
        guard let mem = try? CounterFile(path: "\(path)/memory.failcnt").read() else { return nil }
        return mem + ((try? CounterFile(path: "\(path)/memory.memsw.failcnt").read()) ?? 0)
    }
}
