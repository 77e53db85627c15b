#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import Histogram
import LabKit
import LinuxMM
import Workloads

/// tmem's living heir: zswap (a compressed cache in front of swap), against a plain swap
/// file and zram; and the virtualization question — how many guests fit in a memory limit
/// with nothing, KSM, zswap, or both.
public struct TmemScenario: TypedScenario {
    public init() {}
    public let id = "tmem"
    public let summary = "zswap vs swap file vs zram: compression, pool, swap-in latency; guest density with KSM and zswap"

    public enum Variant: String, ScenarioVariant {
        case zswap, density
        public var summary: String {
            switch self {
            case .zswap: return "page out a region of chosen entropy (MADV_PAGEOUT) to backend zswap|swapfile|zram; compression ratio, pool, swap-in latency"
            case .density: return "K guests (shared base + private pages) in one memory cgroup limit, with mechanism none|ksm|zswap|ksm_zswap: how many fit"
            }
        }
    }

    /// zswap: where paged-out pages go.
    public enum Backend: String, CaseIterable, ParameterChoice { case zswap, swapfile, zram }
    /// zswap's compressor and zram's comp_algorithm.
    public enum Compressor: String, CaseIterable, ParameterChoice {
        case lzo, lzoRLE = "lzo-rle", lz4, lz4hc, zstd, deflate, nx842 = "842"
    }
    /// density: what helps the guests fit.
    public enum Mechanism: String, CaseIterable, ParameterChoice {
        case none, ksm, zswap, ksmZswap = "ksm_zswap"
        var usesKSM: Bool { self == .ksm || self == .ksmZswap }
        var usesZswap: Bool { self == .zswap || self == .ksmZswap }
    }

    public static let swapPriority = 32000

    public struct Parameters: ParameterSet {
        public init() {}
        let backend = Parameter<Backend>("backend", default: .zswap, help: "zswap: where paged-out pages go: zswap in front of a swap file, the swap file alone, or a zram device")
        let pattern = Parameter<FillPattern>("pattern", default: .text, help: "zswap: page contents (entropy): zero, repetitive, text, random")
        let pages = Parameter<Int>("pages", 256...1_048_576, default: 16384, unit: .pages, help: "zswap: region size in base pages")
        let swapSize = Parameter<Int>("swap_size", (16 << 20)...(64 << 30), default: 256 << 20, unit: .bytes, help: "size of the swap file or zram device memlab creates for the run")
        let compressor = Parameter<Compressor>("compressor", default: .lzo, help: "zswap compressor (borrowed) and zram comp_algorithm")
        let maxPoolPercent = Parameter<Int>("max_pool_percent", 1...100, default: 20, unit: .percent, help: "zswap pool limit in percent of RAM (borrowed)")
        let pageCluster = Parameter<Int>("page_cluster", 0...6, default: 0, unit: .none, help: "vm.page-cluster (borrowed): 0 = no swap readahead, so each first touch is one page's swap-in")
        let mechanism = Parameter<Mechanism>("mechanism", default: Mechanism.none, help: "density: what helps the guests fit")
        let guests = Parameter<Int>("guests", 1...64, default: 6, unit: .count, help: "density: number of guest processes")
        let guestSize = Parameter<Int>("guest_size", (1 << 20)...(4 << 30), default: 32 << 20, unit: .bytes, help: "density: memory image of each guest")
        let sharedRatio = Parameter<Double>("shared_ratio", 0...1, default: 0.8, unit: .ratio, help: "density: fraction of each image identical in every guest (the 'base image')")
        let privatePattern = Parameter<FillPattern>("private_pattern", default: .text, help: "density: contents of the private pages")
        let limit = Parameter<Int>("limit", (8 << 20)...(1 << 40), default: 128 << 20, unit: .bytes, help: "density: memory cgroup limit for all guests together")
        let durationS = Parameter<Double>("duration_s", 0.5...600, default: 3, unit: .s, help: "density: how long the guests run after the last one started")
        let settleS = Parameter<Double>("settle_s", 0...60, default: 3, unit: .s, help: "density: at most this long after each guest to let ksmd merge it")
        let passSleepMs = Parameter<Int>("pass_sleep_ms", 0...10_000, default: 50, unit: .ms, help: "density: a guest's pause between passes over its image")
        let pagesToScan = Parameter<Int>("pages_to_scan", 1...100_000, default: 4000, unit: .pages, help: "density with ksm: ksmd pages per wake-up (borrowed)")
        let sleepMillisecs = Parameter<Int>("sleep_millisecs", 0...10_000, default: 10, unit: .ms, help: "density with ksm: ksmd sleep between wake-ups (borrowed)")
    }

