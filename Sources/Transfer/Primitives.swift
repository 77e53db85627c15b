#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LinuxMM
import Synchronization

/// A fixed array of byte-sized atomics, allocated once (the per-page state of a restore) and
/// freed by its own deinit. `@unchecked Sendable`: it holds a raw pointer, and every access
/// to the elements goes through `Atomic`.
public final class AtomicByteArray: @unchecked Sendable {
    let p: UnsafeMutablePointer<Atomic<UInt8>>
    public let count: Int

    public init(count: Int, value: UInt8 = 0) {
        self.count = count
        p = .allocate(capacity: max(count, 1))
        for i in 0..<count { (p + i).initialize(to: Atomic(value)) }
    }

    deinit {
        p.deinitialize(count: count)
        p.deallocate()
    }

    @inline(__always) public func load(_ i: Int) -> UInt8 { p[i].load(ordering: .acquiring) }
    @inline(__always) public func store(_ i: Int, _ v: UInt8) { p[i].store(v, ordering: .releasing) }
    @inline(__always) public func compareExchange(_ i: Int, expected: UInt8, desired: UInt8) -> Bool {
        p[i].compareExchange(expected: expected, desired: desired, ordering: .acquiringAndReleasing).exchanged
    }
    @inline(__always) @discardableResult public func increment(_ i: Int) -> UInt8 {
        p[i].wrappingAdd(1, ordering: .relaxed).newValue
    }
}

/// A preallocated log of UInt64 values appended from several threads without allocating
/// (fault latencies, the order of faulted pages). Appends past capacity are counted, not kept.
/// `@unchecked Sendable`: each slot is written once, by the thread whose atomic increment
/// reserved it, and read only after the writers stopped (`values`).
public final class AppendLog: @unchecked Sendable {
    let storage: UnsafeMutablePointer<UInt64>
    public let capacity: Int
    private let next = Atomic<Int>(0)

    public init(capacity: Int) {
        self.capacity = max(capacity, 1)
        storage = .allocate(capacity: self.capacity)
    }
    deinit { storage.deallocate() }

    @inline(__always) public func append(_ v: UInt64) {
        let i = next.wrappingAdd(1, ordering: .relaxed).oldValue
        if i < capacity { storage[i] = v }
    }

    /// Values appended so far (call after the writers stopped).
    public var values: [UInt64] {
        let n = min(next.load(ordering: .acquiring), capacity)
        return Array(UnsafeBufferPointer(start: storage, count: n))
    }
    public var count: Int { min(next.load(ordering: .acquiring), capacity) }
}

/// Waits until an absolute CLOCK_MONOTONIC time: sleeps (timer slack 1 ns) to `spinNS`
/// before it, then spins — delays in the emulated link are real waits.
@inline(__always)
public func waitUntil(_ deadline: UInt64, spinNS: UInt64) {
    Clock.sleep(until: deadline, spinNS: spinNS)
}

/// splitmix64: the hash behind page contents and workload choices.
@inline(__always)
public func mix64(_ x: UInt64) -> UInt64 {
    var z = x &+ 0x9E37_79B9_7F4A_7C15
    z = (z ^ (z >> 30)) &* 0xBF58_476D_1CE4_E5B9
    z = (z ^ (z >> 27)) &* 0x94D0_49BB_1331_11EB
    return z ^ (z >> 31)
}

/// FNV-1a over 64-bit words, per page combined in order: a checksum of a region that both
/// ends of a migration (and a snapshot's reader) compute the same way.
public func regionChecksum(_ base: UnsafeRawPointer, length: Int) -> UInt64 {
    let words = base.assumingMemoryBound(to: UInt64.self)
    var h: UInt64 = 0xcbf2_9ce4_8422_2325
    for i in 0..<(length / 8) {
        h ^= words[i]
        h &*= 0x0000_0100_0000_01b3
    }
    return h
}
