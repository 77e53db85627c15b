#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LinuxMM
import Workloads
import Transfer
import Synchronization

/// The access traces of a restore's workload, generated before anything is timed: one per
/// thread, each op a page index with flags (bit 31: the thread's first touch of the page,
/// bit 30: a write, bit 29: a known-zero page). Replaying the same traces on resident memory
/// gives the baseline; replaying them twice gives working-set-replay its repeated trace.
final class AccessTraces: @unchecked Sendable {
    // @unchecked: `ops` is written only by init and read by the workload threads after; it
    // is freed by this type's deinit.
    enum Pattern: String, Sendable { case sequential, random, zipf, trace }
    static let firstBit: UInt32 = 1 << 31
    static let writeBit: UInt32 = 1 << 30
    static let zeroBit: UInt32 = 1 << 29
    static let pageMask: UInt32 = (1 << 29) - 1

    let threads: Int
    let opsPerThread: Int
    let ops: UnsafeMutablePointer<UInt32>   // threads × opsPerThread
    /// 1 for a page some thread touches.
    let touched: [UInt8]
    let distinctPages: Int

    init(pattern: Pattern, pages: Int, threads: Int, opsPerThread: Int, writeRatio: Double, zipfSkew: Double,
         seed: UInt64, image: PageImage, trace: [TraceFile.Access] = []) {
        self.threads = threads
        self.opsPerThread = opsPerThread
        ops = .allocate(capacity: threads * opsPerThread)
        var touched = [UInt8](repeating: 0, count: pages)
        // Zipf: a CDF over ranks, ranks scattered over the region by a fixed permutation.
        var cdf: [Double] = []
        var perm: [Int32] = []
        if pattern == .zipf {
            cdf.reserveCapacity(pages)
            var sum = 0.0
            for r in 0..<pages { sum += 1.0 / pow(Double(r + 1), zipfSkew); cdf.append(sum) }
            for r in 0..<pages { cdf[r] /= sum }
            perm = (0..<pages).map { Int32($0) }
            var x = seed ^ 0xABCD
            for i in stride(from: pages - 1, to: 0, by: -1) {
                x = mix64(x)
                perm.swapAt(i, Int(x % UInt64(i + 1)))
            }
        }
        let writeThreshold = UInt64(writeRatio * 1_000_000)
        var seen = [UInt8](repeating: 0, count: pages)
        for t in 0..<threads {
            for i in 0..<pages where seen[i] != 0 { seen[i] = 0 }
            let sliceLo = pages * t / threads, sliceHi = pages * (t + 1) / threads
            let slice = max(sliceHi - sliceLo, 1)
            for i in 0..<opsPerThread {
                let h = mix64(seed &+ UInt64(t) << 40 &+ UInt64(i))
                let page: Int
                switch pattern {
                case .sequential: page = sliceLo + i % slice
                case .random: page = Int(h % UInt64(pages))
                case .zipf:
                    let u = Double(h >> 11) / Double(1 << 53)
                    var lo = 0, hi = pages - 1
                    while lo < hi { let mid = (lo + hi) / 2; if cdf[mid] < u { lo = mid + 1 } else { hi = mid } }
                    page = Int(perm[lo])
                case .trace:
                    // Line j runs on thread j mod threads; a thread short of lines repeats its
                    // last page as a read (padding to opsPerThread).
                    let j = i * threads + t
                    if j < trace.count { page = Int(trace[j].page) } else if i > 0 { page = Int(ops[t * opsPerThread + i - 1] & AccessTraces.pageMask) } else { page = Int(trace[j % trace.count].page) }
                }
                var e = UInt32(page)
                if seen[page] == 0 { seen[page] = 1; e |= AccessTraces.firstBit }
                let mode = pattern == .trace && i * threads + t < trace.count ? trace[i * threads + t].mode : (pattern == .trace ? TraceFile.Access.read : TraceFile.Access.unspecified)
                if mode == TraceFile.Access.write || (mode == TraceFile.Access.unspecified && mix64(h ^ 0x5555) % 1_000_000 < writeThreshold) { e |= AccessTraces.writeBit }
                if image.isZero(page) { e |= AccessTraces.zeroBit }
                touched[page] = 1
                ops[t * opsPerThread + i] = e
            }
        }
        self.touched = touched
        distinctPages = touched.reduce(0) { $0 + Int($1) }
    }

    deinit { ops.deallocate() }

