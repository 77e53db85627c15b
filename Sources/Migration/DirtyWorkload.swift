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
    private var handles: [OSThread] = []
    private var startedAt: UInt64 = 0
    public private(set) var stoppedAt: UInt64 = 0

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
        let t0 = Clock.nanoseconds()
        var x = seed | 1
        var done = 0
        var value = UInt64(thread) << 56
        while !stopFlag.load(ordering: .relaxed) {
            let now = Clock.nanoseconds()
            let due = Int(Double(now - t0) * perThread / 1e9)
            if done < due {
                // Catch up in bounded batches so a stop request is seen within microseconds.
                let batch = min(due - done, 256)
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
                done += batch
                writeCount.add(batch, ordering: .relaxed)
            } else {
                let next = t0 + UInt64(Double(done + 1) / perThread * 1e9)
                Clock.sleep(until: min(next, now + 1_000_000))
            }
        }
        stoppedThreads.add(1, ordering: .acquiringAndReleasing)
    }

    /// Pauses the workload: returns when every thread has stopped writing (the instant
    /// recorded in `stoppedAt`).
    @discardableResult
    public func stop() -> UInt64 {
        stopFlag.store(true, ordering: .releasing)
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
