#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
@testable import LabKit

let hasUnderusedShrinker = FileManager.default.fileExists(atPath: "/sys/kernel/mm/transparent_hugepage/shrink_underused")

extension KernelTests {
    /// The underused-THP shrinker (6.12+) on the real kernel: it splits exactly the THPs with
    /// more zero-filled pages than max_ptes_none, and only when it is on; RSS is given back.
    @Suite(.enabled(if: isRoot, "needs root: THP knobs, memory cgroups and /proc/kpageflags are root-only"),
           .enabled(if: hasTHP, "kernel without THP"),
           .enabled(if: hasUnderusedShrinker, "kernel without the underused-THP shrinker (6.12+)"),
           .enabled(if: hasMemoryCgroup, "no memory cgroup controller mounted"))
    struct THPShrinker {
        func run(_ sets: [String]) throws -> [String: Any] {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", "hugepages:shrink-underused", "--repeat", "1", "--quiet", "--json", dir.file("r.json")] + sets.flatMap { ["--set", $0] },
                                     stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)\nstdout: \(out.stdout)")
            #expect(KnobSnapshot.take() == before, "knobs must be restored")
            let r = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            let checks = r["checks"] as? [[String: Any]] ?? []
            #expect(!checks.isEmpty && checks.allSatisfy { $0["agrees"] as? Bool == true }, "\(checks)")
            return r
        }

        @Test func underusedTHPsAreSplitAndGiveTheirZeroPagesBack() throws {
            let r = try run(["size=16M", "max_ptes_none=409", "touched_per_huge=8"])
            #expect(r["status"] as? String == "ok", "\(r["reason"] ?? "")")
            #expect(median(r, "thp_underused_split_page") == 8)
            #expect(median(r, "rss_after") == Double(8 * 8 * 4096))
            #expect(median(r, "anon_huge_bytes_after") == 0)
            #expect((median(r, "rss_given_back") ?? 0) > Double(15 << 20))
        }

        /// max_ptes_none is the threshold: 409 zero-filled pages are not more than 409.
        @Test func atTheThresholdNothingIsSplit() throws {
            let r = try run(["size=16M", "max_ptes_none=409", "touched_per_huge=103"])
            #expect(median(r, "thp_underused_split_page") == 0)
            #expect(median(r, "anon_huge_bytes_after") == Double(16 << 20))
        }

        @Test func offMeansNothingIsSplit() throws {
            let r = try run(["size=16M", "max_ptes_none=409", "shrink_underused=false"])
            #expect(median(r, "thp_underused_split_page") == 0)
            #expect(median(r, "rss_after") == Double(16 << 20))
            let changed = ((r["settings"] as? [String: Any])?["changed"] as? [String: Any]) ?? [:]
            #expect(changed["/sys/kernel/mm/transparent_hugepage/shrink_underused"] != nil)
        }

        @Test func badValuesChangeNothing() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            for args in [["--set", "touched_per_huge=0"], ["--set", "touched_per_huge=513"], ["--set", "shrink_underused=2"],
                         ["--set", "max_ptes_none=512"], ["--set", "size=1M"]] {
                let out = try Memlab.run(["run", "hugepages:shrink-underused"] + args + ["--repeat", "1", "--quiet"], stateDir: dir.path)
                #expect(out.status == 2, "\(args): status \(out.status), stderr \(out.stderr)")
            }
            #expect(KnobSnapshot.take() == before)
        }
    }
}

let hasMaxPtesShared = FileManager.default.fileExists(atPath: "/sys/kernel/mm/transparent_hugepage/khugepaged/max_ptes_shared")

