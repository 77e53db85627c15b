#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM
import Synchronization
import Workloads

extension ReclaimScenario {
    /// DAMON-based proactive reclaim: a workload with a hot part (touched all the time) and a
    /// cold part (touched once). The hot part's access rate is measured first without DAMON,
    /// then with a kdamond (added by the runner through the guard) monitoring this process
    /// (vaddr) and a DAMOS scheme paging out regions not accessed for `min_age_s`. Memory given
    /// back (RSS, VmSwap, pagemap) against the slowdown, with DAMOS's own statistics.
    func runDamon(_ ctx: RunContext, _ p: Values, cgroup cg: MemoryCgroup) throws {
        let page = System.pageSize
        let configured = Damon.configured()
        // The one kdamond the runner added: idle, and unconfigured or configured by an earlier
        // repetition of this run (configure rebuilds its context from nr_contexts down).
        guard configured.count == 1, configured[0].state == "off", configured[0].operations.allSatisfy({ $0 == "vaddr" }) else {
            let seen = configured.map { "kdamond \($0.index) \($0.state) \($0.operations.joined(separator: "/"))" }.joined(separator: "; ")
            throw ScenarioError.failed("expected the one idle kdamond the runner added; DAMON shows \(seen.isEmpty ? "none" : seen)")
        }
        let kd = Damon.Kdamond(index: configured[0].index)
        let seed = 0x6461_6d6f &+ UInt64(ctx.repetition)
        // Mapped first, so that (mmap going down) it lies beside the hot part, not the cold one:
        // a DAMON region spanning it and the cold part would look accessed.
        let scratch = try AnonymousMapping(length: HotLoop.scratchPages * page, kind: .base)
        let hot = try ReclaimScenario.filledRegion(pages: p.hotPages, pattern: p.pattern, seed: seed)
        let cold = try ReclaimScenario.filledRegion(pages: p.coldPages, pattern: p.pattern, seed: seed &+ 1)
        let loop = HotLoop(base: hot.base, pages: p.hotPages, flushEveryNs: UInt64(p.aggrMs) * 500_000, scratch: scratch)
        let thread = try OSThread { loop.run() }
        defer { loop.stop(); thread.join() }

        func status() -> (rss: Double, swap: Double) {
            let s = (try? SmapsRollup.read()) ?? SmapsRollup(text: "")
            return (Double(s.rss), Double(s["Swap"] ?? 0))
        }
        // Baseline: the hot part's access rate with no DAMON.
        let b0 = loop.passes, tb = Clock.nanoseconds()
        Clock.sleep(nanoseconds: UInt64(p.baselineS * 1e9))
        let baselineRate = Double(loop.passes - b0) * Double(p.hotPages) / Clock.seconds(since: tb)
        let before = status()

        var scheme = Damon.PageoutScheme(pid: getpid(), sampleUS: p.sampleMs * 1000, aggrUS: p.aggrMs * 1000,
                                         updateUS: max(p.aggrMs * 1000, 1_000_000), maxAccesses: 0,
                                         minAge: max(1, Int((p.minAgeS * 1000 / Double(p.aggrMs)).rounded())))
        scheme.minSize = page
        do {
            try kd.configure(scheme)
            try kd.setState("on")
        } catch {
            throw ScenarioError.failed("configuring DAMON (\(kd.directory)): \(error)")
        }
        defer { if kd.state == "on" { try? kd.setState("off") } }
        let kdamondPID = kd.pid
        let cpu0 = kdamondPID.flatMap { try? ProcStat.read(pid: $0).cpuSeconds }

        var t: [Double] = [], rssSeries: [Double] = [], rateSeries: [Double] = []
        let d0 = loop.passes, td = Clock.nanoseconds()
        var lastPasses = d0, lastT = td
        while Clock.seconds(since: td) < p.durationS {
            Clock.sleep(nanoseconds: 250_000_000)
            let now = Clock.nanoseconds(), n = loop.passes
            t.append(Clock.seconds(since: td))
            rssSeries.append(status().rss)
            rateSeries.append(Double(n - lastPasses) * Double(p.hotPages) / (Double(now - lastT) / 1e9))
            lastPasses = n; lastT = now
        }
        let damonRate = Double(loop.passes - d0) * Double(p.hotPages) / Clock.seconds(since: td)
        let stats: Damon.SchemeStats?
        do { stats = try kd.schemeStats() } catch { throw ScenarioError.failed("reading DAMOS stats: \(error)") }
        let cpu1 = kdamondPID.flatMap { try? ProcStat.read(pid: $0).cpuSeconds }
        try? kd.setState("off")
        ReclaimScenario.waitForWriteback()
        let after = status()
        let coldSwapped = Double(try PageFlags.residency(cold.base, length: cold.length).swapped)
        let hotSwapped = Double(try PageFlags.residency(hot.base, length: hot.length).swapped)

        ctx.record("hot_bytes", Double(hot.length), .bytes, better: .none)
        ctx.record("cold_bytes", Double(cold.length), .bytes, better: .none)
        ctx.record("rss_before", before.rss, .bytes, better: .none)
        ctx.record("rss_after", after.rss, .bytes, better: .none)
        ctx.record("memory_given_back", before.rss - after.rss, .bytes, better: .higher)
        ctx.record("swap_growth", after.swap - before.swap, .bytes, better: .none)
        ctx.record("cold_swapped_pages", coldSwapped, .pages, better: .higher)
        ctx.record("hot_swapped_pages", hotSwapped, .pages, better: .lower)
        ctx.record("hot_access_rate_baseline", baselineRate, .pagesPerSecond, better: .higher)
        ctx.record("hot_access_rate_damon", damonRate, .pagesPerSecond, better: .higher)
        if baselineRate > 0 { ctx.record("slowdown", 1 - damonRate / baselineRate, .ratio, better: .lower) }
        if let a = cpu0, let b = cpu1 { ctx.record("kdamond_cpu_time", b - a, .s, better: .lower) }
        if let s = stats {
            ctx.record("damos_nr_tried", Double(s.nrTried), .count, better: .none)
            ctx.record("damos_sz_tried", Double(s.szTried), .bytes, better: .none)
            ctx.record("damos_nr_applied", Double(s.nrApplied), .count, better: .none)
            ctx.record("damos_sz_applied", Double(s.szApplied), .bytes, better: .none)
            ctx.record("damos_qt_exceeds", Double(s.qtExceeds), .count, better: .none)
            // Nothing else reclaims here (a 1 GiB cgroup, zswap off), so every page swapped out
            // lay in a region DAMOS tried; sz_tried adds a region's size each time it matched.
            // sz_applied is not held to that: it counts a region only when its madvise
            // succeeded, and was seen at 0 with the cold part paged out (6.12) — likely a region
            // spanning an unmapped gap (madvise's ENOMEM, its mapped pages paged out all the same).
            let out = (coldSwapped + hotSwapped) * Double(page)
            ctx.check("damos_sz_tried", expected: out, observed: Double(s.szTried), accepted: out...Double.greatestFiniteMagnitude,
                      describe: "every page paged out lay in a region DAMOS tried (sz_tried >= bytes swapped out)")
            if s.szApplied == 0 && coldSwapped > 0 {
                ctx.note("DAMOS reported sz_applied 0 although \(Int(coldSwapped)) cold pages were paged out: vaddr pageout counts a region as applied only when madvise succeeded on all of it (a region spanning an unmapped gap gets ENOMEM, its mapped pages paged out all the same)")
            }
        } else {
            ctx.note("DAMOS stats could not be read from \(kd.statsDirectory)")
        }
        ctx.record(TimeSeries(name: "rss", unit: .bytes, intervalS: 0.25, t: t, values: rssSeries))
        ctx.record(TimeSeries(name: "hot_access_rate", unit: .pagesPerSecond, intervalS: 0.25, t: t, values: rateSeries))

        ctx.check("cold_paged_out", expected: Double(p.coldPages), observed: coldSwapped, accepted: Double(p.coldPages) * 0.9...Double(p.coldPages),
                  describe: "DAMOS paged out the cold part (pagemap swap bit on >= 90% of its pages)")
        ctx.check("hot_kept", expected: 0, observed: hotSwapped, accepted: 0...Double(p.hotPages) * 0.1,
                  describe: "the hot part stays resident (<= 10% of its pages swapped)")
        ctx.check("memory_given_back", expected: after.swap - before.swap, observed: before.rss - after.rss,
                  tolerance: max(256 * Double(page), (after.swap - before.swap) * 0.1),
                  describe: "RSS fell by what went to swap (smaps_rollup Rss vs Swap; zswap off), 10% (or 1 MiB)")
        if loop.failedFlushes > 0 {
            ctx.note("the hot loop's TLB flush (MADV_DONTNEED of its scratch region) failed \(loop.failedFlushes) times: DAMON may have seen the hot part less often than it was read")
        }
        let intact = ReclaimScenario.intactPages(cold, pattern: p.pattern, seed: seed &+ 1)
        ctx.check("pages_intact", expected: Double(p.coldPages), observed: Double(intact), tolerance: 0, describe: "exact: cold contents after read-back")
        ctx.note("damon: kdamond \(kd.directory), vaddr on the repetition's own process, sample \(p.sampleMs) ms, aggregation \(p.aggrMs) ms; DAMOS pageout of regions with 0 accesses for >= \(scheme.minAge) aggregation intervals (\(p.minAgeS) s); hot part read page by page in a loop that flushes its TLB every \(formatNumber(Double(p.aggrMs) / 2)) ms (half an aggregation interval: an access reaches DAMON only through a page-table walk), cold part touched once; memory cgroup v\(cg.version)")
    }
}

