#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM
import Transfer

/// Everything one lazy restore measured: the engine's own counters, and what the restore
/// found by looking at the region and the workload afterwards.
struct RestoreOutcome {
    var workload = WorkloadOutcome()
    var engine = FaultEngine.Counters()
    var failed: String?
    /// Bytes really moved (pages sent × the page size), whatever the link; and the bytes the
    /// emulated link booked (0 with link=none: nothing crossed a modelled link).
    var bytes: UInt64 = 0
    var linkBytes: UInt64 = 0
    var duplicates = 0
    var mismatched = 0
    var touchedNotInstalled = 0
    var installedByPrefetch = 0
    var usefulPrefetch = 0
    var fullyInstalledS: Double?
    /// Pages sent (sum over pages of transfers), and what the real source delivered.
    var pagesSent = 0
    var sourceRequests = 0
    var sourceBytes = 0
    var sourceFetchNS: UInt64 = 0
    /// Pages the application dropped (REMOVE/UNMAP), and those that do not read as zero after.
    var droppedPages = 0
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
    /// Whether the region ended elsewhere (REMAP), the workload's mremap errno, and the
    /// forked child's page mismatches (-1/-2: fork failed/killed).
    var regionMoved = false
    var moveErrno: Int32 = 0
    var forkChildMismatches: Int?
    /// region=hugetlb: huge pages of the 2 MiB pool this restore put in use (in use at the
    /// end, before the region is unmapped, less in use before it was mapped).
    var hugetlbPagesInUse: Int?
}

/// What the destination region is: anonymous memory, a memfd (shmem), or hugetlbfs (2 MiB).
enum RestoreRegion: Equatable { case anon, memfd, hugetlb }

