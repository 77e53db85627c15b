#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing

/// Runs a command, returns its status and output (for ip / tc).
@discardableResult
private func sh(_ args: [String]) throws -> (Int32, String) {
    let p = Process()
    p.executableURL = URL(fileURLWithPath: args[0])
    p.arguments = Array(args.dropFirst())
    let pipe = Pipe()
    p.standardOutput = pipe
    p.standardError = pipe
    try p.run()
    let d = pipe.fileHandleForReading.readDataToEndOfFile()
    p.waitUntilExit()
    return (p.terminationStatus, String(decoding: d, as: UTF8.self))
}

private let hasNetTools = FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") && FileManager.default.isExecutableFile(atPath: "/usr/sbin/tc")

/// Two network namespaces (memlab-a: source, memlab-b: destination) joined by a veth pair,
/// the source's egress shaped by tbf. `remove()` deletes both; tests call it in `defer`.
final class NamespacePair {
    static let source = "memlab-a"
    static let destination = "memlab-b"
    static let sourceAddress = "10.231.0.1"
    static let destinationAddress = "10.231.0.2"

    /// `qdisc`: tbf (a token bucket on the root) or htb (one class with rate = ceil), the two
    /// bandwidth shapers this kernel has.
    init(rateMbit: Int, qdisc: String = "tbf") throws {
        remove()  // a previous run killed half-way
        let steps: [[String]] = [
            ["/usr/sbin/ip", "netns", "add", Self.source],
            ["/usr/sbin/ip", "netns", "add", Self.destination],
            ["/usr/sbin/ip", "link", "add", "memlab-va", "netns", Self.source, "type", "veth", "peer", "name", "memlab-vb", "netns", Self.destination],
            ["/usr/sbin/ip", "-n", Self.source, "addr", "add", "\(Self.sourceAddress)/24", "dev", "memlab-va"],
            ["/usr/sbin/ip", "-n", Self.destination, "addr", "add", "\(Self.destinationAddress)/24", "dev", "memlab-vb"],
            ["/usr/sbin/ip", "-n", Self.source, "link", "set", "memlab-va", "up"],
            ["/usr/sbin/ip", "-n", Self.destination, "link", "set", "memlab-vb", "up"],
            ["/usr/sbin/ip", "-n", Self.source, "link", "set", "lo", "up"],
            ["/usr/sbin/ip", "-n", Self.destination, "link", "set", "lo", "up"],
            // Bandwidth: tbf on the source's egress (netem is not in this kernel; memlab's
            // transport adds the delay).
        ] + (qdisc == "htb" ? [
            ["/usr/sbin/tc", "-n", Self.source, "qdisc", "add", "dev", "memlab-va", "root", "handle", "1:", "htb", "default", "10"],
            ["/usr/sbin/tc", "-n", Self.source, "class", "add", "dev", "memlab-va", "parent", "1:", "classid", "1:10", "htb",
             "rate", "\(rateMbit)mbit", "ceil", "\(rateMbit)mbit", "burst", "64kb"],
        ] : [
            ["/usr/sbin/tc", "-n", Self.source, "qdisc", "add", "dev", "memlab-va", "root", "tbf",
             "rate", "\(rateMbit)mbit", "burst", "64kb", "latency", "50ms"],
        ])
        for s in steps {
            let (rc, out) = try sh(s)
            if rc != 0 {
                remove()
                throw NSError(domain: "netns", code: Int(rc), userInfo: [NSLocalizedDescriptionKey: "\(s.joined(separator: " ")): \(out)"])
            }
        }
    }

    func remove() {
        _ = try? sh(["/usr/sbin/ip", "netns", "del", Self.source])
        _ = try? sh(["/usr/sbin/ip", "netns", "del", Self.destination])
    }

    static var leftovers: [String] {
        let out = (try? sh(["/usr/sbin/ip", "netns", "list"]))?.1 ?? ""
        return out.split(separator: "\n").map { String($0.split(separator: " ")[0]) }.filter { $0.hasPrefix("memlab-") }
    }
}

