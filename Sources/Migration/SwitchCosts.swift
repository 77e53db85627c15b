#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LinuxMM
import Transfer

/// What the stop costs on this machine besides the link: the steps between pausing the
/// workload at the source and running it at the destination, each measured here on scratch
/// memory with the same calls the migration makes, so the model's downtime is the link's time
/// plus these (issue 14: a switch the model left out made post-copy downtime 15–25× its
/// prediction). Measured in each repetition (about 20 ms) and by `memlab calibrate`.
public struct SwitchCosts: Sendable, Equatable {
    /// One dirty-log sync (PAGEMAP_SCAN with write-protect), seconds per page of the region.
    public var syncPerPage = 0.0
    /// MADV_DONTNEED: seconds per call and per populated page dropped.
    public var discardPerCall = 0.0
    public var discardPerPage = 0.0
    /// Arming post-copy (marking present pages, UFFDIO_REGISTER, starting the handler):
    /// a fixed part and seconds per page of the region.
    public var armFixed = 0.0
    public var armPerPage = 0.0
    /// Starting (and later joining) one workload thread, seconds.
    public var threadStart = 0.0

    public init() {}

    /// Pre-copy's stop beyond the link: the last sync.
    public func precopyStop(regionPages: Int) -> Double { syncPerPage * Double(regionPages) }

    /// Hybrid/post-copy's switch beyond the link's bitmap message.
    public func postcopySwitch(regionPages: Int, syncs: Bool, discardCalls: Int, discardPages: Int, threads: Int) -> Double {
        (syncs ? syncPerPage * Double(regionPages) : 0)
            + discardPerCall * Double(discardCalls) + discardPerPage * Double(discardPages)
            + armFixed + armPerPage * Double(regionPages)
            + threadStart * Double(threads)
    }

    static let largePages = 4096, smallPages = 512

    /// Measures each cost (best of `tries`) on scratch mappings.
    /// `sync`: measure the dirty-log sync with asynchronous write-protect (where the kernel
    /// lacks it, 6.7+, the sync cost stays 0 and the caller says so).
    public static func measure(tries: Int = 3, sync: Bool = true) throws -> SwitchCosts {
        let page = System.pageSize
        var c = SwitchCosts()
        func best(_ body: () throws -> Double) rethrows -> Double {
            var b = Double.infinity
            for _ in 0..<max(1, tries) { b = min(b, try body()) }
            return b
        }
        let large = try AnonymousMapping(length: largePages * page)
        let source = try AnonymousMapping(length: largePages * page)
        try source.advise(memlab_MADV_POPULATE_WRITE, name: "MADV_POPULATE_WRITE")

        // Sync: write-protect the region, dirty a tenth, collect.
        if sync { c.syncPerPage = try best {
            try large.advise(memlab_MADV_POPULATE_WRITE, name: "MADV_POPULATE_WRITE")
            let t = try AsyncWriteProtectTracker(base: large.base, length: large.length)
            defer { t.close() }
            try t.protectAll()
            for p in stride(from: 0, to: largePages, by: 10) { (large.base + p * page).storeBytes(of: UInt64(p), as: UInt64.self) }
            var found: [Int] = []
            found.reserveCapacity(largePages)
            let s = Clock.nanoseconds()
            try t.collect(into: &found)
            return Double(Clock.nanoseconds() - s) / 1e9 / Double(largePages)
        } }

        // Discard: one call over every page, then single-page calls.
        c.discardPerPage = try best {
            try large.advise(memlab_MADV_POPULATE_WRITE, name: "MADV_POPULATE_WRITE")
            let s = Clock.nanoseconds()
            try large.advise(memlab_MADV_DONTNEED, name: "MADV_DONTNEED")
            return Double(Clock.nanoseconds() - s) / 1e9 / Double(largePages)
        }
        let single = try best {
            try large.advise(memlab_MADV_POPULATE_WRITE, name: "MADV_POPULATE_WRITE")
            let s = Clock.nanoseconds()
            for p in stride(from: 0, to: largePages, by: 16) {
                try large.advise(memlab_MADV_DONTNEED, name: "MADV_DONTNEED", offset: p * page, length: page)
            }
            return Double(Clock.nanoseconds() - s) / 1e9 / Double(largePages / 16)
        }
        c.discardPerCall = max(0, single - c.discardPerPage)

        // Arm: the real post-copy phase, over every page present, at two sizes.
        func arm(_ pages: Int) throws -> Double {
            try best {
                let region = try AnonymousMapping(length: pages * page)
                try region.advise(memlab_MADV_POPULATE_WRITE, name: "MADV_POPULATE_WRITE")
                let src = try AnonymousMapping(length: pages * page)
                let phase = try PostcopyPhase(policy: .onDemand, source: src, destination: region.base,
                                              bytesPerSecond: 1e9, rttS: 0, preempt: true)
                let s = Clock.nanoseconds()
                try phase.arm(pendingPages: [])
                let e = Clock.nanoseconds()
                _ = phase.finish()
                return Double(e - s) / 1e9
            }
        }
        let armLarge = try arm(largePages), armSmall = try arm(smallPages)
        c.armPerPage = max(0, (armLarge - armSmall) / Double(largePages - smallPages))
        c.armFixed = max(0, armSmall - c.armPerPage * Double(smallPages))

        // A thread's start and join.
        c.threadStart = try best {
            let s = Clock.nanoseconds()
            for _ in 0..<8 {
                let t = try OSThread {}
                t.join()
            }
            return Double(Clock.nanoseconds() - s) / 1e9 / 8
        }
        return c
    }

    /// The costs as metrics (seconds), named as `memlab calibrate` prints them.
    public var named: [(String, Double, String)] {
        [("switch_sync_per_page", syncPerPage, "one dirty-log sync (PAGEMAP_SCAN), per page of the region"),
         ("switch_discard_per_call", discardPerCall, "MADV_DONTNEED, per call"),
         ("switch_discard_per_page", discardPerPage, "MADV_DONTNEED, per populated page dropped"),
         ("switch_arm_fixed", armFixed, "arming post-copy: UFFDIO_REGISTER and the handler thread, fixed part"),
         ("switch_arm_per_page", armPerPage, "arming post-copy, per page of the region (present-page map)"),
         ("switch_thread_start", threadStart, "starting and joining one workload thread")]
    }
}
