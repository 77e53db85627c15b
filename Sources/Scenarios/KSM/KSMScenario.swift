#if canImport(Glibc)
import Glibc
#endif
import Histogram
import LabKit
import LinuxMM

/// KSM: how fast ksmd merges a region with a known amount of duplication, what it saves,
/// what it costs (ksmd CPU), what a write to a merged page costs (copy-on-write), and how
/// long unmerging takes. Every figure is checked against the layout that was written.
public struct KSMScenario: TypedScenario {
    public init() {}
    public let id = "ksm"
    public let summary = "Kernel same-page merging: merge time and savings, ksmd CPU, COW fault and unmerge cost"

    public enum Variant: String, ScenarioVariant {
        case merge, cow, unmerge
        case smartScan = "smart-scan"
        case advisor
        case thp
        case numaMerge = "numa-merge"
        case chains
        public var summary: String {
            switch self {
            case .merge: return "mark a region with known duplicates mergeable; time ksmd until it is merged; savings and ksmd CPU"
            case .cow: return "write to merged pages: copy-on-write fault latency against unmerged and freshly faulted pages"
            case .unmerge: return "MADV_UNMERGEABLE (or PR_SET_MEMORY_MERGE 0) on a merged region: time to break every merge"
            case .smartScan: return "smart_scan on or off: pages ksmd skipped (pages_skipped) and scanned per full scan, full-scan time, against the kernel's skip rule"
            case .advisor: return "advisor_mode=scan-time: the pages_to_scan the advisor picks after each full scan against its target scan time, within its CPU bounds"
            case .thp: return "KSM on a THP-backed region: the THP splits merging causes (thp_split_page, AnonHugePages before/after), as ksm_tests -H"
            case .numaMerge: return "identical pages on two NUMA nodes under merge_across_nodes 0 or 1: pages_shared doubles with 0 (needs two nodes)"
            case .chains: return "more sharers of one content than max_page_sharing: stable node chains and dups, KSM pages per content"
            }
        }
    }

    /// How the region opts in to merging.
    public enum MergeMode: String, CaseIterable, ParameterChoice { case madvise, prctl }

    public struct Parameters: ParameterSet {
        public init() {}
        let pages = Parameter<Int>("pages", 16...4_194_304, default: 8192, unit: .pages, help: "size of the region in base pages")
        let duplicateRatio = Parameter<Double>("duplicate_ratio", 0...1, default: 0.5, unit: .ratio, help: "fraction of pages that are copies of a template page")
        let zeroRatio = Parameter<Double>("zero_ratio", 0...1, default: 0.1, unit: .ratio, help: "fraction of pages that are zero-filled")
        let duplicateGroups = Parameter<Int>("duplicate_groups", 1...65536, default: 16, unit: .count, help: "number of distinct template pages the duplicates copy")
        let mode = Parameter<MergeMode>("mode", default: .madvise, help: "madvise: MADV_MERGEABLE on the region; prctl: PR_SET_MEMORY_MERGE for the whole process")
        let pagesToScan = Parameter<Int>("pages_to_scan", 1...100_000, default: 4000, unit: .pages, help: "ksmd pages per wake-up (borrowed: /sys/kernel/mm/ksm/pages_to_scan)")
        let sleepMillisecs = Parameter<Int>("sleep_millisecs", 0...10_000, default: 10, unit: .ms, help: "ksmd sleep between wake-ups (borrowed: sleep_millisecs)")
        let useZeroPages = Parameter<Bool>("use_zero_pages", default: false, help: "merge zero pages with the kernel's zero page (borrowed: use_zero_pages)")
        let timeoutS = Parameter<Double>("timeout_s", 1...3600, default: 60, unit: .s, help: "give up when ksmd has not finished merging after this long")
        let sampleIntervalMs = Parameter<Int>("sample_interval_ms", 1...10_000, default: 20, unit: .ms, help: "interval of the pages_sharing time series")
        let smartScan = Parameter<Bool>("smart_scan", default: true, help: "smart-scan, thp: skip pages that did not merge in earlier scans (borrowed: smart_scan)")
        let observeScans = Parameter<Int>("observe_scans", 1...1000, default: 20, unit: .count, help: "smart-scan: full scans counted after the region is merged")
        let targetScanTime = Parameter<Int>("target_scan_time", 1...3600, default: 2, unit: .s, help: "advisor: seconds one full scan should take (borrowed: advisor_target_scan_time)")
        let advisorMaxCPU = Parameter<Int>("advisor_max_cpu", 10...100, default: 70, unit: .percent, help: "advisor: most ksmd CPU the advisor may plan for (borrowed: advisor_max_cpu)")
        let durationS = Parameter<Double>("duration_s", 1...600, default: 10, unit: .s, help: "advisor: how long the advisor is watched")
        let mergeAcrossNodes = Parameter<Bool>("merge_across_nodes", default: false, help: "numa-merge: merge pages of different NUMA nodes (borrowed: merge_across_nodes; changed with every page unmerged first)")
        let maxPageSharing = Parameter<Int>("max_page_sharing", 2...65_536, default: 32, unit: .count, help: "chains: most mappings of one KSM page before a new copy starts a chain (borrowed: max_page_sharing; changed with every page unmerged first)")
    }

