#if canImport(Glibc)
import Glibc
#endif
import Foundation
import Testing
@testable import Scenarios
import LabKit
import LinuxMM

let ksmDir = "/sys/kernel/mm/ksm"
let hasSmartScan = FileManager.default.fileExists(atPath: "\(ksmDir)/pages_skipped")
let hasKSMAdvisor = FileManager.default.fileExists(atPath: "\(ksmDir)/advisor_mode")
let hasKSMChains = FileManager.default.fileExists(atPath: "\(ksmDir)/stable_node_chains")
/// NUMA nodes with memory, as sysfs lists them.
let numaNodes: Int = {
    let names = (try? FileManager.default.contentsOfDirectory(atPath: "/sys/devices/system/node")) ?? []
    return max(1, names.filter { $0.hasPrefix("node") && Int($0.dropFirst(4)) != nil }.count)
}()

/// The kernel's rules the KSM mechanism variants check against, without a kernel.
@Suite struct KSMMechanismRules {
    /// mm/ksm.c should_skip_rmap_item: ages 0–2 scanned; then 1 skip after age 3, 2 after
    /// ages 4–5, 4 after 6–8, 8 from 9 on, each allowance preceded by one scan.
    @Test func smartScanSkipRule() {
        #expect(KSMScenario.smartScanSkips(visits: 4) == 0)
        #expect(KSMScenario.smartScanSkips(visits: 5) == 1)      // visit 5: the one skip after age 3
        #expect(KSMScenario.smartScanSkips(visits: 8) == 3)      // visits 7, 8: two skips after age 5
        #expect(KSMScenario.smartScanSkips(visits: 13) == 7)     // visits 10–13: four after age 8
        #expect(KSMScenario.smartScanSkips(visits: 22) == 15)    // visits 15–22: eight after age 13
        // In the long run 8 of every 9 visits are skipped.
        let long = KSMScenario.smartScanSkips(visits: 9004) - KSMScenario.smartScanSkips(visits: 4)
        #expect(abs(Double(long) / 9000 - 8.0 / 9) < 0.01)
    }

    /// mm/ksm.c scan_time_advisor's clamp: [10%, max_cpu] of one CPU at the last cost per page.
    @Test func advisorCPUBounds() {
        // 500 pages per wake-up at 5% CPU: 100 pages per percent, so 1000...7000.
        let b = KSMScenario.advisorBounds(before: 500, scanSeconds: 2.5, cpuSeconds: 0.1, maxCPU: 70, maxPages: 30000)
        #expect(b == 1000...7000)
        // Capped at advisor_max_pages_to_scan; a scan under a second counts as one.
        #expect(KSMScenario.advisorBounds(before: 30000, scanSeconds: 0.02, cpuSeconds: 0.006, maxCPU: 70, maxPages: 30000) == 30000...30000)
    }

    /// Chains: ceil(copies / max_page_sharing) KSM pages per content, a chain when two or more;
    /// a last single copy stays unmerged.
    @Test func chainExpectation() {
        let s = KSMLayout.sharing(contents: [100, 33, 32, 2, 1], maxPageSharing: 32)
        // 100 = 3×32 + 4: 4 KSM pages (chain); 33 = 32 + 1: 1 KSM page, one copy left over;
        // 32: 1; 2: 1; 1: nothing.
        #expect(s.shared == 4 + 1 + 1 + 1)
        #expect(s.merging == 100 + 32 + 32 + 2)
        #expect(s.chains == 1)
        #expect(s.dups == 4)
    }
}

extension KernelTests {
    /// KSM's newer mechanisms on the real kernel (issue 15): every figure is the kernel's own
    /// counter, every check agrees, and every borrowed knob reads as before afterwards.
    @Suite(.enabled(if: isRoot, "needs root: KSM's knobs under /sys/kernel/mm/ksm are root-only"),
           .enabled(if: hasKSM, "kernel without KSM (no /sys/kernel/mm/ksm)"))
    struct KSMMechanisms {
        func run(_ target: String, _ sets: [String], repeat reps: Int = 1) throws -> [String: Any] {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", target, "--repeat", String(reps), "--quiet", "--json", dir.file("r.json")] + sets.flatMap { ["--set", $0] },
                                     stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)\nstdout: \(out.stdout)")
            #expect(KnobSnapshot.take() == before, "knobs must be restored")
            return try #require(runs(try loadJSON(dir.file("r.json"))).first)
        }

        func checks(_ run: [String: Any]) -> [[String: Any]] { run["checks"] as? [[String: Any]] ?? [] }
        func allAgree(_ run: [String: Any]) -> Bool { checks(run).allSatisfy { $0["agrees"] as? Bool == true } }

