import LazyRestore

/// The external handler's session protocol (lazy-restore handler=external): the first byte
/// picks the decoder — even: the session header the handler reads from the restore, odd: the
/// stats header the restore reads back (for a 1024-page region) — then 16 little-endian u64.
/// Accepted: the decoder took the words (and every promise about them held).
extension FuzzTarget {
    static let uffdhandler = FuzzTarget(name: "uffdhandler", maxLen: 1 + 16 * 8,
                                        summary: "external handler protocol: SessionConfig.decode / HandlerStats.decode") { data in
        var r = FuzzBytes(data)
        let role = r.u8()
        var words: [UInt64] = []
        for _ in 0..<ExternalHandlerWire.sessionWords { words.append(r.u64()) }
        if role & 1 == 0 {
            return ExternalHandlerWire.session(words) { ok, what in fuzzInvariant(ok, what) }
        }
        return ExternalHandlerWire.stats(words, maxCount: 1024) { ok, what in fuzzInvariant(ok, what) }
    }
}