    public func probe(_ variant: Variant) -> Availability {
        guard KSM.isAvailable else {
            return .unusable("KSM is not available: /sys/kernel/mm/ksm is missing (kernel built without CONFIG_KSM)")
        }
        guard ProcFile.exists("/proc/self/ksm_stat") else {
            return .unusable("/proc/PID/ksm_stat is missing (kernel older than 6.1): memlab needs per-process KSM figures")
        }
        return probeMechanism(variant)
    }

    public func validate(_ variant: Variant, _ p: Values) throws(UsageError) {
        try validateMechanism(variant, p)
        if p.duplicateRatio + p.zeroRatio > 1 {
            throw UsageError("duplicate_ratio + zero_ratio must not exceed 1 (got \(p.duplicateRatio) + \(p.zeroRatio))")
        }
        if variant == .cow || variant == .unmerge {
            let layout = layout(p)
            if layout.expectation(useZeroPages: p.useZeroPages, maxPageSharing: 256).mergingPages == 0 {
                throw UsageError("the \(variant.rawValue) variant needs pages that merge: raise duplicate_ratio or zero_ratio")
            }
        }
    }

    public func settings(_ variant: Variant, _ p: Values) -> [KnobSetting] {
        if let s = mechanismSettings(variant, p) { return s }
        return [
            KnobSetting(KSM.Knobs.pagesToScan, String(p.pagesToScan)),
            KnobSetting(KSM.Knobs.sleepMillisecs, String(p.sleepMillisecs)),
            KnobSetting(KSM.Knobs.useZeroPages, p.useZeroPages ? "1" : "0"),
            KnobSetting(KSM.Knobs.run, "1"),
        ]
    }

    public func deadline(_ variant: Variant, _ p: Values) -> Double {
        variant == .advisor ? p.durationS + p.timeoutS + 60 : p.timeoutS + 60
    }

    func layout(_ p: Values) -> KSMLayout {
        KSMLayout(pages: p.pages, duplicateRatio: p.duplicateRatio, zeroRatio: p.zeroRatio, groups: p.duplicateGroups)
    }

