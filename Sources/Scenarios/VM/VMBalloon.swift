#if canImport(Glibc)
import Glibc
#endif
import Guests
import LabKit
import LinuxMM

extension VMScenario {
    /// The agent fills balloon_mib and frees it: with free page reporting the guest tells the
    /// host, which drops the pages (QEMU's RSS falls by itself); without it they stay resident.
    /// Then the balloon inflates by balloon_mib over QMP (the guest hands pages to the host,
    /// MemTotal falls) and deflates again: each timed, QEMU's RSS read before and after.
    func runBalloon(_ lab: VMLab, _ ctx: RunContext, _ p: Values) throws {
        var config = GuestConfig(memoryMiB: p.memoryMiB)
        config.merge = false
        config.balloon = true
        config.freePageReporting = p.freePageReporting == .on
        config.kernelArguments = ["page_reporting.page_reporting_order=9"]
        let g = try lab.boot(config)
        lab.recordBoot([g])
        let agent = try lab.agent(g)
        let qmp = g.qemu.qmp
        let reporting = p.freePageReporting == .on
        let bytes = UInt64(p.balloonMiB) << 20
        let ram = UInt64(p.memoryMiB) << 20
        let m0 = try agent.meminfo(timeoutS: 10)

        _ = try agent.fill(region: 0, bytes: bytes, seed: 0x62616C, timeoutS: 300)
        let rssFilled = g.qemu.rssBytes() ?? 0
        try agent.free(region: 0, timeoutS: 10)
        let t0 = Clock.nanoseconds()
        var rssFreed = g.qemu.rssBytes() ?? 0
        if reporting {
            // Reporting runs about every 2 s on free blocks of order page_reporting_order.
            while Clock.seconds(since: t0) < min(p.timeoutS, 20) {
                rssFreed = g.qemu.rssBytes() ?? 0
                if rssFilled &- min(rssFreed, rssFilled) >= bytes * 9 / 10 { break }
                Clock.sleep(nanoseconds: 50_000_000)
            }
            let given = Double(rssFilled &- min(rssFreed, rssFilled))
            ctx.record("reporting_given_back", given, .bytes, better: .higher)
            ctx.record("reporting_time", Clock.seconds(since: t0), .s, better: .lower)
            ctx.check("reporting_given_back", expected: Double(bytes), observed: given, accepted: Double(bytes) / 2...Double(bytes) * 1.5,
                      describe: "free page reporting gives at least half of what the guest freed back to the host")
        } else {
            Clock.sleep(nanoseconds: 3_000_000_000)
            rssFreed = g.qemu.rssBytes() ?? 0
            ctx.record("reporting_given_back", Double(rssFilled &- min(rssFreed, rssFilled)), .bytes, better: .none)
        }

        // Inflate: the guest's balloon driver takes balloon_mib and gives it to the host.
        let rssBefore = g.qemu.rssBytes() ?? 0
        let inflate = try setBalloon(qmp, target: ram - bytes, timeoutS: p.timeoutS)
        let rssInflated = g.qemu.rssBytes() ?? 0
        let m1 = try agent.meminfo(timeoutS: 10)
        ctx.record("inflate_time", inflate, .s, better: .lower)
        ctx.record("inflate_rate", Double(bytes) / max(inflate, 1e-9), .bytesPerSecond, better: .higher)
        ctx.record("balloon_given_back", Double(rssBefore &- min(rssInflated, rssBefore)), .bytes, better: .none)
        let fell = Double(m0.memTotal) - Double(m1.memTotal)
        ctx.record("guest_memtotal_drop", fell, .bytes, better: .none)
        ctx.check("guest_memtotal_drop", expected: Double(bytes), observed: fell, tolerance: Double(bytes) * 0.02,
                  describe: "the guest's MemTotal falls by the balloon's size (no deflate-on-oom), within 2%")

        let deflate = try setBalloon(qmp, target: ram, timeoutS: p.timeoutS)
        let m2 = try agent.meminfo(timeoutS: 10)
        ctx.record("deflate_time", deflate, .s, better: .lower)
        ctx.check("guest_memtotal_restored", expected: Double(m0.memTotal), observed: Double(m2.memTotal), tolerance: Double(bytes) * 0.02,
                  describe: "deflated, the guest's MemTotal is back within 2% of the balloon")
        ctx.record("qemu_rss_filled", Double(rssFilled), .bytes, better: .none)
        ctx.record("qemu_rss_after_free", Double(rssFreed), .bytes, better: .none)
        ctx.record("qemu_rss_inflated", Double(rssInflated), .bytes, better: .none)
        ctx.note("balloon: \(p.balloonMiB) MiB filled and freed in a \(p.memoryMiB) MiB guest, free page reporting \(p.freePageReporting.rawValue); balloon_given_back is what inflating took off QEMU's RSS (little when reporting already gave the freed pages back)")
    }

    /// Sets the balloon's target (the guest's memory size) and waits until QEMU reports it
    /// reached; returns the seconds it took.
    func setBalloon(_ qmp: QMPClient, target: UInt64, timeoutS: Double) throws -> Double {
        let t0 = Clock.nanoseconds()
        try qmp.execute("balloon", arguments: ["value": .number(Double(target))], timeoutS: 5)
        while true {
            let r = try qmp.execute("query-balloon", timeoutS: 5)
            if let actual = r["actual"]?.int, UInt64(max(actual, 0)) == target { return Clock.seconds(since: t0) }
            if Clock.seconds(since: t0) > timeoutS {
                throw ScenarioError.failed("the balloon did not reach \(target) bytes within timeout_s=\(timeoutS) s (actual \(r["actual"]?.int ?? -1))")
            }
            Clock.sleep(nanoseconds: 5_000_000)
        }
    }
}
