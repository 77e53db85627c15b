#if canImport(Glibc)
import Glibc
#endif
import EntryPoints
import Scenarios
import LinuxMM
import Transfer
import LazyRestore

/// The lazy-restore page protocol (docs/lazy-restore-protocol.md):
///
/// - role 0: a page source of u32 `pages` pages reading a stream of requests: each header
///   through `PageWire.checkGetHeader`, each payload through `PageWire.checkGet` (what
///   `PageServer.serve` does before its sendmsg). Accepted: at least one GET, all valid.
/// - role 1: a restore's check of a source's first frame (`FrameHeader.decode`, then
///   `checkHello` against an image of u64 `pages` pages clamped to Int, or an ERROR's text
///   through `PeerText`). Accepted: the HELLO matches.
///
/// Input: role byte, then the role's fields and bytes.
///
/// `pagesource`: `memlab _pagesource` arguments, NUL-separated, parsed by its hidden command
/// (`PageSourceProcessCommand.parse`: swift-argument-parser, then `PageServerOptions.check`) as
/// memlab parses them. Accepted: parsed. A target of its own: one parse costs milliseconds
/// under the sanitizers, and inside `pagewire` it made the protocol checks run 300× less often.
extension FuzzTarget {
    static let pagewire = FuzzTarget(name: "pagewire", maxLen: 1 << 15,
                                     summary: "page source: GET checks (server), HELLO/ERROR check (client)") { data in
        var r = FuzzBytes(data)
        return r.u8() % 2 == 0 ? PageWireFuzz.server(&r) : PageWireFuzz.client(&r)
    }

    static let pagesource = FuzzTarget(name: "pagesource", maxLen: 4096,
                                       summary: "memlab _pagesource arguments, parsed as memlab parses them") { data in
        var r = FuzzBytes(data)
        return PageWireFuzz.options(&r)
    }
}

enum PageWireFuzz {
    static func server(_ r: inout FuzzBytes) -> Bool {
        let pages = Int(r.u32())
        var gets = 0
        while let h = r.take(8) {
            guard case .success(let length) = PageWire.checkGetHeader(h.baseAddress!) else { return false }
            fuzzInvariant(length >= 4 && length <= 4 + 8 * PageWire.maxRuns, "GET length \(length) passed the header check")
            guard let p = r.take(length) else { return false }
            var runs = 0, sum = 0
            let result = PageWire.checkGet(p.baseAddress!, length: length, imagePages: pages, pageSize: System.pageSize) { k, first, count in
                // The server points an iovec at image.base + first × 4096 for count pages.
                fuzzInvariant(k == runs && count > 0 && first >= 0 && first + count <= pages,
                              "run \(k): \(first)+\(count) handed out for an image of \(pages) pages")
                runs += 1
                sum += count
            }
            guard case .success(let total) = result else { return false }
            fuzzInvariant(total == sum && total <= PageWire.maxPages(pageSize: System.pageSize) && runs == (length - 4) / 8, "GET total \(total) of \(runs) runs")
            gets += 1
        }
        return gets > 0
    }

    static func client(_ r: inout FuzzBytes) -> Bool {
        let pages = Int(clamping: r.u64())
        guard let h = r.take(8) else { return false }
        guard case .success(let (type, length)) = FrameHeader.decode(h.baseAddress!) else { return false }
        let rest = r.rest()
        if type == PageWire.error {
            _ = PeerText.decode(UnsafeRawBufferPointer(rebasing: rest.prefix(min(length, PeerText.limit))))
            return false
        }
        guard type == PageWire.hello, length == PageWire.helloPayload, rest.count >= PageWire.helloPayload else { return false }
        return PageWire.checkHello(UnsafeRawBufferPointer(rebasing: rest.prefix(PageWire.helloPayload)), pages: pages, pageSize: System.pageSize) == nil
    }

    static func options(_ r: inout FuzzBytes) -> Bool {
        let args = r.rest().split(separator: 0, omittingEmptySubsequences: false).map { String(decoding: $0, as: UTF8.self) }
        let command: PageSourceProcessCommand
        do { command = try PageSourceProcessCommand.parse(args) } catch {
            _ = PageSourceProcessCommand.message(for: error)
            return false
        }
        let o = command.options
        fuzzInvariant(o.check() == nil, "options accepted that their check refuses: \(o)")
        fuzzInvariant((1...PageServerOptions.maxPages).contains(o.pages), "pages=\(o.pages) accepted")
        fuzzInvariant(o.zeroRatio.isFinite && (0...1).contains(o.zeroRatio), "zero_ratio=\(o.zeroRatio) accepted")
        fuzzInvariant(PageServerOptions.maxConnectionsRange.contains(o.maxConnections), "max_connections=\(o.maxConnections) accepted")
        fuzzInvariant(o.idleTimeoutS.isFinite && o.idleTimeoutS >= 0 && o.idleTimeoutS <= Deadline.maxS, "idle_timeout=\(o.idleTimeoutS) accepted")
        // What a restore's spawner writes for these options parses back to the same.
        let again = try? PageSourceProcessCommand.parse(Array(o.arguments.dropFirst())).options
        fuzzInvariant(again == o, "\(o.arguments) parses back as \(String(describing: again))")
        return true
    }
}