    func usesKSM(_ variant: Variant, _ p: Values) -> Bool { variant == .density && p.mechanism.usesKSM }
    func usesZswap(_ variant: Variant, _ p: Values) -> Bool {
        variant == .zswap ? p.backend == .zswap : p.mechanism.usesZswap
    }
    func needsSwap(_ variant: Variant, _ p: Values) -> Bool { variant == .zswap || usesZswap(variant, p) }

    public func probe(_ variant: Variant) -> Availability {
        if variant == .density && MemoryCgroupMount.detect().isEmpty {
            return .unusable("needs a memory cgroup controller (cgroup v1 'memory' or v2 with +memory); none is mounted")
        }
        return .usable
    }

    public func validate(_ variant: Variant, _ params: Values) throws(UsageError) {
        if variant == .zswap && params.pages * System.pageSize + (8 << 20) > params.swapSize {
            throw UsageError("swap_size (\(params.swapSize) bytes) must exceed the region (pages x \(System.pageSize)) by 8 MiB")
        }
    }

    public func settings(_ variant: Variant, _ params: Values) -> [KnobSetting] {
        var s: [KnobSetting] = []
        if needsSwap(variant, params) { s.append(KnobSetting(Overcommit.pageCluster, String(params.pageCluster))) }
        if Zswap.isAvailable {
            if usesZswap(variant, params) {
                s.append(KnobSetting(Zswap.compressor, params.compressor.rawValue))
                s.append(KnobSetting(Zswap.maxPoolPercent, String(params.maxPoolPercent)))
                s.append(KnobSetting(Zswap.enabled, "Y"))
            } else {
                s.append(KnobSetting(Zswap.enabled, "N"))
            }
        }
        if usesKSM(variant, params) {
            s.append(KnobSetting(KSM.Knobs.pagesToScan, String(params.pagesToScan)))
            s.append(KnobSetting(KSM.Knobs.sleepMillisecs, String(params.sleepMillisecs)))
            s.append(KnobSetting(KSM.Knobs.run, "1"))
        }
        return s
    }

    /// density: the guests' limit. zswap: a roomy cgroup of the child's own, so that the
    /// swap cache can be emptied (memory.force_empty / memory.reclaim) before swap-in is timed.
    public func memoryLimit(_ variant: Variant, _ params: Values) -> Int? {
        variant == .density ? params.limit : max(1 << 30, 4 * params.pages * System.pageSize)
    }

    /// Both variants page out on purpose: the cgroup's swap is not capped.
    public func memoryLimitAllowsSwap(_ variant: Variant, _ params: Values) -> Bool { true }

    public func deadline(_ variant: Variant, _ params: Values) -> Double {
        if variant == .density {
            return params.durationS + Double(params.guests) * (params.settleS + 10) + 60
        }
        return 120
    }

    /// The runner (parent) makes the swap area: a swap file in the state directory, or a
    /// zram device of our own — each journaled by the guard before it exists.
    public func prepare(_ variant: Variant, _ params: Values, settingsGuard: SettingsGuard) throws {
        if variant == .zswap || usesZswap(variant, params) || usesKSM(variant, params) {
            if usesZswap(variant, params), !Zswap.isAvailable {
                throw ScenarioError.skipped("zswap is not available: /sys/module/zswap missing (kernel built without CONFIG_ZSWAP)")
            }
        }
        if usesKSM(variant, params), !KSM.isAvailable {
            throw ScenarioError.skipped("KSM is not available: /sys/kernel/mm/ksm is missing (kernel built without CONFIG_KSM)")
        }
        guard needsSwap(variant, params) else { return }
        let size = params.swapSize
        if variant == .zswap && params.backend == .zram {
            if let why = Zram.unavailableReason { throw ScenarioError.skipped(why) }
            let id = try settingsGuard.addZramDevice()
            try Zram.configure(id, bytes: size, algorithm: params.compressor.rawValue)
            try Swap.makeSwapDevice(path: Zram.device(id), bytes: size)
            try settingsGuard.activateSwap(Zram.device(id), priority: TmemScenario.swapPriority)
            return
        }
        try settingsGuard.borrowSwapFile(bytes: size, priority: TmemScenario.swapPriority)
    }

