#if canImport(Glibc)
import Glibc
#endif
import CLinuxMM

/// The page size a mapping asks for. Asking is not getting: THP is a hint the kernel may
/// ignore, so scenarios read back what actually backed the memory (smaps, counters).
public enum PageKind: String, Sendable, Codable, CaseIterable {
    /// Base pages; THP explicitly refused with MADV_NOHUGEPAGE.
    case base = "4k"
    /// Transparent huge pages requested with MADV_HUGEPAGE.
    case thp = "thp"
    /// hugetlbfs pages from the 2 MiB pool (MAP_HUGETLB | MAP_HUGE_2MB).
    case hugetlb2M = "hugetlb-2m"
    /// hugetlbfs pages from the 1 GiB pool (MAP_HUGETLB | MAP_HUGE_1GB).
    case hugetlb1G = "hugetlb-1g"

    public var alignment: Int {
        switch self {
        case .base: return Int(sysconf(Int32(_SC_PAGESIZE)))
        case .thp, .hugetlb2M: return 2 << 20
        case .hugetlb1G: return 1 << 30
        }
    }
}

/// A private anonymous mapping, unmapped when released. Allocation happens at set-up; the
/// memory itself is touched by workloads through `base`.
public final class AnonymousMapping: @unchecked Sendable {
    // @unchecked: its fields are constants; the memory behind `base` is shared on purpose
    // (workload and handler threads), and each user says how it synchronises.
    public let base: UnsafeMutableRawPointer
    public let length: Int
    public let kind: PageKind

    /// `advise: false` leaves the mapping as mmap made it (a `.thp` one still 2M-aligned): THP
    /// then as the top-level `enabled` mode decides for memory nobody advised.
    public init(length: Int, kind: PageKind = .base, noReserve: Bool = false, advise: Bool = true) throws(SystemError) {
        // A length from outside (a peer's HELLO, a parameter) never traps here: refused.
        let (padded, overflow) = length.addingReportingOverflow(2 * kind.alignment)
        guard length > 0, !overflow, padded < Int.max / 2 else {
            throw SystemError(errno: EINVAL, call: "mmap of \(length) bytes (\(kind.rawValue)): not a positive length a mapping can have")
        }
        var flags = MAP_PRIVATE | MAP_ANONYMOUS
        if noReserve { flags |= memlab_MAP_NORESERVE }
        switch kind {
        case .hugetlb2M: flags |= memlab_MAP_HUGETLB | memlab_MAP_HUGE_2MB
        case .hugetlb1G: flags |= memlab_MAP_HUGETLB | memlab_MAP_HUGE_1GB
        default: break
        }
        let rounded = (length + kind.alignment - 1) / kind.alignment * kind.alignment
        // THP needs 2 MiB-aligned ranges to map a PMD: over-map and trim the ends. (hugetlb
        // mappings are aligned by the kernel.)
        let extra = kind == .thp ? kind.alignment : 0
        let p = mmap(nil, rounded + extra, PROT_READ | PROT_WRITE, flags, -1, 0)
        if p == MAP_FAILED || p == nil { throw SystemError.current("mmap(\(rounded) bytes, \(kind.rawValue))") }
        var start = UInt(bitPattern: p!)
        if extra > 0 {
            let aligned = (start + UInt(extra) - 1) / UInt(extra) * UInt(extra)
            if aligned > start { munmap(p, Int(aligned - start)) }
            let tail = start + UInt(rounded + extra) - (aligned + UInt(rounded))
            if tail > 0 { munmap(UnsafeMutableRawPointer(bitPattern: aligned + UInt(rounded)), Int(tail)) }
            start = aligned
        }
        self.base = UnsafeMutableRawPointer(bitPattern: start)!
        self.length = rounded
        self.kind = kind
        if advise && kind == .base { try self.advise(memlab_MADV_NOHUGEPAGE, name: "MADV_NOHUGEPAGE") }
        if advise && kind == .thp { try self.advise(memlab_MADV_HUGEPAGE, name: "MADV_HUGEPAGE") }
    }

    deinit { munmap(base, length) }

    public var pageCount: Int { length / PageKind.base.alignment }

    /// madvise over the whole mapping or a part of it.
    public func advise(_ advice: Int32, name: String, offset: Int = 0, length: Int? = nil) throws(SystemError) {
        if madvise(base + offset, length ?? (self.length - offset), advice) != 0 {
            throw SystemError.current("madvise(\(name))")
        }
    }

    /// Writes one byte in every base page of the first `bytes` (all by default): the
    /// first-touch fault for each.
    public func touch(stride: Int = PageKind.base.alignment, bytes: Int? = nil) {
        var offset = 0
        let p = base.assumingMemoryBound(to: UInt8.self)
        let end = min(bytes ?? length, length)
        while offset < end {
            p[offset] = 1
            offset += stride
        }
    }
}

public enum System {
    public static let pageSize: Int = Int(sysconf(Int32(_SC_PAGESIZE)))
    public static let onlineCPUs: Int = Int(sysconf(Int32(_SC_NPROCESSORS_ONLN)))
    public static var isRoot: Bool { geteuid() == 0 }
    /// The CPUs online now (/sys/devices/system/cpu/online), which need not be 0..<onlineCPUs.
    public static var onlineCPUSet: Set<Int> {
        guard let text = ProcFile.readIfPresent("/sys/devices/system/cpu/online"), let cpus = try? CPUList.parse(text) else {
            return Set(0..<max(onlineCPUs, 1))
        }
        return Set(cpus)
    }
}

/// A mapping of a file or memfd (MAP_SHARED or MAP_PRIVATE), unmapped when released. The
/// descriptor is owned by the mapping when `ownsDescriptor` is true.
public final class FileMapping: @unchecked Sendable {
    // @unchecked: as AnonymousMapping — constants, and memory shared on purpose.
    public let base: UnsafeMutableRawPointer
    public let length: Int
    public let fd: Int32
    private let ownsDescriptor: Bool

    public init(fd: Int32, length: Int, offset: Int = 0, shared: Bool = true, ownsDescriptor: Bool = false) throws(SystemError) {
        let p = mmap(nil, length, PROT_READ | PROT_WRITE, shared ? MAP_SHARED : MAP_PRIVATE, fd, off_t(offset))
        if p == MAP_FAILED || p == nil { throw SystemError.current("mmap(fd \(fd), \(length) bytes)") }
        self.base = p!
        self.length = length
        self.fd = fd
        self.ownsDescriptor = ownsDescriptor
    }

    /// An anonymous memory file (memfd_create) of `length` bytes, mapped shared: shmem-backed
    /// memory, as userfaultfd's MINOR mode and shmem THP need.
    public static func memfd(name: String, length: Int, hugetlb: Bool = false) throws(SystemError) -> FileMapping {
        let fd = memlab_memfd_create(name, 0x0001 /* MFD_CLOEXEC */ | (hugetlb ? MFD_HUGETLB : 0))
        if fd < 0 { throw SystemError.current("memfd_create(\(name))") }
        if ftruncate(fd, off_t(length)) != 0 {
            let e = SystemError.current("ftruncate(memfd, \(length))")
            close(fd)
            throw e
        }
        do throws(SystemError) {
            return try FileMapping(fd: fd, length: length, ownsDescriptor: true)
        } catch {
            close(fd)
            throw error
        }
    }

    deinit {
        munmap(base, length)
        if ownsDescriptor { close(fd) }
    }
}
