#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing

private let hasPrlimit = FileManager.default.isExecutableFile(atPath: "/usr/bin/prlimit")

/// `memlab pagesource` on 127.0.0.1:`port`; killed at the end of the test.
private final class PageSourceProcess {
    let process: Process
    let out: Pipe, err: Pipe
    init(port: UInt16, _ extra: [String], dir: TempDir, prefix: [String] = []) throws {
        (process, out, err) = try Memlab.start(["pagesource", "--listen", "127.0.0.1:\(port)", "--size", "16M", "--seed", "3"] + extra,
                                               stateDir: dir.path, prefix: prefix)
    }
    deinit {
        if process.isRunning { kill(process.processIdentifier, SIGKILL) }
        process.waitUntilExit()
    }
    var pid: Int32 { process.processIdentifier }
}

/// A GET for `count` pages from `first`; the DATA's payload, or nil.
private func get(_ c: WireTestClient, first: UInt32, count: UInt32) -> [UInt8]? {
    c.send(0x21, WireTestClient.le32(1) + WireTestClient.le32(first) + WireTestClient.le32(count))
    guard let f = c.readFrame(), f.type == 0x22 else { return nil }
    return f.payload
}

/// A listener that answers every connection with `first` (a page source's first frame) and
/// keeps it open a while: a fake page source for the restore's HELLO check.
private final class FakePageSource: @unchecked Sendable {
    let fd: Int32
    init(port: UInt16, first: [UInt8]) {
        fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
        var one: Int32 = 1
        setsockopt(fd, SOL_SOCKET, SO_REUSEADDR, &one, 4)
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET)
        sa.sin_port = port.bigEndian
        sa.sin_addr.s_addr = inet_addr("127.0.0.1")
        _ = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
        listen(fd, 16)
        let listener = fd
        Thread.detachNewThread {
            while true {
                let c = accept(listener, nil, nil)
                if c < 0 { return }
                _ = first.withUnsafeBytes { send(c, $0.baseAddress, $0.count, Int32(MSG_NOSIGNAL)) }
                Thread.detachNewThread { usleep(3_000_000); close(c) }
            }
        }
    }
    func stop() { shutdown(fd, Int32(SHUT_RDWR)); close(fd) }
}

extension KernelTests {
    /// The lazy-restore page source against connection floods, silent peers and hostile
    /// arguments, and the restore against a hostile source.
    @Suite struct PageSourceHardening {
        /// 1000 connect/close cycles under a 1 GiB address-space limit: the source still serves
        /// the same pages, its connection threads are gone, and its address space stopped
        /// growing after the first 100 (malloc's per-thread arenas; no stack left behind). Each
        /// connection's thread used to keep its 8 MiB stack mapped: the source died after about
        /// 100 connections under this limit.
        @Test(.enabled(if: hasPrlimit, "needs prlimit (util-linux)"),
              .enabled(if: sanitizer == nil, "a sanitizer reserves terabytes of address space for its shadow: no 1 GiB limit can hold it"))
        func survivesAThousandConnectionsUnderA1GiBAddressSpaceLimit() throws {
            let dir = TempDir()
            let ps = try PageSourceProcess(port: 27260, [], dir: dir, prefix: ["/usr/bin/prlimit", "--as=1073741824", "--"])
            let first = try #require(WireTestClient(port: 27260), "the page source never listened")
            #expect(first.readFrame()?.type == 0x20)
            let reference = try #require(get(first, first: 5, count: 2))
            #expect(reference.count == 8192)
            // Threads with one connection open (memlab's own, and that connection's).
            usleep(500_000)
            let base = try #require(procStatus(ps.pid, "Threads"))
            func cycles(_ n: Int) -> Int {
                var served = 0
                for _ in 0..<n {
                    guard let c = WireTestClient(port: 27260, seconds: 1), let h = c.readFrame(), h.type == 0x20 else { break }
                    served += 1
                }
                return served
            }
            #expect(cycles(100) == 100)
            // Threads end when their peer closes and are joined within a second or so: only
            // those there before remain.
            #expect(waitFor(5) { procStatus(ps.pid, "Threads") == base }, "threads: \(procStatus(ps.pid, "Threads") ?? -1), before: \(base)")
            let before = try #require(procStatus(ps.pid, "VmSize"))
            let served = cycles(900)
            #expect(served == 900, "the page source stopped serving after \(100 + served) connections")
            #expect(ps.process.isRunning)
            let c = try #require(WireTestClient(port: 27260))
            #expect(c.readFrame()?.type == 0x20)
            #expect(get(c, first: 5, count: 2) == reference, "the same pages after 1000 connections")
            #expect(waitFor(5) { procStatus(ps.pid, "Threads") == base + 1 }, "threads: \(procStatus(ps.pid, "Threads") ?? -1), before: \(base)")
            let after = try #require(procStatus(ps.pid, "VmSize"))
            #expect(after < before + 16 * 1024, "VmSize \(before) kB after 100 connections, \(after) kB after 1000")
            withExtendedLifetime(first) {}   // one connection open throughout
        }

