#if canImport(Glibc)
import Glibc
#endif
import Guests
import LabKit
import LinuxMM

extension VMScenario {
    /// How many guests fit in a memory limit, with KSM or without: guests boot one after the
    /// other into the run's memory cgroup (memory_limit_mib, no swap), each filling fill_mib
    /// with the same pages; with KSM, ksmd is given until it settles before the next boots.
    /// The first guest the OOM killer takes (or that cannot boot) ends the count. The process
    /// model of the same question is tmem:density.
    func runDensity(_ lab: VMLab, _ ctx: RunContext, _ p: Values) throws {
        guard let cg = MemoryCgroup.current(), cg.path.contains("/memlab-") else {
            throw ScenarioError.failed("the child is not in a memlab memory cgroup (/proc/self/cgroup)")
        }
        // The OOM killer must pick a guest, never this process (QEMU is started at 0).
        try? ProcFile.write("/proc/self/oom_score_adj", "-1000")
        let ksm = p.ksm == .on
        let killsBefore = cg.oomKills()
        let scans = try CounterFile(path: "\(KSM.directory)/full_scans")
        let ksmBefore = try KSM.counters()
        var config = GuestConfig(memoryMiB: p.memoryMiB)
        config.merge = ksm
        var mostAlive = 0
        var why = "all \(p.guests) guests fit"
        // A guest the OOM killer takes while it boots is a kill but never a started guest.
        var diedBooting = 0
        for i in 0..<p.guests {
            let before = lab.guests.count
            do {
                let g = try lab.boot(config)
                _ = try lab.agent(g).fill(region: 0, bytes: UInt64(p.fillMiB) << 20, seed: 0x64656E73, timeoutS: 120)
                if ksm { _ = try settle(scans: scans, timeoutS: p.timeoutS, slack: 64, ctx: ctx) }
            } catch {
                why = "guest \(i + 1) did not come up or fill its memory (\(error))"
                if lab.guests.count == before { diedBooting = 1 }
                break
            }
            if let dead = lab.guests.firstIndex(where: { $0.qemu.exited() != nil }) {
                why = "guest \(dead + 1) was killed after guest \(i + 1) started"
                break
            }
            mostAlive = lab.guests.count
        }
        lab.recordBoot(lab.guests)
        Clock.sleep(nanoseconds: 500_000_000)
        let aliveAtEnd = lab.guests.filter { g in g.qemu.exited() == nil && ((try? g.requireAgent().meminfo(timeoutS: 10)) != nil) }.count
        let kills = cg.oomKills() - killsBefore
        ctx.record("guests_started", Double(lab.guests.count), .count, better: .none)
        // Fit: the most guests that ran together, each with its memory filled, before the
        // first one was lost.
        ctx.record("guests_fit", Double(mostAlive), .count, better: .higher)
        ctx.record("guests_alive_at_end", Double(aliveAtEnd), .count, better: .none)
        ctx.record("oom_kills", Double(kills), .count, better: .lower)
        ctx.record("limit", Double(p.memoryLimitMiB << 20), .bytes, better: .none)
        if let peak = cg.peakUsage() { ctx.record("max_usage", Double(peak), .bytes, better: .none) }
        let pss = lab.guests.compactMap { $0.qemu.exited() == nil ? $0.qemu.pssBytes() : nil }
        if !pss.isEmpty { ctx.record("guest_pss", Double(pss.reduce(0, +)) / Double(pss.count), .bytes, better: .lower) }
        if ksm {
            let after = try KSM.counters()
            ctx.record("ksm_pages_sharing", Double(after.pagesSharing - ksmBefore.pagesSharing), .pages, better: .higher)
        }
        ctx.check("oom_kills", expected: Double(lab.guests.count - aliveAtEnd), observed: Double(kills), accepted: 0...Double(lab.guests.count + diedBooting),
                  describe: "the cgroup's OOM kills, at most one per guest started, and the one that died booting (a guest killed before it answered is not counted as started)")
        ctx.note("density: \(p.memoryMiB) MiB guests, \(p.fillMiB) MiB filled alike, limit \(p.memoryLimitMiB) MiB, KSM \(p.ksm.rawValue): \(why); the process model of this question is tmem:density")
    }
}
