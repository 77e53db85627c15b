#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM
import Transfer
import Synchronization

/// The lazy-restore page protocol (docs/lazy-restore-protocol.md): Transfer's frames
/// (`FrameHeader`: "ML", type, flags, little-endian payload length) with three message types
/// of its own. Encoded and decoded over preallocated buffers, not with a reader thread and an
/// array per frame: the fault path allocates nothing.
public enum PageWire {
    public static let version: UInt32 = 1
    /// Source → destination on connect: u32 version, u32 page size (the kernel's), u64 pages.
    public static let hello: UInt8 = 0x20
    /// Destination → source: u32 n, then n × (u32 first page, u32 pages).
    public static let get: UInt8 = 0x21
    /// Source → destination: the pages asked for, in request order (pages × page size).
    public static let data: UInt8 = 0x22
    /// Either way: UTF-8 text, then the sender closes (the migration protocol's ERROR).
    public static let error: UInt8 = 11
    public static let maxRuns = 1000
    /// Pages one GET may ask for: a DATA payload stays within `FrameHeader.maxPayload`.
    public static func maxPages(pageSize: Int) -> Int { FrameHeader.maxPayload / pageSize }
}

/// Where page data comes from when `source` is not `memory`: a source process over a Unix
/// socket or TCP, or a snapshot file read with pread. Fetched pages land in `landing` (laid
/// out like the image) and are installed from there; the destination's own copy of the image
/// is then used only for the zero-page map and for verification.
final class PageSource: PageFetcher, @unchecked Sendable {
    // @unchecked: all stored properties are constants or atomics except `logPath`, set once
    // by `process` before the source is shared; each channel is used under its own lock.
    enum Kind: String, Sendable { case memory, unix, tcp, file }

    /// One connection and its preallocated request buffers. `@unchecked Sendable`: the
    /// buffers are used only under `lock` (one fetch at a time) and freed by this type.
    final class Channel: @unchecked Sendable {
        /// Replaced (under `lock`) when a lost connection is re-established (recovery).
        var socket: Socket
        var fd: Int32 { socket.fd }
        let lock = Lock<Int>(0)
        let request: UnsafeMutableRawPointer
        let pieces: UnsafeMutablePointer<UInt32>
        init(_ socket: Socket) {
            self.socket = socket
            request = .allocate(byteCount: 12 + 8 * PageWire.maxRuns, alignment: 8)
            pieces = .allocate(capacity: 2 * PageWire.maxRuns)
        }
        deinit { request.deallocate(); pieces.deallocate() }
    }

    let kind: Kind
    let pages: Int
    let pageSize: Int
    let landingMapping: AnonymousMapping
    var landing: UnsafeMutableRawPointer { landingMapping.base }
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
    /// Recovery (post-copy over TCP): where to reconnect and for how long to keep trying
    /// after a connection is lost (0: a lost connection fails the fetch, as before).
    var recoverAddress: SocketAddress?
    var recoverS = 0.0
    var connectTimeoutS = 10.0
    let reconnects = Atomic<Int>(0)
    let pausedNS = Atomic<UInt64>(0)
    let reRequested = Atomic<Int>(0)
    private let stopped = Atomic<Bool>(false)
    private let reaped = Atomic<Bool>(false)

    private init(kind: Kind, image: PageImage, channels: [Channel], pid: pid_t, fileFD: Int32,
                 filePath: String?, dataOffset: Int, socketPath: String?, label: String) throws {
        self.kind = kind; self.pages = image.pages; self.pageSize = image.pageSize; self.channels = channels; self.pid = pid
        self.landingMapping = try AnonymousMapping(length: image.bytes, kind: .base)
        self.fileFD = fileFD; self.filePath = filePath; self.dataOffset = dataOffset; self.socketPath = socketPath; self.label = label
    }

    deinit { stop() }

    /// A snapshot file of `image` (the migration module's format v1), read back on demand with
    /// pread. `dropCache`: evict the file from the page cache first, so reads go to the disk.
    static func file(image: PageImage, directory base: String, dropCache: Bool) throws -> PageSource {
        // In the run's directory on that file system: removed with the run, also after a kill.
        let directory = try RunDirectory.make(base: base)
        let path = "\(directory)/lazy-\(getpid())-\(Clock.nanoseconds()).snap"
        let header = ImageHeader.local(regionBytes: image.bytes, checksum: regionChecksum(image.base, length: image.bytes))
        do { try Snapshot.write(path: path, header: header, data: image.base) } catch { unlink(path); throw ScenarioError.failed("snapshot file: \(error)") }
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { let e = SystemError.current("open", path: path); unlink(path); throw e }
        if dropCache { _ = fdatasync(fd); _ = posix_fadvise(fd, 0, 0, POSIX_FADV_DONTNEED) }
        let offset = 16 + Array(header.encode().utf8).count
        return try PageSource(kind: .file, image: image, channels: [], pid: 0, fileFD: fd, filePath: path, dataOffset: offset, socketPath: nil,
                          label: "snapshot file \(path)")
    }

