#if canImport(Glibc)
import Glibc
#endif
import LabKit
import LinuxMM
import Transfer

/// Live migration, pre-copy: a workload dirties pages at a chosen rate while its memory goes
/// over an emulated link in rounds; the dirty pages come from the kernel (userfaultfd
/// write-protect read with PAGEMAP_SCAN). The destination is a second region in the same
/// process, compared page by page with the source at stop time.
public struct MigrationScenario: TypedScenario {
    public init() {}
    public let id = "migration"
    public let summary = "Live migration: pre-copy rounds over an emulated link with kernel dirty tracking (uffd WP_ASYNC + PAGEMAP_SCAN)"

    public enum Variant: String, ScenarioVariant {
        case precopy, hybrid, postcopy
        case dirtyScan = "dirty-scan"
        public var summary: String {
            switch self {
            case .precopy: return "rounds (send all, then what was dirtied) until the rest fits the downtime target or the round limit; stop-and-copy; destination verified"
            case .hybrid: return "precopy_rounds pre-copy rounds, then stop, switch the destination to post-copy (userfaultfd, the fault engine lazy restore uses too, postcopy_policy) for the pages still dirty, resume the workload there; destination verified"
            case .postcopy: return "no pre-copy round: stop at once and resume at the destination, every page served by post-copy (postcopy_policy); the hybrid path with precopy_rounds=0"
            case .dirtyScan: return "write a known random set of pages; the tracker must report exactly that set, then nothing, then the next set"
            }
        }
    }

    public enum Tracking: String, CaseIterable, ParameterChoice {
        case wpAsync = "wp-async", wpSync = "wp-sync", softDirty = "soft-dirty"
    }
    /// dirty-scan: a second tracker on the same region and the same writes.
    public enum Against: String, CaseIterable, ParameterChoice {
        case none, wpAsync = "wp-async", wpSync = "wp-sync", softDirty = "soft-dirty"
        var tracking: Tracking? { Tracking(rawValue: rawValue) }
    }
    public static let trackings = Tracking.choices
    /// hybrid/postcopy: the fault engine's policies that serve a post-copy phase.
    public enum PostcopyPolicy: String, CaseIterable, ParameterChoice {
        case onDemand = "on-demand", backgroundPush = "background-push", faultAround = "fault-around", bubble
        /// CRIU lazy-pages' push: 64 KiB chunks doubling to 4 MiB while no fault comes.
        case criuPush = "criu-push"
        var engine: EngineConfig.Policy {
            switch self {
            case .onDemand: return .onDemand
            case .backgroundPush: return .backgroundPush
            case .faultAround: return .faultAround
            case .bubble: return .bubble
            case .criuPush: return .criuPush
            }
        }
    }
    public enum Queue: String, CaseIterable, ParameterChoice { case fifo, preempt }
    public enum Throttle: String, CaseIterable, ParameterChoice {
        case none, autoConverge = "auto-converge", dirtyLimit = "dirty-limit"
        var mode: ThrottlePolicy.Mode { ThrottlePolicy.Mode(rawValue: rawValue) ?? .none }
    }
    public enum ZeroPages: String, CaseIterable, ParameterChoice { case send, detect }
    public enum Compress: String, CaseIterable, ParameterChoice { case none, zstd }
    public enum ModelCosts: String, CaseIterable, ParameterChoice { case measure, off }

