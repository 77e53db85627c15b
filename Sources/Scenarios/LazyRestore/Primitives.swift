#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LinuxMM
import Synchronization

/// A fixed array of byte-sized atomics, allocated once (the per-page state of a restore).
/// Holds a raw pointer, hence `@unchecked Sendable`: every access goes through `Atomic`.
struct AtomicByteArray: @unchecked Sendable {
    let p: UnsafeMutablePointer<Atomic<UInt8>>
    let count: Int

    init(count: Int, value: UInt8 = 0) {
        self.count = count
        p = .allocate(capacity: max(count, 1))
        for i in 0..<count { (p + i).initialize(to: Atomic(value)) }
    }

    func deallocate() {
        p.deinitialize(count: count)
        p.deallocate()
    }

    @inline(__always) func load(_ i: Int) -> UInt8 { p[i].load(ordering: .acquiring) }
    @inline(__always) func store(_ i: Int, _ v: UInt8) { p[i].store(v, ordering: .releasing) }
    @inline(__always) func compareExchange(_ i: Int, expected: UInt8, desired: UInt8) -> Bool {
        p[i].compareExchange(expected: expected, desired: desired, ordering: .acquiringAndReleasing).exchanged
    }
    @inline(__always) @discardableResult func increment(_ i: Int) -> UInt8 {
        p[i].wrappingAdd(1, ordering: .relaxed).newValue
    }
}

/// A preallocated log of UInt64 values appended from several threads without allocating
/// (fault latencies, the order of faulted pages). Appends past capacity are counted, not kept.
final class AppendLog: @unchecked Sendable {
    let storage: UnsafeMutablePointer<UInt64>
    let capacity: Int
    private let next = Atomic<Int>(0)

    init(capacity: Int) {
        self.capacity = max(capacity, 1)
        storage = .allocate(capacity: self.capacity)
    }
    deinit { storage.deallocate() }

    @inline(__always) func append(_ v: UInt64) {
        let i = next.wrappingAdd(1, ordering: .relaxed).oldValue
        if i < capacity { storage[i] = v }
    }

    /// Values appended so far (call after the writers stopped).
    var values: [UInt64] {
        let n = min(next.load(ordering: .acquiring), capacity)
        return Array(UnsafeBufferPointer(start: storage, count: n))
    }
    var count: Int { min(next.load(ordering: .acquiring), capacity) }
}

/// A dedicated OS thread (pthread) running `body` once: the fault path never runs on Swift's
/// cooperative pool.
struct OSThread {
    private final class Box {
        let body: @Sendable () -> Void
        init(_ body: @escaping @Sendable () -> Void) { self.body = body }
    }

    let handle: pthread_t

    init(_ body: @escaping @Sendable () -> Void) {
        let box = Unmanaged.passRetained(Box(body)).toOpaque()
        var t = pthread_t()
        let rc = pthread_create(&t, nil, { arg in
            let b = Unmanaged<Box>.fromOpaque(arg!).takeRetainedValue()
            b.body()
            return nil
        }, box)
        precondition(rc == 0, "pthread_create failed: \(rc)")
        handle = t
    }

    func join() { pthread_join(handle, nil) }
}

/// Waits until an absolute CLOCK_MONOTONIC time: sleeps (timer slack 1 ns) to `spinNS`
/// before it, then spins — delays in the emulated link are real waits.
@inline(__always)
func waitUntil(_ deadline: UInt64, spinNS: UInt64) {
    Clock.sleep(until: deadline, spinNS: spinNS)
}

/// splitmix64: the hash behind page contents and workload choices.
@inline(__always)
func mix64(_ x: UInt64) -> UInt64 {
    var z = x &+ 0x9E37_79B9_7F4A_7C15
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
}
