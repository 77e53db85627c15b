#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM
import Synchronization
import Transfer

// handler=external: the restoring process (a repetition's child) creates the userfaultfd,
// registers its region, and passes the descriptor — with a memfd holding the image — over a
// Unix socket (SCM_RIGHTS) to a separate handler process, `memlab _uffdhandler`, as CRIU's
// lazy-pages daemon and Firecracker's UFFD handler receive theirs. The handler resolves each
// fault with UFFDIO_COPY (UFFDIO_ZEROPAGE for a zero page) into the other process's address
// space: the ioctls act on the descriptor's mm, whoever calls them. One handler process
// serves several sessions (the restore, then the hop calibration) over one connection.
//
// Session protocol (native-endian u64 words; both ends are this machine):
//   restore → handler: SessionConfig (16 words) + SCM_RIGHTS [uffd, image memfd]
//   handler → restore: READY (magic, pid) once its threads wait for faults
//   restore: releases the workload; when it is done, touches one doorbell page per handler
//            thread (registered on the same uffd): each handler thread answers its bell
//            with UFFDIO_ZEROPAGE and leaves
//   handler → restore: STATS (16 words), then `latencies` u64 (handler-side fault latency)
// The restore closes the connection to end the handler (exit 0). Every word from the peer is
// range-checked; a count bounds what is read.

/// What the restore asks of the handler for one session.
struct SessionConfig: Equatable {
    static let magic: UInt64 = 0x4D4C_5546_4844_4C31   // "MLUFHDL1"
    static let words = 16
    var regionAddress: UInt64 = 0
    var regionLength: UInt64 = 0
    var doorbellAddress: UInt64 = 0
    var threads: UInt64 = 1
    var pageSize: UInt64 = UInt64(System.pageSize)
    var wait: UInt64 = 0          // EngineConfig.WaitMode index
    var batch: UInt64 = 64
    var zeropage: UInt64 = 1
    var imageLength: UInt64 = 0

    static let maxThreads: UInt64 = 16
    static let maxLength: UInt64 = 16 << 30   // lazy-restore's largest region

    func encode() -> [UInt64] {
        var w = [UInt64](repeating: 0, count: Self.words)
        w[0] = Self.magic; w[1] = regionAddress; w[2] = regionLength; w[3] = doorbellAddress; w[4] = threads
        w[5] = pageSize; w[6] = wait; w[7] = batch; w[8] = zeropage; w[9] = imageLength
        return w
    }

    /// Decodes and checks a peer's words: nil and why when anything is out of range.
    static func decode(_ w: [UInt64]) -> (SessionConfig?, String?) {
        guard w.count == words, w[0] == magic else { return (nil, "not a session header (magic)") }
        var c = SessionConfig()
        c.regionAddress = w[1]; c.regionLength = w[2]; c.doorbellAddress = w[3]; c.threads = w[4]
        c.pageSize = w[5]; c.wait = w[6]; c.batch = w[7]; c.zeropage = w[8]; c.imageLength = w[9]
        if c.pageSize != UInt64(System.pageSize) { return (nil, "page size \(c.pageSize), this kernel's is \(System.pageSize)") }
        if c.regionLength == 0 || c.regionLength > maxLength || c.regionLength % c.pageSize != 0 {
            return (nil, "region length \(c.regionLength): expected a multiple of \(c.pageSize) up to \(maxLength)")
        }
        if c.imageLength != c.regionLength { return (nil, "image length \(c.imageLength) differs from the region's \(c.regionLength)") }
        if c.regionAddress % c.pageSize != 0 || c.regionAddress > UInt64.max - c.regionLength { return (nil, "region address 0x\(String(c.regionAddress, radix: 16))") }
        if !(1...maxThreads).contains(c.threads) { return (nil, "threads \(c.threads): expected 1…\(maxThreads)") }
        if c.doorbellAddress % c.pageSize != 0 || c.doorbellAddress > UInt64.max - c.threads * c.pageSize { return (nil, "doorbell address") }
        let bellEnd = c.doorbellAddress + c.threads * c.pageSize
        if c.doorbellAddress < c.regionAddress + c.regionLength && bellEnd > c.regionAddress { return (nil, "the doorbells overlap the region") }
        if c.wait >= UInt64(EngineConfig.WaitMode.allCases.count) { return (nil, "wait mode \(c.wait)") }
        if !(1...64).contains(c.batch) { return (nil, "batch \(c.batch): expected 1…64") }
        if c.zeropage > 1 { return (nil, "zeropage \(c.zeropage)") }
        return (c, nil)
    }
}