    public struct Parameters: ParameterSet {
        public init() {}
        let size = Parameter<Int>("size", (64 << 10)...(16 << 30), default: 64 << 20, unit: .bytes, help: "bytes of the migrated region")
        let dirtyRate = Parameter<Int>("dirty_rate", 0...100_000_000, default: 2000, unit: .pagesPerSecond, help: "precopy: page writes per second over all workload threads (0: idle)")
        let threads = Parameter<Int>("threads", 1...64, default: 1, unit: .count, help: "precopy: workload threads")
        let hotFraction = Parameter<Double>("hot_fraction", 0.0001...1, default: 1, unit: .ratio, help: "precopy: fraction of the region the workload writes (uniformly at random)")
        let bandwidthMbit = Parameter<Double>("bandwidth_mbit", 0.1...1_000_000, default: 1000, unit: .mbitPerSecond, help: "emulated link bandwidth, Mbit/s")
        let rttMs = Parameter<Double>("rtt_ms", 0...10_000, default: 1, unit: .ms, help: "emulated link round-trip time, ms (each round ends with an acknowledgement)")
        let downtimeTargetMs = Parameter<Double>("downtime_target_ms", 0.001...100_000, default: 30, unit: .ms, help: "stop when the dirty rest would cross the link within this long")
        let maxRounds = Parameter<Int>("max_rounds", 1...10_000, default: 30, unit: .count, help: "stop-and-copy after this many rounds even if not converged")
        let tracking = Parameter<Tracking>("tracking", default: .wpAsync, help: "dirty tracking: wp-async (uffd WP_ASYNC + PAGEMAP_SCAN), wp-sync (uffd WP with a handler thread; counts write faults), soft-dirty (clear_refs; where the kernel has it)")
        let precopyRounds = Parameter<Int>("precopy_rounds", 0...10_000, default: 2, unit: .count, help: "hybrid: pre-copy rounds before the switch to post-copy (0: pure post-copy)")
        let postcopyPolicy = Parameter<PostcopyPolicy>("postcopy_policy", default: .backgroundPush, help: "hybrid/postcopy: how the missing pages move: " + PostcopyPolicy.choices.joined(separator: ", "))
        let queue = Parameter<Queue>("queue", default: .preempt, help: "hybrid/postcopy: fifo: a faulting page queues behind pushed pages; preempt: it goes first (QEMU's preempt channel)")
        let drainAfterS = Parameter<Double>("drain_after_s", 0...3600, default: 0.5, unit: .s, help: "hybrid/postcopy, on-demand: push what was never faulted after this long at the destination (the migration must end)")
        let against = Parameter<Against>("against", default: .none, help: "dirty-scan: a second tracker armed on the same region, told the same writes: both must report exactly the pages written (soft-dirty against a userfaultfd mode; two userfaultfd modes cannot share a region)")
        let writtenFraction = Parameter<Double>("written_fraction", 0.0001...1, default: 0.1, unit: .ratio, help: "dirty-scan: fraction of pages written per step")
        let timeoutS = Parameter<Double>("timeout_s", 1...3600, default: 120, unit: .s, help: "the repetition is killed after this long")
        // Convergence by throttling (QEMU's auto-converge and dirty-limit), pre-copy and hybrid.
        let throttle = Parameter<Throttle>("throttle", default: .none, help: "precopy/hybrid: slow the workload when a round dirties more than throttle_trigger % of what it sent (twice): auto-converge (its threads sleep throttle % of each 10 ms timeslice, raised each time) or dirty-limit (each thread's write rate capped at dirty_limit)")
        let throttleInitial = Parameter<Int>("throttle_initial", 1...99, default: 20, unit: .percent, help: "auto-converge: the first throttle (QEMU cpu-throttle-initial)")
        let throttleIncrement = Parameter<Int>("throttle_increment", 1...99, default: 10, unit: .percent, help: "auto-converge: added at each further trigger (QEMU cpu-throttle-increment)")
        let throttleMax = Parameter<Int>("throttle_max", 1...99, default: 99, unit: .percent, help: "auto-converge: the cap (QEMU max-cpu-throttle)")
        let throttleTrigger = Parameter<Int>("throttle_trigger", 1...100, default: 50, unit: .percent, help: "the trigger: a round's dirtied bytes above this share of its sent bytes (QEMU throttle-trigger-threshold)")
        let dirtyLimit = Parameter<Double>("dirty_limit", 1...100_000_000, default: 256, unit: .pagesPerSecond, help: "dirty-limit: the most pages/s each workload thread writes once throttled (256 pages/s = QEMU's default vcpu-dirty-limit of 1 MB/s)")
        // Fewer bytes: what the image holds, and how pages are encoded on the link.
        let zeroRatio = Parameter<Double>("zero_ratio", 0...1, default: 0, unit: .ratio, help: "fraction of the region's pages that are zero")
        let compressibility = Parameter<Double>("compressibility", 0...0.95, default: 0, unit: .ratio, help: "fraction of each non-zero page's 8-byte words that are zero (at random places): what a compressor can take away")
        let zeroPages = Parameter<ZeroPages>("zero_pages", default: .send, help: "send: every page goes whole; detect: a zero page goes as its 13-byte header (QEMU's zero-page detection)")
        let xbzrleCache = Parameter<Int>("xbzrle_cache", 0...(16 << 30), default: 0, unit: .bytes, help: "XBZRLE cache size (0: off): a re-sent page the cache holds goes as a run-length delta against the copy sent before (QEMU xbzrle-cache-size)")
        let compress = Parameter<Compress>("compress", default: .none, help: "zstd: compress each page that is not zero and not a delta, with libzstd at compress_level")
        let compressLevel = Parameter<Int>("compress_level", 1...19, default: 1, unit: .count, help: "compress=zstd: the zstd level")
        let modelCosts = Parameter<ModelCosts>("model_costs", default: .measure, help: "measure: time this machine's stop and switch steps (sync, MADV_DONTNEED, post-copy arm, thread start; about 20 ms) before each repetition and add them to the predicted downtime; off: the link alone")
    }

