#if canImport(Glibc)
import Glibc
#endif
import LinuxMM
import Transfer
import CLinuxMM

/// A link's figures and the model pre-copy decides with: sending `b` bytes takes `b / bandwidth`
/// seconds on the wire, and a round ends when the destination's acknowledgement is back, one
/// round trip after the last byte left.
public struct LinkModel: Sendable, Equatable {
    /// Bytes per second.
    public let bandwidth: Double
    /// Round-trip time, seconds.
    public let rtt: Double
    public init(bandwidth: Double, rtt: Double) {
        self.bandwidth = bandwidth
        self.rtt = rtt
    }
    public func wireTime(bytes: Int) -> Double { Double(bytes) / bandwidth }
    /// A round of `bytes`: wire time plus the round trip of its acknowledgement.
    public func roundTime(bytes: Int) -> Double { wireTime(bytes: bytes) + rtt }
}

/// Where pre-copy sends pages: an emulated link in the same process, or TCP to a destination
/// process (`memlab migrate destination`). Every call blocks as long as the link makes it.
public protocol PageLink: AnyObject {
    /// Sends the pages with these indices, read from `source` now.
    func send(_ pages: ArraySlice<Int>, from source: UnsafeRawPointer) throws
    /// Ends round `round` and waits for the destination's acknowledgement.
    func endRound(_ round: Int, pages: Int) throws
    /// The stop-and-copy is complete: tells the destination to resume and waits for its
    /// confirmation; returns when that arrived (CLOCK_MONOTONIC ns), the end of the downtime.
    func finish(pages: Int) throws -> UInt64
    /// After the resume (outside the downtime): sends the checksum of the source at stop time;
    /// the destination compares its copy and answers.
    func verify(checksum: UInt64) throws -> CompletionVerdict
}

public struct CompletionVerdict: Sendable {
    /// The destination's checksum of its copy.
    public let destinationChecksum: UInt64
    /// Pages whose contents differ from the source (when the destination can tell: the
    /// emulated link compares page by page; over TCP only the checksum is known).
    public let mismatchedPages: Int?
    public init(destinationChecksum: UInt64, mismatchedPages: Int?) {
        self.destinationChecksum = destinationChecksum
        self.mismatchedPages = mismatchedPages
    }
}

/// The emulated pre-copy link (a bulk stream; lazy restore's EmulatedLink models the two-priority
/// fault link): the destination is a second mapping in this process; bandwidth is a
/// token bucket of one (the wire is busy until `busyUntil`), and each wait is real
/// (CLOCK_MONOTONIC, ns), so the workload keeps dirtying pages while a round is on the wire.
public final class EmulatedPageLink: PageLink {
    public let model: LinkModel
    public let destination: AnonymousMapping
    private var busyUntil: UInt64 = 0
    private let batchPages: Int
    private var sourceBase: UnsafeRawPointer?

    public init(model: LinkModel, length: Int, batchPages: Int = 16) throws(SystemError) {
        self.model = model
        self.destination = try AnonymousMapping(length: length)
        // Populated up front: the emulated destination's first-touch faults are not the link's.
        try destination.advise(memlab_MADV_POPULATE_WRITE, name: "MADV_POPULATE_WRITE")
        self.batchPages = batchPages
    }

    public func send(_ pages: ArraySlice<Int>, from source: UnsafeRawPointer) throws {
        sourceBase = source
        let page = System.pageSize
        var i = pages.startIndex
        while i < pages.endIndex {
            let end = min(i + batchPages, pages.endIndex)
            for k in i..<end {
                let off = pages[k] * page
                memcpy(destination.base + off, source + off, page)
            }
            let bytes = (end - i) * page
            let now = Clock.nanoseconds()
            busyUntil = max(now, busyUntil) + UInt64(model.wireTime(bytes: bytes) * 1e9)
            Clock.sleep(until: busyUntil)
            i = end
        }
    }

    public func endRound(_ round: Int, pages: Int) throws {
        Clock.sleep(until: max(busyUntil, Clock.nanoseconds()) + UInt64(model.rtt * 1e9))
    }

    public func finish(pages: Int) throws -> UInt64 {
        // The destination resumes when the last page is in; its confirmation arrives one
        // round trip after the last byte left (half to get there, half to come back).
        Clock.sleep(until: max(busyUntil, Clock.nanoseconds()) + UInt64(model.rtt * 1e9))
        return Clock.nanoseconds()
    }

