import Guests
import LinuxMM

/// What a guest's agent sends back (docs/guest-agent-protocol.md): the first byte picks the
/// request the replies answer, the rest is the byte stream from the guest — frames cut by
/// `AgentMessage.nextFrame` (the length bound), each checked as a reply and decoded (HELLO's
/// fields and release text, the timed triples, meminfo text). Accepted: every byte made whole
/// frames and each was a well-formed reply.
extension FuzzTarget {
    static let agent = FuzzTarget(name: "agent", maxLen: 1 << 17, summary: "guest agent replies: frames, HELLO, fill/dirty/chase/checksum, meminfo") { data in
        var f = FuzzBytes(data)
        let requests = AgentMessage.Request.allCases
        let request = requests[Int(f.u8()) % requests.count]
        var buffer = [UInt8](f.rest())
        var all = true
        while true {
            do throws(AgentError) {
                guard let (type, payload) = try AgentMessage.nextFrame(&buffer) else { break }
                fuzzInvariant(payload.count <= AgentMessage.maxPayload, "a frame over the bound was taken")
                let body = try AgentMessage.check(reply: type, payload: payload, to: request)
                switch request {
                case .hello: _ = try AgentHello(payload: body).kernelRelease
                case .fill, .dirtyStop, .chase, .checksum: _ = AgentTriple(body).c
                case .meminfo: _ = MemInfo(text: String(decoding: body, as: UTF8.self)).memTotal
                case .dirtyStart, .free: break
                }
            } catch {
                _ = error.description
                all = false
                if case .malformed = error, buffer.count >= 8 { break }   // the stream is lost: as the client does
            }
        }
        return all && buffer.isEmpty
    }
}
