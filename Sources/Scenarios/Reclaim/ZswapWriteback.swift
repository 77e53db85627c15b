#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import Histogram
import LabKit
import LinuxMM
import Workloads

extension ReclaimScenario {
    /// zswap's shrinker (shrinker_enabled, 6.8+) writes the coldest pool entries back to the
    /// swap device when the cgroup is reclaimed. A region is paged into zswap (MADV_PAGEOUT),
    /// the child's cgroup is reclaimed `reclaim_rounds` times, and each page is then read back
    /// with its first touch timed and placed by which kernel counter moved during that one
    /// fault: zswpin (from the pool), pswpin (from the swap file: written back), or neither
    /// (still in the swap cache).
    func runWriteback(_ ctx: RunContext, _ p: Values, cgroup cg: MemoryCgroup) throws {
        let page = System.pageSize
        let pages = p.pages
        let zswapOn = (try? Zswap.enabled.read()) == "Y"
        let shrinkerOn = (try? Zswap.shrinkerEnabled.read()) == "Y"
        guard zswapOn, shrinkerOn == p.shrinker else {
            throw ScenarioError.failed("zswap enabled reads \(zswapOn ? "Y" : "N") and shrinker_enabled \(shrinkerOn ? "Y" : "N"), not what the run borrowed")
        }
        let seed = 0x7772_6974_6562 &+ UInt64(ctx.repetition)
        let region = try ReclaimScenario.filledRegion(pages: pages, pattern: p.pattern, seed: seed)
        let base = region.base.assumingMemoryBound(to: UInt8.self)

        let v0 = try VMStat.current()
        let m0 = try MemInfo.current()
        let d0 = Zswap.debugCounters()
        try region.advise(memlab_MADV_PAGEOUT, name: "MADV_PAGEOUT")
        let v1 = try VMStat.current()
        let m1 = try MemInfo.current()
        func dv(_ a: VMStat, _ b: VMStat, _ k: String) -> Double { Double(Int64(a[k] ?? 0) - Int64(b[k] ?? 0)) }
        let stored = dv(v1, v0, "zswpout")
        let poolAfterPageout = Double(m1["Zswap"] ?? 0)

        // Proactive reclaim of the cgroup: what the shrinker acts on.
        let t0 = Clock.nanoseconds()
        var written: [Double] = []
        for _ in 0..<p.reclaimRounds {
            ReclaimScenario.reclaimPass(cg, bytes: p.passBytes)
            written.append(dv(try VMStat.current(), v1, "zswpwb"))
        }
        let reclaimTime = Clock.seconds(since: t0)
        ReclaimScenario.waitForWriteback()
        // Empty the swap cache (pages written back stay in it until reclaimed), so the timed
        // touches read from where the page really is. v2: ask memory.reclaim for just what the
        // cgroup's swap cache holds (those folios are clean and at the LRU's tail, so little
        // more is written back); v1 writes nothing back, and force_empty is as before.
        if cg.version == 2 {
            let cached = Int((try? cg.stat())?["swapcached"] ?? 0)
            if cached > 0 { _ = try? cg.reclaim(bytes: cached) }
        } else {
            ReclaimScenario.reclaimPass(cg, bytes: region.length)
        }
        let v2 = try VMStat.current()
        let m2 = try MemInfo.current()
        let d2 = Zswap.debugCounters()
        let writtenBack = dv(v2, v1, "zswpwb")
        let deviceWrites = dv(v2, v0, "pswpout")
        let residency = try PageFlags.residency(region.base, length: region.length)
        let swapped = Double(residency.swapped)

        ctx.record("pages", Double(pages), .pages, better: .none)
        ctx.record("stored_pages", stored, .pages, better: .none)
        ctx.record("pool_bytes_after_pageout", poolAfterPageout, .bytes, better: .none)
        ctx.record("reclaim_rounds", Double(p.reclaimRounds), .count, better: .none)
        ctx.record("reclaim_time", reclaimTime, .s, better: .lower)
        ctx.record("written_back_pages", writtenBack, .pages, better: .none)
        ctx.record("swap_device_writes", deviceWrites, .pages, better: .none)
        ctx.record("pool_bytes_after_reclaim", Double(m2["Zswap"] ?? 0), .bytes, better: .none)
        ctx.record("stored_bytes_after_reclaim", Double(m2["Zswapped"] ?? 0), .bytes, better: .none)
        ctx.record("swapped_out_pages", swapped, .pages, better: .none)
        if cg.version == 2, let s = try? cg.stat(), s["zswpwb"] != nil {
            ctx.record("cgroup_zswpwb", Double(s["zswpwb"] ?? 0), .pages, better: .none)
        }
        if let first = written.first { ctx.record("written_back_first_round", first, .pages, better: .none) }
        if let a = d0?["written_back_pages"], let b = d2?["written_back_pages"] {
            ctx.record("debugfs_written_back_pages", Double(b - a), .pages, better: .none)
            ctx.check("debugfs_written_back_pages", expected: writtenBack, observed: Double(b - a), tolerance: 0,
                      describe: "debugfs written_back_pages moves with vmstat zswpwb, exactly")
        }
        _ = m0

        // Pages zswap refused (its pool at max_pool_percent) went straight to the swap file.
        ctx.record("rejected_to_swap_file", max(0, deviceWrites - writtenBack), .pages, better: .none)
        ctx.check("pages_placed", expected: swapped, observed: stored + max(0, deviceWrites - writtenBack), tolerance: max(2, swapped * 0.01),
                  describe: "every page MADV_PAGEOUT swapped went to zswap (zswpout) or, refused, to the swap file (pswpout - zswpwb), 1%")
        if !p.shrinker {
            ctx.check("written_back_pages", expected: 0, observed: writtenBack, tolerance: 0,
                      describe: "shrinker_enabled=N: cgroup reclaim writes nothing back (the pool is far below max_pool_percent)")
        } else if cg.version == 2 {
            ctx.check("written_back_pages", expected: 1, observed: writtenBack, accepted: 1...Double.greatestFiniteMagnitude,
                      describe: "shrinker_enabled=Y: reclaiming the cgroup writes pool entries back to the swap file (zswpwb > 0; the child's own pages count too)")
        } else {
            // Measured, and the kernel's rule: zswap charges a memcg (obj_cgroup_charge_zswap)
            // on the default hierarchy only, so on v1 the memcg-aware shrinker counts nothing.
            ctx.check("written_back_pages", expected: 0, observed: writtenBack, tolerance: 0,
                      describe: "cgroup v1: zswap is not charged to a v1 memcg, so the shrinker finds nothing to write back under its reclaim")
            ctx.note("zswap-writeback on cgroup v1: zswap charges memory cgroups on cgroup v2 only, so the memcg-aware shrinker has nothing to count under v1 reclaim (memory.force_empty); written_back_pages measures that. Run it under cgroup v2 to see the shrinker write back")
        }
        ctx.check("swap_device_writes", expected: writtenBack, observed: deviceWrites, accepted: writtenBack...Double.greatestFiniteMagnitude,
                  describe: "every page written back is a write to the swap file (pswpout >= zswpwb)")

        // Read back, each first touch timed and placed by the counter that moved.
        let counters = try SwapinCounters()
        var pool = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var disk = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var cache = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var sink: UInt8 = 0
        var last = try counters.read()
        for i in 0..<pages {
            let t = Clock.nanoseconds()
            sink &+= memlab_read_byte(base + i * page + 100)
            let dt = Clock.nanoseconds() &- t
            let now = try counters.read()
            if now.pswpin > last.pswpin { _ = disk.record(dt) } else if now.zswpin > last.zswpin { _ = pool.record(dt) } else { _ = cache.record(dt) }
            last = now
        }
        blackHole(sink)
        let fromPool = Double(pool.totalCount), fromDisk = Double(disk.totalCount), fromCache = Double(cache.totalCount)
        ctx.record("swapin_from_pool", fromPool, .pages, better: .none)
        ctx.record("swapin_from_disk", fromDisk, .pages, better: .none)
        ctx.record("swapin_other", fromCache, .pages, better: .none)
        if pool.totalCount > 0 { ctx.recordLatency("swapin_pool_latency", pool) }
        if disk.totalCount > 0 { ctx.recordLatency("swapin_disk_latency", disk) }
        if pool.totalCount >= 16 && disk.totalCount >= 16 {
            let ratio = Double(disk.valueAtPercentile(50)) / Double(max(1, pool.valueAtPercentile(50)))
            ctx.record("disk_to_pool_latency_ratio", ratio, .ratio, better: .none)
            ctx.check("disk_slower_than_pool", expected: 2, observed: ratio, accepted: 1...1e9,
                      describe: "a page read from the swap file takes longer than one decompressed from the pool (median ratio > 1)")
        }
        ctx.check("swapin_from_disk", expected: writtenBack, observed: fromDisk, accepted: 0...max(writtenBack, deviceWrites),
                  describe: "only pages that reached the swap file are read from it (pswpin <= pswpout)")
        ctx.check("swapins_placed", expected: Double(pages), observed: fromPool + fromDisk + fromCache, tolerance: 0,
                  describe: "exact: every page's first touch placed (pool, disk, or neither)")
        let intact = ReclaimScenario.intactPages(region, pattern: p.pattern, seed: seed)
        ctx.check("pages_intact", expected: Double(pages), observed: Double(intact), tolerance: 0, describe: "exact: contents after read-back")
        ctx.note("zswap-writeback: \(pages) pages (\(p.pattern.rawValue)) paged into zswap, cgroup v\(cg.version) reclaimed \(p.reclaimRounds) time(s)\(cg.version == 2 ? " (memory.reclaim \(formatBytes(p.passBytes)) each)" : " (memory.force_empty)") with shrinker_enabled=\(p.shrinker ? "Y" : "N"); each read-back placed by the vmstat counter that moved during its fault (zswpin: pool, pswpin: swap file), page-cluster \(p.pageCluster)")
    }
}

