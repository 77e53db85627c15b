#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM

/// Making, activating and removing swap areas: the swap header (what mkswap writes),
/// swapon(2)/swapoff(2), and zram devices as a second backend. These are machine-wide
/// changes; LabKit's settings guard journals each one before it calls these.
extension Swap {
    /// The "SWAPSPACE2" header mkswap writes into the first page (include/linux/swap.h,
    /// union swap_header): bootbits[1024], then version=1, last_page, nr_badpages=0,
    /// uuid[16], volume_name[16], and the magic in the last 10 bytes of the page.
    public static func header(totalBytes: Int, pageSize: Int = System.pageSize, label: String = "memlab") -> [UInt8] {
        var page = [UInt8](repeating: 0, count: pageSize)
        func put32(_ v: UInt32, at o: Int) {
            withUnsafeBytes(of: v.littleEndian) { for (i, b) in $0.enumerated() { page[o + i] = b } }
        }
        put32(1, at: 1024)                                        // version
        put32(UInt32(totalBytes / pageSize - 1), at: 1028)        // last_page
        put32(0, at: 1032)                                        // nr_badpages
        var uuid = [UInt8](repeating: 0, count: 16)
        let fd = open("/dev/urandom", O_RDONLY | O_CLOEXEC)
        if fd >= 0 { _ = read(fd, &uuid, 16); close(fd) }
        uuid[6] = (uuid[6] & 0x0F) | 0x40                         // RFC 4122 version 4
        uuid[8] = (uuid[8] & 0x3F) | 0x80
        for i in 0..<16 { page[1036 + i] = uuid[i] }
        for (i, b) in label.utf8.prefix(15).enumerated() { page[1052 + i] = b }
        for (i, b) in "SWAPSPACE2".utf8.enumerated() { page[pageSize - 10 + i] = b }
        return page
    }

    /// Writes a swap file of `bytes` (rounded down to pages): every block written (a swap
    /// file must have no holes), the header in page 0, fsync'd, mode 0600.
    public static func makeSwapFile(path: String, bytes: Int) throws(SystemError) {
        let page = System.pageSize
        let size = bytes / page * page
        let fd = open(path, O_WRONLY | O_CREAT | O_EXCL | O_CLOEXEC, 0o600)
        if fd < 0 { throw SystemError.current("open", path: path) }
        defer { close(fd) }
        let chunk = 1 << 20
        var zeros = [UInt8](repeating: 0, count: chunk)
        var offset = 0
        while offset < size {
            let n = min(chunk, size - offset)
            let w = zeros.withUnsafeMutableBytes { pwrite(fd, $0.baseAddress, n, off_t(offset)) }
            if w != n { throw SystemError.current("pwrite", path: path) }
            offset += n
        }
        try writeHeader(fd: fd, totalBytes: size, path: path)
        if fsync(fd) != 0 { throw SystemError.current("fsync", path: path) }
    }

    /// Writes the swap header onto a block device (a zram disk) of `bytes`.
    public static func makeSwapDevice(path: String, bytes: Int) throws(SystemError) {
        let fd = open(path, O_WRONLY | O_CLOEXEC)
        if fd < 0 { throw SystemError.current("open", path: path) }
        defer { close(fd) }
        try writeHeader(fd: fd, totalBytes: bytes / System.pageSize * System.pageSize, path: path)
        if fsync(fd) != 0 { throw SystemError.current("fsync", path: path) }
    }

    static func writeHeader(fd: Int32, totalBytes: Int, path: String) throws(SystemError) {
        let h = header(totalBytes: totalBytes)
        let w = h.withUnsafeBytes { pwrite(fd, $0.baseAddress, $0.count, 0) }
        if w != h.count { throw SystemError.current("pwrite(swap header)", path: path) }
    }

    /// swapon(2) with an explicit priority (higher is used first), so a memlab area is
    /// preferred over any area the user has.
    public static func activate(path: String, priority: Int = 32000) throws(SystemError) {
        let flags = memlab_SWAP_FLAG_PREFER | (Int32(priority) & memlab_SWAP_FLAG_PRIO_MASK)
        if memlab_swapon(path, flags) != 0 { throw SystemError.current("swapon", path: path) }
    }