    /// The switch costs for the model, measured now and recorded (nil with model_costs=off).
    func switchCosts(_ p: Values, _ ctx: RunContext) throws -> SwitchCosts? {
        guard p.modelCosts == .measure else { return nil }
        // The sync is timed with asynchronous write-protect; without it (before 6.7) the
        // model leaves the sync out rather than fail a run that tracks another way.
        let wpAsync = WriteProtectTracking.probe().usable
        let c = try SwitchCosts.measure(sync: wpAsync)
        if !wpAsync { ctx.note("model: the dirty-log sync cost was not measured (no asynchronous write-protect here); switch_sync_per_page is 0") }
        for (name, v, _) in c.named { ctx.record(name, v, .s, better: .none) }
        return c
    }

    func encoding(_ p: Values) -> EncodingConfig {
        EncodingConfig(zeroPages: p.zeroPages == .detect, xbzrleCacheBytes: p.xbzrleCache,
                       zstdLevel: p.compress == .zstd ? p.compressLevel : 0)
    }

    func throttlePolicy(_ p: Values) -> ThrottlePolicy {
        ThrottlePolicy(mode: p.throttle.mode, initial: p.throttleInitial, increment: p.throttleIncrement,
                       max: p.throttleMax, triggerPercent: p.throttleTrigger, dirtyLimitPagesPerSecond: p.dirtyLimit)
    }

    public func probe(_ variant: Variant, _ params: Values) -> Availability {
        let uffd = Userfaultfd.probe()
        guard uffd.usable else { return .unusable("userfaultfd unusable: \(uffd.reason ?? "?")") }
        for t in [params.tracking, params.against.tracking].compactMap({ $0 }) {
            switch t {
            case .wpAsync:
                let wp = WriteProtectTracking.probe()
                if !wp.usable { return .unusable("asynchronous write-protect tracking unusable (needs 6.7+ with UFFD_FEATURE_WP_ASYNC and PAGEMAP_SCAN): \(wp.reason ?? "?"); try tracking=wp-sync") }
            case .softDirty:
                let sd = SoftDirty.probe()
                if !sd.usable { return .unusable("soft-dirty unusable: \(sd.reason ?? "?"); use tracking=wp-async") }
            case .wpSync:
                // dirty-scan populates the region first where the kernel cannot protect holes.
                if variant != .dirtyScan && !Self.hasWPUnpopulated { return .unusable("userfaultfd lacks WP_UNPOPULATED (needs 6.4+)") }
            }
        }
        return .usable
    }