    /// Distinct pages in thread order of first touch (the working set a first restore records).
    var firstTouchOrder: [Int32] {
        var out: [Int32] = []
        for t in 0..<threads {
            for i in 0..<opsPerThread where ops[t * opsPerThread + i] & AccessTraces.firstBit != 0 {
                out.append(Int32(ops[t * opsPerThread + i] & AccessTraces.pageMask))
            }
        }
        return out
    }
}

/// What one workload pass measured.
struct WorkloadOutcome {
    var startNS: UInt64 = 0
    var firstResponseNS: UInt64 = 0
    var endNS: UInt64 = 0
    var ops = 0
    /// Per first touch: its duration (ns), as the workload thread saw it.
    var firstTouchNS: [UInt64] = []
    var blockedNS: UInt64 = 0
    /// MADV_DONTNEED calls the dropping thread made (`dropEvery`).
    var drops = 0
    var opsPerSecond: Double { endNS > startNS ? Double(ops) / (Double(endNS - startNS) / 1e9) : 0 }
}

/// Runs the traces over `region` on one OS thread each; every op reads or writes one word
/// of its page (a write stores the source's own value, so contents stay verifiable). Each
/// first touch is timed. `release` is called once all threads are ready: time starts there.
final class WorkloadRun: @unchecked Sendable {
    // @unchecked: the per-thread arrays are written each by its own thread and read by the
    // owner after `join`; the rest is constants and atomics (`startNS` is set before `go`).
    let traces: AccessTraces
    let pageSize = System.pageSize
    let regionAddress: UInt
    let seed: UInt64
    let ready = Atomic<Int>(0)
    let go = Atomic<Bool>(false)
    let finished = Atomic<Int>(0)
    let firstResponse = Atomic<UInt64>(UInt64.max)
    let logs: UnsafeMutablePointer<UInt64>   // per thread, opsPerThread slots
    let logCounts: UnsafeMutablePointer<Int>
    let ends: UnsafeMutablePointer<UInt64>
    let blocked: UnsafeMutablePointer<UInt64>
    /// Each thread's tid (gettid), written before it reports ready.
    let tidStorage: UnsafeMutablePointer<Int32>
    /// Testing the REMOVE path: the last thread drops (MADV_DONTNEED) the page of every
    /// `dropEvery`-th op right after touching it (0: never).
    let dropEvery: Int
    let dropCount = Atomic<Int>(0)
    /// Testing REMAP and FORK (one workload thread): after this many ops the thread moves the
    /// whole region with mremap and goes on at the new address, or forks a child that compares
    /// every 7th page with the source image (0: never).
    let remapAfter: Int
    let forkAfter: Int
    let expected: UnsafeRawPointer?
    /// Where the region is after a move (0: not moved), and an errno if the move failed.
    let movedTo = Atomic<UInt>(0)
    let moveErrno = Atomic<Int32>(0)
    /// The forked child's mismatches (-1 fork failed, -2 killed by a signal); -3: no fork.
    let forkResult = Atomic<Int>(-3)
    private var threads: [OSThread] = []
    private(set) var startNS: UInt64 = 0

    init(traces: AccessTraces, region: UnsafeMutableRawPointer, seed: UInt64, dropEvery: Int = 0,
         remapAfter: Int = 0, forkAfter: Int = 0, expected: UnsafeRawPointer? = nil) {
        self.traces = traces
        self.dropEvery = dropEvery
        self.remapAfter = remapAfter
        self.forkAfter = forkAfter
        self.expected = expected
        tidStorage = .allocate(capacity: traces.threads)
        tidStorage.initialize(repeating: 0, count: traces.threads)
        regionAddress = UInt(bitPattern: region)
        self.seed = seed
        logs = .allocate(capacity: traces.threads * traces.opsPerThread)
        logCounts = .allocate(capacity: traces.threads)
        logCounts.initialize(repeating: 0, count: traces.threads)
        ends = .allocate(capacity: traces.threads)
        ends.initialize(repeating: 0, count: traces.threads)
        blocked = .allocate(capacity: traces.threads)
        blocked.initialize(repeating: 0, count: traces.threads)
    }

    deinit { logs.deallocate(); logCounts.deallocate(); ends.deallocate(); blocked.deallocate(); tidStorage.deallocate() }

    /// The workload threads' tids (after `start()`).
    var tids: [Int32] { (0..<traces.threads).map { tidStorage[$0] } }

    /// Starts the threads; they wait for `release()`.
    func start() throws {
        for t in 0..<traces.threads {
            threads.append(try OSThread { [self] in self.body(t) })
        }
        while ready.load(ordering: .acquiring) < traces.threads { sched_yield() }
    }