    /// Connects to a page source that already serves elsewhere (`memlab pagesource` on this or
    /// another host): the same protocol and fault path as `process`, no process of ours. The
    /// source must serve the image this run verifies against (same pages, seed, zero ratio).
    static func remote(address: String, image: PageImage, channels count: Int, timeoutS: Double) throws -> PageSource {
        let chans: [Channel]
        do { chans = try connect(count, to: try SocketAddress.tcp(address), image: image, timeoutS: timeoutS) } catch {
            throw ScenarioError.failed("page source tcp \(address): \(error)")
        }
        return try PageSource(kind: .tcp, image: image, channels: chans, pid: 0, fileFD: -1, filePath: nil, dataOffset: 0, socketPath: nil,
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
        let chans: [Channel]
        do {
            let to = kind == .unix ? try SocketAddress.unixPath(address) : try SocketAddress.tcp(address)
            chans = try connect(count, to: to, image: image, timeoutS: timeoutS)
        } catch {
            abandon()
            throw ScenarioError.failed("page source \(kind.rawValue) \(address): \(error)")
        }
        let s = try PageSource(kind: kind, image: image, channels: chans, pid: pid, fileFD: -1, filePath: nil, dataOffset: 0, socketPath: sock,
                           label: "source process pid \(pid) over \(kind == .unix ? "Unix socket" : "TCP") \(address)")
        s.logPath = logPath
        return s
    }

    /// `count` connections (at least one) to a page source at `address`, each past its
    /// HELLO: one per handler thread and one for the pusher.
    static func connect(_ count: Int, to address: SocketAddress, image: PageImage, timeoutS: Double) throws -> [Channel] {
        var chans: [Channel] = []
        for _ in 0..<max(count, 1) {
            let socket = try Socket.connect(address, timeoutS: timeoutS)
            socket.setTimeouts(seconds: timeoutS)
            socket.setNoDelay()
            chans.append(Channel(socket))
            try readHello(socket.fd, pages: image.pages, pageSize: image.pageSize)
        }
        return chans
    }

    /// The source's first frame: its HELLO, checked against the image this run verifies
    /// with, or its ERROR (a source at its connection cap says so instead of HELLO). Every
    /// field is compared as the wire's integer: nothing a source sends can trap here.
    static func readHello(_ fd: Int32, pages: Int, pageSize: Int) throws {
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
        let decoded = h.withUnsafeBytes { FrameHeader.decode($0.baseAddress!) }
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
        if let e = b.withUnsafeBytes({ PageWire.checkHello($0, pages: pages, pageSize: pageSize) }) { throw ScenarioError.failed(e.reason) }
    }

    /// Kills the source process (if any) and shuts the connections; threads still using them
    /// get errors, not a reused descriptor.
    func stop() {
        if stopped.exchange(true, ordering: .acquiringAndReleasing) { return }
        for c in channels { c.socket.shutdown() }
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
            for c in channels { c.socket.shutdown() }
            if memlab_wifsignaled(s) != 0 { return "the \(label) was killed by \(ChildProcess.signalName(memlab_wtermsig(s)))" }
            return "the \(label) exited with status \(memlab_wexitstatus(s))"
        }
        return nil
    }

    // MARK: the fault path

    var maxPagesPerGet: Int { PageWire.maxPages(pageSize: pageSize) }

