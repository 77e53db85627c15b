#if canImport(Glibc)
import Glibc
#endif
import LabKit
import LinuxMM
import Workloads

/// Huge pages: what each page size costs to fault and how far it reaches before the TLB gives
/// out (THP, mTHP sizes, hugetlb 2M/1G), what MADV_COLLAPSE and khugepaged really do, how
/// THP bloats sparse memory, what splitting costs, and how hugetlb pools reserve and fail.
/// Every result reads back what actually backed the memory: asking is not getting.
public struct HugePagesScenario: Scenario {
    public init() {}
    public let id = "hugepages"
    public let summary = "THP, mTHP and hugetlb: fault cost, TLB reach, collapse, bloat, split, pool reservations"
    public let variants = [
        Variant("fault", "first-touch throughput and per-fault latency for one page size; huge_coverage read back"),
        Variant("tlb", "pointer-chase latency per working-set size (TLB reach) and random-update cost"),
        Variant("collapse", "4K-faulted memory collapsed by MADV_COLLAPSE or by khugepaged: time and cost per 2M"),
        Variant("bloat", "sparse touches under THP vs 4K: RSS inflation, and khugepaged's max_ptes_none"),
        Variant("split", "partial munmap/mprotect inside THPs: split counts and their cost"),
        Variant("hugetlb-reserve", "hugetlb pool: Rsvd at mmap vs fault, ENOMEM when short, SIGBUS with MAP_NORESERVE, surplus pages"),
    ]

    /// One `mthp-<kB>k` kind per anonymous folio size this kernel offers (a
    /// hugepages-<size>kB directory with an `enabled` control), 2M excepted: that one is `thp`.
    static var mthpKinds: [String] {
        THP.anonymousSizes.filter { $0 != 2 << 20 }.map { "mthp-\($0 / 1024)k" }
    }
    /// The names accepted: the sizes x86-64 kernels offer with 4K pages (16K–1M) and whatever
    /// this kernel offers besides. A known size this kernel lacks is `skipped` with the reason
    /// (probe), so one scenario file runs on older kernels too; a name no kernel has
    /// (`mthp-3k`) is refused at parse time (exit 2).
    static var mthpNames: [String] {
        let standard = [16, 32, 64, 128, 256, 512, 1024].map { "mthp-\($0)k" }
        return standard + mthpKinds.filter { !standard.contains($0) }
    }
    static var kinds: [String] { ["4k", "thp"] + mthpNames + ["hugetlb-2m", "hugetlb-1g"] }

    public let parameters: [ParameterSpec] = [
        ParameterSpec("kind", .choice(HugePagesScenario.kinds), default: .string("thp"), help: "page size asked for (fault, tlb): 4k, thp (2M), mthp-<kB>k for each anonymous mTHP size this kernel offers (here: \(HugePagesScenario.mthpKinds.isEmpty ? "none; mTHP needs 6.8+" : HugePagesScenario.mthpKinds.joined(separator: ", "))), hugetlb-2m, hugetlb-1g"),
        ParameterSpec("size", .size((2 << 20)...(64 << 30)), default: .int(64 << 20), help: "bytes of the region (fault, collapse, bloat, split); hugetlb-1g rounds up to 1G"),
        ParameterSpec("prewarm", .bool, default: .bool(true), help: "touch and free the same amount first, so the VM's lazy host backing is not timed"),
        ParameterSpec("max_working_set", .size((64 << 10)...(16 << 30)), default: .int(256 << 20), help: "tlb: largest working set; sizes go 16K, 64K, … ×4 up to it"),
        ParameterSpec("accesses", .int(1000...1_000_000_000), default: .int(1_000_000), help: "tlb: dependent loads timed per working-set size"),
        ParameterSpec("method", .choice(["madv_collapse", "khugepaged"]), default: .string("madv_collapse"), help: "collapse: synchronous MADV_COLLAPSE or waiting for khugepaged"),
        ParameterSpec("stride_pages", .int(1...512), default: .int(64), help: "bloat: touch one 4K page in every N"),
        ParameterSpec("max_ptes_none", .int(0...511), default: .int(511), help: "bloat/collapse: khugepaged/max_ptes_none (borrowed)"),
        ParameterSpec("operation", .choice(["munmap", "mprotect"]), default: .string("munmap"), help: "split: what is done to one 4K page inside each THP"),
        ParameterSpec("pool_pages", .int(2...4096), default: .int(8), help: "hugetlb-reserve: pool size in huge pages (borrowed nr_hugepages)"),
        ParameterSpec("overcommit_pages", .int(0...4096), default: .int(2), help: "hugetlb-reserve: surplus pages allowed (borrowed nr_overcommit_hugepages)"),
        ParameterSpec("huge_size", .choice(["2m", "1g"]), default: .string("2m"), help: "hugetlb-reserve: which pool"),
        ParameterSpec("node", .int(-1...1023), default: .int(-1), help: "hugetlb-reserve: size the pool on this NUMA node only (node<N>/hugepages/.../nr_hugepages, borrowed); -1: the machine-wide nr_hugepages, spread by the kernel"),
        ParameterSpec("timeout_s", .double(1...3600), default: .double(60), help: "give up waiting for khugepaged after this long"),
    ]

