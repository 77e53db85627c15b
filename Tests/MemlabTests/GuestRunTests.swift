#if canImport(Glibc)
import Glibc
#endif
import Foundation
@testable import Guests
@testable import LabKit
import LinuxMM
import Scenarios
import Testing

/// `--guest` parsing and what comes back from a guest, without one.
@Suite struct GuestSpecParsing {
    @Test func parsesEveryKeyAndDefaults() throws {
        let s = try GuestSpec.parse("kernel=/boot/x,mem=768M,cpus=3,numa=3,cgroup=v1,accel=tcg")
        #expect(s.kernel == "/boot/x" && s.memoryMiB == 768 && s.cpus == 3 && s.numaNodes == 3 && s.cgroup == .v1 && s.accel == .tcg)
        let d = try GuestSpec.parse("kernel=/boot/x")
        #expect(d.memoryMiB == 1024 && d.cpus == 2 && d.numaNodes == 1 && d.cgroup == .v2 && d.accel == .auto)
        #expect(try GuestSpec.parse("kernel=host").isHost)
        // Node shares: equal, the remainder on the last; CPU c on node c mod N.
        #expect([0, 1, 2].map(s.nodeMiB) == [256, 256, 256])
        let odd = try GuestSpec.parse("kernel=/k,mem=1000M,numa=3,cpus=4")
        #expect([0, 1, 2].map(odd.nodeMiB) == [333, 333, 334])
        #expect(odd.nodeCPUs(0) == [0, 3] && odd.nodeCPUs(2) == [2])
    }

