#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LinuxMM
import Transfer

/// Why a QMP conversation failed: the socket (errno kept), a deadline, the other end gone,
/// something that is not QMP, or a command QEMU refused.
public enum QMPError: Error, Equatable, Sendable, CustomStringConvertible {
    case socket(SocketError)
    case timeout(String)
    case closed(String)
    case malformed(String)
    case refused(command: String, errorClass: String, desc: String)
    public var description: String {
        switch self {
        case .socket(let e): return "QMP socket: \(e)"
        case .timeout(let s): return "QMP timeout: \(s)"
        case .closed(let s): return "QEMU closed QMP: \(s)"
        case .malformed(let s): return "not QMP: \(s)"
        case .refused(let c, let k, let d): return "QEMU refused \(c): \(k): \(PeerText.decode(Array(d.utf8)))"
        }
    }
}

/// One message QEMU sends: the greeting, a command's return, a command's error, or an event
/// (stamped by QEMU's clock — the migration figures use these, not query-migrate's own).
public enum QMPMessage: Sendable, Equatable {
    case greeting(version: String)
    case returned(JSONValue)
    case error(errorClass: String, desc: String)
    case event(QMPEvent)

    /// The longest line taken from QEMU (query-migrate, query-cpus-fast of many vCPUs are a
    /// few KiB): anything longer is refused before it grows a buffer without bound.
    public static let maxLine = 1 << 20

    /// One line (without its newline) as QEMU sent it.
    public static func parse(_ line: some Collection<UInt8>) throws(QMPError) -> QMPMessage {
        guard line.count <= maxLine else { throw .malformed("a line of \(line.count) bytes (at most \(maxLine))") }
        let value: JSONValue
        do { value = try JSONDecoder().decode(JSONValue.self, from: Data(line)) } catch {
            throw .malformed("\(PeerText.decode(Array(line.prefix(120))))")
        }
        guard case .object(let o) = value else { throw .malformed("a JSON \(value) that is not an object") }
        if let g = o["QMP"] {
            let v = g["version"]?["qemu"]
            let parts = ["major", "minor", "micro"].map { v?[$0]?.int.map(String.init) ?? "?" }
            return .greeting(version: parts.joined(separator: "."))
        }
        if let r = o["return"] { return .returned(r) }
        if let e = o["error"] {
            return .error(errorClass: e["class"]?.string ?? "?", desc: e["desc"]?.string ?? "")
        }
        if let name = o["event"]?.string {
            let t = o["timestamp"]
            return .event(QMPEvent(name: name, seconds: t?["seconds"]?.int ?? 0, microseconds: t?["microseconds"]?.int ?? 0,
                                   data: o["data"] ?? .null))
        }
        throw .malformed("an object with none of QMP, return, error, event")
    }
}

/// An asynchronous QMP event (STOP, RESUME, MIGRATION, BALLOON_CHANGE, SHUTDOWN, …).
public struct QMPEvent: Sendable, Equatable {
    public let name: String
    public let seconds: Int
    public let microseconds: Int
    public let data: JSONValue
    /// QEMU's wall-clock stamp, seconds.
    public var time: Double { Double(seconds) + Double(microseconds) / 1e6 }
}

/// A QMP client over QEMU's Unix socket: the greeting, `qmp_capabilities`, then commands
/// with a deadline each. Lines are bounded (`QMPMessage.maxLine`); events that arrive
/// between replies are kept, in order, for `events` and `waitForEvent`. One thread uses it.
public final class QMPClient {
    private let socket: Socket
    private var buffer: [UInt8] = []
    public private(set) var events: [QMPEvent] = []
    /// "7.2.22": from the greeting.
    public let version: String

    /// Connects to `path` (retrying while QEMU has not made it yet), reads the greeting and
    /// leaves capabilities negotiation, all within `timeoutS`.
    public init(path: String, timeoutS: Double) throws(QMPError) {
        do { socket = try Socket.connect(try SocketAddress.unixPath(path), timeoutS: timeoutS) } catch { throw .socket(error) }
        let deadline = Clock.nanoseconds() &+ UInt64(min(max(timeoutS, 0.001), Deadline.maxS) * 1e9)
        guard case .greeting(let v) = try Self.next(socket, &buffer, deadline: deadline, waitingFor: "the greeting") else {
            throw .malformed("the first message is not QMP's greeting")
        }
        version = v
        _ = try execute("qmp_capabilities", timeoutS: timeoutS)
    }

    public func close() { socket.close() }

