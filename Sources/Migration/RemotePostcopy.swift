#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LinuxMM
import Synchronization
import Transfer

/// Post-copy and hybrid between two processes (`memlab migrate source --postcopy`): the
/// pre-copy rounds go over the migration connection as in pre-copy; then the source pauses
/// its workload, serves its memory with lazy restore's page server on a port of its own, and
/// sends SWITCH (the port, the bitmap of pages the destination lacks, the workload). The
/// destination drops those pages, registers its region with userfaultfd, resumes the
/// workload and serves its faults with the fault engine fetching from the source's page
/// server — lazy restore from a remote source, the same engine and page protocol. A lost
/// page connection is replaced (recovery): the faults wait, the same pages are asked for
/// again on the new connection, and the pause is reported.
public enum RemotePostcopy {
    /// What the source measured, and what the destination reported in POSTCOPY_DONE.
    public struct Outcome: Sendable {
        public var rounds: [PrecopyRound] = []
        public var precopyPages = 0
        public var switchPages = 0
        public var switchBytes = 0
        public var downtime = 0.0
        public var totalTime = 0.0
        public var postcopyTime = 0.0
        public var installed = 0
        public var remoteFaults = 0
        public var reconnects = 0
        public var pausedSeconds = 0.0
        public var reRequestedPages = 0
        public var fetchedBytes = 0
        public var destinationWrites = 0
        public var sourceChecksum: UInt64 = 0
        public var destinationChecksum: UInt64 = 0
        public var syncTime = 0.0
        public var dirtySyncCount = 0
        public var throttleEngagedAt: Double?
        public var throttleTriggers = 0
        public var throttledSeconds = 0.0
    }

    /// The source: `precopyRounds` rounds, then the switch and the page server until the
    /// destination says every page is in; then VERIFY. `serve` runs lazy restore's page
    /// server on the listener until its `until` says stop.
    public static func runSource(link: TCPLink, region: AnonymousMapping, tracker: DirtyTracker, workload: DirtyWorkload,
                                 model: LinkModel, precopyRounds: Int, throttle: ThrottlePolicy, timeoutS: Double,
                                 serve: @escaping @Sendable (Listener, PageImage, @escaping @Sendable () -> Bool) -> Void) throws -> Outcome {
        let page = System.pageSize
        let pageCount = region.length / page
        var out = Outcome()
        try tracker.protectAll()
        let t0 = Clock.nanoseconds()
        var loop = RoundLoop(model: model, tracker: tracker, workload: workload, link: link, throttle: throttle, pageCount: pageCount, t0: t0)
        var toSend = Array(0..<pageCount)
        for round in stride(from: 1, through: precopyRounds, by: 1) {
            let r = try loop.round(round, pages: toSend, region: region.base) { _ in model.roundTime(bytes: (pageCount + 7) / 8) }
            out.rounds.append(r)
            out.precopyPages += toSend.count
            toSend = loop.dirty
        }
        // Stop: what the destination lacks is what was never sent or dirtied since.
        let tStop = Clock.nanoseconds()
        workload.stop()
        let missing = try loop.missingAtStop(unsent: toSend, rounds: precopyRounds, pageCount: pageCount)
        var bitmap = [UInt8](repeating: 0, count: (pageCount + 7) / 8)
        for p in missing { bitmap[p >> 3] |= 1 << (p & 7) }
        let count = missing.count
        out.switchPages = count
        out.switchBytes = 20 + bitmap.count
        // The page server, on a port of its own, serving the paused memory.
        let listener: Listener
        do { listener = try Listener.listen(try SocketAddress.tcp("0.0.0.0:0"), backlog: 16) } catch { throw WireError(error) }
        let stop = Atomic<Bool>(false)
        let image = PageImage(wrapping: region)
        let server = try OSThread { serve(listener, image, { stop.load(ordering: .relaxed) }) }
        defer {
            stop.store(true, ordering: .relaxed)
            server.join()
            listener.socket.close()
        }
        var w = PayloadWriter()
        w.u32(UInt32(listener.port)); w.u32(UInt32(count)); w.u32(UInt32(clamping: Int(workload.rate)))
        w.u32(UInt32(workload.threads)); w.u32(UInt32(workload.hotPages))
        try link.connection.send(.switchToPostcopy, w.bytes + bitmap)
        let resumed = try link.connection.receive(waitingFor: "POSTCOPY_RESUMED")
        let tResume = Clock.nanoseconds()
        guard resumed.type == .postcopyResumed else { throw WireError.malformed("expected POSTCOPY_RESUMED, got \(resumed.type)") }
        var rr = PayloadReader(resumed)
        let armed = try rr.u32()
        try rr.end()
        guard UInt64(armed) == UInt64(count) else { throw WireError.mismatch("destination armed \(armed) pages, \(count) were sent as missing") }
        out.downtime = Double(tResume - tStop) / 1e9
        // The destination pulls what it lacks; PROGRESS keeps the connection alive meanwhile.
        while true {
            let f = try link.connection.receive(waitingFor: "PROGRESS or POSTCOPY_DONE")
            if f.type == .progress { continue }
            guard f.type == .postcopyDone else { throw WireError.malformed("expected PROGRESS or POSTCOPY_DONE, got \(f.type)") }
            var r = PayloadReader(f)
            let installed = try r.u64(), faults = try r.u64(), reconnects = try r.u64(), paused = try r.u64()
            let again = try r.u64(), fetched = try r.u64(), writes = try r.u64()
            try r.end()
            guard installed == UInt64(count) else { throw WireError.mismatch("destination installed \(installed) of the \(count) missing pages") }
            out.installed = count
            out.remoteFaults = Int(clamping: faults)
            out.reconnects = Int(clamping: reconnects)
            out.pausedSeconds = Double(paused) / 1e9
            out.reRequestedPages = Int(clamping: again)
            out.fetchedBytes = Int(clamping: fetched)
            out.destinationWrites = Int(clamping: writes)
            break
        }
        let tDone = Clock.nanoseconds()
        out.totalTime = Double(tDone - t0) / 1e9
        out.postcopyTime = Double(tDone - tResume) / 1e9
        out.syncTime = Double(loop.syncNS) / 1e9
        out.dirtySyncCount = loop.syncCount
        out.throttleEngagedAt = loop.throttle.engagedAt
        out.throttleTriggers = loop.throttle.triggers
        out.throttledSeconds = workload.throttledSeconds
        out.sourceChecksum = regionChecksum(region.base, length: region.length)
        out.destinationChecksum = try link.verify(checksum: out.sourceChecksum).destinationChecksum
        return out
    }

