#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LinuxMM
import Transfer

/// Why a conversation with the guest agent failed: the socket, a deadline, the guest gone,
/// bytes that are not the protocol, or a request the agent refused (its ERROR frame).
public enum AgentError: Error, Equatable, Sendable, CustomStringConvertible {
    case socket(SocketError)
    case timeout(String)
    case closed(String)
    case malformed(String)
    case refused(request: String, reason: String)
    public var description: String {
        switch self {
        case .socket(let e): return "agent socket: \(e)"
        case .timeout(let s): return "agent timeout: \(s)"
        case .closed(let s): return "the guest closed the agent port: \(s)"
        case .malformed(let s): return "not the agent protocol: \(s)"
        case .refused(let r, let why): return "the agent refused \(r): \(why)"
        }
    }
}

/// The agent protocol's messages (docs/guest-agent-protocol.md), version 1: the Transfer
/// layer's frame ("ML", type, flags 0, u32 length), little-endian fixed fields. A reply's
/// type is its request's with bit 7 set; ERROR (0x7f) carries text.
public enum AgentMessage {
    public static let version: UInt32 = 1
    /// The largest payload either side sends (MEMINFO is ~1.5 KiB): longer is refused before
    /// anything is allocated.
    public static let maxPayload = 64 << 10
    public static let reply: UInt8 = 0x80
    public static let error: UInt8 = 0x7f
    public enum Request: UInt8, Sendable, CaseIterable {
        case hello = 0x01, fill = 0x02, dirtyStart = 0x03, dirtyStop = 0x04, chase = 0x05
        case free = 0x06, meminfo = 0x07, checksum = 0x08
        /// The size of the reply's fixed fields (HELLO and MEMINFO add text after them).
        var replyFixed: Int {
            switch self {
            case .hello: return 32
            case .fill, .dirtyStop, .chase, .checksum: return 24
            case .dirtyStart, .free, .meminfo: return 0
            }
        }
    }

    /// Checks a reply to `request` (type and length) and returns its payload, or why not.
    public static func check(reply type: UInt8, payload: [UInt8], to request: Request) throws(AgentError) -> [UInt8] {
        if type == error { throw .refused(request: "\(request)", reason: PeerText.decode(payload)) }
        guard type == request.rawValue | reply else {
            throw .malformed("a reply of type \(String(type, radix: 16)) to \(request) (expected \(String(request.rawValue | reply, radix: 16)))")
        }
        guard payload.count >= request.replyFixed else {
            throw .malformed("a \(request) reply of \(payload.count) bytes (at least \(request.replyFixed))")
        }
        return payload
    }

    /// The first whole frame in `buffer`, taken off it, or nil while it is incomplete. The
    /// length is checked against `maxPayload` before anything waits for (or copies) it.
    public static func nextFrame(_ buffer: inout [UInt8]) throws(AgentError) -> (type: UInt8, payload: [UInt8])? {
        guard buffer.count >= FrameHeader.size else { return nil }
        switch buffer.withUnsafeBytes({ FrameHeader.decode($0) }) {
        case .failure(let m): throw .malformed("\(m)")
        case .success(let (type, length)):
            guard length <= maxPayload else { throw .malformed("a frame of \(length) bytes (at most \(maxPayload))") }
            guard buffer.count >= FrameHeader.size + length else { return nil }
            let body = Array(buffer[FrameHeader.size..<FrameHeader.size + length])
            buffer.removeFirst(FrameHeader.size + length)
            return (type, body)
        }
    }

    static func u64(_ b: [UInt8], _ at: Int) -> UInt64 {
        var v: UInt64 = 0
        for i in (0..<8).reversed() { v = v << 8 | UInt64(b[at + i]) }
        return v
    }
    static func u32(_ b: [UInt8], _ at: Int) -> UInt32 {
        var v: UInt32 = 0
        for i in (0..<4).reversed() { v = v << 8 | UInt32(b[at + i]) }
        return v
    }
    static func put(_ v: UInt64, _ out: inout [UInt8]) { for i in 0..<8 { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt64(i)))) } }
    static func put(_ v: UInt32, _ out: inout [UInt8]) { for i in 0..<4 { out.append(UInt8(truncatingIfNeeded: v >> (8 * UInt32(i)))) } }
}

