import Foundation
import Testing

let hasTHP = FileManager.default.fileExists(atPath: "/sys/kernel/mm/transparent_hugepage/enabled")
let has2MPool = FileManager.default.fileExists(atPath: "/sys/kernel/mm/hugepages/hugepages-2048kB")
/// An anonymous mTHP size other than 2M, if the kernel has one (6.8+).
let mthpSize: String? = {
    let dir = "/sys/kernel/mm/transparent_hugepage"
    let names = (try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []
    return names.filter { $0.hasPrefix("hugepages-") && $0 != "hugepages-2048kB" && FileManager.default.fileExists(atPath: "\(dir)/\($0)/enabled") }
        .compactMap { Int($0.dropFirst("hugepages-".count).dropLast(2)) }.filter { $0 >= 16 && $0 <= 1024 }.sorted().last.map { "mthp-\($0)k" }
}()

extension KernelTests {
    /// Huge pages on the real kernel: what backs the memory is read back, never assumed.
    @Suite(.enabled(if: isRoot, "needs root: THP and hugetlb knobs and /proc/kpageflags are root-only"),
           .enabled(if: hasTHP, "kernel without THP"))
    struct HugePages {
        func run(_ target: String, _ sets: [String]) throws -> [String: Any] {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", target, "--repeat", "1", "--quiet", "--json", dir.file("r.json")] + sets.flatMap { ["--set", $0] }, stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)\nstdout: \(out.stdout)")
            #expect(KnobSnapshot.take() == before, "knobs must be restored")
            return try #require(runs(try loadJSON(dir.file("r.json"))).first)
        }

        @Test(.enabled(if: sanitizer == nil, "counts page faults, and a sanitizer's shadow memory faults too"))
        func madviseHugepageRegionIsHugeAnd4KRegionIsNot() throws {
            let thp = try run("hugepages:fault", ["kind=thp", "size=32M"])
            #expect((median(thp, "huge_coverage") ?? 0) > 0.9)
            #expect(median(thp, "anon_huge_bytes") == Double(32 << 20) * (median(thp, "huge_coverage") ?? 0))
            // A 2M fault maps 512 pages at once: far fewer faults than pages.
            #expect((median(thp, "faults") ?? .infinity) < Double((32 << 20) / 4096) / 10)
            // The 2M per-size counter and vmstat record the same faults.
            #expect(median(thp, "thp_size_fault_alloc") == 16)
            #expect((median(thp, "thp_fault_alloc") ?? 0) >= 16)
            #expect(median(thp, "thp_fault_fallback") != nil)
            let base = try run("hugepages:fault", ["kind=4k", "size=32M"])
            #expect(median(base, "huge_coverage") == 0)
            #expect((median(base, "faults") ?? 0) >= Double((32 << 20) / 4096))
        }

        @Test(.enabled(if: mthpSize != nil, "kernel without anonymous mTHP sizes (6.8+)"))
        func mthpSizeShowsInItsOwnCounters() throws {
            let r = try run("hugepages:fault", ["kind=\(mthpSize!)", "size=16M"])
            let kb = Int(mthpSize!.dropFirst(5).dropLast())!
            #expect(median(r, "mthp_fault_alloc") == Double((16 << 20) / (kb * 1024)))
            #expect((median(r, "huge_coverage") ?? 0) > 0.9)
            #expect(median(r, "mthp_fault_fallback") == 0)
            #expect(median(r, "mthp_fault_fallback_charge") == 0)
        }

        /// Every anonymous size the kernel offers is a kind; one it does not is refused by name.
        @Test func mthpKindsFollowTheKernel() throws {
            let dir = TempDir()
            let help = try Memlab.run(["run", "hugepages", "--help-params"], stateDir: dir.path)
            let thp = "/sys/kernel/mm/transparent_hugepage"
            let offered = ((try? FileManager.default.contentsOfDirectory(atPath: thp)) ?? [])
                .filter { $0.hasPrefix("hugepages-") && $0 != "hugepages-2048kB" && FileManager.default.fileExists(atPath: "\(thp)/\($0)/enabled") }
                .compactMap { Int($0.dropFirst("hugepages-".count).dropLast(2)) }
            for kb in offered { #expect(help.stdout.contains("mthp-\(kb)k"), "mthp-\(kb)k missing from: \(help.stdout)") }
            let bad = try Memlab.run(["run", "hugepages:fault", "--set", "kind=mthp-3k", "--repeat", "1", "--quiet"], stateDir: dir.path)
            #expect(bad.status == 2)
            #expect(bad.stderr.contains("mthp-3k"), "stderr: \(bad.stderr)")
        }

        @Test func madvCollapseTurnsA4KRegionHuge() throws {
            let r = try run("hugepages:collapse", ["size=16M", "method=madv_collapse"])
            #expect(median(r, "huge_coverage_before") == 0)
            #expect((median(r, "huge_coverage_after") ?? 0) > 0.95)
            #expect((median(r, "thp_collapse_alloc") ?? 0) >= 8)
        }

        @Test func khugepagedHonoursMaxPtesNone() throws {
            let bloats = try run("hugepages:bloat", ["size=16M", "stride_pages=64", "max_ptes_none=511"])
            #expect(median(bloats, "rss_inflation") == 64)
            #expect(median(bloats, "rss_inflation_after_khugepaged") == 64)
            let stays = try run("hugepages:bloat", ["size=16M", "stride_pages=64", "max_ptes_none=0"])
            #expect(median(stays, "rss_inflation_after_khugepaged") == 1)
        }

        @Test func partialMunmapSplitsEachTHP() throws {
            let r = try run("hugepages:split", ["size=16M"])
            #expect(median(r, "thp_split_pmd") == 8)
        }

        @Test(.enabled(if: has2MPool, "no 2M hugetlb pool"))
        func hugetlbReservationsENOMEMAndSIGBUS() throws {
            let r = try run("hugepages:hugetlb-reserve", ["pool_pages=8", "overcommit_pages=2"])
            #expect(r["status"] as? String == "ok")
            let checks = try #require(r["checks"] as? [[String: Any]])
            func agrees(_ name: String) -> Bool? { checks.first { $0["name"] as? String == name }?["agrees"] as? Bool }
            #expect(agrees("rsvd_after_mmap") == true)
            #expect(agrees("rsvd_after_touch") == true)
            #expect(agrees("enomem_when_short") == true)
            #expect(agrees("sigbus_with_noreserve") == true)
            #expect(agrees("surplus_pages") == true)
            #expect(median(r, "rsvd_after_mmap") == 4)
            // The short pool's ENOMEM is explained in the result, not just counted.
            let notes = (r["notes"] as? [String]) ?? []
            let short = notes.first { $0.hasPrefix("short pool:") }
            #expect(short?.contains("ENOMEM") == true, "notes: \(notes)")
            #expect(short?.contains("available") == true)
            // SIGBUS happened, so its page is a measured number (never a -1 sentinel).
            #expect((median(r, "sigbus_at_page") ?? -1) >= 0)
        }

        @Test(.enabled(if: has2MPool, "no 2M hugetlb pool"))
        func hugetlbPoolSizedPerNode() throws {
            let r = try run("hugepages:hugetlb-reserve", ["pool_pages=6", "overcommit_pages=0", "node=0"])
            #expect(r["status"] as? String == "ok")
            #expect(median(r, "node_pool_pages") == 6)
            #expect(median(r, "node0_pool_pages") == 6)
            let settings = try #require(r["settings"] as? [String: Any])
            let changed = (settings["changed"] as? [String: Any]) ?? [:]
            #expect(changed.keys.contains("/sys/devices/system/node/node0/hugepages/hugepages-2048kB/nr_hugepages"), "changed: \(changed.keys)")
            #expect(settings["restored"] as? Bool == true)
        }

        @Test func hugetlbReserveRefusesAnUnknownNode() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", "hugepages:hugetlb-reserve", "--set", "node=1023", "--repeat", "1", "--quiet"], stateDir: dir.path)
            #expect(out.status == 2)
            #expect(out.stderr.contains("node=1023 is not a NUMA node"), "stderr: \(out.stderr)")
            #expect(KnobSnapshot.take() == before)
        }

        @Test func tlbCurveRisesBeyondTheCaches() throws {
            let r = try run("hugepages:tlb", ["kind=4k", "max_working_set=64M", "accesses=200000"])
            let small = try #require(median(r, "access_latency_16K"))
            let large = try #require(median(r, "access_latency_64M"))
            #expect(large > 3 * small, "16K: \(small) ns, 64M: \(large) ns")
            let latency = try #require(median(r, "random_update_latency"))
            let rate = try #require(median(r, "random_update_rate"))
            #expect(abs(rate * latency / 1e9 - 1) < 0.01, "rate \(rate)/s should be 1/latency (\(latency) ns)")
        }
    }
}
