#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM
import Workloads

/// hugepages:collapse-swap — as tools/testing/selftests/mm/khugepaged.c
/// (collapse_max_ptes_swap): a region faulted as 4K pages has `swapped_per_huge` pages of each
/// 2M range paged out (MADV_PAGEOUT, to a swap file the run borrows); khugepaged collapses a
/// range — reading those pages back in — only if no more than max_ptes_swap of them are
/// swapped out (mm/khugepaged.c, SCAN_EXCEED_SWAP_PTE).
extension HugePagesScenario {
    func prepareCollapseSwap(_ p: Values, settingsGuard: SettingsGuard) throws {
        let size = regionSize(p, .thp) + (16 << 20)
        try settingsGuard.borrowSwapFile(bytes: size)
    }

    func runCollapseSwap(_ ctx: RunContext, _ p: Values) throws {
        let huge = 2 << 20
        let size = regionSize(p, .thp)
        let units = size / huge
        let swapped = p.swappedPerHuge
        let maxSwap = Int((try? THP.Khugepaged.maxPtesSwap.read()) ?? "") ?? p.maxPtesSwap
        let m = try AnonymousMapping(length: size, kind: .thp)
        try m.advise(memlab_MADV_NOHUGEPAGE, name: "MADV_NOHUGEPAGE")
        touchPages(m.base, length: size, stride: 4096)
        if swapped > 0 {
            for u in 0..<units {
                if madvise(m.base + u * huge, swapped * 4096, memlab_MADV_PAGEOUT) != 0 { throw SystemError.current("madvise(MADV_PAGEOUT)") }
            }
        }
        let swapBefore = Double(try Smaps.entry(startingAt: m.base)["Swap"] ?? 0)
        ctx.record("swap_bytes_before", swapBefore, .bytes, better: .none)
        guard swapBefore == Double(units * swapped * 4096) else {
            throw ScenarioError.failed("MADV_PAGEOUT left \(Int(swapBefore)) bytes of the region in swap, not \(units * swapped * 4096): is the run's swap area active?")
        }
        let vm0 = try VMStat.current()
        try m.advise(memlab_MADV_HUGEPAGE, name: "MADV_HUGEPAGE")
        let seconds = try waitForKhugepaged(m, size: size, due: swapped <= maxSwap, timeoutS: p.timeoutS)
        let vm1 = try VMStat.current()
        let e1 = try Smaps.entry(startingAt: m.base)
        let hugeAfter = Double(e1["AnonHugePages"] ?? 0), swapAfter = Double(e1["Swap"] ?? 0)
        func delta(_ k: String) -> Double { Double(Int64(vm1[k] ?? 0) - Int64(vm0[k] ?? 0)) }
        let shouldCollapse = swapped <= maxSwap

        ctx.record("anon_huge_bytes_after", hugeAfter, .bytes, better: .none)
        ctx.record("swap_bytes_after", swapAfter, .bytes, better: .none)
        ctx.record("huge_ranges_collapsed", hugeAfter / Double(huge), .count, better: .none)
        ctx.record("thp_scan_exceed_swap_pte", delta("thp_scan_exceed_swap_pte"), .count, better: .none)
        ctx.record("thp_collapse_alloc", delta("thp_collapse_alloc"), .count, better: .none)
        ctx.record("pswpin", delta("pswpin"), .pages, better: .none)
        ctx.record("wait_time", seconds, .s, better: .none)
        ctx.check("huge_ranges_collapsed", expected: shouldCollapse ? Double(units) : 0, observed: hugeAfter / Double(huge), tolerance: 0,
                  describe: "collapse iff swapped pages per 2M (\(swapped)) <= max_ptes_swap (\(maxSwap)); AnonHugePages once all collapsed, or after three khugepaged scans")
        if shouldCollapse {
            ctx.check("swap_bytes_after", expected: 0, observed: swapAfter, tolerance: 0,
                      describe: "the collapse read every swapped page back in (smaps Swap of the region)")
        } else {
            ctx.check("thp_scan_exceed_swap_pte", expected: Double(units), observed: delta("thp_scan_exceed_swap_pte"),
                      accepted: Double(units)...Double(Int.max), describe: "khugepaged refused each range at least once for its swapped pages (vmstat, machine-wide)")
            ctx.check("swap_bytes_after", expected: swapBefore, observed: swapAfter, tolerance: 0,
                      describe: "nothing read back: the swapped pages stay out")
        }
        ctx.note("collapse-swap: \(units) ranges of 2M, \(swapped) pages each paged out; max_ptes_swap=\(maxSwap)")
    }
}