    @Test(arguments: [
        ("", "not KEY=VALUE"), ("mem=1G", "kernel=PATH is required"), ("kernel=/k,mem=1G,mem=2G", "given twice"),
        ("kernel=/k,foo=1", "unknown key 'foo'"), ("kernel=/k,mem=12", "whole MiB"), ("kernel=/k,mem=64M", "whole MiB within"),
        ("kernel=/k,mem=99999999999999999999G", "not a size"), ("kernel=/k,cpus=0", "cpus '0' must be"),
        ("kernel=/k,cpus=-1", "must be an integer"), ("kernel=/k,numa=9", "numa '9'"), ("kernel=/k,mem=128M,numa=4", "need at least 256M"),
        ("kernel=/k,cgroup=v3", "v1 or v2"), ("kernel=/k,accel=xen", "auto, kvm or tcg"), ("kernel=host,mem=1G", "kernel=host runs on this machine"),
        ("kernel=/k,cpus=99999999999999999999", "must be an integer"),
        ("kernel=/k,append=console=ttyS1", "memlab sets itself"), ("kernel=/k,append=quiet panic=0", "'panic'"),
        ("kernel=/k,append=a\tb", "printable ASCII"), ("kernel=/k,append=\"panic=0\"", "without quotes"),
        ("kernel=/k,append=sysctl.kernel.panic=0", "memlab sets itself"), ("kernel=/k,append=a,mem=1G", "append must come last"),
        ("append=a,kernel=/k", "kernel=PATH is required"), ("kernel=/k,append=é", "printable ASCII"),
        ("kernel=/k,append=" + String(repeating: "x", count: 1025), "at most 1024"), ("kernel=host,append=quiet", "kernel=host runs on this machine"),
    ])
    func refusesBadSpecs(_ text: String, _ message: String) {
        #expect {
            _ = try GuestSpec.parse(text)
        } throws: { error in
            (error as? UsageError)?.message.contains(message) == true
        }
    }

    /// `append` takes the rest of the text, commas included (kernel parameters have them), and
    /// goes to the guest's command line after memlab's own; a scenario file's too.
    @Test func kernelParametersGoLastAndKeepTheirCommas() throws {
        let s = try GuestSpec.parse("kernel=/k,cpus=3,append= isolcpus=1,2 transparent_hugepage=never ")
        #expect(s.cpus == 3 && s.append == "isolcpus=1,2 transparent_hugepage=never")
        #expect(try GuestSpec.parse("kernel=/k").append.isEmpty)
        let f = try ScenarioFile.parse("[guest]\nkernel = \"/k\"\nmem = \"512M\"\nappend = \"isolcpus=0,1\"\n[[runs]]\nscenario = \"selftest\"")
        #expect(f.guests.first?.append == "isolcpus=0,1" && f.guests.first?.memoryMiB == 512)
        #expect(throws: UsageError.self) { try ScenarioFile.parse("[guest]\nkernel = \"/k\"\nappend = 3\n[[runs]]\nscenario = \"selftest\"") }
    }

    /// A boot is repeated only when its kernel panicked before any run began, once in a row.
    @Test func onlyAPanicBeforeAnyRunBootsAgain() {
        let p = "Kernel panic - not syncing: Fatal exception in interrupt"
        #expect(GuestRunner.bootsAgain(running: false, results: 0, panic: p, panickedInARow: 0))
        #expect(!GuestRunner.bootsAgain(running: false, results: 0, panic: p, panickedInARow: 1), "a second panic in a row fails")
        #expect(!GuestRunner.bootsAgain(running: true, results: 0, panic: p, panickedInARow: 0), "a panic during a run fails that run")
        #expect(!GuestRunner.bootsAgain(running: false, results: 1, panic: p, panickedInARow: 0), "a run that finished is never repeated")
        #expect(!GuestRunner.bootsAgain(running: false, results: 0, panic: nil, panickedInARow: 0), "a guest that did not boot without a panic fails")
    }

    /// The panic line as 6.12 printed it under TCG (captured 2026-12-03), and lines that are not one.
    @Test func aPanicLineIsFoundOnTheConsole() {
        #expect(GuestRunner.panicLine("[    2.369097] Kernel panic - not syncing: Fatal exception in interrupt") == "Kernel panic - not syncing: Fatal exception in interrupt")
        #expect(GuestRunner.panicLine("[    2.368536] Oops: int3: 0000 [#2] PREEMPT SMP NOPTI") == nil)
        #expect(GuestRunner.panicLine("[    5.358993] Shutting down cpus with NMI") == nil)
        #expect(GuestRunner.panicLine("Kernel panic - not syncing: " + String(repeating: "x", count: 500))?.count == 161)
    }

    /// The guest sees this machine's tree from its root, and an unpacked kernel's modules are
    /// found beside it: a relative kernel path is made absolute — against the current directory
    /// on the command line, against the file's directory in a scenario file. (A relative path
    /// once booted the kernel but found none of its modules: no ext4, no swap file.)
    @Test func aRelativeKernelPathBecomesAbsolute() throws {
        let cwd = FileManager.default.currentDirectoryPath
        #expect(try GuestSpec.parse("kernel=k/boot/vmlinuz-6.12").kernel == URL(fileURLWithPath: cwd + "/k/boot/vmlinuz-6.12").standardizedFileURL.path)
        #expect(try GuestSpec.parse("kernel=./a/../b").kernel == URL(fileURLWithPath: cwd + "/b").standardizedFileURL.path)
        #expect(try GuestSpec.parse("kernel=/boot/x").kernel == "/boot/x")
        let dir = TempDir()
        try "[guest]\nkernel = \"kernels/vmlinuz-x\"\n[[runs]]\nscenario = \"selftest\"\n".write(toFile: dir.file("s.toml"), atomically: true, encoding: .utf8)
        #expect(try ScenarioFile.load(path: dir.file("s.toml")).guests.first?.kernel == dir.file("kernels/vmlinuz-x"))
    }

    @Test func scenarioFileNamesItsGuests() throws {
        let f = try ScenarioFile.parse("""
            scenario = "selftest"
            variant = "ok"
            [guest]
            kernel = ["/boot/a", "host"]
            mem = "512M"
            numa = 2
            """)
        #expect(f.guests.count == 2)
        #expect(f.guests[0].kernel == "/boot/a" && f.guests[0].memoryMiB == 512 && f.guests[0].numaNodes == 2)
        #expect(f.guests[1].isHost)
        for bad in ["[guest]\nkernel = 3", "[guest]\nkernel = \"/k\"\nfoo = 1", "[guest]\nmem = \"1G\"", "[guest]\nkernel = \"/k\"\nnuma = 99"] {
            #expect(throws: UsageError.self) { _ = try ScenarioFile.parse("scenario = \"selftest\"\n" + bad) }
        }
        // [[runs]] takes a file-level guest too; a run's own table does not.
        #expect(try ScenarioFile.parse("[guest]\nkernel = \"/k\"\n[[runs]]\nscenario = \"selftest\"").guests.count == 1)
        #expect(throws: UsageError.self) { _ = try ScenarioFile.parse("[[runs]]\nscenario = \"selftest\"\n[runs.guest]\nkernel = \"/k\"") }
    }

    /// A guest's result file is untrusted: garbage, another run's result or numbers that are
    /// not numbers fail that run; none traps.
    @Test func hostileResultsFailTheRun() throws {
        let plan = try RunPlan.make(.init(targets: ["selftest:ok"]), registry: allScenarios)
        let r = try #require(plan.first)
        for data in [Data(), Data("{".utf8), Data("[1,2]".utf8), Data(repeating: 0xFF, count: 4096)] {
            let out = GuestRunner.decode(data, for: r)
            #expect(out.status == .failed && out.reason?.contains("not a memlab run result") == true)
        }
        var other = RunResult(scenario: "selftest", variant: "crash", params: r.params, placement: r.placement, status: .ok, reason: nil,
                              settings: SettingsRecord(), repetitions: 1, warmup: 0)
        #expect(GuestRunner.decode(try JSONEncoder().encode(other), for: r).reason?.contains("not this run") == true)
        other.variant = "ok"
        #expect(GuestRunner.decode(try JSONEncoder().encode(other), for: r).status == .ok)
        other.durationS = 1
        var bad = try JSONSerialization.jsonObject(with: try JSONEncoder().encode(other)) as! [String: Any]
        bad["repetitions"] = -5
        #expect(GuestRunner.decode(try JSONSerialization.data(withJSONObject: bad), for: r).reason?.contains("invalid") == true)
    }

    /// The console follower: whole lines, carriage returns dropped, long lines cut.
    @Test func consoleLinesAreBoundedText() throws {
        let dir = TempDir()
        let path = dir.file("console.log")
        let text = "memlab-guest: ready\r\n" + String(repeating: "x", count: 10_000) + "\n\u{1}bad\r\nmemlab-guest: progress 0 a b\r\npartial"
        try Data(text.utf8).write(to: URL(fileURLWithPath: path))
        var f = ConsoleFollower(path: path)
        let lines = f.newLines()
        #expect(lines.count == 4)
        #expect(lines[0] == "memlab-guest: ready")
        #expect(lines[1].count <= 4096 && lines[1].hasPrefix("xxxx"))
        #expect(lines[3] == "memlab-guest: progress 0 a b")
        #expect(ConsoleFollower.tail(path, count: 2).hasSuffix("memlab-guest: progress 0 a b | partial"))
    }
}

