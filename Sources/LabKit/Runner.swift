#if canImport(Glibc)
import Glibc
#endif
import Foundation
import LinuxMM

/// One run to execute: a scenario variant, its resolved parameters, repetitions, placement.
public struct RunRequest: Sendable {
    public let scenario: any Scenario
    public let variant: String
    public let params: Params
    public let repetitions: Int
    public let warmup: Int
    public let placement: Placement
    /// Where this run sits in a sweep (recorded in the result), if it is part of one.
    public var sweep: SweepInfo?

    public init(scenario: any Scenario, variant: String, params: Params, repetitions: Int, warmup: Int, placement: Placement = Placement()) {
        self.scenario = scenario
        self.variant = variant
        self.params = params
        self.repetitions = repetitions
        self.warmup = warmup
        self.placement = placement
    }
}

/// What the parent tells a child: which repetition of what, where to run, which cgroup.
public struct ChildSpec: Codable, Sendable {
    public var scenario: String
    public var variant: String
    public var params: Params
    public var repetition: Int
    public var warmup: Bool
    public var placement: Placement
    public var cgroupPath: String?
    public var cgroupVersion: Int?
    /// The runner's pid: a child whose parent is already gone when it starts (the runner
    /// was killed between spawn and PR_SET_PDEATHSIG) sees another parent and exits.
    public var runnerPID: Int32?
    /// The runner's run-directory owner ("PID-START"): the child's files go under the
    /// runner's directories, removed with them.
    public var runOwner: String?
}

/// Runs scenarios: borrows their settings through the guard, runs each repetition in a child
/// process with a deadline, turns crashes, OOM kills and hangs into `failed` with a reason,
/// and summarises the samples. The runner itself never touches the scenario's memory.
public final class Runner {
    public let settingsGuard: SettingsGuard
    public let registry: Registry
    public let progress: (String) -> Void
    private let workDirectory: String

    public init(settingsGuard: SettingsGuard, registry: Registry, progress: @escaping (String) -> Void = { _ in }) throws {
        self.settingsGuard = settingsGuard
        self.registry = registry
        self.progress = progress
        self.workDirectory = try RunDirectory.make()
    }

    deinit { RunDirectory.removeOwn() }

    public func execute(_ request: RunRequest) -> RunResult {
        // memlab is stopping (a signal): start nothing new.
        SignalCleanup.shared.checkpoint()
        let started = Clock.nanoseconds()
        var result = RunResult(scenario: request.scenario.id, variant: request.variant, params: request.params,
                               placement: request.placement, status: .ok, reason: nil,
                               settings: SettingsRecord(), repetitions: 0, warmup: request.warmup)
        result.sweep = request.sweep
        result.paramUnits = request.scenario.parameterUnits
        run(request, into: &result)
        // Give back whatever was borrowed, whatever happened above, and record that it was.
        let report = settingsGuard.restoreAll()
        result.settings = SettingsRecord(changed: report.changed, restored: report.restored)
        if !report.restored {
            result.notes.append("settings NOT restored: " + report.failures.joined(separator: "; "))
        }
        result.durationS = Clock.seconds(since: started)
        return result
    }

