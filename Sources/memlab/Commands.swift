#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Foundation
import LabKit
import Migration
import LinuxMM
import Workloads
import Scenarios
import LazyRestore
import Workloads

struct List: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "List scenarios and their variants, one line each.")

    @Flag(help: "Print JSON: scenarios with variants and parameters (name, type, default, help).")
    var json = false

    func run() throws {
        if json {
            let list = allScenarios.scenarios.map { s -> [String: Any] in
                [
                    "id": s.id, "summary": s.summary, "requires_root": s.requiresRoot,
                    "variants": s.variants.map { ["name": $0.name, "summary": $0.summary] },
                    "parameters": s.parameters.map {
                        ["name": $0.name, "type": $0.typeDescription, "unit": $0.unit.rawValue, "default": $0.defaultValue.jsonValue, "help": $0.help]
                    },
                ]
            }
            let data = try JSONSerialization.data(withJSONObject: list, options: [.prettyPrinted, .sortedKeys])
            print(String(decoding: data, as: UTF8.self))
            return
        }
        for s in allScenarios.scenarios {
            for v in s.variants {
                print("\("\(s.id):\(v.name)".padding(toLength: 27, withPad: " ", startingAt: 0)) \(v.summary)")
            }
        }
        print("\nParameters: `memlab run NAME --help-params`, or `memlab list --json`.")
    }
}

struct Probe: ParsableCommand {
    static let configuration = CommandConfiguration(abstract: "Tell what this machine and kernel offer: host facts, every memory feature and the hypervisors (xen, kvm, qemu, lxc, libvirt), usable or not and why.")

    @Flag(help: "Print JSON.")
    var json = false

    func run() throws {
        let report = ProbeReport.gather()
        if json {
            let encoder = JSONEncoder()
            encoder.outputFormatting = [.prettyPrinted, .sortedKeys, .withoutEscapingSlashes]
            print(String(decoding: try encoder.encode(report), as: UTF8.self))
        } else {
            print(report.render(), terminator: "")
        }
    }
}

struct Settings: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Print every machine-wide memory setting memlab may borrow, and what a run may leave behind.",
        discussion: """
        One name=value a line: each knob memlab may borrow (KSM, THP and khugepaged, hugetlb pools, overcommit \
        and vm sysctls, zswap), then swap areas, KSM's shared pages, hugetlb pages in use, memlab's memory \
        cgroups, zram devices and network namespaces, temporary files and registered settings journals. \
        Taken before and after a run (or a test suite) and compared, it shows anything left changed. \
        Read only: unlike every other command, it does not restore a dead memlab's settings first, so the \
        picture is the machine as it is.
        """)

    func run() throws {
        for line in WatchedSettings.snapshot() { print(line) }
    }
}

