#if canImport(Glibc)
import Glibc
#endif
import ArgumentParser
import Foundation
import LabKit
import LinuxMM
import Scenarios
import Transfer
import Migration
import LazyRestore

/// Two-process (two-host) pre-copy migration and the snapshot CPU-flag check. The protocol and
/// the snapshot format are in docs/migration-protocol.md.
struct Migrate: ParsableCommand {
    static let configuration = CommandConfiguration(
        abstract: "Live-migrate a workload's memory between two memlab processes over TCP; check a snapshot's CPU flags.",
        discussion: """
        Start `memlab migrate destination --listen ADDR:PORT` on the receiving host, then \
        `memlab migrate source --connect ADDR:PORT` on the sending one. The source runs a workload that \
        dirties pages at --dirty-rate, sends its memory in pre-copy rounds (dirty pages found with userfaultfd \
        WP_ASYNC + PAGEMAP_SCAN), stops it and sends the rest; the destination checks the CPU flags, \
        takes the pages and verifies the result. Exit status: 0 migrated and verified; 1 failed or refused; \
        2 bad usage or a malformed snapshot.
        """,
        subcommands: [MigrateSource.self, MigrateDestination.self, MigrateCheck.self, MigrateSnapshot.self]
    )
}

/// Option ranges (docs/migration-protocol.md, "Command-line limits"). A value outside —
/// NaN, infinite, negative, huge — is bad usage (exit 2): it must never reach a conversion
/// to an integer or a timeval, where it would trap.
enum NetLimits {
    static let timeoutS = 0.0...Deadline.maxS          // lower bound open
    static let delayMs = 0.0...60_000.0
    static let bandwidthMbit = 0.1...1_000_000.0          // as migration:precopy's parameter
    static let rttMs = 0.0...10_000.0
    static let downtimeTargetMs = 0.001...100_000.0
    static let maxRounds = 1...10_000
    static let threads = 1...64
    static let dirtyRate = 0...100_000_000
    /// Region sizes (source --size, destination --max-region): page counts stay far inside
    /// the protocol's 32-bit round counts.
    static let maxRegionBytes = 1 << 40

    static func check(_ name: String, _ v: Double, _ r: ClosedRange<Double>, lowerOpen: Bool = false, unit: String) throws {
        guard v.isFinite, r.contains(v), !(lowerOpen && v == r.lowerBound) else {
            let range = lowerOpen ? "\(formatNumber(r.lowerBound)) < value ≤ \(formatNumber(r.upperBound))" : "\(formatNumber(r.lowerBound))…\(formatNumber(r.upperBound))"
            throw UsageError("--\(name) \(v): expected a number with \(range) \(unit)")
        }
    }

    static func check(_ name: String, _ v: Int, _ r: ClosedRange<Int>) throws {
        guard r.contains(v) else { throw UsageError("--\(name) \(v): expected \(r.lowerBound)…\(r.upperBound)") }
    }

    /// A size option: K/M/G/T suffixes, a whole number of pages, within `min…maxRegionBytes`.
    static func size(_ name: String, _ text: String, atLeast min: Int) throws -> Int {
        guard let b = parseSize(text), b >= min, b <= maxRegionBytes, b % System.pageSize == 0 else {
            throw UsageError("--\(name) '\(text)': expected a size (K, M, G, T suffix) of whole \(System.pageSize)-byte pages, \(min)…\(maxRegionBytes) bytes")
        }
        return b
    }
}

/// A failure the user must see as one line, with exit status 1.
private func fail(_ text: String) -> ExitCode {
    writeStderr("memlab migrate: \(text)\n")
    return ExitCode(ExitStatus.failed)
}

/// Writes one run as a full memlab.result/1 document (what `memlab run --json` writes), so
/// `memlab show`, `report` and `compare` read a two-host migration like any other result.
func writeMigrateDocument(_ path: String, variant: String, params: [String: ParamValue], output: RepetitionOutput,
                          started: String, startNS: UInt64) throws {
    let run = RunResult.single(scenario: "migration", variant: variant, params: Params(params), output: output,
                               durationS: Clock.seconds(since: startNS))
    let doc = ResultDocument(tool: .init(name: "memlab", version: memlabVersion), startedAt: started,
                             host: .current(), runs: [run])
    try Session.write(try doc.jsonData(), to: path)
}