/// The hot part of the DAMON workload: a thread reading one byte of every page in turn,
/// counting passes, until stopped. The region outlives the thread (joined before it is
/// unmapped); the counters are atomics.
///
/// DAMON sees an access only as a page-table accessed bit, which it clears without a TLB
/// flush; the CPU sets it again only when it walks the page table, on a TLB miss. A loop over
/// a set the TLB holds never misses: QEMU's TCG grows its software TLB to hold all 2,048 hot
/// pages and keeps them until a flush, so the hot part looked unaccessed for seconds and was
/// paged out (2 of 6 repetitions of 30 s in a 6.12 guest, 2026-12-03). So every
/// `flushEveryNs` the loop touches a 64-page scratch region and zaps it with MADV_DONTNEED:
/// 64 PTEs zapped is above x86's tlb_single_page_flush_ceiling (33, a debugfs knob), so the
/// kernel flushes this mm's whole TLB (TCG drops the vCPU's software TLB), the next pass walks
/// the page tables, and each DAMON aggregation interval sees the hot part accessed at least
/// once — enough for a "0 accesses" scheme, not a true access frequency. The cost, 64 page
/// faults (1.24 µs each on this machine's host kernel, docs/labs/lazy-restore.md; more in
/// an emulated guest) and one flush per period, is paid in the baseline and the DAMON phase
/// alike.
final class HotLoop: Sendable {
    private let base: UInt
    private let pages: Int
    private let flushEveryNs: UInt64
    private let scratch: AnonymousMapping
    private let done = Atomic<Bool>(false)
    private let count = Atomic<Int>(0)
    private let failed = Atomic<Int>(0)
    /// Above x86's 33-page single-page flush ceiling.
    static let scratchPages = 64

