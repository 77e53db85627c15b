#if canImport(Glibc)
import Glibc
#endif
import LinuxMM
import Synchronization
import CLinuxMM
import Transfer

/// The migration protocol (docs/migration-protocol.md): Transfer's frames (`FrameHeader`)
/// over one TCP connection, with the message types below.
public enum Wire {
    public static let protocolVersion: UInt32 = 1
    public static let pagesPerFrame = 64
    /// Payload bytes a connection's reader queues ahead of the protocol before it stops
    /// reading (TCP flow control then holds the peer): a peer that sends faster than this side
    /// handles its frames costs at most this much memory, not all it sends. It also bounds the
    /// delay stage: bandwidth × one-way delay above it is held back by the sender.
    public static let maxQueuedBytes = 128 << 20
}

public enum MessageType: UInt8, Sendable, CustomStringConvertible {
    case hello = 1, welcome = 2, refuse = 3, pages = 4, roundEnd = 5, roundAck = 6
    case finish = 7, resumed = 8, verify = 9, verified = 10, error = 11, ping = 12, pong = 13
    /// Pages as `PageEncoder` writes them (zero, XBZRLE delta, zstd or raw, per page).
    case encodedPages = 14
    /// Multifd: CHANNELS(u32 n, u64 token) on the control connection; CHANNEL_HELLO(u64 token,
    /// u32 index, u32 n) first on each channel; CHANNEL_SYNC(u32 sequence, u32 pages, u32 last)
    /// on each channel before ROUND_END and FINISH; CHANNELS_READY(u32 n) back.
    case channels = 15, channelHello = 16, channelSync = 17, channelsReady = 18
    /// Post-copy between two processes: SWITCH(u32 port, u32 pending, u32 rate, u32 threads,
    /// u32 hot pages, bitmap); POSTCOPY_RESUMED(u32 pending); PROGRESS(u64 installed);
    /// POSTCOPY_DONE(7 × u64: installed, remote faults, reconnects, paused ns, re-requested
    /// pages, fetched bytes, destination writes).
    case switchToPostcopy = 19, postcopyResumed = 20, progress = 21, postcopyDone = 22
    public var description: String {
        switch self {
        case .hello: "HELLO"; case .welcome: "WELCOME"; case .refuse: "REFUSE"; case .pages: "PAGES"
        case .roundEnd: "ROUND_END"; case .roundAck: "ROUND_ACK"; case .finish: "FINISH"; case .resumed: "RESUMED"
        case .verify: "VERIFY"; case .verified: "VERIFIED"; case .error: "ERROR"; case .ping: "PING"; case .pong: "PONG"
        case .encodedPages: "ENCODED_PAGES"
        case .channels: "CHANNELS"; case .channelHello: "CHANNEL_HELLO"; case .channelSync: "CHANNEL_SYNC"; case .channelsReady: "CHANNELS_READY"
        case .switchToPostcopy: "SWITCH"; case .postcopyResumed: "POSTCOPY_RESUMED"; case .progress: "PROGRESS"; case .postcopyDone: "POSTCOPY_DONE"
        }
    }
}

public struct Frame: Sendable {
    public let type: MessageType
    public let payload: [UInt8]
    public init(type: MessageType, payload: [UInt8]) { self.type = type; self.payload = payload }
}

public enum WireError: Error, CustomStringConvertible, Equatable {
    /// A call the kernel refused, with its errno.
    case system(SystemError)
    /// An argument this side was given that it cannot use (a timeout out of range).
    case invalid(String)
    case timeout(String)
    case peerClosed(String)
    case malformed(String)
    case refused(String)
    case peerError(String)
    case mismatch(String)
    public var description: String {
        switch self {
        case .system(let e): return e.description
        case .invalid(let s): return s
        case .timeout(let s): return "timeout: \(s)"
        case .peerClosed(let s): return "peer closed the connection: \(s)"
        case .malformed(let s): return "malformed message: \(s)"
        case .refused(let s): return "refused: \(s)"
        case .peerError(let s): return "the other side failed: \(s)"
        case .mismatch(let s): return "verification failed: \(s)"
        }
    }

