#if canImport(Glibc)
import Glibc
#endif
import LinuxMM

/// The CPU a memory image was taken on: model name and feature flags from /proc/cpuinfo
/// (the first processor's; on x86 every processor lists the same flags).
public struct CPUIdentity: Sendable, Equatable {
    public var model: String
    public var flags: [String]

    public init(model: String, flags: [String]) {
        self.model = model
        self.flags = flags
    }

    public static func parse(cpuinfo: String) -> CPUIdentity {
        var model = "unknown"
        var flags: [String] = []
        for line in cpuinfo.split(separator: "\n") {
            let parts = line.split(separator: ":", maxSplits: 1)
            guard parts.count == 2 else { continue }
            let key = trim(parts[0])
            let value = trim(parts[1])
            // x86: "model name" and "flags"; arm64: "CPU implementer"… and "Features".
            if model == "unknown" && (key == "model name" || key == "cpu model") { model = value }
            if flags.isEmpty && (key == "flags" || key == "Features") {
                flags = value.split(separator: " ").map(String.init)
            }
            if model != "unknown" && !flags.isEmpty { break }
        }
        return CPUIdentity(model: model, flags: flags)
    }

    public static func current() -> CPUIdentity {
        parse(cpuinfo: ProcFile.readIfPresent("/proc/cpuinfo") ?? "")
    }

    /// A list of flags for a message: at most 2 KiB of them (a header from a peer may name
    /// a megabyte of made-up flags), then how many there are in all.
    public static func list(_ flags: [String]) -> String {
        let all = flags.joined(separator: " ")
        guard all.utf8.count > 2048 else { return all }
        return String(decoding: all.utf8.prefix(2048), as: UTF8.self) + " … (\(flags.count) flags in all)"
    }

    /// Flags this CPU (the source's) has that `destination` lacks, sorted.
    public func missing(on destination: CPUIdentity) -> [String] {
        Set(flags).subtracting(destination.flags).sorted()
    }
}

private func trim<S: StringProtocol>(_ s: S) -> String {
    var t = Substring(s)
    while let f = t.first, f == " " || f == "\t" { t = t.dropFirst() }
    while let l = t.last, l == " " || l == "\t" { t = t.dropLast() }
    return String(t)
}

/// What describes a memory image: where it was taken and how big it is. Text, one `key=value`
/// a line, so a person can read it (`head -c 4096 snapshot`) and a test can doctor it. The same
/// text is the body of the migration protocol's HELLO.
public struct ImageHeader: Sendable, Equatable {
    public var arch: String
    public var pageSize: Int
    public var cpu: CPUIdentity
    public var regionBytes: Int
    /// FNV-1a (64-bit words) of the page data; 0 when not known (a live migration's HELLO).
    public var checksum: UInt64

    public init(arch: String, pageSize: Int, cpu: CPUIdentity, regionBytes: Int, checksum: UInt64) {
        self.arch = arch
        self.pageSize = pageSize
        self.cpu = cpu
        self.regionBytes = regionBytes
        self.checksum = checksum
    }

    public static func local(regionBytes: Int, checksum: UInt64) -> ImageHeader {
        ImageHeader(arch: HostArch.current, pageSize: System.pageSize, cpu: .current(), regionBytes: regionBytes, checksum: checksum)
    }

    public func encode() -> String {
        """
        arch=\(arch)
        page_size=\(pageSize)
        cpu_model=\(cpu.model)
        cpu_flags=\(cpu.flags.joined(separator: " "))
        region_bytes=\(regionBytes)
        checksum=\(String(checksum, radix: 16))

        """
    }

    /// The keys, all required, no others (docs/migration-protocol.md, "Image header").
    public static let keys: Set<String> = ["arch", "page_size", "cpu_model", "cpu_flags", "region_bytes", "checksum"]
    /// Page sizes a header may name: powers of two in 512 B…1 GiB (arithmetic on page counts
    /// and offsets stays far from overflow).
    public static let pageSizes = 512...(1 << 30)
    /// The largest image a header may describe (1 PiB): `16 + header + region_bytes` and every
    /// page offset fit an Int with room to spare.
    public static let maxRegionBytes = 1 << 50

