import LabKit
import LinuxMM

/// ksm:advisor — with advisor_mode=scan-time (6.9+) the kernel picks pages_to_scan itself
/// after every full scan, aiming at advisor_target_scan_time seconds per scan, within CPU
/// bounds (mm/ksm.c, scan_time_advisor): at least 10% and at most advisor_max_cpu of one
/// CPU at the last scan's cost per page, and at most advisor_max_pages_to_scan. The run
/// watches every pick, as the kernel exposes it in pages_to_scan, beside the scan time and
/// ksmd CPU of the scan that led to it.
extension KSMScenario {
    struct AdvisorScan {
        let end: Double          // s since the region was marked mergeable
        let seconds: Double      // this scan's length, measured here
        let cpuSeconds: Double?  // ksmd CPU during it
        let before: Int          // pages_to_scan during it
        let pick: Int            // pages_to_scan the advisor set at its end
    }

    /// The advisor's clamp for one pick, from the scan before (integer arithmetic as the
    /// kernel's): per_page_cost = pages_to_scan / cpu_percent, and the pick lies in
    /// [per_page_cost × 10, per_page_cost × max_cpu], capped at max_pages.
    static func advisorBounds(before: Int, scanSeconds: Double, cpuSeconds: Double, maxCPU: Int, maxPages: Int) -> ClosedRange<Int> {
        let scanTime = max(Int(scanSeconds), 1)                 // whole seconds, at least 1
        let cpuMS = Int(cpuSeconds * 1000)
        let cpuPercent = max(cpuMS * 100 / (scanTime * 1000), 1)
        let perPage = max(before / cpuPercent, 1)
        let lo = min(perPage * 10, maxPages), hi = min(max(perPage * maxCPU, lo), maxPages)
        return lo...hi
    }

