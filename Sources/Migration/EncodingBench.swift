#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LinuxMM
import Workloads

/// `memlab bench`'s rows for migration's encoders: the XBZRLE encoder against its C
/// reference on re-dirtied pages (a few words changed, as a guest's re-dirtied pages are),
/// the same pages, the same output buffer.
public enum EncodingBench {
    /// ns per page, Swift vs C (median of alternating rounds), over `pages` page pairs.
    public static func xbzrle(pages: Int = 8192, changedWords: Int = 8, rounds: Int = 7) throws -> Bench.Row {
        let page = 4096
        let old = try AnonymousMapping(length: pages * page)
        let new = try AnonymousMapping(length: pages * page)
        fillRandom(old.base, length: old.length, seed: 0xB0B)
        memcpy(new.base, old.base, new.length)
        var x: UInt64 = 0x5EED
        for p in 0..<pages {
            for _ in 0..<changedWords {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17
                (new.base + p * page + Int(x % 512) * 8).storeBytes(of: x, as: UInt64.self)
            }
        }
        let out = UnsafeMutableRawPointer.allocate(byteCount: page, alignment: 64)
        defer { out.deallocate() }
        var sink = 0
        let row = Bench.compare("XBZRLE encode, \(changedWords) words changed", unit: "ns/page", rounds: rounds, swift: {
            let t = Clock.nanoseconds()
            for p in 0..<pages {
                sink &+= XBZRLE.encode(old: old.base + p * page, new: new.base + p * page, count: page, into: out, capacity: page - 1)
            }
            return Double(Clock.nanoseconds() &- t) / Double(pages)
        }, c: {
            let t = Clock.nanoseconds()
            for p in 0..<pages {
                sink &+= memlab_ref_xbzrle_encode((old.base + p * page).assumingMemoryBound(to: UInt8.self),
                                                  (new.base + p * page).assumingMemoryBound(to: UInt8.self), page,
                                                  out.assumingMemoryBound(to: UInt8.self), page - 1)
            }
            return Double(Clock.nanoseconds() &- t) / Double(pages)
        })
        if sink == Int.min { print("") }   // keeps the loops' results alive
        return row
    }
}