struct Run: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run scenarios: NAME[:VARIANT] or a scenario file (FILE.toml).",
        discussion: """
        Each repetition runs in a child process with a deadline; settings the scenario borrows are restored \
        afterwards. Prints a table and writes a result document (JSON) to --json or into --results-dir.

        Examples:
          memlab run ksm
          memlab run ksm:cow --set pages=16384 --set duplicate_ratio=0.9 --repeat 5
          memlab run scenarios/ksm-merge.toml --json ksm.json
          memlab run ksm:merge --set pages_to_scan=250,1000,4000        (a sweep: one run per value)
          memlab run selftest:ok --set "size=1M..64M x4"                 (ranges: LO..HI xFACTOR, LO..HI +STEP)
        """
    )

    @Argument(help: "NAME[:VARIANT] (see `memlab list`) or a scenario file ending in .toml.")
    var targets: [String]

    @Option(name: .customLong("set"), help: ArgumentHelp("Set a parameter: NAME=VALUE (repeatable). A sweep: NAME=A,B,C or NAME=LO..HI xFACTOR or NAME=LO..HI +STEP.", valueName: "name=value"))
    var sets: [String] = []

    @Option(name: .customLong("repeat"), help: "Measured repetitions (default 3, or the file's `repeat`).")
    var repeats: Int?

    @Option(help: "Warm-up repetitions, run and discarded (default 0, or the file's `warmup`).")
    var warmup: Int?

    @Option(help: ArgumentHelp("Run the children on these CPUs, e.g. 0 or 0,1 or 0-1.", valueName: "list"))
    var cpus: String?

    @Option(help: "Run the children on this NUMA node and allocate from it.")
    var node: Int?

    @Option(help: ArgumentHelp("Write the result document here (default: RESULTS-DIR/TIME-NAME.json).", valueName: "file"))
    var json: String?

    @Option(help: ArgumentHelp("Also write the metrics as CSV.", valueName: "file"))
    var csv: String?

    @Option(help: ArgumentHelp("Directory for result documents.", valueName: "dir"))
    var resultsDir = "results"

    @Option(name: .customLong("guest"), help: ArgumentHelp("Run inside a QEMU guest: kernel=PATH[,mem=SIZE][,cpus=N][,numa=N][,cgroup=v1|v2][,accel=auto|kvm|tcg][,append=KERNEL PARAMS] (append last: the rest of the text is the guest kernel's parameters; repeatable: one document per guest; kernel=host is this machine).", valueName: "spec"))
    var guests: [String] = []

    @Flag(help: "Fail at once (exit 4) if another memlab holds the settings lock, instead of waiting.")
    var noWait = false

    @Flag(help: "No progress, no file names; the table only.")
    var quiet = false

    @Flag(help: "Print the parameters of the named scenarios and exit.")
    var helpParams = false

    func run() throws {
        if helpParams {
            for t in targets {
                let (s, _) = try allScenarios.lookup(t)
                print("\(s.id) parameters:")
                for p in s.parameters {
                    let unit = p.unit == .none || p.unit == .bytes ? "" : " (\(p.unit.rawValue))"
                    print("  \(p.name.padding(toLength: 20, withPad: " ", startingAt: 0)) \(p.typeDescription)\(unit), default \(p.defaultValue)\n      \(p.help)")
                }
            }
            return
        }
        let plan = try self.plan()
        if let json { try Session.checkWritable(json, what: "--json") }
        if let csv { try Session.checkWritable(csv, what: "--csv") }
        if json == nil { try Session.checkWritable(resultsDir + "/result.json", what: "--results-dir") }
        let label = targets.count == 1 ? ((targets[0] as NSString).lastPathComponent as String).replacingOccurrences(of: ".toml", with: "") : "run"
        let status = try Session.execute(plan.requests, options: .init(
            jsonPath: json, csvPath: csv, resultsDirectory: resultsDir, label: label, noWait: noWait, quiet: quiet), guests: plan.guests)
        if status != 0 { throw ExitCode(status) }
    }

    /// Resolves every target before anything runs: bad input changes nothing.
    func plan() throws -> RunPlan.Plan {
        try RunPlan.makePlan(.init(targets: targets, sets: sets, repeats: repeats, warmup: warmup, cpus: cpus, node: node, guests: guests),
                             registry: allScenarios)
    }
}

struct Suite: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Run a built-in suite: every module this kernel supports, small sizes, a few repetitions; then RESULTS-DIR/report.html.")

    @Argument(help: "Suite name: quick.")
    var name = "quick"

    @Option(help: ArgumentHelp("Directory for the result document.", valueName: "dir"))
    var resultsDir = "results"

    @Flag(help: "Fail at once (exit 4) if another memlab holds the settings lock.")
    var noWait = false

    @Flag(help: "No progress output.")
    var quiet = false

    func run() throws {
        guard name == "quick" else { throw UsageError("unknown suite '\(name)'; suites: quick") }
        try Session.checkWritable(resultsDir + "/report.html", what: "--results-dir")
        var requests: [RunRequest] = []
        var group = 0
        for (target, sets, reps) in QuickSuite.entries {
            let (scenario, variant) = try allScenarios.lookup(target)
            // A value may be a sweep ("2048,8192"): one run per point.
            let split = try Sweep.split(sets.keys.sorted().map { ($0, sets[$0]!) }, for: scenario)
            if !split.axes.isEmpty { group += 1 }
            for (params, sweep) in try Sweep.expand(scenario, variant: variant, fixed: split.fixed, axes: split.axes, group: group) {
                var r = RunRequest(scenario: scenario, variant: variant, params: params, repetitions: reps, warmup: 0)
                r.sweep = sweep
                requests.append(r)
            }
        }
        let jsonPath = Session.defaultResultPath(resultsDir, label: "quick")
        let status = try Session.execute(requests, options: .init(
            jsonPath: jsonPath, csvPath: nil, resultsDirectory: resultsDir, label: "quick", noWait: noWait, quiet: quiet))
        // The report beside the results: charts of what this suite just measured.
        if status != ExitStatus.busy, let input = try? ResultFiles.loadOne(jsonPath) {
            let reportPath = (resultsDir as NSString).appendingPathComponent("report.html")
            try Session.write(Data(HTMLReport.render([input]).utf8), to: reportPath, what: "the report")
            if !quiet { print("report: \(reportPath)") }
        }
        // A module this kernel lacks is skipped, not a failure of the suite.
        if status == ExitStatus.failed || status == ExitStatus.busy { throw ExitCode(status) }
    }
}

