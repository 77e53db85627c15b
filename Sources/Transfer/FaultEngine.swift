#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LinuxMM
import Synchronization

/// How the fault engine moves pages. Everything the fault path needs is decided here, before
/// the handler threads start.
public struct EngineConfig: Sendable {
    public enum Policy: String, Sendable, CaseIterable {
        case onDemand = "on-demand", faultAround = "fault-around", faultAroundAdaptive = "fault-around-adaptive"
        case backgroundPush = "background-push", bubble, workingSetReplay = "working-set-replay", huge
        /// CRIU lazy-pages' push: from the lowest missing address, in chunks that start at
        /// `criuMinChunkBytes`, double after every chunk sent while no fault arrived, up to
        /// `criuMaxChunkBytes`, and fall back to the smallest on every fault.
        case criuPush = "criu-push"
    }
    public enum Resolve: String, Sendable, CaseIterable { case copy, move, `continue` }
    public enum WaitMode: String, Sendable, CaseIterable { case blocking, poll, epoll, busy }

    public var policy: Policy = .onDemand
    public var resolve: Resolve = .copy
    /// resolve=copy into a memfd (shmem) region in MISSING mode instead of anonymous memory.
    public var shmemRegion = false
    public var wait: WaitMode = .blocking
    public var handlerThreads = 1
    public var batch = 64
    /// Fault-around window (fixed), and the adaptive window's ceiling, in pages.
    public var windowPages = 16
    public var maxWindowPages = 512
    public var pushChunkPages = 16
    public var pushWindowBytes = 1 << 20
    /// Known-zero pages resolved locally with UFFDIO_ZEROPAGE (else transferred like any page).
    public var zeropage = true
    public var spinNS: UInt64 = 5_000
    /// working-set-replay, concurrent mode: the pusher installs these pages first, in order.
    public var pushOrder: [Int32] = []
    /// Whether a background pusher runs.
    public var pusher: Bool { policy == .backgroundPush || policy == .bubble || policy == .criuPush || (policy == .workingSetReplay && !pushOrder.isEmpty) }
    /// criu-push's chunk bounds (CRIU's DEFAULT_XFER_LEN and MAX_XFER_LEN in criu/uffd.c).
    public var criuMinChunkBytes = 64 << 10
    public var criuMaxChunkBytes = 4 << 20
    public init() {}
}

/// Per-page state. Claiming (missing → in flight) is a compare-exchange, so a page is sent
/// at most once whoever asks for it (fault handler threads, the pusher).
enum PageState {
    static let missing: UInt8 = 0
    static let inflightFault: UInt8 = 1
    static let inflightPrefetch: UInt8 = 2
    static let installedFault: UInt8 = 3
    static let installedPrefetch: UInt8 = 4
    static let installedLocal: UInt8 = 5
    static let removed: UInt8 = 6
}

/// A transfer that has been scheduled on the link: pages [first, first+count) arrive at
/// `arrival`; `faultTime` is when the handler read the fault that asked for them (0: a push).
public struct Delivery: Sendable {
    public var arrival: UInt64
    public var first: Int32
    public var count: Int32
    public var faultTime: UInt64
}

/// Why a page source could not deliver, without allocating on the fault path: an errno and a
/// fixed text.
public struct FetchFailure: Error, Sendable {
    public let errno: Int32
    public let what: StaticString
    public init(errno: Int32, what: StaticString) { self.errno = errno; self.what = what }
}

/// Where the engine's pages come from when they are not in its own copy of the image: a
/// source process, a remote server, a snapshot file (lazy restore's `PageSource`). `fetch`
/// brings the pages of `runs[0..<count]` into `landing` (laid out like the image); it is
/// called on the fault path and must not allocate. Channel `k` is used by one thread at a
/// time: handler `k`, and the pusher on channel `handlerThreads`.
public protocol PageFetcher: AnyObject, Sendable {
    var landing: UnsafeMutableRawPointer { get }
    var label: String { get }
    func fetch(channel: Int, runs: UnsafePointer<Delivery>, count: Int) throws(FetchFailure)
}

/// A page fetcher from a page server elsewhere (lazy restore's TCP page source, used by
/// migration's post-copy between hosts), with its counts and recovery.
public protocol RemotePageFetcher: PageFetcher {
    var bytesFetched: Int { get }
    var requestsSent: Int { get }
    /// Connections re-established after one was lost, the time the faults waited for them,
    /// and the pages asked for again on the new connection.
    var reconnectCount: Int { get }
    var pausedSeconds: Double { get }
    var reRequestedPages: Int { get }
    func close()
}

/// A min-heap on arrival over preallocated storage (each page is claimed once, so `pages`
/// deliveries bound it). Used only under the engine's lock; frees its own storage.
final class DeliveryHeap {
    let items: UnsafeMutablePointer<Delivery>
    let capacity: Int
    var count = 0

    init(capacity: Int) {
        self.capacity = capacity
        items = .allocate(capacity: capacity)
    }
    deinit { items.deallocate() }

    @inline(__always) var earliest: UInt64? { count > 0 ? items[0].arrival : nil }

    @inline(__always) func push(_ d: Delivery) {
        precondition(count < capacity, "delivery heap overflow")
        var i = count
        count += 1
        items[i] = d
        while i > 0 {
            let parent = (i - 1) / 2
            if items[parent].arrival <= items[i].arrival { break }
            let t = items[parent]; items[parent] = items[i]; items[i] = t
            i = parent
        }
    }

    @inline(__always) func pop() -> Delivery {
        let top = items[0]
        count -= 1
        if count > 0 {
            items[0] = items[count]
            var i = 0
            while true {
                let l = 2 * i + 1, r = l + 1
                var m = i
                if l < count && items[l].arrival < items[m].arrival { m = l }
                if r < count && items[r].arrival < items[m].arrival { m = r }
                if m == i { break }
                let t = items[m]; items[m] = items[i]; items[i] = t
                i = m
            }
        }
        return top
    }
}

/// An install that met EAGAIN (the kernel's mmap_changing: a REMOVE/UNMAP/REMAP event is
/// queued and not yet read, or just read and its sender not yet done) and waits to be retried
/// after the next batch of messages. `kind`: data pages (COPY/MOVE/CONTINUE), a known-zero
/// page claimed for the first time, or a zero refault of a page the application dropped.
struct Retry {
    static let data: UInt8 = 0, zero: UInt8 = 1, zeroRefault: UInt8 = 2
    var first: Int32
    var count: Int32
    var faultTime: UInt64
    var kind: UInt8
}

/// A FIFO of retries over preallocated storage. Pages in it are claimed (in flight), each
/// page at most once, so `pages` entries bound it. Used only under the engine's lock; frees
/// its own storage.
final class RetryRing {
    let items: UnsafeMutablePointer<Retry>
    let capacity: Int
    var head = 0
    var count = 0

    init(capacity: Int) {
        self.capacity = max(capacity, 1)
        items = .allocate(capacity: self.capacity)
    }
    deinit { items.deallocate() }

    @inline(__always) func push(_ r: Retry) {
        precondition(count < capacity, "retry ring overflow")
        items[(head + count) % capacity] = r
        count += 1
    }

    @inline(__always) func pop() -> Retry? {
        if count == 0 { return nil }
        let r = items[head]
        head = (head + 1) % capacity
        count -= 1
        return r
    }
}

