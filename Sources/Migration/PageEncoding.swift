#if canImport(Glibc)
import Glibc
#endif
import CZstd
import LinuxMM
import Transfer

/// Sending fewer bytes: the page encodings QEMU offers, as one frame format both the emulated
/// link and TCP carry (docs/migration-protocol.md, ENCODED_PAGES). Per page, the first that
/// applies: a zero page goes as its header only; a page the XBZRLE cache holds goes as a
/// delta against the copy last sent (or as "unchanged"); otherwise zstd where it makes the
/// page smaller; otherwise raw.
public struct EncodingConfig: Sendable, Equatable {
    public var zeroPages: Bool
    /// Bytes of the XBZRLE cache (0: off). QEMU's xbzrle-cache-size.
    public var xbzrleCacheBytes: Int
    /// zstd level, 0 for no compression.
    public var zstdLevel: Int
    public init(zeroPages: Bool = false, xbzrleCacheBytes: Int = 0, zstdLevel: Int = 0) {
        self.zeroPages = zeroPages
        self.xbzrleCacheBytes = xbzrleCacheBytes
        self.zstdLevel = zstdLevel
    }
    /// Nothing to encode: the link sends raw PAGES frames.
    public var isRaw: Bool { !zeroPages && xbzrleCacheBytes == 0 && zstdLevel == 0 }
    public static let levels = 1...19
}

/// How one page of an ENCODED_PAGES frame travels.
public enum PageEncodingKind: UInt8, Sendable {
    case raw = 0, zero = 1, xbzrle = 2, zstd = 3, unchanged = 4
}

public struct EncoderStats: Sendable, Equatable {
    public var pages = 0
    public var rawPages = 0
    public var zeroPages = 0
    public var xbzrlePages = 0
    public var xbzrleHits = 0
    public var xbzrleMisses = 0
    /// Deltas that would not have been smaller than the page (sent raw).
    public var xbzrleOverflows = 0
    public var xbzrleUnchanged = 0
    /// Page bytes minus delta bytes, over the pages sent as deltas.
    public var xbzrleBytesSaved = 0
    public var zstdPages = 0
    public var zstdIn = 0
    public var zstdOut = 0
    /// Page bytes the encoder read, and the bytes of page data it produced (headers included).
    public var inputBytes = 0
    public var outputBytes = 0
    /// Thread CPU seconds spent encoding (source) and decoding (destination).
    public var encodeCPU = 0.0
    public var decodeCPU = 0.0

    /// Adds another encoder's counts (multifd: one encoder a channel).
    public mutating func add(_ o: EncoderStats) {
        pages += o.pages; rawPages += o.rawPages; zeroPages += o.zeroPages
        xbzrlePages += o.xbzrlePages; xbzrleHits += o.xbzrleHits; xbzrleMisses += o.xbzrleMisses
        xbzrleOverflows += o.xbzrleOverflows; xbzrleUnchanged += o.xbzrleUnchanged; xbzrleBytesSaved += o.xbzrleBytesSaved
        zstdPages += o.zstdPages; zstdIn += o.zstdIn; zstdOut += o.zstdOut
        inputBytes += o.inputBytes; outputBytes += o.outputBytes; encodeCPU += o.encodeCPU; decodeCPU += o.decodeCPU
    }
}

func threadCPUSeconds() -> Double {
    var ts = timespec()
    clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts)
    return Double(ts.tv_sec) + Double(ts.tv_nsec) / 1e9
}

