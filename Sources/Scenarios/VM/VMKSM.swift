#if canImport(Glibc)
import Glibc
#endif
import Guests
import LabKit
import LinuxMM

extension VMScenario {
    /// K guests (QEMU's mem-merge: guest RAM is MADV_MERGEABLE) boot together; each agent
    /// fills fill_mib with pages of its own, and once ksmd has settled, refills the same pages
    /// with one seed for all (identical pages across guests) or one per guest. The growth of
    /// pages_sharing is held against what the agents wrote: pages × (K − 1).
    func runKSM(_ lab: VMLab, _ ctx: RunContext, _ p: Values) throws {
        var config = GuestConfig(memoryMiB: p.memoryMiB)
        config.merge = true
        let guests = try (0..<p.guests).map { _ in try lab.boot(config, waitForAgent: false) }
        for g in guests { try g.connectAgent(timeoutS: lab.bootTimeoutS) }
        lab.recordBoot(guests)
        let scans = try CounterFile(path: "\(KSM.directory)/full_scans")
        let pageSize = UInt64(guests[0].hello?.pageSize ?? 4096)
        let fillBytes = UInt64(p.fillMiB) << 20
        let pages = fillBytes / pageSize

        // Each agent first fills its region with pages of its own (unique across guests): the
        // guest pages this takes stop sharing whatever they shared at boot (zeroed free
        // memory). Once ksmd has settled, that is the baseline; then the same pages are
        // refilled in place with the pattern asked for, and only that refill is measured.
        let pssBooted = guests.compactMap { $0.qemu.pssBytes() }.reduce(0, +)
        let booted = try KSM.counters()
        ctx.record("booted_pages_sharing", Double(booted.pagesSharing), .pages, better: .none)
        for (i, g) in guests.enumerated() {
            _ = try lab.agent(g).fill(region: 0, bytes: fillBytes, seed: 0x7072_6570 &+ UInt64(i + 1) &* 0x9E37_79B9, timeoutS: p.timeoutS)
        }
        let slack = max(8, Int64(pages) / 500)
        let baseline = try settle(scans: scans, timeoutS: p.timeoutS, slack: slack, ctx: ctx)

        let sampler = Sampler(interval: 0.1, probes: [
            .init("pages_sharing", .pages, try CounterFile(path: "\(KSM.directory)/pages_sharing")),
            .init("pages_shared", .pages, try CounterFile(path: "\(KSM.directory)/pages_shared")),
        ])
        try sampler.start()
        let ksmd = KSM.ksmdPID()
        let cpuBefore = ksmd.flatMap { TaskCPU.seconds(pid: $0) }
        let rssBefore = guests.compactMap { $0.qemu.rssBytes() }.reduce(0, +)
        var fillSeconds: [Double] = []
        var sums: [UInt64] = []
        do {
            for (i, g) in guests.enumerated() {
                let seed: UInt64 = p.pattern == .identical ? 0x6B73_6D00 : 0x6B73_6D00 &+ UInt64(i + 1) &* 0x9E37_79B9
                let f = try lab.agent(g).fill(region: 0, bytes: fillBytes, seed: seed, timeoutS: p.timeoutS)
                guard f.pages == pages else { throw ScenarioError.failed("the agent filled \(f.pages) pages, asked for \(pages)") }
                fillSeconds.append(f.seconds)
                sums.append(f.checksum)
            }
        } catch {
            _ = sampler.stop()
            throw error
        }
        let t0 = Clock.nanoseconds()
        let merged: KSM.Counters
        do { merged = try settle(scans: scans, timeoutS: p.timeoutS, slack: slack, ctx: ctx) } catch {
            for s in sampler.stop() { ctx.record(s) }
            throw error
        }
        let mergeTime = Clock.seconds(since: t0)
        for s in sampler.stop() { ctx.record(s) }
        let cpuAfter = ksmd.flatMap { TaskCPU.seconds(pid: $0) }
        let rssAfter = guests.compactMap { $0.qemu.rssBytes() }.reduce(0, +)
        let pssAfter = guests.compactMap { $0.qemu.pssBytes() }.reduce(0, +)

        let sharing = merged.pagesSharing - baseline.pagesSharing
        let shared = merged.pagesShared - baseline.pagesShared
        let k = Int64(p.guests)
        ctx.record("fill_rate", Double(fillBytes) / (fillSeconds.reduce(0, +) / Double(fillSeconds.count)), .bytesPerSecond, better: .higher)
        ctx.record("merge_time", mergeTime, .s, better: .lower)
        ctx.record("pages_sharing", Double(sharing), .pages, better: .none)
        ctx.record("pages_shared", Double(shared), .pages, better: .none)
        ctx.record("saved_bytes", Double(sharing * Int64(pageSize)), .bytes, better: .higher)
        ctx.record("saved_per_guest", Double(sharing * Int64(pageSize)) / Double(k), .bytes, better: .higher)
        if let b = cpuBefore, let a = cpuAfter { ctx.record("ksmd_cpu_time", a - b, .s, better: .lower) }
        // Footprint per guest as the host accounts it: Pss splits a KSM page among its sharers.
        ctx.record("guest_pss_booted", Double(pssBooted) / Double(k), .bytes, better: .lower)
        ctx.record("guest_pss", Double(pssAfter) / Double(k), .bytes, better: .lower)
        ctx.record("guest_rss_before_merge", Double(rssBefore) / Double(k), .bytes, better: .none)
        ctx.record("guest_rss_after_merge", Double(rssAfter) / Double(k), .bytes, better: .none)
        // The agents' own checksums of what they wrote: identical guests wrote the same bytes.
        let distinct = Set(sums).count
        ctx.check("agent_checksums_distinct", expected: Double(p.pattern == .identical ? 1 : p.guests), observed: Double(distinct), tolerance: 0,
                  describe: "identical: every agent wrote the same bytes; unique: each its own")
        let expected = p.pattern == .identical ? Double(Int64(pages) * (k - 1)) : 0
        let tol = max(2.0, expected * 0.01)
        ctx.check("pages_sharing", expected: expected, observed: Double(sharing), tolerance: tol,
                  describe: "identical pages × (guests − 1), max(2 pages, 1%), over the baseline of the same pages filled unique; global counter")
        if p.pattern == .identical {
            ctx.check("pages_shared", expected: Double(pages), observed: Double(shared), tolerance: max(2.0, Double(pages) * 0.01),
                      describe: "one KSM page per identical page, max(2 pages, 1%)")
        }
        ctx.note("ksm: \(p.guests) guests of \(p.memoryMiB) MiB, \(p.fillMiB) MiB each filled \(p.pattern.rawValue); guest_pss is the host's share of each QEMU (Pss) after merging")
    }

    /// KSM's counters once they hold still — within `slack` pages — for two full scans (at
    /// least three scans: a page merges on its second visit). Running guests keep writing a
    /// little (their kernels' timers, page tables), so exact stillness may never come.
    func settle(scans: CounterFile, timeoutS: Double, slack: Int64 = 8, ctx: RunContext) throws -> KSM.Counters {
        let t0 = Clock.nanoseconds()
        let start = try scans.read()
        var last = try KSM.counters()
        var atChange = start
        while true {
            Clock.sleep(nanoseconds: 20_000_000)
            let c = try KSM.counters(), s = try scans.read()
            if abs(c.pagesSharing - last.pagesSharing) > slack || abs(c.pagesShared - last.pagesShared) > slack {
                last = c
                atChange = s
            }
            if s >= atChange + 2 && s >= start + 3 { return c }
            if Clock.seconds(since: t0) > timeoutS {
                throw ScenarioError.failed("ksmd did not settle within timeout_s=\(timeoutS) s (\(s - start) full scans, pages_sharing \(c.pagesSharing)): raise pages_to_scan or timeout_s")
            }
        }
    }
}