    /// Fetches the pages of `runs[0..<count]` into `landing`. No allocation; a channel is one
    /// connection, used by one thread at a time (its lock is uncontended in the engine).
    @inline(__always)
    func fetch(channel: Int, runs: UnsafePointer<Delivery>, count: Int) throws(FetchFailure) {
        let t0 = Clock.nanoseconds()
        defer { fetchNS.add(Clock.nanoseconds() &- t0, ordering: .relaxed) }
        requests.add(1, ordering: .relaxed)
        if kind == .file {
            for i in 0..<count {
                let len = Int(runs[i].count) * pageSize
                let off = Int(runs[i].first) * pageSize
                var done = 0
                while done < len {
                    let r = pread(fileFD, landing + off + done, len - done, off_t(dataOffset + off + done))
                    if r < 0 { if errno == EINTR { continue }; throw FetchFailure(errno: errno, what: "pread from the snapshot file failed") }
                    if r == 0 { throw FetchFailure(errno: EIO, what: "the snapshot file ends early") }
                    done += r
                }
                bytesReceived.add(len, ordering: .relaxed)
            }
            return
        }
        let ch = channels[channel % channels.count]
        try ch.lock.withLock { (_: inout Int) throws(FetchFailure) in
            var i = 0, off = 0
            while i < count {
                var n = 0, total = 0
                while i < count && n < PageWire.maxRuns && total < maxPagesPerGet {
                    let remaining = Int(runs[i].count) - off
                    let take = min(remaining, maxPagesPerGet - total)
                    ch.pieces[2 * n] = UInt32(Int(runs[i].first) + off)
                    ch.pieces[2 * n + 1] = UInt32(take)
                    n += 1; total += take
                    if take == remaining { i += 1; off = 0 } else { off += take }
                }
                do throws(FetchFailure) {
                    try exchange(ch, n, total)
                } catch {
                    // Post-copy recovery: the faults wait (this thread holds them) while a
                    // new connection is made; then the same pages are asked for again.
                    guard recoverS > 0, let address = recoverAddress else { throw error }
                    try recover(ch, address: address, after: error)
                    reRequested.add(total, ordering: .relaxed)
                    try exchange(ch, n, total)
                }
            }
        }
    }

    @inline(__always)
    private func exchange(_ ch: Channel, _ n: Int, _ total: Int) throws(FetchFailure) {
        let r = ch.request
        FrameHeader.encode(PageWire.get, length: 4 + 8 * n, into: r)
        r.storeBytes(of: UInt32(n).littleEndian, toByteOffset: 8, as: UInt32.self)
        for k in 0..<n {
            r.storeBytes(of: ch.pieces[2 * k].littleEndian, toByteOffset: 12 + 8 * k, as: UInt32.self)
            r.storeBytes(of: ch.pieces[2 * k + 1].littleEndian, toByteOffset: 16 + 8 * k, as: UInt32.self)
        }
        try sendAll(ch.fd, r, 12 + 8 * n)
        // The answer's header, then the pages straight into the landing buffer.
        try recvAll(ch.fd, r, 8)
        guard case .success(let (type, length)) = FrameHeader.decode(UnsafeRawPointer(r)) else {
            throw FetchFailure(errno: EPROTO, what: "the page source sent a malformed frame header (magic, flags or length)")
        }
        if type == PageWire.error { throw FetchFailure(errno: EPROTO, what: "the page source answered ERROR (memlab pagesource closes a connection idle past its --idle-timeout, and refuses one over --max-connections)") }
        guard type == PageWire.data, length == total * pageSize else {
            throw FetchFailure(errno: EPROTO, what: "the page source answered with a frame that is not the pages asked for")
        }
        for k in 0..<n {
            try recvAll(ch.fd, landing + Int(ch.pieces[2 * k]) * pageSize, Int(ch.pieces[2 * k + 1]) * pageSize)
        }
        bytesReceived.add(length, ordering: .relaxed)
    }

    /// Replaces a lost connection: retries connecting (and the source's HELLO) until one is
    /// up or `recoverS` has passed; the time is the pause. Not on the fault path's hot side:
    /// it runs only after a failure.
    private func recover(_ ch: Channel, address: SocketAddress, after failure: FetchFailure) throws(FetchFailure) {
        let t0 = Clock.nanoseconds()
        ch.socket.shutdown()
        ch.socket.close()
        while true {
            if stopped.load(ordering: .relaxed) { throw failure }
            if Clock.seconds(since: t0) > recoverS {
                pausedNS.add(Clock.nanoseconds() &- t0, ordering: .relaxed)
                throw FetchFailure(errno: ETIMEDOUT, what: "the page connection was lost and no new one came up within the recovery deadline")
            }
            if let socket = try? Socket.connect(address, timeoutS: min(connectTimeoutS, 1)) {
                socket.setTimeouts(seconds: connectTimeoutS)
                socket.setNoDelay()
                if (try? Self.readHello(socket.fd, pages: pages, pageSize: pageSize)) != nil {
                    ch.socket = socket
                    reconnects.add(1, ordering: .relaxed)
                    pausedNS.add(Clock.nanoseconds() &- t0, ordering: .relaxed)
                    return
                }
                socket.close()
            }
            Clock.sleep(nanoseconds: 50_000_000)
        }
    }