/// zswpin and pswpin from /proc/vmstat, read with one pread into a buffer made once: cheap
/// enough to read after every timed fault (outside the timed window).
public final class SwapinCounters {
    private let fd: Int32
    private let buffer: UnsafeMutablePointer<UInt8>
    private let capacity = 1 << 16

    public init() throws {
        fd = open("/proc/vmstat", O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw SystemError.current("open", path: "/proc/vmstat") }
        buffer = .allocate(capacity: capacity)
    }
    deinit { close(fd); buffer.deallocate() }

    public func read() throws -> (zswpin: UInt64, pswpin: UInt64) {
        let n = pread(fd, buffer, capacity, 0)
        if n <= 0 { throw SystemError.current("pread", path: "/proc/vmstat") }
        return SwapinCounters.parse(UnsafeBufferPointer(start: buffer, count: n))
    }

    /// The two counters from vmstat text ("zswpin 12\npswpin 3\n…"); 0 for one absent.
    public static func parse(_ text: UnsafeBufferPointer<UInt8>) -> (zswpin: UInt64, pswpin: UInt64) {
        var z: UInt64 = 0, s: UInt64 = 0
        var i = 0
        let n = text.count
        while i < n {
            var j = i
            while j < n && text[j] != 0x20 && text[j] != 0x0A { j += 1 }
            let nameLength = j - i
            var isZ = false, isP = false
            // "zswpin" and "pswpin": six bytes, the same but the first.
            if nameLength == 6 && j < n && text[j] == 0x20 && text[i + 1] == 0x73 && text[i + 2] == 0x77
                && text[i + 3] == 0x70 && text[i + 4] == 0x69 && text[i + 5] == 0x6E {
                isZ = text[i] == 0x7A
                isP = text[i] == 0x70
            }
            var k = j
            if isZ || isP {
                k += 1
                var v: UInt64 = 0
                while k < n && text[k] >= 0x30 && text[k] <= 0x39 { v = v &* 10 &+ UInt64(text[k] - 0x30); k += 1 }
                if isZ { z = v } else { s = v }
            }
            while k < n && text[k] != 0x0A { k += 1 }
            i = k + 1
        }
        return (z, s)
    }
}