    /// A socket's failure in the protocol's terms: errno kept.
    public init(_ e: SocketError) {
        switch e {
        case .system(let s): self = .system(s)
        case .timeout(let s): self = .timeout(s)
        case .address(let s): self = .invalid(s)
        }
    }
}

/// Little-endian encoding of the payload fields.
struct PayloadWriter {
    var bytes: [UInt8] = []
    mutating func u32(_ v: UInt32) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    mutating func u64(_ v: UInt64) { withUnsafeBytes(of: v.littleEndian) { bytes += $0 } }
    mutating func text(_ s: String) { bytes += Array(s.utf8) }
}

struct PayloadReader {
    let bytes: [UInt8]
    var at = 0
    let what: String
    init(_ f: Frame) { bytes = f.payload; what = f.type.description }
    mutating func u32() throws(WireError) -> UInt32 {
        guard bytes.count - at >= 4 else { throw .malformed("\(what) payload ends early (\(bytes.count) bytes)") }
        var v: UInt32 = 0
        for i in 0..<4 { v |= UInt32(bytes[at + i]) << (8 * i) }
        at += 4
        return v
    }
    mutating func u64() throws(WireError) -> UInt64 {
        guard bytes.count - at >= 8 else { throw .malformed("\(what) payload ends early (\(bytes.count) bytes)") }
        var v: UInt64 = 0
        for i in 0..<8 { v |= UInt64(bytes[at + i]) << (8 * i) }
        at += 8
        return v
    }
    func end() throws(WireError) { if at != bytes.count { throw .malformed("\(what) payload has \(bytes.count - at) extra bytes") } }
}

/// One end of a migration connection. A reader thread takes frames off the socket as they
/// arrive and stamps them; `receive` hands each out no earlier than its arrival plus the
/// delay stage's one-way delay (memlab's stand-in for netem where the kernel has none), and
/// no later than the deadline: a silent or dead peer is an error, never a hang. The reader
/// queues at most `Wire.maxQueuedBytes` ahead of the protocol (payload plus 64 bytes a frame).
public final class WireConnection: Sendable {
    /// A FIFO with a head index (taking the first is O(1): a flood of small frames must not
    /// make each receive move the whole queue), compacted as it drains.
    private struct Queue {
        var frames: [(UInt64, Result<Frame, WireError>)] = []
        var head = 0
        var bytes = 0
        var readerWaiting = false

        mutating func append(_ e: (UInt64, Result<Frame, WireError>)) { frames.append(e) }
        mutating func takeFirst() -> (UInt64, Result<Frame, WireError>) {
            let e = frames[head]
            head += 1
            if head >= 1024 && head * 2 >= frames.count { frames.removeFirst(head); head = 0 }
            return e
        }
        mutating func putBack(_ e: (UInt64, Result<Frame, WireError>)) {
            if head > 0 { head -= 1; frames[head] = e } else { frames.insert(e, at: 0) }
        }
    }

    /// What a queued frame costs against `Wire.maxQueuedBytes`: its payload and its own keep,
    /// so a flood of empty frames is bounded too.
    static func queuedCost(_ payloadBytes: Int) -> Int { 64 + payloadBytes }

    public let socket: Socket
    public var fd: Int32 { socket.fd }
    public let delayNS: UInt64
    public let timeoutS: Double
    private let queue = Lock<Queue>(Queue())
    /// Posted once per queued frame.
    private let arrived = Semaphore()
    /// Posted when the queue has room again (or the connection closes) for a waiting reader.
    private let space = Semaphore()
    private let reader = Lock<OSThread?>(nil)
    private let closedFlag = Atomic<Bool>(false)
    private let sent = Atomic<Int>(0)
    public var bytesSent: Int { sent.load(ordering: .relaxed) }

