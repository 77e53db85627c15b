import LabKit
import LinuxMM
import Workloads

extension HugePagesScenario {
    /// ns per dependent load for working sets from 16K up to max_working_set, ×4 each step:
    /// where the curve climbs is where the TLB (and then the caches) give out. The same
    /// memory serves every size; each size is warmed (a quarter of its accesses, untimed)
    /// before it is timed.
    func runTLB(_ ctx: RunContext, _ p: Values) throws {
        let kind = p.kind
        let maxSet = (p.maxWorkingSet + kind.unit - 1) / kind.unit * kind.unit
        let accesses = p.accesses
        let m = try AnonymousMapping(length: maxSet, kind: kind.pageKind)
        touchPages(m.base, length: m.length, stride: 4096)
        let (cov, _) = try coverage(m, kind)
        ctx.record("huge_coverage", cov, .ratio, better: .none)
        ctx.check("huge_coverage", expected: kind == .base ? 0 : 1, observed: cov, tolerance: 0.05,
                  describe: "±0.05 of what was asked")

        var size = 16 << 10
        while size <= maxSet {
            let chase = PointerChase(base: m.base, bytes: size, seed: 0x7A3C_9E11 &+ UInt64(size))
            blackHole(PointerChase.run(m.base, start: chase.start, steps: max(accesses / 4, chase.elements)))
            let t0 = Clock.nanoseconds()
            let end = PointerChase.run(m.base, start: chase.start, steps: accesses)
            let ns = Double(Clock.nanoseconds() &- t0) / Double(accesses)
            blackHole(end)
            ctx.record("access_latency_\(formatBytes(size))", ns, .ns, better: .lower)
            size *= 4
        }

        // GUPS-style: independent random read-modify-writes over the whole region.
        let words = m.base.assumingMemoryBound(to: UInt64.self)
        let n = UInt64(m.length / 8)
        var x: UInt64 = 0x2545_F491_4F6C_DD1D
        let updates = accesses
        let t0 = Clock.nanoseconds()
        for _ in 0..<updates {
            x ^= x << 13; x ^= x >> 7; x ^= x << 17
            words[Int(truncatingIfNeeded: x % n)] ^= x
        }
        let elapsed = Clock.nanoseconds() &- t0
        let ns = Double(elapsed) / Double(updates)
        ctx.record("random_update_latency", ns, .ns, better: .lower)
        // The same loop as a rate: GUPS (giga-updates per second) is this / 1e9.
        ctx.record("random_update_rate", Double(updates) / (Double(elapsed) / 1e9), .updatesPerSecond, better: .higher)
        ctx.note("tlb: one chase element per 4K page at a random line; GUPS-style updates are independent, so they overlap")
    }
}
