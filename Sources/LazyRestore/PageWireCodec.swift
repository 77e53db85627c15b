#if canImport(Glibc)
import Glibc
#endif
import LinuxMM
import Transfer

/// Why a page-protocol message is refused: the text the server sends in its ERROR frame, or
/// the client's reason.
public struct PageWireError: Error, Equatable, CustomStringConvertible, Sendable {
    public let reason: String
    public init(_ reason: String) { self.reason = reason }
    public var description: String { reason }
}

/// The page protocol's checks (docs/lazy-restore-protocol.md), on bytes alone: `PageServer`
/// and `PageSource.readHello` call them on what they read, the fuzzer on what it makes up.
/// The success paths allocate nothing (the server answers GETs with them).
extension PageWire {
    /// HELLO's payload: u32 version, u32 page size, u64 pages.
    public static let helloPayload = 16

    /// The client's check of a HELLO payload (16 bytes) against the image it verifies with:
    /// compared as the wire's integers, so 2^64−1 pages is a refusal, not a trap.
    public static func checkHello(_ p: UnsafeRawBufferPointer, pages: Int, pageSize: Int) -> PageWireError? {
        guard p.count == helloPayload else { return PageWireError("the page source's HELLO has \(p.count) bytes of payload, not \(helloPayload)") }
        let v = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 0, as: UInt32.self))
        let ps = UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4, as: UInt32.self))
        let np = UInt64(littleEndian: p.loadUnaligned(fromByteOffset: 8, as: UInt64.self))
        guard v == version, ps == UInt32(clamping: pageSize), np == UInt64(clamping: pages) else {
            return PageWireError("the page source serves version \(v), page size \(ps), \(np) pages; expected v\(version), \(pageSize), \(pages)")
        }
        return nil
    }

    /// The server's check of a request header: a GET whose payload can hold 1…maxRuns runs.
    /// Returns the payload length to read.
    @inline(__always)
    public static func checkGetHeader(_ b: UnsafeRawPointer) -> Result<Int, PageWireError> {
        switch FrameHeader.decode(b) {
        case .failure(let e): return .failure(PageWireError(e.description))
        case .success(let (type, length)):
            guard type == get else { return .failure(PageWireError("expected a GET frame, got type \(type)")) }
            guard length >= 4, length <= 4 + 8 * maxRuns, (length - 4) % 8 == 0 else {
                return .failure(PageWireError("GET payload of \(length) bytes"))
            }
            return .success(length)
        }
    }

    /// The server's check of a GET payload (`length` bytes, from `checkGetHeader`) against an
    /// image of `imagePages` pages of `pageSize`: n runs, each non-empty and inside the image,
    /// at most `maxPages(pageSize:)` in all (a DATA frame within `FrameHeader.maxPayload`). Calls `run(k, first, count)` for each run as it is checked (the server builds
    /// its iovecs there); returns the pages asked for.
    @inline(__always)
    public static func checkGet(_ p: UnsafeRawPointer, length: Int, imagePages: Int, pageSize: Int,
                                run: (_ k: Int, _ first: Int, _ count: Int) -> Void) -> Result<Int, PageWireError> {
        guard length >= 4 else { return .failure(PageWireError("GET payload of \(length) bytes")) }
        let n = Int(UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 0, as: UInt32.self)))
        guard n >= 1, n <= maxRuns, 4 + 8 * n == length else { return .failure(PageWireError("GET with \(n) runs in \(length) bytes")) }
        var total = 0
        let maxPages = maxPages(pageSize: pageSize)
        for k in 0..<n {
            // u32s widened to Int: first + count cannot overflow.
            let first = Int(UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 4 + 8 * k, as: UInt32.self)))
            let count = Int(UInt32(littleEndian: p.loadUnaligned(fromByteOffset: 8 + 8 * k, as: UInt32.self)))
            guard count > 0, first + count <= imagePages else {
                return .failure(PageWireError("GET run \(first)+\(count) outside the image of \(imagePages) pages"))
            }
            total += count
            guard total <= maxPages else { return .failure(PageWireError("GET for more than \(maxPages) pages")) }
            run(k, first, count)
        }
        return .success(total)
    }
}

