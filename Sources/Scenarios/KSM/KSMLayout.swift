import LinuxMM

/// How the KSM scenario fills its region: which pages are zero, which are copies of a few
/// templates (duplicate groups), which are unique — and what the kernel should report for
/// that layout. The expectation is derived from what was written, so a disagreement with
/// the kernel's counters is a finding about the kernel (or ksmd not done), not a guess.
public struct KSMLayout: Sendable, Equatable {
    public let pages: Int
    public let zeroPages: Int
    public let duplicatePages: Int
    public let groups: Int
    public var uniquePages: Int { pages - zeroPages - duplicatePages }

    public init(pages: Int, duplicateRatio: Double, zeroRatio: Double, groups: Int) {
        self.pages = pages
        self.zeroPages = Int((Double(pages) * zeroRatio).rounded())
        self.duplicatePages = min(pages - zeroPages, Int((Double(pages) * duplicateRatio).rounded()))
        self.groups = max(1, min(groups, max(duplicatePages, 1)))
    }

    /// Sizes of the duplicate groups: pages are dealt round-robin over the groups.
    public var groupSizes: [Int] {
        (0..<groups).map { g in duplicatePages / groups + (g < duplicatePages % groups ? 1 : 0) }
    }

    public struct Expectation: Sendable, Equatable {
        /// Pages of this process mapped to KSM pages (ksm_stat ksm_merging_pages).
        public let mergingPages: Int
        /// Zero-filled pages mapped to the zero page (ksm_zero_pages, use_zero_pages=1 only).
        public let zeroPages: Int
        /// KSM pages in the stable tree (pages_shared).
        public let pagesShared: Int
        /// Extra mappings of those pages (pages_sharing).
        public let pagesSharing: Int
    }

    /// `maxPageSharing` caps the sharers of one KSM page; a larger group needs
    /// ceil(k / max) KSM pages (stable node chains).
    public func expectation(useZeroPages: Bool, maxPageSharing: Int) -> Expectation {
        var sizes = groupSizes
        if !useZeroPages { sizes.append(zeroPages) }
        let s = KSMLayout.sharing(contents: sizes, maxPageSharing: maxPageSharing)
        return Expectation(mergingPages: s.merging, zeroPages: useZeroPages ? zeroPages : 0,
                           pagesShared: s.shared, pagesSharing: s.merging - s.shared)
    }

    /// What KSM makes of contents held by `contents[i]` pages each: pages merged, KSM pages
    /// (pages_shared), and the stable node chains — a content needing more than one KSM page
    /// is a chain whose dups are those KSM pages (stable_node_chains, stable_node_dups).
    public static func sharing(contents: [Int], maxPageSharing: Int) -> (merging: Int, shared: Int, chains: Int, dups: Int) {
        var merging = 0, shared = 0, chains = 0, dups = 0
        for k in contents where k >= 2 {
            // Full KSM pages of maxPageSharing sharers each; a remainder of one page has
            // nothing to pair with (a full stable node takes no more sharers), so it stays
            // unmerged in the unstable tree (mm/ksm.c, stable node chains).
            let full = k / max(maxPageSharing, 1), rest = k % max(maxPageSharing, 1)
            let ksmPages: Int
            if rest == 1 {
                merging += k - 1
                ksmPages = full
            } else {
                merging += k
                ksmPages = full + (rest > 0 ? 1 : 0)
            }
            shared += ksmPages
            if ksmPages >= 2 { chains += 1; dups += ksmPages }
        }
        return (merging, shared, chains, dups)
    }

    /// Whether page `i` is one KSM should merge: a zero page (when zero pages are merged as a
    /// content, or with use_zero_pages) or a copy in a group of at least two.
    public func merges(page i: Int) -> Bool {
        switch role(ofPage: i) {
        case .zero: return zeroPages >= 2
        case .duplicate(let g): return groupSizes[g] >= 2
        case .unique: return false
        }
    }

    public enum Role: Equatable { case zero, duplicate(group: Int), unique }

    public func role(ofPage i: Int) -> Role {
        if i < zeroPages { return .zero }
        if i < zeroPages + duplicatePages { return .duplicate(group: (i - zeroPages) % groups) }
        return .unique
    }

    /// Writes every page (so every page is faulted in and private before KSM sees it).
    /// Unique pages get a per-page pseudo-random stream; duplicates a per-group pattern.
    public func fill(_ base: UnsafeMutableRawPointer, pageSize: Int, seed: UInt64) {
        let words = pageSize / 8
        for i in 0..<pages {
            let p = (base + i * pageSize).assumingMemoryBound(to: UInt64.self)
            switch role(ofPage: i) {
            case .zero:
                for w in 0..<words { p[w] = 0 }
            case .duplicate(let g):
                var x = seed &+ 0x9E37_79B9_7F4A_7C15 &* UInt64(g + 1)
                for w in 0..<words { p[w] = splitmix(&x) }
            case .unique:
                var x = seed ^ (0xD1B5_4A32_D192_ED03 &* UInt64(i + 1)) ^ (1 << 63)
                p[0] = UInt64(i) | (1 << 63)
                for w in 1..<words { p[w] = splitmix(&x) }
            }
        }
    }
}

@inline(__always)
func splitmix(_ x: inout UInt64) -> UInt64 {
    x &+= 0x9E37_79B9_7F4A_7C15
    var z = x
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
}
