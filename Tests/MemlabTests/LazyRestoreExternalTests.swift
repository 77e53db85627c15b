import Foundation
import Testing
#if canImport(Glibc)
import Glibc
#endif

extension KernelTests {
    /// handler=external (the userfaultfd passed to a handler process over SCM_RIGHTS),
    /// policy=criu-push, what bytes_transferred counts, and restores into hugetlbfs.
    @Suite(.enabled(if: isRoot, "needs root: userfaultfd for kernel faults (vm.unprivileged_userfaultfd is 0)"))
    struct LazyRestoreExternal {
        func run(_ sets: [String], expectOK: Bool = true) throws -> (run: [String: Any], out: Memlab.Output) {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", "lazy-restore", "--repeat", "1", "--quiet", "--json", dir.file("r.json")] + sets.flatMap { ["--set", $0] }, stateDir: dir.path)
            if expectOK { #expect(out.status == 0, "stderr: \(out.stderr)\nstdout: \(out.stdout)") }
            #expect(KnobSnapshot.take() == before, "knobs must be unchanged")
            return (try #require(runs(try loadJSON(dir.file("r.json"))).first), out)
        }

        func failing(_ r: [String: Any]) -> [String] {
            ((r["checks"] as? [[String: Any]]) ?? []).filter { $0["agrees"] as? Bool != true }.map { "\($0["name"] ?? "?")" }
        }

        func checkNames(_ r: [String: Any]) -> [String] {
            ((r["checks"] as? [[String: Any]]) ?? []).compactMap { $0["name"] as? String }
        }

        /// The faults are served by another process: its pid is not the restoring child's
        /// (nor this test's), contents verify, every touched page was installed by it, and
        /// the hop was measured against the in-process handler in the same repetition.
        @Test func anExternalHandlerProcessServesTheFaults() throws {
            for (wait, threads) in [("blocking", 1), ("poll", 2), ("busy", 1)] {
                let (r, _) = try run(["size=16M", "accesses=512", "link=none", "handler=external", "workload=random", "write_ratio=0.5",
                                      "wait=\(wait)", "handler_threads=\(threads)", "threads=\(threads)", "zero_ratio=0.2"])
                #expect(r["status"] as? String == "ok", "\(wait): \(r["reason"] ?? "")")
                #expect(failing(r).isEmpty, "\(wait): failing checks \(failing(r))")
                for name in ["handler_in_another_process", "contents_match_source", "touched_pages_installed", "handler_installed_resident_pages"] {
                    #expect(checkNames(r).contains(name), "\(wait): check \(name) missing")
                }
                let pid = try #require(median(r, "handler_pid"))
                #expect(pid > 0 && Int32(pid) != getpid())
                #expect((median(r, "faults_remote") ?? 0) > 100, "\(wait): the handler copied pages")
                #expect((median(r, "faults_local") ?? 0) > 0, "\(wait): zero pages resolved with UFFDIO_ZEROPAGE")
                #expect(median(r, "bytes_transferred") == median(r, "faults_remote")! * 4096)
                #expect((median(r, "external_fault_round_trip") ?? 0) > 0 && (median(r, "inprocess_fault_round_trip") ?? 0) > 0)
                #expect((median(r, "external_hop_ratio") ?? 0) > 0)
                // The handler process is gone with its restore.
                #expect(kill(Int32(pid), 0) != 0, "handler process \(Int32(pid)) outlived the run")
            }
            #expect(memlabLitter().isEmpty, "left behind: \(memlabLitter())")
        }

        /// A memfd (shmem) region in MISSING mode is served from the other process too.
        @Test func anExternalHandlerFillsAMemfdRegion() throws {
            let (r, _) = try run(["size=16M", "accesses=512", "link=none", "handler=external", "region=memfd", "workload=random", "floors=off"])
            #expect(r["status"] as? String == "ok", "\(r["reason"] ?? "")")
            #expect(failing(r).isEmpty, "failing checks \(failing(r))")
            #expect(median(r, "external_hop_ratio") == nil, "floors=off: no hop calibration")
        }

        /// The handler process killed mid-restore: the repetition fails with the reason, at
        /// once, and the workload is released (never a hang).
        @Test func aKilledHandlerProcessFailsTheRepetitionWithAReason() throws {
            let start = Date()
            let (r, out) = try run(["size=64M", "accesses=200000", "link=none", "handler=external", "workload=random", "zero_ratio=0",
                                    "kill_handler_after_s=0.1", "source_deadline_s=20"], expectOK: false)
            #expect(out.status == 1, "a failed run: \(out.stderr)")
            #expect(r["status"] as? String == "failed")
            let reason = "\(r["reason"] ?? "")"
            #expect(reason.contains("handler process (pid") && reason.contains("SIGKILL"), "reason: \(reason)")
            #expect(reason.contains("released by unregistering"), "\(reason)")
            #expect(Date().timeIntervalSince(start) < 15)
            #expect(memlabLitter().isEmpty, "left behind: \(memlabLitter())")
        }

        /// The runner SIGKILLed mid-restore: the handler process dies with it (PDEATHSIG
        /// through the repetition's child), and the next memlab finds nothing left.
        @Test func theHandlerProcessDiesWithTheRunner() throws {
            let dir = TempDir()
            func handlers() -> [Int32] {
                ((try? FileManager.default.contentsOfDirectory(atPath: "/proc")) ?? []).compactMap { Int32($0) }.filter { pid in
                    guard let d = FileManager.default.contents(atPath: "/proc/\(pid)/cmdline") else { return false }
                    return String(decoding: d, as: UTF8.self).contains("_uffdhandler")
                }
            }
            #expect(handlers().isEmpty, "a handler process from before: \(handlers())")
            let (p, _, _) = try Memlab.start(["run", "lazy-restore", "--repeat", "1", "--quiet"] +
                                              ["size=64M", "accesses=100000000", "link=none", "handler=external", "workload=random", "zero_ratio=0"].flatMap { ["--set", $0] },
                                              stateDir: dir.path)
            let seen = waitFor(20) { !handlers().isEmpty }
            #expect(seen, "no handler process started")
            let started = handlers()
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            #expect(waitFor(10) { started.allSatisfy { kill($0, 0) != 0 } }, "handler processes \(started) outlived the runner")
            // The next memlab sweeps the dead run's directory (and its process record).
            _ = try Memlab.run(["restore"], stateDir: dir.path)
            #expect(memlabLitter().isEmpty, "left behind: \(memlabLitter())")
        }

        /// criu-push: chunks start at 64 KiB, double while no fault comes, reach 4 MiB, and
        /// fall back on faults; both pushes report the time to a fully resident region.
        @Test func criuPushGrowsAndResetsItsChunks() throws {
            // preempt: a fault does not queue behind the push, so the workload ends early and
            // the rest of the image is pushed with no fault to reset the chunk.
            let (c, _) = try run(["size=64M", "accesses=512", "workload=random", "policy=criu-push", "push_until=resident", "rtt_ms=0.5", "queue=preempt", "floors=off"])
            #expect(c["status"] as? String == "ok", "\(c["reason"] ?? "")")
            #expect(failing(c).isEmpty, "failing checks \(failing(c))")
            #expect(median(c, "push_chunk_max") == Double(4 << 20), "the chunk grew to 4 MiB")
            #expect((median(c, "push_chunk_resets") ?? 0) > 0, "faults sent the chunk back to 64 KiB")
            #expect((median(c, "push_chunk_doublings") ?? 0) >= 6, "64 KiB → 4 MiB takes six doublings")
            #expect((median(c, "push_chunk_mean") ?? 0) > Double(64 << 10))
            #expect((median(c, "time_to_full_restore") ?? 0) > 0)
            #expect(median(c, "duplicate_transfers") == 0)
            let (b, _) = try run(["size=64M", "accesses=512", "workload=random", "policy=background-push", "push_until=resident", "rtt_ms=0.5", "queue=preempt", "floors=off"])
            #expect(failing(b).isEmpty, "failing checks \(failing(b))")
            #expect(median(b, "push_chunk_max") == Double(64 << 10), "background-push keeps its fixed chunk")
            #expect(median(b, "push_chunk_resets") == nil)
            #expect((median(b, "time_to_full_restore") ?? 0) > 0)
        }

        /// link=none moves pages all the same: bytes_transferred counts them (= what the
        /// source process delivered), link_bytes — what crossed the emulated link — is 0.
        @Test func bytesTransferredCountsWhatMovedWithoutALink() throws {
            for source in ["memory", "unix"] {
                let (r, _) = try run(["size=16M", "accesses=512", "link=none", "workload=random", "source=\(source)", "floors=off"])
                #expect(failing(r).isEmpty, "\(source): failing checks \(failing(r))")
                let remote = try #require(median(r, "faults_remote"))
                #expect(remote > 100)
                #expect(median(r, "bytes_transferred") == remote * 4096, "\(source): pages moved × 4096")
                #expect(median(r, "link_bytes") == 0, "\(source): nothing crossed an emulated link")
                if source == "unix" { #expect(median(r, "source_bytes_received") == median(r, "bytes_transferred")) }
            }
            let (e, _) = try run(["size=16M", "accesses=512", "workload=random", "floors=off"])
            #expect(median(e, "link_bytes") == median(e, "bytes_transferred"))
            #expect(checkNames(e).contains("link_carried_every_transfer"))
        }

        /// hugetlbfs: MISSING faults answered by 2 MiB UFFDIO_COPY, and MINOR faults on an
        /// MFD_HUGETLB memfd answered by UFFDIO_CONTINUE; contents verified; the pool is
        /// borrowed through the settings guard and given back (the run's KnobSnapshot).
        @Test func hugetlbRestoresVerify() throws {
            let pool0 = try String(contentsOfFile: "/proc/sys/vm/nr_hugepages", encoding: .utf8)
            for resolve in ["copy", "continue"] {
                let (r, _) = try run(["size=32M", "accesses=256", "workload=random", "region=hugetlb", "policy=huge", "resolve=\(resolve)", "rtt_ms=0.2", "floors=off"])
                if r["status"] as? String == "skipped" {
                    // The pool could not be grown (fragmented memory): said so, nothing failed.
                    #expect("\(r["reason"] ?? "")".contains("nr_hugepages") || "\(r["reason"] ?? "")".contains("pool"), "\(r["reason"] ?? "")")
                    continue
                }
                #expect(r["status"] as? String == "ok", "\(resolve): \(r["reason"] ?? "")")
                #expect(failing(r).isEmpty, "\(resolve): failing checks \(failing(r))")
                #expect(checkNames(r).contains("contents_match_source"))
                let remote = try #require(median(r, "faults_remote"))
                #expect(remote > 0 && remote <= 16, "\(resolve): at most one fault per 2 MiB page (\(remote))")
                #expect(median(r, "bytes_transferred")!.truncatingRemainder(dividingBy: Double(2 << 20)) == 0, "whole 2 MiB pages moved")
            }
            #expect(try String(contentsOfFile: "/proc/sys/vm/nr_hugepages", encoding: .utf8) == pool0, "the pool is as before")
            #expect(((try? FileManager.default.contentsOfDirectory(atPath: "/dev/hugepages")) ?? []).isEmpty)
        }

        @Test func newParametersAreRefusedBeforeAnythingStarts() throws {
            let dir = TempDir()
            let bad: [([String], String)] = [
                (["handler=external"], "link=none"),
                (["handler=external", "link=none", "policy=fault-around"], "policy=on-demand"),
                (["handler=external", "link=none", "source=unix"], "source=memory"),
                (["handler=external", "link=none", "resolve=continue"], "resolve=copy"),
                (["handler=external", "link=none", "drop_every=3"], "drop_every"),
                (["kill_handler_after_s=1"], "handler=external"),
                (["handler=sideways"], "handler"),
                (["push_until=resident"], "pushing policy"),
                (["push_until=forever"], "push_until"),
                (["policy=criu-push", "push_until=resident", "drop_every=5"], "drop_every"),
                (["region=hugetlb"], "policy=huge"),
                (["region=hugetlb", "policy=huge", "size=3M"], "2M"),
                (["region=hugetlb", "policy=huge", "resolve=move"], "resolve"),
                (["kill_handler_after_s=-1"], "kill_handler_after_s"),
            ]
            for (sets, word) in bad {
                let out = try Memlab.run(["run", "lazy-restore"] + sets.flatMap { ["--set", $0] }, stateDir: dir.path)
                #expect(out.status == 2, "\(sets): \(out.stderr)")
                #expect(out.stderr.contains(word), "\(sets): the reason names \(word): \(out.stderr)")
            }
        }

        /// A hidden command like the others: refused arguments exit 2 before anything runs;
        /// a handler whose parent is not the one named exits at once.
        @Test func theHandlerCommandChecksItsArguments() throws {
            let dir = TempDir()
            for args in [["_uffdhandler"], ["_uffdhandler", "--connect=", "--parent=1"], ["_uffdhandler", "--connect=/x", "--parent=0"],
                         ["_uffdhandler", "--connect=/" + String(repeating: "a", count: 200), "--parent=1"]] {
                let out = try Memlab.run(args, stateDir: dir.path)
                #expect(out.status == 2, "\(args): \(out.stderr)")
            }
            let orphan = try Memlab.run(["_uffdhandler", "--connect=/nonexistent.sock", "--parent=1"], stateDir: dir.path)
            #expect(orphan.status == 1, "\(orphan.stderr)")
        }
    }
}
