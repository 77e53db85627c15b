#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LabKit
import Testing

extension KernelTests {
    /// Hybrid migration (pre-copy rounds, then post-copy through the lazy-restore fault
    /// engine), pure post-copy, and `memlab migrate --json` documents.
    @Suite(.enabled(if: isRoot, "needs root: userfaultfd write-protect (like the Migration suite)"))
    struct HybridMigration {
        private func run(_ variant: String, _ sets: [String]) throws -> [String: Any] {
            let dir = TempDir()
            let out = try Memlab.run(["run", "migration:\(variant)", "--repeat", "1", "--json", dir.file("r.json"), "--quiet"]
                                     + sets.flatMap { ["--set", $0] }, stateDir: dir.path)
            #expect(out.status == 0, "stdout: \(out.stdout) stderr: \(out.stderr)")
            let r = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            #expect(r["status"] as? String == "ok", "\(String(describing: r["reason"]))")
            let checks = r["checks"] as? [[String: Any]] ?? []
            #expect(checks.allSatisfy { $0["agrees"] as? Bool == true }, "\(checks)")
            return r
        }

        /// After the switch every page missing at the destination moves exactly once (no
        /// duplicate, nothing already there re-sent), and the destination equals the source at
        /// stop time page for page, whatever the post-copy policy.
        @Test(arguments: ["on-demand", "background-push"])
        func hybridMovesEveryPageOnceAfterTheSwitch(policy: String) throws {
            let r = try run("hybrid", ["size=8M", "dirty_rate=20000", "bandwidth_mbit=100", "precopy_rounds=2",
                                       "postcopy_policy=\(policy)", "drain_after_s=0.2"])
            let checks = try #require(r["checks"] as? [[String: Any]])
            for name in ["postcopy_pages_moved_once", "duplicate_transfers", "postcopy_pages_outside_switch_set",
                         "destination_mismatched_pages", "destination_checksum"] {
                #expect(checks.contains { $0["name"] as? String == name && $0["agrees"] as? Bool == true }, "\(name): \(checks)")
            }
            let switched = try #require(median(r, "switch_pages"))
            #expect(switched > 100, "a writer at 20 000 pages/s leaves pages dirty after two rounds")
            #expect(median(r, "postcopy_pages") == switched)
            #expect(median(r, "duplicate_transfers") == 0)
            #expect(median(r, "postcopy_bytes") == switched * 4096)
            #expect(median(r, "pages_transferred") == (median(r, "precopy_pages") ?? -1) + switched)
            #expect(median(r, "rounds") == 2)
            #expect((median(r, "postcopy_requests") ?? 0) > 0, "the resumed workload faults on missing pages")
        }

        /// Pure post-copy: no round; every page goes once, after the switch.
        @Test func postcopyMovesEveryPageOnce() throws {
            let r = try run("postcopy", ["size=8M", "dirty_rate=20000", "bandwidth_mbit=200"])
            #expect(median(r, "switch_pages") == 2048)
            #expect(median(r, "postcopy_pages") == 2048)
            #expect(median(r, "precopy_pages") == 0)
            #expect(median(r, "duplicate_transfers") == 0)
        }

        /// The classic argument for hybrid: a writer faster than the link keeps pre-copy from
        /// converging, so its stop-and-copy pays for the whole dirty set; hybrid's downtime is
        /// the switch message and a round trip.
        @Test func hybridDowntimeBeatsNonConvergingPrecopy() throws {
            let common = ["size=8M", "dirty_rate=20000", "bandwidth_mbit=100", "rtt_ms=1"]
            let pre = try run("precopy", common + ["max_rounds=5"])
            let hyb = try run("hybrid", common + ["precopy_rounds=2"])
            #expect(median(pre, "converged") == 0)
            let preDown = try #require(median(pre, "downtime"))
            let hybDown = try #require(median(hyb, "downtime"))
            print("downtime: pre-copy (not converging) \(preDown) s, hybrid \(hybDown) s")
            #expect(preDown > 0.1, "stop-and-copy of > 500 pages at 100 Mbit/s")
            #expect(hybDown < preDown / 4, "hybrid \(hybDown) s vs pre-copy \(preDown) s")
            #expect(try #require(median(hyb, "bytes_transferred")) < (try #require(median(pre, "bytes_transferred"))))
        }

        /// `migrate source --json` and `migrate destination --json` write full memlab.result/1
        /// documents (a failed one too), which decode as ResultDocument.
        @Test func migrateJSONIsAResultDocument() throws {
            let dir = TempDir()
            let port = "27218"
            let (dst, dstOut, _) = try Memlab.start(["migrate", "destination", "--listen", "127.0.0.1:\(port)", "--timeout", "10",
                                                     "--accept-timeout", "20", "--json", dir.file("dst.json")], stateDir: dir.path)
            defer { if dst.isRunning { dst.terminate() } }
            usleep(300_000)
            let src = try Memlab.run(["migrate", "source", "--connect", "127.0.0.1:\(port)", "--size", "4M", "--bandwidth-mbit", "500",
                                      "--dirty-rate", "1000", "--json", dir.file("src.json")], stateDir: dir.path)
            _ = dstOut.fileHandleForReading.readDataToEndOfFile()
            dst.waitUntilExit()
            #expect(src.status == 0, "\(src.stdout) \(src.stderr)")
            #expect(dst.terminationStatus == 0)

            let doc = try ResultDocument.decode(try Data(contentsOf: URL(fileURLWithPath: dir.file("src.json"))))
            #expect(doc.schema == "memlab.result/1")
            let run = try #require(doc.runs.first)
            #expect(run.scenario == "migration" && run.status == .ok && run.repetitions == 1)
            #expect(run.metric("downtime") != nil && run.metric("bytes_transferred") != nil && run.metric("total_time") != nil)
            #expect(run.metric("bytes_transferred")?.summary.median ?? 0 >= 4 * 1024 * 1024)
            #expect(!run.checks.isEmpty && run.checks.allSatisfy(\.agrees))
            #expect(run.timeseries.contains { $0.name == "round_pages_sent" })
            #expect(run.params.values["dirty_rate"] == .int(1000))

            let d = try ResultDocument.decode(try Data(contentsOf: URL(fileURLWithPath: dir.file("dst.json"))))
            let drun = try #require(d.runs.first)
            #expect(drun.status == .ok && drun.checks.allSatisfy(\.agrees) && !drun.checks.isEmpty)
            #expect(drun.metric("pages_received")?.summary.median ?? 0 >= 1024)

            // Nobody listens: the source fails, and its document says so.
            let refused = try Memlab.run(["migrate", "source", "--connect", "127.0.0.1:27219", "--size", "1M", "--timeout", "2",
                                          "--json", dir.file("fail.json")], stateDir: dir.path)
            #expect(refused.status == 1)
            let f = try ResultDocument.decode(try Data(contentsOf: URL(fileURLWithPath: dir.file("fail.json"))))
            #expect(f.runs.first?.status == .failed)
            #expect(f.runs.first?.reason?.isEmpty == false)
        }
    }
}
