import CLinuxMM
import LinuxMM

/// `memlab bench`: memlab's own hot loops against the same loops in C (CLinuxMM's reference
/// kernels), in the same run, alternating, median of several rounds — so a user can see that
/// the lab's machinery does not distort what it measures. Ratios, not absolute figures, are
/// the point: this machine is noisy.
public enum Bench {
    public struct Row: Sendable {
        public let name: String
        public let swiftNS: Double
        public let cNS: Double
        public let unit: String
        public var ratio: Double { swiftNS / cNS }
    }

    public static func median(_ xs: [Double]) -> Double {
        let s = xs.sorted()
        return s.count % 2 == 1 ? s[s.count / 2] : (s[s.count / 2 - 1] + s[s.count / 2]) / 2
    }

    /// Alternates the two bodies `rounds` times; each returns nanoseconds per unit.
    public static func compare(_ name: String, unit: String, rounds: Int, swift: () throws -> Double, c: () throws -> Double) rethrows -> Row {
        var a: [Double] = [], b: [Double] = []
        for r in 0..<rounds {
            if r % 2 == 0 { a.append(try swift()); b.append(try c()) } else { b.append(try c()); a.append(try swift()) }
        }
        return Row(name: name, swiftNS: median(a), cNS: median(b), unit: unit)
    }

    public static func run(sizeMB: Int = 64, rounds: Int = 7) throws -> [Row] {
        let size = sizeMB << 20
        let pages = Double(size / 4096)
        var rows: [Row] = []

        // 1. Fault-and-touch: fresh (pre-warmed) 4K memory, one write per page.
        prewarm(length: size, kind: .base)
        rows.append(try compare("fault-and-touch, fresh 4K pages", unit: "ns/page", rounds: rounds, swift: {
            let m = try AnonymousMapping(length: size, kind: .base)
            let t = Clock.nanoseconds()
            touchPages(m.base, length: m.length, stride: 4096)
            return Double(Clock.nanoseconds() &- t) / pages
        }, c: {
            let m = try AnonymousMapping(length: size, kind: .base)
            let t = Clock.nanoseconds()
            memlab_ref_touch(m.base, m.length, 4096)
            return Double(Clock.nanoseconds() &- t) / pages
        }))

        // 2. Touch loop on resident memory: the loop alone, no faults.
        let resident = try AnonymousMapping(length: size, kind: .base)
        touchPages(resident.base, length: size, stride: 4096)
        rows.append(compare("touch loop, resident memory", unit: "ns/line", rounds: rounds, swift: {
            let t = Clock.nanoseconds()
            touchPages(resident.base, length: size, stride: 64)
            return Double(Clock.nanoseconds() &- t) / Double(size / 64)
        }, c: {
            let t = Clock.nanoseconds()
            memlab_ref_touch(resident.base, size, 64)
            return Double(Clock.nanoseconds() &- t) / Double(size / 64)
        }))

        // 3. Pointer chase over the same cycle.
        let chase = PointerChase(base: resident.base, bytes: size, seed: 42)
        let steps = 2_000_000
        rows.append(compare("pointer chase, \(sizeMB) MiB", unit: "ns/load", rounds: rounds, swift: {
            let t = Clock.nanoseconds()
            blackHole(PointerChase.run(resident.base, start: chase.start, steps: steps))
            return Double(Clock.nanoseconds() &- t) / Double(steps)
        }, c: {
            let t = Clock.nanoseconds()
            blackHole(memlab_ref_chase(resident.base.assumingMemoryBound(to: UInt64.self), chase.start, UInt64(steps)))
            return Double(Clock.nanoseconds() &- t) / Double(steps)
        }))
        return rows
    }

    /// The sampler's read path (pread of an open file into a fixed buffer) against a fresh
    /// open+read+parse each time, as a naive sampler would do.
    public static func counterRead(rounds: Int = 2000) throws -> (pread: Double, reopen: Double) {
        let path = "/proc/vmstat"
        let file = try CounterFile(path: path, key: "nr_free_pages")
        var t = Clock.nanoseconds()
        for _ in 0..<rounds { blackHole(try file.read()) }
        let a = Double(Clock.nanoseconds() &- t) / Double(rounds)
        t = Clock.nanoseconds()
        for _ in 0..<rounds { blackHole(try VMStat.current()["nr_free_pages"]) }
        let b = Double(Clock.nanoseconds() &- t) / Double(rounds)
        return (a, b)
    }
}
