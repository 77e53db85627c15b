#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import Migration
import Testing
import Transfer

/// The page encodings (zero pages, XBZRLE, zstd) without a kernel: the Swift XBZRLE encoder
/// against its C reference, round trips through the destination's decoder, and the decoder's
/// refusals, each leaving the region as it was.
@Suite struct PageEncoding {
    struct Rng {
        var x: UInt64
        mutating func next() -> UInt64 { x ^= x << 13; x ^= x >> 7; x ^= x << 17; return x }
    }

    static let page = 4096

    /// Random pages with random changes (single bytes, words, runs, none, everything): the
    /// Swift encoder writes exactly the C reference's bytes, and the decoder rebuilds the page.
    @Test func xbzrleMatchesTheCReferenceAndRoundTrips() {
        var rng = Rng(x: 0x1234_5678_9ABC_DEF1)
        let old = UnsafeMutableRawPointer.allocate(byteCount: Self.page, alignment: 64)
        let new = UnsafeMutableRawPointer.allocate(byteCount: Self.page, alignment: 64)
        let a = UnsafeMutableRawPointer.allocate(byteCount: Self.page, alignment: 64)
        let b = UnsafeMutableRawPointer.allocate(byteCount: Self.page, alignment: 64)
        defer { old.deallocate(); new.deallocate(); a.deallocate(); b.deallocate() }
        var kinds = [0, 0, 0]   // unchanged, delta, overflow
        for trial in 0..<2000 {
            for i in 0..<(Self.page / 8) { old.storeBytes(of: rng.next(), toByteOffset: i * 8, as: UInt64.self) }
            memcpy(new, old, Self.page)
            if trial % 5 == 0 {   // everything rewritten: the delta cannot be smaller than the page
                for i in 0..<(Self.page / 8) { new.storeBytes(of: rng.next(), toByteOffset: i * 8, as: UInt64.self) }
            }
            let changes = trial % 7 == 0 || trial % 5 == 0 ? 0 : Int(rng.next() % 40)
            for _ in 0..<changes {
                let at = Int(rng.next() % UInt64(Self.page))
                let len = Int(rng.next() % 24) + 1
                for k in at..<min(at + len, Self.page) { new.storeBytes(of: UInt8(truncatingIfNeeded: rng.next()), toByteOffset: k, as: UInt8.self) }
            }
            let cap = Self.page - 1
            let swift = XBZRLE.encode(old: old, new: new, count: Self.page, into: a, capacity: cap)
            let c = memlab_ref_xbzrle_encode(old.assumingMemoryBound(to: UInt8.self), new.assumingMemoryBound(to: UInt8.self),
                                             Self.page, b.assumingMemoryBound(to: UInt8.self), cap)
            #expect(swift == c, "trial \(trial): Swift \(swift) bytes, C \(c)")
            if swift > 0 {
                #expect(memcmp(a, b, swift) == 0, "trial \(trial): encodings differ")
                let page = UnsafeMutableRawPointer.allocate(byteCount: Self.page, alignment: 64)
                defer { page.deallocate() }
                memcpy(page, old, Self.page)
                #expect(XBZRLE.decode(UnsafeRawBufferPointer(start: a, count: swift), into: page, pageSize: Self.page) == nil)
                #expect(memcmp(page, new, Self.page) == 0, "trial \(trial): decoded page differs")
            }
            kinds[swift == 0 ? 0 : swift > 0 ? 1 : 2] += 1
        }
        #expect(kinds.allSatisfy { $0 > 50 }, "every outcome exercised: \(kinds)")
    }

