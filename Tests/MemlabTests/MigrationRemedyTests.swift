#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing

extension KernelTests {
    /// Issue 14's remedies on the real kernel: throttling that really slows the workload and
    /// makes pre-copy converge, and encodings that send fewer bytes with not one page wrong.
    @Suite(.enabled(if: isRoot, "needs root: userfaultfd write-protect (like the Migration suite)"))
    struct MigrationRemedies {
        private func run(_ variant: String, _ sets: [String]) throws -> [String: Any] {
            let dir = TempDir()
            let out = try Memlab.run(["run", "migration:\(variant)", "--repeat", "1", "--json", dir.file("r.json"), "--quiet"]
                                     + sets.flatMap { ["--set", $0] }, stateDir: dir.path)
            #expect(out.status == 0, "stdout: \(out.stdout) stderr: \(out.stderr)")
            let r = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            #expect(r["status"] as? String == "ok", "\(String(describing: r["reason"]))")
            let checks = r["checks"] as? [[String: Any]] ?? []
            #expect(checks.contains { $0["name"] as? String == "destination_mismatched_pages" }, "\(checks)")
            #expect(checks.allSatisfy { $0["agrees"] as? Bool == true }, "\(checks)")
            return r
        }

        /// A writer faster than the link: without a throttle the round limit ends pre-copy;
        /// auto-converge raises the throttle round after round until it converges, and the
        /// workload's measured write rate fell while throttled.
        @Test func autoConvergeThrottlesUntilPrecopyConverges() throws {
            let common = ["size=8M", "dirty_rate=30000", "bandwidth_mbit=200"]
            let free = try run("precopy", common + ["max_rounds=12"])
            #expect(median(free, "converged") == 0, "the writer outruns a 200 Mbit/s link")
            let r = try run("precopy", common + ["max_rounds=40", "throttle=auto-converge"])
            #expect(median(r, "converged") == 1)
            let pct = try #require(median(r, "throttle_max_percent"))
            #expect(pct >= 20 && pct <= 99)
            #expect((median(r, "throttle_triggers") ?? 0) >= 1)
            #expect(median(r, "throttle_engaged_at") != nil)
            let slow = try #require(median(r, "workload_slowdown"))
            #expect(slow > 0.1, "throttled threads write less: slowdown \(slow)")
            #expect((median(r, "throttle_sleep_fraction") ?? 0) > 0)
            let series = try #require(r["timeseries"] as? [[String: Any]])
            #expect(series.contains { $0["name"] as? String == "round_throttle_percent" })
        }

        /// dirty-limit caps each thread's write rate at the limit once it engages.
        @Test func dirtyLimitCapsTheWriteRate() throws {
            let r = try run("precopy", ["size=16M", "dirty_rate=30000", "bandwidth_mbit=200", "throttle=dirty-limit", "dirty_limit=500"])
            #expect(median(r, "converged") == 1)
            let held = try #require(median(r, "throttled_write_rate"))
            #expect(held < 500 * 1.2, "throttled rate \(held) pages/s over a 500 pages/s limit")
            #expect((median(r, "unthrottled_write_rate") ?? 0) > 20000)
        }

        /// Zero pages go as headers: the count matches the image's share, fewer bytes cross,
        /// and the destination is exact.
        @Test func zeroPagesGoAsHeaders() throws {
            let r = try run("precopy", ["size=16M", "dirty_rate=0", "zero_ratio=0.4", "zero_pages=detect"])
            let zero = try #require(median(r, "zero_pages"))
            #expect(zero > 4096 * 0.35 && zero < 4096 * 0.45, "\(zero) zero pages of 4096 at zero_ratio 0.4")
            let bytes = try #require(median(r, "bytes_transferred"))
            #expect(bytes < 16 * 1048576 * 0.65)
        }

        /// XBZRLE under a heavy writer, and zstd on compressible pages, pre-copy and hybrid:
        /// hits, deltas and bytes saved, and still not one page wrong.
        @Test(arguments: ["precopy", "hybrid"])
        func xbzrleAndZstdSendLessAndRebuildExactly(variant: String) throws {
            let x = try run(variant, ["size=16M", "dirty_rate=20000", "bandwidth_mbit=500", "xbzrle_cache=16M", "max_rounds=6"])
            #expect((median(x, "xbzrle_cache_hits") ?? 0) > 0)
            #expect((median(x, "xbzrle_pages") ?? 0) > 0)
            #expect((median(x, "xbzrle_bytes_saved") ?? 0) > 0)
            #expect((median(x, "encoding_ratio") ?? 1) < 1)
            let z = try run(variant, ["size=16M", "dirty_rate=5000", "compressibility=0.6", "compress=zstd", "compress_level=3"])
            let ratio = try #require(median(z, "compression_ratio"))
            #expect(ratio < 0.8, "zstd on pages 60 % zero words: \(ratio)")
            #expect((median(z, "encode_cpu_time") ?? 0) > 0)
        }

