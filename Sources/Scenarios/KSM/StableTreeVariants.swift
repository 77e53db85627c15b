import LabKit
import LinuxMM

/// Two shapes of KSM's stable tree: one per NUMA node when merge_across_nodes=0
/// (ksm:numa-merge), and chains of KSM pages for one content once it has more than
/// max_page_sharing mappings (ksm:chains). Both knobs change only with nothing merged; the
/// settings guard unmerges first (Knob.apply).
extension KSMScenario {
    /// The same copies on two nodes (tools/testing/selftests/mm/ksm_tests.c,
    /// check_ksm_numa_merge): with merge_across_nodes=1 each content is one KSM page, with 0
    /// one per node, so pages_shared doubles.
    func runNUMAMerge(_ ctx: RunContext, _ p: Values) throws {
        let pageSize = System.pageSize
        let nodes = NUMA.nodeCount
        guard nodes >= 2 else { throw ScenarioError.skipped("merge_across_nodes needs two NUMA nodes; this machine has \(nodes)") }
        try requireSoleKSMUser("pages_shared and pages_sharing")
        // Each half: copies of duplicate_groups templates only, the same in both halves.
        let half = KSMLayout(pages: p.pages / 2, duplicateRatio: 1, zeroRatio: 0, groups: p.duplicateGroups)
        let maxSharing = Int((try? KSM.Knobs.maxPageSharing.read()) ?? "256") ?? 256
        let across = p.mergeAcrossNodes
        let contents = across ? half.groupSizes.map { 2 * $0 } : half.groupSizes + half.groupSizes
        let expect = KSMLayout.sharing(contents: contents, maxPageSharing: maxSharing)

        let seed: UInt64 = 0x6E75_6D61 &+ UInt64(ctx.repetition)
        var regions: [AnonymousMapping] = []
        for node in 0..<2 {
            // Fault each half in while bound to its node (numa_set_membind): the pages stay there.
            try NUMA.bind(toNode: node)
            let m = try AnonymousMapping(length: half.pages * pageSize, kind: .base)
            half.fill(m.base, pageSize: pageSize, seed: seed)
            regions.append(m)
        }
        let merge = try mergeAndWait(region: regions[0], layout: half, prctlMode: false, variant: .numaMerge, p, ctx: ctx,
                                     alsoMergeable: [regions[1]])
        let stat = try processStat(regions, useZeroPages: p.useZeroPages, ctx: ctx)
        let global = try KSM.counters()
        let shared = Double(global.pagesShared - merge.baseline.pagesShared)
        let sharing = Double(global.pagesSharing - merge.baseline.pagesSharing)
        ctx.record("merge_time", merge.mergeTime, .s, better: .lower)
        ctx.record("merging_pages", Double(stat.mergingPages), .pages, better: .none)
        ctx.record("pages_shared", shared, .pages, better: .none)
        ctx.record("pages_sharing", sharing, .pages, better: .none)
        ctx.record("saved_bytes", sharing * Double(pageSize), .bytes, better: .higher)
        ctx.check("pages_shared", expected: Double(expect.shared), observed: shared, tolerance: max(1, Double(expect.shared) * 0.05),
                  describe: "merge_across_nodes=\(across ? 1 : 0): \(across ? "one KSM page per content for both nodes" : "one KSM page per content per node (twice merge_across_nodes=1)") (max(1, 5%))")
        ctx.check("pages_sharing", expected: Double(expect.merging - expect.shared), observed: sharing,
                  tolerance: max(2, Double(expect.merging) * 0.01), describe: "max(2 pages, 1%)")
        ctx.check("merging_pages", expected: Double(expect.merging), observed: Double(stat.mergingPages),
                  tolerance: max(2, Double(expect.merging) * 0.01), describe: "max(2 pages, 1%)")
        ctx.note("numa-merge: \(half.pages) pages on node 0 and the same \(half.pages) on node 1, \(half.groups) contents; merge_across_nodes=\(across ? 1 : 0)")
    }