    public static func parse(_ text: String) throws(ImageError) -> ImageHeader {
        try parse(bytes: Array(text.utf8))
    }

    /// Parses header text from a peer or a file: bounded (`Snapshot.maxHeader`), every key
    /// once, no control characters in a value (they would reach a terminal), numbers in range.
    public static func parse<C: Collection>(bytes: C) throws(ImageError) -> ImageHeader where C.Element == UInt8 {
        guard bytes.count <= Snapshot.maxHeader else { throw .malformed("header of \(bytes.count) bytes exceeds \(Snapshot.maxHeader)") }
        var kv: [String: String] = [:]
        for line in bytes.split(separator: UInt8(ascii: "\n")) {
            guard let eq = line.firstIndex(of: UInt8(ascii: "=")) else {
                throw .malformed("header line without '=': \(PeerText.decode(line.prefix(80)))")
            }
            let key = String(decoding: line[..<eq], as: UTF8.self)
            let value = line[line.index(after: eq)...]
            guard keys.contains(key) else { throw .malformed("unknown header key '\(PeerText.decode(line[..<eq].prefix(80)))'") }
            guard kv[key] == nil else { throw .malformed("header key \(key) given twice") }
            // Tab is allowed (a CPU model string might hold one); other controls are not.
            guard !value.contains(where: { ($0 < 0x20 && $0 != 0x09) || $0 == 0x7f }) else {
                throw .malformed("header value of \(key) contains control characters")
            }
            kv[key] = String(decoding: value, as: UTF8.self)
        }
        func need(_ k: String) throws(ImageError) -> String {
            guard let v = kv[k] else { throw .malformed("header lacks \(k)") }
            return v
        }
        guard let ps = Int(try need("page_size")), pageSizes.contains(ps), ps & (ps - 1) == 0 else {
            throw .malformed("page_size is not a power of two in \(pageSizes.lowerBound)…\(pageSizes.upperBound)")
        }
        guard let rb = Int(try need("region_bytes")), rb > 0, rb % ps == 0 else { throw .malformed("region_bytes is not a positive multiple of page_size") }
        guard rb <= maxRegionBytes else { throw .malformed("region_bytes \(rb) exceeds \(maxRegionBytes) (1 PiB)") }
        guard let sum = UInt64(try need("checksum"), radix: 16) else { throw .malformed("checksum is not hexadecimal") }
        // Shown in messages (and REFUSEd with): a name, not a megabyte.
        guard try need("arch").utf8.count <= 64 else { throw .malformed("arch longer than 64 bytes") }
        guard try need("cpu_model").utf8.count <= 512 else { throw .malformed("cpu_model longer than 512 bytes") }
        let flags = try need("cpu_flags").split(separator: " ").map(String.init)
        return ImageHeader(arch: try need("arch"), pageSize: ps, cpu: CPUIdentity(model: try need("cpu_model"), flags: flags),
                           regionBytes: rb, checksum: sum)
    }

    /// Whether this machine can take the image: same architecture and page size (else refused
    /// outright) and every CPU flag the source had (else refused unless ignored).
    public func compatibility(with local: ImageHeader) -> Compatibility {
        if arch != local.arch { return .incompatible("the image is from \(arch); this machine is \(local.arch)") }
        if pageSize != local.pageSize { return .incompatible("the image has \(pageSize)-byte pages; this machine uses \(local.pageSize)") }
        let missing = cpu.missing(on: local.cpu)
        if !missing.isEmpty { return .missingFlags(missing) }
        return .compatible
    }
}

public enum Compatibility: Sendable, Equatable {
    case compatible
    /// The destination lacks CPU flags the source had: code on the source may have used them.
    case missingFlags([String])
    case incompatible(String)
}

public enum HostArch {
    public static var current: String {
        var u = utsname()
        uname(&u)
        return withUnsafeBytes(of: &u.machine) { String(decoding: $0.prefix { $0 != 0 }, as: UTF8.self) }
    }
}