    /// The destination's side of a SWITCH: how its faults are served.
    public struct DestinationConfig: Sendable {
        public var policy: EngineConfig.Policy
        /// Seconds without an answer before a page connection counts as lost, and how long
        /// to keep trying to replace it (recovery; 0: a lost connection fails the migration).
        public var fetchTimeoutS: Double
        public var recoverS: Double
        public var deadlineS: Double
        public var connect: @Sendable (String, PageImage, Double, Double) throws -> any RemotePageFetcher
        public init(policy: EngineConfig.Policy, fetchTimeoutS: Double, recoverS: Double, deadlineS: Double,
                    connect: @escaping @Sendable (String, PageImage, Double, Double) throws -> any RemotePageFetcher) {
            self.policy = policy
            self.fetchTimeoutS = fetchTimeoutS
            self.recoverS = recoverS
            self.deadlineS = deadlineS
            self.connect = connect
        }
    }

    /// What the destination did in post-copy.
    public struct DestinationReport: Sendable {
        public var pending = 0
        public var installed = 0
        public var remoteFaults = 0
        public var reconnects = 0
        public var pausedSeconds = 0.0
        public var reRequestedPages = 0
        public var fetchedBytes = 0
        public var writes = 0
        public var downtimeLocal = 0.0
        public var postcopyTime = 0.0
        public var faultLatencyNS: [UInt64] = []
    }