    /// More copies of one content than max_page_sharing: KSM keeps a stable node chain of
    /// several KSM pages (dups), each shared by at most max_page_sharing mappings.
    func runChains(_ ctx: RunContext, _ p: Values) throws {
        try requireSoleKSMUser("stable_node_chains and stable_node_dups")
        let pageSize = System.pageSize
        let layout = layout(p)
        let maxSharing = Int(try KSM.Knobs.maxPageSharing.read()) ?? 0
        guard maxSharing == p.maxPageSharing else {
            throw ScenarioError.failed("max_page_sharing reads \(maxSharing), not the borrowed \(p.maxPageSharing)")
        }
        var contents = layout.groupSizes
        if !p.useZeroPages { contents.append(layout.zeroPages) }
        let expect = KSMLayout.sharing(contents: contents, maxPageSharing: maxSharing)
        let region = try AnonymousMapping(length: layout.pages * pageSize, kind: .base)
        layout.fill(region.base, pageSize: pageSize, seed: 0x6368_6169_6E73 &+ UInt64(ctx.repetition))
        let merge = try mergeAndWait(region: region, layout: layout, prctlMode: false, variant: .chains, p, ctx: ctx)
        let stat = try processStat([region], useZeroPages: p.useZeroPages, ctx: ctx)
        let c = try KSM.counters()
        let b = merge.baseline
        // Chains as the kernel counts them now, not as a difference: the chain heads an
        // earlier repetition left (emptied when its process exited) are freed only when a
        // stable tree walk meets them — often by this very merge — so a difference would
        // count them off twice. The stale ones are the most the count may exceed the layout's.
        let chains = Double(c.stableNodeChains), dups = Double(c.stableNodeDups)
        let staleChains = Double(b.stableNodeChains), staleDups = Double(b.stableNodeDups)
        let shared = Double(c.pagesShared - b.pagesShared), sharing = Double(c.pagesSharing - b.pagesSharing)
        ctx.record("merge_time", merge.mergeTime, .s, better: .lower)
        ctx.record("merging_pages", Double(stat.mergingPages), .pages, better: .none)
        ctx.record("pages_shared", shared, .pages, better: .none)
        ctx.record("pages_sharing", sharing, .pages, better: .none)
        ctx.record("stable_node_chains", chains, .count, better: .none)
        ctx.record("stable_node_dups", dups, .count, better: .none)
        ctx.record("saved_bytes", sharing * Double(pageSize), .bytes, better: .higher)
        if shared > 0 { ctx.record("sharers_per_ksm_page", (shared + sharing) / shared, .ratio, better: .none) }
        ctx.record("stale_chains_at_start", staleChains, .count, better: .none)
        ctx.check("stable_node_chains", expected: Double(expect.chains), observed: chains,
                  accepted: Double(expect.chains)...(Double(expect.chains) + staleChains),
                  describe: "one chain per content with more than max_page_sharing=\(maxSharing) copies (+ at most stale_chains_at_start: chains of an earlier run not yet pruned)")
        let tolDups = max(1, Double(expect.dups) * 0.05)
        ctx.check("stable_node_dups", expected: Double(expect.dups), observed: dups,
                  accepted: (Double(expect.dups) - tolDups)...(Double(expect.dups) + tolDups + staleDups),
                  describe: "ceil(copies / max_page_sharing) KSM pages in each chain (max(1, 5%); + at most the stale dups of an earlier run)")
        ctx.check("pages_shared", expected: Double(expect.shared), observed: shared, tolerance: max(1, Double(expect.shared) * 0.05),
                  describe: "max(1 page, 5%)")
        ctx.check("pages_sharing", expected: Double(expect.merging - expect.shared), observed: sharing,
                  tolerance: max(2, Double(expect.merging) * 0.01), describe: "max(2 pages, 1%)")
        ctx.check("sharers_within_max_page_sharing", expected: Double(maxSharing), observed: shared > 0 ? (shared + sharing) / shared : 0,
                  accepted: 0...Double(maxSharing), describe: "no KSM page mapped more than max_page_sharing times (on average)")
        ctx.note("chains: \(contents.filter { $0 >= 2 }.count) contents of up to \(contents.max() ?? 0) copies; max_page_sharing=\(maxSharing)")
    }
}
