#if canImport(Glibc)
import Glibc
#endif
import LabKit
import LinuxMM

/// Overcommit: the promises the kernel makes (commit accounting, vm.overcommit_memory) and
/// how it breaks them when memory really runs out (the OOM killer inside a memory cgroup).
public struct OvercommitScenario: TypedScenario {
    public init() {}
    public let id = "overcommit"
    public let summary = "Commit accounting per vm.overcommit_memory mode; OOM outcome in a memory cgroup"

    public enum Variant: String, ScenarioVariant {
        case commit, oom
        public var summary: String {
            switch self {
            case .commit: return "allocation probes (untouched private mmaps) under one overcommit mode: granted or errno, Committed_AS moves, CommitLimit"
            case .oom: return "a worker touches more than its memory cgroup's limit: OOM kill, time to kill, peak usage, limit hits"
            }
        }
    }

    public struct Parameters: ParameterSet {
        public init() {}
        let mode = Parameter<Int>("mode", 0...2, default: 0, unit: .none, help: "commit: vm.overcommit_memory to borrow (0 heuristic, 1 always, 2 strict)")
        let ratio = Parameter<Int>("ratio", 0...1000, default: 50, unit: .percent, help: "commit: vm.overcommit_ratio (percent of RAM in CommitLimit, mode 2), borrowed")
        let kbytes = Parameter<Int>("kbytes", 0...(1 << 50), default: 0, unit: .bytes, help: "commit: vm.overcommit_kbytes instead of ratio when > 0 (bytes; suffix K, M, G), borrowed")
        let rowMax = Parameter<Int>("row_max", 1...1024, default: 64, unit: .count, help: "commit: most 1 GiB mappings the 'in a row' probe makes")
        let noreserve = Parameter<Bool>("noreserve", default: true, help: "commit: repeat every probe with MAP_NORESERVE")
        let limit = Parameter<Int>("limit", (8 << 20)...(1 << 40), default: 64 << 20, unit: .bytes, help: "oom: memory cgroup limit")
        let overshoot = Parameter<Double>("overshoot", 1.1...16, default: 2, unit: .ratio, help: "oom: the worker touches overshoot x limit")
        let swapSize = Parameter<Int>("swap_size", 0...(64 << 30), default: 0, unit: .bytes, help: "oom: make a swap file of this size for the run (0: none), to see that the cgroup's swap cap still ends in the OOM killer")
        let timeoutS = Parameter<Double>("timeout_s", 1...600, default: 30, unit: .s, help: "oom: give up waiting for the worker after this long")
    }

    public func probe(_ variant: Variant) -> Availability {
        switch variant {
        case .commit:
            guard Overcommit.memory.exists else { return .unusable("/proc/sys/vm/overcommit_memory is missing (no procfs vm sysctls)") }
        case .oom:
            if MemoryCgroupMount.detect().isEmpty {
                return .unusable("needs a memory cgroup controller (cgroup v1 'memory' or v2 with +memory); none is mounted")
            }
        }
        return .usable
    }

    public func settings(_ variant: Variant, _ params: Values) -> [KnobSetting] {
        guard variant == .commit else { return [] }
        var s: [KnobSetting] = []
        // Writing overcommit_kbytes zeroes overcommit_ratio and the other way round (mm/util.c),
        // so both are borrowed — ratio first — and restore (in reverse) ends with the original ratio.
        if params.kbytes > 0 {
            s.append(KnobSetting(Overcommit.ratio, "0"))
            s.append(KnobSetting(Overcommit.kbytes, String(params.kbytes / 1024)))
        } else {
            s.append(KnobSetting(Overcommit.kbytes, "0"))
            s.append(KnobSetting(Overcommit.ratio, String(params.ratio)))
        }
        // Last in, first out: strict mode is given back before anything else.
        s.append(KnobSetting(Overcommit.memory, String(params.mode)))
        return s
    }

    public func memoryLimit(_ variant: Variant, _ params: Values) -> Int? {
        variant == .oom ? params.limit : nil
    }

    /// oom with swap_size > 0: a swap file in the state directory, made and swapped on by the
    /// runner through the guard (journaled first; swapped off and deleted afterwards).
    public func prepare(_ variant: Variant, _ params: Values, settingsGuard: SettingsGuard) throws {
        guard variant == .oom, params.swapSize > 0 else { return }
        try settingsGuard.borrowSwapFile(bytes: params.swapSize)
    }

