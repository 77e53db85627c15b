#if canImport(Glibc)
import Glibc
#endif
import LinuxMM

/// Every machine-wide memory setting memlab may borrow, and everything a run may leave behind
/// on the machine. The one list: the settings guard borrows nothing else and follows a journal
/// that names anything else nowhere; `memlab settings` prints the picture, which `scripts/knobs`,
/// the tests and the kill trials compare before and after.
public enum WatchedSettings {
    /// Knob files memlab may borrow, as patterns: `*` stands for one path component (a folio
    /// size, a hugetlb page size, a NUMA node). Some are never borrowed today (THP's shmem and
    /// zero-page controls, the KSM advisor) but are watched all the same: a run that changed
    /// them by accident would show.
    public static let knobPatterns: [String] = {
        var p = [KSM.Knobs.run, KSM.Knobs.pagesToScan, KSM.Knobs.sleepMillisecs, KSM.Knobs.useZeroPages,
                 KSM.Knobs.mergeAcrossNodes, KSM.Knobs.maxPageSharing, KSM.Knobs.smartScan].map(\.path)
        p += ["advisor_mode", "advisor_target_scan_time", "advisor_max_cpu", "advisor_min_pages_to_scan",
              "advisor_max_pages_to_scan"].map { "\(KSM.directory)/\($0)" }
        p += [THP.enabled.path, THP.defrag.path] + ["use_zero_page", "shmem_enabled", "shrink_underused"].map { "\(THP.directory)/\($0)" }
        p.append("\(THP.directory)/hugepages-*/enabled")
        p.append("\(THP.directory)/hugepages-*/shmem_enabled")
        p += [THP.Khugepaged.defrag, THP.Khugepaged.pagesToScan, THP.Khugepaged.scanSleepMillisecs,
              THP.Khugepaged.allocSleepMillisecs, THP.Khugepaged.maxPtesNone].map(\.path)
        p += [THP.Khugepaged.maxPtesShared.path, THP.Khugepaged.maxPtesSwap.path]
        p += ["\(HugeTLB.directory)/hugepages-*/nr_hugepages", "\(HugeTLB.directory)/hugepages-*/nr_overcommit_hugepages",
              "/sys/devices/system/node/node*/hugepages/hugepages-*/nr_hugepages",
              "/proc/sys/vm/nr_hugepages", "/proc/sys/vm/nr_overcommit_hugepages"]
        p += [Overcommit.memory, Overcommit.ratio, Overcommit.kbytes, Overcommit.userReserveKbytes,
              Overcommit.adminReserveKbytes, Overcommit.swappiness, Overcommit.pageCluster, Compaction.proactiveness].map(\.path)
        p += [Zswap.enabled, Zswap.compressor, Zswap.maxPoolPercent, Zswap.shrinkerEnabled, Zswap.acceptThresholdPercent].map(\.path)
        return p
    }()

    /// Whether `path` is one of the knobs above (no `.` or `..` component can make it one).
    public static func watches(_ path: String) -> Bool {
        let parts = path.split(separator: "/", omittingEmptySubsequences: false)
        if parts.contains(where: { $0 == "." || $0 == ".." }) { return false }
        return knobPatterns.contains { pattern in
            let q = pattern.split(separator: "/", omittingEmptySubsequences: false)
            guard q.count == parts.count else { return false }
            return zip(q, parts).allSatisfy { pat, part in
                guard let star = pat.firstIndex(of: "*") else { return pat == part }
                let head = pat[..<star], tail = pat[pat.index(after: star)...]
                return part.count >= head.count + tail.count && part.hasPrefix(head) && part.hasSuffix(tail)
            }
        }
    }

    /// The knob files that exist on this kernel, patterns expanded, sorted.
    public static func knobs() -> [Knob] {
        var found: [String] = []
        for pattern in knobPatterns { found += expand(pattern) }
        return Array(Set(found)).sorted().map(Knob.init)
    }

    /// Names memlab gives what a run creates in temporary directories (its run directory, and
    /// names from before there was one): a leftover is litter.
    public static let temporaryPrefixes = [RunDirectory.prefix, "memlab-ps-", "memlab-pagesource-", "memlab-lazy-",
                                           "memlab.", "memlab-child.", "memlab-unsaved-"]