/// The fault engine: one userfaultfd over a region restored from `image` through `link`.
/// Handler threads read faults (blocking read, ppoll, epoll or busy polling, `batch` messages per
/// read), claim pages, schedule them on the link and install them on arrival; a delivery
/// thread waits for arrivals that lie in the future; an optional pusher sends pages nobody
/// asked for yet. The fault path allocates nothing: buffers are made before the threads
/// start and the shared state is atomics and mutex-guarded preallocated storage.
///
/// Its life, the same for a lazy restore and a post-copy phase: `init` (allocations, not
/// downtime), `start` (registers the region and the doorbells, starts the threads), then
/// optionally `startPusher` / `prefetchBlocking`; `fail` records why it cannot go on, and
/// `releaseRegion` lets a waiting workload go; `stop` ends every thread (one doorbell per
/// handler, rung one way) and returns the `Counters`.
public final class FaultEngine: Sendable {
    public let config: EngineConfig
    let uffd: Userfaultfd.Descriptor
    let link: EmulatedLink
    let image: PageImage
    public let pages: Int
    public let pageSize: Int
    /// Pages of a PMD-sized huge page (the `huge` policy's window).
    let hugePages: Int
    /// Where the region is now: the workload may move it whole (mremap; a REMAP event).
    private let regionBase: Atomic<UInt>
    @inline(__always) var regionAddress: UInt { regionBase.load(ordering: .acquiring) }
    /// One doorbell page per handler thread: `stop` touches them, each handler leaves after
    /// answering one.
    private let doorbells: AnonymousMapping
    let doorbellAddress: UInt
    /// resolve=move: an anonymous copy of the image the pages are moved out of;
    /// resolve=continue: a second mapping of the memfd (the page cache) the data lands in.
    let stagingAddress: UInt
    /// Where installs copy from: the image itself (source memory), or the landing buffer a
    /// real page source fetches into (then `source` is set and every transfer goes through it).
    let dataAddress: UInt
    let source: (any PageFetcher)?
    /// The first failure: errno (read on the fast path) and a readable reason (set once,
    /// off the fast path).
    private let failureErrno = Atomic<Int32>(0)
    private let failureReason = Lock<String?>(nil)

    let state: AtomicByteArray
    let transfers: AtomicByteArray
    private let heap: Lock<DeliveryHeap>
    private let retries: Lock<RetryRing>
    /// Entries in `retries` (read without the lock to decide whether a wait may block).
    private let retryPending = Atomic<Int>(0)
    /// Pages the application dropped (REMOVE/UNMAP) during the restore: left out of the
    /// content check (they read as zero, or as whatever the application wrote since).
    let dropped: AtomicByteArray
    private let eventFD: Int32

    private let remoteFaults = Atomic<Int>(0)
    private let joinedFaults = Atomic<Int>(0)
    private let prefetchFaults = Atomic<Int>(0)
    private let localFaults = Atomic<Int>(0)
    private let messages = Atomic<Int>(0)
    private let events = Atomic<Int>(0)
    private let eexist = Atomic<Int>(0)
    private let eagain = Atomic<Int>(0)
    /// Installs that met ENOENT because the region moved (mremap) under them: retried at the
    /// new base. Only while REMAP events are followed; otherwise ENOENT fails the run.
    private let movedUnderInstall = Atomic<Int>(0)
    private let followsRemap: Bool
    /// Pages whose install was deferred to the retry ring (EAGAIN), and retries that met
    /// EAGAIN again.
    private let deferredPages = Atomic<Int>(0)
    private let removeEvents = Atomic<Int>(0)
    private let unmapEvents = Atomic<Int>(0)
    /// REMAP: the region moved whole; FORK: a child shares the registration (its own
    /// userfaultfd, served by a fork server thread from the destination's image copy).
    private let remapEvents = Atomic<Int>(0)
    private let forkEvents = Atomic<Int>(0)
    private let forkFaults = Atomic<Int>(0)
    private let forkStop = Atomic<Bool>(false)
    private let forkServers = Lock<[OSThread]>([])
    /// Faults on a page the engine had installed whose mapping the application dropped
    /// since (served with a zero page).
    private let droppedRefaults = Atomic<Int>(0)
    private let ioctls = Atomic<Int>(0)
    private let wakes = Atomic<Int>(0)
    private let claimed = Atomic<Int>(0)
    private let pushedPages = Atomic<Int>(0)
    private let handlerCPU = Atomic<UInt64>(0)
    private let pusherStop = Atomic<Bool>(false)
    private let deliveryStop = Atomic<Bool>(false)
    private let fullyInstalledAt = Atomic<UInt64>(0)
    /// Handlers that left on an error of their own before their doorbell (see `stop`).
    private let earlyExits = Atomic<Int>(0)

    // Policy state.
    private let adaptiveWindow = Atomic<Int>(1)
    private let adaptiveNext = Atomic<Int>(-1)
    private let pushCursor = Atomic<Int>(0)
    private let pivot = Atomic<Int>(-1)
    /// criu-push: a fault arrived since the pusher's last chunk (it starts again small).
    private let faultSincePush = Atomic<Bool>(false)
    /// The pusher's chunks: how many, the largest (pages), and (criu-push) how often a fault
    /// sent the chunk size back to the smallest, and how often it doubled.
    private let pushChunks = Atomic<Int>(0)
    private let pushChunkMaxPages = Atomic<Int>(0)
    private let pushChunkResets = Atomic<Int>(0)
    private let pushChunkDoublings = Atomic<Int>(0)
    private let pushChunkPagesSent = Atomic<Int>(0)

    /// Handler-side latency of each remote fault (read → installed and woken), ns.
    private let faultLatency: AppendLog
    /// Pages in the order their first fault reached the handler (working-set recording).
    private let faultOrder: AppendLog

    /// The workload threads' tids (UFFD_FEATURE_THREAD_ID attributes each fault to one),
    /// set before the handler threads start; slot `maxThreads` counts unattributed faults.
    public static let maxThreads = 64
    private let workloadTIDs: AtomicInt32Array
    private let workloadThreadCount = Atomic<Int>(0)
    /// Remote faults per workload thread, summed from the handler threads' own counters as
    /// they leave.
    private let threadFaults = Lock<[Int]>([Int](repeating: 0, count: FaultEngine.maxThreads + 1))

    /// The threads, once started (`start`, `startPusher`); joined by `stop`.
    private struct Threads { var handlers: [OSThread] = []; var delivery: OSThread?; var pusher: OSThread?; var regionRegistered = false; var stopped = false }
    private let threads = Lock(Threads())
    private let registerMode: Userfaultfd.RegisterMode

    /// - region: the destination mapping (`image.bytes` long), registered by `start` in
    ///   `mode`; staging: see `stagingAddress`; source: a page source, or nil to copy from
    ///   `image` itself.
    public init(config: EngineConfig, region: UnsafeMutableRawPointer, mode: Userfaultfd.RegisterMode = .missing,
                staging: UnsafeMutableRawPointer?, image: PageImage, link: EmulatedLink, uffd: Userfaultfd.Descriptor,
                source: (any PageFetcher)? = nil) throws {
        self.config = config
        self.source = source
        dataAddress = UInt(bitPattern: source?.landing ?? image.base)
        self.image = image
        self.pages = image.pages
        self.pageSize = image.pageSize
        self.hugePages = max(1, HugePageSize.pmd / image.pageSize)
        self.link = link
        self.uffd = uffd
        registerMode = mode
        regionBase = Atomic(UInt(bitPattern: region))
        followsRemap = uffd.features.contains(.eventRemap)
        doorbells = try AnonymousMapping(length: max(config.handlerThreads, 1) * image.pageSize, kind: .base)
        doorbellAddress = UInt(bitPattern: doorbells.base)
        stagingAddress = staging.map { UInt(bitPattern: $0) } ?? 0
        state = AtomicByteArray(count: pages)
        transfers = AtomicByteArray(count: pages)
        heap = Lock(DeliveryHeap(capacity: pages + 64))
        retries = Lock(RetryRing(capacity: pages + 64))
        dropped = AtomicByteArray(count: pages)
        workloadTIDs = AtomicInt32Array(count: FaultEngine.maxThreads)
        eventFD = memlab_eventfd()
        if eventFD < 0 { throw SystemError.current("eventfd") }
        faultLatency = AppendLog(capacity: pages + 1024)
        faultOrder = AppendLog(capacity: pages + 1024)
        adaptiveWindow.store(1, ordering: .relaxed)
    }

    deinit {
        _ = stop()
        close(eventFD)
    }

