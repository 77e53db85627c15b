#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM

/// hugepages:shrink-underused — since 6.12 every anonymous THP is queued for deferred split
/// when it is faulted, and the deferred-split shrinker (mm/huge_memory.c,
/// deferred_split_scan) splits one whose zero-filled pages outnumber khugepaged's
/// max_ptes_none (thp_underused), mapping those pages to the shared zero page: memory given
/// back. Shrinkers run under reclaim; here the run's own memory cgroup is squeezed by page
/// cache the child writes, so nothing outside it is pressed.
enum ShrinkUnderused {
    /// Memory above the THP region the cgroup allows: room for the process itself.
    static let headroom = 24 << 20
}

extension HugePagesScenario {
    func probeShrinkUnderused() -> Availability {
        guard THP.isAvailable else { return .unusable("no /sys/kernel/mm/transparent_hugepage: kernel built without CONFIG_TRANSPARENT_HUGEPAGE") }
        guard THP.shrinkUnderused.exists else {
            return .unusable("\(THP.shrinkUnderused.path) is missing: the underused-THP shrinker needs Linux 6.12+")
        }
        guard (try? VMStat.current())?["thp_underused_split_page"] != nil else {
            return .unusable("/proc/vmstat has no thp_underused_split_page: the underused-THP shrinker needs Linux 6.12+")
        }
        guard !MemoryCgroupMount.detect().isEmpty else {
            return .unusable("no memory cgroup controller mounted: the run squeezes its own memory cgroup to make the shrinker run")
        }
        return .usable
    }