        @Test(.enabled(if: hasSmartScan, "kernel without smart scan (6.7+)"))
        func smartScanSkipsWhatTheKernelRuleSays() throws {
            let off = try run("ksm:smart-scan", ["pages=8192", "smart_scan=false", "observe_scans=20"])
            let on = try run("ksm:smart-scan", ["pages=8192", "smart_scan=true", "observe_scans=20"])
            #expect(off["status"] as? String == "ok" && on["status"] as? String == "ok")
            #expect(allAgree(off), "\(checks(off))")
            #expect(allAgree(on), "\(checks(on))")
            #expect(median(off, "pages_skipped") == 0)
            #expect((median(on, "pages_skipped") ?? 0) > 0)
            // Every page visited once per scan either way; with smart scan fewer are scanned.
            #expect(median(off, "pages_scanned_per_scan") == 8192)
            #expect((median(on, "pages_scanned_per_scan") ?? .infinity) < 8192 * 0.9)
            #expect(checks(on).contains { $0["name"] as? String == "pages_skipped" && $0["agrees"] as? Bool == true })
        }

        @Test(.enabled(if: hasKSMAdvisor, "kernel without the KSM advisor (6.9+)"))
        func advisorPicksWithinItsBoundsAndGivesPagesToScanBack() throws {
            let r = try run("ksm:advisor", ["pages=8192", "duration_s=4", "target_scan_time=1"])
            #expect(r["status"] as? String == "ok", "\(r["reason"] ?? "")")
            #expect(allAgree(r), "\(checks(r))")
            #expect((median(r, "timed_scans") ?? 0) >= 1)
            let names = Set(checks(r).compactMap { $0["name"] as? String })
            #expect(names.isSuperset(of: ["pages_to_scan_max", "picks_off_scan_boundary", "picks_within_cpu_bounds"]))
            let series = (r["timeseries"] as? [[String: Any]] ?? []).compactMap { $0["name"] as? String }
            #expect(series.contains("advisor_pages_to_scan") && series.contains("scan_time"))
            // The guard journaled pages_to_scan (which advisor_mode resets) and gave it back.
            let changed = ((r["settings"] as? [String: Any])?["changed"] as? [String: Any]) ?? [:]
            #expect(changed["\(ksmDir)/advisor_mode"] != nil)
        }

        @Test(.enabled(if: hasTHP, "kernel without THP"))
        func mergingSplitsOnlyTheHugePagesThatHoldCopies() throws {
            // 16 huge pages; the layout's zero and duplicate pages fill the first 10.
            let r = try run("ksm:thp", ["pages=8192"])
            #expect(r["status"] as? String == "ok", "\(r["reason"] ?? "")")
            #expect(allAgree(r), "\(checks(r))")
            #expect(median(r, "anon_huge_bytes_before") == Double(32 << 20))
            #expect(median(r, "huge_pages_to_split") == 10)
            #expect(median(r, "huge_pages_split") == 10)
            #expect(median(r, "anon_huge_bytes_after") == Double(6 * (2 << 20)))
        }

        @Test(.enabled(if: hasKSMChains, "kernel without stable node chains (4.13+)"))
        func chainsFollowMaxPageSharing() throws {
            let r = try run("ksm:chains", ["pages=8192", "max_page_sharing=32"])
            #expect(r["status"] as? String == "ok", "\(r["reason"] ?? "")")
            #expect(allAgree(r), "\(checks(r))")
            // 16 groups of 256 copies and 819 zero pages: 17 contents over 32 copies each.
            #expect(median(r, "stable_node_chains") == 17)
            #expect(median(r, "stable_node_dups") == Double(16 * 8 + 26))
            #expect(median(r, "pages_shared") == Double(16 * 8 + 26))
            let changed = ((r["settings"] as? [String: Any])?["changed"] as? [String: Any]) ?? [:]
            #expect(changed["\(ksmDir)/max_page_sharing"] != nil)
        }