    static var hasWPUnpopulated: Bool { Userfaultfd.probe().features & (1 << 13) != 0 }

    public func validate(_ variant: Variant, _ params: Values) throws(UsageError) {
        if params.size / System.pageSize < 2 { throw UsageError("size must hold at least two pages") }
        if params.throttleInitial > params.throttleMax {
            throw UsageError("throttle_initial (\(params.throttleInitial) %) is above throttle_max (\(params.throttleMax) %)")
        }
        if params.xbzrleCache != 0 && params.xbzrleCache < System.pageSize {
            throw UsageError("xbzrle_cache must be 0 (off) or at least one page (\(System.pageSize) bytes)")
        }
        if params.xbzrleCache > params.size * 2 {
            throw UsageError("xbzrle_cache of \(formatBytes(params.xbzrleCache)) is more than twice the region (\(formatBytes(params.size))): a cache larger than what it caches holds nothing more")
        }
        if variant == .postcopy && params.throttle != .none {
            throw UsageError("throttle applies to pre-copy rounds; postcopy has none (use hybrid or precopy)")
        }
        if params.against != .none {
            guard variant == .dirtyScan else { throw UsageError("against applies to dirty-scan only") }
            guard (params.tracking == .softDirty) != (params.against == .softDirty) else {
                throw UsageError("against=\(params.against.rawValue) with tracking=\(params.tracking.rawValue): pair soft-dirty with a userfaultfd mode (two userfaultfd registrations cannot share a region, and two soft-dirty trackers would clear each other's bits)")
            }
        }
        if variant == .dirtyScan && (params.throttle != .none || !encoding(params).isRaw) {
            throw UsageError("dirty-scan sends nothing: throttle, zero_pages, xbzrle_cache and compress do not apply")
        }
    }

    public func deadline(_ variant: Variant, _ params: Values) -> Double { params.timeoutS }

    func makeTracker(_ kind: Tracking, base: UnsafeMutableRawPointer, length: Int) throws -> DirtyTracker {
        switch kind {
        case .wpSync: return try SyncWriteProtectTracker(base: base, length: length, unpopulated: Self.hasWPUnpopulated)
        case .softDirty: return try SoftDirtyTracker(base: base, length: length)
        case .wpAsync: return try AsyncWriteProtectTracker(base: base, length: length)
        }
    }

    public func run(_ ctx: RunContext, _ variant: Variant, _ p: Values) throws {
        switch variant {
        case .dirtyScan: try runDirtyScan(ctx, p)
        case .hybrid, .postcopy: try runHybrid(ctx, variant, p)
        case .precopy: try runPrecopy(ctx, p)
        }
    }

    func runPrecopy(_ ctx: RunContext, _ p: Values) throws {
        let page = System.pageSize
        let region = try AnonymousMapping(length: p.size)
        let pages = region.length / page
        fillImage(region.base, length: region.length, seed: 0x6D69_6772 &+ UInt64(ctx.repetition),
                  zeroRatio: p.zeroRatio, compressibility: p.compressibility)
        let model = LinkModel(bandwidth: p.bandwidthMbit * 1e6 / 8, rtt: p.rttMs / 1000)
        let link = try EmulatedPageLink(model: model, length: region.length, encoding: encoding(p))
        let tracker = try makeTracker(p.tracking, base: region.base, length: region.length)
        defer { tracker.close() }
        let workload = DirtyWorkload(base: region.base, pages: pages,
                                     hotPages: Int((Double(pages) * p.hotFraction).rounded(.up)),
                                     rate: Double(p.dirtyRate), threads: p.threads)
        let costs = try switchCosts(p, ctx)
        let engine = PrecopyEngine(model: model, downtimeTarget: p.downtimeTargetMs / 1000,
                                   maxRounds: p.maxRounds, throttle: throttlePolicy(p), costs: costs)
        try workload.start(seed: 0x5EED &+ UInt64(ctx.repetition))
        // The writers must not outlive the region, also when the migration fails.
        defer { workload.stop() }
        let out = try engine.run(region: region.base, length: region.length, tracker: tracker, workload: workload, link: link)
        Self.record(out, model: model, pageSize: page, pages: pages, tracker: tracker, ctx: ctx)
        Self.recordThrottle(out.rounds, engagedAt: out.throttleEngagedAt, triggers: out.throttleTriggers,
                            throttledSeconds: out.throttledSeconds, threads: p.threads, policy: throttlePolicy(p), ctx: ctx)
        if p.dirtyRate == 0 {
            ctx.check("idle_rounds", expected: 1, observed: Double(out.rounds.count), tolerance: 0,
                      describe: "an idle workload converges after the first round")
            ctx.check("idle_stop_pages", expected: 0, observed: Double(out.stopPages), tolerance: 0,
                      describe: "nothing is dirty at stop-and-copy when nothing writes")
        }
    }

