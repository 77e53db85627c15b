import Foundation
import LabKit
import LinuxMM
import Scenarios
import Testing

/// cgroup v2 with the memory controller: where memory.reclaim and memory.zswap.max exist.
let hasMemoryCgroupV2 = MemoryCgroup.v2Root != nil

func damonSnapshot() -> [String] { WatchedSettings.snapshot().filter { $0.hasPrefix("damon_") } }

/// vmstat counters the read-back classifier reads after every fault.
@Suite struct SwapinCountersTests {
    @Test func findsBothCountersAnywhereInVmstat() {
        let text = "nr_free_pages 1\npswpin 152353\npswpout 153032\nzswpin 954887\nzswpout 1038516\nzswpwb 0\n"
        let (z, p) = text.utf8CString.withUnsafeBufferPointer { b in
            b.withMemoryRebound(to: UInt8.self) { SwapinCounters.parse(UnsafeBufferPointer(rebasing: $0.dropLast())) }
        }
        #expect(z == 954_887 && p == 152_353)
        let other = "xzswpin 5\nzswpins 6\npswpin\nzswpin 7"
        let (z2, p2) = other.utf8CString.withUnsafeBufferPointer { b in
            b.withMemoryRebound(to: UInt8.self) { SwapinCounters.parse(UnsafeBufferPointer(rebasing: $0.dropLast())) }
        }
        #expect(z2 == 7 && p2 == 0, "only whole names count; a name without a value reads 0")
    }

    @Test func readsThisKernelsVmstat() throws {
        let c = try SwapinCounters()
        let a = try c.read()
        let v = try VMStat.current()
        #expect(a.zswpin <= v["zswpin"] ?? 0 && a.pswpin <= v["pswpin"] ?? 0)
        if v["zswpin"] != nil { #expect(a.zswpin > 0 || v["zswpin"] == 0) }
    }
}

extension KernelTests {
    @Suite(.enabled(if: isRoot, "needs root: swapon, zswap parameters, DAMON and memory cgroups are root-only"),
           .enabled(if: hasMemoryCgroup, "no memory cgroup controller"))
    struct ReclaimEndToEnd {
        func reclaimRun(_ variant: String, _ sets: [String], _ dir: TempDir, name: String) throws -> [String: Any] {
            var args = ["run", "reclaim:\(variant)", "--repeat", "1", "--json", dir.file("\(name).json"), "--quiet"]
            for s in sets { args += ["--set", s] }
            let out = try Memlab.run(args, stateDir: dir.path)
            #expect(out.status == 0 || out.status == 3, "stderr: \(out.stderr)")
            return try #require(runs(try loadJSON(dir.file("\(name).json"))).first)
        }

        /// The shrinker borrowed on and off: every page stored in zswap, every read-back
        /// placed (pool, disk, swap cache), the written-back count as the kernel's rules say
        /// (v2 with the shrinker on: some; off, or under v1: none), nothing left behind.
        @Test(.enabled(if: hasZswap && FileManager.default.fileExists(atPath: "/sys/module/zswap/parameters/shrinker_enabled"), "no zswap shrinker (6.8+)"),
              .enabled(if: sanitizer == nil, "counts swap-ins page by page"))
        func zswapWritebackWithShrinkerOnAndOff() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let swapsBefore = swapAreaPaths()
            let original = try String(contentsOfFile: "/sys/module/zswap/parameters/shrinker_enabled", encoding: .utf8).trimmingCharacters(in: .whitespacesAndNewlines)
            for on in [true, false] {
                let r = try reclaimRun("zswap-writeback", ["pages=4096", "swap_size=64M", "shrinker=\(on)"], dir, name: "wb-\(on)")
                #expect(r["status"] as? String == "ok", "\(r["reason"] ?? "")")
                #expect(median(r, "stored_pages") == 4096)
                let placed = (median(r, "swapin_from_pool") ?? 0) + (median(r, "swapin_from_disk") ?? 0) + (median(r, "swapin_other") ?? 0)
                #expect(placed == 4096)
                #expect((median(r, "swapin_pool_latency_p50") ?? 0) > 0 || (median(r, "swapin_from_pool") ?? 0) == 0)
                let written = try #require(median(r, "written_back_pages"))
                if on && hasMemoryCgroupV2 { #expect(written > 0) } else { #expect(written == 0) }
                #expect(checksAgree(r), "\(r["checks"] ?? "")")
                let changed = ((r["settings"] as? [String: Any])?["changed"] as? [String: Any]) ?? [:]
                let want = on ? "Y" : "N"
                if original != want {
                    let c = changed["/sys/module/zswap/parameters/shrinker_enabled"] as? [String: Any]
                    #expect(c?["to"] as? String == want, "shrinker_enabled borrowed: \(changed)")
                }
                #expect((r["settings"] as? [String: Any])?["restored"] as? Bool == true)
            }
            #expect(swapAreaPaths() == swapsBefore)
            #expect(!(try FileManager.default.contentsOfDirectory(atPath: dir.path)).contains { $0.hasPrefix("memlab-swap") })
            #expect(KnobSnapshot.take() == before)
        }

