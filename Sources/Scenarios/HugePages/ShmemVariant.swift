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
/// mounted with huge= follows its mount option instead (`tmpfs_huge`: a tmpfs the settings
/// guard mounts for the run, journaled first, unmounted and removed after it or by the next
/// start after a crash); deny and force override both.
extension HugePagesScenario {
    /// Where the run's tmpfs is mounted: in the state directory, named after the runner (the
    /// child knows its runner's pid from its run directory's owner tag).
    static func shmemMountPoint(stateDirectory: String, runnerPID: String) -> String {
        "\(stateDirectory)/memlab-tmpfs-\(runnerPID)"
    }

    func prepareShmemMount(_ p: Values, settingsGuard: SettingsGuard) throws {
        let path = HugePagesScenario.shmemMountPoint(stateDirectory: settingsGuard.stateDirectory, runnerPID: String(getpid()))
        let bytes = regionSize(p, .thp) + (4 << 20)
        do {
            try settingsGuard.mountTmpfs(at: path, options: "huge=\(p.tmpfsHuge.rawValue),size=\(bytes),mode=0700")
        } catch {
            if case .system(let e) = error, e.errno == EINVAL {
                throw ScenarioError.skipped("mount -t tmpfs -o huge=\(p.tmpfsHuge.rawValue) refused (EINVAL): kernel without THP for tmpfs")
            }
            throw error
        }
    }

    func runShmem(_ ctx: RunContext, _ p: Values) throws {
        let huge = 2 << 20
        let size = regionSize(p, .thp)
        let units = size / huge
        let mode = p.shmemEnabled
        let onTmpfs = p.tmpfsHuge != .none
        let expectHuge: Bool
        switch (mode, p.tmpfsHuge) {
        case (.deny, _): expectHuge = false          // deny and force override every mount
        case (.force, _): expectHuge = true
        case (_, .always), (_, .withinSize): expectHuge = true
        case (_, .advise): expectHuge = p.madviseHuge
        case (_, .never): expectHuge = false
        case (.always, .none), (.withinSize, .none): expectHuge = true
        case (.advise, .none): expectHuge = p.madviseHuge
        case (.never, .none): expectHuge = false
        }
        var fd: Int32 = -1
        var filePath = ""
        if onTmpfs {
            let runner = RunDirectory.owner.split(separator: "-").first.map(String.init) ?? ""
            let mountPoint = HugePagesScenario.shmemMountPoint(stateDirectory: SettingsGuard(command: "").stateDirectory, runnerPID: runner)
            filePath = "\(mountPoint)/region"
            fd = open(filePath, O_RDWR | O_CREAT | O_TRUNC | O_CLOEXEC, 0o600)
            if fd < 0 { throw SystemError.current("open", path: filePath) }
            if ftruncate(fd, off_t(size)) != 0 { close(fd); throw SystemError.current("ftruncate", path: filePath) }
        }
        defer { if fd >= 0 { close(fd); unlink(filePath) } }
        let flags = onTmpfs ? MAP_SHARED : MAP_SHARED | MAP_ANONYMOUS
        guard let raw = mmap(nil, onTmpfs ? size : size + huge, PROT_READ | PROT_WRITE, flags, fd, 0), raw != MAP_FAILED else {
            throw SystemError.current(onTmpfs ? "mmap(\(filePath))" : "mmap(MAP_SHARED | MAP_ANONYMOUS, \(size + huge))")
        }
        defer { munmap(raw, onTmpfs ? size : size + huge) }
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
                  describe: "smaps ShmemPmdMapped of the region: all of it with shmem_enabled=\(mode.rawValue)\(onTmpfs ? ", tmpfs huge=\(p.tmpfsHuge.rawValue)" : "") and madvise=\(p.madviseHuge) — \(expectHuge ? "huge" : "not huge") — else none")
        // vmstat and meminfo are machine-wide: another process's shmem THPs count too.
        ctx.check("thp_file_alloc", expected: Double(units) * (expectHuge ? 1 : 0), observed: delta("thp_file_alloc"),
                  accepted: (expectHuge ? Double(units) : 0)...((expectHuge ? Double(units) : 0) + max(2, Double(units) * 0.05)),
                  describe: "one shmem THP allocated per 2M (vmstat thp_file_alloc, +max(2, 5%): machine-wide)")
        ctx.check("shmem_huge_bytes", expected: want, observed: shmemHuge, tolerance: max(Double(huge), want * 0.05),
                  describe: "meminfo ShmemHugePages rose by the region (±max(2M, 5%): machine-wide)")
        ctx.note("shmem: \(units) × 2M of \(onTmpfs ? "a file on the run's tmpfs (huge=\(p.tmpfsHuge.rawValue))" : "MAP_SHARED|MAP_ANONYMOUS"), shmem_enabled=\(mode.rawValue), MADV_HUGEPAGE \(p.madviseHuge ? "on" : "off")")
    }
}
