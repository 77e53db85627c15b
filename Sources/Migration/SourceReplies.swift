import Transfer
/// The source's checks of what the destination answers, one per message, socket-free (the
/// fuzzer runs them too). Each throws unless the frame is exactly the answer expected.
public enum SourceReplies {
    /// WELCOME(version) or REFUSE(reason).
    public static func welcome(_ f: Frame) throws(WireError) {
        switch f.type {
        case .welcome:
            var r = PayloadReader(f)
            let v = try r.u32()
            try r.end()
            if v != Wire.protocolVersion { throw .malformed("destination speaks protocol version \(v), we speak \(Wire.protocolVersion)") }
        case .refuse: throw .refused(PeerText.decode(f.payload))
        default: throw .malformed("expected WELCOME or REFUSE, got \(f.type)")
        }
    }

    public static func pong(_ f: Frame, nonce: UInt64) throws(WireError) {
        guard f.type == .pong else { throw .malformed("expected PONG, got \(f.type)") }
        var r = PayloadReader(f)
        let got = try r.u64()
        try r.end()
        if got != nonce { throw .malformed("PONG for PING \(got); sent PING \(nonce)") }
    }

    public static func roundAck(_ f: Frame, round: Int, pages: Int) throws(WireError) {
        guard f.type == .roundAck else { throw .malformed("expected ROUND_ACK, got \(f.type)") }
        var r = PayloadReader(f)
        let gotRound = try r.u32(), gotPages = try r.u32()
        try r.end()
        if UInt64(gotRound) != UInt64(clamping: round) || UInt64(gotPages) != UInt64(clamping: pages) {
            throw .mismatch("destination acknowledged round \(gotRound) with \(gotPages) pages; sent round \(round) with \(pages)")
        }
    }

    public static func resumed(_ f: Frame, total: Int) throws(WireError) {
        guard f.type == .resumed else { throw .malformed("expected RESUMED, got \(f.type)") }
        var r = PayloadReader(f)
        let got = try r.u64()
        try r.end()
        if got != UInt64(clamping: total) { throw .mismatch("destination received \(got) pages, source sent \(total)") }
    }

    /// The destination's checksum.
    public static func verified(_ f: Frame) throws(WireError) -> UInt64 {
        guard f.type == .verified else { throw .malformed("expected VERIFIED, got \(f.type)") }
        var r = PayloadReader(f)
        let sum = try r.u64()
        try r.end()
        return sum
    }
}