struct MigrateSource: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "source",
        abstract: "Run a workload and pre-copy its memory to a destination.")

    @Option(help: ArgumentHelp("Destination address.", valueName: "ipv4:port")) var connect: String
    @Option(help: "Region size (K, M, G suffix).") var size = "64M"
    @Option(help: "Page writes per second over all workload threads (0: idle).") var dirtyRate = 2000
    @Option(help: "Workload threads.") var threads = 1
    @Option(help: "The link's bandwidth in Mbit/s: what the model decides convergence with (shape the link to it with tc).") var bandwidthMbit = 100.0
    @Option(help: "The link's round-trip time in ms for the model (usually 2 × --delay-ms plus the wire's own).") var rttMs: Double?
    @Option(help: "One-way delay added by memlab's delay stage to every message this side receives, ms.") var delayMs = 0.0
    @Option(help: "Stop when the rest would cross the link within this long, ms.") var downtimeTargetMs = 30.0
    @Option(help: "Stop-and-copy after this many rounds even if not converged.") var maxRounds = 30
    @Option(help: "Seconds without progress from the destination before giving up.") var timeout = 10.0
    @Option(help: "Write the result (metrics, rounds, checks) as a memlab.result/1 document to this file, also when the migration fails.") var json: String?
    @Option(help: "Fraction of the region's pages that are zero (0…1).") var zeroRatio = 0.0
    @Option(help: "Fraction of each non-zero page's 8-byte words that are zero (0…0.95): what a compressor can take away.") var compressibility = 0.0
    @Flag(help: "Send zero pages as their header only (QEMU's zero-page detection).") var zeroPages = false
    @Option(help: "XBZRLE cache size (K, M, G suffix; 0: off): re-sent pages go as deltas against the copy sent before.") var xbzrleCache = "0"
    @Option(help: "Compress pages with zstd at this level (1…19; 0: off).") var zstd = 0
    @Option(help: "Throttle the workload when rounds dirty too much: none, auto-converge, dirty-limit.") var throttle = "none"
    @Option(help: "dirty-limit: the most pages/s each workload thread writes once throttled.") var dirtyLimit = 256.0
    @Option(help: "Multifd: page data on this many extra TCP connections, one sender thread each (0: all on the control connection; at most 16).") var channels = 0
    @Option(help: "precopy (rounds, then stop-and-copy), postcopy (stop at once; the destination pulls every page) or hybrid (--precopy-rounds rounds, then post-copy). Post-copy needs a destination started with --postcopy-policy.") var mode = "precopy"
    @Option(help: "hybrid: pre-copy rounds before the switch to post-copy.") var precopyRounds = 2

    var params: [String: ParamValue] {
        var p: [String: ParamValue] = [
            "zero_ratio": .double(zeroRatio), "compressibility": .double(compressibility), "zero_pages": .string(zeroPages ? "detect" : "send"),
            "xbzrle_cache": .int(parseSize(xbzrleCache) ?? 0), "compress": .string(zstd > 0 ? "zstd" : "none"), "compress_level": .int(zstd),
            "throttle": .string(throttle), "dirty_limit": .double(dirtyLimit), "channels": .int(channels),
            "mode": .string(mode), "precopy_rounds": .int(precopyRounds),
            "connect": .string(connect), "size": .int(parseSize(size) ?? 0), "dirty_rate": .int(dirtyRate),
            "threads": .int(threads), "bandwidth_mbit": .double(bandwidthMbit), "delay_ms": .double(delayMs),
            "downtime_target_ms": .double(downtimeTargetMs), "max_rounds": .int(maxRounds), "timeout_s": .double(timeout),
            "tracking": .string("wp-async"),
        ]
        if let rttMs { p["rtt_ms"] = .double(rttMs) }
        return p
    }

    func run() throws {
        let started = isoTimestamp()
        let startNS = Clock.nanoseconds()
        /// A failure after the arguments were accepted: the document says why, then one line on stderr.
        func failed(_ text: String) -> ExitCode {
            if let path = json {
                var o = RepetitionOutput()
                o.status = .failed
                o.reason = text
                try? writeMigrateDocument(path, variant: "precopy-tcp", params: params, output: o, started: started, startNS: startNS)
            }
            return fail(text)
        }
        let bytes = try NetLimits.size("size", size, atLeast: 2 * System.pageSize)
        if let json { try Session.checkWritable(json, what: "--json") }
        try NetLimits.check("bandwidth-mbit", bandwidthMbit, NetLimits.bandwidthMbit, unit: "Mbit/s")
        if let rttMs { try NetLimits.check("rtt-ms", rttMs, NetLimits.rttMs, unit: "ms") }
        try NetLimits.check("delay-ms", delayMs, NetLimits.delayMs, unit: "ms")
        try NetLimits.check("downtime-target-ms", downtimeTargetMs, NetLimits.downtimeTargetMs, unit: "ms")
        try NetLimits.check("timeout", timeout, NetLimits.timeoutS, lowerOpen: true, unit: "s")
        try NetLimits.check("max-rounds", maxRounds, NetLimits.maxRounds)
        try NetLimits.check("threads", threads, NetLimits.threads)
        try NetLimits.check("dirty-rate", dirtyRate, NetLimits.dirtyRate)
        try NetLimits.check("zero-ratio", zeroRatio, 0...1, unit: "")
        try NetLimits.check("compressibility", compressibility, 0...0.95, unit: "")
        try NetLimits.check("dirty-limit", dirtyLimit, 1...100_000_000, unit: "pages/s")
        try NetLimits.check("channels", channels, 0...Multifd.maxChannels)
        guard ["precopy", "postcopy", "hybrid"].contains(mode) else { throw UsageError("--mode '\(mode)': expected precopy, postcopy or hybrid") }
        try NetLimits.check("precopy-rounds", precopyRounds, 1...NetLimits.maxRounds.upperBound)
        if mode != "precopy" && channels > 0 { throw UsageError("--channels goes with --mode precopy (post-copy pulls pages on connections of its own)") }
        if zstd != 0 { try NetLimits.check("zstd", zstd, EncodingConfig.levels) }
        let cacheBytes: Int
        if xbzrleCache == "0" { cacheBytes = 0 } else { cacheBytes = try NetLimits.size("xbzrle-cache", xbzrleCache, atLeast: System.pageSize) }
        guard let throttleMode = ThrottlePolicy.Mode(rawValue: throttle) else {
            throw UsageError("--throttle '\(throttle)': expected \(ThrottlePolicy.Mode.allCases.map(\.rawValue).joined(separator: ", "))")
        }
        let encoding = EncodingConfig(zeroPages: zeroPages, xbzrleCacheBytes: cacheBytes, zstdLevel: zstd)
        let policy = ThrottlePolicy(mode: throttleMode, dirtyLimitPagesPerSecond: dirtyLimit)
        let wp = WriteProtectTracking.probe()
        guard wp.usable else { throw failed("dirty tracking unusable: \(wp.reason ?? "?")") }
        let page = System.pageSize
        let region = try AnonymousMapping(length: bytes)
        fillImage(region.base, length: region.length, seed: 0x6D69_6772, zeroRatio: zeroRatio, compressibility: compressibility)

        let delayNS = UInt64(delayMs * 1e6)
        let socket: Socket
        do { socket = try Socket.connect(try SocketAddress.tcp(connect), timeoutS: timeout) } catch { throw failed(error.description) }
        let conn: WireConnection
        do { conn = try WireConnection(socket: socket, delayNS: delayNS, timeoutS: timeout) } catch { throw failed(error.description) }
        defer { conn.close() }
        let link: TCPLink
        do { link = try TCPLink(connection: conn, header: .local(regionBytes: region.length, checksum: 0), encoding: encoding) } catch { throw failed(error.description) }
        defer { link.close() }
        if channels > 0 {
            let address = try SocketAddress.tcp(connect)
            do {
                try link.openChannels(channels, encoding: encoding) { () throws(WireError) -> WireConnection in
                    let sock: Socket
                    do throws(SocketError) { sock = try Socket.connect(address, timeoutS: timeout) } catch { throw WireError(error) }
                    return try WireConnection(socket: sock, delayNS: delayNS, timeoutS: timeout)
                }
            } catch { throw failed("multifd: \(error)") }
        }
        let rtts: [Double]
        do { rtts = try link.measureRTT(count: 5) } catch { throw failed(error.description) }
        let measuredRTT = rtts[rtts.count / 2]
        let model = LinkModel(bandwidth: bandwidthMbit * 1e6 / 8, rtt: rttMs.map { $0 / 1000 } ?? measuredRTT)

        let tracker = try AsyncWriteProtectTracker(base: region.base, length: region.length)
        defer { tracker.close() }
        let workload = DirtyWorkload(base: region.base, pages: region.length / page, hotPages: region.length / page,
                                     rate: Double(dirtyRate), threads: threads)
        try workload.start(seed: 0x5EED)
        let costs = try SwitchCosts.measure()
        if mode != "precopy" {
            let out: RemotePostcopy.Outcome
            do {
                out = try RemotePostcopy.runSource(link: link, region: region, tracker: tracker, workload: workload, model: model,
                                                   precopyRounds: mode == "hybrid" ? precopyRounds : 0, throttle: policy, timeoutS: timeout) { l, image, until in
                    _ = PageServer.serve(l, image: image, maxConnections: 16, idleTimeoutS: 0, until: until)
                }
            } catch {
                workload.stop()
                throw failed("migration failed: \(error)")
            }
            let ctx = RunContext(variant: "\(mode)-tcp", params: Params([:]), repetition: 1, isWarmup: false)
            recordPostcopy(out, model: model, costs: costs, ctx: ctx)
            ctx.record("measured_rtt", measuredRTT, .s, better: .lower)
            for m in ctx.output.metrics { print("\(m.name.padding(toLength: 26, withPad: " ", startingAt: 0)) \(formatNumber(m.value)) \(m.unit.rawValue)") }
            if let path = json { try writeMigrateDocument(path, variant: "\(mode)-tcp", params: params, output: ctx.output, started: started, startNS: startNS) }
            let bad = ctx.output.checks.filter { !$0.agrees }
            if !bad.isEmpty { throw failed("destination contents differ from the source: \(bad.map(\.name).joined(separator: ", "))") }
            print("migrated (\(mode)) and verified: destination checksum \(String(out.destinationChecksum, radix: 16)) equals the source's")
            return
        }
        let engine = PrecopyEngine(model: model, downtimeTarget: downtimeTargetMs / 1000, maxRounds: maxRounds, throttle: policy, costs: costs)
        let out: PrecopyOutcome
        do {
            out = try engine.run(region: region.base, length: region.length, tracker: tracker, workload: workload, link: link)
        } catch {
            workload.stop()
            throw failed("migration failed: \(error)")
        }
        let ctx = RunContext(variant: "precopy-tcp", params: Params([:]), repetition: 1, isWarmup: false)
        MigrationScenario.record(out, model: model, pageSize: page, pages: region.length / page, tracker: tracker, ctx: ctx)
        MigrationScenario.recordThrottle(out.rounds, engagedAt: out.throttleEngagedAt, triggers: out.throttleTriggers,
                                         throttledSeconds: out.throttledSeconds, threads: threads, policy: policy, ctx: ctx)
        for (name, v, _) in costs.named { ctx.record(name, v, .s, better: .none) }
        ctx.record("measured_rtt", measuredRTT, .s, better: .lower)
        ctx.record("channels", Double(channels), .count, better: .none)
        if out.totalTime > 0 { ctx.record("throughput", Double(link.bytesOnWire) / out.totalTime, .bytesPerSecond, better: .higher) }
        var usage = rusage()
        getrusage(Int32(RUSAGE_SELF.rawValue), &usage)
        ctx.record("source_cpu_time", Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6, .s, better: .lower)
        ctx.record("wire_bytes_sent", Double(conn.bytesSent), .bytes, better: .lower)
        ctx.note("model: \(bandwidthMbit) Mbit/s, RTT \(model.rtt * 1000) ms (\(rttMs == nil ? "measured with PING/PONG" : "given")); delay stage \(delayMs) ms one way on each side's receive")
        for m in ctx.output.metrics {
            print("\(m.name.padding(toLength: 24, withPad: " ", startingAt: 0)) \(formatNumber(m.value)) \(m.unit.rawValue)")
        }
        for r in out.rounds {
            print("round \(r.round): sent \(r.pagesSent) pages in \(formatNumber(r.duration)) s; \(r.dirtyPages) dirty (\(formatNumber(r.dirtyRate)) pages/s); expected downtime \(formatNumber(r.expectedDowntime)) s")
        }
        for n in ctx.output.notes { print("note: \(n)") }
        if let path = json {
            try writeMigrateDocument(path, variant: "precopy-tcp", params: params, output: ctx.output, started: started, startNS: startNS)
        }
        let bad = ctx.output.checks.filter { !$0.agrees }
        if !bad.isEmpty { throw failed("destination contents differ from the source: \(bad.map(\.name).joined(separator: ", "))") }
        print("migrated and verified: destination checksum \(String(out.verdict?.destinationChecksum ?? 0, radix: 16)) equals the source's")
    }
}

