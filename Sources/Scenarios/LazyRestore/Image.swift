#if canImport(Glibc)
import Glibc
#endif
import LinuxMM

/// The memory image being restored: `pages` base pages whose contents are a pure function of
/// (seed, page, word), so the workload can write the source's own value back (the page is
/// dirtied, its contents stay verifiable) and any copy can be checked word for word. A
/// fraction of pages is all zero; the destination knows which (as QEMU's zero-page flag and
/// CRIU's holes tell it), so those need no transfer.
struct PageImage: @unchecked Sendable {
    static let wordsPerPage = 512
    let pages: Int
    let seed: UInt64
    let zeroRatio: Double
    /// The image in memory (the source's copy), filled at set-up.
    let base: UnsafeMutableRawPointer
    let mapping: AnonymousMapping
    /// 1 for a page known to be zero.
    let zero: UnsafeMutablePointer<UInt8>

    init(pages: Int, seed: UInt64, zeroRatio: Double) throws {
        // Callers check their input; this is the last line that keeps a bad value from trapping.
        guard pages > 0, pages <= Int.max / 4096, zeroRatio.isFinite, (0...1).contains(zeroRatio) else {
            throw SystemError(errno: EINVAL, call: "an image of \(pages) pages with zero_ratio \(zeroRatio)")
        }
        self.pages = pages
        self.seed = seed
        self.zeroRatio = zeroRatio
        mapping = try AnonymousMapping(length: pages * 4096, kind: .base)
        base = mapping.base
        zero = .allocate(capacity: pages)
        let threshold = UInt64(zeroRatio * 1_000_000)
        for p in 0..<pages {
            let isZero = mix64(seed ^ (UInt64(p) &* 0x51_7CC1_B727_220A)) % 1_000_000 < threshold
            zero[p] = isZero ? 1 : 0
            let w = (base + p * 4096).assumingMemoryBound(to: UInt64.self)
            if isZero {
                memset(w, 0, 4096)
            } else {
                for j in 0..<PageImage.wordsPerPage { w[j] = PageImage.word(seed: seed, page: p, word: j) }
            }
        }
    }

    @inline(__always)
    static func word(seed: UInt64, page: Int, word: Int) -> UInt64 {
        mix64(seed &+ UInt64(page) &* 512 &+ UInt64(word)) | 1
    }

    @inline(__always) func isZero(_ page: Int) -> Bool { zero[page] != 0 }

    var zeroPages: Int { (0..<pages).reduce(0) { $0 + Int(zero[$1]) } }

    /// Pages of `region` (same layout) whose contents differ from the image, among those
    /// `include` accepts.
    func mismatches(_ region: UnsafeRawPointer, include: (Int) -> Bool) -> Int {
        var bad = 0
        for p in 0..<pages where include(p) {
            if memcmp(region + p * 4096, base + p * 4096, 4096) != 0 { bad += 1 }
        }
        return bad
    }

    func release() { zero.deallocate() }
}
