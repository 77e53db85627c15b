#if canImport(Glibc)
import Glibc
#endif
import LinuxMM
import Synchronization

/// Why a socket could not be set up or used: the kernel's errno with the call, a deadline
/// that passed, or an address that is not one.
public enum SocketError: Error, Equatable, Sendable, CustomStringConvertible {
    case system(SystemError)
    case timeout(String)
    case address(String)
    public var description: String {
        switch self {
        case .system(let e): return e.description
        case .timeout(let s): return "timeout: \(s)"
        case .address(let s): return s
        }
    }
    /// The kernel's errno, where it gave one.
    public var errno: Int32? { if case .system(let e) = self { return e.errno }; return nil }
}

/// Where a stream socket listens or connects: IPv4 "A.B.C.D:PORT", or a Unix socket path.
public enum SocketAddress: Sendable, Equatable, CustomStringConvertible {
    case tcp(host: String, port: UInt16)
    case unix(String)

    /// "A.B.C.D:PORT" (port 0 when listening: the kernel picks one).
    public static func tcp(_ text: String) throws(SocketError) -> SocketAddress {
        guard let colon = text.lastIndex(of: ":"), let port = UInt16(text[text.index(after: colon)...]) else {
            throw .address("address '\(text)' is not IPv4:PORT")
        }
        let host = String(text[..<colon])
        var a = in_addr()
        guard inet_pton(AF_INET, host, &a) == 1 else { throw .address("'\(host)' is not an IPv4 address") }
        return .tcp(host: host, port: port)
    }

    /// A Unix socket path; sun_path holds 107 bytes and a NUL, so a longer path (which the
    /// kernel would cut silently) is refused.
    public static func unixPath(_ path: String) throws(SocketError) -> SocketAddress {
        guard !path.isEmpty, path.utf8.count <= 107 else { throw .address("Unix socket path of \(path.utf8.count) bytes (1…107)") }
        return .unix(path)
    }

    public var description: String {
        switch self {
        case .tcp(let h, let p): return "\(h):\(p)"
        case .unix(let p): return p
        }
    }

    var family: Int32 { if case .unix = self { return AF_UNIX }; return AF_INET }

    /// Calls `body` with the sockaddr and its length.
    func withSockaddr<R>(_ body: (UnsafeMutablePointer<sockaddr>, inout socklen_t) -> R) -> R {
        switch self {
        case .tcp(let host, let port):
            var sa = sockaddr_in()
            sa.sin_family = sa_family_t(AF_INET)
            sa.sin_port = port.bigEndian
            _ = inet_pton(AF_INET, host, &sa.sin_addr)   // checked when the address was made
            var len = socklen_t(MemoryLayout<sockaddr_in>.size)
            return withUnsafeMutablePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, &len) } }
        case .unix(let path):
            var sa = sockaddr_un()
            sa.sun_family = sa_family_t(AF_UNIX)
            withUnsafeMutableBytes(of: &sa.sun_path) { b in
                for (i, c) in path.utf8.prefix(b.count - 1).enumerated() { b[i] = c }
            }
            var len = socklen_t(MemoryLayout<sockaddr_un>.size)
            return withUnsafeMutablePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { body($0, &len) } }
        }
    }
}

/// A connected stream socket that owns its descriptor: closed exactly once (`close`, or
/// `deinit`), so no path closes it twice or closes a number the kernel has given to another
/// file since. `shutdown` ends the conversation without giving the number back, for threads
/// that may still be blocked on it.
public final class Socket: Sendable {
    public let fd: Int32
    private let closed = Atomic<Bool>(false)

    /// Takes ownership of `fd`.
    public init(adopting fd: Int32) { self.fd = fd }

    deinit { close() }

    public func close() {
        if closed.exchange(true, ordering: .acquiringAndReleasing) { return }
        Glibc.close(fd)
    }

    /// Both directions shut: a thread blocked in recv or send on it returns.
    public func shutdown() { _ = Glibc.shutdown(fd, Int32(SHUT_RDWR)) }