    // MARK: what a kind means

    enum Kind: Equatable {
        case base, thp, mthp(Int), hugetlb(Int)

        init(_ name: String) {
            switch name {
            case "4k": self = .base
            case "thp": self = .thp
            case "hugetlb-2m": self = .hugetlb(2 << 20)
            case "hugetlb-1g": self = .hugetlb(1 << 30)
            // A name the choice list let through; a malformed one becomes size 0, which no
            // kernel offers, so probe() skips it with a reason rather than crashing.
            default: self = .mthp((Int(name.dropFirst("mthp-".count).dropLast()) ?? 0) * 1024)
            }
        }

        /// The unit one fault maps.
        var unit: Int {
            switch self {
            case .base: return 4096
            case .thp: return 2 << 20
            case .mthp(let b), .hugetlb(let b): return b
            }
        }

        var pageKind: PageKind {
            switch self {
            case .base: return .base
            case .thp, .mthp: return .thp
            case .hugetlb(let b): return b == 1 << 30 ? .hugetlb1G : .hugetlb2M
            }
        }
    }

    func regionSize(_ p: Params, _ kind: Kind) -> Int {
        let size = p.int("size")
        return (size + kind.unit - 1) / kind.unit * kind.unit
    }

    // MARK: Scenario

    public func probe(variant: String) -> Availability {
        switch variant {
        case "hugetlb-reserve":
            return HugeTLB.pools().isEmpty ? .unusable("no hugetlb pools: kernel built without CONFIG_HUGETLBFS") : .usable
        default:
            return THP.isAvailable ? .usable : .unusable("no /sys/kernel/mm/transparent_hugepage: kernel built without CONFIG_TRANSPARENT_HUGEPAGE")
        }
    }

    public func probe(variant: String, params: Params) -> Availability {
        if case .unusable(let why) = probe(variant: variant) { return .unusable(why) }
        if variant == "fault" || variant == "tlb" {
            switch Kind(params.string("kind")) {
            case .mthp(let b) where !THP.anonymousSizes.contains(b):
                return .unusable("this kernel offers no anonymous mTHP size \(b / 1024)kB (see `memlab probe`; mTHP needs 6.8+)")
            case .hugetlb(let b) where HugeTLB.pool(pageBytes: b) == nil:
                return .unusable("no hugetlb pool of \(formatBytes(b)) pages on this kernel")
            default: break
            }
        }
        if variant == "hugetlb-reserve" {
            let b = params.string("huge_size") == "1g" ? 1 << 30 : 2 << 20
            if HugeTLB.pool(pageBytes: b) == nil { return .unusable("no hugetlb pool of \(formatBytes(b)) pages on this kernel") }
        }
        return .usable
    }

    public func validate(variant: String, params: Params) throws(UsageError) {
        // A pool request the kernel tries to meet by taking every free page it can find:
        // refuse what would leave the machine short, before anything is changed.
        let memTotal = Int((try? MemInfo.current().memTotal) ?? 0)
        var poolBytes = 0
        if variant == "hugetlb-reserve" {
            let b = params.string("huge_size") == "1g" ? 1 << 30 : 2 << 20
            poolBytes = (params.int("pool_pages") + params.int("overcommit_pages")) * b
        } else if variant == "fault" || variant == "tlb", case .hugetlb = Kind(params.string("kind")) {
            poolBytes = variant == "tlb" ? params.int("max_working_set") : 2 * regionSize(params, Kind(params.string("kind")))
        } else if variant != "tlb" {
            poolBytes = 2 * params.int("size")   // the variants map up to two regions
        }
        if variant == "hugetlb-reserve", params.int("node") >= 0 {
            // The node must be one libnuma and sysfs both know, with a pool of this size.
            let node = params.int("node")
            let b = params.string("huge_size") == "1g" ? 1 << 30 : 2 << 20
            let sysfs = HugeTLB.sysfsNodes()
            let known = sysfs.map { "node\($0)" }.joined(separator: ", ")
            if !sysfs.contains(node) || (NUMA.isAvailable && node >= NUMA.nodeCount) {
                throw UsageError("hugetlb-reserve: node=\(node) is not a NUMA node of this machine; it has \(known.isEmpty ? "no /sys/devices/system/node entries" : known) (libnuma: \(NUMA.isAvailable ? "\(NUMA.nodeCount) node(s)" : "unavailable")); use -1 for the machine-wide pool")
            }
            if !HugeTLB.nodePoolKnob(node: node, pageBytes: b).exists {
                throw UsageError("hugetlb-reserve: node\(node) has no \(formatBytes(b)) hugetlb pool (\(HugeTLB.nodePoolKnob(node: node, pageBytes: b).path) is missing)")
            }
        }
        if memTotal > 0 && poolBytes > memTotal / 2 {
            throw UsageError("this run needs \(formatBytes(poolBytes)) of memory (\(poolBytes) bytes), more than half of this machine's \(memTotal) bytes: ask for less")
        }
        if variant == "tlb", case .hugetlb(let b) = Kind(params.string("kind")), b == 1 << 30, params.int("max_working_set") > (8 << 30) {
            throw UsageError("tlb with hugetlb-1g: max_working_set above 8G would take most of this machine's memory")
        }
    }

