#if canImport(Glibc)
import Glibc
#endif

/// The frame header of the migration protocol (docs/migration-protocol.md, "Frames"), decoded
/// from its 8 bytes alone: socket-free, so `WireConnection`'s reader and the fuzzer run the
/// same checks.
public enum FrameHeader {
    public static let size = 8

    /// The type and payload length of a header, or why it is malformed (magic, type, flags,
    /// length over `Wire.maxPayload`). `b` must hold at least 8 bytes.
    public static func decode(_ b: UnsafeRawBufferPointer) -> Result<(type: MessageType, length: Int), WireError> {
        guard b.count >= size else { return .failure(.malformed("frame header of \(b.count) bytes")) }
        guard b[0] == Wire.magic.0, b[1] == Wire.magic.1 else {
            return .failure(.malformed("bad frame magic \(String(b[0], radix: 16)) \(String(b[1], radix: 16)) (expected 4d 4c): not a memlab migration peer"))
        }
        guard let type = MessageType(rawValue: b[2]) else { return .failure(.malformed("unknown message type \(b[2])")) }
        guard b[3] == 0 else { return .failure(.malformed("\(type) frame with flags \(b[3]) (reserved, must be 0)")) }
        // u32 read byte by byte: no alignment assumption, and an Int of a u32 never traps.
        let length = Int(UInt32(b[4]) | UInt32(b[5]) << 8 | UInt32(b[6]) << 16 | UInt32(b[7]) << 24)
        guard length <= Wire.maxPayload else {
            return .failure(.malformed("\(type) payload of \(length) bytes exceeds \(Wire.maxPayload)"))
        }
        return .success((type, length))
    }

    public static func encode(_ type: MessageType, length: Int) -> [UInt8] {
        let n = UInt32(clamping: length)
        return [Wire.magic.0, Wire.magic.1, type.rawValue, 0, UInt8(n & 0xff), UInt8(n >> 8 & 0xff), UInt8(n >> 16 & 0xff), UInt8(n >> 24)]
    }
}

/// Text that came from a peer (REFUSE, ERROR), made safe to print: at most `limit` bytes are
/// decoded (a 16 MiB ERROR is not copied into a message), and control characters — a
/// terminal escape sequence among them — are shown as `?`.
public enum PeerText {
    public static let limit = 1024

    public static func decode<C: Collection>(_ bytes: C) -> String where C.Element == UInt8 {
        let head = bytes.prefix(limit)
        var s = String(decoding: head, as: UTF8.self)
        if s.unicodeScalars.contains(where: { $0.value < 0x20 || $0.value == 0x7f || (0x80..<0xa0).contains($0.value) }) {
            s = String(String.UnicodeScalarView(s.unicodeScalars.map { $0.value < 0x20 || $0.value == 0x7f || (0x80..<0xa0).contains($0.value) ? "?" : $0 }))
        }
        let total = bytes.count
        return total > limit ? s + " … (\(total) bytes in all)" : s
    }
}

extension Wire {
    /// The longest any memlab network deadline may be (a day): the range the CLI accepts, and
    /// what every conversion to `timeval`/`timespec` below stays within.
    public static let maxTimeoutS = 86_400.0

    /// Whether `s` is a usable deadline: finite, positive, at most `maxTimeoutS`.
    public static func validTimeout(_ s: Double) -> Bool { s.isFinite && s > 0 && s <= maxTimeoutS }

    /// A `timeval` for a deadline of `s` seconds that never traps: NaN or a value ≤ 0 becomes
    /// 1 ms (0 would mean "no deadline" to the kernel: a hang), anything above `maxTimeoutS`
    /// becomes that.
    public static func timeval(seconds s: Double) -> Glibc.timeval {
        let t = s.isNaN || s <= 0 ? 0.001 : min(s, maxTimeoutS)
        let whole = t.rounded(.down)
        return Glibc.timeval(tv_sec: Int(whole), tv_usec: Int((t - whole) * 1e6))
    }
}
