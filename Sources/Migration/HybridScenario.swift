#if canImport(Glibc)
import Glibc
#endif
import Histogram
import LabKit
import LinuxMM
import Transfer

extension MigrationScenario {
    /// hybrid and postcopy: the same source region, workload and link as precopy; see
    /// HybridEngine for the switch.
    func runHybrid(_ ctx: RunContext, _ variant: Variant, _ p: Values) throws {
        let page = System.pageSize
        let source = try AnonymousMapping(length: p.size)
        let pages = source.length / page
        fillImage(source.base, length: source.length, seed: 0x6D69_6772 &+ UInt64(ctx.repetition),
                  zeroRatio: p.zeroRatio, compressibility: p.compressibility)
        let model = LinkModel(bandwidth: p.bandwidthMbit * 1e6 / 8, rtt: p.rttMs / 1000)
        let link = try EmulatedPageLink(model: model, length: source.length, encoding: encoding(p))
        let tracker = try makeTracker(p.tracking, base: source.base, length: source.length)
        defer { tracker.close() }
        let hot = Int((Double(pages) * p.hotFraction).rounded(.up))
        let rate = Double(p.dirtyRate)
        let threads = p.threads
        let workload = DirtyWorkload(base: source.base, pages: pages, hotPages: hot, rate: rate, threads: threads)
        let rounds = variant == .postcopy ? 0 : p.precopyRounds
        let engine = HybridEngine(model: model, precopyRounds: rounds, policy: p.postcopyPolicy.engine,
                                  preempt: p.queue == .preempt, drainAfter: p.drainAfterS,
                                  deadline: max(p.timeoutS - 5, 1), throttle: throttlePolicy(p), costs: try switchCosts(p, ctx))
        try workload.start(seed: 0x5EED &+ UInt64(ctx.repetition))
        defer { workload.stop() }
        let out = try engine.run(source: source, tracker: tracker, workload: workload, link: link,
                                 destinationWorkload: { DirtyWorkload(base: $0, pages: pages, hotPages: hot, rate: rate, threads: threads, preservesValues: true) },
                                 seed: 0xD57 &+ UInt64(ctx.repetition))
        Self.record(out, model: model, pageSize: page, pages: pages, ctx: ctx,
                    fault: FaultModel(policy: p.postcopyPolicy, preempt: p.queue == .preempt, pushWindowBytes: EngineConfig().pushWindowBytes))
        Self.recordThrottle(out.rounds, engagedAt: out.throttleEngagedAt, triggers: out.throttleTriggers,
                            throttledSeconds: out.throttledSeconds, threads: threads, policy: throttlePolicy(p), ctx: ctx)
        if let e = out.encoding { Self.recordEncoding(e, decodeCPU: out.decodeCPU, pageSize: page, ctx: ctx) }
        ctx.note("dirty tracking: \(tracker.mechanism); post-copy: the Transfer layer's fault engine, policy \(p.postcopyPolicy.rawValue), queue \(p.queue.rawValue), UFFDIO_COPY from the paused source")
    }

    /// Records a hybrid outcome with the pre-copy and post-copy names (docs/results-format.md, QEMU).
    /// What a post-copy fault should cost on the link: the request's round trip and the page's
    /// wire time, plus, on a FIFO link with a pusher, the push window booked ahead of it (the
    /// preempt channel skips that queue). nil where the policy's behaviour has no such rule.
    public struct FaultModel: Sendable {
        public var policy: PostcopyPolicy
        public var preempt: Bool
        public var pushWindowBytes: Int
        func predictedLatency(_ model: LinkModel, pageSize: Int) -> Double? {
            switch policy {
            case .backgroundPush: return model.rtt + model.wireTime(bytes: pageSize) + (preempt ? 0 : model.wireTime(bytes: pushWindowBytes))
            case .onDemand: return model.rtt + model.wireTime(bytes: pageSize)
            case .faultAround, .bubble, .criuPush: return nil
            }
        }
    }