/// One lazy restore: a fresh region registered with userfaultfd, handler threads, a pusher
/// if the policy has one, the workload released at `resume`; torn down and verified.
func performRestore(config: EngineConfig, image: PageImage, traces: AccessTraces, link: EmulatedLink,
                    reapOrder: [Int32]?, deadlineS: Double, injectFailureAfterS: Double? = nil,
                    source: PageSource? = nil, killSourceAfterS: Double? = nil, dropEvery: Int = 0,
                    remapAfter: Int = 0, forkAfter: Int = 0, region regionKind: RestoreRegion = .anon,
                    untilResident: Bool = false) throws -> RestoreOutcome {
    let remote = source.flatMap { $0.kind == .memory ? nil : $0 }
    // A source may serve several restores (working-set-replay): count this one's share.
    let requests0 = remote?.requests.load(ordering: .relaxed) ?? 0
    let bytes0 = remote?.bytesReceived.load(ordering: .relaxed) ?? 0
    let fetch0 = remote?.fetchNS.load(ordering: .relaxed) ?? 0
    let pages = image.pages
    let pageSize = image.pageSize
    let length = image.bytes
    // The destination region and, where the resolve mode needs one, its staging memory.
    var anon: AnonymousMapping?
    var file: FileMapping?
    var cache: FileMapping?
    var stagingAnon: AnonymousMapping?
    var region: UnsafeMutableRawPointer
    var staging: UnsafeMutableRawPointer?
    func hugetlbInUse() -> Int { HugeTLB.pool(pageBytes: 2 << 20).map { $0.total - $0.free } ?? 0 }
    let hugetlbBefore = regionKind == .hugetlb ? hugetlbInUse() : 0
    switch config.resolve {
    case .continue:
        // MINOR faults: a memfd (shmem, or hugetlbfs with MFD_HUGETLB) whose page cache is
        // filled first through a second mapping; the registered one maps it on CONTINUE.
        let f = try FileMapping.memfd(name: "memlab-lazy-restore", length: length, hugetlb: regionKind == .hugetlb)
        let c = try FileMapping(fd: f.fd, length: length)
        memset(c.base, 0, length) // every page in the page cache: MINOR faults, not MISSING
        file = f; cache = c
        region = f.base
        staging = c.base
    case .move:
        if let remote {
            // Fetched pages land in the landing buffer and are moved out of it.
            staging = remote.landing
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
    case .copy where regionKind == .hugetlb:
        // hugetlbfs in MISSING mode: each fault is answered by one UFFDIO_COPY of 2 MiB.
        anon = try AnonymousMapping(length: length, kind: .hugetlb2M)
        region = anon!.base
    case .copy:
        anon = try AnonymousMapping(length: length, kind: config.policy == .huge ? .thp : .base)
        region = anon!.base
    }
    var features: Userfaultfd.Features = [.threadID, .eventRemove, .eventUnmap]
    if config.resolve == .continue { features.insert(regionKind == .hugetlb ? .minorHugetlbfs : .minorShmem) }
    if config.resolve == .copy && regionKind == .hugetlb { features.insert(.missingHugetlbfs) }
    if config.shmemRegion { features.insert(.missingShmem) }
    // Followed, not just survived: a whole-region mremap and a fork of the restored process.
    if remapAfter > 0 { features.insert(.eventRemap) }
    if forkAfter > 0 { features.insert(.eventFork) }
    if config.resolve == .move { features.insert(.move) }
    let uffd = try Userfaultfd.Descriptor(features: features, nonBlocking: config.wait != .blocking)

    var cfg = config
    if reapOrder != nil { cfg.pushOrder = [] }
    let engine = try FaultEngine(config: cfg, region: region, mode: config.resolve == .continue ? .minor : .missing,
                                 staging: staging, image: image, link: link, uffd: uffd, source: remote)
    let workload = WorkloadRun(traces: traces, region: region, seed: image.seed, dropEvery: dropEvery,
                               remapAfter: remapAfter, forkAfter: forkAfter, expected: UnsafeRawPointer(image.base))
    try workload.start()
    // The threads exist and wait: their tids attribute each fault (before any handler runs).
    try engine.start(workloadThreads: workload.tids)

    // Resume.
    let resume = Clock.nanoseconds()
    if let reapOrder { engine.prefetchBlocking(reapOrder) }
    if cfg.pusher { try engine.startPusher() }
    let released = Clock.nanoseconds()
    workload.release(at: resume)

    var out = RestoreOutcome()
    let deadline = resume + UInt64(deadlineS * 1e9)
    var injected = false
    var killed = false
    // push_until=resident: the restore ends when every page is in, not when the workload
    // is done (the pusher's time to a fully resident region is then always measured).
    while !workload.done || (untilResident && cfg.pusher && !engine.isComplete) {
        let now = Clock.nanoseconds()
        if let inject = injectFailureAfterS, !injected, now > resume + UInt64(inject * 1e9) {
            engine.fail(errno: EPIPE, reason: SystemError(errno: EPIPE, call: "source (injected failure)").description)
            injected = true
        }
        if let k = killSourceAfterS, let remote, remote.pid > 0, !killed, now > resume + UInt64(k * 1e9) {
            // Testing: the source process dies mid-run, as a crashed host would.
            kill(remote.pid, SIGKILL)
            killed = true
        }
        // A dead source process is a failure at once, whether or not a fetch is waiting on it.
        if let remote, let end = remote.died() { engine.fail(errno: ECONNRESET, reason: end) }
        if let failure = engine.failure {
            out.failed = "the page source failed (\(failure.reason)) \(Double((now - resume) / 1_000_000) / 1000) s after resume; the workload was released by unregistering the region"
        } else if now > deadline {
            out.failed = "the restore did not finish within \(deadlineS) s; the workload was released by unregistering the region"
        }
        if out.failed != nil {
            // Waiting threads are woken and fault normally from now on: never a hang.
            engine.releaseRegion()
            break
        }
        // A coarse watchdog (deadline, failures, a dead source): a fine-grained one would
        // wake a vCPU a thousand times a second and so change the very wake-up latency the
        // fault round trip is made of.
        Clock.sleep(until: now + (workload.done ? 2_000_000 : 20_000_000), spinNS: 0)
    }
    let w = workload.join()
    out.engine = engine.stop()
    // The workload may have moved the region (REMAP): verify where it is now.
    let original = region
    region = engine.region
    let moved = region != original

    out.workload = w
    out.linkBytes = link.bytesTransferred
    out.downtimeNS = released &- resume
    if out.failed == nil {
        let threads = min(traces.threads, FaultEngine.maxThreads)
        out.faultsPerThread = Array(out.engine.faultsPerThread[0..<threads])
        out.faultsUnattributed = out.engine.faultsUnattributed + out.engine.faultsPerThread[threads...].reduce(0, +)
    }
    if out.engine.fullyInstalledAt > 0 { out.fullyInstalledS = Double(out.engine.fullyInstalledAt - resume) / 1e9 }
    if let remote {
        out.sourceRequests = remote.requests.load(ordering: .relaxed) - requests0
        out.sourceBytes = remote.bytesReceived.load(ordering: .relaxed) - bytes0
        out.sourceFetchNS = remote.fetchNS.load(ordering: .relaxed) &- fetch0
    }
    var installed = [Bool](repeating: false, count: pages)
    var dropped = [Bool](repeating: false, count: pages)
    for p in 0..<pages {
        let r = engine.page(p)
        dropped[p] = r.dropped
        if dropped[p] { out.droppedPages += 1 }
        // A page the application dropped is checked for zero below, not against the source.
        installed[p] = !dropped[p] && r.installed != nil
        out.pagesSent += r.transfers
        if r.transfers > 1 { out.duplicates += r.transfers - 1 }
        if r.installed == .byPush {
            out.installedByPrefetch += 1
            if traces.touched[p] != 0 { out.usefulPrefetch += 1 }
        }
        if traces.touched[p] != 0 && !installed[p] && !dropped[p] { out.touchedNotInstalled += 1 }
    }
    out.duplicates += out.engine.eexist
    // What was really moved: every transfer of a page, with a link modelled or not (the
    // link's own count is 0 with link=none, where no transfer is booked on it).
    out.bytes = UInt64(out.pagesSent) &* UInt64(pageSize)
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
            let zero = [UInt8](repeating: 0, count: pageSize)
            for p in 0..<pages where dropped[p] && memcmp(region + p * pageSize, zero, pageSize) != 0 { out.droppedNonZero += 1 }
        }
    }
    if regionKind == .hugetlb { out.hugetlbPagesInUse = hugetlbInUse() - hugetlbBefore }
    out.regionMoved = moved
    out.moveErrno = workload.moveErrno.load(ordering: .relaxed)
    if forkAfter > 0 { out.forkChildMismatches = workload.forkResult.load(ordering: .relaxed) }
    // The moved region is ours to unmap; the placeholder left at the old address goes with
    // the original mapping.
    if moved { munmap(region, length) }
    withExtendedLifetime((anon, file, cache, stagingAnon)) {}
    return out
}
