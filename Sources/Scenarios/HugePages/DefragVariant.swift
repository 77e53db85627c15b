#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM

/// hugepages:defrag — a THP fault where no 2M block is free. The run first fragments the
/// machine's free memory (nearly all of it faulted as 4K pages, then every other page given
/// back: half the memory free, none of it in 2M pieces, /proc/buddyinfo says so), then faults
/// a region and reads what transparent_hugepage/defrag let the fault do (mm/huge_memory.c,
/// vma_thp_gfp_mask): compact synchronously (compact_stall, compact_success, more THPs than
/// there were free 2M blocks), wake kswapd and kcompactd and fall back to 4K now (pageoutrun,
/// compact_daemon_wake, thp_fault_fallback), or just fall back. Taking most of the free memory is what
/// fragmenting means: a machine with more than max_fill free is skipped — run it in a guest.
enum Defrag {
    /// Free memory left alone by the fill: above the watermarks, so the fill itself neither
    /// reclaims nor stalls.
    /// min_free_kbytes is spread over the nodes by size: this node's share, four times over.
    static func headroom(node: Int) -> Int {
        let minFree = (Int((try? Compaction.minFreeKbytes.read()) ?? "") ?? 0).clamped(to: 0...(1 << 30)) * 1024
        let total = Int((try? MemInfo.current())?.memTotal ?? 0)
        let share = NUMA.nodeSize(node).map { total > 0 ? Double($0.total) / Double(total) : 1 } ?? 1
        return max(32 << 20, Int(4 * Double(minFree) * min(1, share)))
    }

    /// What the fault may do under this mode, for a region madvised or not (vma_thp_gfp_mask).
    static func behaviour(_ mode: HugePagesScenario.DefragMode, madvised: Bool) -> (direct: Bool, background: Bool) {
        switch mode {
        case .always: return (true, false)
        case .defer: return (false, true)
        case .deferMadvise: return (madvised, !madvised)
        case .madvise: return (madvised, false)
        case .never: return (false, false)
        }
    }
}

private extension Int {
    func clamped(to r: ClosedRange<Int>) -> Int { Swift.min(Swift.max(self, r.lowerBound), r.upperBound) }
}

extension HugePagesScenario {
    func probeDefrag() -> Availability {
        guard THP.isAvailable else { return .unusable("no /sys/kernel/mm/transparent_hugepage: kernel built without CONFIG_TRANSPARENT_HUGEPAGE") }
        guard Compaction.isAvailable else { return .unusable("/proc/vmstat has no compact_stall: kernel built without CONFIG_COMPACTION") }
        guard ProcFile.exists("/proc/buddyinfo") else { return .unusable("no /proc/buddyinfo to read fragmentation from") }
        return .usable
    }

    func probeDefrag(_ p: Values) -> Availability {
        let node = p.node >= 0 ? p.node : NUMA.currentNode
        let free = (try? BuddyInfo.current())?.freeBytes(node: node) ?? 0
        if free - Defrag.headroom(node: node) > p.maxFill {
            return .unusable("fragmenting node \(node) means filling its \(formatBytes((free >> 20) << 20)) of free memory, more than max_fill=\(formatBytes(p.maxFill)): run it in a guest (memlab run --guest kernel=distro,mem=1G hugepages:defrag) or raise max_fill")
        }
        return .usable
    }

    func defragSettings(_ p: Values) -> [KnobSetting] {
        // enabled=always: a region without MADV_HUGEPAGE gets THPs too (what defrag's
        // madvised/not-madvised cases differ on); 2M only.
        var s = [KnobSetting(THP.enabled, "always"), KnobSetting(THP.defrag, p.defragMode.rawValue)]
        for size in THP.anonymousSizes {
            s.append(KnobSetting(THP.sizeEnabled(bytes: size), size == 2 << 20 ? "inherit" : "never"))
        }
        // khugepaged allocates without compacting (GFP_TRANSHUGE_LIGHT): its collapses would
        // otherwise count as compaction stalls of their own.
        s.append(KnobSetting(THP.Khugepaged.defrag, "0"))
        if Compaction.proactiveness.exists {
            s.append(KnobSetting(Compaction.proactiveness, String(p.proactiveness)))
        }
        return s
    }