    /// `timeoutS` must be a `Deadline.valid` one, `delayNS` at most a minute: the CLI checks
    /// both, and a bad value here is refused rather than turned into a trap or a hang.
    public init(socket: Socket, delayNS: UInt64, timeoutS: Double) throws(WireError) {
        guard Deadline.valid(timeoutS) else { throw .invalid("timeout \(timeoutS) s is outside 0 < t ≤ \(Deadline.maxS)") }
        guard delayNS <= 60_000_000_000 else { throw .invalid("delay stage of \(delayNS) ns exceeds 60 s") }
        self.socket = socket
        self.delayNS = delayNS
        self.timeoutS = timeoutS
        socket.setNoDelay()
        socket.setTimeouts(seconds: timeoutS, receive: false)
        do throws(SystemError) {
            let t = try OSThread { [self] in self.readLoop() }
            reader.withLock { $0 = t }
        } catch {
            throw .system(SystemError(errno: error.errno, call: "pthread_create (connection reader)"))
        }
    }

    deinit { close() }

    /// Ends the connection: the reader is stopped and joined, the socket closed (once).
    public func close() {
        if closedFlag.exchange(true, ordering: .acquiringAndReleasing) { return }
        socket.shutdown()
        space.post()   // a reader waiting for room sees the close
        reader.withLock { $0 }?.join()
        socket.close()
    }

    private func readExactly(_ p: UnsafeMutableRawPointer, _ n: Int) -> Int {
        var done = 0
        while done < n {
            let r = recv(fd, p + done, n - done, 0)
            if r < 0 { if errno == EINTR { continue }; return done == 0 ? -1 : done }
            if r == 0 { return done }
            done += r
        }
        return done
    }

    /// Queues a frame; returns false when the connection closed while waiting for room.
    private func push(_ r: Result<Frame, WireError>) -> Bool {
        let size: Int
        if case .success(let f) = r { size = Self.queuedCost(f.payload.count) } else { size = 0 }
        let full = queue.withLock { q -> Bool in
            q.append((Clock.nanoseconds(), r))
            q.bytes += size
            if q.bytes > Wire.maxQueuedBytes { q.readerWaiting = true; return true }
            return false
        }
        arrived.post()
        if full {
            space.wait()
            if closedFlag.load(ordering: .acquiring) { return false }
        }
        return true
    }

    private func readLoop() {
        var header = [UInt8](repeating: 0, count: FrameHeader.size)
        while true {
            let got = header.withUnsafeMutableBytes { readExactly($0.baseAddress!, FrameHeader.size) }
            if got == 0 { _ = push(.failure(.peerClosed("end of stream"))); return }
            if got < 0 {
                let e = errno
                _ = push(.failure(closedFlag.load(ordering: .relaxed) ? .peerClosed("connection closed locally")
                    : .peerClosed("recv: \(SystemError(errno: e, call: "recv").description)")))
                return
            }
            if got < FrameHeader.size { _ = push(.failure(.malformed("connection closed in the middle of a frame header (\(got) of 8 bytes)"))); return }
            let type: MessageType, length: Int
            switch header.withUnsafeBytes({ FrameHeader.decode($0) }) {
            case .failure(let e): _ = push(.failure(.malformed(e.description))); return
            case .success(let (t, l)):
                guard let m = MessageType(rawValue: t) else { _ = push(.failure(.malformed("unknown message type \(t)"))); return }
                type = m
                length = l
            }
            // Read straight into the array's storage: no zeroing pass over 260 KiB page frames.
            // (An empty payload is the shared empty array: never written through, not even its count.)
            var read = 0
            let payload = length == 0 ? [] : [UInt8](unsafeUninitializedCapacity: length) { buf, count in
                read = readExactly(buf.baseAddress!, length)
                count = length
                if read != length { buf.baseAddress.map { p in (p + max(read, 0)).initialize(repeating: 0, count: length - max(read, 0)) } }
            }
            if read != length {
                _ = push(.failure(.malformed("truncated \(type): connection closed after \(max(read, 0)) of \(length) payload bytes"))); return
            }
            if !push(.success(Frame(type: type, payload: payload))) { return }
        }
    }

