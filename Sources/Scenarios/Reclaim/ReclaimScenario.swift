#if canImport(Glibc)
import Glibc
#endif
import LabKit
import LinuxMM
import Workloads

/// Proactive reclaim and zswap writeback, the mechanisms where reclaim development is active:
/// DAMON-based reclaim (DAMOS pageout of cold regions), cgroup v2 `memory.reclaim`, the zswap
/// shrinker writing the pool back to the swap device, and zswap under a cgroup's
/// `memory.zswap.max`. Each repetition runs in a memory cgroup of its own (the runner's) with
/// swap allowed, against a swap file the runner makes for the run.
public struct ReclaimScenario: TypedScenario {
    public init() {}
    public let id = "reclaim"
    public let summary = "proactive reclaim: DAMON pageout of cold memory, memory.reclaim, the zswap shrinker's writeback, memory.zswap.max"

    public enum Variant: String, ScenarioVariant {
        case damon
        case zswapWriteback = "zswap-writeback"
        case memoryReclaim = "memory-reclaim"
        case zswapMax = "zswap-max"
        public var summary: String {
            switch self {
            case .damon: return "DAMOS pageout of a workload's cold part (DAMON vaddr, sysfs admin): memory given back against the hot part's slowdown"
            case .zswapWriteback: return "page a region into zswap, reclaim the cgroup with shrinker on|off: pages written back to the swap file, read-back latency from disk vs pool"
            case .memoryReclaim: return "cgroup v2 memory.reclaim of N bytes: reclaimed vs asked, pgscan/pgsteal from memory.stat, time"
            case .zswapMax: return "cgroup v2 memory.zswap.max caps the cgroup's pool: pages beyond it go to the swap file"
            }
        }
    }

    public struct Parameters: ParameterSet {
        public init() {}
        let pages = Parameter<Int>("pages", 256...1_048_576, default: 8192, unit: .pages, help: "zswap-writeback, memory-reclaim, zswap-max: region size in base pages")
        let hotPages = Parameter<Int>("hot_pages", 16...1_048_576, default: 2048, unit: .pages, help: "damon: pages the workload keeps touching")
        let coldPages = Parameter<Int>("cold_pages", 256...1_048_576, default: 16384, unit: .pages, help: "damon: pages touched once, then left cold")
        let pattern = Parameter<FillPattern>("pattern", default: .text, help: "page contents (entropy): zero, repetitive, text, random")
        let swapSize = Parameter<Int>("swap_size", (16 << 20)...(64 << 30), default: 256 << 20, unit: .bytes, help: "size of the swap file memlab creates for the run")
        let compressor = Parameter<TmemScenario.Compressor>("compressor", default: .lzo, help: "zswap-writeback, zswap-max: zswap compressor (borrowed)")
        let maxPoolPercent = Parameter<Int>("max_pool_percent", 1...100, default: 20, unit: .percent, help: "zswap-writeback, zswap-max: zswap pool limit in percent of RAM (borrowed)")
        let pageCluster = Parameter<Int>("page_cluster", 0...6, default: 0, unit: .none, help: "vm.page-cluster (borrowed): 0 = no swap readahead, so each first touch is one page's swap-in")
        let shrinker = Parameter<Bool>("shrinker", default: true, help: "zswap-writeback: zswap shrinker_enabled (borrowed)")
        let reclaimRounds = Parameter<Int>("reclaim_rounds", 1...64, default: 2, unit: .count, help: "zswap-writeback: proactive reclaim passes over the cgroup (v2 memory.reclaim of pass_bytes, v1 memory.force_empty)")
        let passBytes = Parameter<Int>("pass_bytes", 4096...(64 << 30), default: 4 << 20, unit: .bytes, help: "zswap-writeback: bytes each cgroup v2 reclaim pass asks of memory.reclaim (v1 memory.force_empty reclaims what it can)")
        let reclaimBytes = Parameter<Int>("reclaim_bytes", 4096...(64 << 30), default: 16 << 20, unit: .bytes, help: "memory-reclaim: bytes asked of memory.reclaim")
        let zswapMax = Parameter<Int>("zswap_max", 0...(64 << 30), default: 4 << 20, unit: .bytes, help: "zswap-max: the cgroup's memory.zswap.max")
        let durationS = Parameter<Double>("duration_s", 1...600, default: 8, unit: .s, help: "damon: how long DAMON runs against the workload")
        let baselineS = Parameter<Double>("baseline_s", 0.5...60, default: 2, unit: .s, help: "damon: how long the hot part's access rate is measured before DAMON starts")
        let sampleMs = Parameter<Int>("sample_ms", 1...1000, default: 5, unit: .ms, help: "damon: sampling interval")
        let aggrMs = Parameter<Int>("aggr_ms", 10...10_000, default: 100, unit: .ms, help: "damon: aggregation interval (access counts per region are per this interval)")
        let minAgeS = Parameter<Double>("min_age_s", 0.1...60, default: 2, unit: .s, help: "damon: a region must be unaccessed this long before DAMOS pages it out")
    }

