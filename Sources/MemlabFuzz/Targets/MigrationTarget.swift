#if canImport(Glibc)
import Glibc
#endif
import Scenarios
import Transfer
import Migration

/// The migration protocol as a destination or a source receives it: a byte stream cut into
/// frames by `FrameHeader.decode` (what `WireConnection`'s reader does), then
///
/// - role even: every frame through `DestinationSession` (HELLO against a fixed local CPU,
///   then PAGES / ROUND_END / FINISH / VERIFY / PING into a real region of the size the HELLO
///   asked for, at most 1 MiB here — the cap `--max-region` is); bit 1 of the role byte is
///   `--ignore-cpu-flags`. Accepted: the session verified.
/// - role odd: the frames as a source's replies, in protocol order, through `SourceReplies`
///   (WELCOME, five PONGs, ROUND_ACK of round 1 with 256 pages, RESUMED 256, VERIFIED).
///   Accepted: every reply as expected.
///
/// Input: role byte, then frames.
extension FuzzTarget {
    static let migration = FuzzTarget(name: "migration", maxLen: 1 << 16,
                                      summary: "migration frames: FrameHeader.decode + DestinationSession / SourceReplies") { data in
        var r = FuzzBytes(data)
        let role = r.u8()
        let frames = MigrationFuzz.frames(&r)
        return role & 1 == 0 ? MigrationFuzz.destination(frames, ignoreFlags: role & 2 != 0) : MigrationFuzz.source(frames)
    }
}

enum MigrationFuzz {
    static let local = ImageHeader(arch: "x86_64", pageSize: 4096, cpu: CPUIdentity(model: "fuzz", flags: ["fpu", "sse2", "avx2"]),
                                   regionBytes: 0, checksum: 0)
    static let maxRegion = 1 << 20

    /// Frames as the reader would queue them, up to the first malformed or truncated one.
    static func frames(_ r: inout FuzzBytes) -> [Frame] {
        var out: [Frame] = []
        while let h = r.take(FrameHeader.size) {
            guard case .success(let (type, length)) = FrameHeader.decode(h) else { break }
            fuzzInvariant(length >= 0 && length <= FrameHeader.maxPayload, "decoded length \(length) out of range")
            guard let t = MessageType(rawValue: type), let p = r.take(length) else { break }
            out.append(Frame(type: t, payload: Array(p)))
        }
        return out
    }

    static func destination(_ frames: [Frame], ignoreFlags: Bool) -> Bool {
        guard let first = frames.first else { return false }
        var s = DestinationSession(local: local, ignoreCPUFlags: ignoreFlags, maxRegion: maxRegion)
        let outcome: DestinationSession.HelloOutcome
        do { outcome = try s.hello(first) } catch { _ = error.description; return false }
        guard case .accept(let header, _) = outcome else { return false }
        // What a HELLO may make the destination map: never above the cap.
        fuzzInvariant(header.regionBytes <= maxRegion && s.pageCount * s.pageSize == header.regionBytes,
                      "accepted a \(header.regionBytes)-byte image over the \(maxRegion) cap")
        fuzzInvariant(header.pageSize == local.pageSize && header.arch == local.arch, "accepted a foreign arch or page size")
        let bytes = s.pageCount * s.pageSize
        // malloc'd, not mapped: AddressSanitizer sees a write one byte past the region.
        let region = UnsafeMutableRawPointer.allocate(byteCount: bytes, alignment: 8)
        defer { region.deallocate() }
        memset(region, 0, bytes)
        for f in frames.dropFirst() {
            let before = s.pagesReceived
            do {
                // SWITCH: the bitmap and the workload it asks for, checked; post-copy itself
                // (a page server, userfaultfd) is not run here: it ends at once.
                if f.type == .switchToPostcopy {
                    let sw = try s.switchToPostcopy(f)
                    fuzzInvariant(sw.pending.allSatisfy { $0 >= 0 && $0 < s.pageCount }, "a SWITCH page outside the region")
                    fuzzInvariant(zip(sw.pending, sw.pending.dropFirst()).allSatisfy { $0 < $1 }, "SWITCH pages out of order or twice")
                    fuzzInvariant(sw.threads >= 1 && sw.threads <= 64 && sw.hotPages <= s.pageCount, "a SWITCH workload out of range")
                    for p in sw.pending { memset(region + p * s.pageSize, 0, s.pageSize) }
                    try s.postcopyDone()
                    continue
                }
                let step = try s.handle(f, region: region)
                fuzzInvariant(s.inRound <= s.pageCount, "\(s.inRound) pages in a round of a \(s.pageCount)-page region")
                fuzzInvariant(s.pagesReceived >= before, "pages received went down")
                if case .last = step { return s.verified }
            } catch {
                _ = error.description
                return false
            }
        }
        return false
    }

    static func source(_ frames: [Frame]) -> Bool {
        var it = frames.makeIterator()
        do throws(WireError) {
            guard let w = it.next() else { return false }
            try SourceReplies.welcome(w)
            for i in 0..<5 {
                guard let p = it.next() else { return false }
                try SourceReplies.pong(p, nonce: UInt64(i))
            }
            guard let a = it.next() else { return false }
            try SourceReplies.roundAck(a, round: 1, pages: 256)
            guard let res = it.next() else { return false }
            try SourceReplies.resumed(res, total: 256)
            guard let v = it.next() else { return false }
            _ = try SourceReplies.verified(v)
            return true
        } catch {
            _ = error.description
            return false
        }
    }
}