extension MigrateSource {
    /// A post-copy or hybrid migration's figures, with the pre-copy and post-copy names.
    func recordPostcopy(_ out: RemotePostcopy.Outcome, model: LinkModel, costs: SwitchCosts, ctx: RunContext) {
        let page = System.pageSize
        ctx.record("total_time", out.totalTime, .s, better: .lower)
        ctx.record("downtime", out.downtime, .s, better: .lower)
        let pages = out.switchPages
        // The switch: the message and its answer, and the destination's discard, arm and thread starts.
        let predictedDowntime = model.roundTime(bytes: out.switchBytes)
            + costs.postcopySwitch(regionPages: 0, syncs: false, discardCalls: 1, discardPages: pages, threads: threads)
        ctx.record("predicted_downtime", predictedDowntime, .s, better: .none)
        ctx.record("downtime_model_ratio", out.downtime / predictedDowntime, .ratio, better: .none)
        let predictedTotal = out.rounds.reduce(0.0) { $0 + model.roundTime(bytes: $1.bytesSent, cpu: $1.encodeSeconds) }
            + predictedDowntime + model.wireTime(bytes: pages * page) + model.rtt
        ctx.record("predicted_total_time", predictedTotal, .s, better: .none)
        ctx.record("total_time_model_ratio", out.totalTime / predictedTotal, .ratio, better: .none)
        ctx.record("rounds", Double(out.rounds.count), .count, better: .none)
        ctx.record("precopy_pages", Double(out.precopyPages), .pages, better: .none)
        ctx.record("switch_pages", Double(pages), .pages, better: .lower)
        ctx.record("switch_bytes", Double(out.switchBytes), .bytes, better: .none)
        ctx.record("postcopy_pages", Double(out.installed), .pages, better: .none)
        ctx.record("postcopy_time", out.postcopyTime, .s, better: .lower)
        ctx.record("postcopy_requests", Double(out.remoteFaults), .count, better: .lower)
        ctx.record("postcopy_bytes", Double(out.fetchedBytes), .bytes, better: .none)
        ctx.record("postcopy_reconnects", Double(out.reconnects), .count, better: .none)
        ctx.record("postcopy_paused_time", out.pausedSeconds, .s, better: .lower)
        ctx.record("postcopy_rerequested_pages", Double(out.reRequestedPages), .pages, better: .lower)
        ctx.record("destination_writes", Double(out.destinationWrites), .count, better: .none)
        ctx.record("dirty_sync_count", Double(out.dirtySyncCount), .count, better: .none)
        ctx.check("destination_checksum", expected: Double(out.sourceChecksum >> 11), observed: Double(out.destinationChecksum >> 11), tolerance: 0,
                  describe: "checksum of the destination equals the source's at stop time (top 53 bits), after post-copy")
        if out.reconnects > 0 {
            ctx.note("post-copy recovered: \(out.reconnects) page connection(s) replaced; the faults waited \(formatNumber(out.pausedSeconds)) s; \(out.reRequestedPages) pages asked for again")
        }
        for (name, v, _) in costs.named { ctx.record(name, v, .s, better: .none) }
    }
}