    /// The region the swap area must hold.
    func swappedPages(_ variant: Variant, _ p: Values) -> Int {
        variant == .damon ? p.coldPages + p.hotPages : p.pages
    }

    public func probe(_ variant: Variant) -> Availability {
        if MemoryCgroupMount.detect().isEmpty {
            return .unusable("needs a memory cgroup controller (cgroup v1 'memory' or v2 with +memory); none is mounted")
        }
        switch variant {
        case .damon:
            if let why = Damon.unavailableReason() { return .unusable(why) }
        case .zswapWriteback:
            if !Zswap.isAvailable { return .unusable("zswap is not available: /sys/module/zswap missing (kernel built without CONFIG_ZSWAP)") }
            if !Zswap.shrinkerEnabled.exists { return .unusable("\(Zswap.shrinkerEnabled.path) is missing: the zswap shrinker came with Linux 6.8") }
        case .memoryReclaim:
            if let why = MemoryCgroup.v2UnavailableReason(file: "memory.reclaim") { return .unusable(why) }
        case .zswapMax:
            if !Zswap.isAvailable { return .unusable("zswap is not available: /sys/module/zswap missing (kernel built without CONFIG_ZSWAP)") }
            if let why = MemoryCgroup.v2UnavailableReason(file: "memory.zswap.max") { return .unusable(why) }
        }
        return .usable
    }

    public func validate(_ variant: Variant, _ p: Values) throws(UsageError) {
        let region = swappedPages(variant, p) * System.pageSize
        if region + (8 << 20) > p.swapSize {
            throw UsageError("swap_size (\(p.swapSize) bytes) must exceed the region (\(swappedPages(variant, p)) pages x \(System.pageSize)) by 8 MiB")
        }
        if variant == .damon {
            if p.sampleMs > p.aggrMs { throw UsageError("sample_ms (\(p.sampleMs)) must not exceed aggr_ms (\(p.aggrMs)): DAMON samples several times per aggregation interval") }
            if p.minAgeS * 1000 < Double(p.aggrMs) { throw UsageError("min_age_s (\(p.minAgeS)) must be at least one aggregation interval (aggr_ms \(p.aggrMs))") }
            if p.durationS <= p.minAgeS { throw UsageError("duration_s (\(p.durationS)) must exceed min_age_s (\(p.minAgeS)): nothing is cold before that") }
        }
    }

    public func settings(_ variant: Variant, _ p: Values) -> [KnobSetting] {
        var s = [KnobSetting(Overcommit.pageCluster, String(p.pageCluster))]
        guard Zswap.isAvailable else { return s }
        switch variant {
        case .zswapWriteback, .zswapMax:
            s.append(KnobSetting(Zswap.compressor, p.compressor.rawValue))
            s.append(KnobSetting(Zswap.maxPoolPercent, String(p.maxPoolPercent)))
            if variant == .zswapWriteback && Zswap.shrinkerEnabled.exists {
                s.append(KnobSetting(Zswap.shrinkerEnabled, p.shrinker ? "Y" : "N"))
            }
            s.append(KnobSetting(Zswap.enabled, "Y"))
        case .damon, .memoryReclaim:
            // Reclaimed pages go to the swap file, so memory given back is memory freed.
            s.append(KnobSetting(Zswap.enabled, "N"))
        }
        return s
    }

