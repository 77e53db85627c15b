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
public struct HugePagesScenario: TypedScenario {
    public init() {}
    public let id = "hugepages"
    public let summary = "THP, mTHP and hugetlb: fault cost, TLB reach, collapse, bloat, split, pool reservations"

    public enum Variant: String, ScenarioVariant {
        case fault, tlb, collapse, bloat, split
        case hugetlbReserve = "hugetlb-reserve"
        case shrinkUnderused = "shrink-underused"
        case collapseShared = "collapse-shared"
        case collapseSwap = "collapse-swap"
        case shmem, defrag
        public var summary: String {
            switch self {
            case .fault: return "first-touch throughput and per-fault latency for one page size; huge_coverage read back"
            case .tlb: return "pointer-chase latency per working-set size (TLB reach) and random-update cost"
            case .collapse: return "4K-faulted memory collapsed by MADV_COLLAPSE or by khugepaged: time and cost per 2M"
            case .bloat: return "sparse touches under THP vs 4K: RSS inflation, and khugepaged's max_ptes_none"
            case .split: return "partial munmap/mprotect inside THPs: split counts and their cost"
            case .hugetlbReserve: return "hugetlb pool: Rsvd at mmap vs fault, ENOMEM when short, SIGBUS with MAP_NORESERVE, surplus pages"
            case .shmem: return "shared anonymous memory under one shmem_enabled mode (and MADV_HUGEPAGE or not): PMD-mapped shmem THPs, thp_file_alloc, ShmemHugePages"
            case .collapseSwap: return "khugepaged on 4K ranges with pages paged out to a swap file of the run's own: collapsed iff swapped pages <= max_ptes_swap (thp_scan_exceed_swap_pte)"
            case .collapseShared: return "khugepaged on 4K ranges partly shared with a forked child: collapsed iff shared pages <= max_ptes_shared (thp_scan_exceed_share_pte)"
            case .defrag: return "THP faults in fragmented memory under one defrag mode: direct compaction, kswapd/kcompactd woken, or a plain fall back to 4K (compact_stall/success/fail, thp_fault_alloc/fallback from vmstat); takes most of the machine's free memory first, so meant for a guest"
            case .shrinkUnderused: return "mostly zero-filled THPs under memory cgroup pressure: the underused-THP shrinker splits them (thp_underused_split_page), RSS given back"
            }
        }
    }

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

    /// collapse: who collapses the region.
    public enum CollapseMethod: String, CaseIterable, ParameterChoice {
        case madvCollapse = "madv_collapse", khugepaged
    }
    /// shmem: the top-level shmem_enabled mode borrowed.
    public enum ShmemMode: String, CaseIterable, ParameterChoice {
        case always
        case withinSize = "within_size"
        case advise, never, deny, force
    }
    /// shmem: a tmpfs's own huge= option, or none for shared anonymous memory.
    public enum TmpfsHuge: String, CaseIterable, ParameterChoice {
        case none, always, never
        case withinSize = "within_size"
        case advise
    }
    /// defrag: transparent_hugepage/defrag, what a THP fault may do when no 2M block is free.
    public enum DefragMode: String, CaseIterable, ParameterChoice {
        case always, `defer`
        case deferMadvise = "defer+madvise"
        case madvise, never
    }
    /// split: what is done to one 4K page inside each THP.
    public enum SplitOperation: String, CaseIterable, ParameterChoice { case munmap, mprotect }
    /// hugetlb-reserve: which pool.
    public enum HugeSize: String, CaseIterable, ParameterChoice {
        case size2M = "2m", size1G = "1g"
        var bytes: Int { self == .size1G ? 1 << 30 : 2 << 20 }
    }

