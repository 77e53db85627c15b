#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LinuxMM

// A narrow entry point into the fault engine for a migration's post-copy phase (hybrid
// migration, scenarios/migration): the destination region already holds most pages (pre-copy
// put them there); only the pages still missing are served, by the same FaultEngine, handler,
// delivery and pusher threads as a lazy restore, over an EmulatedLink. Additive: nothing in
// the lazy-restore scenario uses it.

extension PageImage {
    /// An image over memory someone else owns (a migration source, paused): nothing is
    /// filled, no page is declared zero (the source did not scan for them).
    init(wrapping mapping: AnonymousMapping, seed: UInt64 = 0) {
        self.pages = mapping.length / 4096
        self.seed = seed
        self.zeroRatio = 0
        self.mapping = mapping
        self.base = mapping.base
        self.zero = .allocate(capacity: max(pages, 1))
        self.zero.initialize(repeating: 0, count: max(pages, 1))
    }
}

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
    public var remoteFaults = 0, joinedFaults = 0, prefetchServedFaults = 0, localFaults = 0
    public var pushedPages = 0
    public var faultLatencyNS: [UInt64] = []
    /// CLOCK_MONOTONIC ns when the last pending page was installed (0: never).
    public var completedAt: UInt64 = 0
    public var handlerCPU = 0.0
    public var failure: String?
}

/// Post-copy for the pages still missing at the destination. Made before the switch (the
/// allocations and threads' buffers are not downtime); `arm` is the switch; `finish` stops
/// everything and unregisters.
public final class PostcopyPhase {
    public static let policies = ["on-demand", "background-push", "fault-around", "bubble"]

    let engine: FaultEngine
    let image: PageImage
    let link: EmulatedLink
    let uffd: Userfaultfd.Descriptor
    let doorbell: AnonymousMapping
    let region: UnsafeMutableRawPointer
    let length: Int
    private var handlers: [OSThread] = []
    private var delivery: OSThread?
    private var pusher: OSThread?
    private var pending: [Bool] = []
    private var registered = false

    /// - source: the migration source's memory (read by UFFDIO_COPY; must not change after
    ///   `arm`); region: the destination mapping, same length.
    public init(policy: String, source: AnonymousMapping, destination region: UnsafeMutableRawPointer,
                bytesPerSecond: Double, rttS: Double, preempt: Bool, handlerThreads: Int = 1) throws {
        guard let p = RestoreConfig.Policy(rawValue: policy), PostcopyPhase.policies.contains(policy) else {
            throw SystemError(errno: EINVAL, call: "post-copy policy \(policy)")
        }
        var cfg = RestoreConfig()
        cfg.policy = p
        cfg.resolve = .copy
        cfg.wait = .blocking
        cfg.handlerThreads = max(1, handlerThreads)
        cfg.zeropage = false
        self.image = PageImage(wrapping: source)
        self.link = EmulatedLink(bytesPerSecond: bytesPerSecond, rttNS: UInt64(rttS * 1e9), preempt: preempt)
        self.region = region
        self.length = source.length
        // No REMOVE/UNMAP events: nothing drops destination pages during the phase.
        self.uffd = try Userfaultfd.Descriptor(features: [.threadID], nonBlocking: false)
        self.doorbell = try AnonymousMapping(length: cfg.handlerThreads * 4096, kind: .base)
        self.engine = try FaultEngine(config: cfg, region: region, doorbell: doorbell.base, staging: nil,
                                      image: image, link: link, uffd: uffd)
    }

    deinit {
        if registered { try? uffd.unregister(region, length: length); try? uffd.unregister(doorbell.base, length: doorbell.length) }
        image.release()
    }

    /// The switch: the pages in `pendingPages` must be missing from the destination (never
    /// populated, or dropped with MADV_DONTNEED), every other page present. Registers the
    /// region (MISSING) and starts the handler, delivery and (per policy) pusher threads.
    public func arm(pendingPages: [Int]) throws {
        let pages = image.pages
        pending = [Bool](repeating: false, count: pages)
        for p in pendingPages { pending[p] = true }
        var present = 0
        for p in 0..<pages where !pending[p] {
            engine.state.store(p, PageState.installedLocal)
            present += 1
        }
        engine.claimed.store(present, ordering: .relaxed)
        if present == pages { engine.fullyInstalledAt.store(Clock.nanoseconds(), ordering: .relaxed) }
        try uffd.register(region, length: length, mode: .missing)
        try uffd.register(doorbell.base, length: doorbell.length, mode: .missing)
        registered = true
        let e = engine
        handlers = (0..<engine.config.handlerThreads).map { _ in OSThread { e.handlerLoop() } }
        delivery = OSThread { e.deliveryLoop() }
        if engine.config.pusher { startPusher() }
    }

    /// Starts a linear push of whatever is still missing (on-demand's drain: the migration
    /// completes only when every page is at the destination). No-op if a pusher runs.
    public func startPusher() {
        guard pusher == nil else { return }
        let e = engine
        pusher = OSThread { e.pusherLoop() }
    }

    /// Every pending page is installed.
    public var complete: Bool { engine.fullyInstalledAt.load(ordering: .relaxed) != 0 }
    public var failed: Bool { engine.failureErrno.load(ordering: .relaxed) != 0 }

    /// Stops the threads (call after the destination's workload stopped touching the
    /// region, or after a failure), unregisters, and reads the counters.
    public func finish() -> PostcopyPhaseOutcome {
        var out = PostcopyPhaseOutcome()
        let failedErrno = engine.failureErrno.load(ordering: .relaxed)
        engine.pusherStop.store(true, ordering: .releasing)
        pusher?.join()
        engine.deliveryStop.store(true, ordering: .releasing)
        engine.ringDelivery()
        delivery?.join()
        if registered {
            if failedErrno == 0 {
                // One doorbell per handler thread, rung through C: a Swift load whose value is
                // unused is removed by whole-module optimisation, and then the handlers never
                // hear the doorbell and the join hangs (release builds only).
                for i in 0..<engine.config.handlerThreads {
                    memlab_ref_touch(doorbell.base + i * 4096, 1, 4096)
                }
                for h in handlers { h.join() }
            }
            try? uffd.unregister(region, length: length)
            try? uffd.unregister(doorbell.base, length: doorbell.length)
            registered = false
        }
        if failedErrno != 0 {
            out.failure = "the fault engine failed: \(SystemError(errno: failedErrno, call: "post-copy").description)"
        }
        for p in 0..<image.pages {
            let t = Int(engine.transfers.load(p))
            if t > 1 { out.duplicates += t - 1 }
            if pending[p] {
                out.pendingPages += 1
                let s = engine.state.load(p)
                if s == PageState.installedFault || s == PageState.installedPrefetch { out.installedPending += 1 }
            } else if t > 0 {
                out.transferredOutsidePending += 1
            }
        }
        out.duplicates += engine.eexist.load(ordering: .relaxed)
        out.bytes = link.bytesTransferred
        out.remoteFaults = engine.remoteFaults.load(ordering: .relaxed)
        out.joinedFaults = engine.joinedFaults.load(ordering: .relaxed)
        out.prefetchServedFaults = engine.prefetchFaults.load(ordering: .relaxed)
        out.localFaults = engine.localFaults.load(ordering: .relaxed)
        out.pushedPages = engine.pushedPages.load(ordering: .relaxed)
        out.faultLatencyNS = engine.faultLatency.values
        out.completedAt = engine.fullyInstalledAt.load(ordering: .relaxed)
        out.handlerCPU = Double(engine.handlerCPU.load(ordering: .relaxed)) / 1e9
        return out
    }
}
