#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LinuxMM
import Transfer

/// What a post-copy phase measured, read after `finish()`.
public struct PostcopyPhaseOutcome: Sendable {
    /// Pages that were missing at the switch.
    public var pendingPages = 0
    /// Pages of the pending set installed by the engine (must equal `pendingPages`).
    public var installedPending = 0
    /// Pages transferred more than once, plus EEXIST conflicts (must be 0).
    public var duplicates = 0
    /// Pages outside the pending set that the engine transferred (must be 0).
    public var transferredOutsidePending = 0
    public var bytes: UInt64 = 0
    /// The engine's own counts (faults by how they were served, pushed pages, latencies,
    /// when the last page landed, CPU time, failure).
    public var engine = FaultEngine.Counters()
}

/// Post-copy for the pages still missing at the destination (hybrid migration): the
/// destination region already holds most pages (pre-copy put them there); the Transfer
/// layer's fault engine serves the rest over an `EmulatedLink`, exactly as it serves a lazy
/// restore. Made before the switch (the allocations and the threads' buffers are not
/// downtime); `arm` is the switch; `finish` stops everything.
public final class PostcopyPhase {
    public static let policies: [EngineConfig.Policy] = [.onDemand, .backgroundPush, .faultAround, .bubble, .criuPush]

    let engine: FaultEngine
    let link: EmulatedLink
    private var pending: [Bool] = []

    /// - source: the migration source's memory (read by UFFDIO_COPY; must not change after
    ///   `arm`); region: the destination mapping, same length.
    public init(policy: EngineConfig.Policy, source: AnonymousMapping, destination region: UnsafeMutableRawPointer,
                bytesPerSecond: Double, rttS: Double, preempt: Bool, handlerThreads: Int = 1) throws {
        guard PostcopyPhase.policies.contains(policy) else {
            throw SystemError(errno: EINVAL, call: "post-copy policy \(policy.rawValue)")
        }
        var cfg = EngineConfig()
        cfg.policy = policy
        cfg.resolve = .copy
        cfg.wait = .blocking
        cfg.handlerThreads = max(1, handlerThreads)
        cfg.zeropage = false
        link = EmulatedLink(bytesPerSecond: bytesPerSecond, rttNS: UInt64(rttS * 1e9), preempt: preempt)
        // No REMOVE/UNMAP events: nothing drops destination pages during the phase.
        let uffd = try Userfaultfd.Descriptor(features: [.threadID], nonBlocking: false)
        engine = try FaultEngine(config: cfg, region: region, staging: nil, image: PageImage(wrapping: source),
                                 link: link, uffd: uffd)
    }

    /// The switch: the pages in `pendingPages` must be missing from the destination (never
    /// populated, or dropped with MADV_DONTNEED), every other page present. Starts the engine
    /// (and, per policy, its pusher).
    public func arm(pendingPages: [Int]) throws {
        pending = [Bool](repeating: false, count: engine.pages)
        for p in pendingPages { pending[p] = true }
        engine.markPresent { !pending[$0] }
        try engine.start()
        if engine.config.pusher { try engine.startPusher() }
    }

    /// Starts a linear push of whatever is still missing (on-demand's drain: the migration
    /// completes only when every page is at the destination). No-op if a pusher runs.
    public func startPusher() throws { try engine.startPusher() }

    /// Every pending page is installed.
    public var complete: Bool { engine.isComplete }
    public var failed: Bool { engine.failure != nil }

    /// Stops the engine (call after the destination's workload stopped touching the region,
    /// or after a failure) and reads what it did.
    public func finish() -> PostcopyPhaseOutcome {
        var out = PostcopyPhaseOutcome()
        out.engine = engine.stop()
        for p in 0..<engine.pages {
            let r = engine.page(p)
            if r.transfers > 1 { out.duplicates += r.transfers - 1 }
            if pending[p] {
                out.pendingPages += 1
                if r.installed == .byFault || r.installed == .byPush { out.installedPending += 1 }
            } else if r.transfers > 0 {
                out.transferredOutsidePending += 1
            }
        }
        out.duplicates += out.engine.eexist
        out.bytes = link.bytesTransferred
        return out
    }
}