    /// A swap file of `bytes` in the state directory, made and activated through the guard
    /// (journaled before it exists); skipped with the reason where the file system cannot
    /// hold one. The tmem and reclaim scenarios page out to it.
    public func run(_ ctx: RunContext, _ variant: Variant, _ p: Values) throws {
        switch variant {
        case .zswap: try runSwap(ctx, p)
        case .density: try runDensity(ctx, p)
        }
    }

    // MARK: counters

    struct Counters {
        var vm: VMStat
        var mem: MemInfo
        var debug: [String: Int64]?
        var zram: Zram.MMStat?

        static func take(zram: Int?) throws -> Counters {
            Counters(vm: try VMStat.current(), mem: try MemInfo.current(), debug: Zswap.debugCounters(), zram: zram.flatMap(Zram.mmStat))
        }

        func vm(_ name: String, since b: Counters) -> Double { Double(Int64(vm[name] ?? 0) - Int64(b.vm[name] ?? 0)) }
        func mem(_ name: String, since b: Counters) -> Double { Double(Int64(mem[name] ?? 0) - Int64(b.mem[name] ?? 0)) }
    }

    /// The swap areas the runner made for this run (by their priority), and any others.
    static func swapAreas() -> (ours: [Swap.Area], others: [Swap.Area]) {
        let text = ProcFile.readIfPresent("/proc/swaps") ?? ""
        var ours: [String] = []
        for line in text.split(separator: "\n").dropFirst() {
            let f = line.split(whereSeparator: { $0 == " " || $0 == "\t" })
            if f.count >= 5, Int(f[4]) == swapPriority { ours.append(String(f[0])) }
        }
        let all = Swap.areas(text: text)
        return (all.filter { ours.contains($0.path) }, all.filter { !ours.contains($0.path) })
    }

    // MARK: zswap