/// What the agent says of its guest in HELLO.
public struct AgentHello: Sendable, Equatable {
    public let version: UInt32
    public let pageSize: UInt32
    public let cpus: UInt32
    public let memTotalBytes: UInt64
    public let uptimeNS: UInt64
    public let kernelRelease: String

    public init(payload p: [UInt8]) throws(AgentError) {
        version = AgentMessage.u32(p, 0)
        pageSize = AgentMessage.u32(p, 4)
        cpus = AgentMessage.u32(p, 8)
        memTotalBytes = AgentMessage.u64(p, 16)
        uptimeNS = AgentMessage.u64(p, 24)
        kernelRelease = PeerText.decode(p[32...].prefix(64))
        guard version == AgentMessage.version else { throw .malformed("HELLO of protocol version \(version) (memlab speaks \(AgentMessage.version))") }
        guard pageSize >= 4096, pageSize <= 1 << 20, pageSize & (pageSize - 1) == 0 else { throw .malformed("a guest page size of \(pageSize)") }
    }
}

/// Three u64 a timed reply carries: FILL (pages, ns, checksum), DIRTY_STOP (pages, ns, hot
/// pages), CHASE (ns, accesses, sink), CHECKSUM (checksum, pages, ns).
public struct AgentTriple: Sendable, Equatable {
    public let a: UInt64, b: UInt64, c: UInt64
    /// `p` has been through `AgentMessage.check` (at least 24 bytes).
    public init(_ p: [UInt8]) { a = AgentMessage.u64(p, 0); b = AgentMessage.u64(p, 8); c = AgentMessage.u64(p, 16) }
}

/// The host end of one guest's agent: QEMU's chardev socket for the virtio-serial port
/// `org.memlab.agent`. One request at a time, each with a deadline; one thread uses it.
public final class GuestAgent {
    public static let portName = "org.memlab.agent"
    private let socket: Socket
    private var buffer: [UInt8] = []
    /// Set when a reply did not come in time or was not the protocol: a late reply would be
    /// taken for the next request's, so the conversation is over.
    private var broken: AgentError?

    /// Connects to QEMU's chardev socket at `path` (QEMU made it before QMP answered).
    public init(path: String, timeoutS: Double) throws(AgentError) {
        do { socket = try Socket.connect(try SocketAddress.unixPath(path), timeoutS: timeoutS) } catch { throw .socket(error) }
    }

    public func close() { socket.close() }

    /// Sends `request` with `payload` and waits for its reply within `timeoutS`.
    public func call(_ request: AgentMessage.Request, _ payload: [UInt8] = [], timeoutS: Double) throws(AgentError) -> [UInt8] {
        if let broken { throw broken }
        do { return try exchange(request, payload, timeoutS: timeoutS) } catch {
            switch error {
            case .refused: break
            default:
                broken = .closed("an earlier request failed (\(error)); the conversation is out of step")
                socket.shutdown()
            }
            throw error
        }
    }

