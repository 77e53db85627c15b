#if canImport(Glibc)
import Glibc
#endif
import LazyRestore
import LinuxMM
import Testing
import Transfer

/// The codec and the image on page sizes other than this kernel's: an arm64 kernel with
/// 16K or 64K pages must be measured in its own pages, never in 4096-byte ones.
@Suite struct PageSizeTests {
    static let sizes = [4096, 16384, 65536]

    @Test(arguments: sizes) func anImageHasPagesOfItsSize(pageSize: Int) throws {
        let image = try PageImage(pages: 8, seed: 7, zeroRatio: 0, pageSize: pageSize)
        #expect(image.bytes == 8 * pageSize)
        #expect(image.wordsPerPage == pageSize / 8)
        // Every word of every page is the image's own (never zero), and a copy verifies.
        let words = image.base.assumingMemoryBound(to: UInt64.self)
        for p in 0..<8 {
            #expect(words[p * image.wordsPerPage + image.wordsPerPage - 1] == PageImage.word(seed: 7, page: p, word: image.wordsPerPage - 1, wordsPerPage: image.wordsPerPage))
        }
        let copy = UnsafeMutableRawPointer.allocate(byteCount: image.bytes, alignment: 64)
        defer { copy.deallocate() }
        memcpy(copy, image.base, image.bytes)
        #expect(image.mismatches(copy) { _ in true } == 0)
        // One changed byte in the last page's last word is found in that page only.
        (copy + image.bytes - 1).storeBytes(of: 0xAB, as: UInt8.self)
        #expect(image.mismatches(copy) { _ in true } == 1)
        #expect(image.mismatches(copy) { $0 < 7 } == 0)
    }

    @Test func aPageSizeThatIsNoPowerOfTwoIsRefused() {
        #expect(throws: (any Error).self) { try PageImage(pages: 1, seed: 1, zeroRatio: 0, pageSize: 12288) }
        #expect(throws: (any Error).self) { try PageImage(pages: Int.max / 4096, seed: 1, zeroRatio: 0, pageSize: 65536) }
    }

    @Test(arguments: sizes) func helloCarriesThePageSize(pageSize: Int) {
        var hello = [UInt8](repeating: 0, count: PageWire.helloPayload)
        hello.withUnsafeMutableBytes { b in
            b.storeBytes(of: PageWire.version.littleEndian, toByteOffset: 0, as: UInt32.self)
            b.storeBytes(of: UInt32(pageSize).littleEndian, toByteOffset: 4, as: UInt32.self)
            b.storeBytes(of: UInt64(100).littleEndian, toByteOffset: 8, as: UInt64.self)
        }
        hello.withUnsafeBytes { b in
            #expect(PageWire.checkHello(b, pages: 100, pageSize: pageSize) == nil)
            // A source with other pages is refused, whichever side has the larger ones.
            #expect(PageWire.checkHello(b, pages: 100, pageSize: pageSize == 4096 ? 65536 : 4096) != nil)
        }
    }

    @Test(arguments: sizes) func aGetIsBoundedInBytesNotPages(pageSize: Int) {
        // The largest GET asks for as many pages as fit the 16 MiB payload, and no more.
        let most = PageWire.maxPages(pageSize: pageSize)
        #expect(most * pageSize == FrameHeader.maxPayload)
        func get(_ runs: [(UInt32, UInt32)]) -> Result<Int, PageWireError> {
            var p = [UInt8](repeating: 0, count: 4 + 8 * runs.count)
            p.withUnsafeMutableBytes { b in
                b.storeBytes(of: UInt32(runs.count).littleEndian, toByteOffset: 0, as: UInt32.self)
                for (k, r) in runs.enumerated() {
                    b.storeBytes(of: r.0.littleEndian, toByteOffset: 4 + 8 * k, as: UInt32.self)
                    b.storeBytes(of: r.1.littleEndian, toByteOffset: 8 + 8 * k, as: UInt32.self)
                }
            }
            return p.withUnsafeBytes { PageWire.checkGet($0.baseAddress!, length: $0.count, imagePages: 1 << 20, pageSize: pageSize) { _, _, _ in } }
        }
        #expect((try? get([(0, UInt32(most))]).get()) == most)
        #expect((try? get([(0, UInt32(most)), (UInt32(most), 1)]).get()) == nil)
    }

    @Test func aSnapshotOfOtherPagesIsNotRestoredHere() {
        var header = ImageHeader.local(regionBytes: 1 << 20, checksum: 1)
        header.pageSize = System.pageSize == 65536 ? 4096 : 65536
        guard case .incompatible(let why) = header.compatibility(with: .local(regionBytes: 1 << 20, checksum: 1)) else {
            Issue.record("an image with \(header.pageSize)-byte pages was taken on a \(System.pageSize)-byte kernel")
            return
        }
        #expect(why.contains("\(header.pageSize)-byte pages"))
        // And the header says so in its text, parsed back the same.
        #expect((try? ImageHeader.parse(header.encode()))?.pageSize == header.pageSize)
    }

    func failure(_ bytes: [UInt8]) -> FrameHeader.Malformed? {
        if case .failure(let e) = bytes.withUnsafeBytes({ FrameHeader.decode($0) }) { return e }
        return nil
    }

    @Test func framesRoundTripAndRefuseWhatIsNotOne() {
        let h = FrameHeader.encode(0x22, length: FrameHeader.maxPayload)
        #expect(h.count == FrameHeader.size)
        let d = h.withUnsafeBytes { FrameHeader.decode($0) }
        #expect((try? d.get())?.type == 0x22 && (try? d.get())?.length == FrameHeader.maxPayload)
        var long = h
        long[4] = 1   // one byte over the payload limit
        #expect(failure(long) == .tooLong(type: 0x22, length: FrameHeader.maxPayload + 1))
        var flags = h
        flags[3] = 1
        #expect(failure(flags) == .flags(type: 0x22, flags: 1))
        #expect(failure([UInt8](h.prefix(7))) == .short(7))
        var magic = h
        magic[0] = 0x4E
        #expect(failure(magic) == .magic(0x4E, 0x4C))
    }
}