    public func settings(variant: String, params: Params) -> [KnobSetting] {
        var s: [KnobSetting] = []
        /// THP in madvise mode with exactly one anonymous size enabled for MADV_HUGEPAGE
        /// regions: the kernel picks the largest enabled size, so the others are turned off.
        func onlySize(_ bytes: Int?) {
            s.append(KnobSetting(THP.enabled, "madvise"))
            for size in THP.anonymousSizes {
                let want = size == bytes ? (size == 2 << 20 ? "inherit" : "madvise") : "never"
                s.append(KnobSetting(THP.sizeEnabled(bytes: size), want))
            }
        }
        switch variant {
        case "fault", "tlb":
            let kind = Kind(params.string("kind"))
            switch kind {
            case .base: break
            case .thp: onlySize(2 << 20)
            case .mthp(let b): onlySize(b)
            case .hugetlb(let b):
                let bytes = variant == "tlb" ? params.int("max_working_set") : regionSize(params, kind)
                // fault maps two regions of this size (throughput, then latency).
                let needed = (bytes + b - 1) / b * (variant == "fault" ? 2 : 1)
                s.append(KnobSetting(HugeTLB.poolKnob(pageBytes: b), String(needed), isCapacity: true))
            }
        case "collapse", "bloat":
            onlySize(2 << 20)
            // A fast khugepaged only where khugepaged is what is measured.
            if variant == "collapse" && params.string("method") == "madv_collapse" { break }
            s.append(KnobSetting(THP.Khugepaged.scanSleepMillisecs, "100"))
            s.append(KnobSetting(THP.Khugepaged.pagesToScan, "32768"))
            s.append(KnobSetting(THP.Khugepaged.maxPtesNone, String(params.int("max_ptes_none"))))
        case "split":
            onlySize(2 << 20)
        case "hugetlb-reserve":
            let b = params.string("huge_size") == "1g" ? 1 << 30 : 2 << 20
            let node = params.int("node")
            // Per node: only that node's share is set; the other nodes keep what they have.
            let pool = node >= 0 ? HugeTLB.nodePoolKnob(node: node, pageBytes: b) : HugeTLB.poolKnob(pageBytes: b)
            s.append(KnobSetting(pool, String(params.int("pool_pages")), isCapacity: true))
            s.append(KnobSetting(HugeTLB.overcommitKnob(pageBytes: b), String(params.int("overcommit_pages"))))
        default: break
        }
        return s
    }

    public func deadline(variant: String, params: Params) -> Double { params.double("timeout_s") + 120 }

    public func run(_ ctx: RunContext) throws {
        switch ctx.variant {
        case "fault": try runFault(ctx)
        case "tlb": try runTLB(ctx)
        case "collapse": try runCollapse(ctx)
        case "bloat": try runBloat(ctx)
        case "split": try runSplit(ctx)
        case "hugetlb-reserve": try runReserve(ctx)
        default: throw ScenarioError.failed("unknown variant \(ctx.variant)")
        }
    }

    // MARK: shared read-backs

    /// Fraction of the region's pages that sit in a huge page of the asked-for kind.
    func coverage(_ m: AnonymousMapping, _ kind: Kind) throws -> (coverage: Double, present: Int) {
        let c = try PageFlags.census(m.base, length: m.length)
        let pages = m.length / 4096
        switch kind {
        case .base: return (Double(c.thp + c.huge) / Double(pages), c.present)
        case .thp, .mthp: return (Double(c.thp) / Double(pages), c.present)
        case .hugetlb: return (Double(c.huge) / Double(pages), c.present)
        }
    }
}