    /// Rounds of re-dirtied pages through encoder and decoder with every encoding on: the
    /// destination equals the source after each round, and each kind of page occurred.
    @Test(arguments: [(true, 64 << 10, 0), (false, 256 << 10, 3), (true, 0, 1), (true, 1 << 20, 1)])
    func encodedRoundsRebuildTheSourceExactly(zero: Bool, cache: Int, level: Int) throws {
        let pages = 256
        let source = UnsafeMutableRawPointer.allocate(byteCount: pages * Self.page, alignment: 64)
        let dest = UnsafeMutableRawPointer.allocate(byteCount: pages * Self.page, alignment: 64)
        defer { source.deallocate(); dest.deallocate() }
        fillImage(source, length: pages * Self.page, seed: 7, zeroRatio: 0.2, compressibility: 0.5)
        memset(dest, 0xEE, pages * Self.page)
        let encoder = PageEncoder(config: EncodingConfig(zeroPages: zero, xbzrleCacheBytes: cache, zstdLevel: level), pageSize: Self.page)
        let decoder = PageDecoder(pageSize: Self.page)
        let frame = UnsafeMutableRawPointer.allocate(byteCount: PageEncoder.frameCapacity(pages: 64, pageSize: Self.page), alignment: 64)
        defer { frame.deallocate() }
        var rng = Rng(x: 99)
        var toSend = Array(0..<pages)
        for round in 0..<6 {
            var i = 0
            while i < toSend.count {
                let end = min(i + 64, toSend.count)
                let n = encoder.encodeFrame(toSend[i..<end], from: source, into: frame)
                #expect(try decoder.apply(UnsafeRawBufferPointer(start: frame, count: n), region: dest, pageCount: pages) == end - i)
                i = end
            }
            #expect(memcmp(source, dest, pages * Self.page) == 0, "round \(round): destination differs")
            // Re-dirty a third of the pages: a few words each; some rewritten unchanged.
            toSend = (0..<pages).filter { _ in rng.next() % 3 == 0 }
            for p in toSend where rng.next() % 4 != 0 {
                for _ in 0..<3 { (source + p * Self.page + Int(rng.next() % 512) * 8).storeBytes(of: rng.next(), as: UInt64.self) }
            }
        }
        let s = encoder.stats
        if zero { #expect(s.zeroPages > 0) }
        if cache >= pages * Self.page { #expect(s.xbzrlePages > 0 && s.xbzrleUnchanged > 0 && s.xbzrleBytesSaved > 0, "\(s)") }
        if cache > 0 && cache < pages * Self.page { #expect(s.xbzrleMisses > pages, "a small cache misses again: \(s)") }
        if level > 0 { #expect(s.zstdPages > 0 && s.zstdOut < s.zstdIn, "\(s)") }
        #expect(s.outputBytes < s.inputBytes)
    }

    /// Frames a hostile source could send: each is refused with the page and the reason, and
    /// no page of the region changes — not even the good page before the bad one.
    @Test func hostileFramesAreRefusedAndChangeNothing() {
        let pages = 4
        let region = UnsafeMutableRawPointer.allocate(byteCount: pages * Self.page, alignment: 64)
        defer { region.deallocate() }
        memset(region, 0x5A, pages * Self.page)
        let decoder = PageDecoder(pageSize: Self.page)
        func rec(_ index: UInt64, _ kind: UInt8, _ data: [UInt8]) -> [UInt8] {
            var r: [UInt8] = []
            withUnsafeBytes(of: index.littleEndian) { r += $0 }
            r.append(kind)
            withUnsafeBytes(of: UInt32(data.count).littleEndian) { r += $0 }
            return r + data
        }
        func frame(_ recs: [[UInt8]], count: UInt32? = nil) -> [UInt8] {
            var f: [UInt8] = []
            withUnsafeBytes(of: (count ?? UInt32(recs.count)).littleEndian) { f += $0 }
            return f + recs.joined()
        }
        let good = rec(0, 0, [UInt8](repeating: 1, count: Self.page))
        let cases: [(String, [UInt8], String)] = [
            ("index past the region", frame([good, rec(4, 1, [])]), "page index 4"),
            ("index 2^64-1", frame([good, rec(UInt64.max, 1, [])]), "outside"),
            ("unknown kind", frame([good, rec(1, 7, [])]), "unknown encoding 7"),
            ("raw page too short", frame([good, rec(1, 0, [1, 2, 3])]), "raw page of 3 bytes"),
            ("zero page with data", frame([good, rec(1, 1, [0])]), "zero page with 1 data bytes"),
            ("delta past the page", frame([good, rec(1, 2, [0xFA, 0x1F, 0x08] + [UInt8](repeating: 9, count: 8))]), "passes the end of the page"),
            ("delta's run past its data", frame([good, rec(1, 2, [0x00, 0x20, 1, 2])]), "only 2 left"),
            ("delta with an empty changed run", frame([good, rec(1, 2, [0x00, 0x00])]), "empty changed run"),
            ("delta length never ends", frame([good, rec(1, 2, [0x80, 0x80, 0x80, 0x80, 0x80, 0x80])]), "truncated or too long"),
            ("zstd garbage", frame([good, rec(1, 3, [0x28, 0xB5, 0x2F, 0xFD] + [UInt8](repeating: 0, count: 12))]), "does not decode"),
            ("duplicate index", frame([good, rec(0, 1, [])]), "page 0 twice"),
            ("count says more pages", frame([good], count: 2), "has no header"),
            ("count zero", frame([], count: 0), "frame of 0 pages"),
            ("count over 64", frame([good], count: 65), "frame of 65 pages"),
            ("length past the frame", Array(frame([rec(1, 2, [0, 8] + [UInt8](repeating: 1, count: 8))]).dropLast(3)), "left in the frame"),
            ("trailing bytes", frame([good]) + [0], "1 bytes after"),
        ]
        for (name, bytes, want) in cases {
            var message = ""
            do {
                _ = try bytes.withUnsafeBytes { try decoder.apply($0, region: region, pageCount: pages) }
                Issue.record("\(name): accepted")
            } catch {
                message = String(describing: error)
            }
            #expect(message.contains(want), "\(name): \(message)")
            for k in 0..<(pages * Self.page) where region.load(fromByteOffset: k, as: UInt8.self) != 0x5A {
                Issue.record("\(name): byte \(k) of the region changed")
                break
            }
        }
    }
}