/// XBZRLE, QEMU's delta format (migration/xbzrle.c): a sequence of (unchanged-run length,
/// changed-run length, changed bytes), lengths in ULEB128; the first unchanged run may be 0,
/// a changed run never is; a trailing unchanged run is not written.
public enum XBZRLE {
    /// Encodes `new` against `old` (`count` bytes each) into `dst` (at most `capacity`
    /// bytes): the encoded length; 0 when the two are equal; -1 when it would not fit
    /// (overflow). The same loop as `memlab_ref_xbzrle_encode`, its yardstick in `memlab bench`.
    @inline(__always)
    public static func encode(old: UnsafeRawPointer, new: UnsafeRawPointer, count slen: Int,
                              into dst: UnsafeMutableRawPointer, capacity dlen: Int) -> Int {
        let o = old.assumingMemoryBound(to: UInt8.self), n = new.assumingMemoryBound(to: UInt8.self)
        let out = dst.assumingMemoryBound(to: UInt8.self)
        var i = 0, d = 0
        while i < slen {
            let start = i
            while i < slen && (slen - i) & 7 != 0 && o[i] == n[i] { i += 1 }
            if (slen - i) & 7 == 0 {
                while i < slen && old.loadUnaligned(fromByteOffset: i, as: UInt64.self) == new.loadUnaligned(fromByteOffset: i, as: UInt64.self) { i += 8 }
                while i < slen && o[i] == n[i] { i += 1 }
            }
            if i - start == slen { return 0 }
            if i == slen { return d }
            if d + 8 > dlen { return -1 }
            d += uleb(out + d, UInt64(i - start))
            let nz = i
            while i < slen && (slen - i) & 7 != 0 && o[i] != n[i] { i += 1 }
            if (slen - i) & 7 == 0 {
                let lo: UInt64 = 0x0101_0101_0101_0101, hi: UInt64 = 0x8080_8080_8080_8080
                while i < slen {
                    let x = old.loadUnaligned(fromByteOffset: i, as: UInt64.self) ^ new.loadUnaligned(fromByteOffset: i, as: UInt64.self)
                    if (x &- lo) & ~x & hi != 0 {
                        while o[i] != n[i] { i += 1 }
                        break
                    }
                    i += 8
                }
            }
            let len = i - nz
            if d + 8 + len > dlen { return -1 }
            d += uleb(out + d, UInt64(len))
            memcpy(dst + d, new + nz, len)
            d += len
        }
        return d
    }

    @inline(__always)
    static func uleb(_ p: UnsafeMutablePointer<UInt8>, _ value: UInt64) -> Int {
        var v = value, k = 0
        repeat {
            let b = UInt8(v & 0x7F)
            v >>= 7
            p[k] = b | (v != 0 ? 0x80 : 0)
            k += 1
        } while v != 0
        return k
    }

    /// Applies a delta to `page` (`pageSize` bytes, holding the old copy). Every length is
    /// checked against the page and the input first: a hostile delta is a reason, never a
    /// write outside the page. `nil` when it applied.
    public static func decode(_ src: UnsafeRawBufferPointer, into page: UnsafeMutableRawPointer, pageSize: Int) -> String? {
        var i = 0, d = 0
        func read() -> Int? {
            var v = 0, shift = 0
            while i < src.count && shift < 35 {
                let b = src[i]
                i += 1
                v |= Int(b & 0x7F) << shift
                if b & 0x80 == 0 { return v }
                shift += 7
            }
            return nil
        }
        var first = true
        while i < src.count {
            guard let z = read() else { return "unchanged-run length truncated or too long at byte \(i)" }
            if z == 0 && !first { return "an empty unchanged run after the first" }
            first = false
            guard z <= pageSize - d else { return "unchanged run of \(z) bytes passes the end of the page at \(d)" }
            d += z
            guard let nzr = read() else { return "changed-run length truncated or too long at byte \(i)" }
            guard nzr > 0 else { return "an empty changed run at page offset \(d)" }
            guard nzr <= pageSize - d else { return "changed run of \(nzr) bytes passes the end of the page at \(d)" }
            guard nzr <= src.count - i else { return "changed run of \(nzr) bytes, only \(src.count - i) left in the delta" }
            memcpy(page + d, src.baseAddress! + i, nzr)
            d += nzr
            i += nzr
        }
        return nil
    }
}

/// QEMU's XBZRLE page cache: direct-mapped by page index, a power-of-two number of slots,
/// each holding the copy of a page last sent (the destination holds the same copy).
final class XBZRLECache {
    let slots: Int
    let pageSize: Int
    let data: UnsafeMutableRawPointer
    var tags: [Int]

    init(bytes: Int, pageSize: Int) {
        var n = 1
        while n * 2 * pageSize <= bytes { n *= 2 }
        slots = n
        self.pageSize = pageSize
        data = .allocate(byteCount: n * pageSize, alignment: 64)
        tags = [Int](repeating: -1, count: n)
    }
    deinit { data.deallocate() }

    @inline(__always) func slot(_ page: Int) -> Int { page & (slots - 1) }
    @inline(__always) func copy(_ s: Int) -> UnsafeMutableRawPointer { data + s * pageSize }
}