    func runSwap(_ ctx: RunContext, _ p: Values) throws {
        let page = System.pageSize
        let backend = p.backend
        let pattern = p.pattern
        let (ours, others) = TmemScenario.swapAreas()
        guard let area = ours.first else { throw ScenarioError.failed("no memlab swap area is active (/proc/swaps)") }
        if !others.isEmpty {
            ctx.note("other swap areas are active (\(others.map(\.path).joined(separator: ", "))); memlab's has priority \(TmemScenario.swapPriority) and is used first")
        }
        let zramID = Zram.id(ofSwapPath: area.path)
        let zswapOn = (try? Zswap.enabled.read()) == "Y"
        guard zswapOn == (backend == .zswap) else {
            throw ScenarioError.failed("zswap enabled reads \(zswapOn ? "Y" : "N"), not what backend=\(backend.rawValue) borrowed")
        }

        let pages = p.pages
        let seed = 0x7473_776170 &+ UInt64(ctx.repetition)
        let region = try AnonymousMapping(length: pages * page, kind: .base)
        let base = region.base.assumingMemoryBound(to: UInt8.self)
        for i in 0..<pages { pattern.fill(base + i * page, pageSize: page, index: i, seed: seed) }

        let before = try Counters.take(zram: zramID)
        let t0 = Clock.nanoseconds()
        try region.advise(memlab_MADV_PAGEOUT, name: "MADV_PAGEOUT")
        let pageoutTime = Clock.seconds(since: t0)
        let after = try Counters.take(zram: zramID)
        let residency = try PageFlags.residency(region.base, length: region.length)

        // A swap file is written asynchronously: its pages stay in the swap cache after the
        // write, and touching them then is a minor fault, not a read. Wait for writeback and
        // reclaim this cgroup's swap cache so the timed touches read from the backend.
        let cachedBefore = Double(try MemInfo.current()["SwapCached"] ?? 0) / Double(page)
        let w0 = Clock.nanoseconds()
        while (try MemInfo.current()["Writeback"] ?? 0) > 0 && Clock.seconds(since: w0) < 10 { Clock.sleep(nanoseconds: 2_000_000) }
        if let cg = MemoryCgroup.current(), cg.path.contains("/memlab-") {
            if cg.version == 1 { try? ProcFile.write("\(cg.path)/memory.force_empty", "0") }
            else { try? ProcFile.write("\(cg.path)/memory.reclaim", String(region.length)) }
        }
        let cachedAfter = Double(try MemInfo.current()["SwapCached"] ?? 0) / Double(page)
        ctx.record("swap_cached_after_pageout", cachedBefore, .pages, better: .none)
        ctx.record("swap_cached_before_swapin", cachedAfter, .pages, better: .none)

        let swapped = Double(residency.swapped)
        let zswpout = after.vm("zswpout", since: before)
        let pswpout = after.vm("pswpout", since: before)
        let writtenBack = after.vm("zswpwb", since: before)
        let toDevice = pswpout - writtenBack
        let zeroFilled = max(0, swapped - zswpout - toDevice)
        ctx.record("pages", Double(pages), .pages, better: .none)
        ctx.record("swapped_out_pages", swapped, .pages, better: .higher)
        ctx.record("pageout_time", pageoutTime, .s, better: .lower)
        if pageoutTime > 0 { ctx.record("pageout_rate", swapped / pageoutTime, .pagesPerSecond, better: .higher) }
        ctx.record("zero_filled_pages", zeroFilled, .pages, better: .none)
        // 6.12+: zero pages are counted where they are caught, not inferred.
        if after.vm["swpout_zero"] != nil { ctx.record("swpout_zero_pages", after.vm("swpout_zero", since: before), .pages, better: .none) }
        ctx.record("swap_device_writes", pswpout, .pages, better: .none)

        if backend == .zswap {
            let pool = after.mem("Zswap", since: before)
            let stored = after.mem("Zswapped", since: before)
            let totalPool = Double(after.mem["Zswap"] ?? 0)
            let limit = Double(after.mem.memTotal) * Double(p.maxPoolPercent) / 100
            ctx.record("stored_pages", zswpout, .pages, better: .none)
            ctx.record("stored_bytes", stored, .bytes, better: .none)
            ctx.record("pool_bytes", pool, .bytes, better: .lower)
            ctx.record("pool_limit", limit, .bytes, better: .none)
            ctx.record("pool_percent_of_limit", totalPool / limit * 100, .percent, better: .none)
            if pool > 0 { ctx.record("compression_ratio", stored / pool, .ratio, better: .higher) }
            ctx.record("rejected_to_swap_file", toDevice, .pages, better: .none)
            ctx.record("written_back_pages", writtenBack, .pages, better: .none)
            if let d0 = before.debug, let d1 = after.debug {
                for name in ["reject_compress_poor", "reject_compress_fail", "reject_alloc_fail", "reject_kmemcache_fail", "reject_reclaim_fail", "pool_limit_hit", "written_back_pages", "stored_incompressible_pages"] {
                    if let a = d1[name], let b = d0[name] { ctx.record("debugfs_\(name)", Double(a - b), .pages, better: .none) }
                }
                if let inc = d1["stored_incompressible_pages"] { ctx.record("incompressible_pages", Double(inc - (d0["stored_incompressible_pages"] ?? 0)), .pages, better: .none) }
            } else {
                // On this kernel zswap's own counters of incompressible and rejected pages
                // exist only in debugfs; memlab does not mount it (a machine-wide change).
                let vmHas = ["zswpout", "zswpin", "zswpwb", "swpout_zero"].filter { before.vm[$0] != nil }
                ctx.note("debugfs is not mounted (\(Zswap.debugDirectory) absent; memlab does not mount it): zswap's incompressible and reject counters (stored_incompressible_pages, reject_compress_poor, reject_compress_fail, reject_alloc_fail, reject_reclaim_fail, pool_limit_hit) come only from debugfs here and are not reported; what /proc/vmstat offers is used instead (\(vmHas.joined(separator: ", "))): pages zswap did not keep show as rejected_to_swap_file (pswpout - zswpwb)")
            }
            ctx.check("stored_bytes", expected: zswpout * Double(page), observed: stored, tolerance: max(8 * Double(page), zswpout * Double(page) * 0.01),
                      describe: "Zswapped (meminfo) = zswpout (vmstat) x page size, 1%")
            if pattern == .zero {
                ctx.check("zero_filled_pages", expected: swapped, observed: zeroFilled, tolerance: max(2, swapped * 0.01),
                          describe: "zero pages never reach zswap or the device (swap zeromap), 1%")
            } else if pattern == .random && pool > 0 {
                ctx.check("compression_ratio", expected: 1, observed: stored / pool, accepted: 0.9...1.1,
                          describe: "random data does not compress: near 1 (or rejected to the swap file)")
            } else if pattern == .text || pattern == .repetitive {
                ctx.check("compression_ratio", expected: 2, observed: pool > 0 ? stored / pool : 0, accepted: 1.2...1e9,
                          describe: "compressible data: ratio above 1.2")
            }
        } else if backend == .zram, let z0 = before.zram, let z1 = after.zram {
            let orig = Double(z1.origDataBytes - z0.origDataBytes)
            let compr = Double(z1.comprDataBytes - z0.comprDataBytes)
            ctx.record("stored_bytes", orig, .bytes, better: .none)
            ctx.record("pool_bytes", Double(z1.memUsedBytes - z0.memUsedBytes), .bytes, better: .lower)
            if compr > 0 { ctx.record("compression_ratio", orig / compr, .ratio, better: .higher) }
            ctx.record("incompressible_pages", Double(z1.hugePages - z0.hugePages), .pages, better: .none)
            ctx.check("stored_bytes", expected: pswpout * Double(page), observed: orig, tolerance: max(8 * Double(page), pswpout * Double(page) * 0.01),
                      describe: "zram orig_data_size = pswpout x page size, 1%")
        } else {
            ctx.check("swap_device_writes", expected: swapped - zeroFilled, observed: pswpout, tolerance: max(2, swapped * 0.01),
                      describe: "every non-zero page written to the swap file, 1%")
        }
        ctx.check("swapped_out_pages", expected: Double(pages), observed: swapped, tolerance: max(2, Double(pages) * 0.01),
                  describe: "pagemap swap bit after MADV_PAGEOUT, 1%")

        // Swap-in: time the first touch of each page (a read fault), one clock read a page.
        var h = Histogram<UInt64>(highestTrackableValue: 60_000_000_000, numberOfSignificantValueDigits: .three)
        var total: UInt64 = 0
        var sink: UInt8 = 0
        let beforeIn = try Counters.take(zram: zramID)
        var t = Clock.nanoseconds()
        for i in 0..<pages {
            sink &+= memlab_read_byte(base + i * page + 100)
            let n = Clock.nanoseconds()
            _ = h.record(n &- t)
            total &+= n &- t
            t = n
        }
        let afterIn = try Counters.take(zram: zramID)
        ctx.record("swapin_latency_mean", Double(total) / Double(pages), .ns, better: .lower)
        ctx.recordLatency("swapin_latency", h)
        let fromDevice = afterIn.vm("pswpin", since: beforeIn)
        let fromZswap = afterIn.vm("zswpin", since: beforeIn)
        ctx.record("swapin_from_zswap", fromZswap, .pages, better: .none)
        ctx.record("swapin_from_device", fromDevice, .pages, better: .none)
        ctx.check("swapins_counted", expected: swapped - zeroFilled, observed: fromDevice + fromZswap, tolerance: max(2, swapped * 0.02),
                  describe: "every non-zero page read back from zswap or the device (pswpin + zswpin), 2%; less means swap cache hits")
        blackHole(sink)

        // Every page must come back as it was written.
        let scratch = UnsafeMutablePointer<UInt8>.allocate(capacity: page)
        defer { scratch.deallocate() }
        var intact = 0
        for i in 0..<pages where pattern.verify(base + i * page, scratch: scratch, pageSize: page, index: i, seed: seed) { intact += 1 }
        ctx.check("pages_intact", expected: Double(pages), observed: Double(intact), tolerance: 0, describe: "exact: contents after swap-in")
        ctx.note("zswap: backend \(backend.rawValue) (\(area.path)), pattern \(pattern.rawValue), \(pages) pages; swap-in timed per page on first touch with page-cluster \(p.pageCluster)")
    }
}


/// Keeps a value computed from timed loads alive, so the loads are not optimised away.
@inline(never) func blackHole(_ x: UInt8) { _ = x }

// Workloads' fill patterns as a parameter's choices (Workloads does not know LabKit).
extension FillPattern: ParameterChoice {}
