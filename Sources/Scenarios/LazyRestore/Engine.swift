#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LinuxMM
import Synchronization

/// How a restore moves pages. Everything the fault path needs is decided here, before the
/// handler threads start.
struct RestoreConfig: Sendable {
    enum Policy: String, Sendable, CaseIterable {
        case onDemand = "on-demand", faultAround = "fault-around", faultAroundAdaptive = "fault-around-adaptive"
        case backgroundPush = "background-push", bubble, workingSetReplay = "working-set-replay", huge
    }
    enum Resolve: String, Sendable { case copy, move, `continue` }
    enum WaitMode: String, Sendable { case blocking, poll, busy }

    var policy: Policy = .onDemand
    var resolve: Resolve = .copy
    var wait: WaitMode = .blocking
    var handlerThreads = 1
    var batch = 64
    /// Fault-around window (fixed), and the adaptive window's ceiling, in pages.
    var windowPages = 16
    var maxWindowPages = 512
    var pushChunkPages = 16
    var pushWindowBytes = 1 << 20
    /// Known-zero pages resolved locally with UFFDIO_ZEROPAGE (else transferred like any page).
    var zeropage = true
    var spinNS: UInt64 = 5_000
    /// working-set-replay, concurrent mode: the pusher installs these pages first, in order.
    var pushOrder: [Int32] = []
    /// Whether a background pusher runs.
    var pusher: Bool { policy == .backgroundPush || policy == .bubble || (policy == .workingSetReplay && !pushOrder.isEmpty) }
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
struct Delivery {
    var arrival: UInt64
    var first: Int32
    var count: Int32
    var faultTime: UInt64
}

/// A min-heap on arrival over preallocated storage (each page is claimed once, so `pages`
/// deliveries bound it).
struct DeliveryHeap: @unchecked Sendable {
    let items: UnsafeMutablePointer<Delivery>
    let capacity: Int
    var count = 0

    init(capacity: Int) {
        self.capacity = capacity
        items = .allocate(capacity: capacity)
    }

    @inline(__always) var earliest: UInt64? { count > 0 ? items[0].arrival : nil }