/// The default quick suite: every variant of every module (but the runner's failure drills),
/// at small sizes, so it runs in well under a minute on 2 CPUs — and, since `scripts/quick`
/// and CI run it with the release binary, every variant is exercised as users run it. A value
/// may be a sweep (see `Sweep`): the KSM merge runs at two sizes, so the report has a curve.
enum QuickSuite {
    static let entries: [(String, [String: String], Int)] = [
        ("ksm:merge", ["pages": "2048,8192"], 3),
        ("ksm:cow", ["pages": "8192"], 3),
        ("ksm:unmerge", ["pages": "8192"], 3),
        // Issue 15's KSM mechanisms: smart scan off and on (the pair is the comparison), the
        // advisor watched for 4 s, a THP-backed region, chains; numa-merge is skipped with its
        // reason on one node.
        ("ksm:smart-scan", ["pages": "8192", "smart_scan": "false,true"], 2),
        ("ksm:advisor", ["pages": "8192", "duration_s": "4"], 1),
        ("ksm:thp", ["pages": "8192"], 2),
        ("ksm:numa-merge", ["pages": "8192"], 1),
        ("ksm:chains", ["pages": "8192", "max_page_sharing": "32"], 2),
        ("hugepages:fault", ["kind": "4k", "size": "32M"], 3),
        ("hugepages:fault", ["kind": "thp", "size": "32M"], 3),
        ("hugepages:fault", ["kind": "hugetlb-2m", "size": "32M"], 3),
        ("hugepages:tlb", ["kind": "4k", "max_working_set": "64M", "accesses": "500000"], 3),
        ("hugepages:tlb", ["kind": "thp", "max_working_set": "64M", "accesses": "500000"], 3),
        ("hugepages:collapse", ["size": "16M"], 3),
        ("hugepages:bloat", ["size": "16M"], 1),
        ("hugepages:split", ["size": "16M"], 3),
        ("hugepages:hugetlb-reserve", [:], 1),
        // The underused-THP shrinker: on (max_ptes_none below 511) it splits every THP.
        ("hugepages:shrink-underused", ["size": "16M", "max_ptes_none": "409"], 2),
        // shmem THP: the default mode (advise) with and without MADV_HUGEPAGE.
        ("hugepages:shmem", ["size": "16M", "madvise": "false,true"], 2),
        ("hugepages:shmem", ["size": "16M", "tmpfs_huge": "always", "shmem_enabled": "never"], 1),
        // khugepaged's max_ptes_shared: just under and just over the threshold.
        ("hugepages:collapse-shared", ["size": "8M", "shared_per_huge": "256,257", "max_ptes_shared": "256"], 1),
        ("hugepages:collapse-swap", ["size": "8M", "swapped_per_huge": "64,65", "max_ptes_swap": "64"], 1),
        // THP in fragmented memory: it fills the node's free memory first, so a machine with
        // more than max_fill (2G) free skips it with the reason (the tests run it in a guest).
        ("hugepages:defrag", ["size": "16M", "defrag": "always"], 1),
        ("overcommit:commit", ["mode": "0", "row_max": "16"], 1),
        ("overcommit:oom", ["limit": "32M"], 2),
        ("tmem:zswap", ["pages": "4096", "swap_size": "64M"], 2),
        ("tmem:density", ["mechanism": "ksm", "guests": "4", "guest_size": "16M", "limit": "48M", "duration_s": "1"], 1),
        // Proactive reclaim (issue 15): the cgroup v2 and DAMON variants are skipped with the
        // reason where the kernel or the cgroup hierarchy lacks them.
        ("reclaim:damon", ["hot_pages": "1024", "cold_pages": "4096", "swap_size": "64M", "baseline_s": "1", "duration_s": "3", "min_age_s": "1"], 1),
        ("reclaim:zswap-writeback", ["pages": "4096", "swap_size": "64M"], 1),
        ("reclaim:memory-reclaim", ["pages": "4096", "swap_size": "64M", "reclaim_bytes": "8M"], 2),
        ("reclaim:zswap-max", ["pages": "4096", "swap_size": "64M", "zswap_max": "4M"], 1),
        ("lazy-restore:restore", ["size": "16M", "accesses": "512", "rtt_ms": "0.5", "policy": "on-demand"], 1),
        ("lazy-restore:restore", ["size": "16M", "accesses": "512", "rtt_ms": "0.5", "policy": "background-push"], 1),
        ("lazy-restore:floors", [:], 1),
        ("migration:precopy", ["size": "16M", "dirty_rate": "2000"], 3),
        ("migration:hybrid", ["size": "16M", "dirty_rate": "2000"], 3),
        ("migration:postcopy", ["size": "16M", "dirty_rate": "2000"], 3),
        ("migration:dirty-scan", ["size": "16M"], 1),
        ("selftest:ok", ["size": "16M"], 1),
        // Real guests (skipped with the package to install where QEMU is missing): KSM across
        // two guests and a migration held against the model, about 30 s under TCG.
        ("vm:ksm", ["memory_mib": "160", "fill_mib": "8", "guests": "2"], 1),
        ("vm:migrate", ["memory_mib": "160", "fill_mib": "16", "dirty_rate": "1000", "timeout_s": "60"], 1),
    ]