    /// TCP_NODELAY (no-op on a Unix socket): a request goes out at once.
    public func setNoDelay() {
        var one: Int32 = 1
        _ = setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, socklen_t(MemoryLayout<Int32>.size))
    }

    /// SO_RCVTIMEO and/or SO_SNDTIMEO (never 0, which means no deadline: see `Deadline`).
    public func setTimeouts(seconds: Double, receive: Bool = true, send: Bool = true) {
        var tv = Deadline.timeval(seconds: seconds)
        if receive { _ = setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size)) }
        if send { _ = setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size)) }
    }

    /// Sends `text` as one frame of `type`, best effort and never blocking (a refusal or a
    /// last word before closing: the peer may already be gone).
    public func sendTextFrame(_ type: UInt8, _ text: String) {
        let frame = FrameHeader.textFrame(type, text)
        _ = frame.withUnsafeBytes { Glibc.send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
    }

    /// Connects within `timeoutS`; a TCP connect is retried while nobody listens yet (a
    /// destination still starting), and bounded by poll so an unreachable host is an error in
    /// time.
    public static func connect(_ address: SocketAddress, timeoutS: Double) throws(SocketError) -> Socket {
        guard Deadline.valid(timeoutS) else { throw .address("connect timeout \(timeoutS) s is outside 0 < t ≤ \(Deadline.maxS)") }
        let start = Clock.nanoseconds()
        var last = SystemError(errno: ETIMEDOUT, call: "connect", path: address.description)
        repeat {
            let fd = socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            if fd < 0 { throw .system(.current("socket")) }
            let s = Socket(adopting: fd)
            let flags = fcntl(fd, F_GETFL)
            _ = fcntl(fd, F_SETFL, flags | O_NONBLOCK)
            var rc = address.withSockaddr { sa, len in Glibc.connect(fd, sa, len) }
            var err = rc == 0 ? 0 : Glibc.errno
            if rc != 0 && (err == EINPROGRESS || err == EAGAIN) {
                var p = pollfd(fd: fd, events: Int16(POLLOUT), revents: 0)
                let left = Int32(max(1, min((timeoutS - Clock.seconds(since: start)) * 1000, Deadline.maxS * 1000)))
                if poll(&p, 1, left) == 1 {
                    var len = socklen_t(MemoryLayout<Int32>.size)
                    getsockopt(fd, SOL_SOCKET, SO_ERROR, &err, &len)
                    rc = err == 0 ? 0 : -1
                } else { err = ETIMEDOUT }
            }
            if rc == 0 {
                _ = fcntl(fd, F_SETFL, flags)
                return s
            }
            last = SystemError(errno: err, call: "connect", path: address.description)
            s.close()
            // Nobody listens yet (or the backlog is full): try again until the deadline.
            guard err == ECONNREFUSED || err == ENOENT || err == EAGAIN || err == ETIMEDOUT else { throw .system(last) }
            Clock.sleep(nanoseconds: 50_000_000)
        } while Clock.seconds(since: start) < timeoutS
        throw .timeout("could not connect to \(address) within \(timeoutS) s (\(last))")
    }
}

/// A listening socket; `port` is the one bound (the kernel's pick for port 0). A Unix
/// socket's path is removed when the listener closes.
extension Socket {
    /// The peer's IPv4 address as text (nil for another family or an error).
    public func peerIPv4() -> String? {
        var sa = sockaddr_in()
        var len = socklen_t(MemoryLayout<sockaddr_in>.size)
        let rc = withUnsafeMutablePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getpeername(fd, $0, &len) } }
        guard rc == 0, sa.sin_family == sa_family_t(AF_INET) else { return nil }
        var buf = [CChar](repeating: 0, count: Int(INET_ADDRSTRLEN))
        guard inet_ntop(AF_INET, &sa.sin_addr, &buf, socklen_t(buf.count)) != nil else { return nil }
        return String(cString: buf)
    }
}

public final class Listener: Sendable {
    public let socket: Socket
    public let port: UInt16
    public let address: SocketAddress

    public static func listen(_ address: SocketAddress, backlog: Int32 = 64) throws(SocketError) -> Listener {
        let fd = Glibc.socket(address.family, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 { throw .system(.current("socket")) }
        let s = Socket(adopting: fd)
        if case .unix(let path) = address { unlink(path) }
        var one: Int32 = 1
        if case .tcp = address { setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(MemoryLayout<Int32>.size)) }
        var port: UInt16 = 0
        let failed: SystemError? = address.withSockaddr { sa, len in
            if bind(fd, sa, len) != 0 { return .current("bind", path: address.description) }
            if Glibc.listen(fd, backlog) != 0 { return .current("listen", path: address.description) }
            if case .tcp = address {
                if getsockname(fd, sa, &len) != 0 { return .current("getsockname", path: address.description) }
                port = sa.withMemoryRebound(to: sockaddr_in.self, capacity: 1) { UInt16(bigEndian: $0.pointee.sin_port) }
            }
            return nil
        }
        if let failed { throw .system(failed) }
        return Listener(socket: s, port: port, address: address)
    }

    private init(socket: Socket, port: UInt16, address: SocketAddress) {
        self.socket = socket
        self.port = port
        self.address = address
    }

    deinit {
        socket.close()
        if case .unix(let path) = address { unlink(path) }
    }

    /// Waits up to `timeoutMS` (−1: forever) for a connection; nil when none came.
    public func waitReadable(timeoutMS: Int32) throws(SocketError) -> Bool {
        var p = pollfd(fd: socket.fd, events: Int16(POLLIN), revents: 0)
        let r = poll(&p, 1, timeoutMS)
        if r < 0 { if Glibc.errno == EINTR { return false }; throw .system(.current("poll")) }
        return r > 0
    }

    /// One accept(2): the connection, or the errno (the caller decides which errors are the
    /// connection's own and which the listener's).
    public func acceptNow() -> Result<Socket, SystemError> {
        let fd = Glibc.accept(socket.fd, nil, nil)
        if fd < 0 { return .failure(.current("accept")) }
        _ = fcntl(fd, F_SETFD, FD_CLOEXEC)
        return .success(Socket(adopting: fd))
    }

    /// Accepts one connection within `timeoutS`.
    public func accept(timeoutS: Double, waitingFor what: String = "a peer") throws(SocketError) -> Socket {
        guard Deadline.valid(timeoutS) else { throw .address("accept timeout \(timeoutS) s is outside 0 < t ≤ \(Deadline.maxS)") }
        let start = Clock.nanoseconds()
        while true {
            let left = timeoutS - Clock.seconds(since: start)
            if left <= 0 { throw .timeout("no \(what) connected within \(timeoutS) s") }
            if try waitReadable(timeoutMS: Int32(min(left * 1000, 1000).rounded(.up))) {
                switch acceptNow() {
                case .success(let s): return s
                case .failure(let e) where e.errno == EINTR || e.errno == ECONNABORTED || e.errno == EAGAIN: continue
                case .failure(let e): throw .system(e)
                }
            }
        }
    }
}