    /// The next frame, after the delay stage; `.timeout` when none arrives in `timeoutS`.
    public func receive(waitingFor what: String) throws(WireError) -> Frame {
        guard arrived.wait(seconds: timeoutS) else {
            throw .timeout("no message from the peer within \(timeoutS) s while waiting for \(what)")
        }
        let (arrivedAt, result) = queue.withLock { $0.takeFirst() }
        if case .success(let f) = result {
            let wake = queue.withLock { q -> Bool in
                q.bytes -= Self.queuedCost(f.payload.count)
                if q.readerWaiting && q.bytes <= Wire.maxQueuedBytes { q.readerWaiting = false; return true }
                return false
            }
            if wake { space.post() }
        }
        if delayNS > 0 { Clock.sleep(until: arrivedAt &+ delayNS) }
        switch result {
        case .success(let f):
            if f.type == .error { throw .peerError(PeerText.decode(f.payload)) }
            return f
        case .failure(let e):
            // Keep the failure for any later receive too.
            queue.withLock { $0.putBack((arrivedAt, .failure(e))) }
            arrived.post()
            throw e
        }
    }

    public func send(_ type: MessageType, _ payload: [UInt8]) throws(WireError) {
        var failure: WireError?
        payload.withUnsafeBytes { b in
            do throws(WireError) { try send(type, b.baseAddress, b.count) } catch { failure = error }
        }
        if let failure { throw failure }
    }

    /// Writes a frame whole (MSG_NOSIGNAL: a dead peer is an error, not SIGPIPE).
    public func send(_ type: MessageType, _ payload: UnsafeRawPointer?, _ count: Int) throws(WireError) {
        guard count >= 0, count <= FrameHeader.maxPayload else { throw .invalid("refusing to send a \(type) of \(count) bytes (limit \(FrameHeader.maxPayload))") }
        var header = FrameHeader.encode(type.rawValue, length: count)
        // A small frame goes out in one write (one segment under TCP_NODELAY): a peer that
        // reads a REFUSE with one recv gets its text too.
        let joined = count > 0 && count <= 64 << 10 && payload != nil
        if joined, let p = payload { header += UnsafeRawBufferPointer(start: p, count: count) }
        var failure: WireError?
        header.withUnsafeBytes { h in
            do throws(WireError) { try writeAll(h.baseAddress!, h.count, type) } catch { failure = error }
        }
        if let failure { throw failure }
        if !joined, count > 0, let p = payload { try writeAll(p, count, type) }
        sent.add(8 + count, ordering: .relaxed)
    }

    private func writeAll(_ p: UnsafeRawPointer, _ n: Int, _ type: MessageType) throws(WireError) {
        var done = 0
        while done < n {
            let t0 = Clock.nanoseconds()
            let w = Glibc.send(fd, p + done, n - done, Int32(MSG_NOSIGNAL))
            if w < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN || errno == EWOULDBLOCK { throw .timeout("sending \(type): the link took no data for \(timeoutS) s") }
                throw .peerClosed("sending \(type): \(SystemError.current("send").description)")
            }
            done += w
            // A partial send that used up SO_SNDTIMEO copied what fit at once and then waited
            // the whole timeout for room: the link took nothing meanwhile. Fail now rather
            // than wait a second timeout for the rest.
            if done < n && Double(Clock.nanoseconds() &- t0) >= timeoutS * 0.95e9 {
                throw .timeout("sending \(type): the link took no data for \(timeoutS) s")
            }
        }
    }

    /// Tells the peer why this side gives up — best effort, never blocking: after a timeout
    /// the link is what failed, and waiting on it again would only delay the report.
    public func sendError(_ text: String) { socket.sendTextFrame(MessageType.error.rawValue, text) }
}

