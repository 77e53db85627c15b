import LabKit

/// Page contents of a chosen entropy, for compression experiments (zswap, zram) and guest
/// images. Every page is deterministic from (seed, page index), so a page can be checked
/// after it comes back from swap.
public enum FillPattern: String, Sendable, CaseIterable, ParameterChoice {
    /// All zero bytes: the swap layer keeps these as a bit (zeromap), never compressed.
    case zero
    /// A short run repeated, page index in the first 8 bytes: unique pages that compress
    /// to almost nothing.
    case repetitive
    /// Words from a small vocabulary chosen at random: roughly what text or code looks like
    /// to a compressor (lzo: about 2-3x).
    case text
    /// xorshift output: incompressible.
    case random

    static let words: [[UInt8]] = [
        "the", "memory", "page", "kernel", "swap", "guest", "host", "of", "and", "to", "a", "in",
        "is", "that", "for", "it", "with", "as", "on", "be", "at", "by", "this", "from", "or",
        "an", "are", "which", "zswap", "balloon", "overcommit", "compress", "frontswap", "tmem",
        "virtual", "machine", "shared", "private", "fault", "reclaim", "cgroup", "limit",
        "return", "struct", "static", "int", "unsigned", "long", "void", "if", "else", "while",
    ].map { Array($0.utf8) }

    /// Fills one page at `p` (pageSize bytes) for page `index` under `seed`.
    public func fill(_ p: UnsafeMutablePointer<UInt8>, pageSize: Int, index: Int, seed: UInt64) {
        switch self {
        case .zero:
            p.update(repeating: 0, count: pageSize)
        case .repetitive:
            let run: [UInt8] = Array("memlab-repetitive-".utf8)
            for i in 0..<pageSize { p[i] = run[i % run.count] }
            var v = UInt64(index) ^ seed
            withUnsafeBytes(of: &v) { for i in 0..<8 { p[i] = $0[i] } }
        case .text:
            var x = FillPattern.mix(seed, index)
            var o = 0
            while o < pageSize {
                x = FillPattern.next(x)
                let w = FillPattern.words[Int(x % UInt64(FillPattern.words.count))]
                for b in w where o < pageSize { p[o] = b; o += 1 }
                if o < pageSize { p[o] = (x >> 32) % 11 == 0 ? 10 : 32; o += 1 }
            }
        case .random:
            var x = FillPattern.mix(seed, index)
            let words = pageSize / 8
            p.withMemoryRebound(to: UInt64.self, capacity: words) { q in
                for i in 0..<words { x = FillPattern.next(x); q[i] = x }
            }
        }
    }

    /// Whether the page at `p` holds what `fill` wrote.
    public func verify(_ p: UnsafeMutablePointer<UInt8>, scratch: UnsafeMutablePointer<UInt8>, pageSize: Int, index: Int, seed: UInt64) -> Bool {
        fill(scratch, pageSize: pageSize, index: index, seed: seed)
        return FillPattern.memcmpBytes(p, scratch, pageSize)
    }

    static func memcmpBytes(_ a: UnsafeMutablePointer<UInt8>, _ b: UnsafeMutablePointer<UInt8>, _ n: Int) -> Bool {
        for i in 0..<n where a[i] != b[i] { return false }
        return true
    }

    static func mix(_ seed: UInt64, _ index: Int) -> UInt64 {
        var z = seed &+ UInt64(index) &* 0x9E37_79B9_7F4A_7C15
        z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
        z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
        return (z ^ (z >> 31)) | 1
    }

    static func next(_ x: UInt64) -> UInt64 {
        var x = x
        x ^= x << 13
        x ^= x >> 7
        x ^= x << 17
        return x
    }
}