    /// The picture, one `name=value` a line: every knob's value, then what a run may leave
    /// behind — swap areas, KSM's shared pages, hugetlb pages in use, memlab's memory cgroups,
    /// zram devices, DAMON kdamonds (how many, each on or off), memlab's network namespaces, temporary files, registered journals. Read
    /// only: taking it changes nothing.
    public static func snapshot() -> [String] {
        var lines: [String] = []
        for k in knobs() {
            // Raw, as the kernel prints it ("always [madvise] never"): every choice shows.
            if let v = try? ProcFile.read(k.path) { lines.append("\(k.path)=\(v.trimmed)") }
        }
        let swaps = (try? ProcFile.read("/proc/swaps")) ?? ""
        lines.append("swap_areas=\(max(0, swaps.split(separator: "\n").count - 1))")
        lines.append("ksm_pages_shared=\((try? ProcFile.read("\(KSM.directory)/pages_shared"))?.trimmed ?? "")")
        let meminfo = (try? ProcFile.read("/proc/meminfo")) ?? ""
        func field(_ name: String) -> Int {
            for line in meminfo.split(separator: "\n") where line.hasPrefix(name + ":") {
                return Int(line.split(separator: " ", omittingEmptySubsequences: true).dropFirst().first ?? "") ?? 0
            }
            return 0
        }
        lines.append("hugetlb_in_use=\(field("HugePages_Total") &- field("HugePages_Free"))")
        for root in ["/sys/fs/cgroup/memory", "/sys/fs/cgroup/unified", "/sys/fs/cgroup"] {
            for name in ProcFile.list(root).sorted() where name.hasPrefix("memlab") { lines.append("leftover_cgroup=\(root)/\(name)") }
        }
        for name in ProcFile.list("/sys/block").sorted() where name.hasPrefix("zram") { lines.append("zram_device=\(name)") }
        if Damon.isAvailable {
            let kdamonds = Damon.configured()
            lines.append("damon_kdamonds=\(kdamonds.count)")
            for k in kdamonds { lines.append("damon_kdamond_\(k.index)=\(k.state)") }
        }
        for name in ProcFile.list("/run/netns").sorted() where name.hasPrefix("memlab") { lines.append("leftover_netns=\(name)") }
        // tmpfs mounts a run made (hugepages:shmem with tmpfs_huge), by their mount point's name.
        for line in (ProcFile.readIfPresent("/proc/self/mounts") ?? "").split(separator: "\n") {
            let f = line.split(separator: " ")
            if f.count > 2, AtomicFile.basename(of: String(f[1])).hasPrefix("memlab-tmpfs-") { lines.append("leftover_mount=\(f[1])") }
        }
        for dir in ["/tmp", "/var/tmp", "/dev/shm"] {
            for name in ProcFile.list(dir).sorted() where temporaryPrefixes.contains(where: { name.hasPrefix($0) }) {
                lines.append("leftover_file=\(dir)/\(name)")
            }
        }
        for name in ProcFile.list(SettingsGuard.registryDirectory).sorted() { lines.append("registered_journal=\(name)") }
        let journal = SettingsGuard(command: "").journalPath
        if ProcFile.exists(journal) { lines.append("journal=\(journal)") }
        for f in SettingsGuard.journalTemporaries(beside: journal) { lines.append("leftover_file=\(f)") }
        return lines
    }

    /// A pattern's existing files (a `*` component matched against a directory listing).
    static func expand(_ pattern: String) -> [String] {
        var paths = [""]
        for part in pattern.split(separator: "/") {
            if let star = part.firstIndex(of: "*") {
                let head = part[..<star], tail = part[part.index(after: star)...]
                paths = paths.flatMap { dir in
                    ProcFile.list(dir.isEmpty ? "/" : dir).filter { $0.hasPrefix(head) && $0.hasSuffix(tail) && $0.count >= head.count + tail.count }
                        .sorted().map { "\(dir)/\($0)" }
                }
            } else {
                paths = paths.map { "\($0)/\(part)" }
            }
        }
        return paths.filter { ProcFile.exists($0) }
    }
}

private extension String {
    var trimmed: String {
        var s = Substring(self)
        while let c = s.last, c.isWhitespace { s = s.dropLast() }
        while let c = s.first, c.isWhitespace { s = s.dropFirst() }
        return String(s)
    }
}