/// What a page source process serves (`memlab _pagesource --kind=… …`, started by
/// `PageSource.process`; `memlab pagesource` serves the same in its own process), and its
/// checks: every value in range.
public struct PageServerOptions: Sendable, Equatable {
    public enum Kind: String, Sendable, CaseIterable { case unix, tcp }
    /// lazy-restore's largest image (16 GiB of the kernel's pages): GET runs address pages in
    /// 32 bits.
    public static let maxPages = (16 << 30) / System.pageSize
    public static let maxConnectionsRange = 1...4096
    public static let idleTimeoutRange = 0.0...Deadline.maxS

    public var kind = Kind.tcp
    public var listen = ""
    public var pages = 0
    public var seed: UInt64 = 0
    public var zeroRatio = 0.0
    public var ready: String?
    public var parent: Int32?
    public var announce = false
    /// Connections served at once; one more gets ERROR and is closed.
    public var maxConnections = 64
    /// Seconds a connection may go without a request (or leave an answer untaken); 0: no limit
    /// (a restore's own source process, which dies with the restore).
    public var idleTimeoutS = 0.0

    public init() {}

    /// The command line after the executable: `_pagesource`, then the fields as options, in
    /// the `=` form throughout (no value is taken for an option). The memlab target's hidden
    /// `_pagesource` command parses them back and refuses them unless `check()` passes.
    public var arguments: [String] {
        var a = ["_pagesource", "--kind=\(kind.rawValue)", "--listen=\(listen)", "--pages=\(pages)", "--seed=\(seed)",
                 "--zero-ratio=\(zeroRatio)", "--max-connections=\(maxConnections)", "--idle-timeout=\(idleTimeoutS)"]
        if let ready { a.append("--ready=\(ready)") }
        if let parent { a.append("--parent=\(parent)") }
        if announce { a.append("--announce") }
        return a
    }

    /// Why these options cannot be served (nil: every value is in range). They come from a
    /// command line: hostile input is normal input, and nothing here may trap.
    public func check() -> PageWireError? {
        func bad(_ option: String, _ value: String, _ what: String) -> PageWireError { PageWireError("--\(option) '\(value)': \(what)") }
        if listen.isEmpty { return bad("listen", listen, "empty") }
        // sun_path holds 107 bytes and a NUL: a longer path would be cut silently.
        if kind == .unix && listen.utf8.count > 107 { return bad("listen", listen, "a socket path longer than 107 bytes") }
        if kind == .tcp {
            do { _ = try SocketAddress.tcp(listen) } catch { return bad("listen", listen, "\(error) (expected IPv4:PORT)") }
        }
        if !(1...Self.maxPages).contains(pages) { return bad("pages", "\(pages)", "expected 1…\(Self.maxPages)") }
        if !(zeroRatio.isFinite && (0...1).contains(zeroRatio)) { return bad("zero-ratio", "\(zeroRatio)", "expected 0…1") }
        if let ready, ready.isEmpty { return bad("ready", ready, "empty") }
        if let parent, parent <= 0 { return bad("parent", "\(parent)", "expected a process id") }
        if !Self.maxConnectionsRange.contains(maxConnections) {
            return bad("max-connections", "\(maxConnections)", "expected \(Self.maxConnectionsRange.lowerBound)…\(Self.maxConnectionsRange.upperBound)")
        }
        if !(idleTimeoutS.isFinite && Self.idleTimeoutRange.contains(idleTimeoutS)) {
            return bad("idle-timeout", "\(idleTimeoutS)", "expected 0…\(Int(Deadline.maxS)) seconds (0: none)")
        }
        return nil
    }
}