    private func run(_ request: RunRequest, into result: inout RunResult) {
        let s = request.scenario

        // A request `resolve` did not make (a variant or a parameter the scenario does not
        // declare, a value it does not accept) fails here, before anything is borrowed.
        do throws(UsageError) { try s.check(variant: request.variant, params: request.params) } catch {
            result.status = .failed
            result.reason = error.message
            return
        }
        if s.requiresRoot && !System.isRoot {
            result.status = .skipped
            result.reason = "needs root: this scenario borrows machine-wide settings under /sys and /proc/sys; run memlab as root (e.g. sudo memlab run \(s.id):\(request.variant))"
            return
        }
        if case .unusable(let why) = s.probe(variant: request.variant, params: request.params) {
            result.status = .skipped
            result.reason = why
            return
        }

        // Borrow the settings for the whole run; give them back whatever happens below.
        var setupFailure: String?
        for setting in s.settings(variant: request.variant, params: request.params) {
            do { try settingsGuard.set(setting.knob, to: setting.value) } catch {
                // A capacity the kernel could not give in full (a hugetlb pool short of free
                // memory): the machine's state today, not a failure of the run.
                if setting.isCapacity, case .readBack = error {
                    result.status = .skipped
                    result.reason = "\(setting.knob.path): \(error.shortfall ?? error.description); free memory or ask for less"
                    return
                }
                setupFailure = "could not set \(setting.knob.path) to \(setting.value): \(error)"
                break
            }
        }
        if let setupFailure {
            result.status = .failed
            result.reason = setupFailure
            return
        }
        do {
            try s.prepare(variant: request.variant, params: request.params, settingsGuard: settingsGuard)
        } catch let e as ScenarioError {
            switch e {
            case .skipped(let why): result.status = .skipped; result.reason = why
            case .failed(let why): result.status = .failed; result.reason = "preparing the run: \(why)"
            }
            return
        } catch {
            result.status = .failed
            result.reason = "preparing the run: \(error)"
            return
        }
        let made = settingsGuard.createdResources
        if !(made.swapAreas.isEmpty && made.files.isEmpty && made.zram.isEmpty) {
            var what: [String] = made.swapAreas.map { "swap area \($0)" }
            what += made.files.filter { !made.swapAreas.contains($0) }.map { "file \($0)" }
            what += made.zram.map { "zram\($0)" }
            result.notes.append("created for this run and removed afterwards: " + what.joined(separator: ", "))
        }

        var outputs: [RepetitionOutput] = []
        let total = request.warmup + request.repetitions
        for i in 0..<total {
            let warm = i < request.warmup
            let label = warm ? "warm-up \(i + 1)/\(request.warmup)" : "repetition \(i - request.warmup + 1)/\(request.repetitions)"
            progress("\(s.id):\(request.variant) \(label)")
            var out = runChild(request, index: i, warmup: warm)
            if out.status == .skipped {
                result.status = .skipped
                result.reason = out.reason
                return
            }
            if out.status == .failed {
                result.status = .failed
                result.reason = "\(label): \(out.reason ?? "failed")"
                result.notes.append(contentsOf: out.notes)
                break
            }
            if !warm {
                for k in out.checks.indices { out.checks[k].repetition = outputs.count + 1 }
                for k in out.distributions.indices { out.distributions[k].repetition = outputs.count + 1 }
                outputs.append(out)
            }
        }
        result.repetitions = outputs.count
        result.metrics = Runner.aggregate(outputs, notes: &result.notes)
        result.timeseries = (outputs.first?.timeseries ?? []).map { $0.finite() }
        result.distributions = outputs.flatMap(\.distributions).filter { $0.values.allSatisfy(\.isFinite) }
        result.checks = outputs.flatMap(\.checks).filter { $0.expected.isFinite && $0.observed.isFinite }
        for note in outputs.flatMap(\.notes) where !result.notes.contains(note) { result.notes.append(note) }
        let disagreements = Set(result.checks.filter { !$0.agrees }.map(\.name))
        if !disagreements.isEmpty {
            result.notes.append("the kernel's figures disagree with the expected ones for: \(disagreements.sorted().joined(separator: ", ")) (see checks)")
        }
        return
    }

    /// One metric per name, samples in repetition order. A value that is not a finite number
    /// (a rate over a zero interval) is left out, and said so in `notes`: a document holds
    /// only numbers.
    static func aggregate(_ outputs: [RepetitionOutput], notes: inout [String]) -> [Metric] {
        var order: [String] = []
        var byName: [String: (first: MetricValue, samples: [Double])] = [:]
        for (i, o) in outputs.enumerated() {
            for m in o.metrics {
                guard m.value.isFinite else {
                    notes.append("\(m.name) of repetition \(i + 1) was \(m.value), not a number; left out")
                    continue
                }
                if byName[m.name] == nil { order.append(m.name); byName[m.name] = (m, []) }
                byName[m.name]!.samples.append(m.value)
            }
        }
        return order.compactMap { name in
            let (m, samples) = byName[name]!
            guard let summary = Statistics.summarize(samples) else { return nil }
            return Metric(name: name, unit: m.unit, better: m.better, samples: samples, summary: summary,
                          distribution: m.distribution, percentile: m.percentile)
        }
    }

