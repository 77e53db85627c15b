#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LinuxMM
import Transfer

/// What a hybrid (or pure post-copy) migration measured.
public struct HybridOutcome: Sendable {
    public var rounds: [PrecopyRound] = []
    /// Pages sent by the pre-copy rounds (re-sends included).
    public var precopyPages = 0
    /// Bytes of the switch message: the bitmap of pages the destination must drop and fault in.
    public var switchBytes = 0
    /// Pages missing at the destination at the switch (dirty since their last send, or never sent).
    public var switchPages = 0
    public var dirtySyncCount = 0
    public var syncTime = 0.0
    /// Workload stopped at the source → running on the destination region.
    public var downtime = 0.0
    public var predictedDowntime = 0.0
    /// Migration start → the last page installed at the destination.
    public var totalTime = 0.0
    /// Resume at the destination → the last page installed.
    public var postcopyTime = 0.0
    public var postcopy = PostcopyPhaseOutcome()
    /// Destination pages differing from the source at stop time (after everything arrived).
    public var mismatchedPages = 0
    public var sourceChecksum: UInt64 = 0
    public var destinationChecksum: UInt64 = 0
    public var sourceWriteRate = 0.0
    public var destinationWriteRate = 0.0
    public var destinationWrites = 0
    /// on-demand: when the drain (a linear push of what was never faulted) started, s after resume.
    public var drainStartedAfter: Double?
    public var throttleEngagedAt: Double?
    public var throttleTriggers = 0
    public var throttledSeconds = 0.0
    /// Bytes the pre-copy rounds put on the link (after encoding).
    public var precopyBytes = 0
    public var encoding: EncoderStats?
    public var decodeCPU: Double?
    /// The switch, step by step (seconds): stop, sync, bitmap, discard, arm, resume.
    public var switchSteps: [(String, Double)] = []
}

/// Hybrid migration: `precopyRounds` pre-copy rounds into the destination mapping (0: pure
/// post-copy), then the workload is stopped at the source; the switch drops the pages dirtied
/// since their last send from the destination (MADV_DONTNEED: they read as missing), registers
/// the destination region with userfaultfd, and resumes the workload there. Its faults are
/// served by the Transfer layer's fault engine (PostcopyPhase) over an EmulatedLink with the same
/// bandwidth and RTT as the pre-copy link, with the chosen policy. The source stays paused;
/// its memory is what the engine copies from and what the destination is compared with.
public struct HybridEngine {
    public let model: LinkModel
    public let precopyRounds: Int
    public let policy: EngineConfig.Policy
    public let preempt: Bool
    /// on-demand: start a linear drain this long after the resume (else the migration would
    /// never end for pages the workload does not touch).
    public let drainAfter: Double
    public let deadline: Double
    public let throttle: ThrottlePolicy
    public let costs: SwitchCosts?

    public init(model: LinkModel, precopyRounds: Int, policy: EngineConfig.Policy, preempt: Bool, drainAfter: Double, deadline: Double,
                throttle: ThrottlePolicy = .none, costs: SwitchCosts? = nil) {
        self.costs = costs
        self.throttle = throttle
        self.model = model
        self.precopyRounds = precopyRounds
        self.policy = policy
        self.preempt = preempt
        self.drainAfter = drainAfter
        self.deadline = deadline
    }

