#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM

/// Everything one lazy restore measured.
struct RestoreOutcome {
    var workload = WorkloadOutcome()
    var failed: String?
    var bytes: UInt64 = 0
    var remote = 0, joined = 0, prefetchServed = 0, local = 0, messages = 0
    var eexist = 0, eagain = 0, ioctls = 0, wakes = 0
    /// Installs that found the region moved away under them (ENOENT) and were retried at its new address.
    var movedUnderInstall = 0
    var duplicates = 0
    var mismatched = 0
    var touchedNotInstalled = 0
    var installedByPrefetch = 0
    var usefulPrefetch = 0
    var faultLatency: [UInt64] = []
    var faultOrder: [Int32] = []
    var handlerCPU: Double = 0
    var fullyInstalledS: Double?
    /// Pages sent (sum over pages of transfers), and what the real source delivered.
    var pagesSent = 0
    var sourceRequests = 0
    var sourceBytes = 0
    var sourceFetchNS: UInt64 = 0
    /// EAGAIN handling and the application's own drops (REMOVE/UNMAP events).
    var deferredPages = 0
    var removeEvents = 0, unmapEvents = 0, droppedRefaults = 0
    var droppedPages = 0
    /// Dropped pages that do not read as zero after the restore.
    var droppedNonZero = 0
    /// Remote faults per workload thread (UFFD_FEATURE_THREAD_ID), and those whose tid was
    /// none of them.
    var faultsPerThread: [Int] = []
    var faultsUnattributed = 0
    /// Restore start (resume) → workload released: the before-resume prefetch (REAP), ns.
    var downtimeNS: UInt64 = 0
    /// region=memfd: pages installed, and pages of the memfd in the page cache (mincore).
    var installedPages = 0
    var shmemCachedPages: Int?
    /// REMAP and FORK: events seen, faults the fork server resolved for the child, whether
    /// the region ended elsewhere, and the child's page mismatches (-1/-2: fork failed/killed).
    var remapEvents = 0, forkEvents = 0, forkFaults = 0
    var regionMoved = false
    var moveErrno: Int32 = 0
    var forkChildMismatches: Int?
}