    /// Variants left out on purpose: the runner's failure drills, which fail by design (the
    /// isolation tests run each and check the failure is reported as such).
    /// And the guest variants beyond two: each boots a guest (seconds under TCG), and the
    /// test suite runs every one of them.
    static let excluded: Set<String> = ["selftest:crash", "selftest:sigbus", "selftest:oom", "selftest:hang",
                                        "vm:density", "vm:backing", "vm:balloon", "vm:pinning"]
}

struct Restore: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Give back machine-wide settings left changed by a memlab that died (from its journal).",
        discussion: """
        Looks at the journal in $MEMLAB_STATE_DIR and at every journal registered in \(SettingsGuard.registryDirectory) \
        (wherever the dead run's state directory was). Exit status: 0 nothing left to restore, or all restored; \
        1 something could not be restored (each failure is printed with its reason; the journal is kept); \
        3 not root.
        """)

    func run() throws {
        let g = SettingsGuard()
        guard System.isRoot else {
            writeStderr("memlab: restore needs root (it writes /sys and /proc/sys settings)\n")
            throw ExitCode(ExitStatus.skipped)
        }
        do { try g.acquireLock(wait: true, say: { writeStderr($0 + "\n") }) } catch {
            writeStderr("memlab: \(error)\n")
            throw ExitCode(ExitStatus.failed)
        }
        defer { g.releaseLock() }
        let found = g.recoverStale()
        var failed = false
        if found.isEmpty { print("nothing to restore: no settings journal at \(g.journalPath), none registered in \(SettingsGuard.registryDirectory)") }
        for r in found {
            switch r.outcome {
            case .nothing: break
            case .ownerAlive(let j):
                print("\(r.journalPath): belongs to pid \(j.ownerPID) (\(j.command)), which is still running; it will restore its own settings")
            case .unreadable(let why):
                writeStderr("memlab: could NOT restore: \(why)\n")
                failed = true
            case .restored(let j, let report):
                print("restored the settings of pid \(j.ownerPID) (\(j.command)) from \(r.journalPath):")
                for line in report.restoredLines { print("  \(line)") }
                if !report.restored {
                    writeStderr("memlab: could NOT restore (the journal stays at \(r.journalPath)):\n")
                    for f in report.failures { writeStderr("  \(f)\n") }
                    failed = true
                }
            }
        }
        if failed { throw ExitCode(ExitStatus.failed) }
    }
}