    func runDefrag(_ ctx: RunContext, _ p: Values) throws {
        let huge = 2 << 20
        let size = regionSize(p, .thp)
        let units = size / huge
        let mode = p.defragMode
        let madvised = p.madviseHuge
        let expect = Defrag.behaviour(mode, madvised: madvised)

        // One node: every allocation of the run is bound there (a THP fault under the default
        // policy tries only the local node unless it may reclaim, so free blocks on another
        // node would count for nothing).
        let node = p.node >= 0 ? p.node : NUMA.currentNode
        if NUMA.isAvailable { try NUMA.bind(toNode: node) }
        // The blocks free before anything: what an unfragmented fault would find (DMA left
        // out: lowmem_reserve keeps it from THP faults).
        let start = try BuddyInfo.current()
        let fresh = start.freeBlocks(atLeastOrder: 9, node: node)
        let memFree = start.freeBytes(node: node)
        let headroom = Defrag.headroom(node: node)
        let fill = (memFree - headroom) / 4096 * 4096
        guard fill <= p.maxFill else {
            throw ScenarioError.skipped("\(formatBytes(memFree)) free on node \(node) now, more than max_fill=\(formatBytes(p.maxFill)) above the \(formatBytes(headroom)) headroom: run it in a guest")
        }
        // Half of the fill comes back free; the region must fit in it with room to spare. What
        // is free is the machine's state (page cache comes and goes), not a fault of the run:
        // skipped with the numbers.
        guard fill / 2 >= 2 * size else {
            throw ScenarioError.skipped("only \(formatBytes(memFree)) free: fragmenting leaves \(formatBytes(max(0, fill / 2))) in 4K holes, too little for a \(formatBytes(size)) region twice over (ask for a smaller size or a larger guest)")
        }

        // Fragment: every page of the fill faulted as 4K (MADV_NOHUGEPAGE), then every other
        // one given back. Pages come from the buddy allocator in runs, so freeing every other
        // virtual page frees every other physical page: no 2M block is whole.
        let t0 = Clock.nanoseconds()
        let filler = try AnonymousMapping(length: fill, kind: .base, noReserve: true)
        filler.touch()
        var offset = 4096
        while offset < fill {
            try filler.advise(memlab_MADV_DONTNEED, name: "MADV_DONTNEED", offset: offset, length: 4096)
            offset += 2 * 4096
        }
        // The allocator hands out its smallest free blocks first, so the memory the fill left
        // alone is the largest blocks: those are taken as THPs (one write each), a few
        // rounds, until no 2M block is left free.
        var grabbed: [AnonymousMapping] = []
        for _ in 0..<4 {
            let left = Int(clamping: try BuddyInfo.current().freeBlocks(atLeastOrder: 9, node: node))
            if left == 0 { break }
            let g = try AnonymousMapping(length: min(left, fill / huge) * huge, kind: .thp)
            g.touch(stride: huge)
            grabbed.append(g)
        }
        let grabbedTHPs = try grabbed.reduce(0) { $0 + (try PageFlags.census($1.base, length: $1.length).thp / 512) }
        let fragmentSeconds = Clock.seconds(since: t0)
        let before = try BuddyInfo.current()
        let free2M = before.freeBlocks(atLeastOrder: 9, node: node)

        // The fault.
        let vm0 = try VMStat.current()
        let region = try AnonymousMapping(length: size, kind: .thp, advise: madvised)
        let t1 = Clock.nanoseconds()
        region.touch()
        let faultSeconds = Clock.seconds(since: t1)
        let vm1 = try VMStat.current()
        func delta(_ v: VMStat, _ k: String) -> Double { Double(Int64(truncatingIfNeeded: v[k] ?? 0) &- Int64(truncatingIfNeeded: vm0[k] ?? 0)) }
        // A failed fault under defer wakes kswapd (__GFP_KSWAPD_RECLAIM), which wakes kcompactd
        // when it goes back to sleep — or kcompactd at once where reclaim cannot help: either
        // is the background work defer asks for, counted a moment after the fault.
        var vm2 = vm1
        func woken(_ v: VMStat) -> Double { delta(v, "pageoutrun") + delta(v, "compact_daemon_wake") }
        if expect.background {
            let deadline = Clock.nanoseconds() + 3_000_000_000
            while woken(vm2) == 0 && Clock.nanoseconds() < deadline {
                usleep(20_000)
                vm2 = try VMStat.current()
            }
        }
        let census = try PageFlags.census(region.base, length: region.length)
        let thpBacked = census.thp / 512

        ctx.record("fill_bytes", Double(fill), .bytes, better: .none)
        ctx.record("fragment_time", fragmentSeconds, .s, better: .none)
        ctx.record("free_2m_blocks_fresh", Double(fresh), .count, better: .none)
        ctx.record("grabbed_thps", Double(grabbedTHPs), .count, better: .none)
        ctx.record("free_2m_blocks_fragmented", Double(free2M), .count, better: .none)
        ctx.record("free_pages_fragmented", Double(before.freePages(node: node)), .pages, better: .none)
        ctx.record("region_2m_ranges", Double(units), .count, better: .none)
        ctx.record("thp_backed", Double(thpBacked), .count, better: .higher)
        ctx.record("thp_fault_alloc", delta(vm1, "thp_fault_alloc"), .count, better: .none)
        ctx.record("thp_fault_fallback", delta(vm1, "thp_fault_fallback"), .count, better: .none)
        for k in ["compact_stall", "compact_success", "compact_fail", "compact_migrate_scanned", "compact_free_scanned", "compact_isolated"] {
            ctx.record(k, delta(vm1, k), .count, better: .none)
        }
        ctx.record("compact_daemon_wake", delta(vm2, "compact_daemon_wake"), .count, better: .none)
        ctx.record("pageoutrun", delta(vm2, "pageoutrun"), .count, better: .none)
        let allocstall = ["allocstall_dma", "allocstall_dma32", "allocstall_normal", "allocstall_movable"].reduce(0) { $0 + delta(vm1, $1) }
        ctx.record("allocstall", allocstall, .count, better: .none)
        ctx.record("fault_time", faultSeconds, .s, better: .lower)
        ctx.record("fault_ns_per_2m", faultSeconds * 1e9 / Double(units), .ns, better: .lower)

        // Precondition: fragmented, or nothing below means anything.
        let limit = Double(units / 2)
        let fragmented = ctx.check("fragmented", expected: 0, observed: Double(free2M), accepted: 0...limit,
                                   describe: "after fragmenting, at most half the region's \(units) THPs can come from free 2M blocks (/proc/buddyinfo order ≥ 9: \(fresh) before the fill)")
        let stalls = delta(vm1, "compact_stall")
        let allocated = delta(vm1, "thp_fault_alloc")
        ctx.check("direct_compaction", expected: expect.direct ? 1 : 0, observed: stalls > 0 ? 1 : 0, tolerance: 0,
                  describe: "defrag=\(mode.rawValue)\(madvised ? " on a MADV_HUGEPAGE region" : " on a region without MADV_HUGEPAGE") \(expect.direct ? "compacts in the fault (compact_stall > 0)" : "never compacts in the fault (compact_stall stays 0)")")
        if expect.direct {
            // Whether compaction then makes a THP is the kernel's call (async compaction gives
            // up on contention, skip hints and deferrals carry over from earlier attempts):
            // recorded, not expected. What it owes is the accounting: each stall ends in a
            // success or a failure.
            let ended = delta(vm1, "compact_success") + delta(vm1, "compact_fail")
            ctx.check("stalls_accounted", expected: stalls, observed: ended, tolerance: 2,
                      describe: "compact_success + compact_fail = compact_stall: every direct compaction ended one way or the other (±2: vmstat is machine-wide)")
            ctx.record("thps_beyond_free_blocks", max(0, allocated - Double(free2M)), .count, better: .higher)
        }
        if !expect.direct && fragmented {
            ctx.check("fell_back", expected: Double(units) - Double(free2M), observed: delta(vm1, "thp_fault_fallback"), accepted: 1...Double(units + 2),
                      describe: "without compaction in the fault, faults beyond the free 2M blocks fall back to 4K (thp_fault_fallback > 0)")
        }
        if expect.background {
            ctx.check("background_woken", expected: 1, observed: woken(vm2) > 0 ? 1 : 0, tolerance: 0,
                      describe: "defrag=\(mode.rawValue) leaves what the fault could not get to kswapd and kcompactd (pageoutrun + compact_daemon_wake > 0 within 3 s)")
        }
        ctx.check("thp_backed", expected: allocated, observed: Double(thpBacked), tolerance: 2,
                  describe: "the region's PMD-mapped 2M ranges (kpageflags THP) are the THPs the faults allocated (±2: vmstat is machine-wide)")
        withExtendedLifetime((filler, grabbed)) {}
        ctx.note("defrag: node \(node): \(formatBytes(fill)) filled and every other 4K page freed, \(grabbedTHPs) free 2M blocks taken as THPs, in \(String(format: "%.2f", fragmentSeconds)) s: free 2M blocks \(fresh) → \(free2M); \(units) × 2M faulted \(madvised ? "with" : "without") MADV_HUGEPAGE under defrag=\(mode.rawValue) (expected: \(expect.direct ? "direct compaction" : expect.background ? "kswapd/kcompactd woken, fall back" : "fall back")); \(thpBacked) THP-backed, \(Int(stalls)) compaction stall(s)")
    }
}