/// What the handler counted in one session.
struct HandlerStats: Equatable {
    static let magic: UInt64 = 0x4D4C_5546_5354_4131   // "MLUFSTA1"
    static let readyMagic: UInt64 = 0x4D4C_5546_5244_5931   // "MLUFRDY1"
    static let words = 16
    var pid: Int32 = 0
    var copies = 0, zeroFaults = 0, eexist = 0, bytesCopied = 0, ioctls = 0, outside = 0
    var cpuNS: UInt64 = 0
    /// Words 9 and 10 of the header: a failed call's errno and which call (1 copy,
    /// 2 zeropage, 3 read/wait, 4 wake, 5 epoll). This handler exits instead of reporting one
    /// (`HandlerSession.fatal`), so it sends 0; a peer's nonzero value is still decoded.
    var failureErrno: Int32 = 0
    var failureCall: UInt64 = 0
    var latencies: [UInt64] = []

    func header() -> [UInt64] {
        var w = [UInt64](repeating: 0, count: Self.words)
        w[0] = Self.magic; w[1] = UInt64(UInt32(bitPattern: pid)); w[2] = UInt64(copies); w[3] = UInt64(zeroFaults); w[4] = UInt64(eexist)
        w[5] = UInt64(bytesCopied); w[6] = UInt64(ioctls); w[7] = UInt64(outside); w[8] = cpuNS
        w[9] = UInt64(UInt32(bitPattern: failureErrno)); w[10] = failureCall; w[11] = UInt64(latencies.count)
        return w
    }

    /// Decodes a peer's header; counts above `maxCount` are refused (nothing is allocated
    /// from a peer's number before this check).
    static func decode(_ w: [UInt64], maxCount: UInt64) -> (HandlerStats?, latencies: Int, String?) {
        guard w.count == words, w[0] == magic else { return (nil, 0, "not a stats header (magic)") }
        for i in 2...7 where w[i] > maxCount * 1 << 30 { return (nil, 0, "counter \(i) = \(w[i]) out of range") }
        if w[11] > maxCount { return (nil, 0, "\(w[11]) latencies, at most \(maxCount) expected") }
        if w[1] > UInt64(Int32.max) || w[9] > UInt64(UInt32.max) || w[10] > 5 { return (nil, 0, "pid or failure out of range") }
        var s = HandlerStats()
        s.pid = Int32(w[1]); s.copies = Int(w[2]); s.zeroFaults = Int(w[3]); s.eexist = Int(w[4]); s.bytesCopied = Int(w[5])
        s.ioctls = Int(w[6]); s.outside = Int(w[7]); s.cpuNS = w[8]; s.failureErrno = Int32(bitPattern: UInt32(w[9])); s.failureCall = w[10]
        return (s, Int(w[11]), nil)
    }

    var failure: String? {
        if failureErrno == 0 && outside == 0 { return nil }
        if failureErrno == 0 { return "\(outside) faults outside the region and the doorbells" }
        let call = ["?", "UFFDIO_COPY", "UFFDIO_ZEROPAGE", "read/wait on the userfaultfd", "UFFDIO_WAKE", "epoll"][Int(min(failureCall, 5))]
        return "\(call) failed in the handler process: \(String(cString: strerror(failureErrno)))"
    }
}

/// Sends or receives exactly `n` bytes (MSG_WAITALL / MSG_NOSIGNAL). False on error or end.
func sendAll(_ fd: Int32, _ p: UnsafeRawPointer, _ n: Int) -> Bool {
    var done = 0
    while done < n {
        let r = send(fd, p + done, n - done, Int32(MSG_NOSIGNAL))
        if r < 0 { if errno == EINTR { continue }; return false }
        done += r
    }
    return true
}

func recvAll(_ fd: Int32, _ p: UnsafeMutableRawPointer, _ n: Int) -> Bool {
    var done = 0
    while done < n {
        let r = recv(fd, p + done, n - done, Int32(MSG_WAITALL))
        if r < 0 { if errno == EINTR { continue }; return false }
        if r == 0 { return false }
        done += r
    }
    return true
}

func sendWords(_ fd: Int32, _ w: [UInt64]) -> Bool { w.withUnsafeBytes { sendAll(fd, $0.baseAddress!, $0.count) } }
func recvWords(_ fd: Int32, _ count: Int) -> [UInt64]? {
    var w = [UInt64](repeating: 0, count: count)
    let ok = w.withUnsafeMutableBytes { recvAll(fd, $0.baseAddress!, $0.count) }
    return ok ? w : nil
}