    private func runChild(_ request: RunRequest, index: Int, warmup: Bool) -> RepetitionOutput {
        var failed = RepetitionOutput()
        failed.status = .failed
        let s = request.scenario

        var cgroup: MemoryCgroup?
        var limit: Int?
        if let l = s.memoryLimit(variant: request.variant, params: request.params) {
            guard let cg = MemoryCgroup.location(name: "memlab-\(getpid())-\(index)") else {
                var skipped = RepetitionOutput()
                skipped.status = .skipped
                skipped.reason = "needs a memory cgroup controller (cgroup v1 memory or v2 with +memory); none is mounted"
                return skipped
            }
            do {
                // v2: memory.max exists in the child only when the parent delegates memory.
                if let control = try cg.parentSubtreeControlNeedingMemory() {
                    try settingsGuard.enableController("memory", subtreeControl: control)
                }
                try settingsGuard.createDirectory(cg.path)
                try cg.setLimit(bytes: l, capSwap: !s.memoryLimitAllowsSwap(variant: request.variant, params: request.params))
            } catch {
                try? settingsGuard.removeDirectory(cg.path)
                failed.reason = "could not create memory cgroup \(cg.path): \(error)"
                return failed
            }
            cgroup = cg
            limit = l
        }
        defer { if let cg = cgroup { try? settingsGuard.removeDirectory(cg.path) } }

        let spec = ChildSpec(scenario: s.id, variant: request.variant, params: request.params,
                             repetition: index, warmup: warmup, placement: request.placement,
                             cgroupPath: cgroup?.path, cgroupVersion: cgroup?.version, runnerPID: getpid(),
                             runOwner: RunDirectory.owner)
        let specPath = "\(workDirectory)/spec-\(index).json"
        let outPath = "\(workDirectory)/out-\(index).json"
        let logPath = "\(workDirectory)/log-\(index).txt"
        unlink(outPath)
        do {
            try JSONEncoder().encode(spec).write(to: URL(fileURLWithPath: specPath))
        } catch {
            failed.reason = "cannot write child spec \(specPath): \(error)"
            return failed
        }

        let oomBefore = (try? VMStat.current())?["oom_kill"] ?? 0
        let deadline = s.deadline(variant: request.variant, params: request.params)
        let pid: pid_t
        SignalCleanup.shared.checkpoint()
        do {
            pid = try ChildProcess.spawn(ChildProcess.selfExecutable, ChildMain.arguments(specPath: specPath, outPath: outPath), outputPath: logPath)
        } catch {
            failed.reason = "cannot start the child process: \(error)"
            return failed
        }
        SignalCleanup.shared.setChild(pid)
        settingsGuard.recordProcess(pid)
        // Forgotten while still a zombie: until it is reaped its pid cannot be reused, so
        // the signal handler never kills some other process by that number.
        let exit = ChildProcess.wait(pid, deadline: deadline) { SignalCleanup.shared.setChild(0) }
        settingsGuard.forgetProcess(pid)

        let log = ProcFile.readIfPresent(logPath) ?? ""
        // The runtime's one-line reason ("Fatal error: Index out of range") if there is one,
        // else the last line the child printed.
        let lines = log.split(separator: "\n").map { String($0).trimmingCharacters(in: .whitespaces) }
        let lastLine = lines.first { $0.contains("Fatal error") } ?? lines.last
        let tail = lastLine.map { ": \($0)" } ?? ""
        switch exit {
        case .exited(0):
            guard let data = FileManager.default.contents(atPath: outPath),
                  let out = try? JSONDecoder().decode(RepetitionOutput.self, from: data) else {
                failed.reason = "the child exited without writing its result\(tail)"
                return failed
            }
            return out
        case .exited(let code):
            failed.reason = "the child exited with status \(code)\(tail)"
        case .signaled(let sig):
            let oomAfter = (try? VMStat.current())?["oom_kill"] ?? 0
            let cgroupKills = cgroup?.oomKills() ?? 0
            if sig == SIGKILL && (cgroupKills > 0 || oomAfter > oomBefore) {
                var what = "killed by the OOM killer"
                if let cg = cgroup, let l = limit {
                    what += " in memory cgroup \(cg.path) (limit \(l) bytes"
                    if let peak = cg.peakUsage() { what += ", peak usage \(peak) bytes" }
                    what += ")"
                }
                failed.reason = what
            } else {
                failed.reason = "killed by \(ChildProcess.signalName(sig))\(tail)"
            }
        case .timedOut(let t):
            failed.reason = "timed out: still running after \(formatNumber(t)) s (deadline \(formatNumber(deadline)) s); killed"
        }
        return failed
    }
}