    @inline(__always) mutating func push(_ d: Delivery) {
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

    @inline(__always) mutating func pop() -> Delivery {
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

/// The fault engine: one userfaultfd over a region restored from `image` through `link`.
/// Handler threads read faults (blocking read, ppoll or busy polling, `batch` messages per
/// read), claim pages, schedule them on the link and install them on arrival; a delivery
/// thread waits for arrivals that lie in the future; an optional pusher sends pages nobody
/// asked for yet. The fault path allocates nothing: buffers are made before the threads
/// start and the shared state is atomics and mutex-guarded preallocated storage.
final class FaultEngine: Sendable {
    let config: RestoreConfig
    let uffd: Userfaultfd.Descriptor
    let link: EmulatedLink
    let image: PageImage
    let pages: Int
    let regionAddress: UInt
    let doorbellAddress: UInt
    /// resolve=move: an anonymous copy of the image the pages are moved out of;
    /// resolve=continue: a second mapping of the memfd (the page cache) the data lands in.
    let stagingAddress: UInt
    /// Where installs copy from: the image itself (source memory), or the landing buffer a
    /// real page source fetches into (then `source` is set and every transfer goes through it).
    let dataAddress: UInt
    let source: PageSource?
    /// A readable reason for the first failure (set off the fast path, once).
    let failureReason = Mutex<String?>(nil)

    let state: AtomicByteArray
    let transfers: AtomicByteArray
    private let heap: Mutex<DeliveryHeap>
    let eventFD: Int32

    let remoteFaults = Atomic<Int>(0)
    let joinedFaults = Atomic<Int>(0)
    let prefetchFaults = Atomic<Int>(0)
    let localFaults = Atomic<Int>(0)
    let messages = Atomic<Int>(0)
    let events = Atomic<Int>(0)
    let eexist = Atomic<Int>(0)
    let eagain = Atomic<Int>(0)
    let ioctls = Atomic<Int>(0)
    let wakes = Atomic<Int>(0)
    let claimed = Atomic<Int>(0)
    let pushedPages = Atomic<Int>(0)
    let handlerCPU = Atomic<UInt64>(0)
    let failureErrno = Atomic<Int32>(0)
    let stopping = Atomic<Bool>(false)
    let pusherStop = Atomic<Bool>(false)
    let deliveryStop = Atomic<Bool>(false)
    let fullyInstalledAt = Atomic<UInt64>(0)

    // Policy state.
    let adaptiveWindow = Atomic<Int>(1)
    let adaptiveNext = Atomic<Int>(-1)
    let pushCursor = Atomic<Int>(0)
    let pivot = Atomic<Int>(-1)

    /// Handler-side latency of each remote fault (read → installed and woken), ns.
    let faultLatency: AppendLog
    /// Pages in the order their first fault reached the handler (working-set recording).
    let faultOrder: AppendLog

    init(config: RestoreConfig, region: UnsafeMutableRawPointer, doorbell: UnsafeMutableRawPointer,
         staging: UnsafeMutableRawPointer?, image: PageImage, link: EmulatedLink, uffd: Userfaultfd.Descriptor,
         source: PageSource? = nil) throws {
        self.config = config
        self.source = source.flatMap { $0.kind == .memory ? nil : $0 }
        dataAddress = UInt(bitPattern: self.source?.landing.base ?? image.base)
        self.image = image
        self.pages = image.pages
        self.link = link
        self.uffd = uffd
        regionAddress = UInt(bitPattern: region)
        doorbellAddress = UInt(bitPattern: doorbell)
        stagingAddress = staging.map { UInt(bitPattern: $0) } ?? 0
        state = AtomicByteArray(count: pages)
        transfers = AtomicByteArray(count: pages)
        heap = Mutex(DeliveryHeap(capacity: pages + 64))
        eventFD = memlab_eventfd()
        if eventFD < 0 { throw SystemError.current("eventfd") }
        faultLatency = AppendLog(capacity: pages + 1024)
        faultOrder = AppendLog(capacity: pages + 1024)
        adaptiveWindow.store(1, ordering: .relaxed)
    }

    deinit {
        close(eventFD)
        state.deallocate()
        transfers.deallocate()
        heap.withLock { $0.items.deallocate() }
    }

    @inline(__always) var region: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: regionAddress)! }
    @inline(__always) func address(_ page: Int) -> UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: regionAddress + UInt(page) * 4096)! }

    func fail(_ e: SystemError) {
        _ = failureErrno.compareExchange(expected: 0, desired: e.errno == 0 ? EIO : e.errno, ordering: .relaxed)
    }

    /// A page source failed: the errno, and a reason naming the source (allocates; the run
    /// is over anyway).
    func fail(_ e: SourceFailure) {
        let label = source?.label ?? "page source"
        failureReason.withLock { r in
            if r == nil { r = "\(label): \(e.what) (\(String(cString: strerror(e.errno))))" }
        }
        _ = failureErrno.compareExchange(expected: 0, desired: e.errno == 0 ? EIO : e.errno, ordering: .relaxed)
    }

    /// Fetches the runs from the real source, if there is one. Returns false on failure
    /// (recorded; the pages stay in flight and the run fails).
    @inline(__always)
    func fetch(channel: Int, _ runs: UnsafePointer<Delivery>, _ n: Int) -> Bool {
        guard let source else { return true }
        do throws(SourceFailure) { try source.fetch(channel: channel, runs: runs, count: n) } catch { fail(error); return false }
        return true
    }

    @inline(__always) var data: UnsafeMutableRawPointer { UnsafeMutableRawPointer(bitPattern: dataAddress)! }

    // MARK: installing

