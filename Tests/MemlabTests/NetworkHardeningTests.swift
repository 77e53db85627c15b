#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing

/// A destination process and what it printed once it ended.
private struct Ended {
    var status: Int32
    var exited: Bool       // false: killed by a signal (a trap)
    var stdout: String
    var stderr: String
}

private final class ErrBox: @unchecked Sendable {
    var data = Data()
    let done = DispatchSemaphore(value: 0)
}

private final class Destination {
    let process: Process
    let out: Pipe, err: Pipe
    let client: WireTestClient

    /// Starts `memlab migrate destination` on 127.0.0.1:`port` and connects to it.
    init(port: UInt16, _ extra: [String] = [], dir: TempDir) throws {
        (process, out, err) = try Memlab.start(["migrate", "destination", "--listen", "127.0.0.1:\(port)", "--timeout", "3",
                                                "--accept-timeout", "10"] + extra, stateDir: dir.path)
        guard let c = WireTestClient(port: port) else {
            process.terminate()
            throw NSError(domain: "test", code: 1, userInfo: [NSLocalizedDescriptionKey: "the destination never listened on \(port)"])
        }
        client = c
    }

    /// HELLO for a region of `region` bytes (text, so a test can send what Int cannot hold).
    func hello(region: String, pageSize: String? = nil, extra: String = "") -> (type: UInt8, payload: [UInt8])? {
        client.send(1, WireTestClient.le32(1) + Array(localImageHeader(regionBytes: region, pageSize: pageSize, extra: extra).utf8))
        return client.readFrame()
    }

    func end() -> Ended {
        // Both pipes at once: a destination that writes a megabyte to stderr must not block on
        // a test that is still reading stdout (that was a hang of its own).
        let box = ErrBox()
        let reader = Thread { [err] in box.data = err.fileHandleForReading.readDataToEndOfFile(); box.done.signal() }
        reader.start()
        let o = out.fileHandleForReading.readDataToEndOfFile()
        box.done.wait()
        let e = box.data
        process.waitUntilExit()
        return Ended(status: process.terminationStatus, exited: process.terminationReason == .exit,
                     stdout: String(decoding: o, as: UTF8.self), stderr: String(decoding: e, as: UTF8.self))
    }
}

extension KernelTests {
    /// memlab's network peers (migrate destination, migrate check, the CLI) against hostile
    /// input: every case used to trap, hang or allocate without bound.
    @Suite struct NetworkHardening {
        /// A PAGES frame whose page index is ≥ 2^63 (`Int(UInt64)` trapped): the destination
        /// answers ERROR naming the index and exits 1, having been a process that exited.
        @Test func pageIndexAtOrAbove2pow63IsMalformed() throws {
            let dir = TempDir()
            let d = try Destination(port: 27240, dir: dir)
            let welcome = try #require(d.hello(region: "1048576"))
            #expect(welcome.type == 2, "expected WELCOME: \(String(decoding: welcome.payload, as: UTF8.self))")
            d.client.send(4, WireTestClient.le32(1) + WireTestClient.le64(1 << 63) + [UInt8](repeating: 7, count: Int(getpagesize())))
            let reply = d.client.readFrame()
            let end = d.end()
            #expect(end.exited && end.status == 1, "\(end.stderr)")
            #expect(reply?.type == 11, "expected ERROR")
            let text = String(decoding: reply?.payload ?? [], as: UTF8.self)
            #expect(text.contains("page index 9223372036854775808"), "\(text)")
            #expect(end.stderr.contains("page index 9223372036854775808 outside the 256-page region"), "\(end.stderr)")
        }

        /// FINISH with a count ≥ 2^63 (`Int(UInt64)` trapped): ERROR and exit 1.
        @Test func finishCountAtOrAbove2pow63FailsTheMigration() throws {
            let dir = TempDir()
            let d = try Destination(port: 27241, dir: dir)
            #expect(d.hello(region: "1048576")?.type == 2)
            d.client.send(7, WireTestClient.le64(UInt64.max))
            let reply = d.client.readFrame()
            let end = d.end()
            #expect(end.exited && end.status == 1, "\(end.stderr)")
            #expect(reply?.type == 11)
            #expect(end.stderr.contains("source sent 18446744073709551615 pages, 0 arrived"), "\(end.stderr)")
        }

