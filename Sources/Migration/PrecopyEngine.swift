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
    /// A round whose sender also spends `cpu` seconds encoding: encoding overlaps the wire,
    /// so the slower of the two sets the pace.
    public func roundTime(bytes: Int, cpu: Double) -> Double { max(wireTime(bytes: bytes), cpu) + rtt }
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
    /// Bytes of page data put on the link so far (headers included; after any encoding).
    var bytesOnWire: Int { get }
    /// CPU seconds the sending thread spent encoding (and, on the emulated link, decoding).
    var senderCPUSeconds: Double { get }
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
    public private(set) var bytesOnWire = 0
    /// With an encoding: each batch is encoded into an ENCODED_PAGES payload and decoded into
    /// the destination by the same decoder a TCP destination runs; the wire carries the frame.
    public let encoder: PageEncoder?
    public let decoder: PageDecoder?
    private let frame: UnsafeMutableRawPointer?
    public var senderCPUSeconds: Double { (encoder?.stats.encodeCPU ?? 0) + (decoder?.decodeCPU ?? 0) }

    public init(model: LinkModel, length: Int, batchPages: Int = 16, encoding: EncodingConfig = EncodingConfig()) throws(SystemError) {
        self.model = model
        self.destination = try AnonymousMapping(length: length)
        // Populated up front: the emulated destination's first-touch faults are not the link's.
        try destination.advise(memlab_MADV_POPULATE_WRITE, name: "MADV_POPULATE_WRITE")
        let page = System.pageSize
        if encoding.isRaw {
            self.batchPages = batchPages
            encoder = nil; decoder = nil; frame = nil
        } else {
            self.batchPages = Wire.pagesPerFrame
            encoder = PageEncoder(config: encoding, pageSize: page)
            decoder = PageDecoder(pageSize: page)
            frame = .allocate(byteCount: PageEncoder.frameCapacity(pages: Wire.pagesPerFrame, pageSize: page), alignment: 64)
        }
    }
    deinit { frame?.deallocate() }

    public func send(_ pages: ArraySlice<Int>, from source: UnsafeRawPointer) throws {
        sourceBase = source
        let page = System.pageSize
        var i = pages.startIndex
        while i < pages.endIndex {
            let end = min(i + batchPages, pages.endIndex)
            let bytes: Int
            if let encoder, let decoder, let frame {
                let n = encoder.encodeFrame(pages[i..<end], from: source, into: frame)
                _ = try decoder.apply(UnsafeRawBufferPointer(start: frame, count: n), region: destination.base,
                                      pageCount: destination.length / page)
                bytes = n + FrameHeader.size
            } else {
                for k in i..<end {
                    let off = pages[k] * page
                    memcpy(destination.base + off, source + off, page)
                }
                bytes = (end - i) * page
            }
            bytesOnWire += bytes
            // The batch is booked on the wire after the one before it; this thread goes on to
            // read (and encode) the next batch while that one is on the wire, as a sender
            // with a socket buffer does.
            let now = Clock.nanoseconds()
            let previous = busyUntil
            busyUntil = max(now, busyUntil) + UInt64(model.wireTime(bytes: bytes) * 1e9)
            Clock.sleep(until: previous)
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
    /// Bytes this round put on the link (after encoding).
    public var bytesSent = 0
    /// The auto-converge throttle in force during the round, percent.
    public var throttlePercent = 0
    /// Whether the dirty limit was in force during the round.
    public var dirtyLimited = false
    /// The workload's writes per second during the round.
    public var writeRate = 0.0
    /// CPU seconds the sender spent encoding this round's pages.
    public var encodeSeconds = 0.0
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
    /// Seconds after the start when the throttle first engaged (nil: never).
    public var throttleEngagedAt: Double?
    /// Thread-seconds the workload slept for the throttle.
    public var throttledSeconds = 0.0
    public var throttleTriggers = 0
    /// Bytes of page data on the link (after encoding), all rounds and the stop-and-copy.
    public var bytesOnWire = 0
    /// What the encoder did (zero pages, XBZRLE, compression), when the link encodes.
    public var encoding: EncoderStats?
    public var decodeCPU: Double?
}

/// The round loop pre-copy and hybrid share: send, end the round, sync the dirty log,
/// measure, and let the throttle react.
struct RoundLoop {
    let model: LinkModel
    let tracker: DirtyTracker
    let workload: DirtyWorkload
    let link: PageLink
    var throttle: ThrottleController
    let t0: UInt64
    var dirty: [Int] = []
    var syncNS: UInt64 = 0
    var syncCount = 0

    init(model: LinkModel, tracker: DirtyTracker, workload: DirtyWorkload, link: PageLink, throttle: ThrottlePolicy,
         pageCount: Int, t0: UInt64) {
        self.model = model
        self.tracker = tracker
        self.workload = workload
        self.link = link
        self.throttle = ThrottleController(throttle)
        self.t0 = t0
        dirty.reserveCapacity(pageCount)
    }

    /// What the destination lacks at the stop (the workload paused): the pages of the last
    /// round's dirty set, never sent, and those written since — with no round, every page.
    /// Sorted, each once.
    mutating func missingAtStop(unsent: [Int], rounds: Int, pageCount: Int) throws(SystemError) -> [Int] {
        if rounds == 0 { return Array(0..<pageCount) }
        try sync()
        var set = [Bool](repeating: false, count: pageCount)
        for p in unsent { set[p] = true }
        for p in dirty { set[p] = true }
        return (0..<pageCount).filter { set[$0] }
    }

    mutating func sync() throws(SystemError) {
        dirty.removeAll(keepingCapacity: true)
        let s = Clock.nanoseconds()
        try tracker.collect(into: &dirty)
        syncNS += Clock.nanoseconds() - s
        syncCount += 1
    }

    /// One round: `pages` from `region`; `dirty` holds what the next round must send.
    mutating func round(_ n: Int, pages: [Int], region: UnsafeRawPointer, expectedDowntime: (Int) -> Double) throws -> PrecopyRound {
        let page = System.pageSize
        let rs = Clock.nanoseconds()
        let w0 = workload.writes, b0 = link.bytesOnWire, c0 = link.senderCPUSeconds
        let pct = throttle.percent, limited = throttle.limited
        try link.send(pages[...], from: region)
        try link.endRound(n, pages: pages.count)
        try sync()
        let re = Clock.nanoseconds()
        let duration = Double(re - rs) / 1e9
        var r = PrecopyRound(round: n, endTime: Double(re - t0) / 1e9, duration: duration,
                             pagesSent: pages.count, dirtyPages: dirty.count,
                             dirtyRate: duration > 0 ? Double(dirty.count) / duration : 0,
                             expectedDowntime: expectedDowntime(dirty.count))
        r.bytesSent = link.bytesOnWire - b0
        r.encodeSeconds = link.senderCPUSeconds - c0
        r.throttlePercent = pct
        r.dirtyLimited = limited
        r.writeRate = duration > 0 ? Double(workload.writes - w0) / duration : 0
        throttle.afterRound(sent: r.bytesSent, dirtied: dirty.count * page, at: r.endTime, workload: workload)
        return r
    }
}

/// Pre-copy: send every page; then, round after round, send what the workload dirtied while
/// the previous round was on the wire; stop when what is left would go over the link within
/// the downtime target (or after `maxRounds`), pause the workload and send the rest.
public struct PrecopyEngine {
    public let model: LinkModel
    public let downtimeTarget: Double
    public let maxRounds: Int
    public let throttle: ThrottlePolicy
    /// This machine's costs of the stop beyond the link (nil: the link alone).
    public let costs: SwitchCosts?

    public init(model: LinkModel, downtimeTarget: Double, maxRounds: Int, throttle: ThrottlePolicy = .none, costs: SwitchCosts? = nil) {
        self.costs = costs
        self.model = model
        self.downtimeTarget = downtimeTarget
        self.maxRounds = maxRounds
        self.throttle = throttle
    }

    public func run(region: UnsafeMutableRawPointer, length: Int, tracker: DirtyTracker,
                    workload: DirtyWorkload, link: PageLink) throws -> PrecopyOutcome {
        let page = System.pageSize
        let pageCount = length / page
        var out = PrecopyOutcome()

        // Arm tracking before the first page leaves: a write from here on is seen.
        try tracker.protectAll()
        let t0 = Clock.nanoseconds()
        var loop = RoundLoop(model: model, tracker: tracker, workload: workload, link: link, throttle: throttle,
                             pageCount: pageCount, t0: t0)
        var toSend = Array(0..<pageCount)
        var round = 0
        // Bytes a page costs on the link: a page, until a round shows what encoding makes of
        // it (QEMU likewise predicts from the bandwidth it measured, encoding included).
        var perPage = Double(page), cpuPerPage = 0.0
        while true {
            round += 1
            let r = try loop.round(round, pages: toSend, region: region) { [perPage] in model.roundTime(bytes: Int(Double($0) * perPage)) }
            out.rounds.append(r)
            out.pagesTransferred += toSend.count
            if r.bytesSent > 0 && r.pagesSent > 0 {
                perPage = Double(r.bytesSent) / Double(r.pagesSent)
                cpuPerPage = r.encodeSeconds / Double(r.pagesSent)
            }
            // The rest must fit the target on the wire and in the encoder (whichever is slower).
            let rest = Double(loop.dirty.count)
            if max(model.wireTime(bytes: Int(rest * perPage)), cpuPerPage * rest) <= downtimeTarget { out.converged = true; break }
            if round >= maxRounds { break }
            toSend = loop.dirty
        }
        var dirty = loop.dirty
        func sync() throws(SystemError) { try loop.sync(); dirty = loop.dirty }

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
        out.predictedDowntime = model.roundTime(bytes: Int(Double(dirty.count) * perPage), cpu: cpuPerPage * Double(dirty.count))
            + (costs?.precopyStop(regionPages: pageCount) ?? 0)
        try link.send(dirty[...], from: region)
        out.pagesTransferred += dirty.count
        let tAck = try link.finish(pages: out.pagesTransferred)
        // The workload stays paused at the source: its memory is what the destination must hold.
        out.sourceChecksum = regionChecksum(region, length: length)
        out.verdict = try link.verify(checksum: out.sourceChecksum)
        out.downtime = Double(tAck - tStop) / 1e9
        out.totalTime = Double(tAck - t0) / 1e9
        out.syncTime = Double(loop.syncNS) / 1e9
        out.dirtySyncCount = loop.syncCount
        out.workloadWrites = workload.writes
        out.workloadRate = workload.achievedRate
        out.throttleEngagedAt = loop.throttle.engagedAt
        out.throttleTriggers = loop.throttle.triggers
        out.throttledSeconds = workload.throttledSeconds
        out.bytesOnWire = link.bytesOnWire
        out.encoding = (link as? EmulatedPageLink)?.encoder?.stats ?? (link as? TCPLink)?.encoderStats
        out.decodeCPU = (link as? EmulatedPageLink)?.decoder?.decodeCPU
        return out
    }
}

extension AnonymousMapping {
    /// Drops `pages` (sorted, each once) with MADV_DONTNEED, one call per run of consecutive
    /// pages: post-copy's discard of stale copies, which then fault in. Returns the calls made.
    func discard(pages: [Int], pageSize: Int) throws(SystemError) -> Int {
        var i = 0, calls = 0
        while i < pages.count {
            var j = i + 1
            while j < pages.count && pages[j] == pages[j - 1] + 1 { j += 1 }
            try advise(memlab_MADV_DONTNEED, name: "MADV_DONTNEED", offset: pages[i] * pageSize, length: (j - i) * pageSize)
            calls += 1
            i = j
        }
        return calls
    }
}