    /// memlab's pre-copy model run for real on figures from elsewhere (a QEMU migration):
    /// a region of `size` bytes of random pages, `hotPages` of them dirtied at `dirtyRate`
    /// pages/s by one thread, over the emulated link, with uffd-wp dirty tracking.
    public static func emulatePrecopy(size: Int, dirtyRate: Double, hotPages: Int, model: LinkModel,
                                      downtimeTarget: Double, maxRounds: Int, seed: UInt64) throws -> PrecopyOutcome {
        let region = try AnonymousMapping(length: size)
        let pages = region.length / System.pageSize
        fillRandom(region.base, length: region.length, seed: seed)
        let link = try EmulatedPageLink(model: model, length: region.length)
        let tracker = try MigrationScenario().makeTracker(.wpAsync, base: region.base, length: region.length)
        defer { tracker.close() }
        let workload = DirtyWorkload(base: region.base, pages: pages, hotPages: max(1, min(hotPages, pages)), rate: dirtyRate, threads: 1)
        let engine = PrecopyEngine(model: model, downtimeTarget: downtimeTarget, maxRounds: maxRounds)
        try workload.start(seed: seed ^ 0x5EED)
        defer { workload.stop() }
        return try engine.run(region: region.base, length: region.length, tracker: tracker, workload: workload, link: link)
    }

