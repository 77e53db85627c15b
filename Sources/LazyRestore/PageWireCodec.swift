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

/// The arguments of `memlab _pagesource key=value …` (what `PageSource.process` and
/// `memlab pagesource` pass), parsed without trapping: every key known, every value in range.
public struct PageServerOptions: Sendable, Equatable {
    public enum Kind: String, Sendable { case unix, tcp }
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

    public static let usage = "needs kind=unix|tcp listen= pages= seed= zero_ratio= [ready=] [parent=] [announce=0|1] [max_connections=1…4096] [idle_timeout=SECONDS]"

    public static func parse(_ arguments: [String]) -> Result<PageServerOptions, PageWireError> {
        var o = PageServerOptions()
        var seen: Set<String> = []
        for a in arguments {
            guard let eq = a.firstIndex(of: "=") else { return .failure(PageWireError("'\(a)' is not key=value")) }
            let key = String(a[..<eq]), value = String(a[a.index(after: eq)...])
            guard seen.insert(key).inserted else { return .failure(PageWireError("\(key)= given twice")) }
            func bad(_ what: String) -> Result<PageServerOptions, PageWireError> { .failure(PageWireError("\(key)='\(value)': \(what)")) }
            switch key {
            case "kind":
                guard let k = Kind(rawValue: value) else { return bad("expected unix or tcp") }
                o.kind = k
            case "listen":
                guard !value.isEmpty else { return bad("empty") }
                o.listen = value
            case "pages":
                guard let n = Int(value), (1...maxPages).contains(n) else { return bad("expected 1…\(maxPages)") }
                o.pages = n
            case "seed":
                guard let n = UInt64(value) else { return bad("expected an unsigned 64-bit integer") }
                o.seed = n
            case "zero_ratio":
                guard let r = Double(value), r.isFinite, (0...1).contains(r) else { return bad("expected 0…1") }
                o.zeroRatio = r
            case "ready":
                guard !value.isEmpty else { return bad("empty") }
                o.ready = value
            case "parent":
                guard let p = Int32(value), p > 0 else { return bad("expected a process id") }
                o.parent = p
            case "announce":
                guard value == "0" || value == "1" else { return bad("expected 0 or 1") }
                o.announce = value == "1"
            case "max_connections":
                guard let n = Int(value), maxConnectionsRange.contains(n) else { return bad("expected \(maxConnectionsRange.lowerBound)…\(maxConnectionsRange.upperBound)") }
                o.maxConnections = n
            case "idle_timeout":
                guard let t = Double(value), t.isFinite, idleTimeoutRange.contains(t) else { return bad("expected 0…\(Int(Deadline.maxS)) seconds (0: none)") }
                o.idleTimeoutS = t
            default:
                return .failure(PageWireError("unknown argument \(key)="))
            }
        }
        for k in ["kind", "listen", "pages", "seed", "zero_ratio"] where !seen.contains(k) {
            return .failure(PageWireError("\(k)= missing"))
        }
        // sun_path holds 107 bytes and a NUL: a longer path would be cut silently.
        if o.kind == .unix && o.listen.utf8.count > 107 { return .failure(PageWireError("listen= path longer than 107 bytes")) }
        if o.kind == .tcp {
            do { _ = try SocketAddress.tcp(o.listen) } catch { return .failure(PageWireError("listen='\(o.listen)': \(error)")) }
        }
        return .success(o)
    }
}