struct MigrateDestination: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "destination",
        abstract: "Receive one migration: check CPU flags, take the pages, resume, verify.")

    @Option(help: ArgumentHelp("Address to listen on.", valueName: "ipv4:port")) var listen: String
    @Option(help: "One-way delay added by memlab's delay stage to every message this side receives, ms.") var delayMs = 0.0
    @Option(help: "Seconds without a message from the source before giving up.") var timeout = 10.0
    @Option(help: "Seconds to wait for the source to connect.") var acceptTimeout = 60.0
    @Option(help: "The largest image taken (K, M, G, T suffix); a bigger HELLO is refused before anything is allocated. Default: half of MemAvailable.") var maxRegion: String?
    @Flag(help: "Go on when this CPU lacks flags the source had (the guest may crash on an instruction it lacks).") var ignoreCPUFlags = false
    @Option(help: "Write what this side received and verified as a memlab.result/1 document to this file, also when the migration fails.") var json: String?
    @Option(help: "Take post-copy and hybrid migrations, pulling missing pages with this policy: on-demand or background-push.") var postcopyPolicy = "background-push"
    @Option(help: "Post-copy: seconds without an answer before a page connection counts as lost.") var fetchTimeout = 1.0
    @Option(help: "Post-copy recovery: seconds to keep trying to replace a lost page connection (the faults wait meanwhile; 0: a lost connection fails the migration).") var recover = 30.0

    var params: [String: ParamValue] {
        var p: [String: ParamValue] = ["postcopy_policy": .string(postcopyPolicy), "fetch_timeout_s": .double(fetchTimeout), "recover_s": .double(recover),
                                       "listen": .string(listen), "delay_ms": .double(delayMs), "timeout_s": .double(timeout),
                                       "accept_timeout_s": .double(acceptTimeout), "ignore_cpu_flags": .bool(ignoreCPUFlags)]
        if let maxRegion { p["max_region"] = .int(parseSize(maxRegion) ?? 0) }
        return p
    }

    /// The default cap: half of MemAvailable, in whole pages. The region is populated
    /// (MADV_POPULATE_WRITE) before the first page arrives, so the cap is what a HELLO can make
    /// resident; half leaves the rest to the page cache and everything else on the machine.
    static func defaultMaxRegion() throws -> Int {
        guard let info = try? MemInfo.current(), let avail = info["MemAvailable"], avail > 0 else {
            throw UsageError("cannot read MemAvailable from /proc/meminfo: give --max-region")
        }
        let half = Int(clamping: avail / 2)
        return min(half / System.pageSize * System.pageSize, NetLimits.maxRegionBytes)
    }

    func run() throws {
        try NetLimits.check("timeout", timeout, NetLimits.timeoutS, lowerOpen: true, unit: "s")
        try NetLimits.check("accept-timeout", acceptTimeout, NetLimits.timeoutS, lowerOpen: true, unit: "s")
        if let json { try Session.checkWritable(json, what: "--json") }
        try NetLimits.check("delay-ms", delayMs, NetLimits.delayMs, unit: "ms")
        let cap = try maxRegion.map { try NetLimits.size("max-region", $0, atLeast: System.pageSize) } ?? Self.defaultMaxRegion()
        guard let policy = EngineConfig.Policy(rawValue: postcopyPolicy), policy == .onDemand || policy == .backgroundPush else {
            throw UsageError("--postcopy-policy '\(postcopyPolicy)': expected on-demand or background-push")
        }
        try NetLimits.check("fetch-timeout", fetchTimeout, NetLimits.timeoutS, lowerOpen: true, unit: "s")
        try NetLimits.check("recover", recover, 0...3600, unit: "s")
        let postcopy = RemotePostcopy.DestinationConfig(policy: policy, fetchTimeoutS: fetchTimeout, recoverS: recover, deadlineS: 3600) { address, image, fetchTimeout, recover in
            try RemotePages.connect(address: address, image: image, channels: 2, timeoutS: fetchTimeout, recoverS: recover)
        }
        // It waits for a source: let the usual signals end it, even when the mask it inherited
        // blocks them (as `memlab pagesource` does).
        var set = sigset_t()
        sigemptyset(&set)
        for sig in [SIGINT, SIGTERM, SIGHUP] { sigaddset(&set, sig) }
        sigprocmask(SIG_UNBLOCK, &set, nil)
        let started = isoTimestamp()
        let startNS = Clock.nanoseconds()
        func failed(_ text: String) -> ExitCode {
            if let path = json {
                var o = RepetitionOutput()
                o.status = .failed
                o.reason = text
                try? writeMigrateDocument(path, variant: "precopy-tcp-destination", params: params, output: o, started: started, startNS: startNS)
            }
            return fail(text)
        }
        let listener: Listener
        do { listener = try Listener.listen(try SocketAddress.tcp(listen), backlog: Int32(Multifd.maxChannels + 1)) } catch { throw failed(error.description) }
        print("listening on \(listen); largest image taken: \(cap) bytes\(maxRegion == nil ? " (half of MemAvailable)" : "")")
        fflush(nil)
        let socket: Socket
        do { socket = try listener.accept(timeoutS: acceptTimeout, waitingFor: "source") } catch { throw failed(error.description) }
        let accepted = Clock.nanoseconds()
        let conn: WireConnection
        do { conn = try WireConnection(socket: socket, delayNS: UInt64(delayMs * 1e6), timeoutS: timeout) } catch { throw failed(error.description) }
        defer { conn.close() }
        let r: MigrationDestination.Report
        do {
            r = try MigrationDestination(ignoreCPUFlags: ignoreCPUFlags, maxRegion: cap).serve(conn, listener: listener, postcopy: postcopy) { print($0); fflush(nil) }
        } catch {
            throw failed(error.description)
        }
        let session = Clock.seconds(since: accepted)
        if let pc = r.postcopy {
            print("received \(r.pagesReceived) pages in \(r.rounds) rounds (\(r.bytesReceived) bytes), then \(pc.installed) by post-copy (\(pc.remoteFaults) faults, \(pc.reconnects) page connections replaced)")
        } else {
            print("received \(r.pagesReceived) pages in \(r.rounds) rounds + stop-and-copy (\(r.bytesReceived) bytes)")
        }
        if !r.ignoredFlags.isEmpty { print("cpu flags ignored: \(CPUIdentity.list(r.ignoredFlags))") }
        print("verified: checksum \(String(r.checksum, radix: 16)) equals the source's")
        if let path = json {
            let ctx = RunContext(variant: "precopy-tcp-destination", params: Params(params), repetition: 1, isWarmup: false)
            ctx.record("pages_received", Double(r.pagesReceived), .pages, better: .none)
            ctx.record("bytes_received", Double(r.bytesReceived), .bytes, better: .none)
            ctx.record("rounds", Double(r.rounds), .count, better: .none)
            ctx.record("session_time", session, .s, better: .lower)
            ctx.record("channels", Double(r.channels), .count, better: .none)
            if let pc = r.postcopy {
                ctx.record("postcopy_pages", Double(pc.installed), .pages, better: .none)
                ctx.record("postcopy_requests", Double(pc.remoteFaults), .count, better: .lower)
                ctx.record("postcopy_reconnects", Double(pc.reconnects), .count, better: .none)
                ctx.record("postcopy_paused_time", pc.pausedSeconds, .s, better: .lower)
                ctx.record("postcopy_rerequested_pages", Double(pc.reRequestedPages), .pages, better: .lower)
                ctx.record("postcopy_time", pc.postcopyTime, .s, better: .lower)
                ctx.record("switch_local_time", pc.downtimeLocal, .s, better: .lower)
                if !pc.faultLatencyNS.isEmpty {
                    let sorted = pc.faultLatencyNS.sorted()
                    ctx.record("fault_latency_p50", Double(sorted[sorted.count / 2]), .ns, better: .lower)
                    ctx.record("fault_latency_max", Double(sorted[sorted.count - 1]), .ns, better: .lower)
                }
            }
            var usage = rusage()
            getrusage(Int32(RUSAGE_SELF.rawValue), &usage)
            ctx.record("cpu_time", Double(usage.ru_utime.tv_sec + usage.ru_stime.tv_sec) + Double(usage.ru_utime.tv_usec + usage.ru_stime.tv_usec) / 1e6, .s, better: .lower)
            if r.decodedPages > 0 {
                ctx.record("decoded_pages", Double(r.decodedPages), .pages, better: .none)
                ctx.record("decode_cpu_time", r.decodeCPU, .s, better: .lower)
            }
            if let h = r.header {
                ctx.record("region_bytes", Double(h.regionBytes), .bytes, better: .none)
                ctx.note("source: \(h.arch), \(h.cpu.model), \(h.cpu.flags.count) CPU flags")
            }
            ctx.check("destination_checksum", expected: Double(r.sourceChecksum >> 11), observed: Double(r.checksum >> 11), tolerance: 0,
                      describe: "checksum of the received region equals the source's at stop time (top 53 bits)")
            if !r.ignoredFlags.isEmpty { ctx.note("CPU flags the source had and this machine lacks, ignored: \(CPUIdentity.list(r.ignoredFlags))") }
            ctx.note("delay stage \(delayMs) ms one way on this side's receive")
            try writeMigrateDocument(path, variant: "precopy-tcp-destination", params: params, output: ctx.output, started: started, startNS: startNS)
        }
    }
}