    /// Pages already at the destination before the start (post-copy: what pre-copy sent):
    /// never fetched; a fault on one only wakes. Call before `start`.
    public func markPresent(_ isPresent: (Int) -> Bool) {
        var present = 0
        for p in 0..<pages where isPresent(p) {
            state.store(p, PageState.installedLocal)
            present += 1
        }
        claimed.store(present, ordering: .relaxed)
        if present == pages { fullyInstalledAt.store(Clock.nanoseconds(), ordering: .relaxed) }
    }

    /// Registers the region and the doorbells and starts the handler and delivery threads.
    /// `workloadThreads`: the tids faults are attributed to (the workload's threads exist by
    /// now and wait). On an error nothing stays started or registered.
    public func start(workloadThreads: [Int32] = []) throws {
        let n = min(workloadThreads.count, FaultEngine.maxThreads)
        for i in 0..<n { workloadTIDs.store(i, workloadThreads[i]) }
        workloadThreadCount.store(n, ordering: .releasing)
        try threads.withLock { t in
            try uffd.register(UnsafeMutableRawPointer(bitPattern: regionAddress)!, length: pages * pageSize, mode: registerMode)
            t.regionRegistered = true
            try uffd.register(doorbells.base, length: doorbells.length, mode: .missing)
            for i in 0..<config.handlerThreads { t.handlers.append(try OSThread { [self] in handlerLoop(channel: i) }) }
            t.delivery = try OSThread { [self] in deliveryLoop() }
        }
    }

    /// Starts the pusher: the policy's own push, or (on-demand) a linear push of whatever is
    /// still missing. No-op if one runs.
    public func startPusher() throws {
        try threads.withLock { t in
            guard t.pusher == nil, !t.stopped else { return }
            t.pusher = try OSThread { [self] in pusherLoop() }
        }
    }

    /// Unregisters the region (at its address now): threads waiting on a fault there are
    /// woken and fault normally from now on. After a failure, so the workload is never left
    /// hanging; `stop` does it too.
    public func releaseRegion() {
        threads.withLock { t in
            guard t.regionRegistered else { return }
            try? uffd.unregister(UnsafeMutableRawPointer(bitPattern: regionAddress)!, length: pages * pageSize)
            t.regionRegistered = false
        }
    }

    /// Ends every thread the engine started — the pusher, the fork servers, the delivery
    /// thread, then each handler through its doorbell — unregisters what it registered, and
    /// returns what it counted. Call after the workload stopped touching the region (or
    /// after `releaseRegion`). Later calls return the same counters and stop nothing.
    public func stop() -> Counters {
        let t = threads.withLock { t -> Threads in defer { t.stopped = true; t.handlers = []; t.delivery = nil; t.pusher = nil }; return t }
        if !t.stopped {
            pusherStop.store(true, ordering: .releasing)
            t.pusher?.join()
            stopForkServers()
            deliveryStop.store(true, ordering: .releasing)
            ringDelivery()
            t.delivery?.join()
            // One doorbell per handler, rung through C: a Swift load whose value is unused is
            // removed by whole-module optimisation (then no handler hears it and the join
            // hangs). A handler that left early on an error filled a doorbell from the top on
            // its way out, so every touch here is answered or does not fault at all.
            if !t.handlers.isEmpty {
                for i in 0..<t.handlers.count { memlab_ref_touch(doorbells.base + i * pageSize, 1, pageSize) }
                for h in t.handlers { h.join() }
                try? uffd.unregister(doorbells.base, length: doorbells.length)
            }
            releaseRegion()
        }
        return counters()
    }

    /// Ring one bell from the top for a handler that leaves before its doorbell: `stop`'s
    /// touch of that page then finds it present (or, already waiting on it, is woken).
    private func fillDoorbellOnEarlyExit() {
        let k = config.handlerThreads - 1 - earlyExits.wrappingAdd(1, ordering: .relaxed).oldValue
        guard k >= 0 else { return }
        try? uffd.zeropage(doorbells.base + k * pageSize, length: pageSize)
    }

    /// Every counter, as one plain value (read after `stop` for final figures).
    public func counters() -> Counters {
        var c = Counters()
        c.remoteFaults = remoteFaults.load(ordering: .relaxed)
        c.joinedFaults = joinedFaults.load(ordering: .relaxed)
        c.prefetchServedFaults = prefetchFaults.load(ordering: .relaxed)
        c.localFaults = localFaults.load(ordering: .relaxed)
        c.messages = messages.load(ordering: .relaxed)
        c.events = events.load(ordering: .relaxed)
        c.eexist = eexist.load(ordering: .relaxed)
        c.eagain = eagain.load(ordering: .relaxed)
        c.movedUnderInstall = movedUnderInstall.load(ordering: .relaxed)
        c.deferredPages = deferredPages.load(ordering: .relaxed)
        c.removeEvents = removeEvents.load(ordering: .relaxed)
        c.unmapEvents = unmapEvents.load(ordering: .relaxed)
        c.remapEvents = remapEvents.load(ordering: .relaxed)
        c.forkEvents = forkEvents.load(ordering: .relaxed)
        c.forkFaults = forkFaults.load(ordering: .relaxed)
        c.droppedRefaults = droppedRefaults.load(ordering: .relaxed)
        c.ioctls = ioctls.load(ordering: .relaxed)
        c.wakes = wakes.load(ordering: .relaxed)
        c.claimedPages = claimed.load(ordering: .relaxed)
        c.pushedPages = pushedPages.load(ordering: .relaxed)
        c.pushChunks = pushChunks.load(ordering: .relaxed)
        c.pushChunkMaxPages = pushChunkMaxPages.load(ordering: .relaxed)
        c.pushChunkResets = pushChunkResets.load(ordering: .relaxed)
        c.pushChunkDoublings = pushChunkDoublings.load(ordering: .relaxed)
        c.pushChunkPagesSent = pushChunkPagesSent.load(ordering: .relaxed)
        c.handlerCPUSeconds = Double(handlerCPU.load(ordering: .relaxed)) / 1e9
        c.fullyInstalledAt = fullyInstalledAt.load(ordering: .relaxed)
        let tf = threadFaults.withLock { $0 }
        c.faultsPerThread = Array(tf[0..<FaultEngine.maxThreads])
        c.faultsUnattributed = tf[FaultEngine.maxThreads]
        c.faultLatencyNS = faultLatency.values
        c.faultOrder = faultOrder.values.map { Int32(truncatingIfNeeded: $0) }
        c.failure = failure
        c.regionAddress = regionAddress
        return c
    }

    /// What became of page `p` (after `stop`).
    public func page(_ p: Int) -> PageRecord {
        let s = state.load(p)
        let how: PageRecord.Installed?
        switch s {
        case PageState.installedFault: how = .byFault
        case PageState.installedPrefetch: how = .byPush
        case PageState.installedLocal: how = .locally
        default: how = nil
        }
        return PageRecord(installed: how, transfers: Int(transfers.load(p)), dropped: dropped.load(p) != 0)
    }

    /// Every pending page is installed.
    public var isComplete: Bool { fullyInstalledAt.load(ordering: .relaxed) != 0 }

    /// The first failure, if any.
    public var failure: Failure? {
        let e = failureErrno.load(ordering: .relaxed)
        guard e != 0 else { return nil }
        return Failure(errno: e, reason: failureReason.withLock { $0 } ?? SystemError(errno: e, call: "fault engine").description)
    }

    /// Records why the engine cannot go on (the first reason wins): a dead source, an
    /// injected failure, the owner's deadline. Threads keep serving what they can; the owner
    /// releases the region and stops.
    public func fail(errno: Int32, reason: String) {
        failureReason.withLock { if $0 == nil { $0 = reason } }
        _ = failureErrno.compareExchange(expected: 0, desired: errno == 0 ? EIO : errno, ordering: .relaxed)
    }

    /// The workload threads' slot for `tid` (`maxThreads`: not one of them, or the kernel
    /// did not report the tid).
    @inline(__always)
    func threadSlot(_ tid: UInt32) -> Int {
        let n = workloadThreadCount.load(ordering: .relaxed)
        var i = 0
        while i < n { if UInt32(bitPattern: workloadTIDs.load(i)) == tid { return i }; i += 1 }
        return FaultEngine.maxThreads
    }