    public func run(_ ctx: RunContext, _ variant: Variant, _ p: Values) throws {
        switch variant {
        case .merge, .cow, .unmerge: break
        case .smartScan: return try runSmartScan(ctx, p)
        case .advisor: return try runAdvisor(ctx, p)
        case .thp: return try runTHP(ctx, p)
        case .numaMerge: return try runNUMAMerge(ctx, p)
        case .chains: return try runChains(ctx, p)
        }
        let pageSize = System.pageSize
        let layout = layout(p)
        let useZero = p.useZeroPages
        let prctlMode = p.mode == .prctl
        let maxSharing = Int((try? KSM.Knobs.maxPageSharing.read()) ?? "256") ?? 256
        let expect = layout.expectation(useZeroPages: useZero, maxPageSharing: maxSharing)

        let region = try AnonymousMapping(length: layout.pages * pageSize, kind: .base)
        layout.fill(region.base, pageSize: pageSize, seed: 0x6D65_6D6C_6162 &+ UInt64(ctx.repetition))

        let merge = try mergeAndWait(region: region, layout: layout, prctlMode: prctlMode, variant: variant, p, ctx: ctx)
        let stat = try processStat([region], useZeroPages: useZero, ctx: ctx)
        let global = try KSM.counters()
        let sharingDelta = global.pagesSharing - merge.baseline.pagesSharing
        let sharedDelta = global.pagesShared - merge.baseline.pagesShared

        if variant == .merge {
            ctx.record("merge_time", merge.mergeTime, .s, better: .lower)
            ctx.record("merging_pages", Double(stat.mergingPages), .pages, better: .none)
            ctx.record("pages_shared", Double(sharedDelta), .pages, better: .none)
            ctx.record("pages_sharing", Double(sharingDelta), .pages, better: .none)
            ctx.record("ksm_zero_pages", Double(stat.zeroPages), .pages, better: .none)
            ctx.record("saved_bytes", Double((sharingDelta + stat.zeroPages) * Int64(pageSize)), .bytes, better: .higher)
            // Recorded only where the kernel reports it: a 0 it never said is not a figure.
            if stat.hasProcessProfit { ctx.record("process_profit", Double(stat.processProfit), .bytes, better: .higher) }
            let merged = Double(stat.mergingPages + stat.zeroPages)
            if merge.mergeTime > 0 { ctx.record("merge_rate", merged / merge.mergeTime, .pagesPerSecond, better: .higher) }
            if let cpu = merge.ksmdCPU { ctx.record("ksmd_cpu_time", cpu, .s, better: .lower) }
            ctx.record("full_scans", Double(merge.fullScans), .count, better: .none)
        }

        // The physics check: what the kernel says against what was written.
        let tol = max(2.0, Double(expect.mergingPages) * 0.01)
        if prctlMode {
            // PR_SET_MEMORY_MERGE makes every anonymous page of the process mergeable (heap,
            // stacks), so the kernel may find more than the region holds, never fewer.
            ctx.check("merging_pages", expected: Double(expect.mergingPages), observed: Double(stat.mergingPages),
                      accepted: (Double(expect.mergingPages) - tol)...Double(Int.max),
                      describe: "at least expected - max(2, 1%): prctl merges the whole process")
        } else {
            ctx.check("merging_pages", expected: Double(expect.mergingPages), observed: Double(stat.mergingPages),
                      tolerance: tol, describe: "max(2 pages, 1%)")
            let tolSharing = max(2.0, Double(expect.pagesSharing) * 0.01)
            ctx.check("pages_sharing", expected: Double(expect.pagesSharing), observed: Double(sharingDelta),
                      tolerance: tolSharing, describe: "max(2 pages, 1%); global counter, shared with any other KSM user")
            ctx.check("pages_shared", expected: Double(expect.pagesShared), observed: Double(sharedDelta),
                      tolerance: max(1.0, Double(expect.pagesShared) * 0.05),
                      describe: "max(1 page, 5%): one KSM page per duplicate group, per max_page_sharing sharers")
        }
        if !prctlMode {
            // An independent witness: frames of this region flagged KPF_KSM right now.
            let census = try PageFlags.census(region.base, length: region.length)
            ctx.check("region_ksm_pages", expected: Double(expect.mergingPages), observed: Double(census.ksm),
                      tolerance: tol, describe: "max(2 pages, 1%); pagemap + kpageflags KPF_KSM")
        }
        if useZero {
            ctx.check("ksm_zero_pages", expected: Double(expect.zeroPages), observed: Double(stat.zeroPages),
                      tolerance: max(2.0, Double(expect.zeroPages) * 0.01), describe: "max(2 pages, 1%)")
        }

        switch variant {
        case .cow: try measureCOW(region: region, layout: layout, useZero: useZero, ctx: ctx)
        case .unmerge: try measureUnmerge(region: region, prctlMode: prctlMode, mergedBefore: stat.mergingPages + stat.zeroPages, ctx: ctx)
        default: break
        }
        if prctlMode { try? KSM.setProcessMerge(false) }
    }