    func runShrinkUnderused(_ ctx: RunContext, _ p: Values) throws {
        let huge = 2 << 20
        let size = regionSize(p, .thp)
        let units = size / huge
        let touched = p.touchedPerHuge
        let maxNone = Int((try? THP.Khugepaged.maxPtesNone.read()) ?? "") ?? p.maxPtesNone
        let shrinkOn = (try? THP.shrinkUnderused.read()) == "1"
        let zeroPerHuge = 512 - touched
        // mm/huge_memory.c thp_underused: off when max_ptes_none is 511; else more zero-filled
        // pages than max_ptes_none.
        let underused = shrinkOn && maxNone != 511 && zeroPerHuge > maxNone

        let m = try AnonymousMapping(length: size, kind: .thp)
        let bytes = m.base.assumingMemoryBound(to: UInt8.self)
        for u in 0..<units {
            for k in 0..<touched { bytes[u * huge + k * 4096 + 64] = UInt8(truncatingIfNeeded: 1 + k) }
        }
        let e0 = try Smaps.entry(startingAt: m.base)
        let huge0 = Double(e0["AnonHugePages"] ?? 0), rss0 = Double(e0["Rss"] ?? 0)
        ctx.record("anon_huge_bytes_before", huge0, .bytes, better: .none)
        ctx.record("rss_before", rss0, .bytes, better: .none)
        guard huge0 >= Double(size) / 2 else {
            throw ScenarioError.failed("only \(Int(huge0)) of \(size) bytes were THP-backed after the fault (AnonHugePages): nothing for the shrinker to split")
        }

        // The squeeze. The shrinker's share of a reclaim pass is its object count (queued
        // THPs) >> the reclaim priority, so it is asked to scan only once reclaim gets hard.
        // Where the THPs should be split, anonymous memory past the cgroup's limit makes it
        // so: nothing else can be reclaimed (no swap), and the split's zero pages are the only
        // way the allocation fits — a shrinker that failed would end in the OOM killer.
        // Where they should not, page cache three times the limit keeps reclaim busy (clean
        // cache is easy to free: the run cannot be OOM-killed), and nothing may be split.
        let vm0 = try VMStat.current()
        let t0 = Clock.nanoseconds()
        var written = 0
        var squeeze: AnonymousMapping? = nil
        if underused {
            let extra = ShrinkUnderused.headroom + size / 2
            let a = try AnonymousMapping(length: extra, kind: .base)
            a.touch()
            written = extra
            squeeze = a
        } else {
            let dir = try RunDirectory.make(base: "/var/tmp")
            let path = "\(dir)/squeeze-\(getpid())"
            let fd = open(path, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            if fd < 0 { throw SystemError.current("open", path: path) }
            defer { close(fd); unlink(path) }
            let chunk = 1 << 20
            let buffer = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 4096)
            defer { buffer.deallocate() }
            memset(buffer, 0x5A, chunk)
            let total = 3 * (size + ShrinkUnderused.headroom)
            while written < total {
                let n = write(fd, buffer, chunk)
                if n < 0 { if errno == EINTR { continue }; throw SystemError.current("write", path: path) }
                written += n
                // Written back now and then, so reclaim finds clean pages to free.
                if written % (16 << 20) == 0 { fdatasync(fd) }
            }
            fdatasync(fd)
        }
        let seconds = Clock.seconds(since: t0)
        let vm1 = try VMStat.current()
        let e1 = try Smaps.entry(startingAt: m.base)
        let huge1 = Double(e1["AnonHugePages"] ?? 0), rss1 = Double(e1["Rss"] ?? 0)
        let census = try PageFlags.census(m.base, length: m.length)
        func delta(_ k: String) -> Double { Double(Int64(vm1[k] ?? 0) - Int64(vm0[k] ?? 0)) }

        ctx.record("anon_huge_bytes_after", huge1, .bytes, better: .none)
        ctx.record("rss_after", rss1, .bytes, better: .lower)
        ctx.record("rss_given_back", rss0 - rss1, .bytes, better: .higher)
        ctx.record("zero_page_mapped", Double(census.zeroPage), .pages, better: .none)
        ctx.record("thp_underused_split_page", delta("thp_underused_split_page"), .count, better: .none)
        ctx.record("thp_deferred_split_page", delta("thp_deferred_split_page"), .count, better: .none)
        ctx.record("thp_split_page", delta("thp_split_page"), .count, better: .none)
        ctx.record(underused ? "squeeze_anon_bytes" : "squeeze_cache_bytes", Double(written), .bytes, better: .none)
        ctx.record("squeeze_time", seconds, .s, better: .none)

        let expectedSplits = underused ? Double(units) : 0
        ctx.check("thp_underused_split_page", expected: expectedSplits, observed: delta("thp_underused_split_page"),
                  accepted: expectedSplits...(expectedSplits + max(2, expectedSplits * 0.05)),
                  describe: underused
                    ? "every THP split as underused: \(zeroPerHuge) zero-filled pages > max_ptes_none=\(maxNone) (+max(2, 5%): vmstat is machine-wide)"
                    : "none split as underused: \(shrinkOn ? "\(zeroPerHuge) zero-filled pages ≤ max_ptes_none=\(maxNone)\(maxNone == 511 ? " (511 turns the check off)" : "")" : "shrink_underused=0") (+2: vmstat is machine-wide)")
        let expectedRSS = underused ? Double(units * touched * 4096) : Double(size)
        ctx.check("rss_after", expected: expectedRSS, observed: rss1, tolerance: 0,
                  describe: underused ? "only the written pages stay resident (the zero-filled ones map the shared zero page)" : "the region stays whole")
        ctx.check("anon_huge_bytes_after", expected: underused ? 0 : Double(size), observed: huge1, tolerance: 0,
                  describe: underused ? "no huge page left" : "every huge page left")
        if underused {
            ctx.check("zero_page_mapped", expected: Double(units * zeroPerHuge), observed: Double(census.zeroPage), tolerance: 0,
                      describe: "the zero-filled pages of every split THP map the shared zero page (kpageflags ZERO_PAGE)")
        }
        withExtendedLifetime(squeeze) {}
        ctx.note("shrink-underused: \(units) THPs with \(touched) written page(s) each; cgroup limit \(size + ShrinkUnderused.headroom) bytes; squeezed by \(written >> 20) MiB of \(underused ? "anonymous memory past the limit" : "page cache"); shrink_underused=\(shrinkOn ? 1 : 0) max_ptes_none=\(maxNone)")
    }
}
