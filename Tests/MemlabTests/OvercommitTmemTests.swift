import Foundation
import Testing

let hasZswap = FileManager.default.fileExists(atPath: "/sys/module/zswap/parameters/enabled")

/// Swap areas active now, by path.
func swapAreaPaths() -> [String] {
    let text = (try? String(contentsOfFile: "/proc/swaps", encoding: .utf8)) ?? ""
    return text.split(separator: "\n").dropFirst().compactMap { $0.split(separator: " ").first.map(String.init) }
}

func checksAgree(_ run: [String: Any]) -> Bool {
    ((run["checks"] as? [[String: Any]]) ?? []).allSatisfy { $0["agrees"] as? Bool == true }
}

extension KernelTests {
    @Suite(.enabled(if: isRoot, "needs root: vm.overcommit_* and memory cgroups are root-only"))
    struct OvercommitEndToEnd {
        /// Mode 1 grants what mode 2 refuses; Committed_AS moves by exactly what was
        /// accounted (MAP_NORESERVE: nothing in mode 1, everything in mode 2).
        @Test(.enabled(if: sanitizer == nil, "a sanitizer reserves terabytes of shadow at start, which overcommit mode 2 refuses"))
        func strictModeRefusesWhatAlwaysModeGrants() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            try """
            [[runs]]
            scenario = "overcommit"
            variant = "commit"
            repeat = 1
            [runs.params]
            mode = 1
            row_max = 32
            [[runs]]
            scenario = "overcommit"
            variant = "commit"
            repeat = 1
            [runs.params]
            mode = 2
            row_max = 32
            """.write(toFile: dir.file("s.toml"), atomically: true, encoding: .utf8)
            let out = try Memlab.run(["run", dir.file("s.toml"), "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
            let rs = runs(try loadJSON(dir.file("r.json")))
            #expect(rs.count == 2)
            let (always, strict) = (rs[0], rs[1])
            #expect(always["status"] as? String == "ok")
            #expect(strict["status"] as? String == "ok")
            let gib = Double(1 << 30)
            // Mode 1: everything granted, NORESERVE not charged.
            #expect(median(always, "beyond_ram_swap_granted") == 1)
            #expect(median(always, "row_1g_granted") == 32)
            #expect(abs((median(always, "row_1g_committed_as_delta") ?? 0) - 32 * gib) < 64 * 1048576)
            #expect(abs(median(always, "row_1g_noreserve_committed_as_delta") ?? 1e18) < 64 * 1048576)
            // Mode 2: refused with ENOMEM beyond CommitLimit, NORESERVE ignored.
            #expect(median(strict, "beyond_ram_swap_granted") == 0)
            #expect(median(strict, "beyond_ram_swap_errno") == Double(ENOMEM))
            #expect(median(strict, "between_limit_and_ram_granted") == 0)
            #expect(median(strict, "between_limit_and_ram_noreserve_granted") == 0)
            let limit = try #require(median(strict, "commit_limit"))
            let committed = try #require(median(strict, "committed_as"))
            let row = try #require(median(strict, "row_1g_granted"))
            #expect(row < 32)
            #expect(abs(row - ((limit - committed) / gib).rounded(.down)) <= 1, "row \(row), limit \(limit), committed \(committed)")
            #expect(abs((median(strict, "row_1g_noreserve_committed_as_delta") ?? 0) - (median(strict, "row_1g_noreserve_granted") ?? 0) * gib) < 64 * 1048576)
            #expect(checksAgree(always), "\(always["checks"] ?? "")")
            #expect(checksAgree(strict), "\(strict["checks"] ?? "")")
            #expect((strict["settings"] as? [String: Any])?["restored"] as? Bool == true)
            #expect(KnobSnapshot.take() == before)
        }

        /// A worker touching twice its cgroup's limit is OOM-killed; the runner lives and
        /// reports the outcome as metrics; the cgroup is gone afterwards.
        @Test(.enabled(if: hasMemoryCgroup, "no memory cgroup controller"),
              .enabled(if: sanitizer == nil, "checks how much the worker touched before the limit, and a sanitizer's shadow is charged to the cgroup too"))
        func oomKillInsideTheCgroupWhileTheRunnerLives() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", "overcommit:oom", "--repeat", "2", "--set", "limit=32M",
                                      "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
            let run = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            #expect(run["status"] as? String == "ok")
            #expect(median(run, "oom_killed") == 1)
            #expect(median(run, "oom_kills") == 1)
            // The limit, give or take a few force-charged pages.
            #expect((median(run, "max_usage") ?? .infinity) <= Double((32 << 20) + 64 * 4096))
            #expect((median(run, "max_usage") ?? 0) >= Double(30 << 20))
            #expect((median(run, "limit_hits") ?? 0) > 0)
            #expect((median(run, "time_to_kill") ?? 0) > 0)
            // Swap cannot postpone the kill: it is capped with the limit (v1 memsw or
            // swappiness 0, v2 swap.max), and the result says how.
            let notes = (run["notes"] as? [String]) ?? []
            #expect(notes.contains { $0.hasPrefix("oom: swap capped with the limit (") && ($0.contains("memsw") || $0.contains("swappiness=0") || $0.contains("swap.max")) }, "notes: \(notes)")
            #expect(checksAgree(run), "\(run["checks"] ?? "")")
            #expect(KnobSnapshot.take() == before)
        }
    }