    /// Events kept for `firstEvent` and `waitForEvent`: at most `maxEvents`, the oldest go
    /// first (a QEMU that floods events cannot grow memory without bound).
    public static let maxEvents = 4096
    private func keep(_ e: QMPEvent) {
        if events.count >= Self.maxEvents { events.removeFirst(events.count - Self.maxEvents + 1) }
        events.append(e)
    }

    /// Runs `command` and returns its `return` value; QEMU's error is `.refused`.
    @discardableResult
    public func execute(_ command: String, arguments: [String: JSONValue] = [:], timeoutS: Double) throws(QMPError) -> JSONValue {
        var request: [String: JSONValue] = ["execute": .string(command)]
        if !arguments.isEmpty { request["arguments"] = .object(arguments) }
        guard var line = try? JSONEncoder().encode(JSONValue.object(request)) else { throw .malformed("cannot encode \(command)") }
        line.append(0x0A)
        socket.setTimeouts(seconds: timeoutS, receive: false)
        let sent = line.withUnsafeBytes { send(socket.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
        if sent != line.count { throw .socket(.system(.current("send (QMP \(command))"))) }
        let deadline = Clock.nanoseconds() &+ UInt64(min(max(timeoutS, 0.001), Deadline.maxS) * 1e9)
        while true {
            switch try Self.next(socket, &buffer, deadline: deadline, waitingFor: "the answer to \(command)") {
            case .returned(let v): return v
            case .error(let k, let d): throw .refused(command: command, errorClass: k, desc: d)
            case .event(let e): keep(e)
            case .greeting: throw .malformed("a second greeting")
            }
        }
    }

    /// The first event called `name` (kept or arriving within `timeoutS`); it and every
    /// event before it are taken from `events`.
    public func waitForEvent(_ name: String, timeoutS: Double) throws(QMPError) -> QMPEvent {
        let deadline = Clock.nanoseconds() &+ UInt64(min(max(timeoutS, 0.001), Deadline.maxS) * 1e9)
        while true {
            if let i = events.firstIndex(where: { $0.name == name }) {
                let e = events[i]
                events.removeFirst(i + 1)
                return e
            }
            switch try Self.next(socket, &buffer, deadline: deadline, waitingFor: "event \(name)") {
            case .event(let e): keep(e)
            default: throw .malformed("a reply with no command asked")
            }
        }
    }

    /// The first kept or arriving event for which `matches` holds, within `timeoutS`; unlike
    /// `waitForEvent`, every event stays in `events` (a migration reads STOP and MIGRATION
    /// stamps from the same list).
    public func firstEvent(timeoutS: Double, where matches: (QMPEvent) -> Bool) throws(QMPError) -> QMPEvent {
        let deadline = Clock.nanoseconds() &+ UInt64(min(max(timeoutS, 0.001), Deadline.maxS) * 1e9)
        while true {
            if let e = events.first(where: matches) { return e }
            switch try Self.next(socket, &buffer, deadline: deadline, waitingFor: "the event awaited") {
            case .event(let e): keep(e)
            default: throw .malformed("a reply with no command asked")
            }
        }
    }

    /// The next message, reading until a newline or the deadline.
    static func next(_ socket: Socket, _ buffer: inout [UInt8], deadline: UInt64, waitingFor what: String) throws(QMPError) -> QMPMessage {
        var chunk = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            if let nl = buffer.firstIndex(of: 0x0A) {
                var line = buffer[..<nl]
                if line.last == 0x0D { line = line.dropLast() }
                let message = try QMPMessage.parse(line)
                buffer.removeFirst(nl + 1)
                return message
            }
            if buffer.count > QMPMessage.maxLine { throw .malformed("more than \(QMPMessage.maxLine) bytes without a newline") }
            let now = Clock.nanoseconds()
            if now >= deadline { throw .timeout("no \(what) from QEMU in time") }
            var p = pollfd(fd: socket.fd, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, Int32(min((deadline - now) / 1_000_000 + 1, 60_000)))
            if r < 0 { if errno == EINTR { continue }; throw .socket(.system(.current("poll (QMP)"))) }
            if r == 0 { continue }
            let n = chunk.withUnsafeMutableBytes { recv(socket.fd, $0.baseAddress, $0.count, 0) }
            if n < 0 { if errno == EINTR { continue }; throw .socket(.system(.current("recv (QMP)"))) }
            if n == 0 { throw .closed("end of stream while waiting for \(what)") }
            buffer += chunk[0..<n]
        }
    }
}