    public func deadline(_ variant: Variant, _ params: Values) -> Double {
        variant == .oom ? params.timeoutS + 30 : 60
    }

    public func run(_ ctx: RunContext, _ variant: Variant, _ p: Values) throws {
        switch variant {
        case .commit: try runCommit(ctx, p)
        case .oom: try runOOM(ctx, p)
        }
    }

    // MARK: commit

    /// One allocation probe: a private writable anonymous mapping, never touched.
    struct Probe {
        let name: String
        let bytes: Int
        let noReserve: Bool
        let describe: String
    }

    /// The kernel's rule (mm/util.c __vm_enough_memory), as documented in
    /// Documentation/mm/overcommit-accounting.rst, for one mapping of `bytes`.
    struct Model {
        let mode: Int
        let memTotal: Int
        let swapTotal: Int
        let commitLimit: Int
        let userReserve: Int

        /// Whether the mapping is charged to Committed_AS at all: MAP_NORESERVE opts out,
        /// except in mode 2, which ignores it.
        func accounted(noReserve: Bool) -> Bool { !noReserve || mode == 2 }

        func granted(bytes: Int, noReserve: Bool, committed: Int, vmSize: Int) -> Bool {
            guard accounted(noReserve: noReserve) else { return true }
            switch mode {
            case 1: return true
            case 0: return bytes <= memTotal + swapTotal          // each allocation alone
            default:
                // Root needs no admin reserve; a user reserve of min(total_vm/32, user_reserve_kbytes).
                let allowed = commitLimit - min(vmSize / 32, userReserve)
                return committed + bytes < allowed
            }
        }
    }

    static func mmapProbe(_ bytes: Int, noReserve: Bool) -> (UnsafeMutableRawPointer?, Int32) {
        var flags = MAP_PRIVATE | MAP_ANONYMOUS
        if noReserve { flags |= MAP_NORESERVE }
        let p = mmap(nil, bytes, PROT_READ | PROT_WRITE, flags, -1, 0)
        if p == MAP_FAILED || p == nil { return (nil, errno) }
        return (p, 0)
    }

    static func vmSize() -> Int {
        guard let text = ProcFile.readIfPresent("/proc/self/status") else { return 0 }
        for line in text.split(separator: "\n") where line.hasPrefix("VmSize:") {
            let f = line.split(separator: " ")
            if f.count >= 2, let kb = Int(f[1]) { return kb * 1024 }
        }
        return 0
    }