    public struct Parameters: ParameterSet {
        public init() {}
        let kind = Parameter<Kind>("kind", default: .thp, help: "page size asked for (fault, tlb): 4k, thp (2M), mthp-<kB>k for each anonymous mTHP size this kernel offers (here: \(HugePagesScenario.mthpKinds.isEmpty ? "none; mTHP needs 6.8+" : HugePagesScenario.mthpKinds.joined(separator: ", "))), hugetlb-2m, hugetlb-1g")
        let size = Parameter<Int>("size", (2 << 20)...(64 << 30), default: 64 << 20, unit: .bytes, help: "bytes of the region (fault, collapse, bloat, split); hugetlb-1g rounds up to 1G")
        let prewarm = Parameter<Bool>("prewarm", default: true, help: "touch and free the same amount first, so the VM's lazy host backing is not timed")
        let maxWorkingSet = Parameter<Int>("max_working_set", (64 << 10)...(16 << 30), default: 256 << 20, unit: .bytes, help: "tlb: largest working set; sizes go 16K, 64K, … ×4 up to it")
        let accesses = Parameter<Int>("accesses", 1000...1_000_000_000, default: 1_000_000, unit: .count, help: "tlb: dependent loads timed per working-set size")
        let method = Parameter<CollapseMethod>("method", default: .madvCollapse, help: "collapse: synchronous MADV_COLLAPSE or waiting for khugepaged")
        let stridePages = Parameter<Int>("stride_pages", 1...512, default: 64, unit: .pages, help: "bloat: touch one 4K page in every N")
        let maxPtesNone = Parameter<Int>("max_ptes_none", 0...511, default: 511, unit: .count, help: "bloat/collapse: khugepaged/max_ptes_none (borrowed); shrink-underused: a THP with more zero-filled pages than this is underused (511 turns the check off)")
        let operation = Parameter<SplitOperation>("operation", default: .munmap, help: "split: what is done to one 4K page inside each THP")
        let poolPages = Parameter<Int>("pool_pages", 2...4096, default: 8, unit: .pages, help: "hugetlb-reserve: pool size in huge pages (borrowed nr_hugepages)")
        let overcommitPages = Parameter<Int>("overcommit_pages", 0...4096, default: 2, unit: .pages, help: "hugetlb-reserve: surplus pages allowed (borrowed nr_overcommit_hugepages)")
        let hugeSize = Parameter<HugeSize>("huge_size", default: .size2M, help: "hugetlb-reserve: which pool")
        let node = Parameter<Int>("node", -1...1023, default: -1, unit: .none, help: "hugetlb-reserve: size the pool on this NUMA node only (node<N>/hugepages/.../nr_hugepages, borrowed); -1: the machine-wide nr_hugepages, spread by the kernel. defrag: the node fragmented and faulted on (memory bound there); -1: the node of the run's first CPU")
        let timeoutS = Parameter<Double>("timeout_s", 1...3600, default: 60, unit: .s, help: "give up waiting for khugepaged after this long")
        let touchedPerHuge = Parameter<Int>("touched_per_huge", 1...512, default: 8, unit: .pages, help: "shrink-underused: 4K pages written (non-zero) in each 2M page; the rest stay zero-filled")
        let shmemEnabled = Parameter<ShmemMode>("shmem_enabled", default: .advise, help: "shmem: transparent_hugepage/shmem_enabled for the run (borrowed; the 2M size set to inherit, the others to never)")
        let tmpfsHuge = Parameter<TmpfsHuge>("tmpfs_huge", default: .none, help: "shmem: none — shared anonymous memory (shmem_enabled decides); else a file on a tmpfs mounted for the run with huge=<this> (mounted and removed through the settings guard)")
        let madviseHuge = Parameter<Bool>("madvise", default: true, help: "shmem, defrag: MADV_HUGEPAGE on the region (what shmem_enabled=advise and defrag=madvise or defer+madvise ask for)")
        let sharedPerHuge = Parameter<Int>("shared_per_huge", 0...512, default: 128, unit: .pages, help: "collapse-shared: 4K pages of each 2M range left shared with a forked child (the rest written, so copied)")
        let swappedPerHuge = Parameter<Int>("swapped_per_huge", 0...256, default: 32, unit: .pages, help: "collapse-swap: 4K pages of each 2M range paged out (MADV_PAGEOUT) before khugepaged looks")
        let maxPtesSwap = Parameter<Int>("max_ptes_swap", 0...511, default: 64, unit: .count, help: "collapse-swap: khugepaged/max_ptes_swap (borrowed)")
        let maxPtesShared = Parameter<Int>("max_ptes_shared", 0...511, default: 256, unit: .count, help: "collapse-shared: khugepaged/max_ptes_shared (borrowed)")
        let defragMode = Parameter<DefragMode>("defrag", default: .madvise, help: "defrag: transparent_hugepage/defrag for the run (borrowed): always — direct compaction; defer — wake kswapd and kcompactd, fall back now; defer+madvise — direct for MADV_HUGEPAGE regions, kswapd/kcompactd for the rest; madvise — direct for MADV_HUGEPAGE regions only; never")
        let proactiveness = Parameter<Int>("proactiveness", 0...100, default: 0, unit: .count, help: "defrag: vm.compaction_proactiveness for the run (borrowed); 0 keeps kcompactd from undoing the fragmentation in the background")
        let maxFill = Parameter<Int>("max_fill", (64 << 20)...(64 << 30), default: 2 << 30, unit: .bytes, help: "defrag: the most free memory the run may take to fragment it; a machine with more free memory is skipped (run it in a guest: --guest kernel=distro,mem=1G)")
        let shrinkUnderused = Parameter<Bool>("shrink_underused", default: true, help: "shrink-underused: let the deferred-split shrinker split underused THPs (borrowed: transparent_hugepage/shrink_underused)")
    }

