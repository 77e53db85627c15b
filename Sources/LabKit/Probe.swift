#if canImport(Glibc)
import Glibc
#endif
import LinuxMM

/// What `memlab probe` reports: the host, and every feature memlab's modules use — usable or
/// not, and why not. Each answer comes from the running kernel (sysfs, procfs, a syscall
/// tried), never from a config file or a guess.
public struct ProbeReport: Sendable, Codable {
    public struct Feature: Sendable, Codable {
        public var name: String
        public var usable: Bool
        public var detail: String
        public var reason: String?

        public func encode(to encoder: Encoder) throws {
            var c = encoder.container(keyedBy: CodingKeys.self)
            try c.encode(name, forKey: .name)
            try c.encode(usable, forKey: .usable)
            try c.encode(detail, forKey: .detail)
            try c.encode(reason, forKey: .reason)
        }
        enum CodingKeys: String, CodingKey { case name, usable, detail, reason }
    }

    public var host: ResultDocument.Host
    public var root: Bool
    public var features: [Feature]

    public static func gather() -> ProbeReport {
        let root = System.isRoot
        var f: [Feature] = []
        let needRoot = root ? nil : "changing its settings needs root"

        if KSM.isAvailable {
            let run = (try? KSM.Knobs.run.read()) ?? "?"
            let pts = (try? KSM.Knobs.pagesToScan.read()) ?? "?"
            let prctl = (try? KSM.processMerge()) != nil
            f.append(Feature(name: "ksm", usable: root, detail: "run=\(run) pages_to_scan=\(pts); PR_SET_MEMORY_MERGE \(prctl ? "available" : "unavailable"); ksm_stat \(ProcFile.exists("/proc/self/ksm_stat") ? "available" : "unavailable")", reason: needRoot))
        } else {
            f.append(Feature(name: "ksm", usable: false, detail: "", reason: "/sys/kernel/mm/ksm missing: kernel built without CONFIG_KSM"))
        }
        f += ksmMechanisms(root: root)

        if THP.isAvailable {
            let mode = (try? THP.enabled.read()) ?? "?"
            let defrag = (try? THP.defrag.read()) ?? "?"
            f.append(Feature(name: "thp", usable: root, detail: "enabled=\(mode) defrag=\(defrag)", reason: needRoot))
            for size in THP.sizes() {
                f.append(Feature(name: "mthp-\(size.bytes / 1024)kB", usable: root, detail: "enabled=\(size.enabled)", reason: needRoot))
            }
            f += thpMechanisms(root: root)
        } else {
            f.append(Feature(name: "thp", usable: false, detail: "", reason: "/sys/kernel/mm/transparent_hugepage missing: kernel built without CONFIG_TRANSPARENT_HUGEPAGE"))
        }

        let pools = HugeTLB.pools()
        if pools.isEmpty {
            f.append(Feature(name: "hugetlb", usable: false, detail: "", reason: "/sys/kernel/mm/hugepages missing: kernel built without CONFIG_HUGETLBFS"))
        }
        for p in pools {
            f.append(Feature(name: "hugetlb-\(formatBytes(p.pageBytes))", usable: root,
                             detail: "pool total=\(p.total) free=\(p.free) reserved=\(p.reserved) surplus=\(p.surplus)",
                             reason: root ? nil : "sizing the pool needs root"))
        }

        let uffd = Userfaultfd.probe()
        f.append(Feature(name: "userfaultfd", usable: uffd.usable,
                         detail: uffd.usable ? "features: " + uffd.featureList.joined(separator: " ") : "",
                         reason: uffd.reason))

        let wp = WriteProtectTracking.probe()
        f.append(Feature(name: "uffd-wp-async", usable: wp.usable,
                         detail: wp.usable ? "UFFD_FEATURE_WP_ASYNC + PAGEMAP_SCAN report and re-protect written pages (tried on a page)" : "",
                         reason: wp.reason))

        for q in Qdisc.probeAll() {
            f.append(Feature(name: "qdisc-\(q.name)", usable: q.usable,
                             detail: q.usable ? "tc qdisc add \(q.name) works (tried on lo in a throwaway network namespace)" : "",
                             reason: q.reason))
        }

        let sd = SoftDirty.probe()
        f.append(Feature(name: "soft-dirty", usable: sd.usable, detail: sd.usable ? "clear_refs 4 + pagemap bit 55 work" : "", reason: sd.reason))

        let areas = Swap.areas()
        let swapBytes = areas.reduce(0) { $0 + $1.sizeBytes }
        f.append(Feature(name: "swap", usable: !areas.isEmpty,
                         detail: areas.isEmpty ? "" : areas.map { "\($0.path) (\($0.type), \($0.sizeBytes) bytes)" }.joined(separator: ", "),
                         reason: areas.isEmpty ? "no swap area is active (swapon --show); scenarios that need swap create their own for the run" : nil))
        _ = swapBytes

        if Zswap.isAvailable {
            let en = (try? Zswap.enabled.read()) ?? "?"
            let comp = (try? Zswap.compressor.read()) ?? "?"
            let pool = (try? Zswap.maxPoolPercent.read()) ?? "?"
            f.append(Feature(name: "zswap", usable: root, detail: "enabled=\(en) compressor=\(comp) max_pool_percent=\(pool)", reason: needRoot))
        } else {
            f.append(Feature(name: "zswap", usable: false, detail: "", reason: "/sys/module/zswap missing: kernel built without CONFIG_ZSWAP"))
        }

        f += reclaimFeatures(root: root, needRoot: needRoot)

        let cgroups = MemoryCgroupMount.detect()
        if cgroups.isEmpty {
            f.append(Feature(name: "memory-cgroup", usable: false, detail: "", reason: "no memory controller mounted (cgroup v1 'memory' or v2 with memory in cgroup.controllers)"))
        }
        for m in cgroups {
            switch m {
            case .v1(let root): f.append(Feature(name: "memory-cgroup-v1", usable: System.isRoot, detail: root, reason: needRoot))
            case .v2(let root): f.append(Feature(name: "memory-cgroup-v2", usable: System.isRoot, detail: root, reason: needRoot))
            }
        }

        let nodes = NUMA.nodeCount
        var numaDetail = "libnuma \(NUMA.isAvailable ? "available" : "unavailable"), \(nodes) node(s)"
        if let size = NUMA.nodeSize(0) { numaDetail += "; node 0: \(size.total) bytes, \(size.free) free" }
        f.append(Feature(name: "numa", usable: NUMA.isAvailable, detail: numaDetail, reason: NUMA.isAvailable ? nil : "numa_available() < 0"))

        // Hypervisors (issue 13), in libvirt's driver probe order: xen, kvm, qemu, lxc, libvirt.
        f += hypervisors()

        // Runs inside guests (memlab run --guest): QEMU, busybox, a kernel to boot.
        let kernels = ProcFile.list("/boot").filter { $0.hasPrefix("vmlinuz-") }.sorted()
        let guestMissing: String? = access(qemuBinary, X_OK) != 0 ? "\(qemuBinary) not found: apt-get install --no-install-recommends qemu-system-x86"
            : access("/bin/busybox", X_OK) != 0 ? "/bin/busybox not found: apt-get install busybox-static" : nil
        f.append(Feature(name: "guest-runs", usable: guestMissing == nil && root,
                         detail: "memlab run --guest kernel=PATH|distro; kernels in /boot: \(kernels.isEmpty ? "none (apt-get install linux-image-amd64)" : kernels.joined(separator: ", ")); 9p host share, TCG unless KVM boots a guest",
                         reason: guestMissing ?? needRoot))
        let netem = NetemLoopback.missing
        f.append(Feature(name: "netem-link", usable: netem == nil, detail: netem == nil ? "lazy-restore link=netem: the run's own network namespace, netem on its loopback" : "",
                         reason: netem.map { "\($0); runs inside a guest whose kernel has sch_netem (scenarios/guest-paths.toml)" }))

        return ProbeReport(host: .current(), root: root, features: f)
    }