    /// swapoff(2): brings every page back into memory first; slow when much is swapped.
    /// Not being a swap area any more (EINVAL) counts as done.
    public static func deactivate(path: String) throws(SystemError) {
        if memlab_swapoff(path) != 0 {
            let e = errno
            if e == EINVAL || e == ENOENT, !areas().contains(where: { $0.path == path }) { return }
            throw SystemError(errno: e, call: "swapoff", path: path)
        }
    }

    public static func isActive(path: String) -> Bool { areas().contains { $0.path == path } }
}

/// zram: compressed RAM block devices (drivers/block/zram). memlab adds a device of its own
/// through /sys/class/zram-control/hot_add and removes it afterwards; devices that exist
/// already (zram0 …) are never touched.
public enum Zram {
    public static let control = "/sys/class/zram-control"

    public static var isAvailable: Bool { ProcFile.exists("\(control)/hot_add") }

    /// Why zram cannot be used here, or nil.
    public static var unavailableReason: String? {
        if isAvailable { return nil }
        if ProcFile.exists("/sys/module/zram") {
            return "zram is loaded but \(control)/hot_add is missing (kernel without zram hot add)"
        }
        return "zram is not loaded: no \(control) (load it with `modprobe zram`, or build the kernel with CONFIG_ZRAM)"
    }

    public static func sysfs(_ id: Int) -> String { "/sys/block/zram\(id)" }
    public static func device(_ id: Int) -> String { "/dev/zram\(id)" }

    /// Adds a device; reading hot_add creates it and returns its number.
    public static func hotAdd() throws(SystemError) -> Int {
        let text = try ProcFile.read("\(control)/hot_add").trimmingWhitespace()
        guard let id = Int(text) else { throw SystemError(errno: EINVAL, call: "parse '\(text)'", path: "\(control)/hot_add") }
        return id
    }

    /// Resets (frees its memory) and removes a device memlab added.
    public static func hotRemove(_ id: Int) throws(SystemError) {
        guard ProcFile.exists(sysfs(id)) else { return }
        try? ProcFile.write("\(sysfs(id))/reset", "1")
        try ProcFile.write("\(control)/hot_remove", String(id))
    }

    /// Sets the compressor (before the size) and the size of a fresh device.
    public static func configure(_ id: Int, bytes: Int, algorithm: String?) throws(SystemError) {
        if let a = algorithm {
            let offered = (try? ProcFile.read("\(sysfs(id))/comp_algorithm"))?
                .split(whereSeparator: { $0 == " " || $0 == "\n" }).map { String($0).replacingBrackets() } ?? []
            if offered.contains(a) { try ProcFile.write("\(sysfs(id))/comp_algorithm", a) }
        }
        try ProcFile.write("\(sysfs(id))/disksize", String(bytes))
    }

    /// /sys/block/zramN/mm_stat: orig_data_size compr_data_size mem_used_total mem_limit
    /// mem_used_max same_pages pages_compacted huge_pages [huge_pages_since].
    public struct MMStat: Sendable, Equatable {
        public var origDataBytes: Int64 = 0
        public var comprDataBytes: Int64 = 0
        public var memUsedBytes: Int64 = 0
        public var samePages: Int64 = 0
        public var hugePages: Int64 = 0
    }

    public static func mmStat(_ id: Int) -> MMStat? {
        guard let text = ProcFile.readIfPresent("\(sysfs(id))/mm_stat") else { return nil }
        let f = text.split(whereSeparator: { $0 == " " || $0 == "\n" }).compactMap { Int64($0) }
        guard f.count >= 6 else { return nil }
        return MMStat(origDataBytes: f[0], comprDataBytes: f[1], memUsedBytes: f[2], samePages: f[5],
                      hugePages: f.count > 7 ? f[7] : 0)
    }

    /// The zram device number of a swap area path like /dev/zram3.
    public static func id(ofSwapPath path: String) -> Int? {
        guard path.hasPrefix("/dev/zram") else { return nil }
        return Int(path.dropFirst("/dev/zram".count))
    }
}

/// zswap's own counters. /proc/meminfo has the pool (Zswap) and what it holds (Zswapped);
/// /proc/vmstat has zswpout/zswpin/zswpwb; rejects and the pool-limit hits are only in
/// debugfs (/sys/kernel/debug/zswap), which may not be mounted.
extension Zswap {
    public static let shrinkerEnabled = Knob("\(directory)/shrinker_enabled")
    public static let acceptThresholdPercent = Knob("\(directory)/accept_threshold_percent")
    public static let debugDirectory = "/sys/kernel/debug/zswap"

