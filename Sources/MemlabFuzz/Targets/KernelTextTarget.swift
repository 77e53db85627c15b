import LinuxMM
import Scenarios

/// Kernel text the `reclaim` scenario parses, which a guest may hand back too: the first byte
/// picks the parser, the rest is the text. 0: memory.stat (`MemoryStat`; accepted when every
/// non-empty line is one "name number" pair); 1: a DAMOS stats directory as "name value"
/// lines (`Damon.SchemeStats`; accepted when the four counters are there); 2: /proc/kallsyms
/// (`Damon.operations`; accepted when it names an operation set); 3: /proc/vmstat through the
/// read-back classifier (`SwapinCounters.parse`; accepted when both counters are named); 4:
/// /proc/buddyinfo (`BuddyInfo`, what hugepages:defrag reads; accepted when a zone is read).
extension FuzzTarget {
    static let kernelText = FuzzTarget(name: "kerneltext", maxLen: 1 << 16, summary: "memory.stat, DAMOS stats, kallsyms, vmstat swap-in counters, buddyinfo") { data in
        var input = FuzzBytes(data)
        let mode = input.u8() % 5
        let body = input.rest()
        let text = String(decoding: body, as: UTF8.self)
        switch mode {
        case 0:
            let s = MemoryStat(text: text)
            let lines = body.split(separator: 0x0A).filter { !$0.isEmpty }
            for (k, _) in s.counters { fuzzInvariant(!k.isEmpty && !k.contains(" ") && !k.contains("\n"), "a counter name with a separator: \(k)") }
            return !lines.isEmpty && s.counters.count == lines.count
        case 1:
            var files: [String: String] = [:]
            for line in text.split(separator: "\n") {
                let f = line.split(separator: " ", maxSplits: 1)
                if f.count == 2 { files[String(f[0])] = String(f[1]) }
            }
            guard let s = Damon.SchemeStats(files: files) else { return false }
            fuzzInvariant(files["sz_applied"] != nil && files["nr_tried"] != nil, "stats read without their files: \(s)")
            return true
        case 2:
            let ops = Damon.operations(kallsyms: text)
            fuzzInvariant(Set(ops).isSubset(of: ["vaddr", "fvaddr", "paddr"]), "an operation set that does not exist: \(ops)")
            return !ops.isEmpty
        case 4:
            let b = BuddyInfo(text: text)
            for z in b.zones { fuzzInvariant(z.node >= 0 && !z.freeBlocks.isEmpty && z.freeBlocks.count <= 16, "a zone read wrong: \(z)") }
            // Saturating sums: never a trap, never less at a lower order.
            fuzzInvariant(b.freeBlocks(atLeastOrder: 0, includingDMA: true) >= b.freeBlocks(atLeastOrder: 9, includingDMA: true), "fewer pages than 2M blocks")
            return !b.zones.isEmpty
        default:
            _ = body.withMemoryRebound(to: UInt8.self) { SwapinCounters.parse($0) }
            return text.contains("zswpin ") && text.contains("pswpin ")
        }
    }
}
