#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM
import Synchronization

/// The lazy-restore page protocol (docs/lazy-restore-protocol.md): the migration protocol's
/// frame header ("ML", type, flags, little-endian payload length; docs/migration-protocol.md),
/// with three message types of its own. Encoded and decoded here over preallocated buffers,
/// not with `WireConnection` (a reader thread and an array per frame): the fault path
/// allocates nothing.
public enum PageWire {
    public static let version: UInt32 = 1
    /// Source → destination on connect: u32 version, u32 page size, u64 pages.
    public static let hello: UInt8 = 0x20
    /// Destination → source: u32 n, then n × (u32 first page, u32 pages).
    public static let get: UInt8 = 0x21
    /// Source → destination: the pages asked for, in request order (pages × 4096 bytes).
    public static let data: UInt8 = 0x22
    /// Either way: UTF-8 text, then the sender closes (the migration protocol's ERROR).
    public static let error: UInt8 = 11
    public static let maxRuns = 1000
    public static let maxPages = 4096   // 16 MiB: the migration protocol's payload limit
}

/// A failure on the fault path, without allocating: an errno and a fixed text.
struct SourceFailure: Error {
    let errno: Int32
    let what: StaticString
}

/// Where page data comes from when `source` is not `memory`: a source process over a Unix
/// socket or TCP, or a snapshot file read with pread. Fetched pages land in `landing` (laid
/// out like the image) and are installed from there; the destination's own copy of the image
/// is then used only for the zero-page map and for verification.
final class PageSource: @unchecked Sendable {
    enum Kind: String, Sendable { case memory, unix, tcp, file }

    final class Channel: @unchecked Sendable {
        let fd: Int32
        let lock = Lock<Int>(0)
        let request: UnsafeMutableRawPointer
        let pieces: UnsafeMutablePointer<UInt32>
        init(fd: Int32) {
            self.fd = fd
            request = .allocate(byteCount: 12 + 8 * PageWire.maxRuns, alignment: 8)
            pieces = .allocate(capacity: 2 * PageWire.maxRuns)
        }
        deinit { request.deallocate(); pieces.deallocate() }
    }

    let kind: Kind
    let pages: Int
    let landing: AnonymousMapping
    let channels: [Channel]
    let pid: pid_t
    let fileFD: Int32
    let filePath: String?
    let dataOffset: Int
    let socketPath: String?
    var logPath: String?
    let label: String
    let requests = Atomic<Int>(0)
    let bytesReceived = Atomic<Int>(0)
    let fetchNS = Atomic<UInt64>(0)
    private let stopped = Atomic<Bool>(false)
    private let reaped = Atomic<Bool>(false)

    private init(kind: Kind, pages: Int, landing: AnonymousMapping, channels: [Channel], pid: pid_t, fileFD: Int32,
                 filePath: String?, dataOffset: Int, socketPath: String?, label: String) {
        self.kind = kind; self.pages = pages; self.landing = landing; self.channels = channels; self.pid = pid
        self.fileFD = fileFD; self.filePath = filePath; self.dataOffset = dataOffset; self.socketPath = socketPath; self.label = label
    }

    deinit { stop() }