    /// Records an outcome with the names docs/results-format.md and QEMU use; shared with `memlab migrate`.
    public static func record(_ out: PrecopyOutcome, model: LinkModel, pageSize: Int, pages: Int,
                              tracker: DirtyTracker?, ctx: RunContext) {
        ctx.record("total_time", out.totalTime, .s, better: .lower)
        ctx.record("downtime", out.downtime, .s, better: .lower)
        ctx.record("predicted_downtime", out.predictedDowntime, .s, better: .none)
        if out.predictedDowntime > 0 { ctx.record("downtime_model_ratio", out.downtime / out.predictedDowntime, .ratio, better: .none) }
        // What crossed the link: after encoding, headers included where the link has them.
        ctx.record("bytes_transferred", Double(out.bytesOnWire > 0 ? out.bytesOnWire : out.pagesTransferred * pageSize), .bytes, better: .lower)
        ctx.record("pages_transferred", Double(out.pagesTransferred), .pages, better: .lower)
        ctx.record("transferred_ratio", Double(out.pagesTransferred) / Double(pages), .ratio, better: .lower)
        ctx.record("dirty_sync_count", Double(out.dirtySyncCount), .count, better: .none)
        ctx.record("rounds", Double(out.rounds.count), .count, better: .lower)
        ctx.record("converged", out.converged ? 1 : 0, .count, better: .higher)
        if out.converged, let last = out.rounds.last { ctx.record("converged_at", last.endTime, .s, better: .lower) }
        ctx.record("stop_copy_pages", Double(out.stopPages), .pages, better: .lower)
        ctx.record("dirty_sync_time", out.syncTime, .s, better: .lower)
        ctx.record("workload_write_rate", out.workloadRate, .pagesPerSecond, better: .none)
        let predictedTotal = out.rounds.reduce(0.0) { $0 + model.roundTime(bytes: $1.bytesSent > 0 ? $1.bytesSent : $1.pagesSent * pageSize, cpu: $1.encodeSeconds) } + out.predictedDowntime
        ctx.record("predicted_total_time", predictedTotal, .s, better: .none)
        if predictedTotal > 0 { ctx.record("total_time_model_ratio", out.totalTime / predictedTotal, .ratio, better: .none) }
        if let f = tracker?.writeFaults { ctx.record("write_faults", Double(f), .count, better: .none) }
        if let e = out.encoding { recordEncoding(e, decodeCPU: out.decodeCPU, pageSize: pageSize, ctx: ctx) }
        let t = out.rounds.map(\.endTime)
        let iv = t.count > 1 ? (t.last! / Double(t.count)) : (t.first ?? 0)
        ctx.record(TimeSeries(name: "round_pages_sent", unit: .pages, intervalS: iv, t: t, values: out.rounds.map { Double($0.pagesSent) }))
        ctx.record(TimeSeries(name: "round_dirty_pages", unit: .pages, intervalS: iv, t: t, values: out.rounds.map { Double($0.dirtyPages) }))
        ctx.record(TimeSeries(name: "round_dirty_rate", unit: .pagesPerSecond, intervalS: iv, t: t, values: out.rounds.map(\.dirtyRate)))
        ctx.record(TimeSeries(name: "round_expected_downtime", unit: .s, intervalS: iv, t: t, values: out.rounds.map(\.expectedDowntime)))
        if let v = out.verdict {
            ctx.check("destination_checksum", expected: Double(out.sourceChecksum >> 11), observed: Double(v.destinationChecksum >> 11),
                      tolerance: 0, describe: "checksum of the destination equals the source's at stop time (top 53 bits)")
            if let m = v.mismatchedPages {
                ctx.check("destination_mismatched_pages", expected: 0, observed: Double(m), tolerance: 0,
                          describe: "every destination page equals the source page at stop time")
            }
        }
        if !out.converged {
            ctx.note("did not converge: the round limit (\(out.rounds.count) rounds) ended pre-copy with \(out.stopPages) pages dirty at stop-and-copy")
        }
        if let tr = tracker { ctx.note("dirty tracking: \(tr.mechanism)") }
    }

    /// What the encoder did: QEMU's xbzrle counters (cache hits, misses, overflow, bytes
    /// saved), zero pages, and zstd's ratio and CPU time.
    public static func recordEncoding(_ e: EncoderStats, decodeCPU: Double? = nil, pageSize: Int, ctx: RunContext) {
        ctx.record("encoded_pages", Double(e.pages), .pages, better: .none)
        ctx.record("encoding_ratio", e.inputBytes > 0 ? Double(e.outputBytes) / Double(e.inputBytes) : 1, .ratio, better: .lower)
        ctx.record("zero_pages", Double(e.zeroPages), .pages, better: .none)
        ctx.record("raw_pages", Double(e.rawPages), .pages, better: .none)
        ctx.record("xbzrle_pages", Double(e.xbzrlePages), .pages, better: .none)
        ctx.record("xbzrle_cache_hits", Double(e.xbzrleHits), .count, better: .higher)
        ctx.record("xbzrle_cache_misses", Double(e.xbzrleMisses), .count, better: .lower)
        ctx.record("xbzrle_overflows", Double(e.xbzrleOverflows), .count, better: .lower)
        ctx.record("xbzrle_unchanged", Double(e.xbzrleUnchanged), .count, better: .none)
        ctx.record("xbzrle_bytes_saved", Double(e.xbzrleBytesSaved), .bytes, better: .higher)
        ctx.record("compressed_pages", Double(e.zstdPages), .pages, better: .none)
        if e.zstdIn > 0 { ctx.record("compression_ratio", Double(e.zstdOut) / Double(e.zstdIn), .ratio, better: .lower) }
        ctx.record("encode_cpu_time", e.encodeCPU, .s, better: .lower)
        if e.encodeCPU > 0 { ctx.record("encode_rate", Double(e.inputBytes) / e.encodeCPU, .bytesPerSecond, better: .higher) }
        if let d = decodeCPU { ctx.record("decode_cpu_time", d, .s, better: .lower) }
    }

