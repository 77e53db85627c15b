#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM
import Workloads

/// hugepages:collapse-shared — as tools/testing/selftests/mm/khugepaged.c
/// (collapse_max_ptes_shared): a region faulted as 4K pages is shared with a forked child
/// (copy-on-write), then the parent writes all but `shared_per_huge` pages of each 2M range
/// (copying them). khugepaged collapses a range only if no more than max_ptes_shared of its
/// pages are still mapped by the child too (mm/khugepaged.c, SCAN_EXCEED_SHARED_PTE).
extension HugePagesScenario {
    func runCollapseShared(_ ctx: RunContext, _ p: Values) throws {
        let huge = 2 << 20
        let size = regionSize(p, .thp)
        let units = size / huge
        let shared = p.sharedPerHuge
        let maxShared = Int((try? THP.Khugepaged.maxPtesShared.read()) ?? "") ?? p.maxPtesShared
        let m = try AnonymousMapping(length: size, kind: .thp)
        try m.advise(memlab_MADV_NOHUGEPAGE, name: "MADV_NOHUGEPAGE")
        touchPages(m.base, length: size, stride: 4096)

        // The child shares every page (copy-on-write) and only waits to be killed: after
        // fork it calls nothing but pause().
        let child = fork()
        if child < 0 { throw SystemError.current("fork") }
        if child == 0 {
            while true { pause() }
        }
        defer {
            kill(child, SIGKILL)
            var status: Int32 = 0
            _ = waitpid(child, &status, 0)
        }
        // Unshare all but `shared` pages of each range: a write copies the page.
        let bytes = m.base.assumingMemoryBound(to: UInt8.self)
        for u in 0..<units {
            for k in shared..<512 { bytes[u * huge + k * 4096] &+= 1 }
        }
        let vm0 = try VMStat.current()
        let collapsed0 = (try? CounterFile(path: THP.Khugepaged.pagesCollapsed).read()) ?? 0
        try m.advise(memlab_MADV_HUGEPAGE, name: "MADV_HUGEPAGE")
        let seconds = try waitForKhugepaged(m, size: size, due: shared <= maxShared, timeoutS: p.timeoutS)
        let vm1 = try VMStat.current()
        let hugeAfter = Double(try Smaps.entry(startingAt: m.base)["AnonHugePages"] ?? 0)
        let collapsed = ((try? CounterFile(path: THP.Khugepaged.pagesCollapsed).read()) ?? 0) - collapsed0
        func delta(_ k: String) -> Double { Double(Int64(vm1[k] ?? 0) - Int64(vm0[k] ?? 0)) }
        let shouldCollapse = shared <= maxShared

        ctx.record("anon_huge_bytes_after", hugeAfter, .bytes, better: .none)
        ctx.record("huge_ranges_collapsed", hugeAfter / Double(huge), .count, better: .none)
        ctx.record("khugepaged_pages_collapsed", Double(collapsed), .count, better: .none)
        ctx.record("thp_scan_exceed_share_pte", delta("thp_scan_exceed_share_pte"), .count, better: .none)
        ctx.record("thp_collapse_alloc", delta("thp_collapse_alloc"), .count, better: .none)
        ctx.record("wait_time", seconds, .s, better: .none)
        ctx.check("huge_ranges_collapsed", expected: shouldCollapse ? Double(units) : 0, observed: hugeAfter / Double(huge), tolerance: 0,
                  describe: "collapse iff shared pages per 2M (\(shared)) <= max_ptes_shared (\(maxShared)); AnonHugePages once all collapsed, or after three khugepaged scans")
        if !shouldCollapse {
            // vmstat is machine-wide: another process's refusals count too, never fewer.
            ctx.check("thp_scan_exceed_share_pte", expected: Double(units), observed: delta("thp_scan_exceed_share_pte"),
                      accepted: Double(units)...Double(Int.max), describe: "khugepaged refused each range at least once for its shared pages (vmstat, machine-wide)")
        }
        ctx.note("collapse-shared: \(units) ranges of 2M, \(shared) pages each still shared with a forked child; max_ptes_shared=\(maxShared)")
    }
}

extension HugePagesScenario {
    /// Lets khugepaged work on `m`, watched by its full_scans: where a collapse is due, until
    /// every range is huge (a collapse that has to wait — a page being read back, a busy lock —
    /// is retried on a later scan), up to `timeoutS`; where none is, three full scans, each of
    /// which refuses every range. Returns the seconds it took.
    func waitForKhugepaged(_ m: AnonymousMapping, size: Int, due: Bool, timeoutS: Double) throws -> Double {
        let scans = try CounterFile(path: THP.Khugepaged.fullScans)
        let start = try scans.read()
        let t0 = Clock.nanoseconds()
        while Clock.seconds(since: t0) < timeoutS {
            if try Smaps.entry(startingAt: m.base)["AnonHugePages"] ?? 0 >= UInt64(size) { break }
            if !due, try scans.read() >= start + 3 { break }
            Clock.sleep(nanoseconds: 20_000_000)
        }
        return Clock.seconds(since: t0)
    }
}
