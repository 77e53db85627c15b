#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM

/// Transparent huge pages: the top-level mode and the per-size (mTHP) controls.
public enum THP {
    public static let directory = "/sys/kernel/mm/transparent_hugepage"
    public static let enabled = Knob("\(directory)/enabled")
    public static let defrag = Knob("\(directory)/defrag")
    /// Whether the deferred-split shrinker may split THPs that are mostly zero-filled (6.12+).
    public static let shrinkUnderused = Knob("\(directory)/shrink_underused")
    /// THP for shmem: anonymous shared memory, memfd, SysV shm (tmpfs mounts use huge=).
    public static let shmemEnabled = Knob("\(directory)/shmem_enabled")
    /// The per-size shmem control (6.11+): `inherit` follows shmem_enabled.
    public static func sizeShmemEnabled(bytes: Int) -> Knob {
        Knob("\(directory)/hugepages-\(bytes / 1024)kB/shmem_enabled")
    }

    public static var isAvailable: Bool { enabled.exists }

    /// Every size the kernel offers under hugepages-<size>kB, in bytes, ascending, with its
    /// `enabled` setting (inherit, always, madvise, never).
    public static func sizes() -> [(bytes: Int, enabled: String)] {
        ProcFile.list(directory).compactMap { name -> (Int, String)? in
            guard name.hasPrefix("hugepages-"), name.hasSuffix("kB"),
                  let kb = Int(name.dropFirst("hugepages-".count).dropLast(2)) else { return nil }
            // Some sizes exist for shmem/file memory only and have no anonymous `enabled`.
            let value = (try? Knob("\(directory)/\(name)/enabled").read()) ?? "shmem-only"
            return (kb * 1024, value)
        }.sorted { $0.0 < $1.0 }
    }
}

/// hugetlbfs pools, one per huge page size.
public enum HugeTLB {
    public static let directory = "/sys/kernel/mm/hugepages"

    public struct Pool: Sendable, Equatable {
        public let pageBytes: Int
        public let total: Int
        public let free: Int
        public let reserved: Int
        public let surplus: Int
    }

    public static func poolKnob(pageBytes: Int) -> Knob {
        Knob("\(directory)/hugepages-\(pageBytes / 1024)kB/nr_hugepages")
    }

    public static func pools() -> [Pool] {
        ProcFile.list(directory).compactMap { name -> Pool? in
            guard name.hasPrefix("hugepages-"), name.hasSuffix("kB"),
                  let kb = Int(name.dropFirst("hugepages-".count).dropLast(2)) else { return nil }
            func n(_ f: String) -> Int { Int((try? Knob("\(directory)/\(name)/\(f)").read()) ?? "") ?? 0 }
            return Pool(pageBytes: kb * 1024, total: n("nr_hugepages"), free: n("free_hugepages"),
                        reserved: n("resv_hugepages"), surplus: n("surplus_hugepages"))
        }.sorted { $0.pageBytes < $1.pageBytes }
    }
}

/// userfaultfd: whether the syscall works for this process, and the feature bits and ioctls
/// the kernel offers (the UFFDIO_API handshake with features = 0 reports all of them).
public enum Userfaultfd {
    public static let featureNames: [(UInt64, String)] = [
        (1 << 0, "pagefault_flag_wp"), (1 << 1, "event_fork"), (1 << 2, "event_remap"),
        (1 << 3, "event_remove"), (1 << 4, "missing_hugetlbfs"), (1 << 5, "missing_shmem"),
        (1 << 6, "event_unmap"), (1 << 7, "sigbus"), (1 << 8, "thread_id"),
        (1 << 9, "minor_hugetlbfs"), (1 << 10, "minor_shmem"), (1 << 11, "exact_address"),
        (1 << 12, "wp_hugetlbfs_shmem"), (1 << 13, "wp_unpopulated"), (1 << 14, "poison"),
        (1 << 15, "wp_async"), (1 << 16, "move"),
    ]

    public struct Probe: Sendable {
        public let usable: Bool
        public let reason: String?
        public let features: UInt64
        public var featureList: [String] { Userfaultfd.featureNames.filter { features & $0.0 != 0 }.map(\.1) }
    }