// MARK: - the handler process

/// `memlab _uffdhandler --connect=PATH --parent=PID`: connects to the restore's socket and
/// serves sessions until the restore closes it. Dies with its parent (PDEATHSIG).
public enum ExternalFaultHandler {
    /// Longest socket path (sun_path holds 108 bytes with the NUL).
    public static let maxPathBytes = 107

    public static func serve(connect path: String, parent: Int32) -> Int32 {
        signal(SIGPIPE, SIG_IGN)
        _ = LinuxMMBridge.setParentDeathSignal(SIGKILL)
        if getppid() != parent { writeStderr("memlab _uffdhandler: parent \(parent) is gone\n"); return 1 }
        let sock: Socket
        do { sock = try Socket.connect(try SocketAddress.unixPath(path), timeoutS: 10) } catch {
            writeStderr("memlab _uffdhandler: connect \(path): \(error)\n"); return 1
        }
        while true {
            var words = [UInt64](repeating: 0, count: SessionConfig.words)
            var fds: [Int32] = [-1, -1]
            var nfds: Int32 = 0
            let r = words.withUnsafeMutableBytes { b in memlab_recv_fds(sock.fd, &fds, 2, &nfds, b.baseAddress, b.count) }
            if r == 0 { return 0 }   // the restore is done with us
            if r < 0 { writeStderr("memlab _uffdhandler: recvmsg: \(String(cString: strerror(errno)))\n"); return 1 }
            func closeAll() { for i in 0..<Int(nfds) { close(fds[i]) } }
            if r != SessionConfig.words * 8 || nfds != 2 {
                closeAll(); writeStderr("memlab _uffdhandler: a session header of \(r) bytes with \(nfds) descriptors (expected \(SessionConfig.words * 8) and 2)\n"); return 2
            }
            let (config, why) = SessionConfig.decode(words)
            guard let config else { closeAll(); writeStderr("memlab _uffdhandler: refused session: \(why ?? "?")\n"); return 2 }
            // The first descriptor must be a userfaultfd: read(2) on anything else would hand
            // the fault loop bytes that are not uffd_msg.
            var link = [CChar](repeating: 0, count: 64)
            let n = readlink("/proc/self/fd/\(fds[0])", &link, link.count - 1)
            let target = n > 0 ? String(decoding: link[0..<n].map { UInt8(bitPattern: $0) }, as: UTF8.self) : ""
            if target != "anon_inode:[userfaultfd]" {
                closeAll(); writeStderr("memlab _uffdhandler: the first descriptor is '\(target)', not a userfaultfd\n"); return 2
            }
            var st = stat()
            if fstat(fds[1], &st) != 0 || (st.st_mode & S_IFMT) != S_IFREG || UInt64(st.st_size) < config.imageLength {
                closeAll(); writeStderr("memlab _uffdhandler: the image descriptor holds \(st.st_size) bytes, fewer than \(config.imageLength)\n"); return 2
            }
            let image = mmap(nil, Int(config.imageLength), PROT_READ, MAP_SHARED, fds[1], 0)
            close(fds[1])
            guard let image, image != MAP_FAILED else { close(fds[0]); writeStderr("memlab _uffdhandler: mmap of the image: \(String(cString: strerror(errno)))\n"); return 1 }
            let uffd = Userfaultfd.Descriptor(adopting: fds[0], features: [])
            let session = HandlerSession(config: config, uffd: uffd, image: UnsafeRawPointer(image))
            let stats = session.run { ready in
                var w: [UInt64] = [HandlerStats.readyMagic, UInt64(getpid())]
                if !ready { w[0] = 0 }
                return sendWords(sock.fd, w)
            }
            munmap(image, Int(config.imageLength))
            guard let stats else { return 1 }
            if !sendWords(sock.fd, stats.header()) { return 1 }
            if !stats.latencies.isEmpty && !stats.latencies.withUnsafeBytes({ sendAll(sock.fd, $0.baseAddress!, $0.count) }) { return 1 }
        }
    }
}