/// One lazy restore: a fresh region registered with userfaultfd, handler threads, a pusher
/// if the policy has one, the workload released at `resume`; torn down and verified.
func performRestore(config: RestoreConfig, image: PageImage, traces: AccessTraces, link: EmulatedLink,
                    reapOrder: [Int32]?, deadlineS: Double, injectFailureAfterS: Double? = nil,
                    source: PageSource? = nil, killSourceAfterS: Double? = nil, dropEvery: Int = 0,
                    remapAfter: Int = 0, forkAfter: Int = 0) throws -> RestoreOutcome {
    let remote = source.flatMap { $0.kind == .memory ? nil : $0 }
    // A source may serve several restores (working-set-replay): count this one's share.
    let requests0 = remote?.requests.load(ordering: .relaxed) ?? 0
    let bytes0 = remote?.bytesReceived.load(ordering: .relaxed) ?? 0
    let fetch0 = remote?.fetchNS.load(ordering: .relaxed) ?? 0
    let pages = image.pages
    let length = pages * 4096
    // The destination region and, where the resolve mode needs one, its staging memory.
    var anon: AnonymousMapping?
    var file: FileMapping?
    var cache: FileMapping?
    var stagingAnon: AnonymousMapping?
    var region: UnsafeMutableRawPointer
    var staging: UnsafeMutableRawPointer?
    switch config.resolve {
    case .continue:
        let f = try FileMapping.memfd(name: "memlab-lazy-restore", length: length)
        let c = try FileMapping(fd: f.fd, length: length)
        memset(c.base, 0, length) // every page in the page cache: MINOR faults, not MISSING
        file = f; cache = c
        region = f.base
        staging = c.base
    case .move:
        if let remote {
            // Fetched pages land in the landing buffer and are moved out of it.
            staging = remote.landing.base
        } else {
            let s = try AnonymousMapping(length: length, kind: .base)
            memcpy(s.base, image.base, length)
            stagingAnon = s
            staging = s.base
        }
        anon = try AnonymousMapping(length: length, kind: .base)
        region = anon!.base
    case .copy where config.shmemRegion:
        // Shmem in MISSING mode: UFFDIO_COPY / UFFDIO_ZEROPAGE allocate the page-cache page.
        file = try FileMapping.memfd(name: "memlab-lazy-restore", length: length)
        region = file!.base
    case .copy:
        anon = try AnonymousMapping(length: length, kind: config.policy == .huge ? .thp : .base)
        region = anon!.base
    }
    let doorbell = try AnonymousMapping(length: config.handlerThreads * 4096, kind: .base)
    var features: Userfaultfd.Features = [.threadID, .eventRemove, .eventUnmap]
    if config.resolve == .continue { features.insert(.minorShmem) }
    if config.shmemRegion { features.insert(.missingShmem) }
    // Followed, not just survived: a whole-region mremap and a fork of the restored process.
    if remapAfter > 0 { features.insert(.eventRemap) }
    if forkAfter > 0 { features.insert(.eventFork) }
    if config.resolve == .move { features.insert(.move) }
    let uffd = try Userfaultfd.Descriptor(features: features, nonBlocking: config.wait != .blocking)
    try uffd.register(region, length: length, mode: config.resolve == .continue ? .minor : .missing)
    try uffd.register(doorbell.base, length: doorbell.length, mode: .missing)
    var unregistered = false
    defer { if !unregistered { try? uffd.unregister(region, length: length) }; try? uffd.unregister(doorbell.base, length: doorbell.length) }

    var cfg = config
    if reapOrder != nil { cfg.pushOrder = [] }
    let engine = try FaultEngine(config: cfg, region: region, doorbell: doorbell.base, staging: staging,
                                 image: image, link: link, uffd: uffd, source: remote)
    let workload = WorkloadRun(traces: traces, region: region, seed: image.seed, dropEvery: dropEvery,
                               remapAfter: remapAfter, forkAfter: forkAfter, expected: UnsafeRawPointer(image.base))
    workload.start()
    // The threads exist and wait: their tids attribute each fault (before any handler runs).
    engine.setWorkloadThreads(workload.tids)
    let handlers = (0..<cfg.handlerThreads).map { i in OSThread { engine.handlerLoop(channel: i) } }
    let delivery = OSThread { engine.deliveryLoop() }

    // Resume.
    let resume = Clock.nanoseconds()
    if let reapOrder { engine.prefetchBlocking(reapOrder) }
    let pusher = cfg.pusher ? OSThread { engine.pusherLoop() } : nil
    let released = Clock.nanoseconds()
    workload.release(at: resume)

    var out = RestoreOutcome()
    let deadline = resume + UInt64(deadlineS * 1e9)
    var injected = false
    var killed = false
    while !workload.done {
        let now = Clock.nanoseconds()
        if let inject = injectFailureAfterS, !injected, now > resume + UInt64(inject * 1e9) {
            engine.fail(SystemError(errno: EPIPE, call: "source (injected failure)"))
            injected = true
        }
        if let k = killSourceAfterS, let remote, remote.pid > 0, !killed, now > resume + UInt64(k * 1e9) {
            // Testing: the source process dies mid-run, as a crashed host would.
            kill(remote.pid, SIGKILL)
            killed = true
        }
        // A dead source process is a failure at once, whether or not a fetch is waiting on it.
        if let remote, let end = remote.died() {
            engine.failureReason.withLock { if $0 == nil { $0 = end } }
            _ = engine.failureErrno.compareExchange(expected: 0, desired: ECONNRESET, ordering: .relaxed)
        }
        let errno = engine.failureErrno.load(ordering: .relaxed)
        if errno != 0 || now > deadline {
            let reason = engine.failureReason.withLock { $0 } ?? SystemError(errno: errno, call: "fault engine").description
            out.failed = errno != 0
                ? "the page source failed (\(reason)) \(Double((now - resume) / 1_000_000) / 1000) s after resume; the workload was released by unregistering the region"
                : "the restore did not finish within \(deadlineS) s; the workload was released by unregistering the region"
            // Waiting threads are woken and fault normally from now on: never a hang.
            try? uffd.unregister(engine.region, length: length)
            unregistered = true
            break
        }
        // A coarse watchdog (deadline, failures, a dead source): a fine-grained one would
        // wake a vCPU a thousand times a second and so change the very wake-up latency the
        // fault round trip is made of.
        Clock.sleep(until: now + 20_000_000, spinNS: 0)
    }
    let w = workload.join()
    engine.stopForkServers()
    // The workload may have moved the region (REMAP): unregister and verify where it is now.
    let original = region
    region = engine.region
    let moved = region != original
    engine.pusherStop.store(true, ordering: .releasing)
    pusher?.join()
    engine.deliveryStop.store(true, ordering: .releasing)
    engine.ringDelivery()
    delivery.join()
    if out.failed == nil {
        // One doorbell per handler thread: each leaves after answering one.
        for i in 0..<cfg.handlerThreads {
            // Through C: a Swift load whose value is unused is removed in release builds (then
            // the handler never hears the doorbell and the join hangs).
            memlab_ref_touch(doorbell.base + i * 4096, 1, 4096)
        }
        for h in handlers { h.join() }
    }
    if !unregistered { try uffd.unregister(region, length: length); unregistered = true }

    out.workload = w
    out.bytes = link.bytesTransferred
    out.remote = engine.remoteFaults.load(ordering: .relaxed)
    out.joined = engine.joinedFaults.load(ordering: .relaxed)
    out.prefetchServed = engine.prefetchFaults.load(ordering: .relaxed)
    out.local = engine.localFaults.load(ordering: .relaxed)
    out.messages = engine.messages.load(ordering: .relaxed)
    out.eexist = engine.eexist.load(ordering: .relaxed)
    out.eagain = engine.eagain.load(ordering: .relaxed)
    out.movedUnderInstall = engine.movedUnderInstall.load(ordering: .relaxed)
    out.ioctls = engine.ioctls.load(ordering: .relaxed)
    out.wakes = engine.wakes.load(ordering: .relaxed)
    out.downtimeNS = released &- resume
    out.deferredPages = engine.deferredPages.load(ordering: .relaxed)
    out.removeEvents = engine.removeEvents.load(ordering: .relaxed)
    out.unmapEvents = engine.unmapEvents.load(ordering: .relaxed)
    out.droppedRefaults = engine.droppedRefaults.load(ordering: .relaxed)
    if out.failed == nil {
        let t = engine.threadFaults.withLock { $0 }
        out.faultsPerThread = Array(t[0..<min(traces.threads, FaultEngine.maxThreads)])
        out.faultsUnattributed = t[FaultEngine.maxThreads] + t[min(traces.threads, FaultEngine.maxThreads)..<FaultEngine.maxThreads].reduce(0, +)
    }
    out.handlerCPU = Double(engine.handlerCPU.load(ordering: .relaxed)) / 1e9
    let full = engine.fullyInstalledAt.load(ordering: .relaxed)
    if full > 0 { out.fullyInstalledS = Double(full - resume) / 1e9 }
    out.faultLatency = engine.faultLatency.values
    if let remote {
        out.sourceRequests = remote.requests.load(ordering: .relaxed) - requests0
        out.sourceBytes = remote.bytesReceived.load(ordering: .relaxed) - bytes0
        out.sourceFetchNS = remote.fetchNS.load(ordering: .relaxed) &- fetch0
    }
    out.faultOrder = engine.faultOrder.values.map { Int32($0) }
    var installed = [Bool](repeating: false, count: pages)
    var dropped = [Bool](repeating: false, count: pages)
    for p in 0..<pages {
        let s = engine.state.load(p)
        dropped[p] = engine.dropped.load(p) != 0
        if dropped[p] { out.droppedPages += 1 }
        // A page the application dropped is checked for zero below, not against the source.
        installed[p] = !dropped[p] && (s == PageState.installedFault || s == PageState.installedPrefetch || s == PageState.installedLocal)
        out.pagesSent += Int(engine.transfers.load(p))
        if engine.transfers.load(p) > 1 { out.duplicates += Int(engine.transfers.load(p)) - 1 }
        if s == PageState.installedPrefetch {
            out.installedByPrefetch += 1
            if traces.touched[p] != 0 { out.usefulPrefetch += 1 }
        }
        if traces.touched[p] != 0 && !installed[p] && !dropped[p] { out.touchedNotInstalled += 1 }
    }
    out.duplicates += out.eexist
    out.installedPages = installed.reduce(0) { $0 + ($1 ? 1 : 0) }
    if config.shmemRegion && out.failed == nil {
        // UFFDIO_COPY / ZEROPAGE into shmem allocate page-cache pages: exactly the installed
        // ones must be resident in the memfd, and no other (mincore on the shared mapping).
        var vec = [UInt8](repeating: 0, count: pages)
        if mincore(region, length, &vec) == 0 { out.shmemCachedPages = vec.reduce(0) { $0 + Int($1 & 1) } }
    }
    if out.failed == nil {
        out.mismatched = image.mismatches(region) { installed[$0] }
        if out.droppedPages > 0 {
            let zero = UnsafeMutableRawPointer.allocate(byteCount: 4096, alignment: 4096)
            memset(zero, 0, 4096)
            for p in 0..<pages where dropped[p] && memcmp(region + p * 4096, zero, 4096) != 0 { out.droppedNonZero += 1 }
            zero.deallocate()
        }
    }
    out.remapEvents = engine.remapEvents.load(ordering: .relaxed)
    out.forkEvents = engine.forkEvents.load(ordering: .relaxed)
    out.forkFaults = engine.forkFaults.load(ordering: .relaxed)
    out.regionMoved = moved
    out.moveErrno = workload.moveErrno.load(ordering: .relaxed)
    if forkAfter > 0 { out.forkChildMismatches = workload.forkResult.load(ordering: .relaxed) }
    // The moved region is ours to unmap; the placeholder left at the old address goes with
    // the original mapping.
    if moved { munmap(region, length) }
    withExtendedLifetime((anon, file, cache, stagingAnon, doorbell)) {}
    return out
}

extension FaultEngine {
    /// Wakes the delivery thread (it re-reads its stop flag).
    func ringDelivery() {
        var one: UInt64 = 1
        _ = Glibc.write(eventFD, &one, 8)
    }
}
