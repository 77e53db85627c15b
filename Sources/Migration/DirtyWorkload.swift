#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LinuxMM
import Transfer
import Synchronization

/// The guest of a migration: threads writing pages of a region at a chosen rate (pages per
/// second over all threads), uniformly at random over the first `hotPages` pages. Each write
/// stores a fresh 64-bit value, so a page the destination has in an older version differs.
/// `stop()` is the "pause the vCPUs" of pre-copy's stop-and-copy: it returns once every
/// thread has stopped writing.
public final class DirtyWorkload: @unchecked Sendable {
    // @unchecked: `start`, `stop` and the vars are the owner's, called from one thread; the
    // writer threads read only constants and atomics.
    public let base: UnsafeMutableRawPointer
    public let pages: Int
    public let hotPages: Int
    public let rate: Double
    public let threads: Int
    /// Each write stores the value already there (a volatile read and write back): pages are
    /// written — they fault, count as dirty — but their contents stay those of the source, so
    /// a migration's destination can be compared with the source after the workload resumed
    /// there (hybrid and post-copy).
    public let preservesValues: Bool
    private let stopFlag = Atomic<Bool>(false)
    private let stoppedThreads = Atomic<Int>(0)
    private let writeCount = Atomic<Int>(0)
    /// Auto-converge: the throttle in percent (0…99; see `setThrottle`).
    private let throttlePercent = Atomic<Int>(0)
    /// Dirty limit: the most pages/s each thread may write (0: no limit), millipages/s.
    private let dirtyLimitMilli = Atomic<Int>(0)
    /// Nanoseconds all threads spent asleep for the throttle (not for pacing).
    private let throttledNS = Atomic<Int>(0)
    /// Posted by `stop` once per thread: a thread asleep between writes (pacing or throttle)
    /// wakes at once, so the pause is not a sleep's length late.
    private let wake = Semaphore()
    private var handles: [OSThread] = []
    private var startedAt: UInt64 = 0
    public private(set) var stoppedAt: UInt64 = 0

    /// QEMU's CPU throttle timeslice (softmmu/cpu-throttle.c): a throttled vCPU runs this long,
    /// then sleeps pct / (1 − pct) of it.
    public static let throttleTimesliceNS: UInt64 = 10_000_000

    public init(base: UnsafeMutableRawPointer, pages: Int, hotPages: Int, rate: Double, threads: Int,
                preservesValues: Bool = false) {
        self.preservesValues = preservesValues
        self.base = base
        self.pages = pages
        self.hotPages = max(1, min(hotPages, pages))
        self.rate = rate
        self.threads = max(1, threads)
    }

    /// Writes done so far (all threads).
    public var writes: Int { writeCount.load(ordering: .relaxed) }
    /// Thread-seconds spent asleep for the throttle so far (all threads).
    public var throttledSeconds: Double { Double(throttledNS.load(ordering: .relaxed)) / 1e9 }
    public var throttle: Int { throttlePercent.load(ordering: .relaxed) }

    /// Auto-converge's throttle, as QEMU's cpu_throttle_set: each thread runs a 10 ms timeslice,
    /// then sleeps `percent / (100 − percent)` of it, so it runs (100 − percent) % of the time.
    /// The workload's rate is a rate of its *running* time (a vCPU's): a throttled thread
    /// does not catch up on the writes it slept through. 0…99.
    public func setThrottle(percent: Int) {
        throttlePercent.store(max(0, min(percent, 99)), ordering: .relaxed)
    }

    /// Dirty limit, as QEMU's vcpu-dirty-limit: each thread writes at most this many pages
    /// per second (it sleeps the rest); 0 lifts the limit.
    public func setDirtyLimit(pagesPerSecond: Double) {
        let milli = pagesPerSecond.isFinite && pagesPerSecond > 0 ? Int(min(pagesPerSecond, 1e12) * 1000) : 0
        dirtyLimitMilli.store(milli, ordering: .relaxed)
    }

    public func start(seed: UInt64) throws(SystemError) {
        startedAt = Clock.nanoseconds()
        guard rate > 0 else { return }  // idle: nothing runs
        for t in 0..<threads {
            let s = seed &+ UInt64(t) &* 0x9E37_79B9_7F4A_7C15
            do throws(SystemError) {
                handles.append(try OSThread { [self] in self.loop(seed: s, thread: t) })
            } catch {
                _ = stop()
                throw SystemError(errno: error.errno, call: "pthread_create(workload thread \(t))")
            }
        }
    }

