#if canImport(Glibc)
import Glibc
#endif
import Histogram
import LabKit
import LinuxMM
import Transfer

extension LazyRestoreScenario {
    /// handler=external: the restore served by a handler process of its own (ExternalHandler.swift),
    /// then (floors=measure) the hop calibration: the same 1024 sequential first touches served
    /// in-process and by that handler process, alternating, in this repetition.
    func runExternal(_ ctx: RunContext, _ p: Values) throws {
        let pages = p.size / System.pageSize
        let seed = UInt64(p.seed) &+ UInt64(ctx.repetition) &* 7919
        let image = try PageImage(pages: pages, seed: seed, zeroRatio: p.zeroRatio)
        let pattern = p.workload
        let trace = pattern == .trace ? try TraceFile.load(p.traceFile, pages: pages) : []
        let threads = p.threads
        let traces = AccessTraces(pattern: pattern, pages: pages,
                                  threads: threads, opsPerThread: pattern == .trace ? (trace.count + threads - 1) / threads : p.accesses,
                                  writeRatio: p.writeRatio, zipfSkew: p.zipfSkew, seed: seed, image: image, trace: trace)
        if !p.recordTrace.isEmpty {
            try TraceFile.write(traces, to: p.recordTrace, note: "recorded by memlab lazy-restore: workload=\(p.workload.rawValue) threads=\(threads) size=\(p.size) seed=\(seed)")
        }
        let handler = try ExternalHandlerProcess.start(timeoutS: p.sourceDeadlineS, directory: p.sourceDir.rawValue)
        defer { handler.stop() }
        let r = try performExternalRestore(image: image, traces: traces, handler: handler, wait: p.wait, handlerThreads: p.handlerThreads,
                                           batch: p.batch, zeropage: p.zeroPages == .zeropage, memfdRegion: p.region == .memfd,
                                           deadlineS: p.sourceDeadlineS, killHandlerAfterS: p.killHandlerAfterS > 0 ? p.killHandlerAfterS : nil)
        if let f = r.failed { throw ScenarioError.failed(f) }

        // The same traces on resident memory: the slowdown's denominator.
        let resident = try AnonymousMapping(length: image.bytes, kind: .base)
        memcpy(resident.base, image.base, image.bytes)
        let baseline = WorkloadRun(traces: traces, region: resident.base, seed: seed)
        try baseline.start()
        baseline.release(at: Clock.nanoseconds())
        let b = baseline.join()

        let w = r.workload
        let s = r.stats
        ctx.record("total_time", Double(w.endNS - w.startNS) / 1e9, .s, better: .lower)
        ctx.record("time_to_first_response", Double(w.firstResponseNS &- w.startNS) / 1e9, .s, better: .lower)
        ctx.record("bytes_transferred", Double(s.bytesCopied), .bytes, better: .lower)
        ctx.record("link_bytes", 0, .bytes, better: .none)
        ctx.record("faults_remote", Double(s.copies), .count, better: .lower)
        ctx.record("faults_local", Double(s.zeroFaults), .count, better: .none)
        ctx.record("faults_joined", Double(s.eexist), .count, better: .none)
        ctx.record("uffd_ioctls", Double(s.ioctls), .count, better: .none)
        ctx.record("handler_cpu_time", Double(s.cpuNS) / 1e9, .s, better: .lower)
        ctx.record("handler_pid", Double(s.pid), .count, better: .none)
        var h = Histogram<UInt64>(highestTrackableValue: 600_000_000_000, numberOfSignificantValueDigits: .three)
        for v in s.latencies { _ = h.record(max(v, 1)) }
        if !s.latencies.isEmpty { ctx.recordLatency("fault_latency", h, percentiles: [50, 99, 99.9, 100]) }
        var ft = Histogram<UInt64>(highestTrackableValue: 600_000_000_000, numberOfSignificantValueDigits: .three)
        for v in w.firstTouchNS { _ = ft.record(max(v, 1)) }
        if !w.firstTouchNS.isEmpty { ctx.recordLatency("first_touch_latency", ft) }
        ctx.record("blocked_time", Double(w.blockedNS) / 1e9, .s, better: .lower)
        let touched = traces.distinctPages
        ctx.record("pages_touched", Double(touched), .pages, better: .none)
        ctx.record("duplicate_transfers", Double(s.eexist), .count, better: .lower)
        ctx.record("ops_per_second", w.opsPerSecond, .count, better: .higher)
        ctx.record("resident_ops_per_second", b.opsPerSecond, .count, better: .higher)
        ctx.record("slowdown", w.opsPerSecond > 0 ? b.opsPerSecond / w.opsPerSecond : 0, .ratio, better: .lower)

        ctx.check("handler_in_another_process", expected: 1, observed: s.pid == handler.pid && s.pid != getpid() ? 1 : 0, tolerance: 0,
                  describe: "the faults were served by the handler process we started (pid \(handler.pid), checked by SO_PEERCRED and its own getpid), not by the restoring process (pid \(getpid()))")
        ctx.check("contents_match_source", expected: 0, observed: Double(r.mismatched), tolerance: 0,
                  describe: "installed pages (resident after the restore, mincore) differing from the source image (memcmp, after unregister)")
        ctx.check("touched_pages_installed", expected: 0, observed: Double(r.touchedNotInstalled), tolerance: 0,
                  describe: "pages the workload touched that the handler never installed")
        ctx.check("handler_installed_resident_pages", expected: Double(s.copies + s.zeroFaults), observed: Double(r.residentPages), tolerance: 0,
                  describe: "pages resident in the region (mincore) = the handler's UFFDIO_COPY + UFFDIO_ZEROPAGE installs")
        if p.threads == 1 {
            ctx.check("faults_equal_distinct_pages", expected: Double(touched), observed: Double(s.copies + s.zeroFaults), tolerance: 0,
                      describe: "on demand, one thread: the handler's installs = distinct pages touched")
        }

        if p.floors == .measure {
            let (inP, ex) = try measureHop(handler: handler, wait: p.wait)
            func pct(_ v: [UInt64], _ q: Double) -> Double {
                var hh = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
                for x in v { _ = hh.record(max(x, 1)) }
                return Double(hh.valueAtPercentile(q))
            }
            let i50 = pct(inP, 50), e50 = pct(ex, 50)
            ctx.record("inprocess_fault_round_trip", i50, .ns, better: .lower)
            ctx.record("inprocess_fault_round_trip_p99", pct(inP, 99), .ns, better: .lower)
            ctx.record("external_fault_round_trip", e50, .ns, better: .lower)
            ctx.record("external_fault_round_trip_p99", pct(ex, 99), .ns, better: .lower)
            ctx.record("external_hop_added", e50 - i50, .ns, better: .lower)
            ctx.record("external_hop_ratio", i50 > 0 ? e50 / i50 : 0, .ratio, better: .lower)
            ctx.note("hop calibration: \(inP.count) + \(ex.count) sequential first touches (1024 pages, wait=\(p.wait.rawValue), alternating in-process engine / handler process pid \(handler.pid)); external_hop_ratio = external ÷ in-process median round trip (goal ≤ 1.3)")
        } else {
            ctx.note("floors=off: the hop calibration (external_hop_ratio) was not measured")
        }
        ctx.note("handler=external: faults resolved by handler process pid \(handler.pid) (memlab _uffdhandler) through the userfaultfd this process passed over SCM_RIGHTS; fault_latency is the handler's (read → installed), first_touch_latency the workload's")
        withExtendedLifetime(resident) {}
    }
}