/// The source's side: pre-copy's `PageLink` over a `WireConnection`.
public final class TCPLink: PageLink {
    public let connection: WireConnection
    public let pageSize: Int
    private var buffer: UnsafeMutableRawPointer
    private var totalSent = 0
    public let encoder: PageEncoder?
    public var bytesOnWire: Int { connection.bytesSent + channelBytes }
    public var senderCPUSeconds: Double { (encoder?.stats.encodeCPU ?? 0) + senders.reduce(0.0) { $0 + ($1.encoder?.stats.encodeCPU ?? 0) } }
    /// Multifd channels (empty: every page on the control connection).
    private var senders: [ChannelSender] = []
    private var syncSequence: UInt32 = 0
    private var shares: [[Int]] = []
    /// Bytes put on the channels (page frames and syncs).
    public var channelBytes: Int { senders.reduce(0) { $0 + $1.connection.bytesSent } }
    /// The encoders' counts, all channels together (or the control connection's).
    public var encoderStats: EncoderStats? {
        if senders.isEmpty { return encoder?.stats }
        guard senders.contains(where: { $0.encoder != nil }) else { return nil }
        var t = EncoderStats()
        for s in senders { if let e = s.encoder?.stats { t.add(e) } }
        return t
    }

    /// Opens `count` multifd channels with `open` (a new connection to the destination each).
    public func openChannels(_ count: Int, encoding: EncodingConfig, open: () throws(WireError) -> WireConnection) throws(WireError) {
        guard (1...Multifd.maxChannels).contains(count) else { throw .invalid("\(count) multifd channels (1…\(Multifd.maxChannels))") }
        let token = UInt64.random(in: .min ... .max)
        var w = PayloadWriter()
        w.u32(UInt32(count)); w.u64(token)
        try connection.send(.channels, w.bytes)
        for i in 0..<count {
            let c = try open()
            var h = PayloadWriter()
            h.u64(token); h.u32(UInt32(i)); h.u32(UInt32(count))
            do throws(WireError) {
                try c.send(.channelHello, h.bytes)
                senders.append(try ChannelSender(index: i, connection: c, encoding: encoding, pageSize: pageSize))
            } catch {
                c.close()
                throw error
            }
        }
        shares = Array(repeating: [], count: count)
        let f = try connection.receive(waitingFor: "CHANNELS_READY")
        guard f.type == .channelsReady else { throw .malformed("expected CHANNELS_READY, got \(f.type)") }
        var r = PayloadReader(f)
        let n = try r.u32()
        try r.end()
        guard n == UInt32(count) else { throw .mismatch("destination took \(n) channels, \(count) opened") }
    }

    /// Stops the channel threads and closes their connections.
    public func close() {
        for s in senders { s.close() }
        senders.removeAll()
    }

    /// Every channel's CHANNEL_SYNC, before a ROUND_END or FINISH on the control connection.
    private func syncChannels(last: Bool) throws(WireError) {
        guard !senders.isEmpty else { return }
        syncSequence &+= 1
        for s in senders { try s.sync(sequence: syncSequence, last: last) }
    }

    /// Connects the protocol: HELLO with the image header, WELCOME or REFUSE back. With an
    /// encoding, pages go as ENCODED_PAGES frames.
    public init(connection: WireConnection, header: ImageHeader, encoding: EncodingConfig = EncodingConfig()) throws(WireError) {
        self.connection = connection
        self.pageSize = header.pageSize
        encoder = encoding.isRaw ? nil : PageEncoder(config: encoding, pageSize: header.pageSize)
        buffer = .allocate(byteCount: PageEncoder.frameCapacity(pages: Wire.pagesPerFrame, pageSize: header.pageSize), alignment: 8)
        var w = PayloadWriter()
        w.u32(Wire.protocolVersion)
        w.text(header.encode())
        try connection.send(.hello, w.bytes)
        try SourceReplies.welcome(try connection.receive(waitingFor: "WELCOME"))
    }

    deinit { buffer.deallocate() }