    /// A snapshot file of `image` (the migration module's format v1), read back on demand with
    /// pread. `dropCache`: evict the file from the page cache first, so reads go to the disk.
    static func file(image: PageImage, directory base: String, dropCache: Bool) throws -> PageSource {
        // In the run's directory on that file system: removed with the run, also after a kill.
        let directory = try RunDirectory.make(base: base)
        let path = "\(directory)/lazy-\(getpid())-\(Clock.nanoseconds()).snap"
        let header = ImageHeader.local(regionBytes: image.pages * 4096, checksum: regionChecksum(image.base, length: image.pages * 4096))
        do { try Snapshot.write(path: path, header: header, data: image.base) } catch { unlink(path); throw ScenarioError.failed("snapshot file: \(error)") }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { let e = SystemError.current("open", path: path); unlink(path); throw e }
        if dropCache { _ = fdatasync(fd); _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) }
        let offset = 16 + Array(header.encode().utf8).count
        return PageSource(kind: .file, pages: image.pages, landing: try AnonymousMapping(length: image.pages * 4096, kind: .base),
                          channels: [], pid: 0, fileFD: fd, filePath: path, dataOffset: offset, socketPath: nil,
                          label: "snapshot file \(path)")
    }

    /// Connects to a page source that already serves elsewhere (`memlab pagesource` on this or
    /// another host): the same protocol and fault path as `process`, no process of ours. The
    /// source must serve the image this run verifies against (same pages, seed, zero ratio).
    static func remote(address: String, image: PageImage, channels count: Int, timeoutS: Double) throws -> PageSource {
        var chans: [Channel] = []
        do {
            for _ in 0..<max(count, 1) {
                let fd = try WireSocket.connect(address, timeoutS: timeoutS)
                setTimeouts(fd, seconds: timeoutS)
                var one: Int32 = 1
                setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, 4)
                chans.append(Channel(fd: fd))
                try readHello(fd, pages: image.pages)
            }
        } catch {
            for c in chans { close(c.fd) }
            throw ScenarioError.failed("page source tcp \(address): \(error)")
        }
        return PageSource(kind: .tcp, pages: image.pages, landing: try AnonymousMapping(length: image.pages * 4096, kind: .base),
                          channels: chans, pid: 0, fileFD: -1, filePath: nil, dataOffset: 0, socketPath: nil,
                          label: "remote page source over TCP \(address)")
    }

    /// Starts `memlab _pagesource` serving `image` (regenerated there from its seed) and
    /// connects `channels` connections to it (one per handler thread and one for the pusher).
    static func process(kind: Kind, image: PageImage, channels count: Int, tcpAddress: String, timeoutS: Double,
                        directory base: String) throws -> PageSource {
        let tag = "\(getpid())-\(Clock.nanoseconds() % 1_000_000_000)"
        // The run's directories hold the ready file, the log and the socket: removed with the
        // run, also after a kill. The socket's lives under /tmp, whose path fits sun_path.
        let directory = try RunDirectory.make(base: base)
        let ready = "\(directory)/pagesource-\(tag).ready"
        let sock = kind == .unix ? "\(try RunDirectory.make(base: "/tmp"))/ps-\(tag).sock" : nil
        let listen = sock ?? tcpAddress
        var options = PageServerOptions()
        options.kind = kind == .unix ? .unix : .tcp
        options.listen = listen
        options.ready = ready
        options.pages = image.pages
        options.seed = image.seed
        options.zeroRatio = image.zeroRatio
        options.parent = getpid()
        let logPath = "\(directory)/pagesource-\(tag).log"
        let pid = try ChildProcess.spawn(ChildProcess.selfExecutable, options.arguments, outputPath: logPath)
        func abandon() { kill(pid, SIGKILL); var s: Int32 = 0; waitpid(pid, &s, 0); unlink(ready); unlink(logPath); if let sock { unlink(sock) } }
        // The ready file: "pid port\n", written once the source listens.
        let start = Clock.nanoseconds()
        var port = 0
        while true {
            if let text = try? String(contentsOfFile: ready), text.hasSuffix("\n") {
                let f = text.split(separator: " ")
                port = f.count > 1 ? Int(f[1].trimmingCharacters(in: .whitespacesAndNewlines)) ?? 0 : 0
                break
            }
            var s: Int32 = 0
            if waitpid(pid, &s, WNOHANG) == pid {
                let log = (try? String(contentsOfFile: logPath)) ?? ""
                unlink(ready)
                unlink(logPath)
                throw ScenarioError.failed("the source process exited before it listened: \(log.trimmingCharacters(in: .whitespacesAndNewlines))")
            }
            if Clock.seconds(since: start) > timeoutS { abandon(); throw ScenarioError.failed("the source process did not listen within \(timeoutS) s") }
            Clock.sleep(nanoseconds: 2_000_000)
        }
        unlink(ready)
        var address = listen
        if kind == .tcp, let colon = tcpAddress.lastIndex(of: ":") { address = String(tcpAddress[..<colon]) + ":\(port)" }
        var chans: [Channel] = []
        do {
            for _ in 0..<max(count, 1) {
                let fd = kind == .unix ? try unixConnect(address) : try WireSocket.connect(address, timeoutS: timeoutS)
                setTimeouts(fd, seconds: timeoutS)
                if kind == .tcp { var one: Int32 = 1; setsockopt(fd, Int32(IPPROTO_TCP), TCP_NODELAY, &one, 4) }
                chans.append(Channel(fd: fd))
                try readHello(fd, pages: image.pages)
            }
        } catch {
            for c in chans { close(c.fd) }
            abandon()
            throw ScenarioError.failed("page source \(kind.rawValue) \(address): \(error)")
        }
        let s = PageSource(kind: kind, pages: image.pages, landing: try AnonymousMapping(length: image.pages * 4096, kind: .base),
                           channels: chans, pid: pid, fileFD: -1, filePath: nil, dataOffset: 0, socketPath: sock,
                           label: "source process pid \(pid) over \(kind == .unix ? "Unix socket" : "TCP") \(address)")
        s.logPath = logPath
        return s
    }

    static func setTimeouts(_ fd: Int32, seconds: Double) {
        // Never traps: NaN or ≤ 0 becomes 1 ms (0 would mean no deadline), huge becomes a day.
        var tv = Wire.timeval(seconds: seconds)
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    static func unixAddress(_ path: String) -> sockaddr_un {
        var sa = sockaddr_un()
        sa.sun_family = sa_family_t(AF_UNIX)
        withUnsafeMutableBytes(of: &sa.sun_path) { b in
            let u = Array(path.utf8.prefix(b.count - 1))
            for (i, c) in u.enumerated() { b[i] = c }
        }
        return sa
    }

    static func unixConnect(_ path: String) throws -> Int32 {
        let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        if fd < 0 { throw SystemError.current("socket") }
        var sa = unixAddress(path)
        let rc = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
        if rc != 0 { let e = SystemError.current("connect", path: path); close(fd); throw e }
        return fd
    }

    /// The source's first frame: its HELLO, checked against the image this run verifies
    /// with, or its ERROR (a source at its connection cap says so instead of HELLO). Every
    /// field is compared as the wire's integer: nothing a source sends can trap here.
    static func readHello(_ fd: Int32, pages: Int) throws {
        func recvAll(_ p: UnsafeMutableRawPointer, _ n: Int) -> Int {
            var done = 0
            while done < n {
                let r = recv(fd, p + done, n - done, Int32(MSG_WAITALL))
                if r < 0 { if errno == EINTR { continue }; return -1 }
                if r == 0 { break }
                done += r
            }
            return done
        }
        var h = [UInt8](repeating: 0, count: 8)
        let n = h.withUnsafeMutableBytes { recvAll($0.baseAddress!, 8) }
        guard n == 8 else { throw SystemError(errno: n < 0 ? errno : ECONNRESET, call: "recv (HELLO from the page source)") }
        let decoded = h.withUnsafeBytes { PageWire.header($0.baseAddress!) }
        guard case .success(let (type, length)) = decoded else { throw ScenarioError.failed("the page source's first frame is not a HELLO") }
        if type == PageWire.error {
            // Bounded: the reason is for a person, not a 16 MiB allocation.
            var text = [UInt8](repeating: 0, count: min(length, PeerText.limit))
            let got = text.withUnsafeMutableBytes { $0.count == 0 ? 0 : recvAll($0.baseAddress!, $0.count) }
            throw ScenarioError.failed("the page source refused the connection: \(PeerText.decode(text.prefix(max(got, 0))))")
        }
        guard type == PageWire.hello, length == PageWire.helloPayload else { throw ScenarioError.failed("the page source's first frame is not a HELLO") }
        var b = [UInt8](repeating: 0, count: PageWire.helloPayload)
        let m = b.withUnsafeMutableBytes { recvAll($0.baseAddress!, PageWire.helloPayload) }
        guard m == PageWire.helloPayload else { throw SystemError(errno: m < 0 ? errno : ECONNRESET, call: "recv (HELLO from the page source)") }
        if let e = b.withUnsafeBytes({ PageWire.checkHello($0, pages: pages) }) { throw ScenarioError.failed(e.reason) }
    }

    /// Kills the source process (if any) and shuts the connections; threads still using them
    /// get errors, not a reused descriptor.
    func stop() {
        if stopped.exchange(true, ordering: .acquiringAndReleasing) { return }
        for c in channels { shutdown(c.fd, Int32(SHUT_RDWR)) }
        if pid > 0 && !reaped.exchange(true, ordering: .acquiringAndReleasing) { kill(pid, SIGKILL); var s: Int32 = 0; _ = waitpid(pid, &s, 0) }
        if let socketPath { unlink(socketPath) }
        if let filePath { unlink(filePath) }
        if let logPath { unlink(logPath) }
    }

    /// Whether the source process has died (it is our child: reaped here). Returns its end.
    func died() -> String? {
        guard pid > 0, !stopped.load(ordering: .relaxed), !reaped.load(ordering: .relaxed) else { return nil }
        var s: Int32 = 0
        if waitpid(pid, &s, WNOHANG) == pid {
            reaped.store(true, ordering: .relaxed)
            for c in channels { shutdown(c.fd, Int32(SHUT_RDWR)) }
            if memlab_wifsignaled(s) != 0 { return "the \(label) was killed by \(ChildProcess.signalName(memlab_wtermsig(s)))" }
            return "the \(label) exited with status \(memlab_wexitstatus(s))"
        }
        return nil
    }

    // MARK: the fault path

    /// Fetches the pages of `runs[0..<count]` into `landing`. No allocation; a channel is one
    /// connection, used by one thread at a time (its lock is uncontended in the engine).
    @inline(__always)
    func fetch(channel: Int, runs: UnsafePointer<Delivery>, count: Int) throws(SourceFailure) {
        let t0 = Clock.nanoseconds()
        defer { fetchNS.add(Clock.nanoseconds() &- t0, ordering: .relaxed) }
        requests.add(1, ordering: .relaxed)
        if kind == .file {
            for i in 0..<count {
                let len = Int(runs[i].count) * 4096
                let off = Int(runs[i].first) * 4096
                var done = 0
                while done < len {
                    let r = pread(fileFD, landing.base + off + done, len - done, off_t(dataOffset + off + done))
                    if r < 0 { if errno == EINTR { continue }; throw SourceFailure(errno: errno, what: "pread from the snapshot file failed") }
                    if r == 0 { throw SourceFailure(errno: EIO, what: "the snapshot file ends early") }
                    done += r
                }
                bytesReceived.add(len, ordering: .relaxed)
            }
            return
        }
        let ch = channels[channel % channels.count]
        try ch.lock.withLock { (_: inout Int) throws(SourceFailure) in
            var i = 0, off = 0
            while i < count {
                var n = 0, total = 0
                while i < count && n < PageWire.maxRuns && total < PageWire.maxPages {
                    let remaining = Int(runs[i].count) - off
                    let take = min(remaining, PageWire.maxPages - total)
                    ch.pieces[2 * n] = UInt32(Int(runs[i].first) + off)
                    ch.pieces[2 * n + 1] = UInt32(take)
                    n += 1; total += take
                    if take == remaining { i += 1; off = 0 } else { off += take }
                }
                try exchange(ch, n, total)
            }
        }
    }

    @inline(__always)
    private func exchange(_ ch: Channel, _ n: Int, _ total: Int) throws(SourceFailure) {
        let r = ch.request
        r.storeBytes(of: Wire.magic.0, toByteOffset: 0, as: UInt8.self)
        r.storeBytes(of: Wire.magic.1, toByteOffset: 1, as: UInt8.self)
        r.storeBytes(of: PageWire.get, toByteOffset: 2, as: UInt8.self)
        r.storeBytes(of: 0, toByteOffset: 3, as: UInt8.self)
        r.storeBytes(of: UInt32(4 + 8 * n).littleEndian, toByteOffset: 4, as: UInt32.self)
        r.storeBytes(of: UInt32(n).littleEndian, toByteOffset: 8, as: UInt32.self)
        for k in 0..<n {
            r.storeBytes(of: ch.pieces[2 * k].littleEndian, toByteOffset: 12 + 8 * k, as: UInt32.self)
            r.storeBytes(of: ch.pieces[2 * k + 1].littleEndian, toByteOffset: 16 + 8 * k, as: UInt32.self)
        }
        try sendAll(ch.fd, r, 12 + 8 * n)
        // The answer's header, then the pages straight into the landing buffer.
        try recvAll(ch.fd, r, 8)
        guard r.load(fromByteOffset: 0, as: UInt8.self) == Wire.magic.0, r.load(fromByteOffset: 1, as: UInt8.self) == Wire.magic.1 else {
            throw SourceFailure(errno: EPROTO, what: "the page source sent a frame without the ML magic")
        }
        let type = r.load(fromByteOffset: 2, as: UInt8.self)
        let length = Int(UInt32(littleEndian: r.loadUnaligned(fromByteOffset: 4, as: UInt32.self)))
        if type == PageWire.error { throw SourceFailure(errno: EPROTO, what: "the page source answered ERROR (memlab pagesource closes a connection idle past its --idle-timeout, and refuses one over --max-connections)") }
        guard type == PageWire.data, length == total * 4096 else {
            throw SourceFailure(errno: EPROTO, what: "the page source answered with a frame that is not the pages asked for")
        }
        for k in 0..<n {
            try recvAll(ch.fd, landing.base + Int(ch.pieces[2 * k]) * 4096, Int(ch.pieces[2 * k + 1]) * 4096)
        }
        bytesReceived.add(length, ordering: .relaxed)
    }

    @inline(__always)
    private func sendAll(_ fd: Int32, _ p: UnsafeRawPointer, _ len: Int) throws(SourceFailure) {
        var done = 0
        while done < len {
            let w = send(fd, p + done, len - done, Int32(MSG_NOSIGNAL))
            if w < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN { throw SourceFailure(errno: ETIMEDOUT, what: "the page source took no request within the deadline") }
                throw SourceFailure(errno: errno, what: "sending a request to the page source failed")
            }
            done += w
        }
    }

    @inline(__always)
    private func recvAll(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ len: Int) throws(SourceFailure) {
        var done = 0
        while done < len {
            let r = recv(fd, p + done, len - done, Int32(MSG_WAITALL))
            if r < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN { throw SourceFailure(errno: ETIMEDOUT, what: "no answer from the page source within the deadline") }
                throw SourceFailure(errno: errno, what: "receiving pages from the page source failed")
            }
            if r == 0 { throw SourceFailure(errno: ECONNRESET, what: "the page source closed the connection (end of stream) while pages were asked for") }
            done += r
        }
    }
}