    func runAdvisor(_ ctx: RunContext, _ p: Values) throws {
        let pageSize = System.pageSize
        let layout = layout(p)
        guard (try? KSM.Knobs.advisorMode.read()) == "scan-time" else {
            throw ScenarioError.failed("advisor_mode does not read scan-time: the borrowed setting did not hold")
        }
        let maxPages = Int((try? KSM.Knobs.advisorMaxPagesToScan.read()) ?? "") ?? 30000
        let minPages = Int((try? KSM.Knobs.advisorMinPagesToScan.read()) ?? "") ?? 500
        let region = try AnonymousMapping(length: layout.pages * pageSize, kind: .base)
        layout.fill(region.base, pageSize: pageSize, seed: 0x6164_7669_736F &+ UInt64(ctx.repetition))

        let ptsFile = try CounterFile(path: KSM.Knobs.pagesToScan.path)
        let scansFile = try CounterFile(path: "\(KSM.directory)/full_scans")
        let sampler = Sampler(interval: Double(p.sampleIntervalMs) / 1000, probes: [
            .init("advisor_pages_to_scan", .pages, try CounterFile(path: KSM.Knobs.pagesToScan.path)),
            .init("pages_sharing", .pages, try CounterFile(path: "\(KSM.directory)/pages_sharing")),
        ])
        let others = KSM.otherMergeableProcesses()
        if !others.isEmpty {
            ctx.note("other processes have KSM-mergeable memory (\(others.prefix(3).map { "pid \($0.pid) (\($0.comm))" }.joined(separator: ", "))): ksmd scans their pages too, so the scan times and the advisor's picks are for all of it")
        }
        let ksmd = KSM.ksmdPID()
        if ksmd == nil { ctx.note("ksmd thread not found in /proc: the CPU bound check is not made") }
        try sampler.start()
        let t0 = Clock.nanoseconds()
        try KSM.setMergeable(region.base, length: region.length, true)
        var lastPTS = Int(try ptsFile.read())
        var lastScans = try scansFile.read()
        let startPTS = lastPTS
        var scanStart: UInt64? = nil            // the first full scan is partial: not timed
        var cpuAtStart = ksmd.flatMap { TaskCPU.seconds(pid: $0) }
        var scans: [AdvisorScan] = []
        var changesOffBoundary = 0
        var maxSeen = lastPTS
        while Clock.seconds(since: t0) < p.durationS {
            Clock.sleep(nanoseconds: 2_000_000)
            // pages_to_scan before full_scans: the kernel counts the scan, then picks, so a
            // new pick read here always comes with its scan counted in the read after.
            let pts = Int(try ptsFile.read())
            let s = try scansFile.read()
            let now = Clock.nanoseconds()
            maxSeen = max(maxSeen, pts)
            if s == lastScans {
                if pts != lastPTS { changesOffBoundary += 1; lastPTS = pts }
                continue
            }
            let cpu = ksmd.flatMap { TaskCPU.seconds(pid: $0) }
            if let start = scanStart, s == lastScans + 1 {
                scans.append(AdvisorScan(end: Double(now - t0) / 1e9, seconds: Double(now - start) / 1e9,
                                         cpuSeconds: cpu.flatMap { c in cpuAtStart.map { c - $0 } }, before: lastPTS, pick: pts))
            }
            scanStart = now
            cpuAtStart = cpu
            lastScans = s
            lastPTS = pts
        }
        for series in sampler.stop() { ctx.record(series) }
        guard !scans.isEmpty else {
            // A pick so low that the next scan outlasts the run: what was seen is reported.
            ctx.record("target_scan_time", Double(p.targetScanTime), .s, better: .none)
            ctx.record("timed_scans", 0, .count, better: .none)
            ctx.record("pages_to_scan_start", Double(startPTS), .pages, better: .none)
            ctx.record("pages_to_scan_last", Double(lastPTS), .pages, better: .none)
            ctx.record("pages_to_scan_max", Double(maxSeen), .pages, better: .none)
            ctx.check("pages_to_scan_max", expected: Double(maxPages), observed: Double(maxSeen), accepted: 0...Double(maxPages),
                      describe: "every pick at most advisor_max_pages_to_scan")
            ctx.check("picks_off_scan_boundary", expected: 0, observed: Double(changesOffBoundary), tolerance: 0,
                      describe: "pages_to_scan changes only when a full scan ends (the advisor runs at the end of each scan)")
            ctx.note("advisor: ksmd finished fewer than two full scans in duration_s=\(p.durationS) s, so no scan was timed: pages_to_scan went from \(startPTS) to \(lastPTS) after the first (partial) scan, and a scan at that rate outlasted the run; raise duration_s or lower pages to see more")
            return
        }
        ctx.record(TimeSeries(name: "scan_time", unit: .s, intervalS: scans.map(\.seconds).reduce(0, +) / Double(scans.count),
                              t: scans.map(\.end), values: scans.map(\.seconds)))
        ctx.record(TimeSeries(name: "advisor_pick", unit: .pages, intervalS: scans.map(\.seconds).reduce(0, +) / Double(scans.count),
                              t: scans.map(\.end), values: scans.map { Double($0.pick) }))
        let last = scans[scans.count - 1]
        let stat = try KSMStat.read()
        ctx.record("target_scan_time", Double(p.targetScanTime), .s, better: .none)
        ctx.record("timed_scans", Double(scans.count), .count, better: .none)
        ctx.record("scan_time_last", last.seconds, .s, better: .none)
        ctx.record("scan_time_median", Statistics.median(scans.map(\.seconds)), .s, better: .none)
        ctx.record("scan_time_target_ratio", last.seconds / Double(p.targetScanTime), .ratio, better: .none)
        ctx.record("pages_to_scan_start", Double(startPTS), .pages, better: .none)
        ctx.record("pages_to_scan_last", Double(last.pick), .pages, better: .none)
        ctx.record("pages_to_scan_max", Double(maxSeen), .pages, better: .none)
        if let c = last.cpuSeconds, last.seconds > 0 { ctx.record("ksmd_cpu_percent_last", 100 * c / last.seconds, .percent, better: .lower) }
        ctx.record("merging_pages", Double(stat.mergingPages), .pages, better: .none)

        ctx.check("advisor_starts_at_min_pages", expected: Double(minPages), observed: Double(startPTS),
                  accepted: Double(minPages)...Double(maxPages),
                  describe: "switching the advisor on sets pages_to_scan to advisor_min_pages_to_scan (\(minPages)); a scan before this repetition may have moved it up, never past advisor_max_pages_to_scan")
        ctx.check("pages_to_scan_max", expected: Double(maxPages), observed: Double(maxSeen), accepted: 0...Double(maxPages),
                  describe: "every pick at most advisor_max_pages_to_scan")
        ctx.check("picks_off_scan_boundary", expected: 0, observed: Double(changesOffBoundary), tolerance: 0,
                  describe: "pages_to_scan changes only when a full scan ends (the advisor runs at the end of each scan)")
        if ksmd != nil {
            var outside = 0
            var worst = ""
            for s in scans {
                guard let c = s.cpuSeconds else { continue }
                // The kernel times a scan from its first batch to its last, we from poll to
                // poll, and it rounds down to whole seconds (a 1.99 s scan is 1 s there): accept
                // the union of the bounds for the scan time ±50 ms and the CPU time ±20%.
                var lo = Int.max, hi = 0
                for t in [max(s.seconds - 0.05, 0), s.seconds + 0.05] {
                    for cpu in [c * 0.8, c * 1.2] {
                        let b = KSMScenario.advisorBounds(before: s.before, scanSeconds: t, cpuSeconds: cpu, maxCPU: p.advisorMaxCPU, maxPages: maxPages)
                        lo = min(lo, b.lowerBound)
                        hi = max(hi, b.upperBound)
                    }
                }
                if s.pick < lo || s.pick > hi {
                    outside += 1
                    worst = "pick \(s.pick) after a \(String(format: "%.2f", s.seconds)) s scan at \(s.before) pages with \(String(format: "%.3f", c)) s ksmd CPU: bounds \(lo)...\(hi)"
                }
            }
            ctx.check("picks_within_cpu_bounds", expected: 0, observed: Double(outside), tolerance: 0,
                      describe: "each pick within [10%, advisor_max_cpu=\(p.advisorMaxCPU)%] of one CPU at the last scan's cost per page (capped at advisor_max_pages_to_scan); scan time ±50 ms and CPU ±20% for the clocks")
            if outside > 0 { ctx.note("advisor pick outside its CPU bounds: \(worst)") }
        }
        ctx.note("advisor: \(layout.pages) pages, target \(p.targetScanTime) s per scan, \(scans.count) scans timed (the first, partial, scan is not); first picks: \(scans.prefix(12).map { String($0.pick) }.joined(separator: " "))\(scans.count > 12 ? " …" : "")")
    }
}