    /// With a swap area active the worker is still OOM-killed at the limit: the cgroup's
    /// swap is capped with it (v1 memsw / swappiness 0, v2 swap.max); the swap file is gone
    /// afterwards.
    @Suite(.enabled(if: isRoot, "needs root"), .enabled(if: hasMemoryCgroup, "no memory cgroup controller"))
    struct OOMWithSwap {
        @Test(.enabled(if: sanitizer == nil, "checks how much the worker touched before the limit, and a sanitizer's shadow is charged to the cgroup too"))
        func oomKillWithSwapPresent() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let swapsBefore = swapAreaPaths()
            let out = try Memlab.run(["run", "overcommit:oom", "--repeat", "1", "--set", "limit=32M", "--set", "swap_size=128M",
                                      "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
            let run = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            #expect(run["status"] as? String == "ok", "\(run["reason"] ?? "")")
            #expect((median(run, "swap_total") ?? 0) >= Double(128 << 20) - 65536)
            #expect(median(run, "oom_killed") == 1)
            #expect((median(run, "touched_before_kill") ?? .infinity) <= Double(32 << 20))
            #expect((median(run, "limit_hits") ?? 0) > 0)
            #expect(checksAgree(run), "\(run["checks"] ?? "")")
            #expect(swapAreaPaths() == swapsBefore)
            #expect(!(try FileManager.default.contentsOfDirectory(atPath: dir.path)).contains { $0.hasPrefix("memlab-swap") })
            #expect(KnobSnapshot.take() == before)
        }
    }

    @Suite(.enabled(if: isRoot, "needs root: swapon, zswap parameters and memory cgroups are root-only"),
           .enabled(if: hasZswap, "kernel without zswap (no /sys/module/zswap)"))
    struct TmemEndToEnd {
        func zswapRun(_ sets: [String], _ dir: TempDir, name: String) throws -> [String: Any] {
            var args = ["run", "tmem:zswap", "--repeat", "1", "--set", "pages=4096", "--set", "swap_size=64M",
                        "--json", dir.file("\(name).json"), "--quiet"]
            for s in sets { args += ["--set", s] }
            let out = try Memlab.run(args, stateDir: dir.path)
            #expect(out.status == 0 || out.status == 3, "stderr: \(out.stderr)")
            return try #require(runs(try loadJSON(dir.file("\(name).json"))).first)
        }