/// Rewrites a snapshot's header text (the length field follows it).
private func doctor(_ path: String, _ edit: (String) -> String) throws {
    var data = try Data(contentsOf: URL(fileURLWithPath: path))
    let n = Int(data[12]) | Int(data[13]) << 8 | Int(data[14]) << 16 | Int(data[15]) << 24
    let text = String(decoding: data[16..<(16 + n)], as: UTF8.self)
    let new = Array(edit(text).utf8)
    var out = Data(data[0..<12])
    withUnsafeBytes(of: UInt32(new.count).littleEndian) { out.append(contentsOf: $0) }
    out.append(contentsOf: new)
    out.append(data[(16 + n)...])
    data = out
    try data.write(to: URL(fileURLWithPath: path))
}

extension KernelTests {
    @Suite(.enabled(if: isRoot, "needs root: userfaultfd write-protect and network namespaces"))
    struct Migration {
        private func run(_ variant: String, _ sets: [String], repeat reps: Int = 1) throws -> [String: Any] {
            let dir = TempDir()
            let out = try Memlab.run(["run", "migration:\(variant)", "--repeat", String(reps), "--json", dir.file("r.json"), "--quiet"]
                                     + sets.flatMap { ["--set", $0] }, stateDir: dir.path)
            #expect(out.status == 0, "stdout: \(out.stdout) stderr: \(out.stderr)")
            let r = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            #expect(r["status"] as? String == "ok", "\(String(describing: r["reason"]))")
            let checks = r["checks"] as? [[String: Any]] ?? []
            #expect(checks.allSatisfy { $0["agrees"] as? Bool == true }, "\(checks)")
            return r
        }