/// The source's encoder: one per link, one thread.
public final class PageEncoder {
    public let config: EncodingConfig
    public let pageSize: Int
    public private(set) var stats = EncoderStats()
    let cache: XBZRLECache?
    /// The page as it is encoded: the live page may change while it is read, and what is
    /// sent, what is cached and what the destination rebuilds must be one and the same copy.
    let current: UnsafeMutableRawPointer
    let cctx: OpaquePointer?

    public init(config: EncodingConfig, pageSize: Int) {
        self.config = config
        self.pageSize = pageSize
        cache = config.xbzrleCacheBytes >= pageSize ? XBZRLECache(bytes: config.xbzrleCacheBytes, pageSize: pageSize) : nil
        current = .allocate(byteCount: pageSize, alignment: 64)
        cctx = config.zstdLevel > 0 ? ZSTD_createCCtx() : nil
    }
    deinit {
        current.deallocate()
        if let cctx { ZSTD_freeCCtx(cctx) }
    }

    /// The most bytes a frame of `n` pages can take.
    public static func frameCapacity(pages n: Int, pageSize: Int) -> Int { 4 + n * (13 + pageSize) }

    /// Encodes `pages` (at most `Wire.pagesPerFrame`) of `source` into `out` as an
    /// ENCODED_PAGES payload; returns its length.
    public func encodeFrame(_ pages: ArraySlice<Int>, from source: UnsafeRawPointer, into out: UnsafeMutableRawPointer) -> Int {
        let cpu0 = threadCPUSeconds()
        out.storeBytes(of: UInt32(pages.count).littleEndian, as: UInt32.self)
        var at = 4
        for index in pages {
            memcpy(current, source + index * pageSize, pageSize)
            out.storeBytes(of: UInt64(index).littleEndian, toByteOffset: at, as: UInt64.self)
            let kindAt = at + 8, lenAt = at + 9, data = out + at + 13
            let (kind, len) = encodePage(index, into: data)
            out.storeBytes(of: kind.rawValue, toByteOffset: kindAt, as: UInt8.self)
            out.storeBytes(of: UInt32(len).littleEndian, toByteOffset: lenAt, as: UInt32.self)
            at += 13 + len
        }
        stats.pages += pages.count
        stats.inputBytes += pages.count * pageSize
        stats.outputBytes += at
        stats.encodeCPU += threadCPUSeconds() - cpu0
        return at
    }

    private func isZero(_ p: UnsafeRawPointer) -> Bool {
        var i = 0
        while i < pageSize {
            if p.loadUnaligned(fromByteOffset: i, as: UInt64.self) != 0 { return false }
            i += 8
        }
        return true
    }

    private func encodePage(_ index: Int, into data: UnsafeMutableRawPointer) -> (PageEncodingKind, Int) {
        if config.zeroPages && isZero(current) {
            stats.zeroPages += 1
            // The cached copy must stay the destination's copy (QEMU's xbzrle_cache_zero_page).
            if let c = cache, c.tags[c.slot(index)] == index { memset(c.copy(c.slot(index)), 0, pageSize) }
            return (.zero, 0)
        }
        if let c = cache {
            let s = c.slot(index)
            if c.tags[s] == index {
                stats.xbzrleHits += 1
                let cached = c.copy(s)
                let n = XBZRLE.encode(old: cached, new: current, count: pageSize, into: data, capacity: pageSize - 1)
                memcpy(cached, current, pageSize)
                if n == 0 { stats.xbzrleUnchanged += 1; return (.unchanged, 0) }
                if n > 0 {
                    stats.xbzrlePages += 1
                    stats.xbzrleBytesSaved += pageSize - n
                    return (.xbzrle, n)
                }
                stats.xbzrleOverflows += 1
            } else {
                stats.xbzrleMisses += 1
                c.tags[s] = index
                memcpy(c.copy(s), current, pageSize)
            }
        }
        if let cctx {
            let n = ZSTD_compressCCtx(cctx, data, pageSize - 1, current, pageSize, Int32(config.zstdLevel))
            if ZSTD_isError(n) == 0 && n > 0 {
                stats.zstdPages += 1
                stats.zstdIn += pageSize
                stats.zstdOut += n
                return (.zstd, n)
            }
        }
        memcpy(data, current, pageSize)
        stats.rawPages += 1
        return (.raw, pageSize)
    }
}