    private func loop(seed: UInt64, thread: Int) {
        let perThread = rate / Double(threads)
        let page = System.pageSize
        let slots = UInt64(page / 8)
        var x = seed | 1
        var value = UInt64(thread) << 56
        // Writes owed: running time × the rate in force, so a change of limit or throttle
        // applies from the moment it is made, and time asleep for the throttle earns nothing.
        var credit = 0.0
        var last = Clock.nanoseconds()
        var sliceRun: UInt64 = 0
        while !stopFlag.load(ordering: .relaxed) {
            let now = Clock.nanoseconds()
            let elapsed = now &- last
            last = now
            let limit = Double(dirtyLimitMilli.load(ordering: .relaxed)) / 1000
            let effective = limit > 0 ? min(perThread, limit) : perThread
            credit += Double(elapsed) * effective / 1e9
            if credit >= 1 {
                // Catch up in bounded batches so a stop request is seen within microseconds.
                let batch = Int(min(credit, 256))
                for _ in 0..<batch {
                    x ^= x << 13; x ^= x >> 7; x ^= x << 17
                    let p = Int(x % UInt64(hotPages))
                    let slot = Int((x >> 32) % slots)
                    value &+= 1
                    let word = base + p * page + slot * 8
                    if preservesValues {
                        memlab_rewrite_u64(word.assumingMemoryBound(to: UInt64.self))
                    } else {
                        word.storeBytes(of: value, as: UInt64.self)
                    }
                }
                credit -= Double(batch)
                writeCount.add(batch, ordering: .relaxed)
            } else {
                let wait = UInt64((1 - credit) / effective * 1e9)
                _ = wake.wait(seconds: Double(min(max(wait, 1_000), 1_000_000)) / 1e9)
            }
            // The throttle: after each timeslice of running, sleep its share.
            let pct = throttlePercent.load(ordering: .relaxed)
            sliceRun &+= Clock.nanoseconds() &- now
            if pct > 0 && sliceRun >= Self.throttleTimesliceNS {
                sliceRun = 0
                let sleepNS = UInt64(Double(Self.throttleTimesliceNS) * Double(pct) / Double(100 - pct))
                let s = Clock.nanoseconds()
                // In 1 ms steps: a stop (the migration's pause) must not wait out a 990 ms sleep.
                var e = s
                while e < s + sleepNS && !stopFlag.load(ordering: .relaxed) {
                    _ = wake.wait(seconds: Double(min(s + sleepNS - e, 1_000_000)) / 1e9)
                    e = Clock.nanoseconds()
                }
                throttledNS.add(Int(e &- s), ordering: .relaxed)
                last = e   // no credit for the time asleep
            }
        }
        stoppedThreads.add(1, ordering: .acquiringAndReleasing)
    }

    /// Pauses the workload: returns when every thread has stopped writing (the instant
    /// recorded in `stoppedAt`).
    @discardableResult
    public func stop() -> UInt64 {
        // Once stopped, stays stopped: a second call (a caller's cleanup) changes nothing.
        if stoppedAt > 0 && handles.isEmpty { return stoppedAt }
        stopFlag.store(true, ordering: .releasing)
        for _ in handles { wake.post() }
        for h in handles { h.join() }
        handles.removeAll()
        stoppedAt = Clock.nanoseconds()
        return stoppedAt
    }

    /// The write rate achieved from start to stop (pages/s).
    public var achievedRate: Double {
        let end = stoppedAt > 0 ? stoppedAt : Clock.nanoseconds()
        return end > startedAt ? Double(writes) / (Double(end - startedAt) / 1e9) : 0
    }
}

/// Fills a region with pseudo-random content (no page is zero, no two pages alike), so a
/// page missing or stale at the destination shows up in the comparison.
public func fillRandom(_ base: UnsafeMutableRawPointer, length: Int, seed: UInt64) {
    let words = base.assumingMemoryBound(to: UInt64.self)
    var x = seed | 1
    for i in 0..<(length / 8) {
        x ^= x << 13; x ^= x >> 7; x ^= x << 17
        words[i] = x
    }
}

/// An image with the shape a codec sees in real guests: `zeroRatio` of the pages zero (chosen
/// at random), and in every other page `compressibility` of the 8-byte words zero (at random
/// places), the rest random. With both 0 it is `fillRandom`.
public func fillImage(_ base: UnsafeMutableRawPointer, length: Int, seed: UInt64, zeroRatio: Double, compressibility: Double) {
    if zeroRatio <= 0 && compressibility <= 0 { fillRandom(base, length: length, seed: seed); return }
    let page = System.pageSize
    let words = base.assumingMemoryBound(to: UInt64.self)
    let perPage = page / 8
    var x = seed | 1
    @inline(__always) func next() -> UInt64 { x ^= x << 13; x ^= x >> 7; x ^= x << 17; return x }
    let zeroCut = UInt64(min(max(zeroRatio, 0), 1) * Double(UInt32.max))
    let wordCut = UInt64(min(max(compressibility, 0), 1) * Double(UInt32.max))
    for p in 0..<(length / page) {
        let w = words + p * perPage
        if next() & 0xFFFF_FFFF < zeroCut {
            for i in 0..<perPage { w[i] = 0 }
            continue
        }
        for i in 0..<perPage {
            let r = next()
            w[i] = r & 0xFFFF_FFFF < wordCut ? 0 : r
        }
        if w[0] == 0 { w[0] = 1 }   // never an accidental zero page
    }
}