        @Test(.enabled(if: numaNodes < 2, "this machine has two NUMA nodes: numaMergeDoublesPagesShared runs instead"))
        func numaMergeIsSkippedOnOneNodeWithTheReason() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", "ksm:numa-merge", "--repeat", "1", "--quiet", "--json", dir.file("r.json")], stateDir: dir.path)
            #expect(out.status == 0 || out.status == 3, "stderr: \(out.stderr)")
            let r = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            #expect(r["status"] as? String == "skipped")
            #expect((r["reason"] as? String ?? "").contains("two NUMA nodes"), "\(r["reason"] ?? "")")
            #expect(KnobSnapshot.take() == before)
            let probe = try Memlab.run(["probe"], stateDir: dir.path)
            #expect(probe.stdout.split(separator: "\n").contains { $0.hasPrefix("ksm-numa-merge") && $0.contains("unusable") && $0.contains("two NUMA nodes") })
        }

        /// As tools/testing/selftests/mm/ksm_tests.c check_ksm_numa_merge: the same pages on
        /// two nodes are one KSM page per content with merge_across_nodes=1, two with 0.
        @Test(.enabled(if: numaNodes >= 2, "needs two NUMA nodes"))
        func numaMergeDoublesPagesShared() throws {
            let across = try run("ksm:numa-merge", ["pages=4096", "duplicate_groups=8", "merge_across_nodes=true"])
            let apart = try run("ksm:numa-merge", ["pages=4096", "duplicate_groups=8", "merge_across_nodes=false"])
            #expect(allAgree(across) && allAgree(apart), "\(checks(across)) \(checks(apart))")
            #expect(median(across, "pages_shared") == 8)
            #expect(median(apart, "pages_shared") == 16)
        }

        /// merge_across_nodes (and max_page_sharing) change only with nothing merged: the guard
        /// unmerges first, borrows, and gives the value back the same way — also on one node.
        @Test func theGuardBorrowsMergeAcrossNodesAndGivesItBack() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let g = SettingsGuard(stateDirectory: dir.path, command: "KSMMechanisms test")
            try g.acquireLock(wait: true, say: { _ in })
            defer { g.releaseLock() }
            let original = try KSM.Knobs.mergeAcrossNodes.read()
            let other = original == "1" ? "0" : "1"
            try g.set(KSM.Knobs.run, to: "1")
            try g.set(KSM.Knobs.mergeAcrossNodes, to: other)
            #expect(try KSM.Knobs.mergeAcrossNodes.read() == other)
            #expect(try KSM.Knobs.run.read() == "1", "run is given back its value after the unmerge")
            try g.set(KSM.Knobs.maxPageSharing, to: "17")
            #expect(try KSM.Knobs.maxPageSharing.read() == "17")
            let report = g.restoreAll()
            #expect(report.restored, "\(report.failures)")
            #expect(try KSM.Knobs.mergeAcrossNodes.read() == original)
            #expect(KnobSnapshot.take() == before)
        }

        /// Out-of-range and contradictory values: exit 2, nothing changed.
        @Test func badValuesChangeNothing() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            for args in [["ksm:thp", "--set", "pages=1000"], ["ksm:chains", "--set", "max_page_sharing=1"],
                         ["ksm:chains", "--set", "max_page_sharing=65536"], ["ksm:advisor", "--set", "target_scan_time=0"],
                         ["ksm:advisor", "--set", "duration_s=1", "--set", "target_scan_time=5"],
                         ["ksm:advisor", "--set", "advisor_max_cpu=101"], ["ksm:numa-merge", "--set", "pages=1001"],
                         ["ksm:smart-scan", "--set", "observe_scans=0"], ["ksm:smart-scan", "--set", "smart_scan=maybe"]] {
                let out = try Memlab.run(["run"] + args + ["--repeat", "1", "--quiet"], stateDir: dir.path)
                #expect(out.status == 2, "\(args): status \(out.status), stderr \(out.stderr)")
                #expect(!out.stderr.isEmpty)
            }
            #expect(KnobSnapshot.take() == before)
            #expect(!FileManager.default.fileExists(atPath: dir.file("journal.json")))
        }

        /// Killed mid-run, the next start gives back what the kernel only takes with nothing
        /// merged (max_page_sharing: run=2 first) and what advisor_mode reset (pages_to_scan).
        @Test(arguments: [["ksm:chains", "--set", "pages=65536", "--set", "pages_to_scan=100", "--set", "sleep_millisecs=20", "--set", "max_page_sharing=8"],
                          ["ksm:advisor", "--set", "pages=65536", "--set", "duration_s=60", "--set", "target_scan_time=5"]])
        func sigkillMidRunThenNextStartRestores(_ args: [String]) throws {
            if args[0] == "ksm:advisor" && !hasKSMAdvisor { return }
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let (p, _, _) = try Memlab.start(["run"] + args + ["--repeat", "1", "--quiet", "--json", dir.file("r.json")], stateDir: dir.path)
            let borrowed = waitFor(30) {
                FileManager.default.fileExists(atPath: dir.file("journal.json")) && KnobSnapshot.take().values["\(ksmDir)/run"] == "1"
            }
            #expect(borrowed, "the run never borrowed the knobs")
            // Let ksmd merge something (max_page_sharing then needs run=2 to change back).
            _ = waitFor(10) { (Int((try? String(contentsOfFile: "\(ksmDir)/pages_shared", encoding: .utf8))?.trimmingCharacters(in: .whitespacesAndNewlines) ?? "0") ?? 0) > 0 }
            kill(p.processIdentifier, SIGKILL)
            p.waitUntilExit()
            // `memlab restore` waits for the settings lock (another memlab may hold it) and
            // recovers the dead run's journal — unless another memlab's start got there first
            // (journals are registered machine-wide): either way the journal is gone after.
            let restore = try Memlab.run(["restore"], stateDir: dir.path)
            #expect(restore.status == 0, "stdout: \(restore.stdout) stderr: \(restore.stderr)")
            #expect(restore.stdout.contains("restored the settings of pid \(p.processIdentifier)") || restore.stdout.contains("nothing to restore"),
                    "stdout: \(restore.stdout)")
            #expect(!FileManager.default.fileExists(atPath: dir.file("journal.json")))
            #expect(waitFor(5) { KnobSnapshot.take() == before }, "\(KnobSnapshot.take())")
        }
    }
}
