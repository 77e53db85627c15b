#if canImport(Glibc)
import Glibc
#endif

/// Per-page truth from the kernel: /proc/self/pagemap gives each virtual page's PFN (root
/// only: unprivileged readers see PFN 0) and /proc/kpageflags that frame's flags. This is how
/// a scenario checks what *its own* region holds, independent of any counter that ksmd or
/// khugepaged updates later.
public enum PageFlags {
    /// Bit numbers in /proc/kpageflags (include/uapi/linux/kernel-page-flags.h).
    public static let ksm: UInt64 = 1 << 21
    /// Set for every page of a large anonymous folio: PMD THP and mTHP sizes alike.
    public static let thp: UInt64 = 1 << 22
    public static let huge: UInt64 = 1 << 17
    public static let zeroPage: UInt64 = 1 << 24

    public struct Census: Sendable, Equatable {
        public var present = 0
        public var ksm = 0
        public var zeroPage = 0
        public var thp = 0
        /// Frames of a hugetlbfs page (KPF_HUGE).
        public var huge = 0
        /// Indices (in base pages from the start) of the pages mapped to a KSM page, when asked.
        public var ksmPageIndices: [Int] = []
    }

    /// Walks [base, base+length) page by page.
    public static func census(_ base: UnsafeRawPointer, length: Int, listKSM: Bool = false) throws(SystemError) -> Census {
        let page = System.pageSize
        let pagemap = open("/proc/self/pagemap", O_RDONLY | O_CLOEXEC)
        if pagemap < 0 { throw SystemError.current("open", path: "/proc/self/pagemap") }
        defer { close(pagemap) }
        let flagsFD = open("/proc/kpageflags", O_RDONLY | O_CLOEXEC)
        if flagsFD < 0 { throw SystemError.current("open", path: "/proc/kpageflags") }
        defer { close(flagsFD) }

        let pages = length / page
        var entries = [UInt64](repeating: 0, count: pages)
        let first = UInt(bitPattern: base) / UInt(page)
        let want = pages * 8
        let got = entries.withUnsafeMutableBytes { pread(pagemap, $0.baseAddress, want, off_t(first * 8)) }
        if got != want { throw SystemError.current("pread", path: "/proc/self/pagemap") }
        var c = Census()
        for (index, e) in entries.enumerated() where e & (1 << 63) != 0 {
            c.present += 1
            let pfn = e & ((1 << 55) - 1)
            if pfn == 0 { throw SystemError(errno: EPERM, call: "pagemap PFN (needs CAP_SYS_ADMIN)", path: "/proc/self/pagemap") }
            var flags: UInt64 = 0
            if pread(flagsFD, &flags, 8, off_t(pfn * 8)) != 8 { throw SystemError.current("pread", path: "/proc/kpageflags") }
            if flags & ksm != 0 {
                c.ksm += 1
                if listKSM { c.ksmPageIndices.append(index) }
            }
            if flags & zeroPage != 0 { c.zeroPage += 1 }
            if flags & thp != 0 { c.thp += 1 }
            if flags & huge != 0 { c.huge += 1 }
        }
        return c
    }
}
