#if canImport(Glibc)
import Glibc
#endif
import LinuxMM
import Transfer

/// `memlab bench`'s multifd rows: one idle pre-copy (every page once, then FINISH and VERIFY)
/// from this process to a destination on a thread of this process, over loopback TCP, with
/// N channels. Source and destination share this machine's CPUs, as two VMs on one host do.
public enum MultifdBench {
    /// Seconds from the first page sent to the destination's RESUMED, for `size` bytes of
    /// `image` with `channels` channels (0: pages on the control connection).
    public static func migrate(image: AnonymousMapping, channels: Int, encoding: EncodingConfig) throws -> Double {
        let listener: Listener
        do { listener = try Listener.listen(try SocketAddress.tcp("127.0.0.1:0"), backlog: 32) } catch { throw WireError(error) }
        let size = image.length
        let done = Semaphore()
        let result = Lock<WireError?>(nil)
        let dst = try OSThread {
            do throws(WireError) {
                let s: Socket
                do throws(SocketError) { s = try listener.accept(timeoutS: 30, waitingFor: "the bench's source") } catch { throw WireError(error) }
                let c = try WireConnection(socket: s, delayNS: 0, timeoutS: 30)
                defer { c.close() }
                _ = try MigrationDestination(ignoreCPUFlags: true, maxRegion: size).serve(c, listener: listener) { _ in }
            } catch { result.withLock { $0 = error } }
            done.post()
        }
        defer { dst.join(); listener.socket.close() }
        let sock: Socket
        do { sock = try Socket.connect(try SocketAddress.tcp("127.0.0.1:\(listener.port)"), timeoutS: 30) } catch { throw WireError(error) }
        let conn = try WireConnection(socket: sock, delayNS: 0, timeoutS: 30)
        defer { conn.close() }
        let link = try TCPLink(connection: conn, header: .local(regionBytes: size, checksum: 0), encoding: encoding)
        defer { link.close() }
        if channels > 0 {
            try link.openChannels(channels, encoding: encoding) { () throws(WireError) -> WireConnection in
                let s: Socket
                do throws(SocketError) { s = try Socket.connect(try SocketAddress.tcp("127.0.0.1:\(listener.port)"), timeoutS: 30) } catch { throw WireError(error) }
                return try WireConnection(socket: s, delayNS: 0, timeoutS: 30)
            }
        }
        let pages = size / System.pageSize
        let t0 = Clock.nanoseconds()
        try link.send(Array(0..<pages)[...], from: image.base)
        let t1 = try link.finish(pages: pages)
        let verdict = try link.verify(checksum: regionChecksum(image.base, length: size))
        done.wait()
        if let e = result.withLock({ $0 }) { throw e }
        guard verdict.destinationChecksum == regionChecksum(image.base, length: size) else {
            throw WireError.mismatch("the bench's destination differs from its source")
        }
        return Double(t1 - t0) / 1e9
    }
}