        /// Bad combinations are refused before anything runs (exit 2 with the reason).
        @Test func badRemedyParametersAreRefused() throws {
            let dir = TempDir()
            for (sets, want) in [(["throttle_initial=50", "throttle_max=30"], "throttle_initial"),
                                 (["xbzrle_cache=100"], "xbzrle_cache"),
                                 (["compress_level=40"], "compress_level"),
                                 (["throttle=fast"], "throttle")] {
                let out = try Memlab.run(["run", "migration:precopy"] + sets.flatMap { ["--set", $0] }, stateDir: dir.path)
                #expect(out.status == 2, "\(sets): \(out.stdout) \(out.stderr)")
                #expect((out.stdout + out.stderr).contains(want), "\(sets): \(out.stderr)")
            }
            let post = try Memlab.run(["run", "migration:postcopy", "--set", "throttle=auto-converge"], stateDir: dir.path)
            #expect(post.status == 2)
        }

        /// `memlab migrate` over loopback TCP with every encoding on: the destination decodes
        /// ENCODED_PAGES frames and verifies; the source's document says what was saved.
        @Test func twoProcessMigrationWithEncodings() throws {
            let dir = TempDir()
            let port = "27231"
            let (dst, dstOut, _) = try Memlab.start(["migrate", "destination", "--listen", "127.0.0.1:\(port)", "--timeout", "10",
                                                    "--accept-timeout", "30", "--json", dir.file("dst.json")], stateDir: dir.path)
            defer { if dst.isRunning { dst.terminate() } }
            usleep(300_000)
            let src = try Memlab.run(["migrate", "source", "--connect", "127.0.0.1:\(port)", "--size", "16M", "--dirty-rate", "20000",
                                      "--bandwidth-mbit", "500", "--zero-ratio", "0.3", "--compressibility", "0.5", "--zero-pages",
                                      "--xbzrle-cache", "8M", "--zstd", "1", "--json", dir.file("src.json")], stateDir: dir.path)
            let dstText = String(decoding: dstOut.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            dst.waitUntilExit()
            #expect(src.status == 0, "source: \(src.stdout) \(src.stderr)")
            #expect(dst.terminationStatus == 0, "destination: \(dstText)")
            let s = try #require(runs(try loadJSON(dir.file("src.json"))).first)
            #expect((median(s, "zero_pages") ?? 0) > 0)
            #expect((median(s, "compressed_pages") ?? 0) > 0)
            #expect((median(s, "encoding_ratio") ?? 1) < 0.7)
            let d = try #require(runs(try loadJSON(dir.file("dst.json"))).first)
            #expect(median(d, "decoded_pages") == median(s, "pages_transferred"))
        }

        /// Multifd between two processes: three channels with every encoding on; each page
        /// arrives and verifies, the channels are counted at both ends.
        @Test func multifdChannelsCarryEveryPage() throws {
            let dir = TempDir()
            let port = "27232"
            let (dst, dstOut, _) = try Memlab.start(["migrate", "destination", "--listen", "127.0.0.1:\(port)", "--timeout", "10",
                                                    "--accept-timeout", "30", "--json", dir.file("dst.json")], stateDir: dir.path)
            defer { if dst.isRunning { dst.terminate() } }
            usleep(300_000)
            let src = try Memlab.run(["migrate", "source", "--connect", "127.0.0.1:\(port)", "--size", "16M", "--dirty-rate", "20000",
                                      "--bandwidth-mbit", "500", "--channels", "3", "--zero-ratio", "0.2", "--compressibility", "0.5",
                                      "--zero-pages", "--xbzrle-cache", "16M", "--zstd", "1", "--json", dir.file("src.json")], stateDir: dir.path)
            let dstText = String(decoding: dstOut.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            dst.waitUntilExit()
            #expect(src.status == 0, "source: \(src.stdout) \(src.stderr)")
            #expect(dst.terminationStatus == 0, "destination: \(dstText)")
            #expect(dstText.contains("multifd: 3 channels"), "\(dstText)")
            let s = try #require(runs(try loadJSON(dir.file("src.json"))).first)
            #expect(median(s, "channels") == 3)
            #expect((median(s, "xbzrle_cache_hits") ?? 0) > 0, "a page stays on its channel, so its cache entry is found again")
            let d = try #require(runs(try loadJSON(dir.file("dst.json"))).first)
            #expect(median(d, "channels") == 3)
            #expect(median(d, "pages_received") == median(s, "pages_transferred"))
        }

        /// A source whose channel disagrees with the control stream: the destination fails
        /// with the channel and the counts, in time; so does one whose ROUND_END counts more
        /// pages than its channels carried.
        @Test(arguments: [false, true])
        func multifdChannelThatDisagreesFailsTheMigration(lieInSync: Bool) throws {
            let dir = TempDir()
            let port: UInt16 = lieInSync ? 27233 : 27234
            let (dst, dstOut, dstErr) = try Memlab.start(["migrate", "destination", "--listen", "127.0.0.1:\(port)", "--timeout", "3",
                                                          "--accept-timeout", "10"], stateDir: dir.path)
            defer { if dst.isRunning { dst.terminate() } }
            let control = try #require(WireTestClient(port: port))
            control.send(1, WireTestClient.le32(1) + Array(localImageHeader(regionBytes: "16384").utf8))
            #expect(control.readFrame()?.type == 2, "WELCOME")
            control.send(15, WireTestClient.le32(2) + WireTestClient.le64(42))
            var channels: [WireTestClient] = []
            for i in 0..<2 {
                let c = try #require(WireTestClient(port: port))
                c.send(16, WireTestClient.le64(42) + WireTestClient.le32(UInt32(i)) + WireTestClient.le32(2))
                channels.append(c)
            }
            let ready = control.readFrame()
            #expect(ready?.type == 18 && ready?.payload == WireTestClient.le32(2), "CHANNELS_READY: \(String(describing: ready))")
            // Channel 0 carries page 0; channel 1 nothing.
            channels[0].send(4, WireTestClient.le32(1) + WireTestClient.le64(0) + [UInt8](repeating: 7, count: 4096))
            channels[0].send(17, WireTestClient.le32(1) + WireTestClient.le32(lieInSync ? 2 : 1) + WireTestClient.le32(0))
            channels[1].send(17, WireTestClient.le32(1) + WireTestClient.le32(0) + WireTestClient.le32(0))
            control.send(5, WireTestClient.le32(1) + WireTestClient.le32(lieInSync ? 1 : 3))
            let start = Date()
            _ = dstOut.fileHandleForReading.readDataToEndOfFile()
            let err = String(decoding: dstErr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            dst.waitUntilExit()
            #expect(dst.terminationStatus == 1)
            if lieInSync {
                #expect(err.contains("multifd channel 0 says 2 pages since its last sync, 1 arrived"), "\(err)")
            } else {
                #expect(err.contains("source says 3 pages, 1 arrived"), "\(err)")
            }
            #expect(Date().timeIntervalSince(start) < 5)
        }

        /// Post-copy and hybrid between two processes: the destination pulls every missing
        /// page from the source's page server through the fault engine while the workload
        /// runs there; every page arrives once and the contents verify.
        @Test(arguments: ["postcopy", "hybrid"])
        func postcopyBetweenTwoProcesses(mode: String) throws {
            let dir = TempDir()
            let port = mode == "postcopy" ? "27235" : "27236"
            let (dst, dstOut, _) = try Memlab.start(["migrate", "destination", "--listen", "127.0.0.1:\(port)", "--timeout", "10",
                                                    "--accept-timeout", "30", "--postcopy-policy", "background-push", "--json", dir.file("dst.json")],
                                                   stateDir: dir.path)
            defer { if dst.isRunning { dst.terminate() } }
            usleep(300_000)
            let src = try Memlab.run(["migrate", "source", "--connect", "127.0.0.1:\(port)", "--size", "16M", "--dirty-rate", "20000",
                                      "--bandwidth-mbit", "1000", "--mode", mode, "--json", dir.file("src.json")], stateDir: dir.path)
            let dstText = String(decoding: dstOut.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            dst.waitUntilExit()
            #expect(src.status == 0, "source: \(src.stdout) \(src.stderr)")
            #expect(dst.terminationStatus == 0, "destination: \(dstText)")
            let s = try #require(runs(try loadJSON(dir.file("src.json"))).first)
            let checks = try #require(s["checks"] as? [[String: Any]])
            #expect(checks.contains { $0["name"] as? String == "destination_checksum" && $0["agrees"] as? Bool == true }, "\(checks)")
            let switched = try #require(median(s, "switch_pages"))
            if mode == "postcopy" { #expect(switched == 4096) } else { #expect(switched > 0 && switched < 4096) }
            #expect(median(s, "postcopy_pages") == switched)
            #expect(median(s, "postcopy_bytes") == switched * 4096, "every missing page fetched once")
            #expect((median(s, "destination_writes") ?? 0) > 0, "the workload ran at the destination")
            #expect(median(s, "postcopy_reconnects") == 0)
            let d = try #require(runs(try loadJSON(dir.file("dst.json"))).first)
            #expect(median(d, "postcopy_pages") == switched)
        }

        /// Post-copy recovery: the veth between two namespaces goes down mid post-copy and
        /// comes back; the destination's faults wait, a new page connection picks up, and the
        /// migration ends verified, reporting the pause and the pages asked for again.
        @Test(.enabled(if: FileManager.default.isExecutableFile(atPath: "/usr/sbin/ip") && FileManager.default.isExecutableFile(atPath: "/usr/sbin/tc"),
                       "needs ip and tc (iproute2): a veth pair shaped with tbf"))
        func postcopyRecoversFromALinkCut() throws {
            let pair = try NamespacePair(rateMbit: 50)
            defer { pair.remove() }
            let dir = TempDir()
            let port = "27237"
            let (dst, dstOut, _) = try Memlab.start(["migrate", "destination", "--listen", "\(NamespacePair.destinationAddress):\(port)", "--timeout", "20",
                                                    "--accept-timeout", "30", "--postcopy-policy", "background-push", "--fetch-timeout", "0.5",
                                                    "--recover", "20", "--json", dir.file("dst.json")],
                                                   stateDir: dir.path, prefix: ["/usr/sbin/ip", "netns", "exec", NamespacePair.destination])
            defer { if dst.isRunning { dst.terminate() } }
            let (src, srcOut, srcErr) = try Memlab.start(["migrate", "source", "--connect", "\(NamespacePair.destinationAddress):\(port)", "--size", "32M",
                                                          "--dirty-rate", "5000", "--bandwidth-mbit", "50", "--mode", "postcopy", "--timeout", "20",
                                                          "--json", dir.file("src.json")],
                                                         stateDir: dir.path, prefix: ["/usr/sbin/ip", "netns", "exec", NamespacePair.source])
            defer { if src.isRunning { src.terminate() } }
            // 32 MiB at 50 Mbit/s is about 5.4 s of post-copy: cut the link for 2 s in the middle.
            usleep(2_000_000)
            _ = try? Process.run(URL(fileURLWithPath: "/usr/sbin/ip"), arguments: ["-n", NamespacePair.source, "link", "set", "memlab-va", "down"]).waitUntilExit()
            usleep(2_000_000)
            _ = try? Process.run(URL(fileURLWithPath: "/usr/sbin/ip"), arguments: ["-n", NamespacePair.source, "link", "set", "memlab-va", "up"]).waitUntilExit()
            let out = String(decoding: srcOut.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            let err = String(decoding: srcErr.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            src.waitUntilExit()
            let dstText = String(decoding: dstOut.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            dst.waitUntilExit()
            #expect(src.terminationStatus == 0, "source: \(out) \(err)")
            #expect(dst.terminationStatus == 0, "destination: \(dstText)")
            let s = try #require(runs(try loadJSON(dir.file("src.json"))).first)
            let checks = try #require(s["checks"] as? [[String: Any]])
            #expect(checks.contains { $0["name"] as? String == "destination_checksum" && $0["agrees"] as? Bool == true }, "\(checks)")
            #expect((median(s, "postcopy_reconnects") ?? 0) >= 1, "\(out)")
            #expect((median(s, "postcopy_paused_time") ?? 0) > 0.5)
            #expect((median(s, "postcopy_rerequested_pages") ?? 0) > 0)
            #expect(median(s, "postcopy_pages") == 8192)
        }
    }
}
