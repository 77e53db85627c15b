#if canImport(Glibc)
import Glibc
#endif
import LinuxMM

/// The memory image being restored or migrated: `pages` pages of `pageSize` bytes (the
/// kernel's base page by default) whose contents are a pure function of (seed, page, word),
/// so a workload can write the source's own value back (the page is dirtied, its contents
/// stay verifiable) and any copy can be checked word for word. A fraction of pages is all
/// zero; the destination knows which (as QEMU's zero-page flag and CRIU's holes tell it), so
/// those need no transfer. Owns its memory: both go with the last reference.
public final class PageImage: @unchecked Sendable {
    // @unchecked: every stored property is a constant; the image's bytes are written only
    // while it is made (or, wrapped, by a paused source no thread of ours writes).
    public let pages: Int
    public let pageSize: Int
    public let seed: UInt64
    public let zeroRatio: Double
    /// The image in memory (the source's copy), filled at set-up.
    public let base: UnsafeMutableRawPointer
    public let mapping: AnonymousMapping
    /// 1 for a page known to be zero.
    private let zero: UnsafeMutablePointer<UInt8>

    public var bytes: Int { pages * pageSize }
    public var wordsPerPage: Int { pageSize / 8 }

    /// `pageSize`: a power of two ≥ 512 (a unit test makes 16K and 64K images on a 4K
    /// kernel; everything else uses the kernel's).
    public init(pages: Int, seed: UInt64, zeroRatio: Double, pageSize: Int = System.pageSize) throws {
        // Callers check their input; this is the last line that keeps a bad value from trapping.
        guard pageSize >= 512, pageSize & (pageSize - 1) == 0, pages > 0, pages <= Int.max / pageSize,
              zeroRatio.isFinite, (0...1).contains(zeroRatio) else {
            throw SystemError(errno: EINVAL, call: "an image of \(pages) pages of \(pageSize) bytes with zero_ratio \(zeroRatio)")
        }
        self.pages = pages
        self.pageSize = pageSize
        self.seed = seed
        self.zeroRatio = zeroRatio
        mapping = try AnonymousMapping(length: pages * pageSize, kind: .base)
        base = mapping.base
        zero = .allocate(capacity: pages)
        let threshold = UInt64(zeroRatio * 1_000_000)
        let words = pageSize / 8
        for p in 0..<pages {
            let isZero = mix64(seed ^ (UInt64(p) &* 0x51_7CC1_B727_220A)) % 1_000_000 < threshold
            zero[p] = isZero ? 1 : 0
            let w = (base + p * pageSize).assumingMemoryBound(to: UInt64.self)
            if isZero {
                memset(w, 0, pageSize)
            } else {
                for j in 0..<words { w[j] = PageImage.word(seed: seed, page: p, word: j, wordsPerPage: words) }
            }
        }
    }

    /// An image over memory someone else owns (a migration source, paused): nothing is
    /// filled, no page is declared zero (the source did not scan for them).
    public init(wrapping mapping: AnonymousMapping, seed: UInt64 = 0) {
        self.pageSize = System.pageSize
        self.pages = mapping.length / pageSize
        self.seed = seed
        self.zeroRatio = 0
        self.mapping = mapping
        self.base = mapping.base
        self.zero = .allocate(capacity: max(pages, 1))
        self.zero.initialize(repeating: 0, count: max(pages, 1))
    }

    deinit { zero.deallocate() }

    /// Word `word` of page `page`: never zero, so a page that reads zero was not restored.
    @inline(__always)
    public static func word(seed: UInt64, page: Int, word: Int, wordsPerPage: Int = System.pageSize / 8) -> UInt64 {
        mix64(seed &+ UInt64(page) &* UInt64(wordsPerPage) &+ UInt64(word)) | 1
    }

    @inline(__always) public func isZero(_ page: Int) -> Bool { zero[page] != 0 }

    public var zeroPages: Int { (0..<pages).reduce(0) { $0 + Int(zero[$1]) } }

    /// Pages of `region` (same layout) whose contents differ from the image, among those
    /// `include` accepts.
    public func mismatches(_ region: UnsafeRawPointer, include: (Int) -> Bool) -> Int {
        var bad = 0
        for p in 0..<pages where include(p) {
            if memcmp(region + p * pageSize, base + p * pageSize, pageSize) != 0 { bad += 1 }
        }
        return bad
    }
}