    /// This process's KSM figures (ksm_stat). A kernel before 6.4 has no ksm_merging_pages
    /// there: then the merged (and, with use_zero_pages, zero) pages are the regions' frames
    /// flagged KPF_KSM (or the zero page's), from pagemap + kpageflags, and a note says so.
    func processStat(_ regions: [AnonymousMapping], useZeroPages: Bool, ctx: RunContext) throws -> KSMStat {
        var stat = try KSMStat.read()
        guard !stat.hasMergingPages else { return stat }
        var ksm = 0, zero = 0
        for m in regions {
            let c = try PageFlags.census(m.base, length: m.length)
            ksm += c.ksm
            zero += c.zeroPage
        }
        stat.mergingPages = Int64(ksm)
        if useZeroPages { stat.zeroPages = Int64(zero) }
        ctx.note("this kernel's /proc/self/ksm_stat has no ksm_merging_pages (before 6.4): the regions' merged pages are counted from pagemap + kpageflags (KPF_KSM\(useZeroPages ? ", and the zero page" : ""))")
        return stat
    }

    struct MergeOutcome {
        let mergeTime: Double
        let ksmdCPU: Double?
        let fullScans: Int64
        let baseline: KSM.Counters
        /// full_scans when the region was marked mergeable.
        let startScans: Int64
    }

    /// Marks the region mergeable and waits for ksmd the way the kernel's KSM selftests do —
    /// on `full_scans` — until this process's merged count has not changed for two full scans
    /// (and at least three scans have passed: a page is merged on its second visit and a newly
    /// registered mm joins the scan list behind the cursor).
    func mergeAndWait(region: AnonymousMapping, layout: KSMLayout, prctlMode: Bool, variant: Variant, _ p: Values, ctx: RunContext,
                      alsoMergeable more: [AnonymousMapping] = [], atLeast: Int64 = 0, failOnTimeout: Bool = true) throws -> MergeOutcome {
        // This process's merged pages: ksm_stat where the kernel has it (6.4+; ksm_zero_pages
        // later), else the regions' KPF_KSM (and zero-page) frames, read less often.
        let stat = (try? ProcFile.read("/proc/self/ksm_stat")) ?? ""
        let hasMerging = stat.contains("ksm_merging_pages"), hasZero = stat.contains("ksm_zero_pages")
        let merging = hasMerging ? try CounterFile(path: "/proc/self/ksm_stat", key: "ksm_merging_pages") : nil
        let zero = hasZero ? try CounterFile(path: "/proc/self/ksm_stat", key: "ksm_zero_pages") : nil
        func merged() throws -> Int64 {
            if let merging { return try merging.read() + (zero?.read() ?? 0) }
            var n = 0
            for m in [region] + more {
                let c = try PageFlags.census(m.base, length: m.length)
                n += c.ksm + (p.useZeroPages ? c.zeroPage : 0)
            }
            return Int64(n)
        }
        let scans = try CounterFile(path: "\(KSM.directory)/full_scans")
        var probes: [Sampler.Probe] = [.init("pages_sharing", .pages, try CounterFile(path: "\(KSM.directory)/pages_sharing"))]
        if hasMerging { probes.append(.init("ksm_merging_pages", .pages, try CounterFile(path: "/proc/self/ksm_stat", key: "ksm_merging_pages"))) }
        let sampler = Sampler(interval: Double(p.sampleIntervalMs) / 1000, probes: probes)
        let baseline = try settledCounters(scans: scans, timeout: p.timeoutS, sleepMillisecs: p.sleepMillisecs, ctx: ctx)
        let ksmd = KSM.ksmdPID()
        let cpuBefore = ksmd.flatMap { TaskCPU.seconds(pid: $0) }
        let timeout = p.timeoutS

        try sampler.start()
        let t0 = Clock.nanoseconds()
        if prctlMode {
            do { try KSM.setProcessMerge(true) } catch {
                _ = sampler.stop()
                if error.errno == EINVAL { throw ScenarioError.skipped("PR_SET_MEMORY_MERGE is not supported by this kernel (needs 6.4+); use mode=madvise") }
                throw error
            }
        } else {
            try KSM.setMergeable(region.base, length: region.length, true)
            for m in more { try KSM.setMergeable(m.base, length: m.length, true) }
        }
        let startScans = try scans.read()
        var last: Int64 = -1
        var lastChange = t0
        var scansAtChange = startScans
        var now = t0
        while true {
            let v = try merged()
            let s = try scans.read()
            now = Clock.nanoseconds()
            if v != last {
                last = v
                lastChange = now
                scansAtChange = s
            }
            if s >= scansAtChange + 2 && s >= startScans + 3 && v >= atLeast { break }
            if Double(now - t0) / 1e9 > timeout {
                if !failOnTimeout {
                    ctx.note("ksmd had merged \(last) pages (of at least \(atLeast) expected) after timeout_s=\(timeout) s and \(s - startScans) full scans; measured as it stands")
                    break
                }
                ctx.record(sampler.stop().first!)
                throw ScenarioError.failed("ksmd did not finish merging within timeout_s=\(timeout) s: \(last) pages merged so far, \(s - startScans) full scans; raise pages_to_scan or timeout_s")
            }
            Clock.sleep(nanoseconds: merging == nil ? 20_000_000 : 1_000_000)
        }
        let cpuAfter = ksmd.flatMap { TaskCPU.seconds(pid: $0) }
        for series in sampler.stop() where series.name == "pages_sharing" || variant == .merge {
            ctx.record(series)
        }
        let cpu: Double? = cpuBefore.flatMap { b in cpuAfter.map { $0 - b } }
        if ksmd == nil { ctx.note("ksmd thread not found in /proc: ksmd_cpu_time not measured") }
        return MergeOutcome(mergeTime: Double(lastChange - t0) / 1e9, ksmdCPU: cpu,
                            fullScans: (try scans.read()) - startScans, baseline: baseline, startScans: startScans)
    }

