#if canImport(Glibc)
import Glibc
#endif
import Transfer

/// The destination's side of the migration protocol as a state machine over frames: every
/// check of what the source sends, against its HELLO, and the reply to each — but no socket,
/// no clock and no mapping (the caller maps the region once the HELLO is accepted). Both
/// `MigrationDestination.serve` and the fuzzer drive this same code.
public struct DestinationSession: Sendable {
    public enum Phase: Sendable, Equatable { case hello, pages, postcopy, finished, done }

    /// What a SWITCH asks for: where the source serves its pages, which are missing, and the
    /// workload to resume.
    public struct Switch: Sendable, Equatable {
        public var port: UInt16
        public var pending: [Int]
        public var rate: Int
        public var threads: Int
        public var hotPages: Int
    }

    public enum HelloOutcome: Sendable, Equatable {
        /// Take the image; `warning` when CPU flags are missing and ignored.
        case accept(ImageHeader, warning: String?)
        /// Answer REFUSE(`toPeer`) and fail with `reason`.
        case refuse(reason: String, toPeer: String)
    }

    public enum Step: Sendable, Equatable {
        case none
        case reply(MessageType, [UInt8])
        /// The reply to VERIFY; the migration is over (`verified` says how).
        case last(MessageType, [UInt8])
    }

    /// This machine: its arch, page size and CPU (its `regionBytes` is not used).
    public let local: ImageHeader
    public let ignoreCPUFlags: Bool
    /// The largest image this destination takes, bytes (`--max-region`).
    public let maxRegion: Int

    public private(set) var phase = Phase.hello
    public private(set) var header: ImageHeader?
    public private(set) var pageSize = 0
    public private(set) var pageCount = 0
    public private(set) var pagesReceived = 0
    public private(set) var rounds = 0
    public private(set) var bytesReceived = 0
    public private(set) var inRound = 0
    public private(set) var sourceChecksum: UInt64 = 0
    public private(set) var checksum: UInt64 = 0
    public private(set) var ignoredFlags: [String] = []
    /// Made at the first page frame.
    private var sink: PageSink?
    public var decoder: PageDecoder? { sink?.decoder }
    public var verified: Bool { phase == .done && checksum == sourceChecksum }

    public init(local: ImageHeader, ignoreCPUFlags: Bool, maxRegion: Int) {
        self.local = local
        self.ignoreCPUFlags = ignoreCPUFlags
        self.maxRegion = maxRegion
    }

    /// The first frame. Malformed (throws) or refused (returned) before anything is allocated.
    public mutating func hello(_ f: Frame) throws(WireError) -> HelloOutcome {
        guard phase == .hello else { throw .malformed("a second HELLO") }
        guard f.type == .hello else { throw .malformed("expected HELLO, got \(f.type)") }
        var r = PayloadReader(f)
        let version = try r.u32()
        if version != Wire.protocolVersion {
            let why = "source speaks protocol version \(version); this destination speaks \(Wire.protocolVersion)"
            return .refuse(reason: why, toPeer: why)
        }
        let text = f.payload.count - 4
        guard text <= Snapshot.maxHeader else { throw .malformed("HELLO header of \(text) bytes exceeds \(Snapshot.maxHeader)") }
        let h: ImageHeader
        do { h = try ImageHeader.parse(bytes: f.payload[4...]) } catch { throw .malformed("HELLO header: \(error.detail)") }
        var warning: String?
        switch h.compatibility(with: local) {
        case .compatible: break
        case .incompatible(let why): return .refuse(reason: why, toPeer: why)
        case .missingFlags(let flags):
            let why = "this CPU lacks \(flags.count) flag(s) the source had: \(CPUIdentity.list(flags))"
            if !ignoreCPUFlags { return .refuse(reason: why, toPeer: why + " (destination started without --ignore-cpu-flags)") }
            ignoredFlags = flags
            warning = "warning: \(why); going on because of --ignore-cpu-flags"
        }
        // The cap comes before any mapping: a 60-byte HELLO must not make us commit memory.
        if h.regionBytes > maxRegion {
            let why = "the image is \(h.regionBytes) bytes; this destination takes at most \(maxRegion) bytes (--max-region)"
            return .refuse(reason: why, toPeer: why)
        }
        let pages = h.regionBytes / h.pageSize
        if pages > Int(UInt32.max) {
            let why = "the image has \(pages) pages; the protocol counts pages of a round in 32 bits"
            return .refuse(reason: why, toPeer: why)
        }
        header = h
        pageSize = h.pageSize
        pageCount = pages
        phase = .pages
        return .accept(h, warning: warning)
    }