extension KernelTests {
    /// khugepaged's max_ptes_shared on the real kernel, as the khugepaged selftest: a range
    /// with more pages shared (with a forked child) than the limit is not collapsed.
    @Suite(.enabled(if: isRoot, "needs root: khugepaged knobs are root-only"),
           .enabled(if: hasTHP, "kernel without THP"),
           .enabled(if: hasMaxPtesShared, "kernel without khugepaged/max_ptes_shared (5.8+)"))
    struct CollapseShared {
        @Test(arguments: [(256, 4.0), (257, 0.0)])
        func collapsedIffSharedPagesWithinTheLimit(_ shared: Int, _ ranges: Double) throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", "hugepages:collapse-shared", "--repeat", "1", "--quiet", "--json", dir.file("r.json"),
                                      "--set", "size=8M", "--set", "max_ptes_shared=256", "--set", "shared_per_huge=\(shared)"], stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
            #expect(KnobSnapshot.take() == before, "knobs must be restored")
            let r = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            let checks = r["checks"] as? [[String: Any]] ?? []
            #expect(!checks.isEmpty && checks.allSatisfy { $0["agrees"] as? Bool == true }, "\(checks)")
            #expect(median(r, "huge_ranges_collapsed") == ranges)
            if ranges == 0 { #expect((median(r, "thp_scan_exceed_share_pte") ?? 0) >= 4) }
            let changed = ((r["settings"] as? [String: Any])?["changed"] as? [String: Any]) ?? [:]
            #expect(changed["/sys/kernel/mm/transparent_hugepage/khugepaged/max_ptes_shared"] != nil || before.values["/sys/kernel/mm/transparent_hugepage/khugepaged/max_ptes_shared"] == "256")
        }

        @Test func badValuesChangeNothing() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            for args in [["--set", "shared_per_huge=513"], ["--set", "max_ptes_shared=512"], ["--set", "max_ptes_shared=-1"]] {
                let out = try Memlab.run(["run", "hugepages:collapse-shared"] + args + ["--repeat", "1", "--quiet"], stateDir: dir.path)
                #expect(out.status == 2, "\(args): status \(out.status), stderr \(out.stderr)")
            }
            #expect(KnobSnapshot.take() == before)
        }
    }
}

let hasShmemTHP = FileManager.default.fileExists(atPath: "/sys/kernel/mm/transparent_hugepage/shmem_enabled")

extension KernelTests {
    /// shmem THP on the real kernel: each shmem_enabled mode maps shared anonymous memory
    /// with 2M pages or not, as transhuge.rst says.
    @Suite(.enabled(if: isRoot, "needs root: THP knobs are root-only"),
           .enabled(if: hasShmemTHP, "kernel without THP for shmem"))
    struct ShmemTHP {
        @Test(arguments: [("always", true, 8.0), ("advise", true, 8.0), ("advise", false, 0.0), ("never", true, 0.0)])
        func modeDecidesTheHugePages(_ mode: String, _ madvise: Bool, _ allocs: Double) throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", "hugepages:shmem", "--repeat", "1", "--quiet", "--json", dir.file("r.json"),
                                      "--set", "size=16M", "--set", "shmem_enabled=\(mode)", "--set", "madvise=\(madvise)"], stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
            #expect(KnobSnapshot.take() == before, "knobs must be restored")
            let r = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            let checks = r["checks"] as? [[String: Any]] ?? []
            #expect(!checks.isEmpty && checks.allSatisfy { $0["agrees"] as? Bool == true }, "\(checks)")
            #expect(median(r, "shmem_pmd_mapped") == allocs * Double(2 << 20))
            #expect((median(r, "thp_file_alloc") ?? -1) >= allocs)
        }

        /// A tmpfs mounted for the run with huge=: its own option decides, shmem_enabled's deny
        /// overrides it, and the mount is gone afterwards.
        @Test(arguments: [("always", "never", 8.0), ("never", "never", 0.0), ("always", "deny", 0.0), ("within_size", "never", 8.0)])
        func tmpfsHugeOptionDecides(_ huge: String, _ shmemEnabled: String, _ allocs: Double) throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", "hugepages:shmem", "--repeat", "1", "--quiet", "--json", dir.file("r.json"),
                                      "--set", "size=16M", "--set", "tmpfs_huge=\(huge)", "--set", "shmem_enabled=\(shmemEnabled)"], stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
            #expect(KnobSnapshot.take() == before, "knobs and mounts must be restored")
            let r = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            let checks = r["checks"] as? [[String: Any]] ?? []
            #expect(!checks.isEmpty && checks.allSatisfy { $0["agrees"] as? Bool == true }, "\(checks)")
            #expect(median(r, "shmem_pmd_mapped") == allocs * Double(2 << 20))
            let mounts = try String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)
            #expect(!mounts.contains(dir.path), "the run's tmpfs is still mounted: \(mounts)")
            let left = (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
            #expect(!left.contains { $0.hasPrefix("memlab-tmpfs-") }, "\(left)")
        }

        /// Killed while its tmpfs is mounted, the run's mount is undone by `memlab restore`.
        @Test func sigkillWithTheMountThenRestoreUnmounts() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let (p, _, _) = try Memlab.start(["run", "hugepages:shmem", "--set", "size=256M", "--set", "tmpfs_huge=always", "--repeat", "200", "--quiet",
                                              "--json", dir.file("r.json")], stateDir: dir.path)
            let mounted = waitFor(20) { ((try? String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)) ?? "").contains("\(dir.path)/memlab-tmpfs-") }
            #expect(mounted, "the run never mounted its tmpfs")
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            let restore = try Memlab.run(["restore"], stateDir: dir.path)
            #expect(restore.status == 0, "stdout: \(restore.stdout) stderr: \(restore.stderr)")
            let mounts = try String(contentsOfFile: "/proc/self/mounts", encoding: .utf8)
            #expect(!mounts.contains("\(dir.path)/memlab-tmpfs-"), "\(mounts)")
            let left = (try? FileManager.default.contentsOfDirectory(atPath: dir.path)) ?? []
            #expect(!left.contains { $0.hasPrefix("memlab-tmpfs-") }, "\(left)")
            #expect(waitFor(5) { KnobSnapshot.take() == before }, "\(KnobSnapshot.take())")
        }

        @Test func badModeChangesNothing() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", "hugepages:shmem", "--set", "shmem_enabled=sometimes", "--repeat", "1", "--quiet"], stateDir: dir.path)
            #expect(out.status == 2)
            #expect(out.stderr.contains("shmem_enabled"), "stderr: \(out.stderr)")
            #expect(KnobSnapshot.take() == before)
        }
    }
}

