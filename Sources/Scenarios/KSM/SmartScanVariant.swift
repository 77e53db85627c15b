import LabKit
import LinuxMM

/// ksm:smart-scan — smart scan (6.7+) lets ksmd skip pages that did not merge on earlier
/// scans, more often the longer they stay unmerged. The figures are the kernel's own:
/// pages_skipped and pages_scanned per full scan, and the time a full scan takes.
extension KSMScenario {
    /// The kernel's skip rule for one page that never merges (mm/ksm.c,
    /// should_skip_rmap_item and skip_age): on each visit its age (the visits before) goes
    /// up; below age 3 it is scanned; after that, each time its allowance of skips is used up
    /// it is scanned once and given a new allowance — 1 up to age 3, 2 up to 5, 4 up to 8,
    /// then 8. Returns, for visits 1...n, how many of them were skipped.
    static func smartScanSkips(visits n: Int) -> Int {
        var age = 0, remaining = 0, skipped = 0
        for _ in 0..<max(n, 0) {
            let a = age
            if age < 255 { age += 1 }
            if a < 3 { continue }
            if remaining == 0 {
                remaining = a <= 3 ? 1 : a <= 5 ? 2 : a <= 8 ? 4 : 8
                continue
            }
            remaining -= 1
            skipped += 1
        }
        return skipped
    }

    func runSmartScan(_ ctx: RunContext, _ p: Values) throws {
        try requireSoleKSMUser("pages_scanned and pages_skipped")
        let pageSize = System.pageSize
        let layout = layout(p)
        let maxSharing = Int((try? KSM.Knobs.maxPageSharing.read()) ?? "256") ?? 256
        let expect = layout.expectation(useZeroPages: p.useZeroPages, maxPageSharing: maxSharing)
        let region = try AnonymousMapping(length: layout.pages * pageSize, kind: .base)
        layout.fill(region.base, pageSize: pageSize, seed: 0x736D_6172_7453 &+ UInt64(ctx.repetition))
        let merge = try mergeAndWait(region: region, layout: layout, prctlMode: false, variant: .smartScan, p, ctx: ctx)

        // Count from a scan boundary: wait for full_scans to move, then take the counters.
        let scans = try CounterFile(path: "\(KSM.directory)/full_scans")
        let timeout = p.timeoutS
        var t = Clock.nanoseconds()
        let first = try scans.read()
        while try scans.read() == first {
            if Clock.seconds(since: t) > timeout { throw ScenarioError.failed("ksmd finished no full scan within timeout_s=\(timeout) s") }
            Clock.sleep(nanoseconds: 200_000)
        }
        let ksmd = KSM.ksmdPID()
        let c0 = try KSM.counters()
        let cpu0 = ksmd.flatMap { TaskCPU.seconds(pid: $0) }
        t = Clock.nanoseconds()
        while try scans.read() < c0.fullScans + Int64(p.observeScans) {
            if Clock.seconds(since: t) > timeout {
                throw ScenarioError.failed("ksmd finished \((try? scans.read()).map { $0 - c0.fullScans } ?? 0) of observe_scans=\(p.observeScans) full scans within timeout_s=\(timeout) s; raise pages_to_scan or timeout_s")
            }
            Clock.sleep(nanoseconds: 200_000)
        }
        let c1 = try KSM.counters()
        let seconds = Clock.seconds(since: t)
        let cpu1 = ksmd.flatMap { TaskCPU.seconds(pid: $0) }
        let n = Double(c1.fullScans - c0.fullScans)
        let skipped = Double(c1.pagesSkipped - c0.pagesSkipped)
        let scanned = Double(c1.pagesScanned - c0.pagesScanned)
        let stat = try KSMStat.read()

        ctx.record("merge_time", merge.mergeTime, .s, better: .lower)
        ctx.record("merging_pages", Double(stat.mergingPages), .pages, better: .none)
        ctx.record("observed_scans", n, .count, better: .none)
        ctx.record("pages_skipped", skipped, .pages, better: .none)
        ctx.record("pages_scanned", scanned, .pages, better: .none)
        ctx.record("pages_skipped_per_scan", skipped / n, .pages, better: .none)
        ctx.record("pages_scanned_per_scan", scanned / n, .pages, better: .lower)
        if skipped + scanned > 0 { ctx.record("skipped_fraction", skipped / (skipped + scanned), .ratio, better: .none) }
        ctx.record("full_scan_time", seconds / n, .s, better: .lower)
        if let a = cpu0, let b = cpu1 { ctx.record("ksmd_cpu_per_scan", (b - a) / n, .s, better: .lower) }
        else { ctx.note("ksmd thread not found in /proc: ksmd_cpu_per_scan not measured") }

        // Every page of the region is visited once per full scan: scanned or skipped. The
        // window starts and ends within one batch of a scan boundary.
        let slack = 2 * Double(p.pagesToScan) + Double(layout.pages) * n * 0.01
        ctx.check("pages_visited", expected: Double(layout.pages) * n, observed: scanned + skipped, tolerance: slack,
                  describe: "pages_scanned + pages_skipped = region pages × full scans, ± two batches (pages_to_scan) and 1%")
        ctx.check("merging_pages", expected: Double(expect.mergingPages), observed: Double(stat.mergingPages),
                  tolerance: max(2.0, Double(expect.mergingPages) * 0.01), describe: "max(2 pages, 1%); smart scan never skips a KSM page")
        if !p.smartScan {
            ctx.check("pages_skipped", expected: 0, observed: skipped, tolerance: 0, describe: "exactly 0 with smart_scan=0")
        } else {
            // Pages that never merge follow the skip rule from the scan they were first seen
            // in; that scan is known to ±1 (a new mm joins the list behind the cursor).
            let unmerged = layout.pages - expect.mergingPages
            let before = Int(c0.fullScans - merge.startScans)
            let window = Int(n)
            let candidates = (-1...1).map { d -> Double in
                let k = max(before + d, 0)
                return Double(unmerged * (KSMScenario.smartScanSkips(visits: k + window) - KSMScenario.smartScanSkips(visits: k)))
            }
            let lo = candidates.min()!, hi = candidates.max()!
            let expected = candidates[1]
            ctx.check("pages_skipped", expected: expected, observed: skipped,
                      accepted: max(0, lo - slack)...(hi + slack),
                      describe: "the kernel's skip rule (ages 3/5/8: 1/2/4/8 skips) for \(unmerged) never-merging pages over scans \(before + 1)...\(before + window) (±1 scan, ± two batches and 1%)")
        }
        ctx.note("smart-scan: \(layout.pages) pages, \(expect.mergingPages) merge; counted over \(Int(n)) full scans after merging; smart_scan=\(p.smartScan ? 1 : 0)")
    }
}