/// The child side of a repetition: `memlab _child --spec=FILE --out=FILE` (the memlab
/// target's hidden `_child` command calls `run`).
public enum ChildMain {
    /// The command line after the executable, in the `=` form (no path is taken for an option).
    public static func arguments(specPath: String, outPath: String) -> [String] {
        ["_child", "--spec=\(specPath)", "--out=\(outPath)"]
    }

    public static func run(registry: Registry, specPath: String, outPath: String) -> Int32 {
        // Die with the runner: a SIGKILLed runner must not leave a child holding memory.
        let parent = getppid()
        _ = LinuxMMBridge.setParentDeathSignal(SIGKILL)
        if getppid() != parent { return 125 }

        var out = RepetitionOutput()
        func finish(_ status: RunStatus, _ reason: String?) -> Int32 {
            out.status = status
            out.reason = reason
            do {
                try JSONEncoder().encode(out).write(to: URL(fileURLWithPath: outPath))
                return 0
            } catch {
                writeStderr("memlab child: cannot write \(outPath): \(error)\n")
                return 124
            }
        }
        guard let data = FileManager.default.contents(atPath: specPath),
              let spec = try? JSONDecoder().decode(ChildSpec.self, from: data) else {
            return finish(.failed, "cannot read child spec \(specPath)")
        }
        if let runner = spec.runnerPID, getppid() != runner { return 125 }
        if let tag = spec.runOwner { RunDirectory.adopt(owner: tag) }
        guard let scenario = registry.scenario(spec.scenario) else {
            return finish(.failed, "unknown scenario \(spec.scenario)")
        }
        do {
            if let path = spec.cgroupPath, let v = spec.cgroupVersion {
                try MemoryCgroup(path: path, version: v).joinSelf()
            }
            if let node = spec.placement.node { try NUMA.bind(toNode: node) }
            if let cpus = spec.placement.cpus {
                try NUMA.setAffinity(cpus: cpus)
                // Placement is part of the result: make sure it is what the kernel applied.
                let actual = NUMA.currentAffinity()
                if Set(actual) != Set(cpus) { return finish(.failed, "asked to run on CPUs \(cpus), the kernel allows \(actual)") }
            }
        } catch {
            return finish(.failed, "placement: \(error)")
        }
        let context = RunContext(variant: spec.variant, params: spec.params, repetition: spec.repetition, isWarmup: spec.warmup)
        do {
            try scenario.run(context)
            out = context.output
            return finish(.ok, nil)
        } catch let e as ScenarioError {
            out = context.output
            switch e {
            case .skipped(let why): return finish(.skipped, why)
            case .failed(let why): return finish(.failed, why)
            }
        } catch {
            out = context.output
            return finish(.failed, "\(error)")
        }
    }
}