        /// Frames that do not fit the HELLO or the protocol's order: each an ERROR and exit 1
        /// with the reason (they used to be accepted: a skipped round, an oversized PING echoed,
        /// more pages in a round than the region holds).
        @Test(arguments: [
            (UInt16(27242), "round", "ROUND_END of round 7; expected round 1"),
            (UInt16(27243), "ping", "PING payload of 100 bytes"),
            (UInt16(27244), "hello", "unexpected HELLO from the source"),
            (UInt16(27245), "overfull", "more pages in round 1 (320) than the region has (256)"),
        ])
        func framesAreCheckedAgainstTheHello(port: UInt16, kind: String, reason: String) throws {
            let dir = TempDir()
            let d = try Destination(port: port, dir: dir)
            #expect(d.hello(region: "1048576")?.type == 2)
            let page = Int(getpagesize())
            switch kind {
            case "round": d.client.send(5, WireTestClient.le32(7) + WireTestClient.le32(0))
            case "ping": d.client.send(12, [UInt8](repeating: 1, count: 100))
            case "hello": d.client.send(1, WireTestClient.le32(1) + Array(localImageHeader(regionBytes: "1048576").utf8))
            default:
                // 5 frames of 64 pages = 320 pages in one round of a 256-page region.
                for _ in 0..<5 {
                    let idx = (0..<64).flatMap { WireTestClient.le64(UInt64($0)) }
                    d.client.send(4, WireTestClient.le32(64) + idx + [UInt8](repeating: 1, count: 64 * page))
                }
            }
            var reply = d.client.readFrame()
            while let r = reply, r.type != 11 { reply = d.client.readFrame() }
            let end = d.end()
            #expect(end.exited && end.status == 1, "\(end.stderr)")
            let text = String(decoding: reply?.payload ?? [], as: UTF8.self)
            #expect(text.contains(reason), "ERROR: \(text)")
            #expect(end.stderr.contains(reason), "\(end.stderr)")
        }

        /// A HELLO above --max-region is refused with REFUSE naming the cap (it used to be
        /// mapped and populated: a 1 TiB HELLO, 1 TiB committed). Without --max-region the cap
        /// is half of MemAvailable, said at start.
        @Test func helloAboveTheCapIsRefusedBeforeAnythingIsMapped() throws {
            let dir = TempDir()
            let d = try Destination(port: 27246, ["--max-region", "64M"], dir: dir)
            let r = try #require(d.hello(region: String(1 << 40)))
            let end = d.end()
            #expect(r.type == 3, "expected REFUSE")
            let text = String(decoding: r.payload, as: UTF8.self)
            #expect(text.contains("1099511627776 bytes") && text.contains("at most 67108864 bytes (--max-region)"), "\(text)")
            #expect(end.exited && end.status == 1)
            #expect(end.stdout.contains("largest image taken: 67108864 bytes"), "\(end.stdout)")

            let mem = (try? String(contentsOfFile: "/proc/meminfo", encoding: .utf8)) ?? ""
            let totalKB = Int(mem.split(separator: "\n").first { $0.hasPrefix("MemTotal:") }?.split(separator: " ")[1] ?? "") ?? 0
            let d2 = try Destination(port: 27247, dir: dir)
            let big = String(totalKB * 1024 / 4096 * 4096)   // all of RAM: above half of MemAvailable
            let r2 = try #require(d2.hello(region: big))
            let end2 = d2.end()
            #expect(r2.type == 3, "expected REFUSE: \(String(decoding: r2.payload, as: UTF8.self))")
            #expect(String(decoding: r2.payload, as: UTF8.self).contains("(--max-region)"))
            #expect(end2.stdout.contains("(half of MemAvailable)"), "\(end2.stdout)")
        }

