#if canImport(Glibc)
import Glibc
#endif
import Foundation

/// A raw TCP peer for the network tests: it speaks the frame format (magic "ML", type, flags,
/// u32 length) byte by byte, so a test can send what no memlab would.
final class WireTestClient {
    let fd: Int32

    /// Connects to 127.0.0.1:`port`, retrying for `seconds` while nothing listens yet.
    init?(port: UInt16, seconds: Double = 5, receiveBuffer: Int32? = nil) {
        var sa = sockaddr_in()
        sa.sin_family = sa_family_t(AF_INET)
        sa.sin_port = port.bigEndian
        sa.sin_addr.s_addr = inet_addr("127.0.0.1")
        var fd: Int32 = -1
        let ok = waitFor(seconds) {
            if fd >= 0 { close(fd) }
            fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue) | Int32(SOCK_CLOEXEC.rawValue), 0)
            if var rb = receiveBuffer { setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rb, 4) }
            return withUnsafePointer(to: &sa) { $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) } } == 0
        }
        guard ok else { close(fd); return nil }
        self.fd = fd
        setTimeout(5)
    }

    deinit { close(fd) }

    func setTimeout(_ s: Double) {
        var tv = timeval(tv_sec: Int(s), tv_usec: Int((s - s.rounded(.down)) * 1e6))
        setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
        setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, socklen_t(MemoryLayout<timeval>.size))
    }

    static func frame(_ type: UInt8, _ payload: [UInt8]) -> [UInt8] {
        let n = UInt32(payload.count)
        return [0x4D, 0x4C, type, 0, UInt8(n & 0xff), UInt8(n >> 8 & 0xff), UInt8(n >> 16 & 0xff), UInt8(n >> 24)] + payload
    }

    static func le32(_ v: UInt32) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }
    static func le64(_ v: UInt64) -> [UInt8] { withUnsafeBytes(of: v.littleEndian) { Array($0) } }

    /// Sends all of `bytes`; returns how many the kernel took before an error or the timeout.
    @discardableResult
    func send(_ bytes: [UInt8]) -> Int {
        var done = 0
        while done < bytes.count {
            let w = bytes.withUnsafeBytes { Glibc.send(fd, $0.baseAddress! + done, bytes.count - done, Int32(MSG_NOSIGNAL)) }
            if w < 0 { if errno == EINTR { continue }; break }
            done += w
        }
        return done
    }

    func send(_ type: UInt8, _ payload: [UInt8]) { send(Self.frame(type, payload)) }

    /// Exactly `n` bytes, or nil at end of stream, an error or the timeout.
    func read(_ n: Int) -> [UInt8]? {
        var out = [UInt8](repeating: 0, count: n)
        var done = 0
        while done < n {
            let r = out.withUnsafeMutableBytes { recv(fd, $0.baseAddress! + done, n - done, 0) }
            if r < 0 && errno == EINTR { continue }
            if r <= 0 { return nil }
            done += r
        }
        return out
    }

    /// The next frame: its type and payload.
    func readFrame() -> (type: UInt8, payload: [UInt8])? {
        guard let h = read(8), h[0] == 0x4D, h[1] == 0x4C else { return nil }
        let n = Int(h[4]) | Int(h[5]) << 8 | Int(h[6]) << 16 | Int(h[7]) << 24
        guard n <= 16 << 20, let p = n == 0 ? [] : read(n) else { return nil }
        return (h[2], p)
    }

    /// Whether the peer has closed (end of stream) within the timeout.
    func closedByPeer() -> Bool {
        var b: UInt8 = 0
        return recv(fd, &b, 1, 0) == 0
    }
}

/// This machine's image header, as a source here would send it in its HELLO.
func localImageHeader(regionBytes: String, pageSize: String? = nil, extra: String = "") -> String {
    let cpuinfo = (try? String(contentsOfFile: "/proc/cpuinfo", encoding: .utf8)) ?? ""
    let flagsLine = cpuinfo.split(separator: "\n").first { $0.hasPrefix("flags") || $0.hasPrefix("Features") }
    let flags = flagsLine.map { String($0.split(separator: ":", maxSplits: 1)[1]).trimmingCharacters(in: .whitespaces) } ?? ""
    var u = utsname()
    uname(&u)
    let arch = withUnsafeBytes(of: &u.machine) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    return "arch=\(arch)\npage_size=\(pageSize ?? String(getpagesize()))\ncpu_model=test\ncpu_flags=\(flags)\nregion_bytes=\(regionBytes)\nchecksum=0\n\(extra)"
}

/// A field of /proc/PID/status in kB (VmHWM, VmSize, Threads…).
func procStatus(_ pid: Int32, _ field: String) -> Int? {
    guard let text = try? String(contentsOfFile: "/proc/\(pid)/status", encoding: .utf8) else { return nil }
    for line in text.split(separator: "\n") where line.hasPrefix(field + ":") {
        return Int(line.dropFirst(field.count + 1).split(whereSeparator: { $0 == " " || $0 == "\t" }).first ?? "")
    }
    return nil
}