    public static func probe() -> Probe {
        var fd = memlab_userfaultfd(O_CLOEXEC | O_NONBLOCK)
        var err = errno
        if fd < 0 && err == EPERM {
            // Unprivileged users may still have user-mode-only faults.
            fd = memlab_userfaultfd(O_CLOEXEC | O_NONBLOCK | memlab_UFFD_USER_MODE_ONLY)
            err = errno
        }
        if fd < 0 {
            let why = err == ENOSYS ? "kernel built without CONFIG_USERFAULTFD"
                : "userfaultfd(2): \(SystemError(errno: err, call: "userfaultfd").description); as non-root set vm.unprivileged_userfaultfd=1 or run as root"
            return Probe(usable: false, reason: why, features: 0)
        }
        defer { close(fd) }
        var api = uffdio_api(api: memlab_UFFD_API, features: 0, ioctls: 0)
        if memlab_ioctl_ptr(fd, memlab_UFFDIO_API, &api) != 0 {
            return Probe(usable: false, reason: SystemError.current("ioctl(UFFDIO_API)").description, features: 0)
        }
        return Probe(usable: true, reason: nil, features: api.features)
    }
}

/// Soft-dirty tracking (/proc/PID/clear_refs 4 + pagemap bit 55). A kernel without
/// CONFIG_MEM_SOFT_DIRTY accepts the write and does nothing, so the only honest probe is to
/// try it: clear, write a page, and see whether the bit comes back.
public enum SoftDirty {
    public static func probe() -> (usable: Bool, reason: String?) {
        let page = System.pageSize
        guard let mapping = try? AnonymousMapping(length: page) else { return (false, "mmap failed") }
        mapping.touch()
        do {
            try ProcFile.write("/proc/self/clear_refs", "4")
        } catch {
            return (false, "writing 4 to /proc/self/clear_refs failed: \(error)")
        }
        mapping.base.storeBytes(of: 7, as: UInt8.self)
        let fd = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        if fd < 0 { return (false, "cannot open /proc/self/pagemap") }
        defer { close(fd) }
        var entry: UInt64 = 0
        let offset = off_t(UInt(bitPattern: mapping.base) / UInt(page) * 8)
        if pread(fd, &entry, 8, offset) != 8 { return (false, "cannot read /proc/self/pagemap") }
        if entry & (1 << 55) != 0 { return (true, nil) }
        return (false, "clear_refs 4 is accepted but pagemap bit 55 never sets: kernel built without CONFIG_MEM_SOFT_DIRTY")
    }
}

/// The memory cgroup controller: where it is mounted and which version.
public enum MemoryCgroupMount: Sendable, Equatable {
    case v1(root: String)
    case v2(root: String)

    public var root: String {
        switch self { case .v1(let r), .v2(let r): return r }
    }

    /// Finds the memory controller from /proc/self/mounts: a v1 hierarchy with the `memory`
    /// option, or a v2 hierarchy whose cgroup.controllers lists `memory`.
    public static func detect(mounts: String? = ProcFile.readIfPresent("/proc/self/mounts")) -> [MemoryCgroupMount] {
        var found: [MemoryCgroupMount] = []
        for line in (mounts ?? "").split(separator: "\n") {
            let f = line.split(separator: " ")
            guard f.count >= 4 else { continue }
            let path = String(f[1])
            if f[2] == "cgroup", f[3].split(separator: ",").contains("memory") {
                found.append(.v1(root: path))
            } else if f[2] == "cgroup2",
                      let controllers = ProcFile.readIfPresent("\(path)/cgroup.controllers"),
                      controllers.split(whereSeparator: { $0 == " " || $0 == "\n" }).contains("memory") {
                found.append(.v2(root: path))
            }
        }
        return found
    }
}

/// Swap areas (/proc/swaps) and zswap's module parameters.
public enum Swap {
    public struct Area: Sendable, Equatable {
        public let path: String
        public let type: String
        public let sizeBytes: UInt64
        public let usedBytes: UInt64
    }

    public static func areas(text: String? = ProcFile.readIfPresent("/proc/swaps")) -> [Area] {
        (text ?? "").split(separator: "\n").dropFirst().compactMap { line in
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            guard f.count >= 4, let size = UInt64(f[2]), let used = UInt64(f[3]) else { return nil }
            return Area(path: String(f[0]), type: String(f[1]), sizeBytes: size * 1024, usedBytes: used * 1024)
        }
    }
}

public enum Zswap {
    public static let directory = "/sys/module/zswap/parameters"
    public static let enabled = Knob("\(directory)/enabled")
    public static let compressor = Knob("\(directory)/compressor")
    public static let maxPoolPercent = Knob("\(directory)/max_pool_percent")
    public static var isAvailable: Bool { enabled.exists }
}