    /// Round trips measured with PING/PONG (delay stage included), seconds, sorted.
    public func measureRTT(count: Int) throws(WireError) -> [Double] {
        var out: [Double] = []
        for i in 0..<count {
            var w = PayloadWriter()
            w.u64(UInt64(i))
            let s = Clock.nanoseconds()
            try connection.send(.ping, w.bytes)
            try SourceReplies.pong(try connection.receive(waitingFor: "PONG"), nonce: UInt64(i))
            out.append(Double(Clock.nanoseconds() - s) / 1e9)
        }
        return out.sorted()
    }

    public func send(_ pages: ArraySlice<Int>, from source: UnsafeRawPointer) throws {
        if !senders.isEmpty {
            // A page always on channel index mod n: its XBZRLE history stays on one channel.
            let n = senders.count
            for k in 0..<n { shares[k].removeAll(keepingCapacity: true) }
            for p in pages { shares[p % n].append(p) }
            for k in 0..<n { senders[k].start(shares[k], from: source) }
            var failure: WireError?
            for s in senders {
                do throws(WireError) { try s.wait() } catch { if failure == nil { failure = error } }
            }
            if let failure { throw failure }
            totalSent += pages.count
            return
        }
        var i = pages.startIndex
        while i < pages.endIndex {
            let n = min(Wire.pagesPerFrame, pages.endIndex - i)
            if let encoder {
                let len = encoder.encodeFrame(pages[i..<(i + n)], from: source, into: buffer)
                try connection.send(.encodedPages, buffer, len)
                i += n
                continue
            }
            buffer.storeBytes(of: UInt32(n).littleEndian, as: UInt32.self)
            for k in 0..<n { (buffer + 4 + 8 * k).storeBytes(of: UInt64(pages[i + k]).littleEndian, toByteOffset: 0, as: UInt64.self) }
            let data = buffer + 4 + 8 * n
            for k in 0..<n { memcpy(data + k * pageSize, source + pages[i + k] * pageSize, pageSize) }
            try connection.send(.pages, buffer, 4 + n * (8 + pageSize))
            i += n
        }
        totalSent += pages.count
    }

    public func endRound(_ round: Int, pages: Int) throws {
        try syncChannels(last: false)
        var w = PayloadWriter()
        w.u32(UInt32(clamping: round)); w.u32(UInt32(clamping: pages))
        try connection.send(.roundEnd, w.bytes)
        try SourceReplies.roundAck(try connection.receive(waitingFor: "ROUND_ACK of round \(round)"), round: round, pages: pages)
    }

    public func finish(pages: Int) throws -> UInt64 {
        try syncChannels(last: true)
        var w = PayloadWriter()
        w.u64(UInt64(totalSent))
        try connection.send(.finish, w.bytes)
        let f = try connection.receive(waitingFor: "RESUMED")
        let at = Clock.nanoseconds()
        try SourceReplies.resumed(f, total: totalSent)
        return at
    }

    public func verify(checksum: UInt64) throws -> CompletionVerdict {
        var w = PayloadWriter()
        w.u64(checksum)
        try connection.send(.verify, w.bytes)
        let sum = try SourceReplies.verified(try connection.receive(waitingFor: "VERIFIED"))
        return CompletionVerdict(destinationChecksum: sum, mismatchedPages: nil)
    }
}

/// The destination's side: takes one migration, page data into its own memory, and answers.
public struct MigrationDestination {
    public struct Report: Sendable {
        public var header: ImageHeader?
        public var pagesReceived = 0
        public var rounds = 0
        public var bytesReceived = 0
        public var checksum: UInt64 = 0
        public var sourceChecksum: UInt64 = 0
        public var ignoredFlags: [String] = []
        /// Pages that came as ENCODED_PAGES, and the CPU time their decoding took.
        public var decodedPages = 0
        public var decodeCPU = 0.0
        /// Post-copy, when the source switched to it.
        public var postcopy: RemotePostcopy.DestinationReport?
        /// Multifd channels taken, and the pages counted through them and the control connection.
        public var channels = 0
        public var channelPages = 0
        public var verified: Bool { checksum == sourceChecksum }
    }