    /// `scratch`: at least `scratchPages` pages, touched and zapped every `flushEveryNs`.
    init(base: UnsafeMutableRawPointer, pages: Int, flushEveryNs: UInt64, scratch: AnonymousMapping) {
        self.base = UInt(bitPattern: base)
        self.pages = pages
        self.flushEveryNs = flushEveryNs
        self.scratch = scratch
    }

    var passes: Int { count.load(ordering: .relaxed) }
    var failedFlushes: Int { failed.load(ordering: .relaxed) }
    func stop() { done.store(true, ordering: .relaxed) }

    func run() {
        let page = System.pageSize
        guard let p = UnsafeMutablePointer<UInt8>(bitPattern: base) else { return }
        var sink: UInt8 = 0
        var lastFlush = Clock.nanoseconds()
        while !done.load(ordering: .relaxed) {
            for i in 0..<pages { sink &+= memlab_read_byte(p + i * page + 64) }
            count.add(1, ordering: .relaxed)
            let now = Clock.nanoseconds()
            if now &- lastFlush >= flushEveryNs {
                scratch.touch()
                do { try scratch.advise(memlab_MADV_DONTNEED, name: "MADV_DONTNEED") } catch { failed.add(1, ordering: .relaxed) }
                lastFlush = now
            }
        }
        blackHole(sink)
    }
}
