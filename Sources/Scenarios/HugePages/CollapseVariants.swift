#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM
import Workloads

extension HugePagesScenario {
    /// A 2M-aligned region faulted as 4K pages (MADV_NOHUGEPAGE), then made eligible
    /// (MADV_HUGEPAGE) and collapsed — synchronously by MADV_COLLAPSE, or by khugepaged.
    func runCollapse(_ ctx: RunContext, _ p: Values) throws {
        let size = regionSize(p, .thp)
        if p.prewarm { prewarm(length: size, kind: .base) }
        let m = try AnonymousMapping(length: size, kind: .thp)
        try m.advise(memlab_MADV_NOHUGEPAGE, name: "MADV_NOHUGEPAGE")
        touchPages(m.base, length: m.length, stride: 4096)
        let before = try coverage(m, .thp).coverage
        ctx.record("huge_coverage_before", before, .ratio, better: .none)
        // Counters first: once the range is eligible, khugepaged may collapse part of it
        // before MADV_COLLAPSE runs, and that must still be counted (and reported).
        let vm0 = try VMStat.current()
        let collapsed0 = (try? CounterFile(path: THP.Khugepaged.pagesCollapsed).read()) ?? 0
        try m.advise(memlab_MADV_HUGEPAGE, name: "MADV_HUGEPAGE")
        let hugePages = Double(size / (2 << 20))

        let t0 = Clock.nanoseconds()
        if p.method == .madvCollapse {
            // EAGAIN is transient (madvise(2): a resource briefly unavailable, e.g. a page
            // locked by khugepaged or a huge page not yet compacted): try again, a few times,
            // and count it; collapse_time includes the retries.
            var again = 0
            while madvise(m.base, m.length, memlab_MADV_COLLAPSE) != 0 {
                let e = SystemError.current("madvise(MADV_COLLAPSE)")
                if e.errno == EINVAL { throw ScenarioError.skipped("MADV_COLLAPSE is not supported by this kernel (needs 6.1+)") }
                if e.errno == EAGAIN && again < 5 { again += 1; Clock.sleep(nanoseconds: 20_000_000); continue }
                throw ScenarioError.failed("\(e)" + (again > 0 ? " (after \(again) EAGAIN)" : ""))
            }
            if again > 0 { ctx.note("MADV_COLLAPSE answered EAGAIN \(again) time(s) before it succeeded; collapse_time includes the retries") }
        } else {
            let timeout = p.timeoutS
            while try Smaps.entry(startingAt: m.base)["AnonHugePages"] ?? 0 < UInt64(size) {
                if Clock.seconds(since: t0) > timeout {
                    let cov = try coverage(m, .thp).coverage
                    throw ScenarioError.failed("khugepaged collapsed \(Int(cov * 100))% of the region in \(timeout) s; raise timeout_s or khugepaged's pages_to_scan")
                }
                Clock.sleep(nanoseconds: 10_000_000)
            }
        }
        let seconds = Clock.seconds(since: t0)
        let after = try coverage(m, .thp).coverage
        let vm1 = try VMStat.current()
        ctx.record("collapse_time", seconds, .s, better: .lower)
        ctx.record("collapse_time_per_2m", seconds / max(hugePages * (after - before), 1), .s, better: .lower)
        ctx.record("huge_coverage_after", after, .ratio, better: .higher)
        let allocs = Double((vm1["thp_collapse_alloc"] ?? 0) &- (vm0["thp_collapse_alloc"] ?? 0))
        ctx.record("thp_collapse_alloc", allocs, .count, better: .none)
        let byKhugepaged = ((try? CounterFile(path: THP.Khugepaged.pagesCollapsed).read()) ?? 0) - collapsed0
        ctx.record("khugepaged_pages_collapsed", Double(byKhugepaged), .count, better: .none)
        if p.method == .madvCollapse && byKhugepaged > 0 {
            ctx.note("khugepaged collapsed \(byKhugepaged) of the huge pages before or during MADV_COLLAPSE; collapse_time covers the rest")
        }
        ctx.check("huge_coverage_after", expected: 1, observed: after, tolerance: 0.05, describe: "±0.05: every 2M range collapsed")
        ctx.check("collapsed_huge_pages", expected: hugePages, observed: allocs, tolerance: max(1, hugePages * 0.05),
                  describe: "vmstat thp_collapse_alloc rose by one per 2M of the region (±5%)")
    }