    /// A roomy cgroup of the child's own: reclaim is asked for, never forced by the limit.
    public func memoryLimit(_ variant: Variant, _ p: Values) -> Int? {
        max(1 << 30, 4 * swappedPages(variant, p) * System.pageSize)
    }

    public func memoryLimitAllowsSwap(_ variant: Variant, _ p: Values) -> Bool { true }

    /// A minute and more per 10 000 pages: filling, paging out and (zswap-writeback) a
    /// vmstat read after every timed fault are linear in the region.
    public func deadline(_ variant: Variant, _ p: Values) -> Double {
        let perPages = Double(swappedPages(variant, p)) / 5000
        return (variant == .damon ? p.baselineS + p.durationS : 0) + 120 + perPages
    }

    /// The runner makes the swap file (journaled by the guard before it exists) and, for
    /// damon, adds the kdamond the child configures against its own pid.
    public func prepare(_ variant: Variant, _ p: Values, settingsGuard: SettingsGuard) throws {
        try settingsGuard.borrowSwapFile(bytes: p.swapSize, priority: TmemScenario.swapPriority)
        if variant == .damon {
            if let why = Damon.unavailableReason() { throw ScenarioError.skipped(why) }
            _ = try settingsGuard.addKdamond()
        }
    }

    public func run(_ ctx: RunContext, _ variant: Variant, _ p: Values) throws {
        guard let cg = MemoryCgroup.current(), cg.path.contains("/memlab-") else {
            throw ScenarioError.failed("the child is not in a memlab memory cgroup (/proc/self/cgroup)")
        }
        let (ours, others) = TmemScenario.swapAreas()
        guard let area = ours.first else { throw ScenarioError.failed("no memlab swap area is active (/proc/swaps)") }
        if !others.isEmpty {
            ctx.note("other swap areas are active (\(others.map(\.path).joined(separator: ", "))); memlab's (\(area.path)) has priority \(TmemScenario.swapPriority) and is used first")
        }
        switch variant {
        case .damon: try runDamon(ctx, p, cgroup: cg)
        case .zswapWriteback: try runWriteback(ctx, p, cgroup: cg)
        case .memoryReclaim: try runMemoryReclaim(ctx, p, cgroup: cg)
        case .zswapMax: try runZswapMax(ctx, p, cgroup: cg)
        }
    }

    /// Fills a fresh region of `pages` with `pattern` (seeded by the repetition).
    static func filledRegion(pages: Int, pattern: FillPattern, seed: UInt64) throws -> AnonymousMapping {
        let page = System.pageSize
        let region = try AnonymousMapping(length: pages * page, kind: .base)
        let base = region.base.assumingMemoryBound(to: UInt8.self)
        for i in 0..<pages { pattern.fill(base + i * page, pageSize: page, index: i, seed: seed) }
        return region
    }

    /// Pages of the region whose contents are as written.
    static func intactPages(_ region: AnonymousMapping, pattern: FillPattern, seed: UInt64) -> Int {
        let page = System.pageSize
        let base = region.base.assumingMemoryBound(to: UInt8.self)
        let scratch = UnsafeMutablePointer<UInt8>.allocate(capacity: page)
        defer { scratch.deallocate() }
        var intact = 0
        for i in 0..<region.pageCount where pattern.verify(base + i * page, scratch: scratch, pageSize: page, index: i, seed: seed) { intact += 1 }
        return intact
    }

    /// Waits (at most 10 s) until no page is under writeback (meminfo Writeback).
    static func waitForWriteback() {
        let w0 = Clock.nanoseconds()
        while ((try? MemInfo.current())?["Writeback"] ?? 0) > 0 && Clock.seconds(since: w0) < 10 { Clock.sleep(nanoseconds: 2_000_000) }
    }

    /// One proactive reclaim pass over the child's own cgroup: v2 memory.reclaim of `bytes`,
    /// v1 memory.force_empty (reclaims all it can; the cgroup keeps its tasks).
    static func reclaimPass(_ cg: MemoryCgroup, bytes: Int) {
        if cg.version == 2 { _ = try? cg.reclaim(bytes: bytes) } else { try? ProcFile.write("\(cg.path)/memory.force_empty", "0") }
    }
}