    /// Installs pages [first, first+count) with DONTWAKE (the caller wakes). Retries EAGAIN;
    /// on EEXIST falls back to page by page and counts the conflicts.
    @inline(__always)
    func install(first: Int, count: Int) {
        let len = count * 4096
        let dst = address(first)
        var done = 0
        while done < len {
            var n = 0
            do throws(SystemError) {
                ioctls.add(1, ordering: .relaxed)
                switch config.resolve {
                case .copy:
                    try uffd.copy(to: dst + done, from: UnsafeRawPointer(data + first * 4096 + done), length: len - done, dontWake: true, copied: &n)
                case .move:
                    let src = UnsafeMutableRawPointer(bitPattern: stagingAddress + UInt(first * 4096 + done))!
                    n = try uffd.move(to: dst + done, from: src, length: len - done, dontWake: true)
                case .continue:
                    // The data lands in the page cache (the second mapping), then is mapped.
                    let cache = UnsafeMutableRawPointer(bitPattern: stagingAddress + UInt(first * 4096 + done))!
                    memcpy(cache, data + first * 4096 + done, len - done)
                    try uffd.continue(dst + done, length: len - done, dontWake: true)
                    n = len - done
                }
                done += n
            } catch {
                if error.errno == EAGAIN {
                    eagain.add(1, ordering: .relaxed)
                    if n > 0 { done += n }
                    sched_yield()
                    continue
                }
                if error.errno == EEXIST {
                    if len - done > 4096 {
                        // Page by page, so only the page that is there already is skipped.
                        var off = done
                        while off < len {
                            install(first: first + off / 4096, count: 1)
                            off += 4096
                        }
                        return
                    }
                    eexist.add(1, ordering: .relaxed)
                    return
                }
                fail(error)
                return
            }
        }
    }