/// Two kernels side by side: the comparison's axis, its labels, timings across accelerators,
/// checks and runs one kernel could not do.
@Suite struct KernelComparison {
    func doc(kernel: String, tcg: Bool, runs: [RunResult]) -> ResultDocument {
        var h = ResultDocument.Host(kernel: kernel, arch: "x86_64", cpus: 2, memoryBytes: 1 << 30, numaNodes: 1, pageSize: 4096,
                                    virtualized: true, cpuModel: "x", features: .unknown)
        if tcg {
            h.guest = GuestRecord(accelerator: "tcg", kernelPath: "/boot/vmlinuz-\(kernel)", kernelRelease: kernel, memoryMiB: 1024, cpus: 2,
                                  numaNodes: 1, cgroup: "v2", bootS: 5, hypervisorKernel: "6.18", qemu: "QEMU 7.2")
        }
        return ResultDocument(tool: .init(name: "memlab", version: "t"), startedAt: "", host: h, runs: runs)
    }

    func run(_ variant: String, status: RunStatus = .ok, time: [Double], pages: [Double], agrees: Bool, reason: String? = nil) -> RunResult {
        var r = RunResult(scenario: "ksm", variant: variant, params: Params(["pages": .int(64)]), placement: Placement(), status: status,
                          reason: reason, settings: SettingsRecord(), repetitions: time.count, warmup: 0)
        if status == .ok {
            r.metrics = [Metric(name: "merge_time", unit: .s, better: .lower, samples: time, summary: Statistics.summarize(time)!),
                         Metric(name: "pages_sharing", unit: .pages, better: .none, samples: pages, summary: Statistics.summarize(pages)!)]
            r.checks = [CheckValue(name: "pages_sharing", repetition: 1, expected: 10, observed: agrees ? 10 : 3, tolerance: "0", agrees: agrees)]
        }
        return r
    }

