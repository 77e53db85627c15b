#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM
import Workloads

extension HugePagesScenario {
    /// The hugetlb pool's promises (Documentation/admin-guide/mm/hugetlbpage.rst): a shared or
    /// private MAP_HUGETLB mapping reserves its pages at mmap (HugePages_Rsvd rises), a fault
    /// consumes a reservation (Rsvd and Free fall), a mapping the pool cannot cover fails
    /// with ENOMEM, surplus pages stretch it up to nr_overcommit_hugepages, and MAP_NORESERVE
    /// skips the promise — so touching past the pool ends in SIGBUS, caught here and reported
    /// as the expected outcome.
    func runReserve(_ ctx: RunContext, _ p: Values) throws {
        let b = p.hugeSize.bytes
        let kind: PageKind = b == 1 << 30 ? .hugetlb1G : .hugetlb2M
        let overcommit = p.overcommitPages
        func pool() throws -> HugeTLB.Pool {
            guard let pool = HugeTLB.pool(pageBytes: b) else { throw ScenarioError.skipped("no \(formatBytes(b)) hugetlb pool") }
            return pool
        }
        let p0 = try pool()
        ctx.record("pool_pages", Double(p0.total), .pages, better: .none)
        for (node, v) in HugeTLB.perNode(pageBytes: b).sorted(by: { $0.key < $1.key }) {
            ctx.record("node\(node)_pool_pages", Double(v.total), .pages, better: .none)
        }
        let node = p.node
        if node >= 0 {
            let perNode = HugeTLB.perNode(pageBytes: b)[node]
            ctx.record("node_pool_pages", Double(perNode?.total ?? 0), .pages, better: .none)
            ctx.check("node_pool_pages", expected: Double(p.poolPages), observed: Double(perNode?.total ?? 0), tolerance: 0,
                      describe: "node\(node)/hugepages/hugepages-\(b / 1024)kB/nr_hugepages holds pool_pages (the per-node knob)")
            ctx.note("pool sized on node \(node) only (\(HugeTLB.nodePoolKnob(node: node, pageBytes: b).path)); the machine-wide pool is the sum over nodes: \(p0.total) pages")
        }
        let usable = p0.free - p0.reserved
        guard usable >= 2 else {
            throw ScenarioError.failed("the pool has \(usable) unreserved free pages; it could not be grown to pool_pages=\(p.poolPages) (memory fragmented?)")
        }

        // 1. Reservation at mmap.
        let a = max(usable / 2, 1)
        let t0 = Clock.nanoseconds()
        let ma = try AnonymousMapping(length: a * b, kind: kind)
        ctx.record("mmap_time", Clock.seconds(since: t0), .s, better: .lower)
        let p1 = try pool()
        ctx.record("rsvd_after_mmap", Double(p1.reserved - p0.reserved), .pages, better: .none)
        ctx.check("rsvd_after_mmap", expected: Double(a), observed: Double(p1.reserved - p0.reserved), tolerance: 0,
                  describe: "HugePages_Rsvd rises by the mapping's pages at mmap")
        ctx.check("free_after_mmap", expected: Double(p0.free), observed: Double(p1.free), tolerance: 0,
                  describe: "HugePages_Free unchanged until a fault")

        // 2. A fault consumes a reservation.
        let touched = max(a / 2, 1)
        touchPages(ma.base, length: touched * b, stride: b)
        let p2 = try pool()
        ctx.check("rsvd_after_touch", expected: Double(p1.reserved - touched), observed: Double(p2.reserved), tolerance: 0,
                  describe: "each first touch turns one reservation into a used page")
        ctx.check("free_after_touch", expected: Double(p1.free - touched), observed: Double(p2.free), tolerance: 0,
                  describe: "HugePages_Free falls by the pages touched")

        // 3. More than the pool (plus surplus) can promise: ENOMEM at mmap.
        let available = p2.free - p2.reserved
        do {
            _ = try AnonymousMapping(length: (available + overcommit + 1) * b, kind: kind)
            ctx.check("enomem_when_short", expected: 1, observed: 0, tolerance: 0,
                      describe: "mmap of more than free - rsvd + nr_overcommit_hugepages pages fails with ENOMEM")
        } catch {
            ctx.check("enomem_when_short", expected: 1, observed: error.errno == ENOMEM ? 1 : 0, tolerance: 0,
                      describe: "mmap of more than free - rsvd + nr_overcommit_hugepages pages fails with ENOMEM")
            ctx.note("short pool: mmap of \(available + overcommit + 1) pages with \(available) available and \(overcommit) surplus allowed: \(error)")
        }

        // 4. Surplus pages: a mapping just beyond the pool, within nr_overcommit_hugepages.
        if overcommit > 0 {
            let want = available + min(overcommit, 2)
            let before = try pool()
            do {
                let mc = try AnonymousMapping(length: want * b, kind: kind)
                let after = try pool()
                ctx.record("surplus_pages", Double(after.surplus - before.surplus), .pages, better: .none)
                ctx.check("surplus_pages", expected: Double(min(overcommit, 2)), observed: Double(after.surplus - before.surplus), tolerance: 0,
                          describe: "the kernel adds surplus pages to honour a reservation beyond the pool")
                withExtendedLifetime(mc) {}
            } catch {
                ctx.note("surplus: mapping \(want) pages failed: \(error) (surplus pages must be allocated from free memory)")
            }
        }

        // 5. MAP_NORESERVE past everything: the promise is skipped, the fault gets SIGBUS.
        let reachable = (try pool()).free - (try pool()).reserved + overcommit
        let md = try AnonymousMapping(length: (reachable + 2) * b, kind: kind, noReserve: true)
        var faultedAt = 0
        let hit = memlab_touch_catching_sigbus(md.base, md.length, b, &faultedAt)
        ctx.check("sigbus_with_noreserve", expected: 1, observed: hit == 1 ? 1 : 0, tolerance: 0,
                  describe: "touching a MAP_NORESERVE mapping past the pool ends in SIGBUS (the expected outcome, caught)")
        if hit != 1 {
            // Nothing was measured: no page number to report (not a sentinel either).
            ctx.note("no SIGBUS: all \(reachable + 2) MAP_NORESERVE pages were backed (the pool or surplus grew meanwhile?); sigbus_at_page not reported")
        } else {
            ctx.record("sigbus_at_page", Double(faultedAt / b), .pages, better: .none)
            ctx.check("sigbus_at_page", expected: Double(reachable), observed: Double(faultedAt / b), tolerance: 0,
                      describe: "the first page the pool (free - rsvd + surplus allowed) cannot back")
        }
        withExtendedLifetime(ma) {}
    }
}
