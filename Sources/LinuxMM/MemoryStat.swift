#if canImport(Glibc)
import Glibc
#endif

/// A memory cgroup's memory.stat: one "name value" pair a line (v2: anon, file, zswap,
/// zswapped, pgscan, pgsteal, zswpout, zswpwb, …; v1: cache, rss, total_*, …). Text from a
/// kernel or a guest is outside input: a line that is not a name and one whole number is
/// skipped, never guessed at.
public struct MemoryStat: Sendable, Equatable {
    public let counters: [String: UInt64]

    public init(text: String) {
        var counters: [String: UInt64] = [:]
        // Bytes, not Characters: Swift reads "\r\n" as one Character, so a split on "\n"
        // would keep a line a peer ended with CR LF whole (the kerneltext fuzz target found
        // a counter name with a separator in it). A name is what the kernel writes:
        // letters, digits and underscores.
        for line in text.utf8.split(separator: 0x0A) {
            let parts = line.split(separator: 0x20, omittingEmptySubsequences: true)
            guard parts.count == 2, !parts[0].isEmpty,
                  parts[0].allSatisfy({ ($0 >= 0x61 && $0 <= 0x7A) || ($0 >= 0x41 && $0 <= 0x5A) || ($0 >= 0x30 && $0 <= 0x39) || $0 == 0x5F }),
                  let v = UInt64(String(decoding: parts[1], as: UTF8.self)) else { continue }
            counters[String(decoding: parts[0], as: UTF8.self)] = v
        }
        self.counters = counters
    }

    public subscript(_ name: String) -> UInt64? { counters[name] }

    /// `name` now minus `name` in `before`, signed (gauges such as anon may fall); nil when
    /// either lacks it.
    public func delta(_ name: String, since before: MemoryStat) -> Int64? {
        guard let a = counters[name], let b = before.counters[name] else { return nil }
        return Int64(bitPattern: a &- b)
    }
}

extension MemoryCgroup {
    public func stat() throws(SystemError) -> MemoryStat {
        MemoryStat(text: try ProcFile.read("\(path)/memory.stat"))
    }

    /// cgroup v2 proactive reclaim (memory.reclaim, 5.19+): asks the kernel to reclaim
    /// `bytes` from this cgroup. The kernel answers EAGAIN when it reclaimed less than asked;
    /// that is returned as `false`, not thrown (it is a measurement).
    public func reclaim(bytes: Int) throws(SystemError) -> Bool {
        let file = "\(path)/memory.reclaim"
        do throws(SystemError) { try ProcFile.write(file, String(bytes)) } catch {
            if error.errno == EAGAIN { return false }
            throw error
        }
        return true
    }

    /// Whether this (v2) cgroup has a file (memory.reclaim, memory.zswap.max, …).
    public func has(_ file: String) -> Bool { ProcFile.exists("\(path)/\(file)") }

    /// A v2 counter file of one number (memory.current, memory.swap.current, memory.zswap.current).
    public func counter(_ file: String) -> Int64? { try? CounterFile(path: "\(path)/\(file)").read() }

    /// The v2 root where the memory controller is, or nil (v1 only, or no controller).
    public static var v2Root: String? {
        for m in MemoryCgroupMount.detect() { if case .v2(let root) = m { return root } }
        return nil
    }

    /// Why a cgroup-v2-only memory file cannot be used here, or nil.
    public static func v2UnavailableReason(file: String) -> String? {
        guard v2Root != nil else {
            let mounts = MemoryCgroupMount.detect()
            let v1 = mounts.contains { if case .v1 = $0 { return true } else { return false } }
            return "\(file) is cgroup v2 only and this host's memory controller is \(v1 ? "on cgroup v1" : "not mounted") (no cgroup2 hierarchy lists memory in cgroup.controllers); boot with systemd.unified_cgroup_hierarchy=1 (or cgroup_no_v1=memory) or run it in a guest with cgroup v2"
        }
        // The file shows in child cgroups only (a kernel too old for it: the variant says so
        // when the run's cgroup lacks it).
        return nil
    }
}