struct BenchCommand: ParsableCommand {
    static let configuration = CommandConfiguration(
        commandName: "bench",
        abstract: "Compare memlab's own hot loops (Swift) with the same loops in C, in one run.",
        discussion: "Prints ns per unit for each and the Swift/C ratio (median of alternating rounds). The target is a ratio within 1.10: the lab must not distort what it measures.")

    @Option(help: "Region size in MiB.")
    var sizeMB = 64

    @Option(help: "Alternating rounds per loop (median reported).")
    var rounds = 7

    func run() throws {
        defer { RunDirectory.removeOwn() }
        guard (8...4096).contains(sizeMB), (1...101).contains(rounds) else { throw UsageError("--size-mb must be 8...4096 and --rounds 1...101") }
        print("memlab bench: Swift loops vs C reference kernels (median of \(rounds) alternating rounds; memory pre-warmed)")
        let rows = try Bench.run(sizeMB: sizeMB, rounds: rounds)
        print("loop".padding(toLength: 34, withPad: " ", startingAt: 0) + "       Swift           C   Swift/C")
        var worst = 0.0
        for r in rows {
            worst = max(worst, r.ratio)
            print(r.name.padding(toLength: 34, withPad: " ", startingAt: 0)
                  + String(format: "%9.2f %@ %9.2f %@ %8.3f", r.swiftNS, r.unit, r.cNS, r.unit, r.ratio).replacingOccurrences(of: "%@", with: ""))
        }
        let counter = try Bench.counterRead()
        print(String(format: "sampler read (pread, fixed buffer)  %.0f ns vs open+read+parse %.0f ns (%.1fx)", counter.pread, counter.reopen, counter.reopen / counter.pread))
        print(worst <= 1.10 ? "Swift within 10% of C on every loop" : String(format: "Swift/C ratio %.2f exceeds 1.10 on at least one loop", worst))
        encodingSection()
        multifdSection()
        faultSection()
    }

    /// Migration's XBZRLE encoder against the C reference (issue 14's targets: at least 1 GB/s
    /// of input, within 1.2× of C).
    func encodingSection() {
        print("")
        print("migration encoding: XBZRLE encoder (Swift) vs memlab_ref_xbzrle_encode (C), re-dirtied 4 KiB pages")
        for words in [8, 64] {
            do {
                let r = try EncodingBench.xbzrle(changedWords: words, rounds: rounds)
                let gbs = 4096 / r.swiftNS
                print(r.name.padding(toLength: 34, withPad: " ", startingAt: 0)
                      + String(format: "%9.1f ns %9.1f ns %8.3f   %.2f GB/s of input (target ≥ 1 GB/s, ≤ 1.2× C)%@", r.swiftNS, r.cNS, r.ratio, gbs,
                               gbs >= 1 && r.ratio <= 1.2 ? "" : "  MISSED"))
            } catch { print("encoding section skipped: \(error)"); return }
        }
    }