    /// Runs the destination's post-copy for `sw` on `region`, fetching from `host`:port.
    static func runDestination(_ sw: DestinationSession.Switch, host: String, region: AnonymousMapping, pageSize: Int,
                               config: DestinationConfig, control c: WireConnection, log: (String) -> Void) throws(WireError) -> DestinationReport {
        var rep = DestinationReport()
        rep.pending = sw.pending.count
        let t0 = Clock.nanoseconds()
        do {
            // Drop the stale copies: they fault in from the source from now on.
            _ = try region.discard(pages: sw.pending, pageSize: pageSize)
            // The engine's own image is never read (pages come from the fetcher's landing
            // area); an untouched mapping of the region's size stands for it.
            let placeholder = try AnonymousMapping(length: region.length)
            let image = PageImage(wrapping: placeholder)
            let fetcher = try config.connect("\(host):\(sw.port)", image, config.fetchTimeoutS, config.recoverS)
            defer { fetcher.close() }
            var cfg = EngineConfig()
            cfg.policy = config.policy
            cfg.resolve = .copy
            cfg.wait = .blocking
            cfg.handlerThreads = 1
            cfg.zeropage = false
            let link = EmulatedLink(bytesPerSecond: 1e15, rttNS: 0, preempt: true)
            let uffd = try Userfaultfd.Descriptor(features: [.threadID], nonBlocking: false)
            let engine = try FaultEngine(config: cfg, region: region.base, staging: nil, image: image, link: link, uffd: uffd, source: fetcher)
            var pending = [Bool](repeating: false, count: region.length / pageSize)
            for p in sw.pending { pending[p] = true }
            engine.markPresent { !pending[$0] }
            try engine.start()
            // A failure from here on still stops the handler threads and the region's
            // registration (stop is idempotent).
            defer { _ = engine.stop() }
            if cfg.pusher { try engine.startPusher() }
            let workload = DirtyWorkload(base: region.base, pages: region.length / pageSize, hotPages: sw.hotPages,
                                         rate: Double(sw.rate), threads: sw.threads, preservesValues: true)
            try workload.start(seed: 0xD57)
            defer { workload.stop() }
            var w = PayloadWriter()
            w.u32(UInt32(sw.pending.count))
            try c.send(.postcopyResumed, w.bytes)
            rep.downtimeLocal = Double(Clock.nanoseconds() - t0) / 1e9
            log("post-copy: \(sw.pending.count) pages missing, the workload resumed (\(sw.rate) pages/s, \(sw.threads) threads)")
            let tResume = Clock.nanoseconds()
            var lastProgress = tResume
            var failure: String?
            while !engine.isComplete {
                let now = Clock.nanoseconds()
                if let f = engine.failure { failure = f.reason; break }
                if Double(now - tResume) / 1e9 > config.deadlineS { failure = "post-copy did not complete within \(config.deadlineS) s"; break }
                if now - lastProgress > 500_000_000 {
                    var p = PayloadWriter()
                    p.u64(UInt64(engine.counters().claimedPages))
                    try c.send(.progress, p.bytes)
                    lastProgress = now
                }
                Clock.sleep(until: now + 2_000_000, spinNS: 0)
            }
            workload.stop()
            let counters = engine.stop()
            rep.postcopyTime = Double(Clock.nanoseconds() - tResume) / 1e9
            rep.writes = workload.writes
            rep.remoteFaults = counters.remoteFaults
            rep.faultLatencyNS = counters.faultLatencyNS
            rep.reconnects = fetcher.reconnectCount
            rep.pausedSeconds = fetcher.pausedSeconds
            rep.reRequestedPages = fetcher.reRequestedPages
            rep.fetchedBytes = fetcher.bytesFetched
            if let failure { throw WireError.peerError("post-copy failed at the destination: \(failure)") }
            rep.installed = sw.pending.filter { engine.page($0).installed != nil }.count
            if rep.installed != sw.pending.count { throw WireError.mismatch("post-copy installed \(rep.installed) of \(sw.pending.count) missing pages") }
        } catch let e as WireError {
            throw e
        } catch {
            throw WireError.peerError("post-copy at the destination: \(error)")
        }
        var d = PayloadWriter()
        for v in [rep.installed, rep.remoteFaults, rep.reconnects, Int(min(max(rep.pausedSeconds, 0), 1e9) * 1e9), rep.reRequestedPages, rep.fetchedBytes, rep.writes] {
            d.u64(UInt64(clamping: v))
        }
        try c.send(.postcopyDone, d.bytes)
        return rep
    }
}
