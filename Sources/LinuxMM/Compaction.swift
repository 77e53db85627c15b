/// Memory compaction (mm/compaction.c): what makes a huge page out of fragmented free memory.
public enum Compaction {
    /// How hard kcompactd compacts in the background, 0–100 (5.9+; 0 turns proactive
    /// compaction off, so only allocations and kswapd wake it).
    public static let proactiveness = Knob("/proc/sys/vm/compaction_proactiveness")
    /// The free pages the kernel keeps back (the min watermark's sum), in kB.
    public static let minFreeKbytes = Knob("/proc/sys/vm/min_free_kbytes")
    /// Whether the kernel was built with CONFIG_COMPACTION: its counters are in /proc/vmstat.
    public static var isAvailable: Bool { (try? VMStat.current())?["compact_stall"] != nil }
}

/// /proc/buddyinfo: free blocks of each order, per node and zone. Fragmentation read off the
/// allocator itself: how many 2M (order-9) pieces of free memory exist is how many THPs a
/// fault can get without compacting.
public struct BuddyInfo: Sendable, Equatable {
    public struct Zone: Sendable, Equatable {
        public let node: Int
        public let zone: String
        /// Free blocks of order 0, 1, … as the kernel lists them.
        public let freeBlocks: [UInt64]
    }
    public let zones: [Zone]

    /// Lines like `Node 0, zone   Normal   5612 2494 … 628`; any other line is skipped. Text a
    /// guest hands back is hostile: at most 16 orders a zone, numbers that overflow are refused.
    public init(text: String) {
        var zones: [Zone] = []
        for line in text.split(separator: "\n") {
            let f = line.split(separator: " ", omittingEmptySubsequences: true)
            guard f.count >= 5, f.count <= 4 + 16, f[0] == "Node", f[1].hasSuffix(","), f[2] == "zone",
                  let node = Int(f[1].dropLast()), node >= 0 else { continue }
            let counts = f[4...].compactMap { UInt64($0) }
            guard counts.count == f.count - 4 else { continue }
            zones.append(Zone(node: node, zone: String(f[3]), freeBlocks: counts))
        }
        self.zones = zones
    }

    public static func current() throws(SystemError) -> BuddyInfo {
        BuddyInfo(text: try ProcFile.read("/proc/buddyinfo"))
    }

    /// Free memory in blocks of 2^order pages, counting every larger block as the blocks of
    /// that order it holds; saturates rather than overflowing. The DMA zone (the first 16 MiB,
    /// kept back from ordinary allocations by lowmem_reserve) is left out unless asked for.
    public func freeBlocks(atLeastOrder order: Int, node: Int? = nil, includingDMA: Bool = false) -> UInt64 {
        var total: UInt64 = 0
        for z in zones where (includingDMA || z.zone != "DMA") && (node == nil || z.node == node) {
            for (o, count) in z.freeBlocks.enumerated() where o >= order {
                let shift = UInt64(o - order)
                let (blocks, o1) = count.multipliedReportingOverflow(by: shift >= 63 ? .max : 1 << shift)
                let (sum, o2) = total.addingReportingOverflow(blocks)
                if o1 || o2 { return .max }
                total = sum
            }
        }
        return total
    }

    /// Free 4K pages in all, or on one node (what MemFree counts, less per-CPU lists); saturates.
    public func freePages(node: Int? = nil) -> UInt64 { freeBlocks(atLeastOrder: 0, node: node, includingDMA: true) }

    /// The same in bytes, saturating at Int.max.
    public func freeBytes(node: Int? = nil) -> Int {
        let (bytes, overflow) = freePages(node: node).multipliedReportingOverflow(by: 4096)
        return overflow ? .max : Int(clamping: bytes)
    }
}