    /// debugfs counters (name -> value), or nil when debugfs is not mounted.
    public static func debugCounters() -> [String: Int64]? {
        let names = ProcFile.list(debugDirectory)
        guard !names.isEmpty else { return nil }
        var out: [String: Int64] = [:]
        for n in names {
            if let t = ProcFile.readIfPresent("\(debugDirectory)/\(n)"), let v = Int64(t.trimmingWhitespace()) { out[n] = v }
        }
        return out
    }
}

/// The vm sysctls of overcommit accounting (Documentation/mm/overcommit-accounting.rst).
public enum Overcommit {
    public static let memory = Knob("/proc/sys/vm/overcommit_memory")
    public static let ratio = Knob("/proc/sys/vm/overcommit_ratio")
    public static let kbytes = Knob("/proc/sys/vm/overcommit_kbytes")
    public static let userReserveKbytes = Knob("/proc/sys/vm/user_reserve_kbytes")
    public static let adminReserveKbytes = Knob("/proc/sys/vm/admin_reserve_kbytes")
    public static let swappiness = Knob("/proc/sys/vm/swappiness")
    public static let pageCluster = Knob("/proc/sys/vm/page-cluster")
}

extension MemoryCgroup {
    /// The memory cgroup the calling process is in (from /proc/self/cgroup), if a memory
    /// controller is mounted.
    public static func current() -> MemoryCgroup? {
        guard let text = ProcFile.readIfPresent("/proc/self/cgroup") else { return nil }
        for m in MemoryCgroupMount.detect() {
            for line in text.split(separator: "\n") {
                let f = line.split(separator: ":", maxSplits: 2, omittingEmptySubsequences: false)
                guard f.count == 3 else { continue }
                switch m {
                case .v1(let root) where f[1].split(separator: ",").contains("memory"):
                    return MemoryCgroup(path: root + (f[2] == "/" ? "" : String(f[2])), version: 1)
                case .v2(let root) where f[0] == "0" && f[1].isEmpty:
                    return MemoryCgroup(path: root + (f[2] == "/" ? "" : String(f[2])), version: 2)
                default: continue
                }
            }
        }
        return nil
    }

    /// Current usage in bytes (v1 usage_in_bytes, v2 memory.current).
    public func usage() -> Int64? {
        try? CounterFile(path: version == 2 ? "\(path)/memory.current" : "\(path)/memory.usage_in_bytes").read()
    }

    /// Pids in the cgroup (cgroup.procs).
    public func processes() -> [Int32] {
        (ProcFile.readIfPresent(procsFile) ?? "").split(separator: "\n").compactMap { Int32($0) }
    }
}

extension PageFlags {
    /// The pagemap entries of [base, base+length), one per page. Needs no privilege: only the
    /// PFN is hidden from unprivileged readers, and the bits used here are not.
    static func pagemapEntries(_ base: UnsafeRawPointer, length: Int) throws(SystemError) -> [UInt64] {
        let page = System.pageSize
        let fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw SystemError.current("open", path: "/proc/self/pagemap") }
        defer { close(fd) }
        let pages = length / page
        var entries = [UInt64](repeating: 0, count: pages)
        let first = UInt(bitPattern: base) / UInt(page)
        let want = pages * 8
        let got = entries.withUnsafeMutableBytes { pread(fd, $0.baseAddress, want, off_t(first * 8)) }
        if got != want { throw SystemError.current("pread", path: "/proc/self/pagemap") }
        return entries
    }

    /// Pages of [base, base+length) present in RAM (pagemap bit 63) and swapped out (bit 62).
    public static func residency(_ base: UnsafeRawPointer, length: Int) throws(SystemError) -> (present: Int, swapped: Int) {
        var present = 0, swapped = 0
        for e in try pagemapEntries(base, length: length) {
            if e & (1 << 63) != 0 { present += 1 } else if e & (1 << 62) != 0 { swapped += 1 }
        }
        return (present, swapped)
    }

    /// Per page of [base, base+length): whether it is swapped out now (pagemap bit 62, not
    /// present) — the pages whose next touch is a swap-in.
    public static func swappedMap(_ base: UnsafeRawPointer, length: Int) throws(SystemError) -> [Bool] {
        try pagemapEntries(base, length: length).map { $0 & (1 << 63) == 0 && $0 & (1 << 62) != 0 }
    }
}