        /// memory.reclaim and memory.zswap.max: run and agree with the kernel under cgroup v2;
        /// skipped, saying cgroup v2 is what is missing, under v1 — with nothing changed.
        @Test(.enabled(if: sanitizer == nil, "reclaims the child's pages"))
        func cgroupV2VariantsRunOrSayV2IsMissing() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let reclaim = try reclaimRun("memory-reclaim", ["pages=4096", "swap_size=64M", "reclaim_bytes=8M"], dir, name: "mr")
            let zmax = try reclaimRun("zswap-max", ["pages=4096", "swap_size=64M", "zswap_max=4M"], dir, name: "zm")
            if hasMemoryCgroupV2 {
                #expect(reclaim["status"] as? String == "ok", "\(reclaim["reason"] ?? "")")
                let asked: Double = 8 * 1024 * 1024
                #expect((median(reclaim, "reclaimed_bytes") ?? 0) >= asked * 0.99)
                #expect((median(reclaim, "pgscan") ?? 0) >= (median(reclaim, "pgsteal") ?? 1))
                #expect(checksAgree(reclaim), "\(reclaim["checks"] ?? "")")
                if hasZswap {
                    #expect(zmax["status"] as? String == "ok", "\(zmax["reason"] ?? "")")
                    let cap: Double = 4 * 1024 * 1024 + 4096
                    #expect((median(zmax, "pool_bytes") ?? .infinity) <= cap)
                    #expect((median(zmax, "swap_device_writes") ?? 0) > 0, "what does not fit the cap goes to the swap file")
                    #expect(checksAgree(zmax), "\(zmax["checks"] ?? "")")
                }
            } else {
                for r in [reclaim, zmax] {
                    #expect(r["status"] as? String == "skipped")
                    #expect((r["reason"] as? String ?? "").contains("cgroup v2"), "\(r["reason"] ?? "")")
                    let changed = ((r["settings"] as? [String: Any])?["changed"] as? [String: Any]) ?? [:]
                    #expect(changed.isEmpty, "nothing borrowed: \(changed)")
                }
            }
            #expect(KnobSnapshot.take() == before)
        }

        /// DAMON: where memlab can add a kdamond, the cold part is paged out and the hot part
        /// kept, and the kdamond is gone afterwards; where it cannot, the run is skipped with
        /// the reason the probe gives, and DAMON is exactly as it was.
        @Test(.enabled(if: sanitizer == nil, "pages out the child's memory"))
        func damonPagesOutTheColdPartOrSaysWhyNot() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let damonBefore = damonSnapshot()
            let why = Damon.unavailableReason()
            let r = try reclaimRun("damon", ["hot_pages=1024", "cold_pages=4096", "swap_size=64M", "baseline_s=1", "duration_s=4", "min_age_s=1"], dir, name: "damon")
            if let why {
                #expect(r["status"] as? String == "skipped")
                #expect(r["reason"] as? String == why)
            } else {
                #expect(r["status"] as? String == "ok", "\(r["reason"] ?? "")")
                let cold: Double = 4096 * 0.9
                #expect((median(r, "cold_swapped_pages") ?? 0) >= cold)
                #expect((median(r, "damos_sz_tried") ?? 0) > 0)
                #expect((median(r, "memory_given_back") ?? 0) > 0)
                #expect(checksAgree(r), "\(r["checks"] ?? "")")
            }
            #expect(damonSnapshot() == damonBefore, "no kdamond left behind or stopped")
            #expect(KnobSnapshot.take() == before)
        }

        /// Every parameter is range-checked before anything is borrowed: exit 2, nothing changed.
        @Test func hostileParametersAreRefused() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let damonBefore = damonSnapshot()
            for sets in [["sample_ms=0"], ["aggr_ms=5"], ["sample_ms=200", "aggr_ms=100"], ["min_age_s=0.05"],
                         ["duration_s=1", "min_age_s=2"], ["cold_pages=100"], ["hot_pages=-1"], ["swap_size=16M", "cold_pages=8192"],
                         ["zswap_max=-1"], ["reclaim_bytes=1"], ["reclaim_rounds=0"], ["reclaim_rounds=65"], ["shrinker=maybe"],
                         ["pages=1099511627776"], ["max_pool_percent=101"], ["page_cluster=7"], ["pattern=../../etc"], ["no_such=1"]] {
                var args = ["run", "reclaim:damon", "--repeat", "1", "--quiet"]
                for s in sets { args += ["--set", s] }
                let out = try Memlab.run(args, stateDir: dir.path)
                #expect(out.status == 2, "\(sets): \(out.status) \(out.stderr)")
            }
            #expect(damonSnapshot() == damonBefore)
            #expect(KnobSnapshot.take() == before)
        }

        /// `memlab probe` has a row for each reclaim mechanism: usable, or why not.
        @Test func probeHasARowPerMechanism() throws {
            let dir = TempDir()
            let out = try Memlab.run(["probe", "--json"], stateDir: dir.path)
            let doc = try #require(try JSONSerialization.jsonObject(with: Data(out.stdout.utf8)) as? [String: Any])
            let features = (doc["features"] as? [[String: Any]]) ?? []
            for name in ["damon-reclaim", "zswap-shrinker", "memory-reclaim", "memory-zswap-max"] {
                let f = try #require(features.first { $0["name"] as? String == name }, "no probe row \(name)")
                if f["usable"] as? Bool != true { #expect((f["reason"] as? String ?? "").count > 10, "\(name) says why not") }
            }
            let damon = try #require(features.first { $0["name"] as? String == "damon-reclaim" })
            #expect((damon["usable"] as? Bool == true) == (Damon.unavailableReason() == nil))
            let v2 = try #require(features.first { $0["name"] as? String == "memory-reclaim" })
            if !hasMemoryCgroupV2 { #expect((v2["reason"] as? String ?? "").contains("cgroup v2")) }
        }
    }
}