    func runCommit(_ ctx: RunContext, _ p: Values) throws {
        let mode = Int(try Overcommit.memory.read()) ?? -1
        guard mode == p.mode else {
            throw ScenarioError.failed("vm.overcommit_memory reads \(mode), expected the borrowed \(p.mode)")
        }
        let info = try MemInfo.current()
        let gib = 1 << 30
        let model = Model(mode: mode, memTotal: Int(info.memTotal), swapTotal: Int(info.swapTotal),
                          commitLimit: Int(info.commitLimit),
                          userReserve: (Int(try Overcommit.userReserveKbytes.read()) ?? 0) * 1024)
        ctx.record("overcommit_memory", Double(mode), .count, better: .none)
        ctx.record("commit_limit", Double(info.commitLimit), .bytes, better: .none)
        ctx.record("committed_as", Double(info.committedAS), .bytes, better: .none)
        ctx.record("mem_total", Double(info.memTotal), .bytes, better: .none)
        ctx.record("swap_total", Double(info.swapTotal), .bytes, better: .none)

        let ramSwap = Int(info.memTotal + info.swapTotal)
        let beyond = (ramSwap / gib + 1) * gib
        let limit = Int(info.commitLimit), ram = Int(info.memTotal)
        let between = ((limit + ram) / 2) / gib * gib
        var probes = [
            Probe(name: "beyond_ram_swap", bytes: beyond, noReserve: false, describe: "\(formatBytes(beyond)) > MemTotal + SwapTotal"),
            Probe(name: "between_limit_and_ram", bytes: between, noReserve: false,
                  describe: "\(formatBytes(between)), between CommitLimit (\(formatBytes(limit))) and MemTotal (\(formatBytes(ram)))"),
        ]
        if p.noreserve {
            probes += probes.map { Probe(name: $0.name + "_noreserve", bytes: $0.bytes, noReserve: true, describe: $0.describe + ", MAP_NORESERVE") }
        }
        // Moves in Committed_AS from anything else on the machine are noise here.
        let tolerance = Double(64 << 20)
        for probe in probes {
            let before = Int(try MemInfo.current().committedAS)
            let expect = model.granted(bytes: probe.bytes, noReserve: probe.noReserve, committed: before, vmSize: OvercommitScenario.vmSize())
            let (ptr, err) = OvercommitScenario.mmapProbe(probe.bytes, noReserve: probe.noReserve)
            let after = Int(try MemInfo.current().committedAS)
            if let ptr { munmap(ptr, probe.bytes) }
            let delta = Double(after - before)
            ctx.record("\(probe.name)_size", Double(probe.bytes), .bytes, better: .none)
            ctx.record("\(probe.name)_granted", ptr != nil ? 1 : 0, .count, better: .none)
            ctx.record("\(probe.name)_committed_as_delta", delta, .bytes, better: .none)
            if ptr == nil { ctx.record("\(probe.name)_errno", Double(err), .count, better: .none) }
            ctx.note("\(probe.name): \(probe.describe): " + (ptr != nil ? "granted" : "refused (\(SystemError(errno: err, call: "mmap").errnoName))"))
            ctx.check("\(probe.name)_granted", expected: expect ? 1 : 0, observed: ptr != nil ? 1 : 0, tolerance: 0,
                      describe: "mode \(mode) rule of overcommit-accounting.rst")
            let charged = ptr != nil && model.accounted(noReserve: probe.noReserve)
            ctx.check("\(probe.name)_committed_as_delta", expected: charged ? Double(probe.bytes) : 0, observed: delta,
                      tolerance: tolerance, describe: "64 MiB (machine-wide counter)")
        }

        // Many 1 GiB mappings in a row, kept until the row ends: mode 0 judges each alone,
        // mode 2 adds them up against CommitLimit.
        for noReserve in p.noreserve ? [false, true] : [false] {
            let name = noReserve ? "row_1g_noreserve" : "row_1g"
            let start = Int(try MemInfo.current().committedAS)
            var predicted = 0
            var committed = start, vm = OvercommitScenario.vmSize()
            for _ in 0..<p.rowMax {
                guard model.granted(bytes: gib, noReserve: noReserve, committed: committed, vmSize: vm) else { break }
                predicted += 1
                if model.accounted(noReserve: noReserve) { committed += gib }
                vm += gib
            }
            var maps: [UnsafeMutableRawPointer] = []
            var lastErr: Int32 = 0
            for _ in 0..<p.rowMax {
                let (ptr, err) = OvercommitScenario.mmapProbe(gib, noReserve: noReserve)
                guard let ptr else { lastErr = err; break }
                maps.append(ptr)
            }
            let end = Int(try MemInfo.current().committedAS)
            for m in maps { munmap(m, gib) }
            let delta = Double(end - start)
            ctx.record("\(name)_granted", Double(maps.count), .count, better: .none)
            ctx.record("\(name)_committed_as_delta", delta, .bytes, better: .none)
            if lastErr != 0 { ctx.record("\(name)_errno", Double(lastErr), .count, better: .none) }
            ctx.note("\(name): \(maps.count) of \(p.rowMax) mappings of 1 GiB granted" +
                     (lastErr != 0 ? ", then \(SystemError(errno: lastErr, call: "mmap").errnoName)" : ""))
            ctx.check("\(name)_granted", expected: Double(predicted), observed: Double(maps.count), tolerance: 1,
                      describe: "1 mapping (Committed_AS of the rest of the machine moves)")
            let charged = model.accounted(noReserve: noReserve) ? Double(maps.count * gib) : 0
            ctx.check("\(name)_committed_as_delta", expected: charged, observed: delta, tolerance: tolerance,
                      describe: "64 MiB (machine-wide counter)")
        }
    }

    // MARK: oom