        /// --max-connections 2: a third connection gets ERROR naming the cap and is closed;
        /// once one of the two ends, a new connection is served.
        @Test func capsConcurrentConnections() throws {
            let dir = TempDir()
            let ps = try PageSourceProcess(port: 27261, ["--max-connections", "2"], dir: dir)
            let a = try #require(WireTestClient(port: 27261))
            let b = try #require(WireTestClient(port: 27261))
            #expect(a.readFrame()?.type == 0x20 && b.readFrame()?.type == 0x20)
            let c = try #require(WireTestClient(port: 27261))
            let refused = c.readFrame()
            #expect(refused?.type == 11, "expected ERROR")
            let text = String(decoding: refused?.payload ?? [], as: UTF8.self)
            #expect(text.contains("at most 2 connections"), "\(text)")
            #expect(c.closedByPeer())
            #expect(get(b, first: 0, count: 1)?.count == 4096, "the two admitted connections are served")
            shutdown(a.fd, Int32(SHUT_RDWR))
            let served = waitFor(5) {
                guard let d = WireTestClient(port: 27261), let f = d.readFrame() else { return false }
                return f.type == 0x20
            }
            #expect(served, "a slot freed by a closed connection is given to a new one")
            #expect(ps.process.isRunning)
            withExtendedLifetime((a, b)) {}
        }

        /// --idle-timeout 1: a connection that asks for nothing gets ERROR and is closed after
        /// about a second; one that keeps asking is served throughout.
        @Test func closesIdleConnections() throws {
            let dir = TempDir()
            let ps = try PageSourceProcess(port: 27262, ["--idle-timeout", "1"], dir: dir)
            let idle = try #require(WireTestClient(port: 27262))
            let busy = try #require(WireTestClient(port: 27262))
            #expect(idle.readFrame()?.type == 0x20 && busy.readFrame()?.type == 0x20)
            let start = Date()
            var answered = 0
            for k in 0..<6 {
                usleep(400_000)
                if get(busy, first: UInt32(k), count: 1)?.count == 4096 { answered += 1 }
            }
            #expect(answered == 6, "a connection asking every 0.4 s is served")
            let f = idle.readFrame()
            #expect(f?.type == 11)
            let text = String(decoding: f?.payload ?? [], as: UTF8.self)
            #expect(text.contains("no request for 1.0 s"), "\(text)")
            #expect(idle.closedByPeer())
            let waited = Date().timeIntervalSince(start)
            #expect(waited < 4, "the idle connection was closed after \(waited) s")
            #expect(ps.process.isRunning)
        }