        /// PAGEMAP_SCAN reports exactly the pages written (populated and never-touched pages
        /// alike) and nothing after re-protecting; synchronous WP counts one fault per page.
        @Test(arguments: ["wp-async", "wp-sync"])
        func dirtyPagesMatchThePagesWritten(tracking: String) throws {
            let r = try run("dirty-scan", ["size=8M", "tracking=\(tracking)", "written_fraction=0.2"])
            let checks = try #require(r["checks"] as? [[String: Any]])
            #expect(checks.contains { $0["name"] as? String == "step2_missed_pages" })
            if tracking == "wp-sync" { #expect(median(r, "write_faults") == Double(2 * 409)) }
        }

        /// Nothing writes: one round sends everything, the stop-and-copy sends nothing.
        @Test func idleWorkloadConvergesInOneRound() throws {
            let r = try run("precopy", ["size=16M", "dirty_rate=0"])
            #expect(median(r, "rounds") == 1)
            #expect(median(r, "stop_copy_pages") == 0)
            #expect(median(r, "pages_transferred") == 4096)
            #expect(median(r, "converged") == 1)
        }

        /// A modest writer converges in a few rounds; the destination equals the source.
        @Test func writerSlowerThanTheLinkConverges() throws {
            let r = try run("precopy", ["size=16M", "dirty_rate=2000", "bandwidth_mbit=500"])
            #expect(median(r, "converged") == 1)
            #expect((median(r, "rounds") ?? 0) >= 2)
            #expect((median(r, "stop_copy_pages") ?? 0) > 0)
            let downtime = try #require(median(r, "downtime"))
            #expect(downtime < 0.2)
            let ratio = try #require(median(r, "total_time_model_ratio"))
            #expect(ratio > 0.8 && ratio < 1.5, "total time \(ratio) × the model's")
            let series = try #require(r["timeseries"] as? [[String: Any]])
            #expect(series.contains { $0["name"] as? String == "round_dirty_pages" })
        }

        /// Dirtying faster than the link: every round leaves as much dirty as before; the
        /// round limit ends it and the stop-and-copy still delivers the right contents.
        @Test func writerFasterThanTheLinkNeverConverges() throws {
            let r = try run("precopy", ["size=8M", "dirty_rate=20000", "bandwidth_mbit=100", "max_rounds=5"])
            #expect(median(r, "converged") == 0)
            #expect(median(r, "rounds") == 5)
            #expect((median(r, "stop_copy_pages") ?? 0) > 500)
        }

        /// The CPU-flag rule: a snapshot from this machine is accepted; one whose flags include
        /// one this CPU lacks is refused, listing it, unless overridden; truncated files and
        /// other architectures are refused with a reason.
        @Test func snapshotCheckRefusesMissingFlagsTruncationAndOtherArch() throws {
            let dir = TempDir()
            let snap = dir.file("s.snap")
            let w = try Memlab.run(["migrate", "snapshot", snap, "--size", "256K"], stateDir: dir.path)
            #expect(w.status == 0, "\(w.stderr)")
            let ok = try Memlab.run(["migrate", "check", snap], stateDir: dir.path)
            #expect(ok.status == 0, "\(ok.stdout) \(ok.stderr)")
            #expect(ok.stdout.hasPrefix("compatible"))

            try doctor(snap) { $0.replacingOccurrences(of: "cpu_flags=", with: "cpu_flags=memlab_fake_flag ") }
            let refused = try Memlab.run(["migrate", "check", snap], stateDir: dir.path)
            #expect(refused.status == 1)
            #expect(refused.stdout.contains("refused") && refused.stdout.contains("memlab_fake_flag"), "\(refused.stdout)")
            let forced = try Memlab.run(["migrate", "check", snap, "--ignore-cpu-flags"], stateDir: dir.path)
            #expect(forced.status == 0)
            #expect(forced.stdout.contains("memlab_fake_flag"))

            try doctor(snap) { $0.replacingOccurrences(of: "arch=x86_64", with: "arch=aarch64").replacingOccurrences(of: "arch=aarch64\n", with: "arch=aarch64\n") }
            var u = utsname(); uname(&u)
            let arch = withUnsafeBytes(of: &u.machine) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
            if arch == "x86_64" {
                let other = try Memlab.run(["migrate", "check", snap, "--ignore-cpu-flags"], stateDir: dir.path)
                #expect(other.status == 1)
                #expect(other.stdout.contains("from aarch64"), "\(other.stdout)")
            }

            let w2 = try Memlab.run(["migrate", "snapshot", snap, "--size", "256K"], stateDir: dir.path)
            #expect(w2.status == 0)
            let size = try #require(try FileManager.default.attributesOfItem(atPath: snap)[.size] as? Int)
            #expect(truncate(snap, off_t(size - 4096)) == 0)
            let cut = try Memlab.run(["migrate", "check", snap], stateDir: dir.path)
            #expect(cut.status == 2)
            #expect(cut.stderr.contains("truncated"), "\(cut.stderr)")
        }

        /// Two processes in two network namespaces over a tbf-shaped veth, 5 ms delay stage
        /// on each side: memory arrives intact, and downtime and total time agree with the
        /// emulated link's model for the same bandwidth and RTT.
        @Test(.enabled(if: hasNetTools, "needs ip and tc (iproute2)"), arguments: ["tbf", "htb"])
        func twoHostMigrationOnAShapedLinkMatchesTheModel(qdisc: String) throws {
            let pair = try NamespacePair(rateMbit: 100, qdisc: qdisc)
            defer { pair.remove() }
            let dir = TempDir()
            let port = "27213"
            let (dst, dstOut, _) = try Memlab.start(["migrate", "destination", "--listen", "\(NamespacePair.destinationAddress):\(port)", "--delay-ms", "5", "--timeout", "10", "--accept-timeout", "30"],
                                                    stateDir: dir.path, prefix: ["/usr/sbin/ip", "netns", "exec", NamespacePair.destination])
            defer { if dst.isRunning { dst.terminate() } }
            let src = try Memlab.run(["migrate", "source", "--connect", "\(NamespacePair.destinationAddress):\(port)", "--size", "16M",
                                      "--bandwidth-mbit", "100", "--delay-ms", "5", "--dirty-rate", "1000", "--json", dir.file("src.json")],
                                     stateDir: dir.path, prefix: ["/usr/sbin/ip", "netns", "exec", NamespacePair.source])
            let dstText = String(decoding: dstOut.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            dst.waitUntilExit()
            #expect(src.status == 0, "source: \(src.stdout) \(src.stderr)")
            #expect(dst.terminationStatus == 0, "destination: \(dstText)")
            #expect(dstText.contains("verified"))
            let json = try #require(runs(try loadJSON(dir.file("src.json"))).first)
            let checks = try #require(json["checks"] as? [[String: Any]])
            #expect(checks.allSatisfy { $0["agrees"] as? Bool == true }, "\(checks)")
            let down = try #require(median(json, "downtime_model_ratio"))
            let total = try #require(median(json, "total_time_model_ratio"))
            let rtt = try #require(median(json, "measured_rtt"))
            print("two-host (\(qdisc)): downtime/model \(down), total_time/model \(total), measured RTT \(rtt) s")
            #expect(rtt > 0.0095 && rtt < 0.03, "RTT \(rtt) s with a 5 ms delay stage each way")
            #expect(down > 0.5 && down < 2.0, "downtime \(down) × the model's")
            #expect(total > 0.8 && total < 1.25, "total time \(total) × the model's")
        }

        /// The destination dies mid-migration: the source reports it within its deadline.
        @Test(.enabled(if: hasNetTools, "needs ip and tc (iproute2)"))
        func destinationDyingFailsTheSourceInTime() throws {
            let pair = try NamespacePair(rateMbit: 20)
            defer { pair.remove() }
            let dir = TempDir()
            let port = "27214"
            let (dst, _, _) = try Memlab.start(["migrate", "destination", "--listen", "\(NamespacePair.destinationAddress):\(port)", "--timeout", "5"],
                                               stateDir: dir.path, prefix: ["/usr/sbin/ip", "netns", "exec", NamespacePair.destination])
            defer { if dst.isRunning { dst.terminate() } }
            let (src, srcOut, srcErr) = try Memlab.start(["migrate", "source", "--connect", "\(NamespacePair.destinationAddress):\(port)", "--size", "32M",
                                                          "--bandwidth-mbit", "20", "--timeout", "3"],
                                                         stateDir: dir.path, prefix: ["/usr/sbin/ip", "netns", "exec", NamespacePair.source])
            usleep(1_500_000)
            // ip netns exec runs memlab in its place (exec): the pid is memlab's.
            kill(dst.processIdentifier, SIGKILL)
            let killedAt = Date()
            _ = srcOut.fileHandleForReading.readDataToEndOfFile()
            let err = String(decoding: srcErr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            src.waitUntilExit()
            let took = Date().timeIntervalSince(killedAt)
            #expect(src.terminationStatus == 1)
            #expect(err.contains("migration failed"), "\(err)")
            #expect(took < 6, "the source took \(took) s to notice")
        }

        /// Garbage, a truncated frame and a silent peer: clear failures within the deadline.
        @Test func malformedTruncatedAndSilentPeersFailInTime() throws {
            let dir = TempDir()
            // A source that sends a PAGES frame header promising 65535 bytes, then 3, then closes.
            let (dst, dstOut, dstErr) = try Memlab.start(["migrate", "destination", "--listen", "127.0.0.1:27215", "--timeout", "3"], stateDir: dir.path)
            usleep(300_000)
            _ = try sh(["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/27215; printf 'ML\\x04\\x00\\xff\\xff\\x00\\x00abc' >&3; exec 3>&-"])
            _ = dstOut.fileHandleForReading.readDataToEndOfFile()
            let e1 = String(decoding: dstErr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            dst.waitUntilExit()
            #expect(dst.terminationStatus == 1)
            #expect(e1.contains("truncated PAGES") || e1.contains("expected HELLO"), "\(e1)")

            // Bytes that are not the protocol at all.
            let (d2, o2, r2) = try Memlab.start(["migrate", "destination", "--listen", "127.0.0.1:27216", "--timeout", "3"], stateDir: dir.path)
            usleep(300_000)
            _ = try sh(["/bin/bash", "-c", "exec 3<>/dev/tcp/127.0.0.1/27216; printf 'GET / HTTP/1.0\\r\\n\\r\\n' >&3; sleep 1; exec 3>&-"])
            _ = o2.fileHandleForReading.readDataToEndOfFile()
            let e2 = String(decoding: r2.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            d2.waitUntilExit()
            #expect(d2.terminationStatus == 1)
            #expect(e2.contains("bad frame magic"), "\(e2)")

            // A destination that accepts and never answers: the source's HELLO waits 2 s at most.
            let listener = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            defer { close(listener) }
            var one: Int32 = 1
            setsockopt(listener, SOL_SOCKET, SO_REUSEADDR, &one, socklen_t(4))
            var sa = sockaddr_in()
            sa.sin_family = sa_family_t(AF_INET)
            sa.sin_port = UInt16(27217).bigEndian
            sa.sin_addr.s_addr = inet_addr("127.0.0.1")
            let b = withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(listener, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } }
            #expect(b == 0)
            listen(listener, 1)
            let start = Date()
            let silent = try Memlab.run(["migrate", "source", "--connect", "127.0.0.1:27217", "--size", "1M", "--timeout", "2"], stateDir: dir.path)
            let took = Date().timeIntervalSince(start)
            #expect(silent.status == 1)
            #expect(silent.stderr.contains("timeout"), "\(silent.stderr)")
            #expect(took < 5, "took \(took) s")
        }

        /// Over TCP, a destination refuses a source whose CPU had a flag this one lacks: it
        /// answers REFUSE listing the flag and exits 1; with --ignore-cpu-flags it says WELCOME.
        @Test(arguments: [false, true])
        func destinationRefusesMissingCPUFlagsOverTCP(ignore: Bool) throws {
            let dir = TempDir()
            let port: UInt16 = ignore ? 27219 : 27218
            let (dst, dstOut, dstErr) = try Memlab.start(["migrate", "destination", "--listen", "127.0.0.1:\(port)", "--timeout", "2"]
                                                         + (ignore ? ["--ignore-cpu-flags"] : []), stateDir: dir.path)
            defer { if dst.isRunning { dst.terminate() } }
            // The HELLO of a source whose CPU had every flag of this one plus a made-up one.
            let cpuinfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
            let flagsLine = cpuinfo.split(separator: "\n").first { $0.hasPrefix("flags") || $0.hasPrefix("Features") }
            let flags = flagsLine.map { String($0.split(separator: ":", maxSplits: 1)[1]).trimmingCharacters(in: .whitespaces) } ?? ""
            let arch = String(cString: { var u = utsname(); uname(&u); return withUnsafeBytes(of: u.machine) { Array($0.prefix { $0 != 0 }) } }() + [0])
            let header = "arch=\(arch)\npage_size=\(getpagesize())\ncpu_model=doctored\ncpu_flags=\(flags) memlab_test_flag\nregion_bytes=1048576\nchecksum=0\n"
            var payload: [UInt8] = [1, 0, 0, 0] + Array(header.utf8)
            let n = UInt32(payload.count)
            payload = [0x4D, 0x4C, 1, 0, UInt8(n & 0xff), UInt8(n >> 8 & 0xff), UInt8(n >> 16 & 0xff), UInt8(n >> 24)] + payload
            var sa = sockaddr_in()
            sa.sin_family = sa_family_t(AF_INET)
            sa.sin_port = port.bigEndian
            sa.sin_addr.s_addr = inet_addr("127.0.0.1")
            // A fresh socket per attempt: one whose connect was refused is not reused.
            var fd: Int32 = -1
            let connected = waitFor(5) {
                if fd >= 0 { close(fd) }
                fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
                return withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } } == 0
            }
            defer { close(fd) }
            #expect(connected)
            #expect(write(fd, payload, payload.count) == payload.count)
            var reply = [UInt8](repeating: 0, count: 4096)
            var tv = timeval(tv_sec: 5, tv_usec: 0)
            setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
            let got = read(fd, &reply, reply.count)
            #expect(got >= 8, "no reply from the destination")
            guard got >= 8 else { return }
            let body = String(decoding: reply[8..<got], as: UTF8.self)
            if ignore {
                #expect(reply[2] == 2, "expected WELCOME, got type \(reply[2]): \(body)")
                shutdown(fd, Int32(SHUT_RDWR))   // then the source vanishes: the destination fails, having warned
                let out = String(decoding: dstOut.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                let err = String(decoding: dstErr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                dst.waitUntilExit()
                #expect((out + err).contains("memlab_test_flag") && (out + err).contains("--ignore-cpu-flags"), "\(out) \(err)")
            } else {
                #expect(reply[2] == 3, "expected REFUSE, got type \(reply[2]): \(body)")
                #expect(body.contains("memlab_test_flag"), "\(body)")
                _ = dstOut.fileHandleForReading.readDataToEndOfFile()
                let err = String(decoding: dstErr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
                dst.waitUntilExit()
                #expect(dst.terminationStatus == 1)
                #expect(err.contains("memlab_test_flag"), "\(err)")
            }
        }

        /// The source dies mid-migration: the destination reports it within its deadline and
        /// claims nothing verified.
        @Test(.enabled(if: hasNetTools, "needs ip and tc (iproute2)"))
        func sourceDyingFailsTheDestinationInTime() throws {
            let pair = try NamespacePair(rateMbit: 20)
            defer { pair.remove() }
            let dir = TempDir()
            let port = "27220"
            let (dst, dstOut, dstErr) = try Memlab.start(["migrate", "destination", "--listen", "\(NamespacePair.destinationAddress):\(port)", "--timeout", "3",
                                                          "--json", dir.file("dst.json")],
                                                         stateDir: dir.path, prefix: ["/usr/sbin/ip", "netns", "exec", NamespacePair.destination])
            defer { if dst.isRunning { dst.terminate() } }
            let (src, _, _) = try Memlab.start(["migrate", "source", "--connect", "\(NamespacePair.destinationAddress):\(port)", "--size", "32M",
                                                "--bandwidth-mbit", "20", "--timeout", "5"],
                                               stateDir: dir.path, prefix: ["/usr/sbin/ip", "netns", "exec", NamespacePair.source])
            defer { if src.isRunning { src.terminate() } }
            usleep(1_500_000)
            kill(src.processIdentifier, SIGKILL)
            let killedAt = Date()
            let out = String(decoding: dstOut.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            let err = String(decoding: dstErr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            dst.waitUntilExit()
            let took = Date().timeIntervalSince(killedAt)
            #expect(dst.terminationStatus == 1, "\(out) \(err)")
            #expect(err.contains("memlab migrate:") && (err.contains("connection closed") || err.contains("peer closed")), "\(err)")
            #expect(!out.contains("verified"), "\(out)")
            #expect(took < 5, "the destination took \(took) s to notice")
            let doc = try loadJSON(dir.file("dst.json"))
            #expect(runs(doc).first?["status"] as? String == "failed")
        }

        /// The link goes down mid-migration (the veth is set down): both sides fail within
        /// their deadlines; neither reports success.
        @Test(.enabled(if: hasNetTools, "needs ip and tc (iproute2)"))
        func linkDroppingFailsBothSidesInTime() throws {
            let pair = try NamespacePair(rateMbit: 20)
            defer { pair.remove() }
            let dir = TempDir()
            let port = "27221"
            let (dst, dstOut, dstErr) = try Memlab.start(["migrate", "destination", "--listen", "\(NamespacePair.destinationAddress):\(port)", "--timeout", "3"],
                                                         stateDir: dir.path, prefix: ["/usr/sbin/ip", "netns", "exec", NamespacePair.destination])
            defer { if dst.isRunning { dst.terminate() } }
            let (src, srcOut, srcErr) = try Memlab.start(["migrate", "source", "--connect", "\(NamespacePair.destinationAddress):\(port)", "--size", "32M",
                                                          "--bandwidth-mbit", "20", "--timeout", "3"],
                                                         stateDir: dir.path, prefix: ["/usr/sbin/ip", "netns", "exec", NamespacePair.source])
            defer { if src.isRunning { src.terminate() } }
            usleep(1_500_000)
            let (rc, why) = try sh(["/usr/sbin/ip", "-n", NamespacePair.source, "link", "set", "memlab-va", "down"])
            #expect(rc == 0, "\(why)")
            let droppedAt = Date()
            _ = srcOut.fileHandleForReading.readDataToEndOfFile()
            let sErr = String(decoding: srcErr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            src.waitUntilExit()
            let srcTook = Date().timeIntervalSince(droppedAt)
            _ = dstOut.fileHandleForReading.readDataToEndOfFile()
            let dErr = String(decoding: dstErr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            dst.waitUntilExit()
            let dstTook = Date().timeIntervalSince(droppedAt)
            #expect(src.terminationStatus == 1 && sErr.contains("timeout"), "source: \(sErr)")
            #expect(dst.terminationStatus == 1 && dErr.contains("timeout"), "destination: \(dErr)")
            #expect(srcTook < 8 && dstTook < 8, "source took \(srcTook) s, destination \(dstTook) s: \(sErr) / \(dErr)")
        }

        /// Lazy restore across two hosts: `memlab pagesource` serves the image in one network
        /// namespace, the restore runs in the other with source_address; every touched page
        /// crosses the shaped veth once and the contents match.
        @Test(.enabled(if: hasNetTools, "needs ip and tc (iproute2)"))
        func lazyRestoreFromAPageSourceOnAnotherHost() throws {
            let pair = try NamespacePair(rateMbit: 200)
            defer { pair.remove() }
            let dir = TempDir()
            let address = "\(NamespacePair.destinationAddress):27230"
            let (ps, _, _) = try Memlab.start(["pagesource", "--listen", address, "--size", "16M", "--seed", "5"],
                                              stateDir: dir.path, prefix: ["/usr/sbin/ip", "netns", "exec", NamespacePair.destination])
            defer { kill(ps.processIdentifier, SIGKILL); ps.waitUntilExit() }
            let ready = waitFor(10) {
                ((try? sh(["/usr/sbin/ip", "netns", "exec", NamespacePair.destination, "/usr/bin/ss", "-ltn"]))?.1 ?? "").contains(address)
            }
            #expect(ready, "the page source never listened on \(address)")
            let out = try Memlab.run(["run", "lazy-restore:restore", "--repeat", "2", "--quiet", "--json", dir.file("r.json"),
                                      "--set", "source=tcp", "--set", "source_address=\(address)", "--set", "size=16M", "--set", "seed=5",
                                      "--set", "accesses=512", "--set", "workload=random", "--set", "rtt_ms=0.5"],
                                     stateDir: dir.path, prefix: ["/usr/sbin/ip", "netns", "exec", NamespacePair.source])
            #expect(out.status == 0, "\(out.why)")
            let r = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            let checks = (r["checks"] as? [[String: Any]]) ?? []
            #expect(checks.contains { $0["name"] as? String == "contents_match_source" })
            #expect(checks.allSatisfy { $0["agrees"] as? Bool == true }, "\(checks.filter { $0["agrees"] as? Bool != true })")
            let remote = try #require(median(r, "faults_remote"))
            #expect(remote > 100)
            #expect(median(r, "source_bytes_received") == remote * 4096)
            // A source serving another image size is refused with both sizes named.
            let bad = try Memlab.run(["run", "lazy-restore:restore", "--repeat", "1", "--quiet", "--json", dir.file("bad.json"),
                                      "--set", "source=tcp", "--set", "source_address=\(address)", "--set", "size=32M"],
                                     stateDir: dir.path, prefix: ["/usr/sbin/ip", "netns", "exec", NamespacePair.source])
            #expect(bad.status == 1)
            let reason = (runs(try loadJSON(dir.file("bad.json"))).first?["reason"] as? String) ?? ""
            #expect(reason.contains("4096 pages") && reason.contains("8192"), "\(reason)")
        }

        @Test func noNamespaceIsLeftBehind() {
            #expect(NamespacePair.leftovers.isEmpty, "left: \(NamespacePair.leftovers)")
        }
    }
}
