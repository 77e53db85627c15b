#if canImport(Glibc)
import Glibc
#endif

extension THP {
    public static let khugepagedDirectory = "\(directory)/khugepaged"

    public enum Khugepaged {
        public static let pagesToScan = Knob("\(THP.khugepagedDirectory)/pages_to_scan")
        public static let scanSleepMillisecs = Knob("\(THP.khugepagedDirectory)/scan_sleep_millisecs")
        public static let allocSleepMillisecs = Knob("\(THP.khugepagedDirectory)/alloc_sleep_millisecs")
        public static let maxPtesNone = Knob("\(THP.khugepagedDirectory)/max_ptes_none")
        /// Most pages of a 2M range mapped by another process too (fork's copy-on-write
        /// sharing) that khugepaged still collapses.
        public static let maxPtesShared = Knob("\(THP.khugepagedDirectory)/max_ptes_shared")
        /// Most swapped-out pages of a 2M range khugepaged still collapses (reading them back).
        public static let maxPtesSwap = Knob("\(THP.khugepagedDirectory)/max_ptes_swap")
        public static let defrag = Knob("\(THP.khugepagedDirectory)/defrag")
        public static var fullScans: String { "\(THP.khugepagedDirectory)/full_scans" }
        public static var pagesCollapsed: String { "\(THP.khugepagedDirectory)/pages_collapsed" }
    }

    /// The `enabled` control of one folio size (mTHP, 6.8+); 2 MiB is hugepages-2048kB.
    public static func sizeEnabled(bytes: Int) -> Knob {
        Knob("\(directory)/hugepages-\(bytes / 1024)kB/enabled")
    }

    /// A per-size counter under hugepages-<size>kB/stats (anon_fault_alloc, split, …).
    public static func sizeStat(bytes: Int, _ name: String) -> String {
        "\(directory)/hugepages-\(bytes / 1024)kB/stats/\(name)"
    }

    /// Sizes that have an anonymous `enabled` control.
    public static var anonymousSizes: [Int] {
        sizes().filter { $0.enabled != "shmem-only" }.map(\.bytes)
    }
}

extension HugeTLB {
    public static func overcommitKnob(pageBytes: Int) -> Knob {
        Knob("\(directory)/hugepages-\(pageBytes / 1024)kB/nr_overcommit_hugepages")
    }

    public static func pool(pageBytes: Int) -> Pool? {
        pools().first { $0.pageBytes == pageBytes }
    }

    /// The per-node pool size: /sys/devices/system/node/nodeN/hugepages/hugepages-<kB>kB/
    /// nr_hugepages. Writing it grows or shrinks only that node's share; the machine-wide
    /// nr_hugepages is the sum over nodes.
    public static func nodePoolKnob(node: Int, pageBytes: Int) -> Knob {
        Knob("/sys/devices/system/node/node\(node)/hugepages/hugepages-\(pageBytes / 1024)kB/nr_hugepages")
    }

    /// NUMA nodes as sysfs lists them (node0, node1, …), ascending.
    public static func sysfsNodes() -> [Int] {
        ProcFile.list("/sys/devices/system/node").compactMap { $0.hasPrefix("node") ? Int($0.dropFirst(4)) : nil }.sorted()
    }

    /// Pages of the pool on each NUMA node (/sys/devices/system/node/nodeN/hugepages/...).
    public static func perNode(pageBytes: Int) -> [Int: (total: Int, free: Int)] {
        var out: [Int: (Int, Int)] = [:]
        for name in ProcFile.list("/sys/devices/system/node") where name.hasPrefix("node") {
            guard let n = Int(name.dropFirst(4)) else { continue }
            let dir = "/sys/devices/system/node/\(name)/hugepages/hugepages-\(pageBytes / 1024)kB"
            func v(_ f: String) -> Int { Int((try? Knob("\(dir)/\(f)").read()) ?? "") ?? 0 }
            if ProcFile.exists(dir) { out[n] = (v("nr_hugepages"), v("free_hugepages")) }
        }
        return out
    }
}

/// /proc/self/smaps, restricted to the mapping that starts at one address: what backs one
/// region (Rss, AnonHugePages, …) without the rest of the process mixed in.
public enum Smaps {
    public static func entry(startingAt address: UnsafeRawPointer, text: String? = nil) throws(SystemError) -> [String: UInt64] {
        let hex = String(UInt(bitPattern: address), radix: 16)
        let all: String
        if let text { all = text } else { all = try ProcFile.read("/proc/self/smaps") }
        var fields: [String: UInt64] = [:]
        var inside = false
        for line in all.split(separator: "\n") {
            if let dash = line.firstIndex(of: "-"), line[..<dash].allSatisfy(\.isHexDigit), line.contains(" ") {
                if inside { break }
                let start = line[..<dash].drop { $0 == "0" }
                inside = start == hex[...].drop { $0 == "0" }
                continue
            }
            guard inside, let colon = line.firstIndex(of: ":") else { continue }
            let rest = line[line.index(after: colon)...].split(separator: " ")
            if rest.count == 2, rest[1] == "kB", let kb = UInt64(rest[0]) { fields[String(line[..<colon])] = kb * 1024 }
        }
        if !inside && fields.isEmpty { throw SystemError(errno: ENOENT, call: "smaps entry at 0x\(hex)", path: "/proc/self/smaps") }
        return fields
    }
}

/// getrusage(RUSAGE_SELF): page faults this process took (minor: no I/O).
public enum Faults {
    public static func minor() -> Int {
        var u = rusage()
        getrusage(RUSAGE_SELF.rawValue, &u)
        return u.ru_minflt
    }
}

/// The huge page sizes of this kernel.
public enum HugePageSize {
    /// A PMD-mapped (transparent) huge page: hpage_pmd_size, 2 MiB on x86-64 and on arm64
    /// with 4K pages (512 MiB with 64K pages).
    public static let pmd: Int = {
        if let t = ProcFile.readIfPresent("/sys/kernel/mm/transparent_hugepage/hpage_pmd_size"),
           let n = Int(String(t.filter { $0.isNumber })), n > 0 { return n }
        return 2 << 20
    }()
}
