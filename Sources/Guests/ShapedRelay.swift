#if canImport(Glibc)
import Glibc
#endif
import LinuxMM
import Transfer

/// A TCP relay on loopback that shapes one direction to a bandwidth, as a tbf qdisc on the
/// link would, without touching a machine-wide device: QEMU's migration stream goes
/// source → relay → destination, every connection of it (multifd channels, post-copy's preempt
/// channel), and the bytes toward the destination leave no faster than `bytesPerSecond` (one
/// token bucket: the connections share the link). QEMU lifts its own max-bandwidth for the
/// final stop-and-copy; this link does not, so downtime means what it means on a real link of
/// that speed. The way back (post-copy page requests, acknowledgements) is not shaped.
///
/// `stop()` must be called: the threads hold the relay until then.
public final class ShapedRelay: @unchecked Sendable {
    // @unchecked: the mutable state is touched under `state` only; the rest is constant
    // after init (`acceptThread` is set once, before anything else reads it).
    public let port: UInt16
    public let bytesPerSecond: Double
    private let listener: Listener
    private let target: SocketAddress
    private let state = Lock(State())
    private var acceptThread: OSThread?

    private struct State {
        var busyUntil: UInt64 = 0
        var sockets: [Socket] = []
        var threads: [OSThread] = []
        var stopping = false
        var forwarded: UInt64 = 0
    }

    /// Listens on 127.0.0.1 (a port the kernel picks) and forwards each connection to
    /// `target`.
    public init(to target: SocketAddress, bytesPerSecond: Double) throws {
        guard bytesPerSecond.isFinite, bytesPerSecond >= 1000 else {
            throw SystemError(errno: EINVAL, call: "shaped relay of \(bytesPerSecond) bytes/s")
        }
        self.target = target
        self.bytesPerSecond = bytesPerSecond
        listener = try Listener.listen(try SocketAddress.tcp("127.0.0.1:0"))
        port = listener.port
        acceptThread = try OSThread { self.acceptLoop() }
    }

    /// Bytes passed toward the destination so far.
    public var forwarded: UInt64 { state.withLock { $0.forwarded } }

    /// Closes every connection and joins every thread (once; later calls return at once).
    public func stop() {
        let first = state.withLock { s -> Bool in defer { s.stopping = true }; return !s.stopping }
        guard first else { return }
        // The accept thread first: once it is joined no connection or pump is added, so the
        // snapshot below is complete.
        listener.socket.shutdown()
        acceptThread?.join()
        let (sockets, threads) = state.withLock { ($0.sockets, $0.threads) }
        for s in sockets { s.shutdown() }
        for t in threads { t.join() }
        for s in sockets { s.close() }
    }

    private func acceptLoop() {
        while !state.withLock({ $0.stopping }) {
            guard (try? listener.waitReadable(timeoutMS: 100)) == true, case .success(let inbound) = listener.acceptNow() else { continue }
            guard let outbound = try? Socket.connect(target, timeoutS: 10) else { inbound.close(); continue }
            inbound.setNoDelay(); outbound.setNoDelay()
            let ok = state.withLock { s -> Bool in
                guard !s.stopping else { return false }
                s.sockets += [inbound, outbound]
                return true
            }
            guard ok else { inbound.close(); outbound.close(); continue }
            let down = try? OSThread { self.pump(from: inbound, to: outbound, shaped: true) }
            let up = try? OSThread { self.pump(from: outbound, to: inbound, shaped: false) }
            state.withLock { s in s.threads += [down, up].compactMap { $0 } }
        }
    }

    /// Copies until either side closes. Shaped: each chunk waits for its slot on the wire.
    private func pump(from: Socket, to: Socket, shaped: Bool) {
        var buffer = [UInt8](repeating: 0, count: 64 << 10)
        while true {
            let n = buffer.withUnsafeMutableBytes { recv(from.fd, $0.baseAddress, shaped ? 16 << 10 : $0.count, 0) }
            if n < 0 && errno == EINTR { continue }
            if n <= 0 { break }
            if shaped {
                let wire = UInt64(Double(n) / bytesPerSecond * 1e9)
                let due = state.withLock { s -> UInt64 in
                    let start = max(s.busyUntil, Clock.nanoseconds())
                    s.busyUntil = start &+ wire
                    s.forwarded &+= UInt64(n)
                    return s.busyUntil
                }
                let now = Clock.nanoseconds()
                if due > now { Clock.sleep(nanoseconds: due - now) }
            }
            var sent = 0
            while sent < n {
                let w = buffer[sent..<n].withUnsafeBytes { send(to.fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                if w < 0 && errno == EINTR { continue }
                if w <= 0 { from.shutdown(); to.shutdown(); return }
                sent += w
            }
        }
        to.shutdown()
        from.shutdown()
    }
}