/// The destination's decoder of ENCODED_PAGES: the whole frame is checked and decoded into a
/// staging area before any page of the region changes, so a bad frame changes nothing.
public final class PageDecoder: @unchecked Sendable {
    // @unchecked: one owner thread (the destination's session) uses it.
    public let pageSize: Int
    public private(set) var decodeCPU = 0.0
    public private(set) var pagesDecoded = 0
    private let staging: UnsafeMutableRawPointer
    private var dctx: OpaquePointer?
    private var indices = [Int](repeating: 0, count: Wire.pagesPerFrame)
    private var kinds = [PageEncodingKind](repeating: .raw, count: Wire.pagesPerFrame)

    public init(pageSize: Int) {
        self.pageSize = pageSize
        staging = .allocate(byteCount: Wire.pagesPerFrame * pageSize, alignment: 64)
    }
    deinit {
        staging.deallocate()
        if let dctx { ZSTD_freeDCtx(dctx) }
    }

    /// Applies one frame to `region` (`pageCount` pages); returns the number of pages.
    public func apply(_ p: UnsafeRawBufferPointer, region: UnsafeMutableRawPointer, pageCount: Int) throws(WireError) -> Int {
        let cpu0 = threadCPUSeconds()
        defer { decodeCPU += threadCPUSeconds() - cpu0 }
        guard p.count >= 4 else { throw .malformed("ENCODED_PAGES payload of \(p.count) bytes") }
        let n = Int(UInt32(littleEndian: p.loadUnaligned(as: UInt32.self)))
        guard n >= 1, n <= Wire.pagesPerFrame else { throw .malformed("ENCODED_PAGES frame of \(n) pages (1…\(Wire.pagesPerFrame))") }
        var at = 4
        for k in 0..<n {
            guard p.count - at >= 13 else { throw .malformed("ENCODED_PAGES: page \(k) of \(n) has no header (frame ends at byte \(p.count))") }
            let raw = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: at, as: UInt64.self))
            guard raw < UInt64(pageCount) else { throw .malformed("page index \(raw) outside the \(pageCount)-page region") }
            let index = Int(raw)
            guard let kind = PageEncodingKind(rawValue: p[at + 8]) else { throw .malformed("page \(index): unknown encoding \(p[at + 8])") }
            let len = Int(UInt32(littleEndian: p.loadUnaligned(fromByteOffset: at + 9, as: UInt32.self)))
            at += 13
            guard len <= p.count - at else { throw .malformed("page \(index): \(len) data bytes, \(p.count - at) left in the frame") }
            for j in 0..<k where indices[j] == index { throw .malformed("page \(index) twice in one frame") }
            let data = UnsafeRawBufferPointer(rebasing: p[at..<(at + len)])
            let out = staging + k * pageSize
            switch kind {
            case .raw:
                guard len == pageSize else { throw .malformed("page \(index): raw page of \(len) bytes (page size \(pageSize))") }
                memcpy(out, data.baseAddress!, pageSize)
            case .zero, .unchanged:
                guard len == 0 else { throw .malformed("page \(index): \(kind) page with \(len) data bytes") }
                if kind == .zero { memset(out, 0, pageSize) }
            case .xbzrle:
                guard len > 0, len < pageSize else { throw .malformed("page \(index): XBZRLE delta of \(len) bytes") }
                memcpy(out, region + index * pageSize, pageSize)
                if let why = XBZRLE.decode(data, into: out, pageSize: pageSize) { throw .malformed("page \(index): XBZRLE delta does not decode: \(why)") }
            case .zstd:
                guard len > 0, len < pageSize else { throw .malformed("page \(index): zstd payload of \(len) bytes") }
                if dctx == nil { dctx = ZSTD_createDCtx() }
                guard let d = dctx else { throw .malformed("page \(index): cannot create a zstd context") }
                let got = ZSTD_decompressDCtx(d, out, pageSize, data.baseAddress!, len)
                if ZSTD_isError(got) != 0 {
                    throw .malformed("page \(index): zstd payload does not decode: \(String(cString: ZSTD_getErrorName(got)))")
                }
                guard got == pageSize else { throw .malformed("page \(index): zstd payload decodes to \(got) bytes, not a page of \(pageSize)") }
            }
            indices[k] = index
            kinds[k] = kind
            at += len
        }
        guard at == p.count else { throw .malformed("ENCODED_PAGES frame has \(p.count - at) bytes after its \(n) pages") }
        for k in 0..<n where kinds[k] != .unchanged {
            memcpy(region + indices[k] * pageSize, staging + k * pageSize, pageSize)
        }
        pagesDecoded += n
        return n
    }
}