        /// `memlab _pagesource` with hostile arguments exits 2 saying why (pages × 4096
        /// overflowing and zero_ratio=nan trapped; kind=udp was taken for tcp); valid ones serve.
        @Test(arguments: [
            ["--kind=tcp", "--listen=127.0.0.1:0", "--pages=4611686018427387904", "--seed=1", "--zero-ratio=0.1"],
            ["--kind=tcp", "--listen=127.0.0.1:0", "--pages=99999999999999999999", "--seed=1", "--zero-ratio=0.1"],
            ["--kind=tcp", "--listen=127.0.0.1:0", "--pages=16", "--seed=1", "--zero-ratio=nan"],
            ["--kind=tcp", "--listen=127.0.0.1:0", "--pages=16", "--seed=1", "--zero-ratio=-1"],
            ["--kind=udp", "--listen=127.0.0.1:0", "--pages=16", "--seed=1", "--zero-ratio=0.1"],
            ["--kind=tcp", "--listen=127.0.0.1:0", "--pages=16", "--seed=1", "--zero-ratio=0.1", "--idle-timeout=inf"],
            ["--kind=tcp", "--listen=127.0.0.1:0", "--pages=16", "--seed=1", "--zero-ratio=0.1", "--max-connections=0"],
            ["--kind=tcp", "--listen=127.0.0.1:0", "--pages=16", "--zero-ratio=0.1"],
            ["--kind=tcp", "--listen=127.0.0.1:0", "--pages=16", "--seed=1", "--zero-ratio=0.1", "--colour=blue"],
            ["--kind=tcp", "--listen=localhost", "--pages=16", "--seed=1", "--zero-ratio=0.1"],
            ["--kind=unix", "--listen=/" + String(repeating: "x", count: 200), "--pages=16", "--seed=1", "--zero-ratio=0.1"],
            // The key=value syntax of before: refused, not half-understood.
            ["kind=tcp", "listen=127.0.0.1:0", "pages=16", "seed=1", "zero_ratio=0.1"],
        ])
        func hiddenEntryPointRefusesBadArguments(args: [String]) throws {
            let dir = TempDir()
            let out = try Memlab.run(["_pagesource"] + args, stateDir: dir.path)
            #expect(out.status == 2, "\(args): \(out.status) \(out.stderr)")
            #expect(out.stderr.hasPrefix("memlab _pagesource: ") && out.stderr.contains("\nusage: memlab _pagesource "), "\(out.stderr)")
        }

        @Test func hiddenEntryPointServesWithValidArguments() throws {
            let dir = TempDir()
            let ready = dir.file("ready")
            let (p, _, _) = try Memlab.start(["_pagesource", "--kind", "tcp", "--listen", "127.0.0.1:0", "--ready", ready, "--pages", "16",
                                              "--seed", "1", "--zero-ratio", "0.1"], stateDir: dir.path)
            defer { kill(p.processIdentifier, SIGKILL); p.waitUntilExit() }
            #expect(waitFor(10) { ((try? String(contentsOfFile: ready, encoding: .utf8)) ?? "").hasSuffix("\n") })
            let fields = ((try? String(contentsOfFile: ready, encoding: .utf8)) ?? "").split(separator: " ")
            let port = try #require(fields.count == 2 ? UInt16(fields[1].dropLast()) : nil)
            let c = try #require(WireTestClient(port: port))
            let hello = try #require(c.readFrame())
            #expect(hello.type == 0x20 && hello.payload == WireTestClient.le32(1) + WireTestClient.le32(4096) + WireTestClient.le64(16))
        }

        /// A source whose HELLO claims 2^64−1 pages (`Int(UInt64)` trapped in the restore), or
        /// that answers ERROR at connect: the restore fails with the source's words.
        @Test(.enabled(if: isRoot, "needs root: userfaultfd"), arguments: [
            (UInt16(27263), "hello", "18446744073709551615 pages; expected v1, 4096, 4096"),
            (UInt16(27264), "error", "the page source refused the connection: busy?[0m"),
        ])
        func restoreRefusesAHostileSource(port: UInt16, kind: String, reason: String) throws {
            let first = kind == "hello"
                ? WireTestClient.frame(0x20, WireTestClient.le32(1) + WireTestClient.le32(4096) + WireTestClient.le64(UInt64.max))
                : WireTestClient.frame(11, Array("busy\u{1b}[0m".utf8))
            let fake = FakePageSource(port: port, first: first)
            defer { fake.stop() }
            let dir = TempDir()
            let out = try Memlab.run(["run", "lazy-restore:restore", "--repeat", "1", "--quiet", "--json", dir.file("r.json"),
                                      "--set", "source=tcp", "--set", "source_address=127.0.0.1:\(port)", "--set", "size=16M"],
                                     stateDir: dir.path)
            #expect(out.status == 1, "\(out.stdout) \(out.stderr)")
            let r = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            #expect(r["status"] as? String == "failed")
            let why = (r["reason"] as? String) ?? ""
            #expect(why.contains(reason), "\(why)")
        }
    }
}