    /// Throttling: what was applied when, what it cost the workload, and whether it worked.
    public static func recordThrottle(_ rounds: [PrecopyRound], engagedAt: Double?, triggers: Int, throttledSeconds: Double,
                                      threads: Int, policy: ThrottlePolicy, ctx: RunContext) {
        guard policy.mode != .none else { return }
        ctx.record("throttle_triggers", Double(triggers), .count, better: .none)
        ctx.record("throttle_max_percent", Double(rounds.map(\.throttlePercent).max() ?? 0), .percent, better: .lower)
        if let t = engagedAt { ctx.record("throttle_engaged_at", t, .s, better: .none) }
        let span = rounds.last?.endTime ?? 0
        if span > 0 { ctx.record("throttle_sleep_fraction", throttledSeconds / (span * Double(max(threads, 1))), .ratio, better: .lower) }
        // The cost to the guest: its write rate while throttled against before (same run).
        let free = rounds.filter { $0.throttlePercent == 0 && !$0.dirtyLimited && $0.duration > 0 }
        let held = rounds.filter { ($0.throttlePercent > 0 || $0.dirtyLimited) && $0.duration > 0 }
        func rate(_ rs: [PrecopyRound]) -> Double {
            let d = rs.reduce(0.0) { $0 + $1.duration }
            return d > 0 ? rs.reduce(0.0) { $0 + $1.writeRate * $1.duration } / d : 0
        }
        if !free.isEmpty && !held.isEmpty && rate(free) > 0 {
            ctx.record("unthrottled_write_rate", rate(free), .pagesPerSecond, better: .none)
            ctx.record("throttled_write_rate", rate(held), .pagesPerSecond, better: .none)
            ctx.record("workload_slowdown", 1 - rate(held) / rate(free), .ratio, better: .lower)
        }
        let t = rounds.map(\.endTime)
        let iv = t.count > 1 ? (t.last! / Double(t.count)) : (t.first ?? 0)
        ctx.record(TimeSeries(name: "round_throttle_percent", unit: .percent, intervalS: iv, t: t, values: rounds.map { Double($0.throttlePercent) }))
        ctx.record(TimeSeries(name: "round_write_rate", unit: .pagesPerSecond, intervalS: iv, t: t, values: rounds.map(\.writeRate)))
        switch policy.mode {
        case .none: break
        case .autoConverge: ctx.note("auto-converge: trigger \(policy.triggerPercent) %, throttle \(policy.initial) % + \(policy.increment) % a trigger, at most \(policy.max) %; each workload thread sleeps pct/(100−pct) of a 10 ms timeslice")
        case .dirtyLimit: ctx.note("dirty-limit: trigger \(policy.triggerPercent) %, then each workload thread writes at most \(formatNumber(policy.dirtyLimitPagesPerSecond)) pages/s")
        }
    }