    /// Where the region is now (it moves with a whole-region mremap).
    public var region: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: regionAddress)! }
    @inline(__always) func address(_ page: Int) -> UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: regionAddress + UInt(page) * UInt(pageSize))! }

    /// A failed call on the fault path (an errno, no allocation until the run is over).
    func fail(_ e: SystemError) {
        failureReason.withLock { if $0 == nil { $0 = e.description } }
        _ = failureErrno.compareExchange(expected: 0, desired: e.errno == 0 ? EIO : e.errno, ordering: .relaxed)
    }

    /// A fault outside every range this engine serves (allocates; the run is over).
    func failOutside(_ address: UInt) {
        fail(errno: EFAULT, reason: "a fault at 0x\(String(address, radix: 16)) lies outside the restored region "
            + "(0x\(String(regionAddress, radix: 16)), \(pages) pages): the workload moved part of it or grew it (mremap; only a move of the whole region is followed), or registered more memory")
    }

    /// A page source failed: the errno, and a reason naming the source (allocates; the run
    /// is over anyway).
    func fail(_ e: FetchFailure) {
        fail(errno: e.errno, reason: "\(source?.label ?? "page source"): \(e.what) (\(String(cString: strerror(e.errno))))")
    }

    /// Fetches the runs from the real source, if there is one. Returns false on failure
    /// (recorded; the pages stay in flight and the run fails).
    @inline(__always)
    func fetch(channel: Int, _ runs: UnsafePointer<Delivery>, _ n: Int) -> Bool {
        guard let source else { return true }
        do throws(FetchFailure) { try source.fetch(channel: channel, runs: runs, count: n) } catch { fail(error); return false }
        return true
    }

    @inline(__always) var data: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: dataAddress)! }

    // MARK: installing

    /// Installs pages [first, first+count) with DONTWAKE (the caller wakes). Returns how
    /// many pages from `first` are done (installed, or there already: EEXIST, counted); fewer
    /// than `count` when the kernel answered EAGAIN — the caller defers the rest to the retry
    /// ring and never spins here: the event behind the EAGAIN may be waiting for this very
    /// thread to read it.
    @inline(__always)
    /// `wake`: the ioctl wakes the faulting threads itself (one call instead of COPY with
    /// DONTWAKE plus WAKE: what a single-run delivery, the usual fault, needs); a page found
    /// there already (EEXIST) is then woken explicitly, since that ioctl woke nobody.
    func install(first: Int, count: Int, wake wakeNow: Bool = false) -> Int {
        let len = count * pageSize
        var dst = address(first)
        let dontWake = !wakeNow
        var done = 0
        while done < len {
            var n = 0
            do throws(SystemError) {
                ioctls.add(1, ordering: .relaxed)
                switch config.resolve {
                case .copy:
                    try uffd.copy(to: dst + done, from: UnsafeRawPointer(data + first * pageSize + done), length: len - done, dontWake: dontWake, copied: &n)
                case .move:
                    let src = UnsafeMutableRawPointer(bitPattern: stagingAddress + UInt(first * pageSize + done))!
                    try uffd.move(to: dst + done, from: src, length: len - done, dontWake: dontWake, moved: &n)
                case .continue:
                    // The data lands in the page cache (the second mapping), then is mapped.
                    let cache = UnsafeMutableRawPointer(bitPattern: stagingAddress + UInt(first * pageSize + done))!
                    memcpy(cache, data + first * pageSize + done, len - done)
                    try uffd.continue(dst + done, length: len - done, dontWake: dontWake, mapped: &n)
                }
                done += n == 0 ? len - done : n
            } catch {
                if error.errno == ENOENT && followsRemap {
                    // The region moved (mremap) after `dst` was computed: the old range has
                    // no mapping. With the new base, install there; if the REMAP event was
                    // read but its handler has not published the base yet, defer like EAGAIN.
                    done += n
                    movedUnderInstall.add(1, ordering: .relaxed)
                    let now = address(first)
                    if now != dst { dst = now; continue }
                    return done / pageSize
                }
                if error.errno == EAGAIN {
                    eagain.add(1, ordering: .relaxed)
                    done += n
                    return done / pageSize
                }
                if error.errno == EEXIST {
                    done += n
                    if len - done > pageSize {
                        // Page by page, so only the page that is there already is skipped.
                        var off = done
                        while off < len {
                            if install(first: first + off / pageSize, count: 1, wake: wakeNow) == 0 { return off / pageSize }
                            off += pageSize
                        }
                        return count
                    }
                    eexist.add(1, ordering: .relaxed)
                    if wakeNow { wake(first: first + done / pageSize, count: 1) }
                    return count
                }
                fail(error)
                return count
            }
        }
        return count
    }

    /// Queues pages whose install met EAGAIN; a handler thread (after its next read) or the
    /// delivery thread retries them. Preallocated storage: no allocation.
    @inline(__always)
    func deferInstall(_ r: Retry) {
        deferredPages.add(Int(r.count), ordering: .relaxed)
        retries.withLock { $0.push(r) }
        // The delivery thread retries too (a handler may be blocked in read with nothing
        // left to read): rung when the ring stops being empty, not on every re-deferral
        // (that would make two threads spin on a 2-CPU machine while the event's sender,
        // which must run before the EAGAIN ends, waits for a CPU).
        if retryPending.wrappingAdd(1, ordering: .acquiringAndReleasing).oldValue == 0 { ringDelivery() }
    }

    /// Retries up to `capacity` deferred installs (`buf`, `scratch`: the caller's own
    /// preallocated buffers). Entries that meet EAGAIN again go back to the ring.
    func drainRetries(_ buf: UnsafeMutablePointer<Retry>, _ scratch: UnsafeMutablePointer<Delivery>, capacity: Int) {
        if retryPending.load(ordering: .acquiring) == 0 { return }
        var n = 0
        retries.withLock { ring in
            while n < capacity, let r = ring.pop() { buf[n] = r; n += 1 }
        }
        if n == 0 { return }
        // The count drops only after the retries: re-deferrals meanwhile see a non-empty ring.
        defer { retryPending.subtract(n, ordering: .releasing) }
        var d = 0
        for i in 0..<n {
            let r = buf[i]
            switch r.kind {
            case Retry.data:
                scratch[d] = Delivery(arrival: 0, first: r.first, count: r.count, faultTime: r.faultTime)
                d += 1
            default:
                installLocal(Int(r.first), refault: r.kind == Retry.zeroRefault)
            }
        }
        if d > 0 { complete(scratch, d) }
    }

    @inline(__always)
    func wake(first: Int, count: Int) {
        wakes.add(1, ordering: .relaxed)
        do throws(SystemError) { try uffd.wake(address(first), length: count * pageSize) } catch { fail(error) }
    }

    @inline(__always)
    func markInstalled(first: Int, count: Int) {
        var p = first
        while p < first + count {
            let s = state.load(p)
            state.store(p, s == PageState.inflightFault ? PageState.installedFault : PageState.installedPrefetch)
            p += 1
        }
    }

    /// A known-zero page, already claimed: ZEROPAGE (anonymous) or CONTINUE on the zeroed
    /// page cache; no transfer. `refault`: the page was installed (or dropped) before and the
    /// application dropped it; it is not counted as newly claimed. EAGAIN defers it (the page
    /// stays in flight, nobody is woken yet).
    @inline(__always)
    func installLocal(_ page: Int, refault: Bool = false) {
        do throws(SystemError) {
            ioctls.add(1, ordering: .relaxed)
            switch config.resolve {
            case .continue: try uffd.continue(address(page), length: pageSize)
            default: try uffd.zeropage(address(page), length: pageSize)
            }
        } catch {
            let moved = error.errno == ENOENT && followsRemap
            if error.errno == EAGAIN || moved {
                // EAGAIN: an event is pending. ENOENT while remaps are followed: the region
                // moved under this install (see `install`); the retry uses the new base.
                if moved { movedUnderInstall.add(1, ordering: .relaxed) } else { eagain.add(1, ordering: .relaxed) }
                deferInstall(Retry(first: Int32(page), count: 1, faultTime: 0, kind: refault ? Retry.zeroRefault : Retry.zero))
                return
            }
            if error.errno == EEXIST {
                if !refault { eexist.add(1, ordering: .relaxed) }
                wake(first: page, count: 1)
            } else { fail(error) }
        }
        state.store(page, PageState.installedLocal)
        if refault { return }
        if claimed.add(1, ordering: .relaxed).newValue == pages { fullyInstalledAt.store(Clock.nanoseconds(), ordering: .relaxed) }
    }

    /// Installs, marks and wakes a set of deliveries that have arrived.
    @inline(__always)
    func complete(_ ds: UnsafeMutablePointer<Delivery>, _ n: Int) {
        // One run (an on-demand fault, a window): the install wakes its waiters itself.
        // Several runs: all installed with DONTWAKE first, then one WAKE per run, so no
        // thread resumes into a window that is still half there.
        let wakeOnInstall = n == 1
        for i in 0..<n {
            let count = Int(ds[i].count)
            let done = install(first: Int(ds[i].first), count: count, wake: wakeOnInstall)
            if done < count {
                // EAGAIN: the rest waits in the retry ring (it carries the fault's time: the
                // latency is recorded when the whole run is in).
                deferInstall(Retry(first: ds[i].first + Int32(done), count: Int32(count - done), faultTime: ds[i].faultTime, kind: Retry.data))
                ds[i].count = Int32(done)
                ds[i].faultTime = 0
            }
        }
        for i in 0..<n { markInstalled(first: Int(ds[i].first), count: Int(ds[i].count)) }
        if !wakeOnInstall { for i in 0..<n where ds[i].count > 0 { wake(first: Int(ds[i].first), count: Int(ds[i].count)) } }
        let now = Clock.nanoseconds()
        var total = 0
        for i in 0..<n {
            total += Int(ds[i].count)
            if ds[i].faultTime != 0 && ds[i].count > 0 { faultLatency.append(now &- ds[i].faultTime) }
        }
        if total == 0 { return }
        if claimed.add(total, ordering: .relaxed).newValue == pages { fullyInstalledAt.store(now, ordering: .relaxed) }
    }

    // MARK: scheduling

    /// Sends the claimed pages in `list[0..<n]` (ascending runs are merged) as one transfer;
    /// installs them now when the link is instant, else queues them for the delivery thread.
    @inline(__always)
    func send(_ list: UnsafeMutablePointer<Int32>, _ n: Int, urgent: Bool, faultPage: Int, faultTime: UInt64,
              scratch: UnsafeMutablePointer<Delivery>, channel: Int = 0) {
        if n == 0 { return }
        for i in 0..<n { transfers.increment(Int(list[i])) }
        let now = Clock.nanoseconds()
        var arrival = link.isInstant ? now : link.schedule(bytes: n * pageSize, urgent: urgent, now: now)
        var runs = 0
        var start = 0
        for i in 1...n {
            if i == n || list[i] != list[i - 1] + 1 {
                let first = list[start]
                let count = Int32(i - start)
                let hasFault = faultPage >= Int(first) && faultPage < Int(first) + Int(count)
                scratch[runs] = Delivery(arrival: arrival, first: first, count: count, faultTime: hasFault ? faultTime : 0)
                runs += 1
                start = i
            }
        }
        if source != nil {
            // A real transport: the pages arrive at max(real arrival, the model's arrival).
            if !fetch(channel: channel, scratch, runs) { return }
            arrival = max(arrival, Clock.nanoseconds())
        }
        if arrival <= Clock.nanoseconds() {
            complete(scratch, runs)
            return
        }
        var signal = false
        heap.withLock { h in
            let before = h.earliest
            for i in 0..<runs { h.push(scratch[i]) }
            signal = before == nil || arrival < before!
        }
        if signal {
            var one: UInt64 = 1
            _ = Glibc.write(eventFD, &one, 8)
        }
    }

    /// Claims page `p` for a transfer; zero pages are installed on the spot instead.
    /// Returns whether `p` joined the list.
    @inline(__always)
    func claim(_ p: Int, as s: UInt8) -> Bool {
        guard state.compareExchange(p, expected: PageState.missing, desired: s) else { return false }
        if config.zeropage && image.isZero(p) {
            installLocal(p)
            if s == PageState.inflightFault { localFaults.add(1, ordering: .relaxed) }
            return false
        }
        if s == PageState.inflightPrefetch { pushedPages.add(1, ordering: .relaxed) }
        return true
    }

    // MARK: the fault path

    @inline(__always)
    func handleFault(page: Int, time: UInt64, tid: UInt32, list: UnsafeMutablePointer<Int32>, scratch: UnsafeMutablePointer<Delivery>,
                     threadCounts: UnsafeMutablePointer<Int>, channel: Int = 0) {
        messages.add(1, ordering: .relaxed)
        // CRIU resets its transfer length on every page fault it handles.
        if config.policy == .criuPush { faultSincePush.store(true, ordering: .relaxed) }
        switch state.load(page) {
        case PageState.installedFault, PageState.installedPrefetch, PageState.installedLocal:
            localFaults.add(1, ordering: .relaxed)
            if dropped.load(page) != 0 {
                // Installed, then dropped by the application (MADV_DONTNEED after the
                // install): it reads as zero now. EEXIST: it was only a missing wake.
                if state.compareExchange(page, expected: state.load(page), desired: PageState.inflightFault) {
                    droppedRefaults.add(1, ordering: .relaxed)
                    installLocal(page, refault: true)
                }
                return
            }
            // Installed since the fault was raised: only a wake is missing.
            wake(first: page, count: 1)
            return
        case PageState.inflightFault:
            joinedFaults.add(1, ordering: .relaxed)
            return
        case PageState.inflightPrefetch:
            prefetchFaults.add(1, ordering: .relaxed)
            return
        case PageState.removed:
            // MADV_DONTNEED'd after restore: the application dropped it, it reads as zero.
            if state.compareExchange(page, expected: PageState.removed, desired: PageState.inflightFault) {
                localFaults.add(1, ordering: .relaxed)
                installLocal(page, refault: true)
            }
            return
        default: break
        }
        guard state.compareExchange(page, expected: PageState.missing, desired: PageState.inflightFault) else {
            // Lost a race with another claimant: that one installs and wakes.
            joinedFaults.add(1, ordering: .relaxed)
            return
        }
        faultOrder.append(UInt64(page))
        if config.zeropage && image.isZero(page) {
            localFaults.add(1, ordering: .relaxed)
            installLocal(page)
            return
        }
        remoteFaults.add(1, ordering: .relaxed)
        threadCounts[threadSlot(tid)] += 1

        // The window the policy sends with this fault.
        var lo = page, hi = page + 1
        switch config.policy {
        case .faultAround:
            hi = min(pages, page + config.windowPages)
        case .faultAroundAdaptive:
            // Grow on success (the fault continues where the last window ended), reset otherwise.
            var w = adaptiveWindow.load(ordering: .relaxed)
            w = adaptiveNext.load(ordering: .relaxed) == page ? min(w * 2, config.maxWindowPages) : 1
            adaptiveWindow.store(w, ordering: .relaxed)
            hi = min(pages, page + w)
            adaptiveNext.store(hi, ordering: .relaxed)
        case .huge:
            lo = page / hugePages * hugePages
            hi = min(pages, lo + hugePages)
        case .backgroundPush:
            pushCursor.store(page + 1, ordering: .relaxed)
        case .bubble:
            pivot.store(page, ordering: .relaxed)
        case .onDemand, .workingSetReplay, .criuPush:
            break
        }
        var n = 0
        var p = lo
        while p < hi {
            if p == page { list[n] = Int32(p); n += 1 } else if claim(p, as: PageState.inflightPrefetch) { list[n] = Int32(p); n += 1 }
            p += 1
        }
        send(list, n, urgent: true, faultPage: page, faultTime: time, scratch: scratch, channel: channel)
    }

    @inline(__always)
    func handleEvent(_ m: Userfaultfd.Message) {
        events.add(1, ordering: .relaxed)
        if m.event == UInt32(memlab_UFFD_EVENT_REMAP) { handleRemap(from: UInt(m.address), to: UInt(m.end), length: Int(m.len)); return }
        if m.event == UInt32(memlab_UFFD_EVENT_FORK) { startForkServer(fd: m.ufd); return }
        let start = Int(m.address), end = Int(m.end)
        let base = Int(regionAddress)
        guard end > base, start < base + pages * pageSize else { return }
        if m.event == UInt32(memlab_UFFD_EVENT_REMOVE) || m.event == UInt32(memlab_UFFD_EVENT_UNMAP) {
            if m.event == UInt32(memlab_UFFD_EVENT_REMOVE) { removeEvents.add(1, ordering: .relaxed) } else { unmapEvents.add(1, ordering: .relaxed) }
            // The range was dropped by the application: later faults there are zero pages.
            // Missing pages become `removed` (never transferred); installed ones stay, and a
            // fault on one finds it dropped; pages in flight are installed as planned (the
            // kernel zaps after this event is read, so they may land before or after).
            var p = max(0, (start - base) / pageSize)
            let last = min(pages, (end - base + pageSize - 1) / pageSize)
            while p < last {
                dropped.store(p, 1)
                _ = state.compareExchange(p, expected: PageState.missing, desired: PageState.removed)
                p += 1
            }
        }
    }

    /// The workload moved the region (mremap): a whole-region move is followed (installs and
    /// fault addresses use the new base from now on; page states are by index, so nothing
    /// else changes); a move of part of it, or a resize, fails the run with the reason.
    func handleRemap(from: UInt, to: UInt, length: Int) {
        let base = regionAddress
        guard from < base + UInt(pages * pageSize), from + UInt(length) > base else { return }
        remapEvents.add(1, ordering: .relaxed)
        if from == base && length == pages * pageSize {
            regionBase.store(to, ordering: .releasing)
            return
        }
        failureReason.withLock { r in
            if r == nil { r = "the workload moved \(length) bytes at 0x\(String(from, radix: 16)) of the restored region (0x\(String(base, radix: 16)), \(pages) pages) to 0x\(String(to, radix: 16)): only a move of the whole region is followed" }
        }
        _ = failureErrno.compareExchange(expected: 0, desired: EFAULT, ordering: .relaxed)
    }

    /// A FORK event: the child's copy of the registered ranges reports to `fd`. A thread of
    /// its own serves those faults with UFFDIO_COPY from the destination's copy of the image
    /// (the child reads what the restored process would have), until the restore ends. Rare:
    /// it may allocate.
    func startForkServer(fd: Int32) {
        forkEvents.add(1, ordering: .relaxed)
        // Non-blocking: once the child has exited, a poll may still report the descriptor
        // and a blocking read would then never return (and the teardown's join with it).
        _ = fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK)
        let child = Userfaultfd.Descriptor(adopting: fd, features: uffd.features)
        let base = regionAddress
        do throws(SystemError) {
            let t = try OSThread { [self] in forkServerLoop(child, base: base) }
            forkServers.withLock { $0.append(t) }
        } catch {
            // No thread for the child: its faults would hang it. The run fails with why.
            fail(error)
        }
    }

    func forkServerLoop(_ child: Userfaultfd.Descriptor, base: UInt) {
        let buffer = UnsafeMutablePointer<Userfaultfd.Message>.allocate(capacity: 64)
        defer { buffer.deallocate() }
        let end = base + UInt(pages * pageSize)
        while !forkStop.load(ordering: .acquiring) {
            guard (try? child.poll(timeoutNanoseconds: 20_000_000)) == true else { continue }
            guard let n = try? child.read(into: buffer, max: 64) else { return }
            // Readable but nothing to read: the child is gone; do not spin until the stop.
            if n == 0 { Clock.sleep(nanoseconds: 2_000_000); continue }
            for i in 0..<n where buffer[i].event == UInt32(memlab_UFFD_EVENT_PAGEFAULT) {
                let a = UInt(buffer[i].address) & ~UInt(pageSize - 1)
                guard a >= base && a < end else { continue }
                let page = Int((a - base) / UInt(pageSize))
                do throws(SystemError) {
                    try child.copy(to: UnsafeMutableRawPointer(bitPattern: a)!, from: UnsafeRawPointer(image.base + page * pageSize), length: pageSize)
                    forkFaults.add(1, ordering: .relaxed)
                } catch {
                    if error.errno == EEXIST { try? child.wake(UnsafeMutableRawPointer(bitPattern: a)!, length: pageSize) }
                }
            }
        }
    }

    /// Ends the fork servers (their children have exited: the workload waited for them).
    private func stopForkServers() {
        forkStop.store(true, ordering: .releasing)
        let ts = forkServers.withLock { t in defer { t = [] }; return t }
        for t in ts { t.join() }
    }

    /// How long a handler waits for messages while installs are deferred (EAGAIN): short,
    /// so the retry follows soon after the event's sender finished.
    static let retryWaitNS: Int64 = 50_000

    /// One handler thread: wait, read a batch, serve it, retry deferred installs; until its
    /// doorbell rings. While installs are deferred no wait blocks for long: the event that
    /// caused the EAGAIN may already have been read, and then no message would wake it.
    func handlerLoop(channel: Int = 0) {
        _ = memlab_set_timerslack(1)
        let cpu0 = memlab_thread_cpu_ns()
        let batch = min(max(config.batch, 1), 64)
        let buffer = UnsafeMutablePointer<Userfaultfd.Message>.allocate(capacity: 64)
        let capacity = max(config.maxWindowPages, config.windowPages, hugePages) + 1
        let list = UnsafeMutablePointer<Int32>.allocate(capacity: capacity)
        let scratch = UnsafeMutablePointer<Delivery>.allocate(capacity: capacity)
        let retryBuf = UnsafeMutablePointer<Retry>.allocate(capacity: 64)
        let threadCounts = UnsafeMutablePointer<Int>.allocate(capacity: FaultEngine.maxThreads + 1)
        threadCounts.initialize(repeating: 0, count: FaultEngine.maxThreads + 1)
        let epfd = config.wait == .epoll ? memlab_epoll_in(uffd.fd) : -1
        if config.wait == .epoll && epfd < 0 { fail(SystemError.current("epoll_create1/epoll_ctl(userfaultfd)")) }
        defer {
            if epfd >= 0 { close(epfd) }
            threadFaults.withLock { t in for i in 0...FaultEngine.maxThreads { t[i] += threadCounts[i] } }
            buffer.deallocate(); list.deallocate(); scratch.deallocate(); retryBuf.deallocate(); threadCounts.deallocate()
            handlerCPU.add(memlab_thread_cpu_ns() &- cpu0, ordering: .relaxed)
        }
        var exit = false
        /// A doorbell whose zero page met EAGAIN: retried like a deferred install.
        var doorbell: UInt = 0
        while !exit {
            let pending = retryPending.load(ordering: .relaxed) > 0 || doorbell != 0
            var n = 0
            do throws(SystemError) {
                switch config.wait {
                case .blocking:
                    let readable = pending ? try uffd.poll(timeoutNanoseconds: FaultEngine.retryWaitNS) : true
                    if readable { n = try uffd.read(into: buffer, max: batch) }
                case .poll:
                    if try uffd.poll(timeoutNanoseconds: pending ? FaultEngine.retryWaitNS : nil) { n = try uffd.read(into: buffer, max: batch) }
                case .epoll:
                    let rc = memlab_epoll_wait_in(epfd, pending ? FaultEngine.retryWaitNS : -1)
                    if rc < 0 && Glibc.errno != EINTR { throw SystemError.current("epoll_wait(userfaultfd)") }
                    if rc > 0 { n = try uffd.read(into: buffer, max: batch) }
                case .busy:
                    n = try uffd.read(into: buffer, max: batch)
                }
            } catch {
                fail(error)
                fillDoorbellOnEarlyExit()
                return
            }
            let now = Clock.nanoseconds()
            // The region's address when each fault was raised: a REMAP in this batch moves it
            // for the messages after it. The REMAPs themselves are published first, so the
            // installs for faults raised before the move already go to where the region is now.
            var regionAddress = self.regionAddress
            for i in 0..<n where buffer[i].event == UInt32(memlab_UFFD_EVENT_REMAP) { handleEvent(buffer[i]) }
            for i in 0..<n {
                let m = buffer[i]
                if m.event == UInt32(memlab_UFFD_EVENT_REMAP) {
                    if UInt(m.address) == regionAddress && Int(m.len) == pages * pageSize { regionAddress = UInt(m.end) }
                    continue
                }
                if m.event != UInt32(memlab_UFFD_EVENT_PAGEFAULT) { handleEvent(m); continue }
                let regionEnd = regionAddress + UInt(pages * pageSize)
                let a = UInt(m.address)
                if a >= regionAddress && a < regionEnd {
                    handleFault(page: Int((a - regionAddress) / UInt(pageSize)), time: now, tid: m.ptid, list: list, scratch: scratch,
                                threadCounts: threadCounts, channel: channel)
                } else if a >= doorbellAddress && a < doorbellAddress + UInt(config.handlerThreads * pageSize) {
                    // The doorbell: the owner asks this thread to leave.
                    doorbell = a & ~UInt(pageSize - 1)
                } else {
                    // Neither the region nor a doorbell: the workload moved part of the region
                    // or grew it (a whole-region move is followed above) or registered more. Fail the run
                    // with the reason; the owner then unregisters, which releases the thread.
                    failOutside(a)
                }
            }
            drainRetries(retryBuf, scratch, capacity: 64)
            if doorbell != 0 {
                do throws(SystemError) {
                    try uffd.zeropage(UnsafeMutableRawPointer(bitPattern: doorbell)!, length: pageSize)
                    exit = true
                } catch {
                    if error.errno == EEXIST { exit = true } else if error.errno != EAGAIN { fail(error); exit = true }
                }
            }
        }
    }

    /// The delivery thread: sleeps until the earliest arrival (ppoll on an eventfd that
    /// handler threads ring when they queue an earlier one), spins the last microseconds,
    /// then installs everything due with DONTWAKE and wakes each range once.
    func deliveryLoop() {
        _ = memlab_set_timerslack(1)
        let cpu0 = memlab_thread_cpu_ns()
        let due = UnsafeMutablePointer<Delivery>.allocate(capacity: 256)
        let retryBuf = UnsafeMutablePointer<Retry>.allocate(capacity: 64)
        defer { due.deallocate(); retryBuf.deallocate(); handlerCPU.add(memlab_thread_cpu_ns() &- cpu0, ordering: .relaxed) }
        var stopAt: UInt64 = 0
        while true {
            let draining = deliveryStop.load(ordering: .acquiring)
            // Installs deferred by EAGAIN (this thread's, the pusher's, the handlers').
            if retryPending.load(ordering: .relaxed) > 0 {
                drainRetries(retryBuf, due, capacity: 64)
                if retryPending.load(ordering: .relaxed) > 0 {
                    if draining {
                        // Teardown: give the retries a little while, then leave them (pages
                        // nobody touched; they count as sent, not installed).
                        if stopAt == 0 { stopAt = Clock.nanoseconds() + 200_000_000 }
                        if Clock.nanoseconds() > stopAt { return }
                    }
                    _ = memlab_ppoll_in(eventFD, FaultEngine.retryWaitNS)
                    var v: UInt64 = 0
                    _ = Glibc.read(eventFD, &v, 8)
                    continue
                }
            }
            let now = Clock.nanoseconds()
            var n = 0
            var next: UInt64? = nil
            heap.withLock { h in
                while n < 256, let e = h.earliest, e <= now || draining {
                    due[n] = h.pop()
                    n += 1
                }
                next = h.earliest
            }
            if n > 0 { complete(due, n); continue }
            if draining { return }
            if let next {
                if next > now &+ config.spinNS {
                    _ = memlab_ppoll_in(eventFD, Int64(next &- now &- config.spinNS))
                    var v: UInt64 = 0
                    _ = Glibc.read(eventFD, &v, 8)
                } else {
                    while Clock.nanoseconds() < next {}
                }
            } else {
                _ = memlab_ppoll_in(eventFD, 20_000_000)
                var v: UInt64 = 0
                _ = Glibc.read(eventFD, &v, 8)
            }
        }
    }

    /// The pusher: sends pages nobody asked for, keeping at most `pushWindowBytes` booked on
    /// the link ahead of now (a socket buffer's worth), in the policy's order.
    func pusherLoop() {
        _ = memlab_set_timerslack(1)
        let cpu0 = memlab_thread_cpu_ns()
        let criu = config.policy == .criuPush
        let criuMin = max(config.criuMinChunkBytes / pageSize, 1)
        let criuMax = max(config.criuMaxChunkBytes / pageSize, criuMin)
        let capacity = max(config.pushChunkPages, 1, criu ? criuMax : 1)
        var chunk = criu ? criuMin : max(config.pushChunkPages, 1)
        let list = UnsafeMutablePointer<Int32>.allocate(capacity: capacity + 1)
        let scratch = UnsafeMutablePointer<Delivery>.allocate(capacity: capacity + 1)
        defer { list.deallocate(); scratch.deallocate(); handlerCPU.add(memlab_thread_cpu_ns() &- cpu0, ordering: .relaxed) }
        let windowNS = link.transmitNS(config.pushWindowBytes)
        var linear = 0
        var orderIndex = 0
        var bubblePivot = -1
        var distance = 1
        while !pusherStop.load(ordering: .relaxed) {
            if linear >= pages && orderIndex >= config.pushOrder.count { break }
            let now = Clock.nanoseconds()
            if link.bytesPerSecond > 0 {
                let backlog = link.bulkBacklog(now: now)
                if backlog > windowNS {
                    Clock.sleep(until: now + (backlog - windowNS), spinNS: 0)
                    continue
                }
            }
            if criu && faultSincePush.exchange(false, ordering: .relaxed) {
                // A fault since the last chunk: CRIU goes back to DEFAULT_XFER_LEN.
                if chunk != criuMin { pushChunkResets.add(1, ordering: .relaxed) }
                chunk = criuMin
            }
            var n = 0
            // 1. Replay: the recorded working set first, in its order.
            while n < chunk && orderIndex < config.pushOrder.count {
                let p = Int(config.pushOrder[orderIndex])
                orderIndex += 1
                if claim(p, as: PageState.inflightPrefetch) { list[n] = Int32(p); n += 1 }
            }
            // 2. Bubble: outward from the latest fault, alternating sides.
            if n == 0 && config.policy == .bubble {
                let pv = pivot.load(ordering: .relaxed)
                if pv >= 0 {
                    if pv != bubblePivot { bubblePivot = pv; distance = 1 }
                    var forward = 0, backward = 0
                    let half = max(chunk / 2, 1)
                    var d = distance
                    while (forward + backward) < chunk && (bubblePivot + d < pages || bubblePivot - d >= 0) {
                        if forward < half, bubblePivot + d < pages, claim(bubblePivot + d, as: PageState.inflightPrefetch) {
                            list[n] = Int32(bubblePivot + d); n += 1; forward += 1
                        }
                        if backward < half, bubblePivot - d >= 0, claim(bubblePivot - d, as: PageState.inflightPrefetch) {
                            list[n] = Int32(bubblePivot - d); n += 1; backward += 1
                        }
                        d += 1
                        if d - distance > 4 * pages { break }
                    }
                    distance = d
                    // Ascending order makes the runs contiguous.
                    if n > 1 { sortInt32(list, n) }
                }
            }
            // 3a. criu-push: the next window of `chunk` pages from the lowest address not yet
            // pushed; the missing pages in it go as one transfer (zero pages are installed
            // locally on claim and pages a fault brought are skipped, as CRIU skips what it
            // has already transferred). Faults never move the cursor.
            var window = 0
            if n == 0 && criu {
                let stop = min(pages, linear + chunk)
                window = stop - linear
                var p = linear
                while p < stop {
                    if state.load(p) == PageState.missing && claim(p, as: PageState.inflightPrefetch) { list[n] = Int32(p); n += 1 }
                    p += 1
                }
                linear = stop
                if n == 0 {
                    if linear >= pages && claimed.load(ordering: .relaxed) >= pages { break }
                    if linear >= pages { Clock.sleep(nanoseconds: 100_000) }
                    continue
                }
            }
            // 3. Linear push, from the cursor a fault moved (QEMU restarts there).
            if n == 0 && config.policy != .workingSetReplay {
                if config.policy == .backgroundPush {
                    let c = pushCursor.exchange(-1, ordering: .relaxed)
                    if c >= 0 && c < pages { linear = c }
                }
                var scanned = 0
                var p = linear
                while n < chunk && scanned < pages {
                    if p >= pages { p = 0 }
                    if state.load(p) == PageState.missing && claim(p, as: PageState.inflightPrefetch) {
                        list[n] = Int32(p); n += 1
                    } else if n > 0 {
                        break // keep a transfer contiguous
                    }
                    p += 1
                    scanned += 1
                }
                linear = p
                if n == 0 && scanned >= pages { linear = pages }
            }
            if n == 0 {
                if config.policy == .workingSetReplay && orderIndex >= config.pushOrder.count { break }
                if claimed.load(ordering: .relaxed) >= pages { break }
                continue
            }
            send(list, n, urgent: false, faultPage: -1, faultTime: 0, scratch: scratch, channel: pusherChannel)
            pushChunks.add(1, ordering: .relaxed)
            pushChunkPagesSent.add(n, ordering: .relaxed)
            // criu-push's chunk is its address window; the others' is what they sent.
            let size = criu ? window : n
            if size > pushChunkMaxPages.load(ordering: .relaxed) { pushChunkMaxPages.store(size, ordering: .relaxed) }
            if criu && chunk < criuMax {
                // CRIU doubles the transfer length after each transfer (until a fault).
                chunk = min(chunk * 2, criuMax)
                pushChunkDoublings.add(1, ordering: .relaxed)
            }
        }
    }

    /// The pusher's (and the blocking prefetch's) connection: the one after the handlers'.
    var pusherChannel: Int { config.handlerThreads }

    /// REAP: installs `order` before the workload resumes — one bulk transfer, batched COPYs.
    public func prefetchBlocking(_ order: [Int32]) {
        var sorted = order
        sorted.sort()
        let list = UnsafeMutablePointer<Int32>.allocate(capacity: max(sorted.count, 1))
        var n = 0
        for p in sorted where claim(Int(p), as: PageState.inflightPrefetch) { list[n] = p; n += 1 }
        let scratch = UnsafeMutablePointer<Delivery>.allocate(capacity: max(n, 1))
        defer { list.deallocate(); scratch.deallocate() }
        if n == 0 { return }
        for i in 0..<n { transfers.increment(Int(list[i])) }
        let now = Clock.nanoseconds()
        let arrival = link.isInstant ? now : link.schedule(bytes: n * pageSize, urgent: false, now: now)
        var runs = 0, start = 0
        for i in 1...n where i == n || list[i] != list[i - 1] + 1 {
            scratch[runs] = Delivery(arrival: arrival, first: list[start], count: Int32(i - start), faultTime: 0)
            runs += 1
            start = i
        }
        if source != nil && !fetch(channel: pusherChannel, scratch, runs) { return }
        waitUntil(arrival, spinNS: config.spinNS)
        complete(scratch, runs)
    }
}