        /// Text compresses (ratio > 1), random does not (near 1, or rejected to the swap
        /// file); every page comes back intact; swap-in from zswap is timed per page; swap
        /// area and file are gone afterwards.
        @Test(.enabled(if: sanitizer == nil, "counts swap-ins page by page, and a sanitizer's shadow of the region is paged out and in with it"))
        func zswapCompressesTextButNotRandom() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let swapsBefore = swapAreaPaths()
            let text = try zswapRun(["pattern=text"], dir, name: "text")
            let random = try zswapRun(["pattern=random"], dir, name: "random")
            #expect(text["status"] as? String == "ok", "\(text["reason"] ?? "")")
            #expect(random["status"] as? String == "ok", "\(random["reason"] ?? "")")
            #expect((median(text, "compression_ratio") ?? 0) > 1.5)
            #expect(median(text, "stored_pages") == 4096)
            if let r = median(random, "compression_ratio") {
                #expect(r > 0.9 && r < 1.1, "random ratio \(r)")
            } else {
                #expect((median(random, "rejected_to_swap_file") ?? 0) > 0)
            }
            #expect((median(text, "swapin_latency_p50") ?? 0) > 0)
            #expect((median(text, "swapin_latency_p99") ?? 0) >= (median(text, "swapin_latency_p50") ?? .infinity))
            #expect((median(text, "swapin_from_zswap") ?? 0) >= 4096)
            #expect(checksAgree(text), "\(text["checks"] ?? "")")
            if !FileManager.default.fileExists(atPath: "/sys/kernel/debug/zswap") {
                let notes = (text["notes"] as? [String]) ?? []
                #expect(notes.contains { $0.contains("debugfs is not mounted") && $0.contains("incompressible") && $0.contains("not reported") }, "notes: \(notes)")
                #expect(median(text, "debugfs_reject_compress_poor") == nil)
            }
            #expect(checksAgree(random), "\(random["checks"] ?? "")")
            #expect(swapAreaPaths() == swapsBefore)
            #expect(!(try FileManager.default.contentsOfDirectory(atPath: dir.path)).contains { $0.hasPrefix("memlab-swap") })
            #expect(KnobSnapshot.take() == before)
        }

        /// The same workload through the plain swap file and zram: the file is read from
        /// the device (swap cache emptied first); zram compresses; both leave nothing behind.
        @Test(.enabled(if: sanitizer == nil, "counts swap-ins page by page, and a sanitizer's shadow of the region is paged out and in with it"))
        func swapFileAndZramBackends() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let file = try zswapRun(["backend=swapfile"], dir, name: "file")
            #expect(file["status"] as? String == "ok", "\(file["reason"] ?? "")")
            #expect((median(file, "swapin_from_device") ?? 0) >= 4000)
            #expect(median(file, "stored_pages") == nil)
            #expect(checksAgree(file), "\(file["checks"] ?? "")")
            let zram = try zswapRun(["backend=zram"], dir, name: "zram")
            if zram["status"] as? String == "skipped" {
                #expect((zram["reason"] as? String ?? "").contains("zram"))
            } else {
                #expect(zram["status"] as? String == "ok", "\(zram["reason"] ?? "")")
                #expect((median(zram, "compression_ratio") ?? 0) > 1.5)
                #expect(checksAgree(zram), "\(zram["checks"] ?? "")")
            }
            #expect(KnobSnapshot.take() == before)
        }

