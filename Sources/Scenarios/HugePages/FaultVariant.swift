#if canImport(Glibc)
import Glibc
#endif
import Histogram
import LabKit
import LinuxMM
import Workloads

extension HugePagesScenario {
    /// First touch of a fresh region. Two regions of the same size: one touched by the plain
    /// loop (throughput, nothing else in the loop), one with a clock read around the first
    /// touch of each fault unit (the latency distribution).
    func runFault(_ ctx: RunContext, _ p: Values) throws {
        let kind = p.kind
        let size = regionSize(p, kind)
        if p.prewarm { prewarm(length: size, kind: kind.pageKind) }
        ctx.note(p.prewarm ? "prewarm ran: the same size was touched and freed before timing" : "prewarm off: timings include the host's first backing of guest memory")

        // The per-size counters of the folio size asked for (hugepages-<size>kB/stats), and
        // for 2M the machine-wide vmstat ones too: what the kernel did, fault by fault.
        let folioBytes: Int? = {
            switch kind {
            case .thp: return 2 << 20
            case .mthp(let b): return b
            default: return nil
            }
        }()
        let sizeCounters = ["anon_fault_alloc", "anon_fault_fallback", "anon_fault_fallback_charge"]
        func readSizeCounters() -> [String: Int64] {
            guard let b = folioBytes else { return [:] }
            var out: [String: Int64] = [:]
            for name in sizeCounters { if let v = try? CounterFile(path: THP.sizeStat(bytes: b, name)).read() { out[name] = v } }
            return out
        }
        let vmCounters = ["thp_fault_alloc", "thp_fault_fallback", "thp_fault_fallback_charge"]
        let sizeBefore = readSizeCounters()
        let vmBefore = kind == .thp ? try VMStat.current() : nil
        let hugeFreeBefore: Int? = { if case .hugetlb(let b) = kind { return HugeTLB.pool(pageBytes: b)?.free }; return nil }()

        // Throughput: the plain loop.
        let a = try AnonymousMapping(length: size, kind: kind.pageKind)
        let faults0 = Faults.minor()
        let t0 = Clock.nanoseconds()
        touchPages(a.base, length: a.length, stride: 4096)
        let seconds = Clock.seconds(since: t0)
        let faults = Faults.minor() - faults0
        let sizeAfter = readSizeCounters()
        let vmAfter = kind == .thp ? try VMStat.current() : nil
        func sizeDelta(_ name: String) -> Double? {
            guard let a = sizeAfter[name], let b = sizeBefore[name] else { return nil }
            return Double(a - b)
        }
        ctx.record("fault_time", seconds, .s, better: .lower)
        ctx.record("fault_throughput", Double(size) / seconds, .bytesPerSecond, better: .higher)
        ctx.record("faults", Double(faults), .count, better: .none)

        // What backed it: per page, from the kernel.
        let (cov, present) = try coverage(a, kind)
        ctx.record("huge_coverage", cov, .ratio, better: .none)
        ctx.check("huge_coverage", expected: kind == .base ? 0 : 1, observed: cov, tolerance: 0.05,
                  describe: "±0.05 of what was asked (4k: none huge; others: all huge)")
        ctx.check("pages_present", expected: Double(size / 4096), observed: Double(present), tolerance: 0, describe: "every touched page present (pagemap)")
        switch kind {
        case .thp:
            let smaps = try Smaps.entry(startingAt: a.base)
            ctx.record("anon_huge_bytes", Double(smaps["AnonHugePages"] ?? 0), .bytes, better: .none)
            ctx.check("anon_huge_pages_vs_kpageflags", expected: cov * Double(size), observed: Double(smaps["AnonHugePages"] ?? 0),
                      tolerance: Double(2 << 20), describe: "smaps AnonHugePages within one 2M page of the kpageflags census")
            // hugepages-2048kB/stats: the per-size view of the same faults (6.8+).
            if let allocs = sizeDelta("anon_fault_alloc") {
                ctx.record("thp_size_fault_alloc", allocs, .count, better: .none)
                ctx.check("thp_size_fault_alloc", expected: Double(size / (2 << 20)), observed: allocs, tolerance: Double(size / (2 << 20)) * 0.05,
                          describe: "hugepages-2048kB/stats/anon_fault_alloc rose by one per 2M of the region (±5%)")
            }
            if let f = sizeDelta("anon_fault_fallback") { ctx.record("thp_size_fault_fallback", f, .count, better: .lower) }
            if let f = sizeDelta("anon_fault_fallback_charge") { ctx.record("thp_size_fault_fallback_charge", f, .count, better: .lower) }
            // /proc/vmstat: machine-wide, so another process's THP faults would show here too.
            if let a = vmAfter, let b = vmBefore {
                for name in vmCounters {
                    guard let x = a[name], let y = b[name] else { continue }
                    ctx.record(name, Double(Int64(x) - Int64(y)), .count, better: name == "thp_fault_alloc" ? .none : .lower)
                }
            }
        case .mthp(let b):
            guard let allocs = sizeDelta("anon_fault_alloc") else {
                throw ScenarioError.skipped("\(THP.sizeStat(bytes: b, "anon_fault_alloc")) cannot be read: this kernel has no per-size mTHP counters")
            }
            ctx.record("mthp_fault_alloc", allocs, .count, better: .none)
            ctx.check("mthp_fault_alloc", expected: Double(size / b), observed: allocs, tolerance: Double(size / b) * 0.05,
                      describe: "hugepages-\(b / 1024)kB/stats/anon_fault_alloc rose by one per \(b / 1024)K of the region (±5%)")
            // A fault that wanted this size and got a smaller one: no free folio of the
            // order (fallback) or the memory cgroup refused the charge (fallback_charge).
            if let f = sizeDelta("anon_fault_fallback") { ctx.record("mthp_fault_fallback", f, .count, better: .lower) }
            if let f = sizeDelta("anon_fault_fallback_charge") { ctx.record("mthp_fault_fallback_charge", f, .count, better: .lower) }
        case .hugetlb(let b):
            let free = HugeTLB.pool(pageBytes: b)?.free ?? 0
            ctx.record("hugetlb_pages_used", Double((hugeFreeBefore ?? 0) - free), .pages, better: .none)
        case .base: break
        }

        // Latency distribution over fault units, on a second region warmed the same way.
        if p.prewarm { prewarm(length: size, kind: kind.pageKind) }
        let m = try AnonymousMapping(length: size, kind: kind.pageKind)
        var h = Histogram<UInt64>(highestTrackableValue: 600_000_000_000, numberOfSignificantValueDigits: .three)
        let unit = kind.unit
        let bytes = m.base.assumingMemoryBound(to: UInt8.self)
        var off = 0
        while off < m.length {
            let s = Clock.nanoseconds()
            bytes[off] = 1
            _ = h.record(Clock.nanoseconds() &- s)
            var inner = off + 4096
            while inner < off + unit { bytes[inner] = 1; inner += 4096 }
            off += unit
        }
        ctx.recordLatency("fault_latency", h)
        ctx.record("fault_latency_mean", h.mean, .ns, better: .lower)
    }
}
