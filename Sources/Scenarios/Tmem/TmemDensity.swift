#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM

extension TmemScenario {
    /// K guests in one memory cgroup: each a process with a shared base image (identical
    /// in every guest) and private pages. They start one after the other — each given up to
    /// `settle_s` for ksmd to merge it when KSM is on — then all run for `duration_s`. A guest
    /// "fits" when it is alive and made progress in the last second.
    func runDensity(_ ctx: RunContext, _ p: Values) throws {
        guard let cg = MemoryCgroup.current(), cg.path.contains("/memlab-") else {
            throw ScenarioError.failed("the child is not in a memlab memory cgroup (/proc/self/cgroup)")
        }
        try? ProcFile.write("/proc/self/oom_score_adj", "-1000")
        let mechanism = p.mechanism
        let ksm = mechanism.usesKSM
        let count = p.guests
        let page = System.pageSize
        let guestBytes = p.guestSize
        let limit = p.limit
        if !mechanism.usesZswap, !Swap.areas().isEmpty {
            ctx.note("a swap area is active (\(Swap.areas().map(\.path).joined(separator: ", "))): guests may swap even with mechanism \(mechanism.rawValue)")
        }
        if cg.version == 1 { try? ProcFile.write("\(cg.path)/memory.swappiness", "60") }

        let scratch = try ScratchDirectory()
        let board = try Guest.Board(path: scratch.file("board"), slots: count)
        let killsBefore = cg.oomKills()
        let before = try VMStat.current()
        let ksmBefore = ksm ? try KSM.counters() : nil
        let ksmd = ksm ? KSM.ksmdPID() : nil
        let cpuBefore = ksmd.flatMap { TaskCPU.seconds(pid: $0) }
        let started = Clock.nanoseconds()

        var pids: [pid_t] = []
        defer { for pid in pids { kill(pid, SIGKILL); var s: Int32 = 0; waitpid(pid, &s, 0) } }
        var exited: [Int: Int32] = [:]
        func reap() {
            for (i, pid) in pids.enumerated() where exited[i] == nil {
                var s: Int32 = 0
                if waitpid(pid, &s, WNOHANG) == pid { exited[i] = s }
            }
        }
        for i in 0..<count {
            var options = Guest.Options(role: .vm, bytes: guestBytes)
            options.sharedRatio = p.sharedRatio
            options.baseSeed = 4242
            options.seed = UInt64(1000 + i)
            options.privatePattern = p.privatePattern
            options.mergeable = ksm
            options.passSleepMS = p.passSleepMs
            options.timeSwapins = mechanism.usesZswap
            pids.append(try Guest.spawn(board: board, slot: i, options: options, log: scratch.file("guest-\(i).log")))
            // Until this guest has its image (or died), then let ksmd catch up.
            let t0 = Clock.nanoseconds()
            while board.read(i, .state) < 2 && exited[i] == nil && Clock.seconds(since: t0) < 60 {
                Clock.sleep(nanoseconds: 5_000_000)
                reap()
            }
            if ksm && exited[i] == nil {
                let merging = try CounterFile(path: "\(KSM.directory)/pages_sharing")
                let scans = try CounterFile(path: "\(KSM.directory)/full_scans")
                let s0 = try scans.read()
                let t1 = Clock.nanoseconds()
                var last = try merging.read(), lastScan = s0
                while Clock.seconds(since: t1) < p.settleS {
                    Clock.sleep(nanoseconds: 10_000_000)
                    let v = try merging.read(), s = try scans.read()
                    if v != last { last = v; lastScan = s }
                    if s >= lastScan + 2 && s >= s0 + 2 { break }
                }
            }
            reap()
        }
        // Everyone runs; progress is judged over the last second.
        let runUntil = Clock.nanoseconds() + UInt64(p.durationS * 1e9)
        var passesAtMark: [UInt64] = []
        let markAt = runUntil - min(UInt64(p.durationS * 1e9), 1_000_000_000)
        while Clock.nanoseconds() < runUntil {
            if passesAtMark.isEmpty && Clock.nanoseconds() >= markAt {
                passesAtMark = (0..<count).map { board.read($0, .passes) }
            }
            Clock.sleep(nanoseconds: 20_000_000)
            reap()
        }
        if passesAtMark.isEmpty { passesAtMark = (0..<count).map { _ in 0 } }
        reap()
        let elapsed = Clock.seconds(since: started)
        let after = try VMStat.current()
        var alive = 0, progressing = 0
        var passTime = 0.0, passes = 0.0
        for i in 0..<count {
            let isAlive = exited[i] == nil
            if isAlive { alive += 1 }
            let n = board.read(i, .passes)
            if isAlive && n > passesAtMark[i] { progressing += 1 }
            if isAlive && n > 0 {
                passTime += Double(board.read(i, .passNS)) / 1e9
                passes += Double(n)
            }
        }
        let kills = cg.oomKills() - killsBefore
        ctx.record("guests", Double(count), .count, better: .none)
        ctx.record("guests_alive", Double(alive), .count, better: .higher)
        ctx.record("guests_progressing", Double(progressing), .count, better: .higher)
        ctx.record("oom_kills", Double(kills), .count, better: .lower)
        ctx.record("guest_memory", Double(count * guestBytes), .bytes, better: .none)
        ctx.record("limit", Double(limit), .bytes, better: .none)
        if let peak = cg.peakUsage() { ctx.record("max_usage", Double(peak), .bytes, better: .none) }
        if passes > 0 { ctx.record("pass_time_mean", passTime / passes, .s, better: .lower) }
        ctx.record("touch_rate", passes * Double(guestBytes / page) / elapsed, .pagesPerSecond, better: .higher)
        func d(_ k: String) -> Double { Double(Int64(after[k] ?? 0) - Int64(before[k] ?? 0)) }
        ctx.record("swapins", d("pswpin") + d("zswpin"), .pages, better: .lower)
        ctx.record("swapouts", d("pswpout") + d("zswpout"), .pages, better: .none)
        if mechanism.usesZswap {
            // Swap-in latency as the guests felt it: every first touch of a page that was
            // swapped out when its pass began, over all guests (killed ones included).
            var counts = [UInt64](repeating: 0, count: Guest.SwapinHistogram.buckets)
            var maxNS: UInt64 = 0
            for i in 0..<count {
                for (b, c) in board.swapinCounts(i).enumerated() { counts[b] += c }
                maxNS = max(maxNS, board.read(i, .swapinMaxNS))
            }
            let timed = counts.reduce(0, +)
            ctx.record("timed_swapins", Double(timed), .pages, better: .none)
            if let p50 = Guest.SwapinHistogram.percentile(counts, 50), let p99 = Guest.SwapinHistogram.percentile(counts, 99) {
                ctx.recordPercentiles("swapin_latency", [(50, p50), (99, p99), (100, Double(maxNS))])
                ctx.note("density: swap-in latency from \(timed) timed first touches of swapped-out pages (pagemap at each pass's start; log-linear histogram, percentiles within ±6.25%)")
            } else {
                ctx.note("density: no guest page was swapped out at the start of a pass: swap-in latency not measured (the guests fit without swapping)")
            }
            ctx.record("zswap_stored_pages", Double((try MemInfo.current())["Zswapped"] ?? 0) / Double(page), .pages, better: .none)
        }
        if let b = ksmBefore {
            let a = try KSM.counters()
            let sharing = Double(a.pagesSharing - b.pagesSharing)
            ctx.record("ksm_pages_sharing", sharing, .pages, better: .higher)
            // The base image is one KSM page per base page, shared by every other live guest.
            let basePages = Double(Int((Double(guestBytes / page) * p.sharedRatio).rounded()))
            if alive == count {
                ctx.check("ksm_pages_sharing", expected: basePages * Double(count - 1), observed: sharing,
                          tolerance: max(4, basePages * Double(count - 1) * 0.02),
                          describe: "base pages x (guests - 1), 2% (global counter)")
            }
            if let c0 = cpuBefore, let c1 = ksmd.flatMap({ TaskCPU.seconds(pid: $0) }) {
                ctx.record("ksmd_cpu_time", c1 - c0, .s, better: .lower)
            }
        }
        ctx.check("oom_kills", expected: Double(count - alive), observed: Double(kills), tolerance: 0,
                  describe: "every guest that died was an OOM kill in the cgroup")
        for (i, s) in exited.sorted(by: { $0.key < $1.key }) where !(memlab_wifsignaled(s) != 0 && memlab_wtermsig(s) == SIGKILL) {
            ctx.note("guest \(i) ended by itself (status \(s)): \(scratch.tail("guest-\(i).log"))")
        }
        ctx.note("density: \(count) guests of \(formatBytes(guestBytes)) (\(Int(p.sharedRatio * 100))% shared base) in \(formatBytes(limit)), mechanism \(mechanism.rawValue): \(alive) alive, \(progressing) progressing")
    }
}