    @inline(__always)
    func wake(first: Int, count: Int) {
        wakes.add(1, ordering: .relaxed)
        do throws(SystemError) { try uffd.wake(address(first), length: count * 4096) } catch { fail(error) }
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
    /// page cache; no transfer.
    @inline(__always)
    func installLocal(_ page: Int) {
        do throws(SystemError) {
            ioctls.add(1, ordering: .relaxed)
            switch config.resolve {
            case .continue: try uffd.continue(address(page), length: 4096)
            default: try uffd.zeropage(address(page), length: 4096)
            }
        } catch {
            if error.errno == EEXIST { eexist.add(1, ordering: .relaxed); wake(first: page, count: 1) } else if error.errno != EAGAIN { fail(error) }
        }
        state.store(page, PageState.installedLocal)
        if claimed.add(1, ordering: .relaxed).newValue == pages { fullyInstalledAt.store(Clock.nanoseconds(), ordering: .relaxed) }
    }

    /// Installs, marks and wakes a set of deliveries that have arrived.
    @inline(__always)
    func complete(_ ds: UnsafeMutablePointer<Delivery>, _ n: Int) {
        for i in 0..<n { install(first: Int(ds[i].first), count: Int(ds[i].count)) }
        for i in 0..<n { markInstalled(first: Int(ds[i].first), count: Int(ds[i].count)) }
        for i in 0..<n { wake(first: Int(ds[i].first), count: Int(ds[i].count)) }
        let now = Clock.nanoseconds()
        var total = 0
        for i in 0..<n {
            total += Int(ds[i].count)
            if ds[i].faultTime != 0 { faultLatency.append(now &- ds[i].faultTime) }
        }
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
        var arrival = link.isInstant ? now : link.schedule(bytes: n * 4096, urgent: urgent, now: now)
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
    func handleFault(page: Int, time: UInt64, list: UnsafeMutablePointer<Int32>, scratch: UnsafeMutablePointer<Delivery>, channel: Int = 0) {
        messages.add(1, ordering: .relaxed)
        switch state.load(page) {
        case PageState.installedFault, PageState.installedPrefetch, PageState.installedLocal:
            // Installed since the fault was raised: only a wake is missing.
            localFaults.add(1, ordering: .relaxed)
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
                do throws(SystemError) { try uffd.zeropage(address(page), length: 4096) } catch { if error.errno != EEXIST { fail(error) } }
                state.store(page, PageState.installedLocal)
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
            lo = page / 512 * 512
            hi = min(pages, lo + 512)
        case .backgroundPush:
            pushCursor.store(page + 1, ordering: .relaxed)
        case .bubble:
            pivot.store(page, ordering: .relaxed)
        case .onDemand, .workingSetReplay:
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
        let start = Int(m.address), end = Int(m.end)
        let base = Int(regionAddress)
        guard end > base, start < base + pages * 4096 else { return }
        if m.event == UInt32(memlab_UFFD_EVENT_REMOVE) || m.event == UInt32(memlab_UFFD_EVENT_UNMAP) {
            // The range was dropped by the application: later faults there are zero pages.
            var p = max(0, (start - base) / 4096)
            let last = min(pages, (end - base + 4095) / 4096)
            while p < last { state.store(p, PageState.removed); p += 1 }
        }
    }

    /// One handler thread: wait, read a batch, serve it; until its doorbell rings.
    func handlerLoop(channel: Int = 0) {
        _ = memlab_set_timerslack(1)
        let cpu0 = memlab_thread_cpu_ns()
        let batch = min(max(config.batch, 1), 64)
        let buffer = UnsafeMutablePointer<Userfaultfd.Message>.allocate(capacity: 64)
        let list = UnsafeMutablePointer<Int32>.allocate(capacity: max(config.maxWindowPages, config.windowPages, 512) + 1)
        let scratch = UnsafeMutablePointer<Delivery>.allocate(capacity: max(config.maxWindowPages, config.windowPages, 512) + 1)
        defer {
            buffer.deallocate(); list.deallocate(); scratch.deallocate()
            handlerCPU.add(memlab_thread_cpu_ns() &- cpu0, ordering: .relaxed)
        }
        let regionEnd = regionAddress + UInt(pages * 4096)
        var exit = false
        while !exit {
            var n = 0
            do throws(SystemError) {
                switch config.wait {
                case .blocking:
                    n = try uffd.read(into: buffer, max: batch)
                case .poll:
                    if try uffd.poll() { n = try uffd.read(into: buffer, max: batch) }
                case .busy:
                    n = try uffd.read(into: buffer, max: batch)
                }
            } catch {
                fail(error)
                return
            }
            let now = Clock.nanoseconds()
            for i in 0..<n {
                let m = buffer[i]
                if m.event != UInt32(memlab_UFFD_EVENT_PAGEFAULT) { handleEvent(m); continue }
                let a = UInt(m.address)
                if a >= regionAddress && a < regionEnd {
                    handleFault(page: Int((a - regionAddress) / 4096), time: now, list: list, scratch: scratch, channel: channel)
                } else {
                    // The doorbell: the owner asks this thread to leave.
                    let page = UnsafeMutableRawPointer(bitPattern: a & ~UInt(4095))!
                    do throws(SystemError) { try uffd.zeropage(page, length: 4096) } catch { fail(error) }
                    exit = true
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
        defer { due.deallocate(); handlerCPU.add(memlab_thread_cpu_ns() &- cpu0, ordering: .relaxed) }
        while true {
            let draining = deliveryStop.load(ordering: .acquiring)
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
        let chunk = max(config.pushChunkPages, 1)
        let list = UnsafeMutablePointer<Int32>.allocate(capacity: chunk + 1)
        let scratch = UnsafeMutablePointer<Delivery>.allocate(capacity: chunk + 1)
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
        }
    }

    /// The pusher's (and the blocking prefetch's) connection: the one after the handlers'.
    var pusherChannel: Int { config.handlerThreads }

    /// REAP: installs `order` before the workload resumes — one bulk transfer, batched COPYs.
    func prefetchBlocking(_ order: [Int32]) {
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
        let arrival = link.isInstant ? now : link.schedule(bytes: n * 4096, urgent: false, now: now)
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
