import Foundation
import Testing

extension KernelTests {
    @Suite(.enabled(if: isRoot, "needs root: KSM's knobs under /sys/kernel/mm/ksm are root-only"),
           .enabled(if: hasKSM, "kernel without KSM (no /sys/kernel/mm/ksm)"))
    struct KSMEndToEnd {
        /// The physical check: pages_sharing and this process's merged pages match the
        /// duplicates the scenario wrote, and the machine reads as before afterwards.
        @Test func mergeAgreesWithTheLayoutAndRestoresKnobs() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", "ksm:merge", "--repeat", "2", "--set", "pages=4096",
                                      "--set", "duplicate_ratio=0.75", "--set", "zero_ratio=0",
                                      "--set", "duplicate_groups=8", "--json", dir.file("r.json"), "--quiet"],
                                     stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
            let doc = try loadJSON(dir.file("r.json"))
            #expect(doc["schema"] as? String == "memlab.result/1")
            let run = try #require(runs(doc).first)
            #expect(run["status"] as? String == "ok")
            #expect(run["reason"] is NSNull)
            // 3072 duplicates in 8 groups of 384: each group needs ceil(384/256) = 2 KSM pages.
            #expect(median(run, "merging_pages") == 3072)
            #expect(median(run, "pages_shared") == 16)
            #expect(median(run, "pages_sharing") == Double(3072 - 16))
            #expect(median(run, "saved_bytes") == Double((3072 - 16) * 4096))
            #expect((median(run, "merge_time") ?? 0) > 0)
            #expect((median(run, "ksmd_cpu_time") ?? 0) > 0)
            let checks = try #require(run["checks"] as? [[String: Any]])
            #expect(!checks.isEmpty)
            #expect(checks.allSatisfy { $0["agrees"] as? Bool == true }, "\(checks)")
            let series = try #require((run["timeseries"] as? [[String: Any]])?.first { $0["name"] as? String == "pages_sharing" })
            let values = try #require(series["values"] as? [Double])
            #expect(values.count >= 2)
            #expect(values.last! > values.first!, "pages_sharing must rise while ksmd merges")
            let settings = try #require(run["settings"] as? [String: Any])
            #expect(settings["restored"] as? Bool == true)
            let changed = try #require(settings["changed"] as? [String: Any])
            #expect(changed["/sys/kernel/mm/ksm/run"] != nil)
            #expect(KnobSnapshot.take() == before)
            // The table names the metrics and the check verdicts.
            #expect(out.stdout.contains("merge_time"))
            #expect(out.stdout.contains("agrees"))
        }

        /// A write to a merged page is a copy-on-write fault: it must cost far more than a
        /// store to a private page.
        @Test func cowFaultCostsMoreThanAPlainWrite() throws {
            let dir = TempDir()
            let out = try Memlab.run(["run", "ksm:cow", "--repeat", "1", "--set", "pages=4096",
                                      "--json", dir.file("r.json"), "--csv", dir.file("r.csv"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
            let run = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            let cow = try #require(median(run, "cow_fault_latency"))
            let plain = try #require(median(run, "unmerged_write_latency"))
            #expect(cow > 2 * plain, "cow \(cow) ns vs plain \(plain) ns")
            #expect((median(run, "cow_fault_latency_p99") ?? 0) >= (median(run, "cow_fault_latency_p50") ?? .infinity))
            let csv = try String(contentsOfFile: dir.file("r.csv"), encoding: .utf8)
            #expect(csv.hasPrefix("scenario,variant,status,params,metric"))
            #expect(csv.contains("ksm,cow,ok,"))
        }

        @Test func unmergeLeavesNoMergedPage() throws {
            let dir = TempDir()
            let out = try Memlab.run(["run", "ksm:unmerge", "--repeat", "1", "--set", "pages=4096",
                                      "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
            let run = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            #expect((median(run, "unmerge_time") ?? 0) > 0)
            let checks = try #require(run["checks"] as? [[String: Any]])
            let after = try #require(checks.first { $0["name"] as? String == "region_ksm_pages_after_unmerge" })
            #expect(after["observed"] as? Double == 0)
        }

        @Test func zeroPagesGoToTheZeroPageWithUseZeroPages() throws {
            let dir = TempDir()
            let out = try Memlab.run(["run", "ksm:merge", "--repeat", "1", "--set", "pages=2048",
                                      "--set", "zero_ratio=0.5", "--set", "duplicate_ratio=0",
                                      "--set", "use_zero_pages=true", "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
            let run = try #require(runs(try loadJSON(dir.file("r.json"))).first)
            #expect(median(run, "ksm_zero_pages") == 1024)
            #expect(median(run, "merging_pages") == 0)
        }

        @Test func scenarioFileRunsWithItsParameters() throws {
            let dir = TempDir()
            try """
            description = "two runs from one file"
            [[runs]]
            scenario = "ksm"
            variant = "merge"
            repeat = 1
            [runs.params]
            pages = 1024
            duplicate_ratio = 0.5
            [[runs]]
            scenario = "selftest"
            variant = "ok"
            repeat = 2
            [runs.params]
            size = "4M"
            """.write(toFile: dir.file("s.toml"), atomically: true, encoding: .utf8)
            let out = try Memlab.run(["run", dir.file("s.toml"), "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 0, "stderr: \(out.stderr)")
            let rs = runs(try loadJSON(dir.file("r.json")))
            #expect(rs.count == 2)
            #expect((rs.first?["params"] as? [String: Any])?["pages"] as? Int == 1024)
            #expect(rs.last?["scenario"] as? String == "selftest")
            #expect(rs.last?["repetitions"] as? Int == 2)
            #expect((rs.last?["params"] as? [String: Any])?["size"] as? Int == 4 << 20)
        }
    }
}
