import Foundation
import Testing

extension KernelTests {
    @Suite(.enabled(if: isRoot, "needs root: the quick suite borrows machine-wide knobs"),
           .enabled(if: hasKSM, "kernel without KSM (no /sys/kernel/mm/ksm)"))
    struct QuickSuite {
        /// The README's first command: every module memlab has is in the suite (run, or skipped
        /// with a reason where this kernel lacks it), and report.html lands beside the results.
        @Test func runsEveryModuleAndWritesAReport() throws {
            let dir = TempDir()
            let out = try Memlab.run(["suite", "quick", "--results-dir", dir.file("results")], stateDir: dir.path)
            let failed = (try? loadJSON(dir.file("results/\((try? FileManager.default.contentsOfDirectory(atPath: dir.file("results")))?.first { $0.hasSuffix("-quick.json") } ?? "")")))
                .map { runs($0).filter { $0["status"] as? String == "failed" }.map { "\($0["scenario"] ?? ""):\($0["variant"] ?? ""): \($0["reason"] ?? "")" } } ?? []
            #expect(out.status == 0 || out.status == 3, "status \(out.status); failed runs: \(failed); stderr: \(out.stderr)")
            let files = try FileManager.default.contentsOfDirectory(atPath: dir.file("results"))
            let json = try #require(files.first { $0.hasSuffix("-quick.json") }, "\(files)")
            #expect(files.contains("report.html"))
            #expect(out.stdout.contains("report: \(dir.file("results"))/report.html"))

            let doc = try loadJSON(dir.file("results/\(json)"))
            let ran = Set(runs(doc).compactMap { $0["scenario"] as? String })
            let list = try Memlab.run(["list", "--json"], stateDir: dir.path)
            let scenarios = try #require(try JSONSerialization.jsonObject(with: Data(list.stdout.utf8)) as? [[String: Any]])
            for id in scenarios.compactMap({ $0["id"] as? String }) where id != "selftest" {
                #expect(ran.contains(id), "module \(id) is not in the quick suite")
            }
            // Every variant of every module (the runner's failure drills aside) is exercised.
            let variantsRun = Set(runs(doc).map { "\($0["scenario"] ?? ""):\($0["variant"] ?? "")" })
            // The failure drills, and the guest variants the suite leaves to the tests (a
            // guest boot each under TCG; VirtualMachines runs them all).
            let drills: Set<String> = ["selftest:crash", "selftest:sigbus", "selftest:oom", "selftest:hang",
                                       "vm:density", "vm:backing", "vm:balloon", "vm:pinning"]
            for s in scenarios {
                for v in (s["variants"] as? [[String: Any]]) ?? [] {
                    let name = "\(s["id"] ?? ""):\(v["name"] ?? "")"
                    if drills.contains(name) { continue }
                    #expect(variantsRun.contains(name), "variant \(name) is not in the quick suite")
                }
            }
            // Every run gave back what it borrowed (read back by the guard; a machine-wide
            // before/after snapshot would race with other memlab users of this machine).
            for r in runs(doc) {
                #expect((r["settings"] as? [String: Any])?["restored"] as? Bool == true, "\(r["scenario"] ?? ""):\(r["variant"] ?? "")")
            }
            // A module whose kernel feature the probe finds usable must really run here (at
            // least one ok run), not skip: a wrongly skipped module must fail this test.
            let probe = try Memlab.run(["probe", "--json"], stateDir: dir.path)
            let probed = try #require(try JSONSerialization.jsonObject(with: Data(probe.stdout.utf8)) as? [String: Any])
            let usable = Set(((probed["features"] as? [[String: Any]]) ?? []).filter { $0["usable"] as? Bool == true }.compactMap { $0["name"] as? String })
            let needs = ["ksm": "ksm", "hugepages": "thp", "overcommit": "memory-cgroup", "tmem": "zswap",
                         "lazy-restore": "userfaultfd", "migration": "uffd-wp-async", "reclaim": "zswap-shrinker"]
            for (module, feature) in needs where usable.contains(where: { $0.hasPrefix(feature) }) {
                let ok = runs(doc).contains { $0["scenario"] as? String == module && $0["status"] as? String == "ok" }
                let reasons = runs(doc).filter { $0["scenario"] as? String == module }.map { "\($0["status"] ?? "")/\($0["reason"] ?? "")" }
                #expect(ok, "\(module): \(feature) is usable here, yet no run of it was ok: \(reasons)")
            }
            for r in runs(doc) where r["status"] as? String == "skipped" {
                #expect((r["reason"] as? String ?? "").count > 10, "a skipped run says why")
            }
            // KSM merge is swept over two sizes: a curve and the pages_sharing time series.
            let merges = runs(doc).filter { $0["scenario"] as? String == "ksm" && $0["variant"] as? String == "merge" }
            #expect(merges.count == 2)
            #expect(merges.allSatisfy { $0["sweep"] != nil })
            let html = try String(contentsOfFile: dir.file("results/report.html"), encoding: .utf8)
            #expect(html.contains("class=\"chart chart-timeseries\""))
            #expect(html.contains("class=\"chart chart-sweep\""))
            #expect(html.contains("pages_sharing over time"))
        }
    }
}
