import Foundation
import Testing

extension KernelTests {
    /// Lazy restore with real page sources: a separate source process over a Unix socket and
    /// over TCP, and a snapshot file read with pread; a killed source process; calibrate.
    @Suite(.enabled(if: isRoot, "needs root: userfaultfd for kernel faults (vm.unprivileged_userfaultfd is 0)"))
    struct LazyRestoreSources {
        func run(_ sets: [String], expectOK: Bool = true) throws -> ([String: Any], Memlab.Output) {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            // A later NAME=VALUE replaces an earlier one (memlab refuses a parameter given twice).
            var merged: [String] = []
            for s in sets { let name = s.prefix { $0 != "=" }; merged.removeAll { $0.prefix { $0 != "=" } == name }; merged.append(s) }
            let out = try Memlab.run(["run", "lazy-restore", "--repeat", "1", "--quiet", "--json", dir.file("r.json")] + merged.flatMap { ["--set", $0] }, stateDir: dir.path)
            if expectOK { #expect(out.status == 0, "stderr: \(out.stderr)\nstdout: \(out.stdout)") }
            #expect(KnobSnapshot.take() == before, "knobs must be unchanged")
            return (try #require(runs(try loadJSON(dir.file("r.json"))).first), out)
        }

        func failing(_ r: [String: Any]) -> [String] {
            ((r["checks"] as? [[String: Any]]) ?? []).filter { $0["agrees"] as? Bool != true }.map { "\($0["name"] ?? "?")" }
        }

        static let small = ["size=16M", "accesses=512", "rtt_ms=0.5", "workload=random", "write_ratio=0.5"]

        @Test(arguments: ["unix", "tcp", "file"])
        func everyTouchedPageServedOnceFromTheSource(source: String) throws {
            let (r, _) = try run(Self.small + ["source=\(source)", "policy=on-demand"])
            #expect(r["status"] as? String == "ok", "\(r["reason"] ?? "")")
            #expect(failing(r).isEmpty, "failing checks: \(failing(r))")
            let names = ((r["checks"] as? [[String: Any]]) ?? []).compactMap { $0["name"] as? String }
            #expect(names.contains("source_delivered_every_sent_page_once"))
            #expect(names.contains("contents_match_source"))
            #expect(median(r, "duplicate_transfers") == 0)
            let touched = try #require(median(r, "pages_touched"))
            let remote = try #require(median(r, "faults_remote"))
            #expect(remote + median(r, "faults_local")! == touched, "faults = distinct pages touched")
            // Every page came from the source, once: its bytes = remote faults × 4K.
            #expect(median(r, "source_bytes_received") == remote * 4096)
            #expect(median(r, "source_requests") == remote)
        }

        @Test func prefetchThreadsAndMoveWithASourceProcess() throws {
            for sets in [["source=tcp", "policy=background-push", "handler_threads=2", "workload=sequential"],
                         ["source=unix", "policy=fault-around", "resolve=move"],
                         ["source=file", "policy=working-set-replay", "replay_mode=concurrent"]] {
                let (r, _) = try run(Self.small + sets)
                #expect(r["status"] as? String == "ok", "\(sets): \(r["reason"] ?? "")")
                #expect(failing(r).isEmpty, "\(sets): failing checks \(failing(r))")
                #expect(median(r, "duplicate_transfers") == 0, "\(sets)")
            }
        }

        @Test(arguments: ["unix", "tcp"])
        func killedSourceProcessFailsWithinTheDeadline(source: String) throws {
            let start = Date()
            let (r, out) = try run(["size=16M", "accesses=4000", "rtt_ms=2", "workload=sequential", "source=\(source)",
                                    "kill_source_after_s=0.3", "source_deadline_s=5"], expectOK: false)
            let elapsed = Date().timeIntervalSince(start)
            #expect(out.status == 1, "a failed run: \(out.stderr)")
            #expect(r["status"] as? String == "failed")
            let reason = "\(r["reason"] ?? "")"
            #expect(reason.contains("source process pid"), "reason names the source: \(reason)")
            #expect(reason.contains("released by unregistering"), "\(reason)")
            // 4000 pages at 2 ms each would take 8 s: the failure came long before.
            #expect(elapsed < 6, "ended after \(elapsed) s")
            // The source process is gone.
            if let pidText = reason.split(separator: " ").drop(while: { $0 != "pid" }).dropFirst().first, let pid = Int32(pidText) {
                #expect(kill(pid, 0) != 0, "source process \(pid) still there")
            } else {
                Issue.record("no pid in \(reason)")
            }
            // No socket file left by a destination that has ended (tests run side by side).
            let left = ((try? FileManager.default.contentsOfDirectory(atPath: "/tmp")) ?? []).filter { name in
                guard name.hasPrefix("memlab-ps-"), let owner = Int32(name.dropFirst(10).prefix { $0 != "-" }) else { return false }
                return kill(owner, 0) != 0
            }
            #expect(left.isEmpty, "socket files left: \(left)")
        }

        @Test func refusesKillWithoutASourceProcess() throws {
            let dir = TempDir()
            let out = try Memlab.run(["run", "lazy-restore", "--set", "source=memory", "--set", "kill_source_after_s=1"], stateDir: dir.path)
            #expect(out.status == 2, "\(out.stderr)")
            #expect(out.stderr.contains("kill_source_after_s"))
        }

        @Test func calibratePrintsTheFloors() throws {
            let dir = TempDir()
            let out = try Memlab.run(["calibrate", "--size-mb", "16"], stateDir: dir.path)
            #expect(out.status == 0, "\(out.stderr)")
            for name in ["first_touch_fault", "uffdio_copy_page", "uffdio_copy_bulk", "fault_round_trip_blocking", "fault_round_trip_poll",
                         "fault_round_trip_busy", "loopback_tcp_rtt", "fault_round_trip_unix_source", "fault_round_trip_tcp_source"] {
                #expect(out.stdout.contains(name + " "), "\(name) missing:\n\(out.stdout)")
            }
            #expect(out.stdout.contains("read a remote figure against"))
        }
    }
}