        /// region_bytes near Int.max or beyond it, page_size 0: malformed (ERROR, exit 1),
        /// never a trap in `16 + n + region_bytes` or in the mapping's rounding.
        @Test(arguments: [
            (UInt16(27248), "9223372036854771712", "4096", "region_bytes 9223372036854771712 exceeds"),
            (UInt16(27249), "99999999999999999999", "4096", "region_bytes is not a positive multiple"),
            (UInt16(27250), "4096", "0", "page_size is not a power of two"),
        ])
        func hostileHeaderNumbersAreMalformed(port: UInt16, region: String, pageSize: String, reason: String) throws {
            let dir = TempDir()
            let d = try Destination(port: port, dir: dir)
            let r = try #require(d.hello(region: region, pageSize: pageSize))
            let end = d.end()
            #expect(r.type == 11, "expected ERROR, got \(r.type)")
            #expect(end.exited && end.status == 1)
            #expect(end.stderr.contains(reason), "\(end.stderr)")
        }

        /// An ERROR of 1 MiB full of terminal escapes: the destination reports it bounded and
        /// with the control characters replaced (the whole text used to go to the terminal).
        @Test func peerTextIsBoundedAndHasNoControlCharacters() throws {
            let dir = TempDir()
            let d = try Destination(port: 27251, dir: dir)
            #expect(d.hello(region: "1048576")?.type == 2)
            let body = Array("\u{1b}]0;owned\u{07}\u{1b}[2J".utf8) + [UInt8](repeating: 0x41, count: 1 << 20)
            d.client.send(11, body)
            let end = d.end()
            #expect(end.exited && end.status == 1)
            #expect(end.stderr.contains("the other side failed: ?]0;owned??[2JAAAA"), "\(end.stderr.prefix(200))")
            #expect(end.stderr.contains("(\(body.count) bytes in all)"))
            #expect(end.stderr.utf8.count < 4096, "\(end.stderr.utf8.count) bytes on stderr")
            #expect(!end.stderr.utf8.contains(0x1b) && !end.stderr.utf8.contains(0x07))
        }

        /// A source that sends faster than the destination hands frames to the protocol (here:
        /// a 3 s delay stage) is held back by TCP once 128 MiB are queued; the reader used to
        /// queue everything it could read (bandwidth × delay: gigabytes on loopback).
        @Test func readerQueueIsBounded() throws {
            let dir = TempDir()
            let d = try Destination(port: 27252, ["--delay-ms", "3000", "--timeout", "20", "--max-region", "4M"], dir: dir)
            d.client.setTimeout(8)
            #expect(d.hello(region: String(4 << 20))?.type == 2)
            d.client.setTimeout(0.3)
            let page = Int(getpagesize())
            let pagesPerRound = (4 << 20) / page
            var round: [UInt8] = []
            for f in 0..<(pagesPerRound / 64) {
                let idx = (0..<64).flatMap { WireTestClient.le64(UInt64(f * 64 + $0)) }
                round += WireTestClient.frame(4, WireTestClient.le32(64) + idx + [UInt8](repeating: UInt8(f), count: 64 * page))
            }
            var sent = 0, r = 1
            let start = Date()
            // At most 1 GiB in at most 2 s, so a broken bound cannot take the machine's memory.
            while sent < 1 << 30 && Date().timeIntervalSince(start) < 2 {
                let block = round + WireTestClient.frame(5, WireTestClient.le32(UInt32(r)) + WireTestClient.le32(UInt32(pagesPerRound)))
                let n = d.client.send(block)
                sent += n
                if n < block.count { break }   // the destination stopped reading
                r += 1
            }
            let hwm = try #require(procStatus(d.process.processIdentifier, "VmHWM")) * 1024
            kill(d.process.processIdentifier, SIGKILL)   // SIGTERM may be blocked in the mask it inherited
            _ = d.end()
            #expect(sent < 400 << 20, "the destination took \(sent >> 20) MiB while its protocol slept")
            #expect(hwm < 450 << 20, "peak RSS \(hwm >> 20) MiB")
        }

