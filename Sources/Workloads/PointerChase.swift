import LinuxMM

/// Dependent loads over a random cyclic permutation: each load's address comes from the
/// previous load, so neither the CPU nor the prefetcher can run ahead and each step costs a
/// full memory access — cache, TLB and page walk included. One element per 4 KiB page, at a
/// random cache line inside it, so every step lands on a different page.
public struct PointerChase {
    public let elements: Int
    public let start: UInt64

    /// Builds the cycle over the first `bytes` of `base` (Sattolo's algorithm: one cycle
    /// through every element).
    public init(base: UnsafeMutableRawPointer, bytes: Int, seed: UInt64) {
        let page = 4096
        let n = max(bytes / page, 2)
        var order = [Int](0..<n)
        var x = seed | 1
        func next() -> UInt64 { x ^= x << 13; x ^= x >> 7; x ^= x << 17; return x }
        var i = n - 1
        while i > 0 {
            let j = Int(next() % UInt64(i))
            order.swapAt(i, j)
            i -= 1
        }
        let words = base.assumingMemoryBound(to: UInt64.self)
        var slot = [Int](repeating: 0, count: n)
        for k in 0..<n { slot[k] = k * (page / 8) + Int(next() % 64) * 8 }
        for k in 0..<n {
            let from = slot[order[k]]
            let to = slot[order[(k + 1) % n]]
            words[from] = UInt64(to)
        }
        elements = n
        start = UInt64(slot[order[0]])
    }

    /// Follows `steps` links; the result must be used so the loop is not optimised away.
    @inline(never)
    public static func run(_ base: UnsafeRawPointer, start: UInt64, steps: Int) -> UInt64 {
        let words = base.assumingMemoryBound(to: UInt64.self)
        var i = start
        for _ in 0..<steps { i = words[Int(truncatingIfNeeded: i)] }
        return i
    }
}

/// The fault-and-touch loop: one byte written every `stride` bytes. The same loop as the C
/// reference kernel memlab_ref_touch, which `memlab bench` compares it with.
@inline(never)
public func touchPages(_ base: UnsafeMutableRawPointer, length: Int, stride: Int) {
    let p = base.assumingMemoryBound(to: UInt8.self)
    var off = 0
    while off < length {
        p[off] = 1
        off &+= stride
    }
}

/// Keeps `value` (and the loads that made it) alive in release builds: not inlined and not
/// optimized, so whole-module optimization cannot drop the argument as unused.
@inline(never) @_optimize(none)
public func blackHole<T>(_ value: T) { _ = value }

/// Touches and unmaps memory of the same kind and size first: on a VM whose host backs guest
/// memory lazily, the first touch of never-used memory costs several times a normal fault.
public func prewarm(length: Int, kind: PageKind) {
    guard let m = try? AnonymousMapping(length: length, kind: kind) else { return }
    touchPages(m.base, length: m.length, stride: 4096)
}
