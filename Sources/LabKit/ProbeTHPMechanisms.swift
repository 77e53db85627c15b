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
        return f
    }
}