        /// Identical guest images: with KSM more guests stay alive in the same limit.
        @Test(.enabled(if: hasMemoryCgroup && hasKSM, "needs a memory cgroup controller and KSM"),
              .enabled(if: sanitizer == nil, "how many guests fit depends on their footprint, which a sanitizer's shadow grows"))
        func densityImprovesWithKSM() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            var alive: [String: Double] = [:]
            for m in ["none", "ksm"] {
                let out = try Memlab.run(["run", "tmem:density", "--repeat", "1", "--set", "mechanism=\(m)",
                                          "--set", "guests=5", "--set", "guest_size=16M", "--set", "limit=48M",
                                          "--set", "shared_ratio=0.9", "--set", "duration_s=1",
                                          "--json", dir.file("\(m).json"), "--quiet"], stateDir: dir.path)
                #expect(out.status == 0, "stderr: \(out.stderr)")
                let run = try #require(runs(try loadJSON(dir.file("\(m).json"))).first)
                #expect(run["status"] as? String == "ok")
                #expect(checksAgree(run), "\(run["checks"] ?? "")")
                alive[m] = median(run, "guests_alive")
            }
            // The physics: merging lets more of the same guests live in the same limit. (How
            // many depends on how fast ksmd keeps up on a loaded 2-CPU machine.)
            #expect((alive["ksm"] ?? 0) > (alive["none"] ?? 99), "\(alive)")
            #expect(KnobSnapshot.take() == before)
        }

        /// Guests pushed into zswap by the limit: the first touch of each swapped-out page is
        /// timed inside the guests, and the distribution is reported.
        @Test(.enabled(if: hasMemoryCgroup, "needs a memory cgroup controller"))
        func densityWithZswapTimesSwapins() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", "tmem:density", "--repeat", "1", "--set", "mechanism=zswap",
                                      "--set", "guests=4", "--set", "guest_size=16M", "--set", "limit=40M",
                                      "--set", "duration_s=1", "--set", "swap_size=128M",
                                      "--json", dir.file("z.json"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
            let run = try #require(runs(try loadJSON(dir.file("z.json"))).first)
            #expect(run["status"] as? String == "ok", "\(run["reason"] ?? "")")
            #expect((median(run, "timed_swapins") ?? 0) > 0)
            let p50 = try #require(median(run, "swapin_latency_p50"))
            let p99 = try #require(median(run, "swapin_latency_p99"))
            // A swap-in is a fault with a decompression: far above a resident load, far below a second.
            #expect(p50 > 100 && p50 < 1e9, "p50 \(p50) ns")
            #expect(p99 >= p50)
            #expect((median(run, "swapin_latency_max") ?? 0) >= p99 * 0.93)
            #expect(KnobSnapshot.take() == before)
        }

        /// A runner killed while its swap file is active: the next memlab start swaps it
        /// off, removes the file and gives zswap back.
        @Test func killedRunnersSwapAreaIsRemovedOnNextStart() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let (p, _, _) = try Memlab.start(["run", "tmem:density", "--set", "mechanism=zswap", "--set", "guests=2",
                                              "--set", "guest_size=8M", "--set", "limit=64M", "--set", "duration_s=60",
                                              "--set", "swap_size=32M", "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
            #expect(waitFor(60) { swapAreaPaths().contains { $0.hasPrefix(dir.path) } }, "the run never activated its swap file")
            // Mid-run: the child and its guests are in their memory cgroup.
            let cgroup = "/sys/fs/cgroup/memory/memlab-\(p.processIdentifier)-0/cgroup.procs"
            #expect(waitFor(30) { ((try? String(contentsOfFile: cgroup, encoding: .utf8)) ?? "").split(separator: "\n").count >= 3 })
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            #expect(FileManager.default.fileExists(atPath: dir.file("journal.json")))
            let next = try Memlab.run(["list"], stateDir: dir.path)
            #expect(next.status == 0)
            #expect(next.stderr.contains("swapoff"), "stderr: \(next.stderr)")
            #expect(!swapAreaPaths().contains { $0.hasPrefix(dir.path) })
            #expect(!(try FileManager.default.contentsOfDirectory(atPath: dir.path)).contains { $0.hasPrefix("memlab-swap") })
            #expect(waitFor(10) { KnobSnapshot.take() == before }, "\(KnobSnapshot.take())")
        }
    }
}