    /// The global counters to take deltas from, once ksmd has let go of the previous
    /// repetition: a process that exits leaves its merged pages counted in pages_shared and
    /// pages_sharing until ksmd next visits its mm and frees its rmap items. So wait until the
    /// counters hold still — for two full scans while ksmd is scanning, or for a while with no
    /// scan at all (ksmd sleeps once no mm is registered: nothing is left to let go of).
    func settledCounters(scans: CounterFile, timeout: Double, sleepMillisecs: Int, ctx: RunContext) throws -> KSM.Counters {
        let sleepMS = Double(sleepMillisecs)
        let idle = min(max(0.2, 5 * sleepMS / 1000), 2.0)
        let t0 = Clock.nanoseconds()
        var last = try KSM.counters()
        var lastScan = try scans.read()
        var scanAtChange = lastScan
        var progress = t0
        while true {
            Clock.sleep(nanoseconds: 2_000_000)
            let now = Clock.nanoseconds()
            let c = try KSM.counters(), sc = try scans.read()
            if c.pagesShared != last.pagesShared || c.pagesSharing != last.pagesSharing {
                last = c
                scanAtChange = sc
                progress = now
            }
            if sc != lastScan { lastScan = sc; progress = now }
            if sc >= scanAtChange + 2 || Double(now &- progress) / 1e9 >= idle { return c }
            if Double(now &- t0) / 1e9 > timeout {
                ctx.note("KSM's global counters did not settle within timeout_s before merging (another KSM user?): pages_shared and pages_sharing may count its pages too")
                return c
            }
        }
    }