/// One session in the handler process: `threads` handler threads on the passed userfaultfd,
/// each until its doorbell. Buffers are allocated before the threads start; the fault path
/// allocates nothing.
final class HandlerSession: @unchecked Sendable {
    // @unchecked: constants after init; counters are atomics; each thread writes only its own
    // latency buffer, read after the join.
    let config: SessionConfig
    let uffd: Userfaultfd.Descriptor
    let image: UnsafeRawPointer
    let pageSize: Int
    let copies = Atomic<Int>(0), zeroFaults = Atomic<Int>(0), eexist = Atomic<Int>(0), ioctls = Atomic<Int>(0), outside = Atomic<Int>(0)
    let cpuNS = Atomic<UInt64>(0)
    let capacity: Int
    let latencies: UnsafeMutablePointer<UInt64>
    let latencyCounts: UnsafeMutablePointer<Int>
    let zero: UnsafeMutableRawPointer

    init(config: SessionConfig, uffd: Userfaultfd.Descriptor, image: UnsafeRawPointer) {
        self.config = config
        self.uffd = uffd
        self.image = image
        pageSize = Int(config.pageSize)
        capacity = Int(config.regionLength / config.pageSize) + 64
        latencies = .allocate(capacity: capacity * Int(config.threads))
        latencyCounts = .allocate(capacity: Int(config.threads))
        latencyCounts.initialize(repeating: 0, count: Int(config.threads))
        zero = calloc(1, pageSize)!
    }
    deinit { latencies.deallocate(); latencyCounts.deallocate(); free(zero) }

    /// An ioctl or a read that failed leaves a faulting thread of the restore waiting: the
    /// process ends at once with the reason, which the restore's watchdog sees within 20 ms
    /// (the log is in its failure), instead of the restore waiting out its deadline.
    func fatal(_ what: String, _ e: Int32) -> Never {
        writeStderr("memlab _uffdhandler: \(what) failed: \(String(cString: strerror(e))); a faulting thread would wait for ever, exiting\n")
        _exit(3)
    }

    /// Starts the threads, says READY through `ready`, waits for every doorbell.
    func run(ready: (Bool) -> Bool) -> HandlerStats? {
        var threads: [OSThread] = []
        for k in 0..<Int(config.threads) {
            guard let t = try? OSThread(body: { [self] in loop(k) }) else { break }
            threads.append(t)
        }
        let started = threads.count == Int(config.threads)
        // Without READY the restore unregisters and never rings: a thread that did start
        // would wait forever, so the process exits (the restore sees why in its log).
        if !ready(started) || !started { writeStderr("memlab _uffdhandler: could not start \(config.threads) handler threads or say READY\n"); exit(1) }
        for t in threads { t.join() }
        var s = HandlerStats()
        s.pid = getpid()
        s.copies = copies.load(ordering: .relaxed); s.zeroFaults = zeroFaults.load(ordering: .relaxed); s.eexist = eexist.load(ordering: .relaxed)
        s.bytesCopied = s.copies * pageSize; s.ioctls = ioctls.load(ordering: .relaxed); s.outside = outside.load(ordering: .relaxed)
        s.cpuNS = cpuNS.load(ordering: .relaxed)
        // An ioctl that failed ended the process (`fatal`): a session that reports has none.
        for k in 0..<Int(config.threads) { s.latencies.append(contentsOf: UnsafeBufferPointer(start: latencies + k * capacity, count: latencyCounts[k])) }
        return s
    }