    private func exchange(_ request: AgentMessage.Request, _ payload: [UInt8], timeoutS: Double) throws(AgentError) -> [UInt8] {
        // Sends are bounded too: a guest that stops reading cannot hold memlab for ever.
        socket.setTimeouts(seconds: timeoutS, receive: false)
        let frame = FrameHeader.encode(request.rawValue, length: payload.count) + payload
        var sent = 0
        while sent < frame.count {
            let n = frame[sent...].withUnsafeBytes { Glibc.send(socket.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
            if n < 0 { if errno == EINTR { continue }; throw .socket(.system(.current("send (agent \(request))"))) }
            sent += n
        }
        let deadline = Clock.nanoseconds() &+ UInt64(min(max(timeoutS, 0.001), Deadline.maxS) * 1e9)
        let (type, body) = try next(deadline: deadline, waitingFor: "the reply to \(request)")
        return try AgentMessage.check(reply: type, payload: body, to: request)
    }

    /// The next whole frame from the agent, its length checked before it is buffered.
    private func next(deadline: UInt64, waitingFor what: String) throws(AgentError) -> (UInt8, [UInt8]) {
        var chunk = [UInt8](repeating: 0, count: 16 << 10)
        while true {
            if let frame = try AgentMessage.nextFrame(&buffer) { return frame }
            let now = Clock.nanoseconds()
            if now >= deadline { throw .timeout("no \(what) in time") }
            var p = pollfd(fd: socket.fd, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, Int32(min((deadline - now) / 1_000_000 + 1, 60_000)))
            if r < 0 { if errno == EINTR { continue }; throw .socket(.system(.current("poll (agent)"))) }
            if r == 0 { continue }
            let n = chunk.withUnsafeMutableBytes { recv(socket.fd, $0.baseAddress, $0.count, 0) }
            if n < 0 { if errno == EINTR { continue }; throw .socket(.system(.current("recv (agent)"))) }
            if n == 0 { throw .closed("end of stream while waiting for \(what)") }
            buffer += chunk[0..<n]
        }
    }

    // MARK: requests

    public func hello(timeoutS: Double) throws(AgentError) -> AgentHello {
        var p: [UInt8] = []
        AgentMessage.put(AgentMessage.version, &p)
        return try AgentHello(payload: try call(.hello, p, timeoutS: timeoutS))
    }

    /// Maps `bytes` in region `region` and fills each page: its first `entropyPercent` from a
    /// generator seeded by (`seed`, page), the rest zero; paced to `rateBytesPerS` (0: flat
    /// out). → pages, ns, checksum.
    public func fill(region: UInt32, bytes: UInt64, seed: UInt64, entropyPercent: UInt32 = 100, rateBytesPerS: UInt64 = 0,
                     hugepage: Bool? = nil, timeoutS: Double) throws(AgentError) -> (pages: UInt64, seconds: Double, checksum: UInt64) {
        var p: [UInt8] = []
        AgentMessage.put(region, &p); AgentMessage.put(entropyPercent, &p)
        AgentMessage.put(bytes, &p); AgentMessage.put(seed, &p); AgentMessage.put(rateBytesPerS, &p)
        AgentMessage.put(UInt32(hugepage == true ? 1 : hugepage == false ? 2 : 0), &p)
        let t = AgentTriple(try call(.fill, p, timeoutS: timeoutS))
        return (t.a, Double(t.b) / 1e9, t.c)
    }

    public func dirtyStart(region: UInt32, hotPPM: UInt32, pagesPerS: UInt64, seed: UInt64, timeoutS: Double) throws(AgentError) {
        var p: [UInt8] = []
        AgentMessage.put(region, &p); AgentMessage.put(hotPPM, &p); AgentMessage.put(pagesPerS, &p); AgentMessage.put(seed, &p)
        _ = try call(.dirtyStart, p, timeoutS: timeoutS)
    }

    /// → pages dirtied, seconds it ran, hot pages.
    public func dirtyStop(timeoutS: Double) throws(AgentError) -> (pages: UInt64, seconds: Double, hotPages: UInt64) {
        let t = AgentTriple(try call(.dirtyStop, timeoutS: timeoutS))
        return (t.a, Double(t.b) / 1e9, t.c)
    }

    /// A random one-pointer-per-page cycle over `workingSet` bytes of the region, `accesses`
    /// steps → ns per access.
    public func chase(region: UInt32, workingSet: UInt64, accesses: UInt64, seed: UInt64, timeoutS: Double) throws(AgentError) -> Double {
        var p: [UInt8] = []
        AgentMessage.put(region, &p); AgentMessage.put(UInt32(0), &p)
        AgentMessage.put(workingSet, &p); AgentMessage.put(accesses, &p); AgentMessage.put(seed, &p)
        let t = AgentTriple(try call(.chase, p, timeoutS: timeoutS))
        guard t.b > 0 else { throw .malformed("a CHASE reply of 0 accesses") }
        return Double(t.a) / Double(t.b)
    }

    public func free(region: UInt32, timeoutS: Double) throws(AgentError) {
        var p: [UInt8] = []
        AgentMessage.put(region, &p)
        _ = try call(.free, p, timeoutS: timeoutS)
    }

    public func meminfo(timeoutS: Double) throws(AgentError) -> MemInfo {
        MemInfo(text: String(decoding: try call(.meminfo, timeoutS: timeoutS), as: UTF8.self))
    }

    /// → checksum, pages, seconds.
    public func checksum(region: UInt32, timeoutS: Double) throws(AgentError) -> (checksum: UInt64, pages: UInt64, seconds: Double) {
        var p: [UInt8] = []
        AgentMessage.put(region, &p)
        let t = AgentTriple(try call(.checksum, p, timeoutS: timeoutS))
        return (t.a, t.b, Double(t.c) / 1e9)
    }
}