/// `memlab _pagesource --kind=… …`: the source process. Regenerates the image from
/// (pages, seed, zeroRatio), listens on a Unix socket path or a TCP address, writes
/// "pid port\n" to `ready`, and serves every connection in its own thread: HELLO, then
/// GET → DATA until the peer closes. At most `maxConnections` at once (one more gets ERROR
/// and is closed); with `idleTimeoutS` a connection that sends no request for that long gets
/// ERROR and is closed; each thread is joined once it ends. Dies with its parent
/// (PDEATHSIG) when started with a parent; `memlab pagesource` runs it standalone.
public enum PageServer {
    /// A connection thread's stack: `serve` needs a few KiB; the default 8 MiB would be
    /// address space held per connection.
    static let threadStack = 512 << 10

    /// Serves `o` (checked: `o.check()` is nil) until killed; returns the exit status.
    public static func serve(_ o: PageServerOptions) -> Int32 {
        signal(SIGPIPE, SIG_IGN)
        // A restore's own source process dies with the restore; `memlab pagesource` (no
        // parent=) lives until it is killed.
        if o.parent != nil { _ = LinuxMMBridge.setParentDeathSignal(SIGKILL) }
        if let p = o.parent, getppid() != p { return 1 }
        // One malloc arena for every connection thread: each extra arena reserves 64 MiB of
        // address space (up to 8 per CPU), which a source under an address-space limit
        // cannot spare; its threads allocate only when a connection starts or is refused.
        // (mallopt is in malloc.h, which the Glibc module leaves out: looked up by name.)
        if let sym = dlsym(UnsafeMutableRawPointer(bitPattern: 0), "mallopt") {   // RTLD_DEFAULT
            typealias Mallopt = @convention(c) (Int32, Int32) -> Int32
            _ = unsafeBitCast(sym, to: Mallopt.self)(-8 /* M_ARENA_MAX */, 1)
        }
        let image: PageImage
        do { image = try PageImage(pages: o.pages, seed: o.seed, zeroRatio: o.zeroRatio) } catch { writeStderr("memlab _pagesource: \(error)\n"); return 1 }
        let listener: Int32
        var port = 0
        switch o.kind {
        case .unix:
            unlink(o.listen)
            listener = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            if listener < 0 { writeStderr("memlab _pagesource: \(SystemError.current("socket"))\n"); return 1 }
            var sa = PageSource.unixAddress(o.listen)
            let rc = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) } }
            if rc != 0 || Glibc.listen(listener, 64) != 0 { writeStderr("memlab _pagesource: \(SystemError.current("bind", path: o.listen))\n"); return 1 }
        case .tcp:
            do {
                var sa = try WireSocket.parse(o.listen)
                listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
                if listener < 0 { writeStderr("memlab _pagesource: \(SystemError.current("socket"))\n"); return 1 }
                var one: Int32 = 1
                setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, 4)
                var len = socklen_t(MemoryLayout<sockaddr_in>.size)
                let ok = withUnsafeMutablePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) {
                    bind(listener, $0, len) == 0 && Glibc.listen(listener, 64) == 0 && getsockname(listener, $0, &len) == 0 } }
                if !ok { writeStderr("memlab _pagesource: \(SystemError.current("bind", path: o.listen))\n"); return 1 }
                port = Int(UInt16(bigEndian: sa.sin_port))
            } catch { writeStderr("memlab _pagesource: \(error)\n"); return 1 }
        }
        if o.announce {
            // `memlab pagesource`: say where it serves (a test or a user waits for this line).
            let host = o.listen.lastIndex(of: ":").map { String(o.listen[..<$0]) } ?? o.listen
            print("memlab pagesource: serving \(o.pages) pages (seed \(o.seed), zero_ratio \(o.zeroRatio)) on \(o.kind == .unix ? o.listen : "\(host):\(port)")"
                  + "; at most \(o.maxConnections) connections, idle timeout \(o.idleTimeoutS > 0 ? "\(o.idleTimeoutS) s" : "none")")
            fflush(nil)
        }
        if let ready = o.ready {
            let tmp = ready + ".tmp"
            let text = "\(getpid()) \(port)\n"
            let fd = open(tmp, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
            if fd >= 0 { _ = text.withCString { Glibc.write(fd, $0, strlen($0)) }; close(fd); rename(tmp, ready) }
        }
        return acceptLoop(listener, image: ImageBox(image: image), options: o)
    }

    final class ImageBox: @unchecked Sendable { let image: PageImage; init(image: PageImage) { self.image = image } }

    /// The connections being served: a count held against the cap, and the threads that have
    /// ended and wait to be joined (a thread's stack is only given back by the join).
    final class Connections: @unchecked Sendable {
        private struct State { var active = 0; var ended: [pthread_t] = [] }
        private let state = Lock(State())

        func admit(cap: Int) -> Bool {
            state.withLock { s in
                if s.active >= cap { return false }
                s.active += 1
                return true
            }
        }
        /// A connection whose thread never started.
        func release() { state.withLock { $0.active -= 1 } }
        /// Called by a connection's thread as its last act.
        func end(_ thread: pthread_t) { state.withLock { $0.active -= 1; $0.ended.append(thread) } }
        /// Joins every thread that has ended.
        func reap() {
            let done = state.withLock { s -> [pthread_t] in defer { s.ended.removeAll() }; return s.ended }
            for t in done { pthread_join(t, nil) }
        }
    }

    static func acceptLoop(_ listener: Int32, image box: ImageBox, options o: PageServerOptions) -> Int32 {
        let conns = Connections()
        var warnedNS: UInt64 = 0
        while true {
            conns.reap()
            // Wake at least once a second, so ended threads are joined without a new connection.
            var p = pollfd(fd: listener, events: Int16(POLLIN), revents: 0)
            let r = poll(&p, 1, 1000)
            if r < 0 { if errno == EINTR { continue }; writeStderr("memlab _pagesource: \(SystemError.current("poll"))\n"); return 1 }
            if r == 0 { continue }
            let c = accept(listener, nil, nil)
            if c < 0 {
                let e = errno
                switch e {
                case EINTR, EAGAIN, ECONNABORTED, EPROTO, EPERM, ENETDOWN, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP, ENETUNREACH:
                    continue   // accept(2): the connection's own trouble, not the listener's
                case EMFILE, ENFILE, ENOBUFS, ENOMEM:
                    // Out of descriptors or memory: say so (once a minute), let connections end.
                    if Clock.nanoseconds() &- warnedNS > 60_000_000_000 {
                        warnedNS = Clock.nanoseconds()
                        writeStderr("memlab _pagesource: \(SystemError(errno: e, call: "accept")); waiting for connections to end\n")
                    }
                    Clock.sleep(nanoseconds: 100_000_000)
                    continue
                default:
                    writeStderr("memlab _pagesource: \(SystemError(errno: e, call: "accept"))\n")
                    return 1
                }
            }
            _ = fcntl(c, F_SETFD, FD_CLOEXEC)
            guard conns.admit(cap: o.maxConnections) else {
                refuseConnection(c, "this page source serves at most \(o.maxConnections) connections at once (--max-connections); try again later")
                continue
            }
            if o.kind == .tcp { var one: Int32 = 1; setsockopt(c, Int32(IPPROTO_TCP), TCP_NODELAY, &one, 4) }
            if o.idleTimeoutS > 0 {
                var tv = Wire.timeval(seconds: o.idleTimeoutS)
                setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
                setsockopt(c, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            }
            let idle = o.idleTimeoutS
            let rc = startConnectionThread {
                serve(c, box.image, idleTimeoutS: idle)
                conns.end(pthread_self())
            }
            if rc != 0 {
                conns.release()
                refuseConnection(c, "cannot start a thread for this connection: \(SystemError(errno: rc, call: "pthread_create"))")
            }
        }
    }

    /// ERROR(reason) and close, never blocking: the peer gets it instead of a HELLO.
    static func refuseConnection(_ fd: Int32, _ text: String) {
        let body = Array(text.utf8.prefix(4096))
        var frame: [UInt8] = [Wire.magic.0, Wire.magic.1, PageWire.error, 0]
        withUnsafeBytes(of: UInt32(body.count).littleEndian) { frame += $0 }
        frame += body
        _ = frame.withUnsafeBytes { send(fd, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL | MSG_DONTWAIT)) }
        close(fd)
    }

    /// A joinable thread with a small stack; returns pthread_create's error (0: started).
    static func startConnectionThread(_ body: @escaping @Sendable () -> Void) -> Int32 {
        final class Box: @unchecked Sendable { let body: @Sendable () -> Void; init(_ b: @escaping @Sendable () -> Void) { body = b } }
        var attr = pthread_attr_t()
        pthread_attr_init(&attr)
        defer { pthread_attr_destroy(&attr) }
        pthread_attr_setstacksize(&attr, threadStack)
        let box = Unmanaged.passRetained(Box(body))
        var t = pthread_t()
        let rc = pthread_create(&t, &attr, { arg in
            let b = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
            b.body()
            return nil
        }, box.toOpaque())
        if rc != 0 { box.release() }
        return rc
    }

    static func serve(_ fd: Int32, _ image: PageImage, idleTimeoutS: Double) {
        defer { close(fd) }
        let head = UnsafeMutableRawPointer.allocate(byteCount: 16 + 12 + 8 * PageWire.maxRuns, alignment: 8)
        let iov = UnsafeMutablePointer<iovec>.allocate(capacity: PageWire.maxRuns + 1)
        defer { head.deallocate(); iov.deallocate() }
        func frame(_ type: UInt8, _ length: Int) {
            head.storeBytes(of: Wire.magic.0, toByteOffset: 0, as: UInt8.self)
            head.storeBytes(of: Wire.magic.1, toByteOffset: 1, as: UInt8.self)
            head.storeBytes(of: type, toByteOffset: 2, as: UInt8.self)
            head.storeBytes(of: 0, toByteOffset: 3, as: UInt8.self)
            head.storeBytes(of: UInt32(length).littleEndian, toByteOffset: 4, as: UInt32.self)
        }
        func refuse(_ text: String) {
            let t = Array(text.utf8)
            frame(PageWire.error, t.count)
            _ = send(fd, head, 8, Int32(MSG_NOSIGNAL))
            _ = t.withUnsafeBytes { send(fd, $0.baseAddress!, t.count, Int32(MSG_NOSIGNAL)) }
        }
        // HELLO.
        frame(PageWire.hello, PageWire.helloPayload)
        head.storeBytes(of: PageWire.version.littleEndian, toByteOffset: 8, as: UInt32.self)
        head.storeBytes(of: UInt32(4096).littleEndian, toByteOffset: 12, as: UInt32.self)
        head.storeBytes(of: UInt64(image.pages).littleEndian, toByteOffset: 16, as: UInt64.self)
        if send(fd, head, 24, Int32(MSG_NOSIGNAL)) != 24 { return }
        let req = head + 16
        while true {
            let got = recv(fd, req, 8, Int32(MSG_WAITALL))
            if got != 8 {
                // SO_RCVTIMEO ran out: the idle deadline. (End of stream or a reset: just close.)
                if got < 0 && (errno == EAGAIN || errno == EWOULDBLOCK) && idleTimeoutS > 0 {
                    refuse("no request for \(idleTimeoutS) s: closing the connection (--idle-timeout)")
                }
                return
            }
            let length: Int
            switch PageWire.checkGetHeader(req) {
            case .failure(let e): refuse(e.reason); return
            case .success(let l): length = l
            }
            if recv(fd, req + 8, length, Int32(MSG_WAITALL)) != length { return }
            let total: Int
            switch PageWire.checkGet(req + 8, length: length, imagePages: image.pages, run: { k, first, count in
                iov[k + 1] = iovec(iov_base: image.base + first * 4096, iov_len: count * 4096)
            }) {
            case .failure(let e): refuse(e.reason); return
            case .success(let t): total = t
            }
            // The answer's header goes in the first iovec, ahead of the page data.
            frame(PageWire.data, total * 4096)
            iov[0] = iovec(iov_base: head, iov_len: 8)
            if !sendv(fd, iov, (length - 4) / 8 + 1) { return }
        }
    }

    /// sendmsg until every iovec is out (advancing past partial writes).
    static func sendv(_ fd: Int32, _ iov: UnsafeMutablePointer<iovec>, _ count: Int) -> Bool {
        var first = 0
        while first < count {
            var msg = msghdr()
            msg.msg_iov = iov + first
            msg.msg_iovlen = count - first
            var w = sendmsg(fd, &msg, Int32(MSG_NOSIGNAL))
            if w < 0 { if errno == EINTR { continue }; return false }
            while first < count && w >= iov[first].iov_len { w -= iov[first].iov_len; first += 1 }
            if first < count && w > 0 {
                iov[first].iov_base = iov[first].iov_base! + w
                iov[first].iov_len -= w
            }
        }
        return true
    }
}