    /// Proactive reclaim (the `reclaim` scenario): DAMON, the zswap shrinker, and the cgroup v2
    /// files memory.reclaim and memory.zswap.max.
    static func reclaimFeatures(root: Bool, needRoot: String?) -> [Feature] {
        var f: [Feature] = []
        if Damon.isAvailable {
            let ops = Damon.availableOperations()
            let kdamonds = Damon.configured()
            let why = Damon.unavailableReason(ops: ops, configured: kdamonds)
            f.append(Feature(name: "damon-reclaim", usable: why == nil && root,
                             detail: "operations: \(ops.isEmpty ? "none" : ops.joined(separator: " ")); nr_kdamonds=\(kdamonds.count)",
                             reason: why ?? needRoot))
        } else {
            f.append(Feature(name: "damon-reclaim", usable: false, detail: "", reason: Damon.unavailableReason()))
        }
        if Zswap.shrinkerEnabled.exists {
            let on = (try? Zswap.shrinkerEnabled.read()) ?? "?"
            f.append(Feature(name: "zswap-shrinker", usable: root, detail: "shrinker_enabled=\(on); writeback counted in /proc/vmstat zswpwb\(ProcFile.exists(Zswap.debugDirectory) ? " and debugfs written_back_pages" : "")", reason: needRoot))
        } else {
            f.append(Feature(name: "zswap-shrinker", usable: false, detail: "",
                             reason: Zswap.isAvailable ? "\(Zswap.shrinkerEnabled.path) missing: the zswap shrinker came with Linux 6.8" : "/sys/module/zswap missing: kernel built without CONFIG_ZSWAP"))
        }
        for file in ["memory.reclaim", "memory.zswap.max"] {
            let why = MemoryCgroup.v2UnavailableReason(file: file)
                ?? (file == "memory.zswap.max" && !Zswap.isAvailable ? "/sys/module/zswap missing: kernel built without CONFIG_ZSWAP" : nil)
            f.append(Feature(name: String(file.map { $0 == "." ? "-" : $0 }), usable: why == nil && root,
                             detail: why == nil ? "cgroup v2 at \(MemoryCgroup.v2Root ?? "?")" : "", reason: why ?? needRoot))
        }
        return f
    }

    public func render() -> String {
        let h = host
        var out = """
        kernel      \(h.kernel) (\(h.arch))
        cpu         \(h.cpuModel), \(h.cpus) online
        memory      \(h.memoryBytes) bytes, \(h.numaNodes) NUMA node(s), base page \(h.pageSize) bytes
        virtualized \(h.virtualized ? "yes (cpuinfo 'hypervisor' flag)" : "no")
        root        \(root ? "yes" : "no — scenarios that borrow knobs will be skipped")

        """
        let width = features.map(\.name.count).max() ?? 0
        for x in features {
            out += "\(x.name.padding(width))  \(x.usable ? "usable  " : "unusable")  \(x.detail)"
            if let r = x.reason { out += x.detail.isEmpty ? r : " — \(r)" }
            out += "\n"
        }
        return out
    }
}