public enum ImageError: Error, CustomStringConvertible, Equatable {
    case malformed(String)
    case truncated(String)
    case io(String)
    public var description: String {
        switch self {
        case .malformed(let s): return "malformed snapshot: \(s)"
        case .truncated(let s): return "truncated snapshot: \(s)"
        case .io(let s): return s
        }
    }
    /// The reason without the "malformed snapshot" prefix (for a header that came in a HELLO).
    public var detail: String {
        switch self { case .malformed(let s), .truncated(let s), .io(let s): return s }
    }
}

/// A memory image on disk (docs/migration-protocol.md, "Snapshot file"):
///
///     0   8  magic "MEMLABSN"
///     8   4  format version, little-endian (1)
///     12  4  header length N, little-endian (at most 1 MiB)
///     16  N  header text (ImageHeader: arch, page_size, cpu_model, cpu_flags, region_bytes, checksum)
///     16+N   region_bytes bytes of page data, page after page
///
/// Nothing may follow the page data; a shorter file is truncated and refused.
public enum Snapshot {
    public static let magic: [UInt8] = Array("MEMLABSN".utf8)
    public static let version: UInt32 = 1
    public static let maxHeader = 1 << 20

    public static func write(path: String, header: ImageHeader, data: UnsafeRawPointer) throws(ImageError) {
        let fd = open(path, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0o644)
        if fd < 0 { throw .io(SystemError.current("open", path: path).description) }
        defer { close(fd) }
        let text = Array(header.encode().utf8)
        var prefix = magic
        withUnsafeBytes(of: version.littleEndian) { prefix += $0 }
        withUnsafeBytes(of: UInt32(text.count).littleEndian) { prefix += $0 }
        prefix += text
        func all(_ p: UnsafeRawPointer, _ n: Int) throws(ImageError) {
            var done = 0
            while done < n {
                let w = Glibc.write(fd, p + done, n - done)
                if w < 0 { if errno == EINTR { continue }; throw .io(SystemError.current("write", path: path).description) }
                done += w
            }
        }
        let head = UnsafeMutableRawPointer.allocate(byteCount: prefix.count, alignment: 8)
        defer { head.deallocate() }
        prefix.withUnsafeBytes { head.copyMemory(from: $0.baseAddress!, byteCount: $0.count) }
        try all(head, prefix.count)
        try all(data, header.regionBytes)
    }

    /// Reads and checks the header (and, with `verifyData`, that the data is all there and
    /// matches its checksum). Never reads page data into memory unless asked to, and then a
    /// megabyte at a time.
    public static func readHeader(path: String, verifyData: Bool = true) throws(ImageError) -> ImageHeader {
        let fd = open(path, O_RDONLY | O_CLOEXEC)
        if fd < 0 { throw .io(SystemError.current("open", path: path).description) }
        defer { close(fd) }
        var st = stat()
        if fstat(fd, &st) != 0 { throw .io(SystemError.current("fstat", path: path).description) }
        return try inspect(FileBytes(fd: fd, path: path, size: Int(st.st_size)), verifyData: verifyData).header
    }

    /// Where a snapshot's bytes come from: a file, or (for the fuzzer) memory.
    public protocol Bytes {
        /// The file's size as the file system says (may exceed what `read` can deliver).
        var size: Int { get }
        /// Reads up to `count` bytes at `offset` into `into`; 0 at the end, < 0 on error.
        func read(_ into: UnsafeMutableRawPointer, count: Int, offset: Int) -> Int
        func ioError(_ call: String) -> ImageError
    }

    struct FileBytes: Bytes {
        let fd: Int32, path: String, size: Int
        func read(_ into: UnsafeMutableRawPointer, count: Int, offset: Int) -> Int {
            while true {
                let r = pread(fd, into, count, off_t(offset))
                if r < 0 && errno == EINTR { continue }
                return r
            }
        }
        func ioError(_ call: String) -> ImageError { .io(SystemError.current(call, path: path).description) }
    }