    /// One 4K page in every `stride_pages` touched: RSS with THP off, with THP on at fault,
    /// and after khugepaged looked at the 4K region with the borrowed max_ptes_none.
    func runBloat(_ ctx: RunContext, _ p: Values) throws {
        let size = regionSize(p, .thp)
        let stride = p.stridePages * 4096
        let small = try AnonymousMapping(length: size, kind: .thp)
        try small.advise(memlab_MADV_NOHUGEPAGE, name: "MADV_NOHUGEPAGE")
        touchPages(small.base, length: size, stride: stride)
        let rss4k = Double(try Smaps.entry(startingAt: small.base)["Rss"] ?? 0)
        let big = try AnonymousMapping(length: size, kind: .thp)
        touchPages(big.base, length: size, stride: stride)
        let rssTHP = Double(try Smaps.entry(startingAt: big.base)["Rss"] ?? 0)
        ctx.record("rss_4k", rss4k, .bytes, better: .lower)
        ctx.record("rss_thp", rssTHP, .bytes, better: .lower)
        ctx.record("rss_inflation", rssTHP / rss4k, .ratio, better: .lower)
        ctx.check("rss_4k", expected: Double((size + stride - 1) / stride * 4096), observed: rss4k, tolerance: 0, describe: "exactly the touched pages")

        // khugepaged on the sparse 4K region: it collapses a 2M range only if its empty PTEs
        // are no more than max_ptes_none.
        try small.advise(memlab_MADV_HUGEPAGE, name: "MADV_HUGEPAGE")
        let scans = try CounterFile(path: THP.Khugepaged.fullScans)
        let start = try scans.read()
        let t0 = Clock.nanoseconds()
        while try scans.read() < start + 3 && Clock.seconds(since: t0) < p.timeoutS {
            Clock.sleep(nanoseconds: 20_000_000)
        }
        let rssAfter = Double(try Smaps.entry(startingAt: small.base)["Rss"] ?? 0)
        ctx.record("rss_after_khugepaged", rssAfter, .bytes, better: .lower)
        ctx.record("rss_inflation_after_khugepaged", rssAfter / rss4k, .ratio, better: .lower)
        let emptyPerRange = 512 - (2 << 20) / stride
        let shouldCollapse = stride > 4096 ? emptyPerRange <= p.maxPtesNone : true
        let collapsed = rssAfter > rss4k * 1.5
        ctx.check("khugepaged_collapsed", expected: shouldCollapse ? 1 : 0, observed: collapsed ? 1 : 0, tolerance: 0,
                  describe: "collapse iff empty PTEs per 2M (\(emptyPerRange)) <= max_ptes_none (\(p.maxPtesNone))")
    }

    /// A THP-backed region; then one 4K page in each 2M is unmapped or write-protected,
    /// which forces the kernel to split the PMD mapping (and, for munmap, the folio).
    func runSplit(_ ctx: RunContext, _ p: Values) throws {
        let size = regionSize(p, .thp)
        if p.prewarm { prewarm(length: size, kind: .thp) }
        let m = try AnonymousMapping(length: size, kind: .thp)
        touchPages(m.base, length: m.length, stride: 4096)
        let cov = try coverage(m, .thp).coverage
        ctx.record("huge_coverage_before", cov, .ratio, better: .none)
        if cov < 0.5 { throw ScenarioError.failed("only \(Int(cov * 100))% of the region was THP-backed: nothing to split (is THP enabled?)") }
        let units = size / (2 << 20)
        let vm0 = try VMStat.current()
        let t0 = Clock.nanoseconds()
        for u in 0..<units {
            let page = m.base + u * (2 << 20) + (1 << 20)
            let rc = p.operation == .munmap ? munmap(page, 4096) : mprotect(page, 4096, PROT_READ)
            if rc != 0 { throw SystemError.current(p.operation.rawValue) }
        }
        let seconds = Clock.seconds(since: t0)
        let vm1 = try VMStat.current()
        func delta(_ k: String) -> Double { Double((vm1[k] ?? 0) &- (vm0[k] ?? 0)) }
        ctx.record("split_time", seconds, .s, better: .lower)
        ctx.record("split_time_per_huge_page", seconds / Double(units), .s, better: .lower)
        ctx.record("thp_split_pmd", delta("thp_split_pmd"), .count, better: .none)
        ctx.record("thp_split_page", delta("thp_split_page"), .count, better: .none)
        ctx.record("thp_deferred_split_page", delta("thp_deferred_split_page"), .count, better: .none)
        ctx.check("thp_split_pmd", expected: Double(units) * cov, observed: delta("thp_split_pmd"), tolerance: max(1, Double(units) * 0.05),
                  describe: "one PMD split per THP touched by the operation (±5%)")
        ctx.note("split: \(units) huge pages, one 4K page in the middle of each \(p.operation == .munmap ? "unmapped" : "made read-only")")
    }
}
