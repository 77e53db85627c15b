import CLinuxMM
import Foundation
import Glibc
import LinuxMM
@testable import LazyRestore
import Testing
import Transfer

/// The external handler's session protocol on bytes alone: what the restore sends decodes
/// back to itself, and every out-of-range word from a peer is refused with a reason (nothing
/// is allocated from a peer's count before it is checked).
@Suite struct ExternalHandlerProtocol {
    func valid() -> SessionConfig {
        var c = SessionConfig()
        c.regionAddress = 0x7f00_0000_0000; c.regionLength = 16 << 20
        c.doorbellAddress = 0x7e00_0000_0000; c.threads = 2; c.wait = 1; c.batch = 64; c.zeropage = 1
        c.imageLength = 16 << 20
        return c
    }

    @Test func aSessionRoundTrips() {
        let c = valid()
        let (d, why) = SessionConfig.decode(c.encode())
        #expect(why == nil)
        #expect(d == c)
    }

    @Test func hostileSessionWordsAreRefused() {
        let ps = UInt64(System.pageSize)
        let cases: [(Int, UInt64)] = [
            (0, 0x1234),                    // magic
            (1, 0x7f00_0000_0001),          // unaligned region
            (1, UInt64.max - ps + 1),       // region end would overflow
            (2, 0), (2, 4097), (2, (16 << 30) + ps), // length: empty, unaligned, too big
            (3, UInt64.max - ps + 1),       // doorbells end would overflow
            (3, 0x7f00_0000_1000),          // doorbells inside the region
            (4, 0), (4, 17),                // threads
            (5, 8192 == ps ? 4096 : 8192),  // another page size
            (6, 4),                         // wait mode
            (7, 0), (7, 65),                // batch
            (8, 2),                         // zeropage flag
            (9, 8 << 20),                   // image shorter than the region
        ]
        for (i, v) in cases {
            var w = valid().encode()
            w[i] = v
            let (d, why) = SessionConfig.decode(w)
            #expect(d == nil && why != nil, "word \(i) = \(v) was accepted")
        }
        #expect(SessionConfig.decode([SessionConfig.magic]).0 == nil, "a short header")
    }

    @Test func hostileStatsAreRefusedBeforeAnythingIsAllocated() {
        var s = HandlerStats()
        s.pid = 42; s.copies = 10; s.zeroFaults = 2; s.bytesCopied = 40960; s.latencies = [1, 2, 3]
        let (d, n, why) = HandlerStats.decode(s.header(), maxCount: 100)
        #expect(why == nil && n == 3 && d?.copies == 10 && d?.pid == 42)
        var w = s.header()
        w[11] = UInt64.max               // latencies: a count no restore asked for
        #expect(HandlerStats.decode(w, maxCount: 100).0 == nil)
        w = s.header(); w[10] = 9        // an unknown failing call
        #expect(HandlerStats.decode(w, maxCount: 100).0 == nil)
        w = s.header(); w[1] = UInt64(UInt32.max)   // not a pid
        #expect(HandlerStats.decode(w, maxCount: 100).0 == nil)
        w = s.header(); w[0] = HandlerStats.readyMagic
        #expect(HandlerStats.decode(w, maxCount: 100).0 == nil)
    }

    /// A real handler process given descriptors that are not what the protocol says: it
    /// refuses (exit 2, the reason in its output) instead of reading them as faults.
    @Test func theHandlerRefusesDescriptorsThatAreNotAUserfaultfdAndAnImage() throws {
        let dir = TempDir()
        let path = dir.file("h.sock")
        for variant in ["pipe-as-uffd", "one-descriptor"] {
            let listener = try Listener.listen(try SocketAddress.unixPath(path), backlog: 1)
            let p = Process()
            p.executableURL = URL(fileURLWithPath: Memlab.binary)
            p.arguments = ["_uffdhandler", "--connect=\(path)", "--parent=\(getpid())"]
            let err = Pipe()
            p.standardError = err
            p.standardOutput = err
            try p.run()
            let conn = try listener.accept(timeoutS: 10)
            var fds: [Int32] = [0, 0]
            #expect(pipe(&fds) == 0)
            let memfd = memlab_memfd_create("t", 1)
            #expect(ftruncate(memfd, off_t(16 << 20)) == 0)
            let words = valid().encode()
            let sent: Int = words.withUnsafeBytes { b in
                var pass: [Int32] = variant == "pipe-as-uffd" ? [fds[0], memfd] : [memfd]
                return memlab_send_fds(conn.fd, &pass, Int32(pass.count), b.baseAddress, b.count)
            }
            #expect(sent == words.count * 8)
            p.waitUntilExit()
            let text = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            #expect(p.terminationStatus == 2, "\(variant): \(text)")
            #expect(text.contains(variant == "pipe-as-uffd" ? "not a userfaultfd" : "descriptors"), "\(variant): \(text)")
            close(fds[0]); close(fds[1]); close(memfd)
        }
    }
}
