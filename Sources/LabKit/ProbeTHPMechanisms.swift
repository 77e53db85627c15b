import LinuxMM

extension ProbeReport {
    /// THP's newer mechanisms, one row each (the hugepages variants of the same names).
    static func thpMechanisms(root: Bool) -> [Feature] {
        guard THP.isAvailable else { return [] }
        var f: [Feature] = []
        let vmstat = ProcFile.readIfPresent("/proc/vmstat") ?? ""
        if !THP.shrinkUnderused.exists || !vmstat.contains("thp_underused_split_page ") {
            f.append(Feature(name: "thp-shrink-underused", usable: false, detail: "",
                             reason: "\(THP.shrinkUnderused.path) or vmstat thp_underused_split_page missing: the underused-THP shrinker needs Linux 6.12+"))
        } else if MemoryCgroupMount.detect().isEmpty {
            f.append(Feature(name: "thp-shrink-underused", usable: false, detail: "shrink_underused=\((try? THP.shrinkUnderused.read()) ?? "?")",
                             reason: "no memory cgroup controller mounted: the run squeezes its own memory cgroup"))
        } else {
            f.append(Feature(name: "thp-shrink-underused", usable: root,
                             detail: "shrink_underused=\((try? THP.shrinkUnderused.read()) ?? "?") max_ptes_none=\((try? THP.Khugepaged.maxPtesNone.read()) ?? "?") (511 turns the underused check off)",
                             reason: root ? nil : "changing its settings needs root"))
        }
        let needRoot = root ? nil : "changing its settings needs root"
        if THP.shmemEnabled.exists {
            f.append(Feature(name: "thp-shmem", usable: root,
                             detail: "shmem_enabled=\((try? THP.shmemEnabled.read()) ?? "?") 2M shmem_enabled=\((try? THP.sizeShmemEnabled(bytes: 2 << 20).read()) ?? "absent (before 6.11)")",
                             reason: needRoot))
        } else {
            f.append(Feature(name: "thp-shmem", usable: false, detail: "", reason: "\(THP.shmemEnabled.path) missing: kernel without THP for shmem"))
        }
        if THP.Khugepaged.maxPtesShared.exists {
            f.append(Feature(name: "khugepaged-max-ptes-shared", usable: root,
                             detail: "max_ptes_shared=\((try? THP.Khugepaged.maxPtesShared.read()) ?? "?")", reason: needRoot))
        } else {
            f.append(Feature(name: "khugepaged-max-ptes-shared", usable: false, detail: "", reason: "\(THP.Khugepaged.maxPtesShared.path) missing: needs Linux 5.8+"))
        }
        if THP.Khugepaged.maxPtesSwap.exists {
            f.append(Feature(name: "khugepaged-max-ptes-swap", usable: root,
                             detail: "max_ptes_swap=\((try? THP.Khugepaged.maxPtesSwap.read()) ?? "?"); the run makes its own swap file", reason: needRoot))
        } else {
            f.append(Feature(name: "khugepaged-max-ptes-swap", usable: false, detail: "", reason: "\(THP.Khugepaged.maxPtesSwap.path) missing"))
        }
        f.append(defragRow(root: root))
        return f
    }

    /// hugepages:defrag: compaction built in, and whether fragmenting this machine is a
    /// run's to do (it takes the free memory of a node, so large machines are left to guests).
    static func defragRow(root: Bool) -> Feature {
        guard Compaction.isAvailable else {
            return Feature(name: "thp-defrag", usable: false, detail: "", reason: "/proc/vmstat has no compact_stall: kernel built without CONFIG_COMPACTION")
        }
        let buddy = try? BuddyInfo.current()
        let free = buddy?.freeBytes() ?? 0
        let detail = "defrag=\((try? THP.defrag.read()) ?? "?") compaction_proactiveness=\((try? Compaction.proactiveness.read()) ?? "absent (before 5.9)") free 2M blocks=\(buddy.map { String($0.freeBlocks(atLeastOrder: 9)) } ?? "?")"
        if !root { return Feature(name: "thp-defrag", usable: false, detail: detail, reason: "changing its settings needs root") }
        if free > 2 << 30 {
            return Feature(name: "thp-defrag", usable: false, detail: detail,
                           reason: "\(free >> 30) GiB free: fragmenting it would take all of it; it runs in a guest (scenarios/guest-paths.toml, or --guest kernel=distro,mem=1G)")
        }
        return Feature(name: "thp-defrag", usable: true, detail: detail, reason: nil)
    }
}