    public func run(source: AnonymousMapping, tracker: DirtyTracker, workload: DirtyWorkload,
                    link: EmulatedPageLink, destinationWorkload makeWorkload: (UnsafeMutableRawPointer) -> DirtyWorkload,
                    seed: UInt64) throws -> HybridOutcome {
        let page = System.pageSize
        let length = source.length
        let pageCount = length / page
        let destination = link.destination
        var out = HybridOutcome()
        // Made before anything starts: the engine's arrays, the uffd, the doorbell.
        let phase = try PostcopyPhase(policy: policy, source: source, destination: destination.base,
                                      bytesPerSecond: model.bandwidth, rttS: model.rtt, preempt: preempt)
        try tracker.protectAll()
        let t0 = Clock.nanoseconds()
        var loop = RoundLoop(model: model, tracker: tracker, workload: workload, link: link, throttle: throttle,
                             pageCount: pageCount, t0: t0)
        var toSend = Array(0..<pageCount)
        for round in stride(from: 1, through: precopyRounds, by: 1) {
            let r = try loop.round(round, pages: toSend, region: source.base) { _ in model.roundTime(bytes: (pageCount + 7) / 8) }
            out.rounds.append(r)
            out.precopyPages += toSend.count
            toSend = loop.dirty
        }
        // Stop: pause the workload, take the last dirty set; what is missing at the
        // destination is what the last round's sync found (unsent) plus what was written since
        // (with no round at all: everything).
        let tStop = Clock.nanoseconds()
        workload.stop()
        var mark = Clock.nanoseconds()
        func step(_ name: String) {
            let now = Clock.nanoseconds()
            out.switchSteps.append((name, Double(now - mark) / 1e9))
            mark = now
        }
        step("stop")
        let pending = try loop.missingAtStop(unsent: toSend, rounds: precopyRounds, pageCount: pageCount)
        out.switchPages = pending.count
        step("sync")
        // The switch message: a bitmap of the region, then the destination's go-ahead.
        out.switchBytes = (pageCount + 7) / 8
        out.predictedDowntime = model.roundTime(bytes: out.switchBytes)
        link.control(bytes: out.switchBytes)
        step("bitmap")
        // The destination drops its stale copies (they fault in from the source from now on).
        let calls = try destination.discard(pages: pending, pageSize: page)
        step("discard")
        try phase.arm(pendingPages: pending)
        step("arm")
        let dst = makeWorkload(destination.base)
        try dst.start(seed: seed)
        // Whatever ends post-copy, the resumed writers stop before the region can go away.
        defer { dst.stop() }
        step("resume")
        let tResume = Clock.nanoseconds()
        out.downtime = Double(tResume - tStop) / 1e9
        if let c = costs {
            out.predictedDowntime += c.postcopySwitch(regionPages: pageCount, syncs: precopyRounds > 0, discardCalls: calls,
                                                      discardPages: pending.count, threads: dst.threads)
        }

        // Post-copy: the workload runs at the destination until every page is there.
        let end = tResume + UInt64(deadline * 1e9)
        var failure: String?
        while !phase.complete {
            let now = Clock.nanoseconds()
            if phase.failed { failure = "the fault engine failed"; break }
            if now > end { failure = "post-copy did not complete within \(deadline) s"; break }
            if policy == .onDemand && out.drainStartedAfter == nil && now >= tResume + UInt64(drainAfter * 1e9) {
                out.drainStartedAfter = Double(now - tResume) / 1e9
                try phase.startPusher()
            }
            Clock.sleep(until: now + 200_000, spinNS: 0)
        }
        dst.stop()
        out.postcopy = phase.finish()
        if let f = failure ?? out.postcopy.engine.failure?.reason { throw SystemError(errno: EIO, call: "hybrid migration: \(f)") }
        let done = out.postcopy.engine.fullyInstalledAt
        out.totalTime = Double(done - t0) / 1e9
        out.postcopyTime = done > tResume ? Double(done - tResume) / 1e9 : 0
        out.syncTime = Double(loop.syncNS) / 1e9
        out.dirtySyncCount = loop.syncCount
        out.throttleEngagedAt = loop.throttle.engagedAt
        out.throttleTriggers = loop.throttle.triggers
        out.throttledSeconds = workload.throttledSeconds
        out.precopyBytes = link.bytesOnWire
        out.encoding = link.encoder?.stats
        out.decodeCPU = link.decoder?.decodeCPU
        out.sourceWriteRate = workload.achievedRate
        out.destinationWriteRate = dst.achievedRate
        out.destinationWrites = dst.writes
        // The source has stayed paused since tStop; the destination workload only rewrote
        // values in place: both must be equal, page for page.
        for p in 0..<pageCount where memcmp(destination.base + p * page, source.base + p * page, page) != 0 {
            out.mismatchedPages += 1
        }
        out.sourceChecksum = regionChecksum(source.base, length: length)
        out.destinationChecksum = regionChecksum(destination.base, length: length)
        return out
    }
}

extension EmulatedPageLink {
    /// A control message of `bytes` (the switch bitmap) and the destination's answer: the
    /// wire time plus one round trip.
    public func control(bytes: Int) {
        Clock.sleep(until: Clock.nanoseconds() + UInt64(model.roundTime(bytes: bytes) * 1e9))
    }
}