    /// Multifd over loopback (issue 14's target: N=4 at least 1.5× N=1 in pages/s).
    func multifdSection() {
        print("")
        print("multifd: an idle pre-copy over loopback TCP to a destination thread, pages/s (median of \(rounds) alternating rounds)")
        let size = min(sizeMB, 256) << 20
        do {
            let image = try AnonymousMapping(length: size)
            for (label, enc, fill) in [("raw pages", EncodingConfig(), 0.0), ("zstd 3, pages half zero words", EncodingConfig(zstdLevel: 3), 0.5)] {
                fillImage(image.base, length: size, seed: 7, zeroRatio: 0, compressibility: fill)
                var times: [Int: [Double]] = [1: [], 4: []]
                for r in 0..<rounds {
                    for n in (r % 2 == 0 ? [1, 4] : [4, 1]) { times[n]!.append(try MultifdBench.migrate(image: image, channels: n, encoding: enc)) }
                }
                let rate1 = Double(size / 4096) / Bench.median(times[1]!), rate4 = Double(size / 4096) / Bench.median(times[4]!)
                print(label.padding(toLength: 34, withPad: " ", startingAt: 0)
                      + String(format: "N=1 %9.0f pages/s  N=4 %9.0f pages/s  %.2fx (target ≥ 1.5x)%@", rate1, rate4, rate4 / rate1, rate4 / rate1 >= 1.5 ? "" : "  MISSED"))
            }
        } catch { print("multifd section skipped: \(error)") }
    }

    /// Fault handling: memlab's fault engine against the C reference handler, same wait mode.
    func faultSection() {
        print("")
        print("fault handling: memlab's engine vs memlab_ref_fault_handler (C), same wait mode, same workload (median of \(rounds) alternating rounds)")
        let rows: [Bench.Row]
        do { rows = try Bench.faultRows(rounds: rounds, sizeMB: sizeMB) } catch { print("fault section skipped: \(error)"); return }
        if rows.isEmpty { print("fault section skipped: userfaultfd not usable for kernel faults here (root, or vm.unprivileged_userfaultfd=1)"); return }
        print("loop".padding(toLength: 34, withPad: " ", startingAt: 0) + "      memlab           C  memlab/C")
        var worst = 0.0
        for r in rows {
            print(r.name.padding(toLength: 34, withPad: " ", startingAt: 0)
                  + String(format: "%9.0f %@ %9.0f %@ %8.3f", r.swiftNS, r.unit, r.cNS, r.unit, r.ratio).replacingOccurrences(of: "%@", with: ""))
            if r.name.hasPrefix("fault round trip") { worst = max(worst, r.ratio) }
        }
        print(worst <= 1.10 ? "fault round trip: memlab within 1.10x of C in every wait mode" : String(format: "fault round trip: memlab/C %.2f exceeds the 1.10 target in at least one wait mode", worst))
        if let bulk = rows.last {
            let gbs = 4096 / bulk.swiftNS
            print(String(format: "bulk install: %.2f GB/s through the engine, %.2fx the raw 2M ioctls (%.2f GB/s, this machine's ceiling now); target >= 4 GB/s: %@",
                         gbs, bulk.cNS / bulk.swiftNS, 4096 / bulk.cNS, gbs >= 4 ? "met" : "not met"))
        }
        let sng = Bench.stressNG()
        if let rate = sng.faultsPerSecond {
            // Measured rates (faults resolved per second of the workload), one handler thread,
            // each against stress-ng in the same placement: any CPU, or all on one CPU.
            let ours = Bench.memlabFaultRates()
            var line = String(format: "stress-ng --userfaultfd (poll), any CPU: %.0f faults/s; memlab, one handler thread:", rate)
            for (wait, r) in ours where !wait.contains("one CPU") { line += String(format: " %@ %.0f (%.1fx)", wait, r, r / rate) }
            print(line)
            let best = ours.filter { !$0.wait.contains("one CPU") }.map(\.faultsPerSecond).max() ?? 0
            if let pinnedRate = Bench.stressNG(oneCPU: true).faultsPerSecond, let pinned = ours.first(where: { $0.wait.contains("one CPU") }) {
                print(String(format: "stress-ng on one CPU (--taskset): %.0f faults/s; memlab blocking on one CPU %.0f (%.1fx)",
                             pinnedRate, pinned.faultsPerSecond, pinned.faultsPerSecond / pinnedRate))
            }
            print(String(format: "fault rate, any CPU: memlab's best %.1fx stress-ng's; target >= 3x: %@", best / rate, best >= 3 * rate ? "met" : "not met"))
        } else {
            print("stress-ng row skipped: \(sng.note)")
        }
    }
}