    public static func record(_ out: HybridOutcome, model: LinkModel, pageSize: Int, pages: Int, ctx: RunContext, fault: FaultModel? = nil) {
        let pc = out.postcopy
        let postPages = pc.installedPending
        let precopyBytes = out.precopyBytes > 0 ? out.precopyBytes : out.precopyPages * pageSize
        let bytes = Double(precopyBytes + out.switchBytes) + Double(pc.bytes)
        ctx.record("total_time", out.totalTime, .s, better: .lower)
        ctx.record("downtime", out.downtime, .s, better: .lower)
        ctx.record("predicted_downtime", out.predictedDowntime, .s, better: .none)
        for (name, seconds) in out.switchSteps { ctx.record("switch_\(name)_time", seconds, .s, better: .lower) }
        if out.predictedDowntime > 0 { ctx.record("downtime_model_ratio", out.downtime / out.predictedDowntime, .ratio, better: .none) }
        ctx.record("bytes_transferred", bytes, .bytes, better: .lower)
        ctx.record("pages_transferred", Double(out.precopyPages + postPages), .pages, better: .lower)
        ctx.record("transferred_ratio", Double(out.precopyPages + postPages) / Double(pages), .ratio, better: .lower)
        ctx.record("dirty_sync_count", Double(out.dirtySyncCount), .count, better: .none)
        ctx.record("dirty_sync_time", out.syncTime, .s, better: .lower)
        ctx.record("rounds", Double(out.rounds.count), .count, better: .none)
        // What each phase sent.
        ctx.record("precopy_pages", Double(out.precopyPages), .pages, better: .none)
        ctx.record("precopy_bytes", Double(precopyBytes), .bytes, better: .none)
        ctx.record("switch_pages", Double(out.switchPages), .pages, better: .lower)
        ctx.record("switch_bytes", Double(out.switchBytes), .bytes, better: .none)
        ctx.record("postcopy_pages", Double(postPages), .pages, better: .none)
        ctx.record("postcopy_bytes", Double(pc.bytes), .bytes, better: .none)
        ctx.record("postcopy_time", out.postcopyTime, .s, better: .lower)
        ctx.record("postcopy_requests", Double(pc.engine.remoteFaults), .count, better: .lower)
        ctx.record("faults_served_by_prefetch", Double(pc.engine.prefetchServedFaults), .count, better: .none)
        ctx.record("faults_joined", Double(pc.engine.joinedFaults), .count, better: .none)
        ctx.record("pages_pushed", Double(pc.engine.pushedPages), .pages, better: .none)
        ctx.record("duplicate_transfers", Double(pc.duplicates), .count, better: .lower)
        if let f = fault, let predicted = f.predictedLatency(model, pageSize: pageSize), !pc.engine.faultLatencyNS.isEmpty {
            let sorted = pc.engine.faultLatencyNS.sorted()
            let median = Double(sorted[sorted.count / 2]) / 1e9
            ctx.record("predicted_fault_latency", predicted, .s, better: .none)
            ctx.record("fault_latency_model_ratio", median / predicted, .ratio, better: .none)
        }
        if !pc.engine.faultLatencyNS.isEmpty {
            var h = Histogram<UInt64>(highestTrackableValue: 600_000_000_000, numberOfSignificantValueDigits: .three)
            for v in pc.engine.faultLatencyNS { _ = h.record(max(v, 1)) }
            ctx.recordLatency("fault_latency", h)
        }
        ctx.record("handler_cpu_time", pc.engine.handlerCPUSeconds, .s, better: .lower)
        ctx.record("workload_write_rate", out.sourceWriteRate, .pagesPerSecond, better: .none)
        ctx.record("destination_write_rate", out.destinationWriteRate, .pagesPerSecond, better: .higher)
        let predictedPre = out.rounds.reduce(0.0) { $0 + model.roundTime(bytes: $1.bytesSent > 0 ? $1.bytesSent : $1.pagesSent * pageSize, cpu: $1.encodeSeconds) }
        // Post-copy at best moves the switch set at link speed (one RTT for the first request).
        let predictedTotal = predictedPre + out.predictedDowntime + model.wireTime(bytes: out.switchPages * pageSize) + model.rtt
        ctx.record("predicted_total_time", predictedTotal, .s, better: .none)
        if predictedTotal > 0 { ctx.record("total_time_model_ratio", out.totalTime / predictedTotal, .ratio, better: .none) }
        if !out.rounds.isEmpty {
            let t = out.rounds.map(\.endTime)
            let iv = t.count > 1 ? (t.last! / Double(t.count)) : (t.first ?? 0)
            ctx.record(TimeSeries(name: "round_pages_sent", unit: .pages, intervalS: iv, t: t, values: out.rounds.map { Double($0.pagesSent) }))
            ctx.record(TimeSeries(name: "round_dirty_pages", unit: .pages, intervalS: iv, t: t, values: out.rounds.map { Double($0.dirtyPages) }))
            ctx.record(TimeSeries(name: "round_dirty_rate", unit: .pagesPerSecond, intervalS: iv, t: t, values: out.rounds.map(\.dirtyRate)))
        }
        ctx.check("destination_checksum", expected: Double(out.sourceChecksum >> 11), observed: Double(out.destinationChecksum >> 11),
                  tolerance: 0, describe: "checksum of the destination equals the source's at stop time (top 53 bits)")
        ctx.check("destination_mismatched_pages", expected: 0, observed: Double(out.mismatchedPages), tolerance: 0,
                  describe: "every destination page equals the source page at stop time (the destination workload rewrites values in place)")
        ctx.check("postcopy_pages_moved_once", expected: Double(out.switchPages), observed: Double(pc.installedPending), tolerance: 0,
                  describe: "every page missing at the switch was installed by the fault engine")
        ctx.check("duplicate_transfers", expected: 0, observed: Double(pc.duplicates), tolerance: 0,
                  describe: "pages sent more than once after the switch, plus EEXIST conflicts")
        ctx.check("postcopy_pages_outside_switch_set", expected: 0, observed: Double(pc.transferredOutsidePending), tolerance: 0,
                  describe: "pages already at the destination that post-copy sent again")
        if let d = out.drainStartedAfter {
            ctx.note("on-demand: \(pc.engine.remoteFaults) pages faulted in; the rest was drained by a linear push from \(formatNumber(d)) s after the resume")
        }
    }
}
