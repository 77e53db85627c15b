#if canImport(Glibc)
import Glibc
#endif
import LinuxMM
import Synchronization
import CLinuxMM

/// The migration protocol (docs/migration-protocol.md): frames over one TCP connection.
///
///     0  2  magic "ML"
///     2  1  type (MessageType)
///     3  1  flags (0)
///     4  4  payload length, little-endian (at most maxPayload)
///     8  …  payload
public enum Wire {
    public static let protocolVersion: UInt32 = 1
    public static let magic: (UInt8, UInt8) = (0x4D, 0x4C)
    public static let maxPayload = 16 << 20
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
    public var description: String {
        switch self {
        case .hello: "HELLO"; case .welcome: "WELCOME"; case .refuse: "REFUSE"; case .pages: "PAGES"
        case .roundEnd: "ROUND_END"; case .roundAck: "ROUND_ACK"; case .finish: "FINISH"; case .resumed: "RESUMED"
        case .verify: "VERIFY"; case .verified: "VERIFIED"; case .error: "ERROR"; case .ping: "PING"; case .pong: "PONG"
        }
    }
}

public struct Frame: Sendable {
    public let type: MessageType
    public let payload: [UInt8]
    public init(type: MessageType, payload: [UInt8]) { self.type = type; self.payload = payload }
}

