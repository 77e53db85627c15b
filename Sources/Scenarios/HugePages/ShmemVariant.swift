#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM
import LabKit
import LinuxMM

/// hugepages:shmem — THP for shared memory. Anonymous shared mappings (MAP_SHARED |
/// MAP_ANONYMOUS, like memfd and SysV shm) live on the kernel's internal shmem mount, whose
/// huge page policy is transparent_hugepage/shmem_enabled (Documentation/admin-guide/mm/
/// transhuge.rst): always, within_size (huge up to the file's size), advise (only
/// MADV_HUGEPAGE ranges), never, deny and force (testing: off or on for every mount). A tmpfs
/// mounted with huge= follows its mount option instead (not exercised here: it needs a
/// mount the settings guard does not yet borrow).
extension HugePagesScenario {
    func runShmem(_ ctx: RunContext, _ p: Values) throws {
        let huge = 2 << 20
        let size = regionSize(p, .thp)
        let units = size / huge
        let mode = p.shmemEnabled
        let expectHuge: Bool
        switch mode {
        case .always, .force, .withinSize: expectHuge = true
        case .advise: expectHuge = p.madviseHuge
        case .never, .deny: expectHuge = false
        }
        guard let raw = mmap(nil, size + huge, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0), raw != MAP_FAILED else {
            throw SystemError.current("mmap(MAP_SHARED | MAP_ANONYMOUS, \(size + huge))")
        }
        defer { munmap(raw, size + huge) }
        // The shmem file's offsets and the addresses must agree modulo 2M for a PMD mapping:
        // the kernel aligns a shared anonymous mapping itself; the spare 2M covers one that is not.
        let base = raw
        if UInt(bitPattern: base) % UInt(huge) != 0 {
            ctx.note("the shared mapping was not 2M-aligned (0x\(String(UInt(bitPattern: base), radix: 16))): the kernel could map no PMD")
        }
        if p.madviseHuge, madvise(base, size, memlab_MADV_HUGEPAGE) != 0 { throw SystemError.current("madvise(MADV_HUGEPAGE)") }
        let vm0 = try VMStat.current()
        let mem0 = try MemInfo.current()
        let sizeAlloc0 = (try? CounterFile(path: THP.sizeStat(bytes: huge, "shmem_alloc")).read())
        let bytes = base.assumingMemoryBound(to: UInt8.self)
        let t0 = Clock.nanoseconds()
        var off = 0
        while off < size { bytes[off] = 1; off += 4096 }
        let seconds = Clock.seconds(since: t0)
        let vm1 = try VMStat.current()
        let mem1 = try MemInfo.current()
        let sizeAlloc1 = (try? CounterFile(path: THP.sizeStat(bytes: huge, "shmem_alloc")).read())
        let smaps = try Smaps.entry(startingAt: base)
        func delta(_ k: String) -> Double { Double(Int64(vm1[k] ?? 0) - Int64(vm0[k] ?? 0)) }
        let pmdMapped = Double(smaps["ShmemPmdMapped"] ?? smaps["FilePmdMapped"] ?? 0)
        let shmemHuge = Double(Int64(mem1.fields["ShmemHugePages"] ?? 0) - Int64(mem0.fields["ShmemHugePages"] ?? 0))

        ctx.record("fault_time", seconds, .s, better: .lower)
        ctx.record("fault_throughput", Double(size) / seconds, .bytesPerSecond, better: .higher)
        ctx.record("shmem_pmd_mapped", pmdMapped, .bytes, better: .none)
        ctx.record("shmem_huge_bytes", shmemHuge, .bytes, better: .none)
        ctx.record("thp_file_alloc", delta("thp_file_alloc"), .count, better: .none)
        ctx.record("thp_file_fallback", delta("thp_file_fallback"), .count, better: .lower)
        ctx.record("thp_file_mapped", delta("thp_file_mapped"), .count, better: .none)
        if let a = sizeAlloc0, let b = sizeAlloc1 { ctx.record("thp_size_shmem_alloc", Double(b - a), .count, better: .none) }

        let want = expectHuge ? Double(size) : 0
        ctx.check("shmem_pmd_mapped", expected: want, observed: pmdMapped, tolerance: 0,
                  describe: "smaps ShmemPmdMapped of the region: all of it with shmem_enabled=\(mode.rawValue)\(mode == .advise ? " and madvise=\(p.madviseHuge)" : ""), else none")
        // vmstat and meminfo are machine-wide: another process's shmem THPs count too.
        ctx.check("thp_file_alloc", expected: Double(units) * (expectHuge ? 1 : 0), observed: delta("thp_file_alloc"),
                  accepted: (expectHuge ? Double(units) : 0)...((expectHuge ? Double(units) : 0) + max(2, Double(units) * 0.05)),
                  describe: "one shmem THP allocated per 2M (vmstat thp_file_alloc, +max(2, 5%): machine-wide)")
        ctx.check("shmem_huge_bytes", expected: want, observed: shmemHuge, tolerance: max(Double(huge), want * 0.05),
                  describe: "meminfo ShmemHugePages rose by the region (±max(2M, 5%): machine-wide)")
        ctx.note("shmem: \(units) × 2M of MAP_SHARED|MAP_ANONYMOUS, shmem_enabled=\(mode.rawValue), MADV_HUGEPAGE \(p.madviseHuge ? "on" : "off")")
    }
}