    /// Times one write per page: to merged pages (each a copy-on-write fault), to unmerged
    /// private pages (no fault: the floor), and to fresh anonymous pages (a first-touch fault,
    /// on memory pre-warmed so the VM's lazy host backing is not mixed in).
    func measureCOW(region: AnonymousMapping, layout: KSMLayout, useZero: Bool, ctx: RunContext) throws {
        let pageSize = System.pageSize
        // Time exactly the pages the kernel says are mapped to a KSM page now (pagemap +
        // kpageflags), not the ones the layout hoped would merge; the unique pages are the
        // unmerged comparison.
        let census = try PageFlags.census(region.base, length: region.length, listKSM: true)
        let mergedPages = census.ksmPageIndices
        guard !mergedPages.isEmpty else { throw ScenarioError.failed("no page of the region is mapped to a KSM page: nothing to copy on write") }
        var uniquePages: [Int] = []
        for i in 0..<layout.pages where layout.role(ofPage: i) == .unique { uniquePages.append(i) }
        let cow = timeWrites(base: region.base, pages: mergedPages, pageSize: pageSize)
        record(cow, prefix: "cow_fault_latency", ctx)
        if !uniquePages.isEmpty {
            let plain = timeWrites(base: region.base, pages: uniquePages, pageSize: pageSize)
            ctx.record("unmerged_write_latency", plain.mean, .ns, better: .lower)
            if plain.mean > 0 { ctx.record("cow_fault_ratio", cow.mean / plain.mean, .ratio, better: .lower) }
        }
        // Pre-warm: fault the same amount once and unmap, so the timed faults reuse memory
        // the host has already backed.
        let n = mergedPages.count
        do {
            let warm = try AnonymousMapping(length: n * pageSize, kind: .base)
            warm.touch()
        }
        let fresh = try AnonymousMapping(length: n * pageSize, kind: .base)
        let freshTimes = timeWrites(base: fresh.base, pages: Array(0..<n), pageSize: pageSize)
        ctx.record("fresh_fault_latency", freshTimes.mean, .ns, better: .lower)
        ctx.record("cow_pages", Double(n), .pages, better: .none)
        ctx.note("cow: one timed byte write per page; fresh_fault_latency is on memory pre-warmed (touched and unmapped first)")
    }

    struct Timings {
        var mean: Double
        var histogram: Histogram<UInt64>
    }

    /// One clock read per page: the ~20 ns clock overhead is included in every figure alike.
    func timeWrites(base: UnsafeMutableRawPointer, pages: [Int], pageSize: Int) -> Timings {
        var h = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        let p = base.assumingMemoryBound(to: UInt8.self)
        var total: UInt64 = 0
        var before = Clock.nanoseconds()
        for i in pages {
            p[i * pageSize + 8] &+= 1
            let after = Clock.nanoseconds()
            let dt = after &- before
            total &+= dt
            _ = h.record(dt)
            before = after
        }
        return Timings(mean: pages.isEmpty ? 0 : Double(total) / Double(pages.count), histogram: h)
    }

    func record(_ t: Timings, prefix: String, _ ctx: RunContext) {
        ctx.record(prefix, t.mean, .ns, better: .lower)
        ctx.recordLatency(prefix, t.histogram)
    }

    func measureUnmerge(region: AnonymousMapping, prctlMode: Bool, mergedBefore: Int64, ctx: RunContext) throws {
        let t0 = Clock.nanoseconds()
        if prctlMode {
            try KSM.setProcessMerge(false)
        } else {
            try KSM.setMergeable(region.base, length: region.length, false)
        }
        let seconds = Clock.seconds(since: t0)
        ctx.record("unmerge_time", seconds, .s, better: .lower)
        if seconds > 0 { ctx.record("unmerge_rate", Double(mergedBefore) / seconds, .pagesPerSecond, better: .higher) }
        ctx.record("unmerged_pages", Double(mergedBefore), .pages, better: .none)
        // Right after the call, no page of the region may still map a KSM page: read each
        // page's frame flags (pagemap + kpageflags) rather than ksm_stat, whose count ksmd
        // only lowers on its next pass.
        let census = try PageFlags.census(region.base, length: region.length)
        ctx.check("region_ksm_pages_after_unmerge", expected: 0, observed: Double(census.ksm),
                  tolerance: 0, describe: "exactly 0 (pagemap + kpageflags KPF_KSM)")
    }
}