struct MigrateCheck: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "check",
        abstract: "Can this machine take a snapshot? Architecture, page size and CPU flags (the verdict alone).",
        discussion: "Exit status: 0 compatible (or overridden), 1 refused, 2 not a valid snapshot (truncated, malformed).")

    @Argument(help: "Snapshot file (memlab migrate snapshot).") var snapshot: String
    @Flag(help: "Report missing CPU flags but accept anyway.") var ignoreCPUFlags = false

    func run() throws {
        let header: ImageHeader
        do { header = try Snapshot.readHeader(path: snapshot) } catch {
            writeStderr("memlab migrate check: \(snapshot): \(error)\n")
            throw ExitCode(ExitStatus.usage)
        }
        let local = ImageHeader.local(regionBytes: header.regionBytes, checksum: 0)
        switch header.compatibility(with: local) {
        case .compatible:
            print("compatible: \(header.arch), \(header.pageSize)-byte pages, every one of the source's \(header.cpu.flags.count) CPU flags is present (source: \(header.cpu.model); here: \(local.cpu.model))")
        case .incompatible(let why):
            print("refused: \(why)")
            throw ExitCode(ExitStatus.failed)
        case .missingFlags(let flags):
            if ignoreCPUFlags {
                print("accepted with --ignore-cpu-flags: this CPU lacks \(flags.count) flag(s) the source had: \(CPUIdentity.list(flags))")
            } else {
                print("refused: this CPU lacks \(flags.count) flag(s) the source had: \(CPUIdentity.list(flags))")
                throw ExitCode(ExitStatus.failed)
            }
        }
    }
}

struct MigrateSnapshot: ParsableCommand {
    static let configuration = CommandConfiguration(commandName: "snapshot",
        abstract: "Write a snapshot file: this machine's arch, page size, CPU model and flags, then a region of page data.")

    @Argument(help: "Output file.") var output: String
    @Option(help: "Region size (K, M, G suffix).") var size = "1M"

    func run() throws {
        let bytes = try NetLimits.size("size", size, atLeast: System.pageSize)
        let region = try AnonymousMapping(length: bytes)
        fillRandom(region.base, length: region.length, seed: 0x736E_6170)
        let header = ImageHeader.local(regionBytes: region.length, checksum: regionChecksum(region.base, length: region.length))
        do { try Snapshot.write(path: output, header: header, data: region.base) } catch { throw fail(error.description) }
        print("wrote \(output): \(header.arch), \(header.regionBytes) bytes of pages, \(header.cpu.flags.count) CPU flags (\(header.cpu.model))")
    }
}