    /// One handler thread: wait (the restore's wait mode), read a batch, resolve each fault
    /// with one ioctl that also wakes, until a doorbell fault.
    func loop(_ k: Int) {
        _ = memlab_set_timerslack(1)
        let cpu0 = memlab_thread_cpu_ns()
        let buffer = UnsafeMutablePointer<Userfaultfd.Message>.allocate(capacity: 64)
        let mode = EngineConfig.WaitMode.allCases[Int(config.wait)]
        let epfd = mode == .epoll ? memlab_epoll_in(uffd.fd) : -1
        let lat = latencies + k * capacity
        var nLat = 0
        defer {
            latencyCounts[k] = nLat
            if epfd >= 0 { close(epfd) }
            buffer.deallocate()
            cpuNS.add(memlab_thread_cpu_ns() &- cpu0, ordering: .relaxed)
        }
        if mode == .epoll && epfd < 0 { fatal("epoll_create1/epoll_ctl(userfaultfd)", errno) }
        let start = UInt(config.regionAddress), end = start + UInt(config.regionLength)
        let bells = UInt(config.doorbellAddress), bellsEnd = bells + UInt(config.threads) * UInt(pageSize)
        let batch = Int(config.batch)
        var exit = false
        while !exit {
            var n = 0
            do throws(SystemError) {
                switch mode {
                case .blocking: n = try uffd.read(into: buffer, max: batch)
                case .poll: if try uffd.poll() { n = try uffd.read(into: buffer, max: batch) }
                case .epoll:
                    let rc = memlab_epoll_wait_in(epfd, -1)
                    if rc < 0 && Glibc.errno != EINTR { throw SystemError.current("epoll_wait") }
                    if rc > 0 { n = try uffd.read(into: buffer, max: batch) }
                case .busy: n = try uffd.read(into: buffer, max: batch)
                }
            } catch {
                fatal("waiting on or reading the userfaultfd", error.errno)
            }
            let now = Clock.nanoseconds()
            for i in 0..<n where buffer[i].event == UInt32(memlab_UFFD_EVENT_PAGEFAULT) {
                let a = UInt(buffer[i].address) & ~UInt(pageSize - 1)
                let dst = UnsafeMutableRawPointer(bitPattern: a)!
                if a >= start && a < end {
                    let src = image + Int(a - start)
                    ioctls.add(1, ordering: .relaxed)
                    do throws(SystemError) {
                        if config.zeropage == 1 && memcmp(src, zero, pageSize) == 0 {
                            try uffd.zeropage(dst, length: pageSize)
                            zeroFaults.add(1, ordering: .relaxed)
                        } else {
                            try uffd.copy(to: dst, from: src, length: pageSize)
                            copies.add(1, ordering: .relaxed)
                        }
                    } catch {
                        if error.errno == EEXIST {
                            // Installed by another handler thread since: only a wake is missing.
                            eexist.add(1, ordering: .relaxed)
                            do throws(SystemError) { try uffd.wake(dst, length: pageSize) } catch { fatal("UFFDIO_WAKE at 0x\(String(a, radix: 16))", error.errno) }
                        } else {
                            fatal("\(config.zeropage == 1 && memcmp(src, zero, pageSize) == 0 ? "UFFDIO_ZEROPAGE" : "UFFDIO_COPY") at 0x\(String(a, radix: 16))", error.errno)
                        }
                    }
                    if nLat < capacity { lat[nLat] = Clock.nanoseconds() &- now; nLat += 1 }
                } else if a >= bells && a < bellsEnd {
                    // This thread's doorbell: answer it and leave after the batch.
                    do throws(SystemError) { try uffd.zeropage(dst, length: pageSize) } catch {
                        if error.errno != EEXIST { fatal("UFFDIO_ZEROPAGE of the doorbell", error.errno) }
                    }
                    exit = true
                } else {
                    outside.add(1, ordering: .relaxed)
                }
            }
        }
    }
}

// MARK: - the restore's side

/// The handler process as the restore sees it: spawned (memlab re-executed), recorded in the
/// run directory (a later memlab kills it if this run dies without cleaning up), dying with
/// this process (PDEATHSIG), connected over a Unix socket whose peer is checked to be it.
final class ExternalHandlerProcess {
    let pid: pid_t
    let socket: Socket
    let logPath: String
    let socketPath: String
    let record: String?
    private var reaped = false
    private var exitText: String?

    private init(pid: pid_t, socket: Socket, logPath: String, socketPath: String, record: String?) {
        self.pid = pid; self.socket = socket; self.logPath = logPath; self.socketPath = socketPath; self.record = record
    }