    @inline(__always)
    private func sendAll(_ fd: Int32, _ p: UnsafeRawPointer, _ len: Int) throws(FetchFailure) {
        var done = 0
        while done < len {
            let w = send(fd, p + done, len - done, Int32(MSG_NOSIGNAL))
            if w < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN { throw FetchFailure(errno: ETIMEDOUT, what: "the page source took no request within the deadline") }
                throw FetchFailure(errno: errno, what: "sending a request to the page source failed")
            }
            done += w
        }
    }

    @inline(__always)
    private func recvAll(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ len: Int) throws(FetchFailure) {
        var done = 0
        while done < len {
            let r = recv(fd, p + done, len - done, Int32(MSG_WAITALL))
            if r < 0 {
                if errno == EINTR { continue }
                if errno == EAGAIN { throw FetchFailure(errno: ETIMEDOUT, what: "no answer from the page source within the deadline") }
                throw FetchFailure(errno: errno, what: "receiving pages from the page source failed")
            }
            if r == 0 { throw FetchFailure(errno: ECONNRESET, what: "the page source closed the connection (end of stream) while pages were asked for") }
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
        let listener: Listener
        do {
            listener = try Listener.listen(o.kind == .unix ? try SocketAddress.unixPath(o.listen) : try SocketAddress.tcp(o.listen))
        } catch { writeStderr("memlab _pagesource: \(error)\n"); return 1 }
        let port = Int(listener.port)
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
        return acceptLoop(listener, image: image, options: o)
    }

    /// The connections being served: a count held against the cap, and the threads that have
    /// ended and wait to be joined (a thread's stack is only given back by the join).
    final class Connections: Sendable {
        private struct State { var active = 0; var next = 0; var running: [Int: OSThread] = [:]; var ended: [Int] = [] }
        private let state = Lock(State())

        /// A slot under the cap, or nil.
        func admit(cap: Int) -> Int? {
            state.withLock { s in
                if s.active >= cap { return nil }
                s.active += 1
                s.next += 1
                return s.next
            }
        }
        /// The thread serving `id`; one that already ended is joined at the next `reap`.
        func started(_ id: Int, _ t: OSThread) { state.withLock { $0.running[id] = t } }
        /// A connection whose thread never started.
        func release() { state.withLock { $0.active -= 1 } }
        /// Called by a connection's thread as its last act.
        func end(_ id: Int) { state.withLock { $0.active -= 1; $0.ended.append(id) } }
        /// Joins every thread that has ended.
        func reap() {
            let done = state.withLock { s -> [OSThread] in
                var out: [OSThread] = []
                var later: [Int] = []
                for id in s.ended {
                    // A thread can end before `started` has recorded it: joined next time.
                    if let t = s.running.removeValue(forKey: id) { out.append(t) } else { later.append(id) }
                }
                s.ended = later
                return out
            }
            for t in done { t.join() }
        }
    }

    /// Serves `image` on `listener` from the calling thread until `until()` says stop (checked
    /// at least every 200 ms): migration's source serving its paused memory during post-copy.
    public static func serve(_ listener: Listener, image: PageImage, maxConnections: Int, idleTimeoutS: Double,
                             until: @escaping () -> Bool) -> Int32 {
        var o = PageServerOptions()
        o.kind = .tcp
        o.maxConnections = maxConnections
        o.idleTimeoutS = idleTimeoutS
        return acceptLoop(listener, image: image, options: o, until: until)
    }

    static func acceptLoop(_ listener: Listener, image: PageImage, options o: PageServerOptions, until: (() -> Bool)? = nil) -> Int32 {
        let conns = Connections()
        var warnedNS: UInt64 = 0
        while true {
            conns.reap()
            if let until, until() { return 0 }
            // Wake at least once a second, so ended threads are joined without a new connection.
            let readable: Bool
            do { readable = try listener.waitReadable(timeoutMS: until == nil ? 1000 : 200) } catch { writeStderr("memlab _pagesource: \(error)\n"); return 1 }
            if !readable { continue }
            let c: Socket
            switch listener.acceptNow() {
            case .success(let s): c = s
            case .failure(let e):
                switch e.errno {
                case EINTR, EAGAIN, ECONNABORTED, EPROTO, EPERM, ENETDOWN, ENOPROTOOPT, EHOSTDOWN, ENONET, EHOSTUNREACH, EOPNOTSUPP, ENETUNREACH:
                    continue   // accept(2): the connection's own trouble, not the listener's
                case EMFILE, ENFILE, ENOBUFS, ENOMEM:
                    // Out of descriptors or memory: say so (once a minute), let connections end.
                    if Clock.nanoseconds() &- warnedNS > 60_000_000_000 {
                        warnedNS = Clock.nanoseconds()
                        writeStderr("memlab _pagesource: \(e); waiting for connections to end\n")
                    }
                    Clock.sleep(nanoseconds: 100_000_000)
                    continue
                default:
                    writeStderr("memlab _pagesource: \(e)\n")
                    return 1
                }
            }
            guard let id = conns.admit(cap: o.maxConnections) else {
                c.sendTextFrame(PageWire.error, "this page source serves at most \(o.maxConnections) connections at once (--max-connections); try again later")
                continue
            }
            if o.kind == .tcp { c.setNoDelay() }
            if o.idleTimeoutS > 0 { c.setTimeouts(seconds: o.idleTimeoutS) }
            let idle = o.idleTimeoutS
            do throws(SystemError) {
                let t = try OSThread(stackBytes: threadStack) {
                    serve(c, image, idleTimeoutS: idle)
                    conns.end(id)
                }
                conns.started(id, t)
            } catch {
                conns.release()
                c.sendTextFrame(PageWire.error, "cannot start a thread for this connection: \(error)")
            }
        }
    }

    static func serve(_ socket: Socket, _ image: PageImage, idleTimeoutS: Double) {
        defer { socket.close() }
        let fd = socket.fd
        let pageSize = image.pageSize
        let head = UnsafeMutableRawPointer.allocate(byteCount: 16 + 12 + 8 * PageWire.maxRuns, alignment: 8)
        let iov = UnsafeMutablePointer<iovec>.allocate(capacity: PageWire.maxRuns + 1)
        defer { head.deallocate(); iov.deallocate() }
        func refuse(_ text: String) {
            let t = Array(text.utf8.prefix(4096))
            FrameHeader.encode(PageWire.error, length: t.count, into: head)
            _ = send(fd, head, 8, Int32(MSG_NOSIGNAL))
            _ = t.withUnsafeBytes { send(fd, $0.baseAddress!, t.count, Int32(MSG_NOSIGNAL)) }
        }
        // HELLO: version, page size, pages.
        FrameHeader.encode(PageWire.hello, length: PageWire.helloPayload, into: head)
        head.storeBytes(of: PageWire.version.littleEndian, toByteOffset: 8, as: UInt32.self)
        head.storeBytes(of: UInt32(pageSize).littleEndian, toByteOffset: 12, as: UInt32.self)
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
            switch PageWire.checkGet(req + 8, length: length, imagePages: image.pages, pageSize: pageSize, run: { k, first, count in
                iov[k + 1] = iovec(iov_base: image.base + first * pageSize, iov_len: count * pageSize)
            }) {
            case .failure(let e): refuse(e.reason); return
            case .success(let t): total = t
            }
            // The answer's header goes in the first iovec, ahead of the page data.
            FrameHeader.encode(PageWire.data, length: total * pageSize, into: head)
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

extension PageSource: RemotePageFetcher {
    var bytesFetched: Int { bytesReceived.load(ordering: .relaxed) }
    var requestsSent: Int { requests.load(ordering: .relaxed) }
    var reconnectCount: Int { reconnects.load(ordering: .relaxed) }
    var pausedSeconds: Double { Double(pausedNS.load(ordering: .relaxed)) / 1e9 }
    var reRequestedPages: Int { reRequested.load(ordering: .relaxed) }
    func close() { stop() }
}

public enum RemotePages {
    /// `channels` connections to the page server at `address` (IPv4:PORT), each past a HELLO
    /// that must match `image`'s pages and page size. A connection that fails mid-transfer is
    /// replaced for up to `recoverS` seconds (0: it fails the fetch); `timeoutS` bounds each
    /// wait for an answer, so a dead link is noticed.
    public static func connect(address: String, image: PageImage, channels: Int, timeoutS: Double, recoverS: Double) throws -> any RemotePageFetcher {
        let s = try PageSource.remote(address: address, image: image, channels: channels, timeoutS: timeoutS)
        s.recoverAddress = try SocketAddress.tcp(address)
        s.recoverS = recoverS
        s.connectTimeoutS = timeoutS
        return s
    }
}