/// Insertion sort (small n, no allocation).
@inline(__always)
func sortInt32(_ a: UnsafeMutablePointer<Int32>, _ n: Int) {
    var i = 1
    while i < n {
        let v = a[i]
        var j = i - 1
        while j >= 0 && a[j] > v { a[j + 1] = a[j]; j -= 1 }
        a[j + 1] = v
        i += 1
    }
}

extension FaultEngine {
    /// Why the engine stopped serving: the kernel's (or the source's) errno and a reason.
    public struct Failure: Error, Sendable, Equatable, CustomStringConvertible {
        public let errno: Int32
        public let reason: String
        public var description: String { reason }
    }

    /// Everything the engine counted, as one plain value.
    public struct Counters: Sendable, Equatable {
        /// Faults by how they were served: a transfer of their own, joined to one in flight,
        /// on a page a push had in flight, or locally (known zero, already there, dropped).
        public var remoteFaults = 0, joinedFaults = 0, prefetchServedFaults = 0, localFaults = 0
        /// uffd messages and non-fault events read.
        public var messages = 0, events = 0
        /// Installs that found the page there (EEXIST), met mmap_changing (EAGAIN), or found
        /// the region moved under them (ENOENT, retried at the new address).
        public var eexist = 0, eagain = 0, movedUnderInstall = 0
        /// Pages whose install waited in the retry ring.
        public var deferredPages = 0
        public var removeEvents = 0, unmapEvents = 0, remapEvents = 0, forkEvents = 0
        /// Faults of a forked child served by its fork server; faults on pages the
        /// application dropped after their install.
        public var forkFaults = 0, droppedRefaults = 0
        public var ioctls = 0, wakes = 0
        /// Pages claimed (transferred or installed locally), and those claimed by the pusher.
        public var claimedPages = 0, pushedPages = 0
        /// The pusher's transfers, the largest (pages), and criu-push's resets to the
        /// smallest chunk (a fault arrived) and doublings (none did).
        public var pushChunks = 0, pushChunkMaxPages = 0, pushChunkResets = 0, pushChunkDoublings = 0
        /// Pages the pusher's chunks carried (fault-around windows are not in it).
        public var pushChunkPagesSent = 0
        /// CPU time of the engine's threads.
        public var handlerCPUSeconds = 0.0
        /// CLOCK_MONOTONIC ns when the last page was installed (0: never).
        public var fullyInstalledAt: UInt64 = 0
        /// Remote faults per workload thread (UFFD_FEATURE_THREAD_ID), by the order of the
        /// tids given to `start`, and those whose tid was none of them.
        public var faultsPerThread: [Int] = []
        public var faultsUnattributed = 0
        /// Handler-side latency of each remote fault (read → installed and woken), ns.
        public var faultLatencyNS: [UInt64] = []
        /// Pages in the order their first fault reached a handler.
        public var faultOrder: [Int32] = []
        public var failure: Failure?
        /// Where the region ended (a whole-region mremap moves it).
        public var regionAddress: UInt = 0
        public init() {}
    }