    /// Lets the threads go; time counts from `t` (the resume, which may precede a prefetch).
    func release(at t: UInt64) {
        startNS = t
        go.store(true, ordering: .releasing)
    }

    var done: Bool { finished.load(ordering: .acquiring) == traces.threads }

    func join() -> WorkloadOutcome {
        for t in threads { t.join() }
        var o = WorkloadOutcome()
        o.startNS = startNS
        o.firstResponseNS = firstResponse.load(ordering: .relaxed)
        o.endNS = (0..<traces.threads).map { ends[$0] }.max() ?? startNS
        o.ops = traces.threads * traces.opsPerThread
        for t in 0..<traces.threads {
            o.firstTouchNS.append(contentsOf: UnsafeBufferPointer(start: logs + t * traces.opsPerThread, count: logCounts[t]))
            o.blockedNS &+= blocked[t]
        }
        o.drops = dropCount.load(ordering: .relaxed)
        return o
    }

    private func body(_ t: Int) {
        let n = traces.opsPerThread
        let ops = traces.ops + t * n
        let log = logs + t * n
        var logged = 0
        var blockedNS: UInt64 = 0
        var sum: UInt64 = 0
        let seed = self.seed
        var base = regionAddress
        let dropEvery = t == traces.threads - 1 ? self.dropEvery : 0
        let remapAt = t == 0 ? remapAfter : 0, forkAt = t == 0 ? forkAfter : 0
        var drops = 0
        tidStorage[t] = memlab_gettid()
        ready.add(1, ordering: .releasing)
        while !go.load(ordering: .acquiring) { sched_yield() }
        for i in 0..<n {
            let e = ops[i]
            let page = Int(e & AccessTraces.pageMask)
            let word = Int((UInt64(page) &* 0x9E37_79B1 &+ UInt64(i)) & 511)
            let ptr = UnsafeMutablePointer<UInt64>(bitPattern: base + UInt(page * pageSize + word * 8))!
            if e & AccessTraces.firstBit != 0 {
                let t0 = Clock.nanoseconds()
                if e & AccessTraces.writeBit != 0 {
                    ptr.pointee = e & AccessTraces.zeroBit != 0 ? 0 : PageImage.word(seed: seed, page: page, word: word)
                } else {
                    sum &+= ptr.pointee
                }
                let dt = Clock.nanoseconds() &- t0
                log[logged] = dt
                logged += 1
                blockedNS &+= dt
            } else if e & AccessTraces.writeBit != 0 {
                ptr.pointee = e & AccessTraces.zeroBit != 0 ? 0 : PageImage.word(seed: seed, page: page, word: word)
            } else {
                sum &+= ptr.pointee
            }
            if dropEvery > 0 && (i + 1) % dropEvery == 0 {
                // The application drops a page it just used: a REMOVE event the handler must
                // read while other threads' faults are in flight (mmap_changing → EAGAIN).
                _ = madvise(UnsafeMutableRawPointer(bitPattern: base + UInt(page * pageSize))!, pageSize, memlab_MADV_DONTNEED)
                drops += 1
            }
            if remapAt > 0 && i + 1 == remapAt {
                // The application moves its memory: a REMAP event; later faults arrive at the
                // new address and the handler must follow.
                if let moved = memlab_remap_away(UnsafeMutableRawPointer(bitPattern: base)!, traces.touched.count * pageSize) {
                    base = UInt(bitPattern: moved)
                    movedTo.store(base, ordering: .releasing)
                } else {
                    moveErrno.store(Glibc.errno, ordering: .relaxed)
                }
            }
            if forkAt > 0 && i + 1 == forkAt, let expected {
                // A FORK event: the child reads pages the parent has and pages still missing.
                forkResult.store(Int(memlab_fork_compare_pages(UnsafeRawPointer(bitPattern: base)!, expected, traces.touched.count, 7)), ordering: .relaxed)
            }
            if i == 0 {
                let now = Clock.nanoseconds()
                var cur = firstResponse.load(ordering: .relaxed)
                while now < cur {
                    let (x, old) = firstResponse.compareExchange(expected: cur, desired: now, ordering: .relaxed)
                    if x { break }
                    cur = old
                }
            }
        }
        ends[t] = Clock.nanoseconds()
        logCounts[t] = logged
        blocked[t] = blockedNS
        if drops > 0 { dropCount.add(drops, ordering: .relaxed) }
        blackHole(sum)
        finished.add(1, ordering: .releasing)
    }
}
