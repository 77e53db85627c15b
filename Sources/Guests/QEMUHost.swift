#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LinuxMM

/// What the host sees of a running QEMU: its memory (RSS, PSS, the guest-RAM mapping's smaps),
/// its vCPU threads, and its threads' CPU placement.
extension QEMUProcess {
    /// VmRSS of the QEMU process, bytes.
    public func rssBytes() -> UInt64? {
        guard let text = try? ProcFile.read("/proc/\(pid)/status") else { return nil }
        // status separates name and value with a tab, meminfo with spaces.
        return MemInfo(text: text.replacingOccurrences(of: "\t", with: " "))["VmRSS"]
    }

    /// Pss of the whole process (smaps_rollup), bytes: a KSM page shared by K guests counts 1/K
    /// in each.
    public func pssBytes() -> UInt64? {
        guard let text = try? ProcFile.read("/proc/\(pid)/smaps_rollup") else { return nil }
        return MemInfo(text: text)["Pss"]
    }

    /// The smaps fields of the guest's RAM: QEMU's readable, writable, not executable mapping
    /// of exactly `bytes` (it maps guest RAM in one piece; TCG's code buffer, also large, is
    /// executable). nil when there is none.
    public func guestRAMSmaps(bytes: UInt64) -> [String: UInt64]? {
        guard let text = try? ProcFile.read("/proc/\(pid)/smaps") else { return nil }
        var current: [String: UInt64]?
        var found: [String: UInt64]?
        for line in text.split(separator: "\n") {
            let parts = line.split(separator: " ", maxSplits: 2)
            let first = parts.first ?? ""
            if first.contains("-") && !first.hasSuffix(":") {
                if found == nil, let c = current { found = c }
                current = nil
                let range = first.split(separator: "-")
                guard parts.count >= 2, range.count == 2, let a = UInt64(range[0], radix: 16), let b = UInt64(range[1], radix: 16),
                      b >= a, b - a == bytes else { continue }
                let perms = parts[1]
                if perms.hasPrefix("rw") && !perms.contains("x") && found == nil { current = [:] }
            } else if current != nil {
                for (k, v) in MemInfo(text: String(line)).fields { current![k] = v }
            }
        }
        return found ?? current
    }

    /// The host thread of each vCPU (QMP query-cpus-fast).
    public func vcpuThreads(timeoutS: Double = 5) throws -> [pid_t] {
        let r = try qmp.execute("query-cpus-fast", timeoutS: timeoutS)
        guard case .array(let cpus) = r else { throw QMPError.malformed("query-cpus-fast returned no list") }
        return try cpus.map { c in
            guard let t = c["thread-id"]?.int, t > 0, t <= Int(Int32.max) else { throw QMPError.malformed("a vCPU without a thread-id") }
            return pid_t(t)
        }
    }
}