    func runDirtyScan(_ ctx: RunContext, _ p: Values) throws {
        let page = System.pageSize
        let region = try AnonymousMapping(length: p.size)
        let pages = region.length / page
        // Half the pages populated, half never touched: WP_UNPOPULATED must see both. Before
        // 6.4 synchronous write-protect only protects populated pages: populate them all.
        let usesSync = p.tracking == .wpSync || p.against == .wpSync
        if usesSync && !Self.hasWPUnpopulated {
            region.touch(stride: page, bytes: region.length)
            ctx.note("userfaultfd has no WP_UNPOPULATED here (before 6.4): every page populated before protecting")
        } else {
            region.touch(stride: page, bytes: region.length / 2)
        }
        let tracker = try makeTracker(p.tracking, base: region.base, length: region.length)
        defer { tracker.close() }
        try tracker.protectAll()
        let second = try p.against.tracking.map { try makeTracker($0, base: region.base, length: region.length) }
        defer { second?.close() }
        try second?.protectAll()
        var found: [Int] = []
        var found2: [Int] = []
        try tracker.collect(into: &found)
        try second?.collect(into: &found2)
        ctx.check("clean_after_protect", expected: 0, observed: Double(found.count + found2.count), tolerance: 0,
                  describe: "nothing is reported written right after protecting the region")
        var x: UInt64 = 0xD1B5_4A32_D192_ED03 &+ UInt64(ctx.repetition)
        let want = max(1, Int(Double(pages) * p.writtenFraction))
        var scanNS: [Double] = []
        for step in 1...2 {
            var written = Set<Int>()
            while written.count < want {
                x ^= x << 13; x ^= x >> 7; x ^= x << 17
                written.insert(Int(x % UInt64(pages)))
            }
            for w in written { (region.base + w * page + 8 * step).storeBytes(of: x, as: UInt64.self) }
            found.removeAll()
            let s = Clock.nanoseconds()
            try tracker.collect(into: &found)
            scanNS.append(Double(Clock.nanoseconds() - s))
            let foundSet = Set(found)
            ctx.check("step\(step)_pages_reported_twice", expected: 0, observed: Double(found.count - foundSet.count), tolerance: 0,
                      describe: "the tracker reports each written page once")
            ctx.check("step\(step)_missed_pages", expected: 0, observed: Double(written.subtracting(foundSet).count), tolerance: 0,
                      describe: "every written page is reported")
            ctx.check("step\(step)_extra_pages", expected: 0, observed: Double(foundSet.subtracting(written).count), tolerance: 0,
                      describe: "no page is reported that was not written")
            if let second {
                found2.removeAll()
                try second.collect(into: &found2)
                let other = Set(found2)
                ctx.check("step\(step)_against_missed_pages", expected: 0, observed: Double(written.subtracting(other).count), tolerance: 0,
                          describe: "the second tracker (\(p.against.rawValue)) reports every written page too")
                ctx.check("step\(step)_against_extra_pages", expected: 0, observed: Double(other.subtracting(written).count), tolerance: 0,
                          describe: "the second tracker reports no page that was not written")
                ctx.check("step\(step)_trackers_agree", expected: 0, observed: Double(foundSet.symmetricDifference(other).count), tolerance: 0,
                          describe: "\(p.tracking.rawValue) and \(p.against.rawValue) report the same pages for the same writes")
            }
            found.removeAll()
            found2.removeAll()
            try tracker.collect(into: &found)
            try second?.collect(into: &found2)
            ctx.check("step\(step)_rearmed", expected: 0, observed: Double(found.count + found2.count), tolerance: 0,
                      describe: "a second collect with no write in between reports nothing (re-protected)")
        }
        ctx.record("written_pages", Double(want), .pages, better: .none)
        ctx.record("scan_time", scanNS.reduce(0, +) / Double(scanNS.count), .ns, better: .lower)
        ctx.record("scan_time_per_page", scanNS.reduce(0, +) / Double(scanNS.count) / Double(pages), .ns, better: .lower)
        if let f = tracker.writeFaults ?? second?.writeFaults {
            ctx.record("write_faults", Double(f), .count, better: .none)
            ctx.check("write_faults", expected: Double(2 * want), observed: Double(f), tolerance: 0,
                      describe: "one synchronous write-protect fault per page written per step")
        }
        ctx.note("dirty tracking: \(tracker.mechanism)\(second.map { "; against: \($0.mechanism)" } ?? "")")
    }
}