    public func verify(checksum: UInt64) throws -> CompletionVerdict {
        var mismatched = 0
        if let src = sourceBase {
            let page = System.pageSize
            for p in 0..<(destination.length / page) where memcmp(destination.base + p * page, src + p * page, page) != 0 {
                mismatched += 1
            }
        }
        return CompletionVerdict(destinationChecksum: regionChecksum(destination.base, length: destination.length),
                                 mismatchedPages: mismatched)
    }
}

/// What one pre-copy round did.
public struct PrecopyRound: Sendable {
    public let round: Int
    /// Seconds since the migration started, at the end of the round.
    public let endTime: Double
    public let duration: Double
    public let pagesSent: Int
    /// Pages found dirty by the sync after this round (what the next round must send).
    public let dirtyPages: Int
    public let dirtyRate: Double
    /// Downtime if the migration stopped now: the dirty pages at the link's bandwidth + RTT.
    public let expectedDowntime: Double
}

public struct PrecopyOutcome: Sendable {
    public var rounds: [PrecopyRound] = []
    public var converged = false
    public var totalTime = 0.0
    public var downtime = 0.0
    public var stopPages = 0
    public var pagesTransferred = 0
    public var dirtySyncCount = 0
    public var sourceChecksum: UInt64 = 0
    public var verdict: CompletionVerdict?
    public var predictedDowntime = 0.0
    public var syncTime = 0.0
    public var workloadWrites = 0
    public var workloadRate = 0.0
}

/// Pre-copy: send every page; then, round after round, send what the workload dirtied while
/// the previous round was on the wire; stop when what is left would go over the link within
/// the downtime target (or after `maxRounds`), pause the workload and send the rest.
public struct PrecopyEngine {
    public let model: LinkModel
    public let downtimeTarget: Double
    public let maxRounds: Int

    public init(model: LinkModel, downtimeTarget: Double, maxRounds: Int) {
        self.model = model
        self.downtimeTarget = downtimeTarget
        self.maxRounds = maxRounds
    }

    public func run(region: UnsafeMutableRawPointer, length: Int, tracker: DirtyTracker,
                    workload: DirtyWorkload, link: PageLink) throws -> PrecopyOutcome {
        let page = System.pageSize
        let pageCount = length / page
        var out = PrecopyOutcome()
        var dirty: [Int] = []
        dirty.reserveCapacity(pageCount)
        var syncNS: UInt64 = 0
        func sync() throws(SystemError) {
            dirty.removeAll(keepingCapacity: true)
            let s = Clock.nanoseconds()
            try tracker.collect(into: &dirty)
            syncNS += Clock.nanoseconds() - s
            out.dirtySyncCount += 1
        }

        // Arm tracking before the first page leaves: a write from here on is seen.
        try tracker.protectAll()
        let t0 = Clock.nanoseconds()
        var toSend = Array(0..<pageCount)
        var round = 0
        while true {
            round += 1
            let rs = Clock.nanoseconds()
            try link.send(toSend[...], from: region)
            try link.endRound(round, pages: toSend.count)
            try sync()
            let re = Clock.nanoseconds()
            let duration = Double(re - rs) / 1e9
            let expected = model.roundTime(bytes: dirty.count * page)
            out.rounds.append(PrecopyRound(round: round, endTime: Double(re - t0) / 1e9, duration: duration,
                                           pagesSent: toSend.count, dirtyPages: dirty.count,
                                           dirtyRate: duration > 0 ? Double(dirty.count) / duration : 0,
                                           expectedDowntime: expected))
            out.pagesTransferred += toSend.count
            if model.wireTime(bytes: dirty.count * page) <= downtimeTarget { out.converged = true; break }
            if round >= maxRounds { break }
            toSend = dirty
        }

        // Stop-and-copy: pause, take the last dirty set, send it, wait for the destination.
        let tStop = Clock.nanoseconds()
        workload.stop()
        // What the last round's sync found is still unsent; add what was written since.
        let pending = dirty
        try sync()
        if !pending.isEmpty {
            var merged = Set(pending)
            merged.formUnion(dirty)
            dirty = merged.sorted()
        }
        out.stopPages = dirty.count
        out.predictedDowntime = model.roundTime(bytes: dirty.count * page)
        try link.send(dirty[...], from: region)
        out.pagesTransferred += dirty.count
        let tAck = try link.finish(pages: out.pagesTransferred)
        // The workload stays paused at the source: its memory is what the destination must hold.
        out.sourceChecksum = regionChecksum(region, length: length)
        out.verdict = try link.verify(checksum: out.sourceChecksum)
        out.downtime = Double(tAck - tStop) / 1e9
        out.totalTime = Double(tAck - t0) / 1e9
        out.syncTime = Double(syncNS) / 1e9
        out.workloadWrites = workload.writes
        out.workloadRate = workload.achievedRate
        return out
    }
}
