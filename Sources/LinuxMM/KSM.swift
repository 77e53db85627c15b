#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM

/// Kernel same-page merging: the sysfs control files under /sys/kernel/mm/ksm, its global
/// counters, the ksmd thread, and the two ways a process opts in (madvise per range, prctl
/// for the whole process). See Documentation/admin-guide/mm/ksm.rst.
public enum KSM {
    public static let directory = "/sys/kernel/mm/ksm"

    public enum Knobs {
        public static let run = Knob("\(directory)/run")
        public static let pagesToScan = Knob("\(directory)/pages_to_scan")
        public static let sleepMillisecs = Knob("\(directory)/sleep_millisecs")
        public static let useZeroPages = Knob("\(directory)/use_zero_pages")
        public static let mergeAcrossNodes = Knob("\(directory)/merge_across_nodes")
        public static let maxPageSharing = Knob("\(directory)/max_page_sharing")
        public static let smartScan = Knob("\(directory)/smart_scan")
        /// The scan-time advisor (6.9+): `none` or `scan-time`. Writing it resets
        /// pages_to_scan (to 100 for none, to advisor_min_pages_to_scan for scan-time).
        public static let advisorMode = Knob("\(directory)/advisor_mode")
        public static let advisorTargetScanTime = Knob("\(directory)/advisor_target_scan_time")
        public static let advisorMaxCPU = Knob("\(directory)/advisor_max_cpu")
        public static let advisorMinPagesToScan = Knob("\(directory)/advisor_min_pages_to_scan")
        public static let advisorMaxPagesToScan = Knob("\(directory)/advisor_max_pages_to_scan")
    }

    public static var isAvailable: Bool { Knobs.run.exists }

    /// A snapshot of the global counters. They are machine-wide: prefer `KSMStat` for figures
    /// that belong to one process.
    public struct Counters: Sendable, Equatable {
        public var pagesShared: Int64 = 0
        public var pagesSharing: Int64 = 0
        public var pagesUnshared: Int64 = 0
        public var pagesVolatile: Int64 = 0
        public var fullScans: Int64 = 0
        public var zeroPages: Int64 = 0
        public var generalProfit: Int64 = 0
        /// Pages ksmd looked at (6.7+), and pages smart scan let it skip (6.7+); 0 where absent.
        public var pagesScanned: Int64 = 0
        public var pagesSkipped: Int64 = 0
        /// Stable node chains and the dups linked to them (4.13+): one content shared by more
        /// than max_page_sharing mappings becomes a chain of several KSM pages.
        public var stableNodeChains: Int64 = 0
        public var stableNodeDups: Int64 = 0
        public init() {}
    }

    public static func counters() throws(SystemError) -> Counters {
        func value(_ name: String) throws(SystemError) -> Int64 {
            let path = "\(directory)/\(name)"
            guard let v = Int64(try ProcFile.read(path).trimmingWhitespace()) else {
                throw SystemError(errno: EINVAL, call: "parse", path: path)
            }
            return v
        }
        var c = Counters()
        c.pagesShared = try value("pages_shared")
        c.pagesSharing = try value("pages_sharing")
        c.pagesUnshared = try value("pages_unshared")
        c.pagesVolatile = try value("pages_volatile")
        c.fullScans = try value("full_scans")
        c.zeroPages = (try? value("ksm_zero_pages")) ?? 0
        c.generalProfit = (try? value("general_profit")) ?? 0
        c.pagesScanned = (try? value("pages_scanned")) ?? 0
        c.pagesSkipped = (try? value("pages_skipped")) ?? 0
        c.stableNodeChains = (try? value("stable_node_chains")) ?? 0
        c.stableNodeDups = (try? value("stable_node_dups")) ?? 0
        return c
    }

    /// Other processes with KSM-mergeable memory (/proc/PID/ksm_stat says `ksm_mergeable: yes`
    /// or `ksm_merge_any: yes`; a QEMU guest's RAM is, by default): ksmd scans their pages too,
    /// so the global counters count them. (pid, comm) each; this process excluded.
    public static func otherMergeableProcesses() -> [(pid: Int32, comm: String)] {
        let me = getpid()
        var out: [(Int32, String)] = []
        for name in ProcFile.list("/proc") {
            guard let pid = Int32(name), pid != me, let stat = ProcFile.readIfPresent("/proc/\(pid)/ksm_stat") else { continue }
            if stat.contains("ksm_mergeable: yes") || stat.contains("ksm_merge_any: yes") {
                out.append((pid, ProcFile.readIfPresent("/proc/\(pid)/comm")?.trimmingWhitespace() ?? "?"))
            }
        }
        return out
    }

    /// The pid of the ksmd kernel thread, found by its comm.
    public static func ksmdPID() -> Int32? {
        for name in ProcFile.list("/proc") {
            guard let pid = Int32(name) else { continue }
            if ProcFile.readIfPresent("/proc/\(pid)/comm")?.trimmingWhitespace() == "ksmd" { return pid }
        }
        return nil
    }

    /// Marks [address, address+length) as mergeable (MADV_MERGEABLE) or not (MADV_UNMERGEABLE,
    /// which also breaks every merged page of the range back into private copies).
    public static func setMergeable(_ address: UnsafeMutableRawPointer, length: Int, _ mergeable: Bool) throws(SystemError) {
        let advice = mergeable ? memlab_MADV_MERGEABLE : memlab_MADV_UNMERGEABLE
        if madvise(address, length, advice) != 0 {
            throw SystemError.current(mergeable ? "madvise(MADV_MERGEABLE)" : "madvise(MADV_UNMERGEABLE)")
        }
    }

    /// PR_SET_MEMORY_MERGE (6.4+): every present and future anonymous mapping of this process
    /// is mergeable. Turning it off unmerges.
    public static func setProcessMerge(_ enabled: Bool) throws(SystemError) {
        if memlab_prctl(memlab_PR_SET_MEMORY_MERGE, enabled ? 1 : 0, 0, 0, 0) != 0 {
            throw SystemError.current("prctl(PR_SET_MEMORY_MERGE, \(enabled ? 1 : 0))")
        }
    }

    public static func processMerge() throws(SystemError) -> Bool {
        let rc = memlab_prctl(memlab_PR_GET_MEMORY_MERGE, 0, 0, 0, 0)
        if rc < 0 { throw SystemError.current("prctl(PR_GET_MEMORY_MERGE)") }
        return rc == 1
    }
}

/// CPU time of a task as the scheduler accounts it: /proc/PID/schedstat's first field is
/// nanoseconds on CPU (much finer than /proc/PID/stat's clock ticks, which is the fallback).
public enum TaskCPU {
    public static func seconds(pid: Int32) -> Double? {
        if let text = ProcFile.readIfPresent("/proc/\(pid)/schedstat"),
           let first = text.split(separator: " ").first, let ns = UInt64(first) {
            return Double(ns) / 1e9
        }
        return (try? ProcStat.read(pid: pid))?.cpuSeconds
    }
}

/// Small process-level calls the runner's child needs.
public enum LinuxMMBridge {
    /// prctl(PR_SET_PDEATHSIG): the kernel sends `signal` to this process when its parent dies.
    public static func setParentDeathSignal(_ signal: Int32) -> Bool {
        memlab_prctl(memlab_PR_SET_PDEATHSIG, UInt(signal), 0, 0, 0) == 0
    }
}