    /// One frame after the HELLO, against `region` (`pageCount × pageSize` bytes, mapped by
    /// the caller). Throws for anything the protocol does not allow at this point.
    public mutating func handle(_ f: Frame, region: UnsafeMutableRawPointer) throws(WireError) -> Step {
        guard phase == .pages || phase == .finished else {
            throw .malformed(phase == .hello ? "\(f.type) before HELLO" : phase == .postcopy ? "\(f.type) during post-copy" : "\(f.type) after VERIFY")
        }
        switch f.type {
        case .ping:
            guard f.payload.count == 8 else { throw .malformed("PING payload of \(f.payload.count) bytes (a u64 nonce: 8)") }
            return .reply(.pong, f.payload)
        case .pages, .encodedPages:
            if phase == .finished { throw .malformed("\(f.type) after FINISH") }
            try takePages(f, region: region)
            return .none
        case .roundEnd:
            if phase == .finished { throw .malformed("ROUND_END after FINISH") }
            var r = PayloadReader(f)
            let round = try r.u32(), pages = try r.u32()
            try r.end()
            // Rounds are numbered 1, 2, … with no gap: anything else is not our source.
            guard UInt64(round) == UInt64(rounds) + 1 else { throw .malformed("ROUND_END of round \(round); expected round \(rounds + 1)") }
            if UInt64(pages) != UInt64(inRound) { throw .mismatch("round \(round): source says \(pages) pages, \(inRound) arrived") }
            rounds = Int(round)
            var a = PayloadWriter()
            a.u32(round); a.u32(pages)
            inRound = 0
            return .reply(.roundAck, a.bytes)
        case .finish:
            if phase == .finished { throw .malformed("a second FINISH") }
            var r = PayloadReader(f)
            let total = try r.u64()
            try r.end()
            // Compared as u64: a count ≥ 2^63 is a mismatch, not a trap.
            if total != UInt64(pagesReceived) { throw .mismatch("source sent \(total) pages, \(pagesReceived) arrived") }
            var a = PayloadWriter()
            a.u64(UInt64(pagesReceived))
            phase = .finished
            inRound = 0
            return .reply(.resumed, a.bytes)
        case .verify:
            guard phase == .finished else { throw .malformed("VERIFY before FINISH") }
            var r = PayloadReader(f)
            sourceChecksum = try r.u64()
            try r.end()
            checksum = regionChecksum(region, length: pageCount * pageSize)
            var a = PayloadWriter()
            a.u64(checksum)
            phase = .done
            return .last(.verified, a.bytes)
        case .error:
            throw .peerError(PeerText.decode(f.payload))
        default:
            throw .malformed("unexpected \(f.type) from the source")
        }
    }

    /// PAGES or ENCODED_PAGES: the round's bound first, then the sink (every index checked
    /// before any page is copied, so a bad frame changes nothing).
    private mutating func takePages(_ f: Frame, region: UnsafeMutableRawPointer) throws(WireError) {
        if sink == nil { sink = PageSink(pageSize: pageSize, pageCount: pageCount) }
        let n = PageSink.declaredCount(f.payload)
        guard n <= pageCount - inRound else {
            throw .malformed("more pages in round \(rounds + 1) (\(UInt64(inRound) + UInt64(n))) than the region has (\(pageCount))")
        }
        let took = try sink!.take(f, region: region)
        inRound += took
        pagesReceived += took
        bytesReceived += f.payload.count + 8
    }

    /// SWITCH: between rounds (after a ROUND_ACK, or before any), the bitmap exactly the
    /// region's, its count the number of bits set, no bit past the last page; the workload's
    /// rate and threads within what memlab runs. After it only POSTCOPY's end and VERIFY.
    public mutating func switchToPostcopy(_ f: Frame) throws(WireError) -> Switch {
        guard phase == .pages else { throw .malformed("SWITCH \(phase == .hello ? "before HELLO" : "after the migration ended")") }
        guard inRound == 0 else { throw .malformed("SWITCH in the middle of round \(rounds + 1) (\(inRound) pages in)") }
        let bitmapBytes = (pageCount + 7) / 8
        guard f.payload.count == 20 + bitmapBytes else {
            throw .malformed("SWITCH of \(f.payload.count) bytes; a \(pageCount)-page region needs 20 + \(bitmapBytes)")
        }
        var r = PayloadReader(f)
        let port = try r.u32(), count = try r.u32(), rate = try r.u32(), threads = try r.u32(), hot = try r.u32()
        guard port >= 1 && port <= 65535 else { throw .malformed("SWITCH names port \(port)") }
        guard rate <= 100_000_000 else { throw .malformed("SWITCH asks for a workload of \(rate) pages/s (at most 100000000)") }
        guard threads >= 1 && threads <= 64 else { throw .malformed("SWITCH asks for \(threads) workload threads (1…64)") }
        guard hot >= 1 && UInt64(hot) <= UInt64(pageCount) else { throw .malformed("SWITCH asks for \(hot) hot pages of \(pageCount)") }
        var pending: [Int] = []
        pending.reserveCapacity(Int(min(UInt64(count), UInt64(pageCount))))
        for byte in 0..<bitmapBytes {
            let b = f.payload[20 + byte]
            if b == 0 { continue }
            for bit in 0..<8 where b & (1 << bit) != 0 {
                let page = byte * 8 + bit
                guard page < pageCount else { throw .malformed("SWITCH bitmap marks page \(page) of a \(pageCount)-page region") }
                pending.append(page)
            }
        }
        guard UInt64(pending.count) == UInt64(count) else { throw .mismatch("SWITCH says \(count) pages are missing; its bitmap marks \(pending.count)") }
        phase = .postcopy
        return Switch(port: UInt16(port), pending: pending, rate: Int(rate), threads: Int(threads), hotPages: Int(hot))
    }