let hasMaxPtesSwap = FileManager.default.fileExists(atPath: "/sys/kernel/mm/transparent_hugepage/khugepaged/max_ptes_swap")

extension KernelTests {
    /// khugepaged's max_ptes_swap on the real kernel, as the khugepaged selftest; the run's
    /// own swap file is gone afterwards.
    @Suite(.enabled(if: isRoot, "needs root: khugepaged knobs and swapon are root-only"),
           .enabled(if: hasTHP, "kernel without THP"),
           .enabled(if: hasMaxPtesSwap, "kernel without khugepaged/max_ptes_swap"))
    struct CollapseSwap {
        @Test(arguments: [(64, 4.0), (65, 0.0)])
        func collapsedIffSwappedPagesWithinTheLimit(_ swapped: Int, _ ranges: Double) throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", "hugepages:collapse-swap", "--repeat", "1", "--quiet", "--json", dir.file("r.json"),
                                      "--set", "size=8M", "--set", "max_ptes_swap=64", "--set", "swapped_per_huge=\(swapped)"], stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
            #expect(KnobSnapshot.take() == before, "knobs and swap areas must be restored")
            let r = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            if r["status"] as? String == "skipped" { return }   // a state directory that cannot hold a swap file says why
            let checks = r["checks"] as? [[String: Any]] ?? []
            #expect(!checks.isEmpty && checks.allSatisfy { $0["agrees"] as? Bool == true }, "\(checks)")
            #expect(median(r, "huge_ranges_collapsed") == ranges)
            #expect(median(r, "swap_bytes_before") == Double(4 * swapped * 4096))
            #expect(median(r, "swap_bytes_after") == (ranges > 0 ? 0 : Double(4 * swapped * 4096)))
            let swaps = try String(contentsOfFile: "/proc/swaps", encoding: .utf8)
            #expect(!swaps.contains(dir.path), "the run's swap file is still active: \(swaps)")
        }
    }
}

/// A journal found on disk may name only mounts memlab makes: in its state directory, named
/// memlab-tmpfs-*. Anything else is refused, not unmounted.
@Suite struct MountJournalTrust {
    @Test func mountsOutsideTheStateDirectoryAreRefused() {
        var j = Journal(ownerPID: 1, ownerStart: 1, command: "t")
        j.mounts = ["/var/lib/memlab/memlab-tmpfs-12"]
        #expect(j.untrustedPath(stateDirectory: "/var/lib/memlab") == nil)
        for bad in ["/proc", "/var/lib/memlab/../../../sys", "/var/lib/memlab/other", "/mnt/memlab-tmpfs-1"] {
            j.mounts = [bad]
            #expect(j.untrustedPath(stateDirectory: "/var/lib/memlab") == bad, "\(bad)")
        }
    }
}