        /// Empty frames cost nothing against a payload-only bound: a flood of 8-byte PINGs
        /// without payload (each a queue entry) used to grow the reader's queue without limit,
        /// and taking each from the front of an array made draining it quadratic. Each frame
        /// now counts its keep too.
        @Test func aFloodOfEmptyFramesIsBounded() throws {
            let dir = TempDir()
            let d = try Destination(port: 27253, ["--delay-ms", "3000", "--timeout", "20", "--max-region", "4M"], dir: dir)
            d.client.setTimeout(8)
            #expect(d.hello(region: String(4 << 20))?.type == 2)
            d.client.setTimeout(0.3)
            let block = [UInt8]((0..<8192).flatMap { _ in WireTestClient.frame(12, []) })   // 8192 empty PINGs
            var frames = 0
            let start = Date()
            // At most 64M frames (512 MiB of headers) in at most 3 s.
            while frames < 64 << 20 && Date().timeIntervalSince(start) < 3 {
                let n = d.client.send(block)
                frames += n / 8
                if n < block.count { break }
            }
            let hwm = try #require(procStatus(d.process.processIdentifier, "VmHWM")) * 1024
            kill(d.process.processIdentifier, SIGKILL)
            _ = d.end()
            // 128 MiB / 64 bytes a frame: about 2M frames queued, plus what the socket holds.
            #expect(frames < 8 << 20, "the destination took \(frames) empty frames while its protocol slept")
            #expect(hwm < 700 << 20, "peak RSS \(hwm >> 20) MiB")
        }

        /// Numbers outside the documented ranges — 1e300, inf, nan, negative, huge — exit 2
        /// naming the option (`UInt64(delayMs * 1e6)` and `timeval(Int(timeoutS))` trapped).
        @Test(arguments: [
            ["migrate", "destination", "--listen", "127.0.0.1:1", "--timeout", "1e300"],
            ["migrate", "destination", "--listen", "127.0.0.1:1", "--timeout", "inf"],
            ["migrate", "destination", "--listen", "127.0.0.1:1", "--timeout", "nan"],
            ["migrate", "destination", "--listen", "127.0.0.1:1", "--timeout=-1"],
            ["migrate", "destination", "--listen", "127.0.0.1:1", "--timeout", "0"],
            ["migrate", "destination", "--listen", "127.0.0.1:1", "--timeout", "86401"],
            ["migrate", "destination", "--listen", "127.0.0.1:1", "--accept-timeout", "1e300"],
            ["migrate", "destination", "--listen", "127.0.0.1:1", "--accept-timeout", "nan"],
            ["migrate", "destination", "--listen", "127.0.0.1:1", "--delay-ms", "1e300"],
            ["migrate", "destination", "--listen", "127.0.0.1:1", "--delay-ms", "inf"],
            ["migrate", "destination", "--listen", "127.0.0.1:1", "--delay-ms=-5"],
            ["migrate", "destination", "--listen", "127.0.0.1:1", "--delay-ms", "60001"],
            ["migrate", "destination", "--listen", "127.0.0.1:1", "--max-region", "0"],
            ["migrate", "destination", "--listen", "127.0.0.1:1", "--max-region", "99999999999999999999"],
            ["migrate", "destination", "--listen", "127.0.0.1:1", "--max-region", "2T"],
            ["migrate", "source", "--connect", "127.0.0.1:1", "--delay-ms", "1e300"],
            ["migrate", "source", "--connect", "127.0.0.1:1", "--timeout", "inf"],
            ["migrate", "source", "--connect", "127.0.0.1:1", "--bandwidth-mbit", "nan"],
            ["migrate", "source", "--connect", "127.0.0.1:1", "--bandwidth-mbit", "0"],
            ["migrate", "source", "--connect", "127.0.0.1:1", "--bandwidth-mbit", "1e300"],
            ["migrate", "source", "--connect", "127.0.0.1:1", "--rtt-ms=-1"],
            ["migrate", "source", "--connect", "127.0.0.1:1", "--rtt-ms", "inf"],
            ["migrate", "source", "--connect", "127.0.0.1:1", "--downtime-target-ms", "nan"],
            ["migrate", "source", "--connect", "127.0.0.1:1", "--downtime-target-ms", "1e300"],
            ["migrate", "source", "--connect", "127.0.0.1:1", "--max-rounds", "0"],
            ["migrate", "source", "--connect", "127.0.0.1:1", "--max-rounds", "99999999999999999999"],
            ["migrate", "source", "--connect", "127.0.0.1:1", "--threads", "100000"],
            ["migrate", "source", "--connect", "127.0.0.1:1", "--dirty-rate=-1"],
            ["migrate", "source", "--connect", "127.0.0.1:1", "--dirty-rate", "1e300"],
            ["migrate", "source", "--connect", "127.0.0.1:1", "--size", "9223372036854775807"],
            ["migrate", "snapshot", "/tmp/memlab-never-written.snap", "--size", "9223372036854775807"],
            ["pagesource", "--listen", "127.0.0.1:1", "--idle-timeout", "inf"],
            ["pagesource", "--listen", "127.0.0.1:1", "--idle-timeout=-1"],
            ["pagesource", "--listen", "127.0.0.1:1", "--max-connections", "0"],
            ["pagesource", "--listen", "127.0.0.1:1", "--zero-ratio", "nan"],
        ])
        func outOfRangeNumbersAreBadUsage(args: [String]) throws {
            let dir = TempDir()
            // Short deadlines, so a value that got through fails fast instead of waiting a minute.
            var args = args
            if args[1] == "destination" && !args.contains(where: { $0.hasPrefix("--accept-timeout") }) { args.insert(contentsOf: ["--accept-timeout", "1"], at: 4) }
            if args[1] == "source" && !args.contains(where: { $0.hasPrefix("--timeout") }) { args.insert(contentsOf: ["--timeout", "1"], at: 4) }
            let out = try Memlab.run(args, stateDir: dir.path)
            let option = args.last { $0.hasPrefix("--") && !["--listen", "--connect"].contains($0) } ?? ""
            let name = String(option.split(separator: "=")[0])
            #expect(out.status == 2, "\(args): status \(out.status): \(out.stderr)")
            #expect(out.stderr.contains(name), "\(args): \(out.stderr)")
            #expect(!FileManager.default.fileExists(atPath: "/tmp/memlab-never-written.snap"))
        }