    /// Post-copy is over: every missing page is in. VERIFY may follow.
    public mutating func postcopyDone() throws(WireError) {
        guard phase == .postcopy else { throw .malformed("post-copy ended outside post-copy") }
        phase = .finished
    }

    /// Pages that arrived on multifd channels since the last control message (their syncs
    /// are in): they count toward the round as if they had come on this connection.
    public mutating func channelPages(_ n: Int, bytes: Int) throws(WireError) {
        guard n >= 0, n <= pageCount - inRound else {
            throw .malformed("multifd channels delivered \(n) pages in round \(rounds + 1); the region has \(pageCount), \(inRound) already in")
        }
        inRound += n
        pagesReceived += n
        bytesReceived += bytes
    }
}

/// Page frames into a region: PAGES (u32 n, n × u64 index, n × page) and ENCODED_PAGES
/// (PageDecoder). Every index is checked before any page is copied. The control connection
/// and each multifd channel have one.
public struct PageSink: @unchecked Sendable {
    // @unchecked: the decoder is a class used only by the sink's one owner thread.
    public let pageSize: Int
    public let pageCount: Int
    public private(set) var decoder: PageDecoder?

    public init(pageSize: Int, pageCount: Int) {
        self.pageSize = pageSize
        self.pageCount = pageCount
    }

    /// The page count a frame's payload starts with (0 when too short to say).
    static func declaredCount(_ p: [UInt8]) -> Int {
        p.count >= 4 ? Int(UInt32(p[0]) | UInt32(p[1]) << 8 | UInt32(p[2]) << 16 | UInt32(p[3]) << 24) : 0
    }

    /// Applies a PAGES or ENCODED_PAGES frame; returns its page count.
    public mutating func take(_ f: Frame, region: UnsafeMutableRawPointer) throws(WireError) -> Int {
        switch f.type {
        case .pages: return try takeRaw(f.payload, region: region)
        case .encodedPages:
            if decoder == nil { decoder = PageDecoder(pageSize: pageSize) }
            guard let d = decoder else { return 0 }
            var failure: WireError?
            var n = 0
            f.payload.withUnsafeBytes { b in
                do throws(WireError) { n = try d.apply(b, region: region, pageCount: pageCount) } catch { failure = error }
            }
            if let failure { throw failure }
            return n
        default: throw .malformed("\(f.type) is not a page frame")
        }
    }

    private func takeRaw(_ p: [UInt8], region: UnsafeMutableRawPointer) throws(WireError) -> Int {
        guard p.count >= 4 else { throw .malformed("PAGES payload of \(p.count) bytes") }
        let n = Self.declaredCount(p)
        guard n >= 1, n <= Wire.pagesPerFrame else { throw .malformed("PAGES frame of \(n) pages (1…\(Wire.pagesPerFrame))") }
        // n ≤ 64 and pageSize ≤ 1 GiB (ImageHeader.parse): no overflow.
        guard p.count == 4 + n * (8 + pageSize) else {
            throw .malformed("PAGES frame of \(p.count) bytes does not hold \(n) pages of \(pageSize) bytes")
        }
        let pages = UInt64(pageCount), size = pageSize
        let bad: UInt64? = p.withUnsafeBytes { b -> UInt64? in
            for k in 0..<n {
                let idx = UInt64(littleEndian: b.loadUnaligned(fromByteOffset: 4 + 8 * k, as: UInt64.self))
                if idx >= pages { return idx }
            }
            for k in 0..<n {
                let idx = Int(UInt64(littleEndian: b.loadUnaligned(fromByteOffset: 4 + 8 * k, as: UInt64.self)))
                memcpy(region + idx * size, b.baseAddress! + 4 + 8 * n + k * size, size)
            }
            return nil
        }
        if let idx = bad { throw .malformed("page index \(idx) outside the \(pageCount)-page region") }
        return n
    }
}