    func runOOM(_ ctx: RunContext, _ p: Values) throws {
        guard let cg = MemoryCgroup.current(), cg.path.contains("/memlab-") else {
            throw ScenarioError.failed("the child is not in a memlab memory cgroup (/proc/self/cgroup)")
        }
        // The monitor must outlive the worker: let the OOM killer prefer the worker.
        try? ProcFile.write("/proc/self/oom_score_adj", "-1000")
        let limit = p.limit
        let bytes = Int(Double(limit) * p.overshoot)
        let killsBefore = cg.oomKills()
        let hitsBefore = cg.limitHits() ?? 0
        let scratch = try ScratchDirectory()
        let board = try Guest.Board(path: scratch.file("board"), slots: 1)
        var hog = Guest.Options(role: .hog, bytes: bytes)
        hog.oomScoreAdj = 1000
        let pid = try Guest.spawn(board: board, slot: 0, options: hog, log: scratch.file("worker.log"))
        let exit = ChildProcess.wait(pid, deadline: p.timeoutS)
        let endNS = Clock.nanoseconds()
        let kills = cg.oomKills() - killsBefore
        let hits = (cg.limitHits() ?? 0) - hitsBefore
        let touched = Double(board.read(0, .pages)) * Double(System.pageSize)
        let killed: Bool
        switch exit {
        case .signaled(SIGKILL): killed = kills > 0
        case .signaled(let s): throw ScenarioError.failed("the worker died of \(ChildProcess.signalName(s)): \(scratch.tail("worker.log"))")
        case .exited(0): killed = false
        case .exited(let c): throw ScenarioError.failed("the worker exited with status \(c): \(scratch.tail("worker.log"))")
        case .timedOut(let t): throw ScenarioError.failed("the worker still ran after \(formatNumber(t)) s; killed")
        }
        ctx.record("limit", Double(limit), .bytes, better: .none)
        ctx.record("worker_bytes", Double(bytes), .bytes, better: .none)
        ctx.record("oom_killed", killed ? 1 : 0, .count, better: .none)
        ctx.record("oom_kills", Double(kills), .count, better: .none)
        ctx.record("limit_hits", Double(hits), .count, better: .none)
        ctx.record("touched_before_kill", touched, .bytes, better: .none)
        if let peak = cg.peakUsage() { ctx.record("max_usage", Double(peak), .bytes, better: .none) }
        let start = board.read(0, .startNS)
        if killed && start > 0 && endNS > start {
            ctx.record("time_to_kill", Double(endNS - start) / 1e9, .s, better: .none)
        }
        ctx.note("oom: swap capped with the limit (\(cg.swapCapDescription)), so swap cannot postpone the kill")
        let swapBytes = Swap.areas().reduce(0) { $0 + Int($1.sizeBytes) }
        ctx.record("swap_total", Double(swapBytes), .bytes, better: .none)
        if swapBytes > 0 { ctx.note("oom: swap areas active during the run: \(Swap.areas().map(\.path).joined(separator: ", "))") }
        ctx.note("oom: memory cgroup \(cg.path) (v\(cg.version)); worker pid \(pid) with oom_score_adj 1000, monitor -1000")
        if !killed { ctx.note("oom: the worker was not killed: it touched \(formatBytes(Int(touched))) — swap in the cgroup lets it page out instead") }
        ctx.check("oom_kills", expected: 1, observed: Double(kills), tolerance: 0, describe: "exactly one kill (memory.oom_control / memory.events oom_kill)")
        if let peak = cg.peakUsage() {
            // Some charges may not fail (page tables, a task already chosen by the OOM
            // killer), so the peak can pass the limit by a few pages.
            let slack = Double(64 * System.pageSize)
            ctx.check("max_usage", expected: Double(limit), observed: Double(peak), accepted: 0...(Double(limit) + slack),
                      describe: "at most the limit + 64 pages of forced charges")
        }
        ctx.check("touched_before_kill", expected: Double(limit), observed: touched, accepted: (Double(limit) / 2)...Double(limit),
                  describe: "between half the limit and the limit (the rest: page tables, the monitor)")
    }
}

/// A private scratch directory for a child's worker logs and status board, removed on exit.
final class ScratchDirectory {
    let path: String
    init() throws(SystemError) {
        // Under the run's directory: removed with it, also after a kill.
        var template = Array("\(try RunDirectory.make())/child.XXXXXX".utf8CString)
        guard let dir = mkdtemp(&template) else { throw SystemError.current("mkdtemp") }
        path = String(cString: dir)
    }
    deinit {
        for f in ProcFile.list(path) { unlink("\(path)/\(f)") }
        rmdir(path)
    }
    func file(_ name: String) -> String { "\(path)/\(name)" }
    func tail(_ name: String) -> String {
        (ProcFile.readIfPresent(file(name)) ?? "").split(separator: "\n").last.map(String.init) ?? "(no output)"
    }
}