    /// One page after the engine stopped.
    public struct PageRecord: Sendable, Equatable {
        public enum Installed: Sendable { case byFault, byPush, locally }
        /// How the engine installed it (nil: never, or still in flight when it stopped).
        public var installed: Installed?
        /// Times it was sent over the link (more than 1: a duplicate).
        public var transfers: Int
        /// The application dropped it (MADV_DONTNEED, munmap) during the run.
        public var dropped: Bool
    }

    /// Wakes the delivery thread (it re-reads its stop flag, or an earlier arrival).
    func ringDelivery() {
        var one: UInt64 = 1
        _ = Glibc.write(eventFD, &one, 8)
    }
}

/// A fixed array of Int32 atomics (the workload's tids: written before the handlers start,
/// read on the fault path). Frees its own storage.
final class AtomicInt32Array: @unchecked Sendable {
    // @unchecked: a raw pointer whose elements are accessed only through `Atomic`.
    private let p: UnsafeMutablePointer<Atomic<Int32>>
    let count: Int
    init(count: Int) {
        self.count = count
        p = .allocate(capacity: max(count, 1))
        for i in 0..<count { (p + i).initialize(to: Atomic(0)) }
    }
    deinit { p.deinitialize(count: count); p.deallocate() }
    @inline(__always) func load(_ i: Int) -> Int32 { p[i].load(ordering: .relaxed) }
    @inline(__always) func store(_ i: Int, _ v: Int32) { p[i].store(v, ordering: .relaxed) }
}
