import CLinuxMM
import LabKit
import LinuxMM

/// ksm:thp — KSM on a THP-backed region, as the kernel selftest ksm_tests -H does: ksmd
/// merges 4K pages, so a huge page with a page to merge is split first (mm/ksm.c,
/// try_to_merge_one_page). The layout says which 2M ranges hold such pages: those must be
/// split, the others stay huge.
extension KSMScenario {
    func runTHP(_ ctx: RunContext, _ p: Values) throws {
        try requireSoleKSMUser("thp_split_page and pages_shared")
        let pageSize = System.pageSize
        let huge = HugePageSize.pmd
        let perHuge = huge / pageSize
        let layout = layout(p)
        let maxSharing = Int((try? KSM.Knobs.maxPageSharing.read()) ?? "256") ?? 256
        let expect = layout.expectation(useZeroPages: p.useZeroPages, maxPageSharing: maxSharing)
        let units = layout.pages / perHuge
        // 2M ranges holding at least one page that merges: each must be split once.
        var toSplit = 0
        for u in 0..<units where (u * perHuge..<(u + 1) * perHuge).contains(where: { layout.merges(page: $0) }) { toSplit += 1 }

        let region = try AnonymousMapping(length: layout.pages * pageSize, kind: .thp)
        try region.advise(memlab_MADV_HUGEPAGE, name: "MADV_HUGEPAGE")
        layout.fill(region.base, pageSize: pageSize, seed: 0x6B73_6D74_6870 &+ UInt64(ctx.repetition))
        let hugeBefore = Double(try Smaps.entry(startingAt: region.base)["AnonHugePages"] ?? 0)
        ctx.record("anon_huge_bytes_before", hugeBefore, .bytes, better: .none)
        guard hugeBefore >= Double(region.length) / 2 else {
            throw ScenarioError.failed("only \(Int(hugeBefore)) of \(region.length) bytes were THP-backed after the fill (AnonHugePages): nothing for KSM to split; is memory too fragmented for 2M pages?")
        }
        let vm0 = try VMStat.current()
        // Merging a page of a huge page takes a split first, and a split that finds the
        // folio busy is retried on a later scan: wait for the merges, not only for two quiet
        // scans (which pass while splits are still failing).
        let merge = try mergeAndWait(region: region, layout: layout, prctlMode: false, variant: .thp, p, ctx: ctx,
                                     atLeast: Int64(Double(expect.mergingPages - (p.useZeroPages ? 0 : layout.zeroPages)) * 0.99), failOnTimeout: false)
        let vm1 = try VMStat.current()
        let hugeAfter = Double(try Smaps.entry(startingAt: region.base)["AnonHugePages"] ?? 0)
        let stat = try processStat([region], useZeroPages: p.useZeroPages, ctx: ctx)
        let global = try KSM.counters()
        func delta(_ k: String) -> Double { Double(Int64(vm1[k] ?? 0) - Int64(vm0[k] ?? 0)) }
        // Per 2M range, from the page flags: still a huge page, split, KSM pages in it.
        var stillHuge = 0, splitUnits = 0, hugeWithNothingToMerge = 0, ksmInHuge = 0, zeroMapped = 0
        var unmergedRanges: [Int] = []
        for u in 0..<units {
            let c = try PageFlags.census(region.base + u * huge, length: huge)
            let mergeable = (u * perHuge..<(u + 1) * perHuge).filter { layout.merges(page: $0) }.count
            zeroMapped += c.zeroPage
            if c.thp == perHuge {
                stillHuge += 1
                ksmInHuge += c.ksm
                if mergeable == 0 { hugeWithNothingToMerge += 1 }
            } else {
                splitUnits += 1
            }
            if mergeable > 0 && c.ksm + c.zeroPage < mergeable / 2 { unmergedRanges.append(u) }
        }

        ctx.record("merge_time", merge.mergeTime, .s, better: .lower)
        ctx.record("anon_huge_bytes_after", hugeAfter, .bytes, better: .none)
        ctx.record("huge_pages_to_split", Double(toSplit), .count, better: .none)
        ctx.record("thp_split_page", delta("thp_split_page"), .count, better: .none)
        ctx.record("thp_split_page_failed", delta("thp_split_page_failed"), .count, better: .lower)
        ctx.record("thp_split_pmd", delta("thp_split_pmd"), .count, better: .none)
        ctx.record("merging_pages", Double(stat.mergingPages), .pages, better: .none)
        ctx.record("pages_shared", Double(global.pagesShared - merge.baseline.pagesShared), .pages, better: .none)
        ctx.record("pages_sharing", Double(global.pagesSharing - merge.baseline.pagesSharing), .pages, better: .none)
        ctx.record("saved_bytes", Double((global.pagesSharing - merge.baseline.pagesSharing + stat.zeroPages) * Int64(pageSize)), .bytes, better: .higher)
        // What the split cost in THP coverage: bytes no longer huge per byte saved.
        ctx.record("huge_bytes_lost", hugeBefore - hugeAfter, .bytes, better: .lower)

        ctx.record("huge_pages_split", Double(splitUnits), .count, better: .none)
        ctx.check("anon_huge_bytes_before", expected: Double(region.length), observed: hugeBefore, tolerance: Double(huge),
                  describe: "the whole region THP-backed before merging, within one 2M page")
        ctx.check("huge_pages_kept", expected: Double(units - toSplit), observed: Double(hugeWithNothingToMerge), tolerance: 0,
                  describe: "every 2M range without a page to merge is still a huge page (kpageflags THP on all its pages)")
        ctx.check("ksm_pages_in_huge_pages", expected: 0, observed: Double(ksmInHuge), tolerance: 0,
                  describe: "no KSM page inside a range still mapped huge: KSM merges only split (4K) pages")
        ctx.check("anon_huge_bytes_after", expected: Double(stillHuge * huge), observed: hugeAfter, tolerance: 0,
                  describe: "smaps AnonHugePages = ranges still huge by kpageflags × 2M")
        // vmstat is machine-wide: another process's splits count too, never fewer.
        ctx.check("thp_split_page", expected: Double(splitUnits), observed: delta("thp_split_page"),
                  accepted: Double(splitUnits)...(Double(splitUnits) + max(2, Double(splitUnits) * 0.05)),
                  describe: "vmstat thp_split_page rose by the ranges no longer huge (+max(2, 5%): vmstat is machine-wide)")
        ctx.record("zero_page_mapped", Double(zeroMapped), .pages, better: .none)
        // Since 6.12 a split maps zero-filled subpages to the shared zero page (mm/huge_memory.c,
        // the underused-THP work), so those never reach KSM: count them with the merged pages.
        ctx.check("merged_or_zero_mapped", expected: Double(expect.mergingPages), observed: Double(stat.mergingPages + Int64(zeroMapped)),
                  tolerance: max(2.0, Double(expect.mergingPages) * 0.01),
                  describe: "every page with a copy is merged (ksm_merging_pages) or mapped to the shared zero page by the split (kpageflags ZERO_PAGE), max(2 pages, 1%)")
        ctx.note("thp: \(units) huge pages of \(huge / 1024)K, \(toSplit) holding pages to merge; \(splitUnits) split, \(stillHuge) still huge")
        if !unmergedRanges.isEmpty {
            ctx.note("2M ranges holding pages to merge where fewer than half merged: \(unmergedRanges.map(String.init).joined(separator: ", ")) (range index from the region's start)")
        }
    }
}