    /// Memory standing for a file of `size` bytes whose first `data.count` bytes are `data`
    /// (the rest cannot be read: a short read, reported as an I/O error).
    public struct MemoryBytes: Bytes {
        public let data: UnsafeRawBufferPointer
        public let size: Int
        public init(data: UnsafeRawBufferPointer, size: Int) { self.data = data; self.size = size }
        public func read(_ into: UnsafeMutableRawPointer, count: Int, offset: Int) -> Int {
            guard offset >= 0, offset < data.count, count > 0 else { return 0 }
            let n = min(count, data.count - offset)
            into.copyMemory(from: data.baseAddress! + offset, byteCount: n)
            return n
        }
        public func ioError(_ call: String) -> ImageError { .io("\(call): the bytes end early") }
    }

    /// Every check `migrate check` makes, on any `Bytes`: prefix, header, length (no sum can
    /// overflow: each is compared with what is left), and with `verifyData` the checksum.
    public static func inspect<B: Bytes>(_ f: B, verifyData: Bool) throws(ImageError) -> (header: ImageHeader, dataOffset: Int) {
        let size = f.size
        if size < 16 { throw .truncated("\(size) bytes, shorter than the 16-byte prefix") }
        var prefix = [UInt8](repeating: 0, count: 16)
        if prefix.withUnsafeMutableBytes({ f.read($0.baseAddress!, count: 16, offset: 0) }) != 16 { throw f.ioError("pread") }
        if Array(prefix[0..<8]) != magic { throw .malformed("no MEMLABSN magic: not a memlab snapshot") }
        let ver = prefix[8..<12].reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) }
        if ver != version { throw .malformed("format version \(ver); this memlab reads version \(version)") }
        let n = Int(prefix[12..<16].reversed().reduce(UInt32(0)) { $0 << 8 | UInt32($1) })
        if n > maxHeader { throw .malformed("header length \(n) exceeds \(maxHeader)") }
        if size - 16 < n { throw .truncated("header says \(n) bytes but the file ends after \(size - 16)") }
        var text = [UInt8](repeating: 0, count: n)
        if n > 0 && text.withUnsafeMutableBytes({ f.read($0.baseAddress!, count: n, offset: 16) }) != n { throw f.ioError("pread") }
        let header = try ImageHeader.parse(bytes: text)
        let present = size - 16 - n   // ≥ 0 from the check above
        if present < header.regionBytes { throw .truncated("\(present) of \(header.regionBytes) bytes of page data present") }
        if present > header.regionBytes { throw .malformed("\(present - header.regionBytes) bytes after the page data") }
        if verifyData {
            // Data starts at 16+n, not page aligned: read it through a bounded buffer.
            let chunk = 1 << 20
            let buf = UnsafeMutableRawPointer.allocate(byteCount: chunk, alignment: 8)
            defer { buf.deallocate() }
            var sum = ChecksumStream()
            var done = 0
            while done < header.regionBytes {
                let want = min(chunk, header.regionBytes - done)
                var got = 0
                while got < want {
                    let r = f.read(buf + got, count: want - got, offset: 16 + n + done + got)
                    if r <= 0 { throw f.ioError("pread") }
                    got += r
                }
                sum.add(buf, length: want)
                done += want
            }
            if sum.value != header.checksum { throw .malformed("page data checksum \(String(sum.value, radix: 16)) differs from the header's \(String(header.checksum, radix: 16))") }
        }
        return (header, 16 + n)
    }
}

/// `regionChecksum` (FNV-1a over 64-bit words) fed in pieces; each piece a multiple of 8
/// bytes (region sizes are multiples of the page size, the reader's chunks of 1 MiB).
public struct ChecksumStream {
    public private(set) var value: UInt64 = 0xcbf2_9ce4_8422_2325
    public init() {}
    public mutating func add(_ p: UnsafeRawPointer, length: Int) {
        var h = value
        for i in 0..<(length / 8) {
            h ^= p.loadUnaligned(fromByteOffset: 8 * i, as: UInt64.self)
            h &*= 0x0000_0100_0000_01b3
        }
        value = h
    }
}
