#if canImport(Glibc)
import Glibc
#endif

/// The frame both of memlab's page protocols use — the migration protocol
/// (docs/migration-protocol.md) and the lazy-restore page protocol
/// (docs/lazy-restore-protocol.md) — encoded and decoded here only:
///
///     0  2  magic "ML"
///     2  1  type (each protocol names its own)
///     3  1  flags (0)
///     4  4  payload length, little-endian (at most maxPayload)
///     8  …  payload
///
/// Socket-free and allocation-free on its success paths, so the fault path, the readers and
/// the fuzzers run the same checks on bytes.
public enum FrameHeader {
    public static let size = 8
    public static let magic: (UInt8, UInt8) = (0x4D, 0x4C)
    /// The largest payload either protocol sends or takes (16 MiB): a length above it is
    /// refused before anything is allocated for it.
    public static let maxPayload = 16 << 20

    /// Why 8 bytes are not a frame header.
    public enum Malformed: Error, Equatable, Sendable, CustomStringConvertible {
        case short(Int)
        case magic(UInt8, UInt8)
        case flags(type: UInt8, flags: UInt8)
        case tooLong(type: UInt8, length: Int)
        public var description: String {
            switch self {
            case .short(let n): return "frame header of \(n) bytes"
            case .magic(let a, let b):
                return "bad frame magic \(String(a, radix: 16)) \(String(b, radix: 16)) (expected 4d 4c): not a memlab peer"
            case .flags(let t, let f): return "frame of type \(t) with flags \(f) (reserved, must be 0)"
            case .tooLong(let t, let n): return "frame of type \(t) with a payload of \(n) bytes, over \(FrameHeader.maxPayload)"
            }
        }
    }

    /// The type and payload length of the 8 bytes at `b`, or why they are no header (magic,
    /// flags, a length over `maxPayload`). Never traps: the u32 is read unaligned.
    @inline(__always)
    public static func decode(_ b: UnsafeRawPointer) -> Result<(type: UInt8, length: Int), Malformed> {
        let m0 = b.load(fromByteOffset: 0, as: UInt8.self), m1 = b.load(fromByteOffset: 1, as: UInt8.self)
        guard m0 == magic.0, m1 == magic.1 else { return .failure(.magic(m0, m1)) }
        let type = b.load(fromByteOffset: 2, as: UInt8.self)
        let flags = b.load(fromByteOffset: 3, as: UInt8.self)
        guard flags == 0 else { return .failure(.flags(type: type, flags: flags)) }
        let length = Int(UInt32(littleEndian: b.loadUnaligned(fromByteOffset: 4, as: UInt32.self)))
        guard length <= maxPayload else { return .failure(.tooLong(type: type, length: length)) }
        return .success((type, length))
    }

    /// The same on a buffer that may be shorter than a header.
    public static func decode(_ b: UnsafeRawBufferPointer) -> Result<(type: UInt8, length: Int), Malformed> {
        guard b.count >= size, let p = b.baseAddress else { return .failure(.short(b.count)) }
        return decode(p)
    }

    /// Writes a header for `length` payload bytes at `p` (8 bytes). `length` is clamped to
    /// u32: senders check it against `maxPayload` first.
    @inline(__always)
    public static func encode(_ type: UInt8, length: Int, into p: UnsafeMutableRawPointer) {
        p.storeBytes(of: magic.0, toByteOffset: 0, as: UInt8.self)
        p.storeBytes(of: magic.1, toByteOffset: 1, as: UInt8.self)
        p.storeBytes(of: type, toByteOffset: 2, as: UInt8.self)
        p.storeBytes(of: 0, toByteOffset: 3, as: UInt8.self)
        p.storeBytes(of: UInt32(clamping: length).littleEndian, toByteOffset: 4, as: UInt32.self)
    }

    /// A header as bytes (off the fast paths).
    public static func encode(_ type: UInt8, length: Int) -> [UInt8] {
        var h = [UInt8](repeating: 0, count: size)
        h.withUnsafeMutableBytes { encode(type, length: length, into: $0.baseAddress!) }
        return h
    }

    /// A whole frame carrying text (ERROR, REFUSE): at most `limit` bytes of it.
    public static func textFrame(_ type: UInt8, _ text: String, limit: Int = 4096) -> [UInt8] {
        let body = Array(text.utf8.prefix(limit))
        return encode(type, length: body.count) + body
    }
}

/// Text that came from a peer (REFUSE, ERROR, a snapshot header), made safe to print: at most
/// `limit` bytes are decoded (a 16 MiB ERROR is not copied into a message), and control
/// characters — a terminal escape sequence among them — are shown as `?`.
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

/// Network deadlines: the range every memlab timeout is checked against, and conversions
/// to the kernel's structures that never trap.
public enum Deadline {
    /// The longest any memlab network deadline may be (a day): the range the CLI accepts, and
    /// what every conversion to `timeval`/`timespec` stays within.
    public static let maxS = 86_400.0

    /// Whether `s` is a usable deadline: finite, positive, at most `maxS`.
    public static func valid(_ s: Double) -> Bool { s.isFinite && s > 0 && s <= maxS }

    /// A `timeval` for a deadline of `s` seconds: NaN or a value ≤ 0 becomes 1 ms (0 would
    /// mean "no deadline" to the kernel: a hang), anything above `maxS` becomes that.
    public static func timeval(seconds s: Double) -> Glibc.timeval {
        let t = s.isNaN || s <= 0 ? 0.001 : min(s, maxS)
        let whole = t.rounded(.down)
        return Glibc.timeval(tv_sec: Int(whole), tv_usec: Int((t - whole) * 1e6))
    }
}