    public let ignoreCPUFlags: Bool
    /// The largest image taken, bytes: a HELLO above it is refused before anything is mapped.
    public let maxRegion: Int
    public init(ignoreCPUFlags: Bool, maxRegion: Int) { self.ignoreCPUFlags = ignoreCPUFlags; self.maxRegion = maxRegion }

    /// `listener`: where multifd channels connect (nil: a CHANNELS request is refused).
    public func serve(_ c: WireConnection, listener: Listener? = nil, postcopy: RemotePostcopy.DestinationConfig? = nil,
                      log: (String) -> Void) throws(WireError) -> Report {
        var session = DestinationSession(local: .local(regionBytes: 0, checksum: 0), ignoreCPUFlags: ignoreCPUFlags, maxRegion: maxRegion)
        var report = Report()
        var receivers: [ChannelReceiver] = []
        defer { for r in receivers { r.close() } }
        do {
            return try serveInner(c, &session, &report, listener: listener, postcopy: postcopy, receivers: &receivers, log: log)
        } catch {
            // Tell the source why, if it is still there (a REFUSE already told it).
            if case .refused = error {} else { c.sendError(error.description) }
            throw error
        }
    }

    private func serveInner(_ c: WireConnection, _ s: inout DestinationSession, _ report: inout Report, listener: Listener?,
                            postcopy: RemotePostcopy.DestinationConfig?, receivers: inout [ChannelReceiver],
                            log: (String) -> Void) throws(WireError) -> Report {
        switch try s.hello(try c.receive(waitingFor: "HELLO")) {
        case .refuse(let reason, let toPeer):
            try? c.send(.refuse, Array(toPeer.utf8))
            throw .refused(reason)
        case .accept(let header, let warning):
            report.header = header
            report.ignoredFlags = s.ignoredFlags
            if let warning { log(warning) }
        }
        let bytes = s.pageCount * s.pageSize
        let region: AnonymousMapping
        do {
            region = try AnonymousMapping(length: bytes)
            try region.advise(MADV_POPULATE_WRITE_VALUE, name: "MADV_POPULATE_WRITE")
        } catch {
            let why = "cannot allocate \(bytes) bytes: \(error)"
            try? c.send(.refuse, Array(why.utf8))
            throw .refused(why)
        }
        var w = PayloadWriter()
        w.u32(Wire.protocolVersion)
        try c.send(.welcome, w.bytes)
        if let h = report.header { log("accepted a \(h.regionBytes)-byte image from a \(h.arch) source (\(h.cpu.model))") }

        var syncSequence: UInt32 = 0
        var channelBytesSeen = 0
        while true {
            let f = try c.receive(waitingFor: s.phase == .finished ? "VERIFY" : "pages or the end of round \(s.rounds + 1)")
            if f.type == .switchToPostcopy {
                guard let postcopy else { throw .refused("this destination takes no post-copy (start it with --postcopy-policy)") }
                guard receivers.isEmpty else { throw .malformed("SWITCH with multifd channels (post-copy takes none)") }
                let sw = try s.switchToPostcopy(f)
                guard let host = c.socket.peerIPv4() else { throw .invalid("cannot read the source's address from the connection") }
                report.postcopy = try RemotePostcopy.runDestination(sw, host: host, region: region, pageSize: s.pageSize,
                                                                    config: postcopy, control: c, log: log)
                try s.postcopyDone()
                continue
            }
            if f.type == .channels {
                guard receivers.isEmpty, s.phase == .pages, s.pagesReceived == 0, s.rounds == 0 else {
                    throw .malformed("CHANNELS after pages or a second time")
                }
                guard let listener else { throw .refused("this destination takes no multifd channels") }
                receivers = try acceptChannels(f, listener: listener, control: c, pageSize: s.pageSize, pageCount: s.pageCount, region: region.base)
                var w = PayloadWriter()
                w.u32(UInt32(receivers.count))
                try c.send(.channelsReady, w.bytes)
                log("multifd: \(receivers.count) channels")
                report.channels = receivers.count
                continue
            }
            if (f.type == .roundEnd || f.type == .finish) && !receivers.isEmpty && s.phase == .pages {
                // The control message counts the pages of every channel: take it only when
                // each channel's sync is in.
                syncSequence &+= 1
                var pages = 0
                for r in receivers {
                    let sync = try r.nextSync(syncSequence, timeoutS: c.timeoutS)
                    if sync.last != (f.type == .finish) {
                        throw .mismatch("multifd channel \(r.index): its sync \(syncSequence) says last=\(sync.last), the control stream sent \(f.type)")
                    }
                    pages += sync.pages
                }
                let bytes = receivers.reduce(0) { $0 + $1.bytesReceived }
                try s.channelPages(pages, bytes: bytes - channelBytesSeen)
                channelBytesSeen = bytes
                report.decodeCPU = receivers.reduce(0.0) { $0 + $1.decodeCPU }
            }
            let step = try s.handle(f, region: region.base)
            report.pagesReceived = s.pagesReceived
            report.rounds = s.rounds
            report.bytesReceived = s.bytesReceived
            if let d = s.decoder { report.decodedPages = d.pagesDecoded; report.decodeCPU = d.decodeCPU }
            if !receivers.isEmpty { report.channelPages = s.pagesReceived }
            switch step {
            case .none: break
            case .reply(let type, let payload): try c.send(type, payload)
            case .last(let type, let payload):
                report.checksum = s.checksum
                report.sourceChecksum = s.sourceChecksum
                try c.send(type, payload)
                if !s.verified {
                    throw .mismatch("destination checksum \(String(s.checksum, radix: 16)) differs from the source's \(String(s.sourceChecksum, radix: 16))")
                }
                return report
            }
        }
    }
}