        /// A snapshot whose region_bytes is near Int.max (`16 + n + region_bytes` trapped) or
        /// whose header breaks the rules: exit 2, "malformed snapshot".
        @Test(arguments: [
            ("region_bytes=262144", "region_bytes=9223372036854771712", "region_bytes 9223372036854771712 exceeds"),
            ("page_size=4096", "page_size=0", "page_size is not a power of two"),
            ("checksum=", "arch=x86_64\nchecksum=", "given twice"),
            ("cpu_model=", "cpu_model=\u{1b}[31m", "contains control characters"),
        ])
        func doctoredSnapshotIsMalformed(find: String, replace: String, reason: String) throws {
            let dir = TempDir()
            let snap = dir.file("s.snap")
            #expect(try Memlab.run(["migrate", "snapshot", snap, "--size", "256K"], stateDir: dir.path).status == 0)
            var data = try Data(contentsOf: URL(fileURLWithPath: snap))
            let n = Int(data[12]) | Int(data[13]) << 8 | Int(data[14]) << 16 | Int(data[15]) << 24
            let text = String(decoding: data[16..<(16 + n)], as: UTF8.self)
            #expect(text.contains(find))
            let new = Array(text.replacingOccurrences(of: find, with: replace).utf8)
            var out = Data(data[0..<12])
            withUnsafeBytes(of: UInt32(new.count).littleEndian) { out.append(contentsOf: $0) }
            out.append(contentsOf: new)
            out.append(data[(16 + n)...])
            data = out
            try data.write(to: URL(fileURLWithPath: snap))
            let check = try Memlab.run(["migrate", "check", snap], stateDir: dir.path)
            #expect(check.status == 2, "\(check.stdout) \(check.stderr)")
            #expect(check.stderr.contains("malformed snapshot") && check.stderr.contains(reason), "\(check.stderr)")
        }
    }
}