    // MARK: what a kind means

    /// The page kind asked for: one of `HugePagesScenario.kinds`, which depend on the kernel.
    enum Kind: Equatable, ParameterChoice {
        case base, thp, mthp(Int), hugetlb(Int)

        static var choices: [String] { HugePagesScenario.kinds }

        init?(choice name: String) {
            switch name {
            case "4k": self = .base
            case "thp": self = .thp
            case "hugetlb-2m": self = .hugetlb(2 << 20)
            case "hugetlb-1g": self = .hugetlb(1 << 30)
            default:
                guard name.hasPrefix("mthp-"), name.hasSuffix("k"), let kb = Int(name.dropFirst("mthp-".count).dropLast()), kb > 0 else { return nil }
                self = .mthp(kb * 1024)
            }
        }

        var choice: String {
            switch self {
            case .base: return "4k"
            case .thp: return "thp"
            case .mthp(let b): return "mthp-\(b / 1024)k"
            case .hugetlb(let b): return b == 1 << 30 ? "hugetlb-1g" : "hugetlb-2m"
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

    func regionSize(_ p: Values, _ kind: Kind) -> Int {
        let size = p.size
        return (size + kind.unit - 1) / kind.unit * kind.unit
    }

    // MARK: Scenario

    public func probe(_ variant: Variant) -> Availability {
        switch variant {
        case .hugetlbReserve:
            return HugeTLB.pools().isEmpty ? .unusable("no hugetlb pools: kernel built without CONFIG_HUGETLBFS") : .usable
        case .shrinkUnderused:
            return probeShrinkUnderused()
        case .defrag:
            return probeDefrag()
        case .shmem:
            guard THP.isAvailable else { return .unusable("no /sys/kernel/mm/transparent_hugepage: kernel built without CONFIG_TRANSPARENT_HUGEPAGE") }
            return THP.shmemEnabled.exists ? .usable : .unusable("\(THP.shmemEnabled.path) is missing: kernel built without CONFIG_TRANSPARENT_HUGEPAGE for shmem")
        case .collapseSwap:
            guard THP.isAvailable else { return .unusable("no /sys/kernel/mm/transparent_hugepage: kernel built without CONFIG_TRANSPARENT_HUGEPAGE") }
            return THP.Khugepaged.maxPtesSwap.exists ? .usable : .unusable("\(THP.Khugepaged.maxPtesSwap.path) is missing (kernel older than 4.x)")
        case .collapseShared:
            guard THP.isAvailable else { return .unusable("no /sys/kernel/mm/transparent_hugepage: kernel built without CONFIG_TRANSPARENT_HUGEPAGE") }
            return THP.Khugepaged.maxPtesShared.exists ? .usable : .unusable("\(THP.Khugepaged.maxPtesShared.path) is missing: needs Linux 5.8+")
        default:
            return THP.isAvailable ? .usable : .unusable("no /sys/kernel/mm/transparent_hugepage: kernel built without CONFIG_TRANSPARENT_HUGEPAGE")
        }
    }

    public func probe(_ variant: Variant, _ params: Values) -> Availability {
        if case .unusable(let why) = probe(variant) { return .unusable(why) }
        if variant == .fault || variant == .tlb {
            switch params.kind {
            case .mthp(let b) where !THP.anonymousSizes.contains(b):
                return .unusable("this kernel offers no anonymous mTHP size \(b / 1024)kB (see `memlab probe`; mTHP needs 6.8+)")
            case .hugetlb(let b) where HugeTLB.pool(pageBytes: b) == nil:
                return .unusable("no hugetlb pool of \(formatBytes(b)) pages on this kernel")
            default: break
            }
        }
        if variant == .defrag { return probeDefrag(params) }
        if variant == .hugetlbReserve {
            let b = params.hugeSize.bytes
            if HugeTLB.pool(pageBytes: b) == nil { return .unusable("no hugetlb pool of \(formatBytes(b)) pages on this kernel") }
        }
        return .usable
    }

    public func validate(_ variant: Variant, _ params: Values) throws(UsageError) {
        // A pool request the kernel tries to meet by taking every free page it can find:
        // refuse what would leave the machine short, before anything is changed.
        let memTotal = Int((try? MemInfo.current().memTotal) ?? 0)
        var poolBytes = 0
        if variant == .hugetlbReserve {
            let b = params.hugeSize.bytes
            poolBytes = (params.poolPages + params.overcommitPages) * b
        } else if variant == .fault || variant == .tlb, case .hugetlb = params.kind {
            poolBytes = variant == .tlb ? params.maxWorkingSet : 2 * regionSize(params, params.kind)
        } else if variant == .defrag {
            poolBytes = params.size   // the fill is bounded by max_fill and the machine's free memory, at run time
        } else if variant != .tlb {
            poolBytes = 2 * params.size   // the variants map up to two regions
        }
        // Planned for a guest: its runner checks the guest's nodes and memory before the run.
        if Planning.forAnotherMachine { return }
        if variant == .defrag, params.node >= 0, params.node >= NUMA.nodeCount {
            throw UsageError("defrag: node=\(params.node) is not a NUMA node of this machine (it has \(NUMA.nodeCount)); use -1 for the node the run starts on")
        }
        if variant == .hugetlbReserve, params.node >= 0 {
            // The node must be one libnuma and sysfs both know, with a pool of this size.
            let node = params.node
            let b = params.hugeSize.bytes
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
        if variant == .tlb, case .hugetlb(let b) = params.kind, b == 1 << 30, params.maxWorkingSet > (8 << 30) {
            throw UsageError("tlb with hugetlb-1g: max_working_set above 8G would take most of this machine's memory")
        }
    }

    public func settings(_ variant: Variant, _ params: Values) -> [KnobSetting] {
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
        case .fault, .tlb:
            let kind = params.kind
            switch kind {
            case .base: break
            case .thp: onlySize(2 << 20)
            case .mthp(let b): onlySize(b)
            case .hugetlb(let b):
                let bytes = variant == .tlb ? params.maxWorkingSet : regionSize(params, kind)
                // fault maps two regions of this size (throughput, then latency).
                let needed = (bytes + b - 1) / b * (variant == .fault ? 2 : 1)
                s.append(KnobSetting(HugeTLB.poolKnob(pageBytes: b), String(needed), isCapacity: true))
            }
        case .collapse, .bloat:
            onlySize(2 << 20)
            // A fast khugepaged only where khugepaged is what is measured.
            if variant == .collapse && params.method == .madvCollapse { break }
            s.append(KnobSetting(THP.Khugepaged.scanSleepMillisecs, "100"))
            s.append(KnobSetting(THP.Khugepaged.pagesToScan, "32768"))
            s.append(KnobSetting(THP.Khugepaged.maxPtesNone, String(params.maxPtesNone)))
        case .split:
            onlySize(2 << 20)
        case .shmem:
            s.append(KnobSetting(THP.shmemEnabled, params.shmemEnabled.rawValue))
            for size in THP.sizes().map(\.bytes) where THP.sizeShmemEnabled(bytes: size).exists {
                s.append(KnobSetting(THP.sizeShmemEnabled(bytes: size), size == 2 << 20 ? "inherit" : "never"))
            }
        case .collapseSwap, .collapseShared:
            // A fast khugepaged that collapses any range but for the threshold under test.
            onlySize(2 << 20)
            s.append(KnobSetting(THP.Khugepaged.scanSleepMillisecs, "100"))
            s.append(KnobSetting(THP.Khugepaged.pagesToScan, "32768"))
            s.append(KnobSetting(THP.Khugepaged.maxPtesNone, "511"))
            s.append(variant == .collapseSwap ? KnobSetting(THP.Khugepaged.maxPtesSwap, String(params.maxPtesSwap))
                                              : KnobSetting(THP.Khugepaged.maxPtesShared, String(params.maxPtesShared)))
        case .defrag:
            s += defragSettings(params)
        case .shrinkUnderused:
            onlySize(2 << 20)
            // Read by the shrinker: a THP is underused when more than max_ptes_none of its
            // pages are zero-filled (511, the default, turns the check off).
            s.append(KnobSetting(THP.Khugepaged.maxPtesNone, String(params.maxPtesNone)))
            s.append(KnobSetting(THP.shrinkUnderused, params.shrinkUnderused ? "1" : "0"))
        case .hugetlbReserve:
            let b = params.hugeSize.bytes
            let node = params.node
            // Per node: only that node's share is set; the other nodes keep what they have.
            let pool = node >= 0 ? HugeTLB.nodePoolKnob(node: node, pageBytes: b) : HugeTLB.poolKnob(pageBytes: b)
            s.append(KnobSetting(pool, String(params.poolPages), isCapacity: true))
            s.append(KnobSetting(HugeTLB.overcommitKnob(pageBytes: b), String(params.overcommitPages)))
        }
        return s
    }

    public func deadline(_ variant: Variant, _ params: Values) -> Double { params.timeoutS + 120 }

    /// collapse-swap pages out to a swap file of its own, made through the guard (journaled
    /// first, swapped off and removed after the run, on a signal, or by the next start).
    public func prepare(_ variant: Variant, _ params: Values, settingsGuard: SettingsGuard) throws {
        if variant == .shmem && params.tmpfsHuge != .none { try prepareShmemMount(params, settingsGuard: settingsGuard) }
        guard variant == .collapseSwap else { return }
        try prepareCollapseSwap(params, settingsGuard: settingsGuard)
    }

    /// shrink-underused runs in a memory cgroup just larger than its THP region, so that the
    /// page cache it writes next puts the cgroup under reclaim (which runs the shrinkers).
    public func memoryLimit(_ variant: Variant, _ params: Values) -> Int? {
        variant == .shrinkUnderused ? regionSize(params, .thp) + ShrinkUnderused.headroom : nil
    }

    public func run(_ ctx: RunContext, _ variant: Variant, _ p: Values) throws {
        switch variant {
        case .fault: try runFault(ctx, p)
        case .tlb: try runTLB(ctx, p)
        case .collapse: try runCollapse(ctx, p)
        case .bloat: try runBloat(ctx, p)
        case .split: try runSplit(ctx, p)
        case .hugetlbReserve: try runReserve(ctx, p)
        case .shrinkUnderused: try runShrinkUnderused(ctx, p)
        case .collapseShared: try runCollapseShared(ctx, p)
        case .collapseSwap: try runCollapseSwap(ctx, p)
        case .shmem: try runShmem(ctx, p)
        case .defrag: try runDefrag(ctx, p)
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