    @Test func kernelIsTheAxis() throws {
        let host = doc(kernel: "6.18.44", tcg: false, runs: [run("merge", time: [0.07, 0.071, 0.072], pages: [10, 10, 10], agrees: true),
                                                          run("unmerge", status: .skipped, time: [], pages: [], agrees: true, reason: "needs X")])
        let guest = doc(kernel: "6.1.0", tcg: true, runs: [run("merge", time: [0.7, 0.71, 0.72], pages: [10, 10, 3], agrees: false)])
        let report = Comparison.compare(baseline: ("a.json", host), candidates: [("b.json", guest)])
        let f = try #require(report.comparisons.first)
        #expect(f.axis == "kernel" && f.baselineLabel == "6.18.44 (host)" && f.candidateLabel == "6.1.0 (guest, tcg)")
        let p = try #require(f.pairs.first)
        // Ten times slower under TCG is TCG's, not the kernel's: shown, not judged.
        #expect(p.metrics.first { $0.name == "merge_time" }?.verdict == .otherClock)
        #expect(p.metrics.first { $0.name == "pages_sharing" }?.verdict != .otherClock)
        #expect(p.checks == [.init(name: "pages_sharing", baseline: true, candidate: false)])
        #expect(f.unmatched.contains { $0.contains("ksm:unmerge on 6.18.44 (host): skipped (needs X)") })
        let text = Comparison.render(report, color: false)
        #expect(text.contains("axis:      kernel — 6.18.44 (host) → 6.1.0 (guest, tcg)"))
        #expect(text.contains("pages_sharing: agrees | DISAGREES"))
        // Same kernel, same clock: the usual baseline/candidate, timings judged.
        let same = Comparison.compare(baseline: ("a", host), candidates: [("b", host)]).comparisons[0]
        #expect(same.axis == nil && same.baselineLabel == "baseline")
        #expect(same.pairs[0].metrics.allSatisfy { $0.verdict != .otherClock })
        // The same kernel booted with other parameters: said, and in the label.
        var thpOff = guest
        thpOff.host.guest?.append = "transparent_hugepage=never"
        let params = Comparison.compare(baseline: ("a", guest), candidates: [("b", thpOff)]).comparisons[0]
        #expect(params.warnings.contains("different hosts: guest kernel parameters none vs transparent_hugepage=never"), "\(params.warnings)")
        #expect(Comparison.kernelLabel(thpOff.host) == "6.1.0 (guest, tcg, transparent_hugepage=never)")
        thpOff.host.guest?.panickedBoots = 1
        let page = HTMLReport.render([.init(name: "b.json", document: thpOff)])
        #expect(page.contains("<th>guest kernel parameters</th><td>transparent_hugepage=never</td>") && page.contains("<th>boots that panicked</th><td>1,"))
        // The report: one column a kernel.
        let html = HTMLReport.render([.init(name: "a.json", document: host), .init(name: "b.json", document: guest)])
        #expect(html.contains("kernels side by side") && html.contains("<th>6.1.0 (guest, tcg)</th>") && html.contains("DISAGREES"))
    }
}