extension MigrationDestination {
    /// CHANNELS(n, token): accepts n connections, each opening with CHANNEL_HELLO(token,
    /// index, n), every index once; anything else fails the migration with the reason.
    func acceptChannels(_ f: Frame, listener: Listener, control c: WireConnection, pageSize: Int, pageCount: Int,
                        region: UnsafeMutableRawPointer) throws(WireError) -> [ChannelReceiver] {
        var r = PayloadReader(f)
        let n = try r.u32(), token = try r.u64()
        try r.end()
        guard n >= 1, n <= UInt32(Multifd.maxChannels) else { throw .malformed("CHANNELS asks for \(n) channels (1…\(Multifd.maxChannels))") }
        var slots = [ChannelReceiver?](repeating: nil, count: Int(n))
        var failure: WireError?
        for _ in 0..<Int(n) {
            do throws(WireError) {
                let sock: Socket
                do { sock = try listener.accept(timeoutS: c.timeoutS, waitingFor: "a multifd channel") } catch { throw WireError(error) }
                let conn = try WireConnection(socket: sock, delayNS: c.delayNS, timeoutS: c.timeoutS)
                let h = try conn.receive(waitingFor: "CHANNEL_HELLO")
                var hr = PayloadReader(h)
                guard h.type == .channelHello else { conn.close(); throw .malformed("a channel opened with \(h.type), not CHANNEL_HELLO") }
                let t = try hr.u64(), index = try hr.u32(), count = try hr.u32()
                try hr.end()
                guard t == token else { conn.close(); throw .refused("a channel with another migration's token") }
                guard count == n, index < n, slots[Int(index)] == nil else {
                    conn.close(); throw .malformed("CHANNEL_HELLO index \(index) of \(count); CHANNELS asked for \(n), each index once")
                }
                slots[Int(index)] = try ChannelReceiver(index: Int(index), connection: conn, pageSize: pageSize, pageCount: pageCount, region: region)
            } catch {
                failure = error
                break
            }
        }
        let taken = slots.compactMap { $0 }
        if let failure {
            for t in taken { t.close() }
            throw failure
        }
        return taken
    }
}

let MADV_POPULATE_WRITE_VALUE: Int32 = memlab_MADV_POPULATE_WRITE
