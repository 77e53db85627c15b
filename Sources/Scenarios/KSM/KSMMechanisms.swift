import LabKit
import LinuxMM

/// What the newer KSM variants (issue 15) need from this kernel, what they refuse, and what
/// they borrow. Each lives in its own file: SmartScanVariant, AdvisorVariant, THPVariant,
/// StableTreeVariants (numa-merge, chains).
extension KSMScenario {
    func probeMechanism(_ variant: Variant) -> Availability {
        func need(_ file: String, _ why: String) -> Availability {
            ProcFile.exists("\(KSM.directory)/\(file)") ? .usable : .unusable("\(KSM.directory)/\(file) is missing: \(why)")
        }
        switch variant {
        case .merge, .cow, .unmerge:
            return .usable
        case .smartScan:
            if case .unusable(let r) = need("smart_scan", "smart scan needs Linux 6.7+") { return .unusable(r) }
            if case .unusable(let r) = need("pages_skipped", "smart scan's pages_skipped counter needs Linux 6.7+") { return .unusable(r) }
            return need("pages_scanned", "the pages_scanned counter needs Linux 6.7+")
        case .advisor:
            for f in ["advisor_mode", "advisor_target_scan_time", "advisor_max_cpu", "advisor_max_pages_to_scan"] {
                if case .unusable(let r) = need(f, "the KSM advisor needs Linux 6.9+") { return .unusable(r) }
            }
            return .usable
        case .thp:
            guard THP.isAvailable else { return .unusable("no /sys/kernel/mm/transparent_hugepage: kernel built without CONFIG_TRANSPARENT_HUGEPAGE") }
            return .usable
        case .numaMerge:
            if case .unusable(let r) = need("merge_across_nodes", "kernel built without CONFIG_NUMA") { return .unusable(r) }
            guard NUMA.isAvailable else { return .unusable("libnuma reports no NUMA support (numa_available() < 0): merge_across_nodes needs two NUMA nodes") }
            let nodes = NUMA.nodeCount
            guard nodes >= 2 else {
                return .unusable("merge_across_nodes needs two NUMA nodes with memory; this machine has \(nodes) (run it in a guest with two nodes)")
            }
            return .usable
        case .chains:
            if case .unusable(let r) = need("max_page_sharing", "stable node chains need Linux 4.13+") { return .unusable(r) }
            return need("stable_node_chains", "stable node chains need Linux 4.13+")
        }
    }

    /// In the child: a variant whose checks add up ksmd's machine-wide counters (pages
    /// scanned and skipped, stable node chains) is skipped while another process has
    /// mergeable memory — its pages would be in every figure.
    func requireSoleKSMUser(_ what: String) throws {
        let others = KSM.otherMergeableProcesses()
        guard others.isEmpty else {
            let list = others.prefix(3).map { "pid \($0.pid) (\($0.comm))" }.joined(separator: ", ")
            throw ScenarioError.skipped("\(what) are machine-wide and another process has KSM-mergeable memory: \(list)\(others.count > 3 ? " and \(others.count - 3) more" : ""); ksmd would count its pages too")
        }
    }

    func validateMechanism(_ variant: Variant, _ p: Values) throws(UsageError) {
        if variant == .merge || variant == .cow || variant == .unmerge { return }
        let memTotal = Int((try? MemInfo.current().memTotal) ?? 0)
        // Each of these maps the region once (numa-merge: two halves of it).
        if memTotal > 0 && p.pages * System.pageSize > memTotal / 2 {
            throw UsageError("pages=\(p.pages) is \(p.pages * System.pageSize) bytes, more than half of this machine's \(memTotal) bytes: ask for less")
        }
        switch variant {
        case .thp:
            let perHuge = HugePageSize.pmd / System.pageSize
            if p.pages % perHuge != 0 {
                throw UsageError("ksm:thp: pages must be a multiple of \(perHuge) (one \(HugePageSize.pmd / 1024)K huge page), got \(p.pages)")
            }
        case .numaMerge:
            if p.pages % 2 != 0 { throw UsageError("ksm:numa-merge: pages must be even (half on each node), got \(p.pages)") }
        case .chains:
            let layout = layout(p)
            if layout.groupSizes.allSatisfy({ $0 <= p.maxPageSharing }) && layout.zeroPages <= p.maxPageSharing {
                throw UsageError("ksm:chains: no content has more than max_page_sharing=\(p.maxPageSharing) copies, so no chain can form: raise duplicate_ratio or lower duplicate_groups or max_page_sharing")
            }
        case .advisor:
            if p.durationS < Double(p.targetScanTime) {
                throw UsageError("ksm:advisor: duration_s=\(p.durationS) is shorter than one target scan (target_scan_time=\(p.targetScanTime) s): the advisor would not be seen deciding")
            }
        default: break
        }
    }

    /// The knobs each newer variant borrows; nil for merge, cow and unmerge.
    func mechanismSettings(_ variant: Variant, _ p: Values) -> [KnobSetting]? {
        let base = [
            KnobSetting(KSM.Knobs.pagesToScan, String(p.pagesToScan)),
            KnobSetting(KSM.Knobs.sleepMillisecs, String(p.sleepMillisecs)),
            KnobSetting(KSM.Knobs.useZeroPages, p.useZeroPages ? "1" : "0"),
        ]
        let run = KnobSetting(KSM.Knobs.run, "1")
        switch variant {
        case .merge, .cow, .unmerge:
            return nil
        case .smartScan:
            return base + [KnobSetting(KSM.Knobs.smartScan, p.smartScan ? "1" : "0"), run]
        case .advisor:
            // advisor_mode last: switching it on sets pages_to_scan to advisor_min_pages_to_scan
            // (the guard journals pages_to_scan first, so the restore gives it back after).
            return [
                KnobSetting(KSM.Knobs.sleepMillisecs, String(p.sleepMillisecs)),
                KnobSetting(KSM.Knobs.useZeroPages, p.useZeroPages ? "1" : "0"),
                KnobSetting(KSM.Knobs.advisorMaxCPU, String(p.advisorMaxCPU)),
                KnobSetting(KSM.Knobs.advisorTargetScanTime, String(p.targetScanTime)),
                KnobSetting(KSM.Knobs.advisorMode, "scan-time"),
                run,
            ]
        case .thp:
            var s = base + [KnobSetting(KSM.Knobs.smartScan, p.smartScan ? "1" : "0")]
            // THP for MADV_HUGEPAGE regions, 2M only (the kernel picks the largest enabled size).
            s.append(KnobSetting(THP.enabled, "madvise"))
            for size in THP.anonymousSizes {
                s.append(KnobSetting(THP.sizeEnabled(bytes: size), size == HugePageSize.pmd ? "inherit" : "never"))
            }
            return s + [run]
        case .numaMerge:
            // Written with every page unmerged first (Knob.apply): the kernel refuses it otherwise.
            return [KnobSetting(KSM.Knobs.mergeAcrossNodes, p.mergeAcrossNodes ? "1" : "0")] + base + [run]
        case .chains:
            return [KnobSetting(KSM.Knobs.maxPageSharing, String(p.maxPageSharing))] + base + [run]
        }
    }
}