extension KernelTests {
    /// Runs inside real guests of Debian's kernel (TCG here): what this machine cannot run
    /// (cgroup v2 memory, two NUMA nodes, soft-dirty) runs there with every check agreeing, the
    /// document records the guest as its host, and the machine reads as before.
    @Suite(.enabled(if: isRoot, "needs root: the guests borrow their kernel's knobs as root"),
           .enabled(if: GuestRunner.missing == nil, "\(GuestRunner.missing ?? "")"),
           .enabled(if: GuestImage.distributionKernel != nil, "no /boot/vmlinuz-*: apt-get install --no-install-recommends linux-image-amd64"))
    struct GuestRuns {
        static let repo = URL(fileURLWithPath: #filePath).deletingLastPathComponent().deletingLastPathComponent().deletingLastPathComponent().path

        @Test func pathsThisMachineCannotRunRunInAGuest() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let out = try Memlab.run(["run", "\(Self.repo)/scenarios/guest-paths.toml", "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 0, "\(out.why)")
            let doc = try loadJSON(dir.file("r.json"))
            let host = try #require(doc["host"] as? [String: Any])
            let guest = try #require(host["guest"] as? [String: Any])
            let release = try BzImage.release(of: GuestImage.distributionKernel!)
            #expect(host["kernel"] as? String == release, "the document's host is the guest")
            #expect(host["numa_nodes"] as? Int == 2 && guest["numa_nodes"] as? Int == 2)
            #expect(["kvm", "tcg"].contains(guest["accelerator"] as? String ?? ""))
            #expect(guest["hypervisor_kernel"] as? String == HostFacts.current().kernel)
            #expect((guest["boot_s"] as? Double ?? 0) > 0)
            let rs = runs(doc)
            #expect(rs.count == 12)
            for r in rs {
                #expect(r["status"] as? String == "ok", "\(r["scenario"] ?? ""):\(r["variant"] ?? ""): \(r["reason"] ?? "")")
                let checks = r["checks"] as? [[String: Any]] ?? []
                #expect(!checks.isEmpty && checks.allSatisfy { $0["agrees"] as? Bool == true }, "\(checks)")
                #expect((r["notes"] as? [String] ?? []).contains { $0.hasPrefix("ran inside a guest: Linux \(release)") })
            }
            // soft-dirty against uffd-wp, the per-node pool on node 1, OOM under cgroup v2.
            guard rs.count == 12 else { return }
            #expect((rs[0]["checks"] as? [[String: Any]] ?? []).contains { $0["name"] as? String == "step1_trackers_agree" })
            #expect(median(rs[1], "node1_pool_pages") == 8)
            #expect((rs[2]["notes"] as? [String] ?? []).contains { $0.contains("(v2)") && $0.contains("memory cgroup /sys/fs/cgroup/") })
            // netem on the guest's loopback; memory.reclaim and memory.zswap.max (cgroup v2).
            func hasCheck(_ r: [String: Any], _ name: String) -> Bool { (r["checks"] as? [[String: Any]] ?? []).contains { $0["name"] as? String == name } }
            #expect(hasCheck(rs[3], "netem_rtt"))
            #expect(hasCheck(rs[4], "reclaimed_bytes") && (median(rs[4], "reclaimed_bytes") ?? 0) >= Double(8 << 20) * 0.95)
            #expect(hasCheck(rs[5], "pool_under_cap"))
            // merge_across_nodes 0 then 1: pages_shared halves when KSM may merge across nodes.
            if let apart = median(rs[6], "pages_shared"), let across = median(rs[7], "pages_shared") {
                #expect(apart == 2 * across, "merge_across_nodes=0: \(apart), =1: \(across)")
            }
            // THP faults in fragmented memory: compaction in the fault under always only;
            // kswapd/kcompactd woken under defer; the rest fall back to 4K.
            for (r, mode) in zip(rs[8...], ["always", "defer", "madvise", "never"]) {
                #expect((r["params"] as? [String: Any])?["defrag"] as? String == mode)
                #expect(hasCheck(r, "fragmented") && hasCheck(r, "direct_compaction"))
                #expect(((median(r, "compact_stall") ?? -1) > 0) == (mode == "always"), "\(mode): compact_stall \(median(r, "compact_stall") ?? -1)")
                #expect(hasCheck(r, mode == "always" ? "stalls_accounted" : "fell_back"))
                #expect(hasCheck(r, "background_woken") == (mode == "defer"))
            }
            #expect(KnobSnapshot.take() == before)
            #expect(qemuProcesses().isEmpty, "no QEMU outlives its run")
            #expect(memlabLitter().isEmpty, "\(memlabLitter())")
        }

        /// The 6.12 kernel scripts/guest-kernel unpacks into .build/guest-kernels (newest).
        static var newerKernel: String? {
            let dir = "\(repo)/.build/guest-kernels"
            let found = ((try? FileManager.default.contentsOfDirectory(atPath: dir)) ?? []).filter { !$0.hasSuffix(".partial") }
                .map { "\(dir)/\($0)/boot/vmlinuz-\($0)" }.filter { FileManager.default.fileExists(atPath: $0) }
            return found.sorted { $0.compare($1, options: .numeric) == .orderedAscending }.last
        }

        /// DAMON reclaim and the zswap shrinker, which neither this kernel (no DAMON vaddr, a
        /// kdamond of its own) nor 6.1 can run, in a guest of the 6.12 kernel with its modules
        /// unpacked beside it (not under this machine's /lib/modules).
        @Test(.enabled(if: newerKernel != nil, "no 6.12 kernel in .build/guest-kernels: scripts/guest-kernel fetches it (scripts/deps does for the test job, where the Debian mirror answers)"))
        func aNewerKernelRunsDamonAndTheZswapShrinker() throws {
            let kernel = try #require(Self.newerKernel)
            let dir = TempDir()
            let before = KnobSnapshot.take()
            // This 6.12 kernel panics in boot under TCG now and then (an int3 oops as a static
            // key is patched; 1 of 36 boots, 2026-12-03): the runner boots it once more itself.
            let out = try Memlab.run(["run", "\(Self.repo)/scenarios/guest-newer-kernel.toml", "--guest", "kernel=\(kernel),mem=1G",
                                      "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 0, "\(out.why)")
            let doc = try loadJSON(dir.file("r.json"))
            let host = try #require(doc["host"] as? [String: Any])
            #expect((host["kernel"] as? String ?? "").hasPrefix("6.12."), "the document's host is the 6.12 guest")
            let rs = runs(doc)
            #expect(rs.map { "\($0["variant"] ?? "")" } == ["damon", "zswap-writeback", "zswap-writeback"])
            for r in rs {
                #expect(r["status"] as? String == "ok", "\(r["variant"] ?? ""): \(r["reason"] ?? "")")
                let checks = r["checks"] as? [[String: Any]] ?? []
                #expect(!checks.isEmpty && checks.allSatisfy { $0["agrees"] as? Bool == true }, "\(checks)")
            }
            guard rs.count == 3 else { return }
            // DAMOS paged the cold part out and kept the hot part; the shrinker wrote pool
            // entries back only when on.
            #expect((rs[0]["checks"] as? [[String: Any]] ?? []).contains { $0["name"] as? String == "cold_paged_out" })
            #expect((median(rs[1], "written_back_pages") ?? 0) > 0)
            #expect(median(rs[2], "written_back_pages") == 0)
            #expect(KnobSnapshot.take() == before)
            #expect(qemuProcesses().isEmpty, "no QEMU outlives its run")
            #expect(memlabLitter().isEmpty, "\(memlabLitter())")
        }

        /// The same KSM and THP runs on this kernel and on 6.1 in a guest: one document each;
        /// the checks both kernels make give the same verdicts; what 6.1 lacks (prctl merging,
        /// mTHP) is skipped there with the reason; compare puts the kernels side by side.
        @Test func twoKernelsSideBySide() throws {
            let dir = TempDir()
            let out = try Memlab.run(["run", "\(Self.repo)/scenarios/kernels-ksm-thp.toml", "--repeat", "1", "--results-dir", dir.path, "--quiet"], stateDir: dir.path)
            #expect(out.status == 0, "\(out.why)")
            let files = (try FileManager.default.contentsOfDirectory(atPath: dir.path)).filter { $0.hasSuffix(".json") }.sorted()
            let host = try #require(files.first { $0.hasSuffix("-host.json") }), guest = try #require(files.first { !$0.hasSuffix("-host.json") })
            let a = runs(try loadJSON(dir.file(host))), b = runs(try loadJSON(dir.file(guest)))
            #expect(a.count == 5 && b.count == 5)
            for (x, y) in zip(a, b) where x["status"] as? String == "ok" && y["status"] as? String == "ok" {
                func verdicts(_ r: [String: Any]) -> [String: Bool] {
                    Dictionary((r["checks"] as? [[String: Any]] ?? []).map { ($0["name"] as? String ?? "", $0["agrees"] as? Bool ?? false) }) { $0 && $1 }
                }
                let vx = verdicts(x), vy = verdicts(y)
                for (name, v) in vy { #expect(v && vx[name] == v, "\(name): host \(vx[name].map(String.init) ?? "-"), guest \(v)") }
            }
            #expect(a.map { $0["status"] as? String ?? "" } == ["ok", "ok", "ok", "ok", "ok"])
            #expect(b.map { $0["status"] as? String ?? "" } == ["ok", "skipped", "skipped", "ok", "skipped"])
            let cmp = try Memlab.run(["compare", dir.file(host), dir.file(guest)], stateDir: dir.path)
            #expect(cmp.status == 0 && cmp.stdout.contains("axis:      kernel") && cmp.stdout.contains("(guest, "), "\(cmp.stdout)")
            #expect(qemuProcesses().isEmpty)
        }

        /// A kernel file that is not a bzImage, a topology this machine cannot give: exit 2
        /// before anything starts.
        @Test func badGuestsAreRefusedBeforeAnythingRuns() throws {
            let dir = TempDir()
            let k = GuestImage.distributionKernel!
            for (spec, message) in [("kernel=/etc/passwd", "not a bzImage"), ("kernel=\(dir.path)", "not a regular file"),
                                    ("kernel=\(k),mem=256G", "does not fit"), ("kernel=\(k),accel=kvm,cpus=64", "KVM runs each vCPU")] {
                let out = try Memlab.run(["run", "selftest:ok", "--guest", spec, "--json", dir.file("r.json")], stateDir: dir.path)
                #expect(out.status == 2 && out.stderr.contains(message), "\(spec): \(out.stderr)")
            }
            let out = try Memlab.run(["run", "selftest:ok", "--guest", "kernel=\(k),numa=2", "--node", "2"], stateDir: dir.path)
            #expect(out.status == 2 && out.stderr.contains("has NUMA node(s) 0-1"), "\(out.stderr)")
            #expect(!FileManager.default.fileExists(atPath: dir.file("r.json")))
            #expect(qemuProcesses().isEmpty)
        }

        /// A kernel that panics in boot is booted once more (Debian's 6.12 does now and then
        /// under TCG); one that panics every time (here: told to run an init that is not
        /// there) fails after two boots, with the panic in the reason, and the document says
        /// how many boots panicked and with which kernel parameters.
        @Test func aGuestThatPanicsInBootIsBootedOnceMore() throws {
            let dir = TempDir()
            let out = try Memlab.run(["run", "selftest:ok", "--guest", "kernel=distro,mem=256M,accel=tcg,append=rdinit=/nonexistent",
                                      "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 1, "\(out.why)")
            let doc = try loadJSON(dir.file("r.json"))
            let guest = (doc["host"] as? [String: Any])?["guest"] as? [String: Any] ?? [:]
            #expect(guest["panicked_boots"] as? Int == 2 && guest["append"] as? String == "rdinit=/nonexistent", "\(guest)")
            let rs = runs(doc)
            let reason = rs.first?["reason"] as? String ?? ""
            #expect(rs.count == 1 && rs.first?["status"] as? String == "failed")
            #expect(reason.hasPrefix("the guest did not boot ('Kernel panic - not syncing: ") && reason.contains("in 2 boots in a row"), "\(reason)")
            #expect(qemuProcesses().isEmpty)
            #expect(memlabLitter().isEmpty, "\(memlabLitter())")
        }

        /// Kernel parameters reach the guest's kernel (its THP mode, as the guest's memlab read
        /// it), and two guests of one kernel write two documents, numbered. (768 MiB: below
        /// 512 MiB of RAM the kernel turns THP off whatever the command line says.)
        @Test func kernelParametersReachTheGuest() throws {
            let dir = TempDir()
            let out = try Memlab.run(["run", "selftest:ok", "--repeat", "1", "--guest", "kernel=distro,mem=768M,accel=tcg",
                                      "--guest", "kernel=distro,mem=768M,accel=tcg,append=transparent_hugepage=never",
                                      "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
            #expect(out.status == 0, "\(out.why)")
            let release = try #require(try? BzImage.release(of: GuestImage.distributionKernel!))
            let plain = try loadJSON(dir.file("r-\(release)-1.json")), never = try loadJSON(dir.file("r-\(release)-2.json"))
            func thp(_ d: [String: Any]) -> String { ((d["host"] as? [String: Any])?["features"] as? [String: Any])?["thp"] as? String ?? "" }
            func guest(_ d: [String: Any]) -> [String: Any] { (d["host"] as? [String: Any])?["guest"] as? [String: Any] ?? [:] }
            #expect(thp(plain) != "never" && thp(never) == "never", "\(thp(plain)) / \(thp(never))")
            #expect(guest(never)["append"] as? String == "transparent_hugepage=never" && guest(plain)["append"] == nil)
            #expect((runs(never).first?["notes"] as? [String] ?? []).contains { $0.contains("kernel parameters 'transparent_hugepage=never'") })
            #expect(qemuProcesses().isEmpty)
        }

        /// QEMU killed while a run is in its guest: that run fails with the console's last lines,
        /// the one before it stands, the one after it gets a fresh guest.
        @Test func aGuestKilledMidRunFailsThatRun() throws {
            let dir = TempDir()
            let before = KnobSnapshot.take()
            let (p, _, err) = try Memlab.start(["run", "selftest:ok", "selftest:hang", "selftest:ok", "--repeat", "1", "--set", "deadline_s=120",
                                                "--guest", "kernel=distro,accel=tcg,mem=512M", "--json", dir.file("r.json"), "--quiet"], stateDir: dir.path)
            // The guest's console says when the hanging run has started.
            var killed = false
            #expect(waitFor(240) {
                for q in qemuProcesses() {
                    guard let cmd = try? ProcFile.read("/proc/\(q)/cmdline"), cmd.contains("memlab-job"),
                          let serial = cmd.split(separator: "\0").first(where: { $0.hasPrefix("file:") }) else { continue }
                    if (ProcFile.readIfPresent(String(serial.dropFirst(5))) ?? "").contains("progress 1 selftest:hang") {
                        kill(q, SIGKILL)
                        killed = true
                    }
                }
                return killed
            })
            p.waitUntilExit()
            let stderr = String(decoding: err.fileHandleForReading.readDataToEndOfFile(), as: UTF8.self)
            #expect(p.terminationStatus == 1, "\(stderr)")
            let rs = runs(try loadJSON(dir.file("r.json")))
            #expect(rs.map { $0["status"] as? String ?? "" } == ["ok", "failed", "ok"])
            let reason = rs.count == 3 ? rs[1]["reason"] as? String ?? "" : ""
            #expect(reason.contains("the guest ended during selftest:hang repetition 1/1") && reason.contains("SIGKILL")
                    && reason.contains("console: ") && reason.contains("memlab-guest: progress 1"), "\(reason)")
            #expect(KnobSnapshot.take() == before)
            #expect(qemuProcesses().isEmpty)
            #expect(memlabLitter().isEmpty, "\(memlabLitter())")
        }
    }
}