public enum WireError: Error, CustomStringConvertible, Equatable {
    case system(String)
    case timeout(String)
    case peerClosed(String)
    case malformed(String)
    case refused(String)
    case peerError(String)
    case mismatch(String)
    public var description: String {
        switch self {
        case .system(let s): return s
        case .timeout(let s): return "timeout: \(s)"
        case .peerClosed(let s): return "peer closed the connection: \(s)"
        case .malformed(let s): return "malformed message: \(s)"
        case .refused(let s): return "refused: \(s)"
        case .peerError(let s): return "the other side failed: \(s)"
        case .mismatch(let s): return "verification failed: \(s)"
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
public final class WireConnection: @unchecked Sendable {
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

    public let fd: Int32
    public let delayNS: UInt64
    public let timeoutS: Double
    private let queue = Lock<Queue>(Queue())
    private let sem: UnsafeMutablePointer<sem_t>
    /// Posted when the queue has room again (or the connection closes) for a waiting reader.
    private let space: UnsafeMutablePointer<sem_t>
    private var reader: pthread_t?
    private let closedFlag = Atomic<Bool>(false)
    public private(set) var bytesSent = 0

    /// `timeoutS` must be a `Wire.validTimeout`, `delayNS` at most a minute: the CLI checks
    /// both, and a bad value here is refused rather than turned into a trap or a hang.
    public init(fd: Int32, delayNS: UInt64, timeoutS: Double) throws(WireError) {
        guard Wire.validTimeout(timeoutS) else { throw .system("timeout \(timeoutS) s is outside 0 < t ≤ \(Wire.maxTimeoutS)") }
        guard delayNS <= 60_000_000_000 else { throw .system("delay stage of \(delayNS) ns exceeds 60 s") }
        self.fd = fd
        self.delayNS = delayNS
        self.timeoutS = timeoutS
        var one: Int32 = 1
        setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
        var tv = Wire.timeval(seconds: timeoutS)
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        sem = .allocate(capacity: 1)
        sem_init(sem, 0, 0)
        space = .allocate(capacity: 1)
        sem_init(space, 0, 0)
        reader = startThread { [self] in self.readLoop() }
        if reader == nil {
            let e = SystemError(errno: EAGAIN, call: "pthread_create (connection reader)")
            sem_destroy(sem); sem.deallocate(); sem_destroy(space); space.deallocate()
            throw .system(e.description)
        }
    }

    deinit {
        close()
        sem_destroy(sem)
        sem.deallocate()
        sem_destroy(space)
        space.deallocate()
    }

    public func close() {
        if closedFlag.exchange(true, ordering: .acquiringAndReleasing) { return }
        shutdown(fd, Int32(SHUT_RDWR))
        sem_post(space)   // a reader waiting for room sees the close
        if let r = reader { pthread_join(r, nil) }
        Glibc.close(fd)
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
        sem_post(sem)
        if full {
            while sem_wait(space) != 0 && errno == EINTR {}
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
            let decoded = header.withUnsafeBytes { FrameHeader.decode($0) }
            guard case .success(let (type, length)) = decoded else {
                if case .failure(let e) = decoded { _ = push(.failure(e)) }
                return
            }
            var payload = [UInt8](repeating: 0, count: length)
            if length > 0 {
                let n = payload.withUnsafeMutableBytes { readExactly($0.baseAddress!, length) }
                if n != length {
                    _ = push(.failure(.malformed("truncated \(type): connection closed after \(max(n, 0)) of \(length) payload bytes"))); return
                }
            }
            if !push(.success(Frame(type: type, payload: payload))) { return }
        }
    }

    /// The next frame, after the delay stage; `.timeout` when none arrives in `timeoutS`.
    public func receive(waitingFor what: String) throws(WireError) -> Frame {
        var ts = timespec()
        clock_gettime(CLOCK_REALTIME, &ts)
        // timeoutS ≤ a day (init): these conversions stay in range.
        let whole = timeoutS.rounded(.down)
        ts.tv_sec += Int(whole)
        ts.tv_nsec += Int((timeoutS - whole) * 1e9)
        if ts.tv_nsec >= 1_000_000_000 { ts.tv_sec += 1; ts.tv_nsec -= 1_000_000_000 }
        while sem_timedwait(sem, &ts) != 0 {
            if errno == EINTR { continue }
            throw .timeout("no message from the peer within \(timeoutS) s while waiting for \(what)")
        }
        let (arrived, result) = queue.withLock { $0.takeFirst() }
        if case .success(let f) = result {
            let wake = queue.withLock { q -> Bool in
                q.bytes -= Self.queuedCost(f.payload.count)
                if q.readerWaiting && q.bytes <= Wire.maxQueuedBytes { q.readerWaiting = false; return true }
                return false
            }
            if wake { sem_post(space) }
        }
        if delayNS > 0 { Clock.sleep(until: arrived &+ delayNS) }
        switch result {
        case .success(let f):
            if f.type == .error { throw .peerError(PeerText.decode(f.payload)) }
            return f
        case .failure(let e):
            // Keep the failure for any later receive too.
            queue.withLock { $0.putBack((arrived, .failure(e))) }
            sem_post(sem)
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
        guard count >= 0, count <= Wire.maxPayload else { throw .system("refusing to send a \(type) of \(count) bytes (limit \(Wire.maxPayload))") }
        var header = FrameHeader.encode(type, length: count)
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
        bytesSent += 8 + count
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
    public func sendError(_ text: String) {
        let body = Array(text.utf8.prefix(4096))
        let frame = FrameHeader.encode(.error, length: body.count) + body
        _ = frame.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
    }
}

/// Socket set-up: an IPv4 address "A.B.C.D:PORT".
public enum WireSocket {
    public static func parse(_ address: String) throws(WireError) -> sockaddr_in {
        guard let colon = address.lastIndex(of: ":"), let port = UInt16(address[address.index(after: colon)...]) else {
            throw .system("address '\(address)' is not IPv4:PORT")
        }
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET)
        sa.sin_port = port.bigEndian
        let host = String(address[..<colon])
        if inet_pton(AF_INET, host, &sa.sin_addr) != 1 { throw .system("'\(host)' is not an IPv4 address") }
        return sa
    }

    /// Listens on `address`; returns the listening socket.
    public static func listen(_ address: String) throws(WireError) -> Int32 {
        var sa = try parse(address)
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 { throw .system(SystemError.current("socket").description) }
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size))
        let rc = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        if rc != 0 { let e = SystemError.current("bind", path: address); Glibc.close(fd); throw .system(e.description) }
        if Glibc.listen(fd, 1) != 0 { let e = SystemError.current("listen", path: address); Glibc.close(fd); throw .system(e.description) }
        return fd
    }

    /// Accepts one connection within `timeoutS`.
    public static func accept(_ listener: Int32, timeoutS: Double) throws(WireError) -> Int32 {
        guard Wire.validTimeout(timeoutS) else { throw .system("accept timeout \(timeoutS) s is outside 0 < t ≤ \(Wire.maxTimeoutS)") }
        var p = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
        let start = Clock.nanoseconds()
        while true {
            let left = timeoutS - Clock.seconds(since: start)
            if left <= 0 { throw .timeout("no source connected within \(timeoutS) s") }
            let r = poll(&p, 1, Int32(min(left * 1000, 1000).rounded(.up)))
            if r < 0 && errno != EINTR { throw .system(SystemError.current("poll").description) }
            if r > 0 { break }
        }
        let fd = Glibc.accept(listener, nil, nil)
        if fd < 0 { throw .system(SystemError.current("accept").description) }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return fd
    }

    /// Connects within `timeoutS`, retrying while the destination is not yet listening.
    public static func connect(_ address: String, timeoutS: Double) throws(WireError) -> Int32 {
        var sa = try parse(address)
        guard Wire.validTimeout(timeoutS) else { throw .system("connect timeout \(timeoutS) s is outside 0 < t ≤ \(Wire.maxTimeoutS)") }
        let start = Clock.nanoseconds()
        var last = ""
        while Clock.seconds(since: start) < timeoutS {
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            if fd < 0 { throw .system(SystemError.current("socket").description) }
            // Non-blocking connect bounded by poll: an unreachable host is an error in time.
            let flags = fcntl(fd, F_GETFL)
            _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
            var rc = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { Glibc.connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            if rc != 0 && errno == EINPROGRESS {
                var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                let left = Int32(max(1, min((timeoutS - Clock.seconds(since: start)) * 1000, Wire.maxTimeoutS * 1000)))
                if poll(&p, 1, left) == 1 {
                    var err: Int32 = 0
                    var len = socklen_t(MemoryLayout<Int32>.size)
                    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
                    rc = err == 0 ? 0 : -1
                    errno = err
                } else { errno = ETIMEDOUT }
            }
            if rc == 0 {
                _ = fcntl(fd, F_SETFL, flags)
                return fd
            }
            last = SystemError.current("connect", path: address).description
            Glibc.close(fd)
            Clock.sleep(nanoseconds: 50_000_000)
        }
        throw .timeout("could not connect to \(address) within \(timeoutS) s (\(last))")
    }
}

/// The source's side: pre-copy's `PageLink` over a `WireConnection`.
public final class TCPLink: PageLink {
    public let connection: WireConnection
    public let pageSize: Int
    private var buffer: UnsafeMutableRawPointer
    private var totalSent = 0

    /// Connects the protocol: HELLO with the image header, WELCOME or REFUSE back.
    public init(connection: WireConnection, header: ImageHeader) throws(WireError) {
        self.connection = connection
        self.pageSize = header.pageSize
        buffer = .allocate(byteCount: 4 + Wire.pagesPerFrame * (8 + header.pageSize), alignment: 8)
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
        var i = pages.startIndex
        while i < pages.endIndex {
            let n = min(Wire.pagesPerFrame, pages.endIndex - i)
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
        var w = PayloadWriter()
        w.u32(UInt32(clamping: round)); w.u32(UInt32(clamping: pages))
        try connection.send(.roundEnd, w.bytes)
        try SourceReplies.roundAck(try connection.receive(waitingFor: "ROUND_ACK of round \(round)"), round: round, pages: pages)
    }

    public func finish(pages: Int) throws -> UInt64 {
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
        public var verified: Bool { checksum == sourceChecksum }
    }

    public let ignoreCPUFlags: Bool
    /// The largest image taken, bytes: a HELLO above it is refused before anything is mapped.
    public let maxRegion: Int
    public init(ignoreCPUFlags: Bool, maxRegion: Int) { self.ignoreCPUFlags = ignoreCPUFlags; self.maxRegion = maxRegion }

    public func serve(_ c: WireConnection, log: (String) -> Void) throws(WireError) -> Report {
        var session = DestinationSession(local: .local(regionBytes: 0, checksum: 0), ignoreCPUFlags: ignoreCPUFlags, maxRegion: maxRegion)
        var report = Report()
        do {
            return try serveInner(c, &session, &report, log: log)
        } catch {
            // Tell the source why, if it is still there (a REFUSE already told it).
            if case .refused = error {} else { c.sendError(error.description) }
            throw error
        }
    }

    private func serveInner(_ c: WireConnection, _ s: inout DestinationSession, _ report: inout Report,
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

        while true {
            let f = try c.receive(waitingFor: s.phase == .finished ? "VERIFY" : "pages or the end of round \(s.rounds + 1)")
            let step = try s.handle(f, region: region.base)
            report.pagesReceived = s.pagesReceived
            report.rounds = s.rounds
            report.bytesReceived = s.bytesReceived
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

let MADV_POPULATE_WRITE_VALUE: Int32 = memlab_MADV_POPULATE_WRITE