    static func start(timeoutS: Double, directory base: String) throws -> ExternalHandlerProcess {
        let tag = "\(getpid())-\(Clock.nanoseconds() % 1_000_000_000)"
        let directory = try RunDirectory.make(base: base)
        let sockPath = "\(try RunDirectory.make(base: "/tmp"))/uh-\(tag).sock"
        let listener: Listener
        do { listener = try Listener.listen(try SocketAddress.unixPath(sockPath), backlog: 1) } catch {
            throw ScenarioError.failed("the handler's socket \(sockPath): \(error)")
        }
        let logPath = "\(directory)/uffdhandler-\(tag).log"
        // The process record lives in the run's directory under the first base.
        _ = try RunDirectory.make()
        let pid = try ChildProcess.spawn(ChildProcess.selfExecutable, ["_uffdhandler", "--connect=\(sockPath)", "--parent=\(getpid())"], outputPath: logPath)
        let record = RunDirectory.recordProcess(pid)
        func abandon(_ why: String) -> Error {
            kill(pid, SIGKILL)
            var s: Int32 = 0
            waitpid(pid, &s, 0)
            let log = ((try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
            unlink(logPath)
            if let record { unlink(record) }
            return ScenarioError.failed("the handler process (pid \(pid)) \(why)\(log.isEmpty ? "" : ": \(log)")")
        }
        // Accept within the deadline, watching the process: one that dies is an error at once.
        let t0 = Clock.nanoseconds()
        var conn: Socket?
        while conn == nil {
            var s: Int32 = 0
            if waitpid(pid, &s, WNOHANG) == pid { reapedEarly(record); throw abandon("exited before it connected") }
            if Clock.seconds(since: t0) > min(timeoutS, 30) { throw abandon("did not connect within \(min(timeoutS, 30)) s") }
            if (try? listener.waitReadable(timeoutMS: 20)) == true, case .success(let c) = listener.acceptNow() { conn = c }
        }
        let c = conn!
        // The peer must be the process we started, not whoever else could reach the path.
        let peer = memlab_peer_pid(c.fd)
        if peer != pid { throw abandon("was not the peer on its socket (SO_PEERCRED pid \(peer))") }
        c.setTimeouts(seconds: timeoutS)
        return ExternalHandlerProcess(pid: pid, socket: c, logPath: logPath, socketPath: sockPath, record: record)
    }

    private static func reapedEarly(_ record: String?) { if let record { unlink(record) } }

    /// Why the handler process ended, if it has (reaped here; nil while it runs).
    func died() -> String? {
        if reaped { return exitText }
        var s: Int32 = 0
        guard waitpid(pid, &s, WNOHANG) == pid else { return nil }
        reaped = true
        if let record { unlink(record) }
        let how = memlab_wifsignaled(s) != 0 ? "was killed by \(ChildProcess.signalName(memlab_wtermsig(s)))" : "exited with status \(memlab_wexitstatus(s))"
        let log = ((try? String(contentsOfFile: logPath, encoding: .utf8)) ?? "").trimmingCharacters(in: .whitespacesAndNewlines)
        exitText = "the handler process (pid \(pid)) \(how)\(log.isEmpty ? "" : ": \(String(log.suffix(400)))")"
        return exitText
    }

    /// Ends the handler: the connection closed, it exits; killed if it does not within 2 s.
    func stop() {
        socket.shutdown()
        socket.close()
        if !reaped {
            let t0 = Clock.nanoseconds()
            while died() == nil {
                if Clock.seconds(since: t0) > 2 { kill(pid, SIGKILL); var s: Int32 = 0; waitpid(pid, &s, 0); reaped = true; if let record { unlink(record) }; break }
                Clock.sleep(nanoseconds: 1_000_000)
            }
        }
        unlink(logPath)
        unlink(socketPath)
    }

    /// Sends one session: the config and [uffd, image memfd]; waits for READY (its pid).
    func begin(_ c: SessionConfig, uffd: Int32, image: Int32) -> String? {
        let words = c.encode()
        var fds: [Int32] = [uffd, image]
        let r = words.withUnsafeBytes { memlab_send_fds(socket.fd, &fds, 2, $0.baseAddress, $0.count) }
        if r != SessionConfig.words * 8 { return died() ?? "sending the userfaultfd to the handler process (pid \(pid)) failed: \(String(cString: strerror(errno)))" }
        guard let w = recvWords(socket.fd, 2), w[0] == HandlerStats.readyMagic else {
            return died() ?? "the handler process (pid \(pid)) did not say READY: \(String(cString: strerror(errno)))"
        }
        if w[1] != UInt64(pid) { return "the handler says it is pid \(w[1]), we started \(pid)" }
        return nil
    }

    /// The session's statistics, after the doorbells were rung (bounded by `pages`).
    func finish(pages: Int) -> Result<HandlerStats, ScenarioError> {
        guard let w = recvWords(socket.fd, HandlerStats.words) else {
            return .failure(.failed(died() ?? "no statistics from the handler process (pid \(pid)): \(String(cString: strerror(errno)))"))
        }
        let (s, count, why) = HandlerStats.decode(w, maxCount: UInt64(pages + 64 * Int(SessionConfig.maxThreads)))
        guard var s else { return .failure(.failed("the handler process sent a bad statistics header: \(why ?? "?")")) }
        if count > 0 {
            var lat = [UInt64](repeating: 0, count: count)
            let ok = lat.withUnsafeMutableBytes { recvAll(socket.fd, $0.baseAddress!, $0.count) }
            if !ok { return .failure(.failed(died() ?? "the handler process's latencies were cut short")) }
            s.latencies = lat
        }
        return .success(s)
    }
}

/// What one external restore measured.
struct ExternalOutcome {
    var workload = WorkloadOutcome()
    var stats = HandlerStats()
    var failed: String?
    var mismatched = 0
    var residentPages = 0
    var touchedNotInstalled = 0
    var handlerPID: pid_t = 0
}

/// One lazy restore served by the external handler process: this process maps the region
/// (anonymous or a memfd), creates and registers the userfaultfd and the doorbells, puts the
/// image in a memfd, hands both descriptors to `handler`, runs the workload, rings the
/// doorbells, and verifies every installed page (mincore) against the image.
func performExternalRestore(image: PageImage, traces: AccessTraces, handler: ExternalHandlerProcess, wait: EngineConfig.WaitMode,
                            handlerThreads: Int, batch: Int, zeropage: Bool, memfdRegion: Bool, deadlineS: Double,
                            killHandlerAfterS: Double? = nil) throws -> ExternalOutcome {
    let length = image.bytes
    let pageSize = image.pageSize
    let pages = image.pages
    let imageFile = try FileMapping.memfd(name: "memlab-lazy-image", length: length)
    memcpy(imageFile.base, image.base, length)
    var anon: AnonymousMapping?
    var shm: FileMapping?
    let region: UnsafeMutableRawPointer
    if memfdRegion { shm = try FileMapping.memfd(name: "memlab-lazy-restore", length: length); region = shm!.base } else {
        anon = try AnonymousMapping(length: length, kind: .base); region = anon!.base
    }
    let bells = try AnonymousMapping(length: handlerThreads * pageSize, kind: .base)
    var features: Userfaultfd.Features = [.threadID]
    if memfdRegion { features.insert(.missingShmem) }
    let uffd = try Userfaultfd.Descriptor(features: features, nonBlocking: wait != .blocking)
    try uffd.register(region, length: length, mode: .missing)
    try uffd.register(bells.base, length: bells.length, mode: .missing)
    func unregisterAll() {
        try? uffd.unregister(region, length: length)
        try? uffd.unregister(bells.base, length: bells.length)
    }
    var out = ExternalOutcome()
    out.handlerPID = handler.pid
    let workload = WorkloadRun(traces: traces, region: region, seed: image.seed, expected: UnsafeRawPointer(image.base))
    try workload.start()
    var c = SessionConfig()
    c.regionAddress = UInt64(UInt(bitPattern: region)); c.regionLength = UInt64(length)
    c.doorbellAddress = UInt64(UInt(bitPattern: bells.base)); c.threads = UInt64(handlerThreads)
    c.wait = UInt64(EngineConfig.WaitMode.allCases.firstIndex(of: wait)!); c.batch = UInt64(batch); c.zeropage = zeropage ? 1 : 0
    c.imageLength = UInt64(length)
    if let why = handler.begin(c, uffd: uffd.fd, image: imageFile.fd) {
        // Nobody serves the region: unregistered, the workload runs on zero pages; failed.
        unregisterAll()
        workload.release(at: Clock.nanoseconds())
        out.workload = workload.join()
        out.failed = why
        return out
    }
    let resume = Clock.nanoseconds()
    workload.release(at: resume)
    let deadline = resume + UInt64(deadlineS * 1e9)
    var killed = false
    while !workload.done {
        let now = Clock.nanoseconds()
        if let k = killHandlerAfterS, !killed, now > resume + UInt64(k * 1e9) { kill(handler.pid, SIGKILL); killed = true }
        if let d = handler.died() {
            out.failed = "\(d) \(Double((now - resume) / 1_000_000) / 1000) s after resume; the workload was released by unregistering the region"
        } else if now > deadline {
            out.failed = "the restore did not finish within \(deadlineS) s; the workload was released by unregistering the region"
        }
        if out.failed != nil { unregisterAll(); break }
        Clock.sleep(until: now + 20_000_000, spinNS: 0)
    }
    out.workload = workload.join()
    if out.failed != nil { return out }
    // Ring one bell per handler thread from a thread of ours: if the handler dies meanwhile,
    // unregistering the bells releases the ringer.
    let ringer = try OSThread { for i in 0..<handlerThreads { memlab_ref_touch(bells.base + i * pageSize, 1, pageSize) } }
    switch handler.finish(pages: pages) {
    case .success(let s): out.stats = s
    case .failure(let e): out.failed = e.description
    }
    unregisterAll()
    ringer.join()
    if out.failed != nil { return out }
    if let f = out.stats.failure { out.failed = f; return out }
    // Verification: every page resident in the region (installed by the handler) against
    // the image; every touched page must be one of them.
    var vec = [UInt8](repeating: 0, count: pages)
    guard mincore(region, length, &vec) == 0 else { throw SystemError.current("mincore") }
    var resident = [Bool](repeating: false, count: pages)
    for p in 0..<pages where vec[p] & 1 != 0 { resident[p] = true; out.residentPages += 1 }
    for p in 0..<pages where traces.touched[p] != 0 && !resident[p] { out.touchedNotInstalled += 1 }
    out.mismatched = image.mismatches(region) { resident[$0] }
    withExtendedLifetime((anon, shm, imageFile, bells, uffd)) {}
    return out
}

/// The hop's price, measured in the same repetition: the same sequential first touches of
/// `pages` pages served by the in-process engine and by the external handler, alternating
/// `rounds` times (the workload's first touch → installed and woken, as floor_fault_round_trip).
func measureHop(handler: ExternalHandlerProcess, wait: EngineConfig.WaitMode, pages: Int = 1024, rounds: Int = 2)
    throws -> (inProcess: [UInt64], external: [UInt64]) {
    let image = try PageImage(pages: pages, seed: 11, zeroRatio: 0)
    let traces = AccessTraces(pattern: .sequential, pages: pages, threads: 1, opsPerThread: pages,
                              writeRatio: 0, zipfSkew: 1, seed: 11, image: image)
    var inP: [UInt64] = [], ex: [UInt64] = []
    for _ in 0..<rounds {
        var c = EngineConfig()
        c.wait = wait
        let r = try performRestore(config: c, image: image, traces: traces, link: EmulatedLink(bytesPerSecond: 0, rttNS: 0, preempt: false),
                                   reapOrder: nil, deadlineS: 10)
        if let f = r.failed { throw ScenarioError.failed("hop calibration (in-process): \(f)") }
        inP += r.workload.firstTouchNS
        let e = try performExternalRestore(image: image, traces: traces, handler: handler, wait: wait, handlerThreads: 1, batch: 64,
                                           zeropage: true, memfdRegion: false, deadlineS: 10)
        if let f = e.failed { throw ScenarioError.failed("hop calibration (external): \(f)") }
        if e.mismatched != 0 { throw ScenarioError.failed("hop calibration (external): \(e.mismatched) pages differ from the image") }
        ex += e.workload.firstTouchNS
    }
    return (inP, ex)
}

/// The handler protocol's two decoders as the fuzzer drives them (`memlab-fuzz uffdhandler`):
/// a session header as the handler reads it, a stats header as the restore reads it. Each
/// returns whether the words were accepted, and checks what an accepted one promises.
public enum ExternalHandlerWire {
    /// `words` as a session header: accepted ones re-encode to the same words and keep the
    /// region, the doorbells and the counts inside their limits.
    public static func session(_ words: [UInt64], invariant: (Bool, String) -> Void) -> Bool {
        let (c, why) = SessionConfig.decode(words)
        guard let c else { invariant(why != nil, "a refused session header without a reason"); return false }
        invariant(Array(c.encode().prefix(10)) == Array(words.prefix(10)), "an accepted session header does not re-encode to itself")
        invariant(c.regionLength > 0 && c.regionLength <= SessionConfig.maxLength && c.regionLength % c.pageSize == 0, "region length out of range")
        invariant((1...SessionConfig.maxThreads).contains(c.threads), "threads out of range")
        invariant(c.regionAddress <= UInt64.max - c.regionLength, "the region wraps")
        let bellEnd = c.doorbellAddress.addingReportingOverflow(c.threads * c.pageSize)
        invariant(!bellEnd.overflow, "the doorbells wrap")
        invariant(bellEnd.partialValue <= c.regionAddress || c.doorbellAddress >= c.regionAddress + c.regionLength, "the doorbells overlap the region")
        return true
    }

    /// `words` as a stats header with `maxCount` pages: accepted ones promise no more
    /// latencies than `maxCount` (what the restore then reads and allocates).
    public static func stats(_ words: [UInt64], maxCount: UInt64, invariant: (Bool, String) -> Void) -> Bool {
        let (s, latencies, why) = HandlerStats.decode(words, maxCount: maxCount)
        guard let s else { invariant(why != nil, "a refused stats header without a reason"); return false }
        invariant(latencies >= 0 && UInt64(latencies) <= maxCount, "\(latencies) latencies accepted for \(maxCount) pages")
        invariant(s.pid >= 0 && s.failureCall <= 5, "pid or failure call out of range")
        _ = s.failure
        return true
    }

    public static var sessionWords: Int { SessionConfig.words }
    public static var sessionMagic: UInt64 { SessionConfig.magic }
    public static var statsMagic: UInt64 { HandlerStats.magic }
}
